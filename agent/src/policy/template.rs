//! What a policy protects: a named template of well-known ports, or a custom port list.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::model::{FlowProtocol, FlowSyntaxError, parse_traffic};

/// One protected kind of traffic: a protocol, and a port of it or every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrafficEntry {
    pub protocol: FlowProtocol,
    /// `None`: every port of the protocol (or, for `Any`, all traffic).
    pub port: Option<u16>,
}

impl TrafficEntry {
    pub const fn tcp(port: u16) -> TrafficEntry {
        TrafficEntry {
            protocol: FlowProtocol::Tcp,
            port: Some(port),
        }
    }

    pub const fn udp(port: u16) -> TrafficEntry {
        TrafficEntry {
            protocol: FlowProtocol::Udp,
            port: Some(port),
        }
    }

    pub const ANY: TrafficEntry = TrafficEntry {
        protocol: FlowProtocol::Any,
        port: None,
    };

    /// The strongSwan traffic-selector suffix: `[tcp/110]`, `[udp]`, or nothing for all.
    pub fn ts_suffix(&self) -> String {
        match (self.protocol, self.port) {
            (FlowProtocol::Any, _) => String::new(),
            (p, Some(port)) => format!("[{}/{port}]", p.as_str()),
            (p, None) => format!("[{}]", p.as_str()),
        }
    }
}

impl fmt::Display for TrafficEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}/{p}", self.protocol.as_str()),
            None => f.write_str(self.protocol.as_str()),
        }
    }
}

/// `tcp/110`, `udp/53`, `tcp` (every TCP port), `udp` (the flow syntax of `protect`
/// lists); `any` is the `all` template's job and is refused here so a custom list never
/// silently widens to all traffic.
impl FromStr for TrafficEntry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = |protocol: &str| {
            format!(
                "{s:?}: unknown protocol {protocol:?} (expected \"tcp\" or \"udp\"; \
                 use template = \"all\" for all traffic)"
            )
        };
        match parse_traffic(s) {
            Ok((FlowProtocol::Any, _)) | Err(FlowSyntaxError::AnyWithPort { .. }) => {
                Err(unknown("any"))
            }
            Err(FlowSyntaxError::UnknownProtocol { protocol, .. }) => Err(unknown(&protocol)),
            Err(e) => Err(e.to_string()),
            Ok((protocol, port)) => Ok(TrafficEntry { protocol, port }),
        }
    }
}

impl Serialize for TrafficEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TrafficEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The named sets of ports operators pick from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Template {
    /// What carries passwords to a mail back-end: POP3 (tcp 110) and IMAP (tcp 143).
    MailCredentials,
    /// Mail front-end traffic: HTTP (tcp 80), POP3 (tcp 110), IMAP (tcp 143).
    Mail,
    /// A directory server: LDAP 389 (tcp+udp), global catalog 3268 (tcp), Kerberos 88
    /// (tcp+udp), RPC endpoint mapper 135 (tcp).
    Directory,
    /// All traffic between the nodes and the VIP.
    All,
}

impl Template {
    pub const ALL_NAMES: [&'static str; 4] = ["mail-credentials", "mail", "directory", "all"];

    pub fn traffic(self) -> Vec<TrafficEntry> {
        match self {
            Template::MailCredentials => vec![TrafficEntry::tcp(110), TrafficEntry::tcp(143)],
            Template::Mail => vec![
                TrafficEntry::tcp(80),
                TrafficEntry::tcp(110),
                TrafficEntry::tcp(143),
            ],
            Template::Directory => vec![
                TrafficEntry::tcp(88),
                TrafficEntry::udp(88),
                TrafficEntry::tcp(135),
                TrafficEntry::tcp(389),
                TrafficEntry::udp(389),
                TrafficEntry::tcp(3268),
            ],
            Template::All => vec![TrafficEntry::ANY],
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Template::MailCredentials => "mail-credentials",
            Template::Mail => "mail",
            Template::Directory => "directory",
            Template::All => "all",
        })
    }
}

/// A policy's traffic: exactly one of a template or a custom port list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrafficSpec {
    Template(Template),
    Ports(Vec<TrafficEntry>),
}

impl TrafficSpec {
    /// The protected traffic, sorted, without duplicates; a protocol listed alone
    /// swallows its single ports (`tcp` and `tcp/110` is just `tcp`).
    pub fn entries(&self) -> Vec<TrafficEntry> {
        let mut v = match self {
            TrafficSpec::Template(t) => t.traffic(),
            TrafficSpec::Ports(p) => p.clone(),
        };
        let whole: Vec<FlowProtocol> = v
            .iter()
            .filter(|e| e.port.is_none())
            .map(|e| e.protocol)
            .collect();
        v.retain(|e| e.port.is_none() || !whole.contains(&e.protocol));
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[TrafficEntry]) -> Vec<String> {
        v.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn templates_name_their_ports() {
        let t = |t: Template| strs(&TrafficSpec::Template(t).entries());
        assert_eq!(t(Template::MailCredentials), ["tcp/110", "tcp/143"]);
        assert_eq!(t(Template::Mail), ["tcp/80", "tcp/110", "tcp/143"]);
        assert_eq!(
            t(Template::Directory),
            [
                "tcp/88", "tcp/135", "tcp/389", "tcp/3268", "udp/88", "udp/389"
            ]
        );
        assert_eq!(t(Template::All), ["any"]);
    }

    #[test]
    fn custom_entries_parse_and_a_bare_protocol_covers_its_ports() {
        let spec = TrafficSpec::Ports(
            ["tcp/110", "udp/53", "tcp", "udp/53"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect(),
        );
        assert_eq!(strs(&spec.entries()), ["tcp", "udp/53"]);
        assert_eq!(TrafficEntry::tcp(110).ts_suffix(), "[tcp/110]");
        assert_eq!("udp".parse::<TrafficEntry>().unwrap().ts_suffix(), "[udp]");
        assert_eq!(TrafficEntry::ANY.ts_suffix(), "");
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        let e = "sctp/1".parse::<TrafficEntry>().unwrap_err();
        assert!(e.contains("unknown protocol \"sctp\""), "{e}");
        let e = "tcp/0".parse::<TrafficEntry>().unwrap_err();
        assert!(e.contains("1 to 65535"), "{e}");
        let e = "tcp/http".parse::<TrafficEntry>().unwrap_err();
        assert!(e.contains("\"http\""), "{e}");
        assert!("any".parse::<TrafficEntry>().is_err());
        let e = "any/5".parse::<TrafficEntry>().unwrap_err();
        assert!(e.contains("use template = \"all\""), "{e}");
    }
}
