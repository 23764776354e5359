//! `[keying]`: the IKE daemon the agent drives.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Problems;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeyingBackend {
    /// No keying daemon: the agent tracks ownership only.
    #[default]
    None,
    /// strongSwan charon over its VICI socket.
    Strongswan,
}

/// The IKE daemon the agent drives (strongSwan charon over VICI).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyingConfig {
    /// `strongswan` to drive charon; `none` tracks ownership only (no SA is touched).
    #[serde(default)]
    pub backend: KeyingBackend,
    /// charon's VICI socket (strongswan.conf `charon.plugins.vici.socket`).
    #[serde(default = "default_vici_socket")]
    pub vici_socket: PathBuf,
    /// How often SA byte counters are read for the idle detector. Lower: faster
    /// detection, more VICI traffic. `failover.idle_timeout` must be at least twice this.
    #[serde(default = "default_sample_interval", with = "humantime_serde")]
    pub sample_interval: Duration,
    /// Upper bound for one IKE initiation; raise it over high-latency links.
    #[serde(default = "default_initiate_timeout", with = "humantime_serde")]
    pub initiate_timeout: Duration,
    /// First wait between reconnection attempts to the daemon after it went away; doubles
    /// up to `keying.reconnect_max`.
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest wait between reconnection attempts to the daemon.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for KeyingConfig {
    fn default() -> Self {
        KeyingConfig {
            backend: KeyingBackend::default(),
            vici_socket: default_vici_socket(),
            sample_interval: default_sample_interval(),
            initiate_timeout: default_initiate_timeout(),
            reconnect_min: default_reconnect_min(),
            reconnect_max: default_reconnect_max(),
        }
    }
}

fn default_vici_socket() -> PathBuf {
    PathBuf::from("/var/run/charon.vici")
}
fn default_sample_interval() -> Duration {
    Duration::from_millis(250)
}
fn default_initiate_timeout() -> Duration {
    // IKE_SA_INIT + IKE_AUTH take tens of milliseconds between cluster nodes; an attempt
    // still unanswered after a second is aimed at nobody (the VIP in transit), and a fresh
    // one finds the new owner sooner than charon's own retransmission would.
    Duration::from_secs(1)
}
fn default_reconnect_min() -> Duration {
    Duration::from_millis(100)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(2)
}

impl KeyingConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.positive("keying.sample_interval", self.sample_interval);
        p.positive("keying.initiate_timeout", self.initiate_timeout);
        p.positive("keying.reconnect_min", self.reconnect_min);
        if self.reconnect_max < self.reconnect_min {
            p.bad(
                "keying.reconnect_max",
                "must not be shorter than keying.reconnect_min",
            );
        }
    }
}
