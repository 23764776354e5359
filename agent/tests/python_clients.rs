//! The API through the official Python gRPC client (`grpcio`, installed by
//! tools/install-deps into /opt/vipsec-tools), against real agents: one on its Unix socket
//! with no channel option (the socket path as :authority), one on TCP with TLS and client
//! certificates. The checks themselves are in `tests/python/grpc_clients.py`; this test
//! starts the agents, generates the stubs from the proto file with `grpcio-tools`, and
//! runs the example client under deploy/examples/python.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::AgentProc;
use vipsec_testbed::pki::TestPki;
use vipsec_testbed::process::wait_for;

const PYTHON: &str = "/opt/vipsec-tools/bin/python";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn generate_stubs(out: &Path) {
    let status = Command::new(PYTHON)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo().join("proto"))
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg("vipsec/v1/agent.proto")
        .status()
        .unwrap_or_else(|e| panic!("{PYTHON}: {e}; run tools/install-deps"));
    assert!(status.success(), "grpc_tools.protoc failed");
}

/// The address the agent bound for `tcp://127.0.0.1:0`, from its log.
fn tcp_port(agent: &AgentProc) -> u16 {
    wait_for(
        "the TLS listener in the log",
        Duration::from_secs(10),
        || {
            let log = agent.log_text();
            let at = log.find("API listening on TCP with TLS")?;
            let line = log[at..].lines().next()?;
            let addr = line.split("127.0.0.1:").nth(1)?;
            addr.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()))
}

#[test]
fn the_official_python_client_works_over_the_unix_socket_and_tls() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[store]\nbackend = \"embedded\"\n[[hosted_vip]]\naddress = \"192.0.2.100\"\n";
    let unix = AgentProc::start(None, dir.path(), "solo", base);

    let pki = TestPki::generate().unwrap();
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir(&tls_dir).unwrap();
    // The second agent serves TCP with TLS beside its Unix socket (written here: AgentProc
    // writes only the socket).
    let config = tls_dir.join("tls.toml");
    let tls_socket = tls_dir.join("run").join("tls.sock");
    std::fs::write(
        &config,
        common::config_text(
            "tls",
            &tls_socket,
            &format!(
                "tcp = \"tcp://127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n{base}",
                pki.server_cert().display(),
                pki.server_key().display(),
                pki.ca().display()
            ),
        ),
    )
    .unwrap();
    let tls = AgentProc::start_config(None, "tls", &config, &tls_socket, &[("RUST_LOG", "info")]);
    let port = tcp_port(&tls);
    // The Unix socket is served as well: the node's own tools keep working.
    let local = tls.cli(&["status", "--json"]);
    assert!(
        local.status.success(),
        "vipsec status on the TLS agent's socket: {}",
        String::from_utf8_lossy(&local.stderr)
    );

    let stubs = dir.path().join("stubs");
    std::fs::create_dir(&stubs).unwrap();
    generate_stubs(&stubs);

    let out = Command::new(PYTHON)
        .arg(repo().join("agent/tests/python/grpc_clients.py"))
        .arg("--socket")
        .arg(&unix.socket)
        .arg("--tcp")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ca")
        .arg(pki.ca())
        .arg("--cert")
        .arg(pki.client_cert())
        .arg("--key")
        .arg(pki.client_key())
        .arg("--vipsec")
        .arg(common::BIN)
        .arg("--example")
        .arg(repo().join("deploy/examples/python/watch_moves.py"))
        .arg("--stubs")
        .arg(&stubs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("python grpc client: all"),
        "python client checks failed:\n{stdout}\n{stderr}\n--- unix agent ---\n{}\n--- tls agent ---\n{}",
        unix.log_text(),
        tls.log_text()
    );
    eprintln!("{}", stdout.trim());
}
