//! This node's lease: granted on first use, kept alive from the watch session, and
//! replaced (with the records restored) when etcd reports it gone.

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};

use super::{EtcdStore, unavailable};
use crate::store::StoreError;

impl EtcdStore {
    pub(super) async fn current_lease(&self, client: &Client) -> Result<i64, StoreError> {
        let mut lease = self.lease.lock().await;
        if let Some(id) = *lease {
            return Ok(id);
        }
        let ttl = self.lease_ttl.as_secs_f64().ceil().max(1.0) as i64;
        let mut c = client.clone();
        let granted = self.timed("grant lease", c.lease_grant(ttl, None)).await?;
        tracing::info!(lease = granted.id(), ttl = granted.ttl(), "lease granted");
        *lease = Some(granted.id());
        Ok(granted.id())
    }

    /// Sends one keep-alive; on a lost lease grants a new one and restores the records.
    pub(super) async fn keep_lease_alive(
        &self,
        client: &Client,
        keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    ) -> Result<(), StoreError> {
        let Some(id) = *self.lease.lock().await else {
            return Ok(());
        };
        if keeper.as_ref().is_none_or(|(k, _)| k.id() != id) {
            let mut c = client.clone();
            match tokio::time::timeout(self.timeout, c.lease_keep_alive(id)).await {
                Ok(Ok(k)) => *keeper = Some(k),
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(reason))) => {
                    return self.replace_lease(id, &reason).await;
                }
                Ok(Err(e)) => return Err(unavailable("lease keep-alive", e)),
                Err(_) => return Err(unavailable("lease keep-alive", "no answer")),
            }
            return Ok(());
        }
        let Some((k, stream)) = keeper.as_mut() else {
            return Ok(());
        };
        k.keep_alive()
            .await
            .map_err(|e| unavailable("lease keep-alive", e))?;
        match tokio::time::timeout(self.timeout, stream.message()).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => Ok(()),
            Ok(Ok(Some(_))) => {
                *keeper = None;
                self.replace_lease(id, "expired").await
            }
            Ok(Ok(None)) => Err(unavailable("lease keep-alive", "stream closed")),
            Ok(Err(e)) => Err(unavailable("lease keep-alive", e)),
            Err(_) => Err(unavailable("lease keep-alive", "no answer")),
        }
    }

    pub(super) async fn replace_lease(&self, old: i64, reason: &str) -> Result<(), StoreError> {
        tracing::warn!(lease = old, %reason, "lease lost; granting a new one and restoring records");
        {
            let mut lease = self.lease.lock().await;
            if *lease == Some(old) {
                *lease = None;
            }
        }
        let client = self.client().await?;
        self.current_lease(&client).await?;
        self.restore_published().await
    }
}
