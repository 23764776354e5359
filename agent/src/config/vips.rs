//! `[[hosted_vip]]` and `[[peer_vip]]`: the VIPs this node hosts and the ones it talks to,
//! with the flows of each that must never leave in clear text.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{Config, KernelBackend, Problems};
use crate::model::{FlowDirection, PeerConnection, ProtectedFlow, parse_flow};

/// One VIP this node may host (back-end side); one `[[hosted_vip]]` table each.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostedVipConfig {
    /// A VIP this node may hold (back-end).
    pub address: IpAddr,
    /// Only count the address as present on this interface.
    pub interface: Option<String>,
    /// The server's answers that must never leave in clear text, by source port, e.g.
    /// `["tcp/143", "tcp/110", "tcp/80"]`. With a kernel backend they are blocked outside
    /// IPsec for as long as the agent runs: between an SA's deletion and the next one (a
    /// drain, a move), a server socket still open would otherwise answer in the clear.
    #[serde(default)]
    pub protect: Vec<String>,
}

impl HostedVipConfig {
    pub fn flows(&self) -> Result<Vec<ProtectedFlow>, String> {
        self.protect
            .iter()
            .map(|s| parse_flow(self.address, s, FlowDirection::FromVip))
            .collect()
    }
}

/// One VIP this node talks to over IPsec (front-end side); one `[[peer_vip]]` table each.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerVipConfig {
    /// A VIP this node talks to (front-end); not also a hosted VIP.
    pub address: IpAddr,
    /// The IKE connection (swanctl `connections.<name>`) toward the VIP; leave it out
    /// when `policy.managed` lets the agent load the connection from the VIP's policy.
    #[serde(default)]
    pub connection: Option<String>,
    /// The CHILD_SA to initiate; defaults to the connection's name.
    pub child: Option<String>,
    /// Flows that must never leave in clear text, e.g. `["tcp/143", "tcp/110", "tcp/80"]`;
    /// `"any"` protects all traffic to the VIP.
    #[serde(default)]
    pub protect: Vec<String>,
    /// Order of re-initiation when many wait at once: 0 to 100, higher first.
    #[serde(default = "default_peer_priority")]
    pub priority: u8,
}

/// Where a peer VIP without a `priority` sits: in the middle, so an operator can put VIPs
/// both ahead of and behind it.
pub const DEFAULT_PEER_PRIORITY: u8 = 50;
pub const MAX_PEER_PRIORITY: u8 = 100;

fn default_peer_priority() -> u8 {
    DEFAULT_PEER_PRIORITY
}

impl PeerVipConfig {
    /// The hand-written connection toward the VIP; `None` when its policy provides one.
    pub fn peer_connection(&self) -> Option<PeerConnection> {
        let connection = self.connection.clone()?;
        Some(PeerConnection {
            child: self.child.clone().unwrap_or_else(|| connection.clone()),
            connection,
        })
    }

    pub fn flows(&self) -> Result<Vec<ProtectedFlow>, String> {
        self.protect
            .iter()
            .map(|s| parse_flow(self.address, s, FlowDirection::ToVip))
            .collect()
    }
}

/// Why an address cannot be a VIP, if it cannot. IPv6 needs its own checks: the kernel
/// reports an IPv4-mapped address (`::ffff:192.0.2.100`) as the IPv4 one, so the agent
/// would never see it arrive, and a link-local address (`fe80::/10`) means nothing
/// without an interface (charon and the kernel report it with a zone).
pub fn vip_address_problem(vip: IpAddr) -> Option<String> {
    if vip.is_unspecified() || vip.is_multicast() {
        return Some(format!("{vip} is not a unicast host address"));
    }
    match vip {
        IpAddr::V4(a) if a.is_broadcast() => Some(format!("{vip} is the broadcast address")),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Some(format!(
            "{vip} is an IPv4-mapped IPv6 address; write the IPv4 address {}",
            vip.to_canonical()
        )),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some(format!(
            "{vip} is link-local (fe80::/10): it only exists with an interface; use a global or unique-local address"
        )),
        _ => None,
    }
}

/// Checks every VIP's address and flows, and what guarding its flows needs of `[kernel]`.
pub(super) fn validate(c: &Config, p: &mut Problems) {
    let kernel = &c.kernel;
    let mut seen = BTreeSet::new();
    for (i, v) in c.hosted_vips.iter().enumerate() {
        for (j, f) in v.protect.iter().enumerate() {
            if let Err(e) = parse_flow(v.address, f, FlowDirection::FromVip) {
                p.bad(format!("hosted_vip[{i}].protect[{j}]"), e);
            }
        }
        if !v.protect.is_empty()
            && kernel.backend == KernelBackend::Xfrm
            && kernel.fail_secure
            && kernel.interface.is_none()
        {
            // The guard stays for as long as the agent runs. Unbound, it would also
            // catch the tunnel's own packets under charon's kernel-libipsec.
            p.bad(
                format!("hosted_vip[{i}].protect"),
                "needs kernel.interface (the physical interface the answers leave by): the guard is bound to it so IPsec traffic always passes",
            );
        }
        if let Some(e) = vip_address_problem(v.address) {
            p.bad(format!("hosted_vip[{i}].address"), e);
        }
        if !seen.insert(v.address) {
            p.bad(
                format!("hosted_vip[{i}].address"),
                format!("{} is listed twice", v.address),
            );
        }
    }
    let mut seen_peer = BTreeSet::new();
    for (i, v) in c.peer_vips.iter().enumerate() {
        if !v.protect.is_empty()
            && v.address.is_ipv4()
            && kernel.backend == KernelBackend::Xfrm
            && kernel.fail_secure
            && kernel.interface.is_none()
            && kernel.libipsec != Some(false)
        {
            // The guard stands while the tunnel is up: unbound, it would also catch
            // the tunnel's own packets under charon's kernel-libipsec.
            p.bad(
                format!("peer_vip[{i}].protect"),
                "needs kernel.interface (the physical interface traffic to the VIP leaves by): the guard is bound to it so IPsec traffic always passes (with kernel ESP, set kernel.libipsec = false instead)",
            );
        }
        if let Some(e) = vip_address_problem(v.address) {
            p.bad(format!("peer_vip[{i}].address"), e);
        }
        if !seen_peer.insert(v.address) {
            p.bad(
                format!("peer_vip[{i}].address"),
                format!("{} is listed twice", v.address),
            );
        }
        if seen.contains(&v.address) {
            p.bad(
                format!("peer_vip[{i}].address"),
                format!(
                    "{} is also a hosted_vip; a node either hosts a VIP or talks to it",
                    v.address
                ),
            );
        }
        match &v.connection {
            Some(conn) if conn.trim().is_empty() => p.bad(
                format!("peer_vip[{i}].connection"),
                "must name the IKE connection",
            ),
            None if !c.policy.managed => p.bad(
                format!("peer_vip[{i}].connection"),
                "missing: name the IKE connection toward the VIP, or set policy.managed = true so the agent loads it from the VIP's policy",
            ),
            _ => {}
        }
        for (j, f) in v.protect.iter().enumerate() {
            if let Err(e) = parse_flow(v.address, f, FlowDirection::ToVip) {
                p.bad(format!("peer_vip[{i}].protect[{j}]"), e);
            }
        }
        if v.priority > MAX_PEER_PRIORITY {
            p.bad(
                format!("peer_vip[{i}].priority"),
                format!("{} is above {MAX_PEER_PRIORITY}", v.priority),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::FRONTEND;

    #[test]
    fn ipv6_addresses_that_cannot_be_vips_are_refused() {
        for (vip, why) in [
            ("::ffff:192.0.2.100", "IPv4-mapped"),
            ("fe80::1", "link-local"),
            ("::", "unicast"),
            ("ff02::1", "unicast"),
        ] {
            let e = vip_address_problem(vip.parse().unwrap()).unwrap();
            assert!(e.contains(why), "{vip}: {e}");
        }
        assert_eq!(vip_address_problem("2001:db8::100".parse().unwrap()), None);
        assert_eq!(vip_address_problem("192.0.2.100".parse().unwrap()), None);
        let text = format!(
            "{FRONTEND}\n[[peer_vip]]\naddress = \"::ffff:192.0.2.7\"\nconnection = \"x\"\n"
        );
        let problems = Config::parse(&text).unwrap_err();
        assert!(
            problems.iter().any(|p| p.key.ends_with("].address")
                && p.reason.contains("write the IPv4 address 192.0.2.7")),
            "{problems:?}"
        );
    }

    #[test]
    fn same_vip_hosted_and_peer_is_refused() {
        let text = format!("{FRONTEND}\n[[hosted_vip]]\naddress = \"192.0.2.100\"\n");
        let problems = Config::parse(&text).unwrap_err();
        assert_eq!(problems[0].key, "peer_vip[0].address");
    }

    #[test]
    fn a_hosted_guard_needs_the_interface_it_is_bound_to() {
        let text = "node = \"be1\"\n[kernel]\nbackend = \"xfrm\"\n[[hosted_vip]]\naddress = \"192.0.2.100\"\nprotect = [\"tcp/143\"]\n";
        let problems = Config::parse(text).unwrap_err();
        assert_eq!(problems[0].key, "hosted_vip[0].protect");
        let fixed = text.replace(
            "backend = \"xfrm\"",
            "backend = \"xfrm\"\ninterface = \"eth0\"",
        );
        assert!(Config::parse(&fixed).is_ok());
    }
}
