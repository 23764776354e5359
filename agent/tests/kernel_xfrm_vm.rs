//! The XFRM kernel backend against kernel ESP SAs, inside a VM (this host's kernel has no
//! ESP). The host side boots the VM and runs this same test binary in it, with
//! `VIPSEC_VM_GUEST` set; the guest side does the work there.
//!
//! In the guest: namespaces `fe` and `be` joined by veth, the VIP on `be`, transport-mode
//! ESP SAs (hmac(sha256) + cbc(aes)) and policies both ways, added with `ip xfrm`.

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use vipsec::config::Config;
use vipsec::kernel::Kernel;
use vipsec::kernel::xfrm::state::SaDirection;
use vipsec::kernel::xfrm::{XfrmEvent, XfrmKernel};
use vipsec::model::VipRole;
use vipsec_testbed::netns::Netns;
use vipsec_testbed::vm::test_in_vm;

const FE: &str = "192.0.2.1";
const BE: &str = "192.0.2.2";
const VIP: &str = "192.0.2.100";
const AUTH_OUT: &str = "0x1111111111111111111111111111111111111111111111111111111111111111";
const ENC_OUT: &str = "0x22222222222222222222222222222222";
const AUTH_IN: &str = "0x3333333333333333333333333333333333333333333333333333333333333333";
const ENC_IN: &str = "0x44444444444444444444444444444444";

#[test]
fn esp_states_in_vm() {
    test_in_vm("esp_states_in_vm", Duration::from_secs(400), guest);
}

fn vip() -> IpAddr {
    VIP.parse().unwrap()
}

/// ESP state `src -> dst` with the given SPI, in `ns`.
fn add_state(ns: &Netns, src: &str, dst: &str, spi: &str, reqid: &str, auth: &str, enc: &str) {
    ns.ip(&[
        "xfrm",
        "state",
        "add",
        "src",
        src,
        "dst",
        dst,
        "proto",
        "esp",
        "spi",
        spi,
        "reqid",
        reqid,
        "mode",
        "transport",
        "auth",
        "hmac(sha256)",
        auth,
        "enc",
        "cbc(aes)",
        enc,
    ])
    .unwrap();
}

/// An ESP transport policy with the priority charon gives a host-to-host policy.
fn add_policy(ns: &Netns, dir: &str, src: &str, dst: &str, reqid: &str) {
    ns.ip(&[
        "xfrm",
        "policy",
        "add",
        "dir",
        dir,
        "src",
        &format!("{src}/32"),
        "dst",
        &format!("{dst}/32"),
        "tmpl",
        "src",
        src,
        "dst",
        dst,
        "proto",
        "esp",
        "reqid",
        reqid,
        "mode",
        "transport",
        "priority",
        "375423",
    ])
    .unwrap();
}

/// busybox's ping: busybox-static is installed wherever the VM tier runs.
fn ping(dst: &str) -> bool {
    Command::new("busybox")
        .args(["ping", "-c", "3", "-W", "3", dst])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn out_pol_block(ns: &Netns) -> u64 {
    ns.sh("cat /proc/net/xfrm_stat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("XfrmOutPolBlock"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap()
}

fn guest() {
    let t0 = Instant::now();
    let fe = Netns::new("vf").unwrap();
    let be = Netns::new("vb").unwrap();
    fe.veth_to("fe0", &format!("{FE}/24"), &be, "be0", &format!("{BE}/24"))
        .unwrap();
    be.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "be0"])
        .unwrap();
    for ns in [&fe, &be] {
        add_state(ns, FE, VIP, "0x1001", "1", AUTH_OUT, ENC_OUT);
        add_state(ns, VIP, FE, "0x1002", "2", AUTH_IN, ENC_IN);
    }
    add_policy(&fe, "out", FE, VIP, "1");
    add_policy(&fe, "in", VIP, FE, "2");
    add_policy(&be, "out", VIP, FE, "2");
    add_policy(&be, "in", FE, VIP, "1");
    eprintln!("guest: lab ready in {:?}", t0.elapsed());

    let config = Config::parse(&format!(
        "node = \"fe\"\n[kernel]\nbackend = \"xfrm\"\ninterface = \"fe0\"\n\
         [[peer_vip]]\naddress = \"{VIP}\"\nconnection = \"vip\"\nprotect = [\"any\"]\n"
    ))
    .unwrap();
    let fe_name = fe.name.clone();
    let be_ref = std::sync::Arc::new(be);
    let fe_ref = std::sync::Arc::new(fe);
    let fe_in = fe_ref.clone();
    fe_ref
        .run_in(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(in_fe(config, &fe_in))
        })
        .unwrap();
    drop(be_ref);
    eprintln!("guest: {fe_name} done in {:?}", t0.elapsed());
}

async fn in_fe(config: Config, fe: &Netns) {
    let kernel = std::sync::Arc::new(XfrmKernel::new(&config).unwrap());
    let cancel = tokio_util::sync::CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let watcher = tokio::spawn({
        let (k, c) = (kernel.clone(), cancel.clone());
        async move { k.watch_events(tx, c).await }
    });
    // On this single-threaded runtime one yield lets the watcher join its groups.
    tokio::task::yield_now().await;

    // The dump maps both SAs to the peer VIP.
    let sas = kernel.vip_states().await.unwrap();
    assert_eq!(sas.len(), 2, "{sas:?}");
    let out = sas
        .iter()
        .find(|s| s.direction == SaDirection::Outbound)
        .unwrap();
    assert_eq!(
        (out.vip, out.role, out.sa.spi),
        (vip(), VipRole::Peer, 0x1001)
    );
    assert_eq!(out.sa.proto, 50);
    assert!(out.sa.last_used.is_none(), "unused so far");

    // Traffic shows in the counters.
    assert!(ping(VIP), "ping over ESP");
    let c = kernel.vip_counters().await.unwrap()[&vip()];
    eprintln!("guest: counters after 3 pings: {c:?}");
    assert!(c.packets_out >= 3 && c.packets_in >= 3, "{c:?}");
    assert!(c.bytes_out > 0 && c.bytes_in > 0, "{c:?}");
    let sas = kernel.vip_states().await.unwrap();
    assert!(sas.iter().all(|s| s.sa.last_used.is_some()), "{sas:?}");

    // Fail-secure with kernel ESP: the block (larger priority number) loses to the ESP
    // policy, so protected traffic still flows; without the ESP policy it is blocked.
    assert_eq!(kernel.engage_fail_secure(vip()).await.unwrap(), 1);
    assert!(ping(VIP), "ESP policy wins over the block policy");
    let c2 = kernel.vip_counters().await.unwrap()[&vip()];
    assert!(c2.packets_out >= c.packets_out + 3, "{c2:?}");
    let blocked = out_pol_block(fe);
    fe.ip(&[
        "xfrm",
        "policy",
        "del",
        "dir",
        "out",
        "src",
        &format!("{FE}/32"),
        "dst",
        &format!("{VIP}/32"),
    ])
    .unwrap();
    assert!(
        !ping(VIP),
        "without the ESP policy the block policy refuses"
    );
    assert!(out_pol_block(fe) > blocked);
    kernel.release_fail_secure(vip()).await.unwrap();

    // Deleting the VIP's SAs.
    let t = Instant::now();
    assert_eq!(kernel.delete_states(vip()).await.unwrap(), 2);
    eprintln!("guest: delete_states (2 SAs) took {:?}", t.elapsed());
    assert!(kernel.vip_states().await.unwrap().is_empty());
    assert_eq!(kernel.delete_states(vip()).await.unwrap(), 0);

    // A hard expire of an SA toward the VIP, and an acquire for traffic without an SA.
    fe.ip(&[
        "xfrm",
        "state",
        "add",
        "src",
        FE,
        "dst",
        VIP,
        "proto",
        "esp",
        "spi",
        "0x2001",
        "mode",
        "transport",
        "auth",
        "hmac(sha256)",
        AUTH_OUT,
        "enc",
        "cbc(aes)",
        ENC_OUT,
        "limit",
        "time-soft",
        "1",
        "limit",
        "time-hard",
        "2",
    ])
    .unwrap();
    add_policy(fe, "out", FE, BE, "9");
    let _ = Command::new("busybox")
        .args(["ping", "-c", "1", "-W", "1", BE])
        .output();

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let hard_expire = |e: &XfrmEvent| matches!(e, XfrmEvent::Expire { hard: true, spi: 0x2001, vip: Some(v), role: Some(VipRole::Peer), .. } if *v == vip());
    let acquire =
        |e: &XfrmEvent| matches!(e, XfrmEvent::Acquire { dst: Some(d), .. } if d.to_string() == BE);
    while !(seen.iter().any(hard_expire) && seen.iter().any(acquire)) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => seen.push(e),
            _ => panic!("expire/acquire events not seen within 30 s: {seen:#?}"),
        }
    }
    let deleted = seen
        .iter()
        .filter(|e| matches!(e, XfrmEvent::SaDeleted { .. }))
        .count();
    eprintln!(
        "guest: {} events, {deleted} SA deletions, hard expire and acquire seen",
        seen.len()
    );
    cancel.cancel();
    watcher.await.unwrap();
}

const FE6: &str = "2001:db8::1";
const BE6: &str = "2001:db8::2";
const VIP6: &str = "2001:db8::100";

/// The IPv6 twin of [`esp_states_in_vm`]: kernel ESP SAs and policies with /128 selectors,
/// mapped to the IPv6 peer VIP by the state dump, deleted by `delete_states`, and the
/// fail-secure block (unbound for an IPv6 peer VIP) losing to the ESP policy.
#[test]
fn esp6_states_in_vm() {
    test_in_vm("esp6_states_in_vm", Duration::from_secs(400), guest6);
}

fn add_policy6(ns: &Netns, dir: &str, src: &str, dst: &str, reqid: &str) {
    ns.ip(&[
        "xfrm",
        "policy",
        "add",
        "dir",
        dir,
        "src",
        &format!("{src}/128"),
        "dst",
        &format!("{dst}/128"),
        "tmpl",
        "src",
        src,
        "dst",
        dst,
        "proto",
        "esp",
        "reqid",
        reqid,
        "mode",
        "transport",
        "priority",
        "375423",
    ])
    .unwrap();
}

fn connect6(port: u16) -> bool {
    let addr = std::net::SocketAddr::new(VIP6.parse().unwrap(), port);
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

fn guest6() {
    let t0 = Instant::now();
    let fe = Netns::new("v6f").unwrap();
    let be = Netns::new("v6b").unwrap();
    fe.veth_to("fe0", "192.0.2.1/24", &be, "be0", "192.0.2.2/24")
        .unwrap();
    // nodad: this test is about ESP and selectors; DAD has tests of its own.
    fe.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{FE6}/64"),
        "dev",
        "fe0",
        "nodad",
    ])
    .unwrap();
    be.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{BE6}/64"),
        "dev",
        "be0",
        "nodad",
    ])
    .unwrap();
    be.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{VIP6}/128"),
        "dev",
        "be0",
        "nodad",
    ])
    .unwrap();
    let _listener = be
        .run_in(|| std::net::TcpListener::bind((VIP6, 143)).expect("bind [VIP6]:143"))
        .unwrap();
    for ns in [&fe, &be] {
        add_state(ns, FE6, VIP6, "0x1001", "1", AUTH_OUT, ENC_OUT);
        add_state(ns, VIP6, FE6, "0x1002", "2", AUTH_IN, ENC_IN);
    }
    add_policy6(&fe, "out", FE6, VIP6, "1");
    add_policy6(&fe, "in", VIP6, FE6, "2");
    add_policy6(&be, "out", VIP6, FE6, "2");
    add_policy6(&be, "in", FE6, VIP6, "1");
    eprintln!("guest: IPv6 lab ready in {:?}", t0.elapsed());

    let config = Config::parse(&format!(
        "node = \"fe\"\n[kernel]\nbackend = \"xfrm\"\ninterface = \"fe0\"\n\
         [[peer_vip]]\naddress = \"{VIP6}\"\nconnection = \"vip6\"\nprotect = [\"tcp/143\"]\n"
    ))
    .unwrap();
    let fe = std::sync::Arc::new(fe);
    let fe_in = fe.clone();
    fe.run_in(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(in_fe6(config, &fe_in))
    })
    .unwrap();
    drop(be);
    eprintln!("guest: IPv6 done in {:?}", t0.elapsed());
}

async fn in_fe6(config: Config, fe: &Netns) {
    let vip6: IpAddr = VIP6.parse().unwrap();
    let kernel = XfrmKernel::new(&config).unwrap();
    let sas = kernel.vip_states().await.unwrap();
    assert_eq!(sas.len(), 2, "{sas:?}");
    let out = sas
        .iter()
        .find(|s| s.direction == SaDirection::Outbound)
        .unwrap();
    assert_eq!(
        (out.vip, out.role, out.sa.spi),
        (vip6, VipRole::Peer, 0x1001)
    );
    assert_eq!(out.sa.src, FE6.parse::<IpAddr>().unwrap());

    assert!(connect6(143), "TCP to [VIP6]:143 over ESP");
    let c = kernel.vip_counters().await.unwrap()[&vip6];
    eprintln!("guest: IPv6 counters after one connection: {c:?}");
    assert!(c.packets_out > 0 && c.packets_in > 0, "{c:?}");

    // The block (unbound for an IPv6 peer VIP) loses to the ESP policy; without the ESP
    // policy it refuses.
    assert_eq!(kernel.engage_fail_secure(vip6).await.unwrap(), 1);
    let own = kernel.block_policies().await.unwrap();
    assert_eq!(own[0].selector.ifindex, 0, "{own:?}");
    assert!(connect6(143), "the ESP policy wins over the block policy");
    let blocked = out_pol_block(fe);
    fe.ip(&[
        "xfrm",
        "policy",
        "del",
        "dir",
        "out",
        "src",
        &format!("{FE6}/128"),
        "dst",
        &format!("{VIP6}/128"),
    ])
    .unwrap();
    assert!(
        !connect6(143),
        "without the ESP policy the block policy refuses"
    );
    assert!(out_pol_block(fe) > blocked);
    kernel.release_fail_secure(vip6).await.unwrap();

    let t = Instant::now();
    assert_eq!(kernel.delete_states(vip6).await.unwrap(), 2);
    eprintln!("guest: IPv6 delete_states (2 SAs) took {:?}", t.elapsed());
    assert!(kernel.vip_states().await.unwrap().is_empty());
    assert_eq!(kernel.delete_states(vip6).await.unwrap(), 0);
}
