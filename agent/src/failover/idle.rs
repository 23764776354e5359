//! The fast-failover idle detector (the NLBSFlags idea, in seconds instead of minutes).
//!
//! A peer is idle when traffic keeps going out on its SA and nothing comes back for the
//! idle timeout. A link with no traffic at all is not idle: nobody is waiting for an
//! answer, so there is nothing to recover and no reason to tear a healthy SA down.

use std::time::Duration;

use tokio::time::Instant;

use crate::model::TrafficCounters;

#[derive(Debug, Clone, Default)]
pub struct IdleDetector {
    last: Option<TrafficCounters>,
    /// When outbound traffic was first seen without any inbound traffic since.
    unanswered_since: Option<Instant>,
}

impl IdleDetector {
    /// Forgets everything, e.g. when a new SA replaces the old one.
    pub fn reset(&mut self) {
        *self = IdleDetector::default();
    }

    pub fn unanswered_since(&self) -> Option<Instant> {
        self.unanswered_since
    }

    /// Feeds one sample; returns how long the peer has been silent once that reaches
    /// `timeout`.
    pub fn observe(
        &mut self,
        now: Instant,
        counters: TrafficCounters,
        timeout: Duration,
    ) -> Option<Duration> {
        let prev = self.last.replace(counters)?;
        let went_backwards = counters.packets_in < prev.packets_in
            || counters.packets_out < prev.packets_out
            || counters.bytes_in < prev.bytes_in
            || counters.bytes_out < prev.bytes_out;
        if went_backwards {
            // Counters of a different SA (rekeyed or replaced): start over from here.
            self.unanswered_since = None;
            return None;
        }
        let inbound = counters.packets_in > prev.packets_in || counters.bytes_in > prev.bytes_in;
        let outbound =
            counters.packets_out > prev.packets_out || counters.bytes_out > prev.bytes_out;
        if inbound {
            self.unanswered_since = None;
            return None;
        }
        if outbound && self.unanswered_since.is_none() {
            self.unanswered_since = Some(now);
        }
        let since = self.unanswered_since?;
        let silent = now.saturating_duration_since(since);
        (silent >= timeout).then_some(silent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(out: u64, inn: u64) -> TrafficCounters {
        TrafficCounters {
            bytes_in: inn * 100,
            bytes_out: out * 100,
            packets_in: inn,
            packets_out: out,
        }
    }

    const T: Duration = Duration::from_secs(2);

    #[test]
    fn outbound_without_inbound_for_the_timeout_is_idle() {
        let t0 = Instant::now();
        let mut d = IdleDetector::default();
        assert_eq!(d.observe(t0, c(10, 10), T), None);
        assert_eq!(
            d.observe(t0 + Duration::from_millis(250), c(11, 10), T),
            None
        );
        assert_eq!(
            d.observe(t0 + Duration::from_millis(1500), c(14, 10), T),
            None
        );
        // No further outbound growth is still no answer.
        assert_eq!(
            d.observe(t0 + Duration::from_millis(2000), c(14, 10), T),
            None
        );
        assert_eq!(
            d.observe(t0 + Duration::from_millis(2250), c(15, 10), T),
            Some(T)
        );
    }

    #[test]
    fn an_idle_link_with_no_traffic_is_never_idle() {
        let t0 = Instant::now();
        let mut d = IdleDetector::default();
        for i in 0..100 {
            assert_eq!(
                d.observe(t0 + Duration::from_millis(250 * i), c(10, 10), T),
                None
            );
        }
    }

    #[test]
    fn an_answer_resets_the_clock() {
        let t0 = Instant::now();
        let mut d = IdleDetector::default();
        d.observe(t0, c(0, 0), T);
        d.observe(t0 + Duration::from_millis(250), c(1, 0), T);
        d.observe(t0 + Duration::from_millis(1900), c(2, 1), T);
        assert_eq!(
            d.observe(t0 + Duration::from_millis(2300), c(3, 1), T),
            None
        );
        assert_eq!(
            d.observe(t0 + Duration::from_millis(4200), c(4, 1), T),
            None
        );
        assert!(
            d.observe(t0 + Duration::from_millis(4400), c(4, 1), T)
                .is_some()
        );
    }

    #[test]
    fn counters_going_backwards_start_over() {
        let t0 = Instant::now();
        let mut d = IdleDetector::default();
        d.observe(t0, c(50, 50), T);
        d.observe(t0 + Duration::from_millis(250), c(51, 50), T);
        assert_eq!(d.observe(t0 + Duration::from_secs(3), c(1, 0), T), None);
        assert_eq!(d.unanswered_since(), None);
    }
}
