//! Move timelines in a real etcd: marks published by three nodes merge into one timeline per
//! move, live under a day-long lease of their own, and a corrupt record is skipped.

use std::time::Duration;

use etcd_client::GetOptions;
use vipsec::config::Config;
use vipsec::model::Vip;
use vipsec::store::OwnershipStore;
use vipsec::store::etcd::EtcdStore;
use vipsec::timeline::{Mark, NodeMarks};
use vipsec_testbed::etcd::EtcdServer;

fn store(node: &str, endpoint: &str, prefix: &str) -> EtcdStore {
    let text = format!(
        "node = \"{node}\"\n[store]\nbackend = \"etcd\"\nendpoints = [\"{endpoint}\"]\nprefix = \"{prefix}\"\n"
    );
    let config = Config::parse(&text).unwrap_or_else(|p| panic!("{p:?}"));
    EtcdStore::new(&config).expect("store from config")
}

fn marks(vip: Vip, epoch: u64, node: &str, m: &[(Mark, u64)]) -> NodeMarks {
    NodeMarks {
        vip,
        epoch,
        node: node.into(),
        from_node: Some("be1".into()),
        to_node: "be2".into(),
        marks: m.iter().copied().collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_from_three_nodes_merge_expire_and_skip_garbage() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let prefix = format!("/vt-moves-{}/", std::process::id());
    let ep = server.endpoint();
    let (be1, be2, fe1) = (
        store("be1", &ep, &prefix),
        store("be2", &ep, &prefix),
        store("fe1", &ep, &prefix),
    );
    let vip: Vip = "192.0.2.100".parse().unwrap();
    let other: Vip = "2001:db8::5".parse().unwrap();

    be1.publish_marks(&marks(vip, 7, "be1", &[(Mark::Released, 100)]))
        .await
        .unwrap();
    be2.publish_marks(&marks(
        vip,
        7,
        "be2",
        &[(Mark::Usable, 600), (Mark::EpochRecorded, 602)],
    ))
    .await
    .unwrap();
    // A front-end publishes as it goes: the second write replaces the first.
    fe1.publish_marks(&marks(vip, 7, "fe1", &[(Mark::FirstIkeSaInit, 610)]))
        .await
        .unwrap();
    fe1.publish_marks(&marks(
        vip,
        7,
        "fe1",
        &[
            (Mark::InitiationQueued, 606),
            (Mark::FirstIkeSaInit, 610),
            (Mark::ChildSaInstalled, 650),
            (Mark::FirstTraffic, 900),
        ],
    ))
    .await
    .unwrap();
    // An older move, and another VIP's.
    be2.publish_marks(&marks(vip, 6, "be2", &[(Mark::Usable, 1)]))
        .await
        .unwrap();
    be2.publish_marks(&marks(other, 1, "be2", &[(Mark::Usable, 1)]))
        .await
        .unwrap();

    let mut raw = etcd_client::Client::connect([ep.as_str()], None)
        .await
        .unwrap();
    raw.put(
        format!("{prefix}moves/{vip}/00000000000000000007/fe2"),
        "{garbage",
        None,
    )
    .await
    .unwrap();

    let moves = fe1.moves(Some(vip)).await.unwrap();
    assert_eq!(
        moves.iter().map(|m| m.epoch).collect::<Vec<_>>(),
        vec![6, 7]
    );
    let t = &moves[1];
    assert!(t.complete(), "{}", t.summary());
    assert_eq!(t.marks[&Mark::Released], ("be1".to_string(), 100));
    assert_eq!(t.marks[&Mark::FirstTraffic], ("fe1".to_string(), 900));
    assert_eq!(t.recovery(), Some(Duration::from_millis(800)));
    eprintln!("[timeline] {}", t.summary());
    assert_eq!(be1.moves(None).await.unwrap().len(), 3);

    // One move alone, as a node following it reads it: only its own keys.
    let one = fe1.move_timeline(vip, 7).await.unwrap().expect("move 7");
    assert_eq!(one.epoch, 7);
    assert_eq!(one.marks, t.marks);
    assert_eq!(fe1.move_timeline(vip, 6).await.unwrap().unwrap().epoch, 6);
    assert!(fe1.move_timeline(vip, 70).await.unwrap().is_none());
    assert!(fe1.move_timeline(other, 7).await.unwrap().is_none());

    // Every record sits under a lease of about a day.
    let resp = raw
        .get(
            format!("{prefix}moves/{vip}/00000000000000000007/be2"),
            Some(GetOptions::new()),
        )
        .await
        .unwrap();
    let lease = resp.kvs()[0].lease();
    assert_ne!(lease, 0, "move marks without a lease never expire");
    let ttl = raw.lease_time_to_live(lease, None).await.unwrap().ttl();
    assert!(
        (23 * 3600..=24 * 3600).contains(&ttl),
        "lease TTL {ttl}s, want about a day"
    );
}

/// A storm moves many VIPs at once: their marks are written and read back in batches larger
/// than one etcd transaction may hold (128 operations by default), and each move comes back
/// in the order asked, `None` where no node recorded it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_of_many_moves_are_written_and_read_in_batches() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let prefix = format!("/vt-moves-batch-{}/", std::process::id());
    let ep = server.endpoint();
    let (be2, fe1) = (store("be2", &ep, &prefix), store("fe1", &ep, &prefix));
    let vips: Vec<Vip> = (0..150u32)
        .map(|i| Vip::from(std::net::Ipv4Addr::from(0xc000_0200 + i)))
        .collect();

    let owner: Vec<NodeMarks> = vips
        .iter()
        .map(|v| marks(*v, 3, "be2", &[(Mark::Usable, 600)]))
        .collect();
    be2.publish_marks_batch(&owner).await.unwrap();
    let front: Vec<NodeMarks> = vips
        .iter()
        .enumerate()
        .map(|(i, v)| marks(*v, 3, "fe1", &[(Mark::FirstIkeSaInit, 700 + i as u64)]))
        .collect();
    fe1.publish_marks_batch(&front).await.unwrap();

    // Asked in reverse, with a move nobody recorded in the middle.
    let mut asked: Vec<(Vip, u64)> = vips.iter().rev().map(|v| (*v, 3)).collect();
    asked.insert(75, (vips[0], 2));
    let read = fe1.move_timelines(&asked).await.unwrap();
    assert_eq!(read.len(), asked.len());
    for ((vip, epoch), t) in asked.iter().zip(&read) {
        if *epoch == 2 {
            assert!(t.is_none(), "move {vip} epoch 2 was never recorded: {t:?}");
            continue;
        }
        let t = t
            .as_ref()
            .unwrap_or_else(|| panic!("move of {vip} not read"));
        assert_eq!((t.vip, t.epoch), (*vip, 3));
        let i = vips.iter().position(|v| v == vip).unwrap() as u64;
        let at = |m: Mark| t.marks.get(&m).map(|(_, ms)| *ms);
        assert_eq!(at(Mark::Usable), Some(600), "{t:?}");
        assert_eq!(at(Mark::FirstIkeSaInit), Some(700 + i), "{t:?}");
    }
    // One move alone reads the same as in a batch.
    let one = be2.move_timeline(vips[149], 3).await.unwrap();
    assert_eq!(one.as_ref(), read[0].as_ref());
    assert!(be2.move_timeline(vips[0], 2).await.unwrap().is_none());
}
