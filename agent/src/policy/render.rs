//! A policy turned into the strongSwan connection one node loads for one VIP.
//!
//! The [`ConnectionSpec`] serialises to charon's VICI `load-conn` message (rsvici maps
//! structs and maps to sections, `Vec<String>` to lists, `bool` to yes/no):
//!
//! ```text
//! vipsec-mail-192-0-2-100 {
//!   version = 2, local_addrs = [..], remote_addrs = [..], proposals = [..], encap = yes,
//!   mobike = no, keyingtries = 1, dpd_delay = 30, rekey_time = 14400,
//!   local { auth = psk, id = .. }, remote { auth = psk, id = .. },
//!   children { mail { local_ts = [..], remote_ts = [..], esp_proposals = [..],
//!                     start_action = trap, mode = tunnel, rekey_time = 3600 } }
//! }
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;
use serde::ser::SerializeMap;

use super::PolicyError;
use super::document::{AuthMethod, Encapsulation, Policy};
use super::template::TrafficEntry;
use crate::model::{FlowProtocol, PeerConnection, Vip, VipRole};

/// The id of the shared key vipsec loads into charon (one PSK per node, see docs/policy.md).
pub const PSK_ID: &str = "vipsec-psk";

/// Who this node is in IKE, and whom it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identities {
    /// This node's IKE identity (an address, FQDN or `@name`).
    pub local_id: String,
    /// Front-end: the current owner's IKE identity when the store knows it; `None`
    /// accepts any (`%any`). A back-end accepts any front-end.
    pub remote_id: Option<String>,
    /// Front-end: the address to send IKE from; `None` lets charon pick.
    pub local_addr: Option<IpAddr>,
}

/// One charon connection with one child, ready for `load-conn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSpec {
    pub name: String,
    pub body: ConnectionBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionBody {
    pub version: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub local_addrs: Vec<String>,
    pub remote_addrs: Vec<String>,
    pub proposals: Vec<String>,
    pub encap: bool,
    /// Always off: MOBIKE would move the IKE_SA off the VIP (DESIGN.md).
    pub mobike: bool,
    /// One attempt; the agent retries, so a VIP without an owner never ends recovery.
    pub keyingtries: u32,
    /// Seconds.
    pub dpd_delay: u64,
    /// IKE_SA rekeying, seconds.
    pub rekey_time: u64,
    pub local: AuthSection,
    pub remote: AuthSection,
    pub children: BTreeMap<String, ChildSection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthSection {
    pub auth: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChildSection {
    pub mode: String,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
    pub esp_proposals: Vec<String>,
    pub start_action: String,
    /// Seconds.
    pub rekey_time: u64,
}

impl ConnectionSpec {
    /// The child's name (a spec holds exactly one).
    pub fn child(&self) -> &str {
        self.body
            .children
            .keys()
            .next()
            .map(String::as_str)
            .unwrap_or_default()
    }
}

/// `load-conn` takes one section named by the connection.
impl Serialize for ConnectionSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(&self.name, &self.body)?;
        m.end()
    }
}

/// Connection and child names of a policy's connection for a VIP: stable across
/// restarts and nodes, e.g. `vipsec-mail-192-0-2-100` and `mail`.
pub fn connection_names(policy: &Policy, vip: Vip) -> (String, String) {
    let vip = vip.to_string().replace(['.', ':'], "-");
    (format!("vipsec-{}-{vip}", policy.name), policy.name.clone())
}

/// What a front-end initiates for the VIP.
pub fn peer_connection(policy: &Policy, vip: Vip) -> PeerConnection {
    let (connection, child) = connection_names(policy, vip);
    PeerConnection { connection, child }
}

/// The connection this node loads for `vip`: a front-end ([`VipRole::Peer`]) initiates
/// to the VIP (trap policies for exactly the protected traffic), a back-end
/// ([`VipRole::Hosted`]) answers only on the VIP.
pub fn connection(
    policy: &Policy,
    vip: Vip,
    role: VipRole,
    ids: &Identities,
) -> Result<ConnectionSpec, PolicyError> {
    let (name, child) = connection_names(policy, vip);
    let traffic = policy.traffic();
    let vip_net = IpNet::from(vip).to_string();
    let auth = match policy.auth {
        AuthMethod::Psk => "psk",
    };
    let any_id = "%any".to_string();
    let (local_addrs, remote_addrs, local_ts, remote_ts, remote_id, start_action) = match role {
        VipRole::Peer => (
            ids.local_addr
                .map(|a| vec![a.to_string()])
                .unwrap_or_default(),
            vec![vip.to_string()],
            protocol_selectors("dynamic", &traffic),
            traffic
                .iter()
                .map(|e| format!("{vip_net}{}", e.ts_suffix()))
                .collect(),
            ids.remote_id.clone().unwrap_or(any_id),
            // Traps cover every protected flow at all times (DESIGN.md: no tunnel means
            // clear text); the agent also initiates at once.
            "trap",
        ),
        VipRole::Hosted => {
            let nets = frontend_networks(policy, vip)?;
            (
                vec![vip.to_string()],
                vec!["%any".to_string()],
                traffic
                    .iter()
                    .map(|e| format!("{vip_net}{}", e.ts_suffix()))
                    .collect(),
                nets.iter()
                    .flat_map(|n| protocol_selectors(&n.to_string(), &traffic))
                    .collect(),
                any_id,
                // A responder: front-ends initiate.
                "none",
            )
        }
    };
    let mut children = BTreeMap::new();
    children.insert(
        child,
        ChildSection {
            mode: "tunnel".into(),
            local_ts,
            remote_ts,
            esp_proposals: policy.esp_proposals.clone(),
            start_action: start_action.into(),
            rekey_time: policy.rekey_time.as_secs(),
        },
    );
    Ok(ConnectionSpec {
        name,
        body: ConnectionBody {
            version: 2,
            local_addrs,
            remote_addrs,
            proposals: policy.ike_proposals.clone(),
            encap: policy.encapsulation == Encapsulation::Force,
            mobike: false,
            keyingtries: 1,
            dpd_delay: policy.dpd_delay.as_secs(),
            rekey_time: policy.ike_lifetime.as_secs(),
            local: AuthSection {
                auth: auth.into(),
                id: ids.local_id.clone(),
            },
            remote: AuthSection {
                auth: auth.into(),
                id: remote_id,
            },
            children,
        },
    })
}

/// `base[proto]` once per protocol of the traffic (the far side's ports are not known:
/// a client's source ports are ephemeral), or `base` alone when all traffic is protected.
fn protocol_selectors(base: &str, traffic: &[TrafficEntry]) -> Vec<String> {
    if traffic.iter().any(|e| e.protocol == FlowProtocol::Any) {
        return vec![base.to_string()];
    }
    let mut protos: Vec<FlowProtocol> = traffic.iter().map(|e| e.protocol).collect();
    protos.sort();
    protos.dedup();
    protos
        .into_iter()
        .map(|p| {
            let e = TrafficEntry {
                protocol: p,
                port: None,
            };
            format!("{base}{}", e.ts_suffix())
        })
        .collect()
}

/// The policy's front-end networks of the VIP's family, or the whole family.
fn frontend_networks(policy: &Policy, vip: Vip) -> Result<Vec<IpNet>, PolicyError> {
    let whole: IpNet = match vip {
        IpAddr::V4(_) => "0.0.0.0/0".parse().expect("valid"),
        IpAddr::V6(_) => "::/0".parse().expect("valid"),
    };
    if policy.frontend_networks.is_empty() {
        return Ok(vec![whole]);
    }
    let same: Vec<IpNet> = policy
        .frontend_networks
        .iter()
        .filter(|n| n.addr().is_ipv4() == vip.is_ipv4())
        .copied()
        .collect();
    if same.is_empty() {
        return Err(PolicyError::invalid(
            "frontend-networks",
            format!("no network of VIP {vip}'s address family"),
        ));
    }
    Ok(same)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Template;
    use serde_json::json;

    fn vip() -> Vip {
        "192.0.2.100".parse().unwrap()
    }

    fn fe_ids() -> Identities {
        Identities {
            local_id: "192.0.2.1".into(),
            remote_id: None,
            local_addr: Some("192.0.2.1".parse().unwrap()),
        }
    }

    #[test]
    fn names_are_stable_and_safe() {
        let p = Policy::from_template("mail", Template::Mail);
        assert_eq!(
            connection_names(&p, vip()),
            ("vipsec-mail-192-0-2-100".into(), "mail".into())
        );
        assert_eq!(
            connection_names(&p, "2001:db8::1".parse().unwrap()).0,
            "vipsec-mail-2001-db8--1"
        );
        assert_eq!(
            peer_connection(&p, vip()),
            PeerConnection {
                connection: "vipsec-mail-192-0-2-100".into(),
                child: "mail".into()
            }
        );
    }

    #[test]
    fn front_end_connection_is_the_expected_vici_map() {
        let p = Policy::from_template("creds", Template::MailCredentials);
        let spec = connection(&p, vip(), VipRole::Peer, &fe_ids()).unwrap();
        assert_eq!(spec.child(), "creds");
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            json!({"vipsec-creds-192-0-2-100": {
                "version": 2,
                "local_addrs": ["192.0.2.1"],
                "remote_addrs": ["192.0.2.100"],
                "proposals": ["aes256-sha256-modp3072"],
                "encap": true,
                "mobike": false,
                "keyingtries": 1,
                "dpd_delay": 30,
                "rekey_time": 14400,
                "local": {"auth": "psk", "id": "192.0.2.1"},
                "remote": {"auth": "psk", "id": "%any"},
                "children": {"creds": {
                    "mode": "tunnel",
                    "local_ts": ["dynamic[tcp]"],
                    "remote_ts": ["192.0.2.100/32[tcp/110]", "192.0.2.100/32[tcp/143]"],
                    "esp_proposals": ["aes256-sha256-modp3072"],
                    "start_action": "trap",
                    "rekey_time": 3600
                }}
            }})
        );
    }

    #[test]
    fn back_end_connection_answers_on_the_vip_only() {
        let mut p = Policy::from_template("dir", Template::Directory);
        p.frontend_networks = vec![
            "198.51.100.0/24".parse().unwrap(),
            "2001:db8::/64".parse().unwrap(),
        ];
        p.encapsulation = Encapsulation::Auto;
        let ids = Identities {
            local_id: "be1.example".into(),
            remote_id: None,
            local_addr: None,
        };
        let spec = connection(&p, vip(), VipRole::Hosted, &ids).unwrap();
        let b = &spec.body;
        assert_eq!(b.local_addrs, ["192.0.2.100"]);
        assert_eq!(b.remote_addrs, ["%any"]);
        assert!(!b.encap && !b.mobike);
        let c = &b.children["dir"];
        assert_eq!(c.start_action, "none");
        assert_eq!(
            c.local_ts,
            [
                "192.0.2.100/32[tcp/88]",
                "192.0.2.100/32[tcp/135]",
                "192.0.2.100/32[tcp/389]",
                "192.0.2.100/32[tcp/3268]",
                "192.0.2.100/32[udp/88]",
                "192.0.2.100/32[udp/389]"
            ]
        );
        assert_eq!(
            c.remote_ts,
            ["198.51.100.0/24[tcp]", "198.51.100.0/24[udp]"]
        );
        // No network of the VIP's family: refused, not widened to everything.
        p.frontend_networks = vec!["2001:db8::/64".parse().unwrap()];
        let e = connection(&p, vip(), VipRole::Hosted, &ids).unwrap_err();
        assert!(e.to_string().starts_with("frontend-networks: "), "{e}");
    }

    #[test]
    fn all_traffic_has_bare_selectors_and_ipv6_uses_128() {
        let p = Policy::from_template("all", Template::All);
        let v6: Vip = "2001:db8::100".parse().unwrap();
        let spec = connection(&p, v6, VipRole::Peer, &fe_ids()).unwrap();
        let c = &spec.body.children["all"];
        assert_eq!(c.local_ts, ["dynamic"]);
        assert_eq!(c.remote_ts, ["2001:db8::100/128"]);
        let be = connection(&p, v6, VipRole::Hosted, &fe_ids()).unwrap();
        assert_eq!(be.body.children["all"].remote_ts, ["::/0"]);
    }
}
