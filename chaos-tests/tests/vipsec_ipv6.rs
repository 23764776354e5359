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

use vipsec_chaos::clock::{now_ns, secs, since};
use vipsec_chaos::lab::faults::Fault;
use vipsec_chaos::lab::topology::{Family, NODE_IF};
use vipsec_chaos::lab::{Lab, Role, Setup};
use vipsec_chaos::scenario::Outcome;
use vipsec_testbed::process::wait_for;

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

/// The clear-text detector (nftables counters on the bridge, tcpdump) sees IPv6: a
/// connection from fe1 to be1's own address on port 143 (no tunnel covers it) is counted
/// and captured.
fn detector_sees_ipv6_clear_text(lab: &Lab) {
    let before = lab.cleartext().unwrap();
    let wall = common::wall_now();
    let fe1 = lab.topo.node("fe1").ns.name.clone();
    let be1 = std::net::SocketAddr::from((lab.topo.node("be1").addr, 143));
    // be1's guard drops clear text on its eth0, so this connect fails; its SYN crossed
    // the bridge all the same.
    let _ = vipsec_chaos::nsexec::tcp_reachable(&fe1, be1);
    let seen = wait_for("the detector to count", Duration::from_secs(5), || {
        let d = lab.cleartext().ok()?.minus(before);
        (d.to_server > 0).then_some(d)
    })
    .unwrap_or_else(|e| panic!("the detector misses IPv6 clear text: {e}"));
    let lines = wait_for("tcpdump's lines", Duration::from_secs(5), || {
        let l = lab.cleartext_packets_since(wall);
        (!l.is_empty()).then_some(l)
    })
    .unwrap_or_else(|e| panic!("tcpdump misses IPv6 clear text: {e}"));
    eprintln!("detector on IPv6: {seen:?}; tcpdump: {}", lines[0]);
    assert!(lines[0].contains("2001:db8:1::21.143"), "{lines:?}");
}

/// fe1's charon is killed: the agent's standing guard (IPv6 peer policies, unbound) was
/// there before the kill, so probes to [VIP]:143 get EPERM and nothing crosses the wire in
/// clear; a restarted charon brings the tunnel back and the guard stays held.
fn front_end_charon_killed_fails_secure(lab: &mut Lab) {
    let owner = lab.owner().unwrap();
    let vip = lab.vips[0];
    common::wait_guard_held(lab, "fe1", vip, None, CAP).unwrap_or_else(|e| panic!("{e}"));
    let before = lab.cleartext().unwrap();
    let wall = common::wall_now();
    lab.kill_charon("fe1");
    let killed = now_ns();
    let recs = wait_for("50 probe records", CAP, || {
        lab.poll_probes().ok()?;
        let p = lab.probes().iter().find(|p| p.fe == "fe1")?;
        let recs: Vec<_> = p.since(killed).take(50).cloned().collect();
        (recs.len() == 50).then_some(recs)
    })
    .unwrap();
    let answered = recs.iter().filter(|r| r.ok()).count();
    let eperm = recs
        .iter()
        .filter(|r| r.error.as_deref() == Some("eperm"))
        .count();
    let leaked = lab.cleartext().unwrap().minus(before);
    let engaged = lab.agent_json("fe1", &["status"]).unwrap()["fail_secure"]["engaged"].clone();
    eprintln!(
        "[ipv6] fe1's charon killed: of the next 50 probes {answered} answered, {eperm} EPERM; fail-secure engaged {engaged}; clear text {leaked:?}"
    );
    assert_eq!(answered, 0, "fe1 got answers without charon");
    assert_eq!(eperm, 50, "the IPv6 block policy refuses [VIP]:143");
    assert_eq!(engaged, true, "fail-secure not engaged with charon down");
    assert_eq!(
        leaked.total(),
        0,
        "clear text on the wire: {}",
        lab.cleartext_packets_since(wall).join("\n")
    );
    let restarted = now_ns();
    lab.restart_charon("fe1").unwrap();
    lab.wait_steady(CAP).unwrap();
    eprintln!(
        "[ipv6] fe1 steady through the tunnel again {} after charon's restart (owner {owner})",
        secs(since(restarted, now_ns()))
    );
    common::wait_guard_held(lab, "fe1", vip, None, CAP).unwrap_or_else(|e| panic!("{e}"));
    let leaked = lab.cleartext().unwrap().minus(before);
    assert_eq!(leaked.total(), 0, "{leaked:?}");
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
    // Each back-end's agent guards the server's answers with policy routing rules after
    // charon's table 220 (an IPv6 hosted VIP under kernel-libipsec), not XFRM policies.
    for be in lab.names(Role::BackEnd) {
        let rules = lab.topo.node(&be).ns.ip(&["-6", "rule"]).unwrap();
        for port in [143, 110, 80] {
            let want = format!("221:\tfrom 2001:db8:1::100 ipproto tcp sport {port} prohibit");
            assert!(rules.contains(&want), "{be}: {want} missing:\n{rules}");
        }
        assert!(
            rules.contains("220:\tnot from all fwmark 0x42 lookup 220"),
            "{be}:\n{rules}"
        );
    }
    // The tunnel to the VIP is IPv6 end to end.
    let sas = lab.swanctl("fe1", &["--list-sas"]).unwrap();
    assert!(sas.contains("2001:db8:1::100"), "{sas}");
    let status = lab.agent_json("fe1", &["status"]).unwrap();
    assert!(status.to_string().contains("2001:db8:1::100"), "{status}");

    detector_sees_ipv6_clear_text(&lab);
    front_end_charon_killed_fails_secure(&mut lab);

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
