//! The agent's TOML configuration: parsing with unknown keys rejected, then validation that
//! reports every problem with the key it concerns and the reason. One file per section of
//! the file, each with its types, their defaults and its checks; checks that span sections
//! live with the section whose key they report.

mod api;
mod drill;
mod failover;
mod kernel;
mod keying;
mod log;
mod metrics;
mod policy;
mod store;
#[cfg(test)]
mod tests;
mod vips;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use api::{ApiConfig, ApiEndpoint, DEFAULT_API_ENDPOINT};
pub use drill::{DrillConfig, DrillIntegration};
pub use failover::{FailoverConfig, ReconnectConfig};
pub use kernel::{KernelBackend, KernelConfig};
pub use keying::{KeyingBackend, KeyingConfig};
pub use log::{LogConfig, LogFormat};
pub use metrics::MetricsConfig;
pub use policy::PolicyConfig;
pub use store::{StoreBackend, StoreConfig};
pub use vips::{
    DEFAULT_PEER_PRIORITY, HostedVipConfig, MAX_PEER_PRIORITY, PeerVipConfig, vip_address_problem,
};

use crate::model::{FlowDirection, ProtectedFlow, Vip};

/// The agent's configuration file. Only `node` is required.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name as recorded in the cluster store: letters, digits, `-`, `_` and
    /// `.`, unique per node.
    pub node: String,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub keying: KeyingConfig,
    #[serde(default)]
    pub kernel: KernelConfig,
    #[serde(default)]
    pub failover: FailoverConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub drill: DrillConfig,
    /// VIPs this node may host (back-end side).
    #[serde(default, rename = "hosted_vip")]
    pub hosted_vips: Vec<HostedVipConfig>,
    /// VIPs this node talks to (front-end side).
    #[serde(default, rename = "peer_vip")]
    pub peer_vips: Vec<PeerVipConfig>,
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_problems(file, problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<ConfigProblem>,
    },
}

fn render_problems(file: &Path, problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {p}", file.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            ConfigError::Read { .. } => &[],
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|problems| ConfigError::Invalid {
            file: path.to_path_buf(),
            problems,
        })
    }

    /// Parses and validates; every problem found is returned, not only the first.
    pub fn parse(text: &str) -> Result<Config, Vec<ConfigProblem>> {
        let de = toml::Deserializer::parse(text).map_err(|e| {
            vec![ConfigProblem {
                key: "(syntax)".into(),
                reason: one_line(&e.to_string()),
            }]
        })?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." || key.is_empty() {
                "(top level)".to_string()
            } else {
                key
            };
            vec![ConfigProblem {
                key,
                reason: one_line(&e.into_inner().to_string()),
            }]
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    pub fn validate(&self) -> Vec<ConfigProblem> {
        // Problems are reported in this order, section by section.
        let mut p = Problems::default();
        if self.node.trim().is_empty() {
            p.bad("node", "must not be empty");
        } else if !crate::model::valid_node_name(&self.node) {
            p.bad(
                "node",
                format!(
                    "{:?} may only hold letters, digits, '-', '_' and '.' (at most 253)",
                    self.node
                ),
            );
        }
        self.api.validate(&mut p);
        self.log.validate(&mut p);
        self.store.validate(&mut p);
        self.keying.validate(&mut p);
        self.kernel.validate(&mut p);
        self.failover.validate(self.keying.sample_interval, &mut p);
        if let Some(calm) = self.keying.calm_sample_interval
            && calm > self.failover.idle_timeout
        {
            p.bad(
                "keying.calm_sample_interval",
                format!(
                    "{} is longer than failover.idle_timeout ({}): a silence would be seen \
                     long after it should have been declared",
                    humantime::format_duration(calm),
                    humantime::format_duration(self.failover.idle_timeout)
                ),
            );
        }
        kernel::validate_fail_secure(self, &mut p);
        policy::validate(self, &mut p);
        self.drill.validate(&mut p);
        self.failover.reconnect.validate(&mut p);
        vips::validate(self, &mut p);
        p.0
    }

    /// Whether the agent owns the IKE connection of this VIP (from its policy).
    pub fn policy_managed(&self, vip: Vip) -> bool {
        self.policy.managed
            && (self.hosted_vips.iter().any(|h| h.address == vip)
                || self
                    .peer_vips
                    .iter()
                    .any(|p| p.address == vip && p.connection.is_none()))
    }

    /// The IKE identity this node uses in policy-managed connections.
    pub fn ike_identity(&self) -> String {
        self.policy
            .identity
            .clone()
            .unwrap_or_else(|| self.node.clone())
    }

    pub fn hosted_addresses(&self) -> Vec<Vip> {
        self.hosted_vips.iter().map(|v| v.address).collect()
    }

    /// `keying.calm_sample_interval`, or its default for this store: with etcd half the
    /// idle timeout, at most 1 s, so a silence is counted within one idle timeout.
    pub fn calm_sample_interval(&self) -> Duration {
        let fast = self.keying.sample_interval;
        self.keying
            .calm_sample_interval
            .unwrap_or(match self.store.backend {
                StoreBackend::Etcd => (self.failover.idle_timeout / 2)
                    .min(Duration::from_secs(1))
                    .max(fast),
                StoreBackend::Embedded => fast,
            })
    }

    pub fn peer_addresses(&self) -> Vec<Vip> {
        self.peer_vips.iter().map(|v| v.address).collect()
    }

    pub fn peer(&self, vip: Vip) -> Option<&PeerVipConfig> {
        self.peer_vips.iter().find(|p| p.address == vip)
    }

    /// Every protected flow of every VIP (validated, so parsing cannot fail here). A
    /// policy-managed VIP starts with all of its traffic protected: until its policy is
    /// read, nothing tells which ports may go in clear text.
    pub fn protected_flows(&self) -> Vec<ProtectedFlow> {
        let whole = |vip: Vip, direction| ProtectedFlow {
            vip,
            protocol: crate::model::FlowProtocol::Any,
            port: None,
            direction,
        };
        let peers = self.peer_vips.iter().flat_map(|v| {
            if v.protect.is_empty() && self.policy_managed(v.address) {
                vec![whole(v.address, FlowDirection::ToVip)]
            } else {
                v.flows().unwrap_or_default()
            }
        });
        let hosted = self.hosted_vips.iter().flat_map(|v| {
            if v.protect.is_empty()
                && self.policy_managed(v.address)
                && self.kernel.interface.is_some()
            {
                vec![whole(v.address, FlowDirection::FromVip)]
            } else {
                v.flows().unwrap_or_default()
            }
        });
        peers.chain(hosted).collect()
    }

    /// Whether a peer VIP has flows to block while no SA carries them.
    pub fn peer_protected(&self, vip: Vip) -> bool {
        self.peer(vip)
            .is_some_and(|p| !p.protect.is_empty() || self.policy_managed(vip))
    }

    /// Whether a hosted VIP's answers are guarded (blocked outside IPsec). A policy-managed
    /// VIP is guarded when the guard can be bound to `kernel.interface`.
    pub fn hosted_protected(&self, vip: Vip) -> bool {
        self.hosted_vips.iter().any(|h| {
            h.address == vip
                && (!h.protect.is_empty()
                    || (self.policy_managed(vip) && self.kernel.interface.is_some()))
        })
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The problems found so far; each section's checks add theirs.
#[derive(Debug, Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn bad(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.into(),
            reason: reason.into(),
        });
    }

    fn positive(&mut self, key: &str, d: Duration) {
        if d.is_zero() {
            self.bad(key, "must be greater than zero");
        }
    }
}

fn default_true() -> bool {
    true
}
