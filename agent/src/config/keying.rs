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
    /// How often SA counters are read while every peer VIP's traffic is answered (or
    /// there is none); `keying.sample_interval` as soon as one VIP's traffic goes
    /// unanswered. A silence that starts just after a calm sample is counted from up to
    /// twice this later (the next sample still holds the last answers). At most
    /// `failover.idle_timeout`.
    /// Unset: with an etcd store half of `failover.idle_timeout`, at most 1 s (ownership
    /// changes come from the store; the idle detector is the backstop), and
    /// `keying.sample_interval` without one (the idle detector is how a dead owner is
    /// found).
    #[serde(default, with = "humantime_serde")]
    pub calm_sample_interval: Option<Duration>,
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
            calm_sample_interval: None,
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
        if let Some(calm) = self.calm_sample_interval
            && calm < self.sample_interval
        {
            p.bad(
                "keying.calm_sample_interval",
                format!(
                    "{} is shorter than keying.sample_interval ({})",
                    humantime::format_duration(calm),
                    humantime::format_duration(self.sample_interval)
                ),
            );
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::Config;
    use crate::config::tests::FRONTEND;

    #[test]
    fn calm_sampling_defaults_to_one_second_with_etcd_and_to_the_sample_interval_without() {
        let embedded = Config::parse(FRONTEND).unwrap();
        assert_eq!(embedded.calm_sample_interval(), Duration::from_millis(250));
        let etcd = Config::parse(&format!("{FRONTEND}[store]\nbackend = \"etcd\"\n")).unwrap();
        // Half of FRONTEND's 1.5 s idle timeout.
        assert_eq!(etcd.calm_sample_interval(), Duration::from_millis(750));
        let long = Config::parse(&format!("{FRONTEND}[store]\nbackend = \"etcd\"\n"))
            .map(|mut c| {
                c.failover.idle_timeout = Duration::from_secs(10);
                c
            })
            .unwrap();
        assert_eq!(long.calm_sample_interval(), Duration::from_secs(1));
        let set = Config::parse(&format!(
            "{FRONTEND}[keying]\ncalm_sample_interval = \"500ms\"\n"
        ))
        .unwrap();
        assert_eq!(set.calm_sample_interval(), Duration::from_millis(500));
    }

    #[test]
    fn a_calm_interval_longer_than_the_idle_timeout_is_refused() {
        let problems = Config::parse(&format!(
            "{FRONTEND}[keying]\ncalm_sample_interval = \"5s\"\n"
        ))
        .unwrap_err();
        assert_eq!(problems[0].key, "keying.calm_sample_interval");
        assert!(
            problems[0].reason.contains("5s") && problems[0].reason.contains("1s 500ms"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_calm_interval_shorter_than_the_sample_interval_is_refused_with_both_values() {
        let problems = Config::parse(&format!(
            "{FRONTEND}[keying]\nsample_interval = \"500ms\"\ncalm_sample_interval = \"100ms\"\n"
        ))
        .unwrap_err();
        assert_eq!(problems[0].key, "keying.calm_sample_interval");
        assert!(
            problems[0].reason.contains("100ms") && problems[0].reason.contains("500ms"),
            "{problems:?}"
        );
    }
}
