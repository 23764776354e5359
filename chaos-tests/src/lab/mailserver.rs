//! A mail-like server for the back-ends: it listens on the protected ports and greets each
//! connection with one line naming the node, so a probe knows which back-end answered.
//! It runs as `vipsec-chaos serve-mail` inside the node's namespace.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::{ProcessGuard, wait_for};

/// The greeting; probes read the node name from `node=`.
pub fn greeting(node: &str, port: u16) -> String {
    format!("* OK node={node} port={port} vipsec-lab ready\r\n")
}

/// The node name in a greeting, if it is one.
pub fn node_of(greeting: &str) -> Option<&str> {
    greeting
        .split_whitespace()
        .find_map(|w| w.strip_prefix("node="))
}

/// Serves until killed, on `bind` (0.0.0.0 in an IPv4 lab, :: in an IPv6 one).
pub async fn serve(node: String, ports: Vec<u16>, bind: IpAddr) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for port in ports {
        let listener = TcpListener::bind(SocketAddr::from((bind, port))).await?;
        let node = node.clone();
        tasks.spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    continue;
                };
                let line = greeting(&node, port);
                tokio::spawn(async move {
                    let _ = conn.write_all(line.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Starts the server in `ns` and waits until it accepts on every port.
pub fn start(
    self_exe: &Path,
    ns: &Netns,
    node: &str,
    ports: &[u16],
    bind: IpAddr,
    log: &Path,
) -> anyhow::Result<ProcessGuard> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let port_list = ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let guard = ProcessGuard::spawn(
        "serve-mail",
        ns.command(&self_exe.display().to_string())
            .args(["serve-mail", "--node", node, "--ports", &port_list])
            .args(["--bind", &bind.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log),
    )?;
    for &port in ports {
        let loopback = match bind {
            IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        let addr = SocketAddr::from((loopback, port));
        wait_for("the mail server", Duration::from_secs(10), || {
            crate::nsexec::tcp_reachable(&ns.name, addr).then_some(())
        })?;
    }
    Ok(guard)
}

#[cfg(test)]
mod tests {
    #[test]
    fn greeting_names_the_node() {
        assert_eq!(super::node_of(&super::greeting("be2", 143)), Some("be2"));
        assert_eq!(super::node_of("garbage"), None);
    }
}
