//! `vipsec doctor`: a preflight check of everything on this node that would break
//! failover, run without the agent.
//!
//! Each check family gathers facts with a thin probe (a socket connect, a VICI request,
//! an etcd read, `nft -j list ruleset`, netlink) and turns them into findings with a pure
//! function, which is where the decisions are made and tested. Every check yields a
//! finding even when all is well, so the operator sees what was looked at.

pub mod consistency;
pub mod firewall;
pub mod guard;
pub mod kernel;
pub mod keying;
pub mod nft;
pub mod store;

use serde::Serialize;

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    /// Worth a look; failover still works.
    Warning,
    /// Failover would break.
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One thing the doctor checked, what it found and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Which check, e.g. `firewall.nat-t` or `keying.connection[192.0.2.100]`; unique in
    /// one run.
    pub check: String,
    pub severity: Severity,
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remedy: Option<String>,
}

impl Finding {
    pub fn ok(check: impl Into<String>, summary: impl Into<String>) -> Finding {
        Finding {
            check: check.into(),
            severity: Severity::Ok,
            summary: summary.into(),
            remedy: None,
        }
    }

    pub fn warning(
        check: impl Into<String>,
        summary: impl Into<String>,
        remedy: impl Into<String>,
    ) -> Finding {
        Finding {
            check: check.into(),
            severity: Severity::Warning,
            summary: summary.into(),
            remedy: Some(remedy.into()),
        }
    }

    pub fn error(
        check: impl Into<String>,
        summary: impl Into<String>,
        remedy: impl Into<String>,
    ) -> Finding {
        Finding {
            check: check.into(),
            severity: Severity::Error,
            summary: summary.into(),
            remedy: Some(remedy.into()),
        }
    }
}

/// The config finding: it loaded and validated (a config that does not is no finding but
/// the doctor's own failure).
pub fn config_finding(config: &Config) -> Finding {
    Finding::ok(
        "config",
        format!(
            "node {}, {} hosted VIP(s), {} peer VIP(s); keying {:?}, store {:?}, kernel {:?}",
            config.node,
            config.hosted_vips.len(),
            config.peer_vips.len(),
            config.keying.backend,
            config.store.backend,
            config.kernel.backend
        )
        .to_lowercase(),
    )
}

/// Runs every check against this node.
pub async fn run(config: &Config) -> Vec<Finding> {
    let mut findings = vec![config_finding(config)];
    let daemon = keying::probe(&config.keying.vici_socket).await;
    findings.extend(keying::findings(config, &daemon));
    let guard_facts = guard::probe(config).await;
    findings.extend(guard::trap_findings(config, &daemon, &guard_facts));
    findings.extend(store::check(config).await);
    findings.extend(consistency::check(config).await);
    let kernel_facts = kernel::probe();
    findings.push(kernel::finding(config, &kernel_facts, &daemon));
    findings.extend(guard::guard_findings(config, &guard_facts));
    findings.extend(firewall::check(config, kernel_facts.has_esp()).await);
    findings
}

/// The worst severity found (Ok when there are no findings).
pub fn worst(findings: &[Finding]) -> Severity {
    findings
        .iter()
        .map(|f| f.severity)
        .max()
        .unwrap_or(Severity::Ok)
}
