//! The standing guard (issue 14) with kernel ESP, inside a VM (this host's kernel has no
//! ESP). The host side boots the VM and runs this same test binary in it, with
//! `VIPSEC_VM_GUEST` set; the guest side builds the lab and runs the scenarios.
//!
//! In the guest: a hub namespace with a bridge, and three nodes on it: the front-end `fe`
//! (192.0.2.1) and the back-ends `be1` (192.0.2.2) and `be2` (192.0.2.3). keepalived moves
//! the VIP 192.0.2.100 between the back-ends (VRRP, advert 1 s, nopreempt). charon runs on
//! all three with its normal kernel-netlink backend, so ESP is the kernel's. The front-end's
//! connection is written the way a new user writes it: `start_action = start`, no trap,
//! `keyingtries` left at its default of 1. A vipsec agent runs on every node: on the
//! front-end it guards VIP tcp/143 and renegotiates, on the back-ends it guards the
//! server's answers and deletes SAs when the VIP leaves.
//!
//! Clear text is counted on the wire: the hub's bridge counts every TCP packet to or from
//! port 143 (protected traffic crosses it only as ESP, IP protocol 50), and each back-end
//! counts packets to VIP:143 that arrived without IPsec (`meta ipsec missing`). Both must
//! stay 0 over the whole run.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vipsec_testbed::charon::Charon;
use vipsec_testbed::netns::{Netns, unique_name};
use vipsec_testbed::process::{ProcessGuard, wait_for};
use vipsec_testbed::vm::test_in_vm;

mod common;
use common::AgentProc;

const TEST: &str = "standing_guard_with_kernel_esp_in_vm";
const FE: &str = "192.0.2.1";
const BE1: &str = "192.0.2.2";
const BE2: &str = "192.0.2.3";
const VIP: &str = "192.0.2.100";
const IFACE: &str = "eth0";
const CONN: &str = "vip";
const PSK: &str = "vipsec-guard-vm-not-a-secret";

#[test]
fn standing_guard_with_kernel_esp_in_vm() {
    test_in_vm(TEST, Duration::from_secs(420), guest);
}

// ----- the lab -----

/// Everything the guest runs. Fields drop in order: agents and daemons before the
/// namespaces they live in.
struct Lab {
    agents: Vec<AgentProc>,
    fe_charon: Charon,
    be_charons: Vec<Charon>,
    keepalived: Vec<Option<ProcessGuard>>,
    servers: Vec<Arc<AtomicU32>>,
    dir: tempfile::TempDir,
    fe: Netns,
    bes: Vec<Netns>,
    hub: Netns,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        // A failed scenario is only debuggable with what the daemons said.
        let mut logs: Vec<(String, PathBuf)> =
            vec![("fe charon".into(), self.fe_charon.log_path())];
        for (i, c) in self.be_charons.iter().enumerate() {
            logs.push((format!("be{} charon", i + 1), c.log_path()));
        }
        for a in &self.agents {
            logs.push((format!("{} agent", a.name), a.log.clone()));
        }
        for i in 1..=2 {
            logs.push((
                format!("be{i} keepalived"),
                self.dir.path().join(format!("be{i}-keepalived.log")),
            ));
        }
        for (what, path) in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!("--- {what} ({}) ---\n{tail}", path.display());
        }
        for ns in [&self.fe, &self.bes[0], &self.bes[1]] {
            eprintln!(
                "--- {} xfrm ---\n{}{}",
                ns.name,
                ns.ip(&["xfrm", "policy"]).unwrap_or_default(),
                ns.ip(&["xfrm", "state"]).unwrap_or_default()
            );
        }
    }
}

/// Puts `node` on the hub's bridge as `eth0` with `addr`/24.
fn attach(hub: &Netns, node: &Netns, addr: &str) {
    let (a, b) = (unique_name("h"), unique_name("n"));
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    ip(&["link", "set", &a, "netns", &hub.name]);
    ip(&["link", "set", &b, "netns", &node.name, "name", IFACE]);
    hub.ip(&["link", "set", &a, "master", "br0", "up"]).unwrap();
    node.ip(&["addr", "add", &format!("{addr}/24"), "dev", IFACE])
        .unwrap();
    node.ip(&["link", "set", IFACE, "up"]).unwrap();
}

fn nft(ns: &Netns, script: &str) {
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft -f:\n{script}");
}

fn nft_counter(ns: &Netns, family: &str, table: &str, name: &str) -> u64 {
    let out = ns
        .sh(&format!("nft list counter {family} {table} {name}"))
        .unwrap();
    // "packets 12 bytes 900"
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next().unwrap().parse().unwrap();
        }
    }
    panic!("no packet count in: {out}")
}

/// Clear text seen so far: the wire (the hub's bridge, both directions) and what each
/// back-end received for VIP:143 without IPsec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClearText {
    wire_to: u64,
    wire_from: u64,
    be_in: [u64; 2],
}

impl ClearText {
    fn total(&self) -> u64 {
        self.wire_to + self.wire_from + self.be_in[0] + self.be_in[1]
    }
}

/// A server on :143 that answers every connection with its name and counts them.
fn serve(ns: &Netns, name: &'static str) -> Arc<AtomicU32> {
    // Bound to the wildcard: the VIP comes and goes with keepalived.
    let listener = ns
        .run_in(|| TcpListener::bind("0.0.0.0:143"))
        .unwrap()
        .unwrap();
    let served = Arc::new(AtomicU32::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            use std::io::Write;
            let _ = conn.write_all(format!("{name}\n").as_bytes());
        }
    });
    served
}

fn keepalived_conf(node: &str, priority: u8) -> String {
    // Both start as BACKUP with nopreempt: a node never takes the VIP back on its own.
    format!(
        "global_defs {{\n  router_id {node}\n  vrrp_garp_master_repeat 2\n}}\n\
         vrrp_instance lab {{\n  state BACKUP\n  interface {IFACE}\n  virtual_router_id 51\n\
         \x20 priority {priority}\n  advert_int 1\n  nopreempt\n\
         \x20 virtual_ipaddress {{\n    {VIP}/32 dev {IFACE}\n  }}\n}}\n"
    )
}

fn start_keepalived(ns: &Netns, dir: &Path, node: &str, priority: u8) -> ProcessGuard {
    let conf = dir.join(format!("{node}-keepalived.conf"));
    std::fs::write(&conf, keepalived_conf(node, priority)).unwrap();
    let log = std::fs::File::create(dir.join(format!("{node}-keepalived.log"))).unwrap();
    // Its own /run (keepalived keeps pid files and state there), as the charons have.
    let script = format!(
        "mount -t tmpfs tmpfs /run && exec keepalived --dont-fork --log-console --log-detail \
         --vrrp --use-file {} --pid {} --vrrp_pid {}",
        conf.display(),
        dir.join(format!("{node}-k.pid")).display(),
        dir.join(format!("{node}-kv.pid")).display()
    );
    ProcessGuard::spawn(
        &format!("keepalived {node}"),
        ns.command("unshare")
            .args(["-m", "sh", "-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    )
    .unwrap()
}

fn has_vip(ns: &Netns) -> bool {
    ns.ip(&["-4", "addr", "show", "dev", IFACE])
        .is_ok_and(|a| a.contains(&format!("{VIP}/32")))
}

/// The front-end's connection as a new user writes it: started at load, no trap, and
/// `keyingtries` at charon's default (1). Only tcp/143 to the VIP is in the tunnel.
fn fe_swanctl() -> String {
    format!(
        "connections {{\n{CONN} {{\nversion = 2\nlocal_addrs = {FE}\nremote_addrs = {VIP}\n\
         proposals = aes256-sha256-modp2048\nmobike = no\n\
         local {{\nauth = psk\nid = fe\n}}\nremote {{\nauth = psk\nid = %any\n}}\n\
         children {{\n{CONN} {{\nlocal_ts = {FE}/32[tcp]\nremote_ts = {VIP}/32[tcp/143]\n\
         esp_proposals = aes256-sha256\nmode = tunnel\nstart_action = start\n}}\n}}\n}}\n}}\n\
         secrets {{\nike-lab {{\nsecret = \"{PSK}\"\n}}\n}}\n"
    )
}

/// A back-end answers the front-end on the VIP only (`local_addrs` is the VIP and MOBIKE
/// is off, so there is no other address for the IKE_SA to move to).
fn be_swanctl() -> String {
    format!(
        "connections {{\n{CONN} {{\nversion = 2\nlocal_addrs = {VIP}\nremote_addrs = {FE}\n\
         proposals = aes256-sha256-modp2048\nmobike = no\n\
         local {{\nauth = psk\nid = %any\n}}\nremote {{\nauth = psk\nid = fe\n}}\n\
         children {{\n{CONN} {{\nlocal_ts = {VIP}/32[tcp/143]\nremote_ts = {FE}/32[tcp]\n\
         esp_proposals = aes256-sha256\nmode = tunnel\n}}\n}}\n}}\n}}\n\
         secrets {{\nike-lab {{\nsecret = \"{PSK}\"\n}}\n}}\n"
    )
}

fn fe_agent_body(vici: &Path) -> String {
    format!(
        r#"[store]
backend = "embedded"
[keying]
backend = "strongswan"
vici_socket = "{vici}"
reconnect_max = "200ms"
[kernel]
backend = "xfrm"
interface = "{IFACE}"
libipsec = false
[failover]
mode = "fast"
idle_timeout = "1s"
[failover.reconnect]
# One front-end: there is no storm to spread out.
jitter = "0s"
[[peer_vip]]
address = "{VIP}"
connection = "{CONN}"
child = "{CONN}"
protect = ["tcp/143"]
"#,
        vici = vici.display()
    )
}

fn be_agent_body(vici: &Path) -> String {
    format!(
        r#"[store]
backend = "embedded"
[keying]
backend = "strongswan"
vici_socket = "{vici}"
reconnect_max = "200ms"
[kernel]
backend = "xfrm"
interface = "{IFACE}"
libipsec = false
[[hosted_vip]]
address = "{VIP}"
interface = "{IFACE}"
protect = ["tcp/143"]
"#,
        vici = vici.display()
    )
}

impl Lab {
    fn start() -> Lab {
        let t0 = Instant::now();
        let hub = Netns::new("hub").unwrap();
        hub.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
        hub.ip(&["link", "set", "br0", "up"]).unwrap();
        let fe = Netns::new("fe").unwrap();
        let bes = vec![Netns::new("be1").unwrap(), Netns::new("be2").unwrap()];
        attach(&hub, &fe, FE);
        attach(&hub, &bes[0], BE1);
        attach(&hub, &bes[1], BE2);
        // The wire: any TCP packet to or from port 143 crossing the bridge is clear text,
        // since protected traffic crosses it only as ESP.
        nft(
            &hub,
            "table bridge wire {\n counter clear_to {}\n counter clear_from {}\n counter esp_packets {}\n\
             chain count {\n  type filter hook forward priority -200; policy accept;\n\
             \x20 tcp dport 143 counter name \"clear_to\"\n\
             \x20 tcp sport 143 counter name \"clear_from\"\n\
             \x20 ip protocol esp counter name \"esp_packets\"\n }\n}\n",
        );
        // On the back-ends: what reached VIP:143 without IPsec (a decrypted packet carries
        // a secpath; `meta ipsec` is nft 1.0's name for `meta secpath`).
        for be in &bes {
            nft(
                be,
                &format!(
                    "table inet lab {{\n counter clear_in {{}}\n chain input {{\n\
                     \x20 type filter hook input priority -200; policy accept;\n\
                     \x20 ip daddr {VIP} tcp dport 143 meta ipsec missing counter name \"clear_in\"\n\
                     }}\n}}\n"
                ),
            );
        }
        let servers = vec![serve(&bes[0], "be1"), serve(&bes[1], "be2")];
        let dir = tempfile::Builder::new()
            .prefix("guard-vm-")
            .tempdir()
            .unwrap();

        // be1 first, alone, so it is the VIP's first owner; be2 joins as its backup.
        let k1 = start_keepalived(&bes[0], dir.path(), "be1", 150);
        wait_for("the VIP on be1", Duration::from_secs(20), || {
            has_vip(&bes[0]).then_some(())
        })
        .unwrap();
        let k2 = start_keepalived(&bes[1], dir.path(), "be2", 100);
        eprintln!("guest: VIP on be1 after {:?}", t0.elapsed());

        let be_charons: Vec<Charon> = bes
            .iter()
            .enumerate()
            .map(|(i, be)| {
                Charon::start_kernel_esp(be, &format!("be{}", i + 1), &be_swanctl()).unwrap()
            })
            .collect();
        let fe_charon = Charon::start_kernel_esp(&fe, "fe", &fe_swanctl()).unwrap();
        eprintln!("guest: charons up after {:?}", t0.elapsed());
        let mut lab = Lab {
            agents: Vec::new(),
            fe_charon,
            be_charons,
            keepalived: vec![Some(k1), Some(k2)],
            servers,
            dir,
            fe,
            bes,
            hub,
        };
        for i in 0..2 {
            let body = be_agent_body(&lab.be_charons[i].vici_socket());
            let agent = AgentProc::start(
                Some(&lab.bes[i]),
                lab.dir.path(),
                &format!("be{}", i + 1),
                &body,
            );
            lab.agents.push(agent);
        }
        lab
    }

    fn clear_text(&self) -> ClearText {
        ClearText {
            wire_to: nft_counter(&self.hub, "bridge", "wire", "clear_to"),
            wire_from: nft_counter(&self.hub, "bridge", "wire", "clear_from"),
            be_in: [0, 1].map(|i| nft_counter(&self.bes[i], "inet", "lab", "clear_in")),
        }
    }

    fn esp_packets(&self) -> u64 {
        nft_counter(&self.hub, "bridge", "wire", "esp_packets")
    }

    fn served(&self) -> u32 {
        self.servers.iter().map(|s| s.load(Ordering::SeqCst)).sum()
    }

    fn assert_no_clear_text(&self, when: &str) {
        let c = self.clear_text();
        assert_eq!(c.total(), 0, "clear text {when}: {c:?}");
    }
}

/// A TCP exchange with VIP:143 from inside the front-end: Ok(the answering back-end's
/// name) or the OS error.
fn probe(fe: &Netns, timeout: Duration) -> std::io::Result<String> {
    fe.run_in(move || {
        let addr: SocketAddr = format!("{VIP}:143").parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf.trim().to_string())
    })
    .expect("thread in namespace")
}

fn is_eperm(r: &std::io::Result<String>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EPERM))
}

fn out_pol_block(ns: &Netns) -> u64 {
    ns.sh("cat /proc/net/xfrm_stat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("XfrmOutPolBlock"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap()
}

fn esp_states(ns: &Netns) -> usize {
    ns.ip(&["xfrm", "state", "list"])
        .unwrap()
        .matches("proto esp")
        .count()
}

/// The first line of each SA ("src A dst B"), to see what a dead charon left behind.
fn sa_heads(ns: &Netns) -> Vec<String> {
    ns.ip(&["xfrm", "state", "list"])
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("src "))
        .map(|l| l.trim().to_string())
        .collect()
}

/// The pid of the charon running in `ns` (the testbed's guard only kills it).
fn charon_pid(ns: &Netns) -> u32 {
    let pids = Command::new("ip")
        .args(["netns", "pids", &ns.name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "charon")
        })
        .expect("charon runs in the namespace")
}

/// Gone or a zombie (its parent, the test, reaps it later).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// What a series of probes met.
#[derive(Debug, Default)]
struct Tally {
    answered: u32,
    eperm: u32,
    other: u32,
}

impl Tally {
    fn add(&mut self, r: &std::io::Result<String>) {
        match r {
            Ok(_) => self.answered += 1,
            _ if is_eperm(r) => self.eperm += 1,
            Err(_) => self.other += 1,
        }
    }
}

/// Probes every ~50 ms until `want` answers (or `limit` passes); returns the time from
/// `since` to that answer and what the probes before it met.
fn probe_until(fe: &Netns, want: &str, since: Instant, limit: Duration) -> (Duration, Tally) {
    let mut tally = Tally::default();
    loop {
        // Short timeouts: a SYN sent into an SA whose far end is gone waits for nothing.
        let r = probe(fe, Duration::from_millis(400));
        if matches!(&r, Ok(name) if name == want) {
            return (since.elapsed(), tally);
        }
        tally.add(&r);
        assert!(
            since.elapsed() < limit,
            "no answer from {want} within {limit:?}: {tally:?}, last {r:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn up(s: &serde_json::Value) -> bool {
    s["peer_vips"][0]["ike_state"] == "established" && s["peer_vips"][0]["guard"]["state"] == "held"
}

// ----- the scenarios -----

fn guest() {
    let t0 = Instant::now();
    let mut lab = Lab::start();
    eprintln!("guest: lab ready after {:?}", t0.elapsed());

    // (1) The agent starts with its guard; charon's own start and the agent bring the
    // tunnel up, and the tunnel passes the guard: charon's ESP policy (a smaller priority
    // number) wins over the block.
    let t = Instant::now();
    let body = fe_agent_body(&lab.fe_charon.vici_socket());
    let fe_agent = AgentProc::start(Some(&lab.fe), lab.dir.path(), "fe", &body);
    lab.agents.push(fe_agent);
    let agent = lab.agents.last().unwrap();
    let s = agent.wait_status("the SA up with the guard held", Duration::from_secs(30), up);
    eprintln!(
        "[measured] fe agent start -> SA up, guard held: {:?}",
        t.elapsed()
    );
    assert_eq!(s["kernel"]["healthy"], true, "{s:#}");
    let policies = lab
        .fe
        .ip(&["xfrm", "policy", "list", "dir", "out"])
        .unwrap();
    eprintln!("guest: fe out policies with the tunnel up:\n{policies}");
    assert!(
        policies.contains("action block") && policies.contains("priority 1000000"),
        "the agent's block policy: {policies}"
    );
    assert!(
        policies.contains("proto esp") && policies.contains("mode tunnel"),
        "charon's ESP policy: {policies}"
    );
    let esp_before = lab.esp_packets();
    for _ in 0..5 {
        assert_eq!(probe(&lab.fe, Duration::from_secs(3)).unwrap(), "be1");
    }
    let esp = lab.esp_packets() - esp_before;
    eprintln!(
        "[measured] scenario 1: 5 of 5 probes answered by be1 over ESP ({esp} ESP packets on the wire)"
    );
    assert!(esp >= 10, "the answers crossed the wire as ESP: {esp}");
    lab.assert_no_clear_text("with the tunnel up");

    // (2) charon's out policy disappears (as between one SA's deletion and the next): the
    // guard refuses the flow instead of letting it out in clear text.
    let blocked = out_pol_block(&lab.fe);
    let served = lab.served();
    lab.fe
        .ip(&[
            "xfrm",
            "policy",
            "del",
            "dir",
            "out",
            "src",
            &format!("{FE}/32"),
            "dst",
            &format!("{VIP}/32"),
            "proto",
            "tcp",
            "dport",
            "143",
        ])
        .unwrap();
    for _ in 0..5 {
        let r = probe(&lab.fe, Duration::from_secs(2));
        assert!(
            is_eperm(&r),
            "without charon's policy the guard refuses: {r:?}"
        );
    }
    let refused = out_pol_block(&lab.fe) - blocked;
    assert!(refused >= 5, "XfrmOutPolBlock counts them: {refused}");
    assert_eq!(lab.served(), served, "nothing reached a server");
    lab.assert_no_clear_text("with charon's out policy gone");
    eprintln!(
        "[measured] scenario 2: 5 of 5 probes EPERM without charon's out policy (XfrmOutPolBlock +{refused})"
    );
    // The IKE_SA's end: the agent sees the SA go and renegotiates on its own.
    let t = Instant::now();
    lab.fe_charon
        .swanctl(&["--terminate", "--ike", CONN, "--timeout", "10"])
        .unwrap();
    let (took, tally) = probe_until(&lab.fe, "be1", t, Duration::from_secs(30));
    eprintln!(
        "[measured] scenario 2: IKE_SA terminated -> answered again in {took:?} (before: {tally:?})"
    );
    lab.assert_no_clear_text("after the renegotiation");

    // (3) Planned move: keepalived stops on the owner (SIGTERM, a priority-0 advert), be2
    // takes the VIP, be1's agent deletes its SAs, the front-end's agent renegotiates.
    let t = Instant::now();
    lab.keepalived[0]
        .as_ref()
        .unwrap()
        .signal(libc::SIGTERM)
        .unwrap();
    let watcher = {
        // When the VIP arrives on be2, for the timeline.
        let be2 = lab.bes[1].name.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let out = Command::new("ip")
                    .args(["-n", &be2, "-4", "addr", "show", "dev", IFACE])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&out.stdout).contains(&format!("{VIP}/32")) {
                    return Some(t.elapsed());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        })
    };
    let (took, tally) = probe_until(&lab.fe, "be2", t, Duration::from_secs(60));
    let vip_moved = watcher.join().unwrap();
    // Whether be1's DELETE reached the front-end or its idle detector fired.
    let reason = lab.agents.last().unwrap().status().and_then(|s| {
        s["peer_vips"][0]["last_failover"]["reason"]
            .as_str()
            .map(String::from)
    });
    eprintln!(
        "[measured] scenario 3: planned move (keepalived SIGTERM on be1): VIP on be2 after {vip_moved:?}, \
         first answer from be2 after {took:?}; probes before it: {tally:?}; fe agent's reason: {reason:?}"
    );
    lab.assert_no_clear_text("through the planned move");
    if let Some(mut k) = lab.keepalived[0].take() {
        k.wait_exit(Duration::from_secs(5));
    }

    // (4a) The front-end's charon is killed (SIGKILL). With kernel ESP its SAs and
    // policies stay in the kernel: the flow keeps leaving as ESP over the orphaned SA, and
    // once that SA is gone charon's orphaned policy (it outranks the guard) still claims
    // the flow, so the kernel drops the packets while it asks for an SA rather than refusing
    // them (no EPERM). Neither is clear text. Then charon comes back, and the tunnel.
    lab.fe_charon.kill();
    let orphans = esp_states(&lab.fe);
    let mut tally = Tally::default();
    let mut answered_by = Vec::new();
    for _ in 0..5 {
        let r = probe(&lab.fe, Duration::from_secs(1));
        if let Ok(name) = &r {
            answered_by.push(name.clone());
        }
        tally.add(&r);
    }
    eprintln!(
        "[measured] scenario 4a: charon SIGKILLed, {orphans} kernel SAs left behind: probes \
         {tally:?} (answered by {answered_by:?}, over the orphaned SAs)"
    );
    // The orphaned SAs end (their lifetime would end them; here at once).
    lab.fe.ip(&["xfrm", "state", "flush"]).unwrap();
    let mut tally = Tally::default();
    for _ in 0..3 {
        tally.add(&probe(&lab.fe, Duration::from_secs(1)));
    }
    eprintln!(
        "[measured] scenario 4a: orphaned SAs flushed, charon's orphaned policy left: probes {tally:?}"
    );
    assert_eq!(tally.answered, 0, "no SA, no answer");
    lab.assert_no_clear_text("with the front-end's charon dead");
    let t = Instant::now();
    lab.fe_charon.restart().unwrap();
    let (took, tally) = probe_until(&lab.fe, "be2", t, Duration::from_secs(30));
    eprintln!(
        "[measured] scenario 4a: charon restarted -> answered by be2 in {took:?} (before: {tally:?})"
    );
    lab.agents
        .last()
        .unwrap()
        .wait_status("the SA up again", Duration::from_secs(20), up);

    // (4b) charon stops cleanly (SIGTERM): it takes its SAs and policies out of the kernel,
    // and the guard, which never depended on charon, refuses the flow.
    let pid = charon_pid(&lab.fe);
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    wait_for("charon to exit", Duration::from_secs(15), || {
        exited(pid).then_some(())
    })
    .unwrap();
    let blocked = out_pol_block(&lab.fe);
    for _ in 0..5 {
        let r = probe(&lab.fe, Duration::from_secs(2));
        assert!(is_eperm(&r), "charon stopped: the guard refuses: {r:?}");
    }
    let refused = out_pol_block(&lab.fe) - blocked;
    eprintln!(
        "[measured] scenario 4b: charon stopped (SIGTERM), kernel SAs left: {:?}: 5 of 5 probes \
         EPERM (XfrmOutPolBlock +{refused})",
        sa_heads(&lab.fe)
    );
    lab.assert_no_clear_text("with the front-end's charon stopped");
    let t = Instant::now();
    lab.fe_charon.restart().unwrap();
    let (took, tally) = probe_until(&lab.fe, "be2", t, Duration::from_secs(30));
    eprintln!(
        "[measured] scenario 4b: charon restarted -> answered by be2 in {took:?} (before: {tally:?})"
    );

    // The agent stops cleanly: the guard stays (removing it is an explicit act).
    let mut fe_agent = lab.agents.pop().unwrap();
    fe_agent.proc.signal(libc::SIGTERM).unwrap();
    assert_eq!(fe_agent.proc.wait_exit(Duration::from_secs(15)), Some(0));
    let policies = lab
        .fe
        .ip(&["xfrm", "policy", "list", "dir", "out"])
        .unwrap();
    assert!(
        policies.contains("action block"),
        "the guard outlives the agent: {policies}"
    );

    let c = lab.clear_text();
    eprintln!(
        "[measured] clear text over the whole run: {} packets ({c:?}); ESP packets on the wire: {}",
        c.total(),
        lab.esp_packets()
    );
    assert_eq!(c.total(), 0, "clear text over the run: {c:?}");
    eprintln!("guest: all scenarios done in {:?}", t0.elapsed());
}
