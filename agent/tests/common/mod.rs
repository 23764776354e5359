//! Running the real `vipsec` binary in tests: an agent process (optionally inside a
//! network namespace) and CLI calls against its socket.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::{ProcessGuard, wait_for};

pub const BIN: &str = env!("CARGO_BIN_EXE_vipsec");

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
        let log = dir.join(format!("{name}.log"));
        let text = format!(
            "node = \"{name}\"\n[api]\nendpoint = \"unix://{}\"\n{body}",
            socket.display()
        );
        std::fs::write(&config, text).unwrap();
        let mut cmd = match ns {
            Some(ns) => ns.command(BIN),
            None => Command::new(BIN),
        };
        cmd.args(["agent", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let proc = ProcessGuard::spawn(name, &mut cmd).unwrap();
        let agent = AgentProc {
            name: name.to_string(),
            socket,
            log,
            proc,
        };
        wait_for("the agent's API socket", Duration::from_secs(10), || {
            agent.socket.exists().then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
        agent
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
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
