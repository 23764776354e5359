//! A back-end, the old owner: a planned move, a drain, a lost record.

use super::*;

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
