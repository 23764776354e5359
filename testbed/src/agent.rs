//! A `vipsec agent` process: started with a config file (inside a network namespace or
//! not), ready once its API socket appears. The agent's tests and the chaos lab both start
//! their agents here; each writes its own config.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::netns::Netns;
use crate::process::{ProcessGuard, wait_for};

/// How long an agent may take to open its API socket. Generous: the VM tier runs the agent
/// under software emulation, on a machine that may be busy with other tests.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How an agent is started.
pub struct AgentLaunch<'a> {
    /// Names the agent in messages (its node, usually).
    pub name: &'a str,
    /// The `vipsec` binary.
    pub binary: &'a Path,
    /// The network namespace it runs in; the host's when None.
    pub ns: Option<&'a Netns>,
    /// Its config file, already written.
    pub config: &'a Path,
    /// The API socket the config names; a stale one is removed first.
    pub socket: &'a Path,
    /// Its stdout and stderr are appended here.
    pub log: &'a Path,
    /// Extra environment variables.
    pub env: &'a [(&'a str, &'a str)],
}

impl AgentLaunch<'_> {
    /// Runs `vipsec agent --config FILE` and waits for its API socket. `Err` when the agent
    /// exits first or the socket does not appear in [`START_TIMEOUT`], with the end of its
    /// log.
    pub fn spawn(&self) -> anyhow::Result<ProcessGuard> {
        let _ = std::fs::remove_file(self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.log.display()))?;
        let mut cmd = match self.ns {
            Some(ns) => ns.command(&self.binary.display().to_string()),
            None => Command::new(self.binary),
        };
        cmd.arg("agent")
            .arg("--config")
            .arg(self.config)
            .envs(self.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut guard = ProcessGuard::spawn(&format!("vipsec agent {}", self.name), &mut cmd)?;
        let ready = wait_for(
            &format!("agent {}'s API socket", self.name),
            START_TIMEOUT,
            || {
                if self.socket.exists() {
                    Some(true)
                } else if !guard.is_running() {
                    Some(false)
                } else {
                    None
                }
            },
        );
        let why = match ready {
            Ok(true) => return Ok(guard),
            Ok(false) => format!(
                "it exited{}",
                guard
                    .wait_exit(Duration::from_millis(100))
                    .map(|c| format!(" with code {c}"))
                    .unwrap_or_default()
            ),
            Err(e) => e.to_string(),
        };
        anyhow::bail!(
            "vipsec agent {} ({}) did not come up: {why}\n--- end of {} ---\n{}",
            self.name,
            self.binary.display(),
            self.log.display(),
            log_tail(self.log, 30)
        )
    }
}

/// The last `lines` lines of a log file (empty when it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}
