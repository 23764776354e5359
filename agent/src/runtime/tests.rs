//! The runtime in one process, on paused time: real core loop, lanes, pacer and fences,
//! with in-memory keying, kernel, addresses and a shared embedded store standing in for the
//! outside systems. Each test is a scenario a network-namespace test could only reach by
//! luck of timing: what is fenced, and what answers a command.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{AgentHandle, Backends, CommandError, EventRecord, Runtime, Starting, StatusView};
use crate::addrwatch::memory::{FixedHolder, MemoryAddresses};
use crate::config::Config;
use crate::failover::{HolderAnswer, NoticeKind, SaRef};
use crate::kernel::memory::MemoryKernel;
use crate::keying::memory::{Hold, KeyingCall, MemoryIkeProbe, MemoryKeying};
use crate::model::{Vip, VipRole};
use crate::store::OwnershipStore;
use crate::store::embedded::EmbeddedStore;
use crate::store::policies::LocalPolicies;

/// Long enough for anything the runtime does on its own; time is paused, so waiting costs
/// nothing and the deadline only bounds a test that went wrong.
const DEADLINE: Duration = Duration::from_secs(60);

fn vip() -> Vip {
    "192.0.2.100".parse().unwrap()
}

struct Node {
    handle: AgentHandle,
    keying: Arc<MemoryKeying>,
    addrs: Arc<MemoryAddresses>,
    events: broadcast::Receiver<EventRecord>,
    cancel: CancellationToken,
    runtime: Runtime,
}

async fn start(config: &str, store: EmbeddedStore, keying: MemoryKeying) -> Node {
    start_with(
        config,
        store,
        keying,
        LocalPolicies::new("test", Vec::new()),
    )
    .await
}

async fn start_with(
    config: &str,
    store: EmbeddedStore,
    keying: MemoryKeying,
    policies: LocalPolicies,
) -> Node {
    let config = Config::parse(config).expect("valid config");
    let keying = Arc::new(keying);
    let addrs = Arc::new(MemoryAddresses::default());
    let backends = Backends {
        store: Arc::new(store),
        watcher: addrs.clone(),
        holder: Arc::new(FixedHolder(HolderAnswer::Unknown("in memory".into()))),
        ike_probe: Arc::new(MemoryIkeProbe::default()),
        keying: keying.clone(),
        kernel: Arc::new(MemoryKernel::default()),
        policies: Arc::new(policies),
    };
    let cancel = CancellationToken::new();
    let starting = Starting::new(config, backends, None, cancel.clone())
        .await
        .expect("runtime starts");
    let events = starting.handle().subscribe();
    let runtime = starting.launch();
    Node {
        handle: runtime.handle().clone(),
        keying,
        addrs,
        events,
        cancel,
        runtime,
    }
}

impl Node {
    /// How many calls to the keying daemon `f` picks.
    fn calls_of(&self, f: impl Fn(&KeyingCall) -> bool) -> usize {
        self.keying.calls().iter().filter(|c| f(c)).count()
    }

    async fn status(&self, what: &str, f: impl Fn(&StatusView) -> bool) -> StatusView {
        self.handle
            .wait_status(DEADLINE, f)
            .await
            .unwrap_or_else(|| panic!("status never showed {what}: {:#?}", self.handle.status()))
    }

    /// The next event of `kind` for the VIP.
    async fn event(&mut self, kind: NoticeKind) -> EventRecord {
        tokio::time::timeout(DEADLINE, async {
            loop {
                match self.events.recv().await {
                    Ok(e) if e.notice.kind == kind && e.moved.is_none() => return e,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => panic!("event stream closed"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {} event", kind.as_str()))
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.runtime.wait().await.expect("clean stop");
    }
}

fn hosted_owner(s: &StatusView, node: &str) -> bool {
    s.hosted
        .iter()
        .any(|h| h.owner.as_ref().is_some_and(|o| o.node == node))
}

fn peer_epoch(s: &StatusView) -> u64 {
    s.peers.first().map_or(0, |p| p.epoch)
}

const BACKEND: &str = "node = \"be1\"\n\
    [failover]\ndrain_hold = \"1h\"\n\
    [[hosted_vip]]\naddress = \"192.0.2.100\"\n";

const FRONTEND: &str = "node = \"fe1\"\n\
    [failover.reconnect]\njitter = \"0s\"\n\
    [[peer_vip]]\naddress = \"192.0.2.100\"\nconnection = \"mail\"\n";

fn hosted_sas(n: u64) -> Vec<SaRef> {
    (1..=n)
        .map(|ike_id| SaRef {
            vip: vip(),
            role: VipRole::Hosted,
            ike_id,
        })
        .collect()
}

/// The front-end's IKE_SA with the VIP's first owner.
fn peer_sa() -> SaRef {
    SaRef {
        vip: vip(),
        role: VipRole::Peer,
        ike_id: 1,
    }
}

#[tokio::test(start_paused = true)]
async fn a_drain_is_answered_by_the_delete_its_own_decision_named() {
    let store = EmbeddedStore::new("be1".into());
    let be1 = start(
        BACKEND,
        store.for_node("be1"),
        MemoryKeying::new(hosted_sas(2)),
    )
    .await;
    be1.addrs.add(vip());
    be1.status("be1 owning the VIP", |s| hosted_owner(s, "be1"))
        .await;

    assert_eq!(be1.handle.drain(vip()).await.expect("drained"), 2);
    assert!(
        be1.keying.calls().contains(&KeyingCall::DeleteSas {
            vip: vip(),
            role: VipRole::Hosted
        }),
        "{:?}",
        be1.keying.calls()
    );
    be1.status("the record withdrawn", |s| s.hosted[0].owner.is_none())
        .await;
    assert_eq!(store.current(vip()).await.unwrap().0, None);

    // A VIP this node does not host is refused before the core is asked.
    let other: Vip = "192.0.2.101".parse().unwrap();
    assert!(matches!(
        be1.handle.drain(other).await,
        Err(CommandError::NotHosted(v)) if v == other
    ));
    be1.stop().await;
}

/// A refused SA is deleted at once, even while its VIP's lane waits for something else (a
/// drain's delete hanging in the daemon here; a store call in an etcd leader election in
/// the lab, where the DELETE came after the VIP had left and never reached the front-end).
#[tokio::test(start_paused = true)]
async fn a_refused_sa_is_deleted_while_its_vips_lane_is_busy() {
    let store = EmbeddedStore::new("be1".into());
    let be1 = start(
        BACKEND,
        store.for_node("be1"),
        MemoryKeying::new(hosted_sas(1)),
    )
    .await;
    be1.addrs.add(vip());
    be1.status("be1 owning the VIP", |s| hosted_owner(s, "be1"))
        .await;
    be1.keying.hold(Hold::DeleteSas);
    let drain = tokio::spawn({
        let h = be1.handle.clone();
        async move { h.drain(vip()).await }
    });
    be1.keying
        .wait_call(DEADLINE, |c| matches!(c, KeyingCall::DeleteSas { .. }))
        .await
        .expect("the drain's delete reached the daemon");
    // A front-end comes straight back; the draining VIP refuses its SA.
    be1.keying
        .bring_up(SaRef {
            vip: vip(),
            role: VipRole::Hosted,
            ike_id: 7,
        })
        .await;
    be1.keying
        .wait_call(DEADLINE, |c| *c == KeyingCall::Terminate(7))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the refused SA waited behind the drain's delete: {:?}",
                be1.keying.calls()
            )
        });
    be1.keying.release(Hold::DeleteSas);
    drain.await.unwrap().expect("drained");
    be1.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_delete_decided_before_the_vip_moved_on_is_fenced_and_the_drain_told_so() {
    let store = EmbeddedStore::new("be1".into());
    let mut be1 = start(
        BACKEND,
        store.for_node("be1"),
        MemoryKeying::new(hosted_sas(2)),
    )
    .await;
    be1.addrs.add(vip());
    be1.status("be1 owning the VIP", |s| hosted_owner(s, "be1"))
        .await;

    // The first drain's delete hangs in the daemon (a paused node, a slow charon); a
    // second drain is decided meanwhile, under the same epoch 1.
    be1.keying.hold(Hold::DeleteSas);
    let first = tokio::spawn({
        let h = be1.handle.clone();
        async move { h.drain(vip()).await }
    });
    be1.keying
        .wait_call(DEADLINE, |c| matches!(c, KeyingCall::DeleteSas { .. }))
        .await
        .expect("the first delete reached the daemon");
    be1.event(NoticeKind::Drained).await;
    let second = tokio::spawn({
        let h = be1.handle.clone();
        async move { h.drain(vip()).await }
    });
    be1.event(NoticeKind::Drained).await;

    // Then the VIP moves on: be2 is its owner at epoch 2.
    let moved = store
        .for_node("be2")
        .publish(vip())
        .await
        .expect("be2 publishes");
    assert_eq!(moved.epoch, 2);
    be1.status("be2 recorded at epoch 2", |s| hosted_owner(s, "be2"))
        .await;

    be1.keying.release(Hold::DeleteSas);
    assert_eq!(first.await.unwrap().expect("the first drain ran"), 2);
    let fenced = match second.await.unwrap() {
        Err(CommandError::Fenced(f)) => f,
        other => panic!("the second drain was not fenced: {other:?}"),
    };
    assert_eq!(fenced.decided, 1);
    assert_eq!(fenced.now, "the store is at epoch 2 (owner be2)");
    let notice = be1.event(NoticeKind::ActionFenced).await.notice;
    assert!(
        notice.detail.starts_with("delete: decided under epoch 1"),
        "{notice:?}"
    );
    let deletes = be1.calls_of(|c| matches!(c, KeyingCall::DeleteSas { .. }));
    assert_eq!(deletes, 1, "{:?}", be1.keying.calls());
    be1.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_initiation_decided_under_an_older_owner_is_not_started() {
    let store = EmbeddedStore::new("be1".into());
    store.publish(vip()).await.expect("be1 publishes");
    let mut fe = start(
        FRONTEND,
        store.for_node("fe1"),
        MemoryKeying::new(vec![peer_sa()]),
    )
    .await;
    fe.status("be1 at epoch 1", |s| peer_epoch(s) == 1).await;

    // be2 takes the VIP: the front-end drops the stale SA (which hangs, keeping the VIP's
    // lane busy) and decides an initiation under epoch 2, queued behind the drop.
    fe.keying.hold(Hold::DropSas);
    store
        .for_node("be2")
        .publish(vip())
        .await
        .expect("be2 publishes");
    fe.keying
        .wait_call(DEADLINE, |c| matches!(c, KeyingCall::DropSas { .. }))
        .await
        .expect("the drop reached the daemon");
    // Before that initiation can start, be3 takes the VIP at epoch 3: the core decides
    // again, and what it knows now is epoch 3.
    store
        .for_node("be3")
        .publish(vip())
        .await
        .expect("be3 publishes");
    fe.status("be3 at epoch 3", |s| peer_epoch(s) == 3).await;

    fe.keying.release(Hold::DropSas);
    let notice = fe.event(NoticeKind::ActionFenced).await.notice;
    assert_eq!(
        notice.detail,
        "initiate: decided under epoch 2; the owner is now at epoch 3"
    );
    fe.status("protection back toward be3", |s| {
        s.peers[0].owner.as_ref().is_some_and(|o| o.node == "be3") && !s.peers[0].renegotiating
    })
    .await;
    let initiations = fe.calls_of(|c| matches!(c, KeyingCall::Initiate { .. }));
    assert_eq!(initiations, 1, "{:?}", fe.keying.calls());
    fe.stop().await;
}

/// After a crash, the attempt a front-end started toward the VIP in transit can complete
/// with the new owner while the drop decided on its record is still listing SAs. The drop
/// spares that SA: before, the 20-front-end bench lost it 70 ms after it came up and paid
/// for another IKE_SA.
#[tokio::test(start_paused = true)]
async fn an_sa_that_comes_up_while_a_drop_is_on_its_way_is_spared() {
    let store = EmbeddedStore::new("be1".into());
    store.publish(vip()).await.expect("be1 publishes");
    let keying = MemoryKeying::new(Vec::new());
    keying.hold(Hold::Initiate);
    let mut fe = start(FRONTEND, store.for_node("fe1"), keying).await;
    fe.keying
        .wait_call(DEADLINE, |c| matches!(c, KeyingCall::Initiate { .. }))
        .await
        .expect("an attempt toward be1 is out");

    // be2 takes the VIP over: the attempt out is aborted by a drop, which hangs in the
    // daemon for a while (a slow listing).
    fe.keying.hold(Hold::DropSas);
    store
        .for_node("be2")
        .publish(vip())
        .await
        .expect("be2 publishes");
    fe.keying
        .wait_call(DEADLINE, |c| matches!(c, KeyingCall::DropSas { .. }))
        .await
        .expect("the drop reached the daemon");
    // Meanwhile the attempt completes (its retransmission reached be2).
    fe.keying.release(Hold::Initiate);
    let up = fe.event(NoticeKind::SaUp).await.notice;
    assert_eq!(up.epoch, 2, "{up:?}");
    fe.keying.release(Hold::DropSas);

    fe.status("protection back toward be2", |s| {
        s.peers[0].owner.as_ref().is_some_and(|o| o.node == "be2") && !s.peers[0].renegotiating
    })
    .await;
    // On the paused clock this returns once every task is idle: the drop is through.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(fe.keying.sas().len(), 1, "{:?}", fe.keying.calls());
    assert!(!fe.handle.status().peers[0].renegotiating);
    let initiations = fe.calls_of(|c| matches!(c, KeyingCall::Initiate { .. }));
    assert_eq!(initiations, 1, "{:?}", fe.keying.calls());
    fe.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_policy_rolls_out_toward_the_owner_of_record_and_follows_the_vip() {
    let dir = tempfile::tempdir().unwrap();
    let psk = dir.path().join("psk");
    std::fs::write(&psk, "a secret shared by the cluster's nodes").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = format!(
        "node = \"fe1\"\n\
         [failover.reconnect]\njitter = \"0s\"\n\
         [keying]\nbackend = \"strongswan\"\n\
         [kernel]\nbackend = \"xfrm\"\n\
         [policy]\nmanaged = true\nroute_rules = false\npsk_file = \"{}\"\n\
         [[peer_vip]]\naddress = \"192.0.2.100\"\n",
        psk.display()
    );
    let store = EmbeddedStore::new("be1".into());
    store.publish(vip()).await.expect("be1 publishes");
    let fe = start_with(
        &config,
        store.for_node("fe1"),
        MemoryKeying::new(vec![peer_sa()]),
        LocalPolicies::new("test", Vec::new()),
    )
    .await;
    fe.status("be1 at epoch 1", |s| peer_epoch(s) == 1).await;
    assert!(fe.keying.connections().is_empty());

    // An operator applies the cluster policy: the connection is loaded, requiring the
    // owner of record as the peer.
    let policy = crate::policy::Policy::parse_toml(include_str!(
        "../../../deploy/examples/policy-mail.toml"
    ))
    .expect("the example policy parses")
    .policy;
    let p = fe.handle.policies().expect("policies managed");
    p.store()
        .put(&policy.name, &policy.to_json(), 0)
        .await
        .expect("stored");
    let loaded = fe
        .keying
        .wait_call(DEADLINE, |c| matches!(c, KeyingCall::LoadConnection(_)))
        .await
        .unwrap_or_else(|| panic!("no connection loaded: {:#?}", p.view().vips));
    assert_eq!(
        loaded,
        KeyingCall::LoadConnection("vipsec-mail-192-0-2-100-to-be1".into())
    );

    // The VIP moves: the initiation toward be2 uses a connection that requires be2.
    store
        .for_node("be2")
        .publish(vip())
        .await
        .expect("be2 publishes");
    let initiated = fe
        .keying
        .wait_call(DEADLINE, |c| matches!(c, KeyingCall::Initiate { .. }))
        .await
        .expect("an initiation");
    assert_eq!(
        initiated,
        KeyingCall::Initiate {
            vip: vip(),
            connection: "vipsec-mail-192-0-2-100-to-be2".into()
        }
    );
    assert!(
        fe.keying
            .connections()
            .contains("vipsec-mail-192-0-2-100-to-be2")
    );
    assert!(
        !fe.keying
            .connections()
            .contains("vipsec-mail-192-0-2-100-to-be1")
    );
    fe.stop().await;
}

/// The whole cluster in one process: two back-ends and a front-end share one store. A
/// planned move is carried out end to end, and each node's move lane leaves its marks.
#[tokio::test(start_paused = true)]
async fn a_planned_move_in_one_process_ends_with_the_moves_timeline() {
    let store = EmbeddedStore::new("be1".into());
    let be1 = start(BACKEND, store.for_node("be1"), MemoryKeying::default()).await;
    let be2 = start(
        &BACKEND.replace("be1", "be2"),
        store.for_node("be2"),
        MemoryKeying::default(),
    )
    .await;
    be1.addrs.add(vip());
    be1.status("be1 owning the VIP", |s| hosted_owner(s, "be1"))
        .await;
    let mut fe = start(
        FRONTEND,
        store.for_node("fe1"),
        MemoryKeying::new(vec![peer_sa()]),
    )
    .await;
    fe.status("be1 at epoch 1", |s| peer_epoch(s) == 1).await;

    // The cluster manager's planned move: drain, the address goes, the next node takes it.
    be1.handle.drain(vip()).await.expect("drained");
    be1.addrs.remove(vip());
    be2.addrs.add(vip());
    be2.status("be2 owning the VIP", |s| hosted_owner(s, "be2"))
        .await;
    fe.keying
        .wait_call(DEADLINE, |c| matches!(c, KeyingCall::Initiate { .. }))
        .await
        .expect("the front-end initiated toward the new owner");
    // `move-completed` rides on an event with the store's timeline attached.
    let moved = tokio::time::timeout(DEADLINE, async {
        loop {
            match fe.events.recv().await {
                Ok(e) if e.moved.is_some() => return e,
                Err(broadcast::error::RecvError::Closed) => panic!("event stream closed"),
                _ => {}
            }
        }
    })
    .await
    .expect("a move-completed event");
    let t = moved.moved.expect("a timeline");
    assert_eq!((t.epoch, t.to_node.as_str()), (2, "be2"));
    assert_eq!(t.from_node.as_deref(), Some("be1"));
    let listed = fe.handle.moves(Some(vip())).await;
    assert!(
        listed.iter().any(|m| m.epoch == 2 && m.to_node == "be2"),
        "{listed:?}"
    );
    for node in [be1, be2, fe] {
        node.stop().await;
    }
}
