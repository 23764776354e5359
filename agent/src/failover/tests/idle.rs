//! The idle detector: a silent peer in fast mode, the long timeout in normal mode.

use super::*;

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
