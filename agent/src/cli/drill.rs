//! `vipsec drill VIP --to NODE [--timeout 30s] [--json]`: moves the VIP through the
//! configured cluster manager and prints the move's timeline against the recovery target.

use std::time::Duration;

use serde_json::json;
use vipsec_proto::v1 as pb;

use super::CliError;
use super::client::{Target, connect};
use super::moves::{move_json, move_text};
use super::render;

pub async fn run(
    t: &Target,
    vip: &str,
    to: &str,
    timeout: Duration,
    as_json: bool,
) -> Result<(), CliError> {
    let mut client = connect(t).await?;
    let r = client
        .drill(pb::DrillRequest {
            vip: vip.to_string(),
            to_node: to.to_string(),
            timeout: prost_types::Duration::try_from(timeout).ok(),
        })
        .await?
        .into_inner();
    let target_ms = render::duration(r.target.as_ref()).map(|d| d.as_millis() as u64);
    if as_json {
        let out = json!({
            "vip": vip,
            "to": to,
            "met_target": r.met_target,
            "target_ms": target_ms,
            "detail": r.detail,
            "timeline": r.timeline.as_ref().map(move_json),
        });
        println!("{out}");
        return Ok(());
    }
    if let Some(m) = &r.timeline {
        print!("{}", move_text(m));
    }
    let target = render::duration(r.target.as_ref())
        .map(render::short)
        .unwrap_or_else(|| "-".into());
    let verdict = if r.met_target { "met" } else { "missed" };
    println!("target {target}: {verdict}; {}", r.detail);
    Ok(())
}
