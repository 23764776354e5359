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

mod crowd;
mod guard;
mod idle;
mod input;
mod retry;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

pub use guard::Ownership;
pub use idle::IdleDetector;
pub use input::{Action, HolderAnswer, Input, Notice, NoticeKind, SaRef, Timer};
pub use retry::RetrySchedule;

use crate::config::{Config, KernelBackend, StoreBackend};
use crate::model::{IkeId, Mode, TrafficCounters, Vip, VipOwner, VipRole};

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
        }
    }
}

/// A VIP this node may host.
#[derive(Debug, Clone, Default)]
pub struct HostedVip {
    /// The VIP has answers to keep out of clear text (its `protect` flows).
    pub protected: bool,
    pub present: bool,
    pub owner: Option<VipOwner>,
    /// Highest epoch seen; kept after the record is withdrawn.
    pub epoch: u64,
    pub draining: bool,
    pub sas: BTreeSet<IkeId>,
    /// What the split-brain guard concluded last.
    pub ownership: Ownership,
    /// The runtime was told to accept SAs for the VIP.
    pub accepting: bool,
    /// Since when another node's record stands while the VIP is here.
    pub conflict_since: Option<Instant>,
    /// That conflict outlasted the grace and was reported.
    pub split_brain: bool,
    /// Other nodes that mark the VIP's address as theirs in the store.
    pub also_held_by: BTreeSet<String>,
    /// The VIP arrived while the store was unreachable (a takeover the store cannot
    /// confirm yet), as opposed to being here already when the store went away.
    pub arrived_in_outage: bool,
    /// The link was asked about the holder of record at (generation, epoch): once each.
    probed: Option<(u64, u64)>,
    generation: u64,
}

/// One SA toward a peer VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSa {
    pub since: Instant,
    /// Owner epoch when the SA came up; 0 when the owner was unknown then.
    pub epoch: u64,
}

/// A running attempt to bring protection toward a peer VIP back.
#[derive(Debug, Clone)]
pub struct Renegotiation {
    pub started: Instant,
    pub reason: String,
    pub attempts: u32,
    pub in_flight: bool,
    pub owner_wait: OwnerWait,
    pub waiting_for_keying: bool,
    /// Something worth an immediate new attempt happened while one was in flight.
    retry_now: bool,
    /// When the attempt under way (or the last one) started.
    attempt_started: Instant,
}

/// Whether a renegotiation holds back for a new owner record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerWait {
    NotYet,
    Waiting,
    /// Waited `owner_wait` in vain; initiate whoever answers.
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverOutcome {
    Recovered,
    Running,
    GaveUp,
}

impl FailoverOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverOutcome::Recovered => "recovered",
            FailoverOutcome::Running => "running",
            FailoverOutcome::GaveUp => "gave-up",
        }
    }
}

#[derive(Debug, Clone)]
pub struct FailoverSummary {
    pub started: Instant,
    pub duration: Option<Duration>,
    pub reason: String,
    pub outcome: FailoverOutcome,
    pub attempts: u32,
}

/// A VIP this node talks to.
#[derive(Debug, Clone)]
pub struct PeerVip {
    /// The VIP has flows to block while the keying daemon is down.
    pub protected: bool,
    pub owner: Option<VipOwner>,
    pub epoch: u64,
    /// The first owner snapshot has been seen.
    synced: bool,
    pub sas: BTreeMap<IkeId, PeerSa>,
    pub idle: IdleDetector,
    pub renegotiation: Option<Renegotiation>,
    pub last_failover: Option<FailoverSummary>,
    generation: u64,
    /// Counts the times the owner record vanished (for `Timer::Vacant`).
    vacancies: u64,
}

impl PeerVip {
    fn new(protected: bool) -> Self {
        PeerVip {
            protected,
            owner: None,
            epoch: 0,
            synced: false,
            sas: BTreeMap::new(),
            idle: IdleDetector::default(),
            renegotiation: None,
            last_failover: None,
            generation: 0,
            vacancies: 0,
        }
    }

    pub fn established_since(&self) -> Option<Instant> {
        self.sas.values().map(|s| s.since).min()
    }
}

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

/// Wait before publishing again after the store failed to record this node's ownership.
const REPUBLISH_AFTER: Duration = Duration::from_millis(500);

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
            Input::OwnerSnapshot(records) => {
                let records: BTreeMap<Vip, Option<VipOwner>> = records.into_iter().collect();
                for (vip, owner) in &records {
                    self.crowds
                        .owner(*vip, owner.as_ref().map(|o| o.node.as_str()));
                }
                let vips: Vec<Vip> = self
                    .hosted
                    .keys()
                    .chain(self.peers.keys())
                    .copied()
                    .collect();
                for vip in vips {
                    let owner = records.get(&vip).cloned().flatten();
                    self.owner_update(&mut out, now, vip, owner, true);
                }
            }
            Input::OwnerChanged { vip, owner } => {
                self.crowds
                    .owner(vip, owner.as_ref().map(|o| o.node.as_str()));
                self.owner_update(&mut out, now, vip, owner, false)
            }
            Input::HoldersSnapshot(holders) => {
                self.crowds.holders_snapshot(&holders);
                let me = self.settings.node.clone();
                let vips: Vec<Vip> = self.hosted.keys().copied().collect();
                for vip in vips {
                    let others: BTreeSet<String> = holders
                        .iter()
                        .filter(|(v, n, _)| *v == vip && *n != me)
                        .map(|(_, n, _)| n.clone())
                        .collect();
                    let h = self.hosted.get_mut(&vip).expect("hosted VIP");
                    if h.also_held_by != others {
                        h.also_held_by = others;
                        self.guard(&mut out, now, vip);
                    }
                }
            }
            Input::HolderChanged {
                vip,
                node,
                holds,
                followers,
            } => {
                self.crowds.holder(vip, &node, holds, followers);
                if node != self.settings.node
                    && let Some(h) = self.hosted.get_mut(&vip)
                {
                    let changed = if holds {
                        h.also_held_by.insert(node)
                    } else {
                        h.also_held_by.remove(&node)
                    };
                    if changed {
                        self.guard(&mut out, now, vip);
                    }
                }
            }
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
            Input::SetMode { mode, idle_timeout } => {
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
            Input::Drain(vip) => self.drain(&mut out, vip),
            Input::PublishFailed(vip) => {
                // Without its record the VIP accepts no SA here: never leave it at one try.
                if let Some(h) = self.hosted.get(&vip)
                    && h.present
                    && !h.draining
                {
                    out.push(Action::StartTimer {
                        timer: Timer::Republish {
                            vip,
                            generation: h.generation,
                        },
                        after: REPUBLISH_AFTER,
                    });
                }
            }
        }
        out
    }

    // ----- back-end side: hosted VIPs -----

    fn vip_appeared(&mut self, out: &mut Out, vip: Vip) {
        let Some(h) = self.hosted.get_mut(&vip) else {
            return;
        };
        if h.present {
            return;
        }
        h.present = true;
        h.draining = false;
        h.generation += 1;
        h.arrived_in_outage = self.settings.cluster_store && self.store_healthy != Some(true);
        out.push(Action::PublishOwnership { vip });
        out.push(Action::Notify(
            Notice::new(NoticeKind::VipAcquired, Some(vip)).epoch(h.epoch),
        ));
        self.guard(out, self.now, vip);
    }

    fn vip_disappeared(&mut self, out: &mut Out, vip: Vip) {
        let Some(h) = self.hosted.get_mut(&vip) else {
            return;
        };
        if !h.present {
            return;
        }
        h.present = false;
        h.draining = false;
        h.generation += 1;
        // Withdraw first: front-ends learn from the store within milliseconds, while the
        // DELETEs need the keying daemon and the peers.
        out.push(Action::WithdrawOwnership { vip });
        match h.owner.as_ref().filter(|o| o.node != self.settings.node) {
            // Another node is already on record (this node was paused or slow through the
            // move): the front-ends have moved on and drop their old SAs themselves; a
            // DELETE decided now would act on a tenure that is over.
            Some(o) => out.push(Action::Notify(
                Notice::new(NoticeKind::ActionFenced, Some(vip))
                    .owner(Some(o))
                    .detail(format!(
                        "delete: {} holds the VIP at epoch {}; this node's old SAs are left to expire",
                        o.node, o.epoch
                    )),
            )),
            None => out.push(Action::DeleteSas {
                vip,
                role: VipRole::Hosted,
            }),
        }
        out.push(Action::Notify(
            Notice::new(NoticeKind::VipReleased, Some(vip)).epoch(h.epoch),
        ));
        self.guard(out, self.now, vip);
    }

    fn drain(&mut self, out: &mut Out, vip: Vip) {
        let Some(h) = self.hosted.get_mut(&vip) else {
            out.push(Action::Notify(
                Notice::new(NoticeKind::ActionFailed, Some(vip))
                    .detail("drain: not a hosted VIP of this node"),
            ));
            return;
        };
        h.draining = true;
        h.generation += 1;
        // Refuse new SAs first: a front-end whose DELETE arrives before the draining
        // record must not be served here again.
        self.guard(out, self.now, vip);
        let h = self.hosted.get_mut(&vip).expect("hosted VIP");
        // DELETE first, while front-ends still know us as the owner: each answers its
        // DELETE. Withdrawing first would make them delete at the same moment, and two
        // crossing DELETEs leave charon waiting for answers that never come. The record
        // is marked draining before that, so a front-end that got our DELETE waits for the
        // next owner's record instead of coming back here.
        out.push(Action::MarkDraining { vip });
        out.push(Action::DeleteSas {
            vip,
            role: VipRole::Hosted,
        });
        out.push(Action::WithdrawOwnership { vip });
        out.push(Action::Notify(
            Notice::new(NoticeKind::Drained, Some(vip)).epoch(h.epoch),
        ));
        if h.present {
            let timer = Timer::DrainHold {
                vip,
                generation: h.generation,
            };
            out.push(Action::StartTimer {
                timer,
                after: self.settings.drain_hold,
            });
        }
    }

    // ----- ownership records -----

    fn owner_update(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        owner: Option<VipOwner>,
        snapshot: bool,
    ) {
        if let Some(h) = self.hosted.get_mut(&vip) {
            if let Some(o) = &owner
                && o.epoch < h.epoch
            {
                out.push(stale_notice(vip, o, h.epoch));
                return;
            }
            if h.owner == owner {
                if owner.is_none() && h.present && !h.draining && !h.accepting {
                    // Still here, still unrecorded (a publish refused while another node
                    // held the record, whose removal we never saw): try again.
                    out.push(Action::PublishOwnership { vip });
                }
                self.guard(out, now, vip);
                return;
            }
            let mut notice = Notice::new(NoticeKind::OwnerChanged, Some(vip)).owner(owner.as_ref());
            if let Some(o) = &owner {
                h.epoch = o.epoch;
                if h.present && o.node != self.settings.node {
                    notice = notice.detail(format!(
                        "{vip} is present here but recorded as owned by {}",
                        o.node
                    ));
                }
            } else {
                notice = notice.epoch(h.epoch);
            }
            h.owner = owner;
            out.push(Action::Notify(notice));
            if !h.present
                && h.owner
                    .as_ref()
                    .is_some_and(|o| o.node == self.settings.node)
            {
                // Our record, but the VIP is not here (a withdraw that has not taken effect
                // yet, or a record left by an earlier run): it must go, or the node that
                // has the address is refused for as long as it stands.
                out.push(Action::WithdrawOwnership { vip });
            }
            if h.owner.is_none() && h.present && !h.draining {
                // The record vanished while the VIP is still here (lease lost in an outage,
                // or removed by hand): put it back.
                out.push(Action::PublishOwnership { vip });
            }
            self.guard(out, now, vip);
            return;
        }

        let cluster = self.settings.cluster_store;
        let Some(p) = self.peers.get_mut(&vip) else {
            return;
        };
        let first_sync = snapshot && !p.synced;
        if snapshot {
            p.synced = true;
        }
        match owner {
            Some(o) if o.epoch < p.epoch => out.push(stale_notice(vip, &o, p.epoch)),
            Some(o) if p.owner.as_ref() == Some(&o) => {}
            Some(o) => {
                p.epoch = o.epoch;
                let node = o.node.clone();
                out.push(Action::Notify(
                    Notice::new(NoticeKind::OwnerChanged, Some(vip)).owner(Some(&o)),
                ));
                p.owner = Some(o);
                // SAs that came up while the owner was unknown are taken to belong to the
                // owner we now learn of; the idle detector still guards them.
                for sa in p.sas.values_mut().filter(|s| s.epoch == 0) {
                    sa.epoch = p.epoch;
                }
                if first_sync {
                    if p.sas.is_empty() && self.keying_up == Some(true) {
                        self.renegotiate(out, now, vip, "no SA toward the VIP".into(), false);
                    }
                    return;
                }
                let stale = p.sas.values().any(|s| s.epoch < p.epoch);
                let reason = format!("owner changed to {node} (epoch {})", p.epoch);
                if stale || p.sas.is_empty() {
                    self.renegotiate(out, now, vip, reason, stale);
                }
            }
            None => {
                if p.owner.is_none() {
                    return;
                }
                p.owner = None;
                out.push(Action::Notify(
                    Notice::new(NoticeKind::OwnerChanged, Some(vip))
                        .epoch(p.epoch)
                        .detail("no owner"),
                ));
                // A working SA is kept until a *different* owner is recorded: a record
                // also vanishes when its owner's lease lapses in a store hiccup, and the
                // owner puts it back at the same epoch. After a real release the old
                // owner deletes its SAs itself; after a crash the next owner's record (a
                // newer epoch) makes ours stale. If no owner is recorded within
                // `owner_wait`, the SA's peer is taken as gone.
                p.vacancies += 1;
                if !p.sas.is_empty() && cluster {
                    out.push(Action::StartTimer {
                        timer: Timer::Vacant {
                            vip,
                            generation: p.vacancies,
                        },
                        after: self.settings.owner_wait,
                    });
                }
            }
        }
    }

    fn store_health(&mut self, out: &mut Out, healthy: bool, detail: String) {
        if self.store_healthy == Some(healthy) {
            return;
        }
        self.store_healthy = Some(healthy);
        if healthy {
            for h in self.hosted.values_mut() {
                h.arrived_in_outage = false;
            }
        }
        let kind = if healthy {
            NoticeKind::StoreUp
        } else {
            NoticeKind::StoreDown
        };
        out.push(Action::Notify(Notice::new(kind, None).detail(detail)));
        let hosted: Vec<Vip> = self.hosted.keys().copied().collect();
        for vip in hosted {
            self.guard(out, self.now, vip);
        }
        if !healthy {
            // No record will come: stop waiting for one.
            let waiting: Vec<Vip> = self
                .peers
                .iter()
                .filter(|(_, p)| {
                    p.renegotiation
                        .as_ref()
                        .is_some_and(|r| r.owner_wait == OwnerWait::Waiting)
                })
                .map(|(v, _)| *v)
                .collect();
            for vip in waiting {
                self.kick(out, vip);
            }
        }
    }

    // ----- keying daemon and SAs -----

    fn keying_went_down(&mut self, out: &mut Out, detail: String) {
        if self.keying_up == Some(false) {
            return;
        }
        self.keying_up = Some(false);
        out.push(Action::Notify(
            Notice::new(NoticeKind::KeyingDown, None).detail(detail),
        ));
        for h in self.hosted.values_mut() {
            h.sas.clear();
        }
        let vips: Vec<Vip> = self.peers.keys().copied().collect();
        for vip in vips {
            let p = self.peers.get_mut(&vip).expect("known peer");
            // The daemon's SAs died with it.
            p.sas.clear();
            p.idle.reset();
        }
    }

    fn keying_came_up(&mut self, out: &mut Out, now: Instant, established: Vec<SaRef>) {
        let was = self.keying_up;
        self.keying_up = Some(true);
        if was != Some(true) {
            out.push(Action::Notify(
                Notice::new(NoticeKind::KeyingUp, None)
                    .detail(format!("{} SAs established", established.len())),
            ));
        }
        for h in self.hosted.values_mut() {
            h.sas.clear();
        }
        for p in self.peers.values_mut() {
            p.sas.clear();
            p.idle.reset();
        }
        for sa in established {
            match sa.role {
                VipRole::Hosted => {
                    if let Some(h) = self.hosted.get_mut(&sa.vip) {
                        h.sas.insert(sa.ike_id);
                    }
                }
                VipRole::Peer => {
                    let tag = self.sa_epoch_tag(sa.vip);
                    if let Some(p) = self.peers.get_mut(&sa.vip) {
                        p.sas.insert(
                            sa.ike_id,
                            PeerSa {
                                since: now,
                                epoch: tag,
                            },
                        );
                    }
                }
            }
        }
        let vips: Vec<Vip> = self.peers.keys().copied().collect();
        for vip in vips {
            let p = &self.peers[&vip];
            let (has_sa, renegotiating, owner_known) = (
                !p.sas.is_empty(),
                p.renegotiation.is_some(),
                p.owner.is_some(),
            );
            if has_sa {
                if renegotiating {
                    self.finish(out, now, vip);
                }
            } else if renegotiating {
                self.kick(out, vip);
            } else if !self.waits_for_owner_record(vip) || owner_known {
                self.renegotiate(out, now, vip, "no SA toward the VIP".into(), false);
            }
        }
        // SAs the daemon already had for a hosted VIP this node may not accept (a restart
        // in the middle of a split brain) go now, like any refused SA.
        let hosted: Vec<Vip> = self.hosted.keys().copied().collect();
        for vip in hosted {
            self.guard(out, now, vip);
        }
    }

    /// The epoch an SA coming up now belongs to. With a synced, healthy store that is the
    /// latest epoch, even while no record exists: an SA made in that gap leads to whoever
    /// still answers on the VIP (the old owner, not yet gone), so the next owner's record
    /// must find it stale. Only without store knowledge is the owner unknown (0).
    fn sa_epoch_tag(&self, vip: Vip) -> u64 {
        let store_ok = self.store_healthy == Some(true);
        match self.peers.get(&vip) {
            Some(p) if store_ok && p.synced && (p.owner.is_some() || p.epoch > 0) => p.epoch,
            _ => 0,
        }
    }

    fn sa_up(&mut self, out: &mut Out, now: Instant, sa: SaRef) {
        match sa.role {
            VipRole::Hosted => {
                if !self.hosted_sa_allowed(out, sa.vip) {
                    return;
                }
                if let Some(h) = self.hosted.get_mut(&sa.vip)
                    && h.sas.insert(sa.ike_id)
                {
                    out.push(Action::Notify(
                        Notice::new(NoticeKind::SaUp, Some(sa.vip)).detail(ike(sa.ike_id)),
                    ));
                }
            }
            VipRole::Peer => {
                let tag = self.sa_epoch_tag(sa.vip);
                let Some(p) = self.peers.get_mut(&sa.vip) else {
                    return;
                };
                if p.sas.contains_key(&sa.ike_id) {
                    return;
                }
                p.sas.insert(
                    sa.ike_id,
                    PeerSa {
                        since: now,
                        epoch: tag,
                    },
                );
                p.idle.reset();
                out.push(Action::Notify(
                    Notice::new(NoticeKind::SaUp, Some(sa.vip))
                        .owner(p.owner.as_ref())
                        .detail(ike(sa.ike_id)),
                ));
                if self.peers[&sa.vip].renegotiation.is_some() {
                    self.finish(out, now, sa.vip);
                }
            }
        }
    }

    fn sa_down(&mut self, out: &mut Out, now: Instant, sa: SaRef, reason: String) {
        match sa.role {
            VipRole::Hosted => {
                if let Some(h) = self.hosted.get_mut(&sa.vip)
                    && h.sas.remove(&sa.ike_id)
                {
                    out.push(Action::Notify(
                        Notice::new(NoticeKind::SaDeleted, Some(sa.vip))
                            .detail(format!("{}: {reason}", ike(sa.ike_id))),
                    ));
                }
            }
            VipRole::Peer => {
                let keying_up = self.keying_up == Some(true);
                let Some(p) = self.peers.get_mut(&sa.vip) else {
                    return;
                };
                // Unknown SAs are ones we dropped ourselves: already handled.
                if p.sas.remove(&sa.ike_id).is_none() {
                    return;
                }
                out.push(Action::Notify(
                    Notice::new(NoticeKind::SaDeleted, Some(sa.vip))
                        .detail(format!("{}: {reason}", ike(sa.ike_id))),
                ));
                if p.sas.is_empty() && keying_up {
                    self.renegotiate(out, now, sa.vip, format!("SA deleted ({reason})"), false);
                }
            }
        }
    }

    fn counters(&mut self, out: &mut Out, now: Instant, vip: Vip, counters: TrafficCounters) {
        let timeout = self.idle_timeout();
        let Some(p) = self.peers.get_mut(&vip) else {
            return;
        };
        if p.sas.is_empty() || p.renegotiation.is_some() {
            p.idle.reset();
            return;
        }
        if let Some(silent) = p.idle.observe(now, counters, timeout) {
            out.push(Action::Notify(
                Notice::new(NoticeKind::IdlePeerDetected, Some(vip))
                    .owner(p.owner.as_ref())
                    .duration(silent)
                    .detail("outbound traffic with nothing back"),
            ));
            self.renegotiate(out, now, vip, "idle peer".into(), true);
        }
    }

    // ----- renegotiation -----

    fn waits_for_owner_record(&self, vip: Vip) -> bool {
        self.settings.cluster_store
            && self.store_healthy == Some(true)
            && self
                .peers
                .get(&vip)
                .is_some_and(|p| p.synced && p.owner.as_ref().is_none_or(|o| o.draining))
    }

    /// Starts bringing protection toward `vip` back, or hurries a running attempt.
    fn renegotiate(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        reason: String,
        drop_stale: bool,
    ) {
        let p = self.peers.get_mut(&vip).expect("known peer");
        if drop_stale && !p.sas.is_empty() {
            p.sas.clear();
            out.push(Action::DropStaleSas { vip });
        }
        p.idle.reset();
        if let Some(r) = p.renegotiation.as_mut() {
            if r.in_flight {
                // The attempt under way was aimed at whoever held the VIP before this news
                // (often nobody: the VIP in transit). Abort it rather than wait out its
                // timeout, and start over toward the VIP's new owner.
                r.in_flight = false;
                r.retry_now = false;
                if !out.contains(&Action::DropStaleSas { vip }) {
                    out.push(Action::DropStaleSas { vip });
                }
            }
            self.kick(out, vip);
            return;
        }
        p.renegotiation = Some(Renegotiation {
            started: now,
            reason: reason.clone(),
            attempts: 0,
            in_flight: false,
            owner_wait: OwnerWait::NotYet,
            waiting_for_keying: false,
            retry_now: false,
            attempt_started: now,
        });
        p.last_failover = Some(FailoverSummary {
            started: now,
            duration: None,
            reason: reason.clone(),
            outcome: FailoverOutcome::Running,
            attempts: 0,
        });
        let epoch = p.epoch;
        let owner = p.owner.clone();
        out.push(Action::Notify(
            Notice::new(NoticeKind::RenegotiationStarted, Some(vip))
                .owner(owner.as_ref())
                .epoch(epoch)
                .detail(reason),
        ));
        self.advance(out, vip);
    }

    /// Decides the next step of a renegotiation: wait for the daemon, wait for an owner,
    /// or initiate now.
    fn advance(&mut self, out: &mut Out, vip: Vip) {
        let keying_up = self.keying_up == Some(true);
        let wait_owner = self.waits_for_owner_record(vip);
        let owner_wait = self.settings.owner_wait;
        let p = self.peers.get_mut(&vip).expect("known peer");
        let Some(r) = p.renegotiation.as_mut() else {
            return;
        };
        if r.in_flight {
            r.retry_now = true;
            return;
        }
        if !keying_up {
            r.waiting_for_keying = true;
            return;
        }
        r.waiting_for_keying = false;
        if wait_owner {
            match r.owner_wait {
                OwnerWait::NotYet if r.attempts == 0 => {
                    r.owner_wait = OwnerWait::Waiting;
                    p.generation += 1;
                    let timer = Timer::OwnerWait {
                        vip,
                        generation: p.generation,
                    };
                    out.push(Action::StartTimer {
                        timer,
                        after: owner_wait,
                    });
                    return;
                }
                OwnerWait::Waiting => return,
                _ => {}
            }
        }
        if r.attempts > 0 && !out.contains(&Action::DropStaleSas { vip }) {
            // A timed-out attempt leaves a half-open IKE_SA that charon keeps
            // retransmitting in the background; clear it so attempts never pile up.
            out.push(Action::DropStaleSas { vip });
        }
        r.attempts += 1;
        r.in_flight = true;
        r.attempt_started = self.now;
        p.generation += 1;
        out.push(Action::Initiate {
            vip,
            attempt: r.attempts,
            crowd: self.crowds.crowd(vip),
        });
    }

    /// Something changed that makes an immediate attempt worthwhile.
    fn kick(&mut self, out: &mut Out, vip: Vip) {
        self.advance(out, vip);
    }

    fn initiate_finished(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        attempt: u32,
        result: Result<(), String>,
    ) {
        let retry = self.settings.retry;
        let Some(p) = self.peers.get_mut(&vip) else {
            return;
        };
        let Some(r) = p.renegotiation.as_mut() else {
            return;
        };
        if attempt != r.attempts {
            return;
        }
        r.in_flight = false;
        match result {
            Ok(()) => self.finish(out, now, vip),
            Err(e) => {
                let elapsed = now.saturating_duration_since(r.started);
                if elapsed >= retry.deadline {
                    let attempts = r.attempts;
                    let started = r.started;
                    let reason = r.reason.clone();
                    p.renegotiation = None;
                    p.generation += 1;
                    p.last_failover = Some(FailoverSummary {
                        started,
                        duration: Some(elapsed),
                        reason,
                        outcome: FailoverOutcome::GaveUp,
                        attempts,
                    });
                    out.push(Action::Notify(
                        Notice::new(NoticeKind::RenegotiationFailed, Some(vip))
                            .duration(elapsed)
                            .detail(format!(
                                "gave up after {attempts} attempts: {e}; next cycle in {:?}",
                                retry.cooldown
                            )),
                    ));
                    let timer = Timer::Cooldown {
                        vip,
                        generation: p.generation,
                    };
                    out.push(Action::StartTimer {
                        timer,
                        after: retry.cooldown,
                    });
                } else if r.retry_now {
                    r.retry_now = false;
                    self.advance(out, vip);
                } else {
                    p.generation += 1;
                    // The backoff counts from the start of the failed attempt: an attempt
                    // that already waited out its timeout on a silent peer is retried at once.
                    let spent = now.saturating_duration_since(r.attempt_started);
                    let after = retry
                        .delay_after(r.attempts)
                        .saturating_sub(spent)
                        .min(retry.deadline - elapsed);
                    let timer = Timer::Retry {
                        vip,
                        generation: p.generation,
                    };
                    out.push(Action::StartTimer { timer, after });
                }
            }
        }
    }

    fn finish(&mut self, out: &mut Out, now: Instant, vip: Vip) {
        let p = self.peers.get_mut(&vip).expect("known peer");
        let Some(r) = p.renegotiation.take() else {
            return;
        };
        p.generation += 1;
        let took = now.saturating_duration_since(r.started);
        p.last_failover = Some(FailoverSummary {
            started: r.started,
            duration: Some(took),
            reason: r.reason.clone(),
            outcome: FailoverOutcome::Recovered,
            attempts: r.attempts,
        });
        out.push(Action::Notify(
            Notice::new(NoticeKind::RenegotiationFinished, Some(vip))
                .owner(p.owner.as_ref())
                .epoch(p.epoch)
                .duration(took)
                .detail(format!("{} after {} attempt(s)", r.reason, r.attempts)),
        ));
    }

    fn timer(&mut self, out: &mut Out, now: Instant, timer: Timer) {
        match timer {
            Timer::Retry { vip, generation } => {
                if self
                    .peers
                    .get(&vip)
                    .is_some_and(|p| p.generation == generation)
                {
                    self.advance(out, vip);
                }
            }
            Timer::OwnerWait { vip, generation } => {
                let Some(p) = self.peers.get_mut(&vip) else {
                    return;
                };
                if p.generation != generation {
                    return;
                }
                if let Some(r) = p.renegotiation.as_mut()
                    && r.owner_wait == OwnerWait::Waiting
                {
                    // No new owner showed up: try the VIP anyway, whoever answers.
                    r.owner_wait = OwnerWait::Expired;
                    self.advance(out, vip);
                }
            }
            Timer::Cooldown { vip, generation } => {
                let Some(p) = self.peers.get(&vip) else {
                    return;
                };
                if p.generation == generation && p.sas.is_empty() && p.renegotiation.is_none() {
                    self.renegotiate(out, now, vip, "new cycle after giving up".into(), false);
                }
            }
            Timer::SplitBrainGrace { vip } => self.split_brain_timer(out, now, vip),
            Timer::Vacant { vip, generation } => {
                let Some(p) = self.peers.get(&vip) else {
                    return;
                };
                if p.vacancies == generation
                    && p.owner.is_none()
                    && !p.sas.is_empty()
                    && p.renegotiation.is_none()
                {
                    let reason = format!(
                        "no owner recorded for {}",
                        humantime::format_duration(self.settings.owner_wait)
                    );
                    self.renegotiate(out, now, vip, reason, true);
                    // `owner_wait` has already passed: initiate toward whoever answers.
                    if let Some(r) = self
                        .peers
                        .get_mut(&vip)
                        .and_then(|p| p.renegotiation.as_mut())
                        && r.owner_wait == OwnerWait::Waiting
                    {
                        r.owner_wait = OwnerWait::Expired;
                        self.advance(out, vip);
                    }
                }
            }
            Timer::Republish { vip, generation } => {
                if let Some(h) = self.hosted.get(&vip)
                    && h.generation == generation
                    && h.present
                    && !h.draining
                    && h.owner.is_none()
                {
                    out.push(Action::PublishOwnership { vip });
                }
            }
            Timer::DrainHold { vip, generation } => {
                let Some(h) = self.hosted.get_mut(&vip) else {
                    return;
                };
                if h.generation == generation && h.present && h.draining {
                    h.draining = false;
                    out.push(Action::PublishOwnership { vip });
                    out.push(Action::Notify(
                        Notice::new(NoticeKind::VipAcquired, Some(vip))
                            .epoch(h.epoch)
                            .detail("still here after the drain hold; ownership published again"),
                    ));
                }
                self.guard(out, now, vip);
            }
        }
    }
}

fn stale_notice(vip: Vip, o: &VipOwner, known: u64) -> Action {
    Action::Notify(
        Notice::new(NoticeKind::StaleRecordIgnored, Some(vip))
            .owner(Some(o))
            .detail(format!(
                "epoch {} is older than the known epoch {known}",
                o.epoch
            )),
    )
}

fn ike(id: IkeId) -> String {
    format!("IKE_SA #{id}")
}
