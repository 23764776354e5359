//! The core loop: the one task that owns the failover core. It feeds the core every input
//! and command, publishes what the core knows (`knowledge`) and the status, and hands each
//! action to the lanes together with the epoch it was decided under.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info_span};

use super::commands::{Command, CommandError, DrainReply};
use super::guard::GuardViews;
use super::knowledge::KnowledgeWriter;
use super::lanes::Lanes;
use super::moves::MoveLane;
use super::policies::Policies;
use super::status::{Health, StatusView};
use super::supervise::{HEARTBEAT_EVERY, Supervisor};
use crate::config::Config;
use crate::failover::{Action, FailoverCore, Input};
use crate::model::{Vip, VipRole};
use crate::store::OwnershipStore;

/// The most inputs the core takes in one round before it publishes the status. A sample
/// of the SA counters comes as one input per peer VIP, and publishing the status (a view
/// of every VIP) after each made the agent's idle CPU grow with the square of its VIPs:
/// 12 % of a core with 100 SAs.
const BATCH: usize = 256;

pub(super) struct CoreLoop {
    pub(super) core: FailoverCore,
    pub(super) moves: MoveLane,
    pub(super) health: Health,
    pub(super) config: Arc<Config>,
    pub(super) lanes: Lanes,
    pub(super) knowledge: KnowledgeWriter,
    pub(super) status: watch::Sender<StatusView>,
    /// What the kernel holds of each VIP's guard (`guard::GuardKeeper`).
    pub(super) guard: watch::Receiver<GuardViews>,
    pub(super) inputs: mpsc::Receiver<Input>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) policies: Option<Policies>,
    pub(super) tracker: TaskTracker,
    pub(super) supervisor: Supervisor,
    pub(super) store: Arc<dyn OwnershipStore>,
    /// The count of front-ends last told to the store per hosted VIP.
    pub(super) followers: HashMap<Vip, u32>,
}

impl CoreLoop {
    pub(super) async fn run(&mut self, cancel: CancellationToken) {
        let start = self.core.start(Instant::now());
        self.apply(start, None);
        self.knowledge.publish(&self.core);
        self.publish_status();
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.supervisor.beat();
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = heartbeat.tick() => continue,
                Some(input) = self.inputs.recv() => {
                    self.input(input);
                    // What is already waiting goes in the same round: the status and
                    // what the core knows are published once for all of it.
                    for _ in 1..BATCH {
                        let Ok(input) = self.inputs.try_recv() else { break };
                        self.input(input);
                    }
                }
                Some(cmd) = self.commands.recv() => self.command(cmd),
                Ok(()) = self.guard.changed() => {}
            }
            self.knowledge.publish(&self.core);
            self.note_followers();
            self.publish_status();
        }
    }

    fn input(&mut self, input: Input) {
        self.note_health(&input);
        self.note_policy(&input);
        self.moves.input(&input);
        let actions = self.core.handle(Instant::now(), input);
        self.apply(actions, None);
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Drain { vip, reply } => {
                self.moves.input(&Input::Drain(vip));
                let actions = self.core.handle(Instant::now(), Input::Drain(vip));
                self.apply(actions, Some((vip, reply)));
            }
            Command::SetMode {
                mode,
                idle_timeout,
                reply,
            } => {
                let actions = self
                    .core
                    .handle(Instant::now(), Input::SetMode { mode, idle_timeout });
                self.apply(actions, None);
                let _ = reply.send((self.core.settings().mode, self.core.idle_timeout()));
            }
        }
    }

    /// Tells the policy runtime what it acts on: a (re)connected keying daemon has to be
    /// given the connections again; a new SA is checked against its policy.
    fn note_policy(&mut self, input: &Input) {
        let Some(p) = &self.policies else { return };
        match input {
            Input::KeyingUp { .. } => {
                let p = p.clone();
                self.tracker.spawn(
                    async move { p.keying_up().await }.instrument(info_span!("policy-reload")),
                );
            }
            Input::SaUp(sa) if self.config.policy_managed(sa.vip) => {
                let epoch = self.core.epoch_of(sa.vip);
                self.lanes.check_sa(sa.vip, sa.role, sa.ike_id, epoch);
            }
            _ => {}
        }
    }

    fn note_health(&mut self, input: &Input) {
        match input {
            Input::StoreHealth { healthy, detail } => {
                self.health.store.report(*healthy, detail.clone())
            }
            Input::KeyingUp { established } => self
                .health
                .keying
                .report(true, format!("{} SAs at (re)connect", established.len())),
            Input::KeyingDown { detail } => self.health.keying.report(false, detail.clone()),
            _ => {}
        }
    }

    /// Carries out one decision's actions. `drain` is the command the decision answers: the
    /// hosted delete among these actions is the one whose result it is told.
    fn apply(&mut self, actions: Vec<Action>, mut drain: Option<(Vip, DrainReply)>) {
        // Published before any action runs: each is judged against what the core knows
        // now, which is what it was decided under. A decision without actions is
        // published at the end of its round (`run`), as nothing waits on it.
        if !actions.is_empty() {
            self.knowledge.publish(&self.core);
        }
        for action in actions {
            self.moves.action(&action);
            let epoch = action.vip().map_or(0, |v| self.core.epoch_of(v));
            match action {
                Action::DeleteSas {
                    vip,
                    role: VipRole::Hosted,
                } if drain.as_ref().is_some_and(|(v, _)| *v == vip) => {
                    let reply = drain.take().map(|(_, r)| r);
                    self.lanes.delete_sas(vip, VipRole::Hosted, epoch, reply);
                }
                other => self.lanes.submit(other, epoch),
            }
        }
        if let Some((vip, reply)) = drain {
            // The core decided no delete: the VIP is not one this node hosts.
            let _ = reply.send(Err(CommandError::NotHosted(vip)));
        }
    }

    /// Tells the store how many front-ends (IKE_SAs) each hosted VIP here has, when that
    /// changes: front-ends size their reconnect jitter by it when the VIP moves.
    fn note_followers(&mut self) {
        for (vip, h) in self.core.hosted() {
            let n = h.sas.len() as u32;
            if self.followers.get(vip) != Some(&n) {
                self.followers.insert(*vip, n);
                self.store.note_followers(*vip, n);
            }
        }
    }

    fn publish_status(&mut self) {
        let guards = self.guard.borrow().clone();
        let view = StatusView::build(&self.core, &self.health, &self.config, &guards);
        self.health.ownership = view.ownership.clone();
        self.status.send_if_modified(|old| {
            if *old == view {
                false
            } else {
                *old = view;
                true
            }
        });
    }
}
