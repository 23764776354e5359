//! Domain types shared by the failover core, the backends and the API.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// A virtual IP address that moves between cluster nodes.
pub type Vip = IpAddr;

/// Failover mode: how quickly a silent peer is declared dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The cluster store drives failover; the idle detector uses the long normal timeout.
    #[default]
    Normal,
    /// The NLBSFlags idea: a short idle timeout finds a dead peer in seconds.
    Fast,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Normal => "normal",
            Mode::Fast => "fast",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "normal" => Ok(Mode::Normal),
            "fast" => Ok(Mode::Fast),
            other => Err(format!(
                "unknown mode {other:?} (expected \"normal\" or \"fast\")"
            )),
        }
    }
}

/// Who holds a VIP according to the cluster store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipOwner {
    pub node: String,
    /// Grows by one with every acquisition; a record with a lower epoch is stale.
    pub epoch: u64,
    /// Wall-clock time the owner took the VIP (milliseconds since the Unix epoch).
    pub taken_at_ms: u64,
    /// The owner is handing the VIP over (deleting its SAs before it lets go): front-ends
    /// wait for the next owner's record instead of coming back to this one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

impl VipOwner {
    pub fn taken_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.taken_at_ms)
    }
}

/// Which side of an SA the VIP is on, seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VipRole {
    /// This node may host the VIP: the SA's local host is the VIP.
    Hosted,
    /// This node talks to the VIP: the SA's remote host is the VIP.
    Peer,
}

/// One protected flow of a VIP: traffic that must never leave in clear text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProtectedFlow {
    pub vip: Vip,
    pub protocol: FlowProtocol,
    /// `None` protects every port of the protocol.
    pub port: Option<u16>,
    /// Toward the VIP (a front-end's requests) or from it (a back-end's answers).
    #[serde(default)]
    pub direction: FlowDirection,
}

/// Which way a protected flow goes, seen from this node.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "kebab-case")]
pub enum FlowDirection {
    /// Destination is the VIP, the port is the destination port (front-end side).
    #[default]
    ToVip,
    /// Source is the VIP, the port is the source port (back-end side: the server's answers).
    FromVip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowProtocol {
    Tcp,
    Udp,
    /// Every IP protocol toward the VIP.
    Any,
}

impl FlowProtocol {
    pub fn ip_number(self) -> Option<u8> {
        match self {
            FlowProtocol::Tcp => Some(6),
            FlowProtocol::Udp => Some(17),
            FlowProtocol::Any => None,
        }
    }

    /// The name the flow syntax uses (`tcp/143`, `any`).
    pub fn as_str(self) -> &'static str {
        match self {
            FlowProtocol::Tcp => "tcp",
            FlowProtocol::Udp => "udp",
            FlowProtocol::Any => "any",
        }
    }
}

/// Why a flow such as `tcp/143` does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowSyntaxError {
    #[error("{text:?}: unknown protocol {protocol:?} (expected tcp, udp or any)")]
    UnknownProtocol { text: String, protocol: String },
    #[error("{text:?}: \"any\" takes no port")]
    AnyWithPort { text: String },
    #[error("{text:?}: port {port:?} is not a number from 1 to 65535")]
    BadPort { text: String, port: String },
}

/// The flow syntax of `protect` lists and policy documents: `tcp/143`, `udp/53`, `tcp`
/// (every TCP port) or `any` (all traffic). The port is `None` for every port.
pub fn parse_traffic(text: &str) -> Result<(FlowProtocol, Option<u16>), FlowSyntaxError> {
    let (proto, port) = match text.split_once('/') {
        Some((p, port)) => (p, Some(port)),
        None => (text, None),
    };
    let protocol = match proto {
        "tcp" => FlowProtocol::Tcp,
        "udp" => FlowProtocol::Udp,
        "any" => FlowProtocol::Any,
        other => {
            return Err(FlowSyntaxError::UnknownProtocol {
                text: text.into(),
                protocol: other.into(),
            });
        }
    };
    let port = match port {
        None => None,
        Some(_) if protocol == FlowProtocol::Any => {
            return Err(FlowSyntaxError::AnyWithPort { text: text.into() });
        }
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(FlowSyntaxError::BadPort {
                    text: text.into(),
                    port: p.into(),
                });
            }
            Ok(n) => Some(n),
        },
    };
    Ok((protocol, port))
}

/// Parses one entry of a VIP's `protect` list (`tcp/143`, `udp/53`, `tcp`, `any`).
pub fn parse_flow(vip: Vip, s: &str, direction: FlowDirection) -> Result<ProtectedFlow, String> {
    let (protocol, port) = parse_traffic(s).map_err(|e| e.to_string())?;
    Ok(ProtectedFlow {
        vip,
        protocol,
        port,
        direction,
    })
}

impl fmt::Display for ProtectedFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = self.protocol.as_str();
        let from = match self.direction {
            FlowDirection::ToVip => "",
            FlowDirection::FromVip => "from ",
        };
        // An IPv6 VIP is bracketed, as in a URL, so the ':' before the protocol stays
        // unambiguous ("[2001:db8::100]:tcp/143").
        let vip = HostText(self.vip);
        match self.port {
            Some(p) => write!(f, "{from}{vip}:{proto}/{p}"),
            None => write!(f, "{from}{vip}:{proto}"),
        }
    }
}

/// An address as the host part of `host:port` text: IPv6 in brackets, IPv4 as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostText(pub IpAddr);

impl fmt::Display for HostText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "[{a}]"),
        }
    }
}

/// Reads a host address as charon, people and URLs write it: `192.0.2.1`, `2001:db8::1`,
/// `[2001:db8::1]`, with an optional port (`192.0.2.1:500`, `[2001:db8::1]:500`, or
/// strongSwan's `%#H` form `2001:db8::1[500]`) and an optional zone (`fe80::1%eth0`,
/// dropped). An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, what a dual-stack socket
/// reports for IPv4 peers) becomes the IPv4 address: the kernel and the configuration
/// know the VIP by that one.
pub fn parse_host(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let is_port = |p: &str| p.parse::<u16>().is_ok();
    let host = if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        if !(tail.is_empty() || tail.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        h
    } else if let Some((h, tail)) = s.split_once('[') {
        if !tail.strip_suffix(']').is_some_and(is_port) {
            return None;
        }
        h
    } else if s.matches(':').count() == 1 {
        // Exactly one ':' is IPv4 with a port; IPv6 text has at least two.
        let (h, p) = s.split_once(':')?;
        if !is_port(p) {
            return None;
        }
        h
    } else {
        s
    };
    let host = host.split_once('%').map_or(host, |(h, _)| h);
    host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// Identifies one IKE_SA in the keying daemon (charon's unique id).
pub type IkeId = u64;

/// Traffic counters of all CHILD_SAs toward or from one VIP, summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrafficCounters {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
}

/// A CHILD_SA as the keying daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ChildSaInfo {
    pub name: String,
    pub unique_id: u64,
    pub state: String,
    pub mode: String,
    pub protocol: String,
    pub encap: bool,
    pub spi_in: String,
    pub spi_out: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub use_in_secs: Option<u64>,
    pub use_out_secs: Option<u64>,
    pub install_secs: u64,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
}

/// An IKE_SA and its CHILD_SAs as the keying daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct IkeSaInfo {
    pub name: String,
    pub unique_id: IkeId,
    pub state: String,
    pub local_host: String,
    pub local_port: u16,
    pub remote_host: String,
    pub remote_port: u16,
    pub local_id: String,
    pub remote_id: String,
    pub initiator_spi: String,
    pub responder_spi: String,
    pub initiator: bool,
    pub established_secs: u64,
    pub children: Vec<ChildSaInfo>,
    /// charon's `nat-local`: this node is behind NAT, as the peer saw it.
    #[serde(default)]
    pub nat_local: bool,
    /// charon's `nat-remote`: the peer is behind NAT (always set when the peer forces
    /// UDP encapsulation: it fakes its NAT detection to do so).
    #[serde(default)]
    pub nat_remote: bool,
}

impl IkeSaInfo {
    pub fn is_established(&self) -> bool {
        self.state == "ESTABLISHED"
    }

    pub fn has_installed_child(&self) -> bool {
        self.children.iter().any(|c| c.state == "INSTALLED")
    }

    /// The VIP this SA belongs to and this node's role, if any configured VIP matches.
    pub fn vip_role(&self, hosted: &[Vip], peers: &[Vip]) -> Option<(Vip, VipRole)> {
        // Through `parse_host`: charon's text for an IPv6 host may carry brackets, a port
        // or a zone, and a plain `parse` would miss the VIP.
        let local = parse_host(&self.local_host);
        let remote = parse_host(&self.remote_host);
        if let Some(r) = remote.filter(|r| peers.contains(r)) {
            return Some((r, VipRole::Peer));
        }
        if let Some(l) = local.filter(|l| hosted.contains(l)) {
            return Some((l, VipRole::Hosted));
        }
        None
    }

    pub fn counters(&self) -> TrafficCounters {
        self.children
            .iter()
            .fold(TrafficCounters::default(), |acc, c| TrafficCounters {
                bytes_in: acc.bytes_in + c.bytes_in,
                bytes_out: acc.bytes_out + c.bytes_out,
                packets_in: acc.packets_in + c.packets_in,
                packets_out: acc.packets_out + c.packets_out,
            })
    }
}

/// A connection the keying daemon has loaded (`list-conns`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoadedConnection {
    pub name: String,
    pub local_addrs: Vec<String>,
    pub remote_addrs: Vec<String>,
    pub children: Vec<LoadedChild>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoadedChild {
    pub name: String,
    pub mode: String,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
}

/// The IKE connection and child that bring up protection toward a VIP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConnection {
    pub connection: String,
    pub child: String,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether `name` may name a node: letters, digits, '-', '_' and '.', at most 253 bytes.
/// A node's name becomes an IKE identity and part of store keys, so anything else (a
/// wildcard such as `%any`, a '/', spaces) is refused wherever a name is read.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sa_maps_to_peer_vip_by_remote_and_hosted_vip_by_local() {
        let vip: Vip = "192.0.2.100".parse().unwrap();
        let sa = IkeSaInfo {
            local_host: "192.0.2.11".into(),
            remote_host: "192.0.2.100".into(),
            ..Default::default()
        };
        assert_eq!(sa.vip_role(&[], &[vip]), Some((vip, VipRole::Peer)));
        assert_eq!(sa.vip_role(&[vip], &[]), None);
        let be = IkeSaInfo {
            local_host: "192.0.2.100".into(),
            remote_host: "192.0.2.11".into(),
            ..Default::default()
        };
        assert_eq!(be.vip_role(&[vip], &[]), Some((vip, VipRole::Hosted)));
    }

    #[test]
    fn flows_parse() {
        let vip: Vip = "192.0.2.1".parse().unwrap();
        assert_eq!(
            parse_flow(vip, "any", FlowDirection::ToVip)
                .unwrap()
                .protocol,
            FlowProtocol::Any
        );
        assert_eq!(
            parse_flow(vip, "udp/53", FlowDirection::ToVip)
                .unwrap()
                .port,
            Some(53)
        );
        assert!(parse_flow(vip, "any/5", FlowDirection::ToVip).is_err());
        assert!(parse_flow(vip, "tcp/70000", FlowDirection::ToVip).is_err());
    }

    #[test]
    fn flow_syntax_errors_name_the_entry_and_what_is_wrong() {
        assert_eq!(parse_traffic("tcp"), Ok((FlowProtocol::Tcp, None)));
        assert_eq!(parse_traffic("udp/53"), Ok((FlowProtocol::Udp, Some(53))));
        let e = |s| parse_traffic(s).unwrap_err().to_string();
        assert_eq!(
            e("sctp/5"),
            "\"sctp/5\": unknown protocol \"sctp\" (expected tcp, udp or any)"
        );
        assert_eq!(e("any/5"), "\"any/5\": \"any\" takes no port");
        assert_eq!(
            e("tcp/0"),
            "\"tcp/0\": port \"0\" is not a number from 1 to 65535"
        );
        assert_eq!(
            e("tcp/http"),
            "\"tcp/http\": port \"http\" is not a number from 1 to 65535"
        );
    }

    #[test]
    fn flow_display_names_vip_protocol_and_port() {
        let f = ProtectedFlow {
            vip: "192.0.2.100".parse().unwrap(),
            protocol: FlowProtocol::Tcp,
            port: Some(143),
            direction: FlowDirection::ToVip,
        };
        assert_eq!(f.to_string(), "192.0.2.100:tcp/143");
        let back = ProtectedFlow {
            direction: FlowDirection::FromVip,
            ..f
        };
        assert_eq!(back.to_string(), "from 192.0.2.100:tcp/143");
        let v6 = ProtectedFlow {
            vip: "2001:db8::100".parse().unwrap(),
            ..f
        };
        assert_eq!(v6.to_string(), "[2001:db8::100]:tcp/143");
        let any = ProtectedFlow {
            protocol: FlowProtocol::Any,
            port: None,
            ..v6
        };
        assert_eq!(any.to_string(), "[2001:db8::100]:any");
    }

    #[test]
    fn hosts_parse_in_every_form_charon_and_people_write() {
        let v6: IpAddr = "2001:db8::100".parse().unwrap();
        let v4: IpAddr = "192.0.2.100".parse().unwrap();
        for s in [
            "2001:db8::100",
            "[2001:db8::100]",
            "[2001:db8::100]:500",
            "2001:db8::100[4500]",
            "2001:DB8:0:0:0:0:0:100",
            " 2001:db8::100 ",
            "2001:db8::100%eth0",
        ] {
            assert_eq!(parse_host(s), Some(v6), "{s:?}");
        }
        for s in [
            "192.0.2.100",
            "192.0.2.100:500",
            "192.0.2.100[500]",
            "::ffff:192.0.2.100",
            "[::ffff:c000:264]:4500",
        ] {
            assert_eq!(parse_host(s), Some(v4), "{s:?}");
        }
        for s in [
            "",
            "%any",
            "[2001:db8::100",
            "[2001:db8::100]x",
            "2001:db8::100[x]",
            "192.0.2.100:x",
            "vip.example",
        ] {
            assert_eq!(parse_host(s), None, "{s:?}");
        }
        assert_eq!(HostText(v6).to_string(), "[2001:db8::100]");
        assert_eq!(HostText(v4).to_string(), "192.0.2.100");
    }

    #[test]
    fn ipv6_sa_maps_to_its_vip_whatever_the_host_text() {
        let vip: Vip = "2001:db8::100".parse().unwrap();
        for remote in ["2001:db8::100", "[2001:db8::100]", "2001:db8::100[4500]"] {
            let sa = IkeSaInfo {
                local_host: "2001:db8::11".into(),
                remote_host: remote.into(),
                ..Default::default()
            };
            assert_eq!(
                sa.vip_role(&[], &[vip]),
                Some((vip, VipRole::Peer)),
                "{remote}"
            );
        }
        let be = IkeSaInfo {
            local_host: "[2001:db8::100]:4500".into(),
            remote_host: "2001:db8::11".into(),
            ..Default::default()
        };
        assert_eq!(be.vip_role(&[vip], &[]), Some((vip, VipRole::Hosted)));
        // Another address in the same /64 is not the VIP.
        assert_eq!(be.vip_role(&["2001:db8::101".parse().unwrap()], &[]), None);
    }
}
