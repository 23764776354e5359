//! The strongSwan VICI backend against two real charons in network namespaces.
//!
//! Each test builds its own `TwoNodeLab`: a front-end (192.0.2.1) and a back-end holding
//! the VIP 192.0.2.100, one charon each, a host-to-host tunnel `vip` between them. The
//! backend under test runs in this (root-namespace) process and talks to each charon over
//! the VICI socket the lab puts in a host temp dir.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vipsec::config::Config;
use vipsec::failover::{Input, SaRef};
use vipsec::keying::Keying;
use vipsec::keying::strongswan::StrongswanKeying;
use vipsec::model::{IkeSaInfo, PeerConnection, Vip, VipRole};
use vipsec_testbed::charon::{Charon, TwoNodeLab};

mod common;
use common::total;

/// Generous bound for anything that should take milliseconds: "it did not hang".
const HANG: Duration = Duration::from_secs(15);

fn vip() -> Vip {
    TwoNodeLab::VIP.parse().unwrap()
}

fn lab() -> TwoNodeLab {
    vipsec_testbed::require_root().unwrap();
    TwoNodeLab::start().expect("start the two-node lab")
}

fn conn() -> PeerConnection {
    PeerConnection {
        connection: TwoNodeLab::CONN.into(),
        child: TwoNodeLab::CONN.into(),
    }
}

/// A front-end agent config: talks to the VIP through connection `vip`.
fn fe_config(socket: &Path) -> Config {
    Config::parse(&format!(
        r#"
node = "fe"
[keying]
backend = "strongswan"
vici_socket = "{}"
sample_interval = "100ms"
reconnect_min = "50ms"
reconnect_max = "400ms"
[[peer_vip]]
address = "{}"
connection = "{}"
"#,
        socket.display(),
        TwoNodeLab::VIP,
        TwoNodeLab::CONN
    ))
    .expect("valid front-end config")
}

/// A back-end agent config: may host the VIP.
fn be_config(socket: &Path) -> Config {
    Config::parse(&format!(
        r#"
node = "be"
[keying]
backend = "strongswan"
vici_socket = "{}"
[[hosted_vip]]
address = "{}"
"#,
        socket.display(),
        TwoNodeLab::VIP
    ))
    .expect("valid back-end config")
}

fn fe_keying(lab: &TwoNodeLab) -> StrongswanKeying {
    StrongswanKeying::new(&fe_config(&lab.fe_charon.vici_socket()))
}

fn be_keying(lab: &TwoNodeLab) -> StrongswanKeying {
    StrongswanKeying::new(&be_config(&lab.be_charon.vici_socket()))
}

/// `run` on its own task, with the inputs it sends and a way to stop it.
struct Running {
    rx: mpsc::Receiver<Input>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(keying: StrongswanKeying) -> Running {
        let (tx, rx) = mpsc::channel(1024);
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move { keying.run(tx, c).await });
        Running { rx, cancel, task }
    }

    /// The next input `pick` accepts, skipping the others.
    async fn next<T>(&mut self, what: &str, mut pick: impl FnMut(&Input) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + HANG;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(i)) => {
                    if let Some(v) = pick(&i) {
                        return v;
                    }
                }
                Ok(None) => panic!("run() ended while waiting for {what}"),
                Err(_) => panic!("no {what} within {HANG:?}"),
            }
        }
    }

    async fn keying_up(&mut self) -> Vec<SaRef> {
        self.next("KeyingUp", |i| match i {
            Input::KeyingUp { established } => Some(established.clone()),
            _ => None,
        })
        .await
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(HANG, self.task)
            .await
            .expect("run() stops when cancelled")
            .unwrap();
    }
}

/// A field of the first `--raw` listing line, e.g. `uniqueid` or `spi-in`.
fn raw_field(raw: &str, key: &str) -> String {
    let needle = format!(" {key}=");
    let start = raw
        .find(&needle)
        .unwrap_or_else(|| panic!("{key} not in {raw}"))
        + needle.len();
    raw[start..].split([' ', '}']).next().unwrap().to_string()
}

fn only_sa(sas: &[IkeSaInfo]) -> &IkeSaInfo {
    assert_eq!(sas.len(), 1, "expected exactly one IKE_SA: {sas:#?}");
    &sas[0]
}

fn no_sa_left(charon: &Charon) -> bool {
    !charon
        .swanctl(&["--list-sas", "--raw"])
        .unwrap()
        .contains("list-sa event")
}

/// A listener on VIP:143 in the back-end that answers each connection's line with
/// "pong", and a client in the front-end that sends "ping": one TCP exchange.
fn tcp_exchange(lab: &TwoNodeLab) {
    let addr = SocketAddr::new(vip(), 143);
    let listener = lab
        .be
        .run_in(move || TcpListener::bind(addr))
        .unwrap()
        .expect("bind VIP:143 in the back-end");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        s.write_all(b"pong").unwrap();
    });
    let mut client = lab
        .fe
        .run_in(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap()
        .expect("connect to VIP:143 from the front-end");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    server.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_established_sas_like_swanctl_and_maps_them_to_the_vip() {
    let lab = lab();
    lab.connect().unwrap();
    let fe = fe_keying(&lab);
    let be = be_keying(&lab);

    let started = Instant::now();
    let fe_sas = fe.list_sas().await.unwrap();
    eprintln!(
        "first list-sas (connect + list, one IKE_SA) took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    for _ in 0..20 {
        fe.list_sas().await.unwrap();
    }
    eprintln!(
        "list-sas with one IKE_SA: {:?} each (mean of 20)",
        started.elapsed() / 20
    );
    let sa = only_sa(&fe_sas);
    let raw = lab.fe_charon.swanctl(&["--list-sas", "--raw"]).unwrap();
    assert_eq!(sa.unique_id.to_string(), raw_field(&raw, "uniqueid"));
    assert_eq!(sa.state, "ESTABLISHED");
    assert_eq!(sa.name, TwoNodeLab::CONN);
    assert_eq!(sa.local_host, TwoNodeLab::FE_ADDR);
    assert_eq!(sa.remote_host, TwoNodeLab::VIP);
    assert_eq!((sa.local_port, sa.remote_port), (4500, 4500));
    assert_eq!(sa.local_id, TwoNodeLab::FE_ADDR);
    assert_eq!(sa.remote_id, TwoNodeLab::VIP);
    assert!(sa.initiator);
    assert_eq!(sa.initiator_spi, raw_field(&raw, "initiator-spi"));
    assert_eq!(sa.responder_spi, raw_field(&raw, "responder-spi"));
    assert_eq!(sa.children.len(), 1);
    let child = &sa.children[0];
    assert_eq!(child.name, TwoNodeLab::CONN);
    assert_eq!(child.state, "INSTALLED");
    assert_eq!(child.mode, "TUNNEL");
    assert_eq!(child.protocol, "ESP");
    assert!(child.encap);
    assert_eq!(child.spi_in, raw_field(&raw, "spi-in"));
    assert_eq!(child.spi_out, raw_field(&raw, "spi-out"));
    assert_eq!(child.local_ts, vec![format!("{}/32", TwoNodeLab::FE_ADDR)]);
    assert_eq!(child.remote_ts, vec![format!("{}/32", TwoNodeLab::VIP)]);
    assert_eq!(sa.vip_role(&[], &[vip()]), Some((vip(), VipRole::Peer)));
    assert_eq!(sa.vip_role(&[vip()], &[]), None);

    let be_sas = be.list_sas().await.unwrap();
    let bsa = only_sa(&be_sas);
    let braw = lab.be_charon.swanctl(&["--list-sas", "--raw"]).unwrap();
    assert_eq!(bsa.unique_id.to_string(), raw_field(&braw, "uniqueid"));
    assert_eq!(bsa.local_host, TwoNodeLab::VIP);
    assert!(!bsa.initiator);
    assert_eq!(bsa.initiator_spi, sa.initiator_spi);
    // The back-end's inbound SPI is the front-end's outbound one.
    assert_eq!(bsa.children[0].spi_in, child.spi_out);
    assert_eq!(bsa.children[0].spi_out, child.spi_in);
    assert_eq!(bsa.vip_role(&[vip()], &[]), Some((vip(), VipRole::Hosted)));

    // run() reports the same SA as its inventory, with the right role on each side.
    let mut fe_run = Running::start(fe_keying(&lab));
    let up = fe_run.keying_up().await;
    assert_eq!(
        up,
        vec![SaRef {
            vip: vip(),
            role: VipRole::Peer,
            ike_id: sa.unique_id
        }]
    );
    fe_run.stop().await;
    let mut be_run = Running::start(be);
    let up = be_run.keying_up().await;
    assert_eq!(
        up,
        vec![SaRef {
            vip: vip(),
            role: VipRole::Hosted,
            ike_id: bsa.unique_id
        }]
    );
    be_run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_delete_on_the_back_end_is_seen_by_the_front_end() {
    let lab = lab();
    lab.connect().unwrap();
    let mut fe_run = Running::start(fe_keying(&lab));
    let up = fe_run.keying_up().await;
    assert_eq!(up.len(), 1, "{up:?}");
    let fe_ike = up[0].ike_id;

    let be = be_keying(&lab);
    let started = Instant::now();
    let delete = tokio::spawn(async move {
        let n = be.delete_sas(vip(), VipRole::Hosted).await;
        (n, started.elapsed())
    });
    let (sa, reason) = fe_run
        .next("SaDown on the front-end", |i| match i {
            Input::SaDown { sa, reason } => Some((*sa, reason.clone())),
            _ => None,
        })
        .await;
    let noticed = started.elapsed();
    let (n, delete_took) = delete.await.unwrap();
    assert_eq!(n.unwrap(), 1);
    assert_eq!(sa.ike_id, fe_ike);
    assert_eq!(sa.role, VipRole::Peer);
    eprintln!(
        "graceful delete_sas returned in {delete_took:?}; the front-end's run() reported \
         SaDown ({reason}) {noticed:?} after the delete started"
    );
    assert!(
        no_sa_left(&lab.fe_charon),
        "front-end charon still lists an SA"
    );
    assert!(
        no_sa_left(&lab.be_charon),
        "back-end charon still lists an SA"
    );
    fe_run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_toward_an_unreachable_peer_returns_at_once_and_leaves_nothing() {
    let lab = lab();
    lab.connect().unwrap();
    lab.fe.link_set(TwoNodeLab::IFACE, false).unwrap();
    let fe = fe_keying(&lab);
    let started = Instant::now();
    let n = fe.drop_sas(vip(), &|_| false).await.unwrap();
    let took = started.elapsed();
    eprintln!("drop_sas toward a peer behind a downed link took {took:?}");
    assert_eq!(n, 1);
    assert!(took < HANG, "drop_sas hung");
    assert!(fe.list_sas().await.unwrap().is_empty());
    assert!(no_sa_left(&lab.fe_charon));
    // Nothing to drop is not an error.
    assert_eq!(fe.drop_sas(vip(), &|_| false).await.unwrap(), 0);
}

/// A drop decided on news of a new holder leaves alone the SA that came up since (the
/// runtime asks its core for each IKE_SA just before removing it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_leaves_the_sas_it_is_told_to_spare() {
    let lab = lab();
    lab.connect().unwrap();
    let fe = fe_keying(&lab);
    let sas = fe.list_sas().await.unwrap();
    assert_eq!(sas.len(), 1, "{sas:?}");
    let fresh = sas[0].unique_id;
    let asked = std::sync::Mutex::new(Vec::new());
    let spare = |c: vipsec::keying::DropCandidate| {
        asked.lock().unwrap().push(c.ike_id);
        assert!(!c.answered, "an established IKE_SA is not half-open: {c:?}");
        c.ike_id == fresh
    };
    assert_eq!(fe.drop_sas(vip(), &spare).await.unwrap(), 0);
    assert_eq!(*asked.lock().unwrap(), vec![fresh]);
    let left = fe.list_sas().await.unwrap();
    assert!(
        left.iter()
            .any(|s| s.unique_id == fresh && s.is_established()),
        "the spared IKE_SA is gone: {left:?}"
    );
    assert_eq!(fe.drop_sas(vip(), &|_| false).await.unwrap(), 1);
    assert!(fe.list_sas().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_delete_toward_a_silent_peer_gives_up_and_leaves_nothing() {
    let lab = lab();
    lab.connect().unwrap();
    // The front-end can no longer answer the back-end's DELETE.
    lab.be.link_set(TwoNodeLab::IFACE, false).unwrap();
    let be = be_keying(&lab);
    let started = Instant::now();
    let n = be.delete_sas(vip(), VipRole::Hosted).await.unwrap();
    let took = started.elapsed();
    eprintln!("graceful delete_sas with nobody answering took {took:?}");
    assert_eq!(n, 1);
    assert!(took < HANG, "delete_sas hung on a silent peer");
    assert!(be.list_sas().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initiate_brings_up_a_tunnel_that_carries_tcp() {
    let lab = lab();
    let fe = fe_keying(&lab);
    let started = Instant::now();
    fe.initiate(vip(), &conn(), Duration::from_secs(5))
        .await
        .unwrap();
    eprintln!(
        "initiate returned with the CHILD_SA up in {:?}",
        started.elapsed()
    );
    let before = total(&fe.list_sas().await.unwrap());
    assert_eq!(
        only_sa(&fe.list_sas().await.unwrap()).children[0].state,
        "INSTALLED"
    );

    let exchange = lab_exchange(&lab).await;
    let after = total(&fe.list_sas().await.unwrap());
    eprintln!(
        "TCP exchange through the tunnel took {exchange:?}; counters {before:?} -> {after:?}"
    );
    assert!(
        after.packets_out > before.packets_out,
        "nothing left through the SA"
    );
    assert!(
        after.packets_in > before.packets_in,
        "nothing came back through the SA"
    );

    // A connection charon does not know is refused with its reason.
    let err = fe
        .initiate(
            vip(),
            &PeerConnection {
                connection: "nosuch".into(),
                child: "nosuch".into(),
            },
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    eprintln!("initiate of an unknown connection: {err}");
    assert!(err.to_string().contains("nosuch"), "{err}");
}

async fn lab_exchange(lab: &TwoNodeLab) -> Duration {
    let started = Instant::now();
    // Blocking socket calls; fine on a multi-thread test runtime.
    tokio::task::block_in_place(|| tcp_exchange(lab));
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charon_restart_is_reported_down_then_up() {
    let mut lab = lab();
    lab.connect().unwrap();
    let mut fe_run = Running::start(fe_keying(&lab));
    assert_eq!(fe_run.keying_up().await.len(), 1);

    let killed = Instant::now();
    lab.fe_charon.kill();
    let detail = fe_run
        .next("KeyingDown", |i| match i {
            Input::KeyingDown { detail } => Some(detail.clone()),
            _ => None,
        })
        .await;
    eprintln!("KeyingDown {:?} after SIGKILL: {detail}", killed.elapsed());

    let restarted = Instant::now();
    tokio::task::block_in_place(|| lab.fe_charon.restart()).unwrap();
    let up = fe_run.keying_up().await;
    eprintln!(
        "KeyingUp {:?} after the restart began (charon start + load took part of it)",
        restarted.elapsed()
    );
    // A fresh charon holds no SA.
    assert!(up.is_empty(), "{up:?}");
    // Commands work again over a new connection.
    let fe = fe_keying(&lab);
    fe.initiate(vip(), &conn(), Duration::from_secs(5))
        .await
        .unwrap();
    let sa = fe_run
        .next("SaUp after the restart", |i| match i {
            Input::SaUp(sa) => Some(*sa),
            _ => None,
        })
        .await;
    assert_eq!(sa.vip, vip());
    fe_run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_samples_grow_with_traffic() {
    let lab = lab();
    let mut fe_run = Running::start(fe_keying(&lab));
    assert!(fe_run.keying_up().await.is_empty());
    let fe = fe_keying(&lab);
    fe.initiate(vip(), &conn(), Duration::from_secs(5))
        .await
        .unwrap();
    let sa = fe_run
        .next("SaUp from the child-updown event", |i| match i {
            Input::SaUp(sa) => Some(*sa),
            _ => None,
        })
        .await;
    assert_eq!(sa.role, VipRole::Peer);

    let sample = |min_out: u64| {
        move |i: &Input| match i {
            Input::CountersSampled { vip: v, counters }
                if *v == vip() && counters.packets_out > min_out && counters.packets_in > 0 =>
            {
                Some(*counters)
            }
            _ => None,
        }
    };
    lab_exchange(&lab).await;
    let first = fe_run.next("a sample with traffic", sample(0)).await;
    lab_exchange(&lab).await;
    let second = fe_run
        .next("a sample with more traffic", sample(first.packets_out))
        .await;
    eprintln!("samples grew {first:?} -> {second:?}");
    assert!(second.bytes_out > first.bytes_out);
    assert!(second.bytes_in > first.bytes_in);
    fe_run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_cost_with_a_hundred_sas() {
    const N: usize = 100;
    vipsec_testbed::require_root().unwrap();
    let lab = TwoNodeLab::with_vips(N).expect("start the lab with many VIPs");
    let mut toml = format!(
        "node = \"fe\"\n[keying]\nbackend = \"strongswan\"\nvici_socket = \"{}\"\n",
        lab.fe_charon.vici_socket().display()
    );
    for i in 0..N {
        toml.push_str(&format!(
            "[[peer_vip]]\naddress = \"{}\"\nconnection = \"{}\"\n",
            TwoNodeLab::vip_addr(i),
            TwoNodeLab::conn_name(i)
        ));
    }
    let config = Config::parse(&toml).unwrap();
    let fe = std::sync::Arc::new(StrongswanKeying::new(&config));

    // Every initiate has its own VICI connection, so they run side by side, as many at once
    // as the agent's reconnect pacer allows by default (each holds a charon worker thread).
    use futures::StreamExt;
    let in_flight = config.failover.reconnect.concurrency as usize;
    let started = Instant::now();
    let results: Vec<_> = futures::stream::iter((0..N).map(|i| {
        let fe = fe.clone();
        async move {
            let vip: Vip = TwoNodeLab::vip_addr(i).parse().unwrap();
            let name = TwoNodeLab::conn_name(i);
            let conn = PeerConnection {
                connection: name.clone(),
                child: name,
            };
            fe.initiate(vip, &conn, Duration::from_secs(30)).await
        }
    }))
    .buffered(in_flight)
    .collect()
    .await;
    eprintln!(
        "{N} initiates, {in_flight} in flight at a time, took {:?}",
        started.elapsed()
    );
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "initiate toward VIP {i}: {r:?}");
    }

    let sas = fe.list_sas().await.unwrap();
    assert_eq!(sas.len(), N);
    let peers = config.peer_addresses();
    let mut mapped: Vec<Vip> = sas
        .iter()
        .map(|s| s.vip_role(&[], &peers).expect("maps to a peer VIP").0)
        .collect();
    mapped.sort();
    mapped.dedup();
    assert_eq!(mapped.len(), N, "every SA maps to its own VIP");

    let started = Instant::now();
    for _ in 0..10 {
        fe.list_sas().await.unwrap();
    }
    eprintln!(
        "one list-sas with {N} IKE_SAs (+{N} CHILD_SAs) took {:?} (mean of 10, debug build)",
        started.elapsed() / 10
    );

    let started = Instant::now();
    let raw = lab.fe_charon.swanctl(&["--list-sas", "--raw"]).unwrap();
    eprintln!(
        "for comparison, the swanctl --list-sas --raw process took {:?} ({} bytes)",
        started.elapsed(),
        raw.len()
    );

    // run() samples them all with that one listing per tick: one CountersSampled per VIP.
    let mut run = Running::start(StrongswanKeying::new(&config));
    assert_eq!(run.keying_up().await.len(), N);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < N {
        let v = run
            .next("a sample per VIP", |i| match i {
                Input::CountersSampled { vip, .. } => Some(*vip),
                _ => None,
            })
            .await;
        seen.insert(v);
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekeys_keep_the_vip_covered() {
    let lab = lab();
    lab.connect().unwrap();
    let mut fe_run = Running::start(fe_keying(&lab));
    let up = fe_run.keying_up().await;
    assert_eq!(up.len(), 1, "{up:?}");
    let old = up[0].ike_id;

    // IKE rekey: the new IKE_SA is reported up before the old one down.
    lab.fe_charon
        .swanctl(&["--rekey", "--ike", TwoNodeLab::CONN])
        .unwrap();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|i| matches!(i, Input::SaDown { sa, .. } if sa.ike_id == old))
    {
        let i = fe_run
            .next("SaUp/SaDown after the IKE rekey", |i| match i {
                Input::SaUp(_) | Input::SaDown { .. } => Some(i.clone()),
                _ => None,
            })
            .await;
        seen.push(i);
    }
    eprintln!("IKE rekey reported as {seen:?}");
    let Input::SaUp(new) = seen[0] else {
        panic!("the first report after an IKE rekey must be the new SA up: {seen:?}")
    };
    assert_ne!(new.ike_id, old);
    assert_eq!(seen.len(), 2, "{seen:?}");

    // CHILD rekey: same IKE_SA, nothing to report.
    let fe = fe_keying(&lab);
    // The old IKE_SA may still be listed while its DELETE is under way.
    let current = |sas: Vec<IkeSaInfo>| {
        sas.into_iter()
            .find(|s| s.unique_id == new.ike_id)
            .expect("the new IKE_SA is listed")
    };
    let child_before = current(fe.list_sas().await.unwrap()).children[0].unique_id;
    lab.fe_charon
        .swanctl(&["--rekey", "--child", TwoNodeLab::CONN])
        .unwrap();
    let rekey_started = Instant::now();
    let deadline = rekey_started + HANG;
    loop {
        let sa = current(fe.list_sas().await.unwrap());
        // The old CHILD_SA lingers as REKEYED for charon's delete_rekeyed_delay (5 s).
        if sa
            .children
            .iter()
            .any(|c| c.unique_id != child_before && c.state == "INSTALLED")
        {
            break;
        }
        assert!(Instant::now() < deadline, "CHILD_SA not rekeyed: {sa:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("CHILD rekey visible after {:?}", rekey_started.elapsed());
    // Two samples later every listing has seen the new CHILD_SA; nothing went down.
    for n in 0..2 {
        let i = fe_run
            .next("a sample after the CHILD rekey", |i| match i {
                Input::CountersSampled { .. } | Input::SaDown { .. } | Input::SaUp(_) => {
                    Some(i.clone())
                }
                _ => None,
            })
            .await;
        assert!(
            matches!(i, Input::CountersSampled { .. }),
            "sample {n}: a CHILD rekey must not be reported as {i:?}"
        );
    }
    fe_run.stop().await;
}

/// An attempt whose IKE_SA_INIT was answered is in its IKE_AUTH with whoever holds the
/// VIP: a drop sees it as answered (the runtime spares it; destroyed, it would stay
/// half-open on that node). One still waiting for its IKE_SA_INIT's answer is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_tells_an_attempt_in_its_ike_auth_from_one_unanswered() {
    let lab = lab();
    // The back-end answers IKE_SA_INIT (port 500) but never sees IKE_AUTH (4500, the
    // connection forces UDP encapsulation).
    lab.be
        .sh("nft add table inet lab && \
             nft add chain inet lab in '{ type filter hook input priority 0; }' && \
             nft add rule inet lab in udp dport 4500 drop")
        .unwrap();
    let fe = Arc::new(fe_keying(&lab));
    let initiating = {
        let fe = fe.clone();
        tokio::spawn(async move { fe.initiate(vip(), &conn(), Duration::from_secs(5)).await })
    };
    let deadline = Instant::now() + HANG;
    let answered = loop {
        let sas = fe.list_sas().await.unwrap();
        if let Some(sa) = sas.first()
            && sa.responder_spi.bytes().any(|b| b != b'0')
        {
            break sa.unique_id;
        }
        assert!(
            Instant::now() < deadline,
            "IKE_SA_INIT never answered: {sas:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seen = std::sync::Mutex::new(Vec::new());
    let spare = |c: vipsec::keying::DropCandidate| {
        seen.lock().unwrap().push(c);
        c.answered
    };
    assert_eq!(fe.drop_sas(vip(), &spare).await.unwrap(), 0);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![vipsec::keying::DropCandidate {
            ike_id: answered,
            answered: true
        }]
    );
    assert_eq!(fe.drop_sas(vip(), &|_| false).await.unwrap(), 1);
    assert!(initiating.await.unwrap().is_err());

    // With the back-end unreachable the IKE_SA_INIT stays unanswered.
    lab.be.link_set(TwoNodeLab::IFACE, false).unwrap();
    let initiating = {
        let fe = fe.clone();
        tokio::spawn(async move { fe.initiate(vip(), &conn(), Duration::from_secs(5)).await })
    };
    let deadline = Instant::now() + HANG;
    while fe.list_sas().await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no attempt listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = std::sync::Mutex::new(Vec::new());
    let spare = |c: vipsec::keying::DropCandidate| {
        seen.lock().unwrap().push(c.answered);
        false
    };
    assert_eq!(fe.drop_sas(vip(), &spare).await.unwrap(), 1);
    assert_eq!(*seen.lock().unwrap(), vec![false]);
    assert!(initiating.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initiate_toward_a_dead_peer_times_out_and_leaves_no_half_open_sa() {
    let lab = lab();
    lab.be.link_set(TwoNodeLab::IFACE, false).unwrap();
    let fe = fe_keying(&lab);
    let started = Instant::now();
    let err = fe
        .initiate(vip(), &conn(), Duration::from_millis(500))
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("initiate toward a dead peer gave up after {took:?}: {err}");
    assert!(
        matches!(err, vipsec::keying::KeyingError::Timeout { .. }),
        "{err:?}"
    );
    assert!(took < HANG);
    // charon would go on trying (keyingtries = 0) with a half-open IKE_SA, retransmitting
    // on its own schedule beside the next attempt: the attempt that gave up ended it.
    let mut left = fe.list_sas().await.unwrap();
    let deadline = Instant::now() + HANG;
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = fe.list_sas().await.unwrap();
    }
    assert!(left.is_empty(), "a half-open IKE_SA was left: {left:?}");
    assert_eq!(fe.drop_sas(vip(), &|_| false).await.unwrap(), 0);
}
