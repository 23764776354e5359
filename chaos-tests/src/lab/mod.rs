//! The multi-node lab: namespaces on a bridge (`topology`), and on the nodes real charon,
//! keepalived, etcd and vipsec agents, a mail-like server on the back-ends and probes on the
//! front-ends. A [`Setup`] chooses what runs; the lab can switch set-ups without rebuilding
//! the network. Everything is torn down by Drop, also when a test panics.

pub mod addr_events;
pub mod agent;
pub mod charon;
pub mod cleartext;
mod cluster;
pub mod etcd;
pub mod faults;
pub mod keepalived;
pub mod mailserver;
pub mod pacemaker;
pub mod probe;
pub mod progress;
pub mod setup;
pub mod topology;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vipsec_testbed::process::{ProcessGuard, wait_for};

pub use progress::Progress;
pub use setup::{ClusterManager, Setup};
pub use topology::Role;

use crate::clock::now_ns;
use agent::{Agent, AgentPlan};
use charon::{Charon, FrontEndStyle};
use etcd::Etcd;
use keepalived::Keepalived;
use pacemaker::PacemakerNode;
use probe::Probe;
use topology::{Family, NODE_IF, Topology, host_cidr};

/// keepalived priorities: be1 starts as the VIP's owner.
const PRIORITIES: &[(&str, u8)] = &[("be1", 150), ("be2", 100)];

pub struct LabOptions {
    pub setup: Setup,
    /// How many VIPs (192.0.2.100 onward).
    pub vips: usize,
    /// How many front-ends (fe1, fe2, ...; at most [`topology::MAX_FRONT_ENDS`]).
    pub front_ends: usize,
    /// How often each front-end's probe opens a connection to each VIP.
    pub probe_interval: Duration,
    /// `[failover.reconnect]` for every agent; the agent's defaults when None.
    pub reconnect: Option<vipsec::config::ReconnectConfig>,
    /// `keying.initiate_timeout` of every agent: short in the small lab, so a move is
    /// retried fast; a back-end answering many front-ends at once needs longer.
    pub initiate_timeout: Duration,
    /// `store.lease_ttl` of every agent on etcd (2 s: the lab's fast-failover value).
    pub lease_ttl: Duration,
    /// Put this front-end behind a masquerading router.
    pub nat_front_end: Option<String>,
    /// The `vipsec-chaos` binary, run inside nodes for `serve-mail` and `probe`.
    pub self_exe: PathBuf,
    /// Keep the run directory (configs, logs, probe records) after the lab is gone.
    pub keep_run_dir: bool,
    /// The lab network's address family (IPv4 unless asked).
    pub family: Family,
    /// How the front-ends' connections are written in swanctl.conf (set-ups whose agents
    /// load the connections from the stored policy write none).
    pub frontend_style: FrontEndStyle,
    /// etcd members: 1 is the one node `etcd` (192.0.2.5); 3 (or 5) is a cluster of
    /// etcd1, etcd2, ... (192.0.2.5 onward), one member per node.
    pub etcd_members: usize,
    /// keepalived's advert interval (1 s, its default; operators tune it to 50–100 ms).
    pub vrrp_advert: Duration,
    /// How long the lab may take to carry steady traffic after it is built or reset.
    pub steady_timeout: Duration,
    /// A planned move goes through `deploy/keepalived/vipsec-handover` where an agent
    /// runs (a drain before keepalived stops); false: keepalived just stops, as where no
    /// one wired the script in.
    pub handover: bool,
}

impl LabOptions {
    pub fn new(setup: Setup, self_exe: impl Into<PathBuf>) -> LabOptions {
        LabOptions {
            setup,
            vips: 1,
            front_ends: 2,
            probe_interval: Duration::from_millis(20),
            reconnect: None,
            initiate_timeout: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(2),
            nat_front_end: None,
            self_exe: self_exe.into(),
            keep_run_dir: std::env::var_os("VIPSEC_CHAOS_KEEP").is_some(),
            family: Family::V4,
            frontend_style: FrontEndStyle::default(),
            etcd_members: 1,
            vrrp_advert: Duration::from_secs(1),
            steady_timeout: Duration::from_secs(30),
            handover: true,
        }
    }
}

/// What runs on one node.
#[derive(Default)]
struct NodeProcs {
    /// A Pacemaker node (its daemons, and the agent and VIP its resources run).
    pacemaker: Option<PacemakerNode>,
    agent: Option<Agent>,
    charon: Option<Charon>,
    keepalived: Option<Keepalived>,
    server: Option<ProcessGuard>,
}

pub struct Lab {
    // Field order is drop order: processes go before the namespaces they run in.
    probes: Vec<Probe>,
    capture: cleartext::Capture,
    procs: BTreeMap<String, NodeProcs>,
    etcd: Option<Etcd>,
    pub topo: Topology,
    run_dir: tempfile::TempDir,
    pub setup: Setup,
    pub vips: Vec<IpAddr>,
    self_exe: PathBuf,
    vipsec_bin: Option<PathBuf>,
    probe_interval: Duration,
    reconnect: Option<vipsec::config::ReconnectConfig>,
    initiate_timeout: Duration,
    lease_ttl: Duration,
    frontend_style: FrontEndStyle,
    handover: bool,
    vrrp_advert: Duration,
    steady_timeout: Duration,
    /// corosync's shared key, made with the cluster (Pacemaker set-up).
    corosync_authkey: Option<Vec<u8>>,
    /// The cluster's CIB holds the operator's configuration (Pacemaker set-up).
    pacemaker_configured: bool,
    /// A `vipsec drill` started by [`Fault::Drill`], not yet collected.
    pending_drill: Option<std::process::Child>,
    pub progress: Progress,
}

impl Lab {
    /// Builds the network and starts every part, then waits until both front-ends get
    /// answers through the tunnel.
    pub fn build(opts: LabOptions, progress: Progress) -> anyhow::Result<Lab> {
        vipsec_testbed::require_root()?;
        for p in [
            "ip",
            "ss",
            "nft",
            "unshare",
            "charon",
            "swanctl",
            "keepalived",
            "tcpdump",
        ] {
            vipsec_testbed::require_program(p)?;
        }
        if opts.setup.cluster_manager() == ClusterManager::Pacemaker {
            for p in pacemaker::PROGRAMS {
                vipsec_testbed::require_program(p)?;
            }
            anyhow::ensure!(
                opts.vips == 1 && opts.family == Family::V4,
                "the Pacemaker lab applies deploy/pacemaker/constraints.example as shipped: one IPv4 VIP"
            );
        }
        let mut run_dir = tempfile::Builder::new().prefix("vipsec-lab-").tempdir()?;
        if opts.keep_run_dir {
            run_dir.disable_cleanup(true);
        }
        let topo = Topology::build_family(
            opts.family,
            opts.front_ends,
            opts.etcd_members,
            opts.nat_front_end.as_deref(),
            run_dir.path(),
        )?;
        progress.step(&format!(
            "network up: hub {} with {} nodes, run dir {}",
            topo.hub.name,
            topo.nodes.len(),
            run_dir.path().display()
        ));
        cleartext::install(&topo.hub)?;
        let capture = cleartext::Capture::start(&topo.hub, run_dir.path())?;
        let mut lab = Lab {
            probes: Vec::new(),
            capture,
            procs: BTreeMap::new(),
            etcd: None,
            topo,
            run_dir,
            setup: opts.setup,
            vips: topology::vips_of(opts.family, opts.vips),
            self_exe: opts.self_exe,
            vipsec_bin: None,
            probe_interval: opts.probe_interval,
            reconnect: opts.reconnect,
            initiate_timeout: opts.initiate_timeout,
            lease_ttl: opts.lease_ttl,
            frontend_style: opts.frontend_style,
            handover: opts.handover,
            vrrp_advert: opts.vrrp_advert,
            steady_timeout: opts.steady_timeout,
            corosync_authkey: None,
            pacemaker_configured: false,
            pending_drill: None,
            progress,
        };
        for node in lab.topo.with_role(Role::BackEnd) {
            // The server must only ever be reached through the tunnel: clear text arriving
            // on eth0 is dropped (and counted on the bridge anyway).
            topology::nft(
                &node.ns,
                &format!(
                    "table inet vipsec_lab_guard {{\n\
                     chain input {{\n\
                     type filter hook input priority 0; policy accept;\n\
                     iifname \"{NODE_IF}\" tcp dport {{ 143, 110, 80 }} drop\n\
                     }}\n\
                     }}\n"
                ),
            )?;
        }
        lab.start_setup()?;
        let backends: Vec<String> = lab.names(Role::BackEnd);
        for be in &backends {
            lab.start_server(be)?;
            lab.start_cluster_manager(be)?;
        }
        match lab.setup.cluster_manager() {
            ClusterManager::Keepalived => {
                lab.progress
                    .step("charon, mail servers and keepalived started");
                let owner = lab.wait_owner(Duration::from_secs(15))?;
                lab.progress
                    .step(&format!("VRRP elected {owner} as the VIP's owner"));
            }
            ClusterManager::Pacemaker => {
                lab.progress
                    .step("charon, mail servers, corosync and pacemaker started");
                lab.configure_pacemaker()?;
                lab.wait_cluster(Duration::from_secs(90))?;
                let owner = lab.wait_owner(Duration::from_secs(10))?;
                lab.progress
                    .step(&format!("Pacemaker started the VIP on {owner}"));
            }
        }
        let targets: Vec<SocketAddr> = lab
            .vips
            .iter()
            .map(|&v| SocketAddr::from((v, 143)))
            .collect();
        for fe in lab.names(Role::FrontEnd) {
            let node = lab.topo.node(&fe);
            let dir = lab.node_dir(&fe);
            let probe = Probe::start(
                &lab.self_exe,
                &node.ns,
                &fe,
                &targets,
                &dir,
                lab.probe_interval,
            )?;
            lab.probes.push(probe);
        }
        lab.settle()?;
        lab.progress.step("probes answered through the tunnel");
        Ok(lab)
    }

    /// Waits for steady traffic at start-up. Without an agent nothing mends a tunnel that
    /// charon brought up broken: Debian's charon 5.9.8, starting several CHILD_SAs at once,
    /// can give two of them one reqid and leave a VIP dead for good (strongSwan issue
    /// 1855; seen in the three-VIP baseline lab). There, and only there (the agents must
    /// mend it themselves; that is what they are tested for), the front-ends'
    /// connections are started once more before the lab gives up.
    fn settle(&mut self) -> anyhow::Result<()> {
        let first = self.wait_steady(self.steady_timeout);
        if first.is_ok() || self.setup.agent().is_some() {
            return first;
        }
        let why = first.err().map(|e| e.to_string()).unwrap_or_default();
        self.progress.step(&format!(
            "start-up stalled ({why}); starting the front-ends' tunnels again"
        ));
        for fe in self.names(Role::FrontEnd) {
            for vip in self.vips.clone() {
                let conn = charon::connection_name(vip);
                let _ = self.swanctl(&fe, &["--terminate", "--ike", &conn, "--force"]);
                let _ = self.swanctl(&fe, &["--initiate", "--child", &conn, "--timeout", "5"]);
            }
        }
        self.wait_steady(self.steady_timeout)
    }

    /// Agents started from now on (after [`Lab::reset`], a restart) get these
    /// `[failover.reconnect]` settings.
    pub fn set_reconnect(&mut self, reconnect: Option<vipsec::config::ReconnectConfig>) {
        self.reconnect = reconnect;
    }

    /// Front-end charons started from now on (after [`Lab::reset`], a restart) get their
    /// connections written in this style.
    pub fn set_frontend_style(&mut self, style: FrontEndStyle) {
        self.frontend_style = style;
    }

    pub fn frontend_style(&self) -> FrontEndStyle {
        self.frontend_style
    }

    /// A node's directory in the run directory (configs, logs).
    pub fn node_dir_of(&self, node: &str) -> PathBuf {
        self.node_dir(node)
    }

    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.run_dir.path().join(node)
    }

    pub fn names(&self, role: Role) -> Vec<String> {
        self.topo.with_role(role).map(|n| n.name.clone()).collect()
    }

    /// Starts what the set-up puts on the nodes: etcd, charon everywhere, agents.
    fn start_setup(&mut self) -> anyhow::Result<()> {
        if let Some(store) = self.setup.agent() {
            if self.vipsec_bin.is_none() {
                self.vipsec_bin = Some(agent::find_binary(&self.self_exe)?);
            }
            if store == setup::AgentStore::Etcd && self.etcd.is_none() {
                let members: Vec<(&str, &str, IpAddr)> = self
                    .topo
                    .with_role(Role::Etcd)
                    .map(|n| (n.name.as_str(), n.ns.name.as_str(), n.addr))
                    .collect();
                let observer = self.etcd_observer()?;
                self.etcd = Some(Etcd::start(&members, &observer, self.run_dir.path())?);
                self.progress
                    .step(&format!("etcd up ({} members)", members.len()));
            }
        }
        let nodes: Vec<String> = self
            .topo
            .nodes
            .iter()
            .filter(|n| n.role != Role::Etcd)
            .map(|n| n.name.clone())
            .collect();
        for n in &nodes {
            self.start_charon(n)?;
        }
        for n in &nodes {
            self.start_agent(n)?;
        }
        if self.setup.policy_managed() {
            // The operator's way: one `vipsec policy apply` on any node; every agent
            // picks the policy up from etcd and loads its connections.
            let file = self.run_dir.path().join("lab-policy.toml");
            std::fs::write(&file, charon::lab_policy(&self.vips))?;
            let first = nodes.first().ok_or_else(|| anyhow::anyhow!("no nodes"))?;
            let out = self.agent_cli(first, &["policy", "apply", &file.display().to_string()])?;
            self.progress.step(out.trim());
        }
        Ok(())
    }

    fn start_charon(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.topo.node(name);
        let dir = self.node_dir(name);
        let liveness = self.setup.liveness();
        let swanctl = match node.role {
            _ if self.setup.policy_managed() => charon::swanctl_empty(),
            Role::FrontEnd => {
                charon::swanctl_frontend(name, node.addr, &self.vips, liveness, self.frontend_style)
            }
            _ => charon::swanctl_backend(&self.vips, liveness, !self.frontend_style.mobike_off()),
        };
        let c = Charon::start_in(
            &node.ns,
            name,
            &dir,
            &charon::strongswan_conf(&dir, liveness),
            &swanctl,
        )?;
        self.procs.entry(name.to_string()).or_default().charon = Some(c);
        Ok(())
    }

    fn start_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let (Some(store), Some(bin)) = (self.setup.agent(), self.vipsec_bin.clone()) else {
            return Ok(());
        };
        let node = self.topo.node(name);
        let dir = self.node_dir(name);
        let vici = charon::vici_path(&dir);
        let endpoints: Vec<String> = self
            .topo
            .with_role(Role::Etcd)
            .map(|n| etcd::client_url(n.addr))
            .collect();
        let endpoints: Vec<&str> = endpoints.iter().map(String::as_str).collect();
        let plan = AgentPlan {
            node: name,
            role: node.role,
            dir: &dir,
            vici: &vici,
            store,
            etcd_endpoints: &endpoints,
            vips: &self.vips,
            policy_managed: self.setup.policy_managed(),
            reconnect: self.reconnect.as_ref(),
            initiate_timeout: self.initiate_timeout,
            lease_ttl: self.lease_ttl,
            cluster_manager: self.setup.cluster_manager(),
        };
        if node.role == Role::BackEnd && self.setup.cluster_manager() == ClusterManager::Pacemaker {
            // Pacemaker starts this agent (deploy/pacemaker/vipsec) from the node's
            // /etc/vipsec/agent.toml.
            let etc = dir.join("etc-vipsec");
            std::fs::create_dir_all(&etc)?;
            std::fs::write(etc.join("agent.toml"), agent::config_toml(&plan))?;
            return Ok(());
        }
        let a = Agent::start(&bin, &node.ns, &plan)?;
        self.procs.entry(name.to_string()).or_default().agent = Some(a);
        Ok(())
    }

    fn start_server(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.topo.node(name);
        let log = self.node_dir(name).join("serve-mail.log");
        std::fs::create_dir_all(self.node_dir(name))?;
        let g = mailserver::start(
            &self.self_exe,
            &node.ns,
            name,
            &charon::PROTECTED_PORTS,
            match self.topo.family {
                Family::V4 => IpAddr::from([0, 0, 0, 0]),
                Family::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            },
            &log,
        )?;
        self.procs.entry(name.to_string()).or_default().server = Some(g);
        Ok(())
    }

    fn start_keepalived(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.topo.node(name);
        let priority = PRIORITIES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .unwrap_or(100);
        let k = Keepalived::start(
            &node.ns,
            &self.node_dir(name),
            name,
            priority,
            &self.vips,
            self.vrrp_advert,
        )?;
        self.procs.entry(name.to_string()).or_default().keepalived = Some(k);
        Ok(())
    }

    /// Switches the lab to another set-up: agents and charons are replaced (after the
    /// back-ends are restored, as in [`Lab::reset`]); the network, keepalived, servers and
    /// probes stay.
    pub fn switch_setup(&mut self, setup: Setup) -> anyhow::Result<()> {
        if setup.cluster_manager() != self.setup.cluster_manager() {
            // The VIPs leave with the old cluster manager; the new one places them.
            for be in self.names(Role::BackEnd) {
                self.restore(&be)?;
            }
            self.stop_cluster_managers()?;
            if setup.agent().is_some() && self.vipsec_bin.is_none() {
                self.vipsec_bin = Some(agent::find_binary(&self.self_exe)?);
            }
        }
        self.setup = setup;
        self.reset()
    }

    fn stop_agents_and_charons(&mut self) {
        for procs in self.procs.values_mut() {
            if let Some(mut a) = procs.agent.take() {
                a.stop();
            }
            procs.charon = None;
        }
    }

    /// The one back-end holding the first VIP, if exactly one does.
    pub fn owner(&self) -> Option<String> {
        let holders = self.topo.holders(self.vips[0]);
        (holders.len() == 1).then(|| holders[0].clone())
    }

    pub fn wait_owner(&self, timeout: Duration) -> anyhow::Result<String> {
        wait_for("one VIP owner", timeout, || self.owner())
    }

    /// Reads new probe records.
    pub fn poll_probes(&mut self) -> anyhow::Result<()> {
        for p in &mut self.probes {
            p.poll()?;
        }
        Ok(())
    }

    pub fn probes(&self) -> &[Probe] {
        &self.probes
    }

    /// Waits until every front-end's last five attempts (started after now) were answered
    /// by the VIP's owner for every VIP.
    pub fn wait_steady(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let t0 = now_ns();
        let want = 5 * self.vips.len();
        // Attempts a front-end makes in half a second, less a fifth for scheduling slack.
        let per_half_second =
            (Duration::from_millis(500).as_nanos() / self.probe_interval.as_nanos()) as usize;
        let settled_min = (per_half_second * 4 / 5).max(1);
        let mut status = String::new();
        let mut unsteady: Vec<String> = Vec::new();
        let result = wait_for("steady traffic through the tunnel", timeout, || {
            self.poll_probes().ok()?;
            status.clear();
            unsteady.clear();
            let Some(owner) = self.owner() else {
                status = format!(" VIP held by {:?}", self.topo.holders(self.vips[0]));
                return None;
            };
            let mut all = true;
            for p in &self.probes {
                let mut recent: Vec<_> = p.since(t0).collect();
                recent.sort_by_key(|r| r.start);
                let tail = &recent[recent.len().saturating_sub(want)..];
                // A failed attempt is written when it times out (500 ms after it started),
                // so the newest records alone can look good while older attempts are still
                // failing. Attempts that started 0.6-1.1 s ago have all been written: they
                // must be there without gaps and all answered by the owner.
                let now = now_ns();
                let settled: Vec<_> = recent
                    .iter()
                    .filter(|r| r.start + 600_000_000 <= now && r.start + 1_100_000_000 > now)
                    .collect();
                let settled_good = settled.len() >= settled_min * self.vips.len()
                    && settled
                        .iter()
                        .all(|r| r.node.as_deref() == Some(owner.as_str()));
                let good = settled_good
                    && tail.len() == want
                    && tail
                        .iter()
                        .all(|r| r.node.as_deref() == Some(owner.as_str()));
                status += &format!(
                    " {}: {:?};",
                    p.fe,
                    tail.last().map(|r| r.node.clone().or(r.error.clone()))
                );
                if !good {
                    unsteady.push(p.fe.clone());
                }
                all &= good;
            }
            all.then_some(())
        });
        result.map_err(|e| anyhow::anyhow!("{e} (last:{status}){}", self.diagnose(&unsteady)))
    }

    /// What a failed wait leaves to read once the run directory is gone (CI): for the
    /// first few front-ends that never settled, their SAs and the end of their agent's log.
    fn diagnose(&self, front_ends: &[String]) -> String {
        let mut out = String::new();
        for fe in front_ends.iter().take(3) {
            let sas = self
                .swanctl(fe, &["--list-sas"])
                .unwrap_or_else(|e| format!("{e:#}"));
            let log = vipsec_testbed::agent::log_tail(&self.node_dir(fe).join("agent.log"), 25);
            out +=
                &format!("\n--- {fe}: swanctl --list-sas\n{sas}\n--- {fe}: agent.log (end)\n{log}");
        }
        out
    }

    pub fn cleartext(&self) -> anyhow::Result<cleartext::ClearText> {
        cleartext::read(&self.topo.hub)
    }

    /// The clear-text packets tcpdump saw since `since` (seconds since the epoch).
    pub fn cleartext_packets_since(&self, since: f64) -> Vec<String> {
        self.capture.lines_since(since)
    }

    /// A planned move away from `node`: its keepalived stops gracefully.
    pub fn planned_move(&mut self, node: &str) -> anyhow::Result<()> {
        // Where an agent runs, the move goes through the operator's own tool,
        // deploy/keepalived/vipsec-handover, given every VIP of the instance: it drains
        // them at once (an IKE DELETE to each front-end while the addresses are still
        // here), stops keepalived and waits until the addresses have left.
        if let (true, Some(bin), Some(socket)) = (
            self.handover,
            self.vipsec_bin.clone(),
            self.agent_socket(node),
        ) {
            let endpoint = format!("unix://{}", socket.display());
            let procs = self.procs.entry(node.to_string()).or_default();
            let k = procs
                .keepalived
                .as_mut()
                .ok_or_else(|| anyhow::anyhow!("no keepalived on {node}"))?;
            let pid = k
                .pid()
                .ok_or_else(|| anyhow::anyhow!("keepalived on {node} already reaped"))?;
            let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/keepalived/vipsec-handover");
            let out = self
                .topo
                .node(node)
                .ns
                .command("sh")
                .arg(&script)
                .args(["--stop", "-t", "10"])
                .args(self.vips.iter().map(|v| v.to_string()))
                .env("VIPSEC", &bin)
                .env("VIPSEC_ENDPOINT", &endpoint)
                .env("KEEPALIVED_STOP", format!("kill -TERM {pid}"))
                .output()?;
            let procs = self.procs.entry(node.to_string()).or_default();
            if let Some(k) = procs.keepalived.as_mut() {
                k.mark_stopping();
            }
            anyhow::ensure!(
                out.status.success(),
                "vipsec-handover on {node}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return Ok(());
        }
        let procs = self.procs.entry(node.to_string()).or_default();
        let k = procs
            .keepalived
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no keepalived on {node}"))?;
        // `restore` starts a new one once this one has exited.
        k.stop_gracefully()
    }

    /// Crashes `node` (see [`faults::crash`]); everything in it is dead afterwards.
    pub fn crash(&mut self, node: &str) -> anyhow::Result<()> {
        faults::crash(&self.topo.node(node).ns)?;
        // Reap the dead children.
        self.procs.remove(node);
        Ok(())
    }

    /// Brings back whatever is missing on a back-end, as after a reboot: a crashed node
    /// loses the VIP it held (keepalived died without removing it), gets its link back and
    /// restarts every daemon; a node after a planned move only restarts keepalived.
    pub fn restore(&mut self, node: &str) -> anyhow::Result<()> {
        if self.setup.cluster_manager() == ClusterManager::Pacemaker {
            return self.restore_pacemaker(node);
        }
        let n = self.topo.node(node);
        let procs = self.procs.entry(node.to_string()).or_default();
        let crashed = procs.server.is_none();
        if crashed {
            for vip in &self.vips {
                let _ = n.ns.ip(&["addr", "del", &host_cidr(*vip), "dev", NODE_IF]);
            }
            n.ns.link_set(NODE_IF, true)?;
            self.start_charon(node)?;
            self.start_server(node)?;
            self.start_agent(node)?;
        }
        let procs = self.procs.entry(node.to_string()).or_default();
        if let Some(k) = procs.keepalived.as_mut() {
            // After a planned move it is on its way out; let it finish before a new one starts.
            let _ = wait_for("keepalived to exit", Duration::from_secs(10), || {
                (!k.stopping() || !k.is_running()).then_some(())
            });
        }
        if procs.keepalived.as_mut().is_none_or(|k| !k.is_running()) {
            self.start_keepalived(node)?;
        }
        Ok(())
    }

    /// Returns the lab to a clean state between scenarios: every back-end running, no
    /// network faults, fresh IKE_SAs (all charons and agents restarted, so SAs left over
    /// from the last run cannot make the next one look better), traffic steady.
    pub fn reset(&mut self) -> anyhow::Result<()> {
        faults::heal(&self.topo.hub)?;
        if let Some(etcd) = self.etcd.as_mut() {
            etcd.restore()?;
        }
        for be in self.names(Role::BackEnd) {
            self.restore(&be)?;
        }
        self.stop_agents_and_charons();
        self.start_setup()?;
        if self.setup.cluster_manager() == ClusterManager::Pacemaker {
            // Pacemaker's agents stay (restarting them would restart the VIP's group,
            // which is ordered after them); they reconnect to the new charons.
            self.settle_pacemaker()?;
        }
        self.settle()
    }

    /// Kills a node's charon (SIGKILL), as when the IKE daemon crashes on its own.
    pub fn kill_charon(&mut self, node: &str) {
        if let Some(p) = self.procs.get_mut(node) {
            p.charon = None;
        }
    }

    /// Starts a node's charon again (after [`Lab::kill_charon`]) with the same configs;
    /// the node's agent reconnects to it by itself.
    pub fn restart_charon(&mut self, node: &str) -> anyhow::Result<()> {
        self.kill_charon(node);
        self.start_charon(node)
    }

    /// SIGKILLs a node's agent, as when it crashes.
    pub fn kill_agent(&mut self, node: &str) {
        if let Some(mut a) = self.procs.get_mut(node).and_then(|p| p.agent.take()) {
            a.kill();
        }
        // The agent Pacemaker started: its resource's next monitor finds it gone.
        if let Some(pid) = self
            .procs
            .get(node)
            .and_then(|p| p.pacemaker.as_ref()?.agent_pid())
        {
            // SAFETY: kill(2) on the agent process of a lab node.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// Pauses a node's agent (SIGSTOP), as when its VM or process stalls.
    pub fn freeze_agent(&self, node: &str) -> anyhow::Result<()> {
        self.agent(node)?.freeze()
    }

    /// Lets a node's agent run again after [`Lab::freeze_agent`].
    pub fn thaw_agent(&self, node: &str) -> anyhow::Result<()> {
        self.agent(node)?.thaw()
    }

    /// What a node's agent logged so far.
    pub fn agent_log(&self, node: &str) -> anyhow::Result<String> {
        if let Some(p) = self.procs.get(node).and_then(|p| p.pacemaker.as_ref()) {
            return Ok(p.agent_log());
        }
        Ok(self.agent(node)?.log())
    }

    fn agent(&self, node: &str) -> anyhow::Result<&agent::Agent> {
        self.procs
            .get(node)
            .and_then(|p| p.agent.as_ref())
            .ok_or_else(|| anyhow::anyhow!("no agent on {node}"))
    }

    /// Stops a node's keepalived gracefully (priority-0 advert: the VIP moves) without
    /// going through the agent, as a cluster manager acting on its own would.
    pub fn stop_keepalived(&mut self, node: &str) -> anyhow::Result<()> {
        let procs = self.procs.entry(node.to_string()).or_default();
        procs
            .keepalived
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no keepalived on {node}"))?
            .stop_gracefully()
    }

    /// Stops (SIGTERM) and starts again the agents of every node with `role`, with the
    /// lab's current settings (e.g. after [`Lab::set_reconnect`]); charon and its SAs stay.
    pub fn restart_agents(&mut self, role: Role) -> anyhow::Result<()> {
        for name in self.names(role) {
            if let Some(mut a) = self.procs.get_mut(&name).and_then(|p| p.agent.take()) {
                a.stop();
            }
            self.start_agent(&name)?;
        }
        Ok(())
    }

    /// Starts a node's agent again with the same config (after [`Lab::kill_agent`]).
    pub fn restart_agent(&mut self, node: &str) -> anyhow::Result<()> {
        self.kill_agent(node);
        self.start_agent(node)
    }

    /// Freezes every etcd member (SIGSTOP) so the store hangs.
    pub fn freeze_etcd(&self) -> anyhow::Result<()> {
        self.etcd()?.freeze()
    }

    /// Lets every etcd member run again after [`Lab::freeze_etcd`].
    pub fn thaw_etcd(&mut self) -> anyhow::Result<()> {
        self.etcd_mut()?.thaw()
    }

    fn etcd(&self) -> anyhow::Result<&Etcd> {
        self.etcd
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no etcd in this set-up"))
    }

    fn etcd_mut(&mut self) -> anyhow::Result<&mut Etcd> {
        self.etcd
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no etcd in this set-up"))
    }

    /// Where the lab asks etcd members from: the first front-end, a client of the store
    /// that no scenario crashes.
    fn etcd_observer(&self) -> anyhow::Result<String> {
        self.topo
            .with_role(Role::FrontEnd)
            .next()
            .map(|n| n.ns.name.clone())
            .ok_or_else(|| anyhow::anyhow!("no front-end to ask etcd from"))
    }

    /// The etcd members' node names (`etcd`, or `etcd1`, `etcd2`, ...).
    pub fn etcd_members(&self) -> Vec<String> {
        self.names(Role::Etcd)
    }

    /// Every etcd member's status as a client sees it (None: no answer).
    pub fn etcd_statuses(&self) -> anyhow::Result<Vec<(String, Option<etcd::MemberStatus>)>> {
        Ok(self.etcd()?.statuses())
    }

    /// The member that leads the etcd cluster now.
    pub fn etcd_leader(&self) -> anyhow::Result<String> {
        self.etcd()?
            .leader()
            .ok_or_else(|| anyhow::anyhow!("no etcd member leads"))
    }

    /// SIGKILLs one etcd member, as when its machine dies.
    pub fn kill_etcd_member(&mut self, name: &str) -> anyhow::Result<()> {
        self.etcd_mut()?.kill(name)
    }

    /// Starts a killed etcd member again on the same data directory. It serves once it
    /// has rejoined a quorum: [`Lab::wait_etcd_leader`] waits for that.
    pub fn restart_etcd_member(&mut self, name: &str) -> anyhow::Result<()> {
        self.etcd_mut()?.restart(name)
    }

    /// Every etcd member running and unfrozen again, and a leader (network faults stay:
    /// [`faults::heal`] removes them).
    pub fn restore_etcd(&mut self) -> anyhow::Result<()> {
        self.etcd_mut()?.restore()
    }

    /// Cuts an etcd member off from every other node (rules in the hub's fault chain, which
    /// [`faults::heal`] and [`Lab::reset`] remove).
    pub fn partition_etcd_member(&mut self, name: &str) -> anyhow::Result<()> {
        let port = self.topo.node(name).hub_port.clone();
        let others: Vec<String> = self
            .topo
            .nodes
            .iter()
            .filter(|n| n.name != name)
            .map(|n| n.hub_port.clone())
            .collect();
        for other in &others {
            faults::partition(&self.topo.hub, &port, other)?;
        }
        self.etcd_mut()?.isolated(name)
    }

    /// Waits for the etcd cluster to have a leader the lab's clients can reach. Returns it
    /// with the election time: from the last member killed or cut off (or the thaw after a
    /// freeze) to the first moment a reachable member reported itself leader.
    pub fn wait_etcd_leader(&self, timeout: Duration) -> anyhow::Result<(String, Duration)> {
        self.watch_etcd_leader(timeout)?.wait()
    }

    /// [`Lab::wait_etcd_leader`] in the background, so the election can be timed while the
    /// scenario goes on (a planned move right after a kill).
    pub fn watch_etcd_leader(&self, timeout: Duration) -> anyhow::Result<etcd::LeaderWatch> {
        Ok(self.etcd()?.watch_leader(timeout))
    }

    /// Runs the `vipsec` CLI against a node's agent (`status --json`, `sas --json`, ...).
    pub fn agent_cli(&self, node: &str, args: &[&str]) -> anyhow::Result<String> {
        let bin = self
            .vipsec_bin
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no vipsec agents in this set-up"))?;
        let socket = self
            .agent_socket(node)
            .ok_or_else(|| anyhow::anyhow!("no agent on {node}"))?;
        agent::cli(bin, &socket, args)
    }

    /// A CLI command's `--json` output, parsed.
    pub fn agent_json(&self, node: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut args = args.to_vec();
        args.push("--json");
        Ok(serde_json::from_str(&self.agent_cli(node, &args)?)?)
    }

    /// Every node's marks of every move the store holds (etcd set-ups), as each agent
    /// published them: `vipsec moves` merges them into one front-end's view, the bench
    /// needs each front-end's.
    pub fn move_marks(&self) -> anyhow::Result<Vec<vipsec::timeline::NodeMarks>> {
        let values = self
            .etcd()?
            .values_with_prefix(&format!("{}moves/", agent::ETCD_PREFIX))?;
        Ok(values
            .iter()
            .filter_map(|v| serde_json::from_str(v).ok())
            .collect())
    }

    /// The process id of a node's agent (the one Pacemaker started on its back-ends).
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        let procs = self.procs.get(node)?;
        if let Some(p) = procs.pacemaker.as_ref() {
            return p.agent_pid().and_then(|pid| u32::try_from(pid).ok());
        }
        procs.agent.as_ref()?.pid()
    }

    /// Pids of the daemons on a node, for reports.
    pub fn charon_pid(&self, node: &str) -> Option<u32> {
        self.procs.get(node)?.charon.as_ref()?.pid()
    }

    /// A lab node's agent API socket (vipsec set-ups only).
    pub fn agent_socket(&self, node: &str) -> Option<PathBuf> {
        let procs = self.procs.get(node)?;
        if let Some(p) = procs.pacemaker.as_ref() {
            return Some(p.api_socket());
        }
        Some(procs.agent.as_ref()?.api_socket.clone())
    }

    /// swanctl against a node's charon.
    pub fn swanctl(&self, node: &str, args: &[&str]) -> anyhow::Result<String> {
        self.procs
            .get(node)
            .and_then(|p| p.charon.as_ref())
            .ok_or_else(|| anyhow::anyhow!("no charon on {node}"))?
            .swanctl(args)
    }
}
