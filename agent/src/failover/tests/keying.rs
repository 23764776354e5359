//! The keying daemon going away and coming back. (The clear-text guard is not the core's:
//! it stands in the kernel whatever the core decides; runtime::guard keeps it and
//! agent/tests/kernel_xfrm.rs proves it.)

use super::*;

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
