//! vipsec on a three-member etcd cluster (one member per node; every agent lists the three
//! client URLs) against the store's own faults: the leader killed with the VIP in place, at
//! the moment of a planned move and during an owner crash; one member cut off the network
//! with the VIP in place and then through a planned move; every member frozen for 3 s and
//! for 10 s; every member killed and restarted from its data directory, then a planned
//! move. Where the VIP stays put, a store fault costs no traffic: no failed connection, and
//! for the shorter faults the owner's epoch kept and (leader killed) the front-ends' IKE_SAs
//! kept. Where it moves, the new owner serves within a second of the takeover plus the
//! store's election, and the agents agree on it. Nothing ever leaves in clear text.
//!
//! Each test builds one lab and runs its scenarios in turn. Every result is printed, one
//! `[etcd-cluster]` JSON line per scenario and a table at the end, before the test fails
//! with all problems. `VIPSEC_CHAOS_RUNS=N` repeats every scenario N times. The ignored
//! `reference_*` tests run plain moves and whole-store outages on one member and on three,
//! for the numbers in docs/bench/etcd-cluster.md; `tools/bench --etcd-reference` runs them.
//! Needs the `vipsec` binary built in the same target directory (`cargo build -p vipsec`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use vipsec_chaos::clock::{now_ns, secs, since};
use vipsec_chaos::lab::charon::{FrontEndStyle, connection_name};
use vipsec_chaos::lab::cleartext::ClearText;
use vipsec_chaos::lab::etcd::CLIENT_PORT;
use vipsec_chaos::lab::faults::{self, Fault};
use vipsec_chaos::lab::{Lab, Role, Setup};
use vipsec_chaos::scenario::{self, Outcome};
use vipsec_testbed::process::wait_for;

const CAP: Duration = Duration::from_secs(20);
const VIP: &str = "192.0.2.100";
/// After a store fault ends, traffic is watched this long: past the agents' 2 s lease and
/// 1 s idle timeout, so an SA torn down or a record lost late still shows.
const WATCH: Duration = Duration::from_secs(4);
/// The judged bound: after a planned move with the store's leader gone, the new owner
/// serves within this of the takeover plus the store's election time.
const SERVE_SLACK: Duration = Duration::from_secs(1);
/// A failed attempt is written when it times out (500 ms after it started): attempts
/// that started longer ago than this are all on record.
const WRITTEN: Duration = Duration::from_millis(600);
/// How often the agents' view of the store is sampled while a fault lasts.
const SAMPLE: Duration = Duration::from_millis(100);
/// Agent log lines (warnings and errors) quoted per node and scenario.
const SHOWN_LOG_LINES: usize = 8;
/// Clear-text packets quoted in a failure.
const SHOWN_PACKETS: usize = 20;

/// What one scenario showed.
struct Report {
    scenario: String,
    members: usize,
    style: &'static str,
    /// Fault to the VIP on the new owner, and to every front-end answered by it.
    takeover: Option<Duration>,
    recovery: Option<Duration>,
    /// The store's election time: from the disruption to a leader the clients reach.
    election: Option<Duration>,
    /// Probe attempts in the scenario's window and how many of them failed.
    attempts: usize,
    failed: usize,
    cleartext: u64,
    /// IKE_SAs the front-ends' charons created in the window (from their unique ids).
    new_ike_sas: Option<u64>,
    /// The owner's epoch before and after, where the VIP stayed.
    epoch: Option<(u64, u64)>,
    /// When the agents were first and last seen reporting the store down (from the fault).
    store_down: Option<(Duration, Duration)>,
    /// From the end of a store fault (the kill, the cut, the thaw, the restart) to every
    /// agent seeing the store again: the store's recovery as the agents know it.
    store_back: Option<Duration>,
    problems: Vec<String>,
}

impl Report {
    fn new(lab: &Lab, scenario: &str) -> Report {
        Report {
            scenario: scenario.to_string(),
            members: lab.etcd_members().len(),
            style: lab.frontend_style().name(),
            takeover: None,
            recovery: None,
            election: None,
            attempts: 0,
            failed: 0,
            cleartext: 0,
            new_ike_sas: None,
            epoch: None,
            store_down: None,
            store_back: None,
            problems: Vec::new(),
        }
    }

    /// Keeps an error as a problem of this scenario and the value, if any.
    fn check<T>(&mut self, r: anyhow::Result<T>) -> Option<T> {
        r.map_err(|e| self.problems.push(format!("{e:#}"))).ok()
    }

    fn recovery_minus_takeover(&self) -> Option<Duration> {
        Some(self.recovery?.saturating_sub(self.takeover?))
    }

    /// What a move showed: takeover, recovery, stale answers.
    fn take_outcome(&mut self, o: &Outcome) {
        eprintln!("[outcome] {}", o.summary());
        self.takeover = o.takeover;
        self.recovery = o.recovery;
        if o.takeover.is_none() {
            self.problems.push("keepalived never moved the VIP".into());
        }
        if o.recovery.is_none() {
            self.problems.push(format!(
                "{} never served every front-end within {}: {:?}",
                o.to,
                secs(o.cap),
                o.unrecovered()
            ));
        }
        if o.stale_answers > 0 {
            self.problems.push(format!(
                "{} answers from {}, which had lost the VIP",
                o.stale_answers, o.from
            ));
        }
    }

    /// Where the VIP did not move, no attempt may fail.
    fn expect_no_failed(&mut self) {
        if self.failed > 0 {
            self.problems.push(format!(
                "{} of {} connections failed though the VIP never moved",
                self.failed, self.attempts
            ));
        }
    }

    fn json(&self) -> Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        json!({
            "scenario": self.scenario,
            "members": self.members,
            "style": self.style,
            "takeover_ms": ms(self.takeover),
            "recovery_ms": ms(self.recovery),
            "recovery_minus_takeover_ms": ms(self.recovery_minus_takeover()),
            "election_ms": ms(self.election),
            "attempts": self.attempts,
            "failed": self.failed,
            "cleartext": self.cleartext,
            "new_ike_sas": self.new_ike_sas,
            "epoch": self.epoch,
            "store_down_ms": self.store_down.map(|(a, b)| [a.as_millis() as u64, b.as_millis() as u64]),
            "store_back_ms": ms(self.store_back),
            "problems": self.problems.len(),
        })
    }
}

fn agent_nodes(lab: &Lab) -> Vec<String> {
    lab.names(Role::FrontEnd)
        .into_iter()
        .chain(lab.names(Role::BackEnd))
        .collect()
}

/// The IKE_SAs `fe`'s charon holds, from `swanctl --list-sas` (charon's own word, whatever
/// the agent makes of them): (unique id, state, connection).
fn ike_sas(lab: &Lab, fe: &str) -> anyhow::Result<Vec<(u64, String, String)>> {
    let out = lab.swanctl(fe, &["--list-sas"])?;
    // Each IKE_SA starts a line of its own: `vip100: #9, ESTABLISHED, IKEv2, ...`.
    Ok(out
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| {
            let (conn, rest) = l.split_once(": #")?;
            let mut fields = rest.split(", ");
            let id = fields.next()?.parse().ok()?;
            let state = fields.next()?.to_string();
            Some((id, state, conn.to_string()))
        })
        .collect())
}

/// The highest IKE_SA unique id among those `fe`'s charon lists; charon counts up, so the
/// difference over a window is how many IKE_SAs it created (as long as one is listed at
/// the end).
fn max_ike_id(lab: &Lab, fe: &str) -> Option<u64> {
    ike_sas(lab, fe).ok()?.iter().map(|(id, _, _)| *id).max()
}

/// The window of one scenario: clear-text counters, the front-ends' IKE_SA counters, the
/// agents' logs, all from just before the fault.
struct Window {
    t0: u64,
    wall: f64,
    clear: ClearText,
    ike: BTreeMap<String, Option<u64>>,
    logs: BTreeMap<String, usize>,
    charon_logs: BTreeMap<String, usize>,
}

/// A node's charon log, as far as it is written.
fn charon_log(lab: &Lab, node: &str) -> String {
    std::fs::read_to_string(vipsec_testbed::charon::log_in(&lab.node_dir_of(node)))
        .unwrap_or_default()
}

/// Agent log lines that say how a renegotiation went.
const RECOVERY_AGENT: &[&str] = &[
    "failover event",
    "initiation started",
    "CHILD_SA up",
    "dropped SAs",
    "initiate",
];
/// charon log lines that say how an IKE_SA_INIT exchange went: cookies, answers lost to
/// charon's own race, retransmissions, half-open limits.
const RECOVERY_CHARON: &[&str] = &[
    "COOKIE",
    "already processing",
    "retransmit",
    "initiating IKE_SA",
    "established between",
    "half-open",
    "deleting IKE_SA",
];

impl Window {
    fn open(lab: &mut Lab) -> Window {
        let ike = lab
            .names(Role::FrontEnd)
            .into_iter()
            .map(|fe| {
                let id = max_ike_id(lab, &fe);
                (fe, id)
            })
            .collect();
        let logs = agent_nodes(lab)
            .into_iter()
            .map(|n| {
                let len = lab.agent_log(&n).map(|l| l.len()).unwrap_or(0);
                (n, len)
            })
            .collect();
        let charon_logs = agent_nodes(lab)
            .into_iter()
            .map(|n| {
                let len = charon_log(lab, &n).len();
                (n, len)
            })
            .collect();
        let _ = lab.poll_probes();
        Window {
            t0: now_ns(),
            wall: common::wall_now(),
            clear: lab.cleartext().expect("clear-text counters"),
            ike,
            logs,
            charon_logs,
        }
    }

    /// Prints what every agent and charon logged since the window opened about its
    /// renegotiations and IKE exchanges: where a slow recovery spent its time.
    fn explain_recovery(&self, lab: &Lab, scenario: &str) {
        for (node, from) in &self.logs {
            let log = lab.agent_log(node).unwrap_or_default();
            for l in log.get(*from..).unwrap_or("").lines() {
                if RECOVERY_AGENT.iter().any(|k| l.contains(k)) {
                    eprintln!("[recovery] {scenario} {node} agent: {l}");
                }
            }
        }
        for (node, from) in &self.charon_logs {
            let log = charon_log(lab, node);
            for l in log.get(*from..).unwrap_or("").lines() {
                if RECOVERY_CHARON.iter().any(|k| l.contains(k)) {
                    eprintln!("[recovery] {scenario} {node} charon: {l}");
                }
            }
        }
    }

    /// Closes the window: counts failed attempts (answers from a node other than
    /// `owner`, when given, are problems), clear text and new IKE_SAs, and quotes what
    /// the agents warned about.
    fn close(self, lab: &mut Lab, r: &mut Report, owner: Option<&str>) {
        let end = now_ns().saturating_sub(WRITTEN.as_nanos() as u64);
        r.check(lab.poll_probes());
        let mut stale = Vec::new();
        for p in lab.probes() {
            for rec in p.since(self.t0).filter(|rec| rec.start <= end) {
                r.attempts += 1;
                if !rec.ok() {
                    r.failed += 1;
                }
                if let (Some(owner), Some(node)) = (owner, rec.node.as_deref())
                    && node != owner
                {
                    stale.push(format!("{} answered by {node}", rec.fe));
                }
            }
        }
        if !stale.is_empty() {
            r.problems.push(format!(
                "answers not from the owner {}: {stale:?}",
                owner.unwrap_or("-")
            ));
        }
        let leaked = lab.cleartext().expect("counters").minus(self.clear);
        r.cleartext = leaked.total();
        if leaked.total() > 0 {
            // tcpdump writes a moment after the counter moved.
            let lines = wait_for("tcpdump's lines", Duration::from_secs(2), || {
                let l = lab.cleartext_packets_since(self.wall);
                (!l.is_empty()).then_some(l)
            })
            .unwrap_or_default();
            r.problems.push(format!(
                "clear text on the wire: {leaked:?}; first of {} captured lines:\n{}",
                lines.len(),
                lines[..lines.len().min(SHOWN_PACKETS)].join("\n")
            ));
        }
        let mut created = Some(0);
        for (fe, before) in &self.ike {
            created = match (created, before, max_ike_id(lab, fe)) {
                (Some(n), Some(b), Some(a)) => Some(n + a.saturating_sub(*b)),
                _ => None,
            };
        }
        r.new_ike_sas = created;
        for (node, from) in &self.logs {
            let log = lab.agent_log(node).unwrap_or_default();
            let new = log.get(*from..).unwrap_or("");
            let noted: Vec<&str> = new
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .collect();
            for l in noted.iter().take(SHOWN_LOG_LINES) {
                eprintln!("[agent-log] {} {node}: {l}", r.scenario);
            }
            if noted.len() > SHOWN_LOG_LINES {
                eprintln!(
                    "[agent-log] {} {node}: ... {} more warnings",
                    r.scenario,
                    noted.len() - SHOWN_LOG_LINES
                );
            }
        }
    }
}

/// Keeps the probes read and samples the agents' view of the store for `d`: the fault's
/// own length, or the watch after it. Store-down sightings go into the report, counted
/// from `t0`.
fn watch(lab: &mut Lab, d: Duration, t0: u64, r: &mut Report) {
    let until = now_ns() + d.as_nanos() as u64;
    let nodes = agent_nodes(lab);
    while now_ns() < until {
        let round = now_ns();
        let _ = lab.poll_probes();
        let down = nodes.iter().any(|n| {
            lab.agent_json(n, &["status"])
                .is_ok_and(|s| !common::store_healthy(&s))
        });
        if down {
            let at = since(t0, now_ns());
            r.store_down = Some(match r.store_down {
                None => (at, at),
                Some((first, _)) => (first, at),
            });
        }
        let next = round + SAMPLE.as_nanos() as u64;
        let now = now_ns();
        if next > now && next < until {
            std::thread::sleep(Duration::from_nanos(next - now));
        }
    }
}

/// After a store fault ended at `ended`: waits (with a deadline) until every agent sees the
/// store again, then watches for [`WATCH`] more, so that what the agents do once they are
/// back (a lease found gone, an owner record withdrawn, an SA torn down) falls inside the
/// scenario's window.
fn settle_and_watch(lab: &mut Lab, t0: u64, ended: u64, r: &mut Report) {
    let nodes = agent_nodes(lab);
    let back = wait_for("every agent seeing the store again", CAP, || {
        let _ = lab.poll_probes();
        nodes
            .iter()
            .all(|n| {
                lab.agent_json(n, &["status"])
                    .is_ok_and(|s| common::store_healthy(&s))
            })
            .then(now_ns)
    });
    match back {
        Ok(t) => r.store_back = Some(since(ended, t)),
        Err(e) => r.problems.push(e.to_string()),
    }
    watch(lab, WATCH, t0, r);
}

/// What must survive a store fault when the VIP stays: the owner's epoch and the
/// front-ends' established IKE_SAs.
struct Kept {
    owner: String,
    epoch: Option<u64>,
    ike: BTreeMap<String, Vec<u64>>,
}

/// The established IKE_SAs of `fe` for the VIP.
fn established(lab: &Lab, fe: &str) -> Vec<u64> {
    let conn = connection_name(lab.vips[0]);
    ike_sas(lab, fe)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, state, c)| state == "ESTABLISHED" && *c == conn)
        .map(|(id, _, _)| id)
        .collect()
}

impl Kept {
    /// Waits (with a deadline) for one established IKE_SA per front-end and the owner's
    /// record, then notes them.
    fn take(lab: &Lab, owner: &str, r: &mut Report) -> Kept {
        let mut ike = BTreeMap::new();
        for fe in lab.names(Role::FrontEnd) {
            let one = wait_for(&format!("one established IKE_SA on {fe}"), CAP, || {
                let ids = established(lab, &fe);
                (ids.len() == 1).then_some(ids)
            });
            let ids = one.unwrap_or_else(|_| established(lab, &fe));
            ike.insert(fe, ids);
        }
        let epoch = wait_for(&format!("{owner}'s record"), CAP, || {
            let s = lab.agent_json(owner, &["status"]).ok()?;
            match common::recorded_owner(&s, VIP) {
                Some((o, e)) if o == owner && common::store_healthy(&s) => Some(e),
                _ => None,
            }
        });
        let epoch = r.check(epoch);
        Kept {
            owner: owner.to_string(),
            epoch,
            ike,
        }
    }

    /// The owner still records itself at the same epoch (once its store is back), and,
    /// with `same_sas`, every front-end still holds the IKE_SA it had.
    fn check(&self, lab: &Lab, r: &mut Report, same_epoch: bool, same_sas: bool) {
        let mut last = String::new();
        let after = wait_for(
            &format!("{}'s record after the fault", self.owner),
            CAP,
            || {
                let s = lab.agent_json(&self.owner, &["status"]).ok()?;
                let rec = common::recorded_owner(&s, VIP);
                last = format!("store healthy {}, owner {rec:?}", common::store_healthy(&s));
                match rec {
                    Some((_, e)) if common::store_healthy(&s) => Some((rec, e)),
                    _ => None,
                }
            },
        );
        match (self.epoch, after) {
            (Some(before), Ok((rec, after))) => {
                r.epoch = Some((before, after));
                let kept = rec.as_ref().is_some_and(|(o, _)| *o == self.owner);
                if !kept {
                    r.problems
                        .push(format!("{} no longer records itself: {rec:?}", self.owner));
                }
                if same_epoch && after != before {
                    r.problems.push(format!(
                        "the owner's epoch went from {before} to {after} though the VIP never moved"
                    ));
                }
            }
            (_, Err(e)) => r.problems.push(format!("{e} (last: {last})")),
            (None, _) => {}
        }
        if same_sas {
            for (fe, before) in &self.ike {
                let now = established(lab, fe);
                if before.len() != 1 || now != *before {
                    r.problems.push(format!(
                        "{fe}'s IKE_SA changed though the VIP never moved: established {before:?} before, {now:?} after"
                    ));
                }
            }
        }
    }
}

/// Waits until every named agent records `owner` for the VIP with a healthy store.
fn agents_agree(lab: &Lab, nodes: &[String], owner: &str, r: &mut Report) {
    let mut last = String::new();
    let agreed = wait_for("agents recording the new owner", CAP, || {
        last.clear();
        let mut all = true;
        for n in nodes {
            let Ok(s) = lab.agent_json(n, &["status"]) else {
                last += &format!(" {n}: no status;");
                all = false;
                continue;
            };
            let rec = common::recorded_owner(&s, VIP);
            last += &format!(
                " {n}: store healthy {}, owner {rec:?};",
                common::store_healthy(&s)
            );
            all &= common::store_healthy(&s) && rec.is_some_and(|(o, _)| o == owner);
        }
        all.then_some(())
    });
    if agreed.is_err() {
        r.problems.push(format!(
            "the agents do not agree on {owner} within {}:{last}",
            secs(CAP)
        ));
    }
}

/// The etcd members a node's agent holds connections to (its gRPC channels).
fn store_connections(lab: &Lab, node: &str) -> Vec<String> {
    let members: Vec<(String, String)> = lab
        .etcd_members()
        .into_iter()
        .map(|m| {
            let addr = lab.topo.node(&m).addr.to_string();
            (m, addr)
        })
        .collect();
    let out = lab
        .topo
        .node(node)
        .ns
        .command("ss")
        .args(["-Htn", "state", "established"])
        .arg(format!("( dport = :{CLIENT_PORT} )"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut seen: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|peer| {
            let host = peer.rsplit_once(':')?.0;
            members
                .iter()
                .find(|(_, a)| a == host)
                .map(|(m, _)| m.clone())
        })
        .collect();
    seen.sort();
    seen
}

fn owner_or_problem(lab: &Lab, r: &mut Report) -> Option<String> {
    let owner = lab.owner();
    if owner.is_none() {
        r.problems.push(format!(
            "no single owner of the VIP: {:?}",
            lab.topo.holders(lab.vips[0])
        ));
    }
    owner
}

fn leader_or_problem(lab: &Lab, r: &mut Report) -> Option<String> {
    r.check(lab.etcd_leader())
}

fn note_election(lab: &Lab, r: &mut Report, what: &str, got: anyhow::Result<(String, Duration)>) {
    if let Some((leader, d)) = r.check(got) {
        lab.progress
            .step(&format!("{what}: etcd leader {leader} after {}", secs(d)));
        r.election = Some(d);
    }
}

/// The etcd leader SIGKILLed with the VIP in place; the member comes back after the watch.
/// No connection fails, no IKE_SA is renegotiated, the owner's epoch stays.
fn leader_killed_in_place(lab: &mut Lab) -> Vec<Report> {
    let mut r = Report::new(lab, "leader killed, VIP in place");
    let (Some(owner), Some(leader)) = (
        owner_or_problem(lab, &mut r),
        leader_or_problem(lab, &mut r),
    ) else {
        return vec![r];
    };
    let kept = Kept::take(lab, &owner, &mut r);
    let w = Window::open(lab);
    r.check(lab.kill_etcd_member(&leader));
    let killed = now_ns();
    lab.progress.step(&format!("etcd leader {leader} killed"));
    let got = lab.wait_etcd_leader(CAP);
    note_election(lab, &mut r, "leader killed", got);
    settle_and_watch(lab, w.t0, killed, &mut r);
    r.check(lab.restart_etcd_member(&leader));
    r.check(lab.restore_etcd());
    kept.check(lab, &mut r, true, true);
    w.close(lab, &mut r, Some(&owner));
    r.expect_no_failed();
    vec![r]
}

/// The etcd leader SIGKILLed, and at once a planned move (`Fault::Planned`) or a crash of
/// the VIP's owner. The new owner serves (after a planned move within a second of the
/// takeover plus the election) and every agent records it.
fn leader_killed_at(lab: &mut Lab, fault: Fault) -> Vec<Report> {
    let mut r = Report::new(
        lab,
        match fault {
            Fault::Planned => "leader killed at a planned move",
            Fault::Crash => "leader killed at an owner crash",
            other => unreachable!("{} is not run here", other.name()),
        },
    );
    let Some(leader) = leader_or_problem(lab, &mut r) else {
        return vec![r];
    };
    let w = Window::open(lab);
    r.check(lab.kill_etcd_member(&leader));
    let election = lab.watch_etcd_leader(CAP);
    lab.progress.step(&format!("etcd leader {leader} killed"));
    let o = scenario::run(lab, fault, CAP);
    if let Some(election) = r.check(election) {
        note_election(lab, &mut r, "during the move", election.wait());
    }
    if let Some(o) = r.check(o) {
        r.take_outcome(&o);
        if let (Some(extra), Some(e)) = (r.recovery_minus_takeover(), r.election)
            && fault == Fault::Planned
            && extra > SERVE_SLACK + e
        {
            r.problems.push(format!(
                "{} served {} after the takeover, beyond {} + the election's {}",
                o.to,
                secs(extra),
                secs(SERVE_SLACK),
                secs(e)
            ));
            w.explain_recovery(lab, &r.scenario);
        }
        let nodes: Vec<String> = agent_nodes(lab)
            .into_iter()
            .filter(|n| fault == Fault::Planned || *n != o.from)
            .collect();
        agents_agree(lab, &nodes, &o.to, &mut r);
        r.check(lab.restore(&o.from));
    }
    r.check(lab.restart_etcd_member(&leader));
    r.check(lab.restore_etcd());
    w.close(lab, &mut r, None);
    vec![r]
}

/// A planned move or a crash with the store healthy: the reference for the others.
fn plain(lab: &mut Lab, fault: Fault) -> Vec<Report> {
    let mut r = Report::new(lab, fault.name());
    let w = Window::open(lab);
    if let Some(o) = r.check(scenario::run(lab, fault, CAP)) {
        r.take_outcome(&o);
        let nodes: Vec<String> = agent_nodes(lab)
            .into_iter()
            .filter(|n| fault == Fault::Planned || *n != o.from)
            .collect();
        agents_agree(lab, &nodes, &o.to, &mut r);
        r.check(lab.restore(&o.from));
    }
    w.close(lab, &mut r, None);
    vec![r]
}

/// One member cut off from every other node: the member the owner's agent talks to when
/// it talks to one only, else the leader. With the VIP in place no connection fails and
/// the owner keeps its epoch; a planned move while it is cut off reaches the new owner.
fn member_partitioned(lab: &mut Lab) -> Vec<Report> {
    let mut r = Report::new(lab, "member partitioned, VIP in place");
    let (Some(owner), Some(leader)) = (
        owner_or_problem(lab, &mut r),
        leader_or_problem(lab, &mut r),
    ) else {
        return vec![r];
    };
    let connections: BTreeMap<String, Vec<String>> = lab
        .names(Role::BackEnd)
        .into_iter()
        .map(|be| {
            let c = store_connections(lab, &be);
            (be, c)
        })
        .collect();
    let cut = match connections.get(&owner).map(Vec::as_slice) {
        Some([only]) => only.clone(),
        _ => leader.clone(),
    };
    eprintln!(
        "[measured] store connections of the back-ends {connections:?}; leader {leader}; cutting off {cut}"
    );
    let kept = Kept::take(lab, &owner, &mut r);
    let w = Window::open(lab);
    r.check(lab.partition_etcd_member(&cut));
    let cut_at = now_ns();
    lab.progress.step(&format!("etcd member {cut} cut off"));
    let got = lab.wait_etcd_leader(CAP);
    note_election(lab, &mut r, "member cut off", got);
    settle_and_watch(lab, w.t0, cut_at, &mut r);
    kept.check(lab, &mut r, true, false);
    w.close(lab, &mut r, Some(&owner));
    r.expect_no_failed();

    let mut m = Report::new(lab, "planned move, member partitioned");
    let w = Window::open(lab);
    if let Some(o) = m.check(scenario::run(lab, Fault::Planned, CAP)) {
        m.take_outcome(&o);
        agents_agree(lab, &agent_nodes(lab), &o.to, &mut m);
        m.check(lab.restore(&o.from));
    }
    m.check(faults::heal(&lab.topo.hub));
    m.check(lab.restore_etcd());
    w.close(lab, &mut m, None);
    vec![r, m]
}

/// Every member frozen (SIGSTOP) for `length` with the VIP in place: no connection fails;
/// after the shorter freeze the owner also keeps its epoch.
fn all_frozen(lab: &mut Lab, length: Duration, name: &str, same_epoch: bool) -> Vec<Report> {
    let mut r = Report::new(lab, name);
    let Some(owner) = owner_or_problem(lab, &mut r) else {
        return vec![r];
    };
    let kept = Kept::take(lab, &owner, &mut r);
    let w = Window::open(lab);
    r.check(lab.freeze_etcd());
    lab.progress
        .step(&format!("every etcd member frozen for {}", secs(length)));
    // The freeze's length is the fault itself; the agents are sampled meanwhile.
    watch(lab, length, w.t0, &mut r);
    r.check(lab.thaw_etcd());
    let thawed = now_ns();
    let got = lab.wait_etcd_leader(CAP);
    note_election(lab, &mut r, "thawed", got);
    settle_and_watch(lab, w.t0, thawed, &mut r);
    kept.check(lab, &mut r, same_epoch, false);
    w.close(lab, &mut r, Some(&owner));
    r.expect_no_failed();
    vec![r]
}

/// Every member SIGKILLed and started again on its data directory with the VIP in place:
/// no connection fails and the owner keeps its epoch; then a planned move reaches the new
/// owner.
fn all_restarted(lab: &mut Lab) -> Vec<Report> {
    let mut r = Report::new(lab, "all members restarted, VIP in place");
    let Some(owner) = owner_or_problem(lab, &mut r) else {
        return vec![r];
    };
    let kept = Kept::take(lab, &owner, &mut r);
    let w = Window::open(lab);
    let members = lab.etcd_members();
    for m in &members {
        r.check(lab.kill_etcd_member(m));
    }
    for m in &members {
        r.check(lab.restart_etcd_member(m));
    }
    let restarted = now_ns();
    lab.progress
        .step("every etcd member killed and started again");
    let got = lab.wait_etcd_leader(CAP);
    note_election(lab, &mut r, "restarted", got);
    settle_and_watch(lab, w.t0, restarted, &mut r);
    kept.check(lab, &mut r, true, false);
    w.close(lab, &mut r, Some(&owner));
    r.expect_no_failed();

    let mut m = Report::new(lab, "planned move after the restart");
    let w = Window::open(lab);
    if let Some(o) = m.check(scenario::run(lab, Fault::Planned, CAP)) {
        m.take_outcome(&o);
        agents_agree(lab, &agent_nodes(lab), &o.to, &mut m);
        m.check(lab.restore(&o.from));
    }
    w.close(lab, &mut m, None);
    vec![r, m]
}

fn frozen_3s(lab: &mut Lab) -> Vec<Report> {
    all_frozen(lab, Duration::from_secs(3), "all members frozen 3 s", true)
}

fn frozen_10s(lab: &mut Lab) -> Vec<Report> {
    all_frozen(
        lab,
        Duration::from_secs(10),
        "all members frozen 10 s",
        false,
    )
}

/// Before each scenario: the store whole, traffic steady, every agent seeing the store. A
/// lab left otherwise by a failed scenario gets a full reset.
fn prepare(lab: &mut Lab) {
    let nodes = agent_nodes(lab);
    let ready = lab.restore_etcd().is_ok()
        && lab.wait_steady(CAP).is_ok()
        && wait_for("every agent seeing the store", CAP, || {
            nodes
                .iter()
                .all(|n| {
                    lab.agent_json(n, &["status"])
                        .is_ok_and(|s| common::store_healthy(&s))
                })
                .then_some(())
        })
        .is_ok();
    if ready {
        return;
    }
    lab.progress
        .step("not ready after the last scenario: reset");
    lab.reset()
        .unwrap_or_else(|e| panic!("the lab does not recover: {e:#}"));
}

/// How many times each scenario runs (`VIPSEC_CHAOS_RUNS`, default 1).
fn runs() -> usize {
    std::env::var("VIPSEC_CHAOS_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

type Scenario = fn(&mut Lab) -> Vec<Report>;

fn build(members: usize, style: FrontEndStyle) -> Lab {
    let mut opts = common::options(Setup::VipsecEtcd);
    opts.etcd_members = members;
    opts.frontend_style = style;
    common::build(opts)
}

/// Runs every scenario on one lab (each `runs()` times), prints every result and fails
/// with all their problems.
fn run_all(title: &str, members: usize, style: FrontEndStyle, scenarios: &[Scenario]) {
    let mut lab = build(members, style);
    assert_eq!(lab.etcd_members().len(), members);
    let mut reports = Vec::new();
    for run in 1..=runs() {
        for s in scenarios {
            prepare(&mut lab);
            for r in s(&mut lab) {
                eprintln!("[etcd-cluster] run {run} {}", r.json());
                reports.push(r);
            }
        }
    }
    drop(lab);
    finish(title, &reports);
}

fn median_max(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort();
    format!("{} / {}", secs(v[v.len() / 2]), secs(v[v.len() - 1]))
}

fn finish(title: &str, reports: &[Report]) {
    eprintln!("[etcd-cluster] {title}");
    eprintln!(
        "{:<38} {:>4} {:>19} {:>19} {:>19} {:>7} {:>5} {:>8} {:>8} {:>8}",
        "scenario",
        "runs",
        "rec-takeover med/max",
        "election med/max",
        "store back med/max",
        "failed",
        "clear",
        "IKE_SAs",
        "epoch",
        "problems"
    );
    let mut names: Vec<&str> = Vec::new();
    for r in reports {
        if !names.contains(&r.scenario.as_str()) {
            names.push(&r.scenario);
        }
    }
    for name in names {
        let of: Vec<&Report> = reports.iter().filter(|r| r.scenario == name).collect();
        let list =
            |f: &dyn Fn(&Report) -> String| of.iter().map(|r| f(r)).collect::<Vec<_>>().join(",");
        eprintln!(
            "{:<38} {:>4} {:>19} {:>19} {:>19} {:>7} {:>5} {:>8} {:>8} {:>8}",
            name,
            of.len(),
            median_max(
                of.iter()
                    .filter_map(|r| r.recovery_minus_takeover())
                    .collect()
            ),
            median_max(of.iter().filter_map(|r| r.election).collect()),
            median_max(of.iter().filter_map(|r| r.store_back).collect()),
            list(&|r| r.failed.to_string()),
            list(&|r| r.cleartext.to_string()),
            list(&|r| r.new_ike_sas.map_or("?".into(), |n| n.to_string())),
            list(&|r| r.epoch.map_or("-".into(), |(b, a)| format!("{b}>{a}"))),
            of.iter().map(|r| r.problems.len()).sum::<usize>()
        );
    }
    let problems: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.problems
                .iter()
                .map(move |p| format!("{}: {p}", r.scenario))
        })
        .collect();
    assert!(
        problems.is_empty(),
        "{title}:\n{}",
        problems.join("\n---\n")
    );
}

#[test]
fn three_member_etcd_leader_lost_in_place_at_a_move_during_a_crash_and_cut_off() {
    let _t = common::start("etcd cluster: leader lost");
    run_all(
        "three members, trap front-ends: leader killed, member cut off",
        3,
        FrontEndStyle::default(),
        &[
            leader_killed_in_place,
            |lab| leader_killed_at(lab, Fault::Planned),
            |lab| leader_killed_at(lab, Fault::Crash),
            member_partitioned,
        ],
    );
}

#[test]
fn three_member_etcd_frozen_and_restarted_with_start_style_front_ends() {
    let _t = common::start("etcd cluster: frozen, restarted");
    run_all(
        "three members, start front-ends: frozen 3 s and 10 s, restarted",
        3,
        FrontEndStyle::Start,
        &[frozen_3s, frozen_10s, all_restarted],
    );
}

/// The scenarios both store sizes share, for the bench's side-by-side numbers.
const REFERENCE: [Scenario; 5] = [
    |lab| plain(lab, Fault::Planned),
    |lab| plain(lab, Fault::Crash),
    frozen_3s,
    frozen_10s,
    all_restarted,
];

#[test]
#[ignore = "bench reference (about 6 min): run by `tools/bench --etcd-reference`"]
fn reference_one_member() {
    let _t = common::start("etcd reference, one member");
    run_all(
        "one member: reference",
        1,
        FrontEndStyle::default(),
        &REFERENCE,
    );
}

#[test]
#[ignore = "bench reference (about 6 min): run by `tools/bench --etcd-reference`"]
fn reference_three_members() {
    let _t = common::start("etcd reference, three members");
    run_all(
        "three members: reference",
        3,
        FrontEndStyle::default(),
        &REFERENCE,
    );
}
