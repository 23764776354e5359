//! `vipsec log-level FILTER`.

use vipsec_proto::v1 as pb;

use super::CliError;
use super::client::{Target, connect};

pub async fn run(t: &Target, filter: &str) -> Result<(), CliError> {
    let mut client = connect(t).await?;
    let r = client
        .set_log_level(pb::SetLogLevelRequest {
            filter: filter.to_string(),
        })
        .await?
        .into_inner();
    println!("log filter is now {:?}", r.filter);
    Ok(())
}
