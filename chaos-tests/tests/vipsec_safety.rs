//! Failover safety with real keepalived, etcd, charon and agents (connections loaded from
//! the stored policy): a VIP held by two nodes at once (a split brain made by hand) and an
//! old owner paused through a move. Neither may create or delete anything for a VIP it is
//! not the owner of record of, and no SA is ever established with such a node.
//! Needs the `vipsec` binary built in the same target directory (`cargo build -p vipsec`).

mod common;

use std::time::Duration;

use serde_json::Value;
use vipsec_chaos::clock::{now_ns, secs, since};
use vipsec_chaos::lab::topology::NODE_IF;
use vipsec_chaos::lab::{Lab, Role, Setup};
use vipsec_testbed::process::wait_for;

const CAP: Duration = Duration::from_secs(30);
const VIP: &str = "192.0.2.100";

fn status(lab: &Lab, node: &str) -> Value {
    lab.agent_json(node, &["status"])
        .unwrap_or_else(|e| panic!("status of {node}: {e:#}"))
}

fn vip_entry<'a>(s: &'a Value, list: &str) -> &'a Value {
    s[list]
        .as_array()
        .and_then(|l| l.iter().find(|v| v["address"] == VIP))
        .unwrap_or_else(|| panic!("{VIP} not in {list}: {s}"))
}

/// The IKE_SAs a node's charon holds (names of `swanctl --list-sas` entries).
fn ike_sas(lab: &Lab, node: &str) -> Vec<String> {
    let out = lab.swanctl(node, &["--list-sas"]).unwrap_or_default();
    out.lines()
        .filter(|l| !l.starts_with(' ') && l.contains(": #"))
        .map(|l| l.trim().to_string())
        .collect()
}

fn other_back_end(lab: &Lab, owner: &str) -> String {
    lab.names(Role::BackEnd)
        .into_iter()
        .find(|n| n != owner)
        .expect("two back-ends")
}

/// Answers to probes started at or after `t`, by answering node (failed attempts: "-").
fn answers_since(lab: &mut Lab, t: u64) -> Vec<(String, String)> {
    lab.poll_probes().expect("probe records");
    lab.probes()
        .iter()
        .flat_map(|p| p.since(t))
        .map(|r| (r.fe.clone(), r.node.clone().unwrap_or_else(|| "-".into())))
        .collect()
}

#[test]
fn a_vip_added_by_hand_on_a_second_node_is_reported_and_gets_no_sa_or_traffic() {
    let _t = common::start("split brain made by hand");
    let mut lab = common::lab(Setup::VipsecPolicy);
    let owner = lab.owner().expect("an owner");
    let rogue = other_back_end(&lab, &owner);
    let before = lab.cleartext().unwrap();
    let t0 = now_ns();

    lab.topo
        .node(&rogue)
        .ns
        .ip(&["addr", "add", &format!("{VIP}/32"), "dev", NODE_IF])
        .unwrap();
    let reported = wait_for("the split brain reported on the rogue node", CAP, || {
        let s = status(&lab, &rogue);
        let h = vip_entry(&s, "hosted_vips");
        (h["split_brain"] == true).then(|| h.clone())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "[measured] split brain on {rogue} reported after {}: {}",
        secs(since(t0, now_ns())),
        reported["ownership_reason"]
    );
    assert_eq!(reported["ownership"], "not-owner");
    assert_eq!(reported["owner"]["node"], owner.as_str());
    // The rogue asked the link whether the owner of record still holds the address (the
    // fast takeover's evidence): the owner's kernel answered, so it took nothing over.
    let rogue_log = lab.agent_log(&rogue).unwrap();
    assert!(
        rogue_log
            .lines()
            .any(|l| l.contains("takeover-refused") && l.contains("still answers")),
        "no refused takeover in {rogue}'s log:\n{rogue_log}"
    );
    assert!(
        !rogue_log.contains("ownership taken over"),
        "{rogue} took the record over from a live owner:\n{rogue_log}"
    );
    assert!(
        reported["ownership_reason"]
            .as_str()
            .is_some_and(|r| r.contains(&owner)),
        "the reason names the owner of record: {reported}"
    );
    let o = status(&lab, &owner);
    assert_eq!(vip_entry(&o, "hosted_vips")["ownership"], "owner");
    // The owner of record hears of it through the rogue node's holder mark and reports
    // the same split brain while it keeps serving; `vipsec health` fails on both.
    let seen_by_owner = wait_for("the split brain reported on the owner", CAP, || {
        let s = status(&lab, &owner);
        let h = vip_entry(&s, "hosted_vips");
        (h["split_brain"] == true).then(|| h.clone())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "[measured] split brain on {owner} (owner of record) reported after {}",
        secs(since(t0, now_ns()))
    );
    assert_eq!(seen_by_owner["ownership"], "owner");
    assert!(
        seen_by_owner["also_held_by"]
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n == rogue.as_str())),
        "{seen_by_owner}"
    );
    for n in [&owner, &rogue] {
        let health = lab.agent_cli(n, &["health"]);
        assert!(
            health.is_err(),
            "{n}: vipsec health passed during a split brain: {health:?}"
        );
    }

    // Make every front-end negotiate afresh while both nodes hold the address: whichever
    // node its ARP entry leads to, only the owner of record may end up with the SAs.
    let t1 = now_ns();
    for fe in lab.names(Role::FrontEnd) {
        lab.topo
            .node(&fe)
            .ns
            .ip(&["neigh", "flush", "dev", NODE_IF])
            .unwrap();
        let _ = lab.swanctl(
            &fe,
            &["--terminate", "--ike", "vipsec-lab-192-0-2-100", "--force"],
        );
    }
    let mut rogue_sas = Vec::new();
    let settle_end = now_ns() + Duration::from_secs(6).as_nanos() as u64;
    let _ = wait_for("the window with both nodes holding the VIP", CAP, || {
        rogue_sas.extend(ike_sas(&lab, &rogue));
        (now_ns() >= settle_end).then_some(())
    });
    let answers = answers_since(&mut lab, t1);
    let by_rogue: Vec<_> = answers.iter().filter(|(_, n)| *n == rogue).collect();
    eprintln!(
        "[measured] with both holding the VIP: {} probe attempts, {} answered by {owner}, {} failed",
        answers.len(),
        answers.iter().filter(|(_, n)| *n == owner).count(),
        answers.iter().filter(|(_, n)| n == "-").count()
    );
    assert!(
        by_rogue.is_empty(),
        "the rogue node served traffic: {by_rogue:?}"
    );

    // Once the rogue address goes, everything settles on the owner of record.
    lab.topo
        .node(&rogue)
        .ns
        .ip(&["addr", "del", &format!("{VIP}/32"), "dev", NODE_IF])
        .unwrap();
    wait_for("the split brain cleared on both", CAP, || {
        [&rogue, &owner]
            .iter()
            .all(|n| vip_entry(&status(&lab, n), "hosted_vips")["split_brain"] == false)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let t2 = now_ns();
    for fe in lab.names(Role::FrontEnd) {
        wait_for(&format!("{fe} answered by {owner}"), CAP, || {
            answers_since(&mut lab, t2)
                .iter()
                .any(|(f, n)| *f == fe && *n == owner)
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
    rogue_sas.extend(ike_sas(&lab, &rogue));
    assert!(
        rogue_sas.is_empty(),
        "IKE_SAs on the node that is not the owner of record: {rogue_sas:?}"
    );
    let leaked = lab.cleartext().unwrap().minus(before);
    assert_eq!(leaked.total(), 0, "clear text on the wire: {leaked:?}");
}

#[test]
fn an_old_owner_paused_through_a_move_deletes_and_creates_nothing_when_it_wakes() {
    let _t = common::start("old owner paused through a move");
    let mut lab = common::lab(Setup::VipsecPolicy);
    let old = lab.owner().expect("an owner");
    let new = other_back_end(&lab, &old);
    let fes = lab.names(Role::FrontEnd);
    let before = lab.cleartext().unwrap();
    let epoch_before = vip_entry(&status(&lab, &new), "hosted_vips")["epoch"]
        .as_u64()
        .unwrap();

    let t0 = now_ns();
    lab.freeze_agent(&old).unwrap();
    lab.stop_keepalived(&old).unwrap();
    for fe in &fes {
        let took = wait_for(&format!("{fe} answered by {new}"), CAP, || {
            answers_since(&mut lab, t0)
                .iter()
                .any(|(f, n)| f == fe && *n == new)
                .then(|| since(t0, now_ns()))
        })
        .unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "[measured] {fe} answered by {new} {} after the move (old owner's agent paused)",
            secs(took)
        );
    }
    let s = status(&lab, &new);
    let h = vip_entry(&s, "hosted_vips");
    assert_eq!(h["ownership"], "owner", "{h}");
    let epoch = h["epoch"].as_u64().unwrap();
    assert!(epoch > epoch_before);
    // What each front-end holds once it has settled with the new owner (its first answer
    // can come while a second IKE_SA of the move is still completing): the old owner's
    // waking must change none of it.
    let fe_sas: Vec<(String, Value)> = fes
        .iter()
        .map(|fe| {
            let mut last = Value::Null;
            wait_for(&format!("{fe} settled with {new}"), CAP, || {
                let s = status(&lab, fe);
                let p = vip_entry(&s, "peer_vips");
                let since = p["established_since"].clone();
                let settled = p["renegotiating"] == false && !since.is_null() && since == last;
                last = since.clone();
                settled.then_some((fe.clone(), since))
            })
            .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let old_sas_before = ike_sas(&lab, &old);

    let log_at_pause = lab.agent_log(&old).unwrap();
    let woke = now_ns();
    lab.thaw_agent(&old).unwrap();
    wait_for("the old owner to catch up with the store", CAP, || {
        let s = status(&lab, &old);
        let h = vip_entry(&s, "hosted_vips");
        (s["store"]["healthy"] == true
            && h["owner"]["node"] == new.as_str()
            && h["present_locally"] == false)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // A few seconds for anything stale to surface.
    let t_end = now_ns() + Duration::from_secs(4).as_nanos() as u64;
    let _ = wait_for("the settle window", CAP, || {
        (now_ns() >= t_end).then_some(())
    });

    let log = lab.agent_log(&old).unwrap();
    let woken_log = log.get(log_at_pause.len()..).unwrap_or_default();
    let acted: Vec<&str> = woken_log
        .lines()
        .filter(|l| {
            l.contains("SAs deleted gracefully")
                || l.contains("ownership published")
                || l.contains("stale IKE_SAs dropped")
        })
        .collect();
    // Either fence may be the one that holds, depending on which news the woken node
    // reads first: with the store's new record first, the core knows the tenure is over
    // and decides no delete at all (event `action-fenced`); with the address removal
    // first, the delete it decides is stopped in the runtime when the store is read again
    // ("action fenced").
    let fenced: Vec<&str> = woken_log
        .lines()
        .filter(|l| l.contains("action fenced") || l.contains("event=\"action-fenced\""))
        .collect();
    eprintln!(
        "[measured] old owner woke {} after the move; fenced: {fenced:#?}",
        secs(since(t0, woke))
    );
    assert!(
        acted.is_empty(),
        "the old owner acted after waking: {acted:#?}"
    );
    assert!(
        !fenced.is_empty(),
        "no stale action was fenced:\n{woken_log}"
    );
    let s = status(&lab, &new);
    assert_eq!(vip_entry(&s, "hosted_vips")["epoch"].as_u64(), Some(epoch));
    assert_eq!(vip_entry(&s, "hosted_vips")["owner"]["node"], new.as_str());
    for (fe, since_before) in fe_sas {
        let s = status(&lab, &fe);
        assert_eq!(
            vip_entry(&s, "peer_vips")["established_since"],
            since_before,
            "{fe}'s SA toward {new} was replaced after the old owner woke"
        );
    }
    let new_on_old: Vec<String> = ike_sas(&lab, &old)
        .into_iter()
        .filter(|sa| !old_sas_before.contains(sa))
        .collect();
    assert!(
        new_on_old.is_empty(),
        "the old owner made SAs: {new_on_old:?}"
    );
    let leaked = lab.cleartext().unwrap().minus(before);
    assert_eq!(leaked.total(), 0, "clear text on the wire: {leaked:?}");
}
