//! Running the real `vipsec` binary in tests: an agent process (optionally inside a
//! network namespace) and CLI calls against its socket.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use vipsec::model::{IkeSaInfo, TrafficCounters};
use vipsec_testbed::agent::AgentLaunch;
use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::{ProcessGuard, wait_for};

pub const BIN: &str = env!("CARGO_BIN_EXE_vipsec");

/// A program's output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A finished command's exit code, stdout and stderr, for an assertion's message.
pub fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// The traffic of all `sas`, added up.
pub fn total(sas: &[IkeSaInfo]) -> TrafficCounters {
    sas.iter()
        .map(|s| s.counters())
        .fold(TrafficCounters::default(), |a, c| TrafficCounters {
            bytes_in: a.bytes_in + c.bytes_in,
            bytes_out: a.bytes_out + c.bytes_out,
            packets_in: a.packets_in + c.packets_in,
            packets_out: a.packets_out + c.packets_out,
        })
}

/// An agent config: `node = name`, the API on `socket`, then `body` (the other sections).
pub fn config_text(name: &str, socket: &Path, body: &str) -> String {
    format!(
        "node = \"{name}\"\n[api]\nendpoint = \"unix://{}\"\n{body}",
        socket.display()
    )
}

/// A `vipsec agent` process with its config, log and API socket in `dir`.
pub struct AgentProc {
    pub name: String,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub proc: ProcessGuard,
}

impl AgentProc {
    /// Starts `vipsec agent` with `node = name`, the API socket in `dir` and `body` as the
    /// rest of the config; inside `ns` when given. Waits for the API socket.
    pub fn start(ns: Option<&Netns>, dir: &Path, name: &str, body: &str) -> AgentProc {
        let socket = dir.join(format!("{name}.sock"));
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, config_text(name, &socket, body)).unwrap();
        Self::start_config(ns, name, &config, &socket, &[])
    }

    /// Starts `vipsec agent` with a config file already written, whose API socket is
    /// `socket`, with `env` set; its log goes beside the config (`NAME.log`).
    pub fn start_config(
        ns: Option<&Netns>,
        name: &str,
        config: &Path,
        socket: &Path,
        env: &[(&str, &str)],
    ) -> AgentProc {
        let log = config.with_file_name(format!("{name}.log"));
        let proc = AgentLaunch {
            name,
            binary: Path::new(BIN),
            ns,
            config,
            socket,
            log: &log,
            env,
        }
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
        AgentProc {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            log,
            proc,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `--endpoint` that reaches this agent.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--endpoint")
            .arg(self.endpoint())
            .args(args)
            .output()
            .unwrap()
    }

    /// `vipsec status --json`, or None if the agent does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self.cli(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Polls `status` until `f` holds; panics with the agent's log on timeout.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(what, timeout, || self.status().filter(|s| f(s))).unwrap_or_else(|e| {
            panic!(
                "{}: {e}\n--- {} log ---\n{}",
                self.name,
                self.name,
                self.log_text()
            )
        })
    }
}

/// An agent alone in a network namespace of its own, so the host's addresses never matter:
/// `node = "solo"`, its files in a temp dir of its own. Fields drop in order: the agent
/// before its namespace.
pub struct SoloAgent {
    pub agent: AgentProc,
    pub ns: Netns,
    pub dir: tempfile::TempDir,
}

impl SoloAgent {
    /// Starts it with `body(dir)` as the config after `[api]` (given the agent's directory).
    pub fn start(tag: &str, body: impl FnOnce(&Path) -> String) -> SoloAgent {
        let dir = tempfile::tempdir().unwrap();
        let ns = Netns::new(tag).unwrap();
        let agent = AgentProc::start(Some(&ns), dir.path(), "solo", &body(dir.path()));
        SoloAgent { agent, ns, dir }
    }
}

impl std::ops::Deref for SoloAgent {
    type Target = AgentProc;
    fn deref(&self) -> &AgentProc {
        &self.agent
    }
}

impl std::ops::DerefMut for SoloAgent {
    fn deref_mut(&mut self) -> &mut AgentProc {
        &mut self.agent
    }
}

/// A plain HTTP GET on loopback (the metrics endpoint); the whole answer, headers too.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}
