//! In-process ownership store for a single machine: same contract as etcd, no server.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{OwnershipStore, StoreError};
use crate::InputSink;
use crate::failover::Input;
use crate::model::{Vip, VipOwner, unix_ms};
use crate::timeline::{MoveTimeline, NodeMarks};

/// Moves kept per VIP: this store lives in memory and has no expiry.
const MOVES_KEPT: usize = 32;

#[derive(Default)]
struct Records {
    owners: BTreeMap<Vip, VipOwner>,
    /// Highest epoch ever written per VIP, kept after a withdrawal so epochs only grow.
    epochs: BTreeMap<Vip, u64>,
    /// Move marks by (VIP, epoch, node).
    marks: BTreeMap<(Vip, u64, String), NodeMarks>,
}

pub struct EmbeddedStore {
    node: String,
    records: Arc<Mutex<Records>>,
    changes: broadcast::Sender<(Vip, Option<VipOwner>)>,
}

impl EmbeddedStore {
    pub fn new(node: String) -> Self {
        let (changes, _) = broadcast::channel(1024);
        EmbeddedStore {
            node,
            records: Arc::new(Mutex::new(Records::default())),
            changes,
        }
    }

    /// Another node's view of the same records: several agents in one process (runtime
    /// tests, simulations) share one store the way a cluster shares etcd.
    pub fn for_node(&self, node: &str) -> EmbeddedStore {
        EmbeddedStore {
            node: node.to_string(),
            records: self.records.clone(),
            changes: self.changes.clone(),
        }
    }

    fn snapshot(&self) -> Vec<(Vip, Option<VipOwner>)> {
        let r = self.records.lock().expect("store lock");
        r.owners
            .iter()
            .map(|(v, o)| (*v, Some(o.clone())))
            .collect()
    }
}

#[async_trait]
impl OwnershipStore for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn describe(&self) -> String {
        "in-process".into()
    }

    async fn run(&self, sink: InputSink, cancel: CancellationToken) {
        // Subscribe before the snapshot so no change can fall between the two.
        let mut rx = self.changes.subscribe();
        let snapshot = self.snapshot();
        if sink
            .send(Input::StoreHealth {
                healthy: true,
                detail: "in-process".into(),
            })
            .await
            .is_err()
            || sink.send(Input::OwnerSnapshot(snapshot)).await.is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                change = rx.recv() => match change {
                    Ok((vip, owner)) => {
                        if sink.send(Input::OwnerChanged { vip, owner }).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if sink.send(Input::OwnerSnapshot(self.snapshot())).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }

    async fn publish(&self, vip: Vip) -> Result<VipOwner, StoreError> {
        let owner = {
            let mut r = self.records.lock().expect("store lock");
            if let Some(cur) = r.owners.get_mut(&vip).filter(|o| o.node == self.node) {
                if !cur.draining {
                    return Ok(cur.clone());
                }
                cur.draining = false;
                let cur = cur.clone();
                drop(r);
                let _ = self.changes.send((vip, Some(cur.clone())));
                return Ok(cur);
            }
            let epoch = r.epochs.get(&vip).copied().unwrap_or(0) + 1;
            let owner = VipOwner {
                node: self.node.clone(),
                epoch,
                taken_at_ms: unix_ms(SystemTime::now()),
                draining: false,
            };
            r.epochs.insert(vip, epoch);
            r.owners.insert(vip, owner.clone());
            owner
        };
        let _ = self.changes.send((vip, Some(owner.clone())));
        Ok(owner)
    }

    async fn mark_draining(&self, vip: Vip) -> Result<(), StoreError> {
        let marked = {
            let mut r = self.records.lock().expect("store lock");
            match r.owners.get_mut(&vip) {
                Some(o) if o.node == self.node && !o.draining => {
                    o.draining = true;
                    Some(o.clone())
                }
                _ => None,
            }
        };
        if let Some(o) = marked {
            let _ = self.changes.send((vip, Some(o)));
        }
        Ok(())
    }

    async fn current(&self, vip: Vip) -> Result<(Option<VipOwner>, u64), StoreError> {
        let r = self.records.lock().expect("store lock");
        Ok((
            r.owners.get(&vip).cloned(),
            r.epochs.get(&vip).copied().unwrap_or(0),
        ))
    }

    async fn withdraw(&self, vip: Vip) -> Result<(), StoreError> {
        let removed = {
            let mut r = self.records.lock().expect("store lock");
            match r.owners.get(&vip) {
                Some(o) if o.node == self.node => r.owners.remove(&vip).is_some(),
                _ => false,
            }
        };
        if removed {
            let _ = self.changes.send((vip, None));
        }
        Ok(())
    }

    async fn publish_marks(&self, marks: &NodeMarks) -> Result<(), StoreError> {
        let mut r = self.records.lock().expect("store lock");
        r.marks
            .insert((marks.vip, marks.epoch, marks.node.clone()), marks.clone());
        let epochs: std::collections::BTreeSet<u64> = r
            .marks
            .keys()
            .filter(|(v, _, _)| *v == marks.vip)
            .map(|(_, e, _)| *e)
            .collect();
        if epochs.len() > MOVES_KEPT {
            let oldest = epochs.into_iter().rev().nth(MOVES_KEPT).unwrap_or(0);
            r.marks
                .retain(|(v, e, _), _| *v != marks.vip || *e > oldest);
        }
        Ok(())
    }

    async fn moves(&self, vip: Option<Vip>) -> Result<Vec<MoveTimeline>, StoreError> {
        let r = self.records.lock().expect("store lock");
        let parts = r
            .marks
            .values()
            .filter(|m| vip.is_none_or(|v| v == m.vip))
            .cloned()
            .collect();
        Ok(MoveTimeline::merge_all(parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn epochs_grow_across_withdrawals_and_republish_keeps_epoch() {
        let s = EmbeddedStore::new("be1".into());
        let vip: Vip = "192.0.2.100".parse().unwrap();
        assert_eq!(s.publish(vip).await.unwrap().epoch, 1);
        assert_eq!(
            s.publish(vip).await.unwrap().epoch,
            1,
            "own live record keeps its epoch"
        );
        s.withdraw(vip).await.unwrap();
        assert_eq!(s.publish(vip).await.unwrap().epoch, 2);
    }

    #[tokio::test]
    async fn marks_merge_per_move_and_old_moves_go() {
        use crate::timeline::Mark;
        let s = EmbeddedStore::new("be1".into());
        let vip: Vip = "192.0.2.100".parse().unwrap();
        for epoch in 1..=(MOVES_KEPT as u64 + 3) {
            for (node, mark) in [("be1", Mark::Released), ("be2", Mark::Usable)] {
                let m = NodeMarks {
                    vip,
                    epoch,
                    node: node.into(),
                    from_node: Some("be1".into()),
                    to_node: "be2".into(),
                    marks: [(mark, epoch * 10)].into_iter().collect(),
                };
                s.publish_marks(&m).await.unwrap();
            }
        }
        let moves = s.moves(Some(vip)).await.unwrap();
        assert_eq!(moves.len(), MOVES_KEPT);
        let last = moves.last().unwrap();
        assert_eq!(last.epoch, MOVES_KEPT as u64 + 3);
        assert_eq!(last.marks.len(), 2);
        assert!(
            s.moves(Some("192.0.2.1".parse().unwrap()))
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn watcher_gets_snapshot_then_changes() {
        let s = std::sync::Arc::new(EmbeddedStore::new("be1".into()));
        let vip: Vip = "192.0.2.100".parse().unwrap();
        s.publish(vip).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let s = s.clone();
            let cancel = cancel.clone();
            async move { s.run(tx, cancel).await }
        });
        assert!(matches!(
            rx.recv().await,
            Some(Input::StoreHealth { healthy: true, .. })
        ));
        match rx.recv().await {
            Some(Input::OwnerSnapshot(v)) => assert_eq!(v[0].1.as_ref().unwrap().epoch, 1),
            other => panic!("{other:?}"),
        }
        s.withdraw(vip).await.unwrap();
        assert_eq!(
            rx.recv().await,
            Some(Input::OwnerChanged { vip, owner: None })
        );
        cancel.cancel();
        task.await.unwrap();
    }
}
