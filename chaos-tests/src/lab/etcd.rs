//! The lab's etcd: one server, or a cluster of one member per node, reached by front-ends
//! and back-ends over the lab network like a real cluster store. Members can be killed,
//! restarted from their data directory, frozen and asked who leads.
//!
//! Timing is etcd's default (heartbeat 100 ms, election timeout 1000 ms, no pre-vote in
//! etcd 3.4), written out so the lab does not depend on the packaged defaults.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vipsec_testbed::process::{ProcessGuard, wait_for};

use crate::clock::{now_ns, since};

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;
pub const HEARTBEAT_MS: u32 = 100;
pub const ELECTION_MS: u32 = 1000;

/// How long one status request may take: a frozen member accepts the connection (the
/// kernel does) but never answers.
const STATUS_TIMEOUT: Duration = Duration::from_millis(200);

/// The client URL of a member at `addr`.
pub fn client_url(addr: IpAddr) -> String {
    format!("http://{}", SocketAddr::from((addr, CLIENT_PORT)))
}

/// One etcd process and what it needs to be started again on the same data.
struct Member {
    name: String,
    ns: String,
    addr: IpAddr,
    dir: PathBuf,
    /// The arguments it was first started with; etcd ignores the bootstrap ones once its
    /// data directory exists, so a restart passes the same.
    args: Vec<String>,
    guard: Option<ProcessGuard>,
}

impl Member {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let program = vipsec_testbed::require_program("etcd")?;
        std::fs::create_dir_all(&self.dir)?;
        // Appended, so a restarted member's log follows the one before it.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let guard = ProcessGuard::spawn(
            &format!("etcd {}", self.name),
            Command::new("ip")
                .args(["netns", "exec", &self.ns])
                .arg(program)
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        self.guard = Some(guard);
        Ok(())
    }

    fn running(&mut self) -> bool {
        self.guard.as_mut().is_some_and(|g| g.is_running())
    }

    fn client(&self) -> SocketAddr {
        SocketAddr::from((self.addr, CLIENT_PORT))
    }
}

/// What one member says about itself (etcd's `Maintenance.Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: u64,
    /// The leader this member follows (its own id when it leads; 0 when it knows none).
    pub leader: u64,
    pub raft_term: u64,
}

/// The lab's etcd cluster (one member or several).
pub struct Etcd {
    members: Vec<Member>,
    /// The namespace the lab asks members from: a client's view of the cluster, so a
    /// member cut off from the network does not count as answering.
    observer: String,
    /// When the cluster last lost a member (kill, partition) or came back from a freeze:
    /// the start of an election.
    disrupted_at: Option<u64>,
}

impl Etcd {
    /// Starts every member (`name`, namespace, address) and waits until each answers and
    /// one leads. A single member keeps its peer port on loopback, as the lab always had
    /// it; several listen for peers on their lab addresses.
    pub fn start(
        members: &[(&str, &str, IpAddr)],
        observer: &str,
        run_dir: &Path,
    ) -> anyhow::Result<Etcd> {
        anyhow::ensure!(!members.is_empty(), "an etcd cluster needs a member");
        let peer = |addr: IpAddr| -> String {
            if members.len() == 1 {
                format!("http://127.0.0.1:{PEER_PORT}")
            } else {
                format!("http://{}", SocketAddr::from((addr, PEER_PORT)))
            }
        };
        let name_of = |name: &str| -> String {
            if members.len() == 1 {
                "lab".to_string()
            } else {
                name.to_string()
            }
        };
        let initial_cluster = members
            .iter()
            .map(|(name, _, addr)| format!("{}={}", name_of(name), peer(*addr)))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            members: Vec::new(),
            observer: observer.to_string(),
            disrupted_at: None,
        };
        for &(name, ns, addr) in members {
            let dir = run_dir.join(name);
            let client = client_url(addr);
            let args: Vec<String> = [
                "--name",
                &name_of(name),
                "--data-dir",
                &dir.join("data").display().to_string(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer(addr),
                "--initial-advertise-peer-urls",
                &peer(addr),
                "--initial-cluster",
                &initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "vipsec-lab",
                "--heartbeat-interval",
                &HEARTBEAT_MS.to_string(),
                "--election-timeout",
                &ELECTION_MS.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut m = Member {
                name: name.to_string(),
                ns: ns.to_string(),
                addr,
                dir,
                args,
                guard: None,
            };
            // All at once: a member of a new cluster serves clients only once a quorum
            // has formed.
            m.spawn()?;
            etcd.members.push(m);
        }
        etcd.wait_all_up(Duration::from_secs(20))?;
        Ok(etcd)
    }

    /// The members' node names.
    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    /// Every member's client URL, as the agents list them in `store.endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| client_url(m.addr)).collect()
    }

    /// Every value stored under `prefix`, read with etcdctl from the observer's namespace
    /// (a client's view; the host cannot reach the lab network).
    pub fn values_with_prefix(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let program = vipsec_testbed::require_program("etcdctl")?;
        let out = Command::new("ip")
            .args(["netns", "exec", &self.observer])
            .arg(program)
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .args(["--command-timeout=10s", "get", "--prefix", prefix])
            .arg("--print-value-only")
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "etcdctl get --prefix {prefix}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        // The values are one-line JSON documents, one per line.
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect())
    }

    fn member(&mut self, name: &str) -> anyhow::Result<&mut Member> {
        self.members
            .iter_mut()
            .find(|m| m.name == name)
            .ok_or_else(|| anyhow::anyhow!("no etcd member {name}"))
    }

    /// Each member's status as the observer gets it (None: no answer in time).
    pub fn statuses(&self) -> Vec<(String, Option<MemberStatus>)> {
        self.view().statuses()
    }

    /// What a leader watch needs, detached from the lab.
    fn view(&self) -> View {
        View {
            observer: self.observer.clone(),
            members: self
                .members
                .iter()
                .map(|m| (m.name.clone(), m.client()))
                .collect(),
        }
    }

    /// The member that leads now, as the observer sees it.
    pub fn leader(&self) -> Option<String> {
        self.view().leader()
    }

    /// Watches for a leader from now on in the background; its time counts from the
    /// last disruption ([`Etcd::kill`], [`Etcd::isolated`], [`Etcd::thaw`]), or from now.
    pub fn watch_leader(&self, timeout: Duration) -> LeaderWatch {
        let from = self.disrupted_at.unwrap_or_else(now_ns);
        let view = self.view();
        let handle = std::thread::spawn(move || {
            let deadline = now_ns() + timeout.as_nanos() as u64;
            loop {
                if let Some(leader) = view.leader() {
                    return Some((leader, now_ns()));
                }
                if now_ns() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        LeaderWatch {
            handle,
            from,
            timeout,
        }
    }

    /// SIGKILL of one member.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let m = self.member(name)?;
        let mut guard = m
            .guard
            .take()
            .ok_or_else(|| anyhow::anyhow!("etcd {name} is not running"))?;
        guard.kill();
        self.disrupted_at = Some(now_ns());
        Ok(())
    }

    /// Starts a killed member again on its data directory; does not wait for it (with
    /// no quorum it cannot serve yet): [`Etcd::watch_leader`] tells when the cluster is
    /// back.
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let m = self.member(name)?;
        if let Some(mut g) = m.guard.take() {
            g.kill();
        }
        m.spawn()
    }

    /// Notes that a member was cut off the network (the lab does the cutting), which
    /// starts an election when it led.
    pub fn isolated(&mut self, name: &str) -> anyhow::Result<()> {
        self.member(name)?;
        self.disrupted_at = Some(now_ns());
        Ok(())
    }

    /// SIGSTOP of every member at once: etcd stops answering but keeps its sockets open,
    /// as when the store's machines hang; clients see timeouts, not refused connections.
    pub fn freeze(&self) -> anyhow::Result<()> {
        for m in &self.members {
            if let Some(g) = &m.guard {
                g.signal(libc::SIGSTOP)?;
            }
        }
        Ok(())
    }

    /// SIGCONT after [`Etcd::freeze`].
    pub fn thaw(&mut self) -> anyhow::Result<()> {
        for m in &self.members {
            if let Some(g) = &m.guard {
                g.signal(libc::SIGCONT)?;
            }
        }
        self.disrupted_at = Some(now_ns());
        Ok(())
    }

    /// Every member running and unfrozen, and a leader: the state a scenario starts from.
    pub fn restore(&mut self) -> anyhow::Result<()> {
        for m in &mut self.members {
            if m.running() {
                if let Some(g) = &m.guard {
                    g.signal(libc::SIGCONT)?;
                }
            } else {
                m.spawn()?;
            }
        }
        self.wait_all_up(Duration::from_secs(20))?;
        self.disrupted_at = None;
        Ok(())
    }

    /// Waits until every member answers and one leads them all.
    fn wait_all_up(&self, timeout: Duration) -> anyhow::Result<()> {
        let view = self.view();
        let mut last = Vec::new();
        wait_for("every etcd member up under one leader", timeout, || {
            last = view.statuses();
            let leaders: Vec<u64> = last
                .iter()
                .map(|(_, s)| s.map_or(0, |s| s.leader))
                .collect();
            (leaders[0] != 0 && leaders.iter().all(|&l| l == leaders[0])).then_some(())
        })
        .map_err(|e| anyhow::anyhow!("{e}: {last:?}"))
    }
}

/// A background wait for the cluster's leader; see [`Etcd::watch_leader`].
pub struct LeaderWatch {
    handle: std::thread::JoinHandle<Option<(String, u64)>>,
    from: u64,
    timeout: Duration,
}

impl LeaderWatch {
    /// The leader and how long after the disruption the first surviving member reported
    /// it (the store's election time).
    pub fn wait(self) -> anyhow::Result<(String, Duration)> {
        match self.handle.join() {
            Ok(Some((leader, at))) => Ok((leader, since(self.from, at))),
            Ok(None) => anyhow::bail!("no etcd leader within {:?}", self.timeout),
            Err(_) => anyhow::bail!("the etcd leader watch panicked"),
        }
    }
}

/// Members to ask, and the namespace to ask them from.
#[derive(Clone)]
struct View {
    observer: String,
    members: Vec<(String, SocketAddr)>,
}

impl View {
    /// Every member's status, asked in parallel so that one frozen member does not delay
    /// the others' answers.
    fn statuses(&self) -> Vec<(String, Option<MemberStatus>)> {
        let members = self.members.clone();
        crate::nsexec::in_netns(&self.observer, move || {
            std::thread::scope(|s| {
                let asks: Vec<_> = members
                    .iter()
                    .map(|(name, addr)| (name, s.spawn(move || status(*addr))))
                    .collect();
                asks.into_iter()
                    .map(|(name, h)| (name.clone(), h.join().ok().flatten()))
                    .collect()
            })
        })
        .unwrap_or_else(|_| {
            self.members
                .iter()
                .map(|(n, _)| (n.clone(), None))
                .collect()
        })
    }

    /// The member that says it leads, at the highest term when two do (an old leader
    /// that has not noticed yet). Only a leader's own word counts: followers keep naming
    /// a dead leader until their election timeout.
    fn leader(&self) -> Option<String> {
        self.statuses()
            .into_iter()
            .filter_map(|(name, s)| s.filter(|s| s.id == s.leader).map(|s| (s.raft_term, name)))
            .max()
            .map(|(_, name)| name)
    }
}

/// `Maintenance.Status` through etcd's JSON gateway: one request without spawning
/// etcdctl, so an election is timed to the lab's 10 ms polls.
fn status(addr: SocketAddr) -> Option<MemberStatus> {
    let mut conn = TcpStream::connect_timeout(&addr, STATUS_TIMEOUT).ok()?;
    conn.set_read_timeout(Some(STATUS_TIMEOUT)).ok()?;
    conn.set_write_timeout(Some(STATUS_TIMEOUT)).ok()?;
    // HTTP/1.0: the answer comes whole, without chunking, and the server closes.
    let request = format!(
        "POST /v3/maintenance/status HTTP/1.0\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    conn.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    parse_status(body)
}

/// The gateway writes 64-bit integers as JSON strings.
fn parse_status(body: &str) -> Option<MemberStatus> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let num =
        |v: &serde_json::Value| -> Option<u64> { v.as_u64().or_else(|| v.as_str()?.parse().ok()) };
    Some(MemberStatus {
        id: num(&v["header"]["member_id"])?,
        leader: v.get("leader").map_or(Some(0), num)?,
        raft_term: v.get("raftTerm").map_or(Some(0), num)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_gateway_status() {
        let body = r#"{"header":{"cluster_id":"14841639068965178418","member_id":"10276657743932975437","revision":"1","raft_term":"2"},"version":"3.4.23","dbSize":"20480","leader":"10276657743932975437","raftIndex":"4","raftTerm":"2","raftAppliedIndex":"4","dbSizeInUse":"16384"}"#;
        assert_eq!(
            parse_status(body),
            Some(MemberStatus {
                id: 10276657743932975437,
                leader: 10276657743932975437,
                raft_term: 2
            })
        );
        // A member without a leader leaves the field out (proto3 default).
        let body = r#"{"header":{"member_id":"7"},"raftTerm":"3"}"#;
        assert_eq!(
            parse_status(body),
            Some(MemberStatus {
                id: 7,
                leader: 0,
                raft_term: 3
            })
        );
        assert_eq!(parse_status("{}"), None);
    }
}
