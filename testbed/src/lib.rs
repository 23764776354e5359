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
pub mod vm;

/// Whether this process may create network namespaces (root with CAP_NET_ADMIN).
pub fn can_use_netns() -> bool {
    match netns::Netns::new("probe") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("cannot create a network namespace: {e}");
            false
        }
    }
}

/// Fails the test with a clear message when a required program is missing.
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
