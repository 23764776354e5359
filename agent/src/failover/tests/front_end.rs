//! A front-end following the owner records: moves, crashes, lapses, stale records.

use super::*;

#[tokio::test(start_paused = true)]
async fn planned_move_on_the_front_end_waits_for_the_new_owner_then_initiates_at_once() {
    let mut fe = Node::established(true, Mode::Fast, owner("be1", 1));
    let t0 = Instant::now();

    // The old owner withdraws, then deletes its SAs. The vanished record alone changes
    // nothing here: a record also vanishes in a store hiccup, with the owner unchanged.
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: None,
    });
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::DeleteSas { .. } | Action::DropStaleSas { .. })),
        "{a:#?}"
    );
    assert!(initiates(&a).is_empty(), "no owner yet: {a:#?}");
    // Its DELETE arrives: renegotiate, but wait for the next owner's record.
    let a = fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "deleted by peer".into(),
    });
    assert!(notices(&a).contains(&NoticeKind::RenegotiationStarted));
    assert!(initiates(&a).is_empty(), "no owner yet: {a:#?}");

    time::advance(Duration::from_millis(600)).await;
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 2),
    });
    assert_eq!(initiates(&a), [1]);

    time::advance(Duration::from_millis(30)).await;
    let a = fe.feed(Input::SaUp(peer_sa(2)));
    let done = notice(&a, NoticeKind::RenegotiationFinished);
    assert_eq!(done.duration, Some(Duration::from_millis(630)));
    assert_eq!(done.owner.as_deref(), Some("be2"));
    let p = &fe.core.peers()[&vip()];
    assert_eq!(p.sas[&2].epoch, 2);
    assert_eq!(
        p.last_failover.as_ref().unwrap().outcome,
        FailoverOutcome::Recovered
    );
    assert_eq!(p.established_since(), Some(t0 + Duration::from_millis(630)));
}

#[tokio::test(start_paused = true)]
async fn planned_move_with_delete_first_initiates_immediately_and_retries_until_the_new_owner() {
    let mut fe = Node::established(true, Mode::Fast, owner("be1", 1));
    // The DELETE arrives while the record still names the old owner.
    let a = fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "deleted by peer".into(),
    });
    assert_eq!(
        notices(&a)[..2],
        [NoticeKind::SaDeleted, NoticeKind::RenegotiationStarted]
    );
    assert_eq!(initiates(&a), [1]);
    // The VIP is in transit: the attempt fails and a retry is scheduled.
    let a = fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 1,
        result: Err("timeout".into()),
    });
    assert!(
        matches!(a[..], [Action::StartTimer { timer: Timer::Retry { .. }, after }] if after == Duration::from_millis(50))
    );
    // The new owner appears before the retry fires: attempt at once, not at the timer.
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 2),
    });
    assert_eq!(initiates(&a), [2]);
    // The stale retry timer fires later and must not start a third attempt.
    let a = fe.advance(Duration::from_millis(100)).await;
    assert!(initiates(&a).is_empty(), "{a:#?}");
    let a = fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 2,
        result: Ok(()),
    });
    assert_eq!(
        notice(&a, NoticeKind::RenegotiationFinished).detail,
        "SA deleted (deleted by peer) after 2 attempt(s)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_owner_preempts_an_attempt_still_waiting_on_nobody() {
    let mut fe = Node::established(true, Mode::Fast, owner("be1", 1));
    let a = fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "deleted by peer".into(),
    });
    assert_eq!(initiates(&a), [1]);
    // Attempt 1 hangs (the VIP is in transit); the new owner shows up meanwhile.
    time::advance(Duration::from_millis(40)).await;
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 2),
    });
    assert!(
        has(&a, &Action::DropStaleSas { vip: vip() }),
        "abort the half-open IKE_SA: {a:#?}"
    );
    assert_eq!(initiates(&a), [2]);
    // Attempt 1's late failure changes nothing.
    time::advance(Duration::from_millis(2000)).await;
    let a = fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 1,
        result: Err("timeout".into()),
    });
    assert!(a.is_empty(), "{a:#?}");
    let a = fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 2,
        result: Ok(()),
    });
    assert_eq!(
        notice(&a, NoticeKind::RenegotiationFinished).duration,
        Some(Duration::from_millis(2040))
    );
}

#[tokio::test(start_paused = true)]
async fn an_sa_made_while_no_owner_is_recorded_is_stale_for_the_next_owner() {
    let mut fe = Node::established(true, Mode::Fast, owner("be1", 1));
    // The old owner's DELETE comes first: we renegotiate at once and, the VIP still being
    // on the old owner, get an SA with it right after its record was withdrawn.
    fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "deleted by peer".into(),
    });
    fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: None,
    });
    fe.feed(Input::SaUp(peer_sa(2)));
    fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 1,
        result: Ok(()),
    });
    // The new owner's record must not adopt that SA: it leads to the old owner.
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 2),
    });
    assert!(has(&a, &Action::DropStaleSas { vip: vip() }), "{a:#?}");
    assert_eq!(initiates(&a), [1]);
}

/// The same with the store unreachable through the move (an etcd leader election during a
/// planned move): the SA made in the outage leads to the draining old owner, and the new
/// owner's record, once the store is back, must find it stale instead of adopting it.
#[tokio::test(start_paused = true)]
async fn an_sa_made_while_the_store_is_down_is_stale_for_the_next_owner() {
    let mut fe = Node::established(true, Mode::Fast, owner("be1", 1));
    fe.feed(Input::StoreHealth {
        healthy: false,
        detail: "leader lost".into(),
    });
    let a = fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "deleted by peer".into(),
    });
    assert_eq!(initiates(&a), [1], "no record to wait for: {a:#?}");
    fe.feed(Input::SaUp(peer_sa(2)));
    fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 1,
        result: Ok(()),
    });
    time::advance(Duration::from_millis(600)).await;
    fe.feed(Input::StoreHealth {
        healthy: true,
        detail: String::new(),
    });
    let a = fe.feed(Input::OwnerSnapshot(vec![(vip(), owner("be2", 2))]));
    assert!(has(&a, &Action::DropStaleSas { vip: vip() }), "{a:#?}");
    assert_eq!(initiates(&a), [1], "{a:#?}");
}

#[tokio::test(start_paused = true)]
async fn crash_of_the_owner_seen_as_a_takeover_drops_the_stale_sa_without_any_delete() {
    let mut fe = Node::established(true, Mode::Normal, owner("be1", 1));
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 2),
    });
    let drop_at = a
        .iter()
        .position(|x| *x == Action::DropStaleSas { vip: vip() })
        .expect("drop");
    let init_at = a
        .iter()
        .position(|x| matches!(x, Action::Initiate { .. }))
        .expect("initiate");
    assert!(
        drop_at < init_at,
        "drop the stale IKE_SA before initiating: {a:#?}"
    );
    assert!(notices(&a).contains(&NoticeKind::RenegotiationStarted));
}

#[tokio::test(start_paused = true)]
async fn crash_of_the_owner_seen_as_lease_expiry_then_takeover() {
    let mut fe = Node::established(true, Mode::Normal, owner("be1", 1));
    // The lease expired: the SA stays until a different owner is recorded.
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: None,
    });
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::DeleteSas { .. } | Action::DropStaleSas { .. })),
        "{a:#?}"
    );
    assert!(initiates(&a).is_empty());
    time::advance(Duration::from_secs(1)).await;
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 2),
    });
    assert!(has(&a, &Action::DropStaleSas { vip: vip() }), "{a:#?}");
    assert_eq!(initiates(&a), [1]);
}

#[tokio::test(start_paused = true)]
async fn without_a_new_owner_the_front_end_initiates_after_owner_wait() {
    let mut fe = Node::established(true, Mode::Normal, owner("be1", 1));
    fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: None,
    });
    let a = fe.advance(Duration::from_millis(2999)).await;
    assert!(initiates(&a).is_empty());
    let a = fe.advance(Duration::from_millis(1)).await;
    assert!(has(&a, &Action::DropStaleSas { vip: vip() }), "{a:#?}");
    assert_eq!(initiates(&a), [1]);
}

#[tokio::test(start_paused = true)]
async fn a_record_that_lapses_and_comes_back_unchanged_keeps_the_sa() {
    let mut fe = Node::established(true, Mode::Normal, owner("be1", 1));
    // The owner's lease lapsed in a store hiccup and it put the record back at the same
    // epoch: the working SA is kept, now and after `owner_wait`.
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: None,
    });
    assert!(initiates(&a).is_empty());
    time::advance(Duration::from_millis(300)).await;
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be1", 1),
    });
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::DropStaleSas { .. } | Action::Initiate { .. })),
        "{a:#?}"
    );
    let a = fe.advance(Duration::from_secs(10)).await;
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::DropStaleSas { .. } | Action::Initiate { .. })),
        "{a:#?}"
    );
    assert_eq!(fe.core.peers()[&vip()].sas.len(), 1);

    // The same owner at a newer epoch (it lost the VIP and took it back meanwhile): the
    // SA belongs to the old tenure and is renegotiated.
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be1", 3),
    });
    assert!(has(&a, &Action::DropStaleSas { vip: vip() }), "{a:#?}");
    assert_eq!(initiates(&a), [1]);
}

#[tokio::test(start_paused = true)]
async fn a_stale_record_arriving_late_is_ignored() {
    let mut fe = Node::established(true, Mode::Normal, owner("be1", 1));
    fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 2),
    });
    fe.feed(Input::SaUp(peer_sa(2)));
    // The old owner's late write (epoch 1) must not move us back.
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be1", 1),
    });
    assert_eq!(notices(&a), [NoticeKind::StaleRecordIgnored]);
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::DropStaleSas { .. } | Action::Initiate { .. }))
    );
    let p = &fe.core.peers()[&vip()];
    assert_eq!(p.owner.as_ref().unwrap().node, "be2");
    assert_eq!(p.epoch, 2);

    // The same holds on a back-end.
    let mut be = Node::back_end();
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 5),
    });
    let a = be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 3),
    });
    assert_eq!(notices(&a), [NoticeKind::StaleRecordIgnored]);
    assert_eq!(be.core.hosted()[&vip()].owner.as_ref().unwrap().epoch, 5);
}

#[tokio::test(start_paused = true)]
async fn a_vip_moving_away_and_back_renegotiates_each_time() {
    let mut fe = Node::established(true, Mode::Normal, owner("be1", 1));
    let mut ike = 1;
    for (node, epoch) in [("be2", 2), ("be1", 3), ("be2", 4), ("be1", 5)] {
        let a = fe.feed(Input::OwnerChanged {
            vip: vip(),
            owner: owner(node, epoch),
        });
        assert!(
            has(&a, &Action::DropStaleSas { vip: vip() }),
            "move to {node}: {a:#?}"
        );
        assert_eq!(initiates(&a), [1], "move to {node}");
        ike += 1;
        fe.feed(Input::SaUp(peer_sa(ike)));
        fe.feed(Input::InitiateFinished {
            vip: vip(),
            attempt: 1,
            result: Ok(()),
        });
        assert_eq!(fe.core.peers()[&vip()].sas[&ike].epoch, epoch);
        assert!(fe.core.peers()[&vip()].renegotiation.is_none());
    }

    let mut be = Node::back_end();
    for epoch in 1..=3 {
        let a = be.feed(Input::VipAppeared(vip()));
        assert!(has(&a, &Action::PublishOwnership { vip: vip() }));
        be.feed(Input::OwnerChanged {
            vip: vip(),
            owner: owner("me", epoch * 2 - 1),
        });
        let a = be.feed(Input::VipDisappeared(vip()));
        assert!(has(&a, &Action::WithdrawOwnership { vip: vip() }));
        be.feed(Input::OwnerChanged {
            vip: vip(),
            owner: owner("other", epoch * 2),
        });
    }
    assert_eq!(be.core.hosted()[&vip()].epoch, 6);
}

#[tokio::test(start_paused = true)]
async fn sas_up_before_the_first_snapshot_are_adopted_not_dropped() {
    let mut fe = Node::front_end(true, Mode::Normal);
    fe.start();
    fe.feed(Input::KeyingUp {
        established: vec![peer_sa(9)],
    });
    fe.feed(Input::StoreHealth {
        healthy: true,
        detail: String::new(),
    });
    let a = fe.feed(Input::OwnerSnapshot(vec![(vip(), owner("be1", 7))]));
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::DropStaleSas { .. } | Action::Initiate { .. })),
        "{a:#?}"
    );
    assert_eq!(fe.core.peers()[&vip()].sas[&9].epoch, 7);
}
