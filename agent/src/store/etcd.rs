//! etcd ownership registry: one key per VIP under this node's lease, epochs fenced by
//! transactions, a watch that feeds the core, and recovery from outages and lost leases.
//!
//! Fencing: every acquisition is one transaction that compares the epoch key's
//! `mod_revision` with what the writer read and writes epoch + 1 to both keys. A writer
//! acting on an old view (a paused or partitioned former owner) fails its compare and gets
//! `StoreError::Fenced`; it can never overwrite a newer owner.

mod connect;
mod keys;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, KeyValue, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use tokio_util::sync::CancellationToken;

use self::connect::ConnectSettings;
pub use self::keys::KeyLayout;
use self::keys::{decode_epoch, decode_owner, encode_owner};
use super::{OwnershipStore, StoreError};
use crate::InputSink;
use crate::config::Config;
use crate::failover::Input;
use crate::model::{Vip, VipOwner, unix_ms};

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

/// Whether a publish may take the VIP from another live owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// The core asked: the VIP is here now, take it (a higher epoch wins).
    Takeover,
    /// Automatic restoration after an outage or a lost lease: only if vacant or ours.
    RestoreOnly,
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

    async fn current_lease(&self, client: &Client) -> Result<i64, StoreError> {
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

    /// Reads the owner record and the epoch key at one revision.
    async fn view(&self, client: &Client, vip: Vip) -> Result<VipView, StoreError> {
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
                    tracing::warn!(key = %epoch_key, %reason, "ignoring unreadable epoch");
                    (0, kv.mod_revision())
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
        let client = self.client().await?;
        let lease = self.current_lease(&client).await?;
        let owner = VipOwner {
            node: self.node.clone(),
            epoch: seen.epoch + 1,
            taken_at_ms: unix_ms(SystemTime::now()),
        };
        let value = encode_owner(&owner).map_err(StoreError::Other)?;
        let epoch_key = self.keys.epoch(vip);
        let owner_key = self.keys.owner(vip);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                epoch_key.clone(),
                CompareOp::Equal,
                seen.mod_revision,
            )])
            .and_then([
                TxnOp::put(epoch_key.clone(), owner.epoch.to_string(), None),
                TxnOp::put(owner_key, value, Some(PutOptions::new().with_lease(lease))),
            ]);
        let mut c = client.clone();
        let resp = self.timed("claim VIP", c.txn(txn)).await?;
        if resp.succeeded() {
            tracing::info!(%vip, epoch = owner.epoch, lease, "ownership published");
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

    async fn publish_with(&self, vip: Vip, claim: Claim) -> Result<VipOwner, StoreError> {
        let client = self.client().await?;
        let lease = self.current_lease(&client).await?;
        // A lost race only retries when the record vanished or is ours; another owner's
        // newer record ends in `Fenced` (or, for a takeover, in a claim on a fresh view).
        for _ in 0..3 {
            let view = self.view(&client, vip).await?;
            match view.owner {
                Some((own, meta)) if own.node == self.node => {
                    if meta.lease == lease {
                        return Ok(own);
                    }
                    // Our record under an old lease: move it to the current one, same epoch.
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
                Some((other, _)) if claim == Claim::RestoreOnly => {
                    return Err(StoreError::Fenced {
                        vip,
                        owner: other.node,
                        epoch: other.epoch,
                    });
                }
                _ => return self.claim(vip, view.mark).await,
            }
        }
        Err(StoreError::Other(format!(
            "{vip}: owner record kept changing; try again"
        )))
    }

    /// After a reconnection or a new lease: make sure every VIP the core published is
    /// still recorded as ours, without taking any from a newer owner.
    async fn restore_published(&self) -> Result<(), StoreError> {
        let vips: Vec<Vip> = self.published().iter().copied().collect();
        for vip in vips {
            match self.publish_with(vip, Claim::RestoreOnly).await {
                Ok(_) => {}
                Err(StoreError::Fenced { owner, epoch, .. }) => {
                    tracing::warn!(%vip, %owner, epoch, "VIP taken by another node meanwhile; not restoring it");
                    self.published().remove(&vip);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends one keep-alive; on a lost lease grants a new one and restores the records.
    async fn keep_lease_alive(
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

    async fn replace_lease(&self, old: i64, reason: &str) -> Result<(), StoreError> {
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

    fn decode_kv(&self, kv: &KeyValue) -> Option<(Vip, VipOwner)> {
        let key = String::from_utf8_lossy(kv.key());
        let vip = match self.keys.vip_of(kv.key()) {
            Ok(v) => v,
            Err(reason) => {
                tracing::warn!(%key, %reason, "skipping foreign key under the store prefix");
                return None;
            }
        };
        match decode_owner(kv.value()) {
            Ok(o) => Some((vip, o)),
            Err(reason) => {
                tracing::warn!(%key, %reason, "skipping corrupt owner record");
                None
            }
        }
    }

    async fn snapshot(
        &self,
        client: &Client,
    ) -> Result<(Vec<(Vip, Option<VipOwner>)>, i64), StoreError> {
        let mut c = client.clone();
        let resp = self
            .timed(
                "read owners",
                c.get(self.keys.owners(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let owners = resp
            .kvs()
            .iter()
            .filter_map(|kv| self.decode_kv(kv))
            .map(|(v, o)| (v, Some(o)))
            .collect();
        Ok((owners, revision))
    }

    /// One connection's life: restore, snapshot, then follow the watch until it fails.
    async fn session(
        &self,
        sink: &InputSink,
        cancel: &CancellationToken,
        backoff: &mut Duration,
        reported_down: &mut bool,
    ) -> Result<SessionEnd, StoreError> {
        let client = self.client().await?;
        let mut keeper = None;
        // A lease that expired during the outage is found here and replaced.
        self.keep_lease_alive(&client, &mut keeper).await?;
        self.restore_published().await?;
        let (owners, revision) = self.snapshot(&client).await?;
        let mut c = client.clone();
        let mut watch: WatchStream = self
            .timed(
                "watch owners",
                c.watch(
                    self.keys.owners(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision + 1),
                    ),
                ),
            )
            .await?;
        tracing::info!(endpoints = %self.settings.describe(), revision, owners = owners.len(), "store connected");
        let up = Input::StoreHealth {
            healthy: true,
            detail: self.settings.describe(),
        };
        if sink.send(up).await.is_err() || sink.send(Input::OwnerSnapshot(owners)).await.is_err() {
            return Ok(SessionEnd::SinkClosed);
        }
        *backoff = BACKOFF_MIN;
        *reported_down = false;
        let mut tick = tokio::time::interval((self.lease_ttl / 3).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(SessionEnd::Cancelled),
                _ = tick.tick() => self.keep_lease_alive(&client, &mut keeper).await?,
                msg = watch.message() => {
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return Err(unavailable("watch", "stream ended")),
                        Err(e) => return Err(unavailable("watch", self.settings.scrub(&e.to_string()))),
                    };
                    if resp.compact_revision() > 0 {
                        tracing::warn!(compacted = resp.compact_revision(), "watch fell behind a compaction; resynchronising");
                        return Ok(SessionEnd::Resync);
                    }
                    if resp.canceled() {
                        return Err(unavailable("watch", format!("cancelled by the server: {}", resp.cancel_reason())));
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let change = match ev.event_type() {
                            EventType::Put => self.decode_kv(kv).map(|(vip, o)| (vip, Some(o))),
                            EventType::Delete => match self.keys.vip_of(kv.key()) {
                                Ok(vip) => Some((vip, None)),
                                Err(_) => None,
                            },
                        };
                        if let Some((vip, owner)) = change
                            && sink.send(Input::OwnerChanged { vip, owner }).await.is_err()
                        {
                            return Ok(SessionEnd::SinkClosed);
                        }
                    }
                }
            }
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
        let mut backoff = BACKOFF_MIN;
        let mut reported_down = false;
        loop {
            let end = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.session(&sink, &cancel, &mut backoff, &mut reported_down) => r,
            };
            match end {
                Ok(SessionEnd::Cancelled) | Ok(SessionEnd::SinkClosed) => return,
                Ok(SessionEnd::Resync) => continue,
                Err(e) => {
                    let detail = self.settings.scrub(&e.to_string());
                    tracing::warn!(endpoints = %self.settings.describe(), error = %detail, retry_in = ?backoff, "store unavailable");
                    self.reset_client().await;
                    // Reported once per outage; the core keeps its last known state.
                    if !reported_down {
                        reported_down = true;
                        let down = Input::StoreHealth {
                            healthy: false,
                            detail,
                        };
                        if sink.send(down).await.is_err() {
                            return;
                        }
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn publish(&self, vip: Vip) -> Result<VipOwner, StoreError> {
        self.published().insert(vip);
        let r = self.publish_with(vip, Claim::Takeover).await;
        if matches!(r, Err(StoreError::Fenced { .. })) {
            // Another node won the race with a newer epoch; do not fight it later.
            self.published().remove(&vip);
        }
        r
    }

    async fn withdraw(&self, vip: Vip) -> Result<(), StoreError> {
        // Forget it first: even if etcd is unreachable now, never restore it later.
        self.published().remove(&vip);
        let client = self.client().await?;
        for _ in 0..3 {
            let view = self.view(&client, vip).await?;
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
