//! The renegotiation retry schedule: exponential from `initial` to `max`, bounded by a
//! deadline per cycle.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySchedule {
    pub initial: Duration,
    pub max: Duration,
    /// One renegotiation cycle gives up this long after it started.
    pub deadline: Duration,
    /// Pause before a new cycle starts after one gave up.
    pub cooldown: Duration,
}

impl RetrySchedule {
    /// Wait before attempt `attempt + 1`, after attempt `attempt` (1-based) failed.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(20);
        self.initial.saturating_mul(1u32 << shift).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let s = RetrySchedule {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
            deadline: Duration::from_secs(30),
            cooldown: Duration::from_secs(5),
        };
        let delays: Vec<_> = (1..=7).map(|a| s.delay_after(a).as_millis()).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(s.delay_after(u32::MAX), Duration::from_secs(1));
    }
}
