//! Kernel IPsec state: fail-secure block policies and direct access to XFRM SAs.
//!
//! One trait, one file per implementation: `none` and `xfrm` (Linux XFRM over netlink).

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::InputSink;
use crate::config::{Config, KernelBackend};
use crate::model::{ProtectedFlow, Vip};

pub mod ike_bypass;
pub mod memory;
pub mod none;
pub mod xfrm;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("{0}")]
    Other(String),
}

/// What the kernel holds of one VIP's guard, read from the kernel (not remembered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardCheck {
    pub vip: Vip,
    /// Policies or rules the VIP's configured flows need.
    pub wanted: u32,
    /// Of those, how many the kernel holds.
    pub installed: u32,
    /// The agent's policies or rules for the VIP that no configured flow needs (left by an
    /// earlier configuration; removed only by `vipsec guard remove`).
    pub extra: u32,
}

impl GuardCheck {
    /// Every wanted policy or rule is in the kernel.
    pub fn held(&self) -> bool {
        self.wanted > 0 && self.installed >= self.wanted
    }
}

#[async_trait]
pub trait Kernel: Send + Sync + 'static {
    fn kind(&self) -> &'static str;

    /// Adopts block policies left by an earlier run of the agent (and only those);
    /// returns the VIPs whose flows are blocked now.
    async fn reconcile(&self) -> Result<Vec<Vip>, KernelError>;

    /// Puts the VIP's guard in place: every protected flow refused outside IPsec (block
    /// policies, or routing rules for IPv6 under kernel-libipsec); re-adds what is
    /// missing; idempotent. Returns how many of the VIP's flows' policies or rules the
    /// kernel holds now.
    async fn engage_fail_secure(&self, vip: Vip) -> Result<u32, KernelError>;

    /// Removes this agent's guard for the VIP; idempotent. Only ever on purpose
    /// (`vipsec guard remove`): the running agent never calls it.
    async fn release_fail_secure(&self, vip: Vip) -> Result<(), KernelError>;

    /// Reads each VIP's guard from the kernel: the VIPs with configured flows and those
    /// the kernel holds agent policies or rules for.
    async fn guard_check(&self) -> Result<Vec<GuardCheck>, KernelError> {
        Ok(Vec::new())
    }

    /// Replaces the VIP's protected flows (its policy changed) and puts the guard in
    /// place for them: the new flows are added before the old ones go, so nothing slips
    /// through in between.
    async fn set_flows(&self, vip: Vip, flows: Vec<ProtectedFlow>) -> Result<(), KernelError> {
        let _ = (vip, flows);
        Ok(())
    }

    /// Deletes the kernel's SAs to or from the VIP (the forceful path); returns how many.
    async fn delete_states(&self, vip: Vip) -> Result<u32, KernelError>;

    /// Told when the kernel announces a change that may have removed part of the guard
    /// (a policy deleted or flushed, a rule deleted) or when such announcements may have
    /// been missed; `None` when the kernel announces nothing. `run` sends the
    /// notifications.
    fn guard_disturbed(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }

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
