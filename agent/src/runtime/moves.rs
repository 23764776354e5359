//! The move lane: feeds the timeline recorder what the core is told and asks for, publishes
//! this node's marks to the store one write at a time (each write carries all of a move's
//! marks, so an older write can never replace a newer one; marks queued meanwhile go in
//! the next write together), and follows each move this node took part in until the store
//! holds its whole timeline, then emits `move-completed`. A storm moves many VIPs at once:
//! their marks are written, and their timelines read, a few round trips at a time.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use super::events::EventSink;
use crate::failover::{Action, Input};
use crate::model::{Vip, unix_ms};
use crate::store::OwnershipStore;
use crate::timeline::{MoveTimeline, NodeMarks, Recorder};

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
/// How long a move handed to the follower is remembered: well past the follow limit, as
/// its last marks come within seconds of the move.
const FOLLOWED_KEPT: Duration = Duration::from_secs(2 * MOVE_FOLLOW_LIMIT.as_secs());
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
        let (follow, follow_rx) = mpsc::unbounded_channel();
        tracker.spawn(
            publisher(store.clone(), rx, follow, cancel.clone()).instrument(info_span!("moves")),
        );
        tracker.spawn(
            follower(store, follow_rx, cancel, sink, node.to_string())
                .instrument(info_span!("move-follower")),
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

/// Publishes marks as they come. Marks that queued while a write was out go together in
/// the next one, and only the latest of each move counts (it carries all the earlier):
/// a front-end whose 100 VIPs moved at once made some 400 writes one after another, on
/// the store every recovery waits for.
async fn publisher(
    store: Arc<dyn OwnershipStore>,
    mut rx: mpsc::UnboundedReceiver<NodeMarks>,
    follow: mpsc::UnboundedSender<(Vip, u64)>,
    cancel: CancellationToken,
) {
    // Moves handed to the follower, and when: a later mark of one is not followed again
    // (that would report it twice), while it can still be marked.
    let mut followed: HashMap<(Vip, u64), Instant> = HashMap::new();
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            m = rx.recv() => match m { Some(m) => m, None => return },
        };
        let mut latest = BTreeMap::new();
        latest.insert((first.vip, first.epoch), first);
        while let Ok(m) = rx.try_recv() {
            latest.insert((m.vip, m.epoch), m);
        }
        let batch: Vec<NodeMarks> = latest.into_values().collect();
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=PUBLISH_ATTEMPTS {
            match store.publish_marks_batch(&batch).await {
                Ok(()) => break,
                Err(e) if attempt == PUBLISH_ATTEMPTS => {
                    warn!(moves = batch.len(), error = %e, "move marks not published")
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
        let now = Instant::now();
        followed.retain(|_, since| now.saturating_duration_since(*since) < FOLLOWED_KEPT);
        for m in &batch {
            if let Entry::Vacant(e) = followed.entry((m.vip, m.epoch)) {
                e.insert(now);
                let _ = follow.send((m.vip, m.epoch));
            }
        }
    }
}

/// A move being followed until the store holds all of it.
struct Followed {
    deadline: Instant,
    next_read: Instant,
    poll: Duration,
    last: Option<MoveTimeline>,
}

/// Follows every move this node took part in until the store holds its whole timeline, or
/// the limit; then reports it. The moves due at once are read together.
async fn follower(
    store: Arc<dyn OwnershipStore>,
    mut rx: mpsc::UnboundedReceiver<(Vip, u64)>,
    cancel: CancellationToken,
    sink: EventSink,
    node: String,
) {
    let mut followed: BTreeMap<(Vip, u64), Followed> = BTreeMap::new();
    loop {
        let next = followed.values().map(|f| f.next_read).min();
        tokio::select! {
            _ = cancel.cancelled() => return,
            m = rx.recv() => {
                let Some(first) = m else { return };
                let now = Instant::now();
                let mut add = |key| {
                    followed.entry(key).or_insert(Followed {
                        deadline: now + MOVE_FOLLOW_LIMIT,
                        // Its marks were just written: nobody else's are there yet.
                        next_read: now + MOVE_POLL,
                        poll: MOVE_POLL,
                        last: None,
                    });
                };
                add(first);
                while let Ok(key) = rx.try_recv() {
                    add(key);
                }
                continue;
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
        }
        let now = Instant::now();
        let due: Vec<(Vip, u64)> = followed
            .iter()
            .filter(|(_, f)| f.next_read <= now)
            .map(|(k, _)| *k)
            .collect();
        let read = tokio::select! {
            _ = cancel.cancelled() => return,
            r = store.move_timelines(&due) => r,
        };
        let now = Instant::now();
        let mut read = match read {
            Ok(timelines) => timelines.into_iter(),
            Err(e) => {
                debug!(moves = due.len(), error = %e, "moves not read");
                Vec::new().into_iter()
            }
        };
        for key in due {
            // One answer per move asked, in order, whatever becomes of the move.
            let answer = read.next().flatten();
            let Some(f) = followed.get_mut(&key) else {
                continue;
            };
            if let Some(t) = answer {
                let complete = t.complete();
                f.last = Some(t);
                if complete {
                    report(followed.remove(&key).and_then(|f| f.last), &sink, &node);
                    continue;
                }
            }
            if now >= f.deadline {
                report(followed.remove(&key).and_then(|f| f.last), &sink, &node);
                continue;
            }
            f.next_read = (now + f.poll).min(f.deadline);
            f.poll = next_poll(f.poll);
        }
    }
}

/// Reports a followed move as it stands. The new owner alone feeds the metrics, so a move
/// counts once however many nodes saw it.
fn report(timeline: Option<MoveTimeline>, sink: &EventSink, node: &str) {
    let Some(t) = timeline else {
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
    use crate::InputSink;
    use crate::model::VipOwner;
    use crate::store::StoreError;
    use crate::timeline::Mark;

    /// Records each batch of marks it is asked to write; nothing else.
    #[derive(Default)]
    struct BatchLog(Mutex<Vec<Vec<NodeMarks>>>);

    #[async_trait::async_trait]
    impl OwnershipStore for BatchLog {
        fn kind(&self) -> &'static str {
            "test"
        }
        fn describe(&self) -> String {
            String::new()
        }
        async fn run(&self, _sink: InputSink, cancel: CancellationToken) {
            cancel.cancelled().await
        }
        async fn publish(&self, vip: Vip) -> Result<VipOwner, StoreError> {
            Err(StoreError::Other(format!("no records here ({vip})")))
        }
        async fn current(&self, _vip: Vip) -> Result<(Option<VipOwner>, u64), StoreError> {
            Ok((None, 0))
        }
        async fn mark_draining(&self, _vip: Vip) -> Result<(), StoreError> {
            Ok(())
        }
        async fn withdraw(&self, _vip: Vip) -> Result<(), StoreError> {
            Ok(())
        }
        async fn publish_marks_batch(&self, batch: &[NodeMarks]) -> Result<(), StoreError> {
            self.0.lock().unwrap().push(batch.to_vec());
            Ok(())
        }
    }

    fn marks(vip: Vip, upto: usize) -> NodeMarks {
        let steps = [
            Mark::InitiationQueued,
            Mark::FirstIkeSaInit,
            Mark::ChildSaInstalled,
        ];
        NodeMarks {
            vip,
            epoch: 4,
            node: "fe1".into(),
            from_node: Some("be1".into()),
            to_node: "be2".into(),
            marks: steps[..upto]
                .iter()
                .enumerate()
                .map(|(i, m)| (*m, i as u64))
                .collect(),
        }
    }

    #[tokio::test]
    async fn marks_queued_during_a_write_go_in_one_batch_the_latest_of_each_move() {
        let store = Arc::new(BatchLog::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let (follow_tx, mut follow_rx) = mpsc::unbounded_channel();
        let (a, b): (Vip, Vip) = (
            "192.0.2.100".parse().unwrap(),
            "192.0.2.101".parse().unwrap(),
        );
        // Queued while the publisher was busy: three writes of one move, two of another.
        for m in [
            marks(a, 1),
            marks(b, 1),
            marks(a, 2),
            marks(b, 2),
            marks(a, 3),
        ] {
            tx.send(m).unwrap();
        }
        let cancel = CancellationToken::new();
        let task = tokio::spawn(publisher(store.clone(), rx, follow_tx, cancel.clone()));
        let first = tokio::time::timeout(Duration::from_secs(5), follow_rx.recv())
            .await
            .expect("a move to follow")
            .unwrap();
        let second = follow_rx.recv().await.unwrap();
        assert_eq!([first, second], [(a, 4), (b, 4)]);
        // A later mark of a move already followed is written, not followed twice.
        tx.send(marks(b, 3)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while store.0.lock().unwrap().len() < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the second write");
        cancel.cancel();
        task.await.unwrap();
        assert!(follow_rx.try_recv().is_err());
        let batches = store.0.lock().unwrap().clone();
        assert_eq!(
            batches,
            vec![vec![marks(a, 3), marks(b, 2)], vec![marks(b, 3)]]
        );
    }

    /// A storm moves hundreds of VIPs: a late mark of the first move must not hand it to
    /// the follower again (it would be reported twice, and counted twice in the metrics).
    #[tokio::test]
    async fn a_late_mark_of_a_move_among_hundreds_is_not_followed_twice() {
        let store = Arc::new(BatchLog::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let (follow_tx, mut follow_rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(publisher(store.clone(), rx, follow_tx, cancel.clone()));
        let vips: Vec<Vip> = (0..300u32)
            .map(|i| Vip::from(std::net::Ipv4Addr::from(0xc000_0200 + i)))
            .collect();
        for v in &vips {
            tx.send(marks(*v, 1)).unwrap();
        }
        let mut handed = 0;
        while handed < vips.len() {
            tokio::time::timeout(Duration::from_secs(5), follow_rx.recv())
                .await
                .expect("every move handed to the follower")
                .unwrap();
            handed += 1;
        }
        tx.send(marks(vips[0], 3)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !store
                .0
                .lock()
                .unwrap()
                .iter()
                .flatten()
                .any(|m| *m == marks(vips[0], 3))
            {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the late mark written");
        cancel.cancel();
        task.await.unwrap();
        assert!(
            follow_rx.try_recv().is_err(),
            "the first move was followed twice"
        );
    }

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
