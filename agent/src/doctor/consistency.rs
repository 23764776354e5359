//! The config against this node: VIPs listed once, the interfaces it names exist, the
//! protected flows are guarded by the kernel, peer VIPs are routable.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};

use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;

use super::Finding;
use crate::config::{Config, KernelBackend};

/// What the node looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// Interface names, or why they could not be listed.
    pub links: Result<Vec<String>, String>,
    /// Per peer VIP: the source address the kernel would use, or why there is no route.
    pub routes: Vec<(IpAddr, Result<IpAddr, String>)>,
}

impl Default for NodeFacts {
    fn default() -> Self {
        NodeFacts {
            links: Ok(Vec::new()),
            routes: Vec::new(),
        }
    }
}

pub async fn check(config: &Config) -> Vec<Finding> {
    let facts = NodeFacts {
        links: links().await,
        routes: config
            .peer_vips
            .iter()
            .map(|p| (p.address, route_source(p.address)))
            .collect(),
    };
    findings(config, &facts)
}

async fn links() -> Result<Vec<String>, String> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let names = handle
        .link()
        .get()
        .execute()
        .map_ok(|m| {
            m.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        })
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| e.to_string());
    driver.abort();
    Ok(names?.into_iter().flatten().collect())
}

/// The kernel's route lookup for `vip` (what `ip route get` does): connecting a UDP socket
/// picks a route and a source address, or fails with "network unreachable"; it sends
/// nothing.
fn route_source(vip: IpAddr) -> Result<IpAddr, String> {
    let any: SocketAddr = match vip {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let s = UdpSocket::bind(any).map_err(|e| e.to_string())?;
    s.connect((vip, 500)).map_err(|e| e.to_string())?;
    s.local_addr().map(|a| a.ip()).map_err(|e| e.to_string())
}

pub fn findings(config: &Config, facts: &NodeFacts) -> Vec<Finding> {
    vec![
        vips(config),
        interfaces(config, facts),
        fail_secure(config),
        routes(facts),
    ]
}

fn vips(config: &Config) -> Finding {
    let mut problems = Vec::new();
    let mut hosted = BTreeSet::new();
    for v in &config.hosted_vips {
        if !hosted.insert(v.address) {
            problems.push(format!("{} is hosted twice", v.address));
        }
    }
    let mut peers = BTreeSet::new();
    for v in &config.peer_vips {
        if !peers.insert(v.address) {
            problems.push(format!("{} is a peer twice", v.address));
        }
        if hosted.contains(&v.address) {
            problems.push(format!("{} is both hosted and a peer", v.address));
        }
    }
    if problems.is_empty() {
        Finding::ok(
            "consistency.vips",
            "every VIP is listed once, as hosted or as peer",
        )
    } else {
        Finding::error(
            "consistency.vips",
            problems.join("; "),
            "a node either hosts a VIP or talks to it; list each VIP once",
        )
    }
}

fn interfaces(config: &Config, facts: &NodeFacts) -> Finding {
    let mut wanted: Vec<(String, &str)> = config
        .hosted_vips
        .iter()
        .filter_map(|v| {
            v.interface
                .as_deref()
                .map(|i| (format!("hosted VIP {}", v.address), i))
        })
        .collect();
    if let Some(i) = &config.kernel.interface {
        wanted.push(("kernel.interface".into(), i));
    }
    if wanted.is_empty() {
        return Finding::ok("consistency.interfaces", "the config names no interface");
    }
    let links = match &facts.links {
        Ok(l) => l,
        Err(e) => {
            return Finding::warning(
                "consistency.interfaces",
                format!("cannot list this node's interfaces: {e}"),
                "run the doctor as root",
            );
        }
    };
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(_, i)| !links.iter().any(|l| l == i))
        .map(|(who, i)| format!("{who}: interface {i} does not exist"))
        .collect();
    if missing.is_empty() {
        let names: BTreeSet<&str> = wanted.iter().map(|(_, i)| *i).collect();
        Finding::ok(
            "consistency.interfaces",
            format!(
                "interface(s) {} exist",
                names.into_iter().collect::<Vec<_>>().join(", ")
            ),
        )
    } else {
        Finding::error(
            "consistency.interfaces",
            missing.join("; "),
            "fix the interface names in the config (`ip link` lists this node's)",
        )
    }
}

fn fail_secure(config: &Config) -> Finding {
    let flows = config.protected_flows().len();
    match (config.kernel.backend, config.kernel.fail_secure) {
        (KernelBackend::Xfrm, true) => Finding::ok(
            "consistency.fail_secure",
            format!(
                "the standing guard covers {flows} protected flow(s) at all times (per VIP: kernel.guard)"
            ),
        ),
        (KernelBackend::Xfrm, false) => Finding::warning(
            "consistency.fail_secure",
            "kernel.fail_secure is off: no standing guard, protected traffic may leave in clear text between SAs and while charon is down",
            "set kernel.fail_secure = true",
        ),
        (KernelBackend::None, _) if flows > 0 => Finding::warning(
            "consistency.fail_secure",
            format!(
                "{flows} protected flow(s) but kernel.backend = none: nothing can block them, so they may leave in clear text between SAs and while charon is down"
            ),
            "set kernel.backend = \"xfrm\" (and kernel.interface)",
        ),
        (KernelBackend::None, _) => Finding::ok(
            "consistency.fail_secure",
            "no protected flows configured (kernel.backend = none)",
        ),
    }
}

fn routes(facts: &NodeFacts) -> Finding {
    if facts.routes.is_empty() {
        return Finding::ok("consistency.routes", "no peer VIPs to route to");
    }
    let (ok, bad): (Vec<_>, Vec<_>) = facts.routes.iter().partition(|(_, r)| r.is_ok());
    if bad.is_empty() {
        Finding::ok(
            "consistency.routes",
            ok.iter()
                .map(|(vip, src)| format!("{vip} via source {}", src.as_ref().expect("ok")))
                .collect::<Vec<_>>()
                .join(", "),
        )
    } else {
        Finding::warning(
            "consistency.routes",
            bad.iter()
                .map(|(vip, e)| format!("no route to peer VIP {vip}: {}", e.as_ref().unwrap_err()))
                .collect::<Vec<_>>()
                .join("; "),
            "add a route toward the VIPs (`ip route get VIP` must succeed)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Severity;

    fn by<'a>(f: &'a [Finding], check: &str) -> &'a Finding {
        f.iter().find(|x| x.check == check).unwrap()
    }

    #[test]
    fn missing_interfaces_are_errors_naming_them() {
        let c = Config::parse(
            "node = \"be1\"\n[kernel]\nbackend = \"xfrm\"\ninterface = \"eth9\"\n[[hosted_vip]]\naddress = \"192.0.2.100\"\ninterface = \"eth0\"\nprotect = [\"tcp/143\"]\n",
        )
        .unwrap();
        let facts = NodeFacts {
            links: Ok(vec!["lo".into(), "eth0".into()]),
            routes: vec![],
        };
        let f = findings(&c, &facts);
        let i = by(&f, "consistency.interfaces");
        assert_eq!(i.severity, Severity::Error);
        assert!(
            i.summary.contains("kernel.interface: interface eth9"),
            "{i:?}"
        );
        assert!(!i.summary.contains("eth0 does not"));
        assert_eq!(by(&f, "consistency.fail_secure").severity, Severity::Ok);
        assert_eq!(by(&f, "consistency.vips").severity, Severity::Ok);
    }

    #[test]
    fn protected_flows_without_a_kernel_backend_or_fail_secure_warn() {
        let c = Config::parse(
            // Config check refuses this unless the guard is turned off explicitly.
            "node = \"fe1\"\n[kernel]\nfail_secure = false\n[[peer_vip]]\naddress = \"192.0.2.100\"\nconnection = \"vip\"\nprotect = [\"tcp/143\"]\n",
        )
        .unwrap();
        let f = findings(&c, &NodeFacts::default());
        assert_eq!(
            by(&f, "consistency.fail_secure").severity,
            Severity::Warning
        );
        let mut c2 = c.clone();
        c2.kernel.backend = KernelBackend::Xfrm;
        c2.kernel.fail_secure = false;
        let f = findings(&c2, &NodeFacts::default());
        let fs = by(&f, "consistency.fail_secure");
        assert!(fs.summary.contains("clear text"), "{fs:?}");
    }

    #[test]
    fn a_peer_vip_without_a_route_warns() {
        let c = Config::parse("node = \"fe1\"\n").unwrap();
        let vip: IpAddr = "192.0.2.100".parse().unwrap();
        let f = findings(
            &c,
            &NodeFacts {
                links: Ok(vec![]),
                routes: vec![(vip, Err("Network is unreachable".into()))],
            },
        );
        let r = by(&f, "consistency.routes");
        assert_eq!(r.severity, Severity::Warning);
        assert!(r.summary.contains("192.0.2.100"));
    }
}
