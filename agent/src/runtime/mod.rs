//! The runtime: the only place that spawns tasks. It feeds backend observations to the
//! failover core, carries out the core's actions, serves the API and metrics, and shuts
//! everything down on one cancellation token.

pub mod guard;
mod lanes;
mod moves;
pub mod pacing;
pub mod policies;
pub mod status;
mod supervise;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::addrwatch::AddressWatcher;
use crate::config::Config;
use crate::failover::{Action, CoreSettings, FailoverCore, Input, Notice, NoticeKind};
use crate::kernel::Kernel;
use crate::keying::Keying;
use crate::logging::LogControl;
use crate::metrics::Metrics;
use crate::model::{Mode, Vip};
use crate::policy::SecretKey;
use crate::store::OwnershipStore;
use crate::store::policies::PolicyStore;
use crate::timeline::MoveTimeline;
use lanes::Lanes;
use moves::MoveLane;
pub use moves::SharedRecorder;
use policies::Policies;
pub use status::{Health, HealthView, StatusView};
use supervise::Supervisor;

/// The outside systems the agent works with, one trait object each.
pub struct Backends {
    pub store: Arc<dyn OwnershipStore>,
    pub watcher: Arc<dyn AddressWatcher>,
    /// Asks a VIP's link whether another node still holds the address (fast takeover).
    pub holder: Arc<dyn crate::addrwatch::holder::HolderProbe>,
    pub keying: Arc<dyn Keying>,
    pub kernel: Arc<dyn Kernel>,
    /// Where the cluster-wide policies are kept.
    pub policies: Arc<dyn PolicyStore>,
}

impl Backends {
    pub async fn from_config(config: &Config) -> anyhow::Result<Backends> {
        Ok(Backends {
            store: crate::store::from_config(config).await?,
            watcher: crate::addrwatch::from_config(),
            holder: crate::addrwatch::holder_probe(),
            keying: crate::keying::from_config(config),
            kernel: crate::kernel::from_config(config)?,
            policies: crate::store::policy_store_from_config(config)?,
        })
    }
}

/// A failover event with the time it happened, as streamed by `WatchEvents`.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub at: SystemTime,
    pub node: String,
    pub notice: Notice,
    /// Set on a `move-completed` event: the move's timeline as the store holds it. Its
    /// `notice` then only carries the VIP, the new owner, the epoch, the recovery time and
    /// the summary (the core has no notice kind for it; the kind is not shown).
    pub moved: Option<Arc<MoveTimeline>>,
}

/// Requests from the API that need the core.
pub enum Command {
    Drain {
        vip: Vip,
        reply: oneshot::Sender<Result<u32, String>>,
    },
    SetMode {
        mode: Mode,
        idle_timeout: Option<Duration>,
        reply: oneshot::Sender<(Mode, Duration)>,
    },
}

/// What the API holds of the running agent.
#[derive(Clone)]
pub struct AgentHandle {
    pub config: Arc<Config>,
    pub keying: Arc<dyn Keying>,
    pub log: Option<Arc<LogControl>>,
    pub metrics: Arc<Metrics>,
    /// The policy runtime, when `policy.managed`.
    pub policies: Option<Policies>,
    /// For move timelines and drills.
    pub store: Arc<dyn OwnershipStore>,
    /// This node's own marks of recent moves, for when the store is away.
    pub recorder: SharedRecorder,
    status: watch::Receiver<StatusView>,
    events: broadcast::Sender<EventRecord>,
    commands: mpsc::Sender<Command>,
    supervisor: Supervisor,
}

impl AgentHandle {
    pub fn status(&self) -> StatusView {
        let mut s = self.status.borrow().clone();
        // Read live: a core loop that stopped turning cannot report that itself.
        s.runtime = self.supervisor.health();
        // The pacer keeps this gauge current; the core's status only changes on its inputs.
        s.initiations_queued = self.metrics.initiations_queued.get().max(0) as u32;
        // So does the store's retry loop: a write ownership depends on that has not taken
        // effect for longer than a lease is what an operator must hear about.
        let stuck: Vec<String> = self
            .store
            .pending_writes()
            .iter()
            .filter(|w| w.pending_for > self.config.store.lease_ttl)
            .map(|w| {
                format!(
                    "{} of {} pending for {} ({} attempts{})",
                    w.write,
                    w.vip,
                    humantime::format_duration(std::time::Duration::from_millis(
                        w.pending_for.as_millis() as u64
                    )),
                    w.attempts,
                    w.last_error
                        .as_ref()
                        .map(|e| format!(", last: {e}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        if !stuck.is_empty() {
            let mut detail = s.ownership.detail.clone();
            for w in stuck {
                if !detail.is_empty() {
                    detail.push_str("; ");
                }
                detail.push_str(&w);
            }
            s.ownership.report(false, detail);
        }
        s
    }

    pub fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.events.subscribe()
    }

    pub async fn command(&self, cmd: Command) -> Result<(), String> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| "the agent is shutting down".to_string())
    }

    /// Wakes on every change of the core's status. Parts of [`status`](Self::status) are
    /// read live (tasks, store writes) and change without it: watchers poll as well.
    pub fn status_changes(&self) -> watch::Receiver<StatusView> {
        self.status.clone()
    }

    /// Waits until the status satisfies `f` (for tests and the lab), up to `timeout`.
    pub async fn wait_status(
        &self,
        timeout: Duration,
        f: impl Fn(&StatusView) -> bool,
    ) -> Option<StatusView> {
        let mut rx = self.status.clone();
        tokio::time::timeout(timeout, async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if f(&s) {
                        return Some(s.clone());
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}

/// How long shutdown waits for tasks before giving up on them.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// A started agent: its handle and the task tracker to join at shutdown.
pub struct Agent {
    pub handle: AgentHandle,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Agent {
    /// Starts every task: backends, the core loop, the API server and metrics.
    pub async fn start(
        config: Config,
        backends: Backends,
        log: Option<Arc<LogControl>>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Agent> {
        let config = Arc::new(config);
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::new());
        let supervisor = Supervisor::new(tracker.clone(), cancel.clone(), metrics.clone());
        metrics.init_vips(&config.hosted_addresses(), &config.peer_addresses());
        let (input_tx, input_rx) = mpsc::channel::<Input>(4096);
        let (cmd_tx, cmd_rx) = mpsc::channel::<Command>(64);
        let (events, _) = broadcast::channel::<EventRecord>(1024);

        let peers: Vec<(Vip, bool)> = config
            .peer_vips
            .iter()
            .map(|p| (p.address, config.peer_protected(p.address)))
            .collect();
        let hosted: Vec<(Vip, bool)> = config
            .hosted_vips
            .iter()
            .map(|h| (h.address, config.hosted_protected(h.address)))
            .collect();
        let core = FailoverCore::new(CoreSettings::from_config(&config), &hosted, &peers);
        let mut health = Health {
            store: HealthView::new(backends.store.kind(), "connecting"),
            keying: HealthView::new(backends.keying.kind(), "connecting"),
            kernel: HealthView::new(backends.kernel.kind(), "starting"),
            ownership: HealthView::new("records", ""),
            runtime: supervisor.health(),
        };

        // The guard of an earlier run (or of `vipsec guard install` at boot) is adopted as
        // it stands; whatever is missing is added before the API answers.
        match backends.kernel.reconcile().await {
            Ok(vips) => {
                if !vips.is_empty() {
                    info!(vips = ?vips, "adopted the guard of an earlier run");
                }
                health.kernel.report(true, String::new());
            }
            Err(e) => {
                warn!(error = %e, "cannot read kernel policies at start-up");
                health.kernel.report(false, e.to_string());
            }
        }

        let recorder = moves::shared_recorder(
            &config.node,
            &config.hosted_addresses(),
            &config.peer_addresses(),
        );
        let (status_tx, status_rx) = watch::channel(StatusView::build(
            &core,
            &health,
            &config,
            &guard::GuardViews::new(),
        ));
        let sink = EventSink {
            events: events.clone(),
            metrics: metrics.clone(),
            node: config.node.clone(),
        };
        let policies = if config.policy.managed {
            let path = config.policy.psk_file.clone().unwrap_or_default();
            let psk = SecretKey::from_file(&path)
                .map_err(|e| anyhow::anyhow!("policy.psk_file {}: {e}", path.display()))?;
            let p = Policies::new(
                config.clone(),
                backends.keying.clone(),
                backends.kernel.clone(),
                backends.policies.clone(),
                psk,
                sink.clone(),
            );
            Some(p)
        } else {
            None
        };
        let (guard_tx, guard_rx) = watch::channel(guard::GuardViews::new());
        if guard::GuardKeeper::enabled(&config) {
            let keeper = guard::GuardKeeper {
                kernel: backends.kernel.clone(),
                config: config.clone(),
                policies: policies.clone(),
                sink: sink.clone(),
                views: guard_tx,
                backoff: Default::default(),
            };
            if !keeper.pass(true).await {
                warn!("the guard is not complete at start-up; retrying every kernel.guard_check");
            }
            let keeper = Arc::new(keeper);
            let (interval, c) = (config.kernel.guard_check, cancel.clone());
            supervisor.restart("guard", move || {
                let (keeper, c) = (keeper.clone(), c.clone());
                async move {
                    keeper.run(interval, c).await;
                    Ok(())
                }
                .instrument(info_span!("guard"))
            });
        }
        let handle = AgentHandle {
            config: config.clone(),
            keying: backends.keying.clone(),
            log,
            metrics: metrics.clone(),
            policies: policies.clone(),
            store: backends.store.clone(),
            recorder: recorder.clone(),
            status: status_rx,
            events: events.clone(),
            commands: cmd_tx,
            supervisor: supervisor.clone(),
        };

        // The API comes up first so operators can look at an agent that is still starting.
        let api = crate::api::bind(&config.api).await?;
        supervisor.essential(
            "api",
            crate::api::serve(api, handle.clone(), cancel.clone()).instrument(info_span!("api")),
        );

        if let Some(addr) = config.metrics.listen {
            let (m, c) = (metrics.clone(), cancel.clone());
            supervisor.restart_aside("metrics", move || {
                let (m, c) = (m.clone(), c.clone());
                async move {
                    crate::metrics::serve(addr, m, c)
                        .await
                        .map_err(|e| format!("metrics endpoint {addr}: {e}"))
                }
                .instrument(info_span!("metrics"))
            });
        }

        {
            let (store, tx, c) = (backends.store.clone(), input_tx.clone(), cancel.clone());
            supervisor.restart("store", move || {
                let (store, tx, c) = (store.clone(), tx.clone(), c.clone());
                async move {
                    store.run(tx, c).await;
                    Ok(())
                }
                .instrument(info_span!("store"))
            });
        }
        {
            let (keying, tx, c) = (backends.keying.clone(), input_tx.clone(), cancel.clone());
            supervisor.restart("keying", move || {
                let (keying, tx, c) = (keying.clone(), tx.clone(), c.clone());
                async move {
                    keying.run(tx, c).await;
                    Ok(())
                }
                .instrument(info_span!("keying"))
            });
        }
        {
            let (kernel, tx, c) = (backends.kernel.clone(), input_tx.clone(), cancel.clone());
            supervisor.restart("kernel", move || {
                let (kernel, tx, c) = (kernel.clone(), tx.clone(), c.clone());
                async move {
                    kernel.run(tx, c).await;
                    Ok(())
                }
                .instrument(info_span!("kernel"))
            });
        }
        if !config.hosted_vips.is_empty() {
            // A restarted watcher dumps every address again, so a move it missed while
            // down is reported then.
            let (watcher, tx, c) = (backends.watcher.clone(), input_tx.clone(), cancel.clone());
            let vips = config.hosted_vips.clone();
            supervisor.restart("addrwatch", move || {
                let (watcher, tx, c, vips) = (watcher.clone(), tx.clone(), c.clone(), vips.clone());
                async move { watcher.run(vips, tx, c).await.map_err(|e| e.to_string()) }
                    .instrument(info_span!("addrwatch"))
            });
        }

        let mut lanes = Lanes::new(
            &backends,
            config.clone(),
            input_tx.clone(),
            tracker.clone(),
            cancel.clone(),
            sink.clone(),
        );
        if let Some(p) = &policies {
            lanes.set_policies(p.clone());
            let (runner, c) = (p.clone(), cancel.clone());
            supervisor.restart("policies", move || {
                let (runner, c) = (runner.clone(), c.clone());
                async move {
                    runner.run(c).await;
                    Ok(())
                }
                .instrument(info_span!("policies"))
            });
        }
        let moves = MoveLane::new(
            &config.node,
            recorder,
            backends.store.clone(),
            &tracker,
            cancel.clone(),
            sink.clone(),
        );
        let mut core_loop = CoreLoop {
            core,
            moves,
            health,
            config: config.clone(),
            lanes,
            status: status_tx,
            guard: guard_rx,
            sink,
            inputs: input_rx,
            commands: cmd_rx,
            pending_drains: Vec::new(),
            policies: policies.clone(),
            tracker: tracker.clone(),
            supervisor: supervisor.clone(),
            store: backends.store.clone(),
            followers: Default::default(),
        };
        let c = cancel.clone();
        supervisor.essential(
            "core",
            async move {
                core_loop.run(c).await;
                Ok(())
            }
            .instrument(info_span!("core", node = %config.node)),
        );
        Ok(Agent {
            handle,
            tracker,
            cancel,
        })
    }

    /// Waits for cancellation, then for every task, up to the shutdown deadline. An error
    /// when an essential task took the agent down.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.cancel.cancelled().await;
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_DEADLINE, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.tracker.len(),
                "tasks still running at the shutdown deadline; leaving them"
            );
        }
        crate::api::cleanup(&self.handle.config.api);
        if let Some(why) = self.handle.supervisor.fatal() {
            anyhow::bail!("agent stopped: {why}");
        }
        info!("agent stopped");
        Ok(())
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run_until_signal(config: Config, log: Option<Arc<LogControl>>) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM that arrives while the agent starts must still stop it cleanly.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let cancel = CancellationToken::new();
    let backends = Backends::from_config(&config).await?;
    let agent = Agent::start(config, backends, log, cancel.clone()).await?;
    info!("agent running");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
        _ = cancel.cancelled() => {}
    }
    cancel.cancel();
    agent.wait().await
}

/// Where failover events go: the log, the metrics and the `WatchEvents` subscribers.
#[derive(Clone)]
pub(crate) struct EventSink {
    events: broadcast::Sender<EventRecord>,
    metrics: Arc<Metrics>,
    node: String,
}

impl EventSink {
    pub(crate) fn emit(&self, notice: Notice) {
        let vip = notice
            .vip
            .map(|v: IpAddr| v.to_string())
            .unwrap_or_default();
        let (event, owner, epoch, duration, detail) = (
            notice.kind.as_str(),
            &notice.owner,
            notice.epoch,
            &notice.duration,
            &notice.detail,
        );
        match notice.kind {
            NoticeKind::ActionFailed
            | NoticeKind::RenegotiationFailed
            | NoticeKind::KeyingDown
            | NoticeKind::StoreDown => {
                warn!(event, vip, ?owner, epoch, ?duration, %detail, "failover event")
            }
            _ => info!(event, vip, ?owner, epoch, ?duration, %detail, "failover event"),
        }
        self.metrics.record(&notice);
        let _ = self.events.send(EventRecord {
            at: SystemTime::now(),
            node: self.node.clone(),
            notice,
            moved: None,
        });
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A move is over (every mark in the store) or was followed for as long as it may be.
    pub(crate) fn emit_move(&self, t: MoveTimeline) {
        let summary = t.summary();
        let (vip, epoch, complete) = (t.vip.to_string(), t.epoch, t.complete());
        info!(event = "move-completed", vip, epoch, complete, %summary, "move timeline");
        let mut notice = Notice::new(NoticeKind::OwnerChanged, Some(t.vip))
            .epoch(t.epoch)
            .detail(summary);
        notice.owner = Some(t.to_node.clone());
        notice.duration = t.recovery();
        let _ = self.events.send(EventRecord {
            at: SystemTime::now(),
            node: self.node.clone(),
            notice,
            moved: Some(Arc::new(t)),
        });
    }
}

struct CoreLoop {
    core: FailoverCore,
    moves: MoveLane,
    health: Health,
    config: Arc<Config>,
    lanes: Lanes,
    status: watch::Sender<StatusView>,
    /// What the kernel holds of each VIP's guard (`guard::GuardKeeper`).
    guard: watch::Receiver<guard::GuardViews>,
    sink: EventSink,
    inputs: mpsc::Receiver<Input>,
    commands: mpsc::Receiver<Command>,
    pending_drains: Vec<(Vip, oneshot::Sender<Result<u32, String>>)>,
    policies: Option<Policies>,
    tracker: TaskTracker,
    supervisor: Supervisor,
    store: Arc<dyn OwnershipStore>,
    /// The count of front-ends last told to the store per hosted VIP.
    followers: std::collections::HashMap<Vip, u32>,
}

impl CoreLoop {
    async fn run(&mut self, cancel: CancellationToken) {
        let start = self.core.start(Instant::now());
        self.apply(start);
        self.publish_status();
        let mut heartbeat = tokio::time::interval(supervise::HEARTBEAT_EVERY);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.supervisor.beat();
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = heartbeat.tick() => continue,
                Some(input) = self.inputs.recv() => {
                    self.note_health(&input);
                    self.note_policy(&input);
                    self.moves.input(&input);
                    let actions = self.core.handle(Instant::now(), input);
                    self.apply(actions);
                }
                Some(cmd) = self.commands.recv() => self.command(cmd),
                Ok(()) = self.guard.changed() => {}
            }
            self.note_followers();
            self.publish_status();
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Drain { vip, reply } => {
                self.moves.input(&Input::Drain(vip));
                let actions = self.core.handle(Instant::now(), Input::Drain(vip));
                self.pending_drains.push((vip, reply));
                self.apply(actions);
            }
            Command::SetMode {
                mode,
                idle_timeout,
                reply,
            } => {
                let actions = self
                    .core
                    .handle(Instant::now(), Input::SetMode { mode, idle_timeout });
                self.apply(actions);
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

    fn apply(&mut self, actions: Vec<Action>) {
        // The epochs the core knows now are the ones these actions were decided under.
        let known: Vec<(Vip, u64)> = self.core.epochs().collect();
        for (vip, epoch) in known {
            let owner = self.core.owner_of(vip).map(|o| o.node.clone());
            self.lanes.note_epoch(vip, epoch, owner);
        }
        for action in actions {
            self.moves.action(&action);
            match action {
                Action::Notify(notice) => self.sink.emit(notice),
                Action::DeleteSas { vip, role } => {
                    let reply = self
                        .pending_drains
                        .iter()
                        .position(|(v, _)| *v == vip)
                        .map(|i| self.pending_drains.remove(i).1);
                    let epoch = self.core.epoch_of(vip);
                    self.lanes.delete_sas(vip, role, epoch, reply);
                }
                other => {
                    let epoch = other.vip().map_or(0, |v| self.core.epoch_of(v));
                    self.lanes.submit(other, epoch)
                }
            }
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
