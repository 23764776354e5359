//! Where cluster-wide IPsec policies are kept: raw documents with a version, so that the
//! agent can show a document it does not fully understand without ever rewriting it.
//!
//! The store knows nothing of what a policy means (that is `crate::policy`): it keeps
//! each document as the JSON text it was given, versioned by the store, and writes only
//! with a compare on the version the writer read.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::StoreError;

/// One stored policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    pub name: String,
    /// The document as stored (JSON).
    pub raw: String,
    /// Changes with every write of this document and never repeats, even after the
    /// document is deleted and written anew (etcd: the key's mod_revision; the embedded
    /// store: a count).
    pub version: u64,
    /// Where it came from, for `vipsec policy show`: the etcd key or the config file.
    pub source: String,
}

/// Every stored policy by name, as last read; `None` until the first read succeeded.
pub type PolicySet = Option<BTreeMap<String, StoredPolicy>>;

#[async_trait]
pub trait PolicyStore: Send + Sync + 'static {
    /// Keeps `tx` up to date with every stored policy until cancelled (a snapshot after
    /// each (re)connection, then each change); outages keep the last known set.
    async fn run(&self, tx: watch::Sender<PolicySet>, cancel: CancellationToken);

    /// Writes a document if its stored version is still `expected` (0: it must not exist
    /// yet); returns what is stored now.
    async fn put(&self, name: &str, raw: &str, expected: u64) -> Result<StoredPolicy, StoreError>;

    /// Deletes a document if its stored version is still `expected`.
    async fn delete(&self, name: &str, expected: u64) -> Result<(), StoreError>;
}

/// Policies held in memory, seeded from the node's config file (single-machine use).
pub struct LocalPolicies {
    source: String,
    docs: Mutex<BTreeMap<String, StoredPolicy>>,
    changed: Arc<tokio::sync::Notify>,
}

impl LocalPolicies {
    pub fn new(source: &str, docs: Vec<(String, String)>) -> Self {
        let docs = docs
            .into_iter()
            .map(|(name, raw)| {
                let p = StoredPolicy {
                    name: name.clone(),
                    raw,
                    version: 1,
                    source: source.to_string(),
                };
                (name, p)
            })
            .collect();
        LocalPolicies {
            source: source.to_string(),
            docs: Mutex::new(docs),
            changed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    fn docs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StoredPolicy>> {
        self.docs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn version_conflict(name: &str, expected: u64, found: u64) -> StoreError {
    StoreError::Other(format!(
        "policy {name:?} is at version {found}, not {expected}: it changed since it was read"
    ))
}

#[async_trait]
impl PolicyStore for LocalPolicies {
    async fn run(&self, tx: watch::Sender<PolicySet>, cancel: CancellationToken) {
        loop {
            let notified = self.changed.notified();
            let _ = tx.send(Some(self.docs().clone()));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = notified => {}
            }
        }
    }

    async fn put(&self, name: &str, raw: &str, expected: u64) -> Result<StoredPolicy, StoreError> {
        let stored = {
            let mut docs = self.docs();
            let found = docs.get(name).map_or(0, |p| p.version);
            if found != expected {
                return Err(version_conflict(name, expected, found));
            }
            let p = StoredPolicy {
                name: name.to_string(),
                raw: raw.to_string(),
                version: found + 1,
                source: format!("{} (changed at run time, not saved)", self.source),
            };
            docs.insert(name.to_string(), p.clone());
            p
        };
        self.changed.notify_waiters();
        Ok(stored)
    }

    async fn delete(&self, name: &str, expected: u64) -> Result<(), StoreError> {
        {
            let mut docs = self.docs();
            let found = docs.get(name).map_or(0, |p| p.version);
            if found != expected {
                return Err(version_conflict(name, expected, found));
            }
            docs.remove(name);
        }
        self.changed.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_policies_are_versioned_and_compare_on_write() {
        let s = Arc::new(LocalPolicies::new(
            "/etc/vipsec/vipsec.toml",
            vec![("mail".into(), r#"{"name":"mail"}"#.into())],
        ));
        let (tx, mut rx) = watch::channel(None);
        let cancel = CancellationToken::new();
        let runner = {
            let (s, c) = (s.clone(), cancel.clone());
            tokio::spawn(async move { s.run(tx, c).await })
        };
        rx.wait_for(|set| set.is_some()).await.unwrap();
        assert_eq!(rx.borrow().as_ref().unwrap()["mail"].version, 1);

        let err = s.put("mail", "{}", 0).await.unwrap_err();
        assert!(err.to_string().contains("version 1, not 0"), "{err}");
        let p = s.put("mail", r#"{"name":"mail","x":1}"#, 1).await.unwrap();
        assert_eq!(p.version, 2);
        rx.wait_for(|set| set.as_ref().is_some_and(|m| m["mail"].version == 2))
            .await
            .unwrap();
        s.delete("mail", 2).await.unwrap();
        rx.wait_for(|set| set.as_ref().is_some_and(|m| m.is_empty()))
            .await
            .unwrap();
        cancel.cancel();
        runner.await.unwrap();
    }
}
