//! One lease per hosted VIP, kept alive only while the VIP is this node's to hold.
//!
//! A record lives exactly as long as its lease. With one lease per VIP, losing a VIP
//! means no longer renewing that VIP's lease: even when etcd cannot be reached to delete
//! the record (a leader election, a partition), it goes by itself within `lease_ttl` of
//! the last renewal, while the records of the VIPs still here stay. A shared lease would
//! keep every lost VIP's record alive for as long as one VIP is here.
//!
//! The renewals run on their own loop (`keep_leases`), not inside the watch: a watch that
//! breaks and reconnects must not starve them. Each renewal is one keep-alive exchange
//! under `request_timeout`, sent through the balanced channel, so it reaches whichever
//! member answers. A failed one is retried within 100–500 ms instead of waiting for the
//! next period, so an election costs no lease.
//!
//! The same loop retries the writes ownership depends on until they take effect or are
//! superseded: the release of a lost VIP (revoking its lease) and the draining mark.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::Client;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;

use super::keepalive::Renewal;
use super::{EpochMark, EtcdStore, unavailable};
use crate::model::{Vip, unix_ms};
use crate::store::{PendingWrite, StoreError};

/// Retry spacing of a failed renewal or write: soon enough that an election (about a
/// second) costs no lease, slow enough not to hammer a struggling cluster.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_millis(500);

/// What the node keeps in etcd for one VIP it holds.
#[derive(Debug, Clone, Default)]
pub(super) struct Held {
    /// The lease the VIP's record lives under; granted on first publish.
    pub lease: Option<i64>,
    /// The epoch mark this node last wrote for the VIP: if the epoch key still carries
    /// it, nobody claimed the VIP since and a re-created record keeps the epoch.
    pub written: Option<EpochMark>,
    /// The node wants the owner record too (not while another node's record stands).
    pub claims: bool,
    /// The holder mark is written under the current lease, with the current `followers`.
    marked: bool,
    /// How many front-ends (IKE_SAs) this node serves for the VIP, carried in the holder
    /// mark: front-ends size their reconnect jitter by it when the VIP moves.
    pub followers: u32,
    /// A mark that only carries a new `followers` count waits until then.
    mark_not_before: Option<Instant>,
    renewed: Option<Instant>,
    retry: Retry,
}

/// A write that has not taken effect yet, retried until it does or is superseded.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    /// The lease to revoke (a release); `None` when the record's lease is unknown.
    pub lease: Option<i64>,
    pub since: Instant,
    pub attempts: u32,
    pub last_error: Option<String>,
    retry: Retry,
}

/// How long a new `followers` count waits before its holder mark is written. A recovery
/// brings many front-ends' IKE_SAs up within a fraction of a second, and writing each
/// count at once put a store write, and a watch event on every node, per IKE_SA into the
/// recovery itself; the count only sizes the jitter of the VIP's next move.
pub const FOLLOWERS_SETTLE: Duration = Duration::from_secs(1);

impl Held {
    /// The holder mark must be written again with a new `followers` count: within
    /// [`FOLLOWERS_SETTLE`], together with the counts that follow meanwhile. A mark already
    /// due for another reason (a new lease) stays due at once.
    pub fn mark_followers(&mut self, now: Instant) {
        if self.marked {
            self.marked = false;
            self.mark_not_before = Some(now + FOLLOWERS_SETTLE);
        }
    }
}

impl Pending {
    pub fn new(lease: Option<i64>) -> Pending {
        Pending {
            lease,
            since: Instant::now(),
            attempts: 0,
            last_error: None,
            retry: Retry::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Retry {
    next: Option<Instant>,
    delay: Duration,
}

impl Retry {
    fn failed(&mut self, now: Instant) {
        self.delay = (self.delay * 2).clamp(RETRY_MIN, RETRY_MAX);
        self.next = Some(now + self.delay);
    }
    fn due(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| t <= now)
    }
}

/// The store's wishes per VIP; one lock, never held across an await.
#[derive(Debug, Default)]
pub(super) struct Intents {
    /// VIPs the core asked to publish and not withdrawn.
    pub held: BTreeMap<Vip, Held>,
    /// Withdrawn VIPs whose record may still stand.
    pub releasing: BTreeMap<Vip, Pending>,
    /// Draining marks not written yet.
    pub draining: BTreeMap<Vip, Pending>,
}

enum Work {
    Renew(Vip, i64),
    MarkHolder(Vip),
    Restore(Vip),
    Release(Vip, Option<i64>),
    MarkDraining(Vip),
}

impl EtcdStore {
    pub(super) fn intents(&self) -> std::sync::MutexGuard<'_, Intents> {
        self.intents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lease of a held VIP's record, granted when it has none.
    pub(super) async fn vip_lease(&self, client: &Client, vip: Vip) -> Result<i64, StoreError> {
        let vip_lock = self
            .granting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(vip)
            .or_default()
            .clone();
        let one_at_a_time = vip_lock.lock().await;
        if let Some(id) = self.intents().held.get(&vip).and_then(|h| h.lease) {
            return Ok(id);
        }
        let ttl = self.lease_ttl.as_secs_f64().ceil().max(1.0) as i64;
        let mut c = client.clone();
        let granted = self.timed("grant lease", c.lease_grant(ttl, None)).await?;
        let id = granted.id();
        let taken = {
            let mut intents = self.intents();
            match intents.held.get_mut(&vip) {
                Some(h) => {
                    h.lease = Some(id);
                    h.marked = false;
                    h.mark_not_before = None;
                    h.renewed = Some(Instant::now());
                    h.retry = Retry::default();
                    true
                }
                None => false,
            }
        };
        if taken {
            tracing::info!(%vip, lease = id, ttl = granted.ttl(), "lease granted");
            return Ok(id);
        }
        // Withdrawn while the grant was under way: the lease carries nothing yet. Revoked
        // off the grant lock and under the request timeout: every publish waits for that
        // lock, and an unanswered revoke held it for good.
        drop(one_at_a_time);
        let _ = tokio::time::timeout(self.timeout, c.lease_revoke(id)).await;
        Err(StoreError::Other(format!(
            "{vip} was withdrawn while its lease was granted"
        )))
    }

    /// Renews leases and retries pending writes until cancelled. Every exchange runs on
    /// its own: one that waits out its timeout (a member in an election) holds up no
    /// other renewal or retry.
    pub(super) async fn keep_leases(&self, cancel: CancellationToken) {
        let mut in_flight = FuturesUnordered::new();
        loop {
            let now = Instant::now();
            let (work, next) = self.due_work(now);
            if !work.is_empty() {
                match self.client().await {
                    Ok(client) => {
                        for w in work {
                            in_flight.push(self.run_work(client.clone(), w));
                        }
                    }
                    Err(e) => self.all_failed(&work, &e.to_string()),
                }
                continue;
            }
            let wait = next.map_or(Duration::from_secs(1), |t| t.saturating_duration_since(now));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            }
        }
    }

    fn due_work(&self, now: Instant) -> (Vec<Work>, Option<Instant>) {
        let period = (self.lease_ttl / 3).max(Duration::from_millis(100));
        let intents = self.intents();
        let mut work = Vec::new();
        let mut next: Option<Instant> = None;
        let mut later = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        let due_at = |h: &Held| match (h.lease, h.retry.next, h.renewed) {
            // A lease that expired, or a renewal that failed, is retried on its own
            // schedule; a healthy one is renewed every third of the TTL
            // (sooner, in step with one that is due: `batch_until`).
            (_, Some(t), _) => Some(t),
            (Some(_), None, Some(r)) => Some(r + period),
            (Some(_), None, None) => Some(now),
            (None, None, _) => None,
        };
        let batch_until = batch_until(intents.held.values().map(due_at), now, period);
        for (vip, h) in &intents.held {
            let Some(due_at) = due_at(h) else { continue };
            let healthy = h.lease.is_some() && h.retry.next.is_none();
            if due_at <= now || (healthy && due_at <= batch_until) {
                work.push(match h.lease {
                    Some(id) => Work::Renew(*vip, id),
                    None => Work::Restore(*vip),
                });
            } else {
                later(due_at);
                if h.lease.is_some() && !h.marked {
                    match h.mark_not_before {
                        Some(t) if t > now => later(t),
                        _ => work.push(Work::MarkHolder(*vip)),
                    }
                }
            }
        }
        for (vip, p) in &intents.releasing {
            if p.retry.due(now) {
                work.push(Work::Release(*vip, p.lease));
            } else if let Some(t) = p.retry.next {
                later(t);
            }
        }
        for (vip, p) in &intents.draining {
            if p.retry.due(now) {
                work.push(Work::MarkDraining(*vip));
            } else if let Some(t) = p.retry.next {
                later(t);
            }
        }
        // Everything due is marked as in flight, so a slow answer is not sent twice.
        drop(intents);
        let mut intents = self.intents();
        let in_flight = now + self.timeout + RETRY_MAX;
        for w in &work {
            match w {
                Work::Renew(vip, _) | Work::Restore(vip) => {
                    if let Some(h) = intents.held.get_mut(vip) {
                        h.retry.next = Some(in_flight);
                    }
                }
                Work::MarkHolder(vip) => {
                    if let Some(h) = intents.held.get_mut(vip) {
                        h.marked = true;
                        h.mark_not_before = None;
                    }
                }
                Work::Release(vip, _) => {
                    if let Some(p) = intents.releasing.get_mut(vip) {
                        p.retry.next = Some(in_flight);
                        p.attempts += 1;
                    }
                }
                Work::MarkDraining(vip) => {
                    if let Some(p) = intents.draining.get_mut(vip) {
                        p.retry.next = Some(in_flight);
                        p.attempts += 1;
                    }
                }
            }
        }
        (work, next)
    }

    fn all_failed(&self, work: &[Work], error: &str) {
        let now = Instant::now();
        let mut intents = self.intents();
        for w in work {
            match w {
                Work::Renew(vip, _) | Work::Restore(vip) => {
                    if let Some(h) = intents.held.get_mut(vip) {
                        h.retry.failed(now);
                    }
                }
                Work::MarkHolder(vip) => {
                    if let Some(h) = intents.held.get_mut(vip) {
                        // Retried after the backoff (with the renewal), not at once.
                        h.marked = false;
                        h.retry.failed(now);
                    }
                }
                Work::Release(vip, _) => {
                    if let Some(p) = intents.releasing.get_mut(vip) {
                        p.retry.failed(now);
                        p.last_error = Some(error.to_string());
                    }
                }
                Work::MarkDraining(vip) => {
                    if let Some(p) = intents.draining.get_mut(vip) {
                        p.retry.failed(now);
                        p.last_error = Some(error.to_string());
                    }
                }
            }
        }
    }

    async fn run_work(&self, client: Client, work: Work) {
        let client = &client;
        match work {
            Work::Renew(vip, id) => self.renew(client, vip, id).await,
            Work::Restore(vip) => self.restore(vip).await,
            Work::MarkHolder(vip) => {
                if let Err(e) = self.put_holder(client, vip).await {
                    tracing::warn!(%vip, error = %self.settings.scrub(&e.to_string()), "holder mark not written; retrying");
                    if let Some(h) = self.intents().held.get_mut(&vip) {
                        h.marked = false;
                        h.retry.failed(Instant::now());
                    }
                }
            }
            Work::Release(vip, lease) => {
                let r = self.release_once(client, vip, lease).await;
                self.settle(vip, r, true);
            }
            Work::MarkDraining(vip) => {
                let r = self.mark_own_draining(vip).await;
                self.settle(vip, r, false);
            }
        }
    }

    /// Records the outcome of one attempt at a pending write.
    pub(super) fn settle(&self, vip: Vip, r: Result<(), StoreError>, release: bool) {
        let mut intents = self.intents();
        let pending = if release {
            &mut intents.releasing
        } else {
            &mut intents.draining
        };
        match r {
            Ok(()) => {
                if let Some(p) = pending.remove(&vip)
                    && p.attempts > 1
                {
                    tracing::info!(%vip, attempts = p.attempts, took = ?p.since.elapsed(),
                        "{} took effect after retries", if release { "withdraw" } else { "draining mark" });
                }
            }
            Err(e) => {
                if let Some(p) = pending.get_mut(&vip) {
                    p.retry.failed(Instant::now());
                    let e = self.settings.scrub(&e.to_string());
                    tracing::warn!(%vip, attempts = p.attempts, error = %e,
                        "{} failed; retrying", if release { "withdraw" } else { "draining mark" });
                    p.last_error = Some(e);
                }
            }
        }
    }

    async fn renew(&self, client: &Client, vip: Vip, id: i64) {
        let member = self.member_now();
        let r = self
            .keepalives
            .renew(client, member, id, self.timeout)
            .await;
        // The old way of renewing moved on after a timeout or a failed exchange; so does
        // this: the next renewal (and every other request) goes to the next member.
        if matches!(
            r,
            Renewal::Unanswered
                | Renewal::Failed(
                    etcd_client::Error::GRpcStatus(_)
                        | etcd_client::Error::TransportError(_)
                        | etcd_client::Error::WatchError(_)
                )
        ) {
            self.next_member(member);
        }
        let mut intents = self.intents();
        let Some(h) = intents.held.get_mut(&vip).filter(|h| h.lease == Some(id)) else {
            // Withdrawn (or replaced) meanwhile: the release owns the lease now.
            self.keepalives.forget(id);
            return;
        };
        let now = Instant::now();
        match r {
            Renewal::Renewed => {
                h.renewed = Some(now);
                h.retry = Retry::default();
            }
            Renewal::LeaseGone => {
                tracing::warn!(%vip, lease = id, "lease lost; restoring the record under a new one");
                self.keepalives.forget(id);
                h.lease = None;
                h.renewed = None;
                h.retry = Retry {
                    next: Some(now),
                    delay: Duration::ZERO,
                };
                drop(intents);
                self.wake.notify_one();
            }
            Renewal::Failed(e) => {
                h.retry.failed(now);
                let left = h.renewed.map(|r| {
                    self.lease_ttl
                        .saturating_sub(now.saturating_duration_since(r))
                });
                tracing::warn!(%vip, lease = id, error = %self.settings.scrub(&e.to_string()), ?left, "lease renewal failed; retrying");
            }
            Renewal::Unanswered => {
                h.retry.failed(now);
                tracing::warn!(%vip, lease = id, timeout = ?self.timeout, "lease renewal unanswered; retrying");
            }
        }
    }

    /// A held VIP whose lease expired: its holder mark and (unless another node's record
    /// stands) its record are put back, the record at the same epoch when nobody claimed
    /// the VIP since.
    async fn restore(&self, vip: Vip) {
        let claims = self.intents().held.get(&vip).is_some_and(|h| h.claims);
        let r = match self.client().await {
            Ok(client) => self.put_holder(&client, vip).await,
            Err(e) => Err(e),
        };
        let r = match r {
            Ok(()) if claims => self.publish_with(vip).await.map(|o| {
                tracing::info!(%vip, epoch = o.epoch, "record restored");
            }),
            other => other,
        };
        match r {
            Ok(()) => {
                if let Some(h) = self.intents().held.get_mut(&vip) {
                    h.retry = Retry::default();
                }
            }
            Err(StoreError::Fenced { owner, epoch, .. }) => {
                tracing::warn!(%vip, %owner, epoch, "VIP recorded as another node's meanwhile; not restoring the record");
                if let Some(h) = self.intents().held.get_mut(&vip) {
                    h.claims = false;
                    h.retry = Retry::default();
                }
            }
            Err(e) => {
                tracing::warn!(%vip, error = %self.settings.scrub(&e.to_string()), "record not restored yet; retrying");
                if let Some(h) = self.intents().held.get_mut(&vip) {
                    h.retry.failed(Instant::now());
                }
            }
        }
    }

    /// Marks that this node holds the VIP's address, under the VIP's lease, with how many
    /// front-ends it serves for it.
    pub(super) async fn put_holder(&self, client: &Client, vip: Vip) -> Result<(), StoreError> {
        let lease = self.vip_lease(client, vip).await?;
        let mut c = client.clone();
        let followers = self.intents().held.get(&vip).map_or(0, |h| h.followers);
        let value = super::keys::encode_holder(unix_ms(std::time::SystemTime::now()), followers);
        self.timed(
            "mark holder",
            c.put(
                self.keys.holder(vip, &self.node),
                value,
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            ),
        )
        .await
        .map(|_| ())
    }

    /// One attempt at removing a lost VIP's record: revoke its lease (which deletes the
    /// record with it), then delete any record of ours under another lease (written by a
    /// previous run of the agent).
    pub(super) async fn release_once(
        &self,
        client: &Client,
        vip: Vip,
        lease: Option<i64>,
    ) -> Result<(), StoreError> {
        if let Some(id) = lease {
            let mut c = client.clone();
            let member = self.member_now();
            // Short: a revoke is retried until it takes effect, and one sent to a member
            // mid-election should not keep the next try (to a member that has a leader
            // by then) waiting for a full request timeout. A repeated revoke is harmless.
            let wait = self.timeout.min(RETRY_MAX);
            match tokio::time::timeout(wait, c.lease_revoke(id)).await {
                Ok(Ok(_)) => tracing::info!(%vip, lease = id, "lease revoked: ownership withdrawn"),
                Ok(Err(e)) if e.to_string().contains("lease not found") => {}
                Ok(Err(e)) => {
                    self.next_member(member);
                    return Err(unavailable(
                        "revoke lease",
                        self.settings.scrub(&e.to_string()),
                    ));
                }
                Err(_) => {
                    self.next_member(member);
                    return Err(unavailable(
                        "revoke lease",
                        format!("no answer within {wait:?}"),
                    ));
                }
            }
            if let Some(p) = self.intents().releasing.get_mut(&vip) {
                p.lease = None;
            }
        }
        self.delete_own_record(client, vip).await
    }

    /// The writes that have not taken effect yet, for status.
    pub(super) fn pending(&self) -> Vec<PendingWrite> {
        let intents = self.intents();
        let now = Instant::now();
        let mut out = Vec::new();
        for (what, map) in [
            ("withdraw", &intents.releasing),
            ("mark-draining", &intents.draining),
        ] {
            for (vip, p) in map {
                out.push(PendingWrite {
                    vip: *vip,
                    write: what,
                    pending_for: now.saturating_duration_since(p.since),
                    attempts: p.attempts,
                    last_error: p.last_error.clone(),
                });
            }
        }
        out
    }
}

/// Until when healthy leases are renewed together with one that is due now: half a
/// period ahead. Renewed a little early, they fall into step, and a node with 100 VIPs
/// wakes about once a period for all of them instead of 150 times a second, one lease at
/// a time. With nothing due now, nothing is renewed early.
fn batch_until(
    dues: impl IntoIterator<Item = Option<Instant>>,
    now: Instant,
    period: Duration,
) -> Instant {
    if dues.into_iter().flatten().any(|t| t <= now) {
        now + period / 2
    } else {
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_due_soon_are_renewed_with_one_due_now_and_none_early_otherwise() {
        let now = Instant::now();
        let period = Duration::from_millis(600);
        let ms = |n| Duration::from_millis(n);
        let due = [
            Some(now - ms(1)),
            Some(now + ms(200)),
            None,
            Some(now + ms(500)),
        ];
        assert_eq!(batch_until(due, now, period), now + ms(300));
        let later = [Some(now + ms(1)), Some(now + ms(200))];
        assert_eq!(batch_until(later, now, period), now);
        assert_eq!(batch_until([None], now, period), now);
    }
}
