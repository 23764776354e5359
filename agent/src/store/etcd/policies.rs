//! Policy documents in etcd: a snapshot and a watch of `<prefix>policies/`, and writes
//! that compare the key's version (0: the key must not exist) so that two operators, or
//! an old and a new agent, never overwrite each other's change unseen.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{BACKOFF_MAX, BACKOFF_MIN, EtcdStore, unavailable};
use crate::store::StoreError;
use crate::store::policies::{PolicySet, PolicyStore, StoredPolicy};

impl EtcdStore {
    async fn read_policies(
        &self,
        client: &Client,
    ) -> Result<(BTreeMap<String, StoredPolicy>, i64), StoreError> {
        let mut c = client.clone();
        let prefix = self.keys.policies();
        let resp = self
            .timed(
                "read policies",
                c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut set = BTreeMap::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).to_string();
            let name = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
            match std::str::from_utf8(kv.value()) {
                Ok(raw) => {
                    set.insert(
                        name.clone(),
                        StoredPolicy {
                            name,
                            raw: raw.to_string(),
                            // The key's mod_revision, not its version: the version starts
                            // again at 1 when a document is deleted and written anew, so
                            // an edit read before the delete would pass the compare.
                            version: kv.mod_revision() as u64,
                            source: format!("etcd {key}"),
                        },
                    );
                }
                // Kept out of the set (and logged): the document is not even text.
                Err(_) => tracing::warn!(%key, "skipping a policy document that is not UTF-8"),
            }
        }
        Ok((set, revision))
    }

    async fn policy_session(
        &self,
        tx: &watch::Sender<PolicySet>,
        cancel: &CancellationToken,
        backoff: &mut Duration,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let (set, revision) = self.read_policies(&client).await?;
        let mut c = client.clone();
        let mut stream = self
            .timed(
                "watch policies",
                c.watch(
                    self.keys.policies(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision + 1),
                    ),
                ),
            )
            .await?;
        tracing::info!(policies = set.len(), revision, "policies read");
        let _ = tx.send(Some(set));
        *backoff = BACKOFF_MIN;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                msg = stream.message() => {
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return Err(unavailable("policy watch", "stream ended")),
                        Err(e) => return Err(unavailable("policy watch", self.settings.scrub(&e.to_string()))),
                    };
                    if resp.canceled() || resp.compact_revision() > 0 {
                        return Err(unavailable("policy watch", "cancelled or compacted; reading again"));
                    }
                    if resp.events().is_empty() {
                        continue;
                    }
                    // Policies are few and small: read them all again, at one revision.
                    let (set, _) = self.read_policies(&client).await?;
                    let _ = tx.send(Some(set));
                }
            }
        }
    }
}

#[async_trait]
impl PolicyStore for EtcdStore {
    async fn run(&self, tx: watch::Sender<PolicySet>, cancel: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let r = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.policy_session(&tx, &cancel, &mut backoff) => r,
            };
            if cancel.is_cancelled() {
                return;
            }
            if let Err(e) = r {
                tracing::warn!(error = %e, retry_in = ?backoff, "policy store unavailable; keeping the last policies");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn put(&self, name: &str, raw: &str, expected: u64) -> Result<StoredPolicy, StoreError> {
        let client = self.client().await?;
        let key = self.keys.policy(name);
        let txn = Txn::new().when([revision_is(&key, expected)]).and_then([
            TxnOp::put(key.clone(), raw, None),
            TxnOp::get(key.clone(), None),
        ]);
        let mut c = client.clone();
        let resp = self.timed("write policy", c.txn(txn)).await?;
        if !resp.succeeded() {
            let (set, _) = self.read_policies(&client).await?;
            let found = set.get(name).map_or(0, |p| p.version);
            return Err(StoreError::Other(format!(
                "policy {name:?} is at version {found}, not {expected}: it changed since it was read"
            )));
        }
        let version = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
                _ => None,
            })
            .or_else(|| resp.header().map(|h| h.revision()))
            .unwrap_or(0) as u64;
        Ok(StoredPolicy {
            name: name.to_string(),
            raw: raw.to_string(),
            version,
            source: format!("etcd {key}"),
        })
    }

    async fn delete(&self, name: &str, expected: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        let key = self.keys.policy(name);
        let txn = Txn::new()
            .when([revision_is(&key, expected)])
            .and_then([TxnOp::delete(key, None)]);
        let mut c = client.clone();
        if self.timed("delete policy", c.txn(txn)).await?.succeeded() {
            Ok(())
        } else {
            Err(StoreError::Other(format!(
                "policy {name:?} is not at version {expected}: it changed since it was read"
            )))
        }
    }
}

/// The compare for a document read at `expected` (its mod_revision; 0: absent).
fn revision_is(key: &str, expected: u64) -> Compare {
    if expected == 0 {
        Compare::version(key, CompareOp::Equal, 0)
    } else {
        Compare::mod_revision(key, CompareOp::Equal, expected as i64)
    }
}
