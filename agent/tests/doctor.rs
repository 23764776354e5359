//! `vipsec doctor` end to end: the real binary in a fresh network namespace (so only the
//! namespace's own nftables ruleset counts), against a real nftables ruleset, a real
//! charon and a real etcd.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use vipsec_testbed::charon::{Charon, TunnelConf};
use vipsec_testbed::etcd::EtcdServer;
use vipsec_testbed::netns::Netns;

const BIN: &str = env!("CARGO_BIN_EXE_vipsec");

fn lab(tag: &str) -> Netns {
    vipsec_testbed::require_root().unwrap();
    vipsec_testbed::require_program("nft").unwrap();
    Netns::new(tag).expect("netns")
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(&path, format!("node = \"doc\"\n{body}")).unwrap();
    path
}

/// What one doctor run said.
struct Run {
    code: Option<i32>,
    report: Value,
    stderr: String,
}

impl Run {
    fn finding(&self, check: &str) -> &Value {
        self.report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == check)
            .unwrap_or_else(|| panic!("no finding {check} in {:#}", self.report))
    }

    fn severity(&self, check: &str) -> &str {
        self.finding(check)["severity"].as_str().unwrap()
    }

    fn summary(&self, check: &str) -> &str {
        self.finding(check)["summary"].as_str().unwrap()
    }
}

/// Runs `vipsec doctor --json` (inside `ns` when given) and parses its report.
fn doctor(ns: Option<&Netns>, config: &Path) -> Run {
    let mut cmd = match ns {
        Some(ns) => ns.command(BIN),
        None => Command::new(BIN),
    };
    let started = Instant::now();
    let out = cmd
        .args(["doctor", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    eprintln!("vipsec doctor took {:?}", started.elapsed());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}):\n{stdout}"));
    Run {
        code: out.status.code(),
        report,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const QUIET_NODE: &str = "[store]\nbackend = \"embedded\"\n";

#[test]
fn a_natt_drop_in_the_firewall_is_an_error_naming_the_rule_and_its_removal_clears_it() {
    let ns = lab("doc");
    ns.sh("nft add table inet f && nft add chain inet f input '{ type filter hook input priority 0; policy accept; }' && nft add rule inet f input udp dport 4500 counter drop")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), QUIET_NODE);

    let run = doctor(Some(&ns), &config);
    assert_eq!(run.code, Some(1), "{:#}\n{}", run.report, run.stderr);
    assert_eq!(run.report["result"], "error");
    assert_eq!(run.severity("firewall.nat-t"), "error");
    let natt = run.summary("firewall.nat-t");
    assert!(
        natt.contains("table inet f chain input handle") && natt.contains("udp dport 4500"),
        "{natt}"
    );
    let remedy = run.finding("firewall.nat-t")["remedy"].as_str().unwrap();
    assert!(
        remedy.starts_with("nft insert rule inet f input position"),
        "{remedy}"
    );
    assert_eq!(run.severity("firewall.ike"), "ok");
    assert_eq!(run.severity("firewall.esp"), "ok");
    // One entry per check, each with a severity and a summary.
    let findings = run.report["findings"].as_array().unwrap();
    let mut checks: Vec<&str> = findings
        .iter()
        .map(|f| f["check"].as_str().unwrap())
        .collect();
    let n = checks.len();
    checks.sort();
    checks.dedup();
    assert_eq!(checks.len(), n, "a check reported twice: {checks:?}");
    for c in [
        "config",
        "keying.daemon",
        "store",
        "consistency.vips",
        "consistency.interfaces",
        "consistency.fail_secure",
        "consistency.routes",
        "kernel.esp",
        "firewall.ike",
        "firewall.nat-t",
        "firewall.esp",
    ] {
        assert!(checks.contains(&c), "{c} missing from {checks:?}");
    }

    // The operator applies the remedy: NAT-T passes, nothing breaks failover any more.
    ns.sh(remedy).unwrap();
    let run = doctor(Some(&ns), &config);
    assert_eq!(run.severity("firewall.nat-t"), "ok", "{:#}", run.report);
    assert_eq!(run.code, Some(0), "{:#}\n{}", run.report, run.stderr);

    // The table form names the check too.
    let out = ns
        .command(BIN)
        .args(["doctor", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("firewall.nat-t"), "{text}");
}

#[test]
fn an_unloadable_config_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[store]\nbackend = \"zookeeper\"\n");
    let out = Command::new(BIN)
        .args(["doctor", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store.backend"), "{err}");
    let out = Command::new(BIN)
        .args(["doctor", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_missing_vici_socket_is_an_error_naming_the_path() {
    let ns = lab("doc");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nosuch.vici");
    let config = write_config(
        dir.path(),
        &format!(
            "{QUIET_NODE}[keying]\nbackend = \"strongswan\"\nvici_socket = \"{}\"\n",
            socket.display()
        ),
    );
    let run = doctor(Some(&ns), &config);
    assert_eq!(run.code, Some(1));
    assert_eq!(run.severity("keying.daemon"), "error");
    assert!(
        run.summary("keying.daemon")
            .contains(&socket.display().to_string()),
        "{}",
        run.summary("keying.daemon")
    );
}

#[test]
fn a_running_charon_answers_and_a_connection_it_lacks_is_named() {
    let ns = lab("doc");
    let tunnel = TunnelConf {
        name: "vip",
        local: "192.0.2.1",
        remote: "192.0.2.100",
        psk: "doctor-test-psk",
        start_action: "none",
    };
    let charon = Charon::start(&ns, "doc", &tunnel.render()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "{QUIET_NODE}[keying]\nbackend = \"strongswan\"\nvici_socket = \"{}\"\n\
             [[peer_vip]]\naddress = \"192.0.2.100\"\nconnection = \"vip\"\n\
             [[peer_vip]]\naddress = \"192.0.2.101\"\nconnection = \"nosuch\"\n",
            charon.vici_socket().display()
        ),
    );
    let run = doctor(Some(&ns), &config);
    eprintln!("{:#}", run.report);
    assert_eq!(run.severity("keying.daemon"), "ok");
    let daemon = run.summary("keying.daemon");
    assert!(
        daemon.contains("charon") && daemon.contains("5."),
        "{daemon}"
    );
    assert_eq!(run.severity("keying.connection[192.0.2.100]"), "ok");
    assert_eq!(run.severity("keying.connection[192.0.2.101]"), "error");
    assert!(
        run.summary("keying.connection[192.0.2.101]")
            .contains("\"nosuch\"")
    );
    assert_eq!(run.severity("keying.plugins"), "ok");
    // The testbed's charon loads kernel-libipsec, which is what this ESP-less kernel needs.
    assert_eq!(run.severity("kernel.esp"), "ok");
    assert_eq!(run.code, Some(1));
}

#[test]
fn a_store_endpoint_that_refuses_connections_is_an_error() {
    let ns = lab("doc");
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens inside a fresh namespace.
    let config = write_config(
        dir.path(),
        "[store]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n",
    );
    let run = doctor(Some(&ns), &config);
    assert_eq!(run.code, Some(1));
    assert_eq!(run.severity("store"), "error");
    assert!(run.summary("store").contains("127.0.0.1:2379"));
}

#[test]
fn a_real_etcd_answers_and_an_unreadable_record_is_named() {
    let etcd = EtcdServer::start().unwrap();
    let prefix = format!("/doctor-{}/", std::process::id());
    let bad_key = format!("{prefix}vips/not-an-address");
    let good_key = format!("{prefix}vips/192.0.2.100");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        c.put(bad_key.clone(), "garbage", None).await.unwrap();
        c.put(
            good_key,
            r#"{"node":"be1","epoch":1,"taken_at_ms":0}"#,
            None,
        )
        .await
        .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"{}\"]\nprefix = \"{prefix}\"\n",
            etcd.endpoint()
        ),
    );
    // etcd listens on the host's loopback, so this run is in the host namespace; only the
    // store findings are looked at (the host's own firewall is not this test's business).
    let run = doctor(None, &config);
    assert_eq!(run.severity("store"), "ok", "{:#}", run.report);
    let store = run.summary("store");
    assert!(store.contains("1 owner record"), "{store}");
    eprintln!("store finding: {store}");
    assert_eq!(run.severity("store.records"), "warning");
    assert!(run.summary("store.records").contains(&bad_key));
}

#[test]
fn etcd_over_tls_is_reached_with_the_configured_certificates_only() {
    let pki = vipsec_testbed::pki::TestPki::generate().expect("test certificates");
    let etcd = EtcdServer::start_tls(&pki).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = |tls: &str| {
        format!(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"{}\"]\nprefix = \"/doctor-tls/\"\n{tls}\n",
            etcd.endpoint()
        )
    };
    let with_cert = format!(
        "tls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
        pki.ca().display(),
        pki.client_cert().display(),
        pki.client_key().display()
    );
    let run = doctor(None, &write_config(dir.path(), &store(&with_cert)));
    assert_eq!(run.severity("store"), "ok", "{:#}", run.report);
    assert!(run.summary("store").contains("0 owner record"));

    // The server demands a client certificate.
    let ca_only = format!("tls_ca = \"{}\"", pki.ca().display());
    let run = doctor(None, &write_config(dir.path(), &store(&ca_only)));
    assert_eq!(run.severity("store"), "error", "{:#}", run.report);
    eprintln!("TLS without a client certificate: {}", run.summary("store"));

    // A certificate file that is not there is named.
    let missing = "tls_ca = \"/nonexistent/ca.pem\"";
    let run = doctor(None, &write_config(dir.path(), &store(missing)));
    assert_eq!(run.severity("store"), "error");
    assert!(run.summary("store").contains("/nonexistent/ca.pem"));
}

/// A namespace named `vgc-<tag>-...` (apart from the chaos labs'), deleted on drop.
fn vgc_netns(tag: &str) -> Netns {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "vgc-{tag}-{:x}{:x}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let out = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .unwrap();
    assert!(out.status.success(), "ip netns add {name}");
    let ns = Netns { name };
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns
}

#[test]
fn a_peer_vip_without_a_trap_is_a_warning_under_the_guard_and_an_error_without_it() {
    vipsec_testbed::require_root().unwrap();
    let fe = vgc_netns("dt");
    let peer = vgc_netns("dp");
    fe.veth_to("eth0", "192.0.2.1/24", &peer, "eth0", "192.0.2.2/24")
        .unwrap();
    // One connection per peer VIP: a trap for .100, none for .101 (guarded) and .102 (not).
    let conf: String = [
        ("trapped", "192.0.2.100", "trap"),
        ("guarded", "192.0.2.101", "none"),
        ("bare", "192.0.2.102", "none"),
    ]
    .iter()
    .map(|(name, remote, start_action)| {
        TunnelConf {
            name,
            local: "192.0.2.1",
            remote,
            psk: "doctor-trap-test-psk",
            start_action,
        }
        .render()
    })
    .collect();
    let charon = Charon::start(&fe, "doctrap", &conf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "{QUIET_NODE}[keying]\nbackend = \"strongswan\"\nvici_socket = \"{}\"\n\
             [kernel]\nbackend = \"xfrm\"\ninterface = \"eth0\"\n\
             [[peer_vip]]\naddress = \"192.0.2.100\"\nconnection = \"trapped\"\nprotect = [\"tcp/143\"]\n\
             [[peer_vip]]\naddress = \"192.0.2.101\"\nconnection = \"guarded\"\nprotect = [\"tcp/143\"]\n\
             [[peer_vip]]\naddress = \"192.0.2.102\"\nconnection = \"bare\"\n",
            charon.vici_socket().display()
        ),
    );

    let run = doctor(Some(&fe), &config);
    eprintln!("{:#}", run.report);
    assert_eq!(run.severity("keying.trap[192.0.2.100]"), "ok");
    assert!(
        run.summary("keying.trap[192.0.2.100]")
            .contains("trapped/trapped")
    );
    assert_eq!(run.severity("keying.trap[192.0.2.101]"), "warning");
    assert!(
        run.summary("keying.trap[192.0.2.101]")
            .contains("no trap: between SAs traffic is refused by the guard"),
        "{}",
        run.summary("keying.trap[192.0.2.101]")
    );
    assert_eq!(run.severity("keying.trap[192.0.2.102]"), "error");
    assert!(
        run.summary("keying.trap[192.0.2.102]")
            .contains("clear text")
    );
    // Nobody has put the guard in yet: the doctor says so, per VIP.
    assert_eq!(run.severity("kernel.guard[192.0.2.101]"), "warning");
    assert!(run.summary("kernel.guard[192.0.2.101]").contains("0 of 1"));
    assert_eq!(run.severity("kernel.guard[192.0.2.102]"), "ok");
    assert_eq!(run.code, Some(1));

    // The boot unit's command puts it in: the guard findings turn ok, the trap verdicts
    // stay (a guard refuses what a trap would have queued).
    let out = fe
        .command(BIN)
        .args(["guard", "install", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = doctor(Some(&fe), &config);
    for vip in ["192.0.2.100", "192.0.2.101"] {
        let check = format!("kernel.guard[{vip}]");
        assert_eq!(run.severity(&check), "ok", "{:#}", run.report);
        assert!(
            run.summary(&check).contains("1 of 1"),
            "{}",
            run.summary(&check)
        );
    }
    assert_eq!(run.severity("keying.trap[192.0.2.101]"), "warning");
    assert!(
        !run.summary("keying.trap[192.0.2.101]").contains("once"),
        "{}",
        run.summary("keying.trap[192.0.2.101]")
    );
    assert_eq!(run.severity("keying.trap[192.0.2.102]"), "error");
}
