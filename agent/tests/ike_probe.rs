//! The IKE port probe against a real charon: a VIP held by a node whose charon runs
//! answers at once, whether or not the node has a connection for the asker; a VIP nobody
//! holds, and one held by a node without an IKE daemon, stay silent for the window; and a
//! burst of probes leaves the responder without a half-open IKE_SA or a COOKIE demand.

use std::time::Duration;

use vipsec::keying::ike_probe::{IkeProbe, UdpIkeProbe};
use vipsec::model::Vip;
use vipsec_testbed::charon::TwoNodeLab;

/// Runs `work` on a runtime of its own inside the front-end's network namespace.
fn on_fe<T, F>(lab: &TwoNodeLab, work: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    lab.fe
        .run_in(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(work())
        })
        .unwrap()
}

fn probe_from_fe(lab: &TwoNodeLab, vip: &str, window: Duration) -> (bool, Duration) {
    let vip: Vip = vip.parse().unwrap();
    on_fe(lab, move || async move {
        let started = std::time::Instant::now();
        let answer = UdpIkeProbe::default().answers(vip, window).await;
        (answer.answered(), started.elapsed())
    })
}

#[test]
fn a_live_charon_answers_and_an_empty_address_does_not() {
    vipsec_testbed::require_root().unwrap();
    let lab = TwoNodeLab::start().expect("start the two-node lab");
    let window = Duration::from_millis(500);

    let (answered, took) = probe_from_fe(&lab, TwoNodeLab::VIP, window);
    assert!(
        answered,
        "charon on the VIP did not answer within {window:?}"
    );
    assert!(took < window, "{took:?}");

    // The back-end's own address: charon listens there too, with no connection for it.
    let (answered, _) = probe_from_fe(&lab, TwoNodeLab::BE_ADDR, window);
    assert!(
        answered,
        "charon answers a stranger on any of its addresses"
    );

    // Nobody holds .99 on the link: ARP fails, nothing comes back.
    let (answered, took) = probe_from_fe(&lab, "192.0.2.99", window);
    assert!(!answered);
    assert!(took >= window, "a silent probe spends its window: {took:?}");

    // Still no charon answering after it is gone: the host answers with ICMP only.
    let mut lab = lab;
    lab.be_charon.kill();
    let (answered, took) = probe_from_fe(&lab, TwoNodeLab::VIP, window);
    assert!(!answered, "a host without an IKE daemon is not an answer");
    assert!(took >= window, "{took:?}");
}

/// Probes `count` times at once from the front-end; how many were answered.
fn burst_from_fe(lab: &TwoNodeLab, vip: &str, count: usize, window: Duration) -> usize {
    let vip: Vip = vip.parse().unwrap();
    on_fe(lab, move || async move {
        let probe = std::sync::Arc::new(UdpIkeProbe::default());
        let asks: Vec<_> = (0..count)
            .map(|_| {
                let probe = probe.clone();
                tokio::spawn(async move { probe.answers(vip, window).await })
            })
            .collect();
        let mut answered = 0;
        for ask in asks {
            answered += usize::from(ask.await.unwrap().answered());
        }
        answered
    })
}

#[test]
fn a_burst_of_probes_builds_no_ike_sa_and_no_cookie_demand_on_the_responder() {
    vipsec_testbed::require_root().unwrap();
    let lab = TwoNodeLab::start().expect("start the two-node lab");
    let window = Duration::from_millis(500);
    let log_before = std::fs::read_to_string(lab.be_charon.log_path()).unwrap_or_default();

    // A new owner with ten VIPs probed every 50 ms by one front-end sees about this many
    // within a few milliseconds; charon asks an address for COOKIEs from three half-open
    // IKE_SAs on (`charon.cookie_threshold_ip`).
    let count = 30;
    let answered = burst_from_fe(&lab, TwoNodeLab::VIP, count, window);
    assert_eq!(answered, count, "every probe is answered");

    let log = std::fs::read_to_string(lab.be_charon.log_path()).unwrap();
    let new = &log[log_before.len().min(log.len())..];
    assert!(
        !new.contains("is initiating an IKE_SA"),
        "a probe became an IKE_SA on the responder:\n{new}"
    );
    assert!(
        !new.contains("N(COOKIE)"),
        "the probes made the responder ask for COOKIEs:\n{new}"
    );
    assert!(
        new.contains("INVALID_MAJOR_VERSION"),
        "the responder did not answer from its receiver:\n{new}"
    );

    // And the front-end's real IKE_SA comes up as before, without a COOKIE round trip.
    lab.connect().expect("the tunnel comes up after the probes");
    let log = std::fs::read_to_string(lab.be_charon.log_path()).unwrap();
    assert!(
        !log[log_before.len().min(log.len())..].contains("N(COOKIE)"),
        "the real IKE_SA_INIT after the probes was asked for a COOKIE"
    );
}
