//! The lab's network: a hub namespace holding a Linux bridge (so nothing appears on the
//! host), and one namespace per node joined to the bridge by a veth pair. Addresses come
//! from 192.0.2.0/24 only; an optional NAT router puts one front-end behind 198.51.100.0/24.
//! An IPv6 lab ([`Family::V6`]) uses 2001:db8:1::/64 instead, with the same plan: node N
//! is 2001:db8:1::N, the VIPs 2001:db8:1::100 onward (the same digits as in IPv4).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use vipsec_testbed::netns::Netns;

/// The bridge inside the hub namespace.
pub const BRIDGE: &str = "br0";
/// Each node's interface toward the bridge.
pub const NODE_IF: &str = "eth0";
/// The first VIP; many-VIP scenarios use the following addresses, up to .199.
pub const VIP_BASE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
/// Enough for the bench's 100-VIP cell; .200 onward stays free.
pub const MAX_VIPS: usize = 100;

/// The lab network's address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    #[default]
    V4,
    /// 2001:db8:1::/64, DAD left at the kernel defaults (see [`Topology::build_family`]).
    V6,
}

impl Family {
    /// Node or VIP `n` of the lab: 192.0.2.n, or 2001:db8:1::n written with the same digits
    /// (be1 = 192.0.2.21 = 2001:db8:1::21), so logs read alike in both families.
    pub fn host(self, n: u8) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)),
            Family::V6 => {
                let digits = u16::from_str_radix(&n.to_string(), 16).expect("decimal digits");
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, digits))
            }
        }
    }

    /// The prefix length of the lab network.
    pub fn subnet_len(self) -> u8 {
        match self {
            Family::V4 => 24,
            Family::V6 => 64,
        }
    }

    /// The lab network, as swanctl and nftables write it.
    pub fn subnet(self) -> &'static str {
        match self {
            Family::V4 => "192.0.2.0/24",
            Family::V6 => "2001:db8:1::/64",
        }
    }

    /// `-4` or `-6` for `ip`.
    pub fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }
}

/// The prefix length of a single host: 32 or 128.
pub fn host_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// `addr/32` or `addr/128`.
pub fn host_cidr(addr: IpAddr) -> String {
    format!("{addr}/{}", host_len(addr))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    FrontEnd,
    BackEnd,
    Etcd,
}

/// One node: its namespace, its role, its address on the lab network.
pub struct Node {
    pub name: String,
    pub role: Role,
    /// The address charon uses for IKE (behind NAT: the private one).
    pub addr: IpAddr,
    /// The hub-side port of this node's link (what faults on the bridge match).
    pub hub_port: String,
    pub ns: Netns,
}

/// The lab's nodes with the default two front-ends: name, role, last octet.
pub const PLAN: &[(&str, Role, u8)] = &[
    ("etcd", Role::Etcd, 5),
    ("fe1", Role::FrontEnd, 11),
    ("fe2", Role::FrontEnd, 12),
    ("be1", Role::BackEnd, 21),
    ("be2", Role::BackEnd, 22),
];

/// The most front-ends a lab can have: fe3 onward take .43 to .99, below the VIPs.
pub const MAX_FRONT_ENDS: usize = 59;

/// An etcd cluster of several members replaces [`PLAN`]'s one etcd node with etcd1 at .5,
/// etcd2 at .6, ... (below the front-ends; .5 to .9 in either family).
pub const MAX_ETCD_MEMBERS: usize = 5;

/// The plan for `front_ends` front-ends: [`PLAN`]'s fe1 and fe2 (as many as asked), then
/// fe3 at .43, fe4 at .44, ... (clear of the back-ends, the NAT routers and the VIPs).
pub fn plan(front_ends: usize) -> Vec<(String, Role, u8)> {
    plan_with_etcd(front_ends, 1)
}

/// [`plan`] with `etcd_members` etcd nodes: the one node `etcd`, or a cluster of an odd
/// number of members (a cluster that survives the loss of one).
pub fn plan_with_etcd(front_ends: usize, etcd_members: usize) -> Vec<(String, Role, u8)> {
    assert!(
        (1..=MAX_FRONT_ENDS).contains(&front_ends),
        "1 to {MAX_FRONT_ENDS} front-ends"
    );
    assert!(
        etcd_members % 2 == 1 && etcd_members <= MAX_ETCD_MEMBERS,
        "1, 3 or 5 etcd members"
    );
    let mut plan: Vec<(String, Role, u8)> = Vec::new();
    let mut fe = 0;
    for &(name, role, octet) in PLAN {
        if role == Role::Etcd && etcd_members > 1 {
            for i in 1..=etcd_members {
                plan.push((format!("etcd{i}"), Role::Etcd, octet + i as u8 - 1));
            }
            continue;
        }
        if role == Role::FrontEnd {
            fe += 1;
            if fe > front_ends {
                continue;
            }
        }
        plan.push((name.to_string(), role, octet));
    }
    for i in 3..=front_ends {
        plan.push((format!("fe{i}"), Role::FrontEnd, 40 + i as u8));
    }
    plan
}

pub fn vips(count: usize) -> Vec<IpAddr> {
    vips_of(Family::V4, count)
}

pub fn vips_of(family: Family, count: usize) -> Vec<IpAddr> {
    assert!((1..=MAX_VIPS).contains(&count), "1 to {MAX_VIPS} VIPs");
    (0..count as u8).map(|i| family.host(100 + i)).collect()
}

/// The whole network; dropping it deletes every namespace (and so every interface).
pub struct Topology {
    /// Nodes first: they drop before the hub.
    pub nodes: Vec<Node>,
    /// The NAT router in front of a front-end, if any.
    pub nat: Option<Netns>,
    pub hub: Netns,
    pub family: Family,
    registry: Option<PathBuf>,
}

impl Topology {
    /// Builds the network. `nat_front_end` names a front-end to put behind a masquerading
    /// router (198.51.100.2 inside, the router's 192.0.2.3x outside).
    /// `run_dir` is recorded with the namespaces, so that a later run deletes it too if this
    /// one is killed.
    pub fn build(
        front_ends: usize,
        nat_front_end: Option<&str>,
        run_dir: &Path,
    ) -> anyhow::Result<Topology> {
        Self::build_family(Family::V4, front_ends, 1, nat_front_end, run_dir)
    }

    /// [`Topology::build`] in either family, with `etcd_members` etcd nodes (see
    /// [`plan_with_etcd`]). IPv6 keeps duplicate address detection on:
    /// `accept_dad = 1` and `dad_transmits = 1` (the kernel defaults) are written
    /// explicitly in every namespace, so a host with other defaults runs the same lab.
    pub fn build_family(
        family: Family,
        front_ends: usize,
        etcd_members: usize,
        nat_front_end: Option<&str>,
        run_dir: &Path,
    ) -> anyhow::Result<Topology> {
        anyhow::ensure!(
            family == Family::V4 || nat_front_end.is_none(),
            "the lab's NAT router is IPv4 only (IPv6 has no masquerading front-ends here)"
        );
        reap_crashed_runs();
        let hub = Netns::new("hub")?;
        let mut topo = Topology {
            nodes: Vec::new(),
            nat: None,
            hub,
            family,
            registry: None,
        };
        topo.hub.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        topo.hub.ip(&["link", "set", BRIDGE, "up"])?;
        topo.register()?;
        topo.register_ns(&format!("dir {}", run_dir.display()))?;
        for (name, role, octet) in plan_with_etcd(front_ends, etcd_members) {
            let name = name.as_str();
            let ns = Netns::new(name)?;
            if family == Family::V6 {
                set_ipv6_defaults(&ns)?;
            }
            let hub_port = format!("p-{name}");
            let addr = family.host(octet);
            if nat_front_end == Some(name) {
                let nat = Netns::new("nat")?;
                topo.register_ns(&nat.name)?;
                let outside = Ipv4Addr::new(192, 0, 2, 30 + octet % 10);
                topo.attach(&nat, &hub_port, &format!("{outside}/24"))?;
                // The inner link: router 198.51.100.1, node 198.51.100.2.
                nat.ip(&[
                    "link", "add", "inside", "type", "veth", "peer", "name", NODE_IF, "netns",
                    &ns.name,
                ])?;
                nat.ip(&["addr", "add", "198.51.100.1/24", "dev", "inside"])?;
                nat.ip(&["link", "set", "inside", "up"])?;
                ns.ip(&["addr", "add", "198.51.100.2/24", "dev", NODE_IF])?;
                ns.ip(&["link", "set", NODE_IF, "up"])?;
                ns.ip(&["route", "add", "default", "via", "198.51.100.1"])?;
                nat.sh("sysctl -qw net.ipv4.ip_forward=1")?;
                nft(
                    &nat,
                    "table ip vipsec_lab_nat {\n\
                     chain post {\n\
                     type nat hook postrouting priority 100; policy accept;\n\
                     oifname \"eth0\" masquerade\n\
                     }\n\
                     }\n",
                )?;
                topo.register_ns(&ns.name)?;
                topo.nodes.push(Node {
                    name: name.into(),
                    role,
                    addr: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)),
                    hub_port,
                    ns,
                });
                topo.nat = Some(nat);
                continue;
            }
            topo.register_ns(&ns.name)?;
            topo.attach(&ns, &hub_port, &format!("{addr}/{}", family.subnet_len()))?;
            topo.nodes.push(Node {
                name: name.into(),
                role,
                addr,
                hub_port,
                ns,
            });
        }
        if family == Family::V6 {
            topo.wait_dad()?;
        }
        Ok(topo)
    }

    /// Waits until DAD has finished for every address on every node's eth0 (its own
    /// address and its link-local one): a daemon cannot bind a tentative address, and
    /// keepalived sends VRRPv3 adverts from the link-local one.
    fn wait_dad(&self) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        for node in &self.nodes {
            let out = vipsec_testbed::process::wait_for(
                "DAD on the lab's own addresses",
                std::time::Duration::from_secs(10),
                || {
                    let out = node
                        .ns
                        .ip(&["-6", "-o", "addr", "show", "dev", NODE_IF])
                        .ok()?;
                    (out.contains("scope link") && !out.contains("tentative")).then_some(out)
                },
            )?;
            anyhow::ensure!(
                !out.contains("dadfailed"),
                "DAD failed on {}: {out}",
                node.name
            );
        }
        eprintln!(
            "IPv6 lab: DAD on the nodes' own addresses done after {:?}",
            start.elapsed()
        );
        Ok(())
    }

    /// A veth from the bridge to `ns`'s eth0, created inside the hub so that no interface
    /// ever shows up on the host.
    fn attach(&self, ns: &Netns, hub_port: &str, cidr: &str) -> anyhow::Result<()> {
        self.hub.ip(&[
            "link", "add", hub_port, "type", "veth", "peer", "name", NODE_IF, "netns", &ns.name,
        ])?;
        self.hub.ip(&["link", "set", hub_port, "master", BRIDGE])?;
        self.hub.ip(&["link", "set", hub_port, "up"])?;
        ns.ip(&["addr", "add", cidr, "dev", NODE_IF])?;
        ns.ip(&["link", "set", NODE_IF, "up"])?;
        Ok(())
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in the lab"))
    }

    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(move |n| n.role == role)
    }

    /// The back-ends holding `vip` on eth0 right now.
    pub fn holders(&self, vip: IpAddr) -> Vec<String> {
        self.with_role(Role::BackEnd)
            .filter(|n| has_addr(&n.ns, vip))
            .map(|n| n.name.clone())
            .collect()
    }

    /// Records this run's namespaces so a later run can delete them if this process dies
    /// without running its Drop guards (SIGKILL, abort).
    fn register(&mut self) -> anyhow::Result<()> {
        let dir = registry_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}-{}", std::process::id(), self.hub.name));
        std::fs::write(&path, format!("{}\n", self.hub.name))?;
        self.registry = Some(path);
        Ok(())
    }

    /// Lines of the registry: namespace names, and `dir PATH` for the run directory.
    fn register_ns(&self, name: &str) -> anyhow::Result<()> {
        if let Some(path) = &self.registry {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
            writeln!(f, "{name}")?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(path) = &self.registry {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether `addr` sits on the node's eth0 (an IPv6 address also while still tentative).
pub fn has_addr(ns: &Netns, addr: IpAddr) -> bool {
    let flag = if addr.is_ipv4() { "-4" } else { "-6" };
    ns.ip(&[flag, "-o", "addr", "show", "dev", NODE_IF])
        .map(|out| out.contains(&format!(" {addr}/")))
        .unwrap_or(false)
}

/// Whether `addr` sits on eth0 and is usable: for IPv6, duplicate address detection has
/// finished (neither `tentative` nor `dadfailed`).
pub fn has_usable_addr(ns: &Netns, addr: IpAddr) -> bool {
    let flag = if addr.is_ipv4() { "-4" } else { "-6" };
    ns.ip(&[flag, "-o", "addr", "show", "dev", NODE_IF])
        .map(|out| {
            out.lines().any(|l| {
                l.contains(&format!(" {addr}/"))
                    && !l.contains("tentative")
                    && !l.contains("dadfailed")
            })
        })
        .unwrap_or(false)
}

/// Which of `addrs` sit on eth0, each with whether it is usable (see [`has_usable_addr`]);
/// one listing for all of them.
pub fn held_addrs(ns: &Netns, addrs: &[IpAddr]) -> anyhow::Result<Vec<(IpAddr, bool)>> {
    let out = ns.ip(&["-o", "addr", "show", "dev", NODE_IF])?;
    Ok(addrs
        .iter()
        .filter_map(|&addr| {
            let line = out.lines().find(|l| l.contains(&format!(" {addr}/")))?;
            Some((
                addr,
                !line.contains("tentative") && !line.contains("dadfailed"),
            ))
        })
        .collect())
}

/// Writes the kernel's default DAD settings into a namespace explicitly, for all and for
/// interfaces created later, so the lab does not depend on the host's defaults; and keeps
/// IPv6 addresses on a link that goes down (`keep_addr_on_down`): a crash takes the
/// node's link down, and without it the kernel would flush the node's own address, which
/// an IPv4 address survives. Addresses kept over a down link run DAD again when it comes
/// back up.
pub fn set_ipv6_defaults(ns: &Netns) -> anyhow::Result<()> {
    ns.sh(
        "sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0 \
         net.ipv6.conf.all.accept_dad=1 net.ipv6.conf.default.accept_dad=1 \
         net.ipv6.conf.all.dad_transmits=1 net.ipv6.conf.default.dad_transmits=1 \
         net.ipv6.conf.all.keep_addr_on_down=1 net.ipv6.conf.default.keep_addr_on_down=1",
    )?;
    Ok(())
}

/// Loads an nftables script inside a namespace.
pub fn nft(ns: &Netns, script: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft in {}: {}\n{script}",
        ns.name,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn registry_dir() -> PathBuf {
    std::env::temp_dir().join("vipsec-chaos-runs")
}

/// Deletes the namespaces of earlier runs whose process is gone.
fn reap_crashed_runs() {
    let Ok(entries) = std::fs::read_dir(registry_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(pid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        delete_listed_namespaces(&path);
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn delete_listed_namespaces(path: &Path) {
    if let Ok(text) = std::fs::read_to_string(path) {
        for name in text.lines().filter(|l| !l.is_empty()) {
            if let Some(dir) = name.strip_prefix("dir ") {
                let dir = Path::new(dir);
                // Only ever a lab run directory under the temp dir.
                if dir.starts_with(std::env::temp_dir())
                    && dir
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vipsec-lab-"))
                {
                    let _ = std::fs::remove_dir_all(dir);
                }
                continue;
            }
            if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_keep_the_default_nodes_and_unique_addresses() {
        let two = plan(2);
        let names: Vec<_> = two.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["etcd", "fe1", "fe2", "be1", "be2"]);
        let many = plan(MAX_FRONT_ENDS);
        let mut octets: Vec<u8> = many.iter().map(|(_, _, o)| *o).collect();
        octets.sort_unstable();
        octets.dedup();
        assert_eq!(octets.len(), many.len());
        assert!(octets.iter().all(|&o| o < VIP_BASE.octets()[3]));
        assert_eq!(
            many.iter().filter(|(_, r, _)| *r == Role::FrontEnd).count(),
            MAX_FRONT_ENDS
        );
        assert_eq!(plan(1).len(), 4);
    }

    #[test]
    fn an_etcd_cluster_takes_free_addresses_in_both_families() {
        let plan = plan_with_etcd(MAX_FRONT_ENDS, 3);
        let etcd: Vec<_> = plan
            .iter()
            .filter(|(_, r, _)| *r == Role::Etcd)
            .map(|(n, _, o)| (n.as_str(), *o))
            .collect();
        assert_eq!(etcd, [("etcd1", 5), ("etcd2", 6), ("etcd3", 7)]);
        for family in [Family::V4, Family::V6] {
            let mut addrs: Vec<IpAddr> = plan_with_etcd(MAX_FRONT_ENDS, MAX_ETCD_MEMBERS)
                .iter()
                .map(|(_, _, o)| family.host(*o))
                .collect();
            let nodes = addrs.len();
            // The NAT routers' outside addresses and the VIPs must stay clear too.
            addrs.extend([31, 32].map(|o| family.host(o)));
            addrs.extend(vips_of(family, MAX_VIPS));
            addrs.sort_unstable();
            addrs.dedup();
            assert_eq!(addrs.len(), nodes + 2 + MAX_VIPS);
        }
    }
}
