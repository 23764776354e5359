//! Scenario tests of the failover core, driven with paused tokio time. The `Node` harness
//! plays the runtime: it keeps the timers the core starts and fires them as time advances.

use std::net::IpAddr;
use std::time::Duration;

use tokio::time::{self, Instant};

use super::*;
use crate::model::{Mode, TrafficCounters, VipOwner, VipRole};

const VIP: &str = "192.0.2.100";

fn vip() -> IpAddr {
    VIP.parse().unwrap()
}

fn owner(node: &str, epoch: u64) -> Option<VipOwner> {
    Some(VipOwner {
        node: node.into(),
        epoch,
        taken_at_ms: 0,
        draining: false,
    })
}

fn settings(cluster_store: bool, mode: Mode) -> CoreSettings {
    CoreSettings {
        node: "me".into(),
        mode,
        fast_idle_timeout: Duration::from_secs(2),
        normal_idle_timeout: Duration::from_secs(300),
        retry: RetrySchedule {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
            deadline: Duration::from_secs(10),
            cooldown: Duration::from_secs(5),
        },
        owner_wait: Duration::from_secs(3),
        drain_hold: Duration::from_secs(10),
        fail_secure: true,
        cluster_store,
        split_brain_grace: Duration::from_secs(1),
        trust_kernel_when_store_down: true,
        takeover_probe: Some(Duration::from_millis(30)),
    }
}

fn peer_sa(id: u64) -> SaRef {
    SaRef {
        vip: vip(),
        role: VipRole::Peer,
        ike_id: id,
    }
}

struct Node {
    core: FailoverCore,
    timers: Vec<(Instant, Timer)>,
}

impl Node {
    fn front_end(cluster_store: bool, mode: Mode) -> Node {
        let core = FailoverCore::new(settings(cluster_store, mode), &[], &[(vip(), true)]);
        Node {
            core,
            timers: Vec::new(),
        }
    }

    fn back_end() -> Node {
        let core = FailoverCore::new(settings(true, Mode::Normal), &[(vip(), false)], &[]);
        Node {
            core,
            timers: Vec::new(),
        }
    }

    fn take_timers(&mut self, actions: &[Action]) {
        for a in actions {
            if let Action::StartTimer { timer, after } = a {
                self.timers.push((Instant::now() + *after, *timer));
            }
        }
    }

    fn feed(&mut self, input: Input) -> Vec<Action> {
        let actions = self.core.handle(Instant::now(), input);
        self.take_timers(&actions);
        actions
    }

    fn start(&mut self) -> Vec<Action> {
        let actions = self.core.start(Instant::now());
        self.take_timers(&actions);
        actions
    }

    /// Advances paused time by `d`, firing the timers that fall due on the way.
    async fn advance(&mut self, d: Duration) -> Vec<Action> {
        let end = Instant::now() + d;
        let mut all = Vec::new();
        loop {
            self.timers.sort_by_key(|(at, _)| *at);
            let due = self.timers.first().filter(|(at, _)| *at <= end).copied();
            let Some((at, timer)) = due else { break };
            self.timers.remove(0);
            time::advance(at.saturating_duration_since(Instant::now())).await;
            all.extend(self.feed(Input::TimerFired(timer)));
        }
        time::advance(end.saturating_duration_since(Instant::now())).await;
        all
    }

    /// Advances paused time to the next timer and fires it; returns the wait and actions.
    async fn next_timer(&mut self) -> (Duration, Vec<Action>) {
        self.timers.sort_by_key(|(at, _)| *at);
        let (at, timer) = self.timers.remove(0);
        let waited = at.saturating_duration_since(Instant::now());
        time::advance(waited).await;
        (waited, self.feed(Input::TimerFired(timer)))
    }

    /// A front-end with the daemon up, the store synced to `owner` and one SA up.
    fn established(cluster_store: bool, mode: Mode, owner_rec: Option<VipOwner>) -> Node {
        let mut n = Node::front_end(cluster_store, mode);
        n.start();
        n.feed(Input::StoreHealth {
            healthy: true,
            detail: String::new(),
        });
        n.feed(Input::OwnerSnapshot(vec![(vip(), owner_rec)]));
        n.feed(Input::KeyingUp {
            established: vec![peer_sa(1)],
        });
        assert!(n.core.peers()[&vip()].renegotiation.is_none());
        n
    }
}

fn initiates(actions: &[Action]) -> Vec<u32> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Initiate { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect()
}

fn has(actions: &[Action], want: &Action) -> bool {
    actions.contains(want)
}

fn notices(actions: &[Action]) -> Vec<NoticeKind> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Notify(n) => Some(n.kind),
            _ => None,
        })
        .collect()
}

fn notice(actions: &[Action], kind: NoticeKind) -> Notice {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Notify(n) if n.kind == kind => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {kind:?} in {actions:#?}"))
}

// ----- back-end (old owner) -----

#[tokio::test(start_paused = true)]
async fn planned_move_on_the_old_owner_withdraws_and_deletes_gracefully() {
    let mut be = Node::back_end();
    let a = be.feed(Input::VipAppeared(vip()));
    assert!(has(&a, &Action::PublishOwnership { vip: vip() }));
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 1),
    });
    be.feed(Input::SaUp(SaRef {
        vip: vip(),
        role: VipRole::Hosted,
        ike_id: 7,
    }));

    let a = be.feed(Input::VipDisappeared(vip()));
    assert_eq!(
        a[..2],
        [
            Action::WithdrawOwnership { vip: vip() },
            Action::DeleteSas {
                vip: vip(),
                role: VipRole::Hosted
            }
        ]
    );
    assert_eq!(notices(&a), [NoticeKind::VipReleased]);
    // A second "disappeared" (duplicate netlink event) does nothing.
    assert!(be.feed(Input::VipDisappeared(vip())).is_empty());
}

#[tokio::test(start_paused = true)]
async fn drain_deletes_while_the_vip_is_still_here_and_republishes_if_it_stays() {
    let mut be = Node::back_end();
    be.feed(Input::VipAppeared(vip()));
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 4),
    });
    let a = be.feed(Input::Drain(vip()));
    assert!(has(
        &a,
        &Action::DeleteSas {
            vip: vip(),
            role: VipRole::Hosted
        }
    ));
    assert!(has(&a, &Action::WithdrawOwnership { vip: vip() }));
    // Our own withdrawal comes back from the store: no republish while draining.
    let a = be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: None,
    });
    assert!(!has(&a, &Action::PublishOwnership { vip: vip() }));
    // The cluster manager never moved the VIP: after the hold, publish again.
    let a = be.advance(Duration::from_secs(10)).await;
    assert!(has(&a, &Action::PublishOwnership { vip: vip() }), "{a:#?}");
}

#[tokio::test(start_paused = true)]
async fn drain_followed_by_the_move_does_not_republish() {
    let mut be = Node::back_end();
    be.feed(Input::VipAppeared(vip()));
    be.feed(Input::Drain(vip()));
    be.feed(Input::VipDisappeared(vip()));
    let a = be.advance(Duration::from_secs(30)).await;
    assert!(a.is_empty(), "{a:#?}");
}

#[tokio::test(start_paused = true)]
async fn lost_record_of_a_present_vip_is_published_again() {
    let mut be = Node::back_end();
    be.feed(Input::VipAppeared(vip()));
    be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("me", 2),
    });
    let a = be.feed(Input::OwnerChanged {
        vip: vip(),
        owner: None,
    });
    assert!(has(&a, &Action::PublishOwnership { vip: vip() }));
}

// ----- front-end -----

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
    // The new owner's record must not adopt that SA: it leads to the old owner.
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 2),
    });
    assert!(has(&a, &Action::DropStaleSas { vip: vip() }), "{a:#?}");
    assert_eq!(initiates(&a), [1]);
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

// ----- fast-mode idle detector -----

fn sample(out: u64, inn: u64) -> Input {
    Input::CountersSampled {
        vip: vip(),
        counters: TrafficCounters {
            bytes_in: inn * 60,
            bytes_out: out * 60,
            packets_in: inn,
            packets_out: out,
        },
    }
}

#[tokio::test(start_paused = true)]
async fn fast_mode_idle_peer_is_dropped_and_renegotiated() {
    let mut fe = Node::established(false, Mode::Fast, None);
    let t0 = Instant::now();
    fe.feed(sample(100, 100));
    let mut out = 100;
    let mut fired = None;
    for _ in 0..20 {
        time::advance(Duration::from_millis(250)).await;
        out += 3;
        let a = fe.feed(sample(out, 100));
        if notices(&a).contains(&NoticeKind::IdlePeerDetected) {
            assert!(has(&a, &Action::DropStaleSas { vip: vip() }));
            // No cluster store: nothing to wait for, initiate at once.
            assert_eq!(initiates(&a), [1]);
            fired = Some(Instant::now() - t0);
            break;
        }
    }
    // First unanswered growth at 250 ms, timeout 2 s: detected at the 2.25 s sample.
    assert_eq!(fired, Some(Duration::from_millis(2250)));
}

#[tokio::test(start_paused = true)]
async fn an_idle_link_with_no_traffic_never_fails_over() {
    let mut fe = Node::established(false, Mode::Fast, None);
    for _ in 0..400 {
        let a = fe.feed(sample(100, 100));
        assert!(a.is_empty(), "{a:#?}");
        time::advance(Duration::from_millis(250)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn normal_mode_waits_for_the_long_idle_timeout() {
    let mut fe = Node::established(false, Mode::Normal, None);
    fe.feed(sample(0, 0));
    for i in 1..=40 {
        time::advance(Duration::from_millis(250)).await;
        let a = fe.feed(sample(i, 0));
        assert!(
            a.is_empty(),
            "normal mode must not fail over after {}ms",
            i * 250
        );
    }
    // Switching to fast mode at run time takes effect on the next samples.
    let a = fe.feed(Input::SetMode {
        mode: Mode::Fast,
        idle_timeout: Some(Duration::from_secs(1)),
    });
    assert_eq!(
        notice(&a, NoticeKind::ModeChanged).detail,
        "fast, idle timeout 1s"
    );
    time::advance(Duration::from_millis(250)).await;
    let a = fe.feed(sample(41, 0));
    assert!(
        notices(&a).contains(&NoticeKind::IdlePeerDetected),
        "{a:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn store_outage_falls_back_to_the_fast_idle_timeout() {
    let mut fe = Node::established(true, Mode::Normal, owner("be1", 1));
    assert_eq!(fe.core.idle_timeout(), Duration::from_secs(300));
    let a = fe.feed(Input::StoreHealth {
        healthy: false,
        detail: "connection refused".into(),
    });
    assert_eq!(notices(&a), [NoticeKind::StoreDown]);
    assert_eq!(fe.core.idle_timeout(), Duration::from_secs(2));
    fe.feed(Input::StoreHealth {
        healthy: true,
        detail: String::new(),
    });
    assert_eq!(fe.core.idle_timeout(), Duration::from_secs(300));
}

// ----- retries -----

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

// ----- keying daemon -----
// (The clear-text guard is not the core's: it stands in the kernel whatever the core
// decides; runtime::guard keeps it and agent/tests/kernel_xfrm.rs proves it.)

#[tokio::test(start_paused = true)]
async fn keying_daemon_loss_forgets_the_sas_and_recovery_initiates() {
    let mut fe = Node::established(false, Mode::Fast, None);
    let a = fe.feed(Input::KeyingDown {
        detail: "socket closed".into(),
    });
    assert_eq!(notices(&a), [NoticeKind::KeyingDown]);
    assert!(fe.core.peers()[&vip()].sas.is_empty());
    // Repeated "down" reports while reconnecting change nothing.
    assert!(
        fe.feed(Input::KeyingDown {
            detail: "connection refused".into()
        })
        .is_empty()
    );
    // Idle detection cannot act without SAs, and nothing is initiated while down.
    assert!(fe.advance(Duration::from_secs(30)).await.is_empty());

    let a = fe.feed(Input::KeyingUp {
        established: vec![],
    });
    assert_eq!(initiates(&a), [1]);
}

#[tokio::test(start_paused = true)]
async fn renegotiation_waits_for_the_daemon_when_it_is_down() {
    let mut fe = Node::established(true, Mode::Fast, owner("be1", 1));
    fe.feed(Input::KeyingDown {
        detail: "socket closed".into(),
    });
    // The owner changes while the daemon is down: nothing can be initiated yet.
    let a = fe.feed(Input::OwnerChanged {
        vip: vip(),
        owner: owner("be2", 2),
    });
    assert!(initiates(&a).is_empty());
    assert!(
        fe.core.peers()[&vip()]
            .renegotiation
            .as_ref()
            .unwrap()
            .waiting_for_keying
    );
    let a = fe.feed(Input::KeyingUp {
        established: vec![],
    });
    assert_eq!(initiates(&a), [1]);
}

// ----- split-brain guard -----

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
        &Action::DeleteSas {
            vip: vip(),
            role: VipRole::Hosted
        }
    ));
    assert!(notice(&a, NoticeKind::SaRefused).detail.contains("other"));
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
