//! `vipsec events [VIP] [--json] [--count N]`: follows the agent's failover events.

use std::io::Write;

use serde_json::json;
use vipsec_proto::v1 as pb;

use super::CliError;
use super::client::{Target, connect};
use super::render::{self, or_dash, rfc3339};

pub async fn run(
    t: &Target,
    vip: Option<String>,
    as_json: bool,
    count: Option<usize>,
) -> Result<(), CliError> {
    let mut client = connect(t).await?;
    let mut stream = client
        .watch_events(pb::WatchEventsRequest {
            vip: vip.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if !as_json {
        let _ = writeln!(
            out,
            "{:<24} {:<24} {:<15} {:<8} {:>5} {:>10}  DETAIL",
            "TIME", "EVENT", "VIP", "OWNER", "EPOCH", "DURATION"
        );
        let _ = out.flush();
    }
    let mut seen = 0usize;
    if count == Some(0) {
        return Ok(());
    }
    while let Some(e) = stream.message().await? {
        let time = rfc3339(e.timestamp.as_ref()).unwrap_or_default();
        let kind = render::event_kind(e.kind);
        let line = if as_json {
            json!({
                "time": time,
                "node": e.node,
                "event": kind,
                "vip": e.vip,
                "owner": e.owner,
                "epoch": e.epoch,
                "duration_ms": render::millis(e.duration.as_ref()),
                "detail": e.detail,
                "move": e.r#move.as_ref().map(super::moves::move_json),
            })
            .to_string()
        } else {
            let d = render::duration(e.duration.as_ref())
                .map(render::short)
                .unwrap_or_else(|| "-".into());
            format!(
                "{:<24} {:<24} {:<15} {:<8} {:>5} {:>10}  {}",
                time,
                kind,
                or_dash(&e.vip),
                or_dash(&e.owner),
                e.epoch,
                d,
                e.detail
            )
        };
        // A closed pipe (`| head`) ends the command quietly.
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            return Ok(());
        }
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
    }
    Err(CliError::Runtime(
        "the agent closed the event stream".into(),
    ))
}
