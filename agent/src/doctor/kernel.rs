//! The kernel's IPsec: does it have ESP, and if not, can charon do without it.

use super::Finding;
use super::keying::DaemonProbe;
use crate::config::{Config, KeyingBackend};
pub use crate::host::{KernelFacts, probe};

pub fn finding(config: &Config, facts: &KernelFacts, daemon: &DaemonProbe) -> Finding {
    const CHECK: &str = "kernel.esp";
    if !facts.xfrm {
        return Finding::error(
            CHECK,
            "the kernel has no XFRM (/proc/net/xfrm_stat is missing): no IPsec policies, no fail-secure blocking",
            "use a kernel with CONFIG_XFRM and CONFIG_XFRM_USER",
        );
    }
    if facts.has_esp() {
        let how = if facts.esp_loaded {
            "loaded"
        } else {
            "available as a module"
        };
        return Finding::ok(CHECK, format!("the kernel has XFRM and ESP ({how})"));
    }
    let libipsec = daemon
        .as_ref()
        .ok()
        .and_then(|f| f.has_plugin("kernel-libipsec"));
    let summary = "the kernel has no ESP; charon must use kernel-libipsec with encap = yes";
    match (config.keying.backend, libipsec) {
        (_, Some(true)) => Finding::ok(
            CHECK,
            "the kernel has no ESP; charon has kernel-libipsec loaded (its connections need encap = yes, which VICI does not report: check swanctl.conf)",
        ),
        (KeyingBackend::None, _) => Finding::warning(
            CHECK,
            summary,
            "load kernel-libipsec in charon and set encap = yes in every connection",
        ),
        (KeyingBackend::Strongswan, Some(false)) => Finding::error(
            CHECK,
            format!("{summary}, and charon does not have kernel-libipsec loaded"),
            "add kernel-libipsec to charon's `load` line and set encap = yes in every connection",
        ),
        (KeyingBackend::Strongswan, None) => Finding::error(
            CHECK,
            format!("{summary}; charon's plugins could not be read"),
            "start charon with kernel-libipsec loaded and encap = yes in every connection",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Severity;
    use crate::doctor::keying::{DaemonFacts, DaemonProblem};

    fn config() -> Config {
        Config::parse("node = \"n\"\n[keying]\nbackend = \"strongswan\"\n").unwrap()
    }

    #[test]
    fn no_esp_needs_kernel_libipsec() {
        let no_esp = KernelFacts {
            xfrm: true,
            ..Default::default()
        };
        let mut facts = DaemonFacts {
            plugins: Ok(vec!["kernel-libipsec".into()]),
            ..Default::default()
        };
        assert_eq!(
            finding(&config(), &no_esp, &Ok(facts.clone())).severity,
            Severity::Ok
        );
        facts.plugins = Ok(vec!["kernel-netlink".into()]);
        let f = finding(&config(), &no_esp, &Ok(facts));
        assert_eq!(f.severity, Severity::Error);
        assert!(f.summary.contains("encap = yes"));
        assert_eq!(
            finding(&config(), &no_esp, &Err(DaemonProblem::Missing)).severity,
            Severity::Error
        );
        let with_esp = KernelFacts {
            xfrm: true,
            esp_module: true,
            ..Default::default()
        };
        assert_eq!(
            finding(&config(), &with_esp, &Err(DaemonProblem::Missing)).severity,
            Severity::Ok
        );
    }
}
