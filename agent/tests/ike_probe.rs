//! The IKE port probe against a real charon: a VIP held by a node whose charon runs
//! answers at once, whether or not the node has a connection for the asker; a VIP nobody
//! holds, and one held by a node without an IKE daemon, stay silent for the window.

use std::time::Duration;

use vipsec::keying::ike_probe::{IkeProbe, UdpIkeProbe};
use vipsec::model::Vip;
use vipsec_testbed::charon::TwoNodeLab;

fn probe_from_fe(lab: &TwoNodeLab, vip: &str, window: Duration) -> (bool, Duration) {
    let vip: Vip = vip.parse().unwrap();
    lab.fe
        .run_in(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let started = std::time::Instant::now();
            let answer = rt.block_on(UdpIkeProbe::default().answers(vip, window));
            (answer.answered(), started.elapsed())
        })
        .unwrap()
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
