//! Keeps the agent's long-running tasks alive, and says so.
//!
//! A task that stops on its own while the agent runs is a fault. Nothing may go silently
//! deaf: an address watcher that quit would let a VIP move unseen.
//! - Tasks whose state lives outside them (the backends' loops, the guard keeper, the
//!   policy follower, metrics) are **restarted** with backoff. Each restart starts from a
//!   fresh read: the address watcher dumps the addresses again, the store takes a snapshot.
//! - Tasks that own state nothing else holds (the core loop, the API server) are
//!   **essential**. When one stops, the agent shuts down with the reason, and
//!   `run_until_signal` returns an error, so the process exits non-zero and systemd restarts
//!   it. The kernel guard stays in place meanwhile.
//!
//! The core loop also beats a heartbeat. A core that is alive but stuck stops beating, and
//! the `runtime` health part turns unhealthy.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::error;

use super::status::HealthView;
use crate::metrics::Metrics;

/// First wait before a restart; doubled after each failure up to [`RESTART_MAX`].
const RESTART_MIN: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(5);
/// A task that ran this long before stopping starts its backoff afresh.
const STEADY_RUN: Duration = Duration::from_secs(30);
/// How often the core loop beats even when nothing happens.
pub(crate) const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A heartbeat older than this makes the runtime unhealthy: the core is stuck.
const HEARTBEAT_LIMIT: Duration = Duration::from_secs(5);

/// One supervised task, as health reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TaskRecord {
    /// Whether its being down makes the agent unfit to hold a VIP (the metrics endpoint
    /// does not).
    for_failover: bool,
    running: bool,
    restarts: u32,
    /// Why it stopped last time.
    last_exit: Option<String>,
}

#[derive(Debug, Default)]
struct Board {
    tasks: BTreeMap<&'static str, TaskRecord>,
    /// Set when an essential task stopped: the agent is shutting down for it.
    fatal: Option<String>,
    heartbeat: Option<Instant>,
    /// The `runtime` health part as last reported (keeps `since` across reads).
    view: Option<HealthView>,
}

/// Spawns supervised tasks on the agent's tracker and keeps their record.
#[derive(Clone)]
pub(crate) struct Supervisor {
    tracker: TaskTracker,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
    board: Arc<Mutex<Board>>,
}

/// Why one run of a task ended, in words for the log and the health detail.
async fn outcome<F>(fut: F) -> String
where
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
        Ok(Ok(())) => "stopped on its own".into(),
        Ok(Err(e)) => e,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            format!("panicked: {what}")
        }
    }
}

impl Supervisor {
    pub(crate) fn new(
        tracker: TaskTracker,
        cancel: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Supervisor {
        Supervisor {
            tracker,
            cancel,
            metrics,
            board: Arc::new(Mutex::new(Board {
                heartbeat: Some(Instant::now()),
                ..Board::default()
            })),
        }
    }

    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `make()` until the agent is cancelled; each time it stops (returns, fails or
    /// panics) it is started again after a backoff. While it waits, the runtime is
    /// unhealthy.
    pub(crate) fn restart<M, F>(&self, name: &'static str, make: M)
    where
        M: Fn() -> F + Send + 'static,
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.keep(name, true, make)
    }

    /// Like [`Supervisor::restart`], for a task the failover does not depend on: its
    /// restarts are reported, but do not make the runtime unhealthy.
    pub(crate) fn restart_aside<M, F>(&self, name: &'static str, make: M)
    where
        M: Fn() -> F + Send + 'static,
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.keep(name, false, make)
    }

    fn keep<M, F>(&self, name: &'static str, for_failover: bool, make: M)
    where
        M: Fn() -> F + Send + 'static,
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        // At zero from the start: an alert on `increase()` sees the first restart too.
        let _ = self
            .metrics
            .task_restarts
            .get_or_create(&crate::metrics::TaskLabel { task: name.into() });
        self.board().tasks.insert(
            name,
            TaskRecord {
                for_failover,
                running: true,
                restarts: 0,
                last_exit: None,
            },
        );
        let this = self.clone();
        self.tracker.spawn(async move {
            let mut backoff = RESTART_MIN;
            loop {
                let started = Instant::now();
                let why = tokio::select! {
                    _ = this.cancel.cancelled() => return,
                    why = outcome(make()) => why,
                };
                if this.cancel.is_cancelled() {
                    return;
                }
                if started.elapsed() >= STEADY_RUN {
                    backoff = RESTART_MIN;
                }
                error!(task = name, reason = %why, retry_in = ?backoff, "task stopped; restarting it");
                this.metrics
                    .task_restarts
                    .get_or_create(&crate::metrics::TaskLabel { task: name.into() })
                    .inc();
                this.set(name, |t| {
                    t.running = false;
                    t.last_exit = Some(why);
                });
                tokio::select! {
                    _ = this.cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RESTART_MAX);
                this.set(name, |t| {
                    t.running = true;
                    t.restarts += 1;
                });
            }
        });
    }

    /// Runs an essential task once. If it stops before the agent is cancelled, the agent
    /// shuts down with the reason (see [`Supervisor::fatal`]).
    pub(crate) fn essential<F>(&self, name: &'static str, fut: F)
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.board().tasks.insert(
            name,
            TaskRecord {
                for_failover: true,
                running: true,
                restarts: 0,
                last_exit: None,
            },
        );
        let this = self.clone();
        self.tracker.spawn(async move {
            let why = outcome(fut).await;
            if this.cancel.is_cancelled() {
                return;
            }
            error!(task = name, reason = %why, "essential task stopped; shutting the agent down");
            this.set(name, |t| {
                t.running = false;
                t.last_exit = Some(why.clone());
            });
            this.board()
                .fatal
                .get_or_insert_with(|| format!("{name} {why}"));
            this.cancel.cancel();
        });
    }

    fn set(&self, name: &'static str, f: impl FnOnce(&mut TaskRecord)) {
        if let Some(t) = self.board().tasks.get_mut(name) {
            f(t);
        }
    }

    /// The core loop is alive and turning.
    pub(crate) fn beat(&self) {
        self.board().heartbeat = Some(Instant::now());
    }

    /// Why the agent is shutting down, if an essential task took it down.
    pub(crate) fn fatal(&self) -> Option<String> {
        self.board().fatal.clone()
    }

    /// The `runtime` health part: every task running and the core's heartbeat fresh.
    /// Restarts that have already recovered are mentioned but do not make it unhealthy.
    pub(crate) fn health(&self) -> HealthView {
        let mut board = self.board();
        let mut problems = Vec::new();
        let mut notes = Vec::new();
        if let Some(f) = &board.fatal {
            problems.push(format!("shutting down: {f}"));
        }
        if let Some(beat) = board.heartbeat {
            let silent = beat.elapsed();
            if silent > HEARTBEAT_LIMIT {
                problems.push(format!(
                    "core loop silent for {}",
                    humantime::format_duration(Duration::from_millis(silent.as_millis() as u64))
                ));
            }
        }
        for (name, t) in &board.tasks {
            let last = t
                .last_exit
                .as_ref()
                .map(|w| format!(", last: {w}"))
                .unwrap_or_default();
            if !t.running && t.for_failover {
                problems.push(format!(
                    "{name} down, restarting ({} restarts{last})",
                    t.restarts
                ));
            } else if !t.running {
                notes.push(format!(
                    "{name} down, restarting ({} restarts{last})",
                    t.restarts
                ));
            } else if t.restarts > 0 {
                notes.push(format!("{name} restarted {} times{last}", t.restarts));
            }
        }
        let healthy = problems.is_empty();
        problems.extend(notes);
        let view = board.view.get_or_insert_with(|| {
            let mut v = HealthView::new("tasks", "");
            v.healthy = true;
            v
        });
        view.report(healthy, problems.join("; "));
        view.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn supervisor() -> (Supervisor, CancellationToken) {
        let cancel = CancellationToken::new();
        let s = Supervisor::new(TaskTracker::new(), cancel.clone(), Arc::new(Metrics::new()));
        (s, cancel)
    }

    fn health(s: &Supervisor) -> HealthView {
        s.health()
    }

    /// Lets spawned tasks run until they wait on time again.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_task_is_restarted_with_growing_waits_and_reported_meanwhile() {
        let (s, cancel) = supervisor();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        s.restart("addrwatch", move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(format!("netlink: dump failed ({n})"))
                } else {
                    std::future::pending().await
                }
            }
        });
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let h = health(&s);
        assert!(!h.healthy);
        assert!(
            h.detail.contains(
                "addrwatch down, restarting (0 restarts, last: netlink: dump failed (0))"
            ),
            "{}",
            h.detail
        );
        // 100 ms, then 200 ms, then 400 ms between runs.
        tokio::time::advance(Duration::from_millis(100)).await;
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        tokio::time::advance(Duration::from_millis(150)).await;
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "the second wait is longer");
        tokio::time::advance(Duration::from_millis(50)).await;
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        tokio::time::advance(Duration::from_millis(400)).await;
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        let h = health(&s);
        assert!(h.healthy, "{}", h.detail);
        assert_eq!(
            h.detail,
            "addrwatch restarted 3 times, last: netlink: dump failed (2)"
        );
        assert_eq!(
            s.metrics
                .task_restarts
                .get_or_create(&crate::metrics::TaskLabel {
                    task: "addrwatch".into()
                })
                .get(),
            3
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_and_the_panic_named() {
        let (s, cancel) = supervisor();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        s.restart("keying", move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("unexpected VICI answer");
                }
                std::future::pending::<Result<(), String>>().await
            }
        });
        settle().await;
        assert!(
            health(&s)
                .detail
                .contains("panicked: unexpected VICI answer")
        );
        tokio::time::advance(RESTART_MIN).await;
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert!(health(&s).healthy);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn an_essential_task_that_stops_takes_the_agent_down_with_the_reason() {
        let (s, cancel) = supervisor();
        s.essential("core", async { panic!("index out of bounds") });
        tokio::time::timeout(Duration::from_secs(1), cancel.cancelled())
            .await
            .expect("the agent is cancelled");
        assert_eq!(
            s.fatal().as_deref(),
            Some("core panicked: index out of bounds")
        );
        let h = health(&s);
        assert!(!h.healthy);
        assert!(h.detail.starts_with("shutting down: core panicked"));
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_at_cancellation_is_not_a_fault() {
        let (s, cancel) = supervisor();
        let c = cancel.clone();
        s.essential("api", async move {
            c.cancelled().await;
            Ok(())
        });
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let c = cancel.clone();
        s.restart("store", move || {
            r.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            async move {
                c.cancelled().await;
                Ok(())
            }
        });
        settle().await;
        cancel.cancel();
        s.tracker.close();
        s.tracker.wait().await;
        assert_eq!(s.fatal(), None);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_metrics_endpoint_that_cannot_bind_is_reported_but_leaves_the_node_fit() {
        let (s, cancel) = supervisor();
        s.restart_aside("metrics", || async {
            Err("metrics endpoint 127.0.0.1:9464: address in use".to_string())
        });
        settle().await;
        let h = health(&s);
        assert!(h.healthy, "{}", h.detail);
        assert!(
            h.detail.starts_with("metrics down, restarting"),
            "{}",
            h.detail
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_core_makes_the_runtime_unhealthy_until_it_beats_again() {
        let (s, _cancel) = supervisor();
        s.beat();
        tokio::time::advance(HEARTBEAT_LIMIT - Duration::from_millis(1)).await;
        assert!(health(&s).healthy);
        tokio::time::advance(Duration::from_secs(2)).await;
        let h = health(&s);
        assert!(!h.healthy);
        assert!(
            h.detail.starts_with("core loop silent for 6s"),
            "{}",
            h.detail
        );
        s.beat();
        assert!(health(&s).healthy);
    }
}
