//! No keying daemon: the agent only tracks ownership (e.g. a back-end without IPsec yet).

use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{Initiated, Keying, KeyingError};
use crate::InputSink;
use crate::failover::Input;
use crate::model::{IkeSaInfo, PeerConnection, Vip, VipRole};

pub struct NoKeying;

#[async_trait]
impl Keying for NoKeying {
    fn kind(&self) -> &'static str {
        "none"
    }

    async fn run(&self, sink: InputSink, cancel: CancellationToken) {
        // Nothing to fail: report "up" once so fail-secure is not held forever.
        let _ = sink
            .send(Input::KeyingUp {
                established: Vec::new(),
            })
            .await;
        cancel.cancelled().await;
    }

    async fn list_sas(&self) -> Result<Vec<IkeSaInfo>, KeyingError> {
        Ok(Vec::new())
    }

    async fn delete_sas(&self, _vip: Vip, _role: VipRole) -> Result<u32, KeyingError> {
        Ok(0)
    }

    async fn drop_sas(&self, _vip: Vip, _spare: &super::SpareSa<'_>) -> Result<u32, KeyingError> {
        Ok(0)
    }

    async fn initiate(
        &self,
        _vip: Vip,
        conn: &PeerConnection,
        _timeout: Duration,
    ) -> Result<Initiated, KeyingError> {
        Err(KeyingError::Refused {
            command: format!("initiate {}", conn.child),
            reason: "no keying daemon is configured ([keying] backend = \"none\")".into(),
        })
    }
}
