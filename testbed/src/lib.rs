//! Real parts for tests: network namespaces joined by veth or a bridge, processes that are
//! killed when their guard drops, and (in their own modules) charon, etcd and the agent.
//!
//! Everything is named uniquely per run and torn down by Drop guards, so a failed or
//! crashed test never breaks the next one.

pub mod agent;
pub mod charon;
pub mod etcd;
pub mod etcd_cluster;
pub mod netns;
pub mod pki;
pub mod process;
pub mod systemd_vm;
pub mod vm;

/// The one rule for tests that need root or a program: they call [`require_root`] and
/// [`require_program`] (network namespaces, charon, etcd and the VM tier here do it for
/// them) and fail with a message naming what is missing; none skips silently.
///
/// `Err` unless this process runs as root: network namespaces, XFRM policies, routing
/// rules and mounts all need it.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    anyhow::ensure!(
        uid == 0,
        "this test needs root (network namespaces, XFRM, mounts) and runs as uid {uid}; \
         run it as root, as .ci/run does"
    );
    Ok(())
}

/// The path of `name`; `Err` naming it when it is not installed.
pub fn require_program(name: &str) -> anyhow::Result<std::path::PathBuf> {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/bin",
        "/usr/local/sbin",
        "/usr/lib/ipsec",
    ] {
        let p = std::path::Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    anyhow::bail!("{name} is not installed; run .ci/run (or apt-get install the packages it lists)")
}
