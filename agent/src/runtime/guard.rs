//! The standing clear-text guard: every protected flow refused by the kernel outside
//! IPsec, for as long as the flow is configured.
//!
//! The guard is not engaged on events ("charon went down"): every gap no event names (the
//! moment between one SA's deletion and the next, a charon that dies before the agent
//! notices, an agent that is not running) would leak. It is put in place before the agent
//! answers its API, repaired when something removed a part of it (`ip xfrm policy flush`,
//! `ip rule del`), retried when an install failed, and never removed by the agent:
//! SIGTERM, SIGKILL or a panic leave it in the kernel, and the next start adopts it. Only
//! `vipsec guard remove` takes it away.
//!
//! Repairs follow the kernel's own announcements (a policy deleted or flushed, a rule
//! deleted): reading every policy and rule back four times a second cost an idle node
//! with 100 VIPs a tenth of its CPU. The periodic comparison, every
//! `kernel.guard_check`, stays for what no announcement names.
//!
//! IPsec passes it by construction (see `kernel::xfrm`): interface-bound blocks under
//! kernel-libipsec, blocks below charon's own policies with kernel ESP, routing rules after
//! charon's table 220 for IPv6 under kernel-libipsec.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::events::EventSink;
use super::policies::Policies;
use crate::config::Config;
use crate::failover::{Notice, NoticeKind};
use crate::kernel::{GuardCheck, Kernel};
use crate::model::Vip;

/// One VIP's guard as the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardState {
    /// Every policy or rule the VIP's flows need is in the kernel.
    Held,
    /// Some are missing (being repaired, or failing to install).
    Partial,
    /// None is in the kernel.
    Absent,
    /// The kernel holds the agent's policies or rules for a VIP no flow needs any more
    /// (a VIP removed from the configuration): kept until `vipsec guard remove`.
    Leftover,
    /// Fail-secure is off or there is no kernel backend: nothing is guarded.
    Off,
}

impl GuardState {
    pub fn as_str(self) -> &'static str {
        match self {
            GuardState::Held => "held",
            GuardState::Partial => "partial",
            GuardState::Absent => "absent",
            GuardState::Leftover => "leftover",
            GuardState::Off => "off",
        }
    }

    fn of(check: &GuardCheck) -> GuardState {
        if check.wanted == 0 {
            GuardState::Leftover
        } else if check.held() {
            GuardState::Held
        } else if check.installed == 0 {
            GuardState::Absent
        } else {
            GuardState::Partial
        }
    }
}

/// What status and health show of one VIP's guard.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuardView {
    pub state: GuardState,
    /// Policies or rules the VIP's flows need.
    pub flows: u32,
    /// Of those, how many the kernel holds.
    pub installed: u32,
    /// Where the flows come from: "config", "policy", "policy-missing" (the VIP's policy
    /// disappeared; its last flows stay guarded), or "" for a leftover.
    pub source: String,
    /// Since when the guard has been held without a gap.
    pub held_since: Option<SystemTime>,
    /// Why it is not held (the last install error), if it is not.
    pub detail: String,
}

impl GuardView {
    pub fn off() -> GuardView {
        GuardView {
            state: GuardState::Off,
            flows: 0,
            installed: 0,
            source: String::new(),
            held_since: None,
            detail: String::new(),
        }
    }
}

pub type GuardViews = BTreeMap<Vip, GuardView>;

/// Keeps the guard in the kernel; publishes what the kernel holds.
pub(crate) struct GuardKeeper {
    pub(crate) kernel: Arc<dyn Kernel>,
    pub(crate) config: Arc<Config>,
    pub(crate) policies: Option<Policies>,
    pub(crate) sink: EventSink,
    pub(crate) views: watch::Sender<GuardViews>,
    /// VIPs whose last repair failed or changed nothing (a foreign policy holding a
    /// selector, an interface gone): how often in a row, and when to try again.
    pub(crate) backoff: std::sync::Mutex<BTreeMap<Vip, (u32, tokio::time::Instant)>>,
}

/// The longest wait between two repair attempts that keep failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The soonest a guard that is not whole is looked at again.
const RETRY: Duration = Duration::from_millis(250);

impl GuardKeeper {
    /// Whether the agent guards anything at all.
    pub fn enabled(config: &Config) -> bool {
        config.kernel.fail_secure && config.kernel.backend != crate::config::KernelBackend::None
    }

    fn source(&self, vip: Vip) -> String {
        if self.config.policy_managed(vip) {
            self.policies
                .as_ref()
                .map_or("policy", |p| p.guard_source(vip))
                .to_string()
        } else {
            "config".to_string()
        }
    }

    /// Puts every protected VIP's guard in place and reads the kernel back; called before
    /// the agent answers its API, and then by [`GuardKeeper::run`]. Returns whether
    /// every guard is held.
    pub async fn pass(&self, first: bool) -> bool {
        let checks = match self.kernel.guard_check().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot read the guard from the kernel");
                self.views.send_modify(|views| {
                    for v in views.values_mut() {
                        v.detail = format!("cannot read the kernel: {e}");
                    }
                });
                return false;
            }
        };
        let mut all_held = true;
        let mut views = self.views.borrow().clone();
        views.retain(|vip, _| checks.iter().any(|c| c.vip == *vip));
        for check in checks {
            let vip = check.vip;
            let mut check = check;
            // Why it is not held stays shown while a repair waits for its next attempt.
            let mut detail = match views.get(&vip) {
                Some(v) if !check.held() => v.detail.clone(),
                _ => String::new(),
            };
            let due = self
                .backoff
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&vip)
                .is_none_or(|(_, at)| tokio::time::Instant::now() >= *at);
            if check.wanted > 0 && !check.held() && due {
                let missing = check.wanted - check.installed;
                let result = self.kernel.engage_fail_secure(vip).await;
                self.note_attempt(vip, matches!(result, Ok(n) if n >= check.wanted));
                match result {
                    Ok(n) if n <= check.installed => {
                        detail = format!(
                            "{} of {} policies or rules cannot be installed (a policy the agent does not own may hold the selector; see the log)",
                            check.wanted - n,
                            check.wanted
                        );
                    }
                    Ok(n) => {
                        check.installed = n;
                        detail.clear();
                        let what = if first {
                            format!("guard in place: {n} of {} policies or rules", check.wanted)
                        } else {
                            format!(
                                "guard repaired: {missing} of {} policies or rules were missing from the kernel",
                                check.wanted
                            )
                        };
                        if first {
                            info!(%vip, installed = n, wanted = check.wanted, "guard in place");
                        } else {
                            warn!(%vip, missing, wanted = check.wanted, "guard repaired");
                        }
                        self.sink.emit(
                            Notice::new(NoticeKind::FailSecureEngaged, Some(vip)).detail(what),
                        );
                    }
                    Err(e) => {
                        detail = e.to_string();
                        let before = views.get(&vip).map(|v| v.detail.clone());
                        // One event per distinct failure; it is retried on every pass.
                        if before.as_deref() != Some(detail.as_str()) {
                            warn!(%vip, error = %e, "guard install failed; retrying");
                            self.sink.emit(
                                Notice::new(NoticeKind::ActionFailed, Some(vip))
                                    .detail(format!("guard: {e}")),
                            );
                        }
                    }
                }
            }
            let state = GuardState::of(&check);
            self.sink
                .metrics()
                .set_guard_held(vip, state == GuardState::Held);
            all_held &= state == GuardState::Held || state == GuardState::Leftover;
            let held_since = match (state, views.get(&vip)) {
                (GuardState::Held, Some(v)) if v.held_since.is_some() => v.held_since,
                (GuardState::Held, _) => Some(SystemTime::now()),
                _ => None,
            };
            views.insert(
                vip,
                GuardView {
                    state,
                    flows: check.wanted,
                    installed: check.installed,
                    source: if check.wanted == 0 {
                        String::new()
                    } else {
                        self.source(vip)
                    },
                    held_since,
                    detail,
                },
            );
        }
        self.views.send_if_modified(|old| {
            if *old == views {
                false
            } else {
                *old = views;
                true
            }
        });
        all_held
    }

    /// How soon a guard that is not whole is looked at again: when the first repair's
    /// backoff ends, or [`RETRY`] when none is waiting (a pass that could not read the
    /// kernel).
    fn retry_in(&self) -> Duration {
        let backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        backoff
            .values()
            .map(|(_, at)| at.saturating_duration_since(now))
            .min()
            .map_or(RETRY, |d| d.max(RETRY))
    }

    /// Spaces out repairs that keep failing (every pass would otherwise log and retry).
    fn note_attempt(&self, vip: Vip, complete: bool) {
        let mut backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        if complete {
            backoff.remove(&vip);
            return;
        }
        let failures = backoff.get(&vip).map_or(0, |(n, _)| *n) + 1;
        let wait =
            (Duration::from_millis(250) * 2u32.saturating_pow(failures.min(8))).min(MAX_BACKOFF);
        backoff.insert(vip, (failures, tokio::time::Instant::now() + wait));
    }

    /// Compares the guard with the kernel until cancelled: at once when the kernel
    /// announces a change that may have removed part of it, every `interval` in any case
    /// (a change nothing announced), and, while a guard is not whole, when the next
    /// repair's backoff ends.
    pub async fn run(&self, interval: Duration, cancel: CancellationToken) {
        let disturbed = self.kernel.guard_disturbed();
        let announced = async || match &disturbed {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        };
        // Not known after a restart of this task: look again soon.
        let mut whole = false;
        loop {
            let wait = if whole {
                interval
            } else {
                self.retry_in().min(interval)
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = announced() => {}
            }
            whole = self.pass(false).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(wanted: u32, installed: u32, extra: u32) -> GuardCheck {
        GuardCheck {
            vip: "192.0.2.100".parse().unwrap(),
            wanted,
            installed,
            extra,
        }
    }

    #[test]
    fn the_state_says_what_the_kernel_holds() {
        assert_eq!(GuardState::of(&check(3, 3, 0)), GuardState::Held);
        assert_eq!(GuardState::of(&check(3, 1, 0)), GuardState::Partial);
        assert_eq!(GuardState::of(&check(3, 0, 2)), GuardState::Absent);
        assert_eq!(GuardState::of(&check(0, 0, 2)), GuardState::Leftover);
    }
}
