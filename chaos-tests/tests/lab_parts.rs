//! The lab's own instruments and fault primitives, checked against real traffic: the
//! clear-text detector sees clear text when there is some, partitions and packet loss
//! break traffic and healing restores it, a front-end behind NAT gets its tunnel, several
//! VIPs come up at once.

mod common;

use std::time::Duration;

use vipsec_chaos::clock::now_ns;
use vipsec_chaos::lab::faults;
use vipsec_chaos::lab::{Lab, Setup};
use vipsec_testbed::process::wait_for;

/// Waits until `fe` has `n` finished attempts that started after `t`, then returns
/// (answered, failed) among them.
fn outcomes_after(lab: &mut Lab, fe: &str, t: u64, n: usize) -> (usize, usize) {
    wait_for("probe records", Duration::from_secs(10), || {
        lab.poll_probes().ok()?;
        let p = lab.probes().iter().find(|p| p.fe == fe)?;
        let recs: Vec<_> = p.since(t).take(n).collect();
        (recs.len() == n).then(|| {
            let ok = recs.iter().filter(|r| r.ok()).count();
            (ok, n - ok)
        })
    })
    .expect("the probe keeps writing")
}

#[test]
fn cleartext_detector_counts_protected_ports_when_charon_dies() {
    let _t = common::start("clear-text detector");
    let mut lab = common::lab(Setup::StrongswanDefaults);
    let before = lab.cleartext().unwrap();
    lab.kill_charon("fe1");
    // Without charon, its TUN device and routes are gone: fe1's probes go out in clear.
    let t = now_ns();
    let (ok, _) = outcomes_after(&mut lab, "fe1", t, 20);
    let leaked = lab.cleartext().unwrap().minus(before);
    eprintln!("charon on fe1 dead: {leaked:?}, {ok} of 20 probes answered");
    assert!(leaked.to_server > 0, "the detector missed clear text");
    // The back-end's guard refuses clear text: no answer came back.
    assert_eq!(ok, 0);
}

#[test]
fn partition_and_packet_loss_break_traffic_until_healed() {
    let _t = common::start("partition and packet loss");
    let mut lab = common::lab(Setup::StrongswanDefaults);
    let owner = lab.owner().unwrap();
    let fe1 = lab.topo.node("fe1").hub_port.clone();
    let be = lab.topo.node(&owner).hub_port.clone();

    faults::partition(&lab.topo.hub, &fe1, &be).unwrap();
    let (ok, failed) = outcomes_after(&mut lab, "fe1", now_ns(), 20);
    eprintln!("partitioned: {ok} answered, {failed} failed");
    assert_eq!(ok, 0, "traffic crossed a partition");
    let (ok2, _) = outcomes_after(&mut lab, "fe2", now_ns(), 20);
    assert_eq!(ok2, 20, "the partition hit a front-end it should not");

    faults::heal(&lab.topo.hub).unwrap();
    lab.wait_steady(Duration::from_secs(10)).unwrap();

    faults::packet_loss(&lab.topo.hub, &fe1, 50).unwrap();
    let (ok, failed) = outcomes_after(&mut lab, "fe1", now_ns(), 60);
    eprintln!("50% loss each way: {ok} answered, {failed} failed");
    assert!(ok > 0 && failed > 0, "{ok} answered, {failed} failed");
    faults::heal(&lab.topo.hub).unwrap();
    lab.wait_steady(Duration::from_secs(10)).unwrap();
}

#[test]
fn front_end_behind_nat_gets_its_tunnel() {
    let _t = common::start("front-end behind NAT");
    let mut opts = common::options(Setup::StrongswanDpd);
    opts.nat_front_end = Some("fe2".into());
    let lab = common::build(opts);
    let owner = lab.owner().unwrap();
    let sas = lab.swanctl(&owner, &["--list-sas"]).unwrap();
    // The owner sees fe2 at the NAT router's outside address, with NAT-T ports.
    assert!(sas.contains("192.0.2.32"), "{sas}");
    assert!(lab.cleartext().unwrap().total() == 0);
}

#[test]
fn several_vips_come_up_together() {
    let _t = common::start("three VIPs");
    let mut opts = common::options(Setup::StrongswanDpd);
    opts.vips = 3;
    let lab = common::build(opts);
    let owner = lab.owner().unwrap();
    for vip in &lab.vips {
        assert_eq!(lab.topo.holders(*vip), vec![owner.clone()]);
    }
    let sas = lab.swanctl("fe1", &["--list-sas"]).unwrap();
    for name in ["vip100", "vip101", "vip102"] {
        assert!(sas.contains(name), "{name} missing in {sas}");
    }
}

#[test]
fn reset_brings_a_series_of_faults_back_to_a_clean_start() {
    let _t = common::start("series of faults on one lab");
    let mut lab = common::lab(Setup::StrongswanDpd);
    let first = lab.owner().unwrap();
    let cap = Duration::from_secs(30);
    let o1 = common::run(&mut lab, faults::Fault::Crash, cap);
    lab.reset().unwrap();
    // nopreempt: the restored node stays backup, so the next fault moves the VIP back.
    assert_eq!(lab.owner().unwrap(), o1.to);
    let o2 = common::run(&mut lab, faults::Fault::Planned, cap);
    assert_eq!(o2.to, first);
    for o in [&o1, &o2] {
        common::assert_safe(o);
        common::assert_recovered(o, cap);
    }
}

#[test]
fn a_killed_run_is_cleaned_up_by_the_next() {
    let _t = common::start("killed run reaped");
    let registry = std::env::temp_dir().join("vipsec-chaos-runs");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vipsec-chaos"))
        .args(["demo", "--setup", "strongswan-defaults", "--cap", "5"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let prefix = format!("{}-", child.id());
    // Wait until the whole network is registered (hub, run dir, five nodes).
    let file = wait_for("the killed run's registry", Duration::from_secs(20), || {
        std::fs::read_dir(&registry)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
                    && std::fs::read_to_string(p).is_ok_and(|t| t.lines().count() >= 7)
            })
    })
    .unwrap();
    let listed = std::fs::read_to_string(&file).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let netns = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let namespaces: Vec<&str> = listed.lines().filter(|l| !l.starts_with("dir ")).collect();
    let run_dir = listed
        .lines()
        .find_map(|l| l.strip_prefix("dir "))
        .unwrap()
        .to_string();
    assert!(
        namespaces.iter().all(|n| netns().contains(n)),
        "a killed run leaves its namespaces behind (no Drop ran)"
    );

    let _lab = common::lab(Setup::StrongswanDefaults);
    let now = netns();
    for n in &namespaces {
        assert!(!now.contains(n), "{n} of the killed run is still there");
    }
    assert!(!file.exists());
    assert!(
        !std::path::Path::new(&run_dir).exists(),
        "{run_dir} left behind"
    );
}

/// The takeover instrument: an address added in a namespace is announced at once, an
/// IPv6 one first tentative and then usable after duplicate address detection, and
/// nothing announced means no takeover by the deadline.
#[test]
fn address_announcements_time_the_takeover() {
    use std::net::IpAddr;
    use vipsec_chaos::lab::addr_events::AddrEvents;
    use vipsec_testbed::netns::Netns;

    let ns = Netns::new("ae").expect("netns");
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])
    .unwrap();
    ns.link_set("eth0", true).unwrap();
    ns.link_set("eth1", true).unwrap();
    let events = AddrEvents::open(&ns).unwrap();
    let (v4, v6): (IpAddr, IpAddr) = (
        "192.0.2.100".parse().unwrap(),
        "2001:db8:1::100".parse().unwrap(),
    );
    let soon = || now_ns() + 200_000_000;
    assert_eq!(events.wait_all(&[v4], false, soon()).unwrap(), None);

    let before = now_ns();
    ns.ip(&["addr", "add", "192.0.2.100/32", "dev", "eth0"])
        .unwrap();
    ns.ip(&["addr", "add", "2001:db8:1::100/64", "dev", "eth0"])
        .unwrap();
    let added = now_ns();
    let present = events
        .wait_all(&[v4, v6], false, now_ns() + 5_000_000_000)
        .unwrap()
        .expect("both announced");
    assert!(
        (before..=now_ns()).contains(&present),
        "announced at {present}, added between {before} and {added}"
    );
    // DAD runs on the veth: the IPv6 address is tentative first, usable a moment later.
    let usable = events
        .wait_all(&[v6], true, now_ns() + 10_000_000_000)
        .unwrap()
        .expect("DAD done");
    let tentative = events.wait_all(&[v6], false, soon()).unwrap().unwrap();
    assert!(
        tentative < usable && usable > added,
        "announced at {tentative}, usable at {usable}, added by {added}"
    );
    // An address that goes counts again from its next arrival.
    ns.ip(&["addr", "del", "192.0.2.100/32", "dev", "eth0"])
        .unwrap();
    let gone = wait_for(
        "the address gone",
        std::time::Duration::from_secs(5),
        || {
            events
                .wait_all(&[v4], false, now_ns())
                .ok()?
                .is_none()
                .then_some(())
        },
    );
    assert!(gone.is_ok(), "still counted after its removal");
    let readded = now_ns();
    ns.ip(&["addr", "add", "192.0.2.100/32", "dev", "eth0"])
        .unwrap();
    let back = events.wait_all(&[v4], false, soon()).unwrap().unwrap();
    assert!(
        back >= readded,
        "counted from {back}, re-added at {readded}"
    );
    // An address held before the fault gets no announcement: it counts from then.
    let held: IpAddr = "192.0.2.101".parse().unwrap();
    let at = now_ns();
    events.already_held(&[(held, true)], at);
    assert_eq!(
        events.wait_all(&[v4, held], true, soon()).unwrap(),
        Some(at)
    );
}
