//! What the core hears from etcd: health, a snapshot after every (re)connection, then the
//! watch from the snapshot's revision + 1, so no change falls between the two.

use std::time::Duration;

use etcd_client::{
    Client, EventType, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::keys::{decode_owner, holder_followers};
use super::liveness::{Check, Liveness};
use super::{BACKOFF_MAX, BACKOFF_MIN, EtcdStore, SessionEnd, unavailable};
use crate::InputSink;
use crate::failover::Input;
use crate::model::{Vip, VipOwner};
use crate::store::StoreError;

/// Where each watch resumes after a reconnection: the last revision it delivered (`None`:
/// take a snapshot first).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Resume {
    owners: Option<i64>,
    holders: Option<i64>,
}

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

    /// Owner records and holder marks, read at one revision.
    pub(super) async fn snapshot(
        &self,
        client: &Client,
    ) -> Result<(Vec<(Vip, Option<VipOwner>)>, Vec<(Vip, String, u32)>, i64), StoreError> {
        let mut c = client.clone();
        let txn = Txn::new().and_then([
            TxnOp::get(self.keys.owners(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(self.keys.holders(), Some(GetOptions::new().with_prefix())),
        ]);
        let resp = self.timed("read owners", c.txn(txn)).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let owners = gets
            .next()
            .map(|g| {
                g.kvs()
                    .iter()
                    .filter_map(|kv| self.decode_kv(kv))
                    .map(|(v, o)| (v, Some(o)))
                    .collect()
            })
            .unwrap_or_default();
        let holders = gets
            .next()
            .map(|g| {
                g.kvs()
                    .iter()
                    .filter_map(|kv| {
                        let (vip, node) = self.decode_holder(kv.key())?;
                        Some((vip, node, holder_followers(kv.value())))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((owners, holders, revision))
    }

    fn decode_holder(&self, key: &[u8]) -> Option<(Vip, String)> {
        match self.keys.holder_of(key) {
            Ok(h) => Some(h),
            Err(reason) => {
                tracing::warn!(key = %String::from_utf8_lossy(key), %reason, "skipping foreign key under the holders prefix");
                None
            }
        }
    }

    /// One connection's life: restore, then follow the watches until they fail. The
    /// first session starts from a snapshot; a later one resumes each watch right after
    /// the last revision it delivered, so the core hears every change made while the
    /// watch moved (a record that came and went included), not only the end state. A
    /// resume point that etcd compacted away falls back to a snapshot.
    pub(super) async fn session(
        &self,
        sink: &InputSink,
        cancel: &CancellationToken,
        backoff: &mut Duration,
        reported_down: &mut bool,
        resume: &mut Resume,
    ) -> Result<SessionEnd, StoreError> {
        let client = self.client().await?;
        // A record that expired during the outage is put back (the lease loop finds lost
        // leases too; this is the quick path after a reconnection).
        self.restore_published().await?;
        let mut snapshots = None;
        if let (Some(o), Some(h)) = (resume.owners, resume.holders) {
            // A store that came back with an older revision (a new cluster, or a restore
            // without a revision bump) would never deliver the revisions we wait for.
            let mut c = client.clone();
            let now = self
                .timed(
                    "read revision",
                    c.get(
                        self.keys.owners(),
                        Some(GetOptions::new().with_count_only()),
                    ),
                )
                .await?
                .header()
                .map_or(0, |h| h.revision());
            if now < o.max(h) {
                tracing::warn!(
                    revision = now,
                    resume_from = o.max(h),
                    "the store's revision went back; taking a snapshot"
                );
                *resume = Resume::default();
            }
        }
        let (owners_from, holders_from) = match (resume.owners, resume.holders) {
            (Some(o), Some(h)) => (o + 1, h + 1),
            _ => {
                let (owners, holders, revision) = self.snapshot(&client).await?;
                snapshots = Some((owners, holders));
                *resume = Resume {
                    owners: Some(revision),
                    holders: Some(revision),
                };
                (revision + 1, revision + 1)
            }
        };
        let from = |rev: i64| WatchOptions::new().with_prefix().with_start_revision(rev);
        let mut c = client.clone();
        let mut watch: WatchStream = self
            .timed(
                "watch owners",
                c.watch(self.keys.owners(), Some(from(owners_from))),
            )
            .await?;
        let mut holder_watch: WatchStream = self
            .timed(
                "watch holders",
                c.watch(self.keys.holders(), Some(from(holders_from))),
            )
            .await?;
        tracing::info!(
            endpoints = %self.settings.describe(),
            member = %self.settings.member_name(self.member_now()),
            from = owners_from,
            resumed = snapshots.is_none(),
            "store connected"
        );
        let up = Input::StoreHealth {
            healthy: true,
            detail: self.settings.describe(),
        };
        if sink.send(up).await.is_err() {
            return Ok(SessionEnd::SinkClosed);
        }
        if let Some((owners, holders)) = snapshots
            && (sink.send(Input::OwnerSnapshot(owners)).await.is_err()
                || sink.send(Input::HoldersSnapshot(holders)).await.is_err())
        {
            return Ok(SessionEnd::SinkClosed);
        }
        *backoff = BACKOFF_MIN;
        *reported_down = false;
        let now = Instant::now();
        let mut owners_alive = Liveness::new(now, self.quiet, self.timeout);
        let mut holders_alive = owners_alive.clone();
        loop {
            let due = owners_alive.due().min(holders_alive.due());
            tokio::select! {
                _ = cancel.cancelled() => return Ok(SessionEnd::Cancelled),
                _ = tokio::time::sleep_until(due) => {
                    let now = Instant::now();
                    for (name, alive, stream) in [
                        ("watch", &mut owners_alive, &mut watch),
                        ("holder watch", &mut holders_alive, &mut holder_watch),
                    ] {
                        match alive.check(now) {
                            Check::Wait => {}
                            Check::Ask => {
                                stream.request_progress().await.map_err(|e| {
                                    unavailable(name, self.settings.scrub(&e.to_string()))
                                })?;
                                alive.asked(now);
                            }
                            Check::Gone(after) => {
                                return Err(unavailable(
                                    name,
                                    format!("quiet, and no answer to a progress request within {after:?}"),
                                ));
                            }
                        }
                    }
                }
                msg = holder_watch.message() => {
                    holders_alive.heard(Instant::now());
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return Err(unavailable("holder watch", "stream ended")),
                        Err(e) => return Err(unavailable("holder watch", self.settings.scrub(&e.to_string()))),
                    };
                    if resp.compact_revision() > 0 {
                        tracing::warn!(compacted = resp.compact_revision(), "holder watch fell behind a compaction; resynchronising");
                        *resume = Resume::default();
                        return Ok(SessionEnd::Resync);
                    }
                    if resp.canceled() {
                        return Err(unavailable("holder watch", format!("cancelled by the server: {}", resp.cancel_reason())));
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        resume.holders = resume.holders.max(Some(kv.mod_revision()));
                        let Some((vip, node)) = self.decode_holder(kv.key()) else { continue };
                        let holds = ev.event_type() == EventType::Put;
                        let followers = if holds { holder_followers(kv.value()) } else { 0 };
                        if sink.send(Input::HolderChanged { vip, node, holds, followers }).await.is_err() {
                            return Ok(SessionEnd::SinkClosed);
                        }
                    }
                }
                msg = watch.message() => {
                    owners_alive.heard(Instant::now());
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return Err(unavailable("watch", "stream ended")),
                        Err(e) => return Err(unavailable("watch", self.settings.scrub(&e.to_string()))),
                    };
                    if resp.compact_revision() > 0 {
                        tracing::warn!(compacted = resp.compact_revision(), "watch fell behind a compaction; resynchronising");
                        *resume = Resume::default();
                        return Ok(SessionEnd::Resync);
                    }
                    if resp.canceled() {
                        return Err(unavailable("watch", format!("cancelled by the server: {}", resp.cancel_reason())));
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        resume.owners = resume.owners.max(Some(kv.mod_revision()));
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
        let mut resume = Resume::default();
        loop {
            let member = self.member_now();
            let end = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.session(&sink, &cancel, &mut backoff, &mut reported_down, &mut resume) => r,
            };
            match end {
                Ok(SessionEnd::Cancelled) | Ok(SessionEnd::SinkClosed) => return,
                Ok(SessionEnd::Resync) => continue,
                Err(e) => {
                    let detail = self.settings.scrub(&e.to_string());
                    tracing::warn!(endpoints = %self.settings.describe(), error = %detail, retry_in = ?backoff, "store unavailable");
                    self.reset_client(member).await;
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
