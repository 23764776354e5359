//! The local nftables ruleset: does it let IKE (UDP 500), NAT-T (UDP 4500) and ESP (IP
//! protocol 50) in and out? The probe reads `nft -j list ruleset` (and `nft -a list
//! ruleset` for the rules' text); [`super::nft`] walks the packets through it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::nft::{Direction, End, IpFamily, L4, Outcome, Path, Place, Probe, Ruleset};
use super::{Finding, Severity};
use crate::config::Config;

/// What `nft` gave us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesetProbe {
    /// The JSON listing and the text listing with handles.
    Listed { json: String, text: String },
    /// No `nft` program on this node.
    NoNft,
    /// `nft` ran and failed.
    Failed(String),
}

/// The three kinds of packet failover depends on.
#[derive(Debug, Clone, Copy)]
struct Traffic {
    check: &'static str,
    name: &'static str,
    l4: L4,
}

const TRAFFIC: [Traffic; 3] = [
    Traffic {
        check: "firewall.ike",
        name: "IKE (udp 500)",
        l4: L4::Udp {
            sport: 500,
            dport: 500,
        },
    },
    Traffic {
        check: "firewall.nat-t",
        name: "NAT-T (udp 4500)",
        l4: L4::Udp {
            sport: 4500,
            dport: 4500,
        },
    },
    Traffic {
        check: "firewall.esp",
        name: "ESP (ip protocol 50)",
        l4: L4::Esp,
    },
];

pub async fn check(config: &Config, kernel_has_esp: bool) -> Vec<Finding> {
    findings(config, &probe().await, kernel_has_esp)
}

async fn nft(args: &[&str]) -> Result<String, RulesetProbe> {
    match tokio::process::Command::new("nft")
        .args(args)
        .output()
        .await
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(RulesetProbe::NoNft),
        Err(e) => Err(RulesetProbe::Failed(format!("nft {}: {e}", args.join(" ")))),
        Ok(o) if !o.status.success() => Err(RulesetProbe::Failed(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Ok(o) => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
    }
}

pub async fn probe() -> RulesetProbe {
    let json = match nft(&["-j", "list", "ruleset"]).await {
        Ok(j) => j,
        Err(p) => return p,
    };
    // The text only makes findings readable; without it they quote the JSON.
    let text = nft(&["-a", "list", "ruleset"]).await.unwrap_or_default();
    RulesetProbe::Listed { json, text }
}

/// One way IPsec packets go on this node, with the addresses known from the config.
#[derive(Debug, Clone)]
struct Flow {
    family: IpFamily,
    direction: Direction,
    saddr: Option<IpAddr>,
    daddr: Option<IpAddr>,
}

impl Flow {
    fn label(&self) -> String {
        let addr = match (self.direction, self.saddr, self.daddr) {
            (Direction::Inbound, Some(s), _) => format!(" from {s}"),
            (Direction::Inbound, None, Some(d)) => format!(" to {d}"),
            (Direction::Outbound, Some(s), None) => format!(" from {s}"),
            (Direction::Outbound, _, Some(d)) => format!(" to {d}"),
            _ => String::new(),
        };
        format!("{} {}{addr}", self.direction, self.family)
    }
}

fn family_of(a: IpAddr) -> IpFamily {
    match a {
        IpAddr::V4(_) => IpFamily::V4,
        IpAddr::V6(_) => IpFamily::V6,
    }
}

/// The flows failover needs: with each peer VIP (packets from and to it) and on each
/// hosted VIP (to and from it), so address-restricted rules can be decided; without VIPs,
/// IPv4 in and out with addresses unknown.
fn flows(config: &Config) -> Vec<Flow> {
    let mut out = Vec::new();
    for v in config.peer_addresses() {
        out.push(Flow {
            family: family_of(v),
            direction: Direction::Inbound,
            saddr: Some(v),
            daddr: None,
        });
        out.push(Flow {
            family: family_of(v),
            direction: Direction::Outbound,
            saddr: None,
            daddr: Some(v),
        });
    }
    for v in config.hosted_addresses() {
        out.push(Flow {
            family: family_of(v),
            direction: Direction::Inbound,
            saddr: None,
            daddr: Some(v),
        });
        out.push(Flow {
            family: family_of(v),
            direction: Direction::Outbound,
            saddr: Some(v),
            daddr: None,
        });
    }
    if out.is_empty() {
        for direction in [Direction::Inbound, Direction::Outbound] {
            out.push(Flow {
                family: IpFamily::V4,
                direction,
                saddr: None,
                daddr: None,
            });
        }
    }
    out
}

pub fn findings(config: &Config, probe: &RulesetProbe, kernel_has_esp: bool) -> Vec<Finding> {
    let (json, text) = match probe {
        RulesetProbe::NoNft => {
            return vec![Finding::warning(
                "firewall",
                "cannot inspect the firewall: the nft program is not installed",
                "install nftables, or check by hand that UDP 500, UDP 4500 and ESP pass in and out",
            )];
        }
        RulesetProbe::Failed(e) => {
            return vec![Finding::warning(
                "firewall",
                format!("cannot inspect the firewall: {e}"),
                "run the doctor as root",
            )];
        }
        RulesetProbe::Listed { json, text } => (json, text),
    };
    let rs = match Ruleset::from_json(json) {
        Ok(rs) => rs.with_listing(text),
        Err(e) => {
            return vec![Finding::warning(
                "firewall",
                format!("cannot read `nft -j list ruleset`: {e}"),
                "check by hand that UDP 500, UDP 4500 and ESP pass in and out",
            )];
        }
    };
    let mut out = Vec::new();
    if rs.is_empty() {
        for t in TRAFFIC {
            out.push(Finding::ok(
                t.check,
                format!("{}: no nftables ruleset, nothing filters it", t.name),
            ));
        }
        return out;
    }
    let iface = config.kernel.interface.clone();
    for t in TRAFFIC {
        out.push(evaluate(
            &rs,
            t,
            &flows(config),
            iface.as_deref(),
            kernel_has_esp,
        ));
    }
    let unwalked = rs.unwalked_base_chains();
    if !unwalked.is_empty() {
        out.push(Finding::warning(
            "firewall.other",
            format!(
                "base chains in families the doctor does not evaluate: {}",
                unwalked.join(", ")
            ),
            "check by hand that they do not drop UDP 500, UDP 4500 or ESP",
        ));
    }
    out
}

fn evaluate(
    rs: &Ruleset,
    t: Traffic,
    flows: &[Flow],
    iface: Option<&str>,
    kernel_has_esp: bool,
) -> Finding {
    let mut dropped = Vec::new();
    let mut remedies = Vec::new();
    let mut uncertain = Vec::new();
    let mut doubtful = BTreeSet::new();
    for flow in flows {
        let mut probe = Probe::new(flow.family, flow.direction, t.l4);
        probe.iface = iface.map(str::to_string);
        probe.saddr = flow.saddr;
        probe.daddr = flow.daddr;
        let what = flow.label();
        match rs.evaluate(&probe) {
            Outcome::Accepted => {}
            Outcome::Dropped { at } => {
                dropped.push(format!("{what} dropped by {}", quote(rs, &at)));
                remedies.push(insert_command(&at, t.l4));
            }
            Outcome::Uncertain { paths } => {
                uncertain.push(format!("{what} {}", describe_end(rs, &paths[0])));
                for p in &paths {
                    for d in &p.doubts {
                        doubtful.insert(format!("{} ({})", quote(rs, &d.place), d.reason));
                    }
                    if let End::Unknown { at, why } = &p.end {
                        doubtful.insert(format!("{} ({why})", quote(rs, at)));
                    }
                }
            }
        }
    }
    let on = iface.map(|i| format!(" on {i}")).unwrap_or_default();
    if !dropped.is_empty() {
        let mut summary = format!("{}{on}: {}", t.name, dropped.join("; "));
        let severity = if matches!(t.l4, L4::Esp) && !kernel_has_esp {
            // Without kernel ESP charon runs ESP inside UDP 4500 (encap = yes): plain ESP
            // is not used here, but would be the moment the kernel had ESP.
            summary.push_str(
                " (not used now: this kernel has no ESP, charon must encapsulate in UDP 4500)",
            );
            Severity::Warning
        } else {
            summary.push_str(": would break failover");
            Severity::Error
        };
        let mut seen = BTreeSet::new();
        remedies.retain(|r| seen.insert(r.clone()));
        return Finding {
            check: t.check.into(),
            severity,
            summary,
            remedy: Some(remedies.join(" ; ")),
        };
    }
    if !uncertain.is_empty() {
        return Finding::warning(
            t.check,
            format!(
                "{}{on}: may be dropped: {}; depends on {}",
                t.name,
                uncertain.join("; "),
                doubtful.into_iter().collect::<Vec<_>>().join("; ")
            ),
            format!(
                "check those rules, or accept it explicitly before them (`{}` in the chain where they are)",
                format_args!("{} accept", t.l4.nft_match())
            ),
        );
    }
    let fams: BTreeSet<String> = flows.iter().map(|f| f.family.to_string()).collect();
    let fams: Vec<String> = fams.into_iter().collect();
    Finding::ok(
        t.check,
        format!(
            "{}{on}: accepted inbound and outbound ({})",
            t.name,
            fams.join(", ")
        ),
    )
}

fn quote(rs: &Ruleset, at: &Place) -> String {
    match at.handle {
        Some(_) => format!("{at} `{}`", rs.rule_text(at)),
        None => at.to_string(),
    }
}

fn describe_end(rs: &Ruleset, p: &Path) -> String {
    match &p.end {
        End::Accept => "accepted".into(),
        End::Drop { at } => format!("dropped by {}", quote(rs, at)),
        End::Unknown { at, why } => format!("undecided at {} ({why})", quote(rs, at)),
    }
}

/// The command that lets the packet through just before where it is dropped.
pub fn insert_command(at: &Place, l4: L4) -> String {
    let position = at
        .handle
        .map(|h| format!(" position {h}"))
        .unwrap_or_default();
    format!(
        "nft insert rule {} {} {}{position} {} accept",
        at.family,
        at.table,
        at.chain,
        l4.nft_match()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(name: &str) -> RulesetProbe {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/doctor/fixtures/");
        RulesetProbe::Listed {
            json: std::fs::read_to_string(format!("{dir}{name}.json")).unwrap(),
            text: std::fs::read_to_string(format!("{dir}{name}.txt")).unwrap(),
        }
    }

    fn config() -> Config {
        Config::parse("node = \"n\"\n").unwrap()
    }

    #[test]
    fn a_dropped_natt_is_an_error_naming_the_rule_with_the_fix() {
        let f = findings(&config(), &listed("jump_drop_natt"), true);
        assert_eq!(f.len(), 3);
        let natt = &f[1];
        assert_eq!(natt.check, "firewall.nat-t");
        assert_eq!(natt.severity, Severity::Error);
        assert!(natt.summary.contains("chain checks handle"), "{natt:?}");
        assert!(
            natt.summary.contains("`udp dport 4500 log prefix"),
            "{natt:?}"
        );
        let remedy = natt.remedy.as_deref().unwrap();
        assert!(
            remedy.starts_with("nft insert rule inet f checks position "),
            "{remedy}"
        );
        assert!(remedy.ends_with("udp dport 4500 accept"), "{remedy}");
        assert_eq!(f[0].severity, Severity::Ok);
        assert_eq!(f[2].severity, Severity::Ok);
    }

    #[test]
    fn a_policy_drop_remedy_inserts_at_the_top_and_esp_is_a_warning_without_kernel_esp() {
        let f = findings(&config(), &listed("ct_established"), false);
        assert_eq!(f[0].severity, Severity::Error);
        assert_eq!(
            f[0].remedy.as_deref(),
            Some("nft insert rule inet f input udp dport 500 accept")
        );
        assert_eq!(f[2].severity, Severity::Warning);
        let f = findings(&config(), &listed("ct_established"), true);
        assert_eq!(f[2].severity, Severity::Error);
    }

    #[test]
    fn unknown_rules_and_interfaces_make_warnings_and_the_interface_decides() {
        let f = findings(&config(), &listed("unknown_expr"), true);
        assert_eq!(f[1].severity, Severity::Warning);
        assert!(f[1].summary.contains("numgen"), "{:?}", f[1]);
        let f = findings(&config(), &listed("interface"), true);
        assert_eq!(f[1].severity, Severity::Warning);
        assert!(f[1].summary.contains("interface"), "{:?}", f[1]);
        let mut c = config();
        c.kernel.interface = Some("eth0".into());
        assert_eq!(
            findings(&c, &listed("interface"), true)[1].severity,
            Severity::Ok
        );
    }

    #[test]
    fn vip_addresses_decide_address_restricted_rules() {
        let peer = |vip: &str| {
            Config::parse(&format!(
                "node = \"n\"\n[[peer_vip]]\naddress = \"{vip}\"\nconnection = \"v\"\n"
            ))
            .unwrap()
        };
        let f = findings(&peer("198.51.100.7"), &listed("address_restricted"), true);
        assert!(f.iter().all(|x| x.severity == Severity::Ok), "{f:?}");
        let f = findings(&peer("192.0.2.100"), &listed("address_restricted"), true);
        assert_eq!(f[1].severity, Severity::Error);
        assert!(
            f[1].summary
                .contains("inbound IPv4 from 192.0.2.100 dropped"),
            "{:?}",
            f[1]
        );
        // Without a VIP the source is unknown: it depends on the address.
        let f = findings(&config(), &listed("address_restricted"), true);
        assert_eq!(f[1].severity, Severity::Warning);
        assert!(
            f[1].summary.contains("depends on the address"),
            "{:?}",
            f[1]
        );
    }

    #[test]
    fn no_ruleset_or_no_nft() {
        let empty = RulesetProbe::Listed {
            json: r#"{"nftables":[{"metainfo":{"version":"1.0.6"}}]}"#.into(),
            text: String::new(),
        };
        let f = findings(&config(), &empty, true);
        assert!(f.iter().all(|x| x.severity == Severity::Ok));
        let f = findings(&config(), &RulesetProbe::NoNft, true);
        assert_eq!(f[0].severity, Severity::Warning);
    }

    #[test]
    fn ipv6_vips_are_checked_as_ipv6() {
        let c = Config::parse(
            "node = \"n\"\n[[peer_vip]]\naddress = \"2001:db8::1\"\nconnection = \"v\"\n",
        )
        .unwrap();
        let f = findings(&c, &listed("families"), true);
        assert_eq!(f[0].severity, Severity::Error);
        assert!(f[0].summary.contains("IPv6"), "{:?}", f[0]);
        assert!(!f[0].summary.contains("IPv4"));
    }
}
