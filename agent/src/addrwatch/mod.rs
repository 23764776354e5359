//! Address watcher: tells the core when a hosted VIP appears on or leaves this node.

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::InputSink;
use crate::config::HostedVipConfig;

pub mod holder;
pub mod memory;
pub mod neighbour;
mod presence;
pub mod rtnetlink;

#[derive(Debug, thiserror::Error)]
pub enum AddrWatchError {
    #[error("netlink: {0}")]
    Netlink(String),
}

#[async_trait]
pub trait AddressWatcher: Send + Sync + 'static {
    /// Reports the state at start-up (`VipAppeared` for each VIP present), then every
    /// addition and removal as it happens, until cancelled.
    async fn run(
        &self,
        vips: Vec<HostedVipConfig>,
        sink: InputSink,
        cancel: CancellationToken,
    ) -> Result<(), AddrWatchError>;
}

pub fn from_config() -> Arc<dyn AddressWatcher> {
    Arc::new(rtnetlink::NetlinkAddressWatcher)
}

pub fn holder_probe() -> Arc<dyn holder::HolderProbe> {
    Arc::new(holder::ArpProbe)
}
