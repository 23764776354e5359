//! The `vipsec` binary end to end: the daemon with the embedded store, and every client
//! subcommand against it over its Unix socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use vipsec_testbed::process::wait_for;

mod common;
use common::{AgentProc, BIN, SoloAgent, http_get};

/// The config after `[api]`: the embedded store and one hosted VIP, then `extra`.
fn body(extra: &str) -> String {
    format!(
        r#"[store]
backend = "embedded"
[failover]
mode = "normal"
[[hosted_vip]]
address = "192.0.2.100"
{extra}"#
    )
}

fn write_config(dir: &Path, socket: &Path, extra: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(&path, common::config_text("solo", socket, &body(extra))).unwrap();
    path
}

fn start_agent() -> SoloAgent {
    start_agent_with("")
}

fn start_agent_with(extra: &str) -> SoloAgent {
    SoloAgent::start("cli", |_| body(extra))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn status_json_reports_the_node_and_its_vips_over_a_root_only_socket() {
    let agent = start_agent();
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "API socket must be root-only");
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["node"], "solo");
    assert_eq!(v["mode"], "normal");
    assert_eq!(v["store"]["kind"], "embedded");
    assert_eq!(v["hosted_vips"][0]["address"], "192.0.2.100");
    assert_eq!(v["hosted_vips"][0]["present_locally"], false);

    let table = agent.cli(&["status"]);
    assert!(table.status.success());
    assert!(stdout(&table).contains("HOSTED VIP"), "{}", stdout(&table));
}

#[test]
fn mode_and_log_level_change_at_run_time_and_events_stream_them() {
    let agent = start_agent();
    let events = Command::new(BIN)
        .arg("--endpoint")
        .arg(agent.endpoint())
        .args(["events", "--json", "--count", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = agent.cli(&["mode", "fast", "--idle-timeout", "2s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "mode fast (idle timeout 2s)");

    let out = agent.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["mode"], "fast");
    assert_eq!(v["idle_timeout_ms"], 2000.0);

    let out = agent.cli(&["log-level", "debug,h2=info"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = agent.cli(&["log-level", "not a [filter"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid log filter"),
        "{}",
        stderr(&out)
    );

    let collected = std::thread::spawn(move || {
        let out = events.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    // The watcher may have subscribed after the first change: keep producing changes until
    // it has seen two, rather than guessing a delay.
    let mut n = 0;
    while !collected.is_finished() {
        let m = if n % 2 == 0 { "normal" } else { "fast" };
        assert!(agent.cli(&["mode", m]).status.success());
        n += 1;
        assert!(n < 500, "events never arrived");
    }
    let lines = collected.join().unwrap();
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(first["event"], "mode-changed");
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn bad_requests_exit_2_and_a_missing_agent_exits_1() {
    let agent = start_agent();
    let out = agent.cli(&["drain", "not-an-ip"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not-an-ip"), "{}", stderr(&out));
    let out = agent.cli(&["drain", "192.0.2.77"]);
    assert_eq!(out.status.code(), Some(2), "unknown VIP is a usage error");
    // Several at once: each failure is named, none is lost.
    let out = agent.cli(&["drain", "192.0.2.77", "not-an-ip"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("2 of 2 VIPs not drained")
            && stderr(&out).contains("192.0.2.77:")
            && stderr(&out).contains("not-an-ip:"),
        "{}",
        stderr(&out)
    );
    // A hundred at once on one fresh connection, above the API's 64 streams a
    // connection: every one is answered (here: not hosted), none is refused by HTTP/2.
    let many: Vec<String> = (0..100).map(|i| format!("198.51.100.{i}")).collect();
    let mut args = vec!["drain"];
    args.extend(many.iter().map(String::as_str));
    let out = agent.cli(&args);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("100 of 100 VIPs not drained") && !stderr(&out).contains("h2"),
        "{}",
        stderr(&out)
    );
    let out = agent.cli(&["drain"]);
    assert_eq!(out.status.code(), Some(2), "drain without a VIP");
    let out = agent.cli(&["mode", "fast", "--idle-timeout", "10ms"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("shorter than two counter samples"),
        "{}",
        stderr(&out)
    );
    let out = agent.cli(&["mode", "sideways"]);
    assert_eq!(out.status.code(), Some(2));

    let out = Command::new(BIN)
        .args(["--endpoint", "unix:///nonexistent/agent.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one-line reason: {err}");
    assert!(err.contains("is it running?"), "{err}");
}

#[test]
fn metrics_endpoint_counts_failover_events() {
    // The agent has a namespace of its own: any port is free there.
    let port = 9641;
    let agent = start_agent_with(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    assert!(agent.cli(&["mode", "fast"]).status.success());
    let body = wait_for("the metrics endpoint", Duration::from_secs(10), || {
        agent
            .ns
            .run_in(move || http_get(port, "/metrics"))
            .unwrap()
            .filter(|b| b.contains("vipsec_events_total{kind=\"mode-changed\"} 1"))
    })
    .unwrap();
    assert!(body.contains("vipsec_keying_up 1"), "{body}");
    assert!(body.contains("vipsec_store_healthy 1"), "{body}");
    assert!(
        body.contains("vipsec_vip_present{vip=\"192.0.2.100\"} 0"),
        "{body}"
    );
}

#[test]
fn health_reports_healthy_parts_with_exit_0() {
    let agent = start_agent();
    // The API answers before every part has reported for the first time (the embedded
    // store says "connecting" for a moment, seen in CI): poll until the parts are up.
    let out = wait_for("the agent healthy", Duration::from_secs(10), || {
        let out = agent.cli(&["health"]);
        (out.status.code() == Some(0)).then_some(out)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", stderr(&agent.cli(&["health"]))));
    assert_eq!(stdout(&out).trim(), "healthy");
    let out = Command::new(BIN)
        .args(["--endpoint", "unix:///nonexistent/agent.sock", "health"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn drain_of_a_hosted_vip_succeeds() {
    let agent = start_agent();
    let out = agent.cli(&["drain", "192.0.2.100"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("drained 192.0.2.100"));
}

#[test]
fn config_check_names_the_file_the_key_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "node = \"x\"\n[failover]\nidle_timeout = \"fast\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    assert!(text.contains("bad.toml: failover.idle_timeout:"), "{text}");

    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        "node = \"x\"\n[store]\nbackend = \"embedded\"\nleas_ttl = \"2s\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).contains("store.leas_ttl"), "{}", stdout(&out));

    // The daemon refuses the same file with the same reason and exit code 2.
    let out = Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("store.leas_ttl"), "{}", stderr(&out));

    for example in ["backend.toml", "frontend.toml", "single-node.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/examples")
            .join(example);
        let out = Command::new(BIN)
            .args(["config", "check"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{example}: {}", stdout(&out));
    }
}

#[test]
fn sigterm_stops_the_agent_cleanly_and_removes_its_socket() {
    let mut agent = start_agent();
    agent.proc.signal(15).unwrap();
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!agent.socket.exists());
}

#[test]
fn a_second_agent_on_the_same_socket_is_refused() {
    let agent = start_agent();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &agent.socket, "");
    let out = Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already listening"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_api_socket_directory_others_can_write_or_a_link_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A shared directory anyone can write (sticky, like /tmp): another user could swap
    // the socket.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    // A link to a good directory: refused too, the real path must be named.
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    for (sock_dir, says) in [(&open, "mode 1777"), (&link, "symbolic link")] {
        let config = write_config(dir.path(), &sock_dir.join("agent.sock"), "");
        let out = Command::new(BIN)
            .args(["agent", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
        assert!(!sock_dir.join("agent.sock").exists());
    }
    // A directory the agent creates is its own and closed: 0700.
    let fresh = dir.path().join("fresh/run");
    let agent_dir = tempfile::tempdir().unwrap();
    let config = write_config(agent_dir.path(), &fresh.join("agent.sock"), "");
    let mut agent = AgentProc::start_config(None, "solo", &config, &fresh.join("agent.sock"), &[]);
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{mode:o}");
    agent.proc.kill();

    // The agent's own directory left open (a Kubernetes emptyDir is 0777): closed to
    // others, and the agent starts.
    let pod = dir.path().join("pod");
    std::fs::create_dir(&pod).unwrap();
    std::fs::set_permissions(&pod, std::fs::Permissions::from_mode(0o777)).unwrap();
    let config = write_config(agent_dir.path(), &pod.join("agent.sock"), "");
    let mut agent = AgentProc::start_config(None, "solo", &config, &pod.join("agent.sock"), &[]);
    let mode = std::fs::metadata(&pod).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "{mode:o}");
    agent.proc.kill();
}

/// Under systemd (`Type=notify`) `systemctl start vipsec` returns at READY=1: the first
/// `vipsec status` after it must say how the store and the keying daemon are, not that
/// they are still being asked. The store here is an etcd endpoint that accepts the
/// connection and never answers, so its first report (unhealthy) takes its request
/// timeout.
#[test]
fn readiness_waits_for_the_first_reports_of_the_store_and_the_keying_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let ns = vipsec_testbed::netns::Netns::new("ready").unwrap();
    let silent = ns
        .run_in(|| std::net::TcpListener::bind("127.0.0.1:2379"))
        .unwrap()
        .unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let socket = dir.path().join("solo.sock");
    let config = dir.path().join("solo.toml");
    let body = r#"[store]
backend = "etcd"
endpoints = ["http://127.0.0.1:2379"]
request_timeout = "1s"
[[peer_vip]]
address = "192.0.2.100"
connection = "vip100"
"#;
    std::fs::write(&config, common::config_text("solo", &socket, body)).unwrap();
    let notify_env = notify_path.to_str().unwrap();
    let agent = AgentProc::start_config(
        Some(&ns),
        "solo",
        &config,
        &socket,
        &[("NOTIFY_SOCKET", notify_env)],
    );
    let mut buf = [0u8; 512];
    loop {
        let n = notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no READY=1 from the agent: {e}"));
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            break;
        }
    }
    let out = agent.cli(&["status", "--json"]);
    let s: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert_eq!(s["store"]["healthy"], false, "{s:#}");
    for part in ["store", "keying"] {
        assert_ne!(s[part]["detail"], "connecting", "{part}: {s:#}");
    }
    drop(silent);
}
