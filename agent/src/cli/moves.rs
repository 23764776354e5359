//! `vipsec moves [VIP] [--json]`: timelines of recent VIP moves, one table each.

use serde_json::{Value, json};
use vipsec_proto::v1 as pb;

use super::CliError;
use super::client::{Target, connect};
use super::render::{self, rfc3339};

pub async fn run(t: &Target, vip: Option<String>, as_json: bool) -> Result<(), CliError> {
    let mut client = connect(t).await?;
    let moves = client
        .list_moves(pb::ListMovesRequest {
            vip: vip.unwrap_or_default(),
            limit: 0,
        })
        .await?
        .into_inner()
        .moves;
    if as_json {
        let all: Vec<Value> = moves.iter().map(move_json).collect();
        println!("{}", Value::Array(all));
        return Ok(());
    }
    if moves.is_empty() {
        println!("no moves recorded");
    }
    for (i, m) in moves.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print!("{}", move_text(m));
    }
    Ok(())
}

fn ms(ts: Option<&prost_types::Timestamp>) -> Option<i64> {
    ts.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// Each mark with its offset from the first mark and the delta from the one before.
fn offsets(m: &pb::Move) -> Vec<(&pb::MoveMark, i64, Option<i64>)> {
    let first = m
        .marks
        .iter()
        .filter_map(|k| ms(k.at.as_ref()))
        .min()
        .unwrap_or(0);
    let mut prev: Option<i64> = None;
    m.marks
        .iter()
        .map(|k| {
            let at = ms(k.at.as_ref()).unwrap_or(first);
            let delta = prev.map(|p| at - p);
            prev = Some(at);
            (k, at - first, delta)
        })
        .collect()
}

pub fn move_json(m: &pb::Move) -> Value {
    let marks: Vec<Value> = offsets(m)
        .into_iter()
        .map(|(k, offset, delta)| {
            json!({
                "step": k.step,
                "node": k.node,
                "at": rfc3339(k.at.as_ref()),
                "offset_ms": offset,
                "delta_ms": delta,
            })
        })
        .collect();
    json!({
        "vip": m.vip,
        "epoch": m.epoch,
        "from": (!m.from_node.is_empty()).then_some(&m.from_node),
        "to": m.to_node,
        "complete": m.complete,
        "recovery_ms": render::duration(m.recovery.as_ref()).map(|d| d.as_millis() as u64),
        "marks": marks,
    })
}

pub fn move_text(m: &pb::Move) -> String {
    let from = if m.from_node.is_empty() {
        "(none)"
    } else {
        &m.from_node
    };
    let recovery = render::duration(m.recovery.as_ref())
        .map(|d| format!(", recovery {}", render::short(d)))
        .unwrap_or_default();
    let state = if m.complete { "complete" } else { "incomplete" };
    let mut table = render::table(&["step", "node", "time", "offset", "delta"]);
    for (k, offset, delta) in offsets(m) {
        let time = rfc3339(k.at.as_ref()).unwrap_or_default();
        table.add_row(vec![
            k.step.clone(),
            k.node.clone(),
            time,
            format!("+{offset} ms"),
            delta
                .map(|d| format!("{d:+} ms"))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    format!(
        "{} epoch {}: {from} -> {} ({state}{recovery})\n{table}\n",
        m.vip, m.epoch, m.to_node
    )
}
