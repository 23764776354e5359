//! Reconnect storm control: every initiation the core asks for waits its turn here.
//!
//! When one owner change hits many SAs at once (many VIPs on a node, many front-ends in a
//! cluster), starting every IKE_SA_INIT in the same millisecond overloads both the local
//! keying daemon (each initiation holds one of charon's worker threads) and the new owner.
//! [`InitiationQueue`] decides, without I/O, which initiation starts when:
//! - a priority queue: higher `peer_vip.priority` first, then first come first served;
//! - a token bucket: `rate` initiations per second on average, `burst` back to back;
//! - a limit of initiations in flight (the one place this limit lives) that follows how
//!   the responders answer: it starts at `concurrency`, grows by one after each attempt
//!   that came back quickly, and halves after one that failed or was slow, never beyond
//!   `max_concurrency` nor below one (additive increase, multiplicative decrease);
//! - a random jitter before the first attempt of a renegotiation, so the front-ends of a
//!   cluster spread their IKE_SA_INITs. Its window follows the crowd of initiations the
//!   core expects to reach the same new owner at once ([`PacingSettings::window`]): none
//!   for a few, so a small cluster (or one node with many VIPs, which this pacer already
//!   spaces) pays nothing, up to `jitter` for a large one.
//!   Each first attempt queued while a window is open draws its own point in it, and the
//!   points are dealt out again by priority, so this node's VIPs still go in priority
//!   order while the owner sees the crowd's pairs arrive evenly over the window (one
//!   shared point per node sent a node's VIPs back to back, and the last of them waited
//!   for the others' exchanges after the window). Later attempts get no jitter: the
//!   core's backoff already spaces them.
//!
//! There is no per-peer backoff here on purpose: the failover core keeps one retry schedule
//! per peer VIP (`failover.retry_*`, exponential up to `retry_max` and bounded by
//! `retry_deadline`), and a peer VIP is exactly what an initiation is aimed at (the owner
//! behind it changes with every move). A second backoff here would only stretch the core's
//! schedule in a way its deadline does not know about, so a cycle could give up without
//! having made the attempts it planned.
//!
//! [`Pacer`] is the thin I/O part: a task that owns the queue, starts initiations on the
//! keying daemon, and reports their results to the core as `InitiateFinished`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::events::EventSink;
use super::fence;
use super::knowledge::KnowledgeReader;
use super::policies::Policies;
use crate::InputSink;
use crate::addrwatch::holder::{HolderProbe, forget_holder_for};
use crate::config::{Config, ReconnectConfig};
use crate::failover::{Input, Notice, NoticeKind};
use crate::keying::{Initiated, Keying, KeyingError};
use crate::metrics::Metrics;
use crate::model::Vip;

/// The pacing limits, from `[failover.reconnect]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PacingSettings {
    pub rate: f64,
    pub burst: u32,
    pub concurrency: usize,
    pub jitter: Duration,
    pub responder_rate: f64,
    pub max_concurrency: usize,
    /// An attempt that came back within this is quick: the responders keep up.
    pub quick: Duration,
}

/// How an initiation came back, for the concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Up within the quick threshold: room for one more at once.
    Quick,
    /// Up, but slowly: half as many at once.
    Slow,
    /// Failed or timed out: half as many at once, and with one in flight already, a pause
    /// before the next.
    Failed,
    /// Never reached the responder (fenced, no connection), or ended for a newer attempt
    /// at the same VIP: says nothing about the responder.
    NotAsked,
    /// The responder answered, but this node's keying daemon lost the answer and came up
    /// only through its own retransmission seconds later (see
    /// [`Initiated::AfterLostAnswer`]): says nothing about the responder either. Taken for
    /// slowness, two such attempts at once cut the limit to one that they both held, and
    /// no other VIP started for 4 s (a 1x100 crash run recovered 9 s late).
    LostHere,
    /// Given up for an answer this node's daemon lost: as [`Answer::LostHere`] for the
    /// limit, but the responder holds the attempt half-open for its `half_open_timeout`
    /// (30 s), so one slot fewer until then. From 5 half-open from one address
    /// (`charon.block_threshold`) a responder ignores every IKE_SA_INIT from there, even
    /// the retransmissions that would complete them: three attempts in flight stuck on
    /// lost answers and one given up before blocked a front-end for 30 s.
    GivenUp,
}

/// charon's `half_open_timeout` default: how long a responder keeps an IKE_SA whose
/// IKE_AUTH never came.
const RESPONDER_HALF_OPEN: Duration = Duration::from_secs(30);

/// The longest pause after answers that keep timing out at one initiation in flight: long
/// enough that a thousand front-ends spread over it stay within what one responder builds
/// (about 80 IKE_SAs a second on two cores; docs/bench/simulation.md).
pub const MAX_PAUSE: Duration = Duration::from_secs(30);

/// Up to this many front-ends renegotiating at once need no spreading: the new owner
/// takes them as fast as they come (measured: 2 front-ends with a 13 ms IKE exchange).
pub const CROWD_WITHOUT_JITTER: u32 = 8;

impl PacingSettings {
    /// The jitter window for a first attempt when `crowd` front-ends renegotiate with the
    /// same owner at once: long enough for the owner to take them at `responder_rate`,
    /// at most `jitter`, and none for a small crowd. An unknown crowd (0: a cluster
    /// starting up, where every front-end initiates at once and no back-end has counted
    /// its front-ends yet) gets the whole `jitter`.
    pub fn window(&self, crowd: u32) -> Duration {
        if crowd == 0 {
            return self.jitter;
        }
        if crowd <= CROWD_WITHOUT_JITTER || self.jitter.is_zero() {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(f64::from(crowd) / self.responder_rate).min(self.jitter)
    }
}

impl From<&ReconnectConfig> for PacingSettings {
    fn from(c: &ReconnectConfig) -> Self {
        PacingSettings {
            rate: c.rate,
            burst: c.burst,
            concurrency: c.concurrency as usize,
            jitter: c.jitter,
            responder_rate: c.responder_rate,
            max_concurrency: c.max_concurrency.max(c.concurrency) as usize,
            quick: c.quick,
        }
    }
}

/// One initiation waiting for its turn.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedInitiation {
    pub vip: Vip,
    pub attempt: u32,
    pub priority: u8,
    /// When the core asked for it.
    pub queued_at: Instant,
    /// Not before this (its point in the jitter window, or `queued_at`).
    pub not_before: Instant,
    /// The jitter window it drew its point in.
    window: Option<u64>,
    seq: u64,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Start this initiation now (it counts as in flight until [`InitiationQueue::finished`]).
    Start(QueuedInitiation),
    /// Nothing can start before this time (a jitter window or the token bucket).
    At(Instant),
    /// Nothing can start until something is queued or an initiation finishes.
    Idle,
}

/// The pure pacing state: queue, token bucket, in-flight count, jitter window.
#[derive(Debug)]
pub struct InitiationQueue {
    settings: PacingSettings,
    queue: Vec<QueuedInitiation>,
    tokens: f64,
    refilled_at: Instant,
    in_flight: usize,
    /// Initiations allowed in flight now (see the module's notes).
    limit: usize,
    next_seq: u64,
    /// The jitter window first attempts join while it is open: its id, opening and length.
    window: Option<(u64, Instant, Duration)>,
    /// Below one initiation in flight: after answers that keep coming back slow or not at
    /// all with only one in flight, the next start waits up to this long (doubling, to
    /// [`MAX_PAUSE`]), so that many front-ends back off together as TCP does.
    pause: Duration,
    /// No start before this (a random point within `pause`).
    resume_at: Option<Instant>,
    /// Failures in a row with one in flight, since the last answer or news of an owner.
    failures: u32,
    /// When an initiation last started or returned.
    busy_at: Instant,
    /// Until when each attempt given up for an answer this node's daemon lost stays
    /// half-open on its responder (see [`Answer::GivenUp`]).
    left_half_open: Vec<Instant>,
}

/// After this long with nothing in flight the limit starts again from `concurrency`: what
/// the last storm taught about a responder says nothing about the next one, which may hit
/// another owner, or this one with many more front-ends at once (TCP restarts its window
/// after idle for the same reason, RFC 2861). Kept high, eight first attempts of one move
/// went to a two-core owner at once and came back slower than one after another.
pub const RESTART_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Failures in a row, with one initiation in flight, before starts pause: a peer that is
/// gone (a crash the front-end learns of only by silence, without a cluster store) costs
/// this many timeouts anyway, and a crash taken over within them pays no pause.
pub const FAILURES_BEFORE_PAUSE: u32 = 3;

impl InitiationQueue {
    pub fn new(settings: PacingSettings, now: Instant) -> Self {
        InitiationQueue {
            settings,
            queue: Vec::new(),
            tokens: f64::from(settings.burst),
            refilled_at: now,
            in_flight: 0,
            limit: settings.concurrency.max(1),
            next_seq: 0,
            window: None,
            pause: Duration::ZERO,
            resume_at: None,
            failures: 0,
            busy_at: now,
            left_half_open: Vec::new(),
        }
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues an initiation. `unit_random` (in [0, 1)) picks a first attempt's point in
    /// what is left of the jitter window `crowd` calls for (opened or grown by it). A newer
    /// initiation for a VIP replaces one still queued (the core only asks again once it
    /// stopped waiting for the old one); the replaced one is returned.
    pub fn enqueue(
        &mut self,
        now: Instant,
        vip: Vip,
        attempt: u32,
        priority: u8,
        crowd: u32,
        unit_random: f64,
    ) -> Option<QueuedInitiation> {
        let replaced = self.cancel(vip);
        if self.in_flight == 0 && now.saturating_duration_since(self.busy_at) >= RESTART_AFTER_IDLE
        {
            self.limit = self.settings.concurrency.max(1);
        }
        let length = self.settings.window(crowd);
        let (not_before, window) = if attempt == 1 && !length.is_zero() {
            let (id, opened, length) = match self.window {
                // The crowd grows as the records of the VIPs moving together come in: the
                // window grows with it.
                Some((id, opened, open)) if opened + open > now => {
                    let grown = (id, opened, open.max(length));
                    self.window = Some(grown);
                    grown
                }
                _ => {
                    let open = (self.next_seq, now, length);
                    self.window = Some(open);
                    open
                }
            };
            // One that joins late draws in what is left, so the window keeps its end.
            let left = (opened + length).saturating_duration_since(now);
            (now + left.mul_f64(unit_random.clamp(0.0, 1.0)), Some(id))
        } else {
            (now, None)
        };
        self.queue.push(QueuedInitiation {
            vip,
            attempt,
            priority,
            queued_at: now,
            not_before,
            window,
            seq: self.next_seq,
        });
        if window.is_some() {
            self.deal_points_by_priority(now, window);
        }
        self.next_seq += 1;
        replaced
    }

    /// Gives the earliest points of a window to the highest priorities (first come first
    /// served among equals), keeping the set of points as drawn. Those already due keep
    /// theirs (`next` takes due ones by priority): moved to a later point, one held back
    /// only by the limit in flight would wait on with the slot free.
    fn deal_points_by_priority(&mut self, now: Instant, window: Option<u64>) {
        let mut members: Vec<usize> = (0..self.queue.len())
            .filter(|i| self.queue[*i].window == window && self.queue[*i].not_before > now)
            .collect();
        let mut points: Vec<Instant> = members.iter().map(|i| self.queue[*i].not_before).collect();
        points.sort();
        members.sort_by(|a, b| {
            let (a, b) = (&self.queue[*a], &self.queue[*b]);
            b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq))
        });
        for (i, point) in members.into_iter().zip(points) {
            self.queue[i].not_before = point;
        }
    }

    /// Removes the VIP's queued initiation (its SAs were dropped: the core has moved on).
    pub fn cancel(&mut self, vip: Vip) -> Option<QueuedInitiation> {
        let i = self.queue.iter().position(|q| q.vip == vip)?;
        Some(self.queue.remove(i))
    }

    /// An initiation started by [`Next::Start`] returned. `unit_random` (in [0, 1)) picks
    /// where within the pause the next start may go.
    pub fn finished(&mut self, now: Instant, answer: Answer, unit_random: f64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.busy_at = now;
        match answer {
            Answer::Quick => {
                self.limit = (self.limit + 1).min(self.settings.max_concurrency.max(1));
                self.failures = 0;
                self.shrink_pause();
            }
            // An answer, even a slow one, means the responder gets through its work.
            Answer::Slow => {
                self.limit = (self.limit / 2).max(1);
                self.failures = 0;
                self.shrink_pause();
            }
            Answer::NotAsked | Answer::LostHere => {}
            Answer::GivenUp => self.left_half_open.push(now + RESPONDER_HALF_OPEN),
            Answer::Failed if self.limit > 1 => self.limit /= 2,
            Answer::Failed if self.failures + 1 < FAILURES_BEFORE_PAUSE => self.failures += 1,
            Answer::Failed => {
                self.pause = (self.pause * 2).clamp(self.settings.quick, MAX_PAUSE);
                let at = now + self.pause.mul_f64(unit_random.clamp(0.0, 1.0));
                self.resume_at = Some(self.resume_at.map_or(at, |r| r.max(at)));
            }
        }
    }

    fn shrink_pause(&mut self) {
        self.pause /= 2;
        if self.pause < self.settings.quick {
            self.pause = Duration::ZERO;
            self.resume_at = None;
        }
    }

    /// News of a new owner: the answers that made the queue pause were about an owner that
    /// is gone (a VIP in transit times out), so the next attempts go at once.
    pub fn owner_changed(&mut self) {
        self.pause = Duration::ZERO;
        self.resume_at = None;
        self.failures = 0;
    }

    /// How long starts pause now after slow answers (zero when they do not).
    pub fn pause(&self) -> Duration {
        self.pause
    }

    /// Initiations allowed in flight now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn next(&mut self, now: Instant) -> Next {
        self.refill(now);
        if self.queue.is_empty() || self.in_flight >= self.limit {
            return Next::Idle;
        }
        self.left_half_open.retain(|until| *until > now);
        // Never below one: with one in flight and one left half-open, this node stays
        // two below the responder's block.
        let room = self.limit.saturating_sub(self.left_half_open.len()).max(1);
        if self.in_flight >= room {
            return self
                .left_half_open
                .iter()
                .min()
                .map_or(Next::Idle, |until| Next::At(*until));
        }
        if let Some(at) = self.resume_at.filter(|at| *at > now) {
            return Next::At(at);
        }
        let best = self
            .queue
            .iter()
            .enumerate()
            .filter(|(_, q)| q.not_before <= now)
            .max_by(|(_, a), (_, b)| a.priority.cmp(&b.priority).then_with(|| b.seq.cmp(&a.seq)))
            .map(|(i, _)| i);
        let Some(i) = best else {
            let soonest = self.queue.iter().map(|q| q.not_before).min();
            return soonest.map_or(Next::Idle, Next::At);
        };
        if self.tokens < 1.0 {
            let missing = 1.0 - self.tokens;
            return Next::At(now + Duration::from_secs_f64(missing / self.settings.rate));
        }
        self.tokens -= 1.0;
        self.in_flight += 1;
        self.busy_at = now;
        Next::Start(self.queue.remove(i))
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.settings.rate)
            .min(f64::from(self.settings.burst));
        self.refilled_at = now;
    }
}

enum Request {
    Enqueue {
        vip: Vip,
        attempt: u32,
        epoch: u64,
        crowd: u32,
        news: bool,
    },
    Cancel {
        vip: Vip,
    },
}

/// The runtime's handle on the pacing task. Requests keep the order they were sent in, so
/// a lane's drop always reaches the queue after the initiation it cancels.
#[derive(Clone)]
pub(super) struct Pacer {
    requests: mpsc::UnboundedSender<Request>,
}

/// What the pacing task works with.
pub(super) struct PacerParts {
    pub keying: Arc<dyn Keying>,
    pub config: Arc<Config>,
    pub inputs: InputSink,
    pub metrics: Arc<Metrics>,
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
    /// What the core knows now: an initiation decided under an older epoch is fenced.
    pub knowledge: KnowledgeReader,
    /// The policy runtime, for VIPs whose connection comes from their policy.
    pub policies: Option<Policies>,
    pub sink: EventSink,
    /// The link: an attempt that ended unanswered has its packets forgotten.
    pub holder: Arc<dyn HolderProbe>,
}

impl Pacer {
    pub(super) fn start(parts: PacerParts) -> Pacer {
        let (tx, rx) = mpsc::unbounded_channel();
        let tracker = parts.tracker.clone();
        tracker.spawn(run(parts, rx).instrument(info_span!("pacer")));
        Pacer { requests: tx }
    }

    /// Queues an initiation the core decided while the VIP's epoch was `epoch`, with
    /// `crowd` front-ends expected to renegotiate with the same owner at once. `news`: the
    /// core heard of a new holder without a new epoch (the VIP's IKE port answering again).
    pub(super) fn initiate(&self, vip: Vip, attempt: u32, epoch: u64, crowd: u32, news: bool) {
        let _ = self.requests.send(Request::Enqueue {
            vip,
            attempt,
            epoch,
            crowd,
            news,
        });
    }

    pub(super) fn cancel(&self, vip: Vip) {
        let _ = self.requests.send(Request::Cancel { vip });
    }
}

async fn run(parts: PacerParts, mut requests: mpsc::UnboundedReceiver<Request>) {
    let settings = PacingSettings::from(&parts.config.failover.reconnect);
    let mut queue = InitiationQueue::new(settings, Instant::now());
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Vip, u32, Answer)>();
    // The epoch each VIP's queued initiation was decided under (the queue keeps one per VIP).
    let mut decided: HashMap<Vip, u64> = HashMap::new();
    // The initiation handed to the keying daemon last for each VIP, until it returns, and
    // how to tell it a newer one was asked for.
    let mut out: HashMap<Vip, (u32, Arc<Notify>)> = HashMap::new();
    loop {
        let wake = loop {
            match queue.next(Instant::now()) {
                Next::Start(q) => {
                    let epoch = decided.get(&q.vip).copied().unwrap_or(0);
                    let superseded = Arc::new(Notify::new());
                    out.insert(q.vip, (q.attempt, superseded.clone()));
                    start(&parts, q, epoch, superseded, done_tx.clone())
                }
                Next::At(t) => break Some(t),
                Next::Idle => break None,
            }
        };
        parts.metrics.initiations_queued.set(queue.queued() as i64);
        tokio::select! {
            _ = parts.cancel.cancelled() => return,
            req = requests.recv() => match req {
                None => return,
                Some(Request::Enqueue { vip, attempt, epoch, crowd, news }) => {
                    if decided.insert(vip, epoch).is_some_and(|before| epoch > before) || news {
                        queue.owner_changed();
                    }
                    if let Some((earlier, superseded)) = out.get(&vip)
                        && *earlier < attempt
                    {
                        // The core has given the attempt under way up (news of a new
                        // holder): see `SUPERSEDED_GRACE`.
                        superseded.notify_one();
                    }
                    let priority = parts.config.peer(vip).map_or(
                        crate::config::DEFAULT_PEER_PRIORITY,
                        |p| p.priority,
                    );
                    let now = Instant::now();
                    if let Some(old) = queue.enqueue(now, vip, attempt, priority, crowd, rand::random()) {
                        report_unstarted(&parts, &old, "replaced by a newer attempt");
                    }
                    debug!(%vip, attempt, priority, crowd, window = ?settings.window(crowd), queued = queue.queued(), "initiation queued");
                }
                Some(Request::Cancel { vip }) => {
                    if let Some(old) = queue.cancel(vip) {
                        report_unstarted(&parts, &old, "cancelled by a drop before it started");
                    }
                }
            },
            Some((vip, attempt, answer)) = done_rx.recv() => {
                if out.get(&vip).is_some_and(|(a, _)| *a == attempt) {
                    out.remove(&vip);
                }
                queue.finished(Instant::now(), answer, rand::random());
                debug!(?answer, limit = queue.limit(), pause = ?queue.pause(), "initiation returned");
            }
            _ = sleep_until(wake), if wake.is_some() => {}
        }
    }
}

/// How long an initiation still under way when the core asks for a newer one at the same
/// VIP (news of a new holder) may go on. charon joins a new initiation to an IKE_SA of the
/// same connection that is still connecting, so a newer attempt cannot start afresh while
/// this one stands. One about to complete with the new holder does within this (a
/// responder that keeps up answers in tens of ms); one answered by the holder before, or
/// whose COOKIE retry's answer charon 5.9.8 lost, would only complete at charon's
/// retransmission 4 s later, holding the newer attempt and its pacer slot that long (a
/// planned move during an etcd election recovered 5 s after the takeover).
const SUPERSEDED_GRACE: Duration = Duration::from_millis(150);

/// Ends what is left of an initiation the core gave up for a newer one: every IKE_SA
/// toward `vip` the core does not hold (it holds the SAs that came up), answered or not.
async fn end_superseded(keying: &dyn Keying, knowledge: &KnowledgeReader, vip: Vip, attempt: u32) {
    let knowledge = knowledge.clone();
    let spare = move |c: crate::keying::DropCandidate| knowledge.holds_sa(vip, c.ike_id);
    match keying.drop_sas(vip, &spare).await {
        Ok(n) => {
            info!(%vip, attempt, dropped = n, grace = ?SUPERSEDED_GRACE, "initiation ended for a newer attempt")
        }
        Err(e) => {
            warn!(%vip, attempt, error = %e, "initiation given up for a newer attempt, its IKE_SA not ended")
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Tells the core an attempt it is waiting for will not run. The core ignores it when it
/// has already moved on to a later attempt (the usual case after a drop).
fn report_unstarted(parts: &PacerParts, q: &QueuedInitiation, why: &str) {
    debug!(vip = %q.vip, attempt = q.attempt, why, "queued initiation removed");
    let inputs = parts.inputs.clone();
    let (vip, attempt, why) = (q.vip, q.attempt, why.to_string());
    parts.tracker.spawn(async move {
        let _ = inputs
            .send(Input::InitiateFinished {
                vip,
                attempt,
                result: Err(why),
            })
            .await;
    });
}

fn start(
    parts: &PacerParts,
    q: QueuedInitiation,
    epoch: u64,
    superseded: Arc<Notify>,
    done: mpsc::UnboundedSender<(Vip, u32, Answer)>,
) {
    let now = Instant::now();
    let waited = now.saturating_duration_since(q.queued_at);
    parts
        .metrics
        .initiation_queue_wait
        .observe(waited.as_secs_f64());
    let (vip, attempt) = (q.vip, q.attempt);
    let (keying, inputs) = (parts.keying.clone(), parts.inputs.clone());
    let written = parts.config.peer(vip).and_then(|p| p.peer_connection());
    let (knowledge, policies, sink) = (
        parts.knowledge.clone(),
        parts.policies.clone(),
        parts.sink.clone(),
    );
    let timeout = parts.config.keying.initiate_timeout;
    let quick = parts.config.failover.reconnect.quick;
    let holder = parts.holder.clone();
    info!(%vip, attempt, priority = q.priority, ?waited, "initiation started");
    parts.tracker.spawn(
        async move {
            // The runtime's clock, so a simulation on paused time judges answers as the lab would.
            let started = Instant::now();
            // An SA came up while this waited (often the new owner answering an attempt
            // that was out before the move): a second IKE_SA would be waste. Not a fence
            // (nothing was decided on stale news), so no `action-fenced`.
            let conn = if knowledge.covered(vip) {
                debug!(%vip, attempt, "initiation not needed: an SA came up meanwhile");
                Err("not needed: an SA toward the VIP came up meanwhile".to_string())
            } else {
                match fence::initiation(&knowledge, vip, epoch) {
                    // The owner changed while this waited its turn: the core has decided
                    // again under the new epoch.
                    Err(fenced) => {
                        warn!(%vip, attempt, why = %fenced, "initiation fenced");
                        sink.emit(
                            Notice::new(NoticeKind::ActionFenced, Some(vip))
                                .detail(format!("initiate: {fenced}")),
                        );
                        Err(format!("fenced: {fenced}"))
                    }
                    Ok(()) => match (written, &policies) {
                        (Some(c), _) => Ok(c),
                        // The owner of record's identity is required of the peer: a node
                        // that holds the address but not the record cannot complete IKE.
                        (None, Some(p)) => p.prepare_initiate(vip).await,
                        (None, None) => Err("not a configured peer VIP".to_string()),
                    },
                }
            };
            let asked = conn.is_ok();
            let mut ended_for_newer = false;
            let mut lost_answer = false;
            let mut slot_freed = false;
            let result = match conn {
                Ok(conn) => {
                    // The move's timeline marks the IKE_SA_INIT here, after the pacer's
                    // wait, not when the core asked for it.
                    let _ = inputs.send(Input::InitiateStarted { vip, attempt }).await;
                    let mut initiate = Box::pin(keying.initiate(vip, &conn, timeout));
                    let covered = knowledge.until_covered(vip);
                    tokio::pin!(covered);
                    let mut cover_seen = false;
                    let outcome = loop {
                        tokio::select! {
                            r = &mut initiate => break Some(r),
                            _ = superseded.notified() => {
                                break tokio::time::timeout(SUPERSEDED_GRACE, &mut initiate).await.ok();
                            }
                            // The CHILD_SA's up event reaches the core before charon answers
                            // the initiate: charon answers from the worker thread that
                            // waited, once it runs again, 4 ms later in the median of a
                            // 100-VIP storm and 12 ms at p90, a third of the time a slot was
                            // held. A quick initiation frees its slot at the event; a slow
                            // one waits for the answer to tell why it was slow.
                            () = &mut covered, if !cover_seen => {
                                cover_seen = true;
                                if started.elapsed() <= quick {
                                    let _ = done.send((vip, attempt, Answer::Quick));
                                    slot_freed = true;
                                }
                            }
                        }
                    };
                    drop(initiate);
                    match outcome {
                        Some(Ok(how)) => {
                            lost_answer = how == Initiated::AfterLostAnswer;
                            Ok(())
                        }
                        Some(Err(e)) => {
                            lost_answer = matches!(e, KeyingError::AnswerLost { .. });
                            Err(e.to_string())
                        }
                        None => {
                            ended_for_newer = true;
                            end_superseded(keying.as_ref(), &knowledge, vip, attempt).await;
                            Err("ended for a newer attempt".to_string())
                        }
                    }
                }
                Err(e) => Err(e),
            };
            // The slot frees before the core hears of the result: its next attempt must
            // find the slot free.
            let answer = match &result {
                Err(_) if lost_answer => Answer::GivenUp,
                _ if lost_answer => Answer::LostHere,
                Ok(()) if started.elapsed() <= quick => Answer::Quick,
                Ok(()) => Answer::Slow,
                Err(_) if !asked || ended_for_newer => Answer::NotAsked,
                Err(_) => Answer::Failed,
            };
            if !slot_freed {
                let _ = done.send((vip, attempt, answer));
            }
            debug!(%vip, attempt, took = ?started.elapsed(), ok = result.is_ok(), "initiate returned");
            if answer == Answer::Failed {
                // An IKE_SA_INIT sent while nobody held the VIP waits in this node's
                // neighbour queue for the address to resolve (up to about 3 s), and the
                // next holder's gratuitous ARP lets it go: the new owner then holds one
                // half-open IKE_SA for each attempt this node already ended, for its 30 s
                // half-open timeout, and from 5 of them ignores every IKE_SA_INIT from here
                // (`charon.block_threshold`; most likely what cost a 10-VIP crash run 36 s,
                // its lab not kept). Deleting the entry drops them; the next attempt asks
                // the link again.
                forget_holder_for(holder.as_ref(), vip, "an attempt ended unanswered").await;
            }
            let _ = inputs
                .send(Input::InitiateFinished {
                    vip,
                    attempt,
                    result,
                })
                .await;
        }
        .instrument(info_span!("initiate", %vip, attempt)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addrwatch::memory::ForgettingHolder;

    fn vip(n: u8) -> Vip {
        Vip::from([192, 0, 2, n])
    }

    fn settings() -> PacingSettings {
        PacingSettings {
            rate: 10.0,
            burst: 2,
            concurrency: 3,
            jitter: Duration::from_millis(200),
            responder_rate: 100.0,
            max_concurrency: 3,
            quick: ms(150),
        }
    }

    /// A crowd large enough for the whole `jitter` window.
    const CROWD: u32 = 1000;

    /// A queue whose token bucket never holds anything back: only the limit of
    /// initiations in flight (from `concurrency`, at most `max_concurrency`) paces it.
    fn unpaced(t0: Instant, concurrency: usize, max_concurrency: usize) -> InitiationQueue {
        InitiationQueue::new(
            PacingSettings {
                rate: 1000.0,
                burst: 100,
                concurrency,
                max_concurrency,
                ..settings()
            },
            t0,
        )
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_jitter_window_follows_the_crowd() {
        let s = settings();
        // Nobody counted: the whole window, as for a cluster starting up.
        assert_eq!(s.window(0), ms(200));
        // A few front-ends: the owner takes them as they come, nobody waits.
        assert_eq!(s.window(1), Duration::ZERO);
        assert_eq!(s.window(CROWD_WITHOUT_JITTER), Duration::ZERO);
        // A crowd: long enough for the owner to take it at responder_rate (100/s here).
        assert_eq!(s.window(12), ms(120));
        // A big one: never more than `jitter`.
        assert_eq!(s.window(60), ms(200));
        let off = PacingSettings {
            jitter: Duration::ZERO,
            ..settings()
        };
        assert_eq!(off.window(60), Duration::ZERO);
    }

    #[test]
    fn a_first_attempt_in_a_small_crowd_starts_at_once() {
        let t0 = Instant::now();
        let mut q = InitiationQueue::new(settings(), t0);
        q.enqueue(t0, vip(1), 1, 50, 2, 0.99);
        assert_eq!(drain(&mut q, t0), [1]);
    }

    /// Starts everything that may start now; returns the VIPs' last octets.
    fn drain(q: &mut InitiationQueue, now: Instant) -> Vec<u8> {
        let mut started = Vec::new();
        while let Next::Start(s) = q.next(now) {
            match s.vip {
                std::net::IpAddr::V4(v) => started.push(v.octets()[3]),
                std::net::IpAddr::V6(_) => unreachable!(),
            }
        }
        started
    }

    /// A keying daemon whose initiations wait until the test lets them finish.
    struct GatedKeying {
        started: mpsc::UnboundedSender<Vip>,
        gate: tokio::sync::Semaphore,
        /// The VIPs whose SAs were dropped, in order.
        drops: std::sync::Mutex<Vec<Vip>>,
    }

    #[async_trait::async_trait]
    impl Keying for GatedKeying {
        fn kind(&self) -> &'static str {
            "gated"
        }
        async fn run(&self, _sink: InputSink, cancel: CancellationToken) {
            cancel.cancelled().await
        }
        async fn list_sas(
            &self,
        ) -> Result<Vec<crate::model::IkeSaInfo>, crate::keying::KeyingError> {
            Ok(Vec::new())
        }
        async fn delete_sas(
            &self,
            _vip: Vip,
            _role: crate::model::VipRole,
        ) -> Result<u32, crate::keying::KeyingError> {
            Ok(0)
        }
        async fn drop_sas(
            &self,
            vip: Vip,
            _spare: &crate::keying::SpareSa<'_>,
        ) -> Result<u32, crate::keying::KeyingError> {
            self.drops.lock().unwrap().push(vip);
            Ok(1)
        }
        async fn initiate(
            &self,
            vip: Vip,
            _conn: &crate::model::PeerConnection,
            timeout: Duration,
        ) -> Result<Initiated, crate::keying::KeyingError> {
            let _ = self.started.send(vip);
            self.gate.acquire().await.expect("open").forget();
            if vip == UNANSWERED {
                return Err(crate::keying::KeyingError::Timeout {
                    command: "initiate".into(),
                    after: timeout,
                });
            }
            if vip == LOST_HERE {
                return Ok(Initiated::AfterLostAnswer);
            }
            Ok(Initiated::Answered)
        }
    }

    /// The VIP whose attempts the gated keying daemon reports as timed out.
    const UNANSWERED: Vip = Vip::V4(std::net::Ipv4Addr::new(192, 0, 2, 104));

    /// The VIP whose attempts the gated keying daemon brings up only through its own
    /// retransmission, after it lost the responder's answer.
    const LOST_HERE: Vip = Vip::V4(std::net::Ipv4Addr::new(192, 0, 2, 105));

    /// The next initiation result; an initiation handed to the keying daemon is announced
    /// first (`InitiateStarted`, for the move's timeline).
    async fn finished(rx: &mut mpsc::Receiver<Input>) -> (Vip, u32, Result<(), String>) {
        loop {
            match rx.recv().await.expect("an input") {
                Input::InitiateStarted { .. } => continue,
                Input::InitiateFinished {
                    vip,
                    attempt,
                    result,
                } => return (vip, attempt, result),
                other => panic!("unexpected input {other:?}"),
            }
        }
    }

    /// A pacer task over a gated keying daemon, and what it reports.
    struct Harness {
        pacer: Pacer,
        keying: Arc<GatedKeying>,
        holder: Arc<ForgettingHolder>,
        started: mpsc::UnboundedReceiver<Vip>,
        rx: mpsc::Receiver<Input>,
        notices: tokio::sync::broadcast::Receiver<crate::runtime::events::EventRecord>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    }

    fn harness(config: &str, knowledge: crate::runtime::knowledge::Knowledge) -> Harness {
        harness_reading(config, KnowledgeReader::fixed(knowledge))
    }

    fn harness_reading(config: &str, knowledge: KnowledgeReader) -> Harness {
        let config = Config::parse(config).expect("valid config");
        let (started_tx, started) = mpsc::unbounded_channel();
        let keying = Arc::new(GatedKeying {
            started: started_tx,
            gate: tokio::sync::Semaphore::new(0),
            drops: Default::default(),
        });
        let (inputs, rx) = mpsc::channel(16);
        let metrics = Arc::new(Metrics::new());
        let cancel = CancellationToken::new();
        let (events, notices) = tokio::sync::broadcast::channel(16);
        let holder = Arc::new(ForgettingHolder::default());
        let pacer = Pacer::start(PacerParts {
            keying: keying.clone(),
            config: Arc::new(config),
            inputs,
            metrics: metrics.clone(),
            tracker: TaskTracker::new(),
            cancel: cancel.clone(),
            knowledge,
            policies: None,
            sink: EventSink::new(events, metrics.clone(), "fe"),
            holder: holder.clone(),
        });
        Harness {
            pacer,
            keying,
            holder,
            started,
            rx,
            notices,
            metrics,
            cancel,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_runs_initiations_in_order_one_at_a_time_and_reports_cancelled_ones() {
        let Harness {
            pacer,
            keying,
            mut started,
            mut rx,
            metrics,
            cancel,
            ..
        } = harness(
            "node = \"fe\"\n\
             [failover.reconnect]\njitter = \"0s\"\n\
             [[peer_vip]]\naddress = \"192.0.2.100\"\nconnection = \"a\"\n\
             [[peer_vip]]\naddress = \"192.0.2.101\"\nconnection = \"b\"\npriority = 90\n\
             [[peer_vip]]\naddress = \"192.0.2.102\"\nconnection = \"c\"\n\
             [[peer_vip]]\naddress = \"192.0.2.103\"\nconnection = \"d\"\n",
            Default::default(),
        );
        // An empty queue starts at once.
        pacer.initiate(vip(100), 1, 0, 1, false);
        assert_eq!(started.recv().await, Some(vip(100)));
        // While it is in flight, the next ones queue up.
        pacer.initiate(vip(102), 1, 0, 1, false);
        pacer.initiate(vip(101), 1, 0, 1, false);
        pacer.initiate(vip(103), 2, 0, 1, false);
        // A drop removes a queued initiation; the core hears that it will not run.
        pacer.cancel(vip(103));
        let (v, attempt, result) = finished(&mut rx).await;
        assert_eq!((v, attempt), (vip(103), 2));
        assert!(result.unwrap_err().contains("cancelled"));
        // One in flight (the default): nothing else starts until 100 returns.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(started.try_recv().is_err(), "a second initiation started");
        assert_eq!(metrics.initiations_queued.get(), 2);
        keying.gate.add_permits(1);
        assert_eq!(finished(&mut rx).await, (vip(100), 1, Ok(())));
        // Then the higher priority first, though it was queued later.
        assert_eq!(started.recv().await, Some(vip(101)));
        keying.gate.add_permits(1);
        assert_eq!(finished(&mut rx).await, (vip(101), 1, Ok(())));
        assert_eq!(started.recv().await, Some(vip(102)));
        keying.gate.add_permits(1);
        assert_eq!(finished(&mut rx).await, (vip(102), 1, Ok(())));
        assert_eq!(metrics.initiations_queued.get(), 0);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn an_initiation_for_a_vip_already_covered_is_not_started() {
        let Harness {
            pacer,
            mut started,
            mut rx,
            mut notices,
            cancel,
            ..
        } = harness(
            "node = \"fe\"\n\
             [failover.reconnect]\njitter = \"0s\"\n\
             [[peer_vip]]\naddress = \"192.0.2.100\"\nconnection = \"a\"\n",
            crate::runtime::knowledge::Knowledge::default().with_covered(vip(100), 4, "be2"),
        );
        pacer.initiate(vip(100), 3, 4, 1, false);
        let (v, attempt, result) = finished(&mut rx).await;
        assert_eq!((v, attempt), (vip(100), 3));
        assert!(result.unwrap_err().contains("not needed"));
        assert!(started.try_recv().is_err(), "charon was asked anyway");
        // Not an action fenced on stale news: no event an alert would count.
        assert!(notices.try_recv().is_err());
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn first_attempts_draw_their_own_points_in_one_window_dealt_by_priority() {
        let t0 = Instant::now();
        let mut q = InitiationQueue::new(
            PacingSettings {
                burst: 10,
                ..settings()
            },
            t0,
        );
        q.enqueue(t0, vip(1), 1, 50, CROWD, 0.5);
        // A late one draws in what is left of the window (t0 + 10 to t0 + 200).
        q.enqueue(t0 + ms(10), vip(2), 1, 90, CROWD, 0.0);
        q.enqueue(t0 + ms(20), vip(3), 1, 10, CROWD, 0.5);
        // Points t0 + 10, + 100, + 110: the highest priority takes the earliest.
        assert_eq!(drain(&mut q, t0 + ms(20)), [2]);
        assert_eq!(q.next(t0 + ms(20)), Next::At(t0 + ms(100)));
        tokio::time::advance(ms(100)).await;
        assert_eq!(drain(&mut q, Instant::now()), [1]);
        assert_eq!(q.next(Instant::now()), Next::At(t0 + ms(110)));
        tokio::time::advance(ms(10)).await;
        assert_eq!(drain(&mut q, Instant::now()), [3]);
    }

    #[test]
    fn a_higher_priority_drawing_late_takes_the_earliest_point_but_not_one_already_due() {
        let t0 = Instant::now();
        let mut q = unpaced(t0, 1, 1);
        q.enqueue(t0, vip(1), 1, 50, CROWD, 0.1);
        q.enqueue(t0, vip(2), 1, 90, CROWD, 0.9);
        // Points t0 + 20 and + 180: the priority 90 one goes first.
        assert_eq!(q.next(t0), Next::At(t0 + ms(20)));
        assert_eq!(drain(&mut q, t0 + ms(20)), [2]);
        // vip(1) is due at + 180 now. vip(3) joins at + 20, due at once but held by the
        // limit; a higher priority joining at + 50 draws + 125 and does not take its point.
        q.enqueue(t0 + ms(20), vip(3), 1, 50, CROWD, 0.0);
        assert_eq!(drain(&mut q, t0 + ms(40)), Vec::<u8>::new());
        q.enqueue(t0 + ms(50), vip(4), 1, 99, CROWD, 0.5);
        q.finished(t0 + ms(60), Answer::NotAsked, 0.0);
        assert_eq!(drain(&mut q, t0 + ms(60)), [3]);
        q.finished(t0 + ms(70), Answer::NotAsked, 0.0);
        // vip(4) took the earlier of the points not yet due (+ 125, + 180).
        assert_eq!(q.next(t0 + ms(70)), Next::At(t0 + ms(125)));
        assert_eq!(drain(&mut q, t0 + ms(125)), [4]);
    }

    #[test]
    fn the_window_grows_with_the_crowd_as_records_come_in() {
        let t0 = Instant::now();
        let mut q = unpaced(t0, 3, 3);
        // 100/s: a crowd of 10 opens 100 ms, one of 20 (another VIP's record, 10 ms later)
        // stretches it to 200 ms; the late one draws in what is left.
        q.enqueue(t0, vip(1), 1, 50, 10, 0.0);
        q.enqueue(t0 + ms(10), vip(2), 1, 50, 20, 0.5);
        assert_eq!(drain(&mut q, t0), [1]);
        assert_eq!(q.next(t0 + ms(10)), Next::At(t0 + ms(105)));
    }

    #[test]
    fn a_crowds_first_attempts_are_spread_over_the_window_not_sent_together() {
        // One node with three VIPs in a large crowd: three points, not one shared point
        // after which they would go back to back.
        let t0 = Instant::now();
        let mut q = unpaced(t0, 3, 3);
        for (n, u) in [(1, 0.1), (2, 0.5), (3, 0.9)] {
            q.enqueue(t0, vip(n), 1, 50, CROWD, u);
        }
        let mut starts = Vec::new();
        let mut now = t0;
        while starts.len() < 3 {
            match q.next(now) {
                Next::Start(s) => starts.push((s.vip, now - t0)),
                Next::At(t) => now = t,
                Next::Idle => panic!("all three should start"),
            }
        }
        let at: Vec<Duration> = starts.iter().map(|(_, d)| *d).collect();
        assert_eq!(at, [ms(20), ms(100), ms(180)]);
    }

    #[tokio::test(start_paused = true)]
    async fn equal_priorities_go_first_come_first_served() {
        let t0 = Instant::now();
        let mut q = InitiationQueue::new(
            PacingSettings {
                burst: 10,
                concurrency: 10,
                ..settings()
            },
            t0,
        );
        for n in [7, 3, 5] {
            q.enqueue(t0, vip(n), 2, 50, CROWD, 0.0);
        }
        assert_eq!(drain(&mut q, t0), [7, 3, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn later_attempts_are_not_jittered() {
        let t0 = Instant::now();
        let mut q = InitiationQueue::new(settings(), t0);
        q.enqueue(t0, vip(1), 2, 50, CROWD, 0.99);
        assert_eq!(drain(&mut q, t0), [1]);
        // A first attempt with jitter off starts at once too.
        let mut q = InitiationQueue::new(
            PacingSettings {
                jitter: Duration::ZERO,
                ..settings()
            },
            t0,
        );
        q.enqueue(t0, vip(1), 1, 50, CROWD, 0.99);
        assert_eq!(drain(&mut q, t0), [1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_window_is_not_reused() {
        let t0 = Instant::now();
        let mut q = InitiationQueue::new(settings(), t0);
        q.enqueue(t0, vip(1), 1, 50, CROWD, 0.5);
        tokio::time::advance(ms(200)).await;
        let t1 = Instant::now();
        assert_eq!(drain(&mut q, t1), [1]);
        q.enqueue(t1, vip(2), 1, 50, CROWD, 0.25);
        assert_eq!(q.next(t1), Next::At(t1 + ms(50)));
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut q = InitiationQueue::new(
            PacingSettings {
                concurrency: 100,
                ..settings()
            },
            t0,
        );
        for n in 1..=5 {
            q.enqueue(t0, vip(n), 2, 50, CROWD, 0.0);
        }
        assert_eq!(drain(&mut q, t0), [1, 2]);
        // 10 per second: the next token in 100 ms.
        assert_eq!(q.next(t0), Next::At(t0 + ms(100)));
        tokio::time::advance(ms(100)).await;
        assert_eq!(drain(&mut q, Instant::now()), [3]);
        // Idle time refills no more than the burst.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(drain(&mut q, Instant::now()), [4, 5]);
        assert_eq!(q.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limits_initiations_in_flight() {
        let t0 = Instant::now();
        let mut q = unpaced(t0, 2, 3);
        for n in 1..=4 {
            q.enqueue(t0, vip(n), 2, 50, CROWD, 0.0);
        }
        assert_eq!(drain(&mut q, t0), [1, 2]);
        assert_eq!(q.next(t0), Next::Idle);
        assert_eq!(q.in_flight(), 2);
        // Slow answers keep the limit where it cannot fall lower than one.
        q.finished(t0, Answer::Failed, 0.0);
        assert_eq!(q.limit(), 1);
        assert!(drain(&mut q, t0).is_empty());
        q.finished(t0, Answer::Failed, 0.0);
        assert_eq!(drain(&mut q, t0), [3]);
        q.finished(t0, Answer::Failed, 0.0);
        assert_eq!(drain(&mut q, t0), [4]);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_pause_with_nothing_in_flight_the_limit_starts_again_from_concurrency() {
        let t0 = Instant::now();
        let mut q = unpaced(t0, 1, 8);
        q.enqueue(t0, vip(1), 2, 50, CROWD, 0.0);
        assert_eq!(drain(&mut q, t0), [1]);
        for _ in 0..3 {
            q.finished(t0, Answer::Quick, 0.0);
        }
        assert_eq!(q.limit(), 4);
        // Still busy a moment ago: the limit learnt holds.
        let soon = t0 + RESTART_AFTER_IDLE / 2;
        for n in 2..=3 {
            q.enqueue(soon, vip(n), 2, 50, CROWD, 0.0);
        }
        assert_eq!(drain(&mut q, soon), [2, 3]);
        q.finished(soon, Answer::Quick, 0.0);
        q.finished(soon, Answer::Quick, 0.0);
        assert_eq!(q.limit(), 6);
        // The next move, later: one at a time again, growing with the answers.
        let later = soon + RESTART_AFTER_IDLE;
        for n in 4..=9 {
            q.enqueue(later, vip(n), 2, 50, CROWD, 0.0);
        }
        assert_eq!(q.limit(), 1);
        assert_eq!(drain(&mut q, later), [4]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_grows_while_answers_come_quickly_and_halves_when_they_do_not() {
        let t0 = Instant::now();
        let mut q = unpaced(t0, 1, 4);
        for n in 1..=9 {
            q.enqueue(t0, vip(n), 2, 50, CROWD, 0.0);
        }
        assert_eq!(drain(&mut q, t0), [1]);
        q.finished(t0, Answer::Quick, 0.0);
        assert_eq!(drain(&mut q, t0), [2, 3], "room for one more");
        q.finished(t0, Answer::Quick, 0.0);
        q.finished(t0, Answer::Quick, 0.0);
        assert_eq!(q.limit(), 4, "never beyond max_concurrency");
        assert_eq!(drain(&mut q, t0), [4, 5, 6, 7]);
        // The responder slows down: half as many.
        q.finished(t0, Answer::Failed, 0.0);
        assert_eq!(q.limit(), 2);
        assert!(drain(&mut q, t0).is_empty(), "three still in flight");
        q.finished(t0, Answer::Failed, 0.0);
        q.finished(t0, Answer::Quick, 0.0);
        assert_eq!(q.limit(), 2);
        assert_eq!(drain(&mut q, t0), [8]);
    }

    /// The 1x100 crash run that recovered 9 s late: two attempts waited for charon's
    /// retransmission of a COOKIE retry whose answer it lost, one given up for it, and
    /// each was taken for a slow responder; the limit fell to one while both still held
    /// a slot, and no other VIP started for 4 s.
    #[tokio::test(start_paused = true)]
    async fn an_answer_lost_by_this_nodes_daemon_leaves_the_limit_as_it_was() {
        let t0 = Instant::now();
        let mut q = unpaced(t0, 3, 3);
        for n in 1..=6 {
            q.enqueue(t0, vip(n), 2, 50, CROWD, 0.0);
        }
        assert_eq!(drain(&mut q, t0), [1, 2, 3]);
        q.finished(t0, Answer::LostHere, 0.0);
        assert_eq!(q.limit(), 3);
        assert_eq!(drain(&mut q, t0), [4], "the freed slot is used at once");
        q.finished(t0, Answer::LostHere, 0.0);
        q.finished(t0, Answer::LostHere, 0.0);
        assert_eq!(q.limit(), 3);
        assert_eq!(q.pause(), Duration::ZERO);
        assert_eq!(drain(&mut q, t0), [5, 6]);
    }

    /// Three attempts in flight stuck on lost answers and one given up before: five
    /// half-open on the responder with another, which then ignored this node for 30 s.
    #[tokio::test(start_paused = true)]
    async fn an_attempt_given_up_for_a_lost_answer_holds_a_slot_while_it_is_half_open() {
        let t0 = Instant::now();
        let mut q = unpaced(t0, 3, 3);
        for n in 1..=8 {
            q.enqueue(t0, vip(n), 2, 50, CROWD, 0.0);
        }
        assert_eq!(drain(&mut q, t0), [1, 2, 3]);
        q.finished(t0, Answer::GivenUp, 0.0);
        assert_eq!(q.limit(), 3, "says nothing about the responder's load");
        assert_eq!(q.next(t0), Next::At(t0 + RESPONDER_HALF_OPEN));
        // Its half-open IKE_SA ends on the responder: the slot is back.
        let later = t0 + RESPONDER_HALF_OPEN;
        assert_eq!(drain(&mut q, later), [4]);
        // With one in flight allowed, one still goes: never a stall for the whole timeout.
        let mut q = unpaced(t0, 1, 1);
        for n in 1..=3 {
            q.enqueue(t0, vip(n), 2, 50, CROWD, 0.0);
        }
        assert_eq!(drain(&mut q, t0), [1]);
        q.finished(t0, Answer::GivenUp, 0.0);
        assert_eq!(drain(&mut q, t0), [2]);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_that_keep_failing_at_one_in_flight_pause_starts_until_news_or_quick_answers() {
        let t0 = Instant::now();
        let quick = settings().quick;
        let mut q = unpaced(t0, 1, 3);
        for n in 1..=6 {
            q.enqueue(t0, vip(n), 2, 50, CROWD, 0.0);
        }
        assert_eq!(drain(&mut q, t0), [1]);
        // Timeouts with one in flight: the first few are what a peer that is gone costs,
        // with no pause ...
        for _ in 1..FAILURES_BEFORE_PAUSE {
            q.finished(t0, Answer::Failed, 1.0);
            assert_eq!(q.pause(), Duration::ZERO);
        }
        // ... then the next start waits within a pause that doubles with every further
        // one, up to MAX_PAUSE.
        q.finished(t0, Answer::Failed, 1.0);
        assert_eq!(q.pause(), quick);
        assert_eq!(q.next(t0), Next::At(t0 + quick));
        let t1 = t0 + quick;
        assert_eq!(drain(&mut q, t1), [2]);
        q.finished(t1, Answer::Failed, 0.5);
        assert_eq!(q.pause(), quick * 2);
        assert_eq!(q.next(t1), Next::At(t1 + quick));
        for _ in 0..20 {
            q.finished(t1, Answer::Failed, 0.0);
        }
        assert_eq!(q.pause(), MAX_PAUSE);
        // Quick answers shrink it away.
        let t2 = t1 + MAX_PAUSE;
        assert_eq!(drain(&mut q, t2), [3]);
        q.finished(t2, Answer::Quick, 0.0);
        assert_eq!(q.pause(), MAX_PAUSE / 2);
        // The quick answer made room for two; a failure first halves that again, and the
        // count of failures in a row starts over.
        q.finished(t2, Answer::Failed, 1.0);
        assert_eq!((q.limit(), q.pause()), (1, MAX_PAUSE / 2));
        for _ in 1..FAILURES_BEFORE_PAUSE {
            q.finished(t2, Answer::Failed, 1.0);
        }
        assert_eq!(q.pause(), MAX_PAUSE / 2);
        q.finished(t2, Answer::Failed, 1.0);
        assert_eq!(q.next(t2), Next::At(t2 + MAX_PAUSE));
        // A slow answer is an answer: the responder gets through, so the pause shrinks.
        q.finished(t2, Answer::Slow, 0.0);
        assert_eq!((q.limit(), q.pause()), (1, MAX_PAUSE / 2));
        q.finished(t2, Answer::Failed, 1.0);
        assert_eq!(
            q.pause(),
            MAX_PAUSE / 2,
            "the count of failures starts over"
        );
        // News of a new owner: what timed out was aimed at the old one.
        q.owner_changed();
        assert_eq!(q.pause(), Duration::ZERO);
        assert_eq!(drain(&mut q, t2), [4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_or_replaced_initiation_leaves_the_queue() {
        let t0 = Instant::now();
        let mut q = InitiationQueue::new(settings(), t0);
        q.enqueue(t0, vip(1), 1, 50, CROWD, 0.5);
        q.enqueue(t0, vip(2), 1, 50, CROWD, 0.5);
        let gone = q.cancel(vip(1)).expect("queued");
        assert_eq!((gone.vip, gone.attempt), (vip(1), 1));
        assert_eq!(q.cancel(vip(1)), None);
        let replaced = q.enqueue(t0, vip(2), 2, 50, CROWD, 0.0).expect("replaced");
        assert_eq!(replaced.attempt, 1);
        assert_eq!(q.queued(), 1);
        // The new attempt is not jittered: it starts at once.
        let Next::Start(s) = q.next(t0) else {
            panic!("attempt 2 should start")
        };
        assert_eq!((s.vip, s.attempt), (vip(2), 2));
        assert_eq!(q.next(t0), Next::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_overtakes_first_attempts_still_in_their_window() {
        let t0 = Instant::now();
        let mut q = InitiationQueue::new(settings(), t0);
        q.enqueue(t0, vip(1), 1, 100, CROWD, 0.5);
        q.enqueue(t0, vip(2), 3, 0, CROWD, 0.0);
        assert_eq!(drain(&mut q, t0), [2]);
        tokio::time::advance(ms(100)).await;
        assert_eq!(drain(&mut q, Instant::now()), [1]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_ended_unanswered_has_its_queued_packets_forgotten() {
        let Harness {
            pacer,
            keying,
            holder,
            mut started,
            mut rx,
            ..
        } = harness(
            "node = \"fe\"\n\
             [failover.reconnect]\njitter = \"0s\"\n\
             [[peer_vip]]\naddress = \"192.0.2.100\"\nconnection = \"a\"\n\
             [[peer_vip]]\naddress = \"192.0.2.104\"\nconnection = \"b\"\n",
            Default::default(),
        );
        pacer.initiate(vip(100), 1, 0, 1, false);
        assert_eq!(started.recv().await, Some(vip(100)));
        keying.gate.add_permits(1);
        assert_eq!(finished(&mut rx).await, (vip(100), 1, Ok(())));
        assert!(holder.forgotten().is_empty(), "an answered attempt");
        pacer.initiate(UNANSWERED, 1, 0, 1, false);
        assert_eq!(started.recv().await, Some(UNANSWERED));
        keying.gate.add_permits(1);
        let (v, _, result) = finished(&mut rx).await;
        assert_eq!(v, UNANSWERED);
        assert!(result.is_err());
        // Before the core hears of it, so before a next attempt could be decided.
        assert_eq!(holder.forgotten(), vec![UNANSWERED]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_the_core_gave_up_for_a_newer_one_ends_unless_it_completes_at_once() {
        let Harness {
            pacer,
            keying,
            mut started,
            mut rx,
            ..
        } = harness(
            "node = \"fe\"\n\
             [failover.reconnect]\njitter = \"0s\"\nconcurrency = 1\n\
             [[peer_vip]]\naddress = \"192.0.2.100\"\nconnection = \"a\"\n",
            Default::default(),
        );
        // Attempt 1 hangs (its answer lost); news of a new holder asks for attempt 2.
        pacer.initiate(vip(100), 1, 0, 1, false);
        assert_eq!(started.recv().await, Some(vip(100)));
        let asked = Instant::now();
        pacer.initiate(vip(100), 2, 0, 1, false);
        // Without the end, attempt 1 would wait for an answer that never comes.
        let (v, attempt, result) = tokio::time::timeout(Duration::from_secs(10), finished(&mut rx))
            .await
            .expect("attempt 1 ended");
        assert_eq!((v, attempt), (vip(100), 1));
        assert_eq!(result, Err("ended for a newer attempt".to_string()));
        assert_eq!(asked.elapsed(), SUPERSEDED_GRACE);
        assert_eq!(*keying.drops.lock().unwrap(), vec![vip(100)]);
        // Its slot is free for attempt 2, which starts at once.
        assert_eq!(started.recv().await, Some(vip(100)));
        assert_eq!(asked.elapsed(), SUPERSEDED_GRACE);
        keying.gate.add_permits(1);
        assert_eq!(finished(&mut rx).await, (vip(100), 2, Ok(())));

        // One that completes within the grace is not ended.
        pacer.initiate(vip(100), 3, 0, 1, false);
        assert_eq!(started.recv().await, Some(vip(100)));
        pacer.initiate(vip(100), 4, 0, 1, false);
        tokio::time::sleep(SUPERSEDED_GRACE / 2).await;
        keying.gate.add_permits(1);
        assert_eq!(finished(&mut rx).await, (vip(100), 3, Ok(())));
        assert_eq!(keying.drops.lock().unwrap().len(), 1, "no second drop");
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_up_only_after_its_daemon_lost_an_answer_does_not_cut_the_limit() {
        let Harness {
            pacer,
            keying,
            mut started,
            mut rx,
            ..
        } = harness(
            "node = \"fe\"\n\
             [failover.reconnect]\njitter = \"0s\"\nconcurrency = 2\nmax_concurrency = 2\n\
             [[peer_vip]]\naddress = \"192.0.2.105\"\nconnection = \"a\"\n\
             [[peer_vip]]\naddress = \"192.0.2.101\"\nconnection = \"b\"\n\
             [[peer_vip]]\naddress = \"192.0.2.102\"\nconnection = \"c\"\n",
            Default::default(),
        );
        pacer.initiate(LOST_HERE, 1, 0, 1, false);
        pacer.initiate(vip(101), 1, 0, 1, false);
        pacer.initiate(vip(102), 1, 0, 1, false);
        assert_eq!(started.recv().await, Some(LOST_HERE));
        assert_eq!(started.recv().await, Some(vip(101)));
        // charon's retransmission, 4 s on: far slower than `quick`, but not the responder's.
        tokio::time::sleep(Duration::from_secs(4)).await;
        keying.gate.add_permits(1);
        assert_eq!(finished(&mut rx).await, (LOST_HERE, 1, Ok(())));
        // Taken for a slow answer, the limit would fall to the one slot 101 still holds.
        let next = tokio::time::timeout(Duration::from_secs(1), started.recv()).await;
        assert_eq!(next, Ok(Some(vip(102))), "102 waited behind 101");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_initiation_frees_its_slot_when_the_core_sees_the_vip_covered() {
        use crate::runtime::knowledge::Knowledge;
        let (set, reader) = KnowledgeReader::settable(Knowledge::default());
        let Harness {
            pacer,
            keying,
            mut started,
            mut rx,
            ..
        } = harness_reading(
            "node = \"fe\"\n\
             [failover.reconnect]\njitter = \"0s\"\nconcurrency = 1\nmax_concurrency = 1\n\
             [[peer_vip]]\naddress = \"192.0.2.100\"\nconnection = \"a\"\n\
             [[peer_vip]]\naddress = \"192.0.2.101\"\nconnection = \"b\"\n\
             [[peer_vip]]\naddress = \"192.0.2.102\"\nconnection = \"c\"\n",
            reader,
        );
        let wait = Duration::from_secs(1);
        for n in [100, 101, 102] {
            pacer.initiate(vip(n), 1, 0, 1, false);
        }
        assert_eq!(started.recv().await, Some(vip(100)));
        // Its CHILD_SA's event reached the core; charon has not answered the initiate yet.
        tokio::time::sleep(Duration::from_millis(10)).await;
        set.send_replace(Knowledge::default().with_covered(vip(100), 0, "be2"));
        let next = tokio::time::timeout(wait, started.recv()).await;
        assert_eq!(
            next,
            Ok(Some(vip(101))),
            "101 waited for charon's answer to 100"
        );
        // A slow one keeps its slot until its answer says why it was slow.
        tokio::time::sleep(Duration::from_secs(1)).await;
        set.send_modify(|k| *k = k.clone().with_covered(vip(101), 0, "be2"));
        let next = tokio::time::timeout(wait, started.recv()).await;
        assert!(next.is_err(), "102 started before 101's answer: {next:?}");
        keying.gate.add_permits(2);
        assert_eq!(finished(&mut rx).await, (vip(100), 1, Ok(())));
        assert_eq!(finished(&mut rx).await, (vip(101), 1, Ok(())));
        assert_eq!(started.recv().await, Some(vip(102)));
    }
}
