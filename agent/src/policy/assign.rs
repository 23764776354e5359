//! Which stored policy governs each VIP of this node. Pure: the runtime feeds it the
//! documents it read from the store and what was in force before.
//!
//! A document that cannot be applied (invalid, or written by a newer vipsec with fields
//! this one does not know) never reaches charon: the VIP keeps the policy in force
//! before, and the reason is shown.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{ParsedPolicy, Policy};
use crate::model::{Vip, VipRole};
use crate::store::policies::StoredPolicy;

/// How a VIP's policy stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum PolicyState {
    /// The stored document is the one in force.
    Applied,
    /// No stored policy lists the VIP.
    Missing,
    /// The stored document is invalid; the policy in force before stays.
    Invalid { error: String },
    /// Written by a newer vipsec: shown read-only, never applied or overwritten here.
    NotUnderstood { fields: Vec<String> },
    /// More than one policy lists the VIP.
    Conflict { policies: Vec<String> },
}

impl PolicyState {
    pub fn as_str(&self) -> &'static str {
        match self {
            PolicyState::Applied => "applied",
            PolicyState::Missing => "missing",
            PolicyState::Invalid { .. } => "invalid",
            PolicyState::NotUnderstood { .. } => "not-understood",
            PolicyState::Conflict { .. } => "conflict",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            PolicyState::Applied => String::new(),
            PolicyState::Missing => "no stored policy lists this VIP".into(),
            PolicyState::Invalid { error } => format!("stored document refused: {error}"),
            PolicyState::NotUnderstood { fields } => format!(
                "written by a newer vipsec (unknown fields: {}); shown read-only, not applied",
                fields.join(", ")
            ),
            PolicyState::Conflict { policies } => {
                format!("listed by more than one policy: {}", policies.join(", "))
            }
        }
    }
}

/// The policy of one VIP of this node.
#[derive(Debug, Clone, PartialEq)]
pub struct VipPolicy {
    pub vip: Vip,
    pub role: VipRole,
    /// The policy in force (the stored one when applied, else the one before), if any.
    pub policy: Option<Policy>,
    /// Version and source of the policy in force.
    pub version: u64,
    pub source: String,
    /// The stored document's name and version, when one lists the VIP.
    pub stored: Option<(String, u64)>,
    pub state: PolicyState,
}

/// One stored document as this version reads it.
#[derive(Debug, Clone)]
pub struct ReadDocument {
    pub stored: StoredPolicy,
    pub parsed: Result<ParsedPolicy, String>,
    /// The VIPs it lists (read loosely when the document is invalid, to say which VIPs
    /// the refusal concerns).
    pub vips: Vec<Vip>,
}

pub fn read(stored: &StoredPolicy) -> ReadDocument {
    let parsed = Policy::parse_json(&stored.raw).map_err(|e| e.to_string());
    let vips = match &parsed {
        Ok(p) => p.policy.vips.clone(),
        // Entry by entry: one malformed address must not hide the others.
        Err(_) => serde_json::from_str::<serde_json::Value>(&stored.raw)
            .ok()
            .and_then(|v| v.get("vips").and_then(|l| l.as_array()).cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v.as_str().and_then(|s| s.trim().parse().ok()))
            .collect(),
    };
    ReadDocument {
        stored: stored.clone(),
        parsed,
        vips,
    }
}

/// Assigns each VIP its policy.
pub fn assign(
    docs: &[ReadDocument],
    vips: &[(Vip, VipRole)],
    previous: &BTreeMap<Vip, VipPolicy>,
) -> BTreeMap<Vip, VipPolicy> {
    let mut out = BTreeMap::new();
    for &(vip, role) in vips {
        let listing: Vec<&ReadDocument> = docs.iter().filter(|d| d.vips.contains(&vip)).collect();
        let before = previous.get(&vip).filter(|p| p.policy.is_some());
        let keep = |state: PolicyState, stored: Option<(String, u64)>| VipPolicy {
            vip,
            role,
            policy: before.and_then(|b| b.policy.clone()),
            version: before.map_or(0, |b| b.version),
            source: before.map_or_else(String::new, |b| b.source.clone()),
            stored,
            state,
        };
        // The document that governed the VIP is still stored but cannot be read now (it
        // lists nothing readable): refused like any invalid document, not "missing".
        let unreadable_governor = before.and_then(|b| {
            let name = &b.policy.as_ref()?.name;
            docs.iter()
                .find(|d| d.stored.name == *name && d.parsed.is_err() && !d.vips.contains(&vip))
        });
        let entry = match listing.as_slice() {
            [] if unreadable_governor.is_some() => {
                let d = unreadable_governor.expect("checked");
                keep(
                    PolicyState::Invalid {
                        error: d.parsed.clone().err().unwrap_or_default(),
                    },
                    Some((d.stored.name.clone(), d.stored.version)),
                )
            }
            [] => VipPolicy {
                vip,
                role,
                policy: None,
                version: 0,
                source: String::new(),
                stored: None,
                state: PolicyState::Missing,
            },
            [doc] => {
                let stored = Some((doc.stored.name.clone(), doc.stored.version));
                match &doc.parsed {
                    Err(error) => keep(
                        PolicyState::Invalid {
                            error: error.clone(),
                        },
                        stored,
                    ),
                    Ok(p) if !p.unknown_fields.is_empty() => keep(
                        PolicyState::NotUnderstood {
                            fields: p.unknown_fields.clone(),
                        },
                        stored,
                    ),
                    Ok(p) => VipPolicy {
                        vip,
                        role,
                        policy: Some(p.policy.clone()),
                        version: doc.stored.version,
                        source: doc.stored.source.clone(),
                        stored,
                        state: PolicyState::Applied,
                    },
                }
            }
            many => keep(
                PolicyState::Conflict {
                    policies: many.iter().map(|d| d.stored.name.clone()).collect(),
                },
                None,
            ),
        };
        out.insert(vip, entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIP: &str = "192.0.2.100";

    fn doc(name: &str, raw: &str, version: u64) -> ReadDocument {
        read(&StoredPolicy {
            name: name.into(),
            raw: raw.into(),
            version,
            source: format!("etcd /vipsec/policies/{name}"),
        })
    }

    fn vips() -> Vec<(Vip, VipRole)> {
        vec![(VIP.parse().unwrap(), VipRole::Peer)]
    }

    #[test]
    fn a_stored_policy_listing_the_vip_is_applied() {
        let d = doc(
            "mail",
            r#"{"name":"mail","vips":["192.0.2.100"],"template":"mail"}"#,
            3,
        );
        let a = assign(&[d], &vips(), &BTreeMap::new());
        let p = &a[&VIP.parse::<Vip>().unwrap()];
        assert_eq!(p.state, PolicyState::Applied);
        assert_eq!(p.version, 3);
        assert_eq!(p.policy.as_ref().unwrap().name, "mail");
    }

    #[test]
    fn a_bad_or_newer_document_keeps_the_policy_in_force() {
        let good = doc(
            "mail",
            r#"{"name":"mail","vips":["192.0.2.100"],"template":"mail"}"#,
            1,
        );
        let first = assign(&[good], &vips(), &BTreeMap::new());

        let weak = doc(
            "mail",
            r#"{"name":"mail","vips":["192.0.2.100"],"template":"mail","ike-proposals":["aes128-sha256-modp1024"]}"#,
            2,
        );
        let a = assign(&[weak], &vips(), &first);
        let p = a.values().next().unwrap();
        assert!(
            matches!(&p.state, PolicyState::Invalid { error } if error.contains("modp1024")),
            "{p:?}"
        );
        assert_eq!(p.version, 1, "version 1 stays in force");
        assert_eq!(p.stored, Some(("mail".into(), 2)));

        let newer = doc(
            "mail",
            r#"{"name":"mail","vips":["192.0.2.100"],"template":"mail","quantum-safe":true}"#,
            3,
        );
        let a = assign(&[newer], &vips(), &first);
        let p = a.values().next().unwrap();
        assert_eq!(
            p.state,
            PolicyState::NotUnderstood {
                fields: vec!["quantum-safe".into()]
            }
        );
        assert_eq!(p.version, 1);
    }

    #[test]
    fn an_unreadable_document_that_governed_the_vip_keeps_its_policy() {
        let good = doc(
            "mail",
            r#"{"name":"mail","vips":["192.0.2.100"],"template":"mail"}"#,
            1,
        );
        let first = assign(&[good], &vips(), &BTreeMap::new());
        for raw in [
            r#"{"name":"mail","vips":["192.0.2.100", "not-an-ip"],"template":"mail","ports":["x"]}"#,
            r#"{"name":"mail","vips":"192.0.2.100","template":"mail"}"#,
            "not json at all",
        ] {
            let a = assign(&[doc("mail", raw, 2)], &vips(), &first);
            let p = a.values().next().unwrap();
            assert!(
                matches!(p.state, PolicyState::Invalid { .. }),
                "{raw}: {p:?}"
            );
            assert_eq!(p.version, 1, "{raw}");
            assert!(p.policy.is_some());
        }
    }

    #[test]
    fn two_policies_listing_one_vip_are_a_conflict_and_none_lists_it_is_missing() {
        let a1 = doc(
            "a",
            r#"{"name":"a","vips":["192.0.2.100"],"template":"mail"}"#,
            1,
        );
        let a2 = doc(
            "b",
            r#"{"name":"b","vips":["192.0.2.100"],"template":"all"}"#,
            1,
        );
        let a = assign(&[a1, a2], &vips(), &BTreeMap::new());
        assert!(matches!(
            a.values().next().unwrap().state,
            PolicyState::Conflict { .. }
        ));
        let other = doc(
            "c",
            r#"{"name":"c","vips":["192.0.2.7"],"template":"mail"}"#,
            1,
        );
        let a = assign(&[other], &vips(), &BTreeMap::new());
        assert_eq!(a.values().next().unwrap().state, PolicyState::Missing);
    }
}
