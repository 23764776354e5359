//! Fault primitives. Process faults act on one node (planned move, crash); network faults
//! are rules in the hub bridge's fault chain, matched by bridge port, so they follow a node
//! whatever addresses it holds (a VIP included).

use vipsec_testbed::netns::Netns;

use super::cleartext::{FAULT_CHAIN, TABLE};
use super::topology::NODE_IF;

/// What a scenario does to the VIP's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// keepalived stops gracefully on the owner (priority-0 advert), or Pacemaker moves
    /// the VIP's group (`crm_resource --move`): a planned move.
    Planned,
    /// The owner freezes, loses its link and dies: no goodbye of any kind.
    Crash,
    /// (Pacemaker) the owner is put in standby: its resources stop, the VIP moves.
    Standby,
    /// (Pacemaker) the owner's agent is SIGKILLed: the vipsec resource's monitor fails.
    AgentKilled,
    /// (Pacemaker) `vipsec drill VIP --to OTHER` on the owner: `crm_resource --move`, the
    /// move's timeline, `crm_resource --clear`.
    Drill,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Planned => "planned",
            Fault::Crash => "crash",
            Fault::Standby => "standby",
            Fault::AgentKilled => "agent-killed",
            Fault::Drill => "drill",
        }
    }
}

/// Crashes a node: SIGSTOP every process in it (so keepalived cannot send a priority-0
/// advert or notice the link going down), take the link down, then SIGKILL everything.
/// A plain SIGKILL of keepalived alone would leave the VIP and charon answering.
pub fn crash(ns: &Netns) -> anyhow::Result<()> {
    let pids = pids_in(ns)?;
    signal_all(&pids, libc::SIGSTOP);
    ns.link_set(NODE_IF, false)?;
    signal_all(&pids, libc::SIGKILL);
    // Anything that appeared in between (a helper spawned by a daemon) goes too.
    signal_all(&pids_in(ns)?, libc::SIGKILL);
    // A crashed machine loses its kernel's TCP state as well. Without this the server's
    // orphaned sockets (FIN_WAIT, bound to the VIP) outlive the "crash" in the namespace
    // and, once the node owns the VIP again, retransmit their FINs in clear text (seen in
    // the lab). The link is down, so the resets this sends go nowhere.
    let out = ns.command("ss").args(["-K", "-t", "-a", "-n"]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ss -K in {}: {}",
        ns.name,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        let all = [
            Fault::Planned,
            Fault::Crash,
            Fault::Standby,
            Fault::AgentKilled,
            Fault::Drill,
        ];
        all.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<_> = all.iter().map(|f| f.name()).collect();
            format!("unknown fault {s:?}; known: {}", names.join(", "))
        })
    }
}

fn pids_in(ns: &Netns) -> anyhow::Result<Vec<i32>> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", &ns.name])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

fn signal_all(pids: &[i32], sig: i32) {
    for &pid in pids {
        // SAFETY: plain kill(2) on processes inside the lab's own namespace.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn add_rule(hub: &Netns, rule: &str) -> anyhow::Result<()> {
    // No shell: the rules hold `<`.
    let out = hub
        .command("nft")
        .args(["add", "rule", "bridge", TABLE, FAULT_CHAIN])
        .args(rule.split_whitespace())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft add rule {rule}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Drops everything between two nodes (given by their hub ports), both ways.
pub fn partition(hub: &Netns, port_a: &str, port_b: &str) -> anyhow::Result<()> {
    add_rule(hub, &format!("iifname {port_a} oifname {port_b} drop"))?;
    add_rule(hub, &format!("iifname {port_b} oifname {port_a} drop"))
}

/// Drops `percent` % of the packets to and from a node, at random.
pub fn packet_loss(hub: &Netns, port: &str, percent: u8) -> anyhow::Result<()> {
    anyhow::ensure!(percent <= 100, "loss is a percentage");
    add_rule(
        hub,
        &format!("iifname {port} numgen random mod 100 < {percent} drop"),
    )?;
    add_rule(
        hub,
        &format!("oifname {port} numgen random mod 100 < {percent} drop"),
    )
}

/// Drops `percent` % of every frame the hub forwards, whoever sends it (each frame crosses
/// the bridge's forward hook once, so this is the loss per packet on every path).
pub fn packet_loss_everywhere(hub: &Netns, percent: u8) -> anyhow::Result<()> {
    anyhow::ensure!(percent <= 100, "loss is a percentage");
    add_rule(hub, &format!("numgen random mod 100 < {percent} drop"))
}

/// Removes every network fault.
pub fn heal(hub: &Netns) -> anyhow::Result<()> {
    hub.sh(&format!("nft flush chain bridge {TABLE} {FAULT_CHAIN}"))
        .map(|_| ())
}
