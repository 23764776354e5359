//! The agent's standing guard against the faults that used to leak clear text. The
//! front-ends' connections are written as an operator might: `start_action = start` (no
//! trap, as most strongSwan examples have it), `trap|start`, or with no start action at all
//! (only the agent initiates). For each, a front-end's XFRM policies flushed by hand, its
//! charon killed, its agent SIGKILLed and then its charon killed, a planned move and an
//! owner crash must put no protected packet on the wire in clear text from one second
//! before the fault to the end of the run, and traffic must come back, answered by the
//! VIP's owner. With connections from the stored policy, deleting the policy must leave
//! the VIP guarded. The `start` style runs over IPv6 (routing-rule guard) too.
//!
//! The faults of one style share one lab. Each fault is checked on its own and every
//! result is printed before the test fails, so one run gives the numbers of all of them.
//! Needs the `vipsec` binary built in the same target directory (`cargo build -p vipsec`).

mod common;

use std::net::IpAddr;
use std::time::Duration;

use vipsec_chaos::clock::{now_ns, secs, since};
use vipsec_chaos::lab::charon::FrontEndStyle;
use vipsec_chaos::lab::cleartext::ClearText;
use vipsec_chaos::lab::etcd::CLIENT_PORT;
use vipsec_chaos::lab::faults::Fault;
use vipsec_chaos::lab::topology::Family;
use vipsec_chaos::lab::{Lab, Role, Setup};
use vipsec_testbed::process::wait_for;

/// How long a recovery may take before the fault counts as unrecovered.
const CAP: Duration = Duration::from_secs(20);
/// The guard comes back within a second of a flush; the rest is room for the status
/// polls on a busy two-core machine.
const GUARD_CAP: Duration = Duration::from_secs(5);
/// Probe attempts watched while a front-end's charon is down (a second at 20 ms).
const DOWN_ATTEMPTS: usize = 50;
/// Clear-text packets quoted in a failure.
const SHOWN_PACKETS: usize = 20;
/// The lab policy's key in etcd (the lab's agents use the prefix `/vipsec-lab/`).
const POLICY_KEY: &str = "/vipsec-lab/policies/lab";

/// What one fault showed.
struct Report {
    fault: &'static str,
    cleartext: ClearText,
    /// From the fault (or the restart that ends it) to the first answer from the owner.
    recovery: Option<Duration>,
    problems: Vec<String>,
}

impl Report {
    fn new(fault: &'static str) -> Report {
        Report {
            fault,
            cleartext: ClearText::default(),
            recovery: None,
            problems: Vec::new(),
        }
    }

    /// Keeps an error as a problem of this fault and the value, if any.
    fn check<T>(&mut self, r: Result<T, String>) -> Option<T> {
        r.map_err(|e| self.problems.push(e)).ok()
    }
}

/// The clear-text counters and the wall clock, taken one second before a fault.
struct Window {
    before: ClearText,
    wall: f64,
}

impl Window {
    /// Opens the window, then lets the probes run a second inside it before the fault.
    fn open(lab: &mut Lab) -> Window {
        let before = lab.cleartext().expect("clear-text counters");
        let wall = common::wall_now();
        let fault_at = now_ns() + 1_000_000_000;
        // The probes' own records mark the second: every front-end has attempted through
        // it, so clear text sent just before the fault would be counted.
        wait_for("a second of probing", Duration::from_secs(5), || {
            lab.poll_probes().ok()?;
            lab.probes()
                .iter()
                .all(|p| p.records.last().is_some_and(|r| r.start >= fault_at))
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        Window { before, wall }
    }

    /// Closes the window: every clear-text packet since it opened is a problem.
    fn close(self, lab: &Lab, report: &mut Report) {
        report.cleartext = lab.cleartext().expect("counters").minus(self.before);
        if report.cleartext.total() == 0 {
            return;
        }
        // tcpdump writes a moment after the counter moved.
        let lines = wait_for("tcpdump's lines", Duration::from_secs(2), || {
            let l = lab.cleartext_packets_since(self.wall);
            (!l.is_empty()).then_some(l)
        })
        .unwrap_or_default();
        // The first packets say what leaked; thousands would drown the other problems.
        report.problems.push(format!(
            "clear text on the wire: {:?}; first of {} captured lines:\n{}",
            report.cleartext,
            lines.len(),
            lines[..lines.len().min(SHOWN_PACKETS)].join("\n")
        ));
    }
}

/// Waits until `fe` got an answer from `owner` to an attempt started at or after `t`;
/// returns how long after `t` it came.
fn first_answer(lab: &mut Lab, fe: &str, owner: &str, t: u64) -> Result<Duration, String> {
    wait_for(&format!("{fe} answered by {owner}"), CAP, || {
        lab.poll_probes().ok()?;
        let p = lab.probes().iter().find(|p| p.fe == fe)?;
        p.since(t)
            .filter(|r| r.node.as_deref() == Some(owner))
            .map(|r| r.end)
            .min()
            .map(|end| since(t, end))
    })
    .map_err(|e| e.to_string())
}

/// How many of `fe`'s next `n` attempts started at or after `t` were answered.
fn answered_of_next(lab: &mut Lab, fe: &str, t: u64, n: usize) -> Result<usize, String> {
    wait_for(&format!("{n} attempts of {fe}"), CAP, || {
        lab.poll_probes().ok()?;
        let p = lab.probes().iter().find(|p| p.fe == fe)?;
        let recs: Vec<_> = p.since(t).take(n).collect();
        (recs.len() == n).then(|| recs.iter().filter(|r| r.ok()).count())
    })
    .map_err(|e| e.to_string())
}

/// A problem for every answer from a node other than `owner` to attempts started at or
/// after `t`.
fn check_no_stale_answers(lab: &mut Lab, owner: &str, t: u64, report: &mut Report) {
    lab.poll_probes().expect("probe records");
    let stale: Vec<String> = lab
        .probes()
        .iter()
        .flat_map(|p| p.since(t))
        .filter(|r| r.ok() && r.node.as_deref() != Some(owner))
        .map(|r| format!("{} answered by {:?}", r.fe, r.node))
        .collect();
    if !stale.is_empty() {
        report
            .problems
            .push(format!("answers not from {owner}: {stale:?}"));
    }
}

/// Every front-end steady through the tunnel again, as a problem if not.
fn check_steady(lab: &mut Lab, report: &mut Report) {
    let steady = lab.wait_steady(CAP).map_err(|e| format!("{e:#}"));
    report.check(steady);
}

/// A node's guard for the VIP held (and fail-secure engaged), as a problem if not;
/// `what` names the moment for the report.
fn check_guard_held(
    lab: &Lab,
    node: &str,
    source: Option<&str>,
    what: &str,
    report: &mut Report,
) -> Option<u64> {
    let held = common::wait_guard_held(lab, node, lab.vips[0], source, GUARD_CAP);
    report.check(held.map_err(|e| format!("{what}: {e}")))
}

/// The lab's nodes that run an agent.
fn agent_nodes(lab: &Lab) -> Vec<String> {
    lab.names(Role::FrontEnd)
        .into_iter()
        .chain(lab.names(Role::BackEnd))
        .collect()
}

/// Before any fault: every node holds its guard for the VIP from `source`.
fn guard_at_start(lab: &Lab, source: &str) -> Report {
    let mut report = Report::new("guard at start");
    for node in agent_nodes(lab) {
        check_guard_held(lab, &node, Some(source), &node, &mut report);
    }
    report
}

/// The agent's block policies in a node's kernel (IPv4 guard).
fn block_policies(lab: &Lab, node: &str) -> usize {
    lab.topo
        .node(node)
        .ns
        .ip(&["xfrm", "policy", "show"])
        .map(|out| out.matches("action block").count())
        .unwrap_or(0)
}

/// `ip xfrm policy flush` on fe1: the agent puts its block policies back; traffic keeps
/// flowing through the tunnel.
fn xfrm_policy_flush(lab: &mut Lab) -> Report {
    let mut report = Report::new("xfrm policy flush on fe1");
    let owner = lab.owner().expect("an owner");
    let blocks = block_policies(lab, "fe1");
    if blocks == 0 {
        report
            .problems
            .push("no block policy in fe1's kernel before the flush".into());
    }
    let window = Window::open(lab);
    let flushed = now_ns();
    let flush = lab.topo.node("fe1").ns.ip(&["xfrm", "policy", "flush"]);
    report.check(flush.map(|_| ()).map_err(|e| format!("flush: {e:#}")));
    // The kernel view first (what protects traffic), then the agent's own report.
    let in_kernel = match blocks {
        0 => Err(anyhow::anyhow!("nothing to come back")),
        _ => wait_for("block policies back in fe1's kernel", GUARD_CAP, || {
            (block_policies(lab, "fe1") >= blocks).then(now_ns)
        }),
    };
    let held = check_guard_held(lab, "fe1", None, "after the flush", &mut report);
    eprintln!(
        "[measured] xfrm policy flush on fe1: {blocks} block policies before; back in the kernel after {}, guard held in status after {}",
        in_kernel
            .map(|t| secs(since(flushed, t)))
            .unwrap_or_else(|e| e.to_string()),
        held.map(|t| secs(since(flushed, t)))
            .unwrap_or_else(|| "never".into())
    );
    report.recovery = held.map(|t| since(flushed, t));
    check_steady(lab, &mut report);
    check_no_stale_answers(lab, &owner, flushed, &mut report);
    window.close(lab, &mut report);
    report
}

/// fe1's charon killed: nothing gets through while it is down; restarted, fe1 is answered
/// by the owner and the guard is still held.
fn front_end_charon_killed(lab: &mut Lab) -> Report {
    let mut report = Report::new("fe1's charon killed, restarted");
    let owner = lab.owner().expect("an owner");
    let window = Window::open(lab);
    lab.kill_charon("fe1");
    let killed = now_ns();
    check_down(lab, killed, &mut report);
    let restarted = now_ns();
    let restart = lab.restart_charon("fe1").map_err(|e| format!("{e:#}"));
    report.check(restart);
    check_back(lab, &owner, restarted, "charon's restart", &mut report);
    check_guard_held(lab, "fe1", None, "after charon's restart", &mut report);
    check_steady(lab, &mut report);
    check_no_stale_answers(lab, &owner, killed, &mut report);
    window.close(lab, &mut report);
    report
}

/// fe1's agent SIGKILLed, then its charon killed: the guard the dead agent left in the
/// kernel is all that protects the VIP. The restarted agent adopts it (held before charon
/// is back), and the restarted charon brings the tunnel back to the owner.
fn front_end_agent_then_charon_killed(lab: &mut Lab) -> Report {
    let mut report = Report::new("fe1's agent SIGKILLed, then its charon");
    let owner = lab.owner().expect("an owner");
    let window = Window::open(lab);
    lab.kill_agent("fe1");
    lab.kill_charon("fe1");
    let killed = now_ns();
    check_down(lab, killed, &mut report);
    let restarted = now_ns();
    let restart = lab.restart_agent("fe1").map_err(|e| format!("{e:#}"));
    report.check(restart);
    if let Some(t) = check_guard_held(lab, "fe1", None, "agent restarted", &mut report) {
        eprintln!(
            "[measured] fe1's restarted agent holds the guard {} after its start (charon still down)",
            secs(since(restarted, t))
        );
    }
    let charon_back = now_ns();
    let restart = lab.restart_charon("fe1").map_err(|e| format!("{e:#}"));
    report.check(restart);
    check_back(lab, &owner, charon_back, "charon's restart", &mut report);
    check_guard_held(lab, "fe1", None, "after both restarts", &mut report);
    check_steady(lab, &mut report);
    check_no_stale_answers(lab, &owner, killed, &mut report);
    window.close(lab, &mut report);
    report
}

/// While fe1's charon is down no attempt is answered.
fn check_down(lab: &mut Lab, killed: u64, report: &mut Report) {
    let answered = answered_of_next(lab, "fe1", killed, DOWN_ATTEMPTS);
    if let Some(n) = report.check(answered) {
        eprintln!("[measured] fe1 with charon down: {n} of {DOWN_ATTEMPTS} attempts answered");
        if n > 0 {
            report
                .problems
                .push(format!("{n} attempts answered without charon"));
        }
    }
}

/// fe1 answered by `owner` after `t`; recorded as the report's recovery.
fn check_back(lab: &mut Lab, owner: &str, t: u64, what: &str, report: &mut Report) {
    if let Some(d) = report.check(first_answer(lab, "fe1", owner, t)) {
        eprintln!(
            "[measured] {}: fe1 answered by {owner} {} after {what}",
            report.fault,
            secs(d)
        );
        report.recovery = Some(d);
    }
}

/// A planned move or a crash of the owner (the lab's scenario), then the old owner
/// brought back; the front-ends keep their guard through it.
fn owner_fault(lab: &mut Lab, fault: Fault) -> Report {
    let mut report = Report::new(match fault {
        Fault::Planned => "planned move",
        Fault::Crash => "owner crash",
        other => other.name(),
    });
    let window = Window::open(lab);
    match vipsec_chaos::scenario::run(lab, fault, CAP) {
        Ok(o) => {
            eprintln!("[outcome] {}", o.summary());
            eprintln!(
                "[measured] {}: takeover {}, every front-end answered by {} after {}",
                report.fault,
                o.takeover.map(secs).unwrap_or_else(|| "never".into()),
                o.to,
                o.recovery.map(secs).unwrap_or_else(|| "never".into())
            );
            report.recovery = o.recovery;
            if o.takeover.is_none() {
                report
                    .problems
                    .push("keepalived never moved the VIP".into());
            }
            if o.recovery.is_none() {
                report.problems.push(format!(
                    "no recovery to {} within {}: {:?}",
                    o.to,
                    secs(CAP),
                    o.unrecovered()
                ));
            }
            if o.stale_answers > 0 {
                report.problems.push(format!(
                    "{} answers from a node that lost the VIP",
                    o.stale_answers
                ));
            }
            for fe in lab.names(Role::FrontEnd) {
                check_guard_held(lab, &fe, None, "after the move", &mut report);
            }
            let restore = lab.restore(&o.from).map_err(|e| format!("{e:#}"));
            report.check(restore);
            check_steady(lab, &mut report);
        }
        Err(e) => report.problems.push(format!("scenario: {e:#}")),
    }
    window.close(lab, &mut report);
    report
}

/// Before each fault: traffic steady. A lab left unsteady by a failed fault gets a full
/// reset (fresh charons and agents) so the next fault starts clean.
fn prepare(lab: &mut Lab) {
    if lab.wait_steady(CAP).is_ok() {
        return;
    }
    lab.progress.step("not steady after the last fault: reset");
    lab.reset()
        .unwrap_or_else(|e| panic!("the lab does not recover: {e:#}"));
}

/// Prints every fault's result and fails with all their problems.
fn finish(title: &str, reports: &[Report]) {
    eprintln!("[guard] {title}");
    eprintln!(
        "{:<42} {:>10} {:>10} {:>9}",
        "fault", "clear text", "recovery", "problems"
    );
    for r in reports {
        eprintln!(
            "{:<42} {:>10} {:>10} {:>9}",
            r.fault,
            r.cleartext.total(),
            r.recovery.map(secs).unwrap_or_else(|| "-".into()),
            r.problems.len()
        );
    }
    let problems: Vec<String> = reports
        .iter()
        .flat_map(|r| r.problems.iter().map(move |p| format!("{}: {p}", r.fault)))
        .collect();
    assert!(
        problems.is_empty(),
        "{title}:\n{}",
        problems.join("\n---\n")
    );
}

fn build(style: FrontEndStyle, family: Family) -> Lab {
    let mut opts = common::options(Setup::VipsecEtcd);
    opts.frontend_style = style;
    opts.family = family;
    common::build(opts)
}

/// Every fault of an IPv4 vipsec-etcd lab whose front-ends write their connections in
/// `style`.
fn every_fault(style: FrontEndStyle) {
    let mut lab = build(style, Family::V4);
    let mut reports = vec![guard_at_start(&lab, "config")];
    let faults: [fn(&mut Lab) -> Report; 5] = [
        xfrm_policy_flush,
        front_end_charon_killed,
        front_end_agent_then_charon_killed,
        |lab| owner_fault(lab, Fault::Planned),
        |lab| owner_fault(lab, Fault::Crash),
    ];
    for fault in faults {
        prepare(&mut lab);
        reports.push(fault(&mut lab));
    }
    drop(lab);
    finish(&format!("start_action {}", style.name()), &reports);
}

#[test]
fn start_style_front_ends_leak_nothing_through_any_fault() {
    let _t = common::start("guard, start_action = start");
    every_fault(FrontEndStyle::Start);
}

#[test]
fn trap_start_style_front_ends_leak_nothing_through_any_fault() {
    let _t = common::start("guard, start_action = trap|start");
    every_fault(FrontEndStyle::TrapStart);
}

#[test]
fn front_ends_without_start_action_leak_nothing_through_any_fault() {
    let _t = common::start("guard, no start_action");
    every_fault(FrontEndStyle::None);
}

/// Connections as a newcomer writes them on both ends (`start_action = start`, MOBIKE and
/// `keyingtries` at strongSwan's defaults, the back-ends answering on any address) and
/// keepalived without notify scripts: a planned move is keepalived stopping, with no drain
/// before the VIP leaves; the agents learn of it from the address and the store only.
#[test]
fn hand_written_connections_without_notify_scripts_leak_nothing_on_moves_and_a_crash() {
    let _t = common::start("guard, hand-written connections, no notify scripts");
    let mut opts = common::options(Setup::VipsecEtcd);
    opts.frontend_style = FrontEndStyle::Start;
    opts.handover = false;
    let mut lab = common::build(opts);
    let mut reports = vec![guard_at_start(&lab, "config")];
    for fault in [Fault::Planned, Fault::Crash, Fault::Planned] {
        prepare(&mut lab);
        reports.push(owner_fault(&mut lab, fault));
    }
    drop(lab);
    finish("hand-written connections, no notify scripts", &reports);
}

#[test]
fn start_style_over_ipv6_leaks_nothing_on_a_move_or_a_charon_kill() {
    let _t = common::start("guard over IPv6, start_action = start");
    let mut lab = build(FrontEndStyle::Start, Family::V6);
    let vip: IpAddr = "2001:db8:1::100".parse().unwrap();
    assert_eq!(lab.vips, vec![vip]);
    let mut reports = vec![guard_at_start(&lab, "config")];
    let faults: [fn(&mut Lab) -> Report; 2] = [front_end_charon_killed, |lab| {
        owner_fault(lab, Fault::Planned)
    }];
    for fault in faults {
        prepare(&mut lab);
        reports.push(fault(&mut lab));
    }
    drop(lab);
    finish("IPv6, start_action start", &reports);
}

/// Deletes the lab policy's document from etcd, as an operator cleaning up (there is no
/// delete in `vipsec policy`).
fn delete_stored_policy(lab: &Lab) -> Result<(), String> {
    let node = lab.topo.node("etcd");
    let endpoint = format!(
        "http://{}",
        std::net::SocketAddr::from((node.addr, CLIENT_PORT))
    );
    let out = node
        .ns
        .command("etcdctl")
        .args(["--endpoints", &endpoint, "del", POLICY_KEY])
        .output()
        .map_err(|e| format!("etcdctl: {e}"))?;
    let said = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || said.trim() != "1" {
        return Err(format!(
            "etcdctl del {POLICY_KEY}: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// `vipsec policy apply` of the lab's policy again (the file the lab stored at build).
fn reapply_policy(lab: &Lab) -> Result<(), String> {
    let file = lab.run_dir().join("lab-policy.toml");
    lab.agent_cli("fe1", &["policy", "apply", &file.display().to_string()])
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

/// The stored policy deleted: every node keeps the VIP guarded (`policy-missing`) and
/// nothing leaves in clear text; applied again, traffic comes back to the owner.
fn stored_policy_deleted(lab: &mut Lab) -> Report {
    let mut report = Report::new("stored policy deleted, applied again");
    let owner = lab.owner().expect("an owner");
    let window = Window::open(lab);
    let deleted = now_ns();
    report.check(delete_stored_policy(lab));
    for node in agent_nodes(lab) {
        let held = check_guard_held(lab, &node, Some("policy-missing"), &node, &mut report);
        if let Some(t) = held {
            eprintln!(
                "[measured] policy deleted: {node} shows its guard held from policy-missing after {}",
                secs(since(deleted, t))
            );
        }
    }
    // Whether the tunnel stays up without its policy is the agent's choice; nothing may
    // leave in clear text either way.
    if let Some(n) = report.check(answered_of_next(lab, "fe1", now_ns(), DOWN_ATTEMPTS)) {
        eprintln!("[measured] policy deleted: fe1 {n} of {DOWN_ATTEMPTS} attempts answered");
    }
    let applied = now_ns();
    report.check(reapply_policy(lab));
    for fe in lab.names(Role::FrontEnd) {
        if let Some(d) = report.check(first_answer(lab, &fe, &owner, applied)) {
            eprintln!(
                "[measured] policy applied again: {fe} answered by {owner} after {}",
                secs(d)
            );
            report.recovery = report.recovery.max(Some(d));
        }
    }
    for node in agent_nodes(lab) {
        check_guard_held(lab, &node, Some("policy"), "applied again", &mut report);
    }
    check_steady(lab, &mut report);
    check_no_stale_answers(lab, &owner, deleted, &mut report);
    window.close(lab, &mut report);
    report
}

#[test]
fn deleting_the_stored_policy_keeps_the_vip_guarded() {
    let _t = common::start("guard, stored policy deleted");
    let mut lab = common::lab(Setup::VipsecPolicy);
    let mut reports = vec![guard_at_start(&lab, "policy")];
    prepare(&mut lab);
    reports.push(stored_policy_deleted(&mut lab));
    drop(lab);
    finish("vipsec-policy", &reports);
}
