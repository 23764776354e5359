//! `vipsec health`: an exit code for cluster managers (keepalived `track_script`, Pacemaker
//! `monitor`, Kubernetes probes). 0 when the agent answers and the parts failover depends on
//! are healthy, 1 otherwise, with the reason on one line.

use vipsec_proto::v1 as pb;

use super::CliError;
use super::client::{Target, connect};

pub async fn run(t: &Target, quiet: bool) -> Result<(), CliError> {
    let mut client = connect(t).await?;
    let s = client
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner();
    let mut problems = Vec::new();
    for (name, h) in [
        ("keying", &s.keying),
        ("store", &s.store),
        ("kernel", &s.kernel),
        ("ownership", &s.ownership),
    ] {
        if let Some(h) = h
            && !h.healthy
        {
            let detail = if h.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", h.detail)
            };
            problems.push(format!("{name} ({}) unhealthy{detail}", h.kind));
        }
    }
    if problems.is_empty() {
        if !quiet {
            println!("healthy");
        }
        Ok(())
    } else {
        Err(CliError::Runtime(problems.join("; ")))
    }
}
