//! The cluster-wide IPsec policy: what traffic of a VIP is protected and how IKE is set
//! up, validated here and rendered into the strongSwan connection each node loads, so
//! both ends of an SA always agree (docs/policy.md describes the format).
//!
//! Pure: parsing, validation and rendering do no I/O; `keying::strongswan::loader`
//! carries the rendered connection to charon.

pub mod document;
pub mod proposals;
pub mod render;
pub mod secret;
pub mod template;

pub use document::{AuthMethod, Encapsulation, NatTraversal, ParsedPolicy, Policy};
pub use render::{ConnectionSpec, Identities, PSK_ID, connection, connection_names};
pub use secret::SecretKey;
pub use template::{Template, TrafficEntry, TrafficSpec};

use crate::model::{FlowDirection, ProtectedFlow, Vip, VipRole};

/// A policy document that cannot be used, naming the field and the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy document is not valid {format}: {detail}")]
    Syntax {
        format: &'static str,
        detail: String,
    },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl PolicyError {
    pub fn invalid(field: &str, message: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

impl Policy {
    /// The protected traffic: (protocol, port or every port), sorted, no duplicates.
    pub fn traffic(&self) -> Vec<TrafficEntry> {
        self.traffic_spec().entries()
    }

    /// The flows this node must never send in clear text for `vip`: a front-end
    /// ([`VipRole::Peer`]) toward the VIP's ports, a back-end ([`VipRole::Hosted`]) from
    /// them. They are exactly what the rendered connection's CHILD_SA carries, so the
    /// fail-secure block policies match the SAs on both sides.
    pub fn flows(&self, vip: Vip, role: VipRole) -> Vec<ProtectedFlow> {
        let direction = match role {
            VipRole::Peer => FlowDirection::ToVip,
            VipRole::Hosted => FlowDirection::FromVip,
        };
        self.traffic()
            .into_iter()
            .map(|e| ProtectedFlow {
                vip,
                protocol: e.protocol,
                port: e.port,
                direction,
            })
            .collect()
    }
}

/// Whether an SA that came up may stay, given the NAT charon detected (`nat-local`,
/// `nat-remote` of list-sas); `Err` says why it must be deleted.
///
/// `nat_local` is this node's own NAT as the peer saw it, and is trustworthy. With
/// forced encapsulation every peer fakes its NAT detection payload (that is how charon
/// forces UDP encapsulation), so `nat_remote` is then always set and means nothing: each
/// side judges only its own NAT, and between them both sides are covered.
pub fn nat_allowed(
    policy: &Policy,
    role: VipRole,
    nat_local: bool,
    nat_remote: bool,
) -> Result<(), String> {
    let nat_remote = nat_remote && policy.encapsulation == Encapsulation::Auto;
    let (client_nat, server_nat) = match role {
        VipRole::Peer => (nat_local, nat_remote),
        VipRole::Hosted => (nat_remote, nat_local),
    };
    let (client_ok, server_ok) = match policy.nat_traversal {
        NatTraversal::Never => (false, false),
        NatTraversal::Client => (true, false),
        NatTraversal::Server => (false, true),
        NatTraversal::Any => (true, true),
    };
    let rule = |side: &str| {
        format!(
            "the {side} side is behind NAT, which policy {:?} does not allow \
             (nat-traversal = {:?})",
            policy.name,
            serde_json::to_value(policy.nat_traversal)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        )
    };
    if client_nat && !client_ok {
        return Err(rule("client (front-end)"));
    }
    if server_nat && !server_ok {
        return Err(rule("server (VIP)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FlowProtocol;

    fn vip() -> Vip {
        "192.0.2.100".parse().unwrap()
    }

    #[test]
    fn flows_follow_the_role() {
        let p = Policy::from_template("m", Template::MailCredentials);
        let fe = p.flows(vip(), VipRole::Peer);
        assert_eq!(
            fe.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
            ["192.0.2.100:tcp/110", "192.0.2.100:tcp/143"]
        );
        let be = p.flows(vip(), VipRole::Hosted);
        assert!(be.iter().all(|f| f.direction == FlowDirection::FromVip));
        let all = Policy::from_template("a", Template::All).flows(vip(), VipRole::Peer);
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].protocol, all[0].port), (FlowProtocol::Any, None));
    }

    #[test]
    fn nat_rules_per_side() {
        let mut p = Policy::from_template("m", Template::Mail);
        p.encapsulation = Encapsulation::Auto;
        let ok = |p: &Policy, role, l, r| nat_allowed(p, role, l, r).is_ok();
        use VipRole::{Hosted, Peer};
        // never
        assert!(ok(&p, Peer, false, false));
        assert!(!ok(&p, Peer, true, false));
        assert!(!ok(&p, Hosted, false, true));
        // client: the front-end may be behind NAT, the VIP may not
        p.nat_traversal = NatTraversal::Client;
        assert!(ok(&p, Peer, true, false));
        assert!(ok(&p, Hosted, false, true));
        assert!(!ok(&p, Hosted, true, false));
        let e = nat_allowed(&p, Peer, false, true).unwrap_err();
        assert!(
            e.contains("server (VIP) side") && e.contains("\"client\""),
            "{e}"
        );
        // server
        p.nat_traversal = NatTraversal::Server;
        assert!(ok(&p, Hosted, true, false));
        assert!(!ok(&p, Peer, true, false));
        // any
        p.nat_traversal = NatTraversal::Any;
        assert!(ok(&p, Peer, true, true) && ok(&p, Hosted, true, true));
    }

    #[test]
    fn forced_encapsulation_ignores_the_faked_remote_nat() {
        let p = Policy::from_template("m", Template::Mail);
        assert_eq!(p.encapsulation, Encapsulation::Force);
        assert!(nat_allowed(&p, VipRole::Peer, false, true).is_ok());
        assert!(nat_allowed(&p, VipRole::Hosted, false, true).is_ok());
        assert!(nat_allowed(&p, VipRole::Peer, true, true).is_err());
        assert!(nat_allowed(&p, VipRole::Hosted, true, false).is_err());
    }
}
