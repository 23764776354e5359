//! The XFRM kernel backend against real XFRM policies, inside a namespace pair.
//!
//! The front-end namespace `fe` talks to a peer namespace `be` over a veth pair; the VIP is
//! an address of `be` with TCP listeners on 143, 22 and 25. The backend runs on a thread
//! that joined `fe` (`Netns::run_in`), so its netlink sockets see only that namespace.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::time::{Duration, Instant};

use vipsec::config::Config;
use vipsec::kernel::Kernel;
use vipsec::kernel::xfrm::{XfrmEvent, XfrmKernel, policy};
use vipsec_testbed::netns::Netns;

const VIP: &str = "192.0.2.100";
const OTHER_VIP: &str = "192.0.2.101";
const BLOCK_PRIORITY: u32 = 1_000_000;

struct Lab {
    fe: Netns,
    be: Netns,
    _listeners: Vec<TcpListener>,
}

fn lab() -> Lab {
    vipsec_testbed::require_root().unwrap();
    let fe = Netns::new("xf").unwrap();
    let be = Netns::new("xb").unwrap();
    fe.veth_to("fe0", "192.0.2.1/24", &be, "be0", "192.0.2.2/24")
        .unwrap();
    for addr in [VIP, OTHER_VIP] {
        be.ip(&["addr", "add", &format!("{addr}/32"), "dev", "be0"])
            .unwrap();
    }
    // Listening sockets stay in `be` after the thread that opened them ends.
    let listeners = be
        .run_in(|| {
            [143u16, 22, 25]
                .iter()
                .map(|p| TcpListener::bind((VIP, *p)).expect("bind listener"))
                .collect::<Vec<_>>()
        })
        .unwrap();
    Lab {
        fe,
        be,
        _listeners: listeners,
    }
}

/// Without an interface, the config says kernel ESP (`libipsec = false`): an unbound
/// block would also catch kernel-libipsec's tunnel, and the config refuses that.
fn config(interface: Option<&str>, protect: &[&str]) -> Config {
    let iface = interface
        .map(|i| format!("interface = \"{i}\"\n"))
        .unwrap_or_else(|| "libipsec = false\n".into());
    let protect = protect
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "node = \"fe\"\n\
         [kernel]\nbackend = \"xfrm\"\nblock_priority = {BLOCK_PRIORITY}\n{iface}\
         [[peer_vip]]\naddress = \"{VIP}\"\nconnection = \"vip\"\nprotect = [{protect}]\n"
    );
    Config::parse(&text).unwrap_or_else(|p| panic!("config {text}: {p:?}"))
}

fn vip() -> IpAddr {
    VIP.parse().unwrap()
}

type Body<T> = Pin<Box<dyn std::future::Future<Output = T>>>;

/// Runs an async body on a thread inside `ns`.
fn in_ns<T: Send + 'static>(ns: &Netns, body: impl FnOnce() -> Body<T> + Send + 'static) -> T {
    ns.run_in(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(body())
    })
    .unwrap()
}

/// Connects from the calling thread's namespace: Ok, or the errno.
fn connect(port: u16) -> Result<(), i32> {
    let addr = SocketAddr::new(vip(), port);
    match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::TimedOut => Err(libc::ETIMEDOUT),
        Err(e) => Err(e.raw_os_error().unwrap_or(-1)),
    }
}

fn out_pol_block(ns: &Netns) -> u64 {
    let stat = ns.sh("cat /proc/net/xfrm_stat").unwrap();
    stat.lines()
        .find_map(|l| l.strip_prefix("XfrmOutPolBlock"))
        .map(|v| v.trim().parse().unwrap())
        .expect("XfrmOutPolBlock in /proc/net/xfrm_stat (kernel without CONFIG_XFRM_STATISTICS?)")
}

fn policies(ns: &Netns) -> String {
    ns.ip(&["-s", "xfrm", "policy"]).unwrap()
}

/// Policies whose selector line (the first of each in `ip xfrm policy`) contains `needle`.
fn count_policies(ns: &Netns, needle: &str) -> usize {
    ns.ip(&["xfrm", "policy"])
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace) && l.contains(needle))
        .count()
}

fn ifindex(ns: &Netns, ifname: &str) -> i32 {
    let out = ns.ip(&["-o", "link", "show", ifname]).unwrap();
    out.split(':').next().unwrap().trim().parse().unwrap()
}

#[test]
fn block_policies_refuse_protected_flows_until_released() {
    let lab = lab();
    let cfg = config(Some("fe0"), &["tcp/143"]);
    let fe_ifindex = ifindex(&lab.fe, "fe0");
    let blocked_before = out_pol_block(&lab.fe);

    let (reachable_before, engaged, engage_time, own) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let kernel = XfrmKernel::new(&cfg).unwrap();
            let before = connect(143);
            let t = Instant::now();
            let n = kernel.engage_fail_secure(vip()).await.unwrap();
            let dt = t.elapsed();
            (before, n, dt, kernel.block_policies().await.unwrap())
        })
    });
    eprintln!("engage 1 flow: {engage_time:?}");
    assert_eq!(reachable_before, Ok(()), "VIP:143 reachable before engage");
    assert_eq!(engaged, 1);
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].selector.ifindex, fe_ifindex, "policy bound to fe0");
    assert_eq!(own[0].priority, BLOCK_PRIORITY);
    let listing = policies(&lab.fe);
    assert!(
        listing.contains(&format!("dst {VIP}/32 proto tcp dport 143 dev fe0")),
        "{listing}"
    );
    assert!(listing.contains("action block"), "{listing}");

    let cfg = config(Some("fe0"), &["tcp/143"]);
    let (r143, r22, r143_after, release_time) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let kernel = XfrmKernel::new(&cfg).unwrap();
            let r143 = connect(143);
            let r22 = connect(22);
            let t = Instant::now();
            kernel.release_fail_secure(vip()).await.unwrap();
            let dt = t.elapsed();
            (r143, r22, connect(143), dt)
        })
    });
    eprintln!("release 1 flow: {release_time:?}");
    assert_eq!(
        r143,
        Err(libc::EPERM),
        "connect to VIP:143 refused by the block policy"
    );
    assert_eq!(r22, Ok(()), "VIP:22 is not a protected flow");
    assert_eq!(r143_after, Ok(()), "VIP:143 reachable after release");
    let blocked_after = out_pol_block(&lab.fe);
    eprintln!("XfrmOutPolBlock {blocked_before} -> {blocked_after}");
    assert!(blocked_after > blocked_before, "XfrmOutPolBlock grew");
    assert_eq!(count_policies(&lab.fe, VIP), 0, "{}", policies(&lab.fe));
}

#[test]
fn restart_adopts_engaged_policies_without_duplicates() {
    let lab = lab();
    let protect = ["tcp/143", "tcp/110", "udp/53", "any"];
    let cfg = config(Some("fe0"), &protect);
    let (adopted_at_start, n) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let first = XfrmKernel::new(&cfg).unwrap();
            let adopted = first.reconcile().await.unwrap();
            // `first` is dropped after this, as in a crash: the policies must stay.
            (adopted, first.engage_fail_secure(vip()).await.unwrap())
        })
    });
    assert!(adopted_at_start.is_empty());
    assert_eq!(n, 4);
    assert_eq!(count_policies(&lab.fe, VIP), 4, "{}", policies(&lab.fe));

    let cfg = config(Some("fe0"), &protect);
    let (adopted, again, again2, blocked) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let second = XfrmKernel::new(&cfg).unwrap();
            let adopted = second.reconcile().await.unwrap();
            let again = second.engage_fail_secure(vip()).await.unwrap();
            let again2 = second.engage_fail_secure(vip()).await.unwrap();
            (adopted, again, again2, connect(143))
        })
    });
    assert_eq!(adopted, vec![vip()]);
    assert_eq!((again, again2), (4, 4));
    assert_eq!(blocked, Err(libc::EPERM));
    assert_eq!(
        count_policies(&lab.fe, VIP),
        4,
        "engaging again duplicated policies: {}",
        policies(&lab.fe)
    );

    let cfg = config(Some("fe0"), &protect);
    let (left, reachable) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let third = XfrmKernel::new(&cfg).unwrap();
            third.release_fail_secure(vip()).await.unwrap();
            // Releasing twice is fine.
            third.release_fail_secure(vip()).await.unwrap();
            (third.reconcile().await.unwrap(), connect(143))
        })
    });
    assert!(left.is_empty());
    assert_eq!(reachable, Ok(()));
    assert_eq!(count_policies(&lab.fe, VIP), 0, "{}", policies(&lab.fe));
}

#[test]
fn foreign_policies_are_never_touched() {
    let lab = lab();
    // A block on another port with the agent's own priority and interface; an `allow`
    // with the agent's address and port but a different selector (the kernel refuses a
    // second policy with an identical selector, whatever its priority) and a lower
    // priority; a block toward another VIP.
    let prio = BLOCK_PRIORITY.to_string();
    // And an `allow` that holds the first index of the agent's range.
    let first_agent_index = policy::slot_index(0).to_string();
    let foreign: [(&str, &[&str]); 4] = [
        (
            VIP,
            &[
                "proto",
                "tcp",
                "dport",
                "80",
                "action",
                "allow",
                "index",
                &first_agent_index,
            ],
        ),
        (
            VIP,
            &[
                "proto", "tcp", "dport", "25", "dev", "fe0", "action", "block", "priority", &prio,
            ],
        ),
        (
            VIP,
            &[
                "proto", "tcp", "dport", "143", "action", "allow", "priority", "2000000",
            ],
        ),
        (
            OTHER_VIP,
            &[
                "proto", "tcp", "dport", "143", "dev", "fe0", "action", "block",
            ],
        ),
    ];
    for (dst, args) in foreign {
        let mut cmd = vec!["xfrm", "policy", "add", "dir", "out", "dst", dst];
        cmd.extend_from_slice(args);
        lab.fe.ip(&cmd).unwrap();
    }
    let before = policies(&lab.fe);
    let cfg = config(Some("fe0"), &["tcp/143", "tcp/110"]);
    let (adopted, engaged, during, r25, deleted) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let kernel = XfrmKernel::new(&cfg).unwrap();
            let adopted = kernel.reconcile().await.unwrap();
            let engaged = kernel.engage_fail_secure(vip()).await.unwrap();
            let during = kernel.reconcile().await.unwrap();
            kernel.release_fail_secure(vip()).await.unwrap();
            let other: IpAddr = OTHER_VIP.parse().unwrap();
            kernel.release_fail_secure(other).await.unwrap();
            let deleted = kernel.delete_states(vip()).await.unwrap();
            (adopted, engaged, during, connect(25), deleted)
        })
    });
    assert!(adopted.is_empty(), "foreign policies adopted: {adopted:?}");
    assert_eq!(engaged, 2);
    assert_eq!(during, vec![vip()]);
    assert_eq!(deleted, 0);
    assert_eq!(r25, Err(libc::EPERM), "the foreign block still blocks");
    let after = policies(&lab.fe);
    assert_eq!(
        without_times(&before),
        without_times(&after),
        "foreign policies changed"
    );
    assert_eq!(count_policies(&lab.fe, VIP), 3);
    assert_eq!(count_policies(&lab.fe, OTHER_VIP), 1);
}

/// `ip -s xfrm policy` without the lines whose use times change as policies match.
fn without_times(listing: &str) -> Vec<&str> {
    listing
        .lines()
        .filter(|l| !l.contains("add ") && !l.contains("use ") && !l.contains("lifetime"))
        .collect()
}

#[test]
fn unbound_any_flow_blocks_everything_to_the_vip() {
    let lab = lab();
    let cfg = config(None, &["any"]);
    let (own, r22, r143) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let kernel = XfrmKernel::new(&cfg).unwrap();
            kernel.engage_fail_secure(vip()).await.unwrap();
            let own = kernel.block_policies().await.unwrap();
            let r = (connect(22), connect(143));
            kernel.release_fail_secure(vip()).await.unwrap();
            (own, r.0, r.1)
        })
    });
    assert_eq!(own.len(), 1);
    assert_eq!(
        own[0].selector.ifindex, 0,
        "not bound without kernel.interface"
    );
    assert_eq!((own[0].selector.proto, own[0].selector.dport), (0, None));
    assert_eq!(r22, Err(libc::EPERM));
    assert_eq!(r143, Err(libc::EPERM));
    assert_eq!(count_policies(&lab.fe, VIP), 0);
}

#[test]
fn engage_and_release_many_flows_with_the_event_watcher_running() {
    let lab = lab();
    const FLOWS: u16 = 200;
    let protect: Vec<String> = (0..FLOWS).map(|i| format!("tcp/{}", 10_000 + i)).collect();
    let protect: Vec<&str> = protect.iter().map(String::as_str).collect();
    let cfg = config(Some("fe0"), &protect);
    let (n, engage, engage_again, release, watcher_stopped, events) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let kernel = std::sync::Arc::new(XfrmKernel::new(&cfg).unwrap());
            let cancel = tokio_util::sync::CancellationToken::new();
            let (tx, mut rx) = tokio::sync::mpsc::channel(4 * usize::from(FLOWS));
            let watcher = tokio::spawn({
                let (k, c) = (kernel.clone(), cancel.clone());
                async move { k.watch_events(tx, c).await }
            });
            // On this single-threaded runtime one yield lets the watcher run up to its
            // first await, by which point it has joined the multicast groups.
            tokio::task::yield_now().await;
            let t = Instant::now();
            let n = kernel.engage_fail_secure(vip()).await.unwrap();
            let engage = t.elapsed();
            let t = Instant::now();
            kernel.engage_fail_secure(vip()).await.unwrap();
            let engage_again = t.elapsed();
            let t = Instant::now();
            kernel.release_fail_secure(vip()).await.unwrap();
            let release = t.elapsed();
            // Wait for the deletions to be reported (bounded: "did not hang").
            let mut events = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while events
                .iter()
                .filter(|e| matches!(e, XfrmEvent::PolicyDeleted { agent: true, .. }))
                .count()
                < usize::from(FLOWS)
            {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(e)) => events.push(e),
                    _ => break,
                }
            }
            cancel.cancel();
            let stopped = tokio::time::timeout(Duration::from_secs(5), watcher)
                .await
                .is_ok();
            (n, engage, engage_again, release, stopped, events)
        })
    });
    eprintln!(
        "{FLOWS} flows: engage {engage:?}, engage again (no-op) {engage_again:?}, release {release:?}"
    );
    assert_eq!(n, u32::from(FLOWS));
    assert!(watcher_stopped, "event watcher did not stop on cancel");
    let added = events
        .iter()
        .filter(
            |e| matches!(e, XfrmEvent::PolicyAdded { index, .. } if policy::is_agent_index(*index)),
        )
        .count();
    let deleted = events
        .iter()
        .filter(|e| matches!(e, XfrmEvent::PolicyDeleted { agent: true, .. }))
        .count();
    eprintln!("events seen: {added} agent policies added, {deleted} deleted");
    assert_eq!(deleted, usize::from(FLOWS), "policy deletions reported");
    assert_eq!(count_policies(&lab.fe, VIP), 0);
}

/// Connects from the calling thread's namespace with a short timeout: Ok, or the errno.
fn connect_quick(port: u16) -> Result<(), i32> {
    let addr = SocketAddr::new(vip(), port);
    match TcpStream::connect_timeout(&addr, Duration::from_millis(700)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::TimedOut => Err(libc::ETIMEDOUT),
        Err(e) => Err(e.raw_os_error().unwrap_or(-1)),
    }
}

#[test]
fn a_hosted_vips_guard_blocks_the_servers_answers_outside_ipsec() {
    let lab = lab();
    let text = format!(
        "node = \"be\"\n[kernel]\nbackend = \"xfrm\"\ninterface = \"be0\"\nlibipsec = true\n\
         [[hosted_vip]]\naddress = \"{VIP}\"\nprotect = [\"tcp/143\"]\n"
    );
    let cfg = Config::parse(&text).unwrap();
    let blocked_before = out_pol_block(&lab.be);
    let cfg2 = cfg.clone();
    let (n, adopted) = in_ns(&lab.be, move || {
        Box::pin(async move {
            let kernel = XfrmKernel::new(&cfg2).unwrap();
            let n = kernel.engage_fail_secure(vip()).await.unwrap();
            // A restarted agent finds and adopts it.
            let adopted = XfrmKernel::new(&cfg2).unwrap().reconcile().await.unwrap();
            (n, adopted)
        })
    });
    assert_eq!(n, 1);
    assert_eq!(adopted, vec![vip()]);
    let listing = policies(&lab.be);
    assert!(
        listing.contains(&format!(
            "src {VIP}/32 dst 0.0.0.0/0 proto tcp sport 143 dev be0"
        )),
        "{listing}"
    );

    // The server's SYN-ACK from VIP:143 may not leave in clear: the client never connects.
    let (r143, r22) = lab
        .fe
        .run_in(|| (connect_quick(143), connect_quick(22)))
        .unwrap();
    assert_eq!(
        r143,
        Err(libc::ETIMEDOUT),
        "the answer from VIP:143 must be blocked"
    );
    assert_eq!(r22, Ok(()), "VIP:22 is not protected");
    assert!(
        out_pol_block(&lab.be) > blocked_before,
        "XfrmOutPolBlock grew on the back-end"
    );

    in_ns(&lab.be, move || {
        Box::pin(async move {
            XfrmKernel::new(&cfg)
                .unwrap()
                .release_fail_secure(vip())
                .await
                .unwrap()
        })
    });
    assert_eq!(lab.fe.run_in(|| connect_quick(143)).unwrap(), Ok(()));
    assert_eq!(count_policies(&lab.be, VIP), 0, "{}", policies(&lab.be));
}

const VIP6: &str = "2001:db8::100";

/// The IPv6 twin of [`lab`]: fe 2001:db8::1, be 2001:db8::2 and the VIP 2001:db8::100,
/// plus the IPv4 VIP on the same link so both families' policies sit side by side. The
/// addresses are added `nodad`: this test is about XFRM selectors, and a listener cannot
/// bind a tentative address (DAD itself is covered by the addrwatch tests).
fn lab6() -> Lab {
    vipsec_testbed::require_root().unwrap();
    let fe = Netns::new("x6f").unwrap();
    let be = Netns::new("x6b").unwrap();
    fe.veth_to("fe0", "192.0.2.1/24", &be, "be0", "192.0.2.2/24")
        .unwrap();
    fe.ip(&["-6", "addr", "add", "2001:db8::1/64", "dev", "fe0", "nodad"])
        .unwrap();
    be.ip(&["-6", "addr", "add", "2001:db8::2/64", "dev", "be0", "nodad"])
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
    be.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "be0"])
        .unwrap();
    // The VIP lies in fe's on-link /64: fe finds it by neighbour discovery on fe0.
    let listeners = be
        .run_in(|| {
            let mut l = Vec::new();
            for p in [143u16, 22] {
                l.push(TcpListener::bind((VIP6, p)).expect("bind v6 listener"));
                l.push(TcpListener::bind((VIP, p)).expect("bind v4 listener"));
            }
            l
        })
        .unwrap();
    Lab {
        fe,
        be,
        _listeners: listeners,
    }
}

/// The kernel ESP shape (`libipsec = false`): IPv6 flows get XFRM block policies.
fn config6(interface: Option<&str>) -> Config {
    let iface = interface
        .map(|i| format!("interface = \"{i}\"\nlibipsec = false\n"))
        .unwrap_or_else(|| "libipsec = false\n".into());
    let text = format!(
        "node = \"fe\"\n\
         [kernel]\nbackend = \"xfrm\"\nblock_priority = {BLOCK_PRIORITY}\n{iface}\
         [[peer_vip]]\naddress = \"{VIP6}\"\nconnection = \"vip6\"\nprotect = [\"tcp/143\"]\n\
         [[peer_vip]]\naddress = \"{VIP}\"\nconnection = \"vip\"\nprotect = [\"tcp/143\"]\n"
    );
    Config::parse(&text).unwrap_or_else(|p| panic!("config {text}: {p:?}"))
}

fn connect_to(vip: &str, port: u16) -> Result<(), i32> {
    let addr = SocketAddr::new(vip.parse().unwrap(), port);
    match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::TimedOut => Err(libc::ETIMEDOUT),
        Err(e) => Err(e.raw_os_error().unwrap_or(-1)),
    }
}

/// A TCP connect to [VIP6]:port from a socket bound to `ifname` (SO_BINDTODEVICE): Ok, or
/// the errno. Blocking, so a block policy shows as EPERM at once.
fn connect_bound_v6(ifname: &str, port: u16) -> Result<(), i32> {
    let addr: std::net::Ipv6Addr = VIP6.parse().unwrap();
    // SAFETY: plain socket calls on a descriptor this function owns and closes; every
    // pointer passed lives for the duration of its call.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            ifname.as_ptr().cast(),
            ifname.len() as libc::socklen_t,
        );
        assert_eq!(
            rc,
            0,
            "SO_BINDTODEVICE: {}",
            std::io::Error::last_os_error()
        );
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_port = port.to_be();
        sa.sin6_addr.s6_addr = addr.octets();
        let rc = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        );
        let r = if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1))
        };
        libc::close(fd);
        r
    }
}

/// The kernel behaviour behind the agent's IPv6 choice: an IPv6 policy bound to an
/// interface (`dev fe0`, what `kernel.interface` asks for with IPv4) does not match an
/// unbound socket's traffic. IPv4's output route lookup writes the chosen device into the
/// flow before the policy lookup, IPv6's does not (the flow keeps `oif = 0` unless the
/// socket is bound to a device). A socket bound to fe0 is blocked, which shows the
/// selector itself is right.
#[test]
fn an_interface_bound_ipv6_policy_misses_unbound_sockets() {
    let lab = lab6();
    lab.fe
        .ip(&[
            "xfrm",
            "policy",
            "add",
            "dir",
            "out",
            "src",
            "::/0",
            "dst",
            &format!("{VIP6}/128"),
            "proto",
            "tcp",
            "dport",
            "143",
            "dev",
            "fe0",
            "action",
            "block",
        ])
        .unwrap();
    let (unbound, bound) = lab
        .fe
        .run_in(|| (connect_to(VIP6, 143), connect_bound_v6("fe0", 143)))
        .unwrap();
    eprintln!(
        "IPv6 block policy bound to fe0: unbound socket {unbound:?}, socket bound to fe0 {bound:?}"
    );
    assert_eq!(
        bound,
        Err(libc::EPERM),
        "a socket bound to fe0 meets the policy"
    );
    assert_eq!(
        unbound,
        Ok(()),
        "kernel behaviour changed: an interface-bound IPv6 policy now matches unbound sockets (the agent could bind IPv6 peer policies again)"
    );
}

/// IPv6 block policies with /128 selectors and family AF_INET6, beside IPv4 ones, with
/// `kernel.interface` set as the lab sets it: the IPv4 VIP's policy is bound to fe0, the
/// IPv6 peer VIP's is not (see the test above for why), and it refuses [VIP6]:143.
#[test]
fn ipv6_block_policies_fail_secure_beside_ipv4_ones() {
    let lab = lab6();
    let blocked_before = out_pol_block(&lab.fe);
    let v6: IpAddr = VIP6.parse().unwrap();
    let v4: IpAddr = VIP.parse().unwrap();
    let fe_ifindex = ifindex(&lab.fe, "fe0");

    let cfg = config6(Some("fe0"));
    let (before, engaged, engage_time, own, during, v4_during, v6_22) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let kernel = XfrmKernel::new(&cfg).unwrap();
            let before = connect_to(VIP6, 143);
            let t = Instant::now();
            let n = kernel.engage_fail_secure(v6).await.unwrap();
            let dt = t.elapsed();
            let own = kernel.block_policies().await.unwrap();
            (
                before,
                n,
                dt,
                own,
                connect_to(VIP6, 143),
                connect_to(VIP, 143),
                connect_to(VIP6, 22),
            )
        })
    });
    eprintln!("engage 1 IPv6 flow: {engage_time:?}");
    assert_eq!(before, Ok(()), "[{VIP6}]:143 reachable before engage");
    assert_eq!(engaged, 1);
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].selector.vip, v6);
    assert_eq!(own[0].selector.ifindex, 0, "IPv6 peer policy unbound");
    assert_eq!(own[0].selector.dport, Some(143));
    let listing = policies(&lab.fe);
    assert!(
        listing.contains(&format!("src ::/0 dst {VIP6}/128 proto tcp dport 143")),
        "{listing}"
    );
    assert_eq!(
        during,
        Err(libc::EPERM),
        "[{VIP6}]:143 refused by the block policy"
    );
    assert_eq!(v4_during, Ok(()), "the IPv4 VIP is not blocked");
    assert_eq!(v6_22, Ok(()), "[{VIP6}]:22 is not a protected flow");
    let blocked_after = out_pol_block(&lab.fe);
    eprintln!("XfrmOutPolBlock {blocked_before} -> {blocked_after}");
    assert!(blocked_after > blocked_before, "XfrmOutPolBlock grew");

    // Both families blocked, then a restarted agent adopts both and releases only v6.
    let cfg = config6(Some("fe0"));
    let (adopted, both, v4_blocked, released_v6, still_v4) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let kernel = XfrmKernel::new(&cfg).unwrap();
            kernel.engage_fail_secure(v4).await.unwrap();
            let restarted = XfrmKernel::new(&cfg).unwrap();
            let mut adopted = restarted.reconcile().await.unwrap();
            adopted.sort();
            let both = (connect_to(VIP6, 143), connect_to(VIP, 143));
            restarted.release_fail_secure(v6).await.unwrap();
            let after = (connect_to(VIP6, 143), connect_to(VIP, 143));
            let v4_left = restarted.block_policies().await.unwrap();
            restarted.release_fail_secure(v4).await.unwrap();
            (adopted, both, after.1, after.0, v4_left)
        })
    });
    assert_eq!(
        adopted,
        vec![v4, v6],
        "reconcile adopts the policies of both families"
    );
    assert_eq!(both, (Err(libc::EPERM), Err(libc::EPERM)));
    assert_eq!(released_v6, Ok(()), "released IPv6 VIP reachable again");
    assert_eq!(v4_blocked, Err(libc::EPERM), "the IPv4 VIP stays blocked");
    assert_eq!(still_v4.len(), 1);
    assert_eq!(still_v4[0].selector.vip, v4);
    assert_eq!(still_v4[0].selector.ifindex, fe_ifindex, "IPv4 stays bound");
    assert_eq!(count_policies(&lab.fe, VIP6), 0, "{}", policies(&lab.fe));
    assert_eq!(count_policies(&lab.fe, VIP), 0, "{}", policies(&lab.fe));
}

fn connect6_quick(port: u16) -> Result<(), i32> {
    let addr = SocketAddr::new(VIP6.parse().unwrap(), port);
    match TcpStream::connect_timeout(&addr, Duration::from_millis(700)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::TimedOut => Err(libc::ETIMEDOUT),
        Err(e) => Err(e.raw_os_error().unwrap_or(-1)),
    }
}

/// A hosted IPv6 VIP's guard under kernel-libipsec (`kernel.interface` set) is a policy
/// routing rule after charon's table 220: the server's answers from [VIP6]:143 are refused
/// unless a route in table 220 (charon's tunnel route) carries them.
#[test]
fn a_hosted_ipv6_vips_guard_refuses_answers_that_no_tunnel_route_carries() {
    use vipsec::kernel::xfrm::route_guard;
    let lab = lab6();
    let text = format!(
        "node = \"be\"\n[kernel]\nbackend = \"xfrm\"\ninterface = \"be0\"\nlibipsec = true\n\
         [[hosted_vip]]\naddress = \"{VIP6}\"\nprotect = [\"tcp/143\"]\n"
    );
    let cfg = Config::parse(&text).unwrap();
    let v6: IpAddr = VIP6.parse().unwrap();
    let cfg2 = cfg.clone();
    let (n, adopted, rules, xfrm) = in_ns(&lab.be, move || {
        Box::pin(async move {
            let kernel = XfrmKernel::new(&cfg2).unwrap();
            let n = kernel.engage_fail_secure(v6).await.unwrap();
            let again = kernel.engage_fail_secure(v6).await.unwrap();
            assert_eq!(again, n, "engage is idempotent");
            let adopted = XfrmKernel::new(&cfg2).unwrap().reconcile().await.unwrap();
            let rules = route_guard::rules().await.unwrap();
            (n, adopted, rules, kernel.block_policies().await.unwrap())
        })
    });
    assert_eq!(n, 1);
    assert_eq!(adopted, vec![v6]);
    assert_eq!(rules.len(), 1, "one rule, not two: {rules:?}");
    assert_eq!(
        (rules[0].vip, rules[0].proto, rules[0].port),
        (v6, 6, Some(143))
    );
    assert!(xfrm.is_empty(), "no XFRM policy for it: {xfrm:?}");
    let listing = lab.be.ip(&["-6", "rule"]).unwrap();
    eprintln!(
        "guard rule: {}",
        listing.lines().find(|l| l.contains(VIP6)).unwrap_or("")
    );
    assert!(
        listing.contains(&format!(
            "221:\tfrom {VIP6} ipproto tcp sport 143 prohibit proto 118"
        )),
        "{listing}"
    );

    // No tunnel route: the SYN-ACK from [VIP6]:143 is refused, the client never connects.
    let (r143, r22) = lab
        .fe
        .run_in(|| (connect6_quick(143), connect6_quick(22)))
        .unwrap();
    assert_eq!(
        r143,
        Err(libc::ETIMEDOUT),
        "the answer from [VIP6]:143 must be refused"
    );
    assert_eq!(r22, Ok(()), "[VIP6]:22 is not protected");

    // A route in table 220, as charon's kernel-libipsec installs for a CHILD_SA (here via
    // be0 itself, standing in for its TUN device), carries the answers past the guard.
    lab.be
        .ip(&["-6", "rule", "add", "priority", "220", "lookup", "220"])
        .unwrap();
    lab.be
        .ip(&[
            "-6",
            "route",
            "add",
            "2001:db8::1/128",
            "dev",
            "be0",
            "table",
            "220",
        ])
        .unwrap();
    assert_eq!(lab.fe.run_in(|| connect6_quick(143)).unwrap(), Ok(()));
    lab.be
        .ip(&[
            "-6",
            "route",
            "del",
            "2001:db8::1/128",
            "dev",
            "be0",
            "table",
            "220",
        ])
        .unwrap();
    assert_eq!(
        lab.fe.run_in(|| connect6_quick(143)).unwrap(),
        Err(libc::ETIMEDOUT),
        "without the tunnel route the guard refuses again"
    );

    in_ns(&lab.be, move || {
        Box::pin(async move {
            XfrmKernel::new(&cfg)
                .unwrap()
                .release_fail_secure(v6)
                .await
                .unwrap()
        })
    });
    assert_eq!(lab.fe.run_in(|| connect6_quick(143)).unwrap(), Ok(()));
    let listing = lab.be.ip(&["-6", "rule"]).unwrap();
    assert!(!listing.contains(VIP6), "{listing}");
}

/// A UDP datagram to [VIP6]:port with the socket's mark set (0 = none): Ok, or the errno of
/// the send (a `prohibit` route refuses it at once with EACCES).
fn udp6_send(port: u16, mark: u32) -> Result<(), i32> {
    let sock =
        std::net::UdpSocket::bind("[2001:db8::1]:0").map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    if mark != 0 {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid socket and a u32 option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_MARK");
    }
    let addr = SocketAddr::new(VIP6.parse().unwrap(), port);
    sock.send_to(b"x", addr)
        .map(|_| ())
        .map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// A peer IPv6 VIP's guard under kernel-libipsec is a `prohibit` rule after charon's table
/// 220: [VIP6]:143 is refused while no tunnel route carries it, passes when one does, and
/// an all-protocol flow still lets charon's IKE (marked, so it skips table 220) out.
#[test]
fn a_peer_ipv6_vips_guard_refuses_what_no_tunnel_route_carries_and_lets_ike_out() {
    use vipsec::kernel::xfrm::route_guard;
    let lab = lab6();
    let text = |protect: &str| {
        format!(
            "node = \"fe\"\n[kernel]\nbackend = \"xfrm\"\ninterface = \"fe0\"\nlibipsec = true\n\
             [[peer_vip]]\naddress = \"{VIP6}\"\nconnection = \"vip6\"\nprotect = [{protect}]\n"
        )
    };
    let cfg = Config::parse(&text("\"tcp/143\"")).unwrap();
    let v6: IpAddr = VIP6.parse().unwrap();
    let (n, check) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let kernel = XfrmKernel::new(&cfg).unwrap();
            let n = kernel.engage_fail_secure(v6).await.unwrap();
            (n, kernel.guard_check().await.unwrap())
        })
    });
    assert_eq!(n, 1);
    assert_eq!(check.len(), 1);
    assert!(check[0].held(), "{check:?}");
    let listing = lab.fe.ip(&["-6", "rule"]).unwrap();
    assert!(
        listing.contains(&format!(
            "221:\tfrom all to {VIP6} ipproto tcp dport 143 prohibit proto 118"
        )),
        "{listing}"
    );
    let (r143, r22) = lab
        .fe
        .run_in(|| (connect6_quick(143), connect6_quick(22)))
        .unwrap();
    assert_eq!(r143, Err(libc::EACCES), "[VIP6]:143 must be refused");
    assert_eq!(r22, Ok(()), "[VIP6]:22 is not protected");

    // charon's tunnel route in table 220 (be's side of the veth standing in for its TUN)
    // carries the flow past the guard.
    lab.fe
        .ip(&[
            "-6", "rule", "add", "priority", "220", "not", "fwmark", "0x42", "lookup", "220",
        ])
        .unwrap();
    lab.fe
        .ip(&[
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "dev",
            "fe0",
            "table",
            "220",
        ])
        .unwrap();
    assert_eq!(lab.fe.run_in(|| connect6_quick(143)).unwrap(), Ok(()));
    lab.fe
        .ip(&[
            "-6",
            "route",
            "del",
            &format!("{VIP6}/128"),
            "dev",
            "fe0",
            "table",
            "220",
        ])
        .unwrap();

    // All traffic protected: everything to the VIP is refused but IKE and NAT-T, whose
    // packets carry charon's mark.
    let cfg = Config::parse(&text("\"any\"")).unwrap();
    let (rules, check) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let kernel = XfrmKernel::new(&cfg).unwrap();
            kernel.engage_fail_secure(v6).await.unwrap();
            (
                route_guard::rules().await.unwrap(),
                kernel.guard_check().await.unwrap(),
            )
        })
    });
    assert_eq!(rules.len(), 3, "prohibit + two IKE pass rules: {rules:?}");
    assert!(check[0].held(), "{check:?}");
    let (r22, ike, natt, other) = lab
        .fe
        .run_in(|| {
            (
                connect6_quick(22),
                udp6_send(500, 0x42),
                udp6_send(4500, 0x42),
                udp6_send(53, 0x42),
            )
        })
        .unwrap();
    assert_eq!(r22, Err(libc::EACCES), "every protocol is protected now");
    assert_eq!((ike, natt), (Ok(()), Ok(())), "IKE must get out");
    assert_eq!(other, Err(libc::EACCES), "only IKE's ports pass");

    // Flushed by hand: the check says so, engage puts it back.
    lab.fe.ip(&["-6", "rule", "flush"]).unwrap_or_default();
    let cfg = Config::parse(&text("\"any\"")).unwrap();
    let (before, after) = in_ns(&lab.fe, move || {
        Box::pin(async move {
            let kernel = XfrmKernel::new(&cfg).unwrap();
            let before = kernel.guard_check().await.unwrap();
            kernel.engage_fail_secure(v6).await.unwrap();
            let after = kernel.guard_check().await.unwrap();
            kernel.release_fail_secure(v6).await.unwrap();
            (before, after)
        })
    });
    assert_eq!(before[0].installed, 0, "{before:?}");
    assert!(after[0].held(), "{after:?}");
    let listing = lab.fe.ip(&["-6", "rule"]).unwrap();
    assert!(!listing.contains(VIP6), "{listing}");
}
