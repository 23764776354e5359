//! The agent's state as the API and the CLI see it: the core's view plus backend health,
//! with wall-clock times.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

use super::guard::{GuardState, GuardView, GuardViews};
use crate::config::Config;
use crate::failover::FailoverCore;
use crate::model::{Mode, VipOwner};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthView {
    pub kind: String,
    pub healthy: bool,
    pub detail: String,
    pub since: SystemTime,
    /// The part has said how it is at least once (until then `detail` is what it is doing
    /// to find out, such as "connecting").
    #[serde(skip)]
    pub reported: bool,
}

impl HealthView {
    pub fn new(kind: &str, detail: &str) -> HealthView {
        HealthView {
            kind: kind.into(),
            healthy: false,
            detail: detail.into(),
            since: SystemTime::now(),
            reported: false,
        }
    }

    /// Records a health report; `since` only moves when the state flips.
    pub fn report(&mut self, healthy: bool, detail: String) {
        if self.healthy != healthy {
            self.since = SystemTime::now();
        }
        self.healthy = healthy;
        self.detail = detail;
        self.reported = true;
    }
}

/// The standing guard over every VIP: `engaged` when every protected VIP's guard is held.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailSecureView {
    pub enabled: bool,
    pub engaged: bool,
    /// Since when every guard has been held.
    pub since: Option<SystemTime>,
    /// Policies or rules the kernel holds for the protected flows.
    pub flows: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostedView {
    pub address: IpAddr,
    pub present: bool,
    pub owner: Option<VipOwner>,
    pub epoch: u64,
    pub draining: bool,
    /// The VIP's guard is held in the kernel.
    pub guarded: bool,
    pub guard: GuardView,
    pub ownership: String,
    pub ownership_reason: String,
    pub split_brain: bool,
    pub also_held_by: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailoverView {
    pub started_at: SystemTime,
    pub duration: Option<Duration>,
    pub reason: String,
    pub outcome: String,
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SaStateView {
    Down,
    Connecting,
    Established,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PeerView {
    pub address: IpAddr,
    pub connection: String,
    pub child: String,
    pub owner: Option<VipOwner>,
    pub epoch: u64,
    pub ike_state: SaStateView,
    pub child_state: SaStateView,
    pub established_since: Option<SystemTime>,
    pub renegotiating: bool,
    /// The VIP's guard is held in the kernel.
    pub fail_secure: bool,
    pub guard: GuardView,
    pub last_failover: Option<FailoverView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusView {
    pub node: String,
    pub mode: Mode,
    pub idle_timeout: Duration,
    pub store: HealthView,
    pub keying: HealthView,
    pub kernel: HealthView,
    /// Split brains and store writes stuck longer than a lease (see the proto).
    pub ownership: HealthView,
    /// The agent's own tasks and the core loop's heartbeat (`runtime::supervise`).
    pub runtime: HealthView,
    pub fail_secure: FailSecureView,
    pub hosted: Vec<HostedView>,
    pub peers: Vec<PeerView>,
    /// Initiations waiting in the reconnect pacer; read live when the status is asked for.
    pub initiations_queued: u32,
}

/// Backend health the runtime tracks beside the core.
#[derive(Debug, Clone)]
pub struct Health {
    pub store: HealthView,
    pub keying: HealthView,
    pub kernel: HealthView,
    /// Keeps `since` across rebuilds of the status.
    pub ownership: HealthView,
    /// Filled in by the supervisor when the status is read (`AgentHandle::status`).
    pub runtime: HealthView,
}

fn wall(now: Instant, wall_now: SystemTime, t: Instant) -> SystemTime {
    wall_now
        .checked_sub(now.saturating_duration_since(t))
        .unwrap_or(wall_now)
}

impl StatusView {
    pub fn build(
        core: &FailoverCore,
        health: &Health,
        config: &Config,
        guards: &GuardViews,
    ) -> StatusView {
        let now = Instant::now();
        let wall_now = SystemTime::now();
        let s = core.settings();
        let guard_of = |vip: &IpAddr| guards.get(vip).cloned().unwrap_or_else(GuardView::off);
        let hosted = core
            .hosted()
            .iter()
            .map(|(vip, h)| HostedView {
                address: *vip,
                present: h.present,
                owner: h.owner.clone(),
                epoch: h.epoch,
                draining: h.draining,
                guarded: guard_of(vip).state == GuardState::Held,
                guard: guard_of(vip),
                ownership: h.ownership.as_str().to_string(),
                ownership_reason: h.ownership.reason(),
                split_brain: h.split_brain,
                also_held_by: h.also_held_by.iter().cloned().collect(),
            })
            .collect();
        let peers = core
            .peers()
            .iter()
            .map(|(vip, p)| {
                let conn = config.peer(*vip).and_then(|c| c.peer_connection());
                let established = !p.sas.is_empty();
                let connecting = p.renegotiation.as_ref().is_some_and(|r| r.in_flight);
                let state = if established {
                    SaStateView::Established
                } else if connecting {
                    SaStateView::Connecting
                } else {
                    SaStateView::Down
                };
                PeerView {
                    address: *vip,
                    connection: conn
                        .as_ref()
                        .map(|c| c.connection.clone())
                        .unwrap_or_default(),
                    child: conn.map(|c| c.child).unwrap_or_default(),
                    owner: p.owner.clone(),
                    epoch: p.epoch,
                    ike_state: state,
                    child_state: state,
                    established_since: p.established_since().map(|t| wall(now, wall_now, t)),
                    renegotiating: p.renegotiation.is_some(),
                    fail_secure: guard_of(vip).state == GuardState::Held,
                    guard: guard_of(vip),
                    last_failover: p.last_failover.as_ref().map(|f| FailoverView {
                        started_at: wall(now, wall_now, f.started),
                        duration: f.duration,
                        reason: f.reason.clone(),
                        outcome: f.outcome.as_str().into(),
                        attempts: f.attempts,
                    }),
                }
            })
            .collect();
        let protected: Vec<&GuardView> = guards.values().filter(|g| g.flows > 0).collect();
        let engaged =
            !protected.is_empty() && protected.iter().all(|g| g.state == GuardState::Held);
        let since = engaged
            .then(|| protected.iter().filter_map(|g| g.held_since).max())
            .flatten();
        let flows = guards.values().map(|g| g.installed).sum();
        let mut kernel = health.kernel.clone();
        // A VIP with protected flows and no complete guard makes the kernel unhealthy: it
        // is what `vipsec health` (and every probe built on it) must fail on.
        let broken: Vec<String> = guards
            .iter()
            .filter(|(_, g)| matches!(g.state, GuardState::Partial | GuardState::Absent))
            .map(|(vip, g)| {
                let why = if g.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", g.detail)
                };
                format!(
                    "guard of {vip} {} ({} of {} in the kernel){why}",
                    g.state.as_str(),
                    g.installed,
                    g.flows
                )
            })
            .collect();
        if !broken.is_empty() {
            kernel.report(false, broken.join("; "));
        }
        let split: Vec<String> = core
            .hosted()
            .iter()
            .filter(|(_, h)| h.split_brain)
            .map(|(vip, h)| match &h.owner {
                Some(o) if o.node != s.node => {
                    format!("split brain on {vip}: here, but recorded as {}'s", o.node)
                }
                _ => format!(
                    "split brain on {vip}: recorded here, but also held by {}",
                    h.also_held_by
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
            .collect();
        let mut ownership = health.ownership.clone();
        if split.is_empty() {
            ownership.report(true, String::new());
        } else {
            ownership.report(false, split.join("; "));
        }
        StatusView {
            node: s.node.clone(),
            mode: s.mode,
            idle_timeout: core.idle_timeout(),
            store: health.store.clone(),
            keying: health.keying.clone(),
            kernel,
            ownership,
            runtime: health.runtime.clone(),
            fail_secure: FailSecureView {
                enabled: s.fail_secure,
                engaged,
                since,
                flows,
            },
            hosted,
            peers,
            initiations_queued: 0,
        }
    }
}
