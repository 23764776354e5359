//! `[kernel]`: the standing clear-text guard.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Config, Problems, default_true};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KernelBackend {
    #[default]
    None,
    /// Linux XFRM over netlink.
    Xfrm,
}

/// The kernel backend: the standing clear-text guard (XFRM block policies, routing rules).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// `xfrm` keeps the standing guard in the kernel (needs CAP_NET_ADMIN). A config with
    /// protected flows (`protect`, or `policy.managed`) and `none` is refused, naming the
    /// VIPs, unless `kernel.fail_secure = false` says so on purpose.
    #[serde(default)]
    pub backend: KernelBackend,
    /// The standing guard: every protected flow is refused by the kernel outside IPsec,
    /// from the agent's start (or `vipsec guard install` at boot) on, whatever the keying
    /// daemon's connections say, and left in place when the agent stops. Turn it off only
    /// where availability beats confidentiality; a guard already in the kernel then stays
    /// until `vipsec guard remove`.
    #[serde(default = "default_true")]
    pub fail_secure: bool,
    /// Bind block policies to this interface. With charon's kernel-libipsec the tunnel's
    /// own packets pass the kernel's policy lookup too; binding the block to the physical
    /// interface lets them through while clear text on that interface is refused.
    /// IPv6 cannot bind a policy that way (its flows carry no output interface at policy
    /// lookup): under kernel-libipsec an IPv6 VIP's guard is a policy routing rule after
    /// charon's table 220 (`kernel::xfrm::route_guard`); with kernel ESP an unbound block
    /// below charon's policies.
    pub interface: Option<String>,
    /// XFRM priority of block policies; larger numbers lose to the keying daemon's own.
    #[serde(default = "default_block_priority")]
    pub block_priority: u32,
    /// charon does ESP itself (kernel-libipsec) rather than the kernel. Unset: yes when
    /// the kernel has no ESP. Set it on production nodes: the units'
    /// `ProtectKernelModules=yes` hides /lib/modules, so an esp4 module that is installed
    /// but not loaded yet is not seen.
    pub libipsec: Option<bool>,
    /// How often the guard is compared with the kernel and repaired even when the kernel
    /// announced no change. A policy deleted or flushed and a rule deleted are announced
    /// and repaired at once; this bounds what no announcement names (notifications lost
    /// while the agent was busy are followed by a comparison too).
    #[serde(default = "default_guard_check", with = "humantime_serde")]
    pub guard_check: Duration,
}

impl KernelConfig {
    /// Whether charon uses kernel-libipsec (configured, or detected from the kernel).
    pub fn libipsec(&self) -> bool {
        self.libipsec
            .unwrap_or_else(|| !crate::host::probe().has_esp())
    }
}

fn default_guard_check() -> Duration {
    Duration::from_secs(2)
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            backend: KernelBackend::default(),
            fail_secure: true,
            interface: None,
            block_priority: default_block_priority(),
            libipsec: None,
            guard_check: default_guard_check(),
        }
    }
}

fn default_block_priority() -> u32 {
    // charon uses priorities around 200000-400000 for its own policies; stay below them.
    1_000_000
}

impl KernelConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.positive("kernel.guard_check", self.guard_check);
    }
}

/// Refuses protected flows with nothing in the kernel to guard them.
pub(super) fn validate_fail_secure(c: &Config, p: &mut Problems) {
    if c.kernel.backend != KernelBackend::None || !c.kernel.fail_secure {
        return;
    }
    // The promise is that protected traffic never leaves in clear text; without a
    // kernel backend nothing refuses it while no SA is up. Saying so in the config
    // (`fail_secure = false`) is the only way to run that way.
    let unguarded: Vec<String> = c
        .hosted_vips
        .iter()
        .map(|h| (h.address, &h.protect))
        .chain(c.peer_vips.iter().map(|p| (p.address, &p.protect)))
        .filter(|(vip, flows)| !flows.is_empty() || c.policy_managed(*vip))
        .map(|(vip, flows)| {
            if flows.is_empty() {
                format!("{vip} (its policy's flows)")
            } else {
                format!("{vip} ({})", flows.join(", "))
            }
        })
        .collect();
    if !unguarded.is_empty() {
        p.bad(
            "kernel.backend",
            format!(
                "\"none\" cannot keep the protected flows of {} from leaving in clear text: set kernel.backend = \"xfrm\" (with kernel.interface), or kernel.fail_secure = false to run without the guard",
                unguarded.join(", ")
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_flows_without_a_kernel_backend_are_refused_unless_the_guard_is_turned_off() {
        let text = r#"
node = "fe1"
[[peer_vip]]
address = "192.0.2.100"
connection = "vip100"
protect = ["tcp/143"]
[[hosted_vip]]
address = "192.0.2.10"
"#;
        let p = Config::parse(text).unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "kernel.backend");
        assert!(
            p[0].reason.contains("192.0.2.100 (tcp/143)")
                && !p[0].reason.contains("192.0.2.10 ")
                && p[0].reason.contains("kernel.fail_secure = false"),
            "{}",
            p[0].reason
        );
        // Saying so is allowed: the operator chose to run without the guard.
        Config::parse(&text.replace(
            "node = \"fe1\"",
            "node = \"fe1\"\n[kernel]\nfail_secure = false",
        ))
        .unwrap();
        // No protected flow, nothing to guard.
        Config::parse(&text.replace("protect = [\"tcp/143\"]", "")).unwrap();
    }
}
