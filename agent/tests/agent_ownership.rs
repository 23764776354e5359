//! The whole agent, wired by its runtime, with real parts: a back-end agent that sees the
//! VIP arrive and leave in its network namespace and records ownership in a real etcd, and a
//! front-end agent that learns of each change from the store. Both run as `vipsec agent`
//! processes and are queried with the `vipsec` CLI, as an operator would.

use std::process::Stdio;
use std::time::{Duration, Instant};

use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::{ProcessGuard, wait_for};

mod common;
use common::AgentProc;

const VIP: &str = "192.0.2.100";
const STORE: &str = "[store]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"/vipsec-test/\"\nlease_ttl = \"2s\"\n";

fn peer_owner(node: &AgentProc) -> Option<(String, u64)> {
    let s = node.status()?;
    let p = &s["peer_vips"][0];
    Some((
        p["owner"]["node"].as_str()?.to_string(),
        p["owner"]["epoch"].as_u64()?,
    ))
}

#[test]
fn vip_moves_in_the_kernel_reach_a_watching_agent_through_etcd() {
    let ns = Netns::new("own").unwrap();
    // This kernel has no dummy interfaces; a veth pair inside the namespace serves.
    ns.ip(&[
        "link", "add", "vip0", "type", "veth", "peer", "name", "vip0p",
    ])
    .unwrap();
    ns.ip(&["link", "set", "vip0", "up"]).unwrap();
    ns.ip(&["link", "set", "vip0p", "up"]).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // etcd inside the namespace, on the namespace's own loopback: no clash with anything.
    let data = dir.path().join("etcd");
    let _etcd = ProcessGuard::spawn(
        "etcd",
        ns.command("etcd")
            .args(["--name", "lab", "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "lab=http://127.0.0.1:2380",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();

    let be = AgentProc::start(
        Some(&ns),
        dir.path(),
        "be1",
        &format!("{STORE}[[hosted_vip]]\naddress = \"{VIP}\"\ninterface = \"vip0\"\n"),
    );
    let fe = AgentProc::start(
        Some(&ns),
        dir.path(),
        "fe1",
        &format!("{STORE}[[peer_vip]]\naddress = \"{VIP}\"\nconnection = \"vip100\"\n"),
    );
    wait_for(
        "both agents connected to etcd",
        Duration::from_secs(20),
        || {
            let ok = |n: &AgentProc| n.status().is_some_and(|s| s["store"]["healthy"] == true);
            (ok(&be) && ok(&fe)).then_some(())
        },
    )
    .unwrap();

    // The VIP arrives: the back-end publishes, the front-end learns the owner and epoch.
    let t = Instant::now();
    ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "vip0"])
        .unwrap();
    let (owner, epoch1) = wait_for(
        "the front-end to see be1 own the VIP",
        Duration::from_secs(5),
        || peer_owner(&fe).filter(|(n, _)| n == "be1"),
    )
    .unwrap();
    eprintln!(
        "VIP added -> front-end status shows owner {owner} (epoch {epoch1}) in {:?} (includes CLI polling)",
        t.elapsed()
    );
    let s = be.status().unwrap();
    assert_eq!(s["hosted_vips"][0]["present_locally"], true);
    assert_eq!(s["hosted_vips"][0]["owner"]["node"], "be1");

    // The VIP leaves: the record is withdrawn at once (not at lease expiry).
    let t = Instant::now();
    ns.ip(&["addr", "del", &format!("{VIP}/32"), "dev", "vip0"])
        .unwrap();
    wait_for(
        "the front-end to see no owner",
        Duration::from_millis(1500),
        || {
            fe.status()
                .filter(|s| s["peer_vips"][0]["owner"].is_null())
                .map(|_| ())
        },
    )
    .unwrap();
    eprintln!(
        "VIP removed -> front-end sees no owner in {:?}",
        t.elapsed()
    );
    assert_eq!(
        be.status().unwrap()["hosted_vips"][0]["present_locally"],
        false
    );

    // It comes back: a new acquisition, so a higher epoch.
    ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "vip0"])
        .unwrap();
    let (_, epoch2) = wait_for("a new epoch", Duration::from_secs(5), || {
        peer_owner(&fe).filter(|(n, e)| n == "be1" && *e > epoch1)
    })
    .unwrap();
    assert_eq!(epoch2, epoch1 + 1);

    // The back-end's agent dies without withdrawing: the record goes when its lease ends.
    let t = Instant::now();
    be.proc.signal(9).unwrap();
    wait_for("the lease to expire", Duration::from_secs(10), || {
        fe.status()
            .filter(|s| s["peer_vips"][0]["owner"].is_null())
            .map(|_| ())
    })
    .unwrap();
    eprintln!(
        "agent killed -> record expired after {:?} (lease TTL 2s)",
        t.elapsed()
    );
}
