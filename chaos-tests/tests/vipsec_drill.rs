//! Move timelines in the lab (vipsec with etcd, real keepalived, charon, agents, probes):
//! `vipsec drill VIP --to NODE` run on the owner moves the VIP through the handover script
//! and reports all seven marks from three nodes; a crash gets a timeline too, without the
//! release nobody could record. Needs the `vipsec` binary built in the same target
//! directory (`cargo build -p vipsec`).

mod common;

use std::time::Duration;

use serde_json::Value;
use vipsec_chaos::lab::faults::Fault;
use vipsec_chaos::lab::{Lab, Role, Setup};
use vipsec_testbed::process::wait_for;

const CAP: Duration = Duration::from_secs(20);
const VIP: &str = "192.0.2.100";
const STEPS: [&str; 7] = [
    "released",
    "usable",
    "epoch-recorded",
    "initiation-queued",
    "first-ike-sa-init",
    "child-sa-installed",
    "first-traffic",
];

/// (node, offset ms) of a step in a `--json` timeline.
fn mark(t: &Value, step: &str) -> Option<(String, i64)> {
    let m = t["marks"].as_array()?.iter().find(|m| m["step"] == step)?;
    Some((m["node"].as_str()?.to_string(), m["offset_ms"].as_i64()?))
}

/// Asserts each step that is there comes no earlier than the one before it. Every pair
/// must hold: the release precedes the new owner's keepalived taking the address (the old
/// one stops only after the drain); the record is written after the address appeared, and
/// its time is taken before the store commits it, so before any front-end can learn of it
/// and initiate; a CHILD_SA follows its IKE_SA_INIT and traffic follows the CHILD_SA.
fn assert_ordered(t: &Value) {
    let present: Vec<(&str, i64)> = STEPS
        .iter()
        .filter_map(|s| mark(t, s).map(|(_, at)| (*s, at)))
        .collect();
    for w in present.windows(2) {
        assert!(
            w[0].1 <= w[1].1,
            "{} (+{} ms) after {} (+{} ms): {t:#}",
            w[0].0,
            w[0].1,
            w[1].0,
            w[1].1
        );
    }
}

fn assert_front_end_marks(lab: &Lab, t: &Value) {
    let fes = lab.names(Role::FrontEnd);
    let nodes: Vec<String> = STEPS[3..]
        .iter()
        .map(|s| mark(t, s).unwrap_or_else(|| panic!("no {s}: {t:#}")).0)
        .collect();
    assert!(
        fes.contains(&nodes[0]),
        "front-end marks from {nodes:?}: {t:#}"
    );
    assert!(
        nodes.iter().all(|n| *n == nodes[0]),
        "front-end marks from several front-ends: {nodes:?}"
    );
}

/// `vipsec events VIP --json` against a node's agent, its lines collected by a thread.
struct EventFollower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<Value>,
}

impl EventFollower {
    fn start(lab: &Lab, node: &str) -> EventFollower {
        let bin = vipsec_chaos::lab::agent::find_binary(std::path::Path::new(env!(
            "CARGO_BIN_EXE_vipsec-chaos"
        )))
        .expect("vipsec binary");
        let socket = lab.agent_socket(node).expect("agent socket");
        let mut child = std::process::Command::new(bin)
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["events", VIP, "--json"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("vipsec events");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        EventFollower { child, lines }
    }

    fn wait(&self, cap: Duration, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + cap;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(e) if want(&e) => return e,
                Ok(_) => {}
                Err(e) => panic!("no such event within {cap:?}: {e}"),
            }
        }
    }
}

impl Drop for EventFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn drill_moves_the_vip_and_reports_every_mark() {
    let _t = common::start("drill to the backup");
    let lab = common::lab(Setup::VipsecEtcd);
    let owner = lab.owner().expect("one owner");
    let to = lab
        .names(Role::BackEnd)
        .into_iter()
        .find(|n| *n != owner)
        .expect("a second back-end");

    // Not on the owner: refused with the owner's name.
    let err = lab
        .agent_cli(&to, &["drill", VIP, "--to", &owner])
        .expect_err("a drill off the owner");
    assert!(
        err.to_string()
            .contains(&format!("run the drill on {owner}, the VIP's owner")),
        "{err:#}"
    );

    // A front-end's event stream, to see the move-completed event.
    let fe = lab.names(Role::FrontEnd)[0].clone();
    let events = EventFollower::start(&lab, &fe);

    let report = lab
        .agent_json(&owner, &["drill", VIP, "--to", &to, "--timeout", "30s"])
        .unwrap_or_else(|e| panic!("drill: {e:#}"));
    eprintln!("[drill] {report:#}");
    let t = &report["timeline"];
    assert_eq!(t["complete"], true, "{report:#}");
    assert_eq!(t["from"], owner.as_str());
    assert_eq!(t["to"], to.as_str());
    assert_eq!(mark(t, "released").unwrap().0, owner);
    assert_eq!(mark(t, "usable").unwrap().0, to);
    assert_eq!(mark(t, "epoch-recorded").unwrap().0, to);
    assert_front_end_marks(&lab, t);
    assert_ordered(t);
    eprintln!(
        "[measured] drill {owner} -> {to}: recovery {} ms (target {} ms, met: {}); {}",
        t["recovery_ms"], report["target_ms"], report["met_target"], report["detail"]
    );

    let epoch = t["epoch"].as_u64().unwrap();
    let event = events.wait(Duration::from_secs(40), |e| {
        e["event"] == "move-completed" && e["epoch"] == epoch
    });
    eprintln!("[event] on {fe}: {}", event["detail"]);
    assert_eq!(event["move"]["complete"], true, "{event:#}");
    assert_eq!(event["owner"], to.as_str());

    // Any node shows the same move, e.g. a front-end.
    let table = lab.agent_cli(&fe, &["moves", VIP]).expect("vipsec moves");
    eprintln!("[timeline] vipsec moves {VIP} on {fe}:\n{table}");
    assert!(
        table.contains(&format!("epoch {epoch}: {owner} -> {to} (complete")),
        "{table}"
    );
}

#[test]
fn crash_gets_a_timeline_without_a_release() {
    let _t = common::start("crash timeline");
    let mut lab = common::lab(Setup::VipsecEtcd);
    let o = common::run(&mut lab, Fault::Crash, CAP);
    common::assert_recovered(&o, CAP);
    let fe = lab.names(Role::FrontEnd)[0].clone();
    let mut last = Value::Null;
    // The front-ends' marks reach the store within a sample or two of the first traffic.
    let t = wait_for(
        "the crash's timeline on a front-end",
        Duration::from_secs(30),
        || {
            let moves = lab.agent_json(&fe, &["moves", VIP]).ok()?;
            let t = moves
                .as_array()?
                .iter()
                .filter(|m| m["to"] == o.to.as_str())
                .max_by_key(|m| m["epoch"].as_u64())?
                .clone();
            last = t.clone();
            STEPS[1..]
                .iter()
                .all(|s| mark(&t, s).is_some())
                .then_some(t)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {last:#}"));
    eprintln!("[timeline] {t:#}");
    let table = lab.agent_cli(&fe, &["moves", VIP]).expect("vipsec moves");
    eprintln!("[timeline] vipsec moves {VIP} on {fe}:\n{table}");
    assert!(
        mark(&t, "released").is_none(),
        "a crashed node released: {t:#}"
    );
    assert_eq!(t["complete"], false);
    assert_eq!(t["from"], o.from.as_str());
    assert_eq!(mark(&t, "usable").unwrap().0, o.to);
    assert_eq!(mark(&t, "epoch-recorded").unwrap().0, o.to);
    assert_front_end_marks(&lab, &t);
    assert_ordered(&t);
    eprintln!(
        "[measured] crash {} -> {}: first mark to first traffic {} ms",
        o.from, o.to, t["recovery_ms"]
    );
}
