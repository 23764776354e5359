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

/// Without a cluster store the front-ends hear of the move only from the old owner's
/// DELETE (planned) or the idle detector (crash), and of the new holder only by asking the
/// VIP's IKE port: an answer after silence sends the next attempt at once (event
/// `peer-answers`) instead of waiting out one sent while the VIP was in transit.
#[test]
fn vipsec_idle_recovers_from_a_planned_move_and_a_crash_by_probing_the_ike_port() {
    let _t = common::start("vipsec-idle planned move and crash");
    let mut lab = common::build(common::options(Setup::VipsecIdle));
    let front_ends = lab.names(Role::FrontEnd);
    let log_lines = |lab: &vipsec_chaos::lab::Lab, fe: &str| -> Vec<String> {
        lab.agent_log(fe)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let mut hurried_in = Vec::new();
    for fault in [Fault::Planned, Fault::Crash] {
        let before: Vec<usize> = front_ends
            .iter()
            .map(|fe| log_lines(&lab, fe).len())
            .collect();
        let o = common::run(&mut lab, fault, CAP);
        common::assert_safe(&o);
        common::assert_recovered(&o, CAP);
        let hurried: Vec<String> = front_ends
            .iter()
            .zip(&before)
            .filter(|(fe, skip)| {
                log_lines(&lab, fe)
                    .iter()
                    .skip(**skip)
                    .any(|l| l.contains("event=\"peer-answers\""))
            })
            .map(|(fe, _)| fe.clone())
            .collect();
        eprintln!(
            "[measured] {}: front-ends hurried by the IKE port's answer: {hurried:?}",
            fault.name()
        );
        hurried_in.extend(hurried.into_iter().map(|fe| (fault.name(), fe)));
        lab.restore(&o.from).unwrap();
        lab.wait_steady(CAP).unwrap();
    }
    // An attempt that happens to go out in the instant after the new holder came up needs
    // no hurrying, and in a planned move (front-ends retrying every few hundred ms from
    // the old owner's DELETE on) both front-ends sometimes do. Over a planned move and a
    // crash, at least one front-end must have been hurried.
    assert!(
        !hurried_in.is_empty(),
        "no front-end heard the VIP's IKE port answer again, in either move"
    );
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
