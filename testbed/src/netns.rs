//! Network namespaces and veth links, removed on drop.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `vt-<tag>-<pid>-<n>`, at most 15 characters
/// when `tag` is short, so it also fits interface names.
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() % 100_000;
    format!("vt-{tag}-{pid:x}{n:x}")
}

/// Deletes leftover namespaces whose name starts with `prefix` (from crashed runs).
pub fn cleanup_prefix(prefix: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split_whitespace().next()
                && name.starts_with(prefix)
            {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
        }
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().map_err(|e| anyhow::anyhow!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A network namespace, deleted (with its interfaces) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `Err` naming what is missing when this process is not root or has no `ip`.
    pub fn new(tag: &str) -> anyhow::Result<Netns> {
        crate::require_root()?;
        crate::require_program("ip")?;
        let name = unique_name(tag);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = run(Command::new("ip").args(["-n", &self.name]).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a shell command inside the namespace and returns its stdout.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        let out = run(self.command("sh").args(["-c", script]))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Joins two namespaces with a veth pair, `a_if` in self with `a_addr` (CIDR), `b_if`
    /// in `other` with `b_addr`.
    pub fn veth_to(
        &self,
        a_if: &str,
        a_addr: &str,
        other: &Netns,
        b_if: &str,
        b_addr: &str,
    ) -> anyhow::Result<()> {
        let tmp_a = unique_name("va");
        let tmp_b = unique_name("vb");
        run(Command::new("ip").args([
            "link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b,
        ]))?;
        run(Command::new("ip").args(["link", "set", &tmp_a, "netns", &self.name, "name", a_if]))?;
        run(Command::new("ip").args(["link", "set", &tmp_b, "netns", &other.name, "name", b_if]))?;
        self.ip(&["addr", "add", a_addr, "dev", a_if])?;
        other.ip(&["addr", "add", b_addr, "dev", b_if])?;
        self.ip(&["link", "set", a_if, "up"])?;
        other.ip(&["link", "set", b_if, "up"])?;
        Ok(())
    }

    /// Runs `f` on a new thread that has joined this namespace (setns), and returns what
    /// it returns. Sockets `f` opens (netlink included) live in the namespace, and keep
    /// living there when handed back; processes it spawns start inside it.
    pub fn run_in<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let ns = std::fs::File::open(&path).map_err(|e| anyhow::anyhow!("open {path}: {e}"))?;
        let thread = std::thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || {
                use std::os::fd::AsRawFd;
                // SAFETY: setns on an open namespace file; it only changes this thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(anyhow::anyhow!(
                        "setns {path}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                drop(ns);
                Ok(f())
            })?;
        match thread.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    pub fn link_set(&self, ifname: &str, up: bool) -> anyhow::Result<()> {
        self.ip(&["link", "set", ifname, if up { "up" } else { "down" }])
            .map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill whatever still runs inside, then remove the namespace.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
