//! The failover core: `(state, input) -> actions`, with no I/O.
//!
//! The whole failover policy of vipsec is in this module. On a back-end it publishes
//! ownership when a hosted VIP appears and, when the VIP leaves, withdraws the record and
//! deletes the SAs gracefully. On a front-end it watches each peer VIP's owner record, its
//! SAs and their counters; when the owner changes, the SA is deleted, or the peer goes
//! silent, it drops the stale IKE_SA and starts a fresh one at once, retrying on a bounded
//! schedule. While the keying daemon is down it keeps the protected flows blocked.
//!
//! Time comes in as an argument (`tokio::time::Instant`), so tests drive the core with
//! paused time and scripted inputs.
//!
//! The core's state is in `state` (`settings`: its knobs). Each kind of input is handled in
//! one place: `hosted` (a hosted VIP arriving, leaving, drained), `owners` (owner records,
//! holders, the store's health), `sas` (the keying daemon, SAs, counters), `renegotiation`
//! (initiate, retry, give up) and `guard` (the split-brain guard and fast takeover).

mod crowd;
mod guard;
mod hosted;
mod idle;
mod ike_probing;
mod input;
mod owners;
mod renegotiation;
mod retry;
mod sas;
mod settings;
mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

pub use guard::Ownership;
pub use idle::IdleDetector;
pub use input::{Action, HolderAnswer, Input, Notice, NoticeKind, SaRef, Timer};
pub use retry::RetrySchedule;
pub use settings::CoreSettings;
pub use state::{
    FailoverOutcome, FailoverSummary, HostedVip, IkeProbing, OwnerWait, PeerSa, PeerVip,
    Renegotiation,
};

use crate::model::{Mode, Vip, VipOwner};

/// The failover state machine of one node.
#[derive(Debug, Clone)]
pub struct FailoverCore {
    settings: CoreSettings,
    hosted: BTreeMap<Vip, HostedVip>,
    peers: BTreeMap<Vip, PeerVip>,
    /// `None` until the keying backend first reports.
    keying_up: Option<bool>,
    /// `None` until the store first reports.
    store_healthy: Option<bool>,
    /// The time of the input being handled (inputs carry time; helpers read it here).
    now: Instant,
    /// Who owns every VIP and how many front-ends each holder serves, to size the crowd
    /// that renegotiates with a new owner at once.
    crowds: crowd::Crowds,
}

type Out = Vec<Action>;

impl FailoverCore {
    /// `hosted` and `peers` list each VIP and whether it has protected flows.
    pub fn new(
        settings: CoreSettings,
        hosted: &[(Vip, bool)],
        peers: &[(Vip, bool)],
    ) -> FailoverCore {
        FailoverCore {
            settings,
            hosted: hosted
                .iter()
                .map(|(v, p)| {
                    (
                        *v,
                        HostedVip {
                            protected: *p,
                            ..HostedVip::default()
                        },
                    )
                })
                .collect(),
            peers: peers.iter().map(|(v, p)| (*v, PeerVip::new(*p))).collect(),
            keying_up: None,
            store_healthy: None,
            now: Instant::now(),
            crowds: crowd::Crowds::default(),
        }
    }

    pub fn settings(&self) -> &CoreSettings {
        &self.settings
    }
    pub fn hosted(&self) -> &BTreeMap<Vip, HostedVip> {
        &self.hosted
    }
    pub fn peers(&self) -> &BTreeMap<Vip, PeerVip> {
        &self.peers
    }
    /// The highest epoch known for a VIP (0 for one never owned or not configured).
    pub fn epoch_of(&self, vip: Vip) -> u64 {
        self.hosted
            .get(&vip)
            .map(|h| h.epoch)
            .or_else(|| self.peers.get(&vip).map(|p| p.epoch))
            .unwrap_or(0)
    }

    /// The owner of record the core knows for a VIP.
    pub fn owner_of(&self, vip: Vip) -> Option<&VipOwner> {
        self.hosted
            .get(&vip)
            .and_then(|h| h.owner.as_ref())
            .or_else(|| self.peers.get(&vip).and_then(|p| p.owner.as_ref()))
    }

    pub fn epochs(&self) -> impl Iterator<Item = (Vip, u64)> + '_ {
        self.hosted
            .iter()
            .map(|(v, h)| (*v, h.epoch))
            .chain(self.peers.iter().map(|(v, p)| (*v, p.epoch)))
    }

    pub fn keying_up(&self) -> bool {
        self.keying_up == Some(true)
    }
    pub fn store_healthy(&self) -> bool {
        self.store_healthy == Some(true)
    }

    /// The idle timeout in force: fast mode's, or normal mode's unless the cluster store
    /// is unreachable, in which case the idle detector is the only failure detector left.
    pub fn idle_timeout(&self) -> Duration {
        let store_lost = self.settings.cluster_store && self.store_healthy == Some(false);
        if self.settings.mode == Mode::Fast || store_lost {
            self.settings.fast_idle_timeout
        } else {
            self.settings.normal_idle_timeout
        }
    }

    /// Actions at start-up. The clear-text guard is not the core's: it stands in the
    /// kernel for every protected flow whatever the core decides (`runtime::guard`), so
    /// no gap between two SAs, and no state the core has not seen, can leak.
    pub fn start(&mut self, now: Instant) -> Out {
        self.now = now;
        Vec::new()
    }

    pub fn handle(&mut self, now: Instant, input: Input) -> Out {
        self.now = now;
        let mut out = Vec::new();
        match input {
            Input::VipAppeared(vip) => self.vip_appeared(&mut out, vip),
            Input::HolderProbed { vip, epoch, answer } => {
                self.holder_probed(&mut out, vip, epoch, answer)
            }
            Input::VipDisappeared(vip) => self.vip_disappeared(&mut out, vip),
            Input::OwnerSnapshot(records) => self.owner_snapshot(&mut out, now, records),
            Input::OwnerChanged { vip, owner } => self.owner_changed(&mut out, now, vip, owner),
            Input::HoldersSnapshot(holders) => self.holders_snapshot(&mut out, now, holders),
            Input::HolderChanged {
                vip,
                node,
                holds,
                followers,
            } => self.holder_changed(&mut out, now, vip, node, holds, followers),
            Input::StoreHealth { healthy, detail } => self.store_health(&mut out, healthy, detail),
            Input::KeyingUp { established } => self.keying_came_up(&mut out, now, established),
            Input::KeyingDown { detail } => self.keying_went_down(&mut out, detail),
            Input::SaUp(sa) => self.sa_up(&mut out, now, sa),
            Input::SaDown { sa, reason } => self.sa_down(&mut out, now, sa, reason),
            Input::CountersSampled { vip, counters } => self.counters(&mut out, now, vip, counters),
            Input::InitiateStarted { .. } => {}
            Input::InitiateFinished {
                vip,
                attempt,
                result,
            } => self.initiate_finished(&mut out, now, vip, attempt, result),
            Input::TimerFired(timer) => self.timer(&mut out, now, timer),
            Input::SetMode { mode, idle_timeout } => self.set_mode(&mut out, mode, idle_timeout),
            Input::Drain(vip) => self.drain(&mut out, vip),
            Input::PublishFailed(vip) => self.publish_failed(&mut out, vip),
            Input::IkeProbed { vip, answered } => self.ike_probed(&mut out, now, vip, answered),
        }
        out
    }

    fn set_mode(&mut self, out: &mut Out, mode: Mode, idle_timeout: Option<Duration>) {
        self.settings.mode = mode;
        if let Some(t) = idle_timeout {
            match mode {
                Mode::Fast => self.settings.fast_idle_timeout = t,
                Mode::Normal => self.settings.normal_idle_timeout = t,
            }
        }
        let detail = format!(
            "{mode}, idle timeout {}",
            humantime::format_duration(self.idle_timeout())
        );
        out.push(Action::Notify(
            Notice::new(NoticeKind::ModeChanged, None).detail(detail),
        ));
    }

    fn timer(&mut self, out: &mut Out, now: Instant, timer: Timer) {
        match timer {
            Timer::Retry { vip, generation } => self.retry_timer(out, vip, generation),
            Timer::OwnerWait { vip, generation } => self.owner_wait_timer(out, vip, generation),
            Timer::Cooldown { vip, generation } => self.cooldown_timer(out, now, vip, generation),
            Timer::SplitBrainGrace { vip } => self.split_brain_timer(out, now, vip),
            Timer::Vacant { vip, generation } => self.vacant_timer(out, now, vip, generation),
            Timer::Republish { vip, generation } => self.republish_timer(out, vip, generation),
            Timer::DrainHold { vip, generation } => {
                self.drain_hold_timer(out, now, vip, generation)
            }
        }
    }
}
