//! The production guide's swanctl examples (deploy/examples/strongswan/) loaded into a real
//! charon, each with secrets.conf, the way an operator installs them: every connection,
//! child and key loads, under the names the agent's example configs refer to.

use std::path::PathBuf;

use vipsec::config::Config;
use vipsec_testbed::charon::Charon;
use vipsec_testbed::netns::Netns;

fn example(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Loads one swanctl example plus the shared secrets into a fresh charon and returns
/// what `swanctl --list-conns` shows.
fn load(ns: &Netns, name: &str, file: &str) -> String {
    let conf = format!(
        "{}\n{}",
        example(&format!("strongswan/{file}")),
        example("strongswan/secrets.conf")
    );
    let charon = Charon::start(ns, name, &conf)
        .unwrap_or_else(|e| panic!("{file} with secrets.conf does not load: {e:#}"));
    let loaded = charon
        .swanctl(&["--list-conns"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let creds = charon
        .swanctl(&[
            "--load-creds",
            "--noprompt",
            "--file",
            &charon_conf_path(&charon),
        ])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        creds.contains("loaded ike secret 'ike-vipsec'"),
        "{file}: the shared key did not load:\n{creds}"
    );
    loaded
}

fn charon_conf_path(c: &Charon) -> String {
    // The testbed keeps the loaded file beside the VICI socket.
    c.vici_socket()
        .with_file_name("swanctl.conf")
        .display()
        .to_string()
}

#[test]
fn the_guides_swanctl_examples_load_into_charon_under_the_names_the_configs_use() {
    vipsec_testbed::require_root().unwrap();
    let ns = Netns::new("swex").expect("netns");

    let frontend = Config::parse(&example("frontend.toml")).expect("frontend.toml");
    let conns = load(&ns, "swex-fe", "frontend-swanctl.conf");
    for p in &frontend.peer_vips {
        let c = p.peer_connection().expect("a hand-written connection");
        assert!(
            conns.contains(&format!("{}:", c.connection)),
            "frontend.toml's connection {:?} is not loaded:\n{conns}",
            c.connection
        );
        assert!(
            conns.contains(&format!("  {}: TUNNEL", c.child)),
            "frontend.toml's child {:?} is not loaded:\n{conns}",
            c.child
        );
    }

    let backend = Config::parse(&example("backend.toml")).expect("backend.toml");
    let conns = load(&ns, "swex-be", "backend-swanctl.conf");
    for h in &backend.hosted_vips {
        assert!(
            conns.contains(&h.address.to_string()),
            "no connection of backend-swanctl.conf answers on {}:\n{conns}",
            h.address
        );
    }
}
