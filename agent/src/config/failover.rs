//! `[failover]` and `[failover.reconnect]`: how a dead or moved peer is detected and
//! how the renegotiations that follow are paced.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Problems, default_true};
use crate::model::Mode;

/// How the agent detects a dead or moved peer and renegotiates.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverConfig {
    /// `fast` arms the short idle detector (`failover.idle_timeout`); changeable at run
    /// time with `vipsec mode`.
    #[serde(default)]
    pub mode: Mode,
    /// Idle timeout in fast mode: outbound traffic with nothing back for this long and the
    /// peer is declared dead. Keep it above the slowest answer the protocols expect.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Idle timeout in normal mode (the classic five minutes).
    #[serde(default = "default_normal_idle_timeout", with = "humantime_serde")]
    pub normal_idle_timeout: Duration,
    /// First wait after a failed initiation; doubles up to `retry_max`.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest wait between initiations of one renegotiation; raise it for many
    /// front-ends per back-end, to spread the load after a move.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// A renegotiation cycle gives up after this long ...
    #[serde(default = "default_retry_deadline", with = "humantime_serde")]
    pub retry_deadline: Duration,
    /// ... and a new cycle starts after this pause, so recovery never ends for good.
    #[serde(default = "default_retry_cooldown", with = "humantime_serde")]
    pub retry_cooldown: Duration,
    /// With a cluster store, how long to wait for a new owner record before initiating
    /// anyway: around the cluster manager's takeover time (VRRP: about 3 x advert interval).
    #[serde(default = "default_owner_wait", with = "humantime_serde")]
    pub owner_wait: Duration,
    /// After `vipsec drain`, publish ownership again if the VIP is still here this long after.
    #[serde(default = "default_drain_hold", with = "humantime_serde")]
    pub drain_hold: Duration,
    /// A hosted VIP here while another node holds its record for longer than this is
    /// reported as a split brain (a hand-off passes through that state for a moment):
    /// event `split-brain`, metric `vipsec_split_brain`, `vipsec health` failing.
    #[serde(default = "default_split_brain_grace", with = "humantime_serde")]
    pub split_brain_grace: Duration,
    /// While the store is unreachable, accept SAs for a VIP on this node's interface
    /// without the store's confirmation (availability over strictness; shown as
    /// "unconfirmed" in `vipsec status`).
    #[serde(default = "default_true")]
    pub trust_kernel_when_store_down: bool,
    /// When the cluster manager gives this node a VIP whose owner of record is another
    /// node, ask the link for this long whether that node still holds the address (ARP
    /// probes, IPv6 neighbour solicitations); if nobody answers, take the record over at
    /// once instead of waiting for its lease to run out. "0s" turns it off (wait for the
    /// lease, as with VIPs on a loopback, where the link cannot tell). A live holder must
    /// answer within it (three probes, the last at two thirds of it); its kernel answers
    /// within a millisecond on a healthy LAN, but raise it where a holder may be slow to
    /// (virtual machines with CPU steal, a congested link): a holder that answers too late
    /// loses the record to this node. Events `takeover` and, when a live owner answers,
    /// `takeover-refused`; docs/ownership.md.
    #[serde(default = "default_takeover_probe", with = "humantime_serde")]
    pub takeover_probe: Duration,
    /// While a front-end renegotiates without an owner record to go by (no cluster store,
    /// or the store unreachable), send the peer VIP's IKE port a probe this often (an
    /// IKE_SA_INIT header of major version 3, which a responder answers with
    /// INVALID_MAJOR_VERSION without building an IKE_SA or counting it toward its COOKIE
    /// thresholds) and start the next attempt the moment the port answers after silence, instead of
    /// waiting out an attempt sent while the VIP was in transit. "0s" turns it off. Event
    /// `peer-answers`; docs/embedded-store.md.
    #[serde(default = "default_ike_probe_interval", with = "humantime_serde")]
    pub ike_probe_interval: Duration,
    /// How re-initiations are paced when many start at once (`[failover.reconnect]`).
    #[serde(default)]
    pub reconnect: ReconnectConfig,
}

/// Reconnect storm control: every initiation waits its turn in one queue (higher
/// `peer_vip.priority` first), under a token bucket and a limit of initiations in flight;
/// the first attempt of a renegotiation is delayed by a random jitter so that the
/// front-ends of a cluster do not all send IKE_SA_INIT in the same millisecond.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReconnectConfig {
    /// Initiations started per second, on average, at most: a backstop for starts that
    /// fail at once; while answers come, the limit in flight sets the pace.
    #[serde(default = "default_reconnect_rate")]
    pub rate: f64,
    /// Initiations that may start back to back before `rate` applies.
    #[serde(default = "default_reconnect_burst")]
    pub burst: u32,
    /// Initiations waiting in the keying daemon at once (per node) to begin with. The limit
    /// then follows the answers: one more after each initiation that came back within
    /// `quick`, half as many after one that failed or was slow, up to `max_concurrency`.
    /// One that waited for charon's retransmission of an answer charon itself lost (or
    /// was given up for it) leaves the limit as it was: it says nothing about the responder.
    #[serde(default = "default_reconnect_concurrency")]
    pub concurrency: u32,
    /// The most initiations in flight at once the limit grows to. Keep it at or below the
    /// owners' strongSwan `charon.cookie_threshold_ip` (default 3): from that many
    /// half-open IKE_SAs from one address on, the owner answers with a COOKIE, which costs
    /// a round trip and, with charon 5.9.8 as initiator, can lose the real answer until its
    /// next retransmission (`charon.retransmit_timeout`, 4 s). Above
    /// `charon.block_threshold` (default 5) the owner drops IKE_SA_INITs outright. Raise
    /// these on the back-ends before raising this, and `charon.threads` (default 16) on
    /// this node: each initiation in flight holds worker threads of this node's charon
    /// until its CHILD_SA is up, and with 8 in flight on 16 threads none was left for the
    /// answers (100 VIPs recovered 4.9-11.4 s after the takeover instead of 1.0 s). More in flight did not make
    /// 100 VIPs faster in the lab either: 8 on 32 threads took as long as 3
    /// (docs/bench/ab-2026-12-07-in-flight/).
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// An initiation whose CHILD_SA is up within this counts as quick: the responders keep
    /// up, and one more may start at once.
    #[serde(default = "default_quick", with = "humantime_serde")]
    pub quick: Duration,
    /// Upper bound of the random delay (uniform from zero) before a renegotiation's first
    /// attempt; `"0s"` turns it off. The window actually used follows the crowd: the
    /// initiations that reach the same new owner at once (each back-end says in the store
    /// how many front-ends it serves; each front-end sends at most `max_concurrency` of
    /// its own at a time) divided by `responder_rate`, none at all for a crowd of up to 8,
    /// and all of it while the crowd is unknown (a cluster starting up).
    #[serde(default = "default_reconnect_jitter", with = "humantime_serde")]
    pub jitter: Duration,
    /// IKE_SA_INITs per second one back-end is assumed to take from a crowd of front-ends
    /// without falling behind; sizes the jitter window (crowd / rate, at most `jitter`).
    #[serde(default = "default_responder_rate")]
    pub responder_rate: f64,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            rate: default_reconnect_rate(),
            burst: default_reconnect_burst(),
            concurrency: default_reconnect_concurrency(),
            max_concurrency: default_max_concurrency(),
            quick: default_quick(),
            jitter: default_reconnect_jitter(),
            responder_rate: default_responder_rate(),
        }
    }
}

fn default_max_concurrency() -> u32 {
    // strongSwan's responder asks an address for a COOKIE once it has
    // `charon.cookie_threshold_ip` (default 3) half-open IKE_SAs from it, and drops its
    // IKE_SA_INITs at `charon.block_threshold` (5). All of a node's initiations toward one
    // owner come from one address. With 4 in flight, cookies came, and charon 5.9.8 as
    // initiator sometimes took the answer to its retried IKE_SA_INIT for a duplicate
    // ("ignoring request with ID 0, already processing") and waited 4 s to retransmit:
    // the 1x100 bench's 4-5 s outliers. With 8, block_threshold dropped three outright.
    3
}
fn default_quick() -> Duration {
    // An unloaded IKE exchange with kernel-libipsec takes 13-40 ms in the lab.
    Duration::from_millis(150)
}
fn default_responder_rate() -> f64 {
    // The storm lab's 60 initiations (20 front-ends x 3 VIPs) spread over the 200 ms the
    // fixed jitter used to take, where every front-end recovered in every run.
    300.0
}

fn default_reconnect_rate() -> f64 {
    // A backstop, not the pace: the limit in flight (at most `max_concurrency`, 3, over an
    // IKE exchange of 13 ms or more) already holds a node below about 230 starts a second
    // while answers come, and failures halve it and then pause. At 50 a second the bucket
    // was the pace itself: a front-end whose 100 VIPs moved at once started its 90 after
    // the burst 20 ms apart, 1.8 s for the last, while each exchange took 15-20 ms.
    200.0
}
fn default_reconnect_burst() -> u32 {
    10
}
fn default_reconnect_concurrency() -> u32 {
    // Each initiation holds one of charon's worker threads until its CHILD_SA is up, here
    // and on the new owner, which every front-end hits at once. Measured in the chaos lab
    // (docs/bench/storm.md), 20 front-ends x 3 VIPs on one back-end after an owner crash:
    // with 2 or 3 in flight per node the new owner fell behind, attempts timed out, were
    // retried while the abandoned ones still completed there, and recovery collapsed (the
    // lab never settled, or cycles gave up); with 1 every front-end recovered in 4-5 s in
    // every run. The cost is that a node's own VIPs go one after another (about 25 ms each
    // between cluster nodes), and an attempt toward a silent VIP holds the slot for up to
    // `keying.initiate_timeout`: raise this on a node with many VIPs and few peers.
    1
}
fn default_reconnect_jitter() -> Duration {
    Duration::from_millis(200)
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            mode: Mode::default(),
            idle_timeout: default_idle_timeout(),
            normal_idle_timeout: default_normal_idle_timeout(),
            retry_initial: default_retry_initial(),
            retry_max: default_retry_max(),
            retry_deadline: default_retry_deadline(),
            retry_cooldown: default_retry_cooldown(),
            owner_wait: default_owner_wait(),
            drain_hold: default_drain_hold(),
            split_brain_grace: default_split_brain_grace(),
            trust_kernel_when_store_down: true,
            takeover_probe: default_takeover_probe(),
            ike_probe_interval: default_ike_probe_interval(),
            reconnect: ReconnectConfig::default(),
        }
    }
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_normal_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_retry_initial() -> Duration {
    Duration::from_millis(50)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_deadline() -> Duration {
    Duration::from_secs(30)
}
fn default_retry_cooldown() -> Duration {
    Duration::from_secs(5)
}
fn default_takeover_probe() -> Duration {
    // What answers is the holder's kernel (ARP and neighbour discovery are handled in its
    // receive path, not by a process): 0.3 ms on a bare veth pair, 1.1 ms in the chaos lab
    // including opening the socket. Three probes at 0, 7 and 13 ms leave a live holder
    // twenty times that, and the window is the largest part of a crash's recovery after
    // the takeover with 100 ms VRRP adverts: +0.057 s with 30 ms, +0.051 s with 20 ms
    // (docs/bench/grid-2026-12-07f).
    Duration::from_millis(20)
}
/// Below this a silent VIP is asked more often than an answer could come back across a
/// loaded network.
const MIN_IKE_PROBE_INTERVAL: Duration = Duration::from_millis(20);

fn default_ike_probe_interval() -> Duration {
    Duration::from_millis(50)
}
fn default_split_brain_grace() -> Duration {
    Duration::from_secs(1)
}
fn default_owner_wait() -> Duration {
    Duration::from_secs(3)
}
fn default_drain_hold() -> Duration {
    Duration::from_secs(10)
}

impl FailoverConfig {
    /// `sample_interval` is `keying.sample_interval`: the idle detector compares samples.
    pub(super) fn validate(&self, sample_interval: Duration, p: &mut Problems) {
        p.positive("failover.idle_timeout", self.idle_timeout);
        p.positive("failover.normal_idle_timeout", self.normal_idle_timeout);
        p.positive("failover.retry_initial", self.retry_initial);
        p.positive("failover.retry_deadline", self.retry_deadline);
        if self.retry_max < self.retry_initial {
            p.bad(
                "failover.retry_max",
                "must not be shorter than failover.retry_initial",
            );
        }
        if !self.ike_probe_interval.is_zero() && self.ike_probe_interval < MIN_IKE_PROBE_INTERVAL {
            p.bad(
                "failover.ike_probe_interval",
                format!(
                    "{} is below {}: every front-end would ask each silent VIP that often; \
                     \"0s\" turns the probe off",
                    humantime::format_duration(self.ike_probe_interval),
                    humantime::format_duration(MIN_IKE_PROBE_INTERVAL)
                ),
            );
        }
        if self.idle_timeout < sample_interval.saturating_mul(2) {
            p.bad(
                "failover.idle_timeout",
                format!(
                    "{} is shorter than two counter samples ({} each); the idle detector needs at least two",
                    humantime::format_duration(self.idle_timeout),
                    humantime::format_duration(sample_interval)
                ),
            );
        }
    }
}

impl ReconnectConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            p.bad(
                "failover.reconnect.rate",
                format!(
                    "{} must be a number of initiations per second above zero",
                    self.rate
                ),
            );
        }
        if !(self.responder_rate.is_finite() && self.responder_rate > 0.0) {
            p.bad(
                "failover.reconnect.responder_rate",
                format!(
                    "{} must be a number of IKE_SA_INITs per second above zero",
                    self.responder_rate
                ),
            );
        }
        if self.burst == 0 {
            p.bad(
                "failover.reconnect.burst",
                "must be at least 1 (one initiation can always start)",
            );
        }
        if self.concurrency == 0 {
            p.bad(
                "failover.reconnect.concurrency",
                "must be at least 1 initiation in flight",
            );
        }
        if self.max_concurrency < self.concurrency {
            p.bad(
                "failover.reconnect.max_concurrency",
                format!(
                    "{} is below failover.reconnect.concurrency ({}), where the limit starts",
                    self.max_concurrency, self.concurrency
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::FRONTEND;
    use crate::config::{Config, DEFAULT_PEER_PRIORITY};

    #[test]
    fn reconnect_defaults_and_priority() {
        let c = Config::parse(FRONTEND).unwrap();
        assert_eq!(c.failover.reconnect, ReconnectConfig::default());
        assert_eq!(c.failover.reconnect.jitter, Duration::from_millis(200));
        assert_eq!(c.peer_vips[0].priority, DEFAULT_PEER_PRIORITY);
        let text = format!(
            "{FRONTEND}priority = 90\n[failover.reconnect]\nrate = 5.5\nburst = 2\nconcurrency = 8\nmax_concurrency = 8\njitter = \"1s\"\n"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.peer_vips[0].priority, 90);
        let r = &c.failover.reconnect;
        assert_eq!((r.rate, r.burst, r.concurrency), (5.5, 2, 8));
        assert_eq!(r.jitter, Duration::from_secs(1));
    }

    #[test]
    fn bad_reconnect_settings_name_their_keys() {
        let text = format!(
            "{FRONTEND}priority = 101\n[failover.reconnect]\nrate = 0\nburst = 0\nconcurrency = 0\n"
        );
        let problems = Config::parse(&text).unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "failover.reconnect.rate",
                "failover.reconnect.burst",
                "failover.reconnect.concurrency",
                "peer_vip[0].priority"
            ]
        );
        let typo = format!("{FRONTEND}[failover.reconnect]\njiter = \"1s\"\n");
        assert_eq!(
            Config::parse(&typo).unwrap_err()[0].key,
            "failover.reconnect.jiter"
        );
        let bad_jitter = format!("{FRONTEND}[failover.reconnect]\njitter = \"soon\"\n");
        assert_eq!(
            Config::parse(&bad_jitter).unwrap_err()[0].key,
            "failover.reconnect.jitter"
        );
    }

    #[test]
    fn bad_duration_names_the_key() {
        let text = FRONTEND.replace("1500ms", "soon");
        let problems = Config::parse(&text).unwrap_err();
        assert_eq!(problems[0].key, "failover.idle_timeout");
    }
}
