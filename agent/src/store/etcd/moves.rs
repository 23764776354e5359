//! Move timelines in etcd: each node's marks of a move under
//! `<prefix>moves/<vip>/<epoch, 20 digits>/<node>` as JSON, attached to a day-long lease of
//! their own (never the ownership lease, which is short and replaced after an outage) so
//! old moves expire by themselves.

use std::time::{Duration, Instant};

use etcd_client::{GetOptions, PutOptions};

use super::EtcdStore;
use crate::model::Vip;
use crate::store::StoreError;
use crate::timeline::{MoveTimeline, NodeMarks};

/// How long a move's marks stay in etcd.
pub const MOVES_TTL: Duration = Duration::from_secs(24 * 3600);
/// A fresh lease is taken this often, so marks live between 23 and 24 hours.
const MOVES_LEASE_RENEW: Duration = Duration::from_secs(3600);

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

    pub(super) async fn put_marks(&self, marks: &NodeMarks) -> Result<(), StoreError> {
        let client = self.client().await?;
        let lease = self.moves_lease(&client).await?;
        let key = self.keys.move_marks(marks.vip, marks.epoch, &marks.node);
        let value = serde_json::to_string(marks).map_err(|e| StoreError::Other(e.to_string()))?;
        let mut c = client.clone();
        self.timed(
            "write move marks",
            c.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        Ok(())
    }

    pub(super) async fn get_moves(
        &self,
        vip: Option<Vip>,
    ) -> Result<Vec<MoveTimeline>, StoreError> {
        self.read_moves(self.keys.moves(vip)).await
    }

    /// One move: only its own keys, not every move of the VIP of the last day.
    pub(super) async fn get_move(
        &self,
        vip: Vip,
        epoch: u64,
    ) -> Result<Option<MoveTimeline>, StoreError> {
        let moves = self.read_moves(self.keys.move_prefix(vip, epoch)).await?;
        Ok(moves.into_iter().find(|t| t.vip == vip && t.epoch == epoch))
    }

    async fn read_moves(&self, prefix: String) -> Result<Vec<MoveTimeline>, StoreError> {
        let client = self.client().await?;
        let mut c = client.clone();
        let resp = self
            .timed(
                "read moves",
                c.get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut parts = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match decode_marks(&key, kv.value()) {
                Ok(m) => parts.push(m),
                Err(reason) => tracing::warn!(%key, %reason, "skipping an unreadable move record"),
            }
        }
        Ok(MoveTimeline::merge_all(parts))
    }
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
