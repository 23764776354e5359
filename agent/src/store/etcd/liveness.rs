//! Whether the etcd member behind a watch still answers, when nothing moves.
//!
//! A front-end's watches carry nothing while no VIP moves, so a member that died without
//! closing the connection (a crash of its machine, a cut cable) would leave them silent
//! for good. HTTP/2 pings could tell, but etcd closes a connection pinged more often than
//! its `--grpc-keepalive-min-time` (5 s by default) while it has nothing to send. So a
//! watch that has been quiet for `store.keepalive_interval` asks etcd itself for its
//! progress (an answer from etcd's watch loop, which also proves more than a transport
//! ping), and one that gets no answer within `store.request_timeout` is given up.

use std::time::Duration;

use tokio::time::Instant;

/// What to do about one watch stream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    /// Nothing yet.
    Wait,
    /// Quiet for long enough: send a progress request.
    Ask,
    /// Asked this long ago and nothing came back: the member is gone.
    Gone(Duration),
}

/// One watch stream's silence, in pure state (the session loop does the I/O).
#[derive(Debug, Clone)]
pub(super) struct Liveness {
    quiet: Duration,
    answer: Duration,
    heard: Instant,
    asked: Option<Instant>,
}

impl Liveness {
    /// `quiet`: how long the stream may be silent before it is asked; `answer`: how long
    /// the answer may take.
    pub(super) fn new(now: Instant, quiet: Duration, answer: Duration) -> Liveness {
        Liveness {
            quiet,
            answer,
            heard: now,
            asked: None,
        }
    }

    /// Any message on the stream (events, a progress answer): the member answers.
    pub(super) fn heard(&mut self, now: Instant) {
        self.heard = now;
        self.asked = None;
    }

    /// A progress request went out.
    pub(super) fn asked(&mut self, now: Instant) {
        self.asked = Some(now);
    }

    /// When [`Liveness::check`] has something to say next.
    pub(super) fn due(&self) -> Instant {
        match self.asked {
            Some(at) => at + self.answer,
            None => self.heard + self.quiet,
        }
    }

    pub(super) fn check(&self, now: Instant) -> Check {
        match self.asked {
            Some(at) if now.saturating_duration_since(at) >= self.answer => {
                Check::Gone(now.saturating_duration_since(at))
            }
            Some(_) => Check::Wait,
            None if now.saturating_duration_since(self.heard) >= self.quiet => Check::Ask,
            None => Check::Wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_quiet_stream_is_asked_and_given_up_only_without_an_answer() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, ms(1000), ms(500));
        assert_eq!(l.check(t0 + ms(999)), Check::Wait);
        assert_eq!(l.due(), t0 + ms(1000));
        assert_eq!(l.check(t0 + ms(1000)), Check::Ask);
        l.asked(t0 + ms(1000));
        // Asked once: not again while the answer may still come.
        assert_eq!(l.check(t0 + ms(1400)), Check::Wait);
        assert_eq!(l.due(), t0 + ms(1500));
        assert_eq!(l.check(t0 + ms(1500)), Check::Gone(ms(500)));
    }

    #[test]
    fn an_answer_or_an_event_starts_the_quiet_period_again() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, ms(1000), ms(500));
        l.asked(t0 + ms(1000));
        l.heard(t0 + ms(1200));
        assert_eq!(l.check(t0 + ms(1600)), Check::Wait);
        assert_eq!(l.due(), t0 + ms(2200));
        // Events keep it from ever asking.
        l.heard(t0 + ms(2100));
        assert_eq!(l.check(t0 + ms(2200)), Check::Wait);
    }
}
