//! vipsec on every node (charon without DPD, the agent driving failover): a planned move
//! and a crash must recover to the new owner with no clear text and no stale answers.
//! Needs the `vipsec` binary built in the same target directory (`cargo build -p vipsec`)
//! or named by VIPSEC_BIN.

mod common;

use std::time::Duration;

use vipsec_chaos::lab::faults::Fault;
use vipsec_chaos::lab::{Role, Setup};

const CAP: Duration = Duration::from_secs(30);

fn scenario(setup: Setup, fault: Fault, vips: usize, name: &'static str) {
    let _t = common::start(name);
    let mut opts = common::options(setup);
    opts.vips = vips;
    let mut lab = common::build(opts);
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
    // Every front-end for every VIP: with many VIPs restarted at once, Debian's charon can
    // give two CHILD_SAs one reqid and leave a VIP dead (strongSwan issue 1855).
    common::assert_recovered(&o, CAP);
}

#[test]
fn vipsec_etcd_planned_move_recovers() {
    scenario(
        Setup::VipsecEtcd,
        Fault::Planned,
        1,
        "vipsec-etcd planned move",
    );
}

#[test]
fn vipsec_etcd_crash_recovers() {
    scenario(Setup::VipsecEtcd, Fault::Crash, 1, "vipsec-etcd crash");
}

#[test]
fn vipsec_idle_detector_recovers_from_a_crash() {
    scenario(Setup::VipsecIdle, Fault::Crash, 1, "vipsec-idle crash");
}

#[test]
fn vipsec_etcd_crash_with_ten_vips_recovers_every_vip() {
    scenario(
        Setup::VipsecEtcd,
        Fault::Crash,
        10,
        "vipsec-etcd crash, ten VIPs",
    );
}

// Nodes configured only through the store: charon starts with no connection, and every
// agent loads the one policy an operator stored with `vipsec policy apply`.

#[test]
fn vipsec_policy_planned_move_recovers() {
    scenario(
        Setup::VipsecPolicy,
        Fault::Planned,
        1,
        "vipsec-policy planned move",
    );
}

#[test]
fn vipsec_policy_crash_recovers() {
    scenario(Setup::VipsecPolicy, Fault::Crash, 1, "vipsec-policy crash");
}
