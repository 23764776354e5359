//! `[policy]`: cluster-wide IPsec policies turned into the keying daemon's connections.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Config, KeyingBackend, Problems, StoreBackend};

/// Cluster-wide IPsec policies: the agent turns the policy of each VIP into strongSwan
/// connections, so every node agrees on ports, proposals and NAT handling.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Load the IKE connections of this node's VIPs from their policies (stored in the
    /// cluster store; with the embedded store, the `document`s below).
    #[serde(default)]
    pub managed: bool,
    /// This node's IKE identity; defaults to the node name. Front-ends require the owner
    /// of record's identity, so a node that is not the owner can never complete IKE.
    pub identity: Option<String>,
    /// File holding the pre-shared key (read at start-up; keep it root-only). Never
    /// logged, never shown by the API.
    pub psk_file: Option<PathBuf>,
    /// Install the routing rules a partial policy needs under charon's kernel-libipsec
    /// (docs/policy.md): unset, they are installed when the kernel has no ESP (so charon
    /// must be using kernel-libipsec).
    pub route_rules: Option<bool>,
    /// Policy documents for a single machine (embedded store); with etcd, policies live
    /// in the store (`vipsec policy apply`).
    #[serde(default, rename = "document")]
    pub documents: Vec<toml::Table>,
}

/// Checks `[policy]` against the sections it needs: the keying daemon it loads connections
/// into, the store its documents live in, the node name a back-end answers IKE as.
pub(super) fn validate(c: &Config, p: &mut Problems) {
    if c.policy.managed {
        if c.keying.backend != KeyingBackend::Strongswan {
            p.bad(
                "policy.managed",
                "needs keying.backend = \"strongswan\": the connections are loaded into charon",
            );
        }
        if c.policy.psk_file.is_none() {
            p.bad(
                "policy.psk_file",
                "missing: policy-managed connections authenticate with the pre-shared key in this file",
            );
        }
    }
    if !c.policy.documents.is_empty() && c.store.backend != StoreBackend::Embedded {
        p.bad(
            "policy.document",
            "only for the embedded store; with etcd, policies live in the store (vipsec policy apply)",
        );
    }
    if let Some(id) = &c.policy.identity {
        if id.trim().is_empty() {
            p.bad("policy.identity", "must not be empty");
        } else if *id != c.node && !c.hosted_vips.is_empty() {
            // Front-ends require the owner of record's identity, and the record names
            // the node: a back-end answers IKE as its node name.
            p.bad(
                "policy.identity",
                format!(
                    "{id:?} differs from node {:?}: a node hosting VIPs answers IKE as its node name (front-ends require the owner of record's name)",
                    c.node
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn policy_managed_settings_are_checked() {
        let managed = r#"
node = "be1"
[keying]
backend = "strongswan"
[kernel]
backend = "xfrm"
interface = "eth0"
[policy]
managed = true
identity = "be1.example"
[[hosted_vip]]
address = "192.0.2.100"
[[peer_vip]]
address = "192.0.2.200"
"#;
        let problems = Config::parse(managed).unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["policy.psk_file", "policy.identity"], "{problems:?}");
        let fixed = managed.replace(
            "identity = \"be1.example\"",
            "psk_file = \"/etc/vipsec/psk\"",
        );
        let c = Config::parse(&fixed).unwrap();
        assert!(c.policy_managed("192.0.2.200".parse().unwrap()));
        assert!(c.peer_protected("192.0.2.200".parse().unwrap()));
        let unmanaged = fixed.replace("managed = true", "managed = false");
        let problems = Config::parse(&unmanaged).unwrap_err();
        assert_eq!(problems[0].key, "peer_vip[0].connection", "{problems:?}");
    }
}
