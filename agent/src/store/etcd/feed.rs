//! What the core hears from etcd: health, a snapshot after every (re)connection, then the
//! watch from the snapshot's revision + 1, so no change falls between the two.

use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions, WatchStream};
use tokio_util::sync::CancellationToken;

use super::keys::decode_owner;
use super::{BACKOFF_MAX, BACKOFF_MIN, EtcdStore, SessionEnd, unavailable};
use crate::InputSink;
use crate::failover::Input;
use crate::model::{Vip, VipOwner};
use crate::store::StoreError;

impl EtcdStore {
    pub(super) fn decode_kv(&self, kv: &KeyValue) -> Option<(Vip, VipOwner)> {
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

    pub(super) async fn snapshot(
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
    pub(super) async fn session(
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

    /// The body of `run`: sessions one after another, with backoff between failures.
    pub(super) async fn follow(&self, sink: InputSink, cancel: CancellationToken) {
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
}
