//! The three-member etcd cluster the agent's leader-election tests stand on: a leader is
//! found, a killed or frozen leader is replaced by a survivor, and a restarted member
//! rejoins.

use std::time::{Duration, Instant};

use vipsec_testbed::etcd_cluster::EtcdCluster;
use vipsec_testbed::process::wait_for;

fn all_healthy(cluster: &EtcdCluster) -> bool {
    cluster.member_names().iter().all(|n| cluster.healthy(n))
}

#[test]
fn killed_leader_is_replaced_and_rejoins_after_restart() -> anyhow::Result<()> {
    vipsec_testbed::require_program("etcd")?;
    let t0 = Instant::now();
    let mut cluster = EtcdCluster::start()?;
    eprintln!("cluster up in {:?}", t0.elapsed());

    let names = cluster.member_names();
    let endpoints = cluster.endpoints();
    assert_eq!(names.len(), 3);
    assert_eq!(endpoints.len(), 3);
    for (name, endpoint) in names.iter().zip(&endpoints) {
        assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
        assert_eq!(&cluster.endpoint_of(name), endpoint);
    }
    let mut distinct = endpoints.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{endpoints:?}");
    assert!(all_healthy(&cluster));

    let old = cluster.leader()?;
    assert!(names.contains(&old), "{old} not in {names:?}");

    cluster.kill(&old);
    let (new, election) = cluster.wait_leader(Duration::from_secs(10))?;
    eprintln!("{old} killed; {new} leads after {election:?}");
    assert_ne!(new, old);
    assert!(!cluster.healthy(&old));
    assert_eq!(cluster.leader()?, new);

    let t = Instant::now();
    cluster.restart(&old)?;
    eprintln!("{old} back in {:?}", t.elapsed());
    wait_for("all three members healthy", Duration::from_secs(10), || {
        all_healthy(&cluster).then_some(())
    })?;
    let (leader, _) = cluster.wait_leader(Duration::from_secs(10))?;
    eprintln!("after the rejoin {leader} leads; total {:?}", t0.elapsed());
    Ok(())
}

#[test]
fn frozen_leader_is_replaced_and_steps_down_when_thawed() -> anyhow::Result<()> {
    vipsec_testbed::require_program("etcd")?;
    let cluster =
        EtcdCluster::start_with_args(&["--heartbeat-interval=50", "--election-timeout=500"])?;
    let (old, _) = cluster.wait_leader(Duration::from_secs(10))?;

    cluster.freeze(&old)?;
    let (new, election) = cluster.wait_leader(Duration::from_secs(10))?;
    eprintln!("{old} frozen; {new} leads after {election:?} (election timeout 500 ms)");
    assert_ne!(new, old);
    assert!(!cluster.healthy(&old));

    cluster.thaw(&old)?;
    let t = Instant::now();
    wait_for("all three members healthy", Duration::from_secs(10), || {
        all_healthy(&cluster).then_some(())
    })?;
    let (leader, _) = cluster.wait_leader(Duration::from_secs(10))?;
    eprintln!(
        "{old} thawed; all healthy after {:?}, {leader} leads",
        t.elapsed()
    );
    Ok(())
}
