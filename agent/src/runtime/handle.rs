//! What the API holds of the running agent: reads of its state, and the commands the core
//! decides. The backends stay behind these methods; no caller reaches the store or the
//! keying daemon on its own.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::warn;

use super::commands::{Command, CommandError};
use super::events::EventRecord;
use super::moves::SharedRecorder;
use super::policies::Policies;
use super::status::StatusView;
use super::supervise::Supervisor;
use crate::config::Config;
use crate::keying::{Keying, KeyingError};
use crate::logging::{LogControl, LogError};
use crate::metrics::Metrics;
use crate::model::{IkeSaInfo, Mode, Vip};
use crate::store::{OwnershipStore, StoreError};
use crate::timeline::MoveTimeline;

#[derive(Clone)]
pub struct AgentHandle {
    pub(super) config: Arc<Config>,
    pub(super) keying: Arc<dyn Keying>,
    pub(super) log: Option<Arc<LogControl>>,
    pub(super) metrics: Arc<Metrics>,
    /// The policy runtime, when `policy.managed`.
    pub(super) policies: Option<Policies>,
    /// For move timelines and drills.
    pub(super) store: Arc<dyn OwnershipStore>,
    /// This node's own marks of recent moves, for when the store is away.
    pub(super) recorder: SharedRecorder,
    pub(super) status: watch::Receiver<StatusView>,
    pub(super) events: broadcast::Sender<EventRecord>,
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) supervisor: Supervisor,
}

/// `SetLogLevel` on an agent without a reloadable filter, or with a bad one.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("this agent runs without a reloadable log filter")]
    NotReloadable,
    #[error(transparent)]
    Filter(#[from] LogError),
}

impl AgentHandle {
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The policy runtime, when this node manages policies.
    pub fn policies(&self) -> Option<&Policies> {
        self.policies.as_ref()
    }

    pub fn status(&self) -> StatusView {
        let mut s = self.status.borrow().clone();
        // Read live: a core loop that stopped turning cannot report that itself.
        s.runtime = self.supervisor.health();
        // The pacer keeps this gauge current; the core's status only changes on its inputs.
        s.initiations_queued = self.metrics.initiations_queued.get().max(0) as u32;
        // So does the store's retry loop: a write ownership depends on that has not taken
        // effect for longer than a lease is what an operator must hear about.
        let stuck: Vec<String> = self
            .store
            .pending_writes()
            .iter()
            .filter(|w| w.pending_for > self.config.store.lease_ttl)
            .map(|w| {
                format!(
                    "{} of {} pending for {} ({} attempts{})",
                    w.write,
                    w.vip,
                    humantime::format_duration(Duration::from_millis(
                        w.pending_for.as_millis() as u64
                    )),
                    w.attempts,
                    w.last_error
                        .as_ref()
                        .map(|e| format!(", last: {e}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        if !stuck.is_empty() {
            let mut detail = s.ownership.detail.clone();
            for w in stuck {
                if !detail.is_empty() {
                    detail.push_str("; ");
                }
                detail.push_str(&w);
            }
            s.ownership.report(false, detail);
        }
        s
    }

    pub fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.events.subscribe()
    }

    /// Wakes on every change of the core's status. Parts of [`status`](Self::status) are
    /// read live (tasks, store writes) and change without it: watchers poll as well.
    pub fn status_changes(&self) -> watch::Receiver<StatusView> {
        self.status.clone()
    }

    /// Waits until the status satisfies `f` (for tests and the lab), up to `timeout`.
    pub async fn wait_status(
        &self,
        timeout: Duration,
        f: impl Fn(&StatusView) -> bool,
    ) -> Option<StatusView> {
        let mut rx = self.status.clone();
        tokio::time::timeout(timeout, async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if f(&s) {
                        return Some(s.clone());
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    async fn command(&self, cmd: Command) -> Result<(), CommandError> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| CommandError::ShuttingDown)
    }

    /// Drains a hosted VIP: refuses new SAs, deletes the existing ones and withdraws the
    /// record. Answers the number of IKE_SAs deleted, once the delete the core decided for
    /// this drain has run.
    pub async fn drain(&self, vip: Vip) -> Result<u32, CommandError> {
        if !self.config.hosted_addresses().contains(&vip) {
            return Err(CommandError::NotHosted(vip));
        }
        let (reply, rx) = oneshot::channel();
        self.command(Command::Drain { vip, reply }).await?;
        rx.await.map_err(|_| CommandError::ShuttingDown)?
    }

    /// Switches the mode (and the idle timeout, if given); answers what is in force now.
    pub async fn set_mode(
        &self,
        mode: Mode,
        idle_timeout: Option<Duration>,
    ) -> Result<(Mode, Duration), CommandError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::SetMode {
            mode,
            idle_timeout,
            reply,
        })
        .await?;
        rx.await.map_err(|_| CommandError::ShuttingDown)
    }

    /// The keying daemon's SAs as it lists them now.
    pub async fn list_sas(&self) -> Result<Vec<IkeSaInfo>, KeyingError> {
        self.keying.list_sas().await
    }

    /// Recent moves (of one VIP, or all), from the store; from this node's own marks when
    /// the store is away, since what this node saw itself is still worth showing.
    pub async fn moves(&self, vip: Option<Vip>) -> Vec<MoveTimeline> {
        match self.store.moves(vip).await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "store unavailable; listing this node's own marks of recent moves");
                let local = self
                    .recorder
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .all_history();
                let local = local
                    .into_iter()
                    .filter(|m| vip.is_none_or(|v| v == m.vip))
                    .collect();
                MoveTimeline::merge_all(local)
            }
        }
    }

    /// The moves of `vip` as the store holds them (no local fallback: a drill judges what
    /// every node recorded).
    pub async fn recorded_moves(&self, vip: Vip) -> Result<Vec<MoveTimeline>, StoreError> {
        self.store.moves(Some(vip)).await
    }

    /// Replaces the log filter; answers the filter in force.
    pub fn set_log_level(&self, filter: &str) -> Result<String, LogLevelError> {
        let log = self.log.as_ref().ok_or(LogLevelError::NotReloadable)?;
        Ok(log.set(filter)?)
    }
}
