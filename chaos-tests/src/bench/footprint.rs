//! The agent's footprint: resident memory (`VmRSS` of /proc/PID/status) and CPU time
//! (`utime + stime` of /proc/PID/stat, every thread of the process) sampled in the
//! background, and summarised over a window (steady state, or a fault to recovery).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use crate::clock::now_ns;

/// `VmRSS` in kB from /proc/PID/status.
pub fn parse_rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kb = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kb)
}

/// `utime + stime` in clock ticks from /proc/PID/stat. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, utime field 14, stime field 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`_SC_CLK_TCK`, 100 on Linux).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// CLOCK_MONOTONIC ns.
    pub at: u64,
    pub cpu_ticks: u64,
    pub rss_kb: u64,
}

/// One reading of a process, None once it is gone.
pub fn sample(pid: u32) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Sample {
        at: now_ns(),
        cpu_ticks: parse_cpu_ticks(&stat)?,
        rss_kb: parse_rss_kb(&status)?,
    })
}

/// A process's use over a window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Usage {
    /// CPU time over wall time, in percent of one core.
    pub cpu_percent: f64,
    /// The largest resident set seen in the window.
    pub rss_max_kb: u64,
    /// The window actually covered by samples.
    pub seconds: f64,
}

/// Use between `from` and `to` (CLOCK_MONOTONIC ns): from the last sample at or before
/// `from` (else the first after it) to the first at or after `to` (else the last before).
/// None without two distinct samples.
pub fn usage(samples: &[Sample], from: u64, to: u64, ticks_per_second: u64) -> Option<Usage> {
    let start = samples
        .iter()
        .rev()
        .find(|s| s.at <= from)
        .or_else(|| samples.iter().find(|s| s.at > from))?;
    let end = samples
        .iter()
        .find(|s| s.at >= to)
        .or_else(|| samples.iter().rev().find(|s| s.at < to))?;
    if end.at <= start.at {
        return None;
    }
    let seconds = (end.at - start.at) as f64 / 1e9;
    let cpu = end.cpu_ticks.saturating_sub(start.cpu_ticks) as f64 / ticks_per_second as f64;
    let rss_max_kb = samples
        .iter()
        .filter(|s| s.at >= start.at && s.at <= end.at)
        .map(|s| s.rss_kb)
        .max()?;
    Some(Usage {
        cpu_percent: cpu / seconds * 100.0,
        rss_max_kb,
        seconds,
    })
}

/// Samples some processes every `period` on a thread of its own until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<BTreeMap<String, Vec<Sample>>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// `pids`: a name (the node) and a process id each.
    pub fn start(pids: Vec<(String, u32)>, period: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples: Arc<Mutex<BTreeMap<String, Vec<Sample>>>> = Arc::default();
        let (s, out) = (stop.clone(), samples.clone());
        let take = move || {
            let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
            for (name, pid) in &pids {
                if let Some(x) = sample(*pid) {
                    out.entry(name.clone()).or_default().push(x);
                }
            }
        };
        take();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::park_timeout(period);
                take();
            }
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    /// Stops sampling (after one last sample) and returns every sample per name.
    pub fn finish(mut self) -> BTreeMap<String, Vec<Sample>> {
        self.halt();
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_text_parses() {
        let status = "Name:\tvipsec\nVmPeak:\t  200000 kB\nVmRSS:\t   14236 kB\nThreads:\t5\n";
        assert_eq!(parse_rss_kb(status), Some(14236));
        assert_eq!(parse_rss_kb("Name:\tkthreadd\n"), None);
        // A name with a space and a parenthesis; utime 17, stime 4.
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 17 4 0 0 20 0 7 0 123 456789 3559 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(21));
        assert_eq!(parse_cpu_ticks("4242 (short) S 1"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_cpu_ticks(&own).is_some(), "{own}");
        assert!(sample(std::process::id()).is_some_and(|s| s.rss_kb > 0));
    }

    #[test]
    fn usage_covers_the_window_with_the_nearest_samples() {
        let s = |at_ms: u64, cpu_ticks, rss_kb| Sample {
            at: at_ms * 1_000_000,
            cpu_ticks,
            rss_kb,
        };
        let samples = [
            s(0, 100, 10),
            s(1000, 101, 12),
            s(2000, 103, 20),
            s(3000, 150, 11),
        ];
        // 1.5 s into 2.5 s: from the sample at 1 s to the one at 3 s, 49 ticks in 2 s.
        let u = usage(&samples, 1_500_000_000, 2_500_000_000, 100).unwrap();
        assert_eq!(u.seconds, 2.0);
        assert!((u.cpu_percent - 24.5).abs() < 1e-9, "{u:?}");
        assert_eq!(u.rss_max_kb, 20);
        let idle = usage(&samples, 0, 2_000_000_000, 100).unwrap();
        assert!((idle.cpu_percent - 1.5).abs() < 1e-9, "{idle:?}");
        assert_eq!(usage(&samples[..1], 0, 10, 100), None);
    }
}
