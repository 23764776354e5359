//! etcd ownership registry (not implemented yet; see the ownership issue).

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{OwnershipStore, StoreError};
use crate::InputSink;
use crate::config::Config;
use crate::model::{Vip, VipOwner};

pub struct EtcdStore;

impl EtcdStore {
    pub fn new(_config: &Config) -> anyhow::Result<Self> {
        anyhow::bail!("store.backend = \"etcd\" is not implemented yet")
    }
}

#[async_trait]
impl OwnershipStore for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }
    fn describe(&self) -> String {
        String::new()
    }
    async fn run(&self, _sink: InputSink, cancel: CancellationToken) {
        cancel.cancelled().await
    }
    async fn publish(&self, _vip: Vip) -> Result<VipOwner, StoreError> {
        Err(StoreError::Other("not implemented".into()))
    }
    async fn withdraw(&self, _vip: Vip) -> Result<(), StoreError> {
        Err(StoreError::Other("not implemented".into()))
    }
}
