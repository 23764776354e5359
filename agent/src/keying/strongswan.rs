//! strongSwan charon over VICI (not implemented yet; see the VICI issue).

use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{Keying, KeyingError};
use crate::InputSink;
use crate::config::Config;
use crate::failover::Input;
use crate::model::{IkeSaInfo, PeerConnection, Vip, VipRole};

pub struct StrongswanKeying;

impl StrongswanKeying {
    pub fn new(_config: &Config) -> Self {
        StrongswanKeying
    }
}

#[async_trait]
impl Keying for StrongswanKeying {
    fn kind(&self) -> &'static str {
        "strongswan"
    }
    async fn run(&self, sink: InputSink, cancel: CancellationToken) {
        let _ = sink
            .send(Input::KeyingDown {
                detail: "VICI backend not implemented".into(),
            })
            .await;
        cancel.cancelled().await
    }
    async fn list_sas(&self) -> Result<Vec<IkeSaInfo>, KeyingError> {
        Err(KeyingError::Unreachable("not implemented".into()))
    }
    async fn delete_sas(&self, _vip: Vip, _role: VipRole) -> Result<u32, KeyingError> {
        Err(KeyingError::Unreachable("not implemented".into()))
    }
    async fn drop_sas(&self, _vip: Vip) -> Result<u32, KeyingError> {
        Err(KeyingError::Unreachable("not implemented".into()))
    }
    async fn initiate(
        &self,
        _vip: Vip,
        _conn: &PeerConnection,
        _t: Duration,
    ) -> Result<(), KeyingError> {
        Err(KeyingError::Unreachable("not implemented".into()))
    }
}
