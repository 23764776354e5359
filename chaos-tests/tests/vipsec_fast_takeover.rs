//! keepalived tuned to 100 ms adverts (its takeover after a crash is then about 0.35 s,
//! well inside the dead owner's 2 s lease): the node keepalived gives the VIP asks the link
//! whether the owner of record still holds the address, and takes the record over at a new
//! epoch when nobody answers, instead of waiting for the old lease. A planned move and a
//! crash must recover with no clear text, and the crash must go through the takeover.
//! (The other side, a VIP added by hand next to a live owner staying refused, is in
//! vipsec_safety.rs.) Needs the `vipsec` binary built in the same target directory.

mod common;

use std::time::Duration;

use vipsec_chaos::clock::secs;
use vipsec_chaos::lab::faults::Fault;
use vipsec_chaos::lab::topology::Family;
use vipsec_chaos::lab::{Lab, Setup};

const CAP: Duration = Duration::from_secs(30);
/// Longer than the lab's 2 s: over IPv6 the kernel's DAD on the VIP (a random delay of up
/// to 1 s, then 1 s of waiting for an answer) can hold the new owner's address back until
/// a 2 s lease has run out on its own, and the record is then simply free; the takeover
/// under test only happens while the dead owner's lease still holds it. etcd's keep-alive
/// renews at a third of the TTL, so at least 4 s of this lease remain at the crash.
const LEASE: Duration = Duration::from_secs(6);

fn epoch_on(lab: &Lab, node: &str) -> u64 {
    let vip = lab.vips[0].to_string();
    let s = lab
        .agent_json(node, &["status"])
        .unwrap_or_else(|e| panic!("status of {node}: {e:#}"));
    s["hosted_vips"]
        .as_array()
        .and_then(|l| l.iter().find(|v| v["address"] == vip.as_str()))
        .and_then(|v| v["epoch"].as_u64())
        .unwrap_or_else(|| panic!("{vip} not in {node}'s status: {s}"))
}

#[test]
fn with_100ms_adverts_a_crashed_owner_is_taken_over_without_waiting_for_its_lease() {
    let _t = common::start("fast VRRP: planned move and crash");
    fast_vrrp(Family::V4);
}

/// IPv6 asks with a neighbour solicitation instead of ARP.
#[test]
fn over_ipv6_too() {
    let _t = common::start("fast VRRP over IPv6: planned move and crash");
    fast_vrrp(Family::V6);
}

fn fast_vrrp(family: Family) {
    let mut opts = common::options(Setup::VipsecEtcd);
    opts.vrrp_advert = Duration::from_millis(100);
    opts.lease_ttl = LEASE;
    opts.family = family;
    let mut lab = common::build(opts);

    let planned = common::run(&mut lab, Fault::Planned, CAP);
    common::assert_safe(&planned);
    common::assert_recovered(&planned, CAP);
    lab.restore(&planned.from).unwrap();
    lab.wait_steady(CAP).unwrap();

    let from = lab.owner().expect("an owner");
    let epoch_before = epoch_on(&lab, &from);
    let o = common::run(&mut lab, Fault::Crash, CAP);
    common::assert_safe(&o);
    common::assert_recovered(&o, CAP);
    let (takeover, recovery) = (o.takeover.unwrap(), o.recovery.unwrap());
    eprintln!(
        "[measured] 100 ms adverts, {family:?}, crash of {from}: takeover {} (usable {}), recovery {}, recovery - takeover {} (lease {} s)",
        secs(takeover),
        secs(o.takeover_usable.unwrap_or(takeover)),
        secs(recovery),
        secs(recovery.saturating_sub(takeover)),
        LEASE.as_secs(),
    );
    let usable = o.takeover_usable.unwrap_or(takeover);
    assert!(
        usable < LEASE * 2 / 3,
        "the VIP became usable {} after the crash, too late for the dead owner's lease to \
         still hold the record: this run cannot show a takeover",
        secs(usable)
    );
    let log = lab.agent_log(&o.to).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("ownership taken over") && l.contains(&from)),
        "{} did not take {from}'s record over:\n{log}",
        o.to
    );
    assert!(
        epoch_on(&lab, &o.to) > epoch_before,
        "the takeover writes a new epoch"
    );
}
