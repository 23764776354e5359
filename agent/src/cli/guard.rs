//! `vipsec guard install|show|remove`: the kernel's standing clear-text guard, handled
//! without the agent.
//!
//! The guard (XFRM block policies bound to `kernel.interface` for IPv4; policy routing
//! `prohibit` rules after charon's table 220 for IPv6 under kernel-libipsec) is installed
//! by the agent, repaired as soon as the kernel announces a change to it (and every
//! `kernel.guard_check`), and never removed by it. These
//! commands put it in before anything else runs (`install`, for the boot unit), show what
//! the kernel holds (`show`), and take it out on purpose (`remove`, the only way it goes).
//! None of them needs the agent, charon or etcd: they talk to the kernel over netlink.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Subcommand;
use serde::Serialize;
use vipsec_proto::v1 as pb;

use super::client::{Target, connect};
use super::render::table;
use super::{CliError, DEFAULT_CONFIG, parse_duration};
use crate::config::{ApiEndpoint, Config, ConfigError};
use crate::doctor;
use crate::kernel::xfrm::{XfrmKernel, route_guard};
use crate::kernel::{GuardCheck, Kernel};
use crate::model::{FlowDirection, FlowProtocol, ProtectedFlow, Vip};

#[derive(Debug, Subcommand)]
pub enum GuardCommand {
    /// Put the guard of every VIP with protected flows into the kernel (for the boot unit,
    /// before charon and the agent start). Exit 0 only when every VIP's guard is held.
    Install {
        /// Agent config whose protected flows are guarded.
        #[arg(long, short)]
        config: PathBuf,
        /// How long to wait for `kernel.interface` to appear (IPv4 guards are bound to it).
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        wait: Duration,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What the kernel holds of each VIP's guard: held, partial, absent, or leftover (the
    /// agent's entries for a VIP the config does not protect).
    Show {
        /// Agent config to compare with; default /etc/vipsec/agent.toml when it exists,
        /// else only what the kernel holds is shown.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove the guard of the named VIPs (or every one the kernel holds): their protected
    /// flows may then leave in clear text. Refused while an agent answers at --endpoint.
    Remove {
        /// VIPs whose guard goes.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        vips: Vec<IpAddr>,
        /// Every VIP the kernel holds a guard for, configured or not.
        #[arg(long)]
        all: bool,
        /// Remove even though an agent answers (it puts a configured VIP's guard back at
        /// once).
        #[arg(long)]
        force: bool,
        /// Agent config, also checked for a running agent at its `api.endpoint`; default
        /// /etc/vipsec/agent.toml when it exists.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(target: &Target, command: GuardCommand) -> Result<(), CliError> {
    match command {
        GuardCommand::Install { config, wait, json } => install(&config, wait, json).await,
        GuardCommand::Show { config, json } => show(config.as_deref(), json).await,
        GuardCommand::Remove {
            vips,
            all,
            force,
            config,
            json,
        } => remove(target, config.as_deref(), vips, all, force, json).await,
    }
}

/// How often `install` looks for `kernel.interface` while it waits.
const INTERFACE_POLL: Duration = Duration::from_millis(100);
/// How long `remove` waits for an agent's answer before taking it for a running agent.
const AGENT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

fn load(path: &Path) -> Result<Config, CliError> {
    Config::load(path).map_err(|e| match e {
        ConfigError::Read { .. } => CliError::Usage(e.to_string()),
        ConfigError::Invalid { .. } => CliError::Usage(format!("config invalid:\n{e}")),
    })
}

/// The config given, else the default one when it exists, else none (kernel only).
fn load_optional(path: Option<&Path>) -> Result<Option<(PathBuf, Config)>, CliError> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
        None => return Ok(None),
    };
    let config = load(&path)?;
    Ok(Some((path, config)))
}

fn guard_on(config: &Config) -> bool {
    doctor::guard::stands(config)
}

fn kernel_for(config: Option<&Config>) -> Result<XfrmKernel, CliError> {
    doctor::guard::reader(config).map_err(|e| CliError::Runtime(format!("kernel: {e}")))
}

fn kernel_error(e: crate::kernel::KernelError) -> CliError {
    let mut msg = format!("kernel: {e}");
    if msg.contains("Operation not permitted") {
        msg.push_str(" (run as root: the guard needs CAP_NET_ADMIN)");
    }
    CliError::Runtime(msg)
}

/// The one word for a VIP's guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardState {
    /// Every policy or rule the VIP's flows need is in the kernel.
    Held,
    /// Some are.
    Partial,
    /// None are.
    Absent,
    /// The kernel holds the agent's entries for a VIP the config does not protect (an
    /// earlier configuration's); they stay until `vipsec guard remove`.
    Leftover,
    /// No config to compare with: the kernel holds the agent's entries for this VIP.
    Present,
}

impl GuardState {
    fn as_str(self) -> &'static str {
        match self {
            GuardState::Held => "held",
            GuardState::Partial => "partial",
            GuardState::Absent => "absent",
            GuardState::Leftover => "leftover",
            GuardState::Present => "present",
        }
    }
}

/// The state word of one check; `with_config` tells a leftover from a kernel-only listing.
pub fn state_of(c: &GuardCheck, with_config: bool) -> GuardState {
    if c.wanted == 0 {
        return if with_config {
            GuardState::Leftover
        } else {
            GuardState::Present
        };
    }
    if c.installed >= c.wanted {
        GuardState::Held
    } else if c.installed == 0 {
        GuardState::Absent
    } else {
        GuardState::Partial
    }
}

/// One VIP's line of `show` and `install`.
#[derive(Debug, Clone, Serialize)]
struct VipGuard {
    vip: Vip,
    /// `peer`, `hosted`, or none for a VIP the config does not name.
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    /// The configured flows, e.g. `tcp/143`.
    flows: Vec<String>,
    /// What guards the VIP: `xfrm` block policies or `rule` (policy routing rules).
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    wanted: u32,
    installed: u32,
    extra: u32,
    /// The agent's XFRM block policies and routing rules for the VIP now in the kernel.
    policies: u32,
    rules: u32,
    state: GuardState,
    /// Why `install` could not put the guard in.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct GuardReport {
    /// The config compared with; none when only the kernel was read.
    config: Option<PathBuf>,
    /// Whether that config stands a guard (xfrm backend and fail_secure).
    guard: bool,
    vips: Vec<VipGuard>,
}

fn flow_text(f: &ProtectedFlow) -> String {
    let proto = match f.protocol {
        FlowProtocol::Tcp => "tcp",
        FlowProtocol::Udp => "udp",
        FlowProtocol::Any => "any",
    };
    match (f.protocol, f.port) {
        (FlowProtocol::Any, _) | (_, None) => proto.to_string(),
        (_, Some(p)) => format!("{proto}/{p}"),
    }
}

/// Reads every VIP's guard from the kernel, with the config's view of it.
async fn read_guard(
    kernel: &XfrmKernel,
    config: Option<&Config>,
    libipsec: bool,
) -> Result<Vec<VipGuard>, CliError> {
    let checks = kernel.guard_check().await.map_err(kernel_error)?;
    let mut policies: BTreeMap<Vip, u32> = BTreeMap::new();
    for p in kernel.block_policies().await.map_err(kernel_error)? {
        *policies.entry(p.selector.vip).or_default() += 1;
    }
    let mut rules: BTreeMap<Vip, u32> = BTreeMap::new();
    for r in route_guard::rules().await.map_err(kernel_error)? {
        *rules.entry(r.vip).or_default() += 1;
    }
    let flows: Vec<ProtectedFlow> = config
        .filter(|c| guard_on(c))
        .map(Config::protected_flows)
        .unwrap_or_default();
    Ok(checks
        .iter()
        .map(|c| {
            let vip_flows: Vec<&ProtectedFlow> = flows.iter().filter(|f| f.vip == c.vip).collect();
            let role = vip_flows.first().map(|f| match f.direction {
                FlowDirection::ToVip => "peer",
                FlowDirection::FromVip => "hosted",
            });
            let kind = (!vip_flows.is_empty()).then(|| {
                if c.vip.is_ipv6() && libipsec {
                    "rule"
                } else {
                    "xfrm"
                }
            });
            VipGuard {
                vip: c.vip,
                role,
                flows: vip_flows.iter().map(|f| flow_text(f)).collect(),
                kind,
                wanted: c.wanted,
                installed: c.installed,
                extra: c.extra,
                policies: policies.get(&c.vip).copied().unwrap_or(0),
                rules: rules.get(&c.vip).copied().unwrap_or(0),
                state: state_of(c, config.is_some()),
                error: None,
            }
        })
        .collect())
}

/// What guards a VIP, for the table: the interface an IPv4 block is bound to, the
/// priority of the IPv6 rules.
fn kind_text(g: &VipGuard, interface: Option<&str>) -> String {
    match g.kind {
        Some("rule") => format!("ip rule {}", route_guard::RULE_PRIORITY),
        Some(_) if g.vip.is_ipv4() => match interface {
            Some(i) => format!("xfrm dev {i}"),
            None => "xfrm".into(),
        },
        Some(_) => "xfrm".into(),
        None => "-".into(),
    }
}

fn print(report: &GuardReport, interface: Option<&str>, json: bool) -> Result<(), CliError> {
    if json {
        let text = serde_json::to_string_pretty(report)
            .map_err(|e| CliError::Runtime(format!("cannot encode the report: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    match &report.config {
        Some(p) if report.guard => println!("config {}", p.display()),
        Some(p) => println!(
            "config {} (kernel.backend = \"none\" or kernel.fail_secure = false: it wants no guard)",
            p.display()
        ),
        None => {
            println!("no config (none given, {DEFAULT_CONFIG} absent): only what the kernel holds")
        }
    }
    if report.vips.is_empty() {
        match report.config {
            Some(_) => {
                println!("no VIP has protected flows, and the kernel holds no guard of vipsec's")
            }
            None => println!("the kernel holds no guard of vipsec's"),
        }
        return Ok(());
    }
    let mut t = if report.config.is_some() {
        table(&[
            "vip",
            "role",
            "flows",
            "guard",
            "wanted",
            "installed",
            "extra",
            "state",
        ])
    } else {
        table(&["vip", "policies", "rules", "state"])
    };
    for g in &report.vips {
        if report.config.is_none() {
            t.add_row(vec![
                g.vip.to_string(),
                g.policies.to_string(),
                g.rules.to_string(),
                g.state.as_str().to_string(),
            ]);
            continue;
        }
        t.add_row(vec![
            g.vip.to_string(),
            g.role.unwrap_or("-").to_string(),
            if g.flows.is_empty() {
                "-".into()
            } else {
                g.flows.join(",")
            },
            kind_text(g, interface),
            g.wanted.to_string(),
            g.installed.to_string(),
            g.extra.to_string(),
            g.state.as_str().to_string(),
        ]);
    }
    // Why a VIP's guard could not be installed goes to stderr, with the exit code.
    println!("{t}");
    Ok(())
}

async fn show(config: Option<&Path>, json: bool) -> Result<(), CliError> {
    let loaded = load_optional(config)?;
    let config = loaded.as_ref().map(|(_, c)| c);
    let kernel = kernel_for(config)?;
    let libipsec = config.is_some_and(|c| c.kernel.libipsec());
    let vips = read_guard(&kernel, config, libipsec).await?;
    let report = GuardReport {
        config: loaded.as_ref().map(|(p, _)| p.clone()),
        guard: config.is_some_and(guard_on),
        vips,
    };
    print(
        &report,
        config.and_then(|c| c.kernel.interface.as_deref()),
        json,
    )
}

fn interface_exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Polls for the interface until the deadline: at boot udev may still be naming it.
async fn wait_for_interface(name: &str, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if interface_exists(name) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(INTERFACE_POLL.min(deadline - now)).await;
    }
}

async fn install(path: &Path, wait: Duration, json: bool) -> Result<(), CliError> {
    let config = load(path)?;
    if !guard_on(&config) {
        // A node without a guard may still run the unit: nothing to do is no failure.
        println!(
            "{}: kernel.backend = {:?}, kernel.fail_secure = {}: the config wants no guard; nothing installed",
            path.display(),
            config.kernel.backend,
            config.kernel.fail_secure
        );
        return Ok(());
    }
    let flows = config.protected_flows();
    let vips: Vec<Vip> = {
        let mut seen = BTreeSet::new();
        flows
            .iter()
            .map(|f| f.vip)
            .filter(|v| seen.insert(*v))
            .collect()
    };
    if vips.is_empty() {
        println!(
            "{}: no VIP has protected flows; nothing to guard",
            path.display()
        );
        return Ok(());
    }
    // Only IPv4 guards are bound to the interface (see kernel::xfrm::selector_ifindex).
    let mut interface_missing = None;
    if let Some(name) = &config.kernel.interface
        && vips.iter().any(|v| v.is_ipv4())
        && !wait_for_interface(name, wait).await
    {
        interface_missing = Some(format!(
            "kernel.interface {name:?} did not appear within {}",
            humantime::format_duration(wait)
        ));
    }
    let kernel = kernel_for(Some(&config))?;
    // Each VIP on its own: one that cannot be guarded (its interface is missing) must not
    // keep the others unguarded.
    let mut errors: BTreeMap<Vip, String> = BTreeMap::new();
    for vip in &vips {
        if let Err(e) = kernel.engage_fail_secure(*vip).await {
            let why = match (&interface_missing, vip.is_ipv4()) {
                (Some(m), true) => m.clone(),
                _ => kernel_error(e).to_string(),
            };
            errors.insert(*vip, why);
        }
    }
    let mut guards = read_guard(&kernel, Some(&config), config.kernel.libipsec()).await?;
    for g in &mut guards {
        g.error = errors.get(&g.vip).cloned();
    }
    let failed: Vec<String> = vips
        .iter()
        .filter_map(|vip| {
            let g = guards.iter().find(|g| g.vip == *vip);
            match g {
                Some(g) if g.state == GuardState::Held => None,
                Some(g) => Some(match &g.error {
                    Some(e) => format!("{vip}: {e}"),
                    None => format!(
                        "{vip}: {} of {} policies/rules in the kernel",
                        g.installed, g.wanted
                    ),
                }),
                None => Some(format!(
                    "{vip}: {}",
                    errors
                        .get(vip)
                        .map(String::as_str)
                        .unwrap_or("not found in the kernel")
                )),
            }
        })
        .collect();
    let report = GuardReport {
        config: Some(path.to_path_buf()),
        guard: true,
        vips: guards,
    };
    print(&report, config.kernel.interface.as_deref(), json)?;
    if failed.is_empty() {
        if !json {
            println!(
                "guard held for {} VIP(s); it stays until `vipsec guard remove`",
                vips.len()
            );
        }
        Ok(())
    } else {
        Err(CliError::Runtime(format!(
            "guard not held: {}",
            failed.join("; ")
        )))
    }
}

/// Whether an agent answers at `endpoint`: `Some(why)` when one does (or one accepts the
/// connection and does not answer in time, as a stopped agent would).
async fn agent_answers(target: &Target) -> Option<String> {
    let probe = async {
        let mut client = connect(target).await.ok()?;
        Some(client.get_status(pb::GetStatusRequest {}).await.is_ok())
    };
    match tokio::time::timeout(AGENT_PROBE_TIMEOUT, probe).await {
        Ok(Some(true)) => Some(format!("an agent answers at {}", target.endpoint)),
        Ok(_) => None,
        Err(_) => Some(format!(
            "something at {} accepts connections but does not answer within {}s (a stopped agent?)",
            target.endpoint,
            AGENT_PROBE_TIMEOUT.as_secs()
        )),
    }
}

#[derive(Debug, Serialize)]
struct Removed {
    vip: Vip,
    policies: u32,
    rules: u32,
}

/// The agent's policies and rules per VIP now in the kernel.
async fn held_by_vip(kernel: &XfrmKernel) -> Result<BTreeMap<Vip, (u32, u32)>, CliError> {
    let mut held: BTreeMap<Vip, (u32, u32)> = BTreeMap::new();
    for p in kernel.block_policies().await.map_err(kernel_error)? {
        held.entry(p.selector.vip).or_default().0 += 1;
    }
    for r in route_guard::rules().await.map_err(kernel_error)? {
        held.entry(r.vip).or_default().1 += 1;
    }
    Ok(held)
}

async fn remove(
    target: &Target,
    config: Option<&Path>,
    vips: Vec<IpAddr>,
    all: bool,
    force: bool,
    json: bool,
) -> Result<(), CliError> {
    let loaded = load_optional(config)?;
    let config = loaded.as_ref().map(|(_, c)| c);
    if !force {
        // The --endpoint given (or its default), and the config's own socket if it differs.
        let mut targets = vec![Target {
            endpoint: target.endpoint.clone(),
            tls_ca: target.tls_ca.clone(),
            tls_cert: target.tls_cert.clone(),
            tls_key: target.tls_key.clone(),
        }];
        if let Some(c) = config
            && c.api.endpoint != target.endpoint
            && matches!(
                ApiEndpoint::parse(&c.api.endpoint),
                Ok(ApiEndpoint::Unix(_))
            )
        {
            targets.push(Target {
                endpoint: c.api.endpoint.clone(),
                tls_ca: None,
                tls_cert: None,
                tls_key: None,
            });
        }
        for t in &targets {
            if let Some(why) = agent_answers(t).await {
                return Err(CliError::Runtime(format!(
                    "{why}: it would put a configured VIP's guard back at once; stop the agent first (systemctl stop vipsec), or pass --force"
                )));
            }
        }
    }
    let kernel = kernel_for(config)?;
    let before = held_by_vip(&kernel).await?;
    let vips: Vec<Vip> = if all {
        before.keys().copied().collect()
    } else {
        vips
    };
    for vip in &vips {
        kernel
            .release_fail_secure(*vip)
            .await
            .map_err(|e| CliError::Runtime(format!("{vip}: {}", kernel_error(e))))?;
    }
    let after = held_by_vip(&kernel).await?;
    let removed: Vec<Removed> = vips
        .iter()
        .map(|vip| {
            let (p0, r0) = before.get(vip).copied().unwrap_or_default();
            let (p1, r1) = after.get(vip).copied().unwrap_or_default();
            Removed {
                vip: *vip,
                policies: p0.saturating_sub(p1),
                rules: r0.saturating_sub(r1),
            }
        })
        .collect();
    if json {
        #[derive(Serialize)]
        struct Report<'a> {
            removed: &'a [Removed],
        }
        let text = serde_json::to_string_pretty(&Report { removed: &removed })
            .map_err(|e| CliError::Runtime(format!("cannot encode the report: {e}")))?;
        println!("{text}");
    } else if removed.is_empty() {
        println!("the kernel holds no guard of vipsec's: nothing removed");
    } else {
        let mut t = table(&["vip", "policies removed", "rules removed"]);
        for r in &removed {
            t.add_row(vec![
                r.vip.to_string(),
                r.policies.to_string(),
                r.rules.to_string(),
            ]);
        }
        println!("{t}");
        let guarded: Vec<String> = removed
            .iter()
            .filter(|r| r.policies + r.rules > 0)
            .map(|r| r.vip.to_string())
            .collect();
        if !guarded.is_empty() {
            println!(
                "the protected flows of {} may now leave in clear text",
                guarded.join(", ")
            );
        }
    }
    let left: Vec<String> = vips
        .iter()
        .filter(|v| after.contains_key(v))
        .map(|v| v.to_string())
        .collect();
    if !left.is_empty() {
        // Forced past a running agent, that agent puts a configured VIP's guard back.
        if force {
            println!(
                "the kernel holds a guard for {} again (a running agent put it back)",
                left.join(", ")
            );
        } else {
            return Err(CliError::Runtime(format!(
                "the kernel still holds a guard for {} (something put it back)",
                left.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(wanted: u32, installed: u32, extra: u32) -> GuardCheck {
        GuardCheck {
            vip: "192.0.2.100".parse().unwrap(),
            wanted,
            installed,
            extra,
        }
    }

    #[test]
    fn state_words() {
        assert_eq!(state_of(&check(2, 2, 0), true), GuardState::Held);
        assert_eq!(state_of(&check(2, 2, 1), true), GuardState::Held);
        assert_eq!(state_of(&check(2, 1, 0), true), GuardState::Partial);
        assert_eq!(state_of(&check(2, 0, 3), true), GuardState::Absent);
        assert_eq!(state_of(&check(0, 0, 3), true), GuardState::Leftover);
        assert_eq!(state_of(&check(0, 0, 3), false), GuardState::Present);
    }

    #[test]
    fn flows_read_like_the_config() {
        let vip: Vip = "192.0.2.100".parse().unwrap();
        let f = |s| crate::model::parse_flow(vip, s, FlowDirection::ToVip).unwrap();
        assert_eq!(flow_text(&f("tcp/143")), "tcp/143");
        assert_eq!(flow_text(&f("udp")), "udp");
        assert_eq!(flow_text(&f("any")), "any");
    }

    #[test]
    fn a_config_without_a_guard_wants_nothing() {
        let text = "node = \"fe\"\n[kernel]\nbackend = \"xfrm\"\nfail_secure = false\ninterface = \"eth0\"\n[[peer_vip]]\naddress = \"192.0.2.100\"\nconnection = \"v\"\nprotect = [\"tcp/143\"]\n";
        let c = Config::parse(text).unwrap();
        assert!(!guard_on(&c));
        let on = Config::parse(&text.replace("fail_secure = false\n", "")).unwrap();
        assert!(guard_on(&on));
    }
}
