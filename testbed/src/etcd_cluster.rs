//! A real three-member etcd cluster on loopback, for tests of leader elections: members can
//! be killed (as a crash would), restarted on the same ports and data, or frozen.
//!
//! The leader is read from each member's plain-HTTP metrics (`etcd_server_is_leader`), so
//! no etcd client is needed here.

use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use crate::process::{ProcessGuard, wait_for};

/// Apart from `etcd::EtcdServer`'s ports so both can run at once. Per member a triple:
/// the client port, the peer port (+1) and the metrics port (+2).
const PORT_FIRST: u16 = 23800;
const PORT_LAST: u16 = 23997;
const TRIPLES: u16 = (PORT_LAST + 1 - PORT_FIRST) / 3;
/// The next triple to try, counted from PORT_FIRST modulo TRIPLES; 0 until first use.
static NEXT_TRIPLE: AtomicU16 = AtomicU16::new(0);

const SIZE: usize = 3;
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Another test process may take a probed port before etcd binds it; then the whole
/// cluster starts again on other ports.
const START_ATTEMPTS: usize = 10;

struct Member {
    name: String,
    client_port: u16,
    process: Option<ProcessGuard>,
    /// A stopped process accepts connections into its backlog but never answers, so it is
    /// left out of leader queries rather than waited on.
    frozen: AtomicBool,
}

impl Member {
    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port + 1)
    }

    fn metrics_port(&self) -> u16 {
        self.client_port + 2
    }

    fn answers(&self) -> bool {
        self.process.is_some() && !self.frozen.load(Ordering::Relaxed)
    }
}

pub struct EtcdCluster {
    members: Vec<Member>,
    token: String,
    extra_args: Vec<String>,
    dir: tempfile::TempDir,
}

enum Attempt {
    Started(EtcdCluster),
    PortClash(anyhow::Error),
}

fn port_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok()
}

/// Test binaries started together would otherwise walk the range in lockstep and clash
/// again on every retry.
fn random_triple() -> u16 {
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (seed % u64::from(TRIPLES)) as u16
}

/// The client port of a free triple, or None when the whole range is taken.
fn take_ports() -> Option<u16> {
    let _ =
        NEXT_TRIPLE.compare_exchange(0, 1 + random_triple(), Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..TRIPLES {
        let n = NEXT_TRIPLE.fetch_add(1, Ordering::Relaxed);
        let p = PORT_FIRST + 3 * (n % TRIPLES);
        if (p..=p + 2).all(port_free) {
            return Some(p);
        }
    }
    None
}

impl EtcdCluster {
    /// Starts three members and waits until each answers /health and one is the leader.
    pub fn start() -> anyhow::Result<EtcdCluster> {
        Self::start_with_args(&[])
    }

    /// Same, with extra flags for every member (e.g. `--election-timeout=500`).
    pub fn start_with_args(extra: &[&str]) -> anyhow::Result<EtcdCluster> {
        crate::require_program("etcd")?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(extra)? {
                Attempt::Started(cluster) => return Ok(cluster),
                Attempt::PortClash(e) => {
                    NEXT_TRIPLE.fetch_add(random_triple(), Ordering::Relaxed);
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("etcd cluster did not start")))
    }

    fn try_start(extra: &[&str]) -> anyhow::Result<Attempt> {
        let dir = tempfile::Builder::new()
            .prefix("vipsec-etcd-cluster-")
            .tempdir()?;
        // The directory's random name keeps members of two clusters from ever joining
        // each other, even when one reuses the other's ports after it is gone.
        let token = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut members = Vec::with_capacity(SIZE);
        for i in 0..SIZE {
            let client_port = take_ports().ok_or_else(|| {
                anyhow::anyhow!("no free port triple in {PORT_FIRST}..{PORT_LAST}")
            })?;
            members.push(Member {
                name: format!("m{i}"),
                client_port,
                process: None,
                frozen: AtomicBool::new(false),
            });
        }
        let mut cluster = EtcdCluster {
            members,
            token,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            dir,
        };
        // All members first: none is healthy before a quorum is up.
        for i in 0..SIZE {
            let guard = cluster.spawn(i)?;
            cluster.members[i].process = Some(guard);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        let outcome = wait_for("all etcd members to answer /health", START_TIMEOUT, || {
            for m in &mut cluster.members {
                if !m.process.as_mut().is_some_and(|p| p.is_running()) {
                    return Some(Err(m.name.clone()));
                }
            }
            cluster
                .members
                .iter()
                .all(|m| healthy(m.metrics_port()))
                .then_some(Ok(()))
        });
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(name)) => {
                let log = cluster.log_tail(&name);
                let e = anyhow::anyhow!("etcd member {name} exited at start:\n{log}");
                if log.contains("address already in use") {
                    return Ok(Attempt::PortClash(e));
                }
                return Err(e);
            }
            Err(e) => anyhow::bail!("{e}\n{}", cluster.all_log_tails()),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        cluster.wait_leader(left.max(Duration::from_secs(1)))?;
        Ok(Attempt::Started(cluster))
    }

    fn spawn(&self, i: usize) -> anyhow::Result<ProcessGuard> {
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = m.peer_url();
        let metrics = format!("http://127.0.0.1:{}", m.metrics_port());
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&m.name))?;
        let mut cmd = Command::new("etcd");
        // On a restart etcd reads the membership from its data directory and ignores the
        // --initial-* flags, so the same command line serves both.
        cmd.args([
            "--name",
            &m.name,
            "--data-dir",
            &self.data_dir(&m.name).to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &self.token,
            "--listen-metrics-urls",
            &metrics,
        ])
        .args(&self.extra_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        ProcessGuard::spawn(&format!("etcd:{}:{}", m.name, m.client_port), &mut cmd)
    }

    fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.members
            .iter()
            .position(|m| m.name == name)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no etcd member {name}; the members are {:?}",
                    self.member_names()
                )
            })
    }

    /// For the calls that cannot return an error: a wrong name is a bug in the test.
    fn member(&self, name: &str) -> &Member {
        match self.index(name) {
            Ok(i) => &self.members[i],
            Err(e) => panic!("{e}"),
        }
    }

    fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.data"))
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Client URLs of all members, killed ones included, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    pub fn member_names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    pub fn endpoint_of(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}", self.member(name).client_port)
    }

    /// The member that says it is the leader now, among those neither killed nor frozen.
    /// A thawed leader may still claim to lead until it hears of the newer term; two
    /// claimants are an error, not a guess.
    pub fn leader(&self) -> anyhow::Result<String> {
        let claimants: Vec<&str> = self
            .members
            .iter()
            .filter(|m| m.answers() && is_leader(m.metrics_port()) == Some(true))
            .map(|m| m.name.as_str())
            .collect();
        match claimants.as_slice() {
            [one] => Ok(one.to_string()),
            [] => anyhow::bail!("no running etcd member is the leader"),
            many => anyhow::bail!("several etcd members claim to lead: {many:?}"),
        }
    }

    /// Waits for a single leader among the members neither killed nor frozen, and says how
    /// long that took from this call (called right after a kill, the election time).
    pub fn wait_leader(&self, timeout: Duration) -> anyhow::Result<(String, Duration)> {
        let t0 = Instant::now();
        let mut last = None;
        let found = wait_for("an etcd leader", timeout, || match self.leader() {
            Ok(name) => Some(name),
            Err(e) => {
                last = Some(e);
                None
            }
        });
        match found {
            Ok(name) => Ok((name, t0.elapsed())),
            Err(e) => {
                let why = last.map(|l| l.to_string()).unwrap_or_default();
                anyhow::bail!("{e}: {why}\n{}", self.all_log_tails())
            }
        }
    }

    /// Whether the member answers /health, which etcd only does with a leader in sight.
    pub fn healthy(&self, name: &str) -> bool {
        let m = self.member(name);
        m.answers() && healthy(m.metrics_port())
    }

    /// SIGKILL, as a crash would; the data directory stays for `restart`.
    pub fn kill(&mut self, name: &str) {
        let i = self.index(name).unwrap_or_else(|e| panic!("{e}"));
        let m = &mut self.members[i];
        if let Some(mut p) = m.process.take() {
            p.kill();
        }
        m.frozen.store(false, Ordering::Relaxed);
    }

    /// Starts the member again on its ports and data (killing it first if it runs) and
    /// waits until it answers /health, that is until it is back in the cluster.
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.index(name)?;
        self.kill(name);
        let mut guard = self.spawn(i)?;
        let port = self.members[i].metrics_port();
        let answered = wait_for(
            &format!("etcd member {name} to answer /health"),
            START_TIMEOUT,
            || {
                if !guard.is_running() {
                    return Some(false);
                }
                healthy(port).then_some(true)
            },
        );
        match answered {
            Ok(true) => {
                self.members[i].process = Some(guard);
                Ok(())
            }
            Ok(false) => anyhow::bail!(
                "etcd member {name} exited at restart:\n{}",
                self.log_tail(name)
            ),
            Err(e) => anyhow::bail!("{e}\n{}", self.log_tail(name)),
        }
    }

    /// SIGSTOP: the process keeps its sockets but stops answering, like a hung host.
    pub fn freeze(&self, name: &str) -> anyhow::Result<()> {
        let m = &self.members[self.index(name)?];
        let p = m
            .process
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("etcd member {name} is not running"))?;
        p.signal(libc::SIGSTOP)?;
        m.frozen.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// SIGCONT after `freeze`.
    pub fn thaw(&self, name: &str) -> anyhow::Result<()> {
        let m = &self.members[self.index(name)?];
        let p = m
            .process
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("etcd member {name} is not running"))?;
        p.signal(libc::SIGCONT)?;
        m.frozen.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// The last lines the member logged (over all its runs), for failure messages.
    pub fn log_tail(&self, name: &str) -> String {
        let m = self.member(name);
        let text = std::fs::read_to_string(self.log_path(&m.name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn all_log_tails(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("--- {} ---\n{}", m.name, self.log_tail(&m.name)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // Before the data directories go; SIGKILL also ends a stopped process.
        for m in &mut self.members {
            if let Some(mut p) = m.process.take() {
                p.kill();
            }
        }
    }
}

/// A GET on a member's plain-HTTP metrics port; None when it does not answer in time.
fn get(port: u16, path: &str, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// etcd holds /health open while it has no leader, so a short wait is an answer too.
fn healthy(port: u16) -> bool {
    get(port, "/health", Duration::from_secs(1)).is_some_and(|b| b.contains("\"health\":\"true\""))
}

/// Frozen members are never asked, so a slow answer (a loaded machine running several
/// clusters) is waited for rather than taken for "not the leader".
fn is_leader(port: u16) -> Option<bool> {
    let body = get(port, "/metrics", Duration::from_secs(3))?;
    let value = body
        .lines()
        .find_map(|l| l.strip_prefix("etcd_server_is_leader "))?;
    Some(value.trim() == "1")
}
