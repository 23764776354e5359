//! The agent's TOML configuration: parsing with unknown keys rejected, then validation that
//! reports every problem with the key it concerns and the reason.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{FlowDirection, Mode, PeerConnection, ProtectedFlow, Vip, parse_flow};

pub const DEFAULT_API_ENDPOINT: &str = "unix:///run/vipsec/agent.sock";

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

/// The agent's API, which the `vipsec` client commands use.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The Unix socket the CLI, the cluster manager's scripts and the probes reach the
    /// agent on: `unix:///path` (created 0600, root only, in a directory of the agent's
    /// user that nobody else can write; created 0700 when missing, a link or a shared
    /// sticky directory such as /tmp refused). Always served.
    #[serde(default = "default_api_endpoint")]
    pub endpoint: String,
    /// A TCP listener in addition to the socket, for remote management: `tcp://host:port`,
    /// TLS required (`api.tls_cert`, `api.tls_key`). Changes (drain, mode, drills,
    /// policies, log level) over TCP need client certificates (`api.tls_client_ca`);
    /// without it TCP serves reads only.
    pub tcp: Option<String>,
    /// Server certificate (PEM) of the TCP listener; set together with `api.tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA.
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            endpoint: default_api_endpoint(),
            tcp: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

fn default_api_endpoint() -> String {
    DEFAULT_API_ENDPOINT.to_string()
}

/// Prometheus metrics (deploy/README.md, "Metrics", lists them).
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address for the Prometheus `/metrics` endpoint, e.g. `127.0.0.1:9641`; bind to
    /// loopback or a management network. Disabled when absent.
    pub listen: Option<SocketAddr>,
}

/// Logging to standard error (the journal under systemd).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// tracing EnvFilter syntax, e.g. `info,vipsec::keying=debug`; changeable at run time
    /// with `vipsec log-level`.
    #[serde(default = "default_log_filter")]
    pub filter: String,
    /// `json` for log shippers.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: default_log_filter(),
            format: LogFormat::default(),
        }
    }
}

fn default_log_filter() -> String {
    "info".to_string()
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// In-process store for a single machine; no server needed.
    #[default]
    Embedded,
    Etcd,
}

/// The cluster store that records who owns each VIP (etcd in a cluster).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `etcd` in any cluster; `embedded` only for a single machine (ownership then stays
    /// local).
    #[serde(default)]
    pub backend: StoreBackend,
    /// etcd client URLs (`http://` or `https://`); list every member: a request that fails
    /// or waits out `store.request_timeout` moves the agent to the next one.
    #[serde(default = "default_etcd_endpoints")]
    pub endpoints: Vec<String>,
    /// Key prefix of everything the agent stores (ownership, holders, move timelines,
    /// policies); change it to run several independent vipsec clusters on one etcd.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How long a record survives its node: each hosted VIP has a lease of its own, renewed
    /// every third of this while the VIP is here and never after it leaves. Shorter:
    /// front-ends learn of a crash sooner; too short for the etcd round trip and a busy
    /// node loses ownership spuriously. Minimum 1s.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// One etcd request; a request that fails or waits this long moves the agent to the
    /// next member. At most half of `store.lease_ttl` (two renewals must fit in a lease).
    #[serde(default = "default_store_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// etcd user (etcd authentication with a password); with client certificates the
    /// certificate's common name is the user instead.
    pub username: Option<String>,
    /// File holding the etcd password (mode 0600), so the secret never sits in this config.
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) that etcd's server certificates must be signed by.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`; with `store.tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Accept plain `http://` endpoints off this machine (a lab): ownership records and
    /// the cluster-wide policy then travel unauthenticated and in clear text.
    #[serde(default)]
    pub allow_insecure: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::default(),
            endpoints: default_etcd_endpoints(),
            prefix: default_prefix(),
            lease_ttl: default_lease_ttl(),
            request_timeout: default_store_timeout(),
            username: None,
            password_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            allow_insecure: false,
        }
    }
}

/// Whether an endpoint URL's host is this machine (loopback).
fn loopback_endpoint(ep: &str) -> bool {
    let rest = ep.split_once("://").map_or(ep, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(h) = host_port.strip_prefix('[') {
        h.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn default_etcd_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".to_string()]
}
fn default_prefix() -> String {
    "/vipsec/".to_string()
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(2)
}
fn default_store_timeout() -> Duration {
    Duration::from_secs(1)
}

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

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KernelBackend {
    #[default]
    None,
    /// Linux XFRM over netlink.
    Xfrm,
}

/// The kernel backend: the standing clear-text guard (XFRM block policies, routing rules).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// `xfrm` keeps the standing guard in the kernel (needs CAP_NET_ADMIN). A config with
    /// protected flows (`protect`, or `policy.managed`) and `none` is refused, naming the
    /// VIPs, unless `kernel.fail_secure = false` says so on purpose.
    #[serde(default)]
    pub backend: KernelBackend,
    /// The standing guard: every protected flow is refused by the kernel outside IPsec,
    /// from the agent's start (or `vipsec guard install` at boot) on, whatever the keying
    /// daemon's connections say, and left in place when the agent stops. Turn it off only
    /// where availability beats confidentiality; a guard already in the kernel then stays
    /// until `vipsec guard remove`.
    #[serde(default = "default_true")]
    pub fail_secure: bool,
    /// Bind block policies to this interface. With charon's kernel-libipsec the tunnel's
    /// own packets pass the kernel's policy lookup too; binding the block to the physical
    /// interface lets them through while clear text on that interface is refused.
    /// IPv6 cannot bind a policy that way (its flows carry no output interface at policy
    /// lookup): under kernel-libipsec an IPv6 VIP's guard is a policy routing rule after
    /// charon's table 220 (`kernel::xfrm::route_guard`); with kernel ESP an unbound block
    /// below charon's policies.
    pub interface: Option<String>,
    /// XFRM priority of block policies; larger numbers lose to the keying daemon's own.
    #[serde(default = "default_block_priority")]
    pub block_priority: u32,
    /// charon does ESP itself (kernel-libipsec) rather than the kernel. Unset: yes when
    /// the kernel has no ESP. Set it on production nodes: the units'
    /// `ProtectKernelModules=yes` hides /lib/modules, so an esp4 module that is installed
    /// but not loaded yet is not seen.
    pub libipsec: Option<bool>,
    /// How often the guard is compared with the kernel and repaired (a flushed policy or
    /// a deleted rule is back within this long).
    #[serde(default = "default_guard_check", with = "humantime_serde")]
    pub guard_check: Duration,
}

impl KernelConfig {
    /// Whether charon uses kernel-libipsec (configured, or detected from the kernel).
    pub fn libipsec(&self) -> bool {
        self.libipsec
            .unwrap_or_else(|| !crate::doctor::kernel::probe().has_esp())
    }
}

fn default_guard_check() -> Duration {
    Duration::from_millis(250)
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            backend: KernelBackend::default(),
            fail_secure: true,
            interface: None,
            block_priority: default_block_priority(),
            libipsec: None,
            guard_check: default_guard_check(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_block_priority() -> u32 {
    // charon uses priorities around 200000-400000 for its own policies; stay below them.
    1_000_000
}

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
    /// lease, as with VIPs on a loopback, where the link cannot tell). Events `takeover` and, when a live owner
    /// answers, `takeover-refused`; docs/ownership.md.
    #[serde(default = "default_takeover_probe", with = "humantime_serde")]
    pub takeover_probe: Duration,
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
    /// Initiations started per second, on average.
    #[serde(default = "default_reconnect_rate")]
    pub rate: f64,
    /// Initiations that may start back to back before `rate` applies.
    #[serde(default = "default_reconnect_burst")]
    pub burst: u32,
    /// Initiations waiting in the keying daemon at once (per node) to begin with. The limit
    /// then follows the answers: one more after each initiation that came back within
    /// `quick`, half as many after one that failed or was slow, up to `max_concurrency`.
    #[serde(default = "default_reconnect_concurrency")]
    pub concurrency: u32,
    /// The most initiations in flight at once the limit grows to.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// An initiation whose CHILD_SA is up within this counts as quick: the responders keep
    /// up, and one more may start at once.
    #[serde(default = "default_quick", with = "humantime_serde")]
    pub quick: Duration,
    /// Upper bound of the random delay (uniform from zero) before a renegotiation's first
    /// attempt; `"0s"` turns it off. The window actually used follows the crowd: the
    /// front-ends that renegotiate with the same new owner at once (each back-end says in
    /// the store how many it serves) divided by `responder_rate`, none at all for a crowd
    /// of up to 8, and all of it while the crowd is unknown (a cluster starting up).
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
    8
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
    50.0
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
    Duration::from_millis(30)
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

/// One VIP this node may host (back-end side); one `[[hosted_vip]]` table each.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostedVipConfig {
    /// A VIP this node may hold (back-end).
    pub address: IpAddr,
    /// Only count the address as present on this interface.
    pub interface: Option<String>,
    /// The server's answers that must never leave in clear text, by source port, e.g.
    /// `["tcp/143", "tcp/110", "tcp/80"]`. With a kernel backend they are blocked outside
    /// IPsec for as long as the agent runs: between an SA's deletion and the next one (a
    /// drain, a move), a server socket still open would otherwise answer in the clear.
    #[serde(default)]
    pub protect: Vec<String>,
}

impl HostedVipConfig {
    pub fn flows(&self) -> Result<Vec<ProtectedFlow>, String> {
        self.protect
            .iter()
            .map(|s| parse_flow(self.address, s, FlowDirection::FromVip))
            .collect()
    }
}

/// One VIP this node talks to over IPsec (front-end side); one `[[peer_vip]]` table each.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerVipConfig {
    /// A VIP this node talks to (front-end); not also a hosted VIP.
    pub address: IpAddr,
    /// The IKE connection (swanctl `connections.<name>`) toward the VIP; leave it out
    /// when `policy.managed` lets the agent load the connection from the VIP's policy.
    #[serde(default)]
    pub connection: Option<String>,
    /// The CHILD_SA to initiate; defaults to the connection's name.
    pub child: Option<String>,
    /// Flows that must never leave in clear text, e.g. `["tcp/143", "tcp/110", "tcp/80"]`;
    /// `"any"` protects all traffic to the VIP.
    #[serde(default)]
    pub protect: Vec<String>,
    /// Order of re-initiation when many wait at once: 0 to 100, higher first.
    #[serde(default = "default_peer_priority")]
    pub priority: u8,
}

/// Where a peer VIP without a `priority` sits: in the middle, so an operator can put VIPs
/// both ahead of and behind it.
pub const DEFAULT_PEER_PRIORITY: u8 = 50;
pub const MAX_PEER_PRIORITY: u8 = 100;

fn default_peer_priority() -> u8 {
    DEFAULT_PEER_PRIORITY
}

impl PeerVipConfig {
    /// The hand-written connection toward the VIP; `None` when its policy provides one.
    pub fn peer_connection(&self) -> Option<PeerConnection> {
        let connection = self.connection.clone()?;
        Some(PeerConnection {
            child: self.child.clone().unwrap_or_else(|| connection.clone()),
            connection,
        })
    }

    pub fn flows(&self) -> Result<Vec<ProtectedFlow>, String> {
        self.protect
            .iter()
            .map(|s| parse_flow(self.address, s, FlowDirection::ToVip))
            .collect()
    }
}

/// How `vipsec drill` asks the cluster manager to move a VIP.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DrillIntegration {
    /// The current owner steps down through the handover command (`drill.handover`).
    Keepalived,
    /// `crm_resource --move --resource R --node NODE`, then `--clear`.
    Pacemaker,
    /// `drill.command`, with `{vip}` and `{to}` replaced.
    Command,
}

/// `vipsec drill`: how a planned move is asked of the cluster manager, and its target.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// Drills are refused when absent.
    pub integration: Option<DrillIntegration>,
    /// For `command`: the program and its arguments; `{vip}` and `{to}` are replaced.
    #[serde(default)]
    pub command: Vec<String>,
    /// For `keepalived`: the handover command run on the owner (`{vip}`, `{to}` replaced).
    #[serde(default = "default_drill_handover")]
    pub handover: Vec<String>,
    /// The recovery target: from the VIP's release (or the first mark) to first traffic.
    #[serde(default = "default_drill_target", with = "humantime_serde")]
    pub target: Duration,
    /// For `pacemaker`: the resource that holds the VIP.
    pub resource: Option<String>,
}

impl Default for DrillConfig {
    fn default() -> Self {
        DrillConfig {
            integration: None,
            command: Vec::new(),
            handover: default_drill_handover(),
            target: default_drill_target(),
            resource: None,
        }
    }
}

fn default_drill_handover() -> Vec<String> {
    vec!["vipsec-handover".into(), "{vip}".into()]
}

fn default_drill_target() -> Duration {
    Duration::from_secs(1)
}

/// Why an address cannot be a VIP, if it cannot. IPv6 needs its own checks: the kernel
/// reports an IPv4-mapped address (`::ffff:192.0.2.100`) as the IPv4 one, so the agent
/// would never see it arrive, and a link-local address (`fe80::/10`) means nothing
/// without an interface (charon and the kernel report it with a zone).
pub fn vip_address_problem(vip: IpAddr) -> Option<String> {
    if vip.is_unspecified() || vip.is_multicast() {
        return Some(format!("{vip} is not a unicast host address"));
    }
    match vip {
        IpAddr::V4(a) if a.is_broadcast() => Some(format!("{vip} is the broadcast address")),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Some(format!(
            "{vip} is an IPv4-mapped IPv6 address; write the IPv4 address {}",
            vip.to_canonical()
        )),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some(format!(
            "{vip} is link-local (fe80::/10): it only exists with an interface; use a global or unique-local address"
        )),
        _ => None,
    }
}

/// An IPv6 host in a URL without brackets (`http://2001:db8::1:2379`): the URL parser of
/// the etcd client refuses it only at connect time, with an obscure message.
fn unbracketed_ipv6_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host_port.starts_with('[') && host_port.matches(':').count() > 1)
        .then(|| format!("{url:?}: an IPv6 address needs brackets (http://[2001:db8::1]:2379)"))
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
        let mut p = Vec::new();
        let mut bad = |key: &str, reason: String| {
            p.push(ConfigProblem {
                key: key.into(),
                reason,
            })
        };

        if self.node.trim().is_empty() {
            bad("node", "must not be empty".into());
        } else if !crate::model::valid_node_name(&self.node) {
            bad(
                "node",
                format!(
                    "{:?} may only hold letters, digits, '-', '_' and '.' (at most 253)",
                    self.node
                ),
            );
        }

        match ApiEndpoint::parse(&self.api.endpoint) {
            Err(e) => bad("api.endpoint", e),
            Ok(ApiEndpoint::Tcp(_)) => bad(
                "api.endpoint",
                format!(
                    "{:?} is TCP; api.endpoint is the Unix socket that vipsec health, the cluster manager's scripts and the probes use, and it is always served: keep it unix:// and put the TCP listener in api.tcp",
                    self.api.endpoint
                ),
            ),
            Ok(ApiEndpoint::Unix(_)) => {}
        }
        if let Some(tcp) = &self.api.tcp {
            match ApiEndpoint::parse(tcp) {
                Err(e) => bad("api.tcp", e),
                Ok(ApiEndpoint::Unix(_)) => bad(
                    "api.tcp",
                    format!("{tcp:?} is a Unix socket; api.tcp is a tcp://host:port listener"),
                ),
                Ok(ApiEndpoint::Tcp(_)) => {
                    if self.api.tls_cert.is_none() || self.api.tls_key.is_none() {
                        bad(
                            "api.tcp",
                            format!("{tcp:?} needs TLS: set api.tls_cert and api.tls_key"),
                        );
                    }
                }
            }
        }
        if self.api.tls_cert.is_some() != self.api.tls_key.is_some() {
            bad(
                "api.tls_key",
                "api.tls_cert and api.tls_key must be set together".into(),
            );
        }

        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            bad("log.filter", format!("{:?}: {e}", self.log.filter));
        }

        if self.store.backend == StoreBackend::Etcd {
            if self.store.endpoints.is_empty() {
                bad("store.endpoints", "etcd needs at least one endpoint".into());
            }
            for (i, ep) in self.store.endpoints.iter().enumerate() {
                if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                    bad(
                        &format!("store.endpoints[{i}]"),
                        format!("{ep:?} must start with http:// or https://"),
                    );
                } else if let Some(e) = unbracketed_ipv6_host(ep) {
                    bad(&format!("store.endpoints[{i}]"), e);
                } else if ep.starts_with("http://")
                    && !loopback_endpoint(ep)
                    && !self.store.allow_insecure
                {
                    bad(
                        &format!("store.endpoints[{i}]"),
                        format!(
                            "{ep:?} is plain HTTP to another machine: who owns each VIP, and \
                             the stored policy that decides what is encrypted cluster-wide, \
                             would travel unauthenticated and in clear text. Use https:// \
                             with store.tls_ca (and store.tls_cert/tls_key), or set \
                             store.allow_insecure = true for a lab"
                        ),
                    );
                }
            }
            if self.store.password_file.is_some() && self.store.username.is_none() {
                bad("store.password_file", "set store.username too".into());
            }
            if self.store.tls_cert.is_some() != self.store.tls_key.is_some() {
                bad(
                    "store.tls_key",
                    "store.tls_cert and store.tls_key must be set together".into(),
                );
            }
        }
        if !self.store.prefix.starts_with('/') || !self.store.prefix.ends_with('/') {
            bad(
                "store.prefix",
                format!("{:?} must start and end with '/'", self.store.prefix),
            );
        }
        if self.store.lease_ttl < Duration::from_secs(1) {
            bad(
                "store.lease_ttl",
                format!("{:?} is below etcd's minimum of 1s", self.store.lease_ttl),
            );
        }
        if self.store.request_timeout.is_zero() {
            bad("store.request_timeout", "must be greater than zero".into());
        } else if self.store.request_timeout.saturating_mul(2) > self.store.lease_ttl {
            // A renewal that waits out its timeout is retried at once; two must fit in a
            // lease, or one slow answer during an election lets the record lapse.
            bad(
                "store.request_timeout",
                format!(
                    "{} is more than half of store.lease_ttl ({}): a lease must outlast two \
                     renewals that each wait out the timeout",
                    humantime::format_duration(self.store.request_timeout),
                    humantime::format_duration(self.store.lease_ttl)
                ),
            );
        }

        let positive = |key: &str, d: Duration, p: &mut Vec<ConfigProblem>| {
            if d.is_zero() {
                p.push(ConfigProblem {
                    key: key.into(),
                    reason: "must be greater than zero".into(),
                });
            }
        };
        positive(
            "keying.sample_interval",
            self.keying.sample_interval,
            &mut p,
        );
        positive("kernel.guard_check", self.kernel.guard_check, &mut p);
        positive(
            "keying.initiate_timeout",
            self.keying.initiate_timeout,
            &mut p,
        );
        positive("keying.reconnect_min", self.keying.reconnect_min, &mut p);
        positive("failover.idle_timeout", self.failover.idle_timeout, &mut p);
        positive(
            "failover.normal_idle_timeout",
            self.failover.normal_idle_timeout,
            &mut p,
        );
        positive(
            "failover.retry_initial",
            self.failover.retry_initial,
            &mut p,
        );
        positive(
            "failover.retry_deadline",
            self.failover.retry_deadline,
            &mut p,
        );
        let mut bad = |key: &str, reason: String| {
            p.push(ConfigProblem {
                key: key.into(),
                reason,
            })
        };
        if self.keying.reconnect_max < self.keying.reconnect_min {
            bad(
                "keying.reconnect_max",
                "must not be shorter than keying.reconnect_min".into(),
            );
        }
        if self.failover.retry_max < self.failover.retry_initial {
            bad(
                "failover.retry_max",
                "must not be shorter than failover.retry_initial".into(),
            );
        }
        if self.failover.idle_timeout < self.keying.sample_interval.saturating_mul(2) {
            bad(
                "failover.idle_timeout",
                format!(
                    "{} is shorter than two counter samples ({} each); the idle detector needs at least two",
                    humantime::format_duration(self.failover.idle_timeout),
                    humantime::format_duration(self.keying.sample_interval)
                ),
            );
        }

        if self.kernel.backend == KernelBackend::None && self.kernel.fail_secure {
            // The promise is that protected traffic never leaves in clear text; without a
            // kernel backend nothing refuses it while no SA is up. Saying so in the config
            // (`fail_secure = false`) is the only way to run that way.
            let unguarded: Vec<String> = self
                .hosted_vips
                .iter()
                .map(|h| (h.address, &h.protect))
                .chain(self.peer_vips.iter().map(|p| (p.address, &p.protect)))
                .filter(|(vip, flows)| !flows.is_empty() || self.policy_managed(*vip))
                .map(|(vip, flows)| {
                    if flows.is_empty() {
                        format!("{vip} (its policy's flows)")
                    } else {
                        format!("{vip} ({})", flows.join(", "))
                    }
                })
                .collect();
            if !unguarded.is_empty() {
                bad(
                    "kernel.backend",
                    format!(
                        "\"none\" cannot keep the protected flows of {} from leaving in clear text: set kernel.backend = \"xfrm\" (with kernel.interface), or kernel.fail_secure = false to run without the guard",
                        unguarded.join(", ")
                    ),
                );
            }
        }

        if self.policy.managed {
            if self.keying.backend != KeyingBackend::Strongswan {
                bad(
                    "policy.managed",
                    "needs keying.backend = \"strongswan\": the connections are loaded into charon"
                        .into(),
                );
            }
            if self.policy.psk_file.is_none() {
                bad(
                    "policy.psk_file",
                    "missing: policy-managed connections authenticate with the pre-shared key in this file".into(),
                );
            }
        }
        if !self.policy.documents.is_empty() && self.store.backend != StoreBackend::Embedded {
            bad(
                "policy.document",
                "only for the embedded store; with etcd, policies live in the store (vipsec policy apply)".into(),
            );
        }
        if let Some(id) = &self.policy.identity {
            if id.trim().is_empty() {
                bad("policy.identity", "must not be empty".into());
            } else if *id != self.node && !self.hosted_vips.is_empty() {
                // Front-ends require the owner of record's identity, and the record names
                // the node: a back-end answers IKE as its node name.
                bad(
                    "policy.identity",
                    format!(
                        "{id:?} differs from node {:?}: a node hosting VIPs answers IKE as its node name (front-ends require the owner of record's name)",
                        self.node
                    ),
                );
            }
        }
        if self.drill.target.is_zero() {
            bad("drill.target", "must be greater than zero".into());
        }
        match self.drill.integration {
            Some(DrillIntegration::Command) if self.drill.command.is_empty() => bad(
                "drill.command",
                "integration \"command\" needs the command to run, e.g. [\"/usr/local/bin/move-vip\", \"{vip}\", \"{to}\"]".into(),
            ),
            Some(DrillIntegration::Keepalived) if self.drill.handover.is_empty() => bad(
                "drill.handover",
                "integration \"keepalived\" needs the handover command".into(),
            ),
            Some(DrillIntegration::Pacemaker)
                if self.drill.resource.as_deref().is_none_or(|r| r.trim().is_empty()) =>
            {
                bad(
                    "drill.resource",
                    "integration \"pacemaker\" needs the resource that holds the VIP".into(),
                )
            }
            _ => {}
        }
        let r = &self.failover.reconnect;
        if !(r.rate.is_finite() && r.rate > 0.0) {
            bad(
                "failover.reconnect.rate",
                format!(
                    "{} must be a number of initiations per second above zero",
                    r.rate
                ),
            );
        }
        if !(r.responder_rate.is_finite() && r.responder_rate > 0.0) {
            bad(
                "failover.reconnect.responder_rate",
                format!(
                    "{} must be a number of IKE_SA_INITs per second above zero",
                    r.responder_rate
                ),
            );
        }
        if r.burst == 0 {
            bad(
                "failover.reconnect.burst",
                "must be at least 1 (one initiation can always start)".into(),
            );
        }
        if r.concurrency == 0 {
            bad(
                "failover.reconnect.concurrency",
                "must be at least 1 initiation in flight".into(),
            );
        }
        if r.max_concurrency < r.concurrency {
            bad(
                "failover.reconnect.max_concurrency",
                format!(
                    "{} is below failover.reconnect.concurrency ({}), where the limit starts",
                    r.max_concurrency, r.concurrency
                ),
            );
        }

        let mut seen = BTreeSet::new();
        for (i, v) in self.hosted_vips.iter().enumerate() {
            for (j, f) in v.protect.iter().enumerate() {
                if let Err(e) = parse_flow(v.address, f, FlowDirection::FromVip) {
                    bad(&format!("hosted_vip[{i}].protect[{j}]"), e);
                }
            }
            if !v.protect.is_empty()
                && self.kernel.backend == KernelBackend::Xfrm
                && self.kernel.fail_secure
                && self.kernel.interface.is_none()
            {
                // The guard stays for as long as the agent runs. Unbound, it would also
                // catch the tunnel's own packets under charon's kernel-libipsec.
                bad(
                    &format!("hosted_vip[{i}].protect"),
                    "needs kernel.interface (the physical interface the answers leave by): the guard is bound to it so IPsec traffic always passes".into(),
                );
            }
            if let Some(e) = vip_address_problem(v.address) {
                bad(&format!("hosted_vip[{i}].address"), e);
            }
            if !seen.insert(v.address) {
                bad(
                    &format!("hosted_vip[{i}].address"),
                    format!("{} is listed twice", v.address),
                );
            }
        }
        let mut seen_peer = BTreeSet::new();
        for (i, v) in self.peer_vips.iter().enumerate() {
            if !v.protect.is_empty()
                && v.address.is_ipv4()
                && self.kernel.backend == KernelBackend::Xfrm
                && self.kernel.fail_secure
                && self.kernel.interface.is_none()
                && self.kernel.libipsec != Some(false)
            {
                // The guard stands while the tunnel is up: unbound, it would also catch
                // the tunnel's own packets under charon's kernel-libipsec.
                bad(
                    &format!("peer_vip[{i}].protect"),
                    "needs kernel.interface (the physical interface traffic to the VIP leaves by): the guard is bound to it so IPsec traffic always passes (with kernel ESP, set kernel.libipsec = false instead)".into(),
                );
            }
            if let Some(e) = vip_address_problem(v.address) {
                bad(&format!("peer_vip[{i}].address"), e);
            }
            if !seen_peer.insert(v.address) {
                bad(
                    &format!("peer_vip[{i}].address"),
                    format!("{} is listed twice", v.address),
                );
            }
            if seen.contains(&v.address) {
                bad(
                    &format!("peer_vip[{i}].address"),
                    format!(
                        "{} is also a hosted_vip; a node either hosts a VIP or talks to it",
                        v.address
                    ),
                );
            }
            match &v.connection {
                Some(c) if c.trim().is_empty() => bad(
                    &format!("peer_vip[{i}].connection"),
                    "must name the IKE connection".into(),
                ),
                None if !self.policy.managed => bad(
                    &format!("peer_vip[{i}].connection"),
                    "missing: name the IKE connection toward the VIP, or set policy.managed = true so the agent loads it from the VIP's policy".into(),
                ),
                _ => {}
            }
            for (j, f) in v.protect.iter().enumerate() {
                if let Err(e) = parse_flow(v.address, f, FlowDirection::ToVip) {
                    bad(&format!("peer_vip[{i}].protect[{j}]"), e);
                }
            }
            if v.priority > MAX_PEER_PRIORITY {
                bad(
                    &format!("peer_vip[{i}].priority"),
                    format!("{} is above {MAX_PEER_PRIORITY}", v.priority),
                );
            }
        }
        p
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

/// Cluster-wide IPsec policies: the agent turns the policy of each VIP into strongSwan
/// connections, so every node agrees on ports, proposals and NAT handling.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Load the IKE connections of this node's VIPs from their policies (stored in the
    /// cluster store; with the embedded store, the `document`s below).
    #[serde(default)]
    pub managed: bool,
    /// This node's IKE identity; defaults to the node name. Front-ends require the owner
    /// of record's identity, so a node that is not the owner can never complete IKE.
    pub identity: Option<String>,
    /// File holding the pre-shared key (read at start-up; keep it root-only). Never
    /// logged, never shown by the API.
    pub psk_file: Option<PathBuf>,
    /// Install the routing rules a partial policy needs under charon's kernel-libipsec
    /// (docs/policy.md): unset, they are installed when the kernel has no ESP (so charon
    /// must be using kernel-libipsec).
    pub route_rules: Option<bool>,
    /// Policy documents for a single machine (embedded store); with etcd, policies live
    /// in the store (`vipsec policy apply`).
    #[serde(default, rename = "document")]
    pub documents: Vec<toml::Table>,
}

/// Where the API listens (daemon) or connects (CLI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiEndpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl ApiEndpoint {
    pub fn parse(s: &str) -> Result<ApiEndpoint, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: the socket path must be absolute (unix:///run/...)"
                ));
            }
            Ok(ApiEndpoint::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s
            .strip_prefix("tcp://")
            .or_else(|| s.strip_prefix("https://"))
        {
            let Some((host, port)) = addr.rsplit_once(':') else {
                return Err(format!("{s:?}: expected tcp://HOST:PORT"));
            };
            if port.parse::<u16>().is_err() || host.is_empty() {
                return Err(format!("{s:?}: expected tcp://HOST:PORT"));
            }
            // An IPv6 host goes in brackets (tcp://[2001:db8::1]:7443): unbracketed, the
            // port cannot be told from the address, and the https:// URI the client builds
            // would be invalid.
            if let Some(inner) = host.strip_prefix('[') {
                if inner
                    .strip_suffix(']')
                    .and_then(|h| h.parse::<std::net::Ipv6Addr>().ok())
                    .is_none()
                {
                    return Err(format!(
                        "{s:?}: {host:?} is not a bracketed IPv6 address ([2001:db8::1])"
                    ));
                }
            } else if host.contains(':') {
                return Err(format!(
                    "{s:?}: an IPv6 address needs brackets: tcp://[{host}]:{port}"
                ));
            }
            Ok(ApiEndpoint::Tcp(addr.to_string()))
        } else {
            Err(format!("{s:?}: expected unix:///path or tcp://host:port"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRONTEND: &str = r#"
node = "fe1"
[failover]
mode = "fast"
idle_timeout = "1500ms"
[kernel]
backend = "xfrm"
interface = "eth0"
[[peer_vip]]
address = "192.0.2.100"
connection = "vip100"
protect = ["tcp/143", "tcp/110", "tcp/80"]
"#;

    #[test]
    fn parses_humantime_durations_and_defaults() {
        let c = Config::parse(FRONTEND).unwrap();
        assert_eq!(c.failover.idle_timeout, Duration::from_millis(1500));
        assert_eq!(c.failover.mode, Mode::Fast);
        assert_eq!(c.store.lease_ttl, Duration::from_secs(2));
        assert_eq!(c.keying.sample_interval, Duration::from_millis(250));
        assert_eq!(c.api.endpoint, DEFAULT_API_ENDPOINT);
        assert_eq!(c.peer_vips[0].peer_connection().unwrap().child, "vip100");
        assert_eq!(c.protected_flows().len(), 3);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_path() {
        let text = FRONTEND.replace("mode = \"fast\"", "mode = \"fast\"\nidle_timout = \"2s\"");
        let problems = Config::parse(&text).unwrap_err();
        assert_eq!(problems[0].key, "failover.idle_timout");
        assert!(problems[0].reason.contains("idle_timout"), "{problems:?}");
    }

    #[test]
    fn drill_section_is_checked() {
        let c = Config::parse(FRONTEND).unwrap();
        assert_eq!(c.drill.integration, None);
        assert_eq!(c.drill.target, Duration::from_secs(1));
        assert_eq!(c.drill.handover, ["vipsec-handover", "{vip}"]);
        let ok = format!(
            "{FRONTEND}\n[drill]\nintegration = \"command\"\ncommand = [\"move\", \"{{vip}}\", \"{{to}}\"]\ntarget = \"800ms\"\n"
        );
        let c = Config::parse(&ok).unwrap();
        assert_eq!(c.drill.integration, Some(DrillIntegration::Command));
        assert_eq!(c.drill.target, Duration::from_millis(800));
        let text = format!("{FRONTEND}\n[drill]\nintegration = \"command\"\ntarget = \"0s\"\n");
        let keys: Vec<_> = Config::parse(&text)
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(keys, ["drill.target", "drill.command"]);
        let text = format!("{FRONTEND}\n[drill]\nintegration = \"pacemaker\"\n");
        assert_eq!(Config::parse(&text).unwrap_err()[0].key, "drill.resource");
        let text = format!("{FRONTEND}\n[drill]\nintegration = \"pcs\"\n");
        assert_eq!(
            Config::parse(&text).unwrap_err()[0].key,
            "drill.integration"
        );
        let text = format!("{FRONTEND}\n[drill]\ntarge = \"1s\"\n");
        assert_eq!(Config::parse(&text).unwrap_err()[0].key, "drill.targe");
    }

    #[test]
    fn bad_duration_names_the_key() {
        let text = FRONTEND.replace("1500ms", "soon");
        let problems = Config::parse(&text).unwrap_err();
        assert_eq!(problems[0].key, "failover.idle_timeout");
    }

    #[test]
    fn plain_http_to_another_machine_needs_allow_insecure() {
        let base = "node = \"be1\"\n[store]\nbackend = \"etcd\"\n";
        for (endpoints, extra, ok) in [
            ("http://127.0.0.1:2379", "", true),
            ("http://localhost:2379", "", true),
            ("http://[::1]:2379", "", true),
            ("https://192.0.2.5:2379", "", true),
            ("http://192.0.2.5:2379", "", false),
            ("http://user:pw@192.0.2.5:2379", "", false),
            ("http://[2001:db8::5]:2379", "", false),
            ("http://etcd.example:2379", "", false),
            ("http://192.0.2.5:2379", "allow_insecure = true\n", true),
        ] {
            let r = Config::parse(&format!("{base}endpoints = [\"{endpoints}\"]\n{extra}"));
            assert_eq!(r.is_ok(), ok, "{endpoints} {extra}: {r:?}");
            if let Err(p) = r {
                assert_eq!(p[0].key, "store.endpoints[0]");
                assert!(p[0].reason.contains("allow_insecure"), "{}", p[0].reason);
            }
        }
    }

    #[test]
    fn a_request_timeout_that_a_lease_cannot_outlast_twice_is_refused() {
        let base = "node = \"be1\"\n[store]\nbackend = \"etcd\"\n";
        for (extra, ok) in [
            ("lease_ttl = \"2s\"\nrequest_timeout = \"1s\"", true),
            ("lease_ttl = \"2s\"\nrequest_timeout = \"1500ms\"", false),
            ("lease_ttl = \"10s\"\nrequest_timeout = \"3s\"", true),
            ("request_timeout = \"0s\"", false),
        ] {
            let r = Config::parse(&format!("{base}{extra}\n"));
            assert_eq!(r.is_ok(), ok, "{extra}: {r:?}");
            if let Err(p) = r {
                assert_eq!(p[0].key, "store.request_timeout");
            }
        }
        let p = Config::parse(&format!("{base}request_timeout = \"1500ms\"\n")).unwrap_err();
        assert!(
            p[0].reason.contains("1s 500ms") && p[0].reason.contains("2s"),
            "{}",
            p[0].reason
        );
    }

    #[test]
    fn the_unix_socket_is_always_served_and_tcp_comes_in_addition() {
        let base = "node = \"be1\"\n[api]\n";
        let p = Config::parse(&format!("{base}endpoint = \"tcp://0.0.0.0:7443\"\n")).unwrap_err();
        assert_eq!(p[0].key, "api.endpoint");
        assert!(p[0].reason.contains("api.tcp"), "{}", p[0].reason);
        let p = Config::parse(&format!("{base}tcp = \"tcp://0.0.0.0:7443\"\n")).unwrap_err();
        assert_eq!(p[0].key, "api.tcp");
        assert!(p[0].reason.contains("api.tls_cert"), "{}", p[0].reason);
        let p = Config::parse(&format!("{base}tcp = \"unix:///run/x.sock\"\n")).unwrap_err();
        assert_eq!(p[0].key, "api.tcp");
        let c = Config::parse(&format!(
            "{base}tcp = \"tcp://0.0.0.0:7443\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n"
        ))
        .unwrap();
        assert_eq!(c.api.endpoint, DEFAULT_API_ENDPOINT);
        assert_eq!(c.api.tcp.as_deref(), Some("tcp://0.0.0.0:7443"));
    }

    #[test]
    fn all_semantic_problems_are_reported_at_once() {
        let text = r#"
node = ""
[api]
endpoint = "tcp://0.0.0.0:7443"
[store]
prefix = "vipsec"
[[peer_vip]]
address = "192.0.2.100"
connection = "vip100"
protect = ["tcp/0", "sctp/5"]
"#;
        let problems = Config::parse(text).unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "node",
                "api.endpoint",
                "store.prefix",
                "kernel.backend",
                "peer_vip[0].protect[0]",
                "peer_vip[0].protect[1]"
            ]
        );
    }

    #[test]
    fn same_vip_hosted_and_peer_is_refused() {
        let text = format!("{FRONTEND}\n[[hosted_vip]]\naddress = \"192.0.2.100\"\n");
        let problems = Config::parse(&text).unwrap_err();
        assert_eq!(problems[0].key, "peer_vip[0].address");
    }

    #[test]
    fn example_configs_are_valid() {
        for name in ["backend.toml", "frontend.toml", "single-node.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/examples")
                .join(name);
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn a_hosted_guard_needs_the_interface_it_is_bound_to() {
        let text = "node = \"be1\"\n[kernel]\nbackend = \"xfrm\"\n[[hosted_vip]]\naddress = \"192.0.2.100\"\nprotect = [\"tcp/143\"]\n";
        let problems = Config::parse(text).unwrap_err();
        assert_eq!(problems[0].key, "hosted_vip[0].protect");
        let fixed = text.replace(
            "backend = \"xfrm\"",
            "backend = \"xfrm\"\ninterface = \"eth0\"",
        );
        assert!(Config::parse(&fixed).is_ok());
    }

    #[test]
    fn reconnect_defaults_and_priority() {
        let c = Config::parse(FRONTEND).unwrap();
        assert_eq!(c.failover.reconnect, ReconnectConfig::default());
        assert_eq!(c.failover.reconnect.jitter, Duration::from_millis(200));
        assert_eq!(c.peer_vips[0].priority, DEFAULT_PEER_PRIORITY);
        let text = format!(
            "{FRONTEND}priority = 90\n[failover.reconnect]\nrate = 5.5\nburst = 2\nconcurrency = 8\njitter = \"1s\"\n"
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
    fn ipv6_vips_parse_with_interfaces_flows_and_endpoints() {
        let text = r#"
node = "be1"
[api]
tcp = "tcp://[2001:db8:1::1]:7443"
tls_cert = "/etc/vipsec/cert.pem"
tls_key = "/etc/vipsec/key.pem"
[store]
backend = "etcd"
endpoints = ["http://[2001:db8:1::2]:2379", "https://user@[2001:db8:1::3]:2379"]
allow_insecure = true
[kernel]
backend = "xfrm"
interface = "eth0"
[[hosted_vip]]
address = "2001:db8:1::100"
interface = "eth0"
protect = ["tcp/143"]
[[peer_vip]]
address = "2001:db8:2::100"
connection = "vip6"
protect = ["tcp/143", "any"]
"#;
        let c = Config::parse(text).unwrap();
        let v6: IpAddr = "2001:db8:1::100".parse().unwrap();
        assert_eq!(c.hosted_addresses(), vec![v6]);
        assert_eq!(c.hosted_vips[0].interface.as_deref(), Some("eth0"));
        let flows: Vec<String> = c.protected_flows().iter().map(|f| f.to_string()).collect();
        assert_eq!(
            flows,
            [
                "[2001:db8:2::100]:tcp/143",
                "[2001:db8:2::100]:any",
                "from [2001:db8:1::100]:tcp/143"
            ]
        );
        assert_eq!(
            ApiEndpoint::parse("tcp://[2001:db8:1::1]:7443"),
            Ok(ApiEndpoint::Tcp("[2001:db8:1::1]:7443".into()))
        );
    }

    #[test]
    fn protected_flows_without_a_kernel_backend_are_refused_unless_the_guard_is_turned_off() {
        let text = r#"
node = "fe1"
[[peer_vip]]
address = "192.0.2.100"
connection = "vip100"
protect = ["tcp/143"]
[[hosted_vip]]
address = "192.0.2.10"
"#;
        let p = Config::parse(text).unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "kernel.backend");
        assert!(
            p[0].reason.contains("192.0.2.100 (tcp/143)")
                && !p[0].reason.contains("192.0.2.10 ")
                && p[0].reason.contains("kernel.fail_secure = false"),
            "{}",
            p[0].reason
        );
        // Saying so is allowed: the operator chose to run without the guard.
        Config::parse(&text.replace(
            "node = \"fe1\"",
            "node = \"fe1\"\n[kernel]\nfail_secure = false",
        ))
        .unwrap();
        // No protected flow, nothing to guard.
        Config::parse(&text.replace("protect = [\"tcp/143\"]", "")).unwrap();
    }

    #[test]
    fn policy_managed_settings_are_checked() {
        let managed = r#"
node = "be1"
[keying]
backend = "strongswan"
[kernel]
backend = "xfrm"
interface = "eth0"
[policy]
managed = true
identity = "be1.example"
[[hosted_vip]]
address = "192.0.2.100"
[[peer_vip]]
address = "192.0.2.200"
"#;
        let problems = Config::parse(managed).unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["policy.psk_file", "policy.identity"], "{problems:?}");
        let fixed = managed.replace(
            "identity = \"be1.example\"",
            "psk_file = \"/etc/vipsec/psk\"",
        );
        let c = Config::parse(&fixed).unwrap();
        assert!(c.policy_managed("192.0.2.200".parse().unwrap()));
        assert!(c.peer_protected("192.0.2.200".parse().unwrap()));
        let unmanaged = fixed.replace("managed = true", "managed = false");
        let problems = Config::parse(&unmanaged).unwrap_err();
        assert_eq!(problems[0].key, "peer_vip[0].connection", "{problems:?}");
    }

    #[test]
    fn ipv6_addresses_that_cannot_be_vips_or_hosts_are_refused() {
        for (vip, why) in [
            ("::ffff:192.0.2.100", "IPv4-mapped"),
            ("fe80::1", "link-local"),
            ("::", "unicast"),
            ("ff02::1", "unicast"),
        ] {
            let e = vip_address_problem(vip.parse().unwrap()).unwrap();
            assert!(e.contains(why), "{vip}: {e}");
        }
        assert_eq!(vip_address_problem("2001:db8::100".parse().unwrap()), None);
        assert_eq!(vip_address_problem("192.0.2.100".parse().unwrap()), None);
        let text = format!(
            "{FRONTEND}\n[[peer_vip]]\naddress = \"::ffff:192.0.2.7\"\nconnection = \"x\"\n"
        );
        let problems = Config::parse(&text).unwrap_err();
        assert!(
            problems.iter().any(|p| p.key.ends_with("].address")
                && p.reason.contains("write the IPv4 address 192.0.2.7")),
            "{problems:?}"
        );
        for bad in [
            "tcp://2001:db8::1:7443",
            "tcp://[2001:db8::1:7443",
            "tcp://[vip.example]:7443",
            "tcp://[2001:db8::1]",
        ] {
            assert!(ApiEndpoint::parse(bad).is_err(), "{bad}");
        }
        assert!(unbracketed_ipv6_host("http://2001:db8::1:2379").is_some());
        assert!(unbracketed_ipv6_host("http://[2001:db8::1]:2379").is_none());
        assert!(unbracketed_ipv6_host("http://u:p@192.0.2.1:2379").is_none());
    }
}
