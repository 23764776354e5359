//! Tests of the file as a whole: parsing, defaults, every problem reported at once. Each
//! section's own checks are tested next to them.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::model::Mode;

pub(super) const FRONTEND: &str = r#"
node = "fe1"
[failover]
mode = "fast"
idle_timeout = "1500ms"
[kernel]
backend = "xfrm"
interface = "eth0"
[[peer_vip]]
address = "192.0.2.100"
connection = "vip100"
protect = ["tcp/143", "tcp/110", "tcp/80"]
"#;

#[test]
fn parses_humantime_durations_and_defaults() {
    let c = Config::parse(FRONTEND).unwrap();
    assert_eq!(c.failover.idle_timeout, Duration::from_millis(1500));
    assert_eq!(c.failover.mode, Mode::Fast);
    assert_eq!(c.store.lease_ttl, Duration::from_secs(2));
    assert_eq!(c.keying.sample_interval, Duration::from_millis(250));
    assert_eq!(c.api.endpoint, DEFAULT_API_ENDPOINT);
    assert_eq!(c.peer_vips[0].peer_connection().unwrap().child, "vip100");
    assert_eq!(c.protected_flows().len(), 3);
}

#[test]
fn unknown_key_is_rejected_with_its_path() {
    let text = FRONTEND.replace("mode = \"fast\"", "mode = \"fast\"\nidle_timout = \"2s\"");
    let problems = Config::parse(&text).unwrap_err();
    assert_eq!(problems[0].key, "failover.idle_timout");
    assert!(problems[0].reason.contains("idle_timout"), "{problems:?}");
}

#[test]
fn all_semantic_problems_are_reported_at_once() {
    let text = r#"
node = ""
[api]
endpoint = "tcp://0.0.0.0:7443"
[store]
prefix = "vipsec"
[[peer_vip]]
address = "192.0.2.100"
connection = "vip100"
protect = ["tcp/0", "sctp/5"]
"#;
    let problems = Config::parse(text).unwrap_err();
    let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "node",
            "api.endpoint",
            "store.prefix",
            "kernel.backend",
            "peer_vip[0].protect[0]",
            "peer_vip[0].protect[1]"
        ]
    );
}

#[test]
fn example_configs_are_valid() {
    for name in ["backend.toml", "frontend.toml", "single-node.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/examples")
            .join(name);
        Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn ipv6_vips_parse_with_interfaces_flows_and_endpoints() {
    let text = r#"
node = "be1"
[api]
tcp = "tcp://[2001:db8:1::1]:7443"
tls_cert = "/etc/vipsec/cert.pem"
tls_key = "/etc/vipsec/key.pem"
[store]
backend = "etcd"
endpoints = ["http://[2001:db8:1::2]:2379", "https://user@[2001:db8:1::3]:2379"]
allow_insecure = true
[kernel]
backend = "xfrm"
interface = "eth0"
[[hosted_vip]]
address = "2001:db8:1::100"
interface = "eth0"
protect = ["tcp/143"]
[[peer_vip]]
address = "2001:db8:2::100"
connection = "vip6"
protect = ["tcp/143", "any"]
"#;
    let c = Config::parse(text).unwrap();
    let v6: IpAddr = "2001:db8:1::100".parse().unwrap();
    assert_eq!(c.hosted_addresses(), vec![v6]);
    assert_eq!(c.hosted_vips[0].interface.as_deref(), Some("eth0"));
    let flows: Vec<String> = c.protected_flows().iter().map(|f| f.to_string()).collect();
    assert_eq!(
        flows,
        [
            "[2001:db8:2::100]:tcp/143",
            "[2001:db8:2::100]:any",
            "from [2001:db8:1::100]:tcp/143"
        ]
    );
    assert_eq!(
        ApiEndpoint::parse("tcp://[2001:db8:1::1]:7443"),
        Ok(ApiEndpoint::Tcp("[2001:db8:1::1]:7443".into()))
    );
}
