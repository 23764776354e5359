//! `vipsec drain VIP`.

use vipsec_proto::v1 as pb;

use super::CliError;
use super::client::{Target, connect};

pub async fn run(t: &Target, vip: &str) -> Result<(), CliError> {
    let mut client = connect(t).await?;
    let r = client
        .drain(pb::DrainRequest {
            vip: vip.to_string(),
        })
        .await?
        .into_inner();
    println!(
        "drained {vip}: {} IKE_SA(s) deleted with a DELETE to the peer; ownership withdrawn",
        r.deleted
    );
    Ok(())
}
