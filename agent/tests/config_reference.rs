//! The generated references against the checked-in ones, and the commands that produce
//! them, run as the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_vipsec");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn vipsec(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn checked_in_config_reference_is_what_the_code_generates() {
    let out = vipsec(&["config", "reference"]);
    assert!(out.status.success(), "{out:?}");
    let generated = stdout(&out);
    let path = repo("docs/config-reference.md");
    let checked_in = std::fs::read_to_string(&path).unwrap();
    if generated != checked_in {
        let first = generated
            .lines()
            .zip(checked_in.lines())
            .position(|(a, b)| a != b)
            .map_or("(one is longer)".to_string(), |i| format!("line {}", i + 1));
        panic!(
            "{} differs from `vipsec config reference` at {first}: regenerate it with\n  \
             cargo run -p vipsec -- config reference > docs/config-reference.md",
            path.display()
        );
    }
    // Every key of the code is in it.
    for key in vipsec::config_reference::documented_key_names() {
        assert!(
            checked_in.contains(&format!("| `{key}` |")),
            "{key} missing"
        );
    }
}

#[test]
fn the_operator_guide_points_to_the_generated_reference() {
    let guide = std::fs::read_to_string(repo("deploy/README.md")).unwrap();
    assert!(guide.contains("docs/config-reference.md"));
    // The hand-written table is gone: no key row of its own that could drift.
    assert!(!guide.contains("| `keying.initiate_timeout` |"));
}

#[test]
fn config_show_effective_prints_every_key_of_the_examples() {
    for name in ["backend.toml", "frontend.toml", "single-node.toml"] {
        let file = repo("deploy/examples").join(name);
        let out = vipsec(&[
            "config",
            "show",
            "--effective",
            file.to_str().unwrap(),
            "--json",
        ]);
        assert!(out.status.success(), "{name}: {out:?}");
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let keys: Vec<&str> = rows.iter().map(|r| r["key"].as_str().unwrap()).collect();
        for k in [
            "node",
            "store.lease_ttl",
            "failover.reconnect.jitter",
            "drill.target",
        ] {
            assert!(keys.contains(&k), "{name}: {k} missing from {keys:?}");
        }
        let changed = vipsec(&["config", "show", file.to_str().unwrap(), "--json"]);
        let changed: Vec<serde_json::Value> = serde_json::from_slice(&changed.stdout).unwrap();
        assert!(
            changed.len() < rows.len() && changed.iter().all(|r| r["is_default"] == false),
            "{name}: without --effective only changed keys"
        );
    }
    let out = vipsec(&[
        "config",
        "show",
        "--effective",
        repo("deploy/examples/frontend.toml").to_str().unwrap(),
    ]);
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("peer_vip[0].priority"))
        .unwrap_or_else(|| panic!("no priority line in\n{text}"));
    assert!(line.contains("80") && line.contains("50"), "{line}");
    // An invalid file has no effective values: exit 2 with the problem.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "node = \"fe1\"\nnode_typo = 1\n").unwrap();
    let out = vipsec(&["config", "show", "--effective", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node_typo"));
}

#[test]
fn man_pages_and_completions_are_generated_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man");
    let out = vipsec(&["generate", "man", man.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let page = std::fs::read_to_string(man.join("vipsec.1")).unwrap();
    for needle in ["VIPSEC_ENDPOINT", "VIPSEC_TLS_CERT", "tls\\-key", "doctor"] {
        assert!(page.contains(needle), "vipsec.1 lacks {needle}");
    }
    let check = std::fs::read_to_string(man.join("vipsec-config-show.1")).unwrap();
    assert!(check.contains("effective"));
    // The hidden packaging command documents nothing.
    assert!(!man.join("vipsec-generate.1").exists());

    let comp = dir.path().join("completions");
    let out = vipsec(&["generate", "completions", comp.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    for (file, needle) in [
        ("vipsec.bash", "complete -F"),
        ("_vipsec", "#compdef vipsec"),
        ("vipsec.fish", "complete -c vipsec"),
    ] {
        let text = std::fs::read_to_string(comp.join(file)).unwrap();
        assert!(text.contains(needle), "{file} lacks {needle}");
        assert!(text.contains("doctor"), "{file} lacks the doctor command");
    }
}
