//! Address watcher on rtnetlink (not implemented yet; see the ownership issue).

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{AddrWatchError, AddressWatcher};
use crate::InputSink;
use crate::config::HostedVipConfig;

#[derive(Default)]
pub struct NetlinkAddressWatcher;

#[async_trait]
impl AddressWatcher for NetlinkAddressWatcher {
    async fn run(
        &self,
        _vips: Vec<HostedVipConfig>,
        _sink: InputSink,
        cancel: CancellationToken,
    ) -> Result<(), AddrWatchError> {
        cancel.cancelled().await;
        Ok(())
    }
}
