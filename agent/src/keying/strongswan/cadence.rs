//! When the next SA sample is due.
//!
//! Every sample lists every SA charon holds: with 100 SAs, four listings a second were
//! half of an idle front-end's CPU. While every peer VIP's traffic is answered (inbound
//! grew wherever outbound did) or there is none, nothing is building toward the idle
//! detector's timeout, and samples come every `calm` interval. As soon as one VIP shows
//! outbound traffic without inbound, or counters that start over (a new SA), they come
//! every `fast` interval until all is answered again.
//!
//! The price: a silence that starts just after a calm sample is first seen up to two
//! `calm` intervals after it began (the next sample still holds the answers that came
//! before it) instead of up to two `fast` ones, and the idle detector counts from that
//! sample, never from before it (no peer is declared idle early).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::{TrafficCounters, Vip};

#[derive(Debug)]
pub(super) struct Cadence {
    fast: Duration,
    calm: Duration,
    last: BTreeMap<Vip, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    counters: TrafficCounters,
    /// Outbound traffic went out and nothing came back since.
    unanswered: bool,
}

impl Cadence {
    pub fn new(fast: Duration, calm: Duration) -> Cadence {
        Cadence {
            fast,
            calm: calm.max(fast),
            last: BTreeMap::new(),
        }
    }

    /// Takes one sample's summed counters per peer VIP; returns the wait until the next.
    pub fn after(&mut self, sums: &BTreeMap<Vip, TrafficCounters>) -> Duration {
        let mut calm = true;
        let mut seen = BTreeMap::new();
        for (vip, now) in sums {
            let (steady, unanswered) = match self.last.get(vip) {
                Some(before) => step(before, now),
                None => (false, false),
            };
            calm &= steady && !unanswered;
            seen.insert(
                *vip,
                Seen {
                    counters: *now,
                    unanswered,
                },
            );
        }
        self.last = seen;
        if calm { self.calm } else { self.fast }
    }
}

/// Between two samples: whether the counters continue the same SA's, and whether traffic
/// that went out is still unanswered. Counters that went backwards belong to a new SA.
fn step(before: &Seen, now: &TrafficCounters) -> (bool, bool) {
    let b = &before.counters;
    let backwards = now.packets_in < b.packets_in
        || now.packets_out < b.packets_out
        || now.bytes_in < b.bytes_in
        || now.bytes_out < b.bytes_out;
    if backwards {
        return (false, false);
    }
    let inbound = now.packets_in > b.packets_in || now.bytes_in > b.bytes_in;
    let outbound = now.packets_out > b.packets_out || now.bytes_out > b.bytes_out;
    let unanswered = !inbound && (outbound || before.unanswered);
    (true, unanswered)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_millis(250);
    const CALM: Duration = Duration::from_secs(1);

    fn sums(pairs: &[(u8, u64, u64)]) -> BTreeMap<Vip, TrafficCounters> {
        pairs
            .iter()
            .map(|&(last_octet, out, inn)| {
                (
                    format!("192.0.2.{last_octet}").parse().unwrap(),
                    TrafficCounters {
                        bytes_in: inn * 100,
                        bytes_out: out * 100,
                        packets_in: inn,
                        packets_out: out,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn answered_traffic_is_sampled_calmly_and_an_unanswered_vip_hurries_the_next_sample() {
        let mut c = Cadence::new(FAST, CALM);
        // Nothing to compare with yet.
        assert_eq!(c.after(&sums(&[(1, 10, 10), (2, 0, 0)])), FAST);
        // Both ways on one VIP, nothing on the other.
        assert_eq!(c.after(&sums(&[(1, 20, 20), (2, 0, 0)])), CALM);
        // Outbound without inbound on one VIP.
        assert_eq!(c.after(&sums(&[(1, 30, 20), (2, 0, 0)])), FAST);
        assert_eq!(c.after(&sums(&[(1, 40, 20), (2, 0, 0)])), FAST);
        // No new outbound either: the silence is still unanswered, so the next sample
        // must not be late (the detector counts until an answer comes).
        assert_eq!(c.after(&sums(&[(1, 40, 20), (2, 0, 0)])), FAST);
        // Answered again.
        assert_eq!(c.after(&sums(&[(1, 50, 30), (2, 0, 0)])), CALM);
    }

    #[test]
    fn counters_that_start_over_and_new_vips_are_sampled_fast() {
        let mut c = Cadence::new(FAST, CALM);
        c.after(&sums(&[(1, 10, 10)]));
        assert_eq!(c.after(&sums(&[(1, 20, 20)])), CALM);
        assert_eq!(c.after(&sums(&[(1, 1, 1)])), FAST, "a new SA");
        assert_eq!(c.after(&sums(&[(1, 2, 2), (2, 5, 5)])), FAST, "a new VIP");
        assert_eq!(c.after(&sums(&[(1, 3, 3), (2, 6, 6)])), CALM);
    }

    #[test]
    fn a_calm_interval_shorter_than_the_fast_one_is_the_fast_one() {
        let mut c = Cadence::new(FAST, Duration::from_millis(100));
        c.after(&sums(&[(1, 1, 1)]));
        assert_eq!(c.after(&sums(&[(1, 1, 1)])), FAST);
    }
}
