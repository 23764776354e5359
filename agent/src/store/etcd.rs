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
pub mod keys;
mod lease;
mod moves;
mod policies;
mod records;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::Client;
use tokio_util::sync::CancellationToken;

use self::connect::ConnectSettings;
pub use self::keys::KeyLayout;
use super::{OwnershipStore, StoreError};
use crate::InputSink;
use crate::config::Config;
use crate::model::{Vip, VipOwner};
use crate::timeline::{MoveTimeline, NodeMarks};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

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
    settings: ConnectSettings,
    client: tokio::sync::Mutex<Option<Client>>,
    /// The lease this node's records live under; the lock serialises granting.
    lease: tokio::sync::Mutex<Option<i64>>,
    /// VIPs the core asked to publish and not withdrawn: restored after a lost lease.
    published: Mutex<BTreeSet<Vip>>,
    /// The day-long lease move marks are written under, and when it was granted.
    moves_lease: tokio::sync::Mutex<Option<(i64, std::time::Instant)>>,
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
            settings: ConnectSettings::from_config(s)?,
            client: tokio::sync::Mutex::new(None),
            lease: tokio::sync::Mutex::new(None),
            published: Mutex::new(BTreeSet::new()),
            moves_lease: tokio::sync::Mutex::new(None),
        })
    }

    fn published(&self) -> std::sync::MutexGuard<'_, BTreeSet<Vip>> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn client(&self) -> Result<Client, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self
            .settings
            .connect()
            .await
            .map_err(StoreError::Unavailable)?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Drops the cached client so the next call connects (and authenticates) afresh.
    async fn reset_client(&self) {
        *self.client.lock().await = None;
    }

    /// Runs one request under the configured timeout.
    async fn timed<T, E: std::fmt::Display>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(what, self.settings.scrub(&e.to_string()))),
            Err(_) => Err(unavailable(
                what,
                format!("no answer within {:?}", self.timeout),
            )),
        }
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
        self.follow(sink, cancel).await
    }

    async fn publish(&self, vip: Vip) -> Result<VipOwner, StoreError> {
        self.published().insert(vip);
        let r = self.publish_with(vip).await;
        if matches!(r, Err(StoreError::Fenced { .. })) {
            // Another node holds the VIP (a live record under its lease): the split-brain
            // guard waits for that record to go; never fight it, now or later.
            self.published().remove(&vip);
        }
        r
    }

    async fn current(&self, vip: Vip) -> Result<(Option<VipOwner>, u64), StoreError> {
        let client = self.client().await?;
        let view = self.view(&client, vip).await?;
        Ok((view.owner.map(|(o, _)| o), view.mark.epoch))
    }

    async fn mark_draining(&self, vip: Vip) -> Result<(), StoreError> {
        self.mark_own_draining(vip).await
    }

    async fn withdraw(&self, vip: Vip) -> Result<(), StoreError> {
        self.withdraw_own(vip).await
    }

    async fn publish_marks(&self, marks: &NodeMarks) -> Result<(), StoreError> {
        self.put_marks(marks).await
    }

    async fn moves(&self, vip: Option<Vip>) -> Result<Vec<MoveTimeline>, StoreError> {
        self.get_moves(vip).await
    }
}
