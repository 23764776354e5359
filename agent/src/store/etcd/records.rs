//! Reading and writing one VIP's records: the consistent view, the fenced claim, the
//! re-attachment of our own record to a new lease, the restoration and the withdrawal.

use std::time::SystemTime;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::keys::{decode_epoch, decode_owner, encode_owner};
use super::{EpochMark, EtcdStore, KvMeta, VipView};
use crate::model::{Vip, VipOwner, unix_ms};
use crate::store::StoreError;

impl EtcdStore {
    /// Reads the owner record and the epoch key at one revision.
    pub(super) async fn view(&self, client: &Client, vip: Vip) -> Result<VipView, StoreError> {
        let owner_key = self.keys.owner(vip);
        let epoch_key = self.keys.epoch(vip);
        let txn = Txn::new().and_then([
            TxnOp::get(owner_key.clone(), None),
            TxnOp::get(epoch_key.clone(), None),
        ]);
        let mut c = client.clone();
        let resp = self.timed("read VIP records", c.txn(txn)).await?;
        let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let owner_kv = gets.next().and_then(|g| g.kvs().first().cloned());
        let epoch_kv = gets.next().and_then(|g| g.kvs().first().cloned());
        let owner = owner_kv.and_then(|kv| match decode_owner(kv.value()) {
            Ok(o) => Some((
                o,
                KvMeta {
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                },
            )),
            Err(reason) => {
                tracing::warn!(key = %owner_key, %reason, "ignoring unreadable owner record");
                None
            }
        });
        let (stored_epoch, mod_revision) = match &epoch_kv {
            Some(kv) => match decode_epoch(kv.value()) {
                Ok(e) => (e, kv.mod_revision()),
                Err(reason) => {
                    // Every new epoch is one write of this key, so its write count is
                    // at least the last epoch: never reuse one a front-end may know.
                    let floor = kv.version().max(0) as u64;
                    tracing::warn!(key = %epoch_key, %reason, floor, "unreadable epoch; counting from the key's write count");
                    (floor, kv.mod_revision())
                }
            },
            None => (0, 0),
        };
        // The owner record's epoch counts too, in case the epoch key was damaged.
        let epoch = stored_epoch.max(owner.as_ref().map_or(0, |(o, _)| o.epoch));
        Ok(VipView {
            owner,
            mark: EpochMark {
                epoch,
                mod_revision,
            },
        })
    }

    /// The epoch mark a writer would act on now (exposed so tests can replay a stale one).
    pub async fn epoch_mark(&self, vip: Vip) -> Result<EpochMark, StoreError> {
        let client = self.client().await?;
        Ok(self.view(&client, vip).await?.mark)
    }

    /// Takes the VIP at `seen.epoch + 1` if no epoch was written since `seen` was read.
    pub async fn claim(&self, vip: Vip, seen: EpochMark) -> Result<VipOwner, StoreError> {
        self.intents().held.entry(vip).or_default();
        self.claim_at(vip, seen, seen.epoch + 1).await
    }

    /// Replaces `from` (another node's record, still standing) with ours at the next
    /// epoch. Fenced twice: the record must still be the tenure the caller judged (same
    /// node and epoch) and keep its `mod_revision` from this read to the write, and the
    /// epoch key must keep its own (no claim in between). The old node's holder
    /// mark goes in the same transaction: it would otherwise read as a second holder
    /// until the old lease runs out.
    pub(super) async fn take_over_with(
        &self,
        vip: Vip,
        from: &VipOwner,
    ) -> Result<VipOwner, StoreError> {
        let client = self.client().await?;
        let view = self.view(&client, vip).await?;
        let meta = match view.owner {
            Some((o, _)) if o.node == self.node => return Ok(o),
            Some((o, meta)) if o.node == from.node && o.epoch == from.epoch => meta,
            other => {
                let (owner, epoch) = other
                    .map_or(("(nobody)".to_string(), view.mark.epoch), |(o, _)| {
                        (o.node, o.epoch)
                    });
                return Err(StoreError::Fenced { vip, owner, epoch });
            }
        };
        let lease = self.vip_lease(&client, vip).await?;
        let owner = VipOwner {
            node: self.node.clone(),
            epoch: view.mark.epoch + 1,
            taken_at_ms: unix_ms(SystemTime::now()),
            draining: false,
        };
        let value = encode_owner(&owner).map_err(StoreError::Other)?;
        let (owner_key, epoch_key) = (self.keys.owner(vip), self.keys.epoch(vip));
        let txn = Txn::new()
            .when([
                Compare::mod_revision(owner_key.clone(), CompareOp::Equal, meta.mod_revision),
                Compare::mod_revision(epoch_key.clone(), CompareOp::Equal, view.mark.mod_revision),
            ])
            .and_then([
                TxnOp::put(epoch_key, owner.epoch.to_string(), None),
                TxnOp::put(owner_key, value, Some(PutOptions::new().with_lease(lease))),
                TxnOp::delete(self.keys.holder(vip, &from.node), None),
            ]);
        let mut c = client.clone();
        let resp = self.timed("take over VIP", c.txn(txn)).await?;
        if !resp.succeeded() {
            tracing::warn!(%vip, from = %from.node, epoch = from.epoch, "takeover refused: the record changed");
            return Err(StoreError::Fenced {
                vip,
                owner: from.node.clone(),
                epoch: from.epoch,
            });
        }
        let written = EpochMark {
            epoch: owner.epoch,
            mod_revision: resp.header().map_or(0, |h| h.revision()),
        };
        if let Some(h) = self.intents().held.get_mut(&vip) {
            h.written = Some(written);
        }
        tracing::info!(%vip, epoch = owner.epoch, from = %from.node, lease, "ownership taken over");
        Ok(owner)
    }

    /// Writes this node's record at `epoch`, fenced by the epoch key's `mod_revision`:
    /// `seen.epoch + 1` for a new claim, or `seen.epoch` when this node wrote that epoch
    /// and nobody claimed the VIP since (its record expired in an outage), so front-ends
    /// keep their SAs.
    async fn claim_at(
        &self,
        vip: Vip,
        seen: EpochMark,
        epoch: u64,
    ) -> Result<VipOwner, StoreError> {
        let client = self.client().await?;
        let lease = self.vip_lease(&client, vip).await?;
        let owner = VipOwner {
            node: self.node.clone(),
            epoch,
            taken_at_ms: unix_ms(SystemTime::now()),
            draining: false,
        };
        let value = encode_owner(&owner).map_err(StoreError::Other)?;
        let epoch_key = self.keys.epoch(vip);
        let owner_key = self.keys.owner(vip);
        let reclaim = epoch == seen.epoch;
        let mut compare = vec![Compare::mod_revision(
            epoch_key.clone(),
            CompareOp::Equal,
            seen.mod_revision,
        )];
        let mut ops = vec![TxnOp::put(
            owner_key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )];
        if reclaim {
            // The epoch key stays as it is (its revision is the fence); the record must
            // still be absent.
            compare.push(Compare::version(owner_key, CompareOp::Equal, 0));
        } else {
            ops.insert(
                0,
                TxnOp::put(epoch_key.clone(), owner.epoch.to_string(), None),
            );
        }
        let txn = Txn::new().when(compare).and_then(ops);
        let mut c = client.clone();
        let resp = self.timed("claim VIP", c.txn(txn)).await?;
        if resp.succeeded() {
            let written = if reclaim {
                seen
            } else {
                EpochMark {
                    epoch: owner.epoch,
                    mod_revision: resp.header().map_or(0, |h| h.revision()),
                }
            };
            if let Some(h) = self.intents().held.get_mut(&vip) {
                h.written = Some(written);
            }
            tracing::info!(%vip, epoch = owner.epoch, lease, kept_epoch = reclaim, "ownership published");
            return Ok(owner);
        }
        let now = self.view(&client, vip).await?;
        let (holder, epoch) = match now.owner {
            Some((o, _)) => (o.node, o.epoch.max(now.mark.epoch)),
            None => ("(nobody)".to_string(), now.mark.epoch),
        };
        tracing::warn!(%vip, seen = seen.epoch, current = epoch, %holder, "stale ownership write refused");
        Err(StoreError::Fenced {
            vip,
            owner: holder,
            epoch,
        })
    }

    /// Records this node as the VIP's owner if the VIP is vacant or already ours.
    pub(super) async fn publish_with(&self, vip: Vip) -> Result<VipOwner, StoreError> {
        let client = self.client().await?;
        let lease = self.vip_lease(&client, vip).await?;
        // A lost race only retries when the record vanished or is ours; another owner's
        // live record ends in `Fenced`.
        for _ in 0..3 {
            let view = self.view(&client, vip).await?;
            match view.owner {
                Some((mut own, meta)) if own.node == self.node => {
                    if meta.lease == lease && !own.draining {
                        return Ok(own);
                    }
                    // Our record under an old lease, or marked draining by a drain that
                    // ended with the VIP still here: same epoch, current lease, not draining.
                    own.draining = false;
                    let value = encode_owner(&own).map_err(StoreError::Other)?;
                    let key = self.keys.owner(vip);
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            meta.mod_revision,
                        )])
                        .and_then([TxnOp::put(
                            key,
                            value,
                            Some(PutOptions::new().with_lease(lease)),
                        )]);
                    let mut c = client.clone();
                    if self
                        .timed("re-attach record", c.txn(txn))
                        .await?
                        .succeeded()
                    {
                        tracing::info!(%vip, epoch = own.epoch, lease, "record moved to current lease");
                        return Ok(own);
                    }
                }
                Some((other, _)) => {
                    return Err(StoreError::Fenced {
                        vip,
                        owner: other.node,
                        epoch: other.epoch,
                    });
                }
                _ => {
                    let ours = self
                        .intents()
                        .held
                        .get(&vip)
                        .and_then(|h| h.written)
                        .is_some_and(|w| w == view.mark);
                    let epoch = if ours {
                        view.mark.epoch
                    } else {
                        view.mark.epoch + 1
                    };
                    match self.claim_at(vip, view.mark, epoch).await {
                        // Lost a race with another writer of the record: read again.
                        Err(StoreError::Fenced { owner, .. }) if owner == "(nobody)" => continue,
                        r => return r,
                    }
                }
            }
        }
        Err(StoreError::Other(format!(
            "{vip}: owner record kept changing; try again"
        )))
    }

    /// After a reconnection: make sure every VIP this node holds is still recorded as
    /// ours, without taking any from a newer owner.
    pub(super) async fn restore_published(&self) -> Result<(), StoreError> {
        let held: Vec<(Vip, bool)> = self
            .intents()
            .held
            .iter()
            .map(|(v, h)| (*v, h.claims))
            .collect();
        let client = self.client().await?;
        for (vip, claims) in held {
            if claims {
                match self.publish_with(vip).await {
                    Ok(_) => {}
                    Err(StoreError::Fenced { owner, epoch, .. }) => {
                        tracing::warn!(%vip, %owner, epoch, "VIP recorded as another node's meanwhile; not restoring the record");
                        if let Some(h) = self.intents().held.get_mut(&vip) {
                            h.claims = false;
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            self.put_holder(&client, vip).await?;
        }
        Ok(())
    }

    /// Marks our own live record as draining (same epoch, same lease); a no-op when the
    /// record is not ours.
    pub(super) async fn mark_own_draining(&self, vip: Vip) -> Result<(), StoreError> {
        let client = self.client().await?;
        for _ in 0..3 {
            let view = self.view(&client, vip).await?;
            let Some((mut own, meta)) = view.owner.filter(|(o, _)| o.node == self.node) else {
                return Ok(());
            };
            if own.draining {
                return Ok(());
            }
            own.draining = true;
            let value = encode_owner(&own).map_err(StoreError::Other)?;
            let key = self.keys.owner(vip);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    meta.mod_revision,
                )])
                .and_then([TxnOp::put(
                    key,
                    value,
                    Some(PutOptions::new().with_lease(meta.lease)),
                )]);
            let mut c = client.clone();
            if self.timed("mark draining", c.txn(txn)).await?.succeeded() {
                tracing::info!(%vip, epoch = own.epoch, "record marked draining");
                return Ok(());
            }
        }
        Err(StoreError::Other(format!(
            "{vip}: owner record kept changing; try again"
        )))
    }

    /// Deletes the owner record only while it is this node's (compared in the
    /// transaction) and the VIP is not held again.
    pub(super) async fn delete_own_record(
        &self,
        client: &Client,
        vip: Vip,
    ) -> Result<(), StoreError> {
        for _ in 0..3 {
            if self.intents().held.contains_key(&vip) {
                return Ok(());
            }
            let view = self.view(client, vip).await?;
            let Some((own, meta)) = view.owner.filter(|(o, _)| o.node == self.node) else {
                return Ok(());
            };
            let key = self.keys.owner(vip);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    meta.mod_revision,
                )])
                .and_then([TxnOp::delete(key, None)]);
            let mut c = client.clone();
            if self.timed("withdraw", c.txn(txn)).await?.succeeded() {
                tracing::info!(%vip, epoch = own.epoch, "ownership withdrawn");
                return Ok(());
            }
        }
        Err(StoreError::Other(format!(
            "{vip}: owner record kept changing; try again"
        )))
    }
}
