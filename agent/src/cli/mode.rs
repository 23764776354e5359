//! `vipsec mode fast|normal [--idle-timeout 2s]`.

use std::time::Duration;

use vipsec_proto::v1 as pb;

use super::client::{Target, connect};
use super::{CliError, ModeArg, render};

pub async fn run(
    t: &Target,
    mode: ModeArg,
    idle_timeout: Option<Duration>,
) -> Result<(), CliError> {
    let mut client = connect(t).await?;
    let req = pb::SetModeRequest {
        mode: match mode {
            ModeArg::Normal => pb::Mode::Normal,
            ModeArg::Fast => pb::Mode::Fast,
        } as i32,
        idle_timeout: idle_timeout.map(|d| prost_types::Duration::try_from(d).unwrap_or_default()),
    };
    let r = client.set_mode(req).await?.into_inner();
    let idle = render::duration(r.idle_timeout.as_ref())
        .map(render::short)
        .unwrap_or_default();
    println!("mode {} (idle timeout {idle})", render::mode(r.mode));
    Ok(())
}
