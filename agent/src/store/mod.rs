//! Ownership store: who holds each VIP, with leases and epochs.
//!
//! One trait, one file per implementation: `embedded` (in-process, single machine) and
//! `etcd` (cluster-wide, leases, watch, transactions).

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::InputSink;
use crate::config::{Config, StoreBackend};
use crate::model::{Vip, VipOwner};
use crate::timeline::{MoveTimeline, NodeMarks};

pub mod embedded;
pub mod etcd;
pub mod policies;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("{vip} is owned by {owner} at epoch {epoch}; refusing a stale write")]
    Fenced { vip: Vip, owner: String, epoch: u64 },
    #[error("store error: {0}")]
    Other(String),
}

/// A write ownership depends on that has not taken effect yet (the store retries it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWrite {
    pub vip: Vip,
    /// "withdraw" or "mark-draining".
    pub write: &'static str,
    pub pending_for: std::time::Duration,
    pub attempts: u32,
    pub last_error: Option<String>,
}

#[async_trait]
pub trait OwnershipStore: Send + Sync + 'static {
    /// "embedded" or "etcd", for status and metrics.
    fn kind(&self) -> &'static str;

    /// Where it points (endpoints), for status; never includes credentials.
    fn describe(&self) -> String;

    /// Feeds the core until cancelled: `StoreHealth`, an `OwnerSnapshot` (and
    /// `HoldersSnapshot`) at the first connection, then one `OwnerChanged` (or
    /// `HolderChanged`) per change. After a reconnection the changes made meanwhile
    /// follow, in order, or a snapshot when they cannot be replayed. Never returns an
    /// error: an outage is reported as `StoreHealth { healthy: false }` and retried.
    async fn run(&self, sink: InputSink, cancel: CancellationToken);

    /// Records this node as the VIP's owner if the VIP is vacant or already this node's:
    /// keeps the epoch of our own live record, otherwise writes the highest epoch seen
    /// plus one, atomically. While another node's record stands: `Fenced`.
    async fn publish(&self, vip: Vip) -> Result<VipOwner, StoreError>;

    /// Replaces another node's record `from` with this node's at the highest epoch plus
    /// one, atomically, and only while `from` still stands unchanged (the caller has
    /// evidence its node no longer holds the VIP). `Fenced` when the record changed. A
    /// store that knows no other node has nothing to take over.
    async fn take_over(&self, vip: Vip, from: &VipOwner) -> Result<VipOwner, StoreError> {
        Err(StoreError::Fenced {
            vip,
            owner: from.node.clone(),
            epoch: from.epoch,
        })
    }

    /// The VIP's live owner record and its highest epoch ever written, read fresh (an
    /// action checks it right before it acts, so a paused node acts on nothing stale).
    async fn current(&self, vip: Vip) -> Result<(Option<VipOwner>, u64), StoreError>;

    /// Marks this node's record of the VIP as draining (a planned hand-off under way), so
    /// front-ends wait for the next owner; a no-op when the record is not this node's. A
    /// failed attempt is retried until it takes effect or the VIP is withdrawn.
    async fn mark_draining(&self, vip: Vip) -> Result<(), StoreError>;

    /// Removes the VIP's record if, and only if, this node holds it. From the call on,
    /// the record is never kept alive; a failed attempt is retried by the store until
    /// the record is gone or another node's (see `pending_writes`).
    async fn withdraw(&self, vip: Vip) -> Result<(), StoreError>;

    /// Writes not yet taken effect, retried in the background.
    fn pending_writes(&self) -> Vec<PendingWrite> {
        Vec::new()
    }

    /// How many front-ends this node serves for a hosted VIP it holds: published beside
    /// the holder mark, so front-ends know how many will renegotiate at once when the VIP
    /// moves. A store with no other node has no one to tell.
    fn note_followers(&self, vip: Vip, followers: u32) {
        let _ = (vip, followers);
    }

    /// Stores this node's marks of one move (all of them: they replace the last ones
    /// published for the same move), for a day. A store without shared state keeps
    /// nothing by default.
    async fn publish_marks(&self, marks: &NodeMarks) -> Result<(), StoreError> {
        let _ = marks;
        Ok(())
    }

    /// Stores this node's marks of several moves, as [`Self::publish_marks`] does each; a
    /// store that can takes them in few round trips (a storm moves many VIPs at once).
    async fn publish_marks_batch(&self, batch: &[NodeMarks]) -> Result<(), StoreError> {
        for marks in batch {
            self.publish_marks(marks).await?;
        }
        Ok(())
    }

    /// Several moves as [`Self::move_timeline`] reads each, in the order asked; a store
    /// that can reads them in few round trips.
    async fn move_timelines(
        &self,
        moves: &[(Vip, u64)],
    ) -> Result<Vec<Option<MoveTimeline>>, StoreError> {
        let mut out = Vec::with_capacity(moves.len());
        for (vip, epoch) in moves {
            out.push(self.move_timeline(*vip, *epoch).await?);
        }
        Ok(out)
    }

    /// The moves of one VIP (or of all), every node's marks merged, oldest first.
    async fn moves(&self, vip: Option<Vip>) -> Result<Vec<MoveTimeline>, StoreError> {
        let _ = vip;
        Ok(Vec::new())
    }

    /// One move of a VIP, every node's marks merged, if any node recorded it. A store
    /// that keeps many moves reads only this one's marks.
    async fn move_timeline(
        &self,
        vip: Vip,
        epoch: u64,
    ) -> Result<Option<MoveTimeline>, StoreError> {
        Ok(self
            .moves(Some(vip))
            .await?
            .into_iter()
            .find(|t| t.epoch == epoch))
    }
}

/// Where policies are kept: etcd (a client of its own), or the config's documents.
pub fn policy_store_from_config(config: &Config) -> anyhow::Result<Arc<dyn policies::PolicyStore>> {
    Ok(match config.store.backend {
        StoreBackend::Embedded => {
            let mut docs = Vec::new();
            for (i, table) in config.policy.documents.iter().enumerate() {
                let name = table
                    .get("name")
                    .and_then(|n| n.as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("document-{i}"));
                docs.push((name, serde_json::to_string(table)?));
            }
            Arc::new(policies::LocalPolicies::new(
                "config [[policy.document]]",
                docs,
            ))
        }
        StoreBackend::Etcd => Arc::new(etcd::EtcdStore::new(config)?),
    })
}

/// Builds the store the config names.
pub async fn from_config(config: &Config) -> anyhow::Result<Arc<dyn OwnershipStore>> {
    Ok(match config.store.backend {
        StoreBackend::Embedded => Arc::new(embedded::EmbeddedStore::new(config.node.clone())),
        StoreBackend::Etcd => Arc::new(etcd::EtcdStore::new(config)?),
    })
}
