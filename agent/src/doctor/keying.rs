//! The IKE daemon: charon's VICI socket answers, the connections peer VIPs name are
//! loaded, and a kernel interface plugin is loaded.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Finding;
use crate::config::{Config, KeyingBackend};
use crate::keying::strongswan::connection::ViciConn;

/// charon answers these in milliseconds; one that does not within this is as good as down.
const VICI_TIMEOUT: Duration = Duration::from_secs(3);

/// Plugins charon installs SAs and policies with; without one it negotiates SAs it cannot
/// use.
const KERNEL_PLUGINS: [&str; 2] = ["kernel-netlink", "kernel-libipsec"];

/// What charon told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonFacts {
    pub daemon: String,
    pub version: String,
    /// Loaded connections and their children (`list-conns`).
    pub conns: Result<BTreeMap<String, Vec<String>>, String>,
    /// Loaded plugins (`stats`).
    pub plugins: Result<Vec<String>, String>,
    /// Installed trap policies (`list-policies` with `trap = yes`).
    pub traps: Result<Vec<TrapPolicy>, String>,
}

/// One trap policy charon holds: traffic it covers without an SA is held back while charon
/// negotiates one, instead of leaving in clear text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrapPolicy {
    /// The IKE connection (`ike`), when charon reports it.
    pub connection: Option<String>,
    pub child: String,
    pub remote_ts: Vec<String>,
}

/// Where reaching charon failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonProblem {
    Missing,
    NotASocket,
    Connect(String),
    Version(String),
}

pub type DaemonProbe = Result<DaemonFacts, DaemonProblem>;

impl Default for DaemonFacts {
    fn default() -> Self {
        DaemonFacts {
            daemon: String::new(),
            version: String::new(),
            conns: Ok(BTreeMap::new()),
            plugins: Ok(Vec::new()),
            traps: Ok(Vec::new()),
        }
    }
}

impl DaemonFacts {
    pub fn has_plugin(&self, name: &str) -> Option<bool> {
        self.plugins
            .as_ref()
            .ok()
            .map(|p| p.iter().any(|x| x == name))
    }
}

#[derive(Serialize, Default)]
struct Empty {}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VersionMsg {
    daemon: String,
    version: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StatsMsg {
    plugins: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ConnMsg {
    children: BTreeMap<String, ChildMsg>,
}

/// `list-policies` arguments: trap policies only (not the `drop`/`pass` shunts).
#[derive(Serialize)]
struct ListPolicies {
    trap: bool,
}

/// One `list-policy` event entry (keyed by `ike/child`, or `child`).
#[derive(Deserialize, Default)]
#[serde(default)]
struct PolicyMsg {
    child: String,
    ike: Option<String>,
    #[serde(rename = "remote-ts")]
    remote_ts: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChildMsg {
    #[allow(dead_code)]
    mode: String,
}

/// Asks charon over VICI: `version`, `list-conns`, `stats`, `list-policies`.
pub async fn probe(socket: &Path) -> DaemonProbe {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(socket) {
        Err(_) => return Err(DaemonProblem::Missing),
        Ok(m) if !m.file_type().is_socket() => return Err(DaemonProblem::NotASocket),
        Ok(_) => {}
    }
    let mut conn = ViciConn::connect(socket)
        .await
        .map_err(|e| DaemonProblem::Connect(e.to_string()))?;
    let version: VersionMsg = conn
        .request("version", Empty {}, VICI_TIMEOUT)
        .await
        .map_err(|e| DaemonProblem::Version(e.to_string()))?;
    let conns = conn
        .stream_request::<_, BTreeMap<String, ConnMsg>>(
            "list-conns",
            "list-conn",
            Empty {},
            VICI_TIMEOUT,
        )
        .await
        .map(|events| {
            events
                .into_iter()
                .flatten()
                .map(|(name, c)| (name, c.children.into_keys().collect()))
                .collect()
        })
        .map_err(|e| e.to_string());
    let plugins = conn
        .request::<_, StatsMsg>("stats", Empty {}, VICI_TIMEOUT)
        .await
        .map(|s| s.plugins)
        .map_err(|e| e.to_string());
    let traps = conn
        .stream_request::<_, BTreeMap<String, PolicyMsg>>(
            "list-policies",
            "list-policy",
            ListPolicies { trap: true },
            VICI_TIMEOUT,
        )
        .await
        .map(|events| {
            events
                .into_iter()
                .flatten()
                .map(|(_, p)| TrapPolicy {
                    connection: p.ike,
                    child: p.child,
                    remote_ts: p.remote_ts,
                })
                .collect()
        })
        .map_err(|e| e.to_string());
    Ok(DaemonFacts {
        daemon: version.daemon,
        version: version.version,
        conns,
        plugins,
        traps,
    })
}

/// The keying findings: the daemon, one per peer VIP's connection, the plugins.
pub fn findings(config: &Config, probe: &DaemonProbe) -> Vec<Finding> {
    let socket = config.keying.vici_socket.display();
    let needed = config.keying.backend == KeyingBackend::Strongswan;
    let facts = match probe {
        Ok(f) => f,
        Err(problem) => {
            let what = match problem {
                DaemonProblem::Missing => format!("VICI socket {socket} does not exist"),
                DaemonProblem::NotASocket => format!("{socket} is not a socket"),
                DaemonProblem::Connect(e) => format!("cannot connect to {socket}: {e}"),
                DaemonProblem::Version(e) => {
                    format!("charon at {socket} does not answer `version`: {e}")
                }
            };
            if !needed {
                return vec![Finding::ok(
                    "keying.daemon",
                    format!("keying.backend = none: no IKE daemon needed ({what})"),
                )];
            }
            return vec![Finding::error(
                "keying.daemon",
                what,
                format!(
                    "start charon (systemctl start strongswan), check that its `vici` plugin is loaded, and that keying.vici_socket ({socket}) is the path in charon's `plugins.vici.socket`"
                ),
            )];
        }
    };
    let answers = format!(
        "{} {} answers on {socket}",
        or(&facts.daemon, "charon"),
        or(&facts.version, "(version unknown)")
    );
    if !needed {
        // The agent will not drive it: its connections are none of the doctor's business.
        return vec![Finding::ok(
            "keying.daemon",
            format!("{answers} (not used: keying.backend = none)"),
        )];
    }
    let mut out = vec![Finding::ok("keying.daemon", answers)];
    for p in &config.peer_vips {
        let check = format!("keying.connection[{}]", p.address);
        let Some(pc) = p.peer_connection() else {
            // Policy-managed: the agent loads the connection itself when it starts.
            out.push(Finding::ok(
                check,
                format!(
                    "peer VIP {}: the agent loads its connection from the VIP's policy",
                    p.address
                ),
            ));
            continue;
        };
        out.push(match &facts.conns {
            Err(e) => Finding::warning(
                check,
                format!("cannot list charon's connections: {e}"),
                "run `swanctl --list-conns` by hand",
            ),
            Ok(conns) => match conns.get(&pc.connection) {
                None => Finding::error(
                    check,
                    format!(
                        "peer VIP {}: charon has no connection {:?} loaded",
                        p.address, pc.connection
                    ),
                    format!(
                        "define connections.{} in swanctl.conf and run `swanctl --load-all`, or fix peer_vip.connection",
                        pc.connection
                    ),
                ),
                Some(children) if !children.contains(&pc.child) => Finding::error(
                    check,
                    format!(
                        "peer VIP {}: connection {:?} has no child {:?} (it has: {})",
                        p.address,
                        pc.connection,
                        pc.child,
                        children.join(", ")
                    ),
                    "fix peer_vip.child, or add the child to the connection and run `swanctl --load-all`",
                ),
                Some(_) => Finding::ok(
                    check,
                    format!(
                        "peer VIP {}: connection {:?} with child {:?} is loaded",
                        p.address, pc.connection, pc.child
                    ),
                ),
            },
        });
    }
    out.push(match &facts.plugins {
        Err(e) => Finding::warning(
            "keying.plugins",
            format!("cannot read charon's plugins (`stats`): {e}"),
            "run `swanctl --stats` by hand",
        ),
        Ok(plugins) => {
            let kernel: Vec<&str> = KERNEL_PLUGINS
                .into_iter()
                .filter(|k| plugins.iter().any(|p| p == k))
                .collect();
            if kernel.is_empty() {
                Finding::warning(
                    "keying.plugins",
                    "charon has neither kernel-netlink nor kernel-libipsec loaded: it cannot install SAs",
                    "add kernel-netlink (and kernel-libipsec on a kernel without ESP) to charon's `load` line",
                )
            } else {
                Finding::ok(
                    "keying.plugins",
                    format!("kernel interface plugin(s): {}", kernel.join(", ")),
                )
            }
        }
    });
    out
}

fn or<'a>(s: &'a str, default: &'a str) -> &'a str {
    if s.is_empty() { default } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Severity;

    fn config(backend: &str) -> Config {
        Config::parse(&format!(
            "node = \"fe1\"\n[keying]\nbackend = \"{backend}\"\nvici_socket = \"/run/x.vici\"\n[[peer_vip]]\naddress = \"192.0.2.100\"\nconnection = \"vip\"\n[[peer_vip]]\naddress = \"192.0.2.101\"\nconnection = \"other\"\nchild = \"c\"\n"
        ))
        .unwrap()
    }

    fn facts() -> DaemonFacts {
        DaemonFacts {
            daemon: "charon".into(),
            version: "5.9.8".into(),
            conns: Ok([("vip".to_string(), vec!["vip".to_string()])].into()),
            plugins: Ok(vec!["vici".into(), "kernel-libipsec".into()]),
            traps: Ok(Vec::new()),
        }
    }

    #[test]
    fn a_missing_socket_is_an_error_only_when_strongswan_is_the_backend() {
        let f = findings(&config("strongswan"), &Err(DaemonProblem::Missing));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Error);
        assert!(f[0].summary.contains("/run/x.vici"), "{f:?}");
        let f = findings(&config("none"), &Err(DaemonProblem::Missing));
        assert_eq!(f[0].severity, Severity::Ok);
        // Nor are connections it lacks when the agent does not use it.
        let f = findings(&config("none"), &Ok(facts()));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Ok);
    }

    #[test]
    fn each_peer_vip_connection_and_child_is_looked_up() {
        let f = findings(&config("strongswan"), &Ok(facts()));
        let by_check = |c: &str| f.iter().find(|x| x.check == c).unwrap().clone();
        assert!(by_check("keying.daemon").summary.contains("5.9.8"));
        assert_eq!(
            by_check("keying.connection[192.0.2.100]").severity,
            Severity::Ok
        );
        let missing = by_check("keying.connection[192.0.2.101]");
        assert_eq!(missing.severity, Severity::Error);
        assert!(missing.summary.contains("\"other\""));
        assert_eq!(by_check("keying.plugins").severity, Severity::Ok);

        let mut wrong_child = facts();
        wrong_child.conns = Ok([("other".to_string(), vec!["x".to_string()])].into());
        let f = findings(&config("strongswan"), &Ok(wrong_child));
        let f = f
            .iter()
            .find(|x| x.check == "keying.connection[192.0.2.101]")
            .unwrap();
        assert!(f.summary.contains("no child \"c\""), "{f:?}");
    }

    #[test]
    fn a_policy_managed_peer_vip_needs_no_hand_written_connection() {
        let c = Config::parse(
            "node = \"fe1\"\n[keying]\nbackend = \"strongswan\"\n[kernel]\nbackend = \"xfrm\"\ninterface = \"eth0\"\n[policy]\nmanaged = true\npsk_file = \"/x\"\n[[peer_vip]]\naddress = \"192.0.2.100\"\n",
        )
        .unwrap();
        let f = findings(&c, &Ok(facts()));
        let p = f
            .iter()
            .find(|x| x.check == "keying.connection[192.0.2.100]")
            .unwrap();
        assert_eq!(p.severity, Severity::Ok);
        assert!(p.summary.contains("policy"), "{p:?}");
    }

    #[test]
    fn no_kernel_plugin_is_a_warning() {
        let mut f = facts();
        f.plugins = Ok(vec!["vici".into()]);
        let out = findings(&config("strongswan"), &Ok(f));
        let p = out.iter().find(|x| x.check == "keying.plugins").unwrap();
        assert_eq!(p.severity, Severity::Warning);
    }
}
