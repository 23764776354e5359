//! A Pacemaker cluster on the back-ends: corosync 3 (knet) and pacemaker from Debian's
//! packages, one node per network namespace. Each node also gets its own mount and UTS
//! namespace (a "holder" process keeps them): private /run, /dev/shm, /var/lib/pacemaker,
//! /var/lib/corosync, /var/log/pacemaker, /etc/corosync and /etc/vipsec, and overlays on
//! /usr/lib/ocf/resource.d, /usr/sbin and /usr/local/bin so the operator's install commands
//! (`install -D -m 0755 ... /usr/lib/ocf/resource.d/vipsec/vipsec`) run unchanged without
//! touching the host. corosync and pacemakerd run with `nsenter` into those namespaces,
//! and so does every `crm`/`crm_resource` the lab runs; libqb's IPC sockets are abstract
//! (scoped by the network namespace) and its rings live in the private /dev/shm, so two
//! nodes never see each other's daemons.
//!
//! Fencing is real: `fence_vipsec_lab` (next to this file) powers a node off the way the
//! lab crashes one (freeze, link down, kill), and `stonith-enabled` stays true.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::{ProcessGuard, wait_for};

/// The VIP's group in `deploy/pacemaker/constraints.example` (what moves, drills and
/// `crm_resource --clear` name).
pub const VIP_GROUP: &str = "vip-100-group";
/// The agent's clone there.
pub const AGENT_CLONE: &str = "vipsec-clone";
/// Where the operator's configuration puts the agent's API socket, inside a node.
pub const NODE_ENDPOINT: &str = "unix:///run/vipsec/agent.sock";

const FENCE_AGENT: &str = include_str!("fence_vipsec_lab");

/// The programs a Pacemaker lab needs (Debian: pacemaker, corosync, crmsh).
pub const PROGRAMS: &[&str] = &["corosync", "pacemakerd", "crm", "crm_resource", "nsenter"];

/// Run inside `ip netns exec NS unshare --mount --uts --propagation private sh -c ...`:
/// builds the node's private filesystem view and stays as the holder of its namespaces.
/// $1 = node name, $2 = its directory in the lab's run directory.
const HOLDER: &str = r#"set -eu
NAME=$1; D=$2
for d in var-lib-pacemaker var-lib-corosync log-pacemaker log-corosync etc-corosync \
         etc-vipsec run-vipsec resource-agents netns ocf-upper ocf-work sbin-upper sbin-work \
         bin-upper bin-work; do mkdir -p "$D/$d"; done
# A fresh node gets the package's state directories (owners hacluster:haclient); a node
# coming back after a crash keeps its own, as a disk would.
[ -e "$D/var-lib-pacemaker/cib" ] || cp -a /var/lib/pacemaker/. "$D/var-lib-pacemaker/"
[ -e "$D/log-pacemaker/bundles" ] || cp -a /var/log/pacemaker/. "$D/log-pacemaker/"
# The fence agent powers other nodes off through their namespaces: keep /run/netns.
mount --rbind /run/netns "$D/netns"
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/netns /run/vipsec /run/resource-agents
mount --rbind "$D/netns" /run/netns
mount --bind "$D/run-vipsec" /run/vipsec
mount --bind "$D/resource-agents" /run/resource-agents
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount --bind "$D/var-lib-pacemaker" /var/lib/pacemaker
mount --bind "$D/var-lib-corosync" /var/lib/corosync
mount --bind "$D/log-pacemaker" /var/log/pacemaker
mkdir -p /var/log/corosync
mount --bind "$D/log-corosync" /var/log/corosync
mount --bind "$D/etc-corosync" /etc/corosync
mkdir -p /etc/vipsec
mount --bind "$D/etc-vipsec" /etc/vipsec
mount -t overlay overlay -o "lowerdir=/usr/lib/ocf/resource.d,upperdir=$D/ocf-upper,workdir=$D/ocf-work" /usr/lib/ocf/resource.d
mount -t overlay overlay -o "lowerdir=/usr/sbin,upperdir=$D/sbin-upper,workdir=$D/sbin-work" /usr/sbin
mount -t overlay overlay -o "lowerdir=/usr/local/bin,upperdir=$D/bin-upper,workdir=$D/bin-work" /usr/local/bin
hostname "$NAME"
echo $$ > "$D/holder.pid.new"
mv "$D/holder.pid.new" "$D/holder.pid"
exec sleep infinity
"#;

/// corosync.conf for the back-ends: knet, encrypted and authenticated, two_node quorum
/// (one node keeps quorum when the other dies; `wait_for_all` at start-up).
pub fn corosync_conf(nodes: &[(&str, IpAddr)]) -> String {
    let mut s = String::new();
    s += "totem {\n  version: 2\n  cluster_name: vipsec-lab\n  transport: knet\n";
    s += "  crypto_cipher: aes256\n  crypto_hash: sha256\n";
    // corosync 3's default token; written out because the takeover time follows it.
    s += "  token: 1000\n}\n";
    s += "nodelist {\n";
    for (i, (name, addr)) in nodes.iter().enumerate() {
        let _ = writeln!(
            s,
            "  node {{\n    ring0_addr: {addr}\n    name: {name}\n    nodeid: {}\n  }}",
            i + 1
        );
    }
    s += "}\n";
    s += "quorum {\n  provider: corosync_votequorum\n  two_node: 1\n}\n";
    s += "logging {\n  to_logfile: yes\n  logfile: /var/log/corosync/corosync.log\n";
    s += "  to_stderr: no\n  to_syslog: no\n  timestamp: on\n}\n";
    s
}

/// The cluster-wide settings the lab adds to the operator's constraints: fencing through
/// the lab's fence agent, and stickiness so a node that comes back does not pull the VIP
/// back (every fault in a series moves it away from whoever holds it, as in the
/// keepalived set-ups with `nopreempt`).
pub fn cluster_settings(host_map: &[(String, String)]) -> String {
    let hosts: Vec<&str> = host_map.iter().map(|(n, _)| n.as_str()).collect();
    let map: Vec<String> = host_map.iter().map(|(n, ns)| format!("{n}:{ns}")).collect();
    let (hosts, host_map) = (hosts.join(" "), map.join(";"));
    format!(
        "property cib-bootstrap-options: stonith-enabled=true stonith-timeout=30s\n\
         rsc_defaults rsc-options: resource-stickiness=100\n\
         primitive fence-lab stonith:fence_vipsec_lab \\\n    \
         params pcmk_host_map=\"{host_map}\" pcmk_host_check=static-list \
         pcmk_host_list=\"{hosts}\" \\\n    \
         op monitor interval=60s timeout=20s\n"
    )
}

/// One Pacemaker node: the holder of its namespaces, corosync and pacemakerd.
pub struct PacemakerNode {
    pub name: String,
    pub dir: PathBuf,
    holder_pid: u32,
    /// The holder's mount namespace (`mnt:[N]`): everything Pacemaker starts on the node
    /// shares it, which is how the lab finds those processes to stop them.
    mount_ns: String,
    // Drop order: the daemons before the holder.
    pacemakerd: Option<ProcessGuard>,
    corosync: Option<ProcessGuard>,
    _holder: ProcessGuard,
}

impl PacemakerNode {
    /// Starts the node: private filesystem view, corosync, pacemakerd. `agent_toml` goes
    /// to the node's /etc/vipsec/agent.toml; the resource agents and the `vipsec` binary
    /// are installed the way deploy/README.md says.
    pub fn start(
        ns: &Netns,
        dir: &Path,
        name: &str,
        corosync_conf: &str,
        authkey: &[u8],
        vipsec_bin: &Path,
    ) -> anyhow::Result<PacemakerNode> {
        for p in PROGRAMS {
            vipsec_testbed::require_program(p)?;
        }
        std::fs::create_dir_all(dir.join("etc-corosync"))?;
        std::fs::write(dir.join("etc-corosync/corosync.conf"), corosync_conf)?;
        {
            use std::os::unix::fs::PermissionsExt;
            let key = dir.join("etc-corosync/authkey");
            std::fs::write(&key, authkey)?;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400))?;
        }
        let _ = std::fs::remove_file(dir.join("holder.pid"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("holder.log"))?;
        let mut holder = ProcessGuard::spawn(
            &format!("{name} namespace holder"),
            ns.command("unshare")
                .args(["--mount", "--uts", "--propagation", "private"])
                .args(["sh", "-c", HOLDER, "holder", name])
                .arg(dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        let holder_pid: u32 = wait_for("the node's namespaces", Duration::from_secs(10), || {
            if !holder.is_running() {
                return Some(Err(()));
            }
            let pid = std::fs::read_to_string(dir.join("holder.pid")).ok()?;
            pid.trim().parse().ok().map(Ok)
        })?
        .map_err(|()| {
            anyhow::anyhow!(
                "setting up {name}'s private directories failed: {}",
                std::fs::read_to_string(dir.join("holder.log")).unwrap_or_default()
            )
        })?;
        let mount_ns = std::fs::read_link(format!("/proc/{holder_pid}/ns/mnt"))?
            .display()
            .to_string();
        let mut node = PacemakerNode {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            holder_pid,
            mount_ns,
            pacemakerd: None,
            corosync: None,
            _holder: holder,
        };
        node.install(vipsec_bin)?;
        let log = node.log_file("corosync.out")?;
        node.corosync = Some(ProcessGuard::spawn(
            "corosync",
            node.command("corosync")
                .arg("-f")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?);
        let log = node.log_file("pacemakerd.out")?;
        node.pacemakerd = Some(ProcessGuard::spawn(
            "pacemakerd",
            node.command("pacemakerd")
                .arg("-f")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?);
        Ok(node)
    }

    fn log_file(&self, name: &str) -> anyhow::Result<std::fs::File> {
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))?)
    }

    /// The operator's installation, run inside the node: the resource agents under the
    /// OCF root (the commands in constraints.example), the binary where they expect it,
    /// and the lab's fence agent where Pacemaker looks for fence agents.
    fn install(&self, vipsec_bin: &Path) -> anyhow::Result<()> {
        let pacemaker_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pacemaker");
        let fence = self.dir.join("fence_vipsec_lab");
        std::fs::write(&fence, FENCE_AGENT)?;
        let script = format!(
            "install -D -m 0755 {p}/vipsec /usr/lib/ocf/resource.d/vipsec/vipsec && \
             install -D -m 0755 {p}/vipsec-drain /usr/lib/ocf/resource.d/vipsec/vipsec-drain && \
             ln -sf {bin} /usr/local/bin/vipsec && \
             install -m 0755 {fence} /usr/sbin/fence_vipsec_lab",
            p = pacemaker_dir.display(),
            bin = vipsec_bin.display(),
            fence = fence.display()
        );
        self.sh(&script).map(|_| ())
    }

    /// A command run inside the node (its network, mount and UTS namespaces).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.holder_pid.to_string(),
            "-m",
            "-u",
            "-n",
            program,
        ]);
        c
    }

    /// Runs a shell command inside the node; its stdout, or an error with its stderr.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        let out = self.command("sh").args(["-c", script]).output()?;
        anyhow::ensure!(
            out.status.success(),
            "on {}: {script}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The node's view of a path (e.g. `/run/vipsec-vipsec.pid`) from the host.
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.holder_pid))
    }

    /// The agent's API socket as the host sees it.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("run-vipsec/agent.sock")
    }

    /// The agent's config as the host sees it (the node's /etc/vipsec/agent.toml).
    pub fn agent_config(&self) -> PathBuf {
        self.dir.join("etc-vipsec/agent.toml")
    }

    /// The pid of the agent Pacemaker started here (from the resource agent's pid file).
    pub fn agent_pid(&self) -> Option<i32> {
        let run = self.path("/run");
        std::fs::read_dir(run)
            .ok()?
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("vipsec-") && n.ends_with(".pid")
            })
            .find_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
    }

    /// What the agent logged (the resource agent's log file when no journal runs).
    pub fn agent_log(&self) -> String {
        let mut s = String::new();
        if let Ok(dir) = std::fs::read_dir(self.dir.join("resource-agents")) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().ends_with(".log") {
                    s += &std::fs::read_to_string(e.path()).unwrap_or_default();
                }
            }
        }
        s
    }

    /// Stops the node as `systemctl stop pacemaker corosync` would: pacemakerd stops its
    /// resources (the VIP leaves, the agent stops) and exits, then corosync.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.pacemakerd.take()
            && p.signal(libc::SIGTERM).is_ok()
        {
            let _ = p.wait_exit(Duration::from_secs(60));
        }
        if let Some(mut c) = self.corosync.take()
            && c.signal(libc::SIGTERM).is_ok()
        {
            let _ = c.wait_exit(Duration::from_secs(10));
        }
        self.kill_all();
    }

    /// SIGKILLs everything that runs in the node's mount namespace (Pacemaker's daemons
    /// and whatever its resources started: the agent, IPaddr2's send_arp).
    fn kill_all(&self) {
        for _ in 0..3 {
            let pids = pids_in_mount_ns(&self.mount_ns);
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: kill(2) on processes in this lab node's own mount namespace.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PacemakerNode {
    fn drop(&mut self) {
        if let Some(mut p) = self.pacemakerd.take() {
            p.kill();
        }
        if let Some(mut c) = self.corosync.take() {
            c.kill();
        }
        self.kill_all();
    }
}

fn pids_in_mount_ns(mount_ns: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                .is_ok_and(|l| l.display().to_string() == mount_ns)
        })
        .collect()
}

/// 256 random bytes for corosync's authkey (what `corosync-keygen` writes).
pub fn authkey() -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut key = vec![0u8; 256];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    Ok(key)
}

/// The operator's constraints file, as shipped.
pub fn constraints_example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pacemaker/constraints.example")
}

/// Nodes where `crm_resource --locate` finds a resource running.
pub fn locate(node: &PacemakerNode, resource: &str) -> Vec<String> {
    let Ok(out) = node
        .command("crm_resource")
        .args(["--locate", "--resource", resource])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("is running on:").nth(1))
        .map(|n| n.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corosync_conf_names_both_nodes() {
        let c = corosync_conf(&[
            ("be1", "192.0.2.21".parse().unwrap()),
            ("be2", "192.0.2.22".parse().unwrap()),
        ]);
        assert!(c.contains("ring0_addr: 192.0.2.21\n    name: be1\n    nodeid: 1"));
        assert!(c.contains("ring0_addr: 192.0.2.22\n    name: be2\n    nodeid: 2"));
        assert!(c.contains("two_node: 1") && c.contains("transport: knet"));
    }

    #[test]
    fn fencing_maps_every_node_to_its_namespace() {
        let s = cluster_settings(&[
            ("be1".into(), "vt-be1-1".into()),
            ("be2".into(), "vt-be2-2".into()),
        ]);
        assert!(s.contains("stonith-enabled=true"), "{s}");
        assert!(
            s.contains("pcmk_host_map=\"be1:vt-be1-1;be2:vt-be2-2\""),
            "{s}"
        );
        assert!(s.contains("pcmk_host_list=\"be1 be2\""), "{s}");
    }

    #[test]
    fn the_operator_file_names_the_lab_resources() {
        let text = std::fs::read_to_string(constraints_example()).unwrap();
        assert!(text.contains(&format!("group {VIP_GROUP} ")), "{text}");
        assert!(text.contains(&format!("clone {AGENT_CLONE} ")), "{text}");
        assert!(
            text.contains(&format!("endpoint={NODE_ENDPOINT}")),
            "{text}"
        );
    }
}
