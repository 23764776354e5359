//! Running a closure inside a named network namespace on a short-lived thread (setns only
//! moves the calling thread), so the lab can reach servers that only listen inside a node.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// Runs `f` on a fresh thread that has joined the network namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<T> {
        let file = std::fs::File::open(&path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
        // SAFETY: setns on a valid namespace fd; it only affects this thread, which exits
        // when `f` returns.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        anyhow::ensure!(rc == 0, "setns {path}: {}", std::io::Error::last_os_error());
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

/// Whether a TCP connection to `addr` succeeds from inside `ns` within 200 ms.
pub fn tcp_reachable(ns: &str, addr: std::net::SocketAddr) -> bool {
    in_netns(ns, move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
    .unwrap_or(false)
}

/// Starts `command` (a shell command line) inside `ns` with a private tmpfs `/run`; see
/// [`vipsec_testbed::process::spawn_with_private_run`].
pub fn spawn_with_private_run(
    ns: &vipsec_testbed::netns::Netns,
    name: &str,
    command: &str,
    log: std::fs::File,
) -> anyhow::Result<vipsec_testbed::process::ProcessGuard> {
    vipsec_testbed::process::spawn_with_private_run(&ns.name, name, command, log)
}
