//! The kernel's IPsec: does it have ESP, and if not, can charon do without it.

use std::path::Path;

use super::Finding;
use super::keying::DaemonProbe;
use crate::config::{Config, KeyingBackend};

/// What the kernel shows of XFRM and ESP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelFacts {
    /// `/proc/net/xfrm_stat` exists: the kernel has XFRM.
    pub xfrm: bool,
    /// esp4 is loaded or built in (`/sys/module/esp4`, or its symbols in `/proc/kallsyms`).
    pub esp_loaded: bool,
    /// esp4 exists as a module the kernel can load on demand.
    pub esp_module: bool,
}

impl KernelFacts {
    pub fn has_esp(&self) -> bool {
        self.esp_loaded || self.esp_module
    }
}

pub fn probe() -> KernelFacts {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let module_dir = Path::new("/lib/modules")
        .join(release.trim())
        .join("kernel/net/ipv4");
    let esp_module = std::fs::read_dir(&module_dir)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("esp4.ko"))
        })
        .unwrap_or(false);
    // A built-in esp4 without parameters has no /sys/module entry; its symbols show.
    let esp_loaded = Path::new("/sys/module/esp4").exists()
        || std::fs::read_to_string("/proc/kallsyms")
            .map(|s| {
                s.lines()
                    .any(|l| l.ends_with(" esp_input") || l.contains(" esp_input\t"))
            })
            .unwrap_or(false);
    KernelFacts {
        xfrm: Path::new("/proc/net/xfrm_stat").exists(),
        esp_loaded,
        esp_module,
    }
}

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
