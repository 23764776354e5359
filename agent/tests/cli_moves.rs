//! `vipsec moves` and `vipsec drill` against a real agent (embedded store) in a network
//! namespace of its own: the VIP appearing there is recorded as a move with the new owner's
//! marks, and malformed or impossible requests are refused with the right exit code.

use std::time::Duration;

use vipsec_testbed::process::wait_for;

mod common;
use common::{SoloAgent, text};

const VIP: &str = "192.0.2.100";

fn start_agent() -> SoloAgent {
    start_agent_with(|_| String::new())
}

/// An agent whose config ends with `extra(dir)` (given the agent's own directory).
fn start_agent_with(extra: impl Fn(&std::path::Path) -> String) -> SoloAgent {
    SoloAgent::start("moves", |dir| {
        format!(
            "[store]\nbackend = \"embedded\"\n[[hosted_vip]]\naddress = \"{VIP}\"\n{}",
            extra(dir)
        )
    })
}

#[test]
fn a_vip_taken_here_is_listed_as_a_move_with_the_new_owners_marks() {
    let agent = start_agent();
    let out = agent.cli(&["moves", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "[]");

    agent
        .ns
        .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
        .unwrap();
    let moves = wait_for("the move in vipsec moves", Duration::from_secs(10), || {
        let out = agent.cli(&["moves", VIP, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v.as_array()?.len() == 1 && v[0]["marks"].as_array()?.len() == 2).then_some(v)
    })
    .unwrap();
    let m = &moves[0];
    assert_eq!(m["epoch"], 1);
    assert_eq!(m["to"], "solo");
    assert_eq!(m["complete"], false);
    let steps: Vec<&str> = m["marks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["usable", "epoch-recorded"]);
    assert!(m["marks"][1]["offset_ms"].as_i64().unwrap() >= 0);

    let table = agent.cli(&["moves"]);
    let table = text(&table.stdout);
    eprintln!("{table}");
    assert!(
        table.contains("192.0.2.100 epoch 1: (none) -> solo (incomplete)"),
        "{table}"
    );
    assert!(table.contains("epoch-recorded"), "{table}");
}

#[test]
fn bad_drill_and_moves_requests_are_refused() {
    let agent = start_agent();
    for (args, code, says) in [
        (
            vec!["moves", "not-an-ip"],
            2,
            "is not an IPv4 or IPv6 address",
        ),
        (
            vec!["drill", "not-an-ip", "--to", "be2"],
            2,
            "is not an IPv4",
        ),
        (
            vec!["drill", VIP, "--to", " "],
            2,
            "to_node must name a node",
        ),
        (vec!["drill", VIP, "--to", "solo"], 2, "is this node"),
        (
            vec!["drill", VIP, "--to", "be2;reboot"],
            2,
            "is not a node name",
        ),
        (vec!["drill", VIP, "--to", "%any"], 2, "is not a node name"),
        (
            vec!["drill", VIP, "--to", "be2", "--timeout", "0s"],
            2,
            "timeout must be above zero",
        ),
        (
            vec!["drill", "192.0.2.7", "--to", "be2"],
            2,
            "not a VIP this node",
        ),
        (
            vec!["drill", VIP, "--to", "be2"],
            1,
            "no drill integration configured",
        ),
    ] {
        let out = agent.cli(&args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(says),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_second_drill_is_refused_while_one_runs() {
    let agent = start_agent_with(|dir| {
        format!(
            "[drill]\nintegration = \"command\"\ncommand = [\"sh\", \"-c\", \"touch {}/started; sleep 3\"]\n",
            dir.display()
        )
    });
    let marker = agent.dir.path().join("started");
    std::thread::scope(|s| {
        let first = s.spawn(|| agent.cli(&["drill", VIP, "--to", "be2", "--timeout", "5s"]));
        wait_for("the first drill's command", Duration::from_secs(10), || {
            marker.exists().then_some(())
        })
        .unwrap();
        let second = agent.cli(&["drill", VIP, "--to", "be2", "--timeout", "5s"]);
        assert_ne!(second.status.code(), Some(0));
        assert!(
            text(&second.stderr).contains("a drill is already running"),
            "{}",
            text(&second.stderr)
        );
        // The first one ends (its move never comes: judged, not refused).
        let first = first.join().unwrap();
        assert!(
            !text(&first.stderr).contains("already running"),
            "{}",
            text(&first.stderr)
        );
    });
    // Once it is over, the next drill is accepted again (and runs its command).
    std::fs::remove_file(&marker).unwrap();
    let again = agent.cli(&["drill", VIP, "--to", "be2", "--timeout", "4s"]);
    assert!(
        !text(&again.stderr).contains("already running"),
        "{}",
        text(&again.stderr)
    );
    assert!(marker.exists(), "the second drill ran its command");
}
