//! Shared by the chaos scenarios: lab construction, one lab at a time per test binary (the
//! machine has two cores; parallel labs would distort each other's timings), wall time.

#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vipsec_chaos::lab::faults::Fault;
use vipsec_chaos::lab::{Lab, LabOptions, Progress, Setup};
use vipsec_chaos::scenario::{self, Outcome};

static ONE_LAB: Mutex<()> = Mutex::new(());

/// Holds the lab lock and reports the test's wall time when dropped.
pub struct Running {
    name: &'static str,
    start: Instant,
    _lock: MutexGuard<'static, ()>,
}

pub fn start(name: &'static str) -> Running {
    let lock = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    Running {
        name,
        start: Instant::now(),
        _lock: lock,
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        eprintln!(
            "[wall time] {}: {:.1} s",
            self.name,
            self.start.elapsed().as_secs_f64()
        );
    }
}

pub fn options(setup: Setup) -> LabOptions {
    LabOptions::new(setup, env!("CARGO_BIN_EXE_vipsec-chaos"))
}

pub fn lab(setup: Setup) -> Lab {
    build(options(setup))
}

pub fn build(opts: LabOptions) -> Lab {
    Lab::build(opts, Progress::new(true)).unwrap_or_else(|e| panic!("lab: {e:#}"))
}

/// Runs `fault` once and prints the outcome.
pub fn run(lab: &mut Lab, fault: Fault, cap: Duration) -> Outcome {
    let o = scenario::run(lab, fault, cap).unwrap_or_else(|e| panic!("scenario: {e:#}"));
    eprintln!("[outcome] {}", o.summary());
    o
}

/// What every scenario must show, whatever the set-up: no clear text on the wire, and no
/// answer from a node that no longer owns the VIP once traffic moved.
pub fn assert_safe(o: &Outcome) {
    assert_eq!(
        o.cleartext.total(),
        0,
        "protected traffic crossed the wire in clear text: {}\n{}",
        o.summary(),
        o.cleartext_seen.join("\n")
    );
    assert_eq!(
        o.stale_answers,
        0,
        "a node that lost the VIP still answered: {}",
        o.summary()
    );
    assert!(
        o.takeover.is_some(),
        "keepalived never moved the VIP: {}",
        o.summary()
    );
}

/// Recovery within a generous bound (it did not hang), to the node that now owns the VIP.
pub fn assert_recovered(o: &Outcome, bound: Duration) {
    let r = o
        .recovery
        .unwrap_or_else(|| panic!("no recovery within {:?}: {}", o.cap, o.summary()));
    assert!(r <= bound, "recovery took {r:?}: {}", o.summary());
}
