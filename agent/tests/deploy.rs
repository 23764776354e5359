//! The deploy/ integrations against the real programs they are written for: the systemd
//! unit through `systemd-analyze verify`, the keepalived example and scripts with two real
//! keepalived instances in a network namespace pair, the Pacemaker resource agents through
//! `ocf-tester` against the real `vipsec` binary, and the Kubernetes manifests through a
//! strict YAML parse and field checks.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::{ProcessGuard, wait_for};
use vipsec_testbed::require_program;

mod common;
use common::{show, text};

const BIN: &str = env!("CARGO_BIN_EXE_vipsec");
const VIP: &str = "192.0.2.100";

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A scratch directory under target/tmp: every path component root-owned and not
/// world-writable, which keepalived's `enable_script_security` demands of scripts.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("deploy-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

// ---------------------------------------------------------------------------------------
// systemd

fn verify_unit(unit_text: &str) -> Output {
    verify_unit_named("vipsec.service", unit_text)
}

fn verify_unit_named(name: &str, unit_text: &str) -> Output {
    let analyze = require_program("systemd-analyze").unwrap();
    let dir = scratch_dir();
    let path = dir.path().join(name);
    std::fs::write(&path, unit_text).unwrap();
    Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap()
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = read(&deploy("systemd/vipsec.service"));
    assert!(unit.contains("ExecStart=/usr/local/bin/vipsec agent --config /etc/vipsec/agent.toml"));
    // verify insists that ExecStart's binary exists: point it at the one cargo built.
    let local = unit.replace("/usr/local/bin/vipsec", BIN);
    let out = verify_unit(&local);
    assert!(
        out.status.success() && text(&out.stderr).trim().is_empty(),
        "systemd-analyze verify reported problems:\n{}",
        show(&out)
    );

    // The check is not vacuous: verify does report a bad key (only on stderr, exit 0).
    let broken = local.replace("PrivateTmp=yes", "PrivateTmp=yes\nProtectEverything=yes");
    let out = verify_unit(&broken);
    assert!(
        text(&out.stderr).contains("ProtectEverything"),
        "verify did not notice a bad key:\n{}",
        show(&out)
    );

    // systemd's own exposure score (0 = locked down, 10 = unprotected): a network agent
    // that must keep CAP_NET_ADMIN and the host network cannot reach 0, but must stay
    // well inside "OK".
    let dir = scratch_dir();
    let path = dir.path().join("vipsec.service");
    std::fs::write(&path, &local).unwrap();
    let out = Command::new(require_program("systemd-analyze").unwrap())
        .args(["security", "--offline=true", "--threshold=25"])
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    let score = text(&out.stdout)
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default()
        .to_string();
    eprintln!("systemd-analyze security: {}", score.trim());
    assert!(out.status.success(), "exposure above 2.5:\n{}", show(&out));

    // The hardening the operator guide promises.
    for line in [
        "User=root",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RuntimeDirectory=vipsec",
        "RuntimeDirectoryMode=0750",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources",
        "Restart=on-failure",
        // Ready only once the agent answers (sd_notify from the agent; tested under a
        // real systemd in systemd_unit.rs).
        "Type=notify",
        "Wants=network-online.target strongswan.service",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == line),
            "vipsec.service lacks {line:?}"
        );
    }
    assert!(!unit.contains("ExecReload"));
    // The agent comes after the boot-time guard, and only wants it.
    for line in ["Wants=vipsec-guard.service", "After=vipsec-guard.service"] {
        assert!(
            unit.lines().any(|l| l.trim() == line),
            "vipsec.service lacks {line:?}"
        );
    }
}

/// `systemd-analyze security --offline` on a unit: its exit status (threshold 2.5) and the
/// "Overall exposure level" line.
fn exposure(name: &str, unit_text: &str) -> (Output, String) {
    let dir = scratch_dir();
    let path = dir.path().join(name);
    std::fs::write(&path, unit_text).unwrap();
    let out = Command::new(require_program("systemd-analyze").unwrap())
        .args(["security", "--offline=true", "--threshold=25"])
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    let score = text(&out.stdout)
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default()
        .trim()
        .to_string();
    (out, score)
}

#[test]
fn guard_unit_passes_systemd_analyze_verify_and_never_removes_the_guard() {
    let unit = read(&deploy("systemd/vipsec-guard.service"));
    assert!(
        unit.contains(
            "ExecStart=/usr/local/bin/vipsec guard install --config /etc/vipsec/agent.toml"
        )
    );
    let local = unit.replace("/usr/local/bin/vipsec", BIN);
    let out = verify_unit_named("vipsec-guard.service", &local);
    assert!(
        out.status.success() && text(&out.stderr).trim().is_empty(),
        "systemd-analyze verify reported problems:\n{}",
        show(&out)
    );
    // Not vacuous for this unit either.
    let broken = local.replace(
        "RemainAfterExit=yes",
        "RemainAfterExit=yes\nProtectEverything=yes",
    );
    let out = verify_unit_named("vipsec-guard.service", &broken);
    assert!(
        text(&out.stderr).contains("ProtectEverything"),
        "verify did not notice a bad key:\n{}",
        show(&out)
    );
    // Both units together: the agent's ordering after the guard and the guard's before the
    // agent agree (no ordering cycle).
    let dir = scratch_dir();
    let agent = read(&deploy("systemd/vipsec.service")).replace("/usr/local/bin/vipsec", BIN);
    std::fs::write(dir.path().join("vipsec.service"), agent).unwrap();
    std::fs::write(dir.path().join("vipsec-guard.service"), &local).unwrap();
    let out = Command::new(require_program("systemd-analyze").unwrap())
        .arg("verify")
        .arg(dir.path().join("vipsec.service"))
        .arg(dir.path().join("vipsec-guard.service"))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success() && text(&out.stderr).trim().is_empty(),
        "verify of both units:\n{}",
        show(&out)
    );
    let (out, score) = exposure("vipsec-guard.service", &local);
    eprintln!("systemd-analyze security vipsec-guard.service: {score}");
    assert!(out.status.success(), "exposure above 2.5:\n{}", show(&out));

    let has = |line: &str| unit.lines().any(|l| l.trim() == line);
    for line in [
        "Type=oneshot",
        "RemainAfterExit=yes",
        // Early boot, before the network is configured.
        "DefaultDependencies=no",
        "After=local-fs.target systemd-modules-load.service",
        "Wants=network-pre.target",
        "Before=network-pre.target",
        "Before=strongswan.service strongswan-starter.service vipsec.service",
        // The same confinement as the agent.
        "User=root",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources",
    ] {
        assert!(has(line), "vipsec-guard.service lacks {line:?}");
    }
    // Stopping the unit leaves the guard: removal is explicit (`vipsec guard remove`).
    assert!(
        !unit.lines().any(|l| l.trim_start().starts_with("ExecStop")),
        "vipsec-guard.service must not remove the guard on stop"
    );
    assert!(
        !unit
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("guard remove")),
        "vipsec-guard.service must not remove the guard"
    );
}

// ---------------------------------------------------------------------------------------
// keepalived

/// One back-end node of the VRRP lab: its namespace, its keepalived and its stub `vipsec`.
struct VrrpNode {
    name: &'static str,
    ifname: &'static str,
    dir: PathBuf,
}

impl VrrpNode {
    fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }
    fn track_file(&self) -> PathBuf {
        self.dir.join("handover")
    }
    fn health_fail_flag(&self) -> PathBuf {
        self.dir.join("health-fail")
    }
    fn path_env(&self) -> String {
        format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.bin_dir().display()
        )
    }
}

/// The two keepalived processes die before their namespaces (field order), and the
/// namespaces' Drop kills whatever keepalived left behind (its VRRP child).
struct VrrpLab {
    keepalived: Vec<ProcessGuard>,
    a: Netns,
    b: Netns,
    nodes: [VrrpNode; 2],
    calls: PathBuf,
    dir: tempfile::TempDir,
}

/// A stand-in `vipsec` for keepalived's scripts (the real agent is tested elsewhere): it
/// records each call with a timestamp and whether the VIP is on this node at that moment,
/// and `health` fails while a flag file exists.
fn stub_vipsec(node: &VrrpNode, calls: &Path) -> String {
    format!(
        r#"#!/bin/sh
present=no
ip -o addr show | awk '{{split($4, a, "/"); if (a[1] == "{VIP}") f = 1}} END {{exit !f}}' && present=yes
echo "$(date +%s.%N) {node} present=$present $*" >>{calls}
case $1 in
health)
    if [ -e {flag} ]; then echo "keying (strongswan) unhealthy: stub" >&2; exit 1; fi
    exit 0 ;;
drain)
    echo "drained $2: 1 IKE_SA(s) deleted"
    exit 0 ;;
esac
exit 0
"#,
        node = node.name,
        calls = calls.display(),
        flag = node.health_fail_flag().display(),
    )
}

fn keepalived_config(node: &VrrpNode) -> String {
    let example = read(&deploy("keepalived/keepalived.conf.example"));
    for needle in [
        "eth0",
        "/usr/local/bin/vipsec",
        "/usr/local/sbin/vipsec-notify",
        "/run/keepalived-vipsec-handover",
    ] {
        assert!(example.contains(needle), "example lost {needle:?}");
    }
    example
        .replace("eth0", node.ifname)
        .replace(
            "/usr/local/bin/vipsec",
            &node.bin_dir().join("vipsec").display().to_string(),
        )
        .replace(
            "/usr/local/sbin/vipsec-notify",
            &deploy("keepalived/vipsec-notify").display().to_string(),
        )
        .replace(
            "/run/keepalived-vipsec-handover",
            &node.track_file().display().to_string(),
        )
}

/// One recorded stub call: (unix time, node, VIP present there, arguments).
struct Call {
    at: f64,
    node: String,
    present: bool,
    args: String,
}

impl VrrpLab {
    fn new() -> VrrpLab {
        let keepalived = require_program("keepalived").unwrap();
        let a = Netns::new("ka").expect("creating a network namespace needs root");
        let b = Netns::new("kb").unwrap();
        a.veth_to("vrrp-a", "192.0.2.1/24", &b, "vrrp-b", "192.0.2.2/24")
            .unwrap();
        let dir = scratch_dir();
        let calls = dir.path().join("calls.log");
        let nodes = [
            VrrpNode {
                name: "be1",
                ifname: "vrrp-a",
                dir: dir.path().join("be1"),
            },
            VrrpNode {
                name: "be2",
                ifname: "vrrp-b",
                dir: dir.path().join("be2"),
            },
        ];
        for (n, ns) in nodes.iter().zip([&a, &b]) {
            std::fs::create_dir_all(n.bin_dir()).unwrap();
            write_executable(&n.bin_dir().join("vipsec"), &stub_vipsec(n, &calls));
            std::fs::write(n.dir.join("keepalived.conf"), keepalived_config(n)).unwrap();
            // keepalived's own parser first (in the namespace, where the interface exists):
            // unknown keywords only warn at run time.
            let check = ns
                .command(keepalived.to_str().unwrap())
                .arg("--config-test")
                .arg("--use-file")
                .arg(n.dir.join("keepalived.conf"))
                .output()
                .unwrap();
            assert!(
                check.status.success() && text(&check.stderr).trim().is_empty(),
                "keepalived --config-test:\n{}",
                show(&check)
            );
        }
        VrrpLab {
            keepalived: Vec::new(),
            a,
            b,
            nodes,
            calls,
            dir,
        }
    }

    fn ns(&self, i: usize) -> &Netns {
        if i == 0 { &self.a } else { &self.b }
    }

    fn start_keepalived(&mut self, i: usize) {
        let program = require_program("keepalived").unwrap();
        let n = &self.nodes[i];
        let log = std::fs::File::create(n.dir.join("keepalived.log")).unwrap();
        let mut cmd = self.ns(i).command(program.to_str().unwrap());
        cmd.args(["--dont-fork", "--log-console", "--log-detail", "--vrrp"])
            .arg("--use-file")
            .arg(n.dir.join("keepalived.conf"))
            .arg("--pid")
            .arg(n.dir.join("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(n.dir.join("vrrp.pid"))
            .env_clear()
            .env("PATH", n.path_env())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let guard = ProcessGuard::spawn(&format!("keepalived {}", n.name), &mut cmd).unwrap();
        self.keepalived.push(guard);
    }

    fn has_vip(&self, i: usize) -> bool {
        self.ns(i)
            .ip(&["-o", "-4", "addr", "show"])
            .unwrap()
            .contains(&format!(" {VIP}/32 "))
    }

    /// Polls until the VIP is on node `i` and only there.
    fn wait_vip_on(&self, i: usize, timeout: Duration) -> Duration {
        let start = Instant::now();
        wait_for(
            &format!("the VIP on {} only", self.nodes[i].name),
            timeout,
            || (self.has_vip(i) && !self.has_vip(1 - i)).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        start.elapsed()
    }

    fn calls(&self) -> Vec<Call> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(4, ' ');
                Some(Call {
                    at: f.next()?.parse().ok()?,
                    node: f.next()?.to_string(),
                    present: f.next()? == "present=yes",
                    args: f.next().unwrap_or("").to_string(),
                })
            })
            .collect()
    }

    fn count_calls(&self, node: usize, prefix: &str, since: f64) -> usize {
        self.calls()
            .iter()
            .filter(|c| {
                c.node == self.nodes[node].name && c.args.starts_with(prefix) && c.at >= since
            })
            .count()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s += &format!(
                "--- {} keepalived.log\n{}\n",
                n.name,
                std::fs::read_to_string(n.dir.join("keepalived.log")).unwrap_or_default()
            );
        }
        s += &format!(
            "--- stub calls\n{}",
            std::fs::read_to_string(&self.calls).unwrap_or_default()
        );
        s
    }

    fn handover(&self, i: usize, args: &[&str]) -> Output {
        let n = &self.nodes[i];
        self.ns(i)
            .command("sh")
            .arg(deploy("keepalived/vipsec-handover"))
            .arg("-f")
            .arg(n.track_file())
            .args(args)
            .env("PATH", n.path_env())
            .output()
            .unwrap()
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn keepalived_moves_the_vip_on_failed_health_and_hands_over_after_drain() {
    let mut lab = VrrpLab::new();
    let _keep = &lab.dir;

    // be1 starts alone and takes the VIP after its master-down interval.
    lab.start_keepalived(0);
    let took = lab.wait_vip_on(0, Duration::from_secs(20));
    eprintln!("be1 became master in {took:?}");
    // be2 joins as BACKUP: its notify_backup hook (vipsec-notify) runs and drains,
    // best effort, with the VIP absent there.
    let t = now();
    lab.start_keepalived(1);
    wait_for("be2's notify_backup hook", Duration::from_secs(15), || {
        (lab.count_calls(1, "drain 192.0.2.100", t) > 0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    // Equal priorities: be2 never preempts a healthy holder. Let a few adverts and health
    // checks pass on be2, then the VIP must still be on be1 only.
    wait_for(
        "three health checks on be2",
        Duration::from_secs(15),
        || (lab.count_calls(1, "health", t) >= 3).then_some(()),
    )
    .unwrap();
    assert!(lab.has_vip(0) && !lab.has_vip(1), "{}", lab.logs());

    // `vipsec health` fails on be1: weight -30 puts be1 below be2, which takes over.
    std::fs::write(lab.nodes[0].health_fail_flag(), "").unwrap();
    let moved = lab.wait_vip_on(1, Duration::from_secs(20));
    eprintln!("health failure on be1 -> VIP on be2 in {moved:?} (fall 2, interval 1s)");
    // be1's notify_backup then asked its agent to drain (late: the address is gone).
    let t = now();
    let _ = t;
    wait_for("be1's notify_backup drain", Duration::from_secs(10), || {
        lab.calls()
            .iter()
            .any(|c| c.node == "be1" && c.args.starts_with("drain") && !c.present)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));

    // be1 healthy again: back at priority 100 = be2's, so the VIP stays on be2.
    std::fs::remove_file(lab.nodes[0].health_fail_flag()).unwrap();
    let t = now();
    wait_for(
        "three healthy checks on be1",
        Duration::from_secs(15),
        || (lab.count_calls(0, "health", t) >= 3).then_some(()),
    )
    .unwrap();
    assert!(
        lab.has_vip(1) && !lab.has_vip(0),
        "the VIP moved back by itself\n{}",
        lab.logs()
    );

    // The planned move: vipsec-handover on be2 drains first, then lowers be2's priority
    // through the track file and waits until the address has gone.
    let started = now();
    let clock = Instant::now();
    let out = lab.handover(1, &["-t", "15", VIP]);
    let handover = clock.elapsed();
    assert!(
        out.status.success(),
        "vipsec-handover failed:\n{}\n{}",
        show(&out),
        lab.logs()
    );
    assert!(lab.has_vip(0) && !lab.has_vip(1), "{}", lab.logs());
    eprintln!("vipsec-handover be2 -> be1 took {handover:?}");
    let calls = lab.calls();
    let drains: Vec<&Call> = calls
        .iter()
        .filter(|c| c.node == "be2" && c.at >= started && c.args == format!("drain {VIP}"))
        .collect();
    let first = drains
        .first()
        .unwrap_or_else(|| panic!("vipsec-handover never called drain\n{}", lab.logs()));
    assert!(
        first.present,
        "drain ran after the VIP had left be2\n{}",
        lab.logs()
    );
    // Every be2 call that saw the VIP gone came after the drain.
    let gone_before_drain = calls
        .iter()
        .any(|c| c.node == "be2" && c.at >= started && c.at < first.at && !c.present);
    assert!(!gone_before_drain, "{}", lab.logs());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("draining") && stderr.contains("has left this node"),
        "{stderr}"
    );

    // Release: the track file goes back to 0, and the VIP stays on be1 (equal priorities).
    let out = lab.handover(1, &["--release"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(read(&lab.nodes[1].track_file()).trim(), "0");
    let t = now();
    wait_for(
        "three health checks on be2",
        Duration::from_secs(15),
        || (lab.count_calls(1, "health", t) >= 3).then_some(()),
    )
    .unwrap();
    assert!(lab.has_vip(0) && !lab.has_vip(1), "{}", lab.logs());

    // Handing over from a node without the VIP fails clearly and changes nothing.
    let out = lab.handover(1, &[VIP]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("not on this node"),
        "{}",
        show(&out)
    );

    // The other trade-off: `--stop` stops keepalived on be1 (a priority-0 advert, so be2
    // takes over at once), again only after the drain.
    let pid = lab.keepalived[0].pid().unwrap();
    let started = now();
    let clock = Instant::now();
    let n = &lab.nodes[0];
    let out = lab
        .a
        .command("sh")
        .arg(deploy("keepalived/vipsec-handover"))
        .args(["--stop", "-t", "15", VIP])
        .env("PATH", n.path_env())
        .env("KEEPALIVED_STOP", format!("kill -TERM {pid}"))
        .output()
        .unwrap();
    let stopped = clock.elapsed();
    assert!(
        out.status.success(),
        "vipsec-handover --stop failed:\n{}\n{}",
        show(&out),
        lab.logs()
    );
    eprintln!("vipsec-handover --stop be1 -> be2 took {stopped:?}");
    lab.wait_vip_on(1, Duration::from_secs(10));
    let calls = lab.calls();
    let first = calls
        .iter()
        .find(|c| c.node == "be1" && c.at >= started && c.args == format!("drain {VIP}"))
        .unwrap_or_else(|| panic!("no drain on be1\n{}", lab.logs()));
    assert!(
        first.present,
        "drain ran after the VIP had left be1\n{}",
        lab.logs()
    );
    assert!(
        lab.keepalived[0]
            .wait_exit(Duration::from_secs(10))
            .is_some(),
        "keepalived on be1 did not stop"
    );
}

// ---------------------------------------------------------------------------------------
// Pacemaker

/// A single-node set-up for the resource agents: a config with the embedded store and no
/// keying, the API on a socket in a scratch directory, and Pacemaker's state directories
/// (HA_RSCTMP, the pid file) there too.
struct OcfSetup {
    dir: tempfile::TempDir,
}

impl OcfSetup {
    fn new() -> OcfSetup {
        require_program("ocf-tester").unwrap();
        require_program("xmllint").unwrap();
        // ocf-tester checks that the user nobody can run `meta-data`: run copies of the
        // agents from a directory under /tmp that nobody may enter, whatever the checkout's
        // own permissions are.
        let dir = tempfile::Builder::new()
            .prefix("vipsec-ocf-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for agent in ["vipsec", "vipsec-drain"] {
            write_executable(
                &dir.path().join(agent),
                &read(&deploy(&format!("pacemaker/{agent}"))),
            );
        }
        let s = OcfSetup { dir };
        std::fs::write(
            s.config(),
            format!(
                "node = \"pcmk1\"\n[api]\nendpoint = \"{}\"\n[store]\nbackend = \"embedded\"\n\
                 [keying]\nbackend = \"none\"\n[[hosted_vip]]\naddress = \"{VIP}\"\n",
                s.endpoint()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(s.dir.path().join("rsctmp")).unwrap();
        s
    }
    fn config(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }
    fn endpoint(&self) -> String {
        format!("unix://{}/run/agent.sock", self.dir.path().display())
    }
    fn pidfile(&self) -> PathBuf {
        self.dir.path().join("vipsec.pid")
    }

    /// Runs one action of a resource agent the way Pacemaker does: OCF_RESKEY_* variables.
    fn action(&self, agent: &str, action: &str, params: &[(&str, String)]) -> Output {
        let mut cmd = Command::new(self.dir.path().join(agent));
        cmd.arg(action)
            .env("OCF_ROOT", "/usr/lib/ocf")
            .env("OCF_RESOURCE_INSTANCE", format!("{agent}-test"))
            .env("HA_RSCTMP", self.dir.path().join("rsctmp"));
        for (k, v) in params {
            cmd.env(format!("OCF_RESKEY_{k}"), v);
        }
        cmd.output().unwrap()
    }

    fn tester(&self, agent: &str, params: &[(&str, String)]) -> Output {
        let mut cmd = Command::new(require_program("ocf-tester").unwrap());
        cmd.arg("-n")
            .arg(format!("{agent}-test"))
            .env("HA_RSCTMP", self.dir.path().join("rsctmp"));
        for (k, v) in params {
            cmd.arg("-o").arg(format!("{k}={v}"));
        }
        cmd.arg(self.dir.path().join(agent)).output().unwrap()
    }

    fn vipsec_params(&self) -> Vec<(&'static str, String)> {
        vec![
            ("config", self.config().display().to_string()),
            ("binary", BIN.to_string()),
            ("endpoint", self.endpoint()),
            ("pidfile", self.pidfile().display().to_string()),
        ]
    }

    fn agent_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pidfile())
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Stops an agent that a failed assertion left running (by the pid the RA recorded).
impl Drop for OcfSetup {
    fn drop(&mut self) {
        if let Some(pid) = self.agent_pid() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
        }
    }
}

const OCF_SUCCESS: i32 = 0;
const OCF_ERR_GENERIC: i32 = 1;
const OCF_ERR_INSTALLED: i32 = 5;
const OCF_ERR_CONFIGURED: i32 = 6;
const OCF_NOT_RUNNING: i32 = 7;

fn relaxng_valid(xml: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(require_program("xmllint").unwrap())
        .args([
            "--noout",
            "--relaxng",
            "/usr/share/resource-agents/metadata.rng",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(xml).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn ocf_agent_passes_ocf_tester_against_the_real_vipsec_binary() {
    let s = OcfSetup::new();
    let params = s.vipsec_params();
    let out = s.tester("vipsec", &params);
    assert!(
        out.status.success() && text(&out.stdout).contains("passed all tests"),
        "ocf-tester vipsec:\n{}",
        show(&out)
    );
    let meta = s.action("vipsec", "meta-data", &[]);
    let rng = relaxng_valid(&meta.stdout);
    assert!(rng.status.success(), "OCF 1.1 schema:\n{}", show(&rng));

    // The states Pacemaker acts on, one by one.
    assert_eq!(
        s.action("vipsec", "monitor", &params).status.code(),
        Some(OCF_NOT_RUNNING)
    );
    let start = Instant::now();
    let out = s.action("vipsec", "start", &params);
    assert_eq!(out.status.code(), Some(OCF_SUCCESS), "{}", show(&out));
    eprintln!("OCF start (agent answering) took {:?}", start.elapsed());
    assert_eq!(
        s.action("vipsec", "monitor", &params).status.code(),
        Some(OCF_SUCCESS)
    );
    let out = Command::new(s.dir.path().join("vipsec"))
        .arg("monitor")
        .env("OCF_ROOT", "/usr/lib/ocf")
        .env("OCF_CHECK_LEVEL", "10")
        .envs(
            params
                .iter()
                .map(|(k, v)| (format!("OCF_RESKEY_{k}"), v.clone())),
        )
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(OCF_SUCCESS),
        "monitor depth 10:\n{}",
        show(&out)
    );

    // A process that is there but whose API does not answer is an error, not "stopped".
    let pid = s.agent_pid().expect("the RA records the agent's pid");
    Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    let mut short = params.clone();
    short.push(("CRM_meta_timeout", "4000".into()));
    let out = s.action("vipsec", "monitor", &short);
    Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()
        .unwrap();
    assert_eq!(out.status.code(), Some(OCF_ERR_GENERIC), "{}", show(&out));

    // A crashed agent is "not running", so Pacemaker restarts it.
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    wait_for("the killed agent to go", Duration::from_secs(5), || {
        (s.action("vipsec", "monitor", &params).status.code() == Some(OCF_NOT_RUNNING))
            .then_some(())
    })
    .unwrap();
    let out = s.action("vipsec", "start", &params);
    assert_eq!(out.status.code(), Some(OCF_SUCCESS), "{}", show(&out));
    let out = s.action("vipsec", "stop", &params);
    assert_eq!(out.status.code(), Some(OCF_SUCCESS), "{}", show(&out));
    assert_eq!(
        s.action("vipsec", "monitor", &params).status.code(),
        Some(OCF_NOT_RUNNING)
    );

    // validate-all: a broken config is OCF_ERR_CONFIGURED with the config checker's reason,
    // a missing binary OCF_ERR_INSTALLED.
    let bad = s.dir.path().join("bad.toml");
    std::fs::write(&bad, "node = \"\"\n").unwrap();
    let mut p = params.clone();
    p[0].1 = bad.display().to_string();
    let out = s.action("vipsec", "validate-all", &p);
    assert_eq!(
        out.status.code(),
        Some(OCF_ERR_CONFIGURED),
        "{}",
        show(&out)
    );
    assert!(text(&out.stderr).contains("node"), "{}", show(&out));
    let mut p = params.clone();
    p[1].1 = "/nonexistent/vipsec".into();
    assert_eq!(
        s.action("vipsec", "validate-all", &p).status.code(),
        Some(OCF_ERR_INSTALLED)
    );
}

#[test]
fn ocf_drain_agent_drains_the_vip_on_stop_and_never_fails_a_stop() {
    let s = OcfSetup::new();
    let drain_params = vec![
        ("vip", VIP.to_string()),
        ("binary", BIN.to_string()),
        ("endpoint", s.endpoint()),
    ];
    // Without a running agent: every action behaves, stop included (best effort).
    let out = s.tester("vipsec-drain", &drain_params);
    assert!(
        out.status.success() && text(&out.stdout).contains("passed all tests"),
        "ocf-tester vipsec-drain:\n{}",
        show(&out)
    );
    let meta = s.action("vipsec-drain", "meta-data", &[]);
    let rng = relaxng_valid(&meta.stdout);
    assert!(rng.status.success(), "OCF 1.1 schema:\n{}", show(&rng));
    assert_eq!(
        s.action("vipsec-drain", "validate-all", &[]).status.code(),
        Some(OCF_ERR_CONFIGURED),
        "vip is required"
    );

    // With the agent running (started by the vipsec RA): stop drains the VIP in the agent.
    let agent_params = s.vipsec_params();
    let out = s.action("vipsec", "start", &agent_params);
    assert_eq!(out.status.code(), Some(OCF_SUCCESS), "{}", show(&out));
    let out = s.action("vipsec-drain", "start", &drain_params);
    assert_eq!(out.status.code(), Some(OCF_SUCCESS), "{}", show(&out));
    assert_eq!(
        s.action("vipsec-drain", "monitor", &drain_params)
            .status
            .code(),
        Some(OCF_SUCCESS)
    );
    let out = s.action("vipsec-drain", "stop", &drain_params);
    assert_eq!(out.status.code(), Some(OCF_SUCCESS), "{}", show(&out));
    assert!(
        text(&out.stderr).contains(&format!("drained {VIP}")),
        "stop did not drain through the agent:\n{}",
        show(&out)
    );
    assert_eq!(
        s.action("vipsec-drain", "monitor", &drain_params)
            .status
            .code(),
        Some(OCF_NOT_RUNNING)
    );
    let out = s.action("vipsec", "stop", &agent_params);
    assert_eq!(out.status.code(), Some(OCF_SUCCESS), "{}", show(&out));
}

// ---------------------------------------------------------------------------------------
// Kubernetes

/// Loads YAML strictly (a duplicate key is an error, PyYAML alone keeps the last one) and
/// prints every document of every file as one JSON array.
const STRICT_YAML_TO_JSON: &str = r#"
import json, sys, yaml

class Strict(yaml.SafeLoader):
    pass

def mapping(loader, node):
    loader.flatten_mapping(node)
    seen = set()
    for k, _ in node.value:
        key = loader.construct_object(k, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "duplicate key %r" % (key,), k.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)

Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
docs = []
for path in sys.argv[1:]:
    with open(path) as f:
        for d in yaml.load_all(f, Loader=Strict):
            if d is not None:
                d["__file"] = path
                docs.append(d)
json.dump(docs, sys.stdout)
"#;

fn load_yaml(files: &[PathBuf]) -> Result<Vec<serde_json::Value>, String> {
    // Debian's python3 with python3-yaml, not whatever python3 comes first on PATH.
    let python = require_program("python3").unwrap();
    let out = Command::new(python)
        .arg("-c")
        .arg(STRICT_YAML_TO_JSON)
        .args(files)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(text(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

fn kubernetes_files() -> Vec<PathBuf> {
    ["namespace.yaml", "configmap.yaml", "daemonset.yaml"]
        .iter()
        .map(|f| deploy(&format!("kubernetes/{f}")))
        .collect()
}

fn str_list(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default()
}

#[test]
fn kubernetes_manifests_parse_strictly_and_hold_what_the_agent_needs() {
    // The strict loader does refuse a duplicate key.
    let dir = scratch_dir();
    let dup = dir.path().join("dup.yaml");
    std::fs::write(&dup, "a: 1\nb: 2\na: 3\n").unwrap();
    let err = load_yaml(&[dup]).unwrap_err();
    assert!(err.contains("duplicate key"), "{err}");

    let docs = load_yaml(&kubernetes_files()).unwrap_or_else(|e| panic!("{e}"));
    let find = |kind: &str| -> &serde_json::Value {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
    };
    for d in &docs {
        let what = format!("{} in {}", d["kind"], d["__file"]);
        assert!(d["apiVersion"].is_string(), "{what}: apiVersion");
        assert!(d["kind"].is_string(), "{what}: kind");
        assert!(d["metadata"]["name"].is_string(), "{what}: metadata.name");
        if d["kind"] != "Namespace" {
            assert_eq!(d["metadata"]["namespace"], "vipsec", "{what}: namespace");
        }
    }
    assert_eq!(find("Namespace")["apiVersion"], "v1");
    let sa = find("ServiceAccount");
    assert_eq!(sa["automountServiceAccountToken"], false);

    let ds = find("DaemonSet");
    assert_eq!(ds["apiVersion"], "apps/v1");
    let spec = &ds["spec"];
    let pod = &spec["template"]["spec"];
    // The selector must select the pod template's labels (the API server refuses it else).
    for (k, v) in spec["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &spec["template"]["metadata"]["labels"][k], v,
            "selector {k}"
        );
    }
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["key"] == "node-role.kubernetes.io/control-plane"),
        "control-plane toleration"
    );
    let volumes: Vec<&str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let container = &pod["containers"][0];
    assert_eq!(container["name"], "vipsec");
    assert_eq!(
        str_list(&container["command"]),
        [
            "/usr/local/bin/vipsec",
            "agent",
            "--config",
            "/etc/vipsec/agent.toml"
        ]
    );
    let sc = &container["securityContext"];
    assert_eq!(
        str_list(&sc["capabilities"]["add"]),
        ["NET_ADMIN"],
        "only NET_ADMIN"
    );
    assert_eq!(str_list(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    let readiness = str_list(&container["readinessProbe"]["exec"]["command"]);
    assert_eq!(readiness, ["/usr/local/bin/vipsec", "health", "-q"]);
    assert!(container["livenessProbe"]["exec"]["command"].is_array());
    for r in ["requests", "limits"] {
        for k in ["cpu", "memory"] {
            assert!(
                container["resources"][r][k].is_string(),
                "resources.{r}.{k}"
            );
        }
    }
    let mut mounts = std::collections::BTreeMap::new();
    for c in pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["initContainers"].as_array().unwrap())
    {
        for m in c["volumeMounts"].as_array().unwrap() {
            let name = m["name"].as_str().unwrap();
            assert!(volumes.contains(&name), "mount {name} has no volume");
            if c["name"] == "vipsec" {
                mounts.insert(m["mountPath"].as_str().unwrap().to_string(), name);
            }
        }
    }
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
            .clone()
    };

    // The ConfigMap's config, rendered as the init container does, is one the agent
    // accepts, and the paths it names are mounted in the container.
    let cm = find("ConfigMap");
    let template_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"].is_object())
        .expect("a configMap volume");
    assert_eq!(template_volume["configMap"]["name"], cm["metadata"]["name"]);
    let template = cm["data"]["agent.toml.in"].as_str().unwrap();
    assert!(template.contains("@NODE_NAME@"));
    let init = pod["initContainers"][0]["command"].to_string();
    assert!(
        init.contains("@NODE_NAME@") && init.contains("config check"),
        "{init}"
    );
    let rendered = template.replace("@NODE_NAME@", "worker-1");
    let config = vipsec::config::Config::parse(&rendered)
        .unwrap_or_else(|p| panic!("ConfigMap agent.toml.in: {p:?}"));
    assert_eq!(config.node, "worker-1");
    let vici_dir = config
        .keying
        .vici_socket
        .parent()
        .unwrap()
        .display()
        .to_string();
    let vici_volume = mounts
        .get(&vici_dir)
        .expect("the VICI socket's directory is mounted");
    assert_eq!(volume(vici_volume)["hostPath"]["path"], vici_dir.as_str());
    let api = config.api.endpoint.strip_prefix("unix://").unwrap();
    let api_dir = Path::new(api).parent().unwrap().display().to_string();
    let api_volume = mounts
        .get(&api_dir)
        .expect("the API socket's directory is mounted");
    assert!(volume(api_volume)["emptyDir"].is_object());
    assert!(mounts.contains_key("/etc/vipsec"));
}

/// `kubernetes-validate` (PyPI, with the API schemas bundled, so it runs offline), from
/// PATH or the tools virtualenv that tools/install-deps creates.
fn kubernetes_validate() -> PathBuf {
    let venv = Path::new("/opt/vipsec-tools/bin/kubernetes-validate");
    if venv.exists() {
        return venv.to_path_buf();
    }
    require_program("kubernetes-validate").unwrap_or_else(|_| {
        panic!(
            "kubernetes-validate is not installed: python3 -m venv /opt/vipsec-tools && \
             /opt/vipsec-tools/bin/pip install kubernetes-validate==1.37.0"
        )
    })
}

#[test]
fn kubernetes_manifests_pass_the_api_schema_strictly() {
    let validate = kubernetes_validate();
    // The oldest and a recent Kubernetes release still supported by distributions;
    // --strict refuses fields the schema does not know (a misspelt key is not ignored).
    for version in ["1.28.0", "1.34.0"] {
        let out = Command::new(&validate)
            .args(["--strict", "-k", version])
            .args(kubernetes_files())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "Kubernetes {version} schema:\n{}",
            show(&out)
        );
    }
    // And it does refuse one.
    let dir = scratch_dir();
    let bad = dir.path().join("daemonset.yaml");
    std::fs::write(
        &bad,
        read(&deploy("kubernetes/daemonset.yaml")).replace(
            "hostNetwork: true",
            "hostNetwork: true\n      hostNetwrok: true",
        ),
    )
    .unwrap();
    let out = Command::new(&validate)
        .args(["--strict", "-k", "1.34.0"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        !out.status.success() && text(&out.stdout).contains("hostNetwrok"),
        "{}",
        show(&out)
    );
}
