//! The vipsec lab over IPv6 (2001:db8:1::/64, VIP 2001:db8:1::100): real keepalived
//! (VRRPv3 over IPv6), etcd, charon and agents, DAD left on for the VIP. A planned move
//! (through deploy/keepalived/vipsec-handover, as in the IPv4 lab) and a crash must
//! recover to the new owner with no clear text and no stale answers. The IPv4 lab runs
//! the same two scenarios afterwards, and the numbers are printed side by side.
//! Needs the `vipsec` binary built in the same target directory (`cargo build -p vipsec`)
//! or named by VIPSEC_BIN.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use vipsec_chaos::clock::secs;
use vipsec_chaos::lab::faults::Fault;
use vipsec_chaos::lab::topology::{Family, NODE_IF};
use vipsec_chaos::lab::{Lab, Role, Setup};
use vipsec_chaos::scenario::Outcome;

const CAP: Duration = Duration::from_secs(30);

fn build(family: Family) -> Lab {
    let mut opts = common::options(Setup::VipsecEtcd);
    opts.family = family;
    common::build(opts)
}

/// Planned move, then (after a reset) a crash, on one lab.
fn planned_and_crash(lab: &mut Lab) -> (Outcome, Outcome) {
    let planned = common::run(lab, Fault::Planned, CAP);
    lab.reset().unwrap_or_else(|e| panic!("reset: {e:#}"));
    let crash = common::run(lab, Fault::Crash, CAP);
    for o in [&planned, &crash] {
        common::assert_safe(o);
        common::assert_recovered(o, CAP);
    }
    (planned, crash)
}

fn opt(d: Option<Duration>) -> String {
    d.map(secs).unwrap_or_else(|| "-".into())
}

#[test]
fn vipsec_etcd_over_ipv6_recovers_from_a_planned_move_and_a_crash() {
    let _t = common::start("vipsec-etcd over IPv6, then IPv4");
    let mut lab = build(Family::V6);
    let vip: IpAddr = "2001:db8:1::100".parse().unwrap();
    assert_eq!(lab.vips, vec![vip]);
    for node in lab
        .names(Role::FrontEnd)
        .iter()
        .chain(&lab.names(Role::BackEnd))
    {
        assert!(lab.topo.node(node).addr.is_ipv6(), "{node}");
        assert!(lab.agent_socket(node).is_some(), "an agent on {node}");
    }
    // keepalived added the VIP with DAD (`-nodad` in its config): no `nodad` flag.
    let owner = lab.owner().unwrap();
    let listing = lab
        .topo
        .node(&owner)
        .ns
        .ip(&["-6", "-o", "addr", "show", "dev", NODE_IF])
        .unwrap();
    let line = listing
        .lines()
        .find(|l| l.contains(" 2001:db8:1::100/128 "))
        .unwrap_or_else(|| panic!("VIP not on {owner}:\n{listing}"));
    eprintln!("VIP on {owner}: {line}");
    assert!(!line.contains("nodad"), "keepalived skipped DAD: {line}");
    // The tunnel to the VIP is IPv6 end to end.
    let sas = lab.swanctl("fe1", &["--list-sas"]).unwrap();
    assert!(sas.contains("2001:db8:1::100"), "{sas}");
    let status = lab.agent_json("fe1", &["status"]).unwrap();
    assert!(status.to_string().contains("2001:db8:1::100"), "{status}");

    let (p6, c6) = planned_and_crash(&mut lab);
    drop(lab);

    let mut lab4 = build(Family::V4);
    let (p4, c4) = planned_and_crash(&mut lab4);
    drop(lab4);

    eprintln!("[ipv6 vs ipv4] vipsec-etcd, same run, one sample each");
    eprintln!(
        "{:<8} {:<6} {:>10} {:>16} {:>10} {:>10}",
        "fault", "family", "takeover", "takeover usable", "recovery", "clear text"
    );
    for (fault, family, o) in [
        ("planned", "IPv6", &p6),
        ("planned", "IPv4", &p4),
        ("crash", "IPv6", &c6),
        ("crash", "IPv4", &c4),
    ] {
        eprintln!(
            "{:<8} {:<6} {:>10} {:>16} {:>10} {:>10}",
            fault,
            family,
            opt(o.takeover),
            opt(o.takeover_usable),
            opt(o.recovery),
            o.cleartext.total()
        );
    }
}
