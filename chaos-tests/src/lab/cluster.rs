//! The lab's side of the cluster manager: starting keepalived or a Pacemaker node on a
//! back-end, configuring the Pacemaker cluster the operator's way, and the faults that go
//! through the cluster manager (moves, standby, drills).

use std::net::IpAddr;
use std::time::Duration;

use vipsec_testbed::process::wait_for;

use super::faults::{self, Fault};
use super::pacemaker::{self, AGENT_CLONE, PacemakerNode, VIP_GROUP};
use super::{ClusterManager, Lab, Role};

impl Lab {
    /// Starts what moves the VIPs on a back-end.
    pub(super) fn start_cluster_manager(&mut self, name: &str) -> anyhow::Result<()> {
        match self.setup.cluster_manager() {
            ClusterManager::Keepalived => self.start_keepalived(name),
            ClusterManager::Pacemaker => self.start_pacemaker(name),
        }
    }

    fn start_pacemaker(&mut self, name: &str) -> anyhow::Result<()> {
        let bin = self
            .vipsec_bin
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the Pacemaker set-up runs vipsec agents"))?;
        let members: Vec<(String, IpAddr)> = self
            .topo
            .with_role(Role::BackEnd)
            .map(|n| (n.name.clone(), n.addr))
            .collect();
        let members: Vec<(&str, IpAddr)> = members.iter().map(|(n, a)| (n.as_str(), *a)).collect();
        let conf = pacemaker::corosync_conf(&members);
        if self.corosync_authkey.is_none() {
            self.corosync_authkey = Some(pacemaker::authkey()?);
        }
        let key = self.corosync_authkey.clone().unwrap_or_default();
        let node = PacemakerNode::start(
            &self.topo.node(name).ns,
            &self.node_dir(name),
            name,
            &conf,
            &key,
            &bin,
        )?;
        self.procs.entry(name.to_string()).or_default().pacemaker = Some(node);
        Ok(())
    }

    /// A running Pacemaker node to run cluster commands on (`prefer` if it runs).
    fn pacemaker_node(&self, prefer: Option<&str>) -> anyhow::Result<&PacemakerNode> {
        if let Some(n) = prefer.and_then(|p| self.procs.get(p)?.pacemaker.as_ref()) {
            return Ok(n);
        }
        self.names(Role::BackEnd)
            .iter()
            .find_map(|b| self.procs.get(b)?.pacemaker.as_ref())
            .ok_or_else(|| anyhow::anyhow!("no Pacemaker node runs"))
    }

    /// Runs a cluster command (`crm ...`, `crm_resource ...`) on a running node.
    pub fn crm(&self, node: Option<&str>, script: &str) -> anyhow::Result<String> {
        self.pacemaker_node(node)?.sh(script)
    }

    /// Applies the operator's configuration once both nodes are members: the lab's
    /// fencing and stickiness, then deploy/pacemaker/constraints.example exactly as
    /// shipped (`crm configure load update`, as deploy/README.md says).
    pub(super) fn configure_pacemaker(&mut self) -> anyhow::Result<()> {
        if self.pacemaker_configured {
            return Ok(());
        }
        let backends = self.names(Role::BackEnd);
        let first = self.pacemaker_node(None)?;
        let want = format!("Online: [ {} ]", backends.join(" "));
        let mut last = String::new();
        wait_for(
            "both Pacemaker nodes online",
            Duration::from_secs(90),
            || {
                last = first.sh("crm_mon -1").unwrap_or_else(|e| e.to_string());
                last.contains(&want).then_some(())
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}: {last}"))?;
        let host_map: Vec<(String, String)> = backends
            .iter()
            .map(|b| (b.clone(), self.topo.node(b).ns.name.clone()))
            .collect();
        let settings = self.run_dir().join("pacemaker-lab-settings.crm");
        std::fs::write(&settings, pacemaker::cluster_settings(&host_map))?;
        first.sh(&format!("crm configure load update {}", settings.display()))?;
        first.sh(&format!(
            "crm configure load update {}",
            pacemaker::constraints_example().display()
        ))?;
        self.progress.step(
            "Pacemaker configured: lab fencing, then deploy/pacemaker/constraints.example as shipped",
        );
        self.pacemaker_configured = true;
        Ok(())
    }

    /// Waits until the agent's clone runs on every back-end and the VIP's group on one.
    pub fn wait_cluster(&self, timeout: Duration) -> anyhow::Result<()> {
        let backends = self.names(Role::BackEnd);
        let mut last = String::new();
        wait_for("the Pacemaker resources started", timeout, || {
            let node = self.pacemaker_node(None).ok()?;
            let agents = pacemaker::locate(node, AGENT_CLONE);
            let vip = pacemaker::locate(node, VIP_GROUP);
            last = format!("{AGENT_CLONE} on {agents:?}, {VIP_GROUP} on {vip:?}");
            (backends.iter().all(|b| agents.contains(b)) && vip.len() == 1).then_some(())
        })
        .map_err(|e| {
            let mon = self
                .crm(None, "crm_mon -1 --include=failcounts,fencing")
                .unwrap_or_default();
            anyhow::anyhow!("{e}: {last}\n{mon}")
        })
    }

    /// Injects `fault` on the VIP's owner `from` (`to` is the other back-end).
    pub fn inject(&mut self, fault: Fault, from: &str, to: &str) -> anyhow::Result<()> {
        let pacemaker = self.setup.cluster_manager() == ClusterManager::Pacemaker;
        match fault {
            Fault::Planned if pacemaker => self
                .crm(
                    Some(from),
                    &format!("crm_resource --move --resource {VIP_GROUP} --node {to}"),
                )
                .map(|_| ()),
            Fault::Planned => self.planned_move(from),
            Fault::Crash => self.crash(from),
            _ if !pacemaker => anyhow::bail!("{} needs the Pacemaker set-up", fault.name()),
            // Pacemaker's own tool: `crm node standby` (crmsh 4.4.1) returned success
            // without setting the attribute in this lab.
            Fault::Standby => self
                .crm(
                    Some(from),
                    &format!("crm_standby --node {from} --update on"),
                )
                .map(|_| ()),
            Fault::AgentKilled => {
                self.kill_agent(from);
                Ok(())
            }
            Fault::Drill => {
                let bin = self
                    .vipsec_bin
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("no vipsec binary"))?;
                let socket = self
                    .agent_socket(from)
                    .ok_or_else(|| anyhow::anyhow!("no agent on {from}"))?;
                let vip = self.vips[0].to_string();
                let child = std::process::Command::new(bin)
                    .arg("--endpoint")
                    .arg(format!("unix://{}", socket.display()))
                    .args(["drill", &vip, "--to", to, "--timeout", "30s", "--json"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()?;
                self.pending_drill = Some(child);
                Ok(())
            }
        }
    }

    /// The report of the drill [`Fault::Drill`] started (`vipsec drill --json`).
    pub fn finish_drill(&mut self) -> anyhow::Result<serde_json::Value> {
        let child = self
            .pending_drill
            .take()
            .ok_or_else(|| anyhow::anyhow!("no drill running"))?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "vipsec drill: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Brings a Pacemaker back-end back into service after any fault: a crashed node
    /// boots (link, daemons, corosync and pacemaker; Pacemaker starts its agent); a node in
    /// standby goes online; the location constraint of a move is lifted and failures are
    /// cleaned up. The VIP stays where it is (stickiness).
    pub(super) fn restore_pacemaker(&mut self, node: &str) -> anyhow::Result<()> {
        if let Some(child) = self.pending_drill.take() {
            let _ = child.wait_with_output();
        }
        let crashed = self.procs.get(node).is_none_or(|p| p.server.is_none());
        if crashed {
            let n = self.topo.node(node);
            for vip in &self.vips {
                let _ = n.ns.ip(&[
                    "addr",
                    "del",
                    &super::topology::host_cidr(*vip),
                    "dev",
                    super::topology::NODE_IF,
                ]);
            }
            n.ns.link_set(super::topology::NODE_IF, true)?;
            self.start_charon(node)?;
            self.start_server(node)?;
            self.start_agent(node)?;
        }
        if self.procs.get(node).is_none_or(|p| p.pacemaker.is_none()) {
            self.start_pacemaker(node)?;
        }
        Ok(())
    }

    /// After every back-end is restored: both online, no constraint from a move, no
    /// failures recorded, every resource started.
    pub(super) fn settle_pacemaker(&mut self) -> anyhow::Result<()> {
        self.configure_pacemaker()?;
        let backends = self.names(Role::BackEnd);
        let mut script: Vec<String> = backends
            .iter()
            .map(|be| format!("crm_standby --node {be} --update off"))
            .collect();
        script.push(format!(
            "{{ crm_resource --clear --resource {VIP_GROUP} >/dev/null 2>&1; true; }}"
        ));
        script.push("crm_resource --cleanup >/dev/null".into());
        let script = script.join(" && ");
        // A node that has just booted takes commands once its CIB daemon is up: ask every
        // node, so both are.
        for be in &backends {
            let mut last = String::new();
            wait_for(
                "the cluster to take commands",
                Duration::from_secs(60),
                || {
                    self.crm(Some(be), &script)
                        .map_err(|e| last = e.to_string())
                        .ok()
                },
            )
            .map_err(|e| anyhow::anyhow!("{e}: {last}"))?;
        }
        self.wait_cluster(Duration::from_secs(90))
    }

    /// Stops the cluster manager on every back-end (switching set-ups): keepalived
    /// gracefully, or Pacemaker as `systemctl stop pacemaker corosync` would; the next
    /// Pacemaker cluster starts from an empty configuration.
    pub(super) fn stop_cluster_managers(&mut self) -> anyhow::Result<()> {
        for be in self.names(Role::BackEnd) {
            let procs = self.procs.entry(be.clone()).or_default();
            if let Some(mut k) = procs.keepalived.take() {
                k.stop_gracefully()?;
                let _ = wait_for("keepalived to exit", Duration::from_secs(10), || {
                    (!k.is_running()).then_some(())
                });
            }
            if let Some(mut p) = procs.pacemaker.take() {
                p.stop();
                let _ = std::fs::remove_dir_all(self.node_dir(&be).join("var-lib-pacemaker"));
            }
        }
        self.pacemaker_configured = false;
        faults::heal(&self.topo.hub)
    }
}
