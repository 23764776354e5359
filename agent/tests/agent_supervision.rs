//! Supervision with the real address watcher: the agent runs in a network namespace with
//! rtnetlink, the embedded store and its API socket; the watcher is made to fail five times
//! in a row (a wrapper around the real one returns the error a lost netlink socket gives).
//! The runtime restarts it with backoff, `vipsec health` fails while it is down and names
//! it, and a VIP that arrived while nobody watched is seen once the watcher is back.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use vipsec::InputSink;
use vipsec::addrwatch::rtnetlink::NetlinkAddressWatcher;
use vipsec::addrwatch::{AddrWatchError, AddressWatcher};
use vipsec::agent::Agent;
use vipsec::config::{Config, HostedVipConfig};
use vipsec::runtime::{AgentHandle, Backends, StatusView};
use vipsec_testbed::netns::Netns;

const BIN: &str = env!("CARGO_BIN_EXE_vipsec");
const VIP: &str = "192.0.2.100";
const FAILURES: u32 = 5;

/// The real watcher, except that its first runs end at once with a netlink error.
struct FailingAtFirst {
    runs: Arc<AtomicU32>,
}

#[async_trait]
impl AddressWatcher for FailingAtFirst {
    async fn run(
        &self,
        vips: Vec<HostedVipConfig>,
        sink: InputSink,
        cancel: CancellationToken,
    ) -> Result<(), AddrWatchError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        if n < FAILURES {
            return Err(AddrWatchError::Netlink(format!(
                "address dump: Connection reset by peer (injected, run {n})"
            )));
        }
        NetlinkAddressWatcher.run(vips, sink, cancel).await
    }
}

fn health(endpoint: &str) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["--endpoint", endpoint, "health"])
        .output()
        .expect("run vipsec health");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Polls the agent's status until `f` holds, for up to 10 s.
async fn until(handle: &AgentHandle, what: &str, f: impl Fn(&StatusView) -> bool) -> StatusView {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = handle.status();
        if f(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; runtime: {:?}",
            s.runtime
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn a_failing_address_watcher_is_restarted_reported_and_catches_up() {
    vipsec_testbed::require_root().unwrap();
    let ns = Netns::new("sv").expect("netns");
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        .unwrap();
    ns.link_set("v0", true).unwrap();
    ns.link_set("v1", true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let endpoint = format!("unix://{}", socket.display());
    let config = Config::parse(&format!(
        "node = \"be1\"\n[api]\nendpoint = \"{endpoint}\"\n[store]\nbackend = \"embedded\"\n\
         [keying]\nbackend = \"none\"\n[[hosted_vip]]\naddress = \"{VIP}\"\n"
    ))
    .expect("valid config");
    let runs = Arc::new(AtomicU32::new(0));
    let path = format!("/run/netns/{}", ns.name);

    // setns changes only the calling thread: the agent gets a thread and a runtime of its
    // own inside the namespace, before any netlink socket exists.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<AgentHandle>();
    let cancel = CancellationToken::new();
    let agent_thread = std::thread::spawn({
        let (cancel, runs) = (cancel.clone(), runs.clone());
        move || -> Result<(), String> {
            let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            // SAFETY: plain syscall on a valid descriptor; affects this thread only.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .on_thread_start({
                    let path = path.clone();
                    move || {
                        // Worker threads start in the host's namespace; move them too.
                        let f = std::fs::File::open(&path).expect("netns file");
                        // SAFETY: as above.
                        unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
                    }
                })
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let mut backends = Backends::from_config(&config)
                    .await
                    .map_err(|e| e.to_string())?;
                backends.watcher = Arc::new(FailingAtFirst { runs });
                let agent = Agent::start(config, backends, None, cancel)
                    .await
                    .map_err(|e| e.to_string())?;
                ready_tx.send(agent.handle.clone()).unwrap();
                agent.wait().await.map_err(|e| e.to_string())
            })
        }
    });
    let handle = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("agent started");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // While the watcher waits for its next run, the runtime is unhealthy and says why.
        let down = until(&handle, "the watcher reported down", |s| {
            !s.runtime.healthy && s.runtime.detail.contains("addrwatch down, restarting")
        })
        .await;
        assert!(
            down.runtime.detail.contains("injected"),
            "the last error is named: {}",
            down.runtime.detail
        );
        // `vipsec health` says so too (the waits grow to 1.6 s, long enough to ask).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (ok, out) = health(&endpoint);
            if !ok && out.contains("runtime (tasks) unhealthy: addrwatch down, restarting") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "vipsec health never reported the watcher down; last: {out}"
            );
        }
        // The VIP arrives while nobody watches.
        ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "v0"])
            .unwrap();

        // Back after five restarts (100 ms doubling to 1.6 s): the fresh dump finds the VIP.
        let up = until(&handle, "the watcher back with the VIP seen", |s| {
            s.runtime.healthy && s.hosted.iter().any(|h| h.present)
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), FAILURES + 1);
        assert!(
            up.runtime
                .detail
                .contains(&format!("addrwatch restarted {FAILURES} times")),
            "{}",
            up.runtime.detail
        );
        let (ok, out) = health(&endpoint);
        assert!(ok, "vipsec health after the restarts: {out}");

        // And it watches again: the VIP leaving is seen as it happens.
        ns.ip(&["addr", "del", &format!("{VIP}/32"), "dev", "v0"])
            .unwrap();
        until(&handle, "the VIP seen leaving", |s| {
            s.hosted.iter().all(|h| !h.present)
        })
        .await;
    });

    // The status as the CLI shows it carries the runtime part.
    let out = Command::new(BIN)
        .args(["--endpoint", &endpoint, "status", "--json"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["runtime"]["kind"], "tasks", "{status}");
    assert_eq!(status["runtime"]["healthy"], true, "{status}");

    cancel.cancel();
    agent_thread
        .join()
        .expect("agent thread")
        .expect("the agent stops cleanly: no essential task failed");
}
