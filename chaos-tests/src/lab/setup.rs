//! A set-up chooses what runs on the nodes: a strongSwan baseline or vipsec.

use std::fmt;
use std::str::FromStr;

use super::charon::Liveness;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(into = "String")]
pub enum Setup {
    /// charon as shipped: no DPD, default retransmissions. Never recovers from a move.
    StrongswanDefaults,
    /// charon with DPD every second, restart actions and short retransmissions.
    StrongswanDpd,
    /// The vipsec agent on every node, ownership in the lab's etcd.
    VipsecEtcd,
    /// The vipsec agent with its embedded store only: front-ends rely on the idle detector.
    VipsecIdle,
    /// vipsec with etcd, every IKE connection loaded by the agents from one cluster-wide
    /// policy stored in etcd (charon starts with no connection at all).
    VipsecPolicy,
    /// vipsec with etcd beside a two-node Pacemaker cluster (corosync 3, IPaddr2, the
    /// agent run by deploy/pacemaker/vipsec) instead of keepalived.
    Pacemaker,
}

/// What moves the VIPs between the back-ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterManager {
    Keepalived,
    Pacemaker,
}

/// How a vipsec set-up stores ownership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentStore {
    Etcd,
    Embedded,
}

impl Setup {
    pub const ALL: [Setup; 6] = [
        Setup::StrongswanDefaults,
        Setup::StrongswanDpd,
        Setup::VipsecEtcd,
        Setup::VipsecIdle,
        Setup::VipsecPolicy,
        Setup::Pacemaker,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Setup::StrongswanDefaults => "strongswan-defaults",
            Setup::StrongswanDpd => "strongswan-dpd",
            Setup::VipsecEtcd => "vipsec-etcd",
            Setup::VipsecIdle => "vipsec-idle",
            Setup::VipsecPolicy => "vipsec-policy",
            Setup::Pacemaker => "pacemaker",
        }
    }

    /// charon's own liveness checks. vipsec set-ups leave them off: the agent is what
    /// notices a move.
    pub fn liveness(self) -> Liveness {
        match self {
            Setup::StrongswanDpd => Liveness {
                dpd: true,
                short_retransmits: true,
                agent_initiates: false,
            },
            Setup::StrongswanDefaults => Liveness {
                dpd: false,
                short_retransmits: false,
                agent_initiates: false,
            },
            Setup::VipsecEtcd | Setup::VipsecIdle | Setup::VipsecPolicy | Setup::Pacemaker => {
                Liveness {
                    dpd: false,
                    short_retransmits: false,
                    agent_initiates: true,
                }
            }
        }
    }

    pub fn agent(self) -> Option<AgentStore> {
        match self {
            Setup::VipsecEtcd | Setup::VipsecPolicy | Setup::Pacemaker => Some(AgentStore::Etcd),
            Setup::VipsecIdle => Some(AgentStore::Embedded),
            _ => None,
        }
    }
}

impl Setup {
    /// The agents load the IKE connections from the stored policy.
    pub fn policy_managed(self) -> bool {
        self == Setup::VipsecPolicy
    }

    pub fn cluster_manager(self) -> ClusterManager {
        match self {
            Setup::Pacemaker => ClusterManager::Pacemaker,
            _ => ClusterManager::Keepalived,
        }
    }
}

impl fmt::Display for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<Setup> for String {
    fn from(s: Setup) -> String {
        s.name().to_string()
    }
}

impl FromStr for Setup {
    type Err = String;
    fn from_str(s: &str) -> Result<Setup, String> {
        Setup::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Setup::ALL.iter().map(|x| x.name()).collect();
                format!("unknown set-up {s:?}; known: {}", names.join(", "))
            })
    }
}
