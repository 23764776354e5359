//! vipsec (etcd store, fast mode, idle timeout 1 s) against faults beyond a plain crash or
//! planned move: the store down, a front-end's charon or agent dying, a partition, packet
//! loss, a flapping VIP, a front-end behind NAT. Each shows traffic back to the VIP's owner,
//! no clear text on the wire and no answer from a node that no longer owns the VIP.
//! Needs the `vipsec` binary built in the same target directory (`cargo build -p vipsec`).

mod common;

use std::time::Duration;

use serde_json::Value;
use vipsec_chaos::clock::{now_ns, secs, since};
use vipsec_chaos::lab::faults::{self, Fault};
use vipsec_chaos::lab::topology::has_addr;
use vipsec_chaos::lab::{Lab, Role, Setup};
use vipsec_testbed::process::wait_for;

const CAP: Duration = Duration::from_secs(20);
const VIP: &str = "192.0.2.100";

fn status(lab: &Lab, node: &str) -> anyhow::Result<Value> {
    lab.agent_json(node, &["status"])
}

/// Waits until `fe` got an answer from `owner` to an attempt started at or after `t`;
/// returns when that answer came, as time since `t`.
fn first_answer(lab: &mut Lab, fe: &str, owner: &str, t: u64, cap: Duration) -> Duration {
    wait_for(&format!("{fe} answered by {owner}"), cap, || {
        lab.poll_probes().ok()?;
        let p = lab.probes().iter().find(|p| p.fe == fe)?;
        p.since(t)
            .filter(|r| r.node.as_deref() == Some(owner))
            .map(|r| r.end)
            .min()
            .map(|end| since(t, end))
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until `fe` has `n` finished attempts started at or after `t`; returns how many
/// of them were answered.
fn answered_of_next(lab: &mut Lab, fe: &str, t: u64, n: usize) -> usize {
    wait_for("probe records", Duration::from_secs(30), || {
        lab.poll_probes().ok()?;
        let p = lab.probes().iter().find(|p| p.fe == fe)?;
        let recs: Vec<_> = p.since(t).take(n).collect();
        (recs.len() == n).then(|| recs.iter().filter(|r| r.ok()).count())
    })
    .expect("the probe keeps writing")
}

/// Answers from any node but `owner` to attempts started at or after `t`.
fn stale_answers(lab: &mut Lab, owner: &str, t: u64) -> Vec<String> {
    lab.poll_probes().expect("probe records");
    lab.probes()
        .iter()
        .flat_map(|p| p.since(t))
        .filter(|r| r.ok() && r.node.as_deref() != Some(owner))
        .map(|r| format!("{} answered by {:?}", r.fe, r.node))
        .collect()
}

/// Keeps the probes running for `d` more and then checks no answer came from elsewhere.
fn assert_no_stale_answers(lab: &mut Lab, owner: &str, t: u64, d: Duration) {
    let until = now_ns() + d.as_nanos() as u64;
    let _ = wait_for("the settle window", d + Duration::from_secs(5), || {
        lab.poll_probes().ok()?;
        lab.probes()
            .iter()
            .all(|p| p.records.last().is_some_and(|r| r.start >= until))
            .then_some(())
    });
    let stale = stale_answers(lab, owner, t);
    assert!(stale.is_empty(), "answers not from {owner}: {stale:?}");
}

fn assert_no_cleartext(
    lab: &Lab,
    before: vipsec_chaos::lab::cleartext::ClearText,
    since_wall: f64,
) {
    let leaked = lab.cleartext().expect("counters").minus(before);
    assert_eq!(
        leaked.total(),
        0,
        "clear text on the wire: {leaked:?}\n{}",
        lab.cleartext_packets_since(since_wall).join("\n")
    );
}

/// Waits until every named agent records `owner` for the VIP with a healthy store; returns
/// their epochs.
fn wait_agents_agree(lab: &Lab, nodes: &[String], owner: &str, cap: Duration) -> Vec<u64> {
    let mut last = String::new();
    wait_for("agents recording the new owner", cap, || {
        let mut epochs = Vec::new();
        last.clear();
        for n in nodes {
            let s = status(lab, n).ok()?;
            let rec = common::recorded_owner(&s, VIP);
            last += &format!(
                " {n}: store healthy {}, owner {rec:?};",
                common::store_healthy(&s)
            );
            match rec {
                Some((o, e)) if o == owner && common::store_healthy(&s) => epochs.push(e),
                _ => return None,
            }
        }
        Some(epochs)
    })
    .unwrap_or_else(|e| panic!("{e} (last:{last})"))
}

fn live_nodes(lab: &Lab, dead: &str) -> Vec<String> {
    lab.names(Role::FrontEnd)
        .into_iter()
        .chain(lab.names(Role::BackEnd))
        .filter(|n| n != dead)
        .collect()
}

#[test]
fn crash_while_etcd_is_frozen_recovers_by_the_idle_detector() {
    let _t = common::start("crash while etcd is frozen");
    let mut lab = common::lab(Setup::VipsecEtcd);
    let frozen = now_ns();
    lab.freeze_etcd().unwrap();
    let nodes = live_nodes(&lab, "");
    let noticed = wait_for("every agent to see the store down", CAP, || {
        nodes
            .iter()
            .all(|n| status(&lab, n).is_ok_and(|s| !common::store_healthy(&s)))
            .then(now_ns)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "[measured] etcd frozen: every agent reports the store down after {}",
        secs(since(frozen, noticed))
    );
    let o = common::run(&mut lab, Fault::Crash, CAP);
    // The store had no part in this recovery: no front-end learnt the new owner from it.
    for fe in lab.names(Role::FrontEnd) {
        let rec = common::recorded_owner(&status(&lab, &fe).unwrap(), VIP);
        assert!(
            rec.as_ref().is_none_or(|(n, _)| *n != o.to),
            "{fe} knew the new owner from a frozen store: {rec:?}"
        );
    }
    let thawed = now_ns();
    lab.thaw_etcd().unwrap();
    common::assert_safe(&o);
    common::assert_recovered(&o, CAP);

    let nodes = live_nodes(&lab, &o.from);
    let epochs = wait_agents_agree(&lab, &nodes, &o.to, CAP);
    eprintln!(
        "[measured] etcd thawed: every agent sees the store healthy and {} as owner (epochs {epochs:?}) after {}",
        o.to,
        secs(since(thawed, now_ns()))
    );
}

#[test]
fn front_end_charon_killed_fails_secure_and_recovers_when_restarted() {
    let _t = common::start("front-end charon killed and restarted");
    let mut lab = common::lab(Setup::VipsecEtcd);
    let owner = lab.owner().unwrap();
    let vip = lab.vips[0];
    // The guard stands before anything fails: there is no window between charon's death
    // (its TUN and table-220 routes go with it) and a block the agent would add then.
    common::wait_guard_held(&lab, "fe1", vip, None, CAP).unwrap_or_else(|e| panic!("{e}"));
    let before = lab.cleartext().unwrap();
    let wall = common::wall_now();
    lab.kill_charon("fe1");
    let killed = now_ns();

    // The probe keeps trying while charon is down: 50 attempts, none answered, none in
    // clear text.
    let answered = answered_of_next(&mut lab, "fe1", killed, 50);
    assert_eq!(answered, 0, "fe1 got answers without charon");
    assert_no_cleartext(&lab, before, wall);
    let down = status(&lab, "fe1").unwrap();
    assert_eq!(
        down["fail_secure"]["engaged"], true,
        "fail-secure not engaged with charon down: {down}"
    );
    let down_for = since(killed, now_ns());

    let restarted = now_ns();
    lab.restart_charon("fe1").unwrap();
    let back = first_answer(&mut lab, "fe1", &owner, restarted, CAP);
    eprintln!(
        "[measured] charon down {}; fe1 answered through the tunnel {} after the restart",
        secs(down_for),
        secs(back)
    );
    // The guard is never released: with the SA back it is still engaged and held.
    common::wait_guard_held(&lab, "fe1", vip, None, CAP).unwrap_or_else(|e| panic!("{e}"));
    lab.wait_steady(CAP).unwrap();
    assert_no_stale_answers(&mut lab, &owner, killed, Duration::from_secs(1));
    assert_no_cleartext(&lab, before, wall);
}

#[test]
fn front_end_agent_killed_during_a_failover_recovers() {
    let _t = common::start("front-end agent killed during a failover");
    let mut lab = common::lab(Setup::VipsecEtcd);
    let o = vipsec_chaos::scenario::run_with(&mut lab, Fault::Crash, CAP, |lab| {
        lab.kill_agent("fe1");
        lab.progress.step("fe1's agent killed");
        // The agent stays dead for a second: the fault, not a synchronisation.
        std::thread::sleep(Duration::from_secs(1));
        lab.restart_agent("fe1")?;
        lab.progress.step("fe1's agent restarted");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("scenario: {e:#}"));
    eprintln!("[outcome] {}", o.summary());
    common::assert_safe(&o);
    common::assert_recovered(&o, CAP);
    let epochs = wait_agents_agree(&lab, &["fe1".to_string()], &o.to, CAP);
    eprintln!(
        "[measured] fe1's restarted agent records {} (epoch {epochs:?})",
        o.to
    );
}

#[test]
fn partition_between_front_end_and_owner_fails_closed_then_heals() {
    let _t = common::start("partition fe1 | owner, then heal");
    let mut lab = common::lab(Setup::VipsecEtcd);
    let owner = lab.owner().unwrap();
    let fe1 = lab.topo.node("fe1").hub_port.clone();
    let be = lab.topo.node(&owner).hub_port.clone();
    let before = lab.cleartext().unwrap();
    let wall = common::wall_now();
    let cut = now_ns();
    faults::partition(&lab.topo.hub, &fe1, &be).unwrap();

    // Long enough for fe1's idle detector (1 s) to fire and its renegotiation to fail.
    let answered = answered_of_next(&mut lab, "fe1", cut + 100_000_000, 150);
    assert_eq!(answered, 0, "fe1 got answers across the partition");
    let fe2_ok = answered_of_next(&mut lab, "fe2", cut, 50);
    assert_no_cleartext(&lab, before, wall);
    let fe1_status = status(&lab, "fe1").unwrap();
    eprintln!(
        "[measured] partitioned {}: fe1 answered 0 of 150, fe2 {fe2_ok} of 50; fe1 fail-secure engaged {}",
        secs(since(cut, now_ns())),
        fe1_status["fail_secure"]["engaged"]
    );

    let healed = now_ns();
    faults::heal(&lab.topo.hub).unwrap();
    let back = first_answer(&mut lab, "fe1", &owner, healed, CAP);
    eprintln!(
        "[measured] fe1 answered by {owner} {} after heal",
        secs(back)
    );
    lab.wait_steady(CAP).unwrap();
    assert_no_stale_answers(&mut lab, &owner, cut, Duration::from_secs(1));
    assert_no_cleartext(&lab, before, wall);
}

#[test]
fn crash_under_five_percent_packet_loss_recovers() {
    let _t = common::start("crash under 5% packet loss");
    let mut lab = common::lab(Setup::VipsecEtcd);
    faults::packet_loss_everywhere(&lab.topo.hub, 5).unwrap();
    let o = common::run(&mut lab, Fault::Crash, CAP);
    faults::heal(&lab.topo.hub).unwrap();
    common::assert_safe(&o);
    common::assert_recovered(&o, CAP);
}

#[test]
fn front_end_behind_nat_fails_over_after_a_crash() {
    let _t = common::start("front-end behind NAT, crash");
    let mut opts = common::options(Setup::VipsecEtcd);
    opts.nat_front_end = Some("fe1".into());
    let mut lab = common::build(opts);
    let o = common::run(&mut lab, Fault::Crash, CAP);
    common::assert_safe(&o);
    common::assert_recovered(&o, CAP);
}

/// The same with every connection from the stored policy (`nat-traversal = "client"`):
/// the NATed front-end's SA passes the policy's NAT rule on both sides.
#[test]
fn front_end_behind_nat_with_the_stored_policy_fails_over_after_a_crash() {
    let _t = common::start("front-end behind NAT, policy from the store, crash");
    let mut opts = common::options(Setup::VipsecPolicy);
    opts.nat_front_end = Some("fe1".into());
    let mut lab = common::build(opts);
    let o = common::run(&mut lab, Fault::Crash, CAP);
    common::assert_safe(&o);
    common::assert_recovered(&o, CAP);
    let sas = lab.agent_json("fe1", &["sas"]).unwrap();
    assert!(
        sas.to_string().contains("198.51.100"),
        "fe1's SA is not the NATed one: {sas}"
    );
}

#[test]
fn flapping_vip_settles_on_the_last_owner_with_one_sa() {
    let _t = common::start("flapping VIP, ten planned moves");
    let mut lab = common::lab(Setup::VipsecEtcd);
    let first = lab.owner().unwrap();
    let (_, first_epoch) =
        common::recorded_owner(&status(&lab, &first).unwrap(), VIP).expect("an owner");
    let before = lab.cleartext().unwrap();
    let wall = common::wall_now();
    let start = now_ns();
    let vip = lab.vips[0];
    let mut takeovers = Vec::new();
    for _ in 0..10 {
        let from = lab.wait_owner(CAP).unwrap();
        let to = lab
            .names(Role::BackEnd)
            .into_iter()
            .find(|n| *n != from)
            .unwrap();
        let t = now_ns();
        lab.planned_move(&from).unwrap();
        let seen = wait_for("the VIP on the new owner", CAP, || {
            has_addr(&lab.topo.node(&to).ns, vip).then(now_ns)
        })
        .unwrap_or_else(|e| panic!("{from}->{to}: {e}"));
        takeovers.push(secs(since(t, seen)));
        // A new keepalived on the old owner (BACKUP, nopreempt) for the move back.
        lab.restore(&from).unwrap();
    }
    let last_move = now_ns();
    let owner = lab.wait_owner(CAP).unwrap();
    eprintln!(
        "[measured] ten moves in {}, takeovers {takeovers:?}",
        secs(since(start, last_move))
    );
    let back: Vec<_> = lab
        .names(Role::FrontEnd)
        .iter()
        .map(|fe| {
            (
                fe.clone(),
                secs(first_answer(&mut lab, fe, &owner, last_move, CAP)),
            )
        })
        .collect();
    eprintln!("[measured] answered by {owner} after the last move: {back:?}");
    lab.wait_steady(CAP).unwrap();
    let steady = now_ns();
    assert_no_stale_answers(&mut lab, &owner, steady, Duration::from_secs(1));

    for fe in lab.names(Role::FrontEnd) {
        let mut last = Value::Null;
        let r = wait_for(&format!("one established IKE_SA on {fe}"), CAP, || {
            let sas = lab.agent_json(&fe, &["sas", VIP]).ok()?;
            last = sas.clone();
            let group = sas["vips"].as_array()?.iter().find(|g| g["vip"] == VIP)?;
            let list = group["sas"].as_array()?;
            (list.len() == 1 && list[0]["state"] == "ESTABLISHED").then_some(())
        });
        assert!(r.is_ok(), "{fe}: {last:#}");
    }
    let nodes = live_nodes(&lab, "");
    let epochs = wait_agents_agree(&lab, &nodes, &owner, CAP);
    eprintln!("[measured] epochs after flapping: {epochs:?} (before: {first_epoch})");
    assert!(
        epochs
            .iter()
            .all(|&e| e == epochs[0] && e >= first_epoch + 10),
        "every agent should hold the last owner's epoch, at least ten above {first_epoch}: {epochs:?}"
    );
    assert_no_cleartext(&lab, before, wall);
}
