//! etcd ownership registry: one key per VIP under this node's lease, epochs fenced by
//! transactions, a watch that feeds the core, and recovery from outages and lost leases.
//!
//! A VIP is taken only when vacant (no live record) or already ours: while another node's
//! record stands, under a lease that node keeps alive, the VIP is that node's, whatever
//! the kernel of this node says (the split-brain guard). A crashed owner's record goes
//! with its lease, so `lease_ttl` bounds how long a crash holds up a takeover.
//!
//! Fencing: every acquisition is one transaction that compares the epoch key's
//! `mod_revision` with what the writer read and writes epoch + 1 to both keys. A writer
//! acting on an old view (a paused or partitioned former owner) fails its compare and gets
//! `StoreError::Fenced`; it can never overwrite a newer owner.

pub mod connect;
mod feed;
mod keepalive;
pub mod keys;
mod lease;
mod liveness;
mod moves;
mod policies;
mod records;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::Client;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::connect::ConnectSettings;
pub use self::keys::KeyLayout;
use self::lease::{Intents, Pending};
use super::{OwnershipStore, PendingWrite, StoreError};
use crate::InputSink;
use crate::config::Config;
use crate::model::{Vip, VipOwner};
use crate::timeline::{MoveTimeline, NodeMarks};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Kept short: a watch that lost its member must be back on another within an election.
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// What a writer saw of a VIP's epoch before deciding to take it; the write succeeds only
/// if nobody wrote an epoch since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochMark {
    /// Highest epoch known for the VIP (0 when it never had an owner).
    pub epoch: u64,
    /// `mod_revision` of the epoch key (0 when it does not exist).
    pub mod_revision: i64,
}

/// A VIP's records read at one revision.
struct VipView {
    owner: Option<(VipOwner, KvMeta)>,
    mark: EpochMark,
}

#[derive(Debug, Clone, Copy)]
struct KvMeta {
    mod_revision: i64,
    lease: i64,
}

/// Why a watch session ended without an error.
enum SessionEnd {
    Cancelled,
    SinkClosed,
    /// The watch fell behind a compaction: take a fresh snapshot.
    Resync,
}

pub struct EtcdStore {
    node: String,
    keys: KeyLayout,
    lease_ttl: Duration,
    timeout: Duration,
    /// How long a watch may stay quiet before its member is asked (`liveness`).
    quiet: Duration,
    settings: ConnectSettings,
    client: tokio::sync::Mutex<Option<Client>>,
    /// What this node wants of each VIP's records: held (with the VIP's lease), being
    /// released, being marked draining.
    intents: Mutex<Intents>,
    /// Serialises lease grants per VIP (two callers of one VIP must share its lease); VIPs
    /// are granted side by side: one after another, the 100 VIPs of a node took 0.5 s.
    granting: Mutex<HashMap<Vip, Arc<tokio::sync::Mutex<()>>>>,
    /// Each lease's keep-alive stream, open between renewals.
    keepalives: keepalive::KeepAlives,
    /// Wakes the lease loop when there is new work for it.
    wake: tokio::sync::Notify,
    /// The member (index into the endpoints) requests go to.
    member: AtomicUsize,
    /// The cached client belongs to a member left behind (set when it could not be
    /// dropped at once).
    stale_client: AtomicBool,
    /// The day-long lease move marks are written under, and when it was granted.
    moves_lease: tokio::sync::Mutex<Option<(i64, std::time::Instant)>>,
}

fn clone_result(r: &Result<(), StoreError>) -> Result<(), StoreError> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(StoreError::Other(e.to_string())),
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

impl EtcdStore {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let s = &config.store;
        Ok(EtcdStore {
            node: config.node.clone(),
            keys: KeyLayout::new(&s.prefix),
            lease_ttl: s.lease_ttl,
            timeout: s.request_timeout,
            quiet: s.keepalive_interval,
            settings: ConnectSettings::from_config(s)?,
            client: tokio::sync::Mutex::new(None),
            intents: Mutex::new(Intents::default()),
            granting: Mutex::default(),
            keepalives: keepalive::KeepAlives::default(),
            wake: tokio::sync::Notify::new(),
            member: AtomicUsize::new(0),
            stale_client: AtomicBool::new(false),
            moves_lease: tokio::sync::Mutex::new(None),
        })
    }

    async fn client(&self) -> Result<Client, StoreError> {
        let mut slot = self.client.lock().await;
        if self.stale_client.swap(false, Ordering::Relaxed) {
            *slot = None;
        }
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let member = self.member.load(Ordering::Relaxed);
        match self.settings.connect_member(member).await {
            Ok(c) => {
                *slot = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                drop(slot);
                self.next_member(member);
                Err(StoreError::Unavailable(e))
            }
        }
    }

    pub(super) fn member_now(&self) -> usize {
        self.member.load(Ordering::Relaxed)
    }

    /// Moves to the next member after a failure on `member`; many requests failing at
    /// once on the same member move only once.
    pub(super) fn next_member(&self, member: usize) {
        let n = self.settings.endpoint_count().max(1);
        if self
            .member
            .compare_exchange(
                member,
                (member + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            if let Ok(mut slot) = self.client.try_lock() {
                *slot = None;
            } else {
                self.stale_client.store(true, Ordering::Relaxed);
            }
            if n > 1 {
                tracing::info!(
                    from = %self.settings.member_name(member),
                    to = %self.settings.member_name(member + 1),
                    "moving to the next store member"
                );
            }
        }
    }

    /// Stops holding a VIP: no more renewals, no restoring; returns its lease.
    fn forget(&self, vip: Vip) -> Option<i64> {
        let mut intents = self.intents();
        intents.draining.remove(&vip);
        let lease = intents.held.remove(&vip).and_then(|h| h.lease);
        if let Some(id) = lease {
            self.keepalives.forget(id);
        }
        lease
    }

    /// After a failure on `member`: drops the cached client so the next call connects
    /// (and authenticates) afresh, to the next member unless a request already moved on.
    async fn reset_client(&self, member: usize) {
        self.next_member(member);
        *self.client.lock().await = None;
    }

    /// Runs one request under the configured timeout.
    async fn timed<T, E: std::fmt::Display>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, StoreError> {
        let member = self.member.load(Ordering::Relaxed);
        let r = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => Err(unavailable(what, self.settings.scrub(&e.to_string()))),
            Err(_) => Err(unavailable(
                what,
                format!("no answer within {:?}", self.timeout),
            )),
        };
        self.next_member(member);
        r
    }
}

#[async_trait]
impl OwnershipStore for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn describe(&self) -> String {
        self.settings.describe()
    }

    async fn run(&self, sink: InputSink, cancel: CancellationToken) {
        let leases = async {
            self.keep_leases(cancel.clone())
                .instrument(tracing::info_span!("leases"))
                .await
        };
        tokio::join!(self.follow(sink, cancel.clone()), leases);
    }

    async fn publish(&self, vip: Vip) -> Result<VipOwner, StoreError> {
        {
            let mut intents = self.intents();
            intents.held.entry(vip).or_default().claims = true;
            // Back here before a release took effect: the record to keep is the new one.
            // The old lease is left to expire; publishing re-attaches a record under it.
            intents.releasing.remove(&vip);
            intents.draining.remove(&vip);
        }
        let r = self.publish_with(vip).await;
        if matches!(r, Err(StoreError::Fenced { .. }))
            && let Some(h) = self.intents().held.get_mut(&vip)
        {
            // Another node holds the VIP (a live record under its lease): the split-brain
            // guard waits for that record to go; never fight it, now or later. The VIP is
            // still here, so the holder mark stays: the owner of record learns of it.
            h.claims = false;
        }
        // The holder mark is written by the lease loop, off the path front-ends wait on.
        self.wake.notify_one();
        r
    }

    async fn take_over(&self, vip: Vip, from: &VipOwner) -> Result<VipOwner, StoreError> {
        {
            let mut intents = self.intents();
            intents.held.entry(vip).or_default().claims = true;
            intents.releasing.remove(&vip);
            intents.draining.remove(&vip);
        }
        let r = self.take_over_with(vip, from).await;
        if r.is_err()
            && let Some(h) = self.intents().held.get_mut(&vip)
        {
            // Lost to a change of the record: the split-brain guard decides again on it.
            h.claims = false;
        }
        self.wake.notify_one();
        r
    }

    async fn current(&self, vip: Vip) -> Result<(Option<VipOwner>, u64), StoreError> {
        let client = self.client().await?;
        let view = self.view(&client, vip).await?;
        Ok((view.owner.map(|(o, _)| o), view.mark.epoch))
    }

    async fn mark_draining(&self, vip: Vip) -> Result<(), StoreError> {
        self.intents()
            .draining
            .entry(vip)
            .or_insert_with(|| Pending::new(None));
        let r = self.mark_own_draining(vip).await;
        self.settle(vip, clone_result(&r), false);
        r
    }

    async fn withdraw(&self, vip: Vip) -> Result<(), StoreError> {
        // From now on the VIP's lease is not renewed: even if every attempt below fails,
        // the record goes by itself within the lease's TTL.
        let lease = self.forget(vip);
        self.intents()
            .releasing
            .entry(vip)
            .and_modify(|p| p.lease = p.lease.or(lease))
            .or_insert_with(|| Pending::new(lease));
        let lease = self.intents().releasing.get(&vip).and_then(|p| p.lease);
        let r = match self.client().await {
            Ok(client) => self.release_once(&client, vip, lease).await,
            Err(e) => Err(e),
        };
        self.settle(vip, clone_result(&r), true);
        self.wake.notify_one();
        r
    }

    fn pending_writes(&self) -> Vec<PendingWrite> {
        self.pending()
    }

    fn note_followers(&self, vip: Vip, followers: u32) {
        let mut intents = self.intents();
        if let Some(h) = intents.held.get_mut(&vip)
            && h.followers != followers
        {
            h.followers = followers;
            // The lease loop writes the mark again, off every path a move waits on, and
            // not during the recovery that changed the count.
            h.mark_followers(std::time::Instant::now());
            drop(intents);
            self.wake.notify_one();
        }
    }

    async fn publish_marks(&self, marks: &NodeMarks) -> Result<(), StoreError> {
        self.put_marks(std::slice::from_ref(marks)).await
    }

    async fn publish_marks_batch(&self, batch: &[NodeMarks]) -> Result<(), StoreError> {
        self.put_marks(batch).await
    }

    async fn move_timelines(
        &self,
        moves: &[(Vip, u64)],
    ) -> Result<Vec<Option<MoveTimeline>>, StoreError> {
        self.get_move_batch(moves).await
    }

    async fn moves(&self, vip: Option<Vip>) -> Result<Vec<MoveTimeline>, StoreError> {
        self.get_moves(vip).await
    }
    async fn move_timeline(
        &self,
        vip: Vip,
        epoch: u64,
    ) -> Result<Option<MoveTimeline>, StoreError> {
        self.get_move(vip, epoch).await
    }
}
