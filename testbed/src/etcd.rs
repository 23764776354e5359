//! A real etcd server on loopback with its own data directory, killed on drop, that can be
//! stopped and started again on the same port and data (to test outages).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use crate::process::{ProcessGuard, wait_for};

/// The loopback ports this crate may use for etcd: per server the client port, the peer
/// port (+1) and a plain-HTTP metrics port (+2) that answers `/health` even under TLS.
const PORT_FIRST: u16 = 23700;
const PORT_LAST: u16 = 23797;
static NEXT_PORT: AtomicU16 = AtomicU16::new(PORT_FIRST);

pub struct EtcdServer {
    pub client_port: u16,
    data: tempfile::TempDir,
    process: Option<ProcessGuard>,
    extra_args: Vec<String>,
    tls: bool,
}

fn port_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok()
}

impl EtcdServer {
    /// Starts etcd on a free pair of ports and waits until it answers.
    pub fn start() -> anyhow::Result<EtcdServer> {
        Self::start_with_args(&[])
    }

    /// Serves clients over TLS only and requires a client certificate signed by the CA.
    pub fn start_tls(pki: &crate::pki::TestPki) -> anyhow::Result<EtcdServer> {
        let files = [pki.server_cert(), pki.server_key(), pki.ca()];
        let [cert, key, ca] = files.map(|p| p.to_string_lossy().into_owned());
        Self::start_inner(
            &[
                "--cert-file",
                &cert,
                "--key-file",
                &key,
                "--trusted-ca-file",
                &ca,
                "--client-cert-auth",
            ],
            true,
        )
    }

    /// Same, with extra command-line flags (e.g. `--auth-token=simple`).
    pub fn start_with_args(extra: &[&str]) -> anyhow::Result<EtcdServer> {
        Self::start_inner(extra, false)
    }

    fn start_inner(extra: &[&str], tls: bool) -> anyhow::Result<EtcdServer> {
        crate::require_program("etcd")?;
        let mut last_err = None;
        // Two tries per port pair at most over the whole range; a pair can be taken
        // between the probe and etcd's bind by someone else, so a failed start moves on.
        for _ in 0..(PORT_LAST - PORT_FIRST) / 3 {
            let p = NEXT_PORT.fetch_add(3, Ordering::Relaxed);
            let p = if p + 2 > PORT_LAST {
                NEXT_PORT.store(PORT_FIRST + 3, Ordering::Relaxed);
                PORT_FIRST
            } else {
                p
            };
            if !(p..=p + 2).all(port_free) {
                continue;
            }
            let mut server = EtcdServer {
                client_port: p,
                data: tempfile::Builder::new().prefix("vipsec-etcd-").tempdir()?,
                process: None,
                extra_args: extra.iter().map(|s| s.to_string()).collect(),
                tls,
            };
            match server.start_again() {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow::anyhow!("no free port pair in {PORT_FIRST}..{PORT_LAST}")))
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.data.path().join("etcd.log")
    }

    /// The last lines etcd logged, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Kills the server (SIGKILL, as a crash would); the data stays.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Sends the server a signal: SIGSTOP freezes it with its connections open (a member
    /// gone silent without closing anything), SIGCONT wakes it.
    pub fn signal(&self, sig: i32) -> anyhow::Result<()> {
        self.process
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("etcd is stopped"))?
            .signal(sig)
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.is_running())
    }

    /// Starts (again) on the same port and data directory and waits until it answers.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.stop();
        let p = self.client_port;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", p + 1);
        let metrics = format!("http://127.0.0.1:{}", p + 2);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new("etcd");
        cmd.args([
            "--name",
            "vt",
            "--data-dir",
            &self.data_dir().to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("vt={peer}"),
            "--listen-metrics-urls",
            &metrics,
        ])
        .args(&self.extra_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        let mut guard = ProcessGuard::spawn(&format!("etcd:{p}"), &mut cmd)?;
        let answered = wait_for("etcd to answer /health", Duration::from_secs(20), || {
            if !guard.is_running() {
                return Some(false);
            }
            healthy(p + 2).then_some(true)
        });
        match answered {
            Ok(true) => {
                self.process = Some(guard);
                Ok(())
            }
            Ok(false) => anyhow::bail!("etcd on port {p} exited at start:\n{}", self.log_tail()),
            Err(e) => anyhow::bail!("{e}\n{}", self.log_tail()),
        }
    }
}

/// etcd's `/health` on the plain-HTTP metrics port.
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
