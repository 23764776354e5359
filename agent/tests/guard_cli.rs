//! `vipsec guard install|show|remove`: the real binary inside a namespace pair, against the
//! real kernel's XFRM policies and IPv6 policy routing rules.
//!
//! The front-end namespace talks to a back-end namespace over a veth pair (`fe0`/`be0`);
//! the back-end holds an IPv4 and an IPv6 VIP with listeners on 143 (protected) and 22
//! (not protected). The front-end also hosts a VIP of its own (192.0.2.50, answers from
//! port 25 protected). Namespaces are named `vgc-...` so they never clash with the chaos
//! labs'.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::{ProcessGuard, wait_for};

mod common;
use common::{AgentProc, BIN, show, text};

const VIP4: &str = "192.0.2.100";
const VIP6: &str = "2001:db8::100";
const HOSTED: &str = "192.0.2.50";

/// A namespace named `vgc-<tag>-<pid><n>`, deleted (with what runs in it) on drop.
fn vgc_netns(tag: &str) -> Netns {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "vgc-{tag}-{:x}{:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let out = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip netns add {name}: {}",
        text(&out.stderr)
    );
    let ns = Netns { name };
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns
}

struct Lab {
    fe: Netns,
    be: Netns,
    _listeners: Vec<TcpListener>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        vipsec_testbed::require_root().unwrap();
        let fe = vgc_netns("gf");
        let be = vgc_netns("gb");
        fe.veth_to("fe0", "192.0.2.1/24", &be, "be0", "192.0.2.2/24")
            .unwrap();
        fe.ip(&["-6", "addr", "add", "2001:db8::1/64", "dev", "fe0", "nodad"])
            .unwrap();
        be.ip(&["-6", "addr", "add", "2001:db8::2/64", "dev", "be0", "nodad"])
            .unwrap();
        be.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "be0"])
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
        fe.ip(&["addr", "add", &format!("{HOSTED}/32"), "dev", "fe0"])
            .unwrap();
        // Listening sockets stay in their namespace after the thread that opened them ends.
        let mut listeners = be
            .run_in(|| {
                let mut l = Vec::new();
                for vip in [VIP4, VIP6] {
                    for port in [143u16, 22] {
                        let ip: IpAddr = vip.parse().unwrap();
                        l.push(TcpListener::bind((ip, port)).expect("bind listener"));
                    }
                }
                l
            })
            .unwrap();
        listeners.extend(
            fe.run_in(|| {
                [25u16, 26]
                    .iter()
                    .map(|p| TcpListener::bind((HOSTED, *p)).expect("bind listener"))
                    .collect::<Vec<_>>()
            })
            .unwrap(),
        );
        Lab {
            fe,
            be,
            _listeners: listeners,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The front-end's config: an IPv4 and an IPv6 peer VIP, one hosted VIP.
    fn config(&self, interface: &str) -> PathBuf {
        let path = self.dir.path().join("agent.toml");
        std::fs::write(
            &path,
            format!(
                r#"node = "fe"
[api]
endpoint = "unix://{sock}"
[kernel]
backend = "xfrm"
interface = "{interface}"
libipsec = true
[[peer_vip]]
address = "{VIP4}"
connection = "vip"
protect = ["tcp/143"]
[[peer_vip]]
address = "{VIP6}"
connection = "vip6"
protect = ["tcp/143"]
[[hosted_vip]]
address = "{HOSTED}"
protect = ["tcp/25"]
"#,
                sock = self.socket().display()
            ),
        )
        .unwrap();
        path
    }

    /// Where an agent would answer: nothing does unless a test starts one.
    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// `vipsec ARGS` inside the front-end namespace, with --endpoint at the lab's socket.
    fn vipsec(&self, args: &[&str]) -> Output {
        self.fe
            .command(BIN)
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .output()
            .unwrap()
    }

    fn show(&self, config: &Path) -> Value {
        let out = self.vipsec(&["guard", "show", "--json", "--config", path(config)]);
        assert!(out.status.success(), "{}", show(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)))
    }

    fn policies(&self) -> String {
        self.fe.ip(&["xfrm", "policy"]).unwrap()
    }

    fn rules6(&self) -> String {
        self.fe.ip(&["-6", "rule"]).unwrap()
    }

    /// Connects from the front-end: Ok, or the errno.
    fn connect(&self, vip: &str, port: u16) -> Result<(), i32> {
        let addr = SocketAddr::new(vip.parse().unwrap(), port);
        self.fe.run_in(move || connect(addr)).unwrap()
    }
}

fn connect(addr: SocketAddr) -> Result<(), i32> {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(1500)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::TimedOut => Err(libc::ETIMEDOUT),
        Err(e) => Err(e.raw_os_error().unwrap_or(-1)),
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The state word `show --json` gives a VIP.
fn state(report: &Value, vip: &str) -> String {
    report["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vip"] == vip)
        .unwrap_or_else(|| panic!("{vip} not in {report:#}"))["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The policies' selector lines (the first line of each in `ip xfrm policy`).
fn selector_lines(listing: &str) -> Vec<&str> {
    listing
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace) && !l.is_empty())
        .collect()
}

#[test]
fn install_puts_the_guard_in_show_reads_it_and_remove_takes_it_out() {
    let lab = Lab::new();
    let config = lab.config("fe0");
    assert_eq!(lab.connect(VIP4, 143), Ok(()), "reachable before the guard");

    let t = Instant::now();
    let out = lab.vipsec(&["guard", "install", "--config", path(&config)]);
    eprintln!(
        "guard install took {:?}\n{}",
        t.elapsed(),
        text(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = text(&out.stdout);
    for vip in [VIP4, VIP6, HOSTED] {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(vip))
            .unwrap_or_else(|| panic!("no line for {vip}: {stdout}"));
        assert!(line.trim_end().ends_with("held"), "{line}");
    }

    // What the kernel holds: interface-bound IPv4 blocks, IPv6 prohibit rules at 221.
    let policies = lab.policies();
    assert!(
        policies.contains(&format!("dst {VIP4}/32 proto tcp dport 143 dev fe0")),
        "{policies}"
    );
    assert!(
        policies.contains(&format!(
            "src {HOSTED}/32 dst 0.0.0.0/0 proto tcp sport 25 dev fe0"
        )),
        "{policies}"
    );
    assert_eq!(selector_lines(&policies).len(), 2, "{policies}");
    let rules = lab.rules6();
    assert!(
        rules.contains(&format!(
            "221:\tfrom all to {VIP6} ipproto tcp dport 143 prohibit"
        )),
        "{rules}"
    );

    // The protected port is refused from the socket on (EPERM: XFRM block; EACCES:
    // prohibit route), the other port is not.
    assert_eq!(lab.connect(VIP4, 143), Err(libc::EPERM));
    assert_eq!(lab.connect(VIP4, 22), Ok(()));
    assert_eq!(lab.connect(VIP6, 143), Err(libc::EACCES));
    assert_eq!(lab.connect(VIP6, 22), Ok(()));
    // The hosted VIP's answers from port 25 never leave: the SYN-ACK is blocked, so the
    // back-end's connect times out, while port 26 answers.
    let hosted = |port| {
        let addr = SocketAddr::new(HOSTED.parse().unwrap(), port);
        lab.be.run_in(move || connect(addr)).unwrap()
    };
    assert_eq!(hosted(25), Err(libc::ETIMEDOUT));
    assert_eq!(hosted(26), Ok(()));

    // Idempotent: a second install changes nothing.
    let out = lab.vipsec(&["guard", "install", "--config", path(&config)]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(lab.policies(), policies);
    assert_eq!(lab.rules6(), rules);

    let report = lab.show(&config);
    for vip in [VIP4, VIP6, HOSTED] {
        assert_eq!(state(&report, vip), "held", "{report:#}");
    }
    let v4 = report["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vip"] == VIP4)
        .unwrap();
    assert_eq!(
        (v4["wanted"].as_u64(), v4["installed"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(v4["role"], "peer");
    assert_eq!(v4["kind"], "xfrm");

    // Flushed by hand: the IPv4 guards are absent (nothing repairs them without an
    // agent), the IPv6 rules are untouched.
    lab.fe.ip(&["xfrm", "policy", "flush"]).unwrap();
    let report = lab.show(&config);
    assert_eq!(state(&report, VIP4), "absent", "{report:#}");
    assert_eq!(state(&report, HOSTED), "absent", "{report:#}");
    assert_eq!(state(&report, VIP6), "held", "{report:#}");
    assert_eq!(lab.connect(VIP4, 143), Ok(()));

    // Without a config only what the kernel holds is shown.
    let out = lab.vipsec(&["guard", "show", "--json"]);
    assert!(out.status.success(), "{}", show(&out));
    let kernel_only: Value = serde_json::from_slice(&out.stdout).unwrap();
    if !Path::new("/etc/vipsec/agent.toml").exists() {
        assert_eq!(kernel_only["config"], Value::Null);
        assert_eq!(
            kernel_only["vips"].as_array().unwrap().len(),
            1,
            "{kernel_only:#}"
        );
        assert_eq!(state(&kernel_only, VIP6), "present");
    }

    // Back in, then removed on purpose: nothing of vipsec's is left.
    let out = lab.vipsec(&["guard", "install", "--config", path(&config)]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = lab.vipsec(&["guard", "remove", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let removed = text(&out.stdout);
    eprintln!("{removed}");
    for vip in [VIP4, VIP6, HOSTED] {
        assert!(removed.contains(vip), "{removed}");
    }
    assert!(removed.contains("clear text"), "{removed}");
    assert!(
        selector_lines(&lab.policies()).is_empty(),
        "{}",
        lab.policies()
    );
    assert!(!lab.rules6().contains(VIP6), "{}", lab.rules6());
    assert_eq!(lab.connect(VIP4, 143), Ok(()));
    assert_eq!(lab.connect(VIP6, 143), Ok(()));
    assert_eq!(hosted(25), Ok(()));
    let report = lab.show(&config);
    for vip in [VIP4, VIP6, HOSTED] {
        assert_eq!(state(&report, vip), "absent", "{report:#}");
    }
}

#[test]
fn remove_names_vips_and_leaves_the_others() {
    let lab = Lab::new();
    let config = lab.config("fe0");
    let out = lab.vipsec(&["guard", "install", "--config", path(&config)]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = lab.vipsec(&["guard", "remove", "--json", VIP6]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let removed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(removed["removed"][0]["vip"], VIP6);
    assert_eq!(removed["removed"][0]["rules"], 1);
    assert_eq!(removed["removed"][0]["policies"], 0);
    let report = lab.show(&config);
    assert_eq!(state(&report, VIP6), "absent");
    assert_eq!(state(&report, VIP4), "held");
    assert_eq!(lab.connect(VIP4, 143), Err(libc::EPERM));

    // A VIP the config no longer names keeps its guard, shown as a leftover.
    let smaller = lab.dir.path().join("smaller.toml");
    std::fs::write(
        &smaller,
        std::fs::read_to_string(&config).unwrap().replace(
            &format!("address = \"{VIP4}\""),
            "address = \"192.0.2.101\"",
        ),
    )
    .unwrap();
    let report = lab.show(&smaller);
    assert_eq!(state(&report, VIP4), "leftover", "{report:#}");
    assert_eq!(state(&report, "192.0.2.101"), "absent", "{report:#}");
    let out = lab.vipsec(&["guard", "remove", VIP4, HOSTED]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        selector_lines(&lab.policies()).is_empty(),
        "{}",
        lab.policies()
    );

    // Neither VIPs nor --all is a usage error, as is a bad address.
    assert_eq!(lab.vipsec(&["guard", "remove"]).status.code(), Some(2));
    assert_eq!(
        lab.vipsec(&["guard", "remove", "not-an-ip"]).status.code(),
        Some(2)
    );
    let out = lab.vipsec(&["guard", "install", "--config", "/nonexistent/agent.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(text(&out.stderr).contains("/nonexistent/agent.toml"));
    assert_eq!(
        text(&out.stderr).trim().lines().count(),
        1,
        "{}",
        show(&out)
    );
}

#[test]
fn install_waits_for_the_interface_and_names_the_vips_it_could_not_guard() {
    let lab = Lab::new();
    let config = lab.config("late0");

    // The interface never comes: the IPv6 guard (not bound to it) goes in anyway, the
    // IPv4 ones cannot, and the exit code and the one stderr line say which.
    let t = Instant::now();
    let out = lab.vipsec(&[
        "guard",
        "install",
        "--wait",
        "300ms",
        "--config",
        path(&config),
    ]);
    let waited = t.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(VIP4) && err.contains(HOSTED) && err.contains("late0"),
        "{err}"
    );
    assert!(!err.contains(VIP6), "{err}");
    let report = lab.show(&config);
    assert_eq!(state(&report, VIP6), "held");
    assert_eq!(state(&report, VIP4), "absent");

    // It appears while install waits (as udev names it at boot): all guards go in.
    let fe = lab.fe.name.clone();
    let mut install = ProcessGuard::spawn(
        "guard install",
        lab.fe
            .command(BIN)
            .args([
                "guard",
                "install",
                "--wait",
                "10s",
                "--config",
                path(&config),
            ])
            .stdout(std::process::Stdio::null()),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(install.is_running(), "install did not wait for late0");
    // A veth pair (this kernel has no dummy links): one end becomes late0, the other goes
    // to the back-end namespace (deleting it would delete late0 too).
    let a = format!("vgca{:x}", std::process::id());
    let b = format!("vgcb{:x}", std::process::id());
    let be = lab.be.name.clone();
    for args in [
        vec!["link", "add", &a, "type", "veth", "peer", "name", &b],
        vec!["link", "set", &b, "netns", &be],
        vec!["link", "set", &a, "netns", &fe, "name", "late0"],
    ] {
        let st = Command::new("ip").args(&args).status().unwrap();
        assert!(st.success(), "ip {args:?}");
    }
    assert_eq!(install.wait_exit(Duration::from_secs(10)), Some(0));
    let report = lab.show(&config);
    for vip in [VIP4, VIP6, HOSTED] {
        assert_eq!(state(&report, vip), "held", "{report:#}");
    }
    assert!(lab.policies().contains("dev late0"), "{}", lab.policies());
}

#[test]
fn remove_is_refused_while_an_agent_answers_unless_forced() {
    let lab = Lab::new();
    let body = format!(
        "[store]\nbackend = \"embedded\"\n[kernel]\nbackend = \"xfrm\"\ninterface = \"fe0\"\n\
         [[peer_vip]]\naddress = \"{VIP4}\"\nconnection = \"vip\"\nprotect = [\"tcp/143\"]\n"
    );
    let agent = AgentProc::start(Some(&lab.fe), lab.dir.path(), "fe", &body);
    let endpoint = format!("unix://{}", agent.socket.display());
    let report_held = || {
        let out = lab
            .fe
            .command(BIN)
            .args(["guard", "show", "--json", "--config"])
            .arg(lab.dir.path().join("fe.toml"))
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        state(&v, VIP4) == "held"
    };
    wait_for("the agent's guard", Duration::from_secs(10), || {
        report_held().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));

    let remove = |extra: &[&str]| {
        lab.fe
            .command(BIN)
            .args(["--endpoint", &endpoint, "guard", "remove", "--all"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = remove(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("stop the agent first") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(lab.connect(VIP4, 143), Err(libc::EPERM), "the guard stays");

    // Forced, it goes; the running agent puts the configured VIP's guard back at once.
    let out = remove(&["--force"]);
    assert!(text(&out.stdout).contains(VIP4), "{}", show(&out));
    let t = Instant::now();
    wait_for(
        "the agent to repair the guard",
        Duration::from_secs(5),
        || report_held().then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    eprintln!("guard back {:?} after a forced remove", t.elapsed());
}

#[test]
fn a_running_agent_repairs_what_the_kernel_announces_without_waiting_for_its_check() {
    let lab = Lab::new();
    // The periodic comparison is far off: only the kernel's announcements can bring the
    // guard back within the deadlines below.
    let body = format!(
        "[store]\nbackend = \"embedded\"\n\
         [kernel]\nbackend = \"xfrm\"\ninterface = \"fe0\"\nlibipsec = true\nguard_check = \"60s\"\n\
         [[peer_vip]]\naddress = \"{VIP4}\"\nconnection = \"vip\"\nprotect = [\"tcp/143\"]\n\
         [[peer_vip]]\naddress = \"{VIP6}\"\nconnection = \"vip6\"\nprotect = [\"tcp/143\"]\n"
    );
    let agent = AgentProc::start(Some(&lab.fe), lab.dir.path(), "fe", &body);
    let block = format!("dst {VIP4}/32 proto tcp dport 143 dev fe0");
    let prohibit = format!("221:\tfrom all to {VIP6} ipproto tcp dport 143 prohibit");
    let whole = || lab.policies().contains(&block) && lab.rules6().contains(&prohibit);
    wait_for("the agent's guard", Duration::from_secs(10), || {
        whole().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    let deadline = Duration::from_secs(2);
    // The repair can be quicker than a look at the kernel: the agent's log counts them.
    let repairs = || agent.log_text().matches("guard repaired vip=").count();
    // Waits for `what` to be back in the kernel (`listing` shows it) and for the
    // `n`th repair in the agent's log.
    let back = |what: &str, present: &dyn Fn() -> bool, listing: &dyn Fn() -> String, n| {
        let t = Instant::now();
        wait_for(what, deadline, || present().then_some(()))
            .unwrap_or_else(|e| panic!("{e}\n{}\n{}", listing(), agent.log_text()));
        eprintln!("{what} in {:?}", t.elapsed());
        wait_for("the repair in the log", deadline, || {
            (repairs() == n).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    };
    let vip4_host = format!("{VIP4}/32");
    let block_selector = [
        "dir",
        "out",
        "src",
        "0.0.0.0/0",
        "dst",
        &vip4_host,
        "proto",
        "tcp",
        "dport",
        "143",
        "dev",
        "fe0",
    ];

    // A block policy deleted by its selector: the notice's id names no index; the
    // deleted policy the kernel attaches to it does.
    let mut delete = vec!["xfrm", "policy", "delete"];
    delete.extend(block_selector);
    lab.fe.ip(&delete).unwrap();
    back(
        "the block policy back",
        &|| lab.policies().contains(&block),
        &|| lab.policies(),
        1,
    );
    assert_eq!(lab.connect(VIP4, 143), Err(libc::EPERM));

    // The IPv6 guard's routing rule deleted.
    lab.fe
        .ip(&["-6", "rule", "del", "priority", "221"])
        .unwrap();
    back(
        "the prohibit rule back",
        &|| lab.rules6().contains(&prohibit),
        &|| lab.rules6(),
        2,
    );
    assert_eq!(lab.connect(VIP6, 143), Err(libc::EACCES));

    // An update with the block's selector replaces it (whatever its priority), keeps its
    // index, and is announced as that policy allowing. The agent cannot put its block
    // beside it (the kernel refuses a second one) but reports the guard gone at once.
    let mut update = vec!["xfrm", "policy", "update"];
    update.extend(block_selector);
    update.extend(["priority", "1000000", "action", "allow"]);
    lab.fe.ip(&update).unwrap();
    let t = Instant::now();
    let guard_of = |s: &Value, vip: &str| {
        s["peer_vips"]
            .as_array()
            .and_then(|v| v.iter().find(|p| p["address"] == vip))
            .map(|p| p["guard"]["state"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    agent.wait_status("the replaced block reported", deadline, |s| {
        guard_of(s, VIP4) == "absent"
    });
    eprintln!("block replaced -> reported in {:?}", t.elapsed());
}
