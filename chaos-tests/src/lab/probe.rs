//! The traffic probe on each front-end: every interval it opens a new TCP connection to each
//! target (VIP:143), reads the greeting with a short timeout and writes one JSON line per
//! attempt with CLOCK_MONOTONIC times, the outcome and the back-end that answered. It runs
//! as `vipsec-chaos probe` inside the node's namespace; the lab tails its file.

use std::io::{BufRead, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::ProcessGuard;

use crate::clock::now_ns;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeRecord {
    /// The front-end that probed.
    pub fe: String,
    pub target: SocketAddr,
    /// CLOCK_MONOTONIC ns when the attempt started and when it ended.
    pub start: u64,
    pub end: u64,
    /// The back-end that answered, when one did.
    pub node: Option<String>,
    /// Why it failed: timeout, refused, reset, eperm, unreachable, empty, or an io kind.
    pub error: Option<String>,
}

impl ProbeRecord {
    pub fn ok(&self) -> bool {
        self.node.is_some()
    }
}

pub struct ProbeArgs {
    pub fe: String,
    pub targets: Vec<SocketAddr>,
    pub interval: Duration,
    pub timeout: Duration,
    pub out: PathBuf,
}

/// Probes until killed.
pub async fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ProbeRecord>();
    let writer = tokio::spawn(async move {
        while let Some(rec) = rx.recv().await {
            // One write per line, flushed at once: the lab reads the file while we run.
            let mut line = serde_json::to_string(&rec).expect("record serializes");
            line.push('\n');
            if file.write_all(line.as_bytes()).is_err() {
                break;
            }
        }
    });
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        for &target in &args.targets {
            let tx = tx.clone();
            let fe = args.fe.clone();
            let timeout = args.timeout;
            tokio::spawn(async move {
                let _ = tx.send(attempt(fe, target, timeout).await);
            });
        }
        if writer.is_finished() {
            anyhow::bail!("probe output {} failed", args.out.display());
        }
    }
}

async fn attempt(fe: String, target: SocketAddr, timeout: Duration) -> ProbeRecord {
    let start = now_ns();
    let result = tokio::time::timeout(timeout, async {
        let mut conn = TcpStream::connect(target).await?;
        let mut buf = Vec::with_capacity(128);
        let mut chunk = [0u8; 128];
        loop {
            let n = conn.read(&mut chunk).await?;
            buf.extend_from_slice(&chunk[..n]);
            if n == 0 || buf.contains(&b'\n') || buf.len() > 512 {
                break;
            }
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    })
    .await;
    let end = now_ns();
    let (node, error) = match result {
        Err(_) => (None, Some("timeout".to_string())),
        Ok(Err(e)) => (None, Some(error_kind(&e))),
        Ok(Ok(text)) => match super::mailserver::node_of(&text) {
            Some(n) => (Some(n.to_string()), None),
            None => (None, Some("empty".to_string())),
        },
    };
    ProbeRecord {
        fe,
        target,
        start,
        end,
        node,
        error,
    }
}

fn error_kind(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "refused".into(),
        ConnectionReset | ConnectionAborted => "reset".into(),
        PermissionDenied => "eperm".into(),
        TimedOut => "timeout".into(),
        HostUnreachable | NetworkUnreachable => "unreachable".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A probe process in a front-end and the reader of its records.
pub struct Probe {
    _guard: ProcessGuard,
    pub fe: String,
    path: PathBuf,
    offset: u64,
    partial: String,
    /// Every record read so far, in file order.
    pub records: Vec<ProbeRecord>,
}

impl Probe {
    pub fn start(
        self_exe: &Path,
        ns: &Netns,
        fe: &str,
        targets: &[SocketAddr],
        dir: &Path,
        interval: Duration,
    ) -> anyhow::Result<Probe> {
        let path = dir.join(format!("probe-{fe}.jsonl"));
        std::fs::write(&path, "")?;
        let log = std::fs::File::create(dir.join(format!("probe-{fe}.log")))?;
        let mut cmd = ns.command(&self_exe.display().to_string());
        let interval = interval.as_millis().max(1).to_string();
        cmd.args(["probe", "--fe", fe, "--out"]).arg(&path).args([
            "--interval",
            &interval,
            "--timeout",
            "500",
        ]);
        for t in targets {
            cmd.args(["--target", &t.to_string()]);
        }
        let guard = ProcessGuard::spawn(
            "probe",
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        Ok(Probe {
            _guard: guard,
            fe: fe.to_string(),
            path,
            offset: 0,
            partial: String::new(),
            records: Vec::new(),
        })
    }

    /// Reads the records written since the last call; returns how many arrived.
    pub fn poll(&mut self) -> anyhow::Result<usize> {
        let mut f = std::fs::File::open(&self.path)?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut reader = std::io::BufReader::new(f);
        let mut n = 0;
        loop {
            let mut line = String::new();
            let read = reader.read_line(&mut line)?;
            if read == 0 {
                break;
            }
            self.offset += read as u64;
            if !line.ends_with('\n') {
                // A line still being written: keep it for the next poll.
                self.partial.push_str(&line);
                continue;
            }
            let full = std::mem::take(&mut self.partial) + &line;
            self.records.push(serde_json::from_str(full.trim_end())?);
            n += 1;
        }
        Ok(n)
    }

    /// Records whose attempt started at or after `t` (CLOCK_MONOTONIC ns).
    pub fn since(&self, t: u64) -> impl Iterator<Item = &ProbeRecord> {
        self.records.iter().filter(move |r| r.start >= t)
    }
}
