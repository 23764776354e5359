//! Carries out the core's actions without ever blocking the core loop.
//!
//! Actions for one VIP run in order on that VIP's lane (a drop must finish before the
//! next initiate starts, a withdrawal before a re-publish), while different VIPs proceed
//! in parallel. An initiation is handed from the lane to the reconnect pacer
//! ([`super::pacing`]) and not awaited there, so a later drop can abort an attempt that
//! hangs on a VIP nobody holds (or remove it from the pacer's queue before it starts).
//! Kernel changes share one lane so an engage and a release of the same flows can never
//! overtake each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use super::pacing::{Pacer, PacerParts};
use super::{Backends, EventSink, HealthView};
use crate::InputSink;
use crate::config::Config;
use crate::failover::{Action, Input, Notice, NoticeKind};
use crate::kernel::Kernel;
use crate::keying::Keying;
use crate::model::{Vip, VipRole};
use crate::store::OwnershipStore;

enum Job {
    Publish,
    Withdraw,
    DeleteSas {
        role: VipRole,
        reply: Option<oneshot::Sender<Result<u32, String>>>,
    },
    DropStale,
    Initiate {
        attempt: u32,
    },
}

enum KernelJob {
    Engage(Vip),
    Release(Vip),
}

/// What every lane works with.
#[derive(Clone)]
struct LaneContext {
    store: Arc<dyn OwnershipStore>,
    keying: Arc<dyn Keying>,
    kernel: Arc<dyn Kernel>,
    config: Arc<Config>,
    inputs: InputSink,
    tracker: TaskTracker,
    sink: EventSink,
    pacer: Pacer,
}

pub(super) struct Lanes {
    ctx: LaneContext,
    cancel: CancellationToken,
    vip_lanes: HashMap<Vip, mpsc::UnboundedSender<Job>>,
    kernel_lane: mpsc::UnboundedSender<KernelJob>,
    kernel_health: Arc<Mutex<HealthView>>,
}

impl Lanes {
    pub(super) fn new(
        backends: &Backends,
        config: Arc<Config>,
        inputs: InputSink,
        tracker: TaskTracker,
        cancel: CancellationToken,
        sink: EventSink,
        kernel_health: HealthView,
    ) -> Lanes {
        let (kernel_lane, rx) = mpsc::unbounded_channel();
        let kernel_health = Arc::new(Mutex::new(kernel_health));
        tracker.spawn(
            kernel_lane_task(
                backends.kernel.clone(),
                rx,
                kernel_health.clone(),
                sink.clone(),
                cancel.clone(),
            )
            .instrument(info_span!("kernel-lane")),
        );
        let pacer = Pacer::start(PacerParts {
            keying: backends.keying.clone(),
            config: config.clone(),
            inputs: inputs.clone(),
            metrics: sink.metrics.clone(),
            tracker: tracker.clone(),
            cancel: cancel.clone(),
        });
        Lanes {
            ctx: LaneContext {
                store: backends.store.clone(),
                keying: backends.keying.clone(),
                kernel: backends.kernel.clone(),
                config,
                inputs,
                tracker,
                sink,
                pacer,
            },
            cancel,
            vip_lanes: HashMap::new(),
            kernel_lane,
            kernel_health,
        }
    }

    pub(super) fn kernel_health(&self) -> HealthView {
        self.kernel_health
            .lock()
            .expect("kernel health lock")
            .clone()
    }

    pub(super) fn delete_sas(
        &mut self,
        vip: Vip,
        role: VipRole,
        reply: Option<oneshot::Sender<Result<u32, String>>>,
    ) {
        self.lane(vip, Job::DeleteSas { role, reply });
    }

    pub(super) fn submit(&mut self, action: Action) {
        match action {
            Action::PublishOwnership { vip } => self.lane(vip, Job::Publish),
            Action::WithdrawOwnership { vip } => self.lane(vip, Job::Withdraw),
            Action::DeleteSas { vip, role } => self.lane(vip, Job::DeleteSas { role, reply: None }),
            Action::DropStaleSas { vip } => self.lane(vip, Job::DropStale),
            Action::Initiate { vip, attempt } => self.lane(vip, Job::Initiate { attempt }),
            Action::StartTimer { timer, after } => {
                let (inputs, cancel) = (self.ctx.inputs.clone(), self.cancel.clone());
                self.ctx.tracker.spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(after) => { let _ = inputs.send(Input::TimerFired(timer)).await; }
                    }
                });
            }
            Action::EngageFailSecure { vip } => {
                let _ = self.kernel_lane.send(KernelJob::Engage(vip));
            }
            Action::ReleaseFailSecure { vip } => {
                let _ = self.kernel_lane.send(KernelJob::Release(vip));
            }
            Action::Notify(n) => self.ctx.sink.emit(n),
        }
    }

    fn lane(&mut self, vip: Vip, job: Job) {
        let job = match self.vip_lanes.get(&vip) {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        // First job for this VIP (or its lane ended): start the lane.
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(job);
        self.vip_lanes.insert(vip, tx);
        let lane = VipLane {
            vip,
            ctx: self.ctx.clone(),
        };
        let cancel = self.cancel.clone();
        self.ctx.tracker.spawn(
            lane.run(rx, cancel)
                .instrument(info_span!("vip-lane", %vip)),
        );
    }
}

struct VipLane {
    vip: Vip,
    ctx: LaneContext,
}

impl VipLane {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Job>, cancel: CancellationToken) {
        loop {
            let job = tokio::select! {
                _ = cancel.cancelled() => return,
                job = rx.recv() => match job { Some(j) => j, None => return },
            };
            self.job(job).await;
        }
    }

    fn failed(&self, what: &str, error: impl std::fmt::Display) {
        self.ctx.sink.emit(
            Notice::new(NoticeKind::ActionFailed, Some(self.vip))
                .detail(format!("{what}: {error}")),
        );
    }

    async fn job(&self, job: Job) {
        let vip = self.vip;
        match job {
            Job::Publish => match self.ctx.store.publish(vip).await {
                Ok(owner) => info!(%vip, epoch = owner.epoch, "ownership published"),
                Err(e) => self.failed("publish", e),
            },
            Job::Withdraw => match self.ctx.store.withdraw(vip).await {
                Ok(()) => info!(%vip, "ownership withdrawn"),
                Err(e) => self.failed("withdraw", e),
            },
            Job::DeleteSas { role, reply } => {
                let started = std::time::Instant::now();
                let result = self.ctx.keying.delete_sas(vip, role).await;
                match &result {
                    Ok(n) => {
                        info!(%vip, deleted = n, took = ?started.elapsed(), "SAs deleted gracefully")
                    }
                    Err(e) => self.failed("delete", e),
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result.map_err(|e| e.to_string()));
                }
            }
            Job::DropStale => {
                // An attempt still queued was aimed at the SAs being dropped.
                self.ctx.pacer.cancel(vip);
                let started = std::time::Instant::now();
                match self.ctx.keying.drop_sas(vip).await {
                    Ok(n) => {
                        info!(%vip, dropped = n, took = ?started.elapsed(), "stale IKE_SAs dropped")
                    }
                    Err(e) => {
                        // The daemon cannot help (hung or gone): remove the kernel's SAs
                        // directly so nothing keeps using the dead peer's keys.
                        self.failed("drop", &e);
                        match self.ctx.kernel.delete_states(vip).await {
                            Ok(n) => info!(%vip, deleted = n, "kernel SAs deleted directly"),
                            Err(e) => self.failed("kernel delete", e),
                        }
                    }
                }
            }
            Job::Initiate { attempt } => {
                if self.ctx.config.peer(vip).is_none() {
                    self.failed("initiate", "not a configured peer VIP");
                    return;
                }
                self.ctx.pacer.initiate(vip, attempt);
            }
        }
    }
}

async fn kernel_lane_task(
    kernel: Arc<dyn Kernel>,
    mut rx: mpsc::UnboundedReceiver<KernelJob>,
    health: Arc<Mutex<HealthView>>,
    sink: EventSink,
    cancel: CancellationToken,
) {
    loop {
        let job = tokio::select! {
            _ = cancel.cancelled() => return,
            job = rx.recv() => match job { Some(j) => j, None => return },
        };
        let (vip, result) = match job {
            KernelJob::Engage(vip) => (
                vip,
                kernel
                    .engage_fail_secure(vip)
                    .await
                    .map(|n| format!("{n} flows blocked")),
            ),
            KernelJob::Release(vip) => (
                vip,
                kernel
                    .release_fail_secure(vip)
                    .await
                    .map(|()| "released".to_string()),
            ),
        };
        let mut h = health.lock().expect("kernel health lock");
        match result {
            Ok(what) => {
                info!(%vip, what, "fail-secure updated");
                h.report(true, String::new());
            }
            Err(e) => {
                // Retrying blindly could flap; report loudly and let the operator see it.
                warn!(%vip, error = %e, "fail-secure change failed");
                h.report(false, e.to_string());
                drop(h);
                sink.emit(
                    Notice::new(NoticeKind::ActionFailed, Some(vip))
                        .detail(format!("fail-secure: {e}")),
                );
            }
        }
    }
}
