//! The knobs of the failover policy.

use std::time::Duration;

use super::RetrySchedule;
use crate::config::{Config, KernelBackend, StoreBackend};
use crate::model::Mode;

/// The knobs of the failover policy, taken from the config.
#[derive(Debug, Clone)]
pub struct CoreSettings {
    pub node: String,
    pub mode: Mode,
    pub fast_idle_timeout: Duration,
    pub normal_idle_timeout: Duration,
    pub retry: RetrySchedule,
    pub owner_wait: Duration,
    pub drain_hold: Duration,
    pub fail_secure: bool,
    /// The store is shared by the cluster, so a missing owner record means "in transit"
    /// and is worth waiting for. The embedded store only knows this node.
    pub cluster_store: bool,
    /// How long a hosted VIP may be here while another node holds its record before that
    /// is reported as a split brain (a hand-off passes through it briefly).
    pub split_brain_grace: Duration,
    /// While the store is unreachable, accept SAs for a VIP on the kernel's word alone.
    pub trust_kernel_when_store_down: bool,
    /// When a VIP arrives here while another node is its owner of record, ask the link
    /// for this long whether that node still holds the address; silence lets this node
    /// take the record over at once instead of waiting out the old lease. None: never.
    pub takeover_probe: Option<Duration>,
    /// While a renegotiation has no owner record to wait for (no cluster store, or the
    /// store unreachable), probe the VIP's IKE port this often and initiate the moment it
    /// answers after silence. None: never.
    pub ike_probe: Option<Duration>,
    /// The most initiations this node's pacer has in flight at once
    /// (`failover.reconnect.max_concurrency`): how many of its own VIPs can reach a new
    /// owner together, for the size of the crowd it is part of.
    pub max_concurrency: u32,
}

impl CoreSettings {
    pub fn from_config(c: &Config) -> CoreSettings {
        CoreSettings {
            node: c.node.clone(),
            mode: c.failover.mode,
            fast_idle_timeout: c.failover.idle_timeout,
            normal_idle_timeout: c.failover.normal_idle_timeout,
            retry: RetrySchedule {
                initial: c.failover.retry_initial,
                max: c.failover.retry_max,
                deadline: c.failover.retry_deadline,
                cooldown: c.failover.retry_cooldown,
            },
            owner_wait: c.failover.owner_wait,
            drain_hold: c.failover.drain_hold,
            // Without a kernel backend nothing can be blocked: say "disabled" rather than
            // report an engagement that protects nothing.
            fail_secure: c.kernel.fail_secure && c.kernel.backend != KernelBackend::None,
            cluster_store: c.store.backend == StoreBackend::Etcd,
            split_brain_grace: c.failover.split_brain_grace,
            trust_kernel_when_store_down: c.failover.trust_kernel_when_store_down,
            takeover_probe: Some(c.failover.takeover_probe).filter(|w| !w.is_zero()),
            ike_probe: Some(c.failover.ike_probe_interval).filter(|w| !w.is_zero()),
            max_concurrency: c
                .failover
                .reconnect
                .max_concurrency
                .max(c.failover.reconnect.concurrency)
                .max(1),
        }
    }
}
