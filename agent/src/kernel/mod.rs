//! Kernel IPsec state: fail-secure block policies and direct access to XFRM SAs.
//!
//! One trait, one file per implementation: `none` and `xfrm` (Linux XFRM over netlink).

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::InputSink;
use crate::config::{Config, KernelBackend};
use crate::model::{ProtectedFlow, Vip};

pub mod none;
pub mod xfrm;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("{0}")]
    Other(String),
}

#[async_trait]
pub trait Kernel: Send + Sync + 'static {
    fn kind(&self) -> &'static str;

    /// Adopts block policies left by an earlier run of the agent (and only those);
    /// returns the VIPs whose flows are blocked now.
    async fn reconcile(&self) -> Result<Vec<Vip>, KernelError>;

    /// Blocks the VIP's protected flows (from config); idempotent.
    async fn engage_fail_secure(&self, vip: Vip) -> Result<u32, KernelError>;

    /// Removes this agent's block policies for the VIP; idempotent.
    async fn release_fail_secure(&self, vip: Vip) -> Result<(), KernelError>;

    /// Replaces the VIP's protected flows (its policy changed). Where the VIP's flows are
    /// blocked now, the block follows at once: the new flows are added before the old
    /// ones go, so nothing slips through in between.
    async fn set_flows(&self, vip: Vip, flows: Vec<ProtectedFlow>) -> Result<(), KernelError> {
        let _ = (vip, flows);
        Ok(())
    }

    /// Deletes the kernel's SAs to or from the VIP (the forceful path); returns how many.
    async fn delete_states(&self, vip: Vip) -> Result<u32, KernelError>;

    /// Feeds kernel events (expire, acquire) to the core until cancelled.
    async fn run(&self, sink: InputSink, cancel: CancellationToken) {
        let _ = sink;
        cancel.cancelled().await;
    }
}

pub fn from_config(config: &Config) -> anyhow::Result<Arc<dyn Kernel>> {
    Ok(match config.kernel.backend {
        KernelBackend::None => Arc::new(none::NoKernel),
        KernelBackend::Xfrm => Arc::new(xfrm::XfrmKernel::new(config)?),
    })
}
