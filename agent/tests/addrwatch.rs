//! The rtnetlink address watcher in a fresh network namespace: start-up state, additions
//! and removals, interface filtering, and IPv6 duplicate address detection.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vipsec::addrwatch::AddressWatcher;
use vipsec::addrwatch::rtnetlink::NetlinkAddressWatcher;
use vipsec::config::HostedVipConfig;
use vipsec::failover::Input;
use vipsec::model::Vip;
use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::wait_for;

const WAIT: Duration = Duration::from_secs(10);

/// The watcher running inside a namespace, on its own thread.
struct NsWatcher {
    inputs: mpsc::Receiver<Input>,
    cancel: CancellationToken,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl NsWatcher {
    /// Enters `ns` on a dedicated thread (setns changes only the calling thread) before the
    /// netlink socket exists, so the socket belongs to the namespace for good.
    fn start(ns: &Netns, vips: Vec<HostedVipConfig>) -> NsWatcher {
        let path = format!("/run/netns/{}", ns.name);
        let (tx, inputs) = mpsc::channel(256);
        let cancel = CancellationToken::new();
        let thread = std::thread::spawn({
            let cancel = cancel.clone();
            move || -> Result<(), String> {
                let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
                // SAFETY: plain syscall on a valid descriptor; affects this thread only.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(NetlinkAddressWatcher.run(vips, tx, cancel))
                    .map_err(|e| e.to_string())
            }
        });
        NsWatcher {
            inputs,
            cancel,
            thread: Some(thread),
        }
    }

    async fn next(&mut self, what: &str) -> Input {
        match tokio::time::timeout(WAIT, self.inputs.recv()).await {
            Ok(Some(i)) => i,
            Ok(None) => {
                let r = self.thread.take().map(|t| t.join());
                panic!("watcher stopped while waiting for {what}: {r:?}")
            }
            Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
        }
    }

    fn stop(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.thread.take() {
            t.join().expect("watcher thread").expect("watcher result");
        }
    }
}

fn vip(s: &str) -> Vip {
    s.parse().unwrap()
}

fn hosted(addr: &str, interface: Option<&str>) -> HostedVipConfig {
    HostedVipConfig {
        address: vip(addr),
        interface: interface.map(str::to_string),
        protect: Vec::new(),
    }
}

fn lab() -> Netns {
    vipsec_testbed::require_root().unwrap();
    vipsec_testbed::require_program("ip").unwrap();
    let ns = Netns::new("aw").expect("netns");
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        .unwrap();
    ns.link_set("v0", true).unwrap();
    ns.link_set("v1", true).unwrap();
    ns
}

#[tokio::test]
async fn addresses_appear_and_disappear_in_a_namespace() {
    let ns = lab();
    ns.ip(&["addr", "add", "192.0.2.10/24", "dev", "v0"])
        .unwrap();
    let mut w = NsWatcher::start(
        &ns,
        vec![
            hosted("192.0.2.10", None),
            hosted("192.0.2.20", Some("v1")),
            hosted("192.0.2.30", None),
        ],
    );
    assert_eq!(
        w.next("start-up state").await,
        Input::VipAppeared(vip("192.0.2.10"))
    );

    // /32 everywhere below: a second address in the same subnet would be a "secondary"
    // that the kernel deletes together with its primary.
    // Bound to v1: the same address on v0 does not count. The removal that follows must be
    // the very next input, which proves the addition on v0 produced none.
    ns.ip(&["addr", "add", "192.0.2.20/32", "dev", "v0"])
        .unwrap();
    ns.ip(&["addr", "del", "192.0.2.10/24", "dev", "v0"])
        .unwrap();
    assert_eq!(
        w.next("removal").await,
        Input::VipDisappeared(vip("192.0.2.10"))
    );

    let mut appear = Vec::new();
    let t = Instant::now();
    ns.ip(&["addr", "add", "192.0.2.20/32", "dev", "v1"])
        .unwrap();
    assert_eq!(
        w.next("VIP on v1").await,
        Input::VipAppeared(vip("192.0.2.20"))
    );
    appear.push(t.elapsed());

    // Present on two interfaces: it leaves only when it left both.
    ns.ip(&["addr", "add", "192.0.2.10/32", "dev", "v0"])
        .unwrap();
    assert_eq!(
        w.next("re-added").await,
        Input::VipAppeared(vip("192.0.2.10"))
    );
    ns.ip(&["addr", "add", "192.0.2.10/32", "dev", "v1"])
        .unwrap();
    ns.ip(&["addr", "del", "192.0.2.10/32", "dev", "v0"])
        .unwrap();
    ns.ip(&["addr", "del", "192.0.2.20/32", "dev", "v0"])
        .unwrap();
    let t = Instant::now();
    ns.ip(&["addr", "del", "192.0.2.20/32", "dev", "v1"])
        .unwrap();
    assert_eq!(
        w.next("v1 removal").await,
        Input::VipDisappeared(vip("192.0.2.20"))
    );
    let mut disappear = vec![t.elapsed()];
    ns.ip(&["addr", "del", "192.0.2.10/32", "dev", "v1"])
        .unwrap();
    assert_eq!(
        w.next("last copy gone").await,
        Input::VipDisappeared(vip("192.0.2.10"))
    );

    for _ in 0..10 {
        let t = Instant::now();
        ns.ip(&["addr", "add", "192.0.2.30/32", "dev", "v0"])
            .unwrap();
        assert_eq!(w.next("add").await, Input::VipAppeared(vip("192.0.2.30")));
        appear.push(t.elapsed());
        let t = Instant::now();
        ns.ip(&["addr", "del", "192.0.2.30/32", "dev", "v0"])
            .unwrap();
        assert_eq!(
            w.next("del").await,
            Input::VipDisappeared(vip("192.0.2.30"))
        );
        disappear.push(t.elapsed());
    }
    appear.sort();
    disappear.sort();
    eprintln!(
        "`ip addr add` -> VipAppeared: median {:?}; `ip addr del` -> VipDisappeared: median {:?} ({} rounds, includes running ip)",
        appear[appear.len() / 2],
        disappear[disappear.len() / 2],
        appear.len()
    );
    w.stop();
}

#[tokio::test]
async fn ipv6_appears_only_after_duplicate_address_detection() {
    let ns = lab();
    let mut w = NsWatcher::start(
        &ns,
        vec![
            hosted("2001:db8::10", None),
            hosted("2001:db8::20", None),
            hosted("2001:db8::30", Some("v0")),
        ],
    );

    // nodad: usable at once.
    ns.ip(&["-6", "addr", "add", "2001:db8::20/64", "dev", "v0", "nodad"])
        .unwrap();
    assert_eq!(
        w.next("nodad address").await,
        Input::VipAppeared(vip("2001:db8::20"))
    );

    // With DAD the kernel reports it tentative first; it appears when the flag clears.
    let t = Instant::now();
    ns.ip(&["-6", "addr", "add", "2001:db8::10/64", "dev", "v0"])
        .unwrap();
    let listing = ns.ip(&["-6", "addr", "show", "dev", "v0"]).unwrap();
    assert!(
        listing
            .lines()
            .any(|l| l.contains("2001:db8::10/64") && l.contains("tentative")),
        "expected a tentative address right after adding it:\n{listing}"
    );
    assert_eq!(
        w.next("address after DAD").await,
        Input::VipAppeared(vip("2001:db8::10"))
    );
    let dad = t.elapsed();
    let listing = ns.ip(&["-6", "addr", "show", "dev", "v0"]).unwrap();
    assert!(
        !listing
            .lines()
            .any(|l| l.contains("2001:db8::10/64") && l.contains("tentative")),
        "reported before DAD finished:\n{listing}"
    );
    eprintln!("IPv6 address with DAD reported usable {dad:?} after `ip addr add`");

    // A duplicate: v1 already holds ::30, so DAD on v0 fails and it must never appear.
    ns.ip(&["-6", "addr", "add", "2001:db8::30/64", "dev", "v1", "nodad"])
        .unwrap();
    ns.ip(&["-6", "addr", "add", "2001:db8::30/64", "dev", "v0"])
        .unwrap();
    wait_for("DAD to fail on v0", WAIT, || {
        let l = ns.ip(&["-6", "addr", "show", "dev", "v0"]).ok()?;
        l.lines()
            .any(|l| l.contains("2001:db8::30/64") && l.contains("dadfailed"))
            .then_some(())
    })
    .unwrap();
    ns.ip(&["-6", "addr", "del", "2001:db8::20/64", "dev", "v0"])
        .unwrap();
    assert_eq!(
        w.next("marker removal").await,
        Input::VipDisappeared(vip("2001:db8::20")),
        "a dadfailed address must not appear"
    );
    w.stop();
}

/// Two nodes on one Linux bridge (in a hub namespace), like a cluster's LAN.
struct BridgeLan {
    a: Netns,
    b: Netns,
    _hub: Netns,
}

fn bridge_lan() -> BridgeLan {
    let hub = lab();
    hub.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    hub.link_set("br0", true).unwrap();
    let a = Netns::new("awa").expect("netns");
    let b = Netns::new("awb").expect("netns");
    for (port, ns) in [("pa", &a), ("pb", &b)] {
        // DAD stays on: the kernel's defaults, written explicitly so that a host with other
        // defaults runs the same test, and checked below.
        ns.sh(
            "sysctl -qw net.ipv6.conf.all.accept_dad=1 net.ipv6.conf.default.accept_dad=1 \
               net.ipv6.conf.default.dad_transmits=1 net.ipv6.conf.all.disable_ipv6=0 \
               net.ipv6.conf.default.disable_ipv6=0",
        )
        .unwrap();
        hub.ip(&[
            "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])
        .unwrap();
        hub.ip(&["link", "set", port, "master", "br0"]).unwrap();
        hub.link_set(port, true).unwrap();
        ns.link_set("eth0", true).unwrap();
        let dad = ns
            .sh("sysctl -n net.ipv6.conf.eth0.accept_dad net.ipv6.conf.eth0.dad_transmits")
            .unwrap();
        assert_eq!(
            dad.split_whitespace().collect::<Vec<_>>(),
            ["1", "1"],
            "DAD must be on (accept_dad, dad_transmits) in {}",
            ns.name
        );
    }
    BridgeLan { a, b, _hub: hub }
}

/// The address's line in `ip -6 -o addr show dev eth0` in namespace `ns`, if it is there.
fn addr_line(ns: &str, cidr: &str) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-6", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&format!(" {cidr} ")))
        .map(str::to_string)
}

/// Real DAD on a bridge, DAD defaults on, plain `ip -6 addr add`: the VIP is reported only
/// once the kernel cleared `tentative`, and an address whose DAD fails (another node on the
/// bridge holds it) is never reported.
#[tokio::test]
async fn ipv6_vip_on_a_bridge_is_reported_after_dad_and_never_when_dad_fails() {
    let lan = bridge_lan();
    let mut w = NsWatcher::start(
        &lan.b,
        vec![
            hosted("2001:db8:1::100", Some("eth0")),
            hosted("2001:db8:1::200", None),
        ],
    );

    // A poller records when `tentative` leaves the listing, next to when the watcher
    // reports the VIP. Both clocks start at the `ip addr add`.
    let mut dad_times = Vec::new();
    let mut report_times = Vec::new();
    for round in 0..3 {
        let t = Instant::now();
        lan.b
            .ip(&["-6", "addr", "add", "2001:db8:1::100/64", "dev", "eth0"])
            .unwrap();
        let first = addr_line(&lan.b.name, "2001:db8:1::100/64").expect("address listed");
        assert!(first.contains("tentative"), "DAD did not run: {first}");
        let ns_name = lan.b.name.clone();
        let poller = std::thread::spawn(move || {
            wait_for("DAD to finish", WAIT, || {
                let l = addr_line(&ns_name, "2001:db8:1::100/64")?;
                (!l.contains("tentative")).then(|| t.elapsed())
            })
        });
        assert_eq!(
            w.next("VIP after DAD").await,
            Input::VipAppeared(vip("2001:db8:1::100"))
        );
        let reported = t.elapsed();
        let line = addr_line(&lan.b.name, "2001:db8:1::100/64").unwrap();
        assert!(
            !line.contains("tentative") && !line.contains("dadfailed"),
            "reported while still tentative: {line}"
        );
        let dad_done = poller.join().unwrap().unwrap();
        eprintln!(
            "round {round}: DAD finished (listing) after {dad_done:?}, VipAppeared after {reported:?}"
        );
        dad_times.push(dad_done);
        report_times.push(reported);
        lan.b
            .ip(&["-6", "addr", "del", "2001:db8:1::100/64", "dev", "eth0"])
            .unwrap();
        assert_eq!(
            w.next("removal").await,
            Input::VipDisappeared(vip("2001:db8:1::100"))
        );
    }
    dad_times.sort();
    report_times.sort();
    eprintln!(
        "IPv6 DAD (accept_dad=1, dad_transmits=1, real bridge): tentative cleared after {:?}..{:?}, VipAppeared after {:?}..{:?} ({} rounds)",
        dad_times[0],
        dad_times[dad_times.len() - 1],
        report_times[0],
        report_times[report_times.len() - 1],
        dad_times.len()
    );

    // Node a holds ::200 (after its own DAD); b's copy fails DAD and must never count.
    lan.a
        .ip(&["-6", "addr", "add", "2001:db8:1::200/64", "dev", "eth0"])
        .unwrap();
    wait_for("DAD on node a", WAIT, || {
        addr_line(&lan.a.name, "2001:db8:1::200/64").filter(|l| !l.contains("tentative"))
    })
    .unwrap();
    lan.b
        .ip(&["-6", "addr", "add", "2001:db8:1::100/64", "dev", "eth0"])
        .unwrap();
    assert_eq!(
        w.next("marker VIP").await,
        Input::VipAppeared(vip("2001:db8:1::100"))
    );
    let t = Instant::now();
    lan.b
        .ip(&["-6", "addr", "add", "2001:db8:1::200/64", "dev", "eth0"])
        .unwrap();
    let failed = wait_for("DAD to fail on node b", WAIT, || {
        addr_line(&lan.b.name, "2001:db8:1::200/64").filter(|l| l.contains("dadfailed"))
    })
    .unwrap();
    eprintln!("duplicate detected after {:?}: {failed}", t.elapsed());
    // The next input must be the marker's removal: the dadfailed address produced none.
    lan.b
        .ip(&["-6", "addr", "del", "2001:db8:1::100/64", "dev", "eth0"])
        .unwrap();
    assert_eq!(
        w.next("marker removal").await,
        Input::VipDisappeared(vip("2001:db8:1::100")),
        "a dadfailed address must never be reported"
    );
    w.stop();
}
