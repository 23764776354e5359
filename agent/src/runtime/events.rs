//! Where failover events go: the log, the metrics and the `WatchEvents` subscribers.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::failover::{Notice, NoticeKind};
use crate::metrics::Metrics;
use crate::timeline::MoveTimeline;

/// A failover event with the time it happened, as streamed by `WatchEvents`.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub at: SystemTime,
    pub node: String,
    pub notice: Notice,
    /// Set on a `move-completed` event: the move's timeline as the store holds it. Its
    /// `notice` then only carries the VIP, the new owner, the epoch, the recovery time and
    /// the summary (the core has no notice kind for it; the kind is not shown).
    pub moved: Option<Arc<MoveTimeline>>,
}

/// Hands every event to the log, the metrics and the subscribers.
#[derive(Clone)]
pub(crate) struct EventSink {
    events: broadcast::Sender<EventRecord>,
    metrics: Arc<Metrics>,
    node: String,
}

impl EventSink {
    pub(crate) fn new(
        events: broadcast::Sender<EventRecord>,
        metrics: Arc<Metrics>,
        node: &str,
    ) -> EventSink {
        EventSink {
            events,
            metrics,
            node: node.to_string(),
        }
    }

    pub(crate) fn emit(&self, notice: Notice) {
        let vip = notice
            .vip
            .map(|v: IpAddr| v.to_string())
            .unwrap_or_default();
        let (event, owner, epoch, duration, detail) = (
            notice.kind.as_str(),
            &notice.owner,
            notice.epoch,
            &notice.duration,
            &notice.detail,
        );
        match notice.kind {
            NoticeKind::ActionFailed
            | NoticeKind::RenegotiationFailed
            | NoticeKind::KeyingDown
            | NoticeKind::StoreDown => {
                warn!(event, vip, ?owner, epoch, ?duration, %detail, "failover event")
            }
            _ => info!(event, vip, ?owner, epoch, ?duration, %detail, "failover event"),
        }
        self.metrics.record(&notice);
        let _ = self.events.send(EventRecord {
            at: SystemTime::now(),
            node: self.node.clone(),
            notice,
            moved: None,
        });
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A move is over (every mark in the store) or was followed for as long as it may be.
    pub(crate) fn emit_move(&self, t: MoveTimeline) {
        let summary = t.summary();
        let (vip, epoch, complete) = (t.vip.to_string(), t.epoch, t.complete());
        info!(event = "move-completed", vip, epoch, complete, %summary, "move timeline");
        let mut notice = Notice::new(NoticeKind::OwnerChanged, Some(t.vip))
            .epoch(t.epoch)
            .detail(summary);
        notice.owner = Some(t.to_node.clone());
        notice.duration = t.recovery();
        let _ = self.events.send(EventRecord {
            at: SystemTime::now(),
            node: self.node.clone(),
            notice,
            moved: Some(Arc::new(t)),
        });
    }
}
