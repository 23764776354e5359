//! Addresses in memory: a test adds and removes a hosted VIP the way the cluster manager
//! would, and the watcher reports it like the rtnetlink one (present VIPs first, then every
//! change).

use std::collections::BTreeSet;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::holder::{HolderAnswer, HolderProbe};
use super::{AddrWatchError, AddressWatcher};
use crate::InputSink;
use crate::config::HostedVipConfig;
use crate::failover::Input;
use crate::model::Vip;

pub struct MemoryAddresses {
    present: watch::Sender<BTreeSet<Vip>>,
}

impl Default for MemoryAddresses {
    fn default() -> Self {
        MemoryAddresses {
            present: watch::channel(BTreeSet::new()).0,
        }
    }
}

impl MemoryAddresses {
    pub fn add(&self, vip: Vip) {
        self.present.send_modify(|p| {
            p.insert(vip);
        });
    }

    pub fn remove(&self, vip: Vip) {
        self.present.send_modify(|p| {
            p.remove(&vip);
        });
    }
}

#[async_trait]
impl AddressWatcher for MemoryAddresses {
    async fn run(
        &self,
        vips: Vec<HostedVipConfig>,
        sink: InputSink,
        cancel: CancellationToken,
    ) -> Result<(), AddrWatchError> {
        let watched: BTreeSet<Vip> = vips.iter().map(|v| v.address).collect();
        let mut rx = self.present.subscribe();
        let mut reported = BTreeSet::new();
        loop {
            let now: BTreeSet<Vip> = rx
                .borrow_and_update()
                .intersection(&watched)
                .copied()
                .collect();
            for vip in now.difference(&reported) {
                if sink.send(Input::VipAppeared(*vip)).await.is_err() {
                    return Ok(());
                }
            }
            for vip in reported.difference(&now) {
                if sink.send(Input::VipDisappeared(*vip)).await.is_err() {
                    return Ok(());
                }
            }
            reported = now;
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                changed = rx.changed() => if changed.is_err() { return Ok(()) },
            }
        }
    }
}

/// A link that always gives the same answer about a VIP's holder.
pub struct FixedHolder(pub HolderAnswer);

#[async_trait]
impl HolderProbe for FixedHolder {
    async fn probe(&self, _vip: Vip, _window: std::time::Duration) -> HolderAnswer {
        self.0.clone()
    }
}

/// A link where nobody answers for any VIP, and which records every VIP whose cached
/// holder this node forgot (the packets queued for it dropped), in order.
#[derive(Default)]
pub struct ForgettingHolder(std::sync::Mutex<Vec<Vip>>);

impl ForgettingHolder {
    /// The VIPs forgotten so far, oldest first.
    pub fn forgotten(&self) -> Vec<Vip> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[async_trait]
impl HolderProbe for ForgettingHolder {
    async fn probe(&self, _vip: Vip, _window: std::time::Duration) -> HolderAnswer {
        HolderAnswer::Silent
    }
    async fn forget_holder(&self, vip: Vip) -> Result<u32, String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(vip);
        Ok(1)
    }
}
