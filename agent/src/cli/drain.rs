//! `vipsec drain VIP [VIP...]`.

use futures::StreamExt;
use vipsec_proto::v1 as pb;

use super::CliError;
use super::client::{Target, connect};

/// Drains waiting for their answer at once, below the API's limit of streams on one
/// connection (`api::limits::MAX_STREAMS_PER_CONNECTION`, 64): calls opened before the
/// client has read the server's settings are refused above it (36 of 100 were, in the
/// 1x100 bench).
const AT_ONCE: usize = 32;

/// Drains every VIP at once: the VIPs of one VRRP instance move together, and draining
/// them one after another (each waits for its peers' answers to the DELETE) would hold the
/// move back by the sum of those waits.
pub async fn run(t: &Target, vips: &[String]) -> Result<(), CliError> {
    let client = connect(t).await?;
    let mut results: Vec<_> = futures::stream::iter(vips.iter().enumerate())
        .map(|(i, vip)| {
            let mut client = client.clone();
            async move {
                let r = client
                    .drain(pb::DrainRequest { vip: vip.clone() })
                    .await
                    .map(|r| r.into_inner());
                (i, vip, r)
            }
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    // Reported in the order given.
    results.sort_by_key(|(i, _, _)| *i);
    let results = results.into_iter().map(|(_, vip, r)| (vip, r));
    let mut failed = Vec::new();
    for (vip, r) in results {
        match r {
            Ok(r) => println!(
                "drained {vip}: {} IKE_SA(s) deleted with a DELETE to the peer; ownership withdrawn",
                r.deleted
            ),
            Err(status) => failed.push((vip, CliError::from(status))),
        }
    }
    match failed.len() {
        0 => Ok(()),
        // One VIP: its own error, with its exit code (2 for a VIP the agent does not host).
        1 if vips.len() == 1 => Err(failed.remove(0).1),
        _ => {
            let code_2 = failed.iter().all(|(_, e)| matches!(e, CliError::Usage(_)));
            let text = failed
                .iter()
                .map(|(vip, e)| format!("{vip}: {e}"))
                .collect::<Vec<_>>()
                .join("; ");
            let text = format!(
                "{} of {} VIPs not drained: {text}",
                failed.len(),
                vips.len()
            );
            Err(if code_2 {
                CliError::Usage(text)
            } else {
                CliError::Runtime(text)
            })
        }
    }
}
