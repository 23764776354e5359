//! Child processes that die with their guard.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running child process, killed (SIGKILL) and reaped on drop.
pub struct ProcessGuard {
    pub name: String,
    child: Option<Child>,
}

impl ProcessGuard {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<ProcessGuard> {
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("spawn {name}: {e}"))?;
        Ok(ProcessGuard {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends a signal (e.g. libc SIGTERM = 15, SIGKILL = 9, SIGSTOP = 19, SIGCONT = 18).
    pub fn signal(&self, sig: i32) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow::anyhow!("{} already reaped", self.name))?;
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{sig} {pid} ({}) failed", self.name);
        Ok(())
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 10 ms until it returns `Some` or the deadline passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `command` (a shell command line) inside the network namespace `ns`, in a
/// private mount namespace with its own tmpfs `/run`, so daemons that keep pid files or
/// sockets there (charon, keepalived) never see another node's instance or the host's.
/// Output goes to `log`.
pub fn spawn_with_private_run(
    ns: &str,
    name: &str,
    command: &str,
    log: std::fs::File,
) -> anyhow::Result<ProcessGuard> {
    let script = format!("mount -t tmpfs tmpfs /run && exec {command}");
    ProcessGuard::spawn(
        name,
        Command::new("ip")
            .args(["netns", "exec", ns, "unshare", "-m", "sh", "-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log),
    )
}
