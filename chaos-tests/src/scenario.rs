//! One fault against the VIP's owner, measured: when the VIP reached the other back-end
//! (keepalived's takeover), when each front-end first got an answer from the new owner
//! (recovery), clear text on the wire, and answers from a node that no longer owns the VIP.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use vipsec_testbed::process::wait_for;

use crate::clock::{now_ns, secs, since};
use crate::lab::addr_events::AddrEvents;
use crate::lab::cleartext::ClearText;
use crate::lab::faults::Fault;
use crate::lab::probe::ProbeRecord;
use crate::lab::topology::{has_usable_addr, held_addrs};
use crate::lab::{Lab, Role};

/// How long the probe keeps watching after recovery for answers from the old owner.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub setup: String,
    pub fault: Fault,
    pub from: String,
    pub to: String,
    /// CLOCK_MONOTONIC ns when the fault was injected.
    pub fault_at: u64,
    /// Fault to every VIP present on the new owner: the kernel's announcement of the last
    /// one (for a killed agent under Pacemaker, the VIP seen back on a node).
    pub takeover: Option<Duration>,
    /// Fault to VIP usable on the new owner: for IPv6, duplicate address detection done
    /// (the address no longer `tentative`); for IPv4 the same as `takeover`.
    pub takeover_usable: Option<Duration>,
    /// Fault to the first answer from the new owner on every front-end for every VIP; None
    /// when the cap passed first.
    pub recovery: Option<Duration>,
    /// The same per front-end (and per VIP when there are several, `fe1→192.0.2.101`).
    pub per_flow: BTreeMap<String, Option<Duration>>,
    pub vips: usize,
    pub cap: Duration,
    /// Clear-text packets on the bridge from the fault to the end of the observation.
    pub cleartext: ClearText,
    /// The clear-text packets themselves, as tcpdump printed them (each bridged packet shows
    /// once per hub port it entered).
    pub cleartext_seen: Vec<String>,
    /// Answers from a node other than the new owner after recovery (or after takeover when
    /// nothing recovered).
    pub stale_answers: usize,
    /// Probe records from one second before the fault to the end of the observation.
    #[serde(skip)]
    pub timeline: Vec<ProbeRecord>,
}

impl Outcome {
    pub fn recovery_minus_takeover(&self) -> Option<Duration> {
        Some(self.recovery?.saturating_sub(self.takeover?))
    }

    /// Flows still without an answer from the new owner.
    pub fn unrecovered(&self) -> Vec<&str> {
        self.per_flow
            .iter()
            .filter(|(_, d)| d.is_none())
            .map(|(k, _)| k.as_str())
            .collect()
    }

    pub fn summary(&self) -> String {
        let opt = |d: Option<Duration>| d.map(secs).unwrap_or_else(|| "never".into());
        let stuck = self.unrecovered();
        let stuck = if self.vips > 1 && !stuck.is_empty() && stuck.len() < self.per_flow.len() {
            format!(
                " ({} of {} flows never recovered: {})",
                stuck.len(),
                self.per_flow.len(),
                stuck.join(" ")
            )
        } else {
            String::new()
        };
        format!(
            "{} {} {}->{}: takeover {}, recovery {}{}{stuck}, clear text {} packets, stale answers {}",
            self.setup,
            self.fault.name(),
            self.from,
            self.to,
            opt(self.takeover),
            opt(self.recovery),
            if self.recovery.is_none() {
                format!(" (no recovery within {})", secs(self.cap))
            } else {
                String::new()
            },
            self.cleartext.total(),
            self.stale_answers
        )
    }
}

/// Names one probed flow: the front-end, and the VIP when the lab has several.
pub fn flow_key(fe: &str, vip: impl std::fmt::Display, many: bool) -> String {
    if many {
        format!("{fe}→{vip}")
    } else {
        fe.to_string()
    }
}

/// Injects `fault` on the current owner and measures until every front-end recovered or
/// `cap` passed. The lab must be steady; call [`Lab::reset`] between runs.
pub fn run(lab: &mut Lab, fault: Fault, cap: Duration) -> anyhow::Result<Outcome> {
    run_with(lab, fault, cap, |_| Ok(()))
}

/// [`run`], with `meanwhile` done right after the fault is injected (a second fault during
/// the failover, e.g. killing a front-end's agent); the times still count from the fault.
pub fn run_with(
    lab: &mut Lab,
    fault: Fault,
    cap: Duration,
    meanwhile: impl FnOnce(&mut Lab) -> anyhow::Result<()>,
) -> anyhow::Result<Outcome> {
    let from = lab.wait_owner(Duration::from_secs(10))?;
    let mut to = lab
        .names(Role::BackEnd)
        .into_iter()
        .find(|n| *n != from)
        .expect("two back-ends");
    lab.poll_probes()?;
    let clear_before = lab.cleartext()?;
    // Listening before the fault: the takeover is the kernel's announcement of the VIPs
    // on the node the cluster manager moves them to.
    let arrivals = match fault {
        Fault::AgentKilled => None,
        _ => Some(AddrEvents::open(&lab.topo.node(&to).ns)?),
    };
    // A VIP the node holds already (two holders at the fault) is taken over at once.
    let held = match &arrivals {
        Some(_) => held_addrs(&lab.topo.node(&to).ns, &lab.vips)?,
        None => Vec::new(),
    };
    let fault_at = now_ns();
    if let Some(a) = &arrivals {
        a.already_held(&held, fault_at);
    }
    let fault_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    lab.inject(fault, &from, &to)?;
    lab.progress
        .step(&format!("{} on {from}: fault injected", fault.name()));
    meanwhile(lab)?;

    // Answers that count for recovery: from the new owner, after the fault; when the
    // cluster manager may put the VIP back where it was, after it came back.
    let mut answers_from = fault_at;
    // A failed instrument costs this run its takeover, not the whole grid.
    let arrival = |usable: bool| {
        let arrivals = arrivals.as_ref()?;
        match arrivals.wait_all(&lab.vips, usable, fault_at + cap.as_nanos() as u64) {
            Ok(t) => t.map(|t| since(fault_at, t)),
            Err(e) => {
                lab.progress.step(&format!("takeover not timed: {e:#}"));
                None
            }
        }
    };
    let takeover = if arrivals.is_some() {
        arrival(false)
    } else {
        // Pacemaker recovers the failed agent's resource in place by default (the VIP's
        // group restarts on the same node, or moves when the node may not run the agent):
        // the new owner is whoever holds the VIP once it is back.
        let gone = wait_for("the VIP to leave its owner", cap, || {
            (lab.owner().as_deref() != Some(from.as_str())).then_some(())
        });
        let back = gone.ok().and_then(|()| {
            wait_for("the VIP back on a node", cap, || {
                lab.owner().map(|o| (o, now_ns()))
            })
            .ok()
        });
        back.map(|(owner, t)| {
            to = owner;
            answers_from = t;
            since(fault_at, t)
        })
    };
    let to = to;
    let takeover_usable = match takeover {
        Some(_) if lab.vips.iter().any(|v| v.is_ipv6()) => {
            if arrivals.is_some() {
                arrival(true)
            } else {
                // A killed agent's VIP came back on a node found only now: poll it.
                let node = lab.topo.node(&to);
                let vips = lab.vips.clone();
                wait_for("the VIPs usable on the new owner", cap, || {
                    vips.iter()
                        .all(|&v| has_usable_addr(&node.ns, v))
                        .then(now_ns)
                })
                .ok()
                .map(|t| since(fault_at, t))
            }
        }
        t => t,
    };
    drop(arrivals);
    lab.progress.step(&match takeover {
        Some(d) => format!("VIP on {to} after {}", secs(d)),
        None => format!("VIP never reached {to}"),
    });

    let deadline = fault_at + cap.as_nanos() as u64;
    let many = lab.vips.len() > 1;
    let mut per_flow: BTreeMap<String, Option<Duration>> = BTreeMap::new();
    for fe in lab.names(Role::FrontEnd) {
        for &vip in &lab.vips {
            per_flow.insert(flow_key(&fe, vip, many), None);
        }
    }
    loop {
        lab.poll_probes()?;
        for p in lab.probes() {
            for r in p
                .records
                .iter()
                .filter(|r| r.end >= answers_from && r.node.as_deref() == Some(to.as_str()))
            {
                let key = flow_key(&p.fe, r.target.ip(), many);
                let slot = per_flow.get_mut(&key).expect("a probed flow");
                let d = since(fault_at, r.end);
                if slot.is_none_or(|old| d < old) {
                    *slot = Some(d);
                }
            }
        }
        if per_flow.values().all(Option::is_some) || now_ns() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (key, d) in &per_flow {
        if let Some(d) = d {
            lab.progress
                .step(&format!("{key} answered by {to} after {}", secs(*d)));
        }
    }
    let recovery = per_flow
        .values()
        .copied()
        .collect::<Option<Vec<_>>>()
        .and_then(|v| v.into_iter().max());
    if recovery.is_none() {
        lab.progress
            .step(&format!("no recovery within {}", secs(cap)));
    }

    // Watch a little longer for answers from the node that lost the VIP.
    let watch_from = fault_at + recovery.or(takeover).unwrap_or_default().as_nanos() as u64;
    let settle_until = now_ns() + SETTLE.as_nanos() as u64;
    while now_ns() < settle_until {
        std::thread::sleep(Duration::from_millis(50));
    }
    lab.poll_probes()?;
    let end = now_ns();
    let cleartext = lab.cleartext()?.minus(clear_before);
    let cleartext_seen = if cleartext.total() > 0 {
        // tcpdump writes a moment after the counter moved.
        let _ = wait_for("tcpdump's lines", Duration::from_secs(2), || {
            (!lab.cleartext_packets_since(fault_wall).is_empty()).then_some(())
        });
        lab.cleartext_packets_since(fault_wall)
    } else {
        Vec::new()
    };
    let window_start = fault_at.saturating_sub(1_000_000_000);
    let mut timeline: Vec<ProbeRecord> = lab
        .probes()
        .iter()
        .flat_map(|p| p.records.iter())
        .filter(|r| r.start >= window_start && r.start <= end)
        .cloned()
        .collect();
    timeline.sort_by_key(|r| r.start);
    let stale_answers = timeline
        .iter()
        .filter(|r| r.start > watch_from && r.ok() && r.node.as_deref() != Some(to.as_str()))
        .count();
    Ok(Outcome {
        setup: lab.setup.name().to_string(),
        fault,
        from,
        to,
        fault_at,
        takeover,
        takeover_usable,
        recovery,
        per_flow,
        vips: lab.vips.len(),
        cap,
        cleartext,
        cleartext_seen,
        stale_answers,
        timeline,
    })
}
