//! The cluster-wide policy in the lab (real etcd, charon, keepalived, agents; charon starts
//! with no connection): a change rolls out to every node without a restart, a weak or
//! newer document never reaches charon, and a newer vipsec's document is never overwritten.
//! Needs the `vipsec` binary built in the same target directory (`cargo build -p vipsec`).

mod common;

use std::time::Duration;

use serde_json::Value;
use vipsec_chaos::lab::agent::find_binary;
use vipsec_chaos::lab::etcd::CLIENT_PORT;
use vipsec_chaos::lab::{Lab, Role, Setup};
use vipsec_testbed::process::wait_for;

const CAP: Duration = Duration::from_secs(30);
const CONN: &str = "vipsec-lab-192-0-2-100";

fn policy_of(lab: &Lab, node: &str) -> Value {
    let s = lab
        .agent_json(node, &["policy", "show"])
        .unwrap_or_else(|e| panic!("policy show on {node}: {e:#}"));
    s["vips"][0].clone()
}

/// The remote traffic selectors fe1's charon has loaded for the VIP's connection.
fn loaded_remote_ts(lab: &Lab, node: &str) -> String {
    let out = lab.swanctl(node, &["--list-conns"]).unwrap_or_default();
    out.lines()
        .skip_while(|l| !l.starts_with(CONN))
        .find(|l| l.contains("remote:") && l.contains("192.0.2.100/32"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `vipsec policy apply` of `text` on `node`: the exit code and what it printed.
fn apply(lab: &Lab, node: &str, name: &str, text: &str) -> (Option<i32>, String) {
    let file = lab.run_dir().join(format!("{name}.toml"));
    std::fs::write(&file, text).unwrap();
    let bin = find_binary(std::path::Path::new(env!("CARGO_BIN_EXE_vipsec-chaos"))).unwrap();
    let socket = lab.agent_socket(node).expect("an agent");
    let out = std::process::Command::new(bin)
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(["policy", "apply"])
        .arg(&file)
        .output()
        .expect("vipsec");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Writes a document straight into etcd, as another tool (or a newer vipsec) would.
fn etcd_put(lab: &Lab, key: &str, value: &str) {
    let node = lab.topo.node("etcd");
    let endpoint = format!("http://{}:{CLIENT_PORT}", node.addr);
    let out = node
        .ns
        .command("etcdctl")
        .args(["--endpoints", &endpoint, "put", key, value])
        .output()
        .expect("etcdctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_stored_policy_rolls_out_without_restart_and_bad_or_newer_documents_never_reach_charon() {
    let _t = common::start("cluster-wide policy");
    let lab = common::lab(Setup::VipsecPolicy);
    let nodes: Vec<String> = lab
        .names(Role::FrontEnd)
        .into_iter()
        .chain(lab.names(Role::BackEnd))
        .collect();
    for n in &nodes {
        let p = policy_of(&lab, n);
        assert_eq!(p["state"], "applied", "{n}: {p}");
        assert_eq!(p["policy"], "lab");
        assert!(
            p["source"]
                .as_str()
                .unwrap()
                .contains("/vipsec-lab/policies/lab")
        );
    }
    let v1 = policy_of(&lab, "fe1")["version"].as_u64().unwrap();
    let before = loaded_remote_ts(&lab, "fe1");
    // swanctl names the ports by service: http (80), pop3 (110), imap2 (143).
    assert!(before.contains("tcp/http"), "template mail: {before}");

    // A weak DH group is refused before it is stored, with the field and the floor.
    let weak = "name = \"lab\"\nvips = [\"192.0.2.100\"]\ntemplate = \"mail\"\n\
                ike-proposals = [\"aes128-sha256-modp1024\"]\n";
    let (code, err) = apply(&lab, "fe1", "weak", weak);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("modp1024") && err.contains("2048"), "{err}");
    assert_eq!(policy_of(&lab, "fe1")["version"].as_u64(), Some(v1));

    // A change on one node reaches every node's charon, agents untouched.
    let creds = "name = \"lab\"\nvips = [\"192.0.2.100\"]\ntemplate = \"mail-credentials\"\n\
                 nat-traversal = \"client\"\n\
                 frontend-networks = [\"192.0.2.0/24\", \"198.51.100.0/24\"]\n";
    let t = std::time::Instant::now();
    let (code, out) = apply(&lab, "be2", "creds", creds);
    assert_eq!(code, Some(0), "{out}");
    for n in &nodes {
        wait_for(&format!("{n} on the new version"), CAP, || {
            let p = policy_of(&lab, n);
            (p["version"].as_u64() > Some(v1) && p["state"] == "applied").then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let after = wait_for("fe1's charon with the new selectors", CAP, || {
        let ts = loaded_remote_ts(&lab, "fe1");
        (!ts.contains("tcp/http") && ts.contains("tcp/pop3")).then_some(ts)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "[measured] policy change on be2 reached every node and fe1's charon in {:?}: {after}",
        t.elapsed()
    );
    // The SA was rebuilt on the new policy: it carries only the template's ports.
    wait_for(
        "fe1's SA rebuilt with only tcp/110 and tcp/143",
        CAP,
        || {
            let sas = lab.swanctl("fe1", &["--list-sas"]).ok()?;
            let installed = sas.contains("INSTALLED");
            (installed && !sas.contains("/32[tcp/80]") && !sas.contains("[tcp/http]")).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // A newer vipsec's document (a field this version does not know) is shown read-only,
    // never applied, and never overwritten.
    let v2 = policy_of(&lab, "fe1")["version"].as_u64().unwrap();
    let newer =
        r#"{"name":"lab","vips":["192.0.2.100"],"template":"all","post-quantum":"ml-kem-768"}"#;
    etcd_put(&lab, "/vipsec-lab/policies/lab", newer);
    let shown = wait_for("the newer document seen", CAP, || {
        let s = lab.agent_json("fe1", &["policy", "show"]).ok()?;
        (s["vips"][0]["state"] == "not-understood").then_some(s)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(shown["vips"][0]["version"].as_u64(), Some(v2), "{shown}");
    assert_eq!(shown["documents"][0]["read_only"], true, "{shown}");
    assert_eq!(shown["documents"][0]["unknown_fields"][0], "post-quantum");
    let (code, err) = apply(&lab, "fe2", "again", creds);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("newer vipsec"), "{err}");
    assert_eq!(
        loaded_remote_ts(&lab, "fe1"),
        after,
        "a not-understood policy reached charon"
    );

    // A weak document written around the CLI is refused by every node; charon keeps v2.
    etcd_put(
        &lab,
        "/vipsec-lab/policies/lab",
        r#"{"name":"lab","vips":["192.0.2.100"],"template":"all","ike-proposals":["aes128-sha1-modp1024"]}"#,
    );
    for n in &nodes {
        wait_for(&format!("{n} refusing the weak document"), CAP, || {
            let p = policy_of(&lab, n);
            (p["state"] == "invalid").then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        loaded_remote_ts(&lab, "fe1"),
        after,
        "a weak policy reached charon"
    );
    let p = policy_of(&lab, "be1");
    assert_eq!(p["version"].as_u64(), Some(v2), "{p}");
    assert!(p["detail"].as_str().unwrap().contains("modp1024"), "{p}");
}
