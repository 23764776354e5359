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
use vipsec::model::{IkeSaInfo, TrafficCounters, Vip, VipRole};
use vipsec::policy::{self, Identities, Policy, SecretKey, Template};
use vipsec_testbed::charon::Charon;
use vipsec_testbed::netns::Netns;

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
    assert!(
        vipsec_testbed::can_use_netns(),
        "these tests need root (CAP_NET_ADMIN) to create network namespaces"
    );
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
    let be_charon = Charon::start(&be, "be", empty).unwrap();
    let fe_charon = Charon::start(&fe, "fe", empty).unwrap();
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
        local_id: FE.into(),
        remote_id: None,
        local_addr: Some(FE.parse().unwrap()),
    }
}

fn be_ids() -> Identities {
    Identities {
        local_id: "be.vipsec.test".into(),
        remote_id: None,
        local_addr: None,
    }
}

/// Renders `policy` for both sides and loads it; returns the front-end's load time.
async fn load_both(lab: &Lab, policy: &Policy) -> Duration {
    let be_spec = policy::connection(policy, vip(), VipRole::Hosted, &be_ids()).unwrap();
    let fe_spec = policy::connection(policy, vip(), VipRole::Peer, &fe_ids()).unwrap();
    lab.be_keying.load_connection(&be_spec).await.unwrap();
    let started = Instant::now();
    lab.fe_keying.load_connection(&fe_spec).await.unwrap();
    started.elapsed()
}

fn total(sas: &[IkeSaInfo]) -> TrafficCounters {
    sas.iter()
        .map(|s| s.counters())
        .fold(TrafficCounters::default(), |a, c| TrafficCounters {
            bytes_in: a.bytes_in + c.bytes_in,
            bytes_out: a.bytes_out + c.bytes_out,
            packets_in: a.packets_in + c.packets_in,
            packets_out: a.packets_out + c.packets_out,
        })
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

    // Port 110 goes through the SA.
    let before = total(&sas);
    tcp_exchange(&lab, 110, HANG).expect("tcp/110 through the SA");
    let after = total(&lab.fe_keying.list_sas().await.unwrap());
    eprintln!("tcp/110 exchange: counters {before:?} -> {after:?}");
    assert!(after.packets_out > before.packets_out && after.packets_in > before.packets_in);

    // Port 80 is not protected: the SA does not carry it, it flows in clear. charon's
    // kernel-libipsec routes everything to the VIP (and, on the back-end, to the
    // front-end) into its TUN device through routing table 220, where traffic no SA
    // carries is dropped; a rule ahead of charon's sends the unprotected port by the main
    // table (the agent must do the same for traffic a policy leaves out).
    lab.fe
        .ip(&[
            "rule", "add", "priority", "100", "to", VIP, "ipproto", "tcp", "dport", "80", "lookup",
            "main",
        ])
        .unwrap();
    lab.be
        .ip(&[
            "rule", "add", "priority", "100", "from", VIP, "ipproto", "tcp", "sport", "80",
            "lookup", "main",
        ])
        .unwrap();
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

    // Unloading removes it; unloading again is not an error.
    lab.fe_keying.unload_connection(&conn_name).await.unwrap();
    lab.fe_keying.unload_connection(&conn_name).await.unwrap();
    assert!(lab.fe_keying.list_connections().await.unwrap().is_empty());
}
