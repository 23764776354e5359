//! vipsec on every node (charon without DPD, the agent driving failover): a planned move
//! and a crash must recover to the new owner with no clear text and no stale answers.
//! Needs the `vipsec` binary built in the same target directory (`cargo build -p vipsec`)
//! or named by VIPSEC_BIN.

mod common;

use std::time::Duration;

use vipsec_chaos::lab::faults::Fault;
use vipsec_chaos::lab::{Role, Setup};

const CAP: Duration = Duration::from_secs(30);

fn scenario(setup: Setup, fault: Fault, name: &'static str) {
    let _t = common::start(name);
    let mut lab = common::lab(setup);
    for node in lab
        .names(Role::FrontEnd)
        .iter()
        .chain(&lab.names(Role::BackEnd))
    {
        let sock = lab.agent_socket(node).expect("an agent on every node");
        assert!(sock.exists(), "{}", sock.display());
    }
    let o = common::run(&mut lab, fault, CAP);
    common::assert_safe(&o);
    common::assert_recovered(&o, CAP);
}

#[test]
fn vipsec_etcd_planned_move_recovers() {
    scenario(
        Setup::VipsecEtcd,
        Fault::Planned,
        "vipsec-etcd planned move",
    );
}

#[test]
fn vipsec_etcd_crash_recovers() {
    scenario(Setup::VipsecEtcd, Fault::Crash, "vipsec-etcd crash");
}

#[test]
fn vipsec_idle_detector_recovers_from_a_crash() {
    scenario(Setup::VipsecIdle, Fault::Crash, "vipsec-idle crash");
}
