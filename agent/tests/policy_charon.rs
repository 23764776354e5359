//! The cluster policy rendered and loaded into two real charons over VICI (no hand-written
//! connections: their swanctl.conf is empty), then checked against what charon builds.
//!
//! Lab: a front-end namespace (192.0.2.1) and a back-end (192.0.2.2) holding the VIP
//! 192.0.2.100, joined by a veth, one charon each with kernel-libipsec.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use vipsec::config::Config;
use vipsec::keying::Keying;
use vipsec::keying::strongswan::StrongswanKeying;
use vipsec::model::{TrafficCounters, Vip, VipRole};
use vipsec::policy::{self, Identities, Policy, SecretKey, Template};
use vipsec_testbed::charon::Charon;
use vipsec_testbed::netns::Netns;
use vipsec_testbed::pki::TestPki;

mod common;
use common::total;

const FE: &str = "192.0.2.1";
const BE: &str = "192.0.2.2";
const VIP: &str = "192.0.2.100";
const HANG: Duration = Duration::from_secs(15);

struct Lab {
    // Charons first: they must die before their namespaces go.
    fe_charon: Charon,
    _be_charon: Charon,
    fe: Netns,
    be: Netns,
    fe_keying: StrongswanKeying,
    be_keying: StrongswanKeying,
}

fn vip() -> Vip {
    VIP.parse().unwrap()
}

fn keying(socket: &Path, vip_section: &str) -> StrongswanKeying {
    let config = Config::parse(&format!(
        "node = \"n\"\n[keying]\nbackend = \"strongswan\"\nvici_socket = \"{}\"\n{vip_section}",
        socket.display()
    ))
    .expect("valid agent config");
    StrongswanKeying::new(&config)
}

fn lab() -> Lab {
    lab_with(Charon::start)
}

/// `start` starts each node's charon (`Charon::start` or a variant with fewer plugins).
fn lab_with(start: fn(&Netns, &str, &str) -> anyhow::Result<Charon>) -> Lab {
    vipsec_testbed::require_root().unwrap();
    let fe = Netns::new("pfe").unwrap();
    let be = Netns::new("pbe").unwrap();
    fe.veth_to(
        "eth0",
        &format!("{FE}/24"),
        &be,
        "eth0",
        &format!("{BE}/24"),
    )
    .unwrap();
    be.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "eth0"])
        .unwrap();
    // No connections and no secrets: everything comes from the policy over VICI.
    let empty = "connections {\n}\n";
    let be_charon = start(&be, "be", empty).unwrap();
    let fe_charon = start(&fe, "fe", empty).unwrap();
    let conn = policy::connection_names(&Policy::from_template("x", Template::All), vip()).0;
    let fe_keying = keying(
        &fe_charon.vici_socket(),
        &format!("[[peer_vip]]\naddress = \"{VIP}\"\nconnection = \"{conn}\"\n"),
    );
    let be_keying = keying(
        &be_charon.vici_socket(),
        &format!("[[hosted_vip]]\naddress = \"{VIP}\"\n"),
    );
    Lab {
        fe_charon,
        _be_charon: be_charon,
        fe,
        be,
        fe_keying,
        be_keying,
    }
}

fn fe_ids() -> Identities {
    Identities {
        local_addr: Some(FE.parse().unwrap()),
        ..Identities::psk(FE)
    }
}

fn be_ids() -> Identities {
    Identities::psk("be.vipsec.test")
}

/// Renders `policy` for both sides and loads it; returns the front-end's load time.
async fn load_both(lab: &Lab, policy: &Policy) -> Duration {
    load_both_as(lab, policy, &fe_ids(), &be_ids()).await
}

async fn load_both_as(lab: &Lab, policy: &Policy, fe: &Identities, be: &Identities) -> Duration {
    let be_spec = policy::connection(policy, vip(), VipRole::Hosted, be).unwrap();
    let fe_spec = policy::connection(policy, vip(), VipRole::Peer, fe).unwrap();
    lab.be_keying.load_connection(&be_spec).await.unwrap();
    let started = Instant::now();
    lab.fe_keying.load_connection(&fe_spec).await.unwrap();
    started.elapsed()
}

/// The front-end's SA counters once the last packets of earlier exchanges (a closing
/// connection's FIN and ACKs) have passed: three equal listings in a row.
async fn settled_counters(lab: &Lab) -> TrafficCounters {
    let deadline = Instant::now() + HANG;
    let mut last = total(&lab.fe_keying.list_sas().await.unwrap());
    let mut same = 0;
    while same < 3 {
        assert!(Instant::now() < deadline, "SA counters never settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = total(&lab.fe_keying.list_sas().await.unwrap());
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// One TCP exchange with a listener on VIP:`port` in the back-end; `Err` says what failed.
fn tcp_exchange(lab: &Lab, port: u16, timeout: Duration) -> Result<(), String> {
    let addr = SocketAddr::new(vip(), port);
    let listener = lab
        .be
        .run_in(move || TcpListener::bind(addr))
        .unwrap()
        .map_err(|e| format!("bind {addr}: {e}"))?;
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let (mut s, _) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("no connection arrived".into());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).map_err(|e| e.to_string())?;
        s.write_all(b"pong").map_err(|e| e.to_string())
    });
    let client = lab
        .fe
        .run_in(move || -> Result<(), String> {
            let mut c = TcpStream::connect_timeout(&addr, timeout)
                .map_err(|e| format!("connect {addr}: {e}"))?;
            c.set_read_timeout(Some(timeout)).unwrap();
            c.write_all(b"ping").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
            if &buf != b"pong" {
                return Err(format!("unexpected answer {buf:?}"));
            }
            Ok(())
        })
        .unwrap();
    let served = server.join().unwrap();
    client.and(served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_loads_into_charon_and_the_sa_carries_exactly_its_ports() {
    let lab = lab();
    let key = SecretKey::new(b"policy-lab-secret-0123456789".to_vec());
    lab.fe_keying.load_psk(&key).await.unwrap();
    lab.be_keying.load_psk(&key).await.unwrap();

    // A weak policy never reaches charon: validation refuses it first.
    let weak = Policy::parse_json(
        r#"{"name":"weak","template":"mail","ike-proposals":["aes128-sha256-modp1024"]}"#,
    )
    .unwrap_err();
    assert_eq!(
        weak.to_string(),
        "ike-proposals[0] \"aes128-sha256-modp1024\": DH group modp1024 is 1024 bits, below \
         the 2048-bit floor"
    );
    assert!(lab.fe_keying.list_connections().await.unwrap().is_empty());
    assert!(lab.be_keying.list_connections().await.unwrap().is_empty());

    let parsed = Policy::parse_json(r#"{"name":"creds","template":"mail-credentials"}"#).unwrap();
    let creds = parsed.policy;
    let took = load_both(&lab, &creds).await;
    eprintln!("load-conn (front-end, mail-credentials): {took:?}");
    let (conn_name, child_name) = policy::connection_names(&creds, vip());
    let loaded = lab.fe_keying.list_connections().await.unwrap();
    assert_eq!(loaded.len(), 1, "{loaded:#?}");
    assert_eq!(loaded[0].name, conn_name);
    assert_eq!(loaded[0].remote_addrs, [VIP]);
    assert_eq!(loaded[0].children[0].name, child_name);
    assert_eq!(
        loaded[0].children[0].remote_ts,
        ["192.0.2.100/32[tcp/110]", "192.0.2.100/32[tcp/143]"]
    );
    let be_loaded = lab.be_keying.list_connections().await.unwrap();
    assert_eq!(be_loaded[0].local_addrs, [VIP]);

    let started = Instant::now();
    lab.fe_keying
        .initiate(vip(), &policy::render::peer_connection(&creds, vip()), HANG)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "initiate failed: {e}; fe log:\n{}",
                std::fs::read_to_string(lab.fe_charon.log_path()).unwrap_or_default()
            )
        });
    eprintln!(
        "SA up (initiate over VICI, IKE modp3072): {:?}",
        started.elapsed()
    );

    let sas = lab.fe_keying.list_sas().await.unwrap();
    assert_eq!(sas.len(), 1, "{sas:#?}");
    let sa = &sas[0];
    assert_eq!(sa.name, conn_name);
    assert_eq!(sa.children.len(), 1, "{sa:#?}");
    let child = &sa.children[0];
    assert_eq!(child.name, child_name);
    assert_eq!(child.local_ts, ["192.0.2.1/32[tcp]"]);
    assert_eq!(
        child.remote_ts,
        ["192.0.2.100/32[tcp/110]", "192.0.2.100/32[tcp/143]"]
    );
    assert!(child.encap);
    eprintln!(
        "NAT flags with forced encapsulation: front-end nat-local={} nat-remote={}",
        sa.nat_local, sa.nat_remote
    );
    let be_sas = lab.be_keying.list_sas().await.unwrap();
    eprintln!(
        "NAT flags with forced encapsulation: back-end nat-local={} nat-remote={}",
        be_sas[0].nat_local, be_sas[0].nat_remote
    );
    // No NAT in the lab: the policy (nat-traversal = never) keeps the SA on both sides.
    policy::nat_allowed(&creds, VipRole::Peer, sa.nat_local, sa.nat_remote).unwrap();
    policy::nat_allowed(
        &creds,
        VipRole::Hosted,
        be_sas[0].nat_local,
        be_sas[0].nat_remote,
    )
    .unwrap();

    // Without routing rules, unprotected traffic to the VIP is lost (not sent in clear).
    let lost = tcp_exchange(&lab, 80, Duration::from_secs(1));
    eprintln!("tcp/80 without the policy's routing rules: {lost:?}");
    assert!(
        lost.is_err(),
        "kernel-libipsec's table 220 should swallow tcp/80"
    );

    // charon's kernel-libipsec routes everything to the VIP (and, on the back-end, to the
    // front-end) into its TUN device, where traffic no SA carries is dropped; the
    // policy's routing rules send only the protected flows there.
    for (ns, role) in [(&lab.fe, VipRole::Peer), (&lab.be, VipRole::Hosted)] {
        for rule in policy::routing::routing_rules(&creds, vip(), role) {
            let mut args = vec!["rule".to_string(), "add".to_string()];
            args.extend(rule.ip_args());
            ns.ip(&args.iter().map(String::as_str).collect::<Vec<_>>())
                .unwrap();
        }
    }

    // Port 110 goes through the SA.
    let before = total(&sas);
    tcp_exchange(&lab, 110, HANG).expect("tcp/110 through the SA");
    let after = total(&lab.fe_keying.list_sas().await.unwrap());
    eprintln!("tcp/110 exchange: counters {before:?} -> {after:?}");
    assert!(after.packets_out > before.packets_out && after.packets_in > before.packets_in);

    // Port 80 is not protected: the SA does not carry it, it flows in clear.
    let before = settled_counters(&lab).await;
    tcp_exchange(&lab, 80, HANG).expect("tcp/80 in clear text");
    let after = settled_counters(&lab).await;
    eprintln!("tcp/80 exchange: counters {before:?} -> {after:?}");
    assert_eq!(before, after, "tcp/80 must not go through the SA");

    // Reload with another template: the connection is replaced in place.
    let mut mail = creds.clone();
    mail.template = Some(Template::Mail);
    let took = load_both(&lab, &mail).await;
    eprintln!("load-conn again (mail replaces mail-credentials): {took:?}");
    let loaded = lab.fe_keying.list_connections().await.unwrap();
    assert_eq!(loaded.len(), 1, "{loaded:#?}");
    assert_eq!(loaded[0].name, conn_name);
    assert_eq!(
        loaded[0].children[0].remote_ts,
        [
            "192.0.2.100/32[tcp/80]",
            "192.0.2.100/32[tcp/110]",
            "192.0.2.100/32[tcp/143]"
        ]
    );
    assert!(
        lab.fe_charon.swanctl(&["--stats"]).is_ok(),
        "charon still runs"
    );
    let sas = lab.fe_keying.list_sas().await.unwrap();
    eprintln!(
        "after the reload: {} IKE_SA(s), states {:?}",
        sas.len(),
        sas.iter().map(|s| s.state.as_str()).collect::<Vec<_>>()
    );
    // A fresh SA is built from the new connection and carries tcp/80 too.
    lab.fe_keying.drop_sas(vip(), &|_| false).await.unwrap();
    let started = Instant::now();
    lab.fe_keying
        .initiate(vip(), &policy::render::peer_connection(&mail, vip()), HANG)
        .await
        .unwrap();
    eprintln!("SA up again after the reload: {:?}", started.elapsed());
    let sas = lab.fe_keying.list_sas().await.unwrap();
    let child = &sas
        .iter()
        .find(|s| s.has_installed_child())
        .expect("an installed CHILD_SA")
        .children[0];
    assert_eq!(
        child.remote_ts,
        [
            "192.0.2.100/32[tcp/80]",
            "192.0.2.100/32[tcp/110]",
            "192.0.2.100/32[tcp/143]"
        ]
    );

    // The default ESP proposal has PFS (modp3072): a CHILD_SA rekey runs a DH exchange.
    let old_child = child.unique_id;
    let started = Instant::now();
    lab.fe_charon
        .swanctl(&["--rekey", "--child", &child_name])
        .unwrap();
    let deadline = Instant::now() + HANG;
    loop {
        let sas = lab.fe_keying.list_sas().await.unwrap();
        let installed: Vec<u64> = sas
            .iter()
            .flat_map(|s| &s.children)
            .filter(|c| c.state == "INSTALLED")
            .map(|c| c.unique_id)
            .collect();
        if installed.len() == 1 && installed[0] != old_child {
            break;
        }
        assert!(Instant::now() < deadline, "no rekeyed CHILD_SA: {sas:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "CHILD_SA rekey with PFS (modp3072): {:?}",
        started.elapsed()
    );

    // Unloading removes it; unloading again is not an error.
    lab.fe_keying.unload_connection(&conn_name).await.unwrap();
    lab.fe_keying.unload_connection(&conn_name).await.unwrap();
    assert!(lab.fe_keying.list_connections().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_charon_lacks_is_found_before_loading_and_fails_at_initiate() {
    // Without its OpenSSL plugin charon has MODP groups (gmp) and no ECP.
    let lab = lab_with(Charon::start_without_openssl);
    let key = SecretKey::new(b"policy-lab-secret-0123456789".to_vec());
    lab.fe_keying.load_psk(&key).await.unwrap();
    lab.be_keying.load_psk(&key).await.unwrap();
    let p = Policy::parse_json(
        r#"{"name":"ecp","template":"mail","ike-proposals":["aes256-sha256-ecp384"],
            "esp-proposals":["aes256-sha256"]}"#,
    )
    .unwrap()
    .policy;
    // The node can tell beforehand: its charon lists no ECP group.
    let methods = lab.fe_keying.key_exchange_methods().await.unwrap();
    eprintln!("charon's key exchange methods: {methods:?}");
    assert!(methods.contains(&"MODP_3072".to_string()), "{methods:?}");
    let e = p.check_supported(&methods).unwrap_err().to_string();
    assert!(
        e.starts_with(
            "ike-proposals[0] \"aes256-sha256-ecp384\": DH group ecp384 (ECP_384) is not available"
        ),
        "{e}"
    );
    Policy::from_template("d", Template::Mail)
        .check_supported(&methods)
        .expect("the defaults negotiate with the lab's charon");
    load_both(&lab, &p).await;
    let res = lab
        .fe_keying
        .initiate(
            vip(),
            &policy::render::peer_connection(&p, vip()),
            Duration::from_secs(5),
        )
        .await;
    eprintln!("initiate with ecp384 (no openssl plugin): {res:?}");
    // charon loads the connection, but says why it cannot negotiate it.
    match res {
        Err(vipsec::keying::KeyingError::Refused { reason, .. }) => {
            assert!(reason.contains("ECP_384 not supported"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A throwaway RSA CA and one certificate per node, with the reads this test wants.
struct RsaPki(TestPki);

impl RsaPki {
    fn generate(nodes: &[&str]) -> RsaPki {
        RsaPki(TestPki::rsa_nodes(nodes).unwrap())
    }

    fn read(&self, file: &str) -> Vec<u8> {
        self.0.read(file).unwrap()
    }

    fn ids(&self, node: &str) -> Identities {
        Identities {
            local_cert: Some(self.read(&format!("{node}.pem"))),
            ca_certs: vec![self.read("ca.pem")],
            ..Identities::psk(node)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_authenticate_both_sides() {
    let lab = lab();
    let started = Instant::now();
    let pki = RsaPki::generate(&["fe.vipsec.test", "be.vipsec.test"]);
    eprintln!("RSA PKI generated in {:?}", started.elapsed());
    lab.fe_keying
        .load_private_key(&SecretKey::new(pki.read("fe.vipsec.test.key")))
        .await
        .unwrap();
    lab.be_keying
        .load_private_key(&SecretKey::new(pki.read("be.vipsec.test.key")))
        .await
        .unwrap();
    let p = Policy::parse_json(r#"{"name":"certs","template":"mail-credentials","auth":"pubkey"}"#)
        .unwrap()
        .policy;
    // The front-end knows the owner's identity (from the store) and asks for it.
    let fe = Identities {
        remote_id: Some("be.vipsec.test".into()),
        local_addr: Some(FE.parse().unwrap()),
        ..pki.ids("fe.vipsec.test")
    };
    let took = load_both_as(&lab, &p, &fe, &pki.ids("be.vipsec.test")).await;
    eprintln!("load-conn with certificates: {took:?}");
    let started = Instant::now();
    lab.fe_keying
        .initiate(vip(), &policy::render::peer_connection(&p, vip()), HANG)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "initiate failed: {e}; fe log:\n{}",
                std::fs::read_to_string(lab.fe_charon.log_path()).unwrap_or_default()
            )
        });
    eprintln!("SA up with RSA certificates: {:?}", started.elapsed());
    let sas = lab.fe_keying.list_sas().await.unwrap();
    assert_eq!(sas[0].local_id, "fe.vipsec.test");
    assert_eq!(sas[0].remote_id, "be.vipsec.test");
    let be = lab.be_keying.list_sas().await.unwrap();
    assert_eq!(be[0].remote_id, "fe.vipsec.test");

    // A peer whose certificate is from another CA is refused.
    let other = RsaPki::generate(&["fe.vipsec.test"]);
    lab.fe_keying.drop_sas(vip(), &|_| false).await.unwrap();
    lab.fe_keying
        .load_private_key(&SecretKey::new(other.read("fe.vipsec.test.key")))
        .await
        .unwrap();
    let rogue = Identities {
        remote_id: Some("be.vipsec.test".into()),
        local_addr: Some(FE.parse().unwrap()),
        // It still trusts the real CA, so only the back-end's check can stop it.
        ca_certs: vec![pki.read("ca.pem")],
        ..other.ids("fe.vipsec.test")
    };
    let spec = policy::connection(&p, vip(), VipRole::Peer, &rogue).unwrap();
    lab.fe_keying.load_connection(&spec).await.unwrap();
    let res = lab
        .fe_keying
        .initiate(
            vip(),
            &policy::render::peer_connection(&p, vip()),
            Duration::from_secs(5),
        )
        .await;
    eprintln!("initiate with a certificate of another CA: {res:?}");
    assert!(res.is_err(), "a foreign certificate must not get an SA");
}
