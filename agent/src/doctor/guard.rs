//! The standing guard and charon's traps: what keeps a VIP's protected traffic from leaving
//! in clear text between one SA and the next.
//!
//! Two things can: a trap policy in charon (`start_action = trap`: the traffic is held
//! back while charon negotiates an SA) and the agent's guard in the kernel (the traffic is
//! refused). With neither, every gap between SAs (a move, a rekey failure, a restart)
//! sends it unencrypted. Per VIP the doctor reports what the kernel holds of the guard, and
//! per peer VIP whether charon has a trap for its connection.

use std::collections::BTreeSet;

use super::Finding;
use super::keying::{DaemonProbe, TrapPolicy};
use crate::config::{Config, KernelBackend, KeyingBackend};
use crate::kernel::xfrm::XfrmKernel;
use crate::kernel::{GuardCheck, Kernel};
use crate::model::{PeerConnection, Vip};

/// The guard as read from the kernel, or why it could not be read.
pub type GuardProbe = Result<Vec<GuardCheck>, String>;

/// Whether the config stands a guard at all: the agent guards nothing with
/// `kernel.backend = "none"` or `kernel.fail_secure = false`.
pub fn stands(config: &Config) -> bool {
    config.kernel.backend == KernelBackend::Xfrm && config.kernel.fail_secure
}

/// A kernel handle that reads (and, for `vipsec guard install`, engages) what the config's
/// guard wants: every protected flow when the guard stands, nothing otherwise, so that
/// whatever the kernel holds then shows as a leftover. Without a config it wants nothing.
pub fn reader(config: Option<&Config>) -> Result<XfrmKernel, String> {
    let wanted = match config {
        Some(c) if stands(c) => c.clone(),
        Some(c) => {
            let mut c = c.clone();
            c.hosted_vips.clear();
            c.peer_vips.clear();
            c
        }
        None => Config::parse("node = \"vipsec-guard\"\n[kernel]\nbackend = \"xfrm\"\n")
            .map_err(|p| format!("built-in config: {p:?}"))?,
    };
    XfrmKernel::new(&wanted).map_err(|e| e.to_string())
}

/// Reads every VIP's guard from the kernel.
pub async fn probe(config: &Config) -> GuardProbe {
    let kernel = reader(Some(config))?;
    kernel.guard_check().await.map_err(|e| e.to_string())
}

/// What keeps a VIP's protected flows in when no SA carries them, as far as the guard goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cover {
    /// Every policy or rule of the VIP's flows is in the kernel now.
    Held,
    /// The config stands a guard for the VIP's flows, but the kernel does not hold all of
    /// it now (the agent or the boot unit has not run, or it could not be read).
    Configured,
    /// No guard: no protected flows, `kernel.backend = "none"` or `fail_secure = false`.
    None,
}

/// How far the guard covers `vip`.
pub fn cover(config: &Config, probe: &GuardProbe, vip: Vip) -> Cover {
    if !stands(config) || !config.protected_flows().iter().any(|f| f.vip == vip) {
        return Cover::None;
    }
    match probe {
        Ok(checks) if checks.iter().any(|c| c.vip == vip && c.held()) => Cover::Held,
        _ => Cover::Configured,
    }
}

/// The trap decision for one peer VIP: ok with a trap; without one a warning when the
/// guard covers the VIP (the traffic is refused, not queued) and an error when nothing
/// does (clear text possible).
pub fn trap_finding(
    vip: Vip,
    conn: Option<&PeerConnection>,
    traps: &Result<Vec<TrapPolicy>, String>,
    cover: Cover,
) -> Finding {
    let check = format!("keying.trap[{vip}]");
    let traps = match traps {
        Ok(t) => t,
        Err(e) => {
            return Finding::warning(
                check,
                format!("cannot list charon's trap policies: {e}"),
                "run `swanctl --list-pols --trap` by hand",
            );
        }
    };
    let found = traps.iter().find(|t| match conn {
        Some(pc) => {
            t.child == pc.child && t.connection.as_deref().is_none_or(|c| c == pc.connection)
        }
        // Policy-managed: `vipsec-<policy>-<vip with dashes>` (policy::render).
        None => {
            let suffix = format!("-{}", vip.to_string().replace(['.', ':'], "-"));
            t.connection
                .as_deref()
                .is_some_and(|c| c.starts_with("vipsec-") && c.ends_with(&suffix))
        }
    });
    if let Some(t) = found {
        let name = match &t.connection {
            Some(c) => format!("{c}/{}", t.child),
            None => t.child.clone(),
        };
        return Finding::ok(
            check,
            format!(
                "peer VIP {vip}: trap installed for {name}: between SAs its traffic waits for a new SA"
            ),
        );
    }
    let Some(pc) = conn else {
        // The agent loads the connection, with `start_action = trap`, when it starts.
        return Finding::ok(
            check,
            format!(
                "peer VIP {vip}: no trap now; the agent loads its connection from the VIP's policy with start_action = trap"
            ),
        );
    };
    let fix = format!(
        "set start_action = trap|start on child {:?} of connection {:?} (swanctl.conf) and run `swanctl --load-all`",
        pc.child, pc.connection
    );
    match cover {
        Cover::Held | Cover::Configured => {
            let now = if cover == Cover::Held {
                ""
            } else {
                " (once the agent or `vipsec guard install` has put it in; see kernel.guard)"
            };
            Finding::warning(
                check,
                format!(
                    "peer VIP {vip}: no trap: between SAs traffic is refused by the guard{now}, not queued"
                ),
                fix,
            )
        }
        Cover::None => Finding::error(
            check,
            format!(
                "peer VIP {vip}: no trap and no guard: between SAs its traffic can leave in clear text"
            ),
            format!(
                "{fix}; and give the VIP protect flows with kernel.backend = \"xfrm\" so the kernel refuses them outside IPsec"
            ),
        ),
    }
}

/// One `keying.trap[VIP]` per peer VIP whose connection charon has loaded (a missing one
/// is the connection check's error) or that is policy-managed; nothing when charon is not
/// the backend or does not answer (the daemon check says so).
pub fn trap_findings(config: &Config, daemon: &DaemonProbe, guard: &GuardProbe) -> Vec<Finding> {
    let Ok(facts) = daemon else {
        return Vec::new();
    };
    if config.keying.backend != KeyingBackend::Strongswan {
        return Vec::new();
    }
    config
        .peer_vips
        .iter()
        .filter(|p| match (p.peer_connection(), &facts.conns) {
            (Some(pc), Ok(conns)) => conns.contains_key(&pc.connection),
            _ => true,
        })
        .map(|p| {
            trap_finding(
                p.address,
                p.peer_connection().as_ref(),
                &facts.traps,
                cover(config, guard, p.address),
            )
        })
        .collect()
}

/// One `kernel.guard[VIP]` per VIP of the config and per VIP the kernel holds a leftover
/// guard for: what the guard covers, whatever charon does.
pub fn guard_findings(config: &Config, probe: &GuardProbe) -> Vec<Finding> {
    let checks = match probe {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::warning(
                "kernel.guard",
                format!("cannot read the guard from the kernel: {e}"),
                "run the doctor as root (reading XFRM policies and rules needs CAP_NET_ADMIN)",
            )];
        }
    };
    let flows = config.protected_flows();
    let mut vips: Vec<Vip> = config
        .peer_vips
        .iter()
        .map(|p| p.address)
        .chain(config.hosted_vips.iter().map(|h| h.address))
        .collect();
    let configured: BTreeSet<Vip> = vips.iter().copied().collect();
    vips.extend(
        checks
            .iter()
            .map(|c| c.vip)
            .filter(|v| !configured.contains(v)),
    );
    let why_off = if config.kernel.backend != KernelBackend::Xfrm {
        "kernel.backend = \"none\""
    } else {
        "kernel.fail_secure = false"
    };
    vips.into_iter()
        .map(|vip| {
            let check = format!("kernel.guard[{vip}]");
            let n_flows = flows.iter().filter(|f| f.vip == vip).count();
            let held = checks.iter().find(|c| c.vip == vip);
            let in_kernel = held.map_or(0, |c| c.installed + c.extra);
            if n_flows == 0 || !stands(config) {
                // Nothing is wanted for the VIP: what the kernel holds is a leftover.
                if in_kernel > 0 {
                    return Finding::warning(
                        check,
                        format!(
                            "the kernel holds {in_kernel} of vipsec's guard policies/rules for {vip}, which this config does not guard: its traffic is refused outside IPsec"
                        ),
                        format!(
                            "`vipsec guard remove {vip}` if it should no longer be protected (stop the agent first)"
                        ),
                    );
                }
                if n_flows > 0 {
                    return Finding::warning(
                        check,
                        format!(
                            "{vip}: {n_flows} protected flow(s), but {why_off}: nothing in the kernel refuses them outside IPsec"
                        ),
                        "set kernel.backend = \"xfrm\" (with kernel.interface) and kernel.fail_secure = true",
                    );
                }
                return Finding::ok(
                    check,
                    format!("{vip}: no protected flows configured: nothing to guard"),
                );
            }
            match held {
                Some(c) if c.held() => {
                    let extra = if c.extra > 0 {
                        format!(
                            "; {} more of an earlier configuration (the agent removes them when it starts)",
                            c.extra
                        )
                    } else {
                        String::new()
                    };
                    Finding::ok(
                        check,
                        format!(
                            "{vip}: guard held: {} of {} policies/rules for {n_flows} flow(s){extra}",
                            c.installed, c.wanted
                        ),
                    )
                }
                c => {
                    let (installed, wanted) = c.map_or((0, 0), |c| (c.installed, c.wanted));
                    Finding::warning(
                        check,
                        format!(
                            "{vip}: guard not held: {installed} of {wanted} policies/rules in the kernel; until the agent starts (or `vipsec guard install` runs) its protected flows can leave in clear text"
                        ),
                        "enable vipsec-guard.service (boot) and vipsec.service, or run `vipsec guard install --config /etc/vipsec/agent.toml` now",
                    )
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Severity;

    const VIP: &str = "192.0.2.100";

    fn config(kernel: &str, protect: &str) -> Config {
        Config::parse(&format!(
            "node = \"fe\"\n[keying]\nbackend = \"strongswan\"\n[kernel]\n{kernel}\n[[peer_vip]]\naddress = \"{VIP}\"\nconnection = \"vip\"\nprotect = [{protect}]\n"
        ))
        .unwrap()
    }

    fn vip() -> Vip {
        VIP.parse().unwrap()
    }

    fn pc() -> PeerConnection {
        PeerConnection {
            connection: "vip".into(),
            child: "vip".into(),
        }
    }

    fn trap(conn: &str, child: &str) -> TrapPolicy {
        TrapPolicy {
            connection: Some(conn.into()),
            child: child.into(),
            remote_ts: vec![format!("{VIP}/32")],
        }
    }

    fn check(wanted: u32, installed: u32) -> GuardCheck {
        GuardCheck {
            vip: vip(),
            wanted,
            installed,
            extra: 0,
        }
    }

    #[test]
    fn a_trap_is_ok_whatever_the_guard() {
        for cover in [Cover::Held, Cover::Configured, Cover::None] {
            let f = trap_finding(vip(), Some(&pc()), &Ok(vec![trap("vip", "vip")]), cover);
            assert_eq!(f.severity, Severity::Ok, "{f:?}");
            assert!(f.summary.contains("vip/vip"), "{f:?}");
        }
    }

    #[test]
    fn no_trap_is_a_warning_under_the_guard_and_an_error_without_it() {
        // Another connection's trap, or the right connection with another child, is no trap.
        let traps = Ok(vec![trap("other", "vip"), trap("vip", "other")]);
        let f = trap_finding(vip(), Some(&pc()), &traps, Cover::Held);
        assert_eq!(f.severity, Severity::Warning);
        assert!(
            f.summary
                .contains("no trap: between SAs traffic is refused by the guard, not queued"),
            "{f:?}"
        );
        assert!(f.remedy.as_deref().unwrap().contains("trap|start"));
        let f = trap_finding(vip(), Some(&pc()), &traps, Cover::Configured);
        assert_eq!(f.severity, Severity::Warning);
        let f = trap_finding(vip(), Some(&pc()), &traps, Cover::None);
        assert_eq!(f.severity, Severity::Error);
        assert!(f.summary.contains("clear text"), "{f:?}");
        // Unreadable traps are a warning, never a verdict.
        let f = trap_finding(vip(), Some(&pc()), &Err("boom".into()), Cover::None);
        assert_eq!(f.severity, Severity::Warning);
    }

    #[test]
    fn a_policy_managed_vip_is_found_by_its_connection_name() {
        let managed = trap("vipsec-mail-192-0-2-100", "mail");
        let f = trap_finding(vip(), None, &Ok(vec![managed]), Cover::None);
        assert_eq!(f.severity, Severity::Ok);
        assert!(f.summary.contains("vipsec-mail-192-0-2-100/mail"), "{f:?}");
        let other = trap("vipsec-mail-192-0-2-101", "mail");
        let f = trap_finding(vip(), None, &Ok(vec![other]), Cover::None);
        assert_eq!(f.severity, Severity::Ok);
        assert!(f.summary.contains("the agent loads"), "{f:?}");
    }

    #[test]
    fn the_guard_covers_a_vip_only_with_flows_and_a_standing_guard() {
        let on = "backend = \"xfrm\"\ninterface = \"eth0\"";
        let c = config(on, "\"tcp/143\"");
        assert_eq!(cover(&c, &Ok(vec![check(1, 1)]), vip()), Cover::Held);
        assert_eq!(cover(&c, &Ok(vec![check(1, 0)]), vip()), Cover::Configured);
        assert_eq!(cover(&c, &Err("EPERM".into()), vip()), Cover::Configured);
        assert_eq!(cover(&c, &Ok(vec![]), vip()), Cover::Configured);
        let off = config(&format!("{on}\nfail_secure = false"), "\"tcp/143\"");
        assert_eq!(cover(&off, &Ok(vec![check(1, 1)]), vip()), Cover::None);
        let none = config("backend = \"none\"\nfail_secure = false", "\"tcp/143\"");
        assert_eq!(cover(&none, &Ok(vec![]), vip()), Cover::None);
        let no_flows = config(on, "");
        assert_eq!(cover(&no_flows, &Ok(vec![]), vip()), Cover::None);
    }

    #[test]
    fn guard_findings_per_vip() {
        let on = "backend = \"xfrm\"\ninterface = \"eth0\"";
        let c = config(on, "\"tcp/143\"");
        let leftover: Vip = "192.0.2.7".parse().unwrap();
        let probe = Ok(vec![
            check(1, 1),
            GuardCheck {
                vip: leftover,
                wanted: 0,
                installed: 0,
                extra: 2,
            },
        ]);
        let f = guard_findings(&c, &probe);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].check, format!("kernel.guard[{VIP}]"));
        assert_eq!(f[0].severity, Severity::Ok);
        assert!(f[0].summary.contains("1 of 1"), "{f:?}");
        assert_eq!(f[1].check, "kernel.guard[192.0.2.7]");
        assert_eq!(f[1].severity, Severity::Warning);
        assert!(
            f[1].remedy
                .as_deref()
                .unwrap()
                .contains("vipsec guard remove 192.0.2.7")
        );

        let f = guard_findings(&c, &Ok(vec![check(1, 0)]));
        assert_eq!(f[0].severity, Severity::Warning);
        assert!(f[0].summary.contains("0 of 1"), "{f:?}");

        let none = config("backend = \"none\"\nfail_secure = false", "\"tcp/143\"");
        let f = guard_findings(&none, &Ok(vec![]));
        assert_eq!(f[0].severity, Severity::Warning);
        assert!(f[0].summary.contains("kernel.backend"), "{f:?}");

        let f = guard_findings(&config(on, ""), &Ok(vec![]));
        assert_eq!(f[0].severity, Severity::Ok);
        assert!(f[0].summary.contains("nothing to guard"), "{f:?}");

        let f = guard_findings(&c, &Err("Operation not permitted".into()));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].check, "kernel.guard");
    }
}
