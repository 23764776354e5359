//! The move lane: feeds the timeline recorder what the core is told and asks for, publishes
//! this node's marks to the store one write at a time (each write carries all of a move's
//! marks, so an older write can never replace a newer one), and follows each move this
//! node took part in until the store holds its whole timeline, then emits `move-completed`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use super::events::EventSink;
use crate::failover::{Action, Input};
use crate::model::{Vip, unix_ms};
use crate::store::OwnershipStore;
use crate::timeline::{NodeMarks, Recorder};

/// Moves per VIP the recorder keeps in memory.
const MOVES_IN_MEMORY: usize = 16;
/// How long a move is followed before it is reported as it stands.
pub const MOVE_FOLLOW_LIMIT: Duration = Duration::from_secs(30);
/// The store is read again after `MOVE_POLL`, then less and less often, up to
/// `MOVE_POLL_MAX`. A planned move completes within a second or so; a crash's never does
/// (nobody released the VIP) and is followed to the limit. A poll every 200 ms cost a
/// front-end whose 100 VIPs moved at once 500 reads of every VIP's marks a second for 30 s:
/// a quarter of its CPU after the move.
const MOVE_POLL: Duration = Duration::from_millis(200);
const MOVE_POLL_MAX: Duration = Duration::from_secs(2);
/// Retries of one publication while the store is briefly away.
const PUBLISH_ATTEMPTS: u32 = 5;

/// The recorder, shared with the API: it answers `ListMoves` from memory while the store
/// is away.
pub type SharedRecorder = Arc<Mutex<Recorder>>;

pub fn shared_recorder(node: &str, hosted: &[Vip], peers: &[Vip]) -> SharedRecorder {
    Arc::new(Mutex::new(Recorder::new(
        node,
        hosted,
        peers,
        MOVES_IN_MEMORY,
    )))
}

pub(super) struct MoveLane {
    recorder: SharedRecorder,
    publish: mpsc::UnboundedSender<NodeMarks>,
}

impl MoveLane {
    pub(super) fn new(
        node: &str,
        recorder: SharedRecorder,
        store: Arc<dyn OwnershipStore>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
        sink: EventSink,
    ) -> MoveLane {
        let (publish, rx) = mpsc::unbounded_channel();
        let t = tracker.clone();
        tracker.spawn(
            publisher(store, rx, t, cancel, sink, node.to_string()).instrument(info_span!("moves")),
        );
        MoveLane { recorder, publish }
    }

    pub(super) fn input(&mut self, input: &Input) {
        let marks = self
            .recorder()
            .observe_input(unix_ms(SystemTime::now()), input);
        self.send(marks);
    }

    pub(super) fn action(&mut self, action: &Action) {
        let marks = self
            .recorder()
            .observe_action(unix_ms(SystemTime::now()), action);
        self.send(marks);
    }

    fn recorder(&self) -> std::sync::MutexGuard<'_, Recorder> {
        self.recorder.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, marks: Vec<NodeMarks>) {
        for m in marks {
            debug!(vip = %m.vip, epoch = m.epoch, marks = ?m.marks, "move marks");
            let _ = self.publish.send(m);
        }
    }
}

async fn publisher(
    store: Arc<dyn OwnershipStore>,
    mut rx: mpsc::UnboundedReceiver<NodeMarks>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    sink: EventSink,
    node: String,
) {
    let mut followed: BTreeSet<(Vip, u64)> = BTreeSet::new();
    loop {
        let marks = tokio::select! {
            _ = cancel.cancelled() => return,
            m = rx.recv() => match m { Some(m) => m, None => return },
        };
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=PUBLISH_ATTEMPTS {
            match store.publish_marks(&marks).await {
                Ok(()) => break,
                Err(e) if attempt == PUBLISH_ATTEMPTS => {
                    warn!(vip = %marks.vip, epoch = marks.epoch, error = %e, "move marks not published")
                }
                Err(_) => {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay *= 2;
                }
            }
        }
        if followed.insert((marks.vip, marks.epoch)) {
            // Only recent moves matter; the set stays small.
            if followed.len() > 256 {
                let oldest = *followed.iter().next().expect("not empty");
                followed.remove(&oldest);
            }
            let (s, c, sink, me) = (store.clone(), cancel.clone(), sink.clone(), node.clone());
            tracker.spawn(
                follow(s, marks.vip, marks.epoch, c, sink, me)
                    .instrument(info_span!("move", vip = %marks.vip, epoch = marks.epoch)),
            );
        }
    }
}

/// Waits until the store holds the whole move, or the limit; then reports it. The new
/// owner alone feeds the metrics, so a move counts once however many nodes saw it.
async fn follow(
    store: Arc<dyn OwnershipStore>,
    vip: Vip,
    epoch: u64,
    cancel: CancellationToken,
    sink: EventSink,
    node: String,
) {
    let deadline = tokio::time::Instant::now() + MOVE_FOLLOW_LIMIT;
    let mut last = None;
    let mut poll = MOVE_POLL;
    loop {
        if let Ok(Some(t)) = store.move_timeline(vip, epoch).await {
            let complete = t.complete();
            last = Some(t);
            if complete {
                break;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until((tokio::time::Instant::now() + poll).min(deadline)) => {}
        }
        poll = next_poll(poll);
    }
    let Some(t) = last else {
        return;
    };
    if t.to_node == node {
        sink.metrics().record_move(&t);
    }
    sink.emit_move(t);
}

/// The wait before the next read of a followed move: half as long again, at most
/// `MOVE_POLL_MAX`.
fn next_poll(poll: Duration) -> Duration {
    (poll + poll / 2).min(MOVE_POLL_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_followed_move_is_read_less_and_less_often_within_its_limit() {
        let mut poll = MOVE_POLL;
        let mut at = Duration::ZERO;
        let mut reads = 1;
        while at < MOVE_FOLLOW_LIMIT {
            at += poll;
            poll = next_poll(poll);
            reads += 1;
        }
        assert_eq!(poll, MOVE_POLL_MAX);
        // Every 200 ms for the whole limit was 150 reads.
        assert!(reads <= 25, "{reads} reads");
        // The first reads still come quickly: a planned move is seen complete soon.
        assert!(MOVE_POLL + next_poll(MOVE_POLL) < Duration::from_millis(600));
    }
}
