//! vipsec beside a real two-node Pacemaker cluster (corosync 3 with knet, pacemaker from
//! Debian's packages, one back-end per network namespace with its own state directories),
//! the VIP an `ocf:heartbeat:IPaddr2` resource and the agent run through
//! deploy/pacemaker/vipsec and vipsec-drain with deploy/pacemaker/constraints.example
//! applied as shipped. Fencing is on, through the lab's fence agent.
//!
//! One lab, every fault in turn (a planned move with `crm_resource --move`, `vipsec drill`
//! with `integration = "pacemaker"`, standby, a crash that Pacemaker fences, the agent
//! SIGKILLed so the vipsec resource's monitor fails): each must move the VIP, recover to
//! the new owner, and leave no clear text and no stale answers. Times are printed, not
//! judged (tools/bench reports them); the deadlines only catch a hang.
//!
//! Needs root, corosync, pacemaker and crmsh (tools/install-deps), and the `vipsec`
//! binary built in the same target directory.

mod common;

use std::time::Duration;

use vipsec_chaos::lab::faults::Fault;
use vipsec_chaos::lab::{Lab, Setup};
use vipsec_chaos::scenario::Outcome;

/// A crash waits for corosync's token, fencing and the VIP's start; a killed agent waits
/// for the next monitor (every 10 s).
const CAP: Duration = Duration::from_secs(40);

fn fault(lab: &mut Lab, fault: Fault) -> Outcome {
    lab.reset()
        .unwrap_or_else(|e| panic!("reset before {}: {e:#}", fault.name()));
    let o = common::run(lab, fault, CAP);
    common::assert_safe(&o);
    common::assert_recovered(&o, CAP);
    assert!(o.takeover.is_some(), "the VIP never moved: {}", o.summary());
    eprintln!(
        "[measured] pacemaker {}: takeover {:?}, recovery {:?}, recovery - takeover {:?}",
        fault.name(),
        o.takeover,
        o.recovery,
        o.recovery_minus_takeover()
    );
    o
}

#[test]
fn pacemaker_moves_crashes_standby_and_agent_failure_recover_without_clear_text() {
    let _t = common::start("pacemaker scenarios");
    let mut lab = common::lab(Setup::Pacemaker);

    fault(&mut lab, Fault::Planned);

    let o = fault(&mut lab, Fault::Drill);
    let report = lab.finish_drill().expect("the drill's report");
    eprintln!("[drill] {report:#}");
    let t = &report["timeline"];
    assert_eq!(t["to"], o.to.as_str(), "{report:#}");
    assert_eq!(t["complete"], true, "{report:#}");

    fault(&mut lab, Fault::Standby);

    let o = fault(&mut lab, Fault::Crash);
    let history = lab
        .crm(Some(&o.to), &format!("stonith_admin --history {}", o.from))
        .expect("fencing history");
    eprintln!("[fencing] {history}");
    assert!(
        history.contains("successful") || history.contains("succeeded"),
        "{} was not fenced: {history}",
        o.from
    );

    fault(&mut lab, Fault::AgentKilled);
}
