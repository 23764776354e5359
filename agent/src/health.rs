//! One verdict on the agent's health, read from its status: `vipsec health`, the gRPC health
//! service and anything else that answers "is this node fit to hold a VIP" use it, so they
//! never disagree.

use vipsec_proto::v1 as pb;

/// One part of the agent the failover depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPart {
    /// "store", "keying", "kernel", "ownership", "guard" or "runtime".
    pub name: &'static str,
    /// What implements it ("etcd", "strongswan", "xfrm", "records", ...).
    pub kind: String,
    pub healthy: bool,
    /// Why it is unhealthy; empty when it is healthy or there is nothing to say.
    pub detail: String,
}

/// The names of every part, in the order they are reported.
pub const PARTS: [&str; 6] = ["store", "keying", "kernel", "ownership", "guard", "runtime"];

/// Every part of a status, in [`PARTS`] order. A part the status does not carry (an older
/// agent) counts as healthy: absence is not evidence of a fault.
pub fn parts(s: &pb::Status) -> Vec<HealthPart> {
    let backend = |name: &'static str, h: &Option<pb::BackendHealth>| match h {
        Some(h) => HealthPart {
            name,
            kind: h.kind.clone(),
            healthy: h.healthy,
            detail: h.detail.clone(),
        },
        None => HealthPart {
            name,
            kind: String::new(),
            healthy: true,
            detail: String::new(),
        },
    };
    vec![
        backend("store", &s.store),
        backend("keying", &s.keying),
        backend("kernel", &s.kernel),
        backend("ownership", &s.ownership),
        guard(s),
        backend("runtime", &s.runtime),
    ]
}

/// The parts that are unhealthy, each as "name (kind) unhealthy: detail". An incomplete
/// guard already makes the kernel part unhealthy with the same words, so the guard part is
/// not listed twice; the verdict is the same either way.
pub fn problems(s: &pb::Status) -> Vec<String> {
    parts(s)
        .into_iter()
        .filter(|p| !p.healthy && p.name != "guard")
        .map(|p| {
            let detail = if p.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", p.detail)
            };
            format!("{} ({}) unhealthy{detail}", p.name, p.kind)
        })
        .collect()
}

/// The standing guard: unhealthy while a protected flow of any VIP is not refused by the
/// kernel outside IPsec ("partial" or "absent"). A leftover guard refuses more, not less.
fn guard(s: &pb::Status) -> HealthPart {
    let enabled = s.fail_secure.as_ref().is_some_and(|f| f.enabled);
    let mut missing = Vec::new();
    let vips = s
        .hosted_vips
        .iter()
        .map(|h| (&h.address, &h.guard))
        .chain(s.peer_vips.iter().map(|p| (&p.address, &p.guard)));
    for (address, g) in vips {
        let Some(g) = g else { continue };
        if g.state == "partial" || g.state == "absent" {
            let why = if g.detail.is_empty() {
                String::new()
            } else {
                format!(", {}", g.detail)
            };
            missing.push(format!(
                "{address} {} ({} of {} held{why})",
                g.state, g.installed, g.flows
            ));
        }
    }
    HealthPart {
        name: "guard",
        kind: if enabled { "standing" } else { "off" }.into(),
        healthy: missing.is_empty(),
        detail: missing.join("; "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(kind: &str, healthy: bool, detail: &str) -> Option<pb::BackendHealth> {
        Some(pb::BackendHealth {
            kind: kind.into(),
            healthy,
            detail: detail.into(),
            since: None,
        })
    }

    fn healthy_status() -> pb::Status {
        pb::Status {
            store: health("etcd", true, ""),
            keying: health("strongswan", true, ""),
            kernel: health("xfrm", true, ""),
            ownership: health("records", true, ""),
            runtime: health("tasks", true, ""),
            fail_secure: Some(pb::FailSecure {
                enabled: true,
                engaged: true,
                since: None,
                flows: 2,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_healthy_status_has_no_problems() {
        let s = healthy_status();
        assert!(problems(&s).is_empty());
        let names: Vec<_> = parts(&s).iter().map(|p| p.name).collect();
        assert_eq!(names, PARTS);
    }

    #[test]
    fn each_unhealthy_backend_is_named_with_its_detail() {
        let mut s = healthy_status();
        s.store = health("etcd", false, "connection refused");
        s.runtime = health("tasks", false, "addrwatch restarting");
        assert_eq!(
            problems(&s),
            vec![
                "store (etcd) unhealthy: connection refused".to_string(),
                "runtime (tasks) unhealthy: addrwatch restarting".to_string(),
            ]
        );
    }

    #[test]
    fn a_missing_guard_is_unhealthy_and_a_leftover_one_is_not() {
        let mut s = healthy_status();
        let guard = |state: &str, installed| {
            Some(pb::VipGuard {
                state: state.into(),
                flows: 2,
                installed,
                detail: if installed == 0 {
                    "policy flushed".into()
                } else {
                    String::new()
                },
                ..Default::default()
            })
        };
        s.hosted_vips.push(pb::HostedVip {
            address: "192.0.2.100".into(),
            guard: guard("leftover", 2),
            ..Default::default()
        });
        assert!(problems(&s).is_empty());
        s.peer_vips.push(pb::PeerVip {
            address: "192.0.2.200".into(),
            guard: guard("absent", 0),
            ..Default::default()
        });
        let guard = parts(&s).into_iter().find(|p| p.name == "guard").unwrap();
        assert!(!guard.healthy);
        assert_eq!(
            guard.detail,
            "192.0.2.200 absent (0 of 2 held, policy flushed)"
        );
        // The agent reports the same under its kernel part: named once, not twice.
        s.kernel = health(
            "xfrm",
            false,
            "guard of 192.0.2.200 absent (0 of 2 in the kernel): policy flushed",
        );
        assert_eq!(problems(&s).len(), 1, "{:?}", problems(&s));
    }

    #[test]
    fn parts_an_older_agent_does_not_report_count_as_healthy() {
        let mut s = healthy_status();
        s.runtime = None;
        s.ownership = None;
        assert!(problems(&s).is_empty());
    }
}
