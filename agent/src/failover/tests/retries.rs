//! A renegotiation's bounded retry schedule and its new cycles.

use super::*;

#[tokio::test(start_paused = true)]
async fn renegotiation_retries_on_a_bounded_schedule_then_starts_a_new_cycle() {
    let mut fe = Node::established(false, Mode::Fast, None);
    let t0 = Instant::now();
    let a = fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "expired".into(),
    });
    assert_eq!(initiates(&a), [1]);
    let mut gaps = Vec::new();
    let mut attempt = 1;
    loop {
        // Each attempt takes 100 ms to fail.
        time::advance(Duration::from_millis(100)).await;
        let a = fe.feed(Input::InitiateFinished {
            vip: vip(),
            attempt,
            result: Err("peer not answering".into()),
        });
        if notices(&a).contains(&NoticeKind::RenegotiationFailed) {
            assert!(
                Instant::now() - t0 >= Duration::from_secs(10),
                "gave up before the deadline"
            );
            break;
        }
        let (waited, a) = fe.next_timer().await;
        assert_eq!(initiates(&a), [attempt + 1], "{a:#?}");
        assert!(
            has(&a, &Action::DropStaleSas { vip: vip() }),
            "clear the half-open IKE_SA first: {a:#?}"
        );
        gaps.push(waited.as_millis());
        attempt += 1;
        assert!(attempt < 100, "unbounded");
    }
    // The backoff doubles from 50 ms up to the 1 s cap and counts from the start of each
    // attempt, which took 100 ms here: so the waits after each failure are 100 ms shorter.
    assert_eq!(gaps[..7], [0, 0, 100, 300, 700, 900, 900]);
    assert!(
        Instant::now() - t0 < Duration::from_millis(10_200),
        "{:?}",
        Instant::now() - t0
    );
    let p = &fe.core.peers()[&vip()];
    assert_eq!(
        p.last_failover.as_ref().unwrap().outcome,
        FailoverOutcome::GaveUp
    );
    assert_eq!(p.last_failover.as_ref().unwrap().attempts, attempt);
    assert!(p.renegotiation.is_none());
    // Recovery never ends for good: after the cooldown a new cycle starts.
    let a = fe.advance(Duration::from_secs(5)).await;
    assert_eq!(initiates(&a), [1]);
    assert!(notices(&a).contains(&NoticeKind::RenegotiationStarted));
}

#[tokio::test(start_paused = true)]
async fn renegotiation_succeeds_mid_schedule() {
    let mut fe = Node::established(false, Mode::Fast, None);
    fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "deleted by peer".into(),
    });
    fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 1,
        result: Err("no answer".into()),
    });
    let a = fe.advance(Duration::from_millis(50)).await;
    assert_eq!(initiates(&a), [2]);
    fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 2,
        result: Err("no answer".into()),
    });
    let a = fe.advance(Duration::from_millis(100)).await;
    assert_eq!(initiates(&a), [3]);
    let a = fe.feed(Input::SaUp(peer_sa(2)));
    let done = notice(&a, NoticeKind::RenegotiationFinished);
    assert_eq!(done.duration, Some(Duration::from_millis(150)));
    // The late result of attempt 3 changes nothing.
    assert!(
        fe.feed(Input::InitiateFinished {
            vip: vip(),
            attempt: 3,
            result: Ok(())
        })
        .is_empty()
    );
    assert!(fe.advance(Duration::from_secs(60)).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_late_result_of_an_ended_renegotiation_is_not_taken_for_the_next_ones() {
    let mut fe = Node::established(false, Mode::Fast, None);
    let a = fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "deleted by peer".into(),
    });
    assert_eq!(initiates(&a), [1]);
    // The SA comes up before its initiation returns, and the peer deletes it at once (a
    // draining holder refusing it): a new renegotiation starts while attempt 1 is out.
    fe.feed(Input::SaUp(peer_sa(2)));
    let a = fe.feed(Input::SaDown {
        sa: peer_sa(2),
        reason: "deleted by peer".into(),
    });
    // A refusal: the next attempt waits the first backoff step.
    assert!(initiates(&a).is_empty(), "{a:#?}");
    // Attempt 1 returns, before and after the new renegotiation's first attempt: it is
    // the ended renegotiation's, not this one's.
    for wait in [false, true] {
        if wait {
            let (_, a) = fe.next_timer().await;
            assert_eq!(initiates(&a), [2], "numbered after the one still out");
        }
        let a = fe.feed(Input::InitiateFinished {
            vip: vip(),
            attempt: 1,
            result: Ok(()),
        });
        assert!(
            !notices(&a).contains(&NoticeKind::RenegotiationFinished),
            "{a:#?}"
        );
        assert!(fe.core.peers()[&vip()].renegotiation.is_some());
    }
    let a = fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 2,
        result: Err("timeout".into()),
    });
    assert!(fe.core.peers()[&vip()].renegotiation.is_some(), "{a:#?}");
}

/// Feeds one SA that comes up for the renegotiation's attempt 1 and is deleted by the peer
/// `lived` later; returns what the deletion asked for.
async fn sa_refused_after(fe: &mut Node, id: u64, lived: Duration) -> Vec<Action> {
    fe.feed(Input::SaUp(peer_sa(id)));
    fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 1,
        result: Ok(()),
    });
    time::advance(lived).await;
    fe.feed(Input::SaDown {
        sa: peer_sa(id),
        reason: "deleted by peer".into(),
    })
}

/// A responder that deletes each new SA right after it comes up (a drained back-end, or
/// one not yet recorded as owner) is sent the next one after the retry backoff, not every
/// few milliseconds; an SA that lived is followed at once again.
#[tokio::test(start_paused = true)]
async fn a_peer_that_refuses_each_new_sa_is_retried_on_the_backoff() {
    let mut fe = Node::established(false, Mode::Fast, None);
    let a = fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "deleted by peer".into(),
    });
    // Found established when the daemon connected: its age is unknown, not a refusal.
    assert_eq!(initiates(&a), [1]);
    let mut waits = Vec::new();
    for id in 2..8 {
        let a = sa_refused_after(&mut fe, id, Duration::from_millis(5)).await;
        assert!(initiates(&a).is_empty(), "{a:#?}");
        let started = notice(&a, NoticeKind::RenegotiationStarted);
        assert!(started.detail.contains("refused"), "{}", started.detail);
        let (waited, a) = fe.next_timer().await;
        assert_eq!(initiates(&a), [1], "{a:#?}");
        waits.push(waited.as_millis());
    }
    assert_eq!(waits, [50, 100, 200, 400, 800, 1000]);
    let a = sa_refused_after(&mut fe, 8, Duration::from_secs(2)).await;
    assert_eq!(initiates(&a), [1], "an SA that lived is no refusal: {a:#?}");
    // ... and the count starts over after it.
    let a = sa_refused_after(&mut fe, 9, Duration::from_millis(5)).await;
    assert!(initiates(&a).is_empty());
    assert_eq!(fe.next_timer().await.0, Duration::from_millis(50));
}

/// News of a new owner ends the wait after refusals at once: the refusals were the old
/// holder's.
#[tokio::test(start_paused = true)]
async fn a_new_owner_ends_the_wait_after_refusals() {
    let mut fe = Node::established(true, Mode::Fast, owner("be1", 1));
    let a = fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "deleted by peer".into(),
    });
    assert_eq!(initiates(&a), [1]);
    for id in 2..5 {
        let a = sa_refused_after(&mut fe, id, Duration::from_millis(5)).await;
        assert!(initiates(&a).is_empty(), "{a:#?}");
        fe.next_timer().await;
    }
    let a = sa_refused_after(&mut fe, 5, Duration::from_millis(5)).await;
    assert!(initiates(&a).is_empty(), "{a:#?}");
    time::advance(Duration::from_millis(100)).await;
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 2),
    });
    assert_eq!(initiates(&a), [1], "{a:#?}");
    // The backoff's timer of the refusals is stale now.
    let a = fe.advance(Duration::from_secs(2)).await;
    assert!(initiates(&a).is_empty(), "{a:#?}");
    let a = sa_refused_after(&mut fe, 6, Duration::from_millis(5)).await;
    assert!(initiates(&a).is_empty());
    assert_eq!(
        fe.next_timer().await.0,
        Duration::from_millis(50),
        "the new owner's first refusal waits the first step"
    );
}

/// Refusals say nothing about what comes after the SA that was accepted: the idle detector
/// firing later renegotiates at once, and a refusal long after starts the count over.
#[tokio::test(start_paused = true)]
async fn refusals_are_forgotten_once_an_sa_is_accepted() {
    let mut fe = Node::established(false, Mode::Fast, None);
    fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "deleted by peer".into(),
    });
    for id in 2..6 {
        sa_refused_after(&mut fe, id, Duration::from_millis(5)).await;
        fe.next_timer().await;
    }
    // Accepted: it stays up, with traffic both ways, for a while.
    fe.feed(Input::SaUp(peer_sa(6)));
    fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 1,
        result: Ok(()),
    });
    for n in 1..=40 {
        time::advance(Duration::from_millis(250)).await;
        fe.feed(sample(n, n));
    }
    // Then the peer goes silent: the idle detector's renegotiation starts at once.
    let mut idle = None;
    for k in 1..=20 {
        time::advance(Duration::from_millis(250)).await;
        let a = fe.feed(sample(40 + k, 40));
        if notices(&a).contains(&NoticeKind::IdlePeerDetected) {
            idle = Some(a);
            break;
        }
    }
    let a = idle.expect("the idle detector fired");
    assert_eq!(initiates(&a), [1], "{a:#?}");
    // A refusal now is the first of a new streak.
    let a = sa_refused_after(&mut fe, 7, Duration::from_millis(5)).await;
    assert!(initiates(&a).is_empty(), "{a:#?}");
    assert_eq!(fe.next_timer().await.0, Duration::from_millis(50));
}
