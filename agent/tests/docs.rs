//! The operator docs and examples against the code: every metric and event kind the agent
//! exports is documented, and the shipped strongSwan configurations agree with the agent's
//! example configs and with the connections the agent renders itself.

use std::path::{Path, PathBuf};

use vipsec::model::VipRole;
use vipsec::policy::document::Policy;
use vipsec::policy::render::{Identities, connection};
use vipsec::policy::template::Template;
use vipsec_proto::v1 as pb;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn every_metric_the_agent_exports_is_in_the_guide() {
    let guide = read("deploy/README.md");
    let documented = |name: &str| {
        guide.contains(&format!("| `{name}` |")) || guide.contains(&format!("| `{name}_total` |"))
    };
    // Every family the agent registers: a family without a series yet is not encoded, so
    // the names come from the registration calls.
    let source = read("agent/src/metrics.rs");
    let mut names = Vec::new();
    let mut lines = source.lines();
    while let Some(line) = lines.next() {
        if !line.contains("registry.register(") {
            continue;
        }
        let call = if line.contains('"') {
            line
        } else {
            lines.next().unwrap_or_default()
        };
        let name = call.split('"').nth(1).unwrap();
        names.push(format!("vipsec_{name}"));
    }
    assert!(names.len() >= 15, "{names:?}");
    for name in &names {
        assert!(
            documented(name),
            "deploy/README.md does not document the metric {name}"
        );
    }
    // Those encoded without series show how they are scraped: counters with `_total`.
    let exposition = vipsec::metrics::Metrics::new().encode();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                names.iter().any(|n| n == name),
                "{name} not found in metrics.rs"
            );
            if kind == "counter" {
                assert!(
                    guide.contains(&format!("| `{name}_total` |")),
                    "{name} is a counter: document it as {name}_total"
                );
            }
        }
    }
}

#[test]
fn every_event_kind_is_in_the_guide() {
    let guide = read("deploy/README.md");
    let mut kinds = Vec::new();
    for n in 1.. {
        let Ok(kind) = pb::EventKind::try_from(n) else {
            break;
        };
        let name = kind
            .as_str_name()
            .trim_start_matches("EVENT_KIND_")
            .to_lowercase()
            .replace('_', "-");
        kinds.push(name);
    }
    assert!(kinds.len() >= 26, "{kinds:?}");
    for kind in kinds {
        let documented = guide
            .lines()
            .any(|l| l.starts_with('|') && l.contains(&format!("`{kind}`")));
        assert!(
            documented,
            "deploy/README.md does not document the event {kind}"
        );
    }
}

fn setting<'a>(conf: &'a str, key: &str) -> Vec<&'a str> {
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.trim_start().strip_prefix('='))
        .map(str::trim)
        .collect()
}

#[test]
fn strongswan_examples_match_the_agent_configs_and_what_the_agent_renders() {
    let fe = read("deploy/examples/strongswan/frontend-swanctl.conf");
    let be = read("deploy/examples/strongswan/backend-swanctl.conf");
    let fe_toml = vipsec::config::Config::load(&repo("deploy/examples/frontend.toml")).unwrap();
    let be_toml = vipsec::config::Config::load(&repo("deploy/examples/backend.toml")).unwrap();

    // The connection and child the front-end's agent names exist, toward the VIP.
    let peer = &fe_toml.peer_vips[0];
    let conn = peer.peer_connection().unwrap();
    assert!(
        fe.contains(&format!("\n    {} {{", conn.connection)),
        "{fe}"
    );
    assert!(
        fe.contains(&format!("\n            {} {{", conn.child)),
        "{fe}"
    );
    assert_eq!(setting(&fe, "remote_addrs"), [peer.address.to_string()]);
    // The back-end answers on the hosted VIP only.
    assert_eq!(
        setting(&be, "local_addrs"),
        [be_toml.hosted_vips[0].address.to_string()]
    );
    // Every protected port is inside the tunnel's selectors.
    for flow in &peer.protect {
        let (proto, port) = flow.split_once('/').unwrap();
        let sel = format!("{}/32[{proto}/{port}]", peer.address);
        assert!(setting(&fe, "remote_ts")[0].contains(&sel), "{sel}");
        assert!(setting(&be, "local_ts")[0].contains(&sel), "{sel}");
    }

    // What failover relies on (deploy/README.md section 1).
    for conf in [&fe, &be] {
        assert_eq!(setting(conf, "mobike"), ["no"]);
        assert_eq!(setting(conf, "encap"), ["yes"]);
    }
    assert_eq!(setting(&fe, "start_action"), ["trap|start"]);
    assert_eq!(setting(&fe, "close_action"), ["trap"]);
    assert_eq!(setting(&fe, "dpd_action"), ["trap"]);

    // keyingtries and DPD as the agent renders them for its own connections.
    let policy = Policy::from_template("mail", Template::Mail);
    let spec = connection(
        &policy,
        peer.address,
        VipRole::Peer,
        &Identities::psk("fe1.example"),
    )
    .unwrap();
    let rendered = serde_json::to_value(&spec).unwrap();
    let rendered = rendered.as_object().unwrap().values().next().unwrap();
    assert_eq!(
        setting(&fe, "keyingtries"),
        [rendered["keyingtries"].to_string()]
    );
    assert_eq!(
        setting(&fe, "dpd_delay"),
        [format!("{}s", rendered["dpd_delay"])]
    );
    let guide = read("deploy/README.md");
    assert!(guide.contains(&format!(
        "| `keyingtries` | `{}` |",
        rendered["keyingtries"]
    )));
    assert!(guide.contains(&format!("| `dpd_delay` | `{}s` |", rendered["dpd_delay"])));

    // The identities the connections use have the key in secrets.conf.
    let secrets = read("deploy/examples/strongswan/secrets.conf");
    for id in setting(&fe, "id").into_iter().chain(setting(&be, "id")) {
        if id != "%any" {
            assert!(secrets.contains(&format!("= {id}")), "no secret for {id}");
        }
    }
}

#[test]
fn strongswan_conf_examples_load_what_each_esp_mode_needs() {
    let libipsec = read("deploy/examples/strongswan/strongswan-libipsec.conf");
    let esp = read("deploy/examples/strongswan/strongswan-kernel-esp.conf");
    // charon reads one setting per line; braces must balance.
    for conf in [&libipsec, &esp] {
        let code: String = conf
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert_eq!(code.matches('{').count(), code.matches('}').count());
    }
    assert_eq!(setting(&libipsec, "load"), ["yes"]);
    assert_eq!(setting(&libipsec, "fwmark"), ["0x42", "!0x42"]);
    assert_eq!(setting(&libipsec, "allow_peer_ts"), ["yes"]);
    assert_eq!(setting(&esp, "load"), ["no"]);
    // Every renegotiation storm is paid in DH work: exponents sized to the group's strength.
    for conf in [&libipsec, &esp] {
        assert_eq!(setting(conf, "dh_exponent_ansi_x9_42"), ["no"]);
    }
    // The agent's VICI socket is where the examples put charon's.
    for conf in [&libipsec, &esp] {
        assert_eq!(setting(conf, "socket"), ["unix:///var/run/charon.vici"]);
    }
    let fe = vipsec::config::Config::load(&repo("deploy/examples/frontend.toml")).unwrap();
    assert_eq!(fe.keying.vici_socket, Path::new("/var/run/charon.vici"));
}

#[test]
fn the_production_guide_builds_the_store_the_examples_expect() {
    let guide = read("docs/production.md");
    for example in ["backend.toml", "frontend.toml"] {
        let c = vipsec::config::Config::load(&repo("deploy/examples").join(example)).unwrap();
        // Every member the agent is pointed at is one the guide sets up, with TLS.
        for ep in &c.store.endpoints {
            let host = ep.trim_start_matches("https://");
            assert!(ep.starts_with("https://"), "{example}: {ep}");
            assert!(
                guide.contains(host),
                "{example}: {ep} is not in docs/production.md"
            );
        }
        // The certificate files the agent reads are the ones the guide makes.
        for file in [&c.store.tls_ca, &c.store.tls_cert, &c.store.tls_key] {
            let name = file
                .as_ref()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap();
            assert!(
                guide.contains(name),
                "{example}: {name} is not in docs/production.md"
            );
        }
    }
}

#[test]
fn every_global_option_and_environment_variable_is_in_the_readme() {
    use clap::CommandFactory;
    let readme = read("README.md");
    let cmd = vipsec::cli::Cli::command();
    let mut seen = 0;
    for arg in cmd.get_arguments().filter(|a| a.is_global_set()) {
        let long = format!("--{}", arg.get_long().unwrap());
        assert!(readme.contains(&long), "README.md does not mention {long}");
        if let Some(env) = arg.get_env() {
            let env = env.to_str().unwrap();
            assert!(readme.contains(env), "README.md does not mention {env}");
            seen += 1;
        }
    }
    assert!(seen >= 4, "only {seen} environment variables");
}

/// The README's layout names files and folders by indentation: top level from the
/// repository, two spaces in from `agent/src/`, four from the folder above. Each must exist,
/// and every folder of `agent/src/` must be named, so the map never sends a newcomer to a
/// place that moved.
#[test]
fn the_readme_layout_matches_the_tree() {
    let readme = read("README.md");
    let block = readme
        .split("## Layout")
        .nth(1)
        .and_then(|s| s.split("```").nth(1))
        .expect("a Layout section with a code block");
    let mut parent = String::new();
    let mut named = Vec::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let indent = line.len() - line.trim_start().len();
        let base = match indent {
            0 => String::new(),
            2 => "agent/src/".to_string(),
            4 => parent.clone(),
            _ => continue,
        };
        // A line may name several files before a colon ("a.rs b.rs: what they hold").
        let head = line.trim_start().split(':').next().unwrap_or_default();
        let names: Vec<&str> = head
            .split_whitespace()
            .take_while(|t| t.ends_with('/') || t.ends_with(".rs"))
            .collect();
        for name in names {
            let path = format!("{base}{name}");
            assert!(
                repo(&path).exists(),
                "README's layout names {path}, which does not exist"
            );
            if indent == 2 && name.ends_with('/') {
                parent = path.clone();
            }
            named.push(path);
        }
    }
    for entry in std::fs::read_dir(repo("agent/src")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            let path = format!("agent/src/{}/", entry.file_name().to_string_lossy());
            assert!(
                named.contains(&path),
                "README's layout does not name {path}"
            );
        }
    }
}
