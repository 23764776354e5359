//! deploy/systemd's units under a real systemd: a Debian 12 guest (QEMU, systemd as PID 1,
//! testbed::systemd_vm) with the agent installed by hand the way deploy/README.md says for a
//! source tree (binary in /usr/local/bin, deploy/'s files as they are), Debian's
//! charon-systemd (strongswan.service) and keepalived with deploy/keepalived's example
//! config. Everything is asserted from the guest's own systemctl, journalctl and ip output:
//!
//! - boot: vipsec-guard.service has put the guard in and finished before strongswan.service
//!   and the network (systemd-networkd) start; the agent's unit is up and the agent answers;
//! - a planned move with `vipsec drill` (keepalived integration): the agent, inside its
//!   unit's sandbox, runs deploy/keepalived/vipsec-handover, which drains and writes
//!   keepalived's track file under /run; a second keepalived in a network namespace (on the
//!   same emulated link) takes the VIP over;
//! - SIGKILL (`systemctl kill -s KILL`): systemd starts a new agent, which answers again;
//! - `systemctl stop`: the agent exits 0 on SIGTERM, no SIGKILL needed, the guard stays.
//!
//! Needs root, debootstrap (tools/debian-root builds and caches the guest's root) and the VM
//! tier's packages with e2fsprogs; it fails naming what is missing.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use vipsec_testbed::systemd_vm::{GuestSpec, INSTALL_HINT, SystemdVm};

/// The guest root's packages (tools/debian-root's argument): systemd with udev (device
/// units, interface names), ip, charon with its systemd unit, keepalived.
const ROOT_PACKAGES: &str = "systemd,udev,iproute2,kmod,charon-systemd,keepalived";
const VIP: &str = "192.0.2.100";

/// deploy/examples/single-node.toml (embedded store, no keying daemon) with what a
/// back-end beside keepalived adds: the standing guard for the VIP's IMAP answers on eth0,
/// and drills through keepalived's handover script.
const AGENT_CONFIG: &str = r#"node = "be1"

[api]
endpoint = "unix:///run/vipsec/agent.sock"

[store]
backend = "embedded"

[keying]
backend = "none"

[kernel]
backend = "xfrm"
interface = "eth0"
libipsec = true

[failover]
mode = "normal"

[drill]
integration = "keepalived"
handover = ["/usr/local/sbin/vipsec-handover", "{vip}"]

[[hosted_vip]]
address = "192.0.2.100"
interface = "eth0"
protect = ["tcp/143"]
"#;

/// The peer back-end's keepalived, in network namespace be2 on eth1 (the same emulated
/// link as the node's eth0). Priority 50: below the node's 100 (and its 70 when the health
/// check fails), above its 40 once the handover's track file says 1.
const PEER_KEEPALIVED: &str = r#"global_defs {
    router_id be2
}
vrrp_instance VIP_100 {
    state BACKUP
    interface eth1
    virtual_router_id 100
    priority 50
    advert_int 1
    virtual_ipaddress {
        192.0.2.100/32 dev eth1
    }
}
"#;

const NETWORK: &str = "[Match]\nName=eth0\n\n[Network]\nAddress=192.0.2.2/24\n";

/// Run in the guest once the boot is done. Each `run NAME CMD...` prints its output
/// between `::: begin NAME` and `::: end NAME rc=N`; the host side asserts on them.
const GUEST_SCRIPT: &str = r#"
set -u
export SYSTEMD_LOG_COLOR=0 SYSTEMD_PAGER= SYSTEMD_COLORS=0
run() { name=$1; shift; echo "::: begin $name"; "$@" 2>&1; echo "::: end $name rc=$?"; }
mark() { echo "::: mark $* at $(cut -d' ' -f1 /proc/uptime) s"; }
# Polls a command every 0.1 s for up to $1 seconds (of the guest's clock); on giving up,
# shows what the guest's units said.
wait_until() {
  end=$(($(cut -d. -f1 /proc/uptime) + $1)); shift
  while ! "$@" >/dev/null 2>&1; do
    if [ "$(cut -d. -f1 /proc/uptime)" -ge $end ]; then
      echo "gave up waiting for: $*"
      run diagnostics sh -c 'ip addr; journalctl -b --no-pager -o short-monotonic -u keepalived.service -u vipsec.service | tail -n 60'
      return 1
    fi
    sleep 0.1
  done
}
vip_on() { [ -n "$(ip "$@" -o addr show to __VIP__)" ]; }
owner_is_be1() { vipsec status --json | grep -Eq '"node": ?"be1"'; }
cursor() { journalctl -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p'; }

mark boot
run boot timeout 90 systemctl is-system-running --wait
run failed systemctl --failed --no-legend --plain
run guard_unit systemctl show -p ActiveState,Result,ExecMainStatus,ActiveEnterTimestampMonotonic vipsec-guard.service
run charon_unit systemctl show -p ActiveState,InactiveExitTimestampMonotonic strongswan.service
run networkd_unit systemctl show -p ActiveState,InactiveExitTimestampMonotonic systemd-networkd.service
run charon_after systemctl list-dependencies --after --plain --no-pager strongswan.service
run boot_journal journalctl -b -o short-monotonic --no-pager -u vipsec-guard.service -u strongswan.service -u systemd-networkd.service -u vipsec.service
run guard_boot vipsec guard show --config /etc/vipsec/agent.toml

# The agent, started at boot by its unit, and started again by hand: with Type=notify the
# start job ends only when the agent answers, so no wait comes between these.
mark agent
run agent_unit systemctl show -p Type,NotifyAccess,ActiveState,SubState,MainPID,NRestarts vipsec.service
run health vipsec health
run restart systemctl restart vipsec.service
run health_after_restart vipsec health

# A planned move through keepalived: the node holds the VIP (its keepalived is alone on
# the link until be2 starts), then be2's keepalived joins as a backup.
mark handover
wait_until 30 vip_on
ip netns add be2
ip link set eth1 netns be2
ip -n be2 link set lo up
ip -n be2 addr add 192.0.2.3/24 dev eth1
ip -n be2 link set eth1 up
ip netns exec be2 keepalived -n -l -D -f /etc/keepalived/be2.conf \
  -p /run/keepalived-be2.pid -r /run/keepalived-be2-vrrp.pid >/run/keepalived-be2.log 2>&1 &
wait_until 30 grep -q "Entering BACKUP STATE" /run/keepalived-be2.log
wait_until 30 owner_is_be1
run status_before_drill vipsec status
# What the agent's sandbox makes of /run, seen from inside its mount namespace.
pid=$(systemctl show -P MainPID vipsec.service)
run sandbox_mounts sh -c "grep -E ' /run(/vipsec|/keepalived-vipsec-handover)? ' /proc/$pid/mountinfo"
run sandbox_write nsenter -t "$pid" -m sh -c 'if echo probe >/run/vipsec-sandbox-probe; then rm /run/vipsec-sandbox-probe; echo writable; else echo read-only; fi'
c=$(cursor)
run drill vipsec drill __VIP__ --to be2 --timeout 15s
run vip_be1 ip -o addr show to __VIP__
run vip_be2 ip -n be2 -o addr show to __VIP__
run track_file cat /run/keepalived-vipsec-handover
run drill_journal journalctl --after-cursor "$c" --no-pager -o short-monotonic -u vipsec.service -u keepalived.service
run peer_log cat /run/keepalived-be2.log

# SIGKILL: systemd starts the agent again (Restart=on-failure, RestartSec=2s); active
# means ready (Type=notify).
mark kill
old=$(systemctl show -P MainPID vipsec.service)
echo "::: begin old_pid"; echo "$old"; echo "::: end old_pid rc=0"
run kill systemctl kill -s KILL vipsec.service
wait_until 30 sh -c "p=\$(systemctl show -P MainPID vipsec.service); [ \"\$p\" != 0 ] && [ \"\$p\" != $old ] && systemctl is-active -q vipsec.service"
run after_kill systemctl show -p ActiveState,SubState,MainPID,NRestarts vipsec.service
run health_after_kill vipsec health
run kill_journal journalctl -b --no-pager -o short-monotonic -u vipsec.service -g "code=killed|Scheduled restart|Started"

# A clean stop.
mark stop
c=$(cursor)
run stop systemctl stop vipsec.service
run after_stop systemctl show -p ActiveState,Result,ExecMainCode,ExecMainStatus vipsec.service
run stop_journal journalctl --after-cursor "$c" --no-pager -o short-monotonic -u vipsec.service
run guard_after_stop vipsec guard show --config /etc/vipsec/agent.toml
mark done
"#;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", show(&out));
    out
}

/// Everything the test needs, or a panic that names what is missing.
fn require_tools() -> SystemdVm {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (debootstrap, chroot, the guest's image)".to_string());
    }
    for program in ["debootstrap", "chroot", "du"] {
        if vipsec_testbed::require_program(program).is_err() {
            missing.push(program.to_string());
        }
    }
    let vm = SystemdVm::locate().map_err(|e| missing.push(format!("{e} ({INSTALL_HINT})")));
    assert!(
        missing.is_empty(),
        "the systemd unit test needs {} (run tools/install-deps as root)",
        missing.join(", ")
    );
    vm.unwrap()
}

/// Copies `from` into the guest's root at `to` with `mode`.
fn install(root: &Path, from: &Path, to: &str, mode: u32) {
    let dest = root.join(to.trim_start_matches('/'));
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::copy(from, &dest).unwrap_or_else(|e| panic!("{} -> {}: {e}", from.display(), to));
    fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).unwrap();
}

fn write(root: &Path, to: &str, body: &str, mode: u32) {
    let dest = root.join(to.trim_start_matches('/'));
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::write(&dest, body).unwrap();
    fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).unwrap();
}

fn chroot(root: &Path, script: &str) -> Output {
    run(Command::new("chroot")
        .arg(root)
        .args(["/bin/sh", "-c", script])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C.UTF-8"))
}

/// The guest's root: a copy of the cached Debian root with vipsec installed by hand as
/// deploy/README.md says for a source tree, its units enabled as an operator enables them.
/// Units that only slow the emulated boot down and have nothing to do with vipsec (logins,
/// file system scrubs, apt timers) are masked.
fn guest_root() -> tempfile::TempDir {
    let out = run(Command::new(repo().join("tools/debian-root")).arg(ROOT_PACKAGES));
    let cached = text(&out.stdout).trim().to_string();
    assert!(
        Path::new(&cached).join("lib/systemd/systemd").exists(),
        "{cached}"
    );
    let dir = tempfile::Builder::new()
        .prefix("vipsec-systemd-root-")
        .tempdir_in("/var/tmp")
        .unwrap();
    run(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(format!("{cached}/."))
        .arg(dir.path()));
    let root = dir.path();
    let deploy = repo().join("deploy");
    install(
        root,
        Path::new(env!("CARGO_BIN_EXE_vipsec")),
        "/usr/local/bin/vipsec",
        0o755,
    );
    for unit in ["vipsec.service", "vipsec-guard.service"] {
        install(
            root,
            &deploy.join("systemd").join(unit),
            &format!("/etc/systemd/system/{unit}"),
            0o644,
        );
    }
    for script in ["vipsec-handover", "vipsec-notify"] {
        install(
            root,
            &deploy.join("keepalived").join(script),
            &format!("/usr/local/sbin/{script}"),
            0o755,
        );
    }
    install(
        root,
        &deploy.join("keepalived/keepalived.conf.example"),
        "/etc/keepalived/keepalived.conf",
        0o644,
    );
    write(root, "/etc/keepalived/be2.conf", PEER_KEEPALIVED, 0o644);
    write(root, "/etc/vipsec/agent.toml", AGENT_CONFIG, 0o600);
    fs::set_permissions(root.join("etc/vipsec"), fs::Permissions::from_mode(0o750)).unwrap();
    write(root, "/etc/systemd/network/10-eth0.network", NETWORK, 0o644);
    chroot(
        root,
        "vipsec config check /etc/vipsec/agent.toml && \
         systemctl enable vipsec-guard.service vipsec.service systemd-networkd.service && \
         systemctl mask e2scrub_reap.service getty-static.service getty@tty1.service \
           serial-getty@ttyS0.service apt-daily.timer apt-daily-upgrade.timer",
    );
    dir
}

/// The guest script's `run` sections: name -> (output, exit code).
fn sections(output: &str) -> HashMap<String, (String, i32)> {
    let mut out = HashMap::new();
    let mut current: Option<(String, String)> = None;
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("::: begin ") {
            current = Some((name.to_string(), String::new()));
        } else if let Some(rest) = line.strip_prefix("::: end ") {
            let (name, rc) = rest.split_once(" rc=").unwrap_or((rest, "-1"));
            if let Some((n, body)) = current.take() {
                assert_eq!(n, name, "guest output out of step:\n{output}");
                out.insert(n, (body, rc.parse().unwrap_or(-1)));
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// `Key=value` lines of `systemctl show`.
fn props(s: &str) -> HashMap<String, String> {
    s.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn systemd_runs_the_units_guard_before_charon_restart_on_kill_clean_stop_and_handover() {
    let vm = require_tools();
    let root = guest_root();
    let script = GUEST_SCRIPT.replace("__VIP__", VIP);
    let run = vm
        .run(&GuestSpec {
            root: root.path(),
            script: &script,
            modules: &["xfrm_user", "veth"],
            nics: 2,
            timeout: Duration::from_secs(600),
        })
        .unwrap();
    eprintln!("--- guest output ---\n{}", run.output);
    eprintln!(
        "systemd guest wall time (image, boot, script, shutdown): {:?}",
        run.wall
    );
    let all = format!(
        "--- output ---\n{}\n--- console ---\n{}",
        run.output, run.console
    );
    assert_eq!(run.exit_code, Some(0), "guest script failed\n{all}");
    let s = sections(&run.output);
    let get = |name: &str| -> &(String, i32) {
        s.get(name)
            .unwrap_or_else(|| panic!("no section {name} in the guest's output\n{all}"))
    };
    let ok = |name: &str| -> &str {
        let (body, rc) = get(name);
        assert_eq!(*rc, 0, "{name} failed in the guest:\n{body}\n{all}");
        body
    };
    let show = |name: &str| props(ok(name));
    let num = |p: &HashMap<String, String>, key: &str| -> u64 {
        p.get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number {key} in {p:?}"))
    };

    // Boot: everything started, the guard first.
    assert_eq!(ok("boot").trim(), "running", "{all}");
    assert_eq!(ok("failed").trim(), "", "units failed at boot\n{all}");
    let guard = show("guard_unit");
    assert_eq!(guard["ActiveState"], "active", "{guard:?}");
    assert_eq!(guard["Result"], "success", "{guard:?}");
    assert_eq!(guard["ExecMainStatus"], "0", "{guard:?}");
    let guard_done = num(&guard, "ActiveEnterTimestampMonotonic");
    for (section, unit) in [
        ("charon_unit", "strongswan.service"),
        ("networkd_unit", "systemd-networkd.service"),
    ] {
        let p = show(section);
        assert_eq!(p["ActiveState"], "active", "{unit}: {p:?}");
        let started = num(&p, "InactiveExitTimestampMonotonic");
        assert!(
            guard_done < started,
            "{unit} started at {started} us, before vipsec-guard.service was done ({guard_done} us)\n{all}"
        );
    }
    assert!(
        ok("charon_after")
            .lines()
            .any(|l| l.trim() == "vipsec-guard.service"),
        "strongswan.service is not ordered after vipsec-guard.service\n{all}"
    );
    let journal = ok("boot_journal");
    let line_of = |needle: &str| {
        journal
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in the boot journal\n{journal}"))
    };
    assert!(
        line_of("Finished vipsec-guard.service") < line_of("Starting strongswan.service"),
        "{journal}"
    );
    assert!(ok("guard_boot").contains("held"), "{all}");

    // Started and ready (Type=notify): the agent answers as soon as the start job is over.
    let agent = show("agent_unit");
    assert_eq!(agent["Type"], "notify", "{agent:?}");
    assert_eq!(agent["ActiveState"], "active", "{agent:?}");
    assert_eq!(ok("health").trim(), "healthy", "{all}");
    ok("restart");
    assert_eq!(
        ok("health_after_restart").trim(),
        "healthy",
        "the agent did not answer straight after `systemctl restart` returned\n{all}"
    );

    // The handover script, run by the agent inside its unit's sandbox, drained the VIP,
    // wrote keepalived's track file, and be2 took the VIP over.
    // The sandbox as the agent sees it: /run read-only, the API's directory and the track
    // file writable.
    let mounts = ok("sandbox_mounts");
    let mount_opts = |point: &str| -> String {
        mounts
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(point))
            .and_then(|l| l.split_whitespace().nth(5))
            .unwrap_or_else(|| panic!("{point} is not a mount in the agent's namespace:\n{mounts}"))
            .to_string()
    };
    assert!(mount_opts("/run").starts_with("ro"), "{mounts}");
    assert!(mount_opts("/run/vipsec").starts_with("rw"), "{mounts}");
    assert!(
        mount_opts("/run/keepalived-vipsec-handover").starts_with("rw"),
        "{mounts}"
    );
    let write = ok("sandbox_write");
    assert!(
        write.trim().ends_with("read-only") && write.contains("Read-only file system"),
        "a write elsewhere in /run from the agent's namespace: {write}"
    );
    let drill = ok("drill");
    assert!(
        !drill.contains("failed") && !drill.contains("Read-only file system"),
        "the drill's handover failed inside the unit's sandbox\n{all}"
    );
    let drill_journal = ok("drill_journal");
    for needle in [
        "drill finished",
        "event=\"drained\"",
        "(VIP_100) Entering BACKUP STATE",
    ] {
        assert!(drill_journal.contains(needle), "no {needle:?}\n{all}");
    }
    assert_eq!(ok("track_file").trim(), "1", "{all}");
    assert_eq!(
        get("vip_be1").0.trim(),
        "",
        "the VIP is still on be1\n{all}"
    );
    assert!(
        ok("vip_be2").contains(VIP),
        "be2 did not take the VIP\n{all}"
    );

    // SIGKILL: a new agent under a new MainPID, counted as a restart, answering.
    let old_pid = ok("old_pid").trim().to_string();
    let after = show("after_kill");
    assert_eq!(after["ActiveState"], "active", "{after:?}");
    assert_ne!(after["MainPID"], old_pid, "{after:?}");
    assert_ne!(after["MainPID"], "0", "{after:?}");
    assert_eq!(after["NRestarts"], "1", "{after:?}");
    assert!(
        ok("kill_journal").contains("status=9/KILL"),
        "{}",
        ok("kill_journal")
    );
    assert_eq!(ok("health_after_kill").trim(), "healthy", "{all}");

    // A clean stop: exit 0 on SIGTERM, nothing killed, and the guard stays.
    ok("stop");
    let stopped = show("after_stop");
    assert_eq!(stopped["ActiveState"], "inactive", "{stopped:?}");
    assert_eq!(stopped["Result"], "success", "{stopped:?}");
    assert_eq!(
        stopped["ExecMainCode"], "1",
        "exited, not killed: {stopped:?}"
    );
    assert_eq!(stopped["ExecMainStatus"], "0", "{stopped:?}");
    let stop_journal = ok("stop_journal");
    for bad in ["SIGKILL", "Killing", "timed out", "status=9"] {
        assert!(
            !stop_journal.contains(bad),
            "{bad:?} at stop:\n{stop_journal}"
        );
    }
    assert!(ok("guard_after_stop").contains("held"), "{all}");
}
