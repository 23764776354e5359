//! The split-brain guard of hosted VIPs: records, holders, takeover probes, drains.

use super::*;

fn hosted_sa(id: u64) -> Input {
    Input::SaUp(SaRef {
        vip: vip(),
        role: VipRole::Hosted,
        ike_id: id,
    })
}

fn store_up() -> Input {
    Input::StoreHealth {
        healthy: true,
        detail: String::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_vip_added_by_hand_while_another_node_owns_it_is_a_split_brain_and_refuses_sas() {
    let mut be = Node::back_end();
    be.feed(store_up());
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("other", 3),
    });
    let a = be.feed(Input::VipAppeared(vip()));
    assert!(!has(
        &a,
        &Action::AcceptSas {
            vip: vip(),
            accept: true
        }
    ));
    assert!(matches!(
        be.core.hosted()[&vip()].ownership,
        Ownership::NotOwner { .. }
    ));

    // A front-end's SA reaches this node anyway (its ARP entry points here): deleted.
    let a = be.feed(hosted_sa(9));
    assert!(has(
        &a,
        &Action::RefuseSa {
            vip: vip(),
            ike_id: 9
        }
    ));
    let refused = notice(&a, NoticeKind::SaRefused);
    assert!(refused.detail.contains("other"));
    assert!(refused.detail.contains("#9"));
    assert!(be.core.hosted()[&vip()].sas.is_empty());

    // Past the grace it is reported, once.
    let a = be.advance(Duration::from_secs(2)).await;
    let n = notice(&a, NoticeKind::SplitBrain);
    assert_eq!(n.owner.as_deref(), Some("other"));
    assert!(be.core.hosted()[&vip()].split_brain);
    assert!(be.advance(Duration::from_secs(5)).await.is_empty());

    // The other node lets go: publish, and accept SAs only once the record is ours.
    let a = be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: None,
    });
    assert!(has(&a, &Action::PublishOwnership { vip: vip() }));
    assert!(notices(&a).contains(&NoticeKind::SplitBrainCleared));
    assert!(!has(
        &a,
        &Action::AcceptSas {
            vip: vip(),
            accept: true
        }
    ));
    let a = be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 4),
    });
    assert!(has(
        &a,
        &Action::AcceptSas {
            vip: vip(),
            accept: true
        }
    ));
    assert_eq!(be.core.hosted()[&vip()].ownership, Ownership::Owner);
    let a = be.feed(hosted_sa(10));
    assert_eq!(notices(&a), [NoticeKind::SaUp]);
}

/// After a crash, front-ends' attempts still retransmitted toward the VIP reach the node
/// that took it before its record is written. Those SAs wait for the record: this node's,
/// they are kept; another node's (or the VIP gone), each is refused alone. Nothing deletes
/// every SA of the VIP.
#[tokio::test(start_paused = true)]
async fn sas_up_before_the_record_wait_for_it() {
    fn refusals(a: &[Action]) -> Vec<u64> {
        a.iter()
            .filter_map(|x| match x {
                Action::RefuseSa { ike_id, .. } => Some(*ike_id),
                _ => None,
            })
            .collect()
    }
    fn no_delete_of_all(a: &[Action]) {
        assert!(
            !a.iter().any(|x| matches!(x, Action::DeleteSas { .. })),
            "{a:?}"
        );
    }
    fn crashed_owner_gone() -> Node {
        let mut be = Node::back_end();
        be.feed(store_up());
        be.feed(Input::OwnerChanged {
            vip: vip(),
            owner: owner("dead", 2),
        });
        be.feed(Input::OwnerChanged {
            vip: vip(),
            owner: None,
        });
        let a = be.feed(Input::VipAppeared(vip()));
        assert!(has(&a, &Action::PublishOwnership { vip: vip() }));
        assert!(!be.core.hosted()[&vip()].accepting);
        be
    }

    // The record comes and is ours: the SA that waited is kept, and so are later ones.
    let mut be = crashed_owner_gone();
    let a = be.feed(hosted_sa(4));
    assert!(refusals(&a).is_empty(), "{a:?}");
    no_delete_of_all(&a);
    assert!(be.core.hosted()[&vip()].sas.is_empty());
    let a = be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 3),
    });
    assert!(refusals(&a).is_empty(), "{a:?}");
    assert!(notice(&a, NoticeKind::SaUp).detail.contains("#4"));
    for id in [5, 6] {
        let a = be.feed(hosted_sa(id));
        assert!(refusals(&a).is_empty(), "{a:?}");
        no_delete_of_all(&a);
    }
    let kept: Vec<u64> = be.core.hosted()[&vip()].sas.iter().copied().collect();
    assert_eq!(kept, vec![4, 5, 6]);

    // Another node's record comes first: each SA that waited is refused on its own.
    let mut be = crashed_owner_gone();
    be.feed(hosted_sa(7));
    be.feed(hosted_sa(8));
    let a = be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("other", 3),
    });
    assert_eq!(refusals(&a), vec![7, 8]);
    no_delete_of_all(&a);
    assert!(notice(&a, NoticeKind::SaRefused).detail.contains("other"));
    assert!(be.core.hosted()[&vip()].sas.is_empty());
    // An SA arriving now is refused at once.
    assert_eq!(refusals(&be.feed(hosted_sa(9))), vec![9]);

    // The address goes before any record: refused; one that went down is forgotten.
    let mut be = crashed_owner_gone();
    be.feed(hosted_sa(10));
    be.feed(hosted_sa(11));
    be.feed(Input::SaDown {
        sa: SaRef {
            vip: vip(),
            role: VipRole::Hosted,
            ike_id: 10,
        },
        reason: "deleted by the peer".into(),
    });
    let a = be.feed(Input::VipDisappeared(vip()));
    assert_eq!(refusals(&a), vec![11]);
    assert!(be.core.hosted()[&vip()].awaiting_record.is_empty());

    // The write fails: the SAs do not wait for the retries (a store without quorum can
    // answer its watch and refuse writes for long).
    let mut be = crashed_owner_gone();
    be.feed(hosted_sa(12));
    let a = be.feed(Input::PublishFailed(vip()));
    assert_eq!(refusals(&a), vec![12]);
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::StartTimer {
                timer: Timer::Republish { .. },
                ..
            }
        )),
        "{a:?}"
    );

    // A drain while waiting refuses them too.
    let mut be = crashed_owner_gone();
    be.feed(hosted_sa(13));
    let a = be.feed(Input::Drain(vip()));
    assert_eq!(refusals(&a), vec![13]);

    // The keying daemon reconnects meanwhile: its inventory does not make them accepted.
    let mut be = crashed_owner_gone();
    be.feed(hosted_sa(14));
    be.feed(Input::KeyingDown {
        detail: "charon restarted".into(),
    });
    let a = be.feed(Input::KeyingUp {
        established: vec![SaRef {
            vip: vip(),
            role: VipRole::Hosted,
            ike_id: 14,
        }],
    });
    assert!(refusals(&a).is_empty(), "{a:?}");
    assert!(be.core.hosted()[&vip()].sas.is_empty());
    assert!(be.core.hosted()[&vip()].awaiting_record.contains(&14));
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 3),
    });
    assert!(be.core.hosted()[&vip()].sas.contains(&14));

    // With the store unreachable nothing is written, so nothing waits: the strict
    // set-up refuses at once (`while_the_store_is_down_...`).
}

fn probes(a: &[Action]) -> Vec<u64> {
    a.iter()
        .filter_map(|a| match a {
            Action::ProbeHolder { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .collect()
}

fn take_overs(a: &[Action]) -> Vec<VipOwner> {
    a.iter()
        .filter_map(|a| match a {
            Action::TakeOver { from, .. } => Some(from.clone()),
            _ => None,
        })
        .collect()
}

/// A back-end that has just been given the VIP while `other` is recorded at epoch 3.
fn given_the_vip_of_another_node() -> (Node, Vec<Action>) {
    let mut be = Node::back_end();
    be.feed(store_up());
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("other", 3),
    });
    let a = be.feed(Input::VipAppeared(vip()));
    (be, a)
}

#[tokio::test(start_paused = true)]
async fn a_vip_whose_recorded_owner_no_longer_answers_for_it_is_taken_over_at_once() {
    let (mut be, a) = given_the_vip_of_another_node();
    assert!(has(
        &a,
        &Action::ProbeHolder {
            vip: vip(),
            epoch: 3,
            window: Duration::from_millis(30)
        }
    ));
    let a = be.feed(Input::HolderProbed {
        vip: vip(),
        epoch: 3,
        answer: HolderAnswer::Silent,
    });
    assert_eq!(take_overs(&a), [owner("other", 3).unwrap()]);
    let n = notice(&a, NoticeKind::Takeover);
    assert!(
        n.detail.contains("taking over other's record of epoch 3"),
        "{}",
        n.detail
    );
    // Still refused until the store says the record is ours.
    assert!(!be.core.hosted()[&vip()].ownership.accepts_sas());
    let a = be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 4),
    });
    assert!(has(
        &a,
        &Action::AcceptSas {
            vip: vip(),
            accept: true
        }
    ));
    // The record is ours: no split brain is ever reported.
    assert!(!notices(&be.advance(Duration::from_secs(3)).await).contains(&NoticeKind::SplitBrain));
}

#[tokio::test(start_paused = true)]
async fn a_vip_its_recorded_owner_still_answers_for_stays_refused() {
    let (mut be, _) = given_the_vip_of_another_node();
    let a = be.feed(Input::HolderProbed {
        vip: vip(),
        epoch: 3,
        answer: HolderAnswer::Answered("02:00:00:00:00:02".into()),
    });
    assert!(take_overs(&a).is_empty());
    assert!(
        notice(&a, NoticeKind::TakeoverRefused)
            .detail
            .contains("02:00:00:00:00:02 still answers")
    );
    // A link that cannot tell changes nothing either.
    let (mut be2, _) = given_the_vip_of_another_node();
    let a = be2.feed(Input::HolderProbed {
        vip: vip(),
        epoch: 3,
        answer: HolderAnswer::Unknown("192.0.2.100 is on lo, a loopback".into()),
    });
    assert!(take_overs(&a).is_empty());
    assert!(
        notice(&a, NoticeKind::TakeoverRefused)
            .detail
            .contains("loopback")
    );
    // Past the grace it is the split brain it always was.
    let a = be.advance(Duration::from_secs(2)).await;
    assert_eq!(
        notice(&a, NoticeKind::SplitBrain).owner.as_deref(),
        Some("other")
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_answer_about_a_record_or_an_arrival_that_is_over_changes_nothing() {
    // The record changed while the link was asked.
    let (mut be, _) = given_the_vip_of_another_node();
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("third", 4),
    });
    let silent = || Input::HolderProbed {
        vip: vip(),
        epoch: 3,
        answer: HolderAnswer::Silent,
    };
    assert!(take_overs(&be.feed(silent())).is_empty());
    // The VIP left again meanwhile.
    let (mut be, _) = given_the_vip_of_another_node();
    be.feed(Input::VipDisappeared(vip()));
    assert!(take_overs(&be.feed(silent())).is_empty());
    // A drain started meanwhile.
    let (mut be, _) = given_the_vip_of_another_node();
    be.feed(Input::Drain(vip()));
    assert!(take_overs(&be.feed(silent())).is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_link_is_asked_once_per_arrival_and_record_and_only_with_the_store_up() {
    let (mut be, a) = given_the_vip_of_another_node();
    assert_eq!(probes(&a), [3]);
    // The same record again (a snapshot after a reconnect): not asked again.
    let a = be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("other", 3),
    });
    assert!(probes(&a).is_empty());
    // A new record of another node: asked about that one.
    let a = be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("third", 5),
    });
    assert_eq!(probes(&a), [5]);
    // Leaves and comes back: a new arrival.
    be.feed(Input::VipDisappeared(vip()));
    assert_eq!(probes(&be.feed(Input::VipAppeared(vip()))), [5]);

    // With the store away nothing could be taken over: ask once it is back.
    let mut be = Node::back_end();
    be.feed(store_up());
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("other", 3),
    });
    be.feed(Input::StoreHealth {
        healthy: false,
        detail: "etcd unreachable".into(),
    });
    assert!(probes(&be.feed(Input::VipAppeared(vip()))).is_empty());
    assert_eq!(probes(&be.feed(store_up())), [3]);

    // Turned off: never asked.
    let mut s = settings(true, Mode::Normal);
    s.takeover_probe = None;
    let mut be = Node {
        core: FailoverCore::new(s, &[(vip(), false)], &[]),
        timers: Vec::new(),
    };
    be.feed(store_up());
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("other", 3),
    });
    assert!(probes(&be.feed(Input::VipAppeared(vip()))).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_hand_off_shorter_than_the_grace_is_no_split_brain() {
    let mut be = Node::back_end();
    be.feed(store_up());
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("old", 5),
    });
    be.feed(Input::VipAppeared(vip()));
    let a = be.advance(Duration::from_millis(300)).await;
    assert!(a.is_empty());
    let a = be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: None,
    });
    assert!(has(&a, &Action::PublishOwnership { vip: vip() }));
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 6),
    });
    let a = be.advance(Duration::from_secs(5)).await;
    assert!(!notices(&a).contains(&NoticeKind::SplitBrain), "{a:#?}");
    assert!(!be.core.hosted()[&vip()].split_brain);
}

#[tokio::test(start_paused = true)]
async fn the_owner_refuses_sas_once_draining_and_accepts_again_after_the_hold() {
    let mut be = Node::back_end();
    be.feed(store_up());
    be.feed(Input::VipAppeared(vip()));
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 1),
    });
    assert!(be.core.hosted()[&vip()].accepting);
    let a = be.feed(Input::Drain(vip()));
    assert!(has(
        &a,
        &Action::AcceptSas {
            vip: vip(),
            accept: false
        }
    ));
    // A front-end re-initiating during the drain is refused, not served by the old owner.
    let a = be.feed(hosted_sa(3));
    assert!(notices(&a).contains(&NoticeKind::SaRefused));
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: None,
    });
    be.advance(Duration::from_secs(10)).await;
    let a = be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 1),
    });
    assert!(has(
        &a,
        &Action::AcceptSas {
            vip: vip(),
            accept: true
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn while_the_store_is_down_the_kernel_alone_decides_unless_configured_strict() {
    let mut be = Node::back_end();
    be.feed(Input::StoreHealth {
        healthy: false,
        detail: "etcd unreachable".into(),
    });
    let a = be.feed(Input::VipAppeared(vip()));
    assert!(has(
        &a,
        &Action::AcceptSas {
            vip: vip(),
            accept: true
        }
    ));
    assert_eq!(be.core.hosted()[&vip()].ownership, Ownership::Unconfirmed);

    let mut strict = settings(true, Mode::Normal);
    strict.trust_kernel_when_store_down = false;
    let mut be = Node {
        core: FailoverCore::new(strict, &[(vip(), false)], &[]),
        timers: Vec::new(),
    };
    be.feed(Input::StoreHealth {
        healthy: false,
        detail: "etcd unreachable".into(),
    });
    let a = be.feed(Input::VipAppeared(vip()));
    assert!(!has(
        &a,
        &Action::AcceptSas {
            vip: vip(),
            accept: true
        }
    ));
    let a = be.feed(hosted_sa(1));
    assert!(notices(&a).contains(&NoticeKind::SaRefused));
}

#[tokio::test(start_paused = true)]
async fn a_draining_owners_delete_makes_the_front_end_wait_for_the_next_owner() {
    let mut fe = Node::established(true, Mode::Fast, owner("be1", 1));
    let mut draining = owner("be1", 1).unwrap();
    draining.draining = true;
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: Some(draining),
    });
    assert!(initiates(&a).is_empty());
    assert!(!has(&a, &Action::DropStaleSas { vip: vip() }));
    // The old owner's DELETE: no attempt toward it, wait for the next record.
    let a = fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "deleted by peer".into(),
    });
    assert!(initiates(&a).is_empty(), "{a:#?}");
    assert!(fe.core.peers()[&vip()].renegotiation.is_some());
    fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: None,
    });
    time::advance(Duration::from_millis(200)).await;
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 2),
    });
    assert_eq!(initiates(&a), [1]);
}

#[tokio::test(start_paused = true)]
async fn drain_marks_the_record_draining_before_deleting() {
    let mut be = Node::back_end();
    be.feed(Input::VipAppeared(vip()));
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 4),
    });
    let a = be.feed(Input::Drain(vip()));
    let pos = |want: &Action| a.iter().position(|x| x == want).unwrap();
    assert!(
        pos(&Action::MarkDraining { vip: vip() })
            < pos(&Action::DeleteSas {
                vip: vip(),
                role: VipRole::Hosted
            })
    );
    assert!(
        pos(&Action::DeleteSas {
            vip: vip(),
            role: VipRole::Hosted
        }) < pos(&Action::WithdrawOwnership { vip: vip() })
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_publish_is_retried_while_the_vip_is_here_and_unrecorded() {
    let mut be = Node::back_end();
    be.feed(store_up());
    be.feed(Input::VipAppeared(vip()));
    be.feed(Input::PublishFailed(vip()));
    let a = be.advance(Duration::from_secs(1)).await;
    assert!(has(&a, &Action::PublishOwnership { vip: vip() }), "{a:#?}");
    // Once recorded (or gone), no more retries.
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 1),
    });
    be.feed(Input::PublishFailed(vip()));
    let a = be.advance(Duration::from_secs(1)).await;
    assert!(!has(&a, &Action::PublishOwnership { vip: vip() }), "{a:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_does_not_turn_a_refused_vip_into_an_owned_one() {
    // Here, refused (another node's record), then the store goes away: still refused.
    let mut be = Node::back_end();
    be.feed(store_up());
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("other", 7),
    });
    be.feed(Input::VipAppeared(vip()));
    let a = be.feed(Input::StoreHealth {
        healthy: false,
        detail: "etcd unreachable".into(),
    });
    assert!(!has(
        &a,
        &Action::AcceptSas {
            vip: vip(),
            accept: true
        }
    ));
    assert!(matches!(
        be.core.hosted()[&vip()].ownership,
        Ownership::NotOwner { .. }
    ));

    // Arriving during the outage (a takeover the store cannot confirm yet): the kernel's
    // word is taken, as configured, until the store answers again.
    let mut be = Node::back_end();
    be.feed(store_up());
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("other", 7),
    });
    be.feed(Input::StoreHealth {
        healthy: false,
        detail: "etcd unreachable".into(),
    });
    let a = be.feed(Input::VipAppeared(vip()));
    assert!(has(
        &a,
        &Action::AcceptSas {
            vip: vip(),
            accept: true
        }
    ));
    assert_eq!(be.core.hosted()[&vip()].ownership, Ownership::Unconfirmed);
    // The store is back and still names the other node: refused again.
    let a = be.feed(store_up());
    assert!(has(
        &a,
        &Action::AcceptSas {
            vip: vip(),
            accept: false
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn the_owner_of_record_hears_that_another_node_holds_the_address_too() {
    let mut be = Node::back_end();
    be.feed(store_up());
    be.feed(Input::VipAppeared(vip()));
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 2),
    });
    be.feed(hosted_sa(4));
    let a = be.feed(Input::HolderChanged {
        vip: vip(),
        node: "other".into(),
        holds: true,
        followers: 0,
    });
    // Still the owner: it keeps serving (the other node refuses), nothing deleted.
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::DeleteSas { .. } | Action::AcceptSas { .. })),
        "{a:#?}"
    );
    assert_eq!(be.core.hosted()[&vip()].ownership, Ownership::Owner);
    let a = be.advance(Duration::from_secs(2)).await;
    let n = notice(&a, NoticeKind::SplitBrain);
    assert!(n.detail.contains("other"), "{}", n.detail);
    assert!(be.core.hosted()[&vip()].split_brain);
    assert_eq!(be.core.hosted()[&vip()].sas.len(), 1);

    // The other node lets go of the address: cleared.
    let a = be.feed(Input::HolderChanged {
        vip: vip(),
        node: "other".into(),
        holds: false,
        followers: 0,
    });
    assert!(notices(&a).contains(&NoticeKind::SplitBrainCleared));

    // Our own mark is not a conflict, and a snapshot replaces what was known.
    let a = be.feed(Input::HoldersSnapshot(vec![
        (vip(), "me".into(), 1),
        (vip(), "third".into(), 0),
    ]));
    assert!(notices(&a).is_empty(), "{a:#?}");
    assert!(be.core.hosted()[&vip()].also_held_by.contains("third"));
    assert!(!be.core.hosted()[&vip()].also_held_by.contains("me"));
    let a = be.advance(Duration::from_secs(2)).await;
    assert!(notices(&a).contains(&NoticeKind::SplitBrain));
    let a = be.feed(Input::HoldersSnapshot(vec![(vip(), "me".into(), 1)]));
    assert!(notices(&a).contains(&NoticeKind::SplitBrainCleared));
}

#[tokio::test(start_paused = true)]
async fn our_record_for_a_vip_that_is_not_here_is_withdrawn() {
    // A record left by an earlier run, or a withdraw that has not taken effect yet.
    let mut be = Node::back_end();
    be.feed(store_up());
    let a = be.feed(Input::OwnerSnapshot(vec![(vip(), owner("me", 3))]));
    assert!(has(&a, &Action::WithdrawOwnership { vip: vip() }), "{a:#?}");
    // Another node's record is not ours to touch.
    let mut be = Node::back_end();
    be.feed(store_up());
    let a = be.feed(Input::OwnerSnapshot(vec![(vip(), owner("other", 3))]));
    assert!(!has(&a, &Action::WithdrawOwnership { vip: vip() }));
}

#[tokio::test(start_paused = true)]
async fn a_vip_that_leaves_after_another_node_is_on_record_deletes_nothing() {
    // Paused through the move: when this node catches up, the new owner's record came
    // first, then the address went. Its old SAs are not its to delete any more.
    let mut be = Node::back_end();
    be.feed(store_up());
    be.feed(Input::VipAppeared(vip()));
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 1),
    });
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("other", 2),
    });
    let a = be.feed(Input::VipDisappeared(vip()));
    assert!(has(&a, &Action::WithdrawOwnership { vip: vip() }));
    assert!(
        !a.iter().any(|x| matches!(x, Action::DeleteSas { .. })),
        "{a:#?}"
    );
    assert!(notices(&a).contains(&NoticeKind::ActionFenced));

    // Still the owner of record when the address goes: the graceful delete runs.
    let mut be = Node::back_end();
    be.feed(store_up());
    be.feed(Input::VipAppeared(vip()));
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 1),
    });
    let a = be.feed(Input::VipDisappeared(vip()));
    assert!(has(
        &a,
        &Action::DeleteSas {
            vip: vip(),
            role: VipRole::Hosted
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_renegotiation_says_how_many_front_ends_move_with_it() {
    let mut fe = Node::front_end(true, Mode::Normal);
    let other: IpAddr = "192.0.2.101".parse().unwrap();
    fe.feed(store_up());
    fe.feed(Input::KeyingUp {
        established: vec![],
    });
    fe.feed(Input::OwnerSnapshot(vec![
        (vip(), owner("be1", 3)),
        (other, owner("be1", 7)),
    ]));
    fe.feed(Input::SaUp(peer_sa(1)));
    // be1 serves 20 front-ends on each of its two VIPs.
    fe.feed(Input::HoldersSnapshot(vec![
        (vip(), "be1".into(), 20),
        (other, "be1".into(), 20),
    ]));
    // be1 crashes: its marks go, and the VIP's record names be2.
    fe.feed(Input::HolderChanged {
        vip: vip(),
        node: "be1".into(),
        holds: false,
        followers: 0,
    });
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 4),
    });
    let crowd = a.iter().find_map(|x| match x {
        Action::Initiate { crowd, .. } => Some(*crowd),
        _ => None,
    });
    assert_eq!(crowd, Some(40), "{a:#?}");
}

/// The crowd of the first initiation when a front-end following ten VIPs of be1 hears
/// that one moved to be2, be1 having said it serves `followers` front-ends on each.
fn crowd_with_ten_vips(followers: u32) -> Option<u32> {
    let vips: Vec<IpAddr> = (100..110)
        .map(|n| format!("192.0.2.{n}").parse().unwrap())
        .collect();
    let peers: Vec<(IpAddr, bool)> = vips.iter().map(|v| (*v, true)).collect();
    let mut fe = Node {
        core: FailoverCore::new(settings(true, Mode::Normal), &[], &peers),
        timers: Vec::new(),
    };
    fe.feed(store_up());
    fe.feed(Input::KeyingUp {
        established: vec![],
    });
    fe.feed(Input::OwnerSnapshot(
        vips.iter().map(|v| (*v, owner("be1", 3))).collect(),
    ));
    fe.feed(Input::HoldersSnapshot(
        vips.iter().map(|v| (*v, "be1".into(), followers)).collect(),
    ));
    fe.feed(Input::SaUp(peer_sa(1)));
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 4),
    });
    a.iter().find_map(|x| match x {
        Action::Initiate { crowd, .. } => Some(*crowd),
        _ => None,
    })
}

#[tokio::test(start_paused = true)]
async fn a_front_end_with_many_vips_counts_as_its_pacer_not_as_its_vips() {
    // Ten VIPs, each with 100 front-ends: 1,000 pairs, but each front-end sends at most 4
    // initiations at a time.
    assert_eq!(crowd_with_ten_vips(100), Some(400));
    // One front-end alone with its ten VIPs: a crowd of its own 4, too few for jitter.
    assert_eq!(crowd_with_ten_vips(1), Some(4));
}
