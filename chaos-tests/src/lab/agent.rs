//! The vipsec agent on a lab node: its config (the TOML format of `vipsec::config`), its
//! process (`vipsec agent --config FILE` inside the node's namespace) and its API socket.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vipsec_testbed::agent::AgentLaunch;
use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::ProcessGuard;

use super::charon::{PROTECTED_PORTS, connection_name};
use super::setup::{AgentStore, ClusterManager};
use super::topology::{NODE_IF, Role};

/// Everything the lab decides about one node's agent.
pub struct AgentPlan<'a> {
    pub node: &'a str,
    pub role: Role,
    pub dir: &'a Path,
    pub vici: &'a Path,
    pub store: AgentStore,
    /// Every etcd member's client URL.
    pub etcd_endpoints: &'a [&'a str],
    pub vips: &'a [IpAddr],
    /// `[failover.reconnect]`; the agent's defaults when None.
    pub reconnect: Option<&'a vipsec::config::ReconnectConfig>,
    /// Connections come from the cluster policy (no `connection`, no `protect`).
    pub policy_managed: bool,
    pub initiate_timeout: Duration,
    /// `store.lease_ttl` on etcd.
    pub lease_ttl: Duration,
    /// What moves the VIPs. Under Pacemaker a back-end's agent is started by the resource
    /// agent with the operator's paths (endpoint under the node's own /run) and drills
    /// move the VIP's group with `crm_resource`.
    pub cluster_manager: ClusterManager,
}

/// `store.prefix` of every lab agent on etcd.
pub const ETCD_PREFIX: &str = "/vipsec-lab/";

pub fn psk_file(dir: &Path) -> PathBuf {
    dir.join("psk")
}

pub fn api_socket(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}

pub fn config_toml(plan: &AgentPlan) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "node = \"{}\"", plan.node);
    let pacemaker_node =
        plan.role == Role::BackEnd && plan.cluster_manager == ClusterManager::Pacemaker;
    s += "\n[api]\n";
    if pacemaker_node {
        let _ = writeln!(s, "endpoint = \"{}\"", super::pacemaker::NODE_ENDPOINT);
    } else {
        let _ = writeln!(
            s,
            "endpoint = \"unix://{}\"",
            api_socket(plan.dir).display()
        );
    }
    s += "\n[log]\n";
    s += "filter = \"info,vipsec=debug\"\n";
    s += "\n[store]\n";
    match plan.store {
        AgentStore::Etcd => {
            s += "backend = \"etcd\"\n";
            let endpoints: Vec<_> = plan
                .etcd_endpoints
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect();
            let _ = writeln!(s, "endpoints = [{}]", endpoints.join(", "));
            let _ = writeln!(s, "prefix = \"{ETCD_PREFIX}\"");
            // The lab's etcd is plain HTTP on the lab network.
            s += "allow_insecure = true\n";
            let _ = writeln!(s, "lease_ttl = \"{}ms\"", plan.lease_ttl.as_millis());
        }
        AgentStore::Embedded => s += "backend = \"embedded\"\n",
    }
    s += "\n[keying]\n";
    s += "backend = \"strongswan\"\n";
    let _ = writeln!(s, "vici_socket = \"{}\"", plan.vici.display());
    s += "sample_interval = \"250ms\"\n";
    let _ = writeln!(
        s,
        "initiate_timeout = \"{}ms\"",
        plan.initiate_timeout.as_millis()
    );
    s += "\n[kernel]\n";
    s += "backend = \"xfrm\"\n";
    s += "fail_secure = true\n";
    // kernel-libipsec: block policies bound to the physical interface let the tunnel pass.
    let _ = writeln!(s, "interface = \"{NODE_IF}\"");
    s += "\n[failover]\n";
    s += "mode = \"fast\"\n";
    s += "idle_timeout = \"1s\"\n";
    s += "retry_initial = \"50ms\"\n";
    s += "retry_max = \"500ms\"\n";
    s += "owner_wait = \"2s\"\n";
    if let Some(r) = plan.reconnect {
        s += "\n[failover.reconnect]\n";
        let _ = writeln!(s, "rate = {:?}", r.rate);
        let _ = writeln!(s, "burst = {}", r.burst);
        let _ = writeln!(s, "concurrency = {}", r.concurrency);
        let _ = writeln!(s, "max_concurrency = {}", r.max_concurrency);
        let _ = writeln!(s, "quick = \"{}us\"", r.quick.as_micros());
        let _ = writeln!(s, "jitter = \"{}us\"", r.jitter.as_micros());
        let _ = writeln!(s, "responder_rate = {:?}", r.responder_rate);
    }
    if pacemaker_node {
        // `vipsec drill` (on any back-end) moves the VIP's group, then clears the
        // location constraint the move left.
        s += "\n[drill]\n";
        s += "integration = \"pacemaker\"\n";
        s += "target = \"1s\"\n";
        let _ = writeln!(s, "resource = \"{}\"", super::pacemaker::VIP_GROUP);
    } else if plan.role == Role::BackEnd {
        // `vipsec drill` on the owner steps it down the way an operator would: the handover
        // script drains through the agent, then stops this node's keepalived (the lab's
        // instances run `nopreempt`, so lowering the priority would not move the VIP).
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/keepalived/vipsec-handover");
        let stop = format!(
            "KEEPALIVED_STOP=kill -TERM $(cat {})",
            plan.dir.join("keepalived.pid").display()
        );
        s += "\n[drill]\n";
        s += "integration = \"keepalived\"\n";
        s += "target = \"1s\"\n";
        let _ = writeln!(
            s,
            "handover = [\"env\", \"{stop}\", \"sh\", \"{}\", \"--stop\", \"-t\", \"10\", \"{{vip}}\"]",
            script.display()
        );
    }
    if plan.policy_managed {
        s += "\n[policy]\n";
        s += "managed = true\n";
        let _ = writeln!(s, "psk_file = \"{}\"", psk_file(plan.dir).display());
        for &vip in plan.vips {
            match plan.role {
                Role::BackEnd => {
                    s += "\n[[hosted_vip]]\n";
                    let _ = writeln!(s, "address = \"{vip}\"");
                    let _ = writeln!(s, "interface = \"{NODE_IF}\"");
                }
                Role::FrontEnd => {
                    s += "\n[[peer_vip]]\n";
                    let _ = writeln!(s, "address = \"{vip}\"");
                }
                Role::Etcd => {}
            }
        }
        return s;
    }
    for &vip in plan.vips {
        match plan.role {
            Role::BackEnd => {
                s += "\n[[hosted_vip]]\n";
                let _ = writeln!(s, "address = \"{vip}\"");
                let _ = writeln!(s, "interface = \"{NODE_IF}\"");
                // The mail server's answers: never in clear text, even between SAs.
                let flows: Vec<_> = PROTECTED_PORTS
                    .iter()
                    .map(|p| format!("\"tcp/{p}\""))
                    .collect();
                let _ = writeln!(s, "protect = [{}]", flows.join(", "));
            }
            Role::FrontEnd => {
                let conn = connection_name(vip);
                s += "\n[[peer_vip]]\n";
                let _ = writeln!(s, "address = \"{vip}\"");
                let _ = writeln!(s, "connection = \"{conn}\"");
                let _ = writeln!(s, "child = \"{conn}\"");
                let flows: Vec<_> = PROTECTED_PORTS
                    .iter()
                    .map(|p| format!("\"tcp/{p}\""))
                    .collect();
                let _ = writeln!(s, "protect = [{}]", flows.join(", "));
            }
            Role::Etcd => {}
        }
    }
    s
}

/// Where the `vipsec` binary is: `$VIPSEC_BIN`, or next to this program in the same cargo
/// target directory (`target/<profile>/vipsec`; tests run from `target/<profile>/deps/`).
pub fn find_binary(self_exe: &Path) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("VIPSEC_BIN") {
        let p = PathBuf::from(p);
        anyhow::ensure!(p.exists(), "VIPSEC_BIN={} does not exist", p.display());
        return Ok(p);
    }
    let mut dir = self_exe.parent();
    while let Some(d) = dir {
        let candidate = d.join("vipsec");
        if candidate.is_file() {
            return Ok(candidate);
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent();
    }
    anyhow::bail!(
        "the vipsec binary is not built next to {}; run `cargo build -p vipsec` (same profile) or set VIPSEC_BIN",
        self_exe.display()
    )
}

pub struct Agent {
    guard: ProcessGuard,
    pub api_socket: PathBuf,
    pub config: PathBuf,
}

impl Agent {
    pub fn start(binary: &Path, ns: &Netns, plan: &AgentPlan) -> anyhow::Result<Agent> {
        std::fs::create_dir_all(plan.dir)?;
        let config = plan.dir.join("agent.toml");
        std::fs::write(&config, config_toml(plan))?;
        if plan.policy_managed {
            use std::os::unix::fs::PermissionsExt;
            let psk = psk_file(plan.dir);
            std::fs::write(&psk, super::charon::lab_psk())?;
            std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600))?;
        }
        let api_socket = api_socket(plan.dir);
        let guard = AgentLaunch {
            name: plan.node,
            binary,
            ns: Some(ns),
            config: &config,
            socket: &api_socket,
            log: &plan.dir.join("agent.log"),
            env: &[],
        }
        .spawn()?;
        Ok(Agent {
            guard,
            api_socket,
            config,
        })
    }

    /// SIGTERM, then SIGKILL if it does not exit within 5 s.
    pub fn stop(&mut self) {
        if self.guard.signal(libc::SIGTERM).is_ok()
            && self.guard.wait_exit(Duration::from_secs(5)).is_none()
        {
            self.guard.kill();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.guard.is_running()
    }

    /// The agent's own process id (`ip netns exec` execs it in place).
    pub fn pid(&self) -> Option<u32> {
        self.guard.pid()
    }

    /// SIGSTOP: the agent hangs as a paused VM or a stalled process would.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.guard.signal(libc::SIGSTOP)
    }

    /// SIGCONT after [`Agent::freeze`].
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.guard.signal(libc::SIGCONT)
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        let path = self
            .config
            .parent()
            .map(|d| d.join("agent.log"))
            .unwrap_or_default();
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// SIGKILL: the agent gets no chance to clean up (its XFRM policies stay).
    pub fn kill(&mut self) {
        self.guard.kill();
    }
}

/// Runs the `vipsec` CLI against an agent's API socket and returns its stdout.
pub fn cli(binary: &Path, api_socket: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(binary)
        .arg("--endpoint")
        .arg(format!("unix://{}", api_socket.display()))
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "vipsec {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan<'a>(role: Role, store: AgentStore, vips: &'a [IpAddr]) -> AgentPlan<'a> {
        AgentPlan {
            node: if role == Role::BackEnd { "be1" } else { "fe1" },
            role,
            dir: Path::new("/tmp/lab/fe1"),
            vici: Path::new("/tmp/lab/fe1/charon.vici"),
            store,
            etcd_endpoints: &["http://192.0.2.5:2379"],
            vips,
            policy_managed: false,
            reconnect: None,
            initiate_timeout: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(2),
            cluster_manager: ClusterManager::Keepalived,
        }
    }

    #[test]
    fn generated_configs_are_valid_agent_configs() {
        let vips = super::super::topology::vips(3);
        for role in [Role::FrontEnd, Role::BackEnd] {
            for store in [AgentStore::Etcd, AgentStore::Embedded] {
                let text = config_toml(&plan(role, store, &vips));
                let config = vipsec::config::Config::parse(&text)
                    .unwrap_or_else(|p| panic!("{p:?}\n{text}"));
                let mut p = plan(role, store, &vips);
                let reconnect = vipsec::config::ReconnectConfig {
                    rate: 1000.0,
                    burst: 100,
                    concurrency: 64,
                    max_concurrency: 64,
                    quick: Duration::from_millis(100),
                    jitter: Duration::ZERO,
                    responder_rate: 500.0,
                };
                p.reconnect = Some(&reconnect);
                let paced = config_toml(&p);
                let parsed = vipsec::config::Config::parse(&paced)
                    .unwrap_or_else(|p| panic!("{p:?}\n{paced}"));
                assert_eq!(parsed.failover.reconnect, reconnect);
                match role {
                    Role::FrontEnd => {
                        assert_eq!(config.peer_vips.len(), 3);
                        assert_eq!(config.protected_flows().len(), 9);
                    }
                    _ => assert_eq!(config.hosted_vips.len(), 3),
                }
            }
        }
    }

    #[test]
    fn policy_managed_configs_are_valid_and_name_no_connection() {
        let vips = super::super::topology::vips(2);
        for role in [Role::FrontEnd, Role::BackEnd] {
            let mut p = plan(role, AgentStore::Etcd, &vips);
            p.policy_managed = true;
            let text = config_toml(&p);
            let config =
                vipsec::config::Config::parse(&text).unwrap_or_else(|p| panic!("{p:?}\n{text}"));
            assert!(config.policy.managed);
            assert!(config.peer_vips.iter().all(|v| v.connection.is_none()));
        }
    }

    #[test]
    fn pacemaker_back_end_configs_use_the_operator_endpoint_and_drill_through_crm() {
        let vips = super::super::topology::vips(1);
        let mut p = plan(Role::BackEnd, AgentStore::Etcd, &vips);
        p.cluster_manager = ClusterManager::Pacemaker;
        let text = config_toml(&p);
        let config =
            vipsec::config::Config::parse(&text).unwrap_or_else(|p| panic!("{p:?}\n{text}"));
        assert_eq!(
            config.drill.integration,
            Some(vipsec::config::DrillIntegration::Pacemaker)
        );
        assert_eq!(
            config.drill.resource.as_deref(),
            Some(super::super::pacemaker::VIP_GROUP)
        );
        assert!(
            text.contains(&format!(
                "endpoint = \"{}\"",
                super::super::pacemaker::NODE_ENDPOINT
            )),
            "{text}"
        );
    }

    #[test]
    fn every_etcd_member_is_an_endpoint() {
        let vips = super::super::topology::vips(1);
        let mut p = plan(Role::BackEnd, AgentStore::Etcd, &vips);
        let members = [
            "http://192.0.2.5:2379",
            "http://192.0.2.6:2379",
            "http://192.0.2.7:2379",
        ];
        p.etcd_endpoints = &members;
        let text = config_toml(&p);
        let config =
            vipsec::config::Config::parse(&text).unwrap_or_else(|p| panic!("{p:?}\n{text}"));
        assert_eq!(config.store.endpoints, members);
    }

    #[test]
    fn ipv6_configs_are_valid_agent_configs() {
        use super::super::topology::{Family, vips_of};
        let vips = vips_of(Family::V6, 2);
        for role in [Role::FrontEnd, Role::BackEnd] {
            let mut p = plan(role, AgentStore::Etcd, &vips);
            p.etcd_endpoints = &["http://[2001:db8:1::5]:2379"];
            let text = config_toml(&p);
            let config =
                vipsec::config::Config::parse(&text).unwrap_or_else(|p| panic!("{p:?}\n{text}"));
            assert_eq!(config.store.endpoints, ["http://[2001:db8:1::5]:2379"]);
            match role {
                Role::FrontEnd => assert_eq!(config.peer_addresses(), vips),
                _ => assert_eq!(config.hosted_addresses(), vips),
            }
        }
    }
}
