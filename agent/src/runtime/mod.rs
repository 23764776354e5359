//! The runtime: the only place that spawns tasks. It feeds backend observations to the
//! failover core, carries out the core's actions and shuts everything down on one
//! cancellation token. The API server in front of it is started by `crate::agent`.
//!
//! Where things happen:
//! - decided: `crate::failover` (pure), driven by [`core_loop`], which alone publishes what
//!   the core knows ([`knowledge`]);
//! - carried out: [`lanes`] (per VIP, in order) and [`pacing`] (initiations);
//! - fenced: [`fence`], against [`knowledge`] and the store.

mod backends;
mod commands;
mod core_loop;
mod events;
mod fence;
pub mod guard;
mod handle;
pub mod knowledge;
mod lanes;
mod moves;
pub mod pacing;
pub mod policies;
pub mod status;
mod supervise;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

pub use backends::Backends;
pub use commands::{Command, CommandError};
pub use events::EventRecord;
pub(crate) use events::EventSink;
pub use fence::Fenced;
pub use handle::{AgentHandle, LogLevelError};
pub use moves::SharedRecorder;
pub use status::{Health, HealthView, StatusView};

use crate::config::Config;
use crate::failover::{CoreSettings, FailoverCore, Input};
use crate::logging::LogControl;
use crate::metrics::Metrics;
use crate::model::Vip;
use crate::policy::SecretKey;
use core_loop::CoreLoop;
use knowledge::KnowledgeWriter;
use lanes::Lanes;
use moves::MoveLane;
use policies::Policies;
use supervise::Supervisor;

/// How long shutdown waits for tasks before giving up on them.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// A runtime whose guard is in place and whose handle exists, but whose backends and core
/// loop do not run yet: the API server starts here, so operators can look at an agent
/// that is still starting.
pub struct Starting {
    handle: AgentHandle,
    config: Arc<Config>,
    backends: Backends,
    tracker: TaskTracker,
    cancel: CancellationToken,
    supervisor: Supervisor,
    metrics: Arc<Metrics>,
    core: FailoverCore,
    health: Health,
    inputs: (mpsc::Sender<Input>, mpsc::Receiver<Input>),
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<StatusView>,
    guard: watch::Receiver<guard::GuardViews>,
    knowledge: (KnowledgeWriter, knowledge::KnowledgeReader),
    sink: EventSink,
    policies: Option<Policies>,
    recorder: SharedRecorder,
}

impl Starting {
    /// Adopts or installs the kernel guard and builds the agent's state; starts nothing but
    /// the guard keeper.
    pub async fn new(
        config: Config,
        backends: Backends,
        log: Option<Arc<LogControl>>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Starting> {
        let config = Arc::new(config);
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::new());
        let supervisor = Supervisor::new(tracker.clone(), cancel.clone(), metrics.clone());
        metrics.init_vips(&config.hosted_addresses(), &config.peer_addresses());
        metrics
            .store_lease_ttl
            .set(config.store.lease_ttl.as_secs_f64());
        let inputs = mpsc::channel::<Input>(4096);
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
        let sink = EventSink::new(events.clone(), metrics.clone(), &config.node);
        let knowledge = knowledge::channel();
        let policies = if config.policy.managed {
            let path = config.policy.psk_file.clone().unwrap_or_default();
            let psk = SecretKey::from_file(&path)
                .map_err(|e| anyhow::anyhow!("policy.psk_file {}: {e}", path.display()))?;
            Some(Policies::new(
                config.clone(),
                backends.keying.clone(),
                backends.kernel.clone(),
                backends.policies.clone(),
                psk,
                sink.clone(),
                knowledge.1.clone(),
            ))
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
                warn!("the guard is not complete at start-up; retrying");
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
            events,
            commands: cmd_tx,
            supervisor: supervisor.clone(),
        };
        Ok(Starting {
            handle,
            config,
            backends,
            tracker,
            cancel,
            supervisor,
            metrics,
            core,
            health,
            inputs,
            commands: cmd_rx,
            status: status_tx,
            guard: guard_rx,
            knowledge,
            sink,
            policies,
            recorder,
        })
    }

    pub fn handle(&self) -> &AgentHandle {
        &self.handle
    }

    /// Runs a task the agent cannot do without (the API server): if it stops, the agent
    /// stops with its reason.
    pub fn essential(
        &self,
        name: &'static str,
        task: impl Future<Output = Result<(), String>> + Send + 'static,
    ) {
        self.supervisor.essential(name, task);
    }

    /// Serves `metrics.listen`, if set, restarting it when it stops; `status` gives the
    /// health parts at each scrape (the API's view of the status, built outside the runtime).
    pub fn serve_metrics(&self, status: crate::metrics::StatusSource) {
        let Some(addr) = self.config.metrics.listen else {
            return;
        };
        let (m, c) = (self.metrics.clone(), self.cancel.clone());
        self.supervisor.restart_aside("metrics", move || {
            let (m, s, c) = (m.clone(), status.clone(), c.clone());
            async move {
                crate::metrics::serve(addr, m, s, c)
                    .await
                    .map_err(|e| format!("metrics endpoint {addr}: {e}"))
            }
            .instrument(info_span!("metrics"))
        });
    }

    /// Starts the backends' sessions, the lanes and the core loop.
    pub fn launch(self) -> Runtime {
        let Starting {
            handle,
            config,
            backends,
            tracker,
            cancel,
            supervisor,
            metrics: _,
            core,
            health,
            inputs: (input_tx, input_rx),
            commands,
            status,
            guard,
            knowledge: (knowledge, reader),
            sink,
            policies,
            recorder,
        } = self;
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
        if let Some(p) = &policies {
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
        let lanes = Lanes::new(
            &backends,
            config.clone(),
            input_tx,
            tracker.clone(),
            cancel.clone(),
            sink.clone(),
            reader,
            policies.clone(),
        );
        let moves = MoveLane::new(
            &config.node,
            recorder,
            backends.store.clone(),
            &tracker,
            cancel.clone(),
            sink,
        );
        let mut core_loop = CoreLoop {
            core,
            moves,
            health,
            config: config.clone(),
            lanes,
            knowledge,
            status,
            guard,
            inputs: input_rx,
            commands,
            policies,
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
        Runtime {
            handle,
            tracker,
            cancel,
            supervisor,
        }
    }
}

/// A running runtime: its handle and the tasks to join at shutdown.
pub struct Runtime {
    handle: AgentHandle,
    tracker: TaskTracker,
    cancel: CancellationToken,
    supervisor: Supervisor,
}

impl Runtime {
    pub fn handle(&self) -> &AgentHandle {
        &self.handle
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
        if let Some(why) = self.supervisor.fatal() {
            anyhow::bail!("agent stopped: {why}");
        }
        Ok(())
    }
}
