//! strongSwan charon over its VICI socket (rsvici).
//!
//! Connections: `run` holds one for the event subscription and one for its own listings
//! (a command on the event connection can stall behind events), the trait's commands share
//! a third, and every `initiate` opens its own so a slow initiation never holds up a drop
//! or a listing. charon answers one command at a time per connection.
//!
//! charon 5.9.8 semantics relied on (vici_control.c, controller.c):
//! - `terminate` with `timeout = -1` returns at once; without `force` it queues an IKE
//!   DELETE (retransmitted by charon until the peer answers), with `force = yes` it sends
//!   the DELETE once and destroys the IKE_SA before answering, whatever the peer does.
//! - `initiate` with `timeout = N` answers when the CHILD_SA is installed, or with
//!   "... not established after Nms" (the IKE_SA keeps trying in the background).

mod cadence;
pub mod connection;
pub mod loader;
pub mod messages;
pub mod sa_set;
pub mod services;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::time::Instant as TokioInstant;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use self::cadence::Cadence;
use self::connection::ViciConn;
use self::messages::{
    ChildRekeyPair, ControlLog, IkeRekeyPair, IkeSaMsg, InitiateRequest, ListSasRequest,
    SaEventMsg, TerminateRequest,
};
use self::sa_set::{SaEvent, SaSet};
use super::{DropCandidate, Initiated, Keying, KeyingError, SpareSa};
use crate::InputSink;
use crate::config::Config;
use crate::failover::Input;
use crate::model::{IkeSaInfo, LoadedConnection, PeerConnection, TrafficCounters, Vip, VipRole};
use crate::policy::{ConnectionSpec, SecretKey};

/// Upper bound for a listing or a terminate; charon answers these in milliseconds, so a
/// charon that does not is treated as gone.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a graceful delete waits for peers to answer their DELETE before the IKE_SAs
/// still there are destroyed without waiting. Cluster peers answer within milliseconds;
/// one that has not after this is gone (or never knew the SA, like the far end of a
/// half-open IKE_SA it gave up on), and a planned move should not wait for it.
const DELETE_GRACE: Duration = Duration::from_millis(250);
/// How often a graceful delete looks whether the peers have answered: soon at first (a
/// live peer answers within a round trip), then less often.
const DELETE_POLL_FIRST: Duration = Duration::from_millis(2);
const DELETE_POLL_MAX: Duration = Duration::from_millis(20);
/// Extra time over charon's own initiate timeout before we stop waiting for its answer.
const INITIATE_MARGIN: Duration = Duration::from_secs(1);
/// How long an initiate charon never answered waits for the end of its IKE_SA: charon is
/// too busy to be waited for, and the initiation's pacer slot is held meanwhile.
const UNANSWERED_TERMINATE: Duration = Duration::from_secs(1);
/// charon's first retransmission of a request (`charon.retransmit_timeout`, 4 s by
/// default) and a margin for its answer: how long an attempt the responder answered is
/// followed after its initiate timed out.
const FIRST_RETRANSMIT_ANSWERED: Duration = Duration::from_millis(4500);
/// How many attempts whose COOKIE retry went unanswered this node gives up for a fresh one
/// per `RESPONDER_HALF_OPEN` (see `CookieRetry::awaits_retry_answer`): each may leave one half-open
/// IKE_SA on the responder for that long, and from `charon.cookie_threshold_ip` (3) of
/// them the responder asks for COOKIEs, from `block_threshold` (5) ignores this node.
const LOST_ANSWERS_GIVEN_UP: usize = 1;
/// charon's `half_open_timeout` default.
const RESPONDER_HALF_OPEN: Duration = Duration::from_secs(30);
/// Events charon raises that change which SAs are up.
const EVENTS: [&str; 4] = ["ike-updown", "child-updown", "ike-rekey", "child-rekey"];

pub struct StrongswanKeying {
    socket: PathBuf,
    hosted: Vec<Vip>,
    peers: Vec<Vip>,
    sample_interval: Duration,
    /// See `cadence`.
    calm_sample_interval: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    /// The connection the trait's commands share (one command at a time).
    commands: tokio::sync::Mutex<Option<ViciConn>>,
    /// A connection of its own for `ListSas`: an operator's query must not wait behind
    /// a delete or an initiation (seconds each), nor hold them up.
    queries: tokio::sync::Mutex<Option<ViciConn>>,
    /// The last listing on `queries` and when it started.
    last_listing: std::sync::Mutex<Option<(Instant, Vec<IkeSaInfo>)>>,
    /// IKE_SAs of initiates under way whose IKE_SA_INIT the responder answered (with its
    /// own or with a COOKIE), as their control logs say: the responder probably holds state
    /// for them (after a COOKIE, once the retry reached it) even when charon lost its
    /// answer (listed, such an IKE_SA shows no responder SPI). Kept until the initiate
    /// returns.
    answered: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// When attempts with a lost answer were given up (`LOST_ANSWERS_GIVEN_UP`).
    lost_given_up: std::sync::Mutex<std::collections::VecDeque<Instant>>,
}

impl StrongswanKeying {
    pub fn new(config: &Config) -> Self {
        StrongswanKeying {
            socket: config.keying.vici_socket.clone(),
            hosted: config.hosted_addresses(),
            peers: config.peer_addresses(),
            sample_interval: config.keying.sample_interval,
            calm_sample_interval: config.calm_sample_interval(),
            reconnect_min: config.keying.reconnect_min,
            reconnect_max: config.keying.reconnect_max,
            commands: tokio::sync::Mutex::new(None),
            queries: tokio::sync::Mutex::new(None),
            last_listing: std::sync::Mutex::new(None),
            answered: Default::default(),
            lost_given_up: Default::default(),
        }
    }

    /// Runs `op` on the shared command connection, (re)connecting first if needed and
    /// discarding the connection after a failure that leaves it unusable.
    async fn on_commands<R>(
        &self,
        op: impl AsyncFnOnce(&mut ViciConn) -> Result<R, KeyingError>,
    ) -> Result<R, KeyingError> {
        self.on_conn(&self.commands, op).await
    }

    async fn on_conn<R>(
        &self,
        slot: &tokio::sync::Mutex<Option<ViciConn>>,
        op: impl AsyncFnOnce(&mut ViciConn) -> Result<R, KeyingError>,
    ) -> Result<R, KeyingError> {
        let mut guard = slot.lock().await;
        if guard.as_ref().is_some_and(|c| c.lost().is_some()) {
            *guard = None;
        }
        if guard.is_none() {
            *guard = Some(ViciConn::connect(&self.socket).await?);
        }
        let conn = guard.as_mut().expect("connected above");
        let res = op(conn).await;
        if matches!(
            res,
            Err(KeyingError::Unreachable(_) | KeyingError::Timeout { .. })
        ) {
            *guard = None;
        }
        res
    }

    /// Terminates one IKE_SA; "no matching SAs" (already gone) counts as done.
    async fn terminate(&self, ike_id: u64, force: bool) -> Result<(), KeyingError> {
        self.terminate_within(ike_id, force, COMMAND_TIMEOUT).await
    }

    /// [`Self::terminate`], waiting at most `wait` for charon's answer.
    async fn terminate_within(
        &self,
        ike_id: u64,
        force: bool,
        wait: Duration,
    ) -> Result<(), KeyingError> {
        let req = TerminateRequest {
            ike_id,
            force,
            timeout: -1,
        };
        let res = self
            .on_commands(async |c| c.command("terminate", req, wait).await)
            .await;
        match res {
            Err(KeyingError::Refused { reason, .. }) if reason.contains("no matching SAs") => {
                Ok(())
            }
            Err(KeyingError::Refused { command, reason }) => Err(KeyingError::Refused {
                command: format!("{command} IKE_SA #{ike_id}"),
                reason,
            }),
            other => other.map(|_| ()),
        }
    }

    /// One session: subscribe, report the inventory, then follow events and sample until
    /// the socket is lost (returns why) or `cancel` fires (returns None). An error before
    /// the inventory was sent means charon could not be reached.
    async fn session(
        &self,
        sink: &InputSink,
        cancel: &CancellationToken,
    ) -> Result<Option<String>, KeyingError> {
        let mut event_conn = ViciConn::connect(&self.socket).await?;
        let mut loss = event_conn.loss_signal();
        let mut events = subscribe_all(&mut event_conn);
        // Polling once sends the registrations before the inventory is taken, so an SA
        // coming up in between is reported by an event (or the next sample).
        let mut early: VecDeque<_> = events.next().now_or_never().flatten().into_iter().collect();

        let mut sampler = ViciConn::connect(&self.socket).await?;
        let listing = list_all(&mut sampler).await?;
        let mut sas = SaSet::new(self.hosted.clone(), self.peers.clone());
        let established = sas.reset(&listing);
        tracing::info!(
            socket = %self.socket.display(),
            ike_sas = listing.len(),
            established = established.len(),
            "connected to charon"
        );
        if sink.send(Input::KeyingUp { established }).await.is_err() {
            return Ok(None);
        }

        let mut cadence = Cadence::new(self.sample_interval, self.calm_sample_interval);
        let next_sample = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(next_sample);
        let sampling = !self.peers.is_empty();
        loop {
            let item = if let Some(item) = early.pop_front() {
                Some(item)
            } else {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(None),
                    why = connection::lost_reason(&mut loss) => return Ok(Some(why)),
                    item = events.next() => item,
                    _ = &mut next_sample, if sampling => {
                        // Timed from the end of this sample, as the interval it replaces
                        // delayed a missed tick.
                        match self.sample_and_send(&mut sampler, &mut sas, &mut cadence, sink).await {
                            Ok(wait) => next_sample.as_mut().reset(tokio::time::Instant::now() + wait),
                            Err(end) => return Ok(end),
                        }
                        continue;
                    }
                }
            };
            match item {
                Some(Ok(evs)) => {
                    for ev in evs {
                        tracing::debug!(event = ?ev, "charon event");
                        for i in sas.apply(ev) {
                            if sink.send(i).await.is_err() {
                                return Ok(None);
                            }
                        }
                    }
                }
                Some(Err(e)) if undecodable(&e) => {
                    // An event this agent cannot decode (a charon newer than it knows,
                    // a field out of range) says nothing about charon's health: skip it
                    // without reporting the daemon down. rsvici ends that subscription,
                    // so subscribe afresh, then list the SAs so whatever the event
                    // carried is picked up from charon's own inventory.
                    tracing::warn!(error = %e, "skipped a charon event that could not be decoded; subscribing again");
                    event_conn = ViciConn::connect(&self.socket).await?;
                    loss = event_conn.loss_signal();
                    events = subscribe_all(&mut event_conn);
                    early.extend(events.next().now_or_never().flatten());
                    match self
                        .sample_and_send(&mut sampler, &mut sas, &mut cadence, sink)
                        .await
                    {
                        Ok(wait) => next_sample
                            .as_mut()
                            .reset(tokio::time::Instant::now() + wait),
                        Err(end) => return Ok(end),
                    }
                }
                Some(Err(e)) => {
                    // rsvici ends a subscription at its first error; without it we would
                    // silently miss SA changes, so start over.
                    return Ok(Some(format!("event subscription failed: {e}")));
                }
                None => return Ok(Some("event subscriptions ended".into())),
            }
        }
    }

    /// One sample, its inputs sent to the core; returns the wait until the next one, or
    /// (`Err`) what the session returns: `None` when the core is gone, why charon is lost.
    async fn sample_and_send(
        &self,
        conn: &mut ViciConn,
        sas: &mut SaSet,
        cadence: &mut Cadence,
        sink: &InputSink,
    ) -> Result<Duration, Option<String>> {
        match self.sample(conn, sas, cadence).await {
            Ok((inputs, wait)) => {
                for i in inputs {
                    if sink.send(i).await.is_err() {
                        return Err(None);
                    }
                }
                Ok(wait)
            }
            Err(e @ (KeyingError::Unreachable(_) | KeyingError::Timeout { .. })) => {
                Err(Some(e.to_string()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "sampling SAs failed");
                Ok(self.sample_interval)
            }
        }
    }

    /// One sample: a single list-sas, reconciled into the SA set, and the summed counters
    /// of every peer VIP's CHILD_SAs; with the wait until the next sample.
    async fn sample(
        &self,
        conn: &mut ViciConn,
        sas: &mut SaSet,
        cadence: &mut Cadence,
    ) -> Result<(Vec<Input>, Duration), KeyingError> {
        let started = Instant::now();
        let listing = list_all(conn).await?;
        tracing::trace!(ike_sas = listing.len(), took = ?started.elapsed(), "sampled SAs");
        let mut inputs = sas.reconcile(&listing);
        let mut sums: BTreeMap<Vip, TrafficCounters> = self
            .peers
            .iter()
            .map(|v| (*v, TrafficCounters::default()))
            .collect();
        for sa in &listing {
            if let Some((vip, VipRole::Peer)) = sa.vip_role(&[], &self.peers)
                && let Some(sum) = sums.get_mut(&vip)
            {
                let c = sa.counters();
                sum.bytes_in += c.bytes_in;
                sum.bytes_out += c.bytes_out;
                sum.packets_in += c.packets_in;
                sum.packets_out += c.packets_out;
            }
        }
        let wait = cadence.after(&sums);
        inputs.extend(
            sums.into_iter()
                .map(|(vip, counters)| Input::CountersSampled { vip, counters }),
        );
        Ok((inputs, wait))
    }
}

#[async_trait]
impl Keying for StrongswanKeying {
    fn kind(&self) -> &'static str {
        "strongswan"
    }

    async fn run(&self, sink: InputSink, cancel: CancellationToken) {
        let mut backoff = self.reconnect_min;
        let mut down_reported = false;
        loop {
            let session = tokio::select! {
                // Also covers a connect or first listing that is slow to fail.
                _ = cancel.cancelled() => return,
                s = self.session(&sink, &cancel) => s,
            };
            let detail = match session {
                Ok(None) => return,
                Ok(Some(why)) => {
                    // The session had reported KeyingUp: this is a new outage.
                    backoff = self.reconnect_min;
                    down_reported = false;
                    why
                }
                Err(e) => e.to_string(),
            };
            if !down_reported {
                tracing::warn!(socket = %self.socket.display(), detail = %detail, "charon unreachable");
                if sink.send(Input::KeyingDown { detail }).await.is_err() {
                    return;
                }
                down_reported = true;
            } else {
                tracing::debug!(detail = %detail, retry_in = ?backoff, "charon still unreachable");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = backoff.saturating_mul(2).min(self.reconnect_max);
        }
    }

    async fn list_sas(&self) -> Result<Vec<IkeSaInfo>, KeyingError> {
        let asked = Instant::now();
        self.on_conn(&self.queries, async |c| {
            // Callers that waited for the connection while a listing ran share the next
            // one: it started after each of them asked, so it shows every SA they could
            // mean. A drain of 100 VIPs at once (each listing, then polling for its
            // peers' answers) otherwise lists every SA hundreds of times, one after
            // another on this one connection: 2 s per VIP in the 1x100 bench.
            if let Some((started, sas)) =
                &*self.last_listing.lock().unwrap_or_else(|e| e.into_inner())
                && *started >= asked
            {
                return Ok(sas.clone());
            }
            let started = Instant::now();
            let sas = list_all(c).await?;
            *self.last_listing.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((started, sas.clone()));
            Ok(sas)
        })
        .await
    }

    async fn delete_sas(&self, vip: Vip, role: VipRole) -> Result<u32, KeyingError> {
        let matches = |sa: &IkeSaInfo| match role {
            VipRole::Hosted => sa.vip_role(&[vip], &[]).is_some(),
            VipRole::Peer => sa.vip_role(&[], &[vip]).is_some(),
        };
        let targets: Vec<u64> = self
            .list_sas()
            .await?
            .iter()
            .filter(|sa| matches(sa))
            .map(|sa| sa.unique_id)
            .collect();
        if targets.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        // Queue a DELETE on every IKE_SA at once, so peers answer in parallel ...
        for id in &targets {
            self.terminate(*id, false).await?;
        }
        // ... wait a little for their answers ...
        let mut left: Vec<u64> = targets.clone();
        let mut poll = DELETE_POLL_FIRST;
        while !left.is_empty() && started.elapsed() < DELETE_GRACE {
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(DELETE_POLL_MAX);
            let listing = self.list_sas().await?;
            left.retain(|id| listing.iter().any(|sa| sa.unique_id == *id));
        }
        // ... and destroy what a silent peer keeps alive.
        for id in &left {
            self.terminate(*id, true).await?;
        }
        tracing::info!(
            %vip,
            role = ?role,
            deleted = targets.len(),
            unanswered = left.len(),
            took = ?started.elapsed(),
            "deleted SAs"
        );
        Ok(targets.len() as u32)
    }

    async fn drop_sas(&self, vip: Vip, spare: &SpareSa<'_>) -> Result<u32, KeyingError> {
        let started = Instant::now();
        // Any state: a half-open IKE_SA still retrying toward a dead peer goes too.
        let targets: Vec<(DropCandidate, bool)> = self
            .list_sas()
            .await?
            .iter()
            .filter(|sa| sa.vip_role(&[], &[vip]).is_some())
            .map(|sa| {
                let c = DropCandidate {
                    ike_id: sa.unique_id,
                    answered: init_answered(sa),
                };
                (c, sa.initiator && sa.state == "CONNECTING")
            })
            .collect();
        let mut dropped = 0;
        let mut spared = Vec::new();
        for (mut c, half_open) in targets {
            // Asked again at the decision, not from the listing: an attempt listed before
            // its answer may have had it since (the listing waits for IKE_SAs busy in other
            // threads: tens of ms under load) and sent its IKE_AUTH. Destroyed, it stays
            // half-open on the responder, or the responder completes it alone and keeps a
            // CHILD_SA this node never learns of (the 20-front-end crash bench lost 1.5 s
            // to one); an answer to a COOKIE retry that charon lost shows in no listing.
            c.answered |= half_open && self.answered_now(c.ike_id);
            if spare(c) {
                spared.push(c.ike_id);
                continue;
            }
            self.terminate(c.ike_id, true).await?;
            dropped += 1;
        }
        tracing::info!(%vip, dropped, ?spared, took = ?started.elapsed(), "dropped SAs");
        Ok(dropped)
    }

    async fn terminate_sa(&self, ike_id: crate::model::IkeId) -> Result<(), KeyingError> {
        self.terminate(ike_id, false).await
    }

    async fn load_connection(&self, spec: &ConnectionSpec) -> Result<(), KeyingError> {
        let started = Instant::now();
        self.on_commands(async |c| loader::load_conn(c, spec).await)
            .await?;
        tracing::info!(connection = %spec.name, took = ?started.elapsed(), "connection loaded");
        Ok(())
    }

    async fn unload_connection(&self, name: &str) -> Result<(), KeyingError> {
        self.on_commands(async |c| loader::unload_conn(c, name).await)
            .await?;
        tracing::info!(connection = %name, "connection unloaded");
        Ok(())
    }

    async fn load_psk(&self, key: &SecretKey) -> Result<(), KeyingError> {
        self.on_commands(async |c| loader::load_shared(c, key).await)
            .await?;
        tracing::info!(
            id = crate::policy::PSK_ID,
            bytes = key.len(),
            "shared key loaded"
        );
        Ok(())
    }

    async fn list_connections(&self) -> Result<Vec<LoadedConnection>, KeyingError> {
        self.on_commands(async |c| loader::list_conns(c).await)
            .await
    }

    async fn load_private_key(&self, key: &SecretKey) -> Result<(), KeyingError> {
        self.on_commands(async |c| loader::load_key(c, key).await)
            .await?;
        tracing::info!(bytes = key.len(), "private key loaded");
        Ok(())
    }

    async fn key_exchange_methods(&self) -> Result<Vec<String>, KeyingError> {
        self.on_commands(async |c| loader::key_exchange_methods(c).await)
            .await
    }

    async fn initiate(
        &self,
        vip: Vip,
        conn: &PeerConnection,
        timeout: Duration,
    ) -> Result<Initiated, KeyingError> {
        let command = format!("initiate {}/{}", conn.connection, conn.child);
        let started = Instant::now();
        // How many initiations charon gets at once is the reconnect pacer's decision
        // (`failover.reconnect.concurrency`, runtime::pacing): each holds one of charon's
        // worker threads until its CHILD_SA is up.
        let left = timeout.max(Duration::from_millis(1));
        let mut vici = ViciConn::connect(&self.socket).await?;
        let req = InitiateRequest {
            child: &conn.child,
            ike: &conn.connection,
            timeout: left.as_millis().max(1) as i64,
            init_limits: false,
            loglevel: 1,
        };
        // Whatever the outcome, and also when this future is dropped, the attempt is over
        // for the drops once this returns.
        let mut forget = ForgetAnswered {
            set: &self.answered,
            id: None,
        };
        // When the answer to a COOKIE retry counts as lost (see `CookieRetry`).
        let (lost_at_tx, mut lost_at) = tokio::sync::watch::channel(None::<TokioInstant>);
        let mut cookie = CookieRetry::default();
        let mut initiate = Box::pin(vici.stream_request_keep::<_, ControlLog>(
            "initiate",
            "control-log",
            req,
            left + INITIATE_MARGIN,
            |line| {
                let due = cookie.saw(&line.msg, TokioInstant::now());
                lost_at_tx.send_if_modified(|at| std::mem::replace(at, due) != due);
                let line = std::slice::from_ref(line);
                if let Some(id) = initiated_ike_sa(line)
                    && forget.id.is_none()
                {
                    forget.id = Some(id);
                }
                if let Some(id) = forget.id
                    && responder_answered(line)
                {
                    forget
                        .set
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id);
                }
            },
        ));
        // Once the budget said no, the attempt is followed to its end as before.
        let mut followed = false;
        let outcome = loop {
            let at = (*lost_at.borrow_and_update()).filter(|_| !followed);
            tokio::select! {
                // An answer already read wins over a deadline passing at the same time.
                biased;
                done = &mut initiate => break Some(done),
                // The sender lives as long as the initiate: this only wakes on news.
                _ = lost_at.changed() => {}
                _ = tokio::time::sleep_until(at.unwrap_or_else(TokioInstant::now)), if at.is_some() => {
                    if self.may_give_up_lost_answer() {
                        break None;
                    }
                    followed = true;
                }
            }
        };
        drop(initiate);
        let Some((log, res)) = outcome else {
            // Given up before charon's own timeout: the retry's answer is long overdue.
            let ike_sa = forget.id;
            if let Some(id) = ike_sa {
                // The answer may have come just now: one whose IKE_AUTH is on its way is
                // followed (ended now, the responder would complete it alone).
                if self.completes_late(id, conn, Duration::ZERO).await {
                    tracing::info!(%vip, connection = %conn.connection, ike_sa = id, took = ?started.elapsed(), "CHILD_SA up after its COOKIE retry's answer was overdue");
                    return Ok(Initiated::AfterLostAnswer);
                }
            }
            tracing::info!(%vip, connection = %conn.connection, ike_sa = ?ike_sa, took = ?started.elapsed(), "no answer to the COOKIE retry (charon 5.9.8 drops one that comes back at once): a fresh attempt instead of charon's retransmission");
            if let Some(id) = ike_sa
                && let Err(e) = self.terminate(id, true).await
            {
                tracing::debug!(%vip, ike_sa = id, error = %e, "cannot end the IKE_SA whose COOKIE retry went unanswered");
            }
            return Err(KeyingError::AnswerLost { command });
        };
        let took = started.elapsed();
        match res {
            // Followed past the point where the retry's answer counted as lost: charon's
            // retransmission brought it up.
            Ok(()) if followed => {
                tracing::info!(%vip, connection = %conn.connection, ?took, "CHILD_SA up through charon's retransmission of a COOKIE retry");
                Ok(Initiated::AfterLostAnswer)
            }
            Ok(()) => {
                tracing::info!(%vip, connection = %conn.connection, ?took, "CHILD_SA up");
                Ok(Initiated::Answered)
            }
            Err(KeyingError::Refused { reason, .. })
                if reason.contains("not established after") =>
            {
                // charon goes on with the IKE_SA after the command's timeout, and a
                // responder under load completes it a moment later: a retry now would
                // build a second IKE_SA beside it (the storm lab counted 1240 for 60
                // flows). Follow this one for up to one more timeout first.
                let ike_sa = initiated_ike_sa(&log);
                // A responder that answered holds the IKE_SA half-open until it completes
                // or for `charon.half_open_timeout` (30 s), and from
                // `charon.block_threshold` (5) half-open ones from this node's address on it
                // ignores every IKE_SA_INIT from here. charon 5.9.8 loses the answer to its
                // retry after a COOKIE when it comes back at once (as it does from a quick
                // responder) and only retransmits 4 s later: ended before that, each such
                // attempt left one more half-open IKE_SA, and the 1x100 bench lost 30 s to
                // the responder's block. Followed through the retransmission, it completes.
                // Only the retry's answer lost is worth less: charon sits on it until its
                // retransmission while a fresh attempt takes one more exchange, so one
                // such attempt per half-open timeout is given up (what it may leave
                // half-open on the responder stays below the thresholds).
                let lost = cookie.awaits_retry_answer() && self.may_give_up_lost_answer();
                let grace = if lost {
                    tracing::info!(%vip, connection = %conn.connection, ike_sa = ?ike_sa, ?took, "no answer to the COOKIE retry (charon 5.9.8 drops one that comes back at once): a fresh attempt instead of charon's retransmission");
                    Duration::ZERO
                } else if responder_answered(&log) {
                    timeout.max(FIRST_RETRANSMIT_ANSWERED.saturating_sub(took))
                } else {
                    timeout
                };
                if let Some(id) = ike_sa
                    && self.completes_late(id, conn, grace).await
                {
                    tracing::info!(%vip, connection = %conn.connection, ike_sa = id, took = ?started.elapsed(), "CHILD_SA up after the initiate timed out");
                    return Ok(if cookie.awaits_retry_answer() {
                        Initiated::AfterLostAnswer
                    } else {
                        Initiated::Answered
                    });
                }
                if let Some(id) = ike_sa {
                    // Given up: left alone, charon would go on retransmitting it and might
                    // complete it beside the next attempt's (a drop spares half-open
                    // IKE_SAs whose IKE_SA_INIT was answered).
                    if let Err(e) = self.terminate(id, true).await {
                        tracing::debug!(%vip, ike_sa = id, error = %e, "cannot end the timed-out IKE_SA");
                    }
                }
                tracing::info!(%vip, connection = %conn.connection, ?took, "initiate timed out");
                Err(if lost {
                    KeyingError::AnswerLost { command }
                } else {
                    KeyingError::Timeout {
                        command,
                        after: timeout,
                    }
                })
            }
            Err(KeyingError::Refused { reason, .. }) => {
                let detail = last_log_lines(&log, 3);
                let reason = if detail.is_empty() {
                    reason
                } else {
                    format!("{reason} ({detail})")
                };
                tracing::info!(%vip, connection = %conn.connection, ?took, %reason, "initiate failed");
                Err(KeyingError::Refused { command, reason })
            }
            Err(KeyingError::Timeout { .. }) => {
                // charon did not even report its own timeout: too busy to be waited for
                // again, but the IKE_SA it started would go on retransmitting and hold a
                // half-open slot on the responder (`cookie_threshold_ip`), so it ends.
                if let Some(id) = initiated_ike_sa(&log)
                    && let Err(e) = self.terminate_within(id, true, UNANSWERED_TERMINATE).await
                {
                    tracing::debug!(%vip, ike_sa = id, error = %e, "cannot end the IKE_SA of an unanswered initiate");
                }
                tracing::info!(%vip, connection = %conn.connection, ?took, "charon did not answer the initiate");
                Err(KeyingError::Timeout {
                    command,
                    after: timeout,
                })
            }
            Err(e @ (KeyingError::Unreachable(_) | KeyingError::AnswerLost { .. })) => Err(e),
        }
    }
}

/// A half-open IKE_SA this node initiated whose IKE_SA_INIT was answered (the responder's
/// SPI is known): its IKE_AUTH is on the way.
fn init_answered(sa: &IkeSaInfo) -> bool {
    sa.initiator
        && sa.state == "CONNECTING"
        && !sa.responder_spi.is_empty()
        && sa.responder_spi.bytes().any(|b| b != b'0')
}

/// Whether the responder answered the initiate's IKE_SA_INIT (with its own or with a
/// COOKIE, after which the retry carrying it left): it holds state for the IKE_SA now.
fn responder_answered(log: &[ControlLog]) -> bool {
    log.iter().any(|l| {
        l.msg
            .trim_start()
            .starts_with("parsed IKE_SA_INIT response")
    })
}

/// The shortest wait for the answer to a COOKIE retry before it counts as lost: the
/// COOKIE costs the responder nothing, the real answer a Diffie-Hellman and a worker
/// thread under the very load that made it ask for COOKIEs (the lab's storms: 15-50 ms).
const LOST_RETRY_MIN: Duration = Duration::from_millis(500);
/// The answer to the retry is waited for this many times as long as the COOKIE took.
const LOST_RETRY_FACTOR: u32 = 4;

/// Follows an initiate's control log, line by line as charon sends it, for a COOKIE retry
/// whose answer is overdue: the responder answered the first IKE_SA_INIT (with the
/// COOKIE) within some time, and answers the retry within about as long (it is as busy as
/// a moment before). Waiting for charon's own timeout (`keying.initiate_timeout`, 2 s in
/// large set-ups) held the pacer's slot and the VIP's flows that long for nothing: charon
/// 5.9.8 does not retransmit before `retransmit_timeout` (4 s) anyway.
#[derive(Debug, Default)]
struct CookieRetry {
    /// When the last IKE_SA_INIT request left.
    sent: Option<TokioInstant>,
    /// How long the responder took to ask for a COOKIE.
    asked_within: Option<Duration>,
    /// When the answer to the retry counts as lost.
    lost_at: Option<TokioInstant>,
}

impl CookieRetry {
    /// Takes one control-log line seen at `now`; returns when the retry's answer counts
    /// as lost, if one is awaited.
    fn saw(&mut self, msg: &str, now: TokioInstant) -> Option<TokioInstant> {
        let m = msg.trim_start();
        if m.starts_with("generating IKE_SA_INIT request") {
            if m.contains("N(COOKIE)") {
                let asked_within = self.asked_within.unwrap_or_default();
                self.lost_at = Some(now + LOST_RETRY_MIN.max(asked_within * LOST_RETRY_FACTOR));
            }
            self.sent = Some(now);
        } else if m.starts_with("parsed IKE_SA_INIT response") {
            if m.contains("N(COOKIE)") {
                self.asked_within = self.sent.map(|s| now.saturating_duration_since(s));
            }
            self.lost_at = None;
        }
        self.lost_at
    }

    /// Whether the last IKE_SA_INIT was the retry after a COOKIE and nothing answered it.
    /// After charon's own timeout the answer was most likely lost to charon 5.9.8's race
    /// ("ignoring request with ID 0, already processing" in its MGR log, when the answer
    /// beats the initiator's thread checking the IKE_SA back in): a responder answers
    /// within milliseconds, and charon only retransmits after
    /// `charon.retransmit_timeout` (4 s).
    fn awaits_retry_answer(&self) -> bool {
        self.lost_at.is_some()
    }
}

/// The unique id of the IKE_SA an initiate started, from charon's "initiating IKE_SA
/// name[id] to host" control-log line.
fn initiated_ike_sa(log: &[ControlLog]) -> Option<u64> {
    log.iter().find_map(|l| {
        let rest = l.msg.trim().strip_prefix("initiating IKE_SA ")?;
        let (_, after) = rest.split_once('[')?;
        after.split_once(']')?.0.parse().ok()
    })
}

/// Takes an initiate's IKE_SA out of `StrongswanKeying::answered` when dropped.
struct ForgetAnswered<'a> {
    set: &'a std::sync::Mutex<std::collections::HashSet<u64>>,
    id: Option<u64>,
}

impl Drop for ForgetAnswered<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.set
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }
}

impl StrongswanKeying {
    /// Takes one of the `LOST_ANSWERS_GIVEN_UP` per `RESPONDER_HALF_OPEN`, if one is left.
    fn may_give_up_lost_answer(&self) -> bool {
        let now = Instant::now();
        let mut given_up = self.lost_given_up.lock().unwrap_or_else(|e| e.into_inner());
        while given_up
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= RESPONDER_HALF_OPEN)
        {
            given_up.pop_front();
        }
        if given_up.len() < LOST_ANSWERS_GIVEN_UP {
            given_up.push_back(now);
            true
        } else {
            false
        }
    }

    /// Whether an initiate under way says the responder answered IKE_SA `id`.
    fn answered_now(&self, id: u64) -> bool {
        self.answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
    }

    /// Whether IKE_SA `id` brings the connection's CHILD_SA up within `grace`; false as
    /// soon as the IKE_SA is gone (charon gave up on it) or charon cannot be asked. One in
    /// its IKE_AUTH at the deadline gets `INITIATE_MARGIN` more, once: destroyed there, the
    /// responder would complete it alone.
    async fn completes_late(&self, id: u64, conn: &PeerConnection, grace: Duration) -> bool {
        let mut deadline = Instant::now() + grace;
        let mut extended = false;
        let mut poll = LATE_POLL;
        loop {
            let Ok(sas) = self.list_sas().await else {
                return false;
            };
            let Some(sa) = sas.iter().find(|s| s.unique_id == id) else {
                return false;
            };
            if sa.is_established()
                && sa
                    .children
                    .iter()
                    .any(|c| c.name == conn.child && c.state == "INSTALLED")
            {
                return true;
            }
            if Instant::now() >= deadline {
                if extended || !init_answered(sa) {
                    return false;
                }
                extended = true;
                deadline += INITIATE_MARGIN;
            }
            // Each poll lists every SA: from 50 ms, doubling to 400 ms.
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(poll.min(left)).await;
            poll = (poll * 2).min(LATE_POLL_MAX);
        }
    }
}

/// How often a timed-out initiation is looked at while it may still complete.
const LATE_POLL: Duration = Duration::from_millis(50);
const LATE_POLL_MAX: Duration = Duration::from_millis(400);

/// The last `n` control-log lines, for an error message.
fn last_log_lines(log: &[ControlLog], n: usize) -> String {
    let start = log.len().saturating_sub(n);
    log[start..]
        .iter()
        .map(|l| l.msg.trim())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every IKE_SA charon holds (one list-sas, streamed as list-sa events).
async fn list_all(conn: &mut ViciConn) -> Result<Vec<IkeSaInfo>, KeyingError> {
    let events: Vec<BTreeMap<String, IkeSaMsg>> = conn
        .stream_request(
            "list-sas",
            "list-sa",
            ListSasRequest::default(),
            COMMAND_TIMEOUT,
        )
        .await?;
    Ok(events
        .into_iter()
        .flat_map(messages::list_sa_event_to_infos)
        .collect())
}

type EventItem = Result<Vec<SaEvent>, rsvici::Error>;

/// Subscribes to the SA events, merged into one stream of `SaEvent`s.
/// Whether an event failed to decode (as opposed to the socket failing). rsvici hands
/// event errors through its I/O layer, so a decoding error may arrive as an I/O error
/// of kind `InvalidData`.
fn undecodable(e: &rsvici::Error) -> bool {
    e.is_data()
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
}

fn subscribe_all(
    conn: &mut ViciConn,
) -> futures::stream::SelectAll<futures::stream::BoxStream<'static, EventItem>> {
    let [ike_updown, child_updown, ike_rekey, child_rekey] = EVENTS;
    let ike_updown = conn
        .subscribe::<SaEventMsg<IkeSaMsg>>(ike_updown)
        .map(|r| r.map(|m| updown_events(m, false)));
    let child_updown = conn
        .subscribe::<SaEventMsg<IkeSaMsg>>(child_updown)
        .map(|r| r.map(|m| updown_events(m, true)));
    let ike_rekey = conn
        .subscribe::<SaEventMsg<IkeRekeyPair>>(ike_rekey)
        .map(|r| r.map(ike_rekey_events));
    let child_rekey = conn
        .subscribe::<SaEventMsg<IkeSaMsg<ChildRekeyPair>>>(child_rekey)
        .map(|r| r.map(child_rekey_events));
    futures::stream::select_all([
        ike_updown.boxed(),
        child_updown.boxed(),
        ike_rekey.boxed(),
        child_rekey.boxed(),
    ])
}

pub fn updown_events(m: SaEventMsg<IkeSaMsg>, child: bool) -> Vec<SaEvent> {
    m.sas
        .into_iter()
        .map(|(name, sa)| {
            let info = sa.to_info(&name);
            match (child, m.up) {
                (false, true) => SaEvent::IkeUp(info),
                (false, false) => SaEvent::IkeDown(info),
                (true, true) => SaEvent::ChildUp(info),
                (true, false) => SaEvent::ChildDown(info),
            }
        })
        .collect()
}

pub fn ike_rekey_events(m: SaEventMsg<IkeRekeyPair>) -> Vec<SaEvent> {
    m.sas
        .into_iter()
        .map(|(name, pair)| SaEvent::IkeRekey {
            old: Box::new(pair.old.to_info(&name)),
            new: Box::new(pair.new.to_info(&name)),
        })
        .collect()
}

pub fn child_rekey_events(m: SaEventMsg<IkeSaMsg<ChildRekeyPair>>) -> Vec<SaEvent> {
    let mut out = Vec::new();
    for (name, sa) in m.sas {
        let ike = sa.to_info_with(&name, Vec::new());
        for pair in sa.child_sas.values() {
            out.push(SaEvent::ChildRekey {
                ike: ike.clone(),
                old_child: pair.old.uniqueid,
                new_child: pair.new.uniqueid,
                // The replacement is installed when charon reports the rekey; only a
                // replacement already on its way out does not count.
                new_installed: !matches!(
                    pair.new.state.as_str(),
                    "DELETING" | "DELETED" | "DESTROYING" | "FAILED"
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updown_event_with_up_flag_and_named_section() {
        // serde_json drives the same visitor the VICI deserializer does.
        let m: SaEventMsg<IkeSaMsg> = serde_json::from_str(
            r#"{"up": true, "vip": {"uniqueid": 7, "state": "ESTABLISHED",
                "local-host": "192.0.2.1", "remote-host": "192.0.2.100",
                "child-sas": {"vip-3": {"name": "vip", "uniqueid": 3, "state": "INSTALLED"}}}}"#,
        )
        .unwrap();
        let evs = updown_events(m, true);
        let SaEvent::ChildUp(sa) = &evs[0] else {
            panic!("{evs:?}")
        };
        assert_eq!(sa.unique_id, 7);
        assert_eq!(sa.name, "vip");
        assert_eq!(sa.children[0].unique_id, 3);

        let m: SaEventMsg<IkeSaMsg> =
            serde_json::from_str(r#"{"vip": {"uniqueid": 7, "state": "DELETING"}}"#).unwrap();
        assert!(matches!(&updown_events(m, false)[0], SaEvent::IkeDown(sa) if sa.unique_id == 7));
    }

    #[test]
    fn rekey_events_name_old_and_new() {
        let m: SaEventMsg<IkeRekeyPair> = serde_json::from_str(
            r#"{"vip": {"old": {"uniqueid": 1}, "new": {"uniqueid": 2, "state": "ESTABLISHED"}}}"#,
        )
        .unwrap();
        assert!(matches!(
            &ike_rekey_events(m)[0],
            SaEvent::IkeRekey { old, new } if old.unique_id == 1 && new.unique_id == 2
        ));
        let m: SaEventMsg<IkeSaMsg<ChildRekeyPair>> = serde_json::from_str(
            r#"{"vip": {"uniqueid": 4, "child-sas": {"vip": {
                "old": {"uniqueid": 5, "state": "REKEYED"},
                "new": {"uniqueid": 6, "state": "INSTALLED"}}}}}"#,
        )
        .unwrap();
        assert_eq!(
            child_rekey_events(m),
            vec![SaEvent::ChildRekey {
                ike: IkeSaInfo {
                    name: "vip".into(),
                    unique_id: 4,
                    ..Default::default()
                },
                old_child: 5,
                new_child: 6,
                new_installed: true,
            }]
        );
    }

    #[test]
    fn last_log_lines_keeps_the_tail() {
        let log: Vec<ControlLog> = ["a", "b", "c", "d"]
            .iter()
            .map(|m| ControlLog {
                msg: m.to_string(),
                ..Default::default()
            })
            .collect();
        assert_eq!(last_log_lines(&log, 2), "c; d");
        assert_eq!(last_log_lines(&[], 2), "");
    }

    #[test]
    fn the_initiated_ike_sa_is_read_from_charons_log() {
        let log: Vec<ControlLog> = [
            "looking for peer configs matching ...",
            "initiating IKE_SA vipsec-lab-192-0-2-100[17] to 192.0.2.100",
            "generating IKE_SA_INIT request 0 [ SA KE No N(NATD_S_IP) ]",
        ]
        .iter()
        .map(|m| ControlLog {
            msg: m.to_string(),
            ..Default::default()
        })
        .collect();
        assert_eq!(initiated_ike_sa(&log), Some(17));
        assert_eq!(initiated_ike_sa(&log[..1]), None);
    }

    #[test]
    fn a_cookie_retry_left_unanswered_is_told_from_one_answered() {
        let log: Vec<ControlLog> = [
            "initiating IKE_SA vip100[4] to 192.0.2.100",
            "generating IKE_SA_INIT request 0 [ SA KE No N(NATD_S_IP) ]",
            "parsed IKE_SA_INIT response 0 [ N(COOKIE) ]",
            "initiating IKE_SA vip100[4] to 192.0.2.100",
            "generating IKE_SA_INIT request 0 [ N(COOKIE) SA KE No N(NATD_S_IP) ]",
            "sending packet: from 192.0.2.11[500] to 192.0.2.100[500] (924 bytes)",
            "parsed IKE_SA_INIT response 0 [ SA KE No N(NATD_S_IP) ]",
        ]
        .iter()
        .map(|m| ControlLog {
            msg: m.to_string(),
            ..Default::default()
        })
        .collect();
        let after = |n: usize| {
            let mut c = CookieRetry::default();
            for l in &log[..n] {
                c.saw(&l.msg, TokioInstant::now());
            }
            c.awaits_retry_answer()
        };
        assert!(after(6), "retry sent, no answer");
        assert!(!after(log.len()), "the retry answered");
        assert!(!after(3), "no retry sent yet");
        assert!(!after(2), "no COOKIE at all");
    }

    #[test]
    fn a_cookie_retrys_answer_is_overdue_after_four_times_the_cookies_round_trip() {
        let t0 = TokioInstant::now();
        let ms = Duration::from_millis;
        let first = "generating IKE_SA_INIT request 0 [ SA KE No N(NATD_S_IP) ]";
        let asked = "parsed IKE_SA_INIT response 0 [ N(COOKIE) ]";
        let retry = "generating IKE_SA_INIT request 0 [ N(COOKIE) SA KE No N(NATD_S_IP) ]";
        let answer = "parsed IKE_SA_INIT response 0 [ SA KE No N(NATD_S_IP) ]";
        // A busy responder (the COOKIE came after 200 ms): 800 ms for the retry's answer.
        let mut c = CookieRetry::default();
        assert_eq!(c.saw(first, t0), None);
        assert_eq!(c.saw(asked, t0 + ms(200)), None);
        assert_eq!(c.saw(retry, t0 + ms(201)), Some(t0 + ms(1001)));
        assert_eq!(
            c.saw("sending packet: from 192.0.2.11[500]", t0 + ms(202)),
            Some(t0 + ms(1001))
        );
        assert_eq!(c.saw(answer, t0 + ms(230)), None, "answered");
        // A quick one: never less than 500 ms.
        let mut c = CookieRetry::default();
        c.saw(first, t0);
        c.saw(asked, t0 + ms(2));
        assert_eq!(c.saw(retry, t0 + ms(3)), Some(t0 + ms(503)));
        // A second COOKIE round is timed from the retry that drew it.
        assert_eq!(c.saw(asked, t0 + ms(153)), None);
        assert_eq!(c.saw(retry, t0 + ms(154)), Some(t0 + ms(754)));
        // No COOKIE, no wait.
        let mut c = CookieRetry::default();
        c.saw(first, t0);
        assert_eq!(c.saw(answer, t0 + ms(5)), None);
    }
}
