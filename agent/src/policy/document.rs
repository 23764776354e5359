//! The policy document as stored (JSON in the cluster store, TOML in operators' files),
//! its parsing with unknown-field detection, and its validation.

use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::PolicyError;
use super::proposals::{ProposalKind, check_proposal};
use super::template::{Template, TrafficEntry, TrafficSpec};

/// Longest policy name; it is part of charon connection names.
pub const MAX_NAME_LEN: usize = 32;

/// Every top-level key this version of vipsec knows; anything else is a newer vipsec's.
pub const KNOWN_FIELDS: [&str; 14] = [
    "name",
    "vips",
    "template",
    "ports",
    "ike-proposals",
    "esp-proposals",
    "nat-traversal",
    "encapsulation",
    "auth",
    "version",
    "frontend-networks",
    "dpd-delay",
    "rekey-time",
    "ike-lifetime",
];

/// A cluster-wide IPsec policy: what traffic of a VIP is protected and how IKE is set
/// up, the same on every node so both ends of an SA always agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Policy {
    /// `[a-z0-9-]`, at most 32 characters; names the charon connections.
    pub name: String,
    /// The VIPs this policy protects: every node hosting or talking to one of them loads
    /// the policy's connection for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<std::net::IpAddr>,
    /// A named set of ports; exactly one of `template` and `ports` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<Template>,
    /// A custom list: `tcp/110`, `udp/53`, `tcp` (every TCP port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<TrafficEntry>>,
    #[serde(default = "default_ike_proposals")]
    pub ike_proposals: Vec<String>,
    #[serde(default = "default_esp_proposals")]
    pub esp_proposals: Vec<String>,
    #[serde(default)]
    pub nat_traversal: NatTraversal,
    #[serde(default)]
    pub encapsulation: Encapsulation,
    #[serde(default)]
    pub auth: AuthMethod,
    /// Managed by the store (a revision); carried, never interpreted here.
    #[serde(default)]
    pub version: u64,
    /// Networks a back-end accepts front-ends from (remote traffic selectors); empty
    /// means any address of the VIP's family.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "net_strings")]
    pub frontend_networks: Vec<IpNet>,
    /// Dead-peer detection interval of the IKE_SA (a backstop: the agent detects a
    /// moved VIP much sooner).
    #[serde(default = "default_dpd_delay", with = "humantime_serde")]
    pub dpd_delay: Duration,
    /// How often a CHILD_SA is rekeyed.
    #[serde(default = "default_rekey_time", with = "humantime_serde")]
    pub rekey_time: Duration,
    /// How often the IKE_SA is rekeyed (its keys' lifetime).
    #[serde(default = "default_ike_lifetime", with = "humantime_serde")]
    pub ike_lifetime: Duration,
}

/// Whether SAs may be built when NAT is found between a front-end (the client) and the
/// VIP (the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NatTraversal {
    /// Never: an SA with NAT on either side is deleted.
    #[default]
    Never,
    /// Only the client (front-end) side may be behind NAT.
    Client,
    /// Only the server (the VIP's side) may be behind NAT.
    Server,
    /// Either side or both may be behind NAT.
    Any,
}

impl std::fmt::Display for NatTraversal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NatTraversal::Never => "never",
            NatTraversal::Client => "client",
            NatTraversal::Server => "server",
            NatTraversal::Any => "any",
        })
    }
}

/// UDP encapsulation of ESP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Encapsulation {
    /// Only when NAT is detected.
    Auto,
    /// Always (ESP in UDP 4500). The default: charon's kernel-libipsec, needed on kernels
    /// without ESP, works only this way.
    #[default]
    Force,
}

/// How IKE peers authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// A pre-shared key, node-local (never in the policy): each node's config names a file.
    #[default]
    Psk,
    /// X.509 certificates (RSA: Debian's charon has no ECDSA without its openssl plugin):
    /// each node has its own certificate and key (node-local files) and trusts the
    /// cluster's CA certificates; peers must present a certificate issued by one of them.
    Pubkey,
}

pub fn default_ike_proposals() -> Vec<String> {
    // charon 5.9.8 on Debian 12 without its openssl plugin (installed without
    // recommends) has no ECP groups, no Curve25519 and no GCM: MODP from gmp and CBC/HMAC
    // from aes/sha2/hmac are what negotiate everywhere.
    vec!["aes256-sha256-modp3072".into()]
}

pub fn default_esp_proposals() -> Vec<String> {
    // PFS with the IKE group: a rekeyed CHILD_SA gets fresh DH keys.
    vec!["aes256-sha256-modp3072".into()]
}

fn default_dpd_delay() -> Duration {
    Duration::from_secs(30)
}

fn default_rekey_time() -> Duration {
    Duration::from_secs(3600)
}

fn default_ike_lifetime() -> Duration {
    Duration::from_secs(4 * 3600)
}

/// A parsed, valid policy and the top-level fields this vipsec did not know (sorted). A
/// policy with unknown fields was written by a newer vipsec: show it, never overwrite it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedPolicy {
    pub policy: Policy,
    pub unknown_fields: Vec<String>,
}

impl Policy {
    /// A policy protecting `template` with every other field at its default.
    pub fn from_template(name: &str, template: Template) -> Policy {
        Policy {
            name: name.to_string(),
            vips: Vec::new(),
            template: Some(template),
            ports: None,
            ike_proposals: default_ike_proposals(),
            esp_proposals: default_esp_proposals(),
            nat_traversal: NatTraversal::default(),
            encapsulation: Encapsulation::default(),
            auth: AuthMethod::default(),
            version: 0,
            frontend_networks: Vec::new(),
            dpd_delay: default_dpd_delay(),
            rekey_time: default_rekey_time(),
            ike_lifetime: default_ike_lifetime(),
        }
    }

    /// Parses and validates a JSON document (the store's format).
    pub fn parse_json(text: &str) -> Result<ParsedPolicy, PolicyError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| PolicyError::Syntax {
                format: "JSON",
                detail: e.to_string(),
            })?;
        Self::from_value(value)
    }

    /// Parses and validates a TOML document (operators' files).
    pub fn parse_toml(text: &str) -> Result<ParsedPolicy, PolicyError> {
        let value: toml::Value = toml::from_str(text).map_err(|e| PolicyError::Syntax {
            format: "TOML",
            detail: e.to_string(),
        })?;
        let value = serde_json::to_value(value).map_err(|e| PolicyError::Syntax {
            format: "TOML",
            detail: e.to_string(),
        })?;
        Self::from_value(value)
    }

    /// Parses and validates a document already read into a JSON value.
    pub fn from_value(value: serde_json::Value) -> Result<ParsedPolicy, PolicyError> {
        let serde_json::Value::Object(mut map) = value else {
            return Err(PolicyError::invalid(
                "(document)",
                "a policy is a table/object of fields",
            ));
        };
        let unknown_fields: Vec<String> = map
            .keys()
            .filter(|k| !KNOWN_FIELDS.contains(&k.as_str()))
            .cloned()
            .collect();
        // Unknown fields are reported, not parsed: their shape is the newer version's.
        map.retain(|k, _| KNOWN_FIELDS.contains(&k.as_str()));
        let policy: Policy = serde_path_to_error::deserialize(serde_json::Value::Object(map))
            .map_err(|e| {
                let path = e.path().to_string();
                let field = if path == "." {
                    "(document)".to_string()
                } else {
                    path
                };
                PolicyError::invalid(&field, e.into_inner().to_string())
            })?;
        policy.validate()?;
        Ok(ParsedPolicy {
            policy,
            unknown_fields,
        })
    }

    /// The JSON document the store holds.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a policy always serialises")
    }

    /// Checks everything serde's types do not: the name, exactly one of template and
    /// ports, the DH floor of every proposal, and sane durations.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.name.is_empty() || self.name.len() > MAX_NAME_LEN {
            return Err(PolicyError::invalid(
                "name",
                format!("{:?} must be 1 to {MAX_NAME_LEN} characters", self.name),
            ));
        }
        if let Some(c) = self
            .name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(PolicyError::invalid(
                "name",
                format!(
                    "{:?} has {c:?}; only a-z, 0-9 and '-' are allowed",
                    self.name
                ),
            ));
        }
        match (&self.template, &self.ports) {
            (Some(_), Some(_)) => {
                return Err(PolicyError::invalid(
                    "template",
                    "give either template or ports, not both",
                ));
            }
            (None, None) => {
                return Err(PolicyError::invalid(
                    "template",
                    format!(
                        "missing: give template (one of {}) or ports (e.g. [\"tcp/110\"])",
                        Template::ALL_NAMES.join(", ")
                    ),
                ));
            }
            (None, Some(p)) if p.is_empty() => {
                return Err(PolicyError::invalid(
                    "ports",
                    "empty list (a policy protects at least one port or protocol)",
                ));
            }
            _ => {}
        }
        check_proposals("ike-proposals", ProposalKind::Ike, &self.ike_proposals)?;
        check_proposals("esp-proposals", ProposalKind::Esp, &self.esp_proposals)?;
        if self.dpd_delay < Duration::from_secs(1) {
            return Err(PolicyError::invalid(
                "dpd-delay",
                format!("{:?} is below 1s", self.dpd_delay),
            ));
        }
        for (field, d) in [
            ("rekey-time", self.rekey_time),
            ("ike-lifetime", self.ike_lifetime),
        ] {
            if d < Duration::from_secs(60) {
                return Err(PolicyError::invalid(
                    field,
                    format!("{d:?} is below 1m (rekeying that often would storm charon)"),
                ));
            }
        }
        Ok(())
    }

    /// Checks that this node's charon can negotiate every DH group the policy names;
    /// `methods` are charon's key-exchange methods (`Keying::key_exchange_methods`,
    /// e.g. `MODP_3072`). A group can pass the floor and still be missing (no ECP without
    /// charon's openssl plugin): charon would load the connection and fail at initiate.
    pub fn check_supported(&self, methods: &[String]) -> Result<(), PolicyError> {
        for (field, kind, proposals) in [
            ("ike-proposals", ProposalKind::Ike, &self.ike_proposals),
            ("esp-proposals", ProposalKind::Esp, &self.esp_proposals),
        ] {
            for (i, p) in proposals.iter().enumerate() {
                let groups = check_proposal(kind, p)
                    .map_err(|why| PolicyError::invalid(&format!("{field}[{i}] {p:?}"), why))?;
                if let Some(g) = groups.iter().find(|g| !methods.contains(&g.charon_name())) {
                    return Err(PolicyError::invalid(
                        &format!("{field}[{i}] {p:?}"),
                        format!(
                            "DH group {g} ({}) is not available in this node's charon \
                             (it has: {})",
                            g.charon_name(),
                            methods.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// What the policy protects.
    pub fn traffic_spec(&self) -> TrafficSpec {
        match (&self.template, &self.ports) {
            (Some(t), _) => TrafficSpec::Template(*t),
            (None, Some(p)) => TrafficSpec::Ports(p.clone()),
            // validate() refuses this; an unvalidated policy protects nothing.
            (None, None) => TrafficSpec::Ports(Vec::new()),
        }
    }
}

/// CIDR strings (the workspace builds ipnet without its serde feature).
mod net_strings {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(nets.iter().map(|n| n.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        #[derive(Deserialize)]
        struct Net(#[serde(deserialize_with = "one")] IpNet);
        fn one<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
            let s = String::deserialize(d)?;
            s.parse()
                .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a CIDR network: {e}")))
        }
        Ok(Vec::<Net>::deserialize(d)?
            .into_iter()
            .map(|n| n.0)
            .collect())
    }
}

fn check_proposals(
    field: &str,
    kind: ProposalKind,
    proposals: &[String],
) -> Result<(), PolicyError> {
    if proposals.is_empty() {
        return Err(PolicyError::invalid(field, "empty list"));
    }
    for (i, p) in proposals.iter().enumerate() {
        check_proposal(kind, p)
            .map_err(|why| PolicyError::invalid(&format!("{field}[{i}] {p:?}"), why))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_document_takes_the_defaults() {
        let p = Policy::parse_json(r#"{"name":"m","template":"mail"}"#).unwrap();
        assert!(p.unknown_fields.is_empty());
        assert_eq!(p.policy, Policy::from_template("m", Template::Mail));
        assert_eq!(p.policy.encapsulation, Encapsulation::Force);
        assert_eq!(p.policy.nat_traversal, NatTraversal::Never);
    }

    #[test]
    fn unknown_fields_are_reported_not_dropped_silently() {
        let p = Policy::parse_json(r#"{"name":"m","template":"mail","future-knob":1}"#).unwrap();
        assert_eq!(p.unknown_fields, ["future-knob"]);
        assert_eq!(p.policy.template, Some(Template::Mail));
    }

    #[test]
    fn json_round_trips() {
        let mut p = Policy::from_template("m", Template::Directory);
        p.frontend_networks = vec!["192.0.2.0/24".parse().unwrap()];
        p.version = 7;
        let back = Policy::parse_json(&p.to_json()).unwrap();
        assert_eq!(back.policy, p);
        assert!(back.unknown_fields.is_empty());
    }

    #[test]
    fn known_fields_are_exactly_the_serialised_ones() {
        let mut p = Policy::from_template("m", Template::Mail);
        p.frontend_networks = vec!["192.0.2.0/24".parse().unwrap()];
        p.vips = vec!["192.0.2.100".parse().unwrap()];
        let mut keys: Vec<String> = Vec::new();
        for doc in [
            p.clone(),
            Policy {
                template: None,
                ports: Some(vec![]),
                ..p
            },
        ] {
            let v = serde_json::to_value(&doc).unwrap();
            keys.extend(v.as_object().unwrap().keys().cloned());
        }
        keys.sort();
        keys.dedup();
        let mut known: Vec<String> = KNOWN_FIELDS.iter().map(|s| s.to_string()).collect();
        known.sort();
        assert_eq!(keys, known);
    }

    #[test]
    fn toml_is_accepted_too() {
        let p = Policy::parse_toml(
            r#"
name = "dir"
ports = ["tcp/389", "udp"]
ike-proposals = ["aes256-sha256-modp4096"]
nat-traversal = "client"
encapsulation = "auto"
dpd-delay = "5s"
rekey-time = "30m"
frontend-networks = ["198.51.100.0/24"]
"#,
        )
        .unwrap()
        .policy;
        assert_eq!(p.nat_traversal, NatTraversal::Client);
        assert_eq!(p.encapsulation, Encapsulation::Auto);
        assert_eq!(p.dpd_delay, Duration::from_secs(5));
        assert_eq!(p.rekey_time, Duration::from_secs(1800));
        assert_eq!(p.ports.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn example_policy_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/examples/policy-mail.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let p = Policy::parse_toml(&text).unwrap();
        assert!(p.unknown_fields.is_empty());
        assert_eq!(p.policy.template, Some(Template::MailCredentials));
    }

    fn err(doc: &str) -> String {
        Policy::parse_json(doc).unwrap_err().to_string()
    }

    #[test]
    fn bad_values_name_the_field_and_the_value() {
        let e = err(r#"{"name":"m","template":"mailx"}"#);
        assert!(e.starts_with("template: ") && e.contains("mailx"), "{e}");
        let e = err(r#"{"name":"m","ports":["tcp/110","tcp/99999"]}"#);
        assert!(e.starts_with("ports[1]: ") && e.contains("99999"), "{e}");
        let e = err(r#"{"name":"m","template":"mail","nat-traversal":"sometimes"}"#);
        assert!(
            e.starts_with("nat-traversal: ") && e.contains("sometimes"),
            "{e}"
        );
        let e = err(r#"{"name":"m","template":"mail","dpd-delay":"soon"}"#);
        assert!(e.starts_with("dpd-delay: "), "{e}");
        let e = err(r#"{"name":"m","template":"mail","frontend-networks":["10.0.0.0/33"]}"#);
        assert!(e.starts_with("frontend-networks[0]: "), "{e}");
        let e = err(r#"{"name":"Mail!","template":"mail"}"#);
        assert!(e.starts_with("name: ") && e.contains("Mail!"), "{e}");
        let e = err(r#"{"template":"mail"}"#);
        assert!(e.contains("missing field `name`"), "{e}");
        assert!(err(r#"{"name":"m"}"#).starts_with("template: missing"));
        assert!(err(r#"{"name":"m","template":"mail","ports":["tcp"]}"#).contains("not both"));
        assert!(err("[1]").contains("(document)"));
        assert!(err("{").contains("not valid JSON"));
    }

    #[test]
    fn check_supported_names_the_missing_group() {
        let methods: Vec<String> = ["MODP_2048", "MODP_3072"].map(String::from).to_vec();
        let mut p = Policy::from_template("m", Template::Mail);
        p.check_supported(&methods).unwrap();
        p.esp_proposals = vec!["aes256-sha256".into(), "aes256-sha256-curve25519".into()];
        let e = p.check_supported(&methods).unwrap_err().to_string();
        assert!(
            e.starts_with("esp-proposals[1] \"aes256-sha256-curve25519\": DH group curve25519 (CURVE_25519) is not available"),
            "{e}"
        );
    }

    #[test]
    fn weak_proposals_are_refused_with_index_proposal_group_and_floor() {
        let e = err(r#"{"name":"m","template":"mail",
                "ike-proposals":["aes256-sha256-modp3072","aes128-sha1-modp1024"]}"#);
        assert_eq!(
            e,
            "ike-proposals[1] \"aes128-sha1-modp1024\": DH group modp1024 is 1024 bits, \
             below the 2048-bit floor"
        );
        let e = err(r#"{"name":"m","template":"mail","esp-proposals":["aes256-sha256-ecp224"]}"#);
        assert!(e.starts_with("esp-proposals[0] \"aes256-sha256-ecp224\": DH group ecp224"));
        let e = err(r#"{"name":"m","template":"mail","ike-proposals":["aes256-sha256"]}"#);
        assert!(e.contains("no DH group"), "{e}");
        let e = err(r#"{"name":"m","template":"mail","ike-proposals":[]}"#);
        assert_eq!(e, "ike-proposals: empty list");
    }
}
