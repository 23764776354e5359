//! The lab's etcd server, alone in its own node so front-ends and back-ends reach it over
//! the lab network like a real cluster store.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::{ProcessGuard, wait_for};

pub const CLIENT_PORT: u16 = 2379;

pub struct Etcd {
    guard: ProcessGuard,
    pub endpoint: String,
}

impl Etcd {
    pub fn start(ns: &Netns, addr: IpAddr, dir: &Path) -> anyhow::Result<Etcd> {
        let program = vipsec_testbed::require_program("etcd")?;
        std::fs::create_dir_all(dir)?;
        let client = format!("http://{}", SocketAddr::from((addr, CLIENT_PORT)));
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let guard = ProcessGuard::spawn(
            "etcd",
            ns.command(&program.display().to_string())
                .args(["--name", "lab"])
                .arg("--data-dir")
                .arg(dir.join("data"))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
                .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
                .args(["--initial-cluster", "lab=http://127.0.0.1:2380"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        let sock = SocketAddr::from((addr, CLIENT_PORT));
        wait_for("etcd's client port", Duration::from_secs(20), || {
            crate::nsexec::tcp_reachable(&ns.name, sock).then_some(())
        })?;
        Ok(Etcd {
            guard,
            endpoint: client,
        })
    }
}

impl Etcd {
    /// SIGSTOP: etcd stops answering but keeps its sockets open, as when the store's machine
    /// hangs; clients see timeouts, not refused connections.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.guard.signal(libc::SIGSTOP)
    }

    /// SIGCONT after [`Etcd::freeze`].
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.guard.signal(libc::SIGCONT)
    }
}
