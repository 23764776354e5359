//! CLOCK_MONOTONIC in nanoseconds. The clock is shared by every network namespace on the
//! machine, so probe records written inside a node and fault times taken by the lab line up.

use std::time::Duration;

/// Nanoseconds on CLOCK_MONOTONIC.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `later - earlier` as a Duration (zero if `later` is earlier).
pub fn since(earlier: u64, later: u64) -> Duration {
    Duration::from_nanos(later.saturating_sub(earlier))
}

/// Seconds with millisecond precision, for reports.
pub fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}
