//! Move timelines in etcd: each node's marks of a move under
//! `<prefix>moves/<vip>/<epoch, 20 digits>/<node>` as JSON, attached to a day-long lease of
//! their own (never the ownership lease, which is short and replaced after an outage) so
//! old moves expire by themselves.

use std::time::{Duration, Instant};

use etcd_client::{GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::EtcdStore;
use crate::model::Vip;
use crate::store::StoreError;
use crate::timeline::{MoveTimeline, NodeMarks};

/// How long a move's marks stay in etcd.
pub const MOVES_TTL: Duration = Duration::from_secs(24 * 3600);
/// A fresh lease is taken this often, so marks live between 23 and 24 hours.
const MOVES_LEASE_RENEW: Duration = Duration::from_secs(3600);
/// Moves per transaction: etcd refuses more operations in one than `--max-txn-ops`
/// (128 by default).
pub const OPS_PER_TXN: usize = 64;

/// Decodes one stored value; the key must agree with what the value says.
pub fn decode_marks(key: &str, value: &[u8]) -> Result<NodeMarks, String> {
    let m: NodeMarks =
        serde_json::from_slice(value).map_err(|e| format!("not a move record: {e}"))?;
    let suffix = format!("{}/{:020}/{}", m.vip, m.epoch, m.node);
    if !key.ends_with(&suffix) {
        return Err(format!("the record says {suffix}, the key disagrees"));
    }
    if m.node.is_empty() || m.to_node.is_empty() {
        return Err("the record names no node".into());
    }
    Ok(m)
}

impl EtcdStore {
    async fn moves_lease(&self, client: &etcd_client::Client) -> Result<i64, StoreError> {
        let mut slot = self.moves_lease.lock().await;
        if let Some((id, granted)) = *slot
            && granted.elapsed() < MOVES_LEASE_RENEW
        {
            return Ok(id);
        }
        let mut c = client.clone();
        let granted = self
            .timed(
                "grant the moves lease",
                c.lease_grant(MOVES_TTL.as_secs() as i64, None),
            )
            .await?;
        *slot = Some((granted.id(), Instant::now()));
        Ok(granted.id())
    }

    /// Writes this node's marks of each move, a transaction per [`OPS_PER_TXN`] moves.
    pub(super) async fn put_marks(&self, batch: &[NodeMarks]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let lease = self.moves_lease(&client).await?;
        for chunk in batch.chunks(OPS_PER_TXN) {
            let ops = chunk
                .iter()
                .map(|m| {
                    let key = self.keys.move_marks(m.vip, m.epoch, &m.node);
                    let value =
                        serde_json::to_string(m).map_err(|e| StoreError::Other(e.to_string()))?;
                    Ok(TxnOp::put(
                        key,
                        value,
                        Some(PutOptions::new().with_lease(lease)),
                    ))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            let mut c = client.clone();
            self.timed("write move marks", c.txn(Txn::new().and_then(ops)))
                .await?;
        }
        Ok(())
    }

    pub(super) async fn get_moves(
        &self,
        vip: Option<Vip>,
    ) -> Result<Vec<MoveTimeline>, StoreError> {
        let client = self.client().await?;
        let mut c = client.clone();
        let resp = self
            .timed(
                "read moves",
                c.get(self.keys.moves(vip), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        Ok(MoveTimeline::merge_all(decode_all(resp.kvs())))
    }

    /// One move: only its own keys, not every move of the VIP of the last day.
    pub(super) async fn get_move(
        &self,
        vip: Vip,
        epoch: u64,
    ) -> Result<Option<MoveTimeline>, StoreError> {
        Ok(self.get_move_batch(&[(vip, epoch)]).await?.pop().flatten())
    }

    /// Each move's own keys, a transaction of ranges per [`OPS_PER_TXN`] moves.
    pub(super) async fn get_move_batch(
        &self,
        moves: &[(Vip, u64)],
    ) -> Result<Vec<Option<MoveTimeline>>, StoreError> {
        let mut out = Vec::with_capacity(moves.len());
        if moves.is_empty() {
            return Ok(out);
        }
        let client = self.client().await?;
        for chunk in moves.chunks(OPS_PER_TXN) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(vip, epoch)| {
                    TxnOp::get(
                        self.keys.move_prefix(*vip, *epoch),
                        Some(GetOptions::new().with_prefix()),
                    )
                })
                .collect();
            let mut c = client.clone();
            let resp = self
                .timed("read moves", c.txn(Txn::new().and_then(ops)))
                .await?;
            let mut answers = resp.op_responses().into_iter();
            for (vip, epoch) in chunk {
                let parts = match answers.next() {
                    Some(TxnOpResponse::Get(g)) => decode_all(g.kvs()),
                    _ => Vec::new(),
                };
                out.push(
                    MoveTimeline::merge_all(parts)
                        .into_iter()
                        .find(|t| t.vip == *vip && t.epoch == *epoch),
                );
            }
        }
        Ok(out)
    }
}

/// The readable records among `kvs`; an unreadable one is logged and skipped.
fn decode_all(kvs: &[KeyValue]) -> Vec<NodeMarks> {
    let mut parts = Vec::with_capacity(kvs.len());
    for kv in kvs {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match decode_marks(&key, kv.value()) {
            Ok(m) => parts.push(m),
            Err(reason) => tracing::warn!(%key, %reason, "skipping an unreadable move record"),
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::etcd::KeyLayout;
    use crate::timeline::Mark;

    #[test]
    fn keys_sort_by_epoch_and_values_must_match_them() {
        let k = KeyLayout::new("/vipsec/");
        let vip: Vip = "2001:db8::1".parse().unwrap();
        let key = k.move_marks(vip, 12, "fe1");
        assert_eq!(key, "/vipsec/moves/2001:db8::1/00000000000000000012/fe1");
        assert!(key.starts_with(&k.moves(Some(vip))));
        assert_eq!(k.moves(None), "/vipsec/moves/");
        let one = k.move_prefix(vip, 12);
        assert!(key.starts_with(&one), "{key} under {one}");
        assert!(!k.move_marks(vip, 120, "fe1").starts_with(&one));
        assert!(!k.move_marks(vip, 1, "fe1").starts_with(&one));
        let m = NodeMarks {
            vip,
            epoch: 12,
            node: "fe1".into(),
            from_node: None,
            to_node: "be2".into(),
            marks: [(Mark::FirstTraffic, 5)].into_iter().collect(),
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(decode_marks(&key, text.as_bytes()), Ok(m));
        assert!(decode_marks(&k.move_marks(vip, 13, "fe1"), text.as_bytes()).is_err());
        assert!(decode_marks(&key, b"\xff{").is_err());
    }
}
