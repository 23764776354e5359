//! The IKE port probe beside a renegotiation without an owner record: silence, then an
//! answer, sends the next attempt at once; answers alone only slow the probes down.

use super::*;

const PROBE: Duration = Duration::from_millis(100);

/// A store-less front-end whose SA toward the VIP was just deleted by its peer.
fn renegotiating() -> (Node, Vec<Action>) {
    let mut fe = Node::front_end(false, Mode::Fast);
    fe.core.settings.ike_probe = Some(PROBE);
    fe.start();
    fe.feed(Input::StoreHealth {
        healthy: true,
        detail: String::new(),
    });
    fe.feed(Input::OwnerSnapshot(vec![(vip(), None)]));
    fe.feed(Input::KeyingUp {
        established: vec![peer_sa(1)],
    });
    let a = fe.feed(Input::SaDown {
        sa: peer_sa(1),
        reason: "deleted by peer".into(),
    });
    (fe, a)
}

fn probes(actions: &[Action]) -> Vec<Duration> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ProbeIke {
                vip: v,
                after,
                window,
            } if *v == vip() => {
                assert_eq!(*window, PROBE);
                Some(*after)
            }
            _ => None,
        })
        .collect()
}

/// SA `ike` comes up, then the attempt that made it returns, as the runtime reports them;
/// what the SA's arrival decided.
fn came_up(fe: &mut Node, ike: u64, attempt: u32) -> Vec<Action> {
    let a = fe.feed(Input::SaUp(peer_sa(ike)));
    fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt,
        result: Ok(()),
    });
    a
}

fn probed(fe: &mut Node, answered: bool) -> Vec<Action> {
    fe.feed(Input::IkeProbed {
        vip: vip(),
        answered,
    })
}

#[tokio::test(start_paused = true)]
async fn an_answer_after_silence_replaces_the_attempt_sent_into_it() {
    let (mut fe, a) = renegotiating();
    assert_eq!(initiates(&a), [1]);
    assert_eq!(probes(&a), [Duration::ZERO], "one probe beside the attempt");

    // The VIP is in transit: the probe waits out its window, and the next goes at once.
    time::advance(PROBE).await;
    let a = probed(&mut fe, false);
    assert_eq!(probes(&a), [Duration::ZERO]);
    assert!(initiates(&a).is_empty(), "{a:#?}");

    // A new holder answers while attempt 1, sent into the silence, still waits.
    time::advance(PROBE / 2).await;
    let a = probed(&mut fe, true);
    // ... also if the holder before the silence answered it: it cannot complete.
    assert!(has(&a, &Action::DropSilencedSas { vip: vip() }), "{a:#?}");
    assert!(
        !has(&a, &Action::DropStaleSas { vip: vip() }),
        "one drop: {a:#?}"
    );
    assert_eq!(initiates(&a), [2]);
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Initiate {
            news: true,
            attempt: 2,
            ..
        }
    )));
    assert!(notices(&a).contains(&NoticeKind::PeerAnswers));
    assert_eq!(probes(&a), [PROBE], "an answer slows the next probe down");

    // Attempt 1 reporting late changes nothing; attempt 2 succeeding ends it all.
    fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 1,
        result: Err("timeout".into()),
    });
    let a = came_up(&mut fe, 2, 2);
    assert!(notices(&a).contains(&NoticeKind::RenegotiationFinished));
    // On probation now: probes go on for one idle timeout, at the base interval.
    let a = probed(&mut fe, true);
    assert_eq!(probes(&a), [PROBE], "{a:#?}");
}

#[tokio::test(start_paused = true)]
async fn answers_without_silence_change_nothing_and_slow_down() {
    let (mut fe, _) = renegotiating();
    let mut waits = Vec::new();
    for _ in 0..7 {
        let a = probed(&mut fe, true);
        assert!(
            initiates(&a).is_empty(),
            "the holder answered all along: {a:#?}"
        );
        assert!(!has(&a, &Action::DropStaleSas { vip: vip() }));
        waits.extend(probes(&a));
    }
    let ms: Vec<u128> = waits.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, [100, 200, 400, 800, 1600, 1600, 1600]);
    // Silence starts over from the short interval.
    let a = probed(&mut fe, false);
    assert_eq!(probes(&a), [Duration::ZERO]);
    let a = probed(&mut fe, true);
    assert_eq!(probes(&a), [PROBE]);
}

#[tokio::test(start_paused = true)]
async fn an_answer_while_waiting_to_retry_retries_at_once() {
    let (mut fe, _) = renegotiating();
    time::advance(Duration::from_millis(500)).await;
    let a = fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 1,
        result: Err("timeout".into()),
    });
    assert!(initiates(&a).is_empty(), "the backoff first: {a:#?}");
    probed(&mut fe, false);
    let a = probed(&mut fe, true);
    assert_eq!(initiates(&a), [2], "{a:#?}");
    // The retry timer that was pending no longer fires an attempt of its own.
    let a = fe.advance(Duration::from_secs(1)).await;
    assert!(initiates(&a).is_empty(), "{a:#?}");
}

#[tokio::test(start_paused = true)]
async fn an_attempt_started_after_the_silence_is_left_to_finish() {
    let (mut fe, _) = renegotiating();
    probed(&mut fe, false);
    // Attempt 1 failed, and attempt 2 went out after the last silent probe.
    time::advance(Duration::from_millis(10)).await;
    fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 1,
        result: Err("refused".into()),
    });
    let a = fe.advance(Duration::from_millis(60)).await;
    assert_eq!(initiates(&a), [2]);
    let a = probed(&mut fe, true);
    assert!(initiates(&a).is_empty(), "{a:#?}");
    assert!(!has(&a, &Action::DropStaleSas { vip: vip() }), "{a:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_healthy_cluster_store_tells_more_than_the_probe() {
    let mut fe = Node::established(true, Mode::Fast, owner("be1", 1));
    fe.core.settings.ike_probe = Some(PROBE);
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 2),
    });
    assert_eq!(initiates(&a), [1]);
    assert!(probes(&a).is_empty(), "{a:#?}");
    // Once the store is unreachable, the probe is the front-end's only news.
    fe.feed(Input::StoreHealth {
        healthy: false,
        detail: "gone".into(),
    });
    let a = fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 1,
        result: Err("timeout".into()),
    });
    let a = [a, fe.advance(Duration::from_secs(1)).await].concat();
    assert_eq!(probes(&a), [Duration::ZERO], "{a:#?}");
}

#[tokio::test(start_paused = true)]
async fn an_sa_made_with_a_holder_that_leaves_right_after_is_replaced_on_the_next_answer() {
    let (mut fe, _) = renegotiating();
    // The draining holder still takes attempt 1, then its address goes.
    time::advance(Duration::from_millis(30)).await;
    let a = came_up(&mut fe, 2, 1);
    assert!(notices(&a).contains(&NoticeKind::RenegotiationFinished));
    // On probation the probe goes on, without slowing down.
    let a = probed(&mut fe, true);
    assert_eq!(probes(&a), [PROBE]);
    time::advance(PROBE).await;
    probed(&mut fe, false);
    time::advance(PROBE).await;
    let a = probed(&mut fe, true);
    assert!(has(&a, &Action::DropStaleSas { vip: vip() }), "{a:#?}");
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Initiate { news: true, .. })),
        "{a:#?}"
    );
    assert!(notices(&a).contains(&NoticeKind::PeerAnswers));
}

#[tokio::test(start_paused = true)]
async fn the_probation_ends_after_one_idle_timeout() {
    let (mut fe, _) = renegotiating();
    came_up(&mut fe, 2, 1);
    time::advance(fe.core.idle_timeout()).await;
    let a = probed(&mut fe, true);
    assert!(a.is_empty(), "{a:#?}");
    // An SA that came up after the silence is the new holder's: nothing to replace.
    let (mut fe, _) = renegotiating();
    probed(&mut fe, false);
    time::advance(PROBE).await;
    probed(&mut fe, true);
    fe.feed(Input::SaUp(peer_sa(2)));
    let a = probed(&mut fe, true);
    assert!(!has(&a, &Action::DropStaleSas { vip: vip() }), "{a:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_starting_front_end_waits_for_its_cluster_store_before_probing() {
    let mut fe = Node::front_end(true, Mode::Fast);
    fe.core.settings.ike_probe = Some(PROBE);
    fe.start();
    // Charon is up with no SA toward the VIP before the store has said anything.
    let a = fe.feed(Input::KeyingUp {
        established: vec![],
    });
    assert_eq!(initiates(&a), [1], "{a:#?}");
    assert!(probes(&a).is_empty(), "store health unknown: {a:#?}");
    // The store turns out to be unreachable: from then on the probe is the only news.
    fe.feed(Input::StoreHealth {
        healthy: false,
        detail: "connect timed out".into(),
    });
    let a = fe.feed(Input::InitiateFinished {
        vip: vip(),
        attempt: 1,
        result: Err("timeout".into()),
    });
    let a = [a, fe.advance(Duration::from_secs(1)).await].concat();
    assert_eq!(initiates(&a), [2], "{a:#?}");
    assert_eq!(probes(&a), [Duration::ZERO], "{a:#?}");
}

/// A drained holder that still has the address refuses each SA: the attempts wait the
/// retry backoff, but the probe hardly slows down, and the moment the address answers again
/// after silence (the next holder) the next attempt goes, without waiting out the backoff.
#[tokio::test(start_paused = true)]
async fn a_refusing_holder_is_kept_probed_and_its_successor_tried_at_once() {
    let (mut fe, a) = renegotiating();
    assert_eq!(initiates(&a), [1]);
    // Each renegotiation's first attempt is its attempt 1.
    for ike in 2..6 {
        came_up(&mut fe, ike, 1);
        time::advance(Duration::from_millis(5)).await;
        let a = fe.feed(Input::SaDown {
            sa: peer_sa(ike),
            reason: "deleted by peer".into(),
        });
        assert!(
            initiates(&a).is_empty(),
            "refused: the backoff first: {a:#?}"
        );
        // The holder answers the probe all along: it slows down to two intervals only.
        let a = probed(&mut fe, true);
        let next = probes(&a);
        assert!(next.len() == 1 && next[0] <= PROBE * 2, "{a:#?}");
        let a = fe
            .advance(Duration::from_millis(50) * (1 << (ike - 2)))
            .await;
        assert_eq!(initiates(&a), [1], "{a:#?}");
    }
    // Refused once more; the backoff is now 800 ms.
    came_up(&mut fe, 6, 1);
    let a = fe.feed(Input::SaDown {
        sa: peer_sa(6),
        reason: "deleted by peer".into(),
    });
    assert!(initiates(&a).is_empty());
    // The drained holder lets the address go: silence, then the next holder answers.
    time::advance(PROBE).await;
    probed(&mut fe, false);
    time::advance(PROBE).await;
    let a = probed(&mut fe, true);
    assert_eq!(initiates(&a), [1], "{a:#?}");
    assert!(notices(&a).contains(&NoticeKind::PeerAnswers), "{a:#?}");
}
