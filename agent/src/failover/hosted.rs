//! The back-end side: a hosted VIP arriving, leaving and being drained, and its record
//! published again when the store lost it.

use std::time::Duration;

use tokio::time::Instant;

use super::{Action, FailoverCore, Notice, NoticeKind, Out, Timer};
use crate::model::{Vip, VipRole};

/// Wait before publishing again after the store failed to record this node's ownership.
const REPUBLISH_AFTER: Duration = Duration::from_millis(500);

impl FailoverCore {
    pub(super) fn vip_appeared(&mut self, out: &mut Out, vip: Vip) {
        let Some(h) = self.hosted.get_mut(&vip) else {
            return;
        };
        if h.present {
            return;
        }
        h.present = true;
        h.draining = false;
        h.generation += 1;
        h.arrived_in_outage = self.settings.cluster_store && self.store_healthy != Some(true);
        out.push(Action::PublishOwnership { vip });
        out.push(Action::Notify(
            Notice::new(NoticeKind::VipAcquired, Some(vip)).epoch(h.epoch),
        ));
        self.guard(out, self.now, vip);
    }

    pub(super) fn vip_disappeared(&mut self, out: &mut Out, vip: Vip) {
        let Some(h) = self.hosted.get_mut(&vip) else {
            return;
        };
        if !h.present {
            return;
        }
        h.present = false;
        h.draining = false;
        h.generation += 1;
        // Withdraw first: front-ends learn from the store within milliseconds, while the
        // DELETEs need the keying daemon and the peers.
        out.push(Action::WithdrawOwnership { vip });
        match h.owner.as_ref().filter(|o| o.node != self.settings.node) {
            // Another node is already on record (this node was paused or slow through the
            // move): the front-ends have moved on and drop their old SAs themselves; a
            // DELETE decided now would act on a tenure that is over.
            Some(o) => out.push(Action::Notify(
                Notice::new(NoticeKind::ActionFenced, Some(vip))
                    .owner(Some(o))
                    .detail(format!(
                        "delete: {} holds the VIP at epoch {}; this node's old SAs are left to expire",
                        o.node, o.epoch
                    )),
            )),
            None => out.push(Action::DeleteSas {
                vip,
                role: VipRole::Hosted,
            }),
        }
        out.push(Action::Notify(
            Notice::new(NoticeKind::VipReleased, Some(vip)).epoch(h.epoch),
        ));
        self.guard(out, self.now, vip);
    }

    pub(super) fn drain(&mut self, out: &mut Out, vip: Vip) {
        let Some(h) = self.hosted.get_mut(&vip) else {
            out.push(Action::Notify(
                Notice::new(NoticeKind::ActionFailed, Some(vip))
                    .detail("drain: not a hosted VIP of this node"),
            ));
            return;
        };
        h.draining = true;
        h.generation += 1;
        // Refuse new SAs first: a front-end whose DELETE arrives before the draining
        // record must not be served here again.
        self.guard(out, self.now, vip);
        let h = self.hosted.get_mut(&vip).expect("hosted VIP");
        // DELETE first, while front-ends still know us as the owner: each answers its
        // DELETE. Withdrawing first would make them delete at the same moment, and two
        // crossing DELETEs leave charon waiting for answers that never come. The record
        // is marked draining before that, so a front-end that got our DELETE waits for the
        // next owner's record instead of coming back here.
        out.push(Action::MarkDraining { vip });
        out.push(Action::DeleteSas {
            vip,
            role: VipRole::Hosted,
        });
        out.push(Action::WithdrawOwnership { vip });
        out.push(Action::Notify(
            Notice::new(NoticeKind::Drained, Some(vip)).epoch(h.epoch),
        ));
        if h.present {
            let timer = Timer::DrainHold {
                vip,
                generation: h.generation,
            };
            out.push(Action::StartTimer {
                timer,
                after: self.settings.drain_hold,
            });
        }
    }

    pub(super) fn publish_failed(&mut self, out: &mut Out, vip: Vip) {
        // The SAs that waited for this record do not wait for the retries: the store may
        // answer its watch and still refuse writes (a cluster without quorum) for long.
        self.refuse_awaiting(
            out,
            vip,
            "this node could not write its record (retrying); the VIP accepts no SA here until it does",
        );
        // Without its record the VIP accepts no SA here: never leave it at one try.
        if let Some(h) = self.hosted.get(&vip)
            && h.present
            && !h.draining
        {
            out.push(Action::StartTimer {
                timer: Timer::Republish {
                    vip,
                    generation: h.generation,
                },
                after: REPUBLISH_AFTER,
            });
        }
    }

    pub(super) fn republish_timer(&mut self, out: &mut Out, vip: Vip, generation: u64) {
        if let Some(h) = self.hosted.get(&vip)
            && h.generation == generation
            && h.present
            && !h.draining
            && h.owner.is_none()
        {
            out.push(Action::PublishOwnership { vip });
        }
    }

    pub(super) fn drain_hold_timer(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        generation: u64,
    ) {
        let Some(h) = self.hosted.get_mut(&vip) else {
            return;
        };
        if h.generation == generation && h.present && h.draining {
            h.draining = false;
            out.push(Action::PublishOwnership { vip });
            out.push(Action::Notify(
                Notice::new(NoticeKind::VipAcquired, Some(vip))
                    .epoch(h.epoch)
                    .detail("still here after the drain hold; ownership published again"),
            ));
        }
        self.guard(out, now, vip);
    }
}
