//! `vipsec health`: an exit code for cluster managers (keepalived `track_script`, Pacemaker
//! `monitor`, Kubernetes probes). 0 when the agent answers and the parts failover depends on
//! (see `crate::health`) are healthy, 1 otherwise, with the reason on one line.

use vipsec_proto::v1 as pb;

use super::CliError;
use super::client::{Target, connect};

pub async fn run(t: &Target, quiet: bool) -> Result<(), CliError> {
    let mut client = connect(t).await?;
    let s = client
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner();
    let problems = crate::health::problems(&s);
    if problems.is_empty() {
        if !quiet {
            println!("healthy");
        }
        Ok(())
    } else {
        Err(CliError::Runtime(problems.join("; ")))
    }
}
