//! The etcd ownership store against a real etcd server: two nodes, planned moves, a killed
//! owner, fencing of a stale write, an etcd outage, a lost lease, corrupt records and auth.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vipsec::config::Config;
use vipsec::failover::Input;
use vipsec::model::{Vip, VipOwner};
use vipsec::store::etcd::EtcdStore;
use vipsec::store::{OwnershipStore, StoreError};
use vipsec_testbed::etcd::EtcdServer;

const WAIT: Duration = Duration::from_secs(15);

fn config(node: &str, endpoint: &str, prefix: &str, extra: &str) -> Config {
    let text = format!(
        "node = \"{node}\"\n[store]\nbackend = \"etcd\"\nendpoints = [\"{endpoint}\"]\nprefix = \"{prefix}\"\n{extra}\n"
    );
    Config::parse(&text).unwrap_or_else(|p| panic!("{p:?}"))
}

/// A store with its `run` task feeding a channel, as the runtime would.
struct Node {
    store: Arc<EtcdStore>,
    inputs: mpsc::Receiver<Input>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    fn start(config: &Config) -> Node {
        let store = Arc::new(EtcdStore::new(config).expect("store from config"));
        let (tx, inputs) = mpsc::channel(1024);
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let store = store.clone();
            let cancel = cancel.clone();
            async move { store.run(tx, cancel).await }
        });
        Node {
            store,
            inputs,
            cancel,
            task,
        }
    }

    /// Waits for the first input matching `want`, skipping others.
    async fn expect<T>(&mut self, what: &str, mut want: impl FnMut(&Input) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.inputs.recv()).await {
                Ok(Some(i)) => {
                    if let Some(v) = want(&i) {
                        return v;
                    }
                }
                Ok(None) => panic!("input channel closed while waiting for {what}"),
                Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
            }
        }
    }

    async fn expect_connected(&mut self) -> Vec<(Vip, Option<VipOwner>)> {
        self.expect("StoreHealth up", |i| {
            matches!(i, Input::StoreHealth { healthy: true, .. }).then_some(())
        })
        .await;
        let owners = self
            .expect("OwnerSnapshot", |i| match i {
                Input::OwnerSnapshot(s) => Some(s.clone()),
                _ => None,
            })
            .await;
        self.expect("HoldersSnapshot", |i| {
            matches!(i, Input::HoldersSnapshot(_)).then_some(())
        })
        .await;
        owners
    }

    /// Stops `run` and drops the store: no withdraw, no revoke (a crash, as etcd sees it).
    async fn kill(self) {
        self.cancel.cancel();
        let _ = self.task.await;
        drop(self.store);
    }
}

fn owner_change(vip: Vip, node: Option<&str>) -> impl FnMut(&Input) -> Option<Option<VipOwner>> {
    move |i| match i {
        Input::OwnerChanged { vip: v, owner } if *v == vip => {
            (owner.as_ref().map(|o| o.node.as_str()) == node).then(|| owner.clone())
        }
        _ => None,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn unique_prefix(tag: &str) -> String {
    format!("/vt-{tag}-{}/", std::process::id())
}

fn etcd() -> EtcdServer {
    EtcdServer::start().unwrap_or_else(|e| panic!("cannot start etcd: {e}"))
}

/// Two nodes, be1 and be2, on one fresh etcd under a prefix of their own (`tag`);
/// `a_extra` ends be1's store section.
struct TwoNodes {
    server: EtcdServer,
    prefix: String,
    cfg_a: Config,
    a: Node,
    b: Node,
}

fn two_nodes(tag: &str, a_extra: &str) -> TwoNodes {
    let server = etcd();
    let prefix = unique_prefix(tag);
    let cfg_a = config("be1", &server.endpoint(), &prefix, a_extra);
    let a = Node::start(&cfg_a);
    let b = Node::start(&config("be2", &server.endpoint(), &prefix, ""));
    TwoNodes {
        server,
        prefix,
        cfg_a,
        a,
        b,
    }
}

async fn raw_client(server: &EtcdServer) -> etcd_client::Client {
    etcd_client::Client::connect([server.endpoint()], None)
        .await
        .expect("raw etcd client")
}

/// A front-end only watches: nothing comes from etcd while nothing moves. etcd closes a
/// connection pinged more often than its `--grpc-keepalive-min-time` (5s by default)
/// while it has nothing to send, after three such pings (with pings every second, as the
/// agent once sent them, an idle watcher was dropped every 4 s). The agent instead asks a
/// quiet watch for its progress every `store.keepalive_interval` (1s): the connection
/// must stay up while idle, and a member frozen with its connection open (SIGSTOP: no
/// close, no reset, nothing) must be left because its progress answer does not come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_watch_stays_connected_and_a_member_gone_silent_is_left() {
    let server = etcd();
    let prefix = unique_prefix("quiet");
    let mut fe = Node::start(&config("fe1", &server.endpoint(), &prefix, ""));
    fe.expect_connected().await;
    let lost = |i: &Input| match i {
        Input::StoreHealth {
            healthy: false,
            detail,
        } => Some(detail.clone()),
        _ => None,
    };
    // Longer than three pings at one a second would last; about six progress rounds.
    let idle = Duration::from_secs(6);
    if let Ok(why) = tokio::time::timeout(idle, fe.expect("an idle drop", lost)).await {
        panic!("an idle watch lost its etcd connection: {why}");
    }

    server.signal(libc::SIGSTOP).expect("freeze etcd");
    let frozen = Instant::now();
    let why = fe.expect("the frozen member left", lost).await;
    let after = frozen.elapsed();
    server.signal(libc::SIGCONT).expect("wake etcd");
    eprintln!("[measured] frozen member left after {after:?}: {why}");
    assert!(
        why.contains("no answer to a progress request"),
        "left for another reason than the unanswered progress request: {why}"
    );
    fe.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_withdraw_reach_the_other_node() {
    let TwoNodes {
        server,
        prefix,
        mut a,
        mut b,
        ..
    } = two_nodes("pw", "");
    assert!(a.expect_connected().await.is_empty());
    assert!(b.expect_connected().await.is_empty());
    assert_eq!(a.store.describe(), server.endpoint());

    let vip: Vip = "192.0.2.100".parse().unwrap();
    let (mut publish, mut withdraw) = (Vec::new(), Vec::new());
    for round in 1..=20u64 {
        let t = Instant::now();
        let owner = a.store.publish(vip).await.expect("publish");
        let seen = b
            .expect("B sees A's record", owner_change(vip, Some("be1")))
            .await;
        publish.push(t.elapsed());
        assert_eq!(
            owner.epoch, round,
            "a withdrawn VIP's next owner gets a higher epoch"
        );
        assert_eq!(seen, Some(owner.clone()));
        // Publishing again while the record is ours keeps the epoch.
        assert_eq!(a.store.publish(vip).await.unwrap().epoch, round);

        let t = Instant::now();
        a.store.withdraw(vip).await.expect("withdraw");
        b.expect("B sees the release", owner_change(vip, None))
            .await;
        withdraw.push(t.elapsed());
    }
    // B withdrawing a record it does not hold changes nothing.
    a.store.publish(vip).await.unwrap();
    b.store.withdraw(vip).await.unwrap();
    let mut c = raw_client(&server).await;
    let kvs = c.get(format!("{prefix}vips/{vip}"), None).await.unwrap();
    assert_eq!(
        kvs.kvs().len(),
        1,
        "B's withdraw must not delete A's record"
    );

    eprintln!(
        "etcd publish -> other node's OwnerChanged: median {:?} (min {:?}, max {:?}) over {} rounds",
        median(publish.clone()),
        publish.iter().min().unwrap(),
        publish.iter().max().unwrap(),
        publish.len()
    );
    eprintln!(
        "etcd withdraw -> other node's OwnerChanged(None): median {:?} (min {:?}, max {:?}) over {} rounds",
        median(withdraw.clone()),
        withdraw.iter().min().unwrap(),
        withdraw.iter().max().unwrap(),
        withdraw.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_owner_expires_and_its_stale_write_is_fenced() {
    let TwoNodes {
        server,
        prefix,
        cfg_a,
        mut a,
        mut b,
    } = two_nodes("kill", "lease_ttl = \"2s\"");
    a.expect_connected().await;
    b.expect_connected().await;

    let vip: Vip = "192.0.2.101".parse().unwrap();
    let first = a.store.publish(vip).await.unwrap();
    b.expect("A's record", owner_change(vip, Some("be1"))).await;
    // What A saw when it last decided; a delayed write by A would act on this.
    let stale = a.store.epoch_mark(vip).await.unwrap();
    assert_eq!(stale.epoch, first.epoch);

    let t = Instant::now();
    a.kill().await;
    b.expect("A's record to expire", owner_change(vip, None))
        .await;
    let expiry = t.elapsed();
    eprintln!("killed owner's record gone after {expiry:?} (lease_ttl 2s)");
    assert!(
        expiry >= Duration::from_millis(1500),
        "the record left before the lease could expire: {expiry:?}"
    );

    let taken = b.store.publish(vip).await.unwrap();
    assert_eq!(taken.epoch, first.epoch + 1);
    b.expect("B's record", owner_change(vip, Some("be2"))).await;

    // A comes back (same node name, new process) and its late write arrives now.
    let a_again = EtcdStore::new(&cfg_a).unwrap();
    match a_again.claim(vip, stale).await {
        Err(StoreError::Fenced { owner, epoch, .. }) => {
            assert_eq!(owner, "be2");
            assert_eq!(epoch, taken.epoch);
        }
        other => panic!("a stale write must be fenced, got {other:?}"),
    }
    let mut c = raw_client(&server).await;
    let kv = c.get(format!("{prefix}vips/{vip}"), None).await.unwrap();
    let rec: VipOwner = serde_json::from_slice(kv.kvs()[0].value()).unwrap();
    assert_eq!(rec, taken, "the record stays B's");

    // While B's record stands, A cannot take the VIP, even if it is on A's interface too
    // (a split brain): the live record under B's lease decides.
    match a_again.publish(vip).await {
        Err(StoreError::Fenced { owner, epoch, .. }) => {
            assert_eq!(owner, "be2");
            assert_eq!(epoch, taken.epoch);
        }
        other => panic!("a live record of another node must not be taken, got {other:?}"),
    }
    let kv = c.get(format!("{prefix}vips/{vip}"), None).await.unwrap();
    let rec: VipOwner = serde_json::from_slice(kv.kvs()[0].value()).unwrap();
    assert_eq!(rec, taken, "the record stays B's");

    // Once B lets go, A takes it with the next epoch; B's late withdraw leaves it alone.
    b.store.withdraw(vip).await.unwrap();
    let back = a_again.publish(vip).await.unwrap();
    assert_eq!(back.epoch, taken.epoch + 1);
    b.store.withdraw(vip).await.unwrap();
    let kv = c.get(format!("{prefix}vips/{vip}"), None).await.unwrap();
    let rec: VipOwner = serde_json::from_slice(kv.kvs()[0].value()).unwrap();
    assert_eq!(rec.node, "be1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_and_lost_lease_are_recovered() {
    let TwoNodes {
        mut server,
        prefix,
        mut a,
        mut b,
        ..
    } = two_nodes("out", "");
    a.expect_connected().await;
    b.expect_connected().await;
    let vip: Vip = "192.0.2.102".parse().unwrap();
    let owner = a.store.publish(vip).await.unwrap();
    b.expect("A's record", owner_change(vip, Some("be1"))).await;

    // Two outages: each is reported once (down), then up, the watch resumed.
    for outage in 1..=2 {
        let t = Instant::now();
        tokio::task::block_in_place(|| server.stop());
        for n in [&mut a, &mut b] {
            let detail = n
                .expect("StoreHealth down", |i| match i {
                    Input::StoreHealth {
                        healthy: false,
                        detail,
                    } => Some(detail.clone()),
                    _ => None,
                })
                .await;
            eprintln!(
                "outage {outage}: store down reported {:?} after the kill: {detail}",
                t.elapsed()
            );
        }
        // While etcd is down the store answers with an error, not a hang or a panic.
        assert!(matches!(
            a.store.publish("192.0.2.103".parse().unwrap()).await,
            Err(StoreError::Unavailable(_))
        ));
        a.store.withdraw("192.0.2.103".parse().unwrap()).await.ok();

        tokio::task::block_in_place(|| server.start_again()).expect("etcd restart");
        let t = Instant::now();
        for n in [&mut a, &mut b] {
            n.expect("StoreHealth up", |i| {
                matches!(i, Input::StoreHealth { healthy: true, .. }).then_some(())
            })
            .await;
            eprintln!(
                "outage {outage}: store up and watching again {:?} after etcd answered",
                t.elapsed()
            );
        }
        let (rec, _) = b.store.current(vip).await.unwrap();
        assert_eq!(
            rec.map(|o| (o.node, o.epoch)),
            Some(("be1".to_string(), owner.epoch)),
            "A's record is there, at the same epoch"
        );
    }

    // The lease is revoked behind A's back (as if it had expired): A notices at its next
    // keep-alive, takes a new lease and restores its record. Nobody claimed the VIP in
    // between, so the epoch is kept: front-ends' SAs made under it stay current.
    let mut c = raw_client(&server).await;
    let kv = c.get(format!("{prefix}vips/{vip}"), None).await.unwrap();
    let lease = kv.kvs()[0].lease();
    let t = Instant::now();
    c.lease_revoke(lease).await.unwrap();
    b.expect("record gone with the lease", owner_change(vip, None))
        .await;
    let restored = b
        .expect("A's record restored", owner_change(vip, Some("be1")))
        .await
        .unwrap();
    eprintln!(
        "record restored under a new lease {:?} after the revoke",
        t.elapsed()
    );
    assert_eq!(restored.epoch, owner.epoch, "epoch kept on re-claim");
    let kv = c.get(format!("{prefix}vips/{vip}"), None).await.unwrap();
    assert_ne!(kv.kvs()[0].lease(), lease);
}

/// Collects log lines so the test can check the warning.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> LogBuf {
        self.clone()
    }
}

// Single-threaded so the log subscriber set for this thread sees the store's task.
#[tokio::test]
async fn corrupt_records_are_skipped_with_a_warning() {
    let logs = LogBuf::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = etcd();
    let prefix = unique_prefix("bad");
    let mut c = raw_client(&server).await;
    c.put(format!("{prefix}vips/192.0.2.110"), "{not json", None)
        .await
        .unwrap();
    c.put(
        format!("{prefix}vips/not-an-address"),
        r#"{"node":"x","epoch":1,"taken_at_ms":0}"#,
        None,
    )
    .await
    .unwrap();
    c.put(
        format!("{prefix}vips/192.0.2.111"),
        r#"{"node":"be9","epoch":4,"taken_at_ms":5}"#,
        None,
    )
    .await
    .unwrap();
    let mut b = Node::start(&config("be2", &server.endpoint(), &prefix, ""));
    let snap = b.expect_connected().await;
    let good: Vip = "192.0.2.111".parse().unwrap();
    assert_eq!(
        snap,
        vec![(
            good,
            Some(VipOwner {
                node: "be9".into(),
                epoch: 4,
                taken_at_ms: 5,
                draining: false,
            })
        )]
    );
    // Garbage arriving through the watch is skipped too; the next good change still comes.
    c.put(format!("{prefix}vips/192.0.2.112"), "\u{1}\u{2}", None)
        .await
        .unwrap();
    c.delete(format!("{prefix}vips/192.0.2.111"), None)
        .await
        .unwrap();
    let next = b.expect("next input", |i| Some(i.clone())).await;
    assert_eq!(
        next,
        Input::OwnerChanged {
            vip: good,
            owner: None
        }
    );

    // A corrupt record does not stop this node from taking the VIP.
    let vip: Vip = "192.0.2.110".parse().unwrap();
    assert_eq!(b.store.publish(vip).await.unwrap().epoch, 1);

    // An epoch key damaged after three claims never lets an epoch be handed out again.
    let worn: Vip = "192.0.2.114".parse().unwrap();
    for v in ["1", "2", "3", "x!"] {
        c.put(format!("{prefix}epochs/{worn}"), v, None)
            .await
            .unwrap();
    }
    let epoch = b.store.publish(worn).await.unwrap().epoch;
    assert!(epoch > 3, "epoch {epoch} after a damaged epoch key at 3");

    // An epoch key at the top of the range would overflow the next claim and fence every
    // real owner out: it counts as damaged, and the VIP can still be taken.
    let top: Vip = "192.0.2.116".parse().unwrap();
    c.put(format!("{prefix}epochs/{top}"), u64::MAX.to_string(), None)
        .await
        .unwrap();
    let epoch = b.store.publish(top).await.unwrap().epoch;
    assert!(
        epoch < 1 << 53,
        "epoch {epoch} after an epoch key at u64::MAX"
    );
    // So does a huge record: skipped, never echoed whole into the log.
    c.put(
        format!("{prefix}vips/192.0.2.117"),
        format!(
            r#"{{"node":"be9","epoch":2,"taken_at_ms":0,"x":"{}"}}"#,
            "y".repeat(1 << 20)
        ),
        None,
    )
    .await
    .unwrap();
    let (rec, _) = b
        .store
        .current("192.0.2.117".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(rec, None);

    // A record naming a wildcard is no owner: it would switch off identity pinning.
    c.put(
        format!("{prefix}vips/192.0.2.115"),
        r#"{"node":"%any","epoch":9,"taken_at_ms":0}"#,
        None,
    )
    .await
    .unwrap();
    let (rec, _) = b
        .store
        .current("192.0.2.115".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(rec, None);

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    for key in [
        "vips/192.0.2.110",
        "vips/not-an-address",
        "vips/192.0.2.112",
        "vips/192.0.2.115",
        "epochs/192.0.2.114",
        "epochs/192.0.2.116",
        "vips/192.0.2.117",
    ] {
        assert!(
            text.lines().any(|l| l.contains("WARN") && l.contains(key)),
            "no warning naming {key}:\n{text}"
        );
    }
    assert!(
        !text.contains(&"y".repeat(1000)),
        "the huge record was written to the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_wrong_password_is_reported_without_the_password() {
    let server = etcd();
    let mut root = raw_client(&server).await;
    root.user_add("root", "Right-Pw-77", None).await.unwrap();
    root.user_grant_role("root", "root").await.unwrap();
    root.auth_enable().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "Wr0ng-S3cret-991\n").unwrap();
    let right = dir.path().join("right");
    std::fs::write(&right, "Right-Pw-77\n").unwrap();
    let prefix = unique_prefix("auth");

    let extra = format!(
        "username = \"root\"\npassword_file = \"{}\"",
        wrong.display()
    );
    let mut bad = Node::start(&config("be1", &server.endpoint(), &prefix, &extra));
    let detail = bad
        .expect("StoreHealth down", |i| match i {
            Input::StoreHealth {
                healthy: false,
                detail,
            } => Some(detail.clone()),
            Input::StoreHealth { healthy: true, .. } => panic!("a wrong password must not connect"),
            _ => None,
        })
        .await;
    eprintln!("wrong password: {detail}");
    assert!(
        !detail.contains("Wr0ng-S3cret-991"),
        "password leaked: {detail}"
    );
    assert!(
        detail.contains("authentication failed"),
        "unclear detail: {detail}"
    );
    let err = bad
        .store
        .publish("192.0.2.120".parse().unwrap())
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("Wr0ng-S3cret-991"));

    let extra = format!(
        "username = \"root\"\npassword_file = \"{}\"",
        right.display()
    );
    let mut good = Node::start(&config("be2", &server.endpoint(), &prefix, &extra));
    good.expect_connected().await;
    let vip: Vip = "192.0.2.121".parse().unwrap();
    assert_eq!(good.store.publish(vip).await.unwrap().epoch, 1);
    good.expect("own record", owner_change(vip, Some("be2")))
        .await;
}

#[test]
fn tls_and_credential_settings_are_checked_at_construction() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let cfg = config(
        "be1",
        "https://root:Secret1@127.0.0.1:23799",
        "/vipsec/",
        &format!("tls_ca = \"{}\"", missing.display()),
    );
    assert_eq!(cfg.store.tls_ca.as_deref(), Some(missing.as_path()));
    let err = EtcdStore::new(&cfg)
        .err()
        .expect("a missing CA file is an error")
        .to_string();
    assert!(
        err.contains("store.tls_ca") && err.contains("nope.pem"),
        "{err}"
    );

    let pem = dir.path().join("ca.pem");
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let cfg = config(
        "be1",
        "https://root:Secret1@127.0.0.1:23799",
        "/vipsec/",
        &format!("tls_ca = \"{}\"", pem.display()),
    );
    let store = EtcdStore::new(&cfg).unwrap();
    assert_eq!(
        store.describe(),
        "https://127.0.0.1:23799",
        "no credentials in describe()"
    );

    let problems = Config::parse(
        "node = \"be1\"\n[store]\nbackend = \"etcd\"\npassword_file = \"/x\"\ntls_cert = \"/c\"\n",
    )
    .unwrap_err();
    let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["store.password_file", "store.tls_key"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let pki = vipsec_testbed::pki::TestPki::generate().expect("test certificates");
    let server = EtcdServer::start_tls(&pki).unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    assert!(server.endpoint().starts_with("https://"));
    let prefix = unique_prefix("tls");

    let with_cert = format!(
        "tls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
        pki.ca().display(),
        pki.client_cert().display(),
        pki.client_key().display()
    );
    let mut a = Node::start(&config("be1", &server.endpoint(), &prefix, &with_cert));
    a.expect_connected().await;
    let vip: Vip = "192.0.2.130".parse().unwrap();
    assert_eq!(a.store.publish(vip).await.unwrap().epoch, 1);
    a.expect("own record over TLS", owner_change(vip, Some("be1")))
        .await;

    // The server demands a client certificate: without one the store stays unhealthy.
    let ca_only = format!("tls_ca = \"{}\"", pki.ca().display());
    let mut b = Node::start(&config("be2", &server.endpoint(), &prefix, &ca_only));
    let detail = b
        .expect("StoreHealth down", |i| match i {
            Input::StoreHealth {
                healthy: false,
                detail,
            } => Some(detail.clone()),
            Input::StoreHealth { healthy: true, .. } => {
                panic!("connected without a client certificate")
            }
            _ => None,
        })
        .await;
    eprintln!("TLS without client certificate: {detail}");
}

// ----- a three-member etcd: leader elections -----

fn cluster() -> vipsec_testbed::etcd_cluster::EtcdCluster {
    // The store's own account of an election (what failed, what was retried) is what a
    // failure here needs; the test harness shows it only for a failed test.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_test_writer()
        .try_init();
    vipsec_testbed::etcd_cluster::EtcdCluster::start()
        .unwrap_or_else(|e| panic!("cannot start a three-member etcd: {e}"))
}

fn cluster_config(node: &str, endpoints: &[String], prefix: &str) -> Config {
    let list = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "node = \"{node}\"\n[store]\nbackend = \"etcd\"\nendpoints = [{list}]\nprefix = \"{prefix}\"\nlease_ttl = \"2s\"\n"
    );
    Config::parse(&text).unwrap_or_else(|p| panic!("{p:?}"))
}

/// Every owner change of `vip` the node reports until `quiet` passes with none.
async fn owner_changes_for(n: &mut Node, vip: Vip, quiet: Duration) -> Vec<Option<VipOwner>> {
    let mut seen = Vec::new();
    while let Ok(Some(i)) = tokio::time::timeout(quiet, n.inputs.recv()).await {
        if let Input::OwnerChanged { vip: v, owner } = i
            && v == vip
        {
            seen.push(owner);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_kill_with_the_vip_in_place_keeps_the_record_and_its_epoch() {
    let mut etcd = cluster();
    let prefix = unique_prefix("lk");
    let endpoints = etcd.endpoints();
    let mut a = Node::start(&cluster_config("be1", &endpoints, &prefix));
    let mut b = Node::start(&cluster_config("be2", &endpoints, &prefix));
    a.expect_connected().await;
    b.expect_connected().await;
    let vip: Vip = "192.0.2.110".parse().unwrap();
    let owner = a.store.publish(vip).await.unwrap();
    b.expect("A's record", owner_change(vip, Some("be1"))).await;

    // Kill the leader three times in a row (a rolling restart), each time waiting for
    // the next one: the record never vanishes and never changes.
    for round in 1..=3 {
        let leader = etcd.leader().unwrap();
        let t = Instant::now();
        tokio::task::block_in_place(|| etcd.kill(&leader));
        let (next, election) = tokio::task::block_in_place(|| {
            etcd.wait_leader(Duration::from_secs(15))
                .unwrap_or_else(|e| panic!("no new leader: {e}"))
        });
        eprintln!("round {round}: killed leader {leader}; {next} elected after {election:?}");
        // Past the lease's TTL after the election: a lapsed lease would show by now.
        let changes = owner_changes_for(&mut b, vip, Duration::from_secs(3)).await;
        assert!(
            changes.is_empty(),
            "round {round}: the record changed during the election: {changes:?}"
        );
        tokio::task::block_in_place(|| etcd.restart(&leader)).expect("member restart");
        eprintln!("round {round}: member back after {:?}", t.elapsed());
    }
    let (rec, _) = b.store.current(vip).await.unwrap();
    assert_eq!(rec, Some(owner), "same record, same epoch");
    assert!(a.store.pending_writes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdraw_during_an_election_takes_effect_once_it_is_over() {
    let mut etcd = cluster();
    let prefix = unique_prefix("we");
    let endpoints = etcd.endpoints();
    let mut a = Node::start(&cluster_config("be1", &endpoints, &prefix));
    let mut b = Node::start(&cluster_config("be2", &endpoints, &prefix));
    a.expect_connected().await;
    b.expect_connected().await;
    let vip: Vip = "192.0.2.111".parse().unwrap();
    let kept: Vip = "192.0.2.112".parse().unwrap();
    a.store.publish(vip).await.unwrap();
    let kept_owner = a.store.publish(kept).await.unwrap();
    b.expect("A's record", owner_change(vip, Some("be1"))).await;

    // One lease per VIP: losing one VIP never keeps its record alive through another's.
    let mut raw = etcd_client::Client::connect(&endpoints, None)
        .await
        .unwrap();
    let lease_of = |kv: etcd_client::GetResponse| kv.kvs()[0].lease();
    let l1 = lease_of(raw.get(format!("{prefix}vips/{vip}"), None).await.unwrap());
    let l2 = lease_of(raw.get(format!("{prefix}vips/{kept}"), None).await.unwrap());
    assert_ne!(l1, l2, "each VIP's record has its own lease");

    // The leader dies at the moment the VIP leaves: the first withdraw may fail; the
    // store retries it until the record is gone.
    let leader = etcd.leader().unwrap();
    let t = Instant::now();
    tokio::task::block_in_place(|| etcd.kill(&leader));
    let withdraw = tokio::spawn({
        let store = a.store.clone();
        async move { store.withdraw(vip).await }
    });
    let (leader_now, _) = tokio::task::block_in_place(|| {
        etcd.wait_leader(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("no new leader: {e}"))
    });
    let election = t.elapsed();
    eprintln!(
        "first withdraw during the election: {:?}",
        withdraw.await.unwrap()
    );
    // As a change through the watch, even if the watch had to move to another member
    // meanwhile: it resumes from its revision, with no gap and no snapshot.
    b.expect("the record gone", |i| match i {
        Input::OwnerChanged {
            vip: v,
            owner: None,
        } if *v == vip => Some(()),
        Input::OwnerSnapshot(s) => panic!("a snapshot instead of the watch resuming: {s:?}"),
        _ => None,
    })
    .await;
    let gone = t.elapsed();
    eprintln!("record gone {gone:?} after the kill (election {election:?})");
    // Retried, the withdraw lands within a few hundred milliseconds of the election's end.
    // Left to the lease, it would land a full TTL (2 s) after it, since a new leader
    // extends every lease: the bound tells the two apart with room for a loaded machine.
    assert!(
        gone < election + Duration::from_millis(1500),
        "withdraw took effect {gone:?} after the kill; election took {election:?}"
    );
    let deadline = Instant::now() + WAIT;
    while !a.store.pending_writes().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", a.store.pending_writes());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The other VIP's record was never touched.
    let changes = owner_changes_for(&mut b, kept, Duration::from_secs(3)).await;
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(b.store.current(kept).await.unwrap().0, Some(kept_owner));
    // A client of a live member: the raw client's balanced channel still tries the dead one.
    let mut raw = etcd_client::Client::connect([etcd.endpoint_of(&leader_now)], None)
        .await
        .unwrap();
    let holders = raw
        .get(
            format!("{prefix}holders/{vip}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert!(holders.kvs().is_empty(), "holder mark went with the lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refused_the_record_is_seen_holding_the_address_by_the_owner() {
    let etcd = cluster();
    let prefix = unique_prefix("ho");
    let endpoints = etcd.endpoints();
    let mut a = Node::start(&cluster_config("be1", &endpoints, &prefix));
    let mut b = Node::start(&cluster_config("be2", &endpoints, &prefix));
    a.expect_connected().await;
    b.expect_connected().await;
    let vip: Vip = "192.0.2.113".parse().unwrap();
    a.store.publish(vip).await.unwrap();
    // B has the address too (a split brain): its publish is fenced, but A hears of it.
    assert!(matches!(
        b.store.publish(vip).await,
        Err(StoreError::Fenced { .. })
    ));
    a.expect("B's holder mark", |i| match i {
        Input::HolderChanged {
            vip: v,
            node,
            holds,
            ..
        } if *v == vip && node == "be2" => holds.then_some(()),
        _ => None,
    })
    .await;
    // The owner's mark says how many front-ends it serves (front-ends size their
    // reconnect jitter by it); a new count is written again by the lease loop.
    a.store.note_followers(vip, 7);
    b.expect("A's mark with its front-ends", |i| match i {
        Input::HolderChanged {
            vip: v,
            node,
            holds: true,
            followers,
        } if *v == vip && node == "be1" => (*followers == 7).then_some(()),
        _ => None,
    })
    .await;
    // A recovery brings front-ends up one after another: the counts that change within a
    // second go in one write, after the recovery, not one write (and one watch event on
    // every node) per front-end.
    for n in 8..=12 {
        a.store.note_followers(vip, n);
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    }
    let mut marks = Vec::new();
    b.expect("A's mark with the last count", |i| match i {
        Input::HolderChanged {
            vip: v,
            node,
            holds: true,
            followers,
        } if *v == vip && node == "be1" => {
            marks.push(*followers);
            (*followers == 12).then_some(())
        }
        _ => None,
    })
    .await;
    assert!(marks.len() <= 2, "a write per count: {marks:?}");
    // B lets go of the address: the mark goes at once.
    b.store.withdraw(vip).await.unwrap();
    a.expect("B's holder mark gone", |i| match i {
        Input::HolderChanged {
            vip: v,
            node,
            holds,
            ..
        } if *v == vip && node == "be2" => (!holds).then_some(()),
        _ => None,
    })
    .await;
    // A's own record was not touched by B's withdraw.
    assert_eq!(
        a.store.current(vip).await.unwrap().0.map(|o| o.node),
        Some("be1".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_edit_read_before_a_delete_and_rewrite_is_refused() {
    use vipsec::store::policies::PolicyStore;
    let server = etcd();
    let prefix = unique_prefix("pv");
    let store = EtcdStore::new(&config("be1", &server.endpoint(), &prefix, "")).unwrap();
    let first = store.put("web", r#"{"name":"web"}"#, 0).await.unwrap();
    // Someone deletes the document and writes a new one under the same name.
    store.delete("web", first.version).await.unwrap();
    let second = store
        .put("web", r#"{"name":"web","v":2}"#, 0)
        .await
        .unwrap();
    assert_ne!(second.version, first.version, "a version is never reused");
    // An edit based on the first document must not overwrite the second.
    let stale = store
        .put("web", r#"{"name":"web","v":1}"#, first.version)
        .await;
    let e = stale.unwrap_err().to_string();
    assert!(e.contains("changed since it was read"), "{e}");
    assert!(store.delete("web", first.version).await.is_err());
    // The current one can be edited.
    let third = store
        .put("web", r#"{"name":"web","v":3}"#, second.version)
        .await
        .unwrap();
    assert!(third.version > second.version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owners_record_is_taken_over_at_once_and_only_as_it_was_judged() {
    let TwoNodes {
        server,
        prefix,
        mut a,
        mut b,
        ..
    } = two_nodes("take", "lease_ttl = \"10s\"");
    a.expect_connected().await;
    b.expect_connected().await;
    let vip: Vip = "192.0.2.118".parse().unwrap();
    let first = a.store.publish(vip).await.unwrap();
    b.expect("A's record", owner_change(vip, Some("be1"))).await;
    // B holds the address too by now (refused: its holder mark is written).
    assert!(matches!(
        b.store.publish(vip).await,
        Err(StoreError::Fenced { .. })
    ));
    a.expect("B's holder mark", |i| match i {
        Input::HolderChanged {
            vip: v,
            node,
            holds: true,
            ..
        } if *v == vip && node == "be2" => Some(()),
        _ => None,
    })
    .await;

    // A tenure other than the one judged is never taken over: here A let go and claimed
    // the VIP again, at a new epoch.
    a.store.withdraw(vip).await.unwrap();
    let second = a.store.publish(vip).await.unwrap();
    assert_eq!(second.epoch, first.epoch + 1);
    match b.store.take_over(vip, &first).await {
        Err(StoreError::Fenced { owner, epoch, .. }) => {
            assert_eq!(owner, "be1");
            assert_eq!(epoch, second.epoch);
        }
        other => panic!("another tenure must not be taken over, got {other:?}"),
    }
    let (now, _) = a.store.current(vip).await.unwrap();
    assert_eq!(now.as_ref(), Some(&second));
    // The same tenure marked draining meanwhile is still the one judged.
    a.store.mark_draining(vip).await.unwrap();
    let judged = second;

    // A dies with 10 s left on its lease; B takes the record it judged, at once.
    a.kill().await;
    let t = Instant::now();
    let taken = b.store.take_over(vip, &judged).await.unwrap();
    assert_eq!(taken.node, "be2");
    assert_eq!(taken.epoch, judged.epoch + 1);
    b.expect("B's record", owner_change(vip, Some("be2"))).await;
    eprintln!(
        "record taken over after {:?} (the lease had 10 s left)",
        t.elapsed()
    );
    let mut c = raw_client(&server).await;
    let marks = c
        .get(
            format!("{prefix}holders/{vip}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let holders: Vec<String> = marks
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    assert!(
        holders.iter().all(|k| !k.ends_with("/be1")),
        "the dead owner's holder mark went with its record: {holders:?}"
    );
    // Taking over again is a no-op for the owner; a second taker with the old record is
    // fenced.
    assert_eq!(b.store.take_over(vip, &judged).await.unwrap(), taken);
    let cfg_c = config("be3", &server.endpoint(), &prefix, "");
    let c3 = EtcdStore::new(&cfg_c).unwrap();
    match c3.take_over(vip, &judged).await {
        Err(StoreError::Fenced { owner, epoch, .. }) => {
            assert_eq!(owner, "be2");
            assert_eq!(epoch, taken.epoch);
        }
        other => panic!("a stale takeover must be fenced, got {other:?}"),
    }
    // The dead owner's lease running out later deletes nothing of B's.
    let kv = c.get(format!("{prefix}vips/{vip}"), None).await.unwrap();
    assert_ne!(kv.kvs()[0].lease(), 0);
    let rec: VipOwner = serde_json::from_slice(kv.kvs()[0].value()).unwrap();
    assert_eq!(rec, taken);
}
