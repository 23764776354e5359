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
    // The VIP column fits an IPv4 address (15); an IPv6 VIP widens it, from the filter
    // at once, or from the first such event on (a stream has no "widest row" to wait for).
    let mut vip_width = vip_column_width(15, vip.as_deref().unwrap_or(""));
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
            "{:<24} {:<24} {:<vip_width$} {:<8} {:>5} {:>10}  DETAIL",
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
            vip_width = vip_column_width(vip_width, &e.vip);
            format!(
                "{:<24} {:<24} {:<vip_width$} {:<8} {:>5} {:>10}  {}",
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

fn vip_column_width(width: usize, vip: &str) -> usize {
    width.max(vip.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vip_column_grows_for_ipv6_and_never_shrinks() {
        assert_eq!(vip_column_width(15, ""), 15);
        assert_eq!(vip_column_width(15, "192.0.2.100"), 15);
        let w = vip_column_width(15, "2001:db8:ffff:ffff:ffff:ffff:ffff:100");
        assert_eq!(w, 37);
        assert_eq!(vip_column_width(w, "192.0.2.100"), 37);
    }
}
