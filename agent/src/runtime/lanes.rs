//! Carries out the core's actions without ever blocking the core loop.
//!
//! Actions for one VIP run in order on that VIP's lane (a drop must finish before the
//! next initiate starts, a withdrawal before a re-publish), while different VIPs proceed
//! in parallel. An initiation is handed from the lane to the reconnect pacer
//! ([`super::pacing`]) and not awaited there, so a later drop can abort an attempt that
//! hangs on a VIP nobody holds (or remove it from the pacer's queue before it starts).
//! Kernel changes share one lane so an engage and a release of the same flows can never
//! overtake each other.
//!
//! Every job carries the epoch its action was decided under; [`super::fence`] decides
//! whether it may still run.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::backends::Backends;
use super::commands::{CommandError, DrainReply};
use super::events::EventSink;
use super::fence;
use super::knowledge::KnowledgeReader;
use super::pacing::{Pacer, PacerParts};
use super::policies::Policies;
use crate::InputSink;
use crate::addrwatch::holder::{HolderProbe, forget_holder_for};
use crate::config::Config;
use crate::failover::{Action, Input, Notice, NoticeKind};
use crate::kernel::Kernel;
use crate::keying::ike_probe::{IkeProbe, ProbeAnswer};
use crate::keying::{Keying, KeyingError};
use crate::model::{Vip, VipOwner, VipRole};
use crate::store::{OwnershipStore, StoreError};

/// A store call in a lane may take this many request timeouts: a reconnection, a lease
/// grant, and a few reads and transactions.
const STORE_CALL_REQUESTS: u32 = 10;

/// The longest a lane waits for one keying call made of several commands (a listing,
/// a DELETE per SA, polls for the answers); each command is timed on its own.
const KEYING_CALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a drain waits for the draining mark before deleting SAs anyway. (The epoch
/// check before a delete is not shortened: it is what fences a node that wakes from a
/// pause after its VIP moved, and its first request after waking can be slow.)
const MARK_DRAINING_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

enum JobKind {
    Publish,
    Withdraw,
    MarkDraining,
    DeleteSas {
        role: VipRole,
        /// The drain this delete answers.
        reply: Option<DrainReply>,
    },
    DropStale {
        /// Spare attempts whose IKE_SA_INIT was answered (see `Action::DropSilencedSas`).
        spare_answered: bool,
    },
    Initiate {
        attempt: u32,
        crowd: u32,
        news: bool,
    },
    AcceptSas {
        accept: bool,
    },
    /// An SA came up: check it against the VIP's policy (NAT rules).
    CheckSa {
        role: VipRole,
        ike_id: crate::model::IkeId,
    },
    TakeOver {
        from: VipOwner,
    },
}

struct Job {
    kind: JobKind,
    /// The VIP's epoch when the core decided the action.
    epoch: u64,
}

/// What every lane works with.
#[derive(Clone)]
struct LaneContext {
    store: Arc<dyn OwnershipStore>,
    holder: Arc<dyn HolderProbe>,
    ike_probe: Arc<dyn IkeProbe>,
    keying: Arc<dyn Keying>,
    kernel: Arc<dyn Kernel>,
    config: Arc<Config>,
    inputs: InputSink,
    tracker: TaskTracker,
    sink: EventSink,
    /// The policy runtime (policy-managed VIPs only).
    policies: Option<Policies>,
    pacer: Pacer,
    /// What the core knows now (a drop spares the SAs that came up since it was decided).
    knowledge: KnowledgeReader,
}

pub(super) struct Lanes {
    ctx: LaneContext,
    cancel: CancellationToken,
    vip_lanes: HashMap<Vip, mpsc::UnboundedSender<Job>>,
}

impl Lanes {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        backends: &Backends,
        config: Arc<Config>,
        inputs: InputSink,
        tracker: TaskTracker,
        cancel: CancellationToken,
        sink: EventSink,
        knowledge: KnowledgeReader,
        policies: Option<Policies>,
    ) -> Lanes {
        let pacer = Pacer::start(PacerParts {
            keying: backends.keying.clone(),
            config: config.clone(),
            inputs: inputs.clone(),
            metrics: sink.metrics().clone(),
            tracker: tracker.clone(),
            cancel: cancel.clone(),
            knowledge: knowledge.clone(),
            policies: policies.clone(),
            sink: sink.clone(),
            holder: backends.holder.clone(),
        });
        Lanes {
            ctx: LaneContext {
                store: backends.store.clone(),
                holder: backends.holder.clone(),
                ike_probe: backends.ike_probe.clone(),
                keying: backends.keying.clone(),
                kernel: backends.kernel.clone(),
                config,
                inputs,
                tracker,
                sink,
                policies,
                pacer,
                knowledge,
            },
            cancel,
            vip_lanes: HashMap::new(),
        }
    }

    /// Queues the policy check of an SA that came up.
    pub(super) fn check_sa(
        &mut self,
        vip: Vip,
        role: VipRole,
        ike_id: crate::model::IkeId,
        epoch: u64,
    ) {
        if self.ctx.policies.is_some() {
            self.lane(vip, epoch, JobKind::CheckSa { role, ike_id });
        }
    }

    /// Queues a delete whose result answers a drain.
    pub(super) fn delete_sas(
        &mut self,
        vip: Vip,
        role: VipRole,
        epoch: u64,
        reply: Option<DrainReply>,
    ) {
        self.lane(vip, epoch, JobKind::DeleteSas { role, reply });
    }

    /// Queues an action decided while the VIP's epoch was `epoch`.
    pub(super) fn submit(&mut self, action: Action, epoch: u64) {
        match action {
            Action::PublishOwnership { vip } => self.lane(vip, epoch, JobKind::Publish),
            Action::WithdrawOwnership { vip } => self.lane(vip, epoch, JobKind::Withdraw),
            Action::MarkDraining { vip } => self.lane(vip, epoch, JobKind::MarkDraining),
            Action::DeleteSas { vip, role } => {
                self.lane(vip, epoch, JobKind::DeleteSas { role, reply: None })
            }
            Action::RefuseSa { vip, ike_id } => {
                // Off the VIP's lane: the front-end takes a refused SA for its recovery
                // until the DELETE comes, and the lane may be waiting out a store call
                // (a withdraw in an etcd leader election held one for 500 ms, until the
                // VIP had left and the DELETE no longer reached the front-end). A DELETE
                // for that IKE_SA alone, not waited for: the peer's answer changes nothing.
                let (keying, sink) = (self.ctx.keying.clone(), self.ctx.sink.clone());
                self.ctx.tracker.spawn(
                    async move {
                        match refuse_sa(keying.as_ref(), ike_id).await {
                            Ok(()) => info!(%vip, ike_sa = ike_id, "refused IKE_SA deleted"),
                            Err(e) => sink.emit(
                                Notice::new(NoticeKind::ActionFailed, Some(vip))
                                    .detail(format!("delete refused IKE_SA #{ike_id}: {e}")),
                            ),
                        }
                    }
                    .instrument(info_span!("refuse-sa", %vip)),
                );
            }
            Action::DropStaleSas { vip } => self.lane(
                vip,
                epoch,
                JobKind::DropStale {
                    spare_answered: true,
                },
            ),
            Action::DropSilencedSas { vip } => self.lane(
                vip,
                epoch,
                JobKind::DropStale {
                    spare_answered: false,
                },
            ),
            Action::Initiate {
                vip,
                attempt,
                crowd,
                news,
            } => self.lane(
                vip,
                epoch,
                JobKind::Initiate {
                    attempt,
                    crowd,
                    news,
                },
            ),
            Action::AcceptSas { vip, accept } => {
                self.lane(vip, epoch, JobKind::AcceptSas { accept })
            }
            Action::ProbeHolder {
                vip,
                epoch: record,
                window,
            } => {
                // Off the VIP's lane: a withdraw decided meanwhile must not wait for it.
                let (holder, inputs) = (self.ctx.holder.clone(), self.ctx.inputs.clone());
                self.ctx.tracker.spawn(
                    async move {
                        let started = std::time::Instant::now();
                        let answer = holder.probe(vip, window).await;
                        info!(%vip, record, ?answer, took = ?started.elapsed(), "link asked about the VIP's holder");
                        let _ = inputs
                            .send(Input::HolderProbed {
                                vip,
                                epoch: record,
                                answer,
                            })
                            .await;
                    }
                    .instrument(info_span!("holder-probe", %vip)),
                );
            }
            Action::ProbeIke { vip, after, window } => {
                // Off the VIP's lane, like the holder probe: the drop and the attempt it
                // may trigger must not queue behind a probe waiting out its window.
                let (probe, holder, inputs, cancel) = (
                    self.ctx.ike_probe.clone(),
                    self.ctx.holder.clone(),
                    self.ctx.inputs.clone(),
                    self.cancel.clone(),
                );
                self.ctx.tracker.spawn(
                    async move {
                        let answer = tokio::select! {
                            _ = cancel.cancelled() => return,
                            a = async {
                                tokio::time::sleep(after).await;
                                probe_ike(probe.as_ref(), holder.as_ref(), vip, window).await
                            } => a,
                        };
                        let answered = answer.answered();
                        let _ = inputs.send(Input::IkeProbed { vip, answered }).await;
                    }
                    .instrument(info_span!("ike-probe", %vip)),
                );
            }
            Action::TakeOver { vip, from } => self.lane(vip, epoch, JobKind::TakeOver { from }),
            Action::StartTimer { timer, after } => {
                let (inputs, cancel) = (self.ctx.inputs.clone(), self.cancel.clone());
                self.ctx.tracker.spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(after) => { let _ = inputs.send(Input::TimerFired(timer)).await; }
                    }
                });
            }
            Action::Notify(n) => self.ctx.sink.emit(n),
        }
    }

    fn lane(&mut self, vip: Vip, epoch: u64, kind: JobKind) {
        let job = Job { kind, epoch };
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

    /// The longest a lane waits for one store call. Every request inside is timed, but a
    /// call may wait for a lock the store holds across requests (one lease grant at a
    /// time), and a lane that waits forever holds every later job of its VIP with it: a
    /// drain then never answers (seen with 100 VIPs drained at once).
    fn store_limit(&self) -> std::time::Duration {
        self.ctx
            .config
            .store
            .request_timeout
            .saturating_mul(STORE_CALL_REQUESTS)
    }

    async fn store_call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.store_limit();
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "no answer within {limit:?}"
            )))
        })
    }

    fn failed(&self, what: &str, error: impl std::fmt::Display) {
        self.ctx.sink.emit(
            Notice::new(NoticeKind::ActionFailed, Some(self.vip))
                .detail(format!("{what}: {error}")),
        );
    }

    /// This node's record was written: the core hears it now rather than from the
    /// store's watch, which front-ends get at the same moment, so this node is ready for
    /// them.
    async fn recorded(&self, owner: VipOwner) {
        let (vip, owner) = (self.vip, Some(owner));
        let _ = self
            .ctx
            .inputs
            .send(Input::OwnerChanged { vip, owner })
            .await;
    }

    /// The VIP is here and recorded as this node's (never before: a VIP added by hand next
    /// to a live owner must not draw its traffic). Peers that hear of the record must reach
    /// it here, not at the old holder's MAC from their ARP cache: a cluster manager may
    /// announce the address later (IPaddr2's send_arp runs in the background), or never.
    async fn announce(&self) {
        if let Err(why) = self.ctx.holder.announce(self.vip).await {
            debug!(vip = %self.vip, %why, "no gratuitous ARP");
        }
    }

    fn fenced(&self, what: &str, detail: String) {
        warn!(vip = %self.vip, what, %detail, "action fenced");
        self.ctx.sink.emit(
            Notice::new(NoticeKind::ActionFenced, Some(self.vip))
                .detail(format!("{what}: {detail}")),
        );
    }

    async fn job(&self, job: Job) {
        let vip = self.vip;
        let epoch = job.epoch;
        match job.kind {
            JobKind::AcceptSas { accept } => {
                info!(%vip, accept, epoch, "IKE for the hosted VIP {}", if accept { "accepted" } else { "refused" });
                if let Some(p) = &self.ctx.policies
                    && self.ctx.config.policy_managed(vip)
                {
                    p.set_accepting(vip, accept).await;
                }
            }
            JobKind::CheckSa { role, ike_id } => {
                if let Some(p) = &self.ctx.policies
                    && self.ctx.config.policy_managed(vip)
                {
                    p.check_sa(vip, role, ike_id).await;
                }
            }
            JobKind::Publish => match self.store_call(self.ctx.store.publish(vip)).await {
                Ok(owner) => {
                    info!(%vip, epoch = owner.epoch, "ownership published");
                    self.announce().await;
                    self.recorded(owner).await;
                }
                Err(StoreError::Fenced { owner, epoch, .. }) => self.fenced(
                    "publish",
                    format!("{owner} holds the VIP at epoch {epoch}; waiting for its record to go"),
                ),
                Err(e) => {
                    self.failed("publish", e);
                    let _ = self.ctx.inputs.send(Input::PublishFailed(vip)).await;
                }
            },
            JobKind::TakeOver { from } => {
                match self.store_call(self.ctx.store.take_over(vip, &from)).await {
                    Ok(owner) => {
                        info!(%vip, epoch = owner.epoch, from = %from.node, "ownership taken over");
                        self.announce().await;
                        self.recorded(owner).await;
                    }
                    Err(StoreError::Fenced { owner, epoch, .. }) => self.fenced(
                        "takeover",
                        format!("the record changed meanwhile ({owner} at epoch {epoch})"),
                    ),
                    Err(e) => self.failed("takeover", e),
                }
            }
            JobKind::MarkDraining => {
                // The DELETEs that follow must not wait for a slow store (an election):
                // the mark only spares front-ends a refused attempt here, and the store
                // keeps retrying it in the background until it takes effect.
                match tokio::time::timeout(MARK_DRAINING_WAIT, self.ctx.store.mark_draining(vip))
                    .await
                {
                    Ok(Ok(())) => info!(%vip, "record marked draining"),
                    Ok(Err(e)) => self.failed("mark draining", e),
                    Err(_) => self.failed(
                        "mark draining",
                        format!(
                            "the store did not answer within {MARK_DRAINING_WAIT:?}; \
                             deleting SAs now, the mark is retried in the background"
                        ),
                    ),
                }
            }
            JobKind::Withdraw => match self.store_call(self.ctx.store.withdraw(vip)).await {
                Ok(()) => info!(%vip, "ownership withdrawn"),
                Err(e) => self.failed("withdraw", e),
            },
            JobKind::DeleteSas { role, reply } => {
                let check = fence::hosted_delete(
                    self.ctx.store.as_ref(),
                    &self.ctx.config.node,
                    vip,
                    epoch,
                );
                // Bounded like every store call here; without an answer the delete goes
                // ahead, as with a store that is unreachable.
                let checked = match role {
                    VipRole::Hosted => tokio::time::timeout(self.store_limit(), check)
                        .await
                        .unwrap_or(Ok(())),
                    VipRole::Peer => Ok(()),
                };
                if let Err(fenced) = checked {
                    self.fenced("delete", fenced.to_string());
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(CommandError::Fenced(fenced)));
                    }
                    return;
                }
                let started = std::time::Instant::now();
                let result =
                    tokio::time::timeout(KEYING_CALL_LIMIT, self.ctx.keying.delete_sas(vip, role))
                        .await
                        .unwrap_or_else(|_| {
                            Err(KeyingError::Timeout {
                                command: "delete SAs".into(),
                                after: KEYING_CALL_LIMIT,
                            })
                        });
                match &result {
                    Ok(n) => {
                        info!(%vip, deleted = n, took = ?started.elapsed(), "SAs deleted gracefully")
                    }
                    Err(e) => self.failed("delete", e),
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result.map_err(CommandError::Keying));
                }
            }
            JobKind::DropStale { spare_answered } => {
                // An attempt still queued was aimed at the SAs being dropped.
                self.ctx.pacer.cancel(vip);
                let started = std::time::Instant::now();
                // The drop was decided when news of a new holder came (or silence); an
                // attempt already out can complete with that holder before the listing is
                // through (the 20-front-end crash bench lost such SAs 70 ms after they came
                // up), or be in its IKE_AUTH with it: destroyed there, it stays half-open on
                // the new owner, whose cookie threshold per address it fills (and charon
                // 5.9.8 can lose the answer to a cookie retry for 4 s). An attempt that
                // timed out was ended by the keying daemon itself. After silence the
                // answered ones go too: their holder no longer has the address.
                let knowledge = self.ctx.knowledge.clone();
                let spare = move |c: crate::keying::DropCandidate| {
                    (spare_answered && c.answered) || knowledge.holds_sa(vip, c.ike_id)
                };
                match self.ctx.keying.drop_sas(vip, &spare).await {
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
            JobKind::Initiate {
                attempt,
                crowd,
                news,
            } => {
                if self.ctx.config.peer(vip).is_none() {
                    self.failed("initiate", "not a configured peer VIP");
                    let result = Err("not a configured peer VIP".to_string());
                    let _ = self
                        .ctx
                        .inputs
                        .send(Input::InitiateFinished {
                            vip,
                            attempt,
                            result,
                        })
                        .await;
                    return;
                }
                // The VIP has (or had) another holder: its IKE_SA_INIT must not go to the
                // MAC of the one before (addrwatch::neighbour).
                forget_holder_for(self.ctx.holder.as_ref(), vip, "a new attempt").await;
                // The epoch is checked again, and the policy's connection prepared, when
                // the pacer starts it: that may be a while after this decision.
                self.ctx.pacer.initiate(vip, attempt, epoch, crowd, news);
            }
        }
    }
}

/// How long a refused IKE_SA stays before its DELETE goes. charon reports the IKE_SA up
/// (VICI `ike-updown`) while its IKE_AUTH answer is still on the way out, and a DELETE
/// sent at once can reach the front-end first: in the etcd-cluster chaos lab under load,
/// 6 of 35 refusals' DELETEs arrived before the answer they followed by 2 ms on the
/// back-end's log. The front-end's charon then ignores it ("ignoring INFORMATIONAL in
/// IKE_SA state CONNECTING"), takes the IKE_SA up on the answer and keeps it, dead,
/// until the DELETE is retransmitted 4 s later; a connection in those 4 s failed.
pub(super) const REFUSED_SA_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// Deletes a refused IKE_SA once its IKE_AUTH answer has had [`REFUSED_SA_GRACE`] to land.
pub(super) async fn refuse_sa(
    keying: &dyn Keying,
    ike_id: crate::model::IkeId,
) -> Result<(), KeyingError> {
    tokio::time::sleep(REFUSED_SA_GRACE).await;
    keying.terminate_sa(ike_id).await
}

/// Asks `vip`'s IKE port once. A probe nobody answered waits in this node's neighbour
/// queue while nobody holds the VIP, and the next holder's gratuitous ARP lets every such
/// probe go at once: a silent VIP is probed every window, so the new holder got about ten
/// IKE_SA_INITs from this address in the same millisecond, asked it for COOKIEs for its
/// calm-down of 10 s, and charon 5.9.8 lost the answer to the real attempt's COOKIE retry
/// until its retransmission 4 s later (a planned move during an etcd election recovered
/// 5 s after the takeover). Forgetting the VIP's neighbour entry after silence drops them.
pub(super) async fn probe_ike(
    probe: &dyn IkeProbe,
    holder: &dyn HolderProbe,
    vip: Vip,
    window: std::time::Duration,
) -> ProbeAnswer {
    let answer = probe.answers(vip, window).await;
    debug!(%vip, ?answer, "IKE port probed");
    if !answer.answered() {
        forget_holder_for(holder, vip, "an IKE probe went unanswered").await;
    }
    answer
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::addrwatch::memory::ForgettingHolder;
    use crate::keying::memory::{KeyingCall, MemoryIkeProbe, MemoryKeying};
    use crate::model::VipRole;

    #[tokio::test(start_paused = true)]
    async fn a_silent_ike_probe_leaves_nothing_queued_for_the_next_holder() {
        let (silent, held): (Vip, Vip) = (
            "192.0.2.100".parse().unwrap(),
            "192.0.2.104".parse().unwrap(),
        );
        let probe = MemoryIkeProbe::default();
        probe.set_answering(held, true);
        let holder = ForgettingHolder::default();
        let window = Duration::from_millis(100);
        assert!(probe_ike(&probe, &holder, held, window).await.answered());
        assert!(holder.forgotten().is_empty(), "an answered probe");
        assert!(!probe_ike(&probe, &holder, silent, window).await.answered());
        assert_eq!(holder.forgotten(), vec![silent]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_sa_is_deleted_only_after_its_answer_had_time_to_land() {
        let vip: Vip = "192.0.2.100".parse().unwrap();
        let keying = Arc::new(MemoryKeying::new(vec![crate::failover::SaRef {
            ike_id: 7,
            vip,
            role: VipRole::Hosted,
        }]));
        let refusing = tokio::spawn({
            let keying = keying.clone();
            async move { refuse_sa(keying.as_ref(), 7).await }
        });
        tokio::time::sleep(REFUSED_SA_GRACE - Duration::from_millis(1)).await;
        assert!(
            keying.calls().is_empty(),
            "the DELETE went before the answer could land: {:?}",
            keying.calls()
        );
        refusing.await.unwrap().unwrap();
        assert_eq!(keying.calls(), vec![KeyingCall::Terminate(7)]);
        assert!(keying.sas().is_empty());
    }
}
