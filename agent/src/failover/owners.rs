//! What the store says: owner records (hosted VIPs keep theirs right, peer VIPs follow a
//! new owner), the nodes that mark a VIP's address as theirs, and the store's health.

use std::collections::{BTreeMap, BTreeSet};

use tokio::time::Instant;

use super::{Action, FailoverCore, Notice, NoticeKind, Out, OwnerWait, Timer};
use crate::model::{Vip, VipOwner};

impl FailoverCore {
    pub(super) fn owner_snapshot(
        &mut self,
        out: &mut Out,
        now: Instant,
        records: Vec<(Vip, Option<VipOwner>)>,
    ) {
        let records: BTreeMap<Vip, Option<VipOwner>> = records.into_iter().collect();
        for (vip, owner) in &records {
            self.crowds
                .owner(*vip, owner.as_ref().map(|o| o.node.as_str()));
        }
        let vips: Vec<Vip> = self
            .hosted
            .keys()
            .chain(self.peers.keys())
            .copied()
            .collect();
        for vip in vips {
            let owner = records.get(&vip).cloned().flatten();
            self.owner_update(out, now, vip, owner, true);
        }
    }

    pub(super) fn owner_changed(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        owner: Option<VipOwner>,
    ) {
        self.crowds
            .owner(vip, owner.as_ref().map(|o| o.node.as_str()));
        self.owner_update(out, now, vip, owner, false)
    }

    pub(super) fn holders_snapshot(
        &mut self,
        out: &mut Out,
        now: Instant,
        holders: Vec<(Vip, String, u32)>,
    ) {
        self.crowds.holders_snapshot(&holders);
        let me = self.settings.node.clone();
        let vips: Vec<Vip> = self.hosted.keys().copied().collect();
        for vip in vips {
            let others: BTreeSet<String> = holders
                .iter()
                .filter(|(v, n, _)| *v == vip && *n != me)
                .map(|(_, n, _)| n.clone())
                .collect();
            let h = self.hosted.get_mut(&vip).expect("hosted VIP");
            if h.also_held_by != others {
                h.also_held_by = others;
                self.guard(out, now, vip);
            }
        }
    }

    pub(super) fn holder_changed(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        node: String,
        holds: bool,
        followers: u32,
    ) {
        self.crowds.holder(vip, &node, holds, followers);
        if node != self.settings.node
            && let Some(h) = self.hosted.get_mut(&vip)
        {
            let changed = if holds {
                h.also_held_by.insert(node)
            } else {
                h.also_held_by.remove(&node)
            };
            if changed {
                self.guard(out, now, vip);
            }
        }
    }

    fn owner_update(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        owner: Option<VipOwner>,
        snapshot: bool,
    ) {
        if let Some(h) = self.hosted.get_mut(&vip) {
            if let Some(o) = &owner
                && o.epoch < h.epoch
            {
                out.push(stale_notice(vip, o, h.epoch));
                return;
            }
            if h.owner == owner {
                if owner.is_none() && h.present && !h.draining && !h.accepting {
                    // Still here, still unrecorded (a publish refused while another node
                    // held the record, whose removal we never saw): try again.
                    out.push(Action::PublishOwnership { vip });
                }
                self.guard(out, now, vip);
                return;
            }
            let mut notice = Notice::new(NoticeKind::OwnerChanged, Some(vip)).owner(owner.as_ref());
            if let Some(o) = &owner {
                h.epoch = o.epoch;
                if h.present && o.node != self.settings.node {
                    notice = notice.detail(format!(
                        "{vip} is present here but recorded as owned by {}",
                        o.node
                    ));
                }
            } else {
                notice = notice.epoch(h.epoch);
            }
            h.owner = owner;
            out.push(Action::Notify(notice));
            if !h.present
                && h.owner
                    .as_ref()
                    .is_some_and(|o| o.node == self.settings.node)
            {
                // Our record, but the VIP is not here (a withdraw that has not taken effect
                // yet, or a record left by an earlier run): it must go, or the node that
                // has the address is refused for as long as it stands.
                out.push(Action::WithdrawOwnership { vip });
            }
            if h.owner.is_none() && h.present && !h.draining {
                // The record vanished while the VIP is still here (lease lost in an outage,
                // or removed by hand): put it back.
                out.push(Action::PublishOwnership { vip });
            }
            self.guard(out, now, vip);
            return;
        }

        let cluster = self.settings.cluster_store;
        let Some(p) = self.peers.get_mut(&vip) else {
            return;
        };
        let first_sync = snapshot && !p.synced;
        if snapshot {
            p.synced = true;
        }
        match owner {
            Some(o) if o.epoch < p.epoch => out.push(stale_notice(vip, &o, p.epoch)),
            Some(o) if p.owner.as_ref() == Some(&o) => {}
            Some(o) => {
                p.epoch = o.epoch;
                // A new owner has not refused anything yet.
                p.refused = 0;
                let node = o.node.clone();
                out.push(Action::Notify(
                    Notice::new(NoticeKind::OwnerChanged, Some(vip)).owner(Some(&o)),
                ));
                p.owner = Some(o);
                // SAs that came up while the owner was unknown are taken to belong to the
                // owner we now learn of; the idle detector still guards them.
                for sa in p.sas.values_mut().filter(|s| s.epoch == 0) {
                    sa.epoch = p.epoch;
                }
                if first_sync {
                    if p.sas.is_empty() && self.keying_up == Some(true) {
                        self.renegotiate(out, now, vip, "no SA toward the VIP".into(), false);
                    }
                    return;
                }
                let stale = p.sas.values().any(|s| s.epoch < p.epoch);
                let reason = format!("owner changed to {node} (epoch {})", p.epoch);
                if stale || p.sas.is_empty() {
                    self.renegotiate(out, now, vip, reason, stale);
                }
            }
            None => {
                if p.owner.is_none() {
                    return;
                }
                p.owner = None;
                out.push(Action::Notify(
                    Notice::new(NoticeKind::OwnerChanged, Some(vip))
                        .epoch(p.epoch)
                        .detail("no owner"),
                ));
                // A working SA is kept until a *different* owner is recorded: a record
                // also vanishes when its owner's lease lapses in a store hiccup, and the
                // owner puts it back at the same epoch. After a real release the old
                // owner deletes its SAs itself; after a crash the next owner's record (a
                // newer epoch) makes ours stale. If no owner is recorded within
                // `owner_wait`, the SA's peer is taken as gone.
                p.vacancies += 1;
                if !p.sas.is_empty() && cluster {
                    out.push(Action::StartTimer {
                        timer: Timer::Vacant {
                            vip,
                            generation: p.vacancies,
                        },
                        after: self.settings.owner_wait,
                    });
                }
            }
        }
    }

    pub(super) fn store_health(&mut self, out: &mut Out, healthy: bool, detail: String) {
        if self.store_healthy == Some(healthy) {
            return;
        }
        self.store_healthy = Some(healthy);
        if healthy {
            for h in self.hosted.values_mut() {
                h.arrived_in_outage = false;
            }
        }
        let kind = if healthy {
            NoticeKind::StoreUp
        } else {
            NoticeKind::StoreDown
        };
        out.push(Action::Notify(Notice::new(kind, None).detail(detail)));
        let hosted: Vec<Vip> = self.hosted.keys().copied().collect();
        for vip in hosted {
            self.guard(out, self.now, vip);
        }
        if !healthy {
            // No record will come: stop waiting for one.
            let waiting: Vec<Vip> = self
                .peers
                .iter()
                .filter(|(_, p)| {
                    p.renegotiation
                        .as_ref()
                        .is_some_and(|r| r.owner_wait == OwnerWait::Waiting)
                })
                .map(|(v, _)| *v)
                .collect();
            for vip in waiting {
                self.kick(out, vip);
            }
        }
    }
}

fn stale_notice(vip: Vip, o: &VipOwner, known: u64) -> Action {
    Action::Notify(
        Notice::new(NoticeKind::StaleRecordIgnored, Some(vip))
            .owner(Some(o))
            .detail(format!(
                "epoch {} is older than the known epoch {known}",
                o.epoch
            )),
    )
}
