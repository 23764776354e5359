//! Shared by the chaos scenarios: lab construction, one lab at a time per test binary (the
//! machine has two cores; parallel labs would distort each other's timings), wall time.

#![allow(dead_code)]

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use vipsec_chaos::clock::now_ns;
use vipsec_testbed::process::wait_for;

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

/// The owner record an agent's `status --json` holds for `vip`, hosted or peer:
/// (node, epoch).
pub fn recorded_owner(status: &Value, vip: &str) -> Option<(String, u64)> {
    let entry = status["peer_vips"]
        .as_array()
        .into_iter()
        .chain(status["hosted_vips"].as_array())
        .flatten()
        .find(|v| v["address"] == vip)?;
    let owner = &entry["owner"];
    Some((
        owner["node"].as_str()?.to_string(),
        owner["epoch"].as_u64()?,
    ))
}

/// Whether an agent's `status --json` says its store answers.
pub fn store_healthy(status: &Value) -> bool {
    status["store"]["healthy"] == true
}

/// Seconds since the epoch, as tcpdump stamps its lines.
pub fn wall_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// The `guard` object of `vip`'s entry (hosted or peer) in `vipsec status --json`.
pub fn vip_guard(status: &Value, vip: IpAddr) -> Option<&Value> {
    let address = vip.to_string();
    status["hosted_vips"]
        .as_array()
        .into_iter()
        .chain(status["peer_vips"].as_array())
        .flatten()
        .find(|v| v["address"] == address.as_str())
        .map(|v| &v["guard"])
}

/// Polls `node`'s status until fail-secure is engaged and `vip`'s guard is `held` (from
/// `source`, when given). Returns when that was seen (CLOCK_MONOTONIC ns), or what the
/// node showed last.
pub fn wait_guard_held(
    lab: &Lab,
    node: &str,
    vip: IpAddr,
    source: Option<&str>,
    cap: Duration,
) -> Result<u64, String> {
    let mut last = String::from("no status");
    wait_for(&format!("{node}'s guard for {vip} held"), cap, || {
        let s = match lab.agent_json(node, &["status"]) {
            Ok(s) => s,
            Err(e) => {
                last = format!("{e:#}");
                return None;
            }
        };
        let guard = vip_guard(&s, vip).cloned().unwrap_or(Value::Null);
        let engaged = &s["fail_secure"]["engaged"];
        last = format!("fail_secure.engaged {engaged}, guard {guard}");
        let held = *engaged == true
            && guard["state"] == "held"
            && source.is_none_or(|src| guard["source"] == src);
        held.then(now_ns)
    })
    .map_err(|e| format!("{e}; {node} showed {last}"))
}
