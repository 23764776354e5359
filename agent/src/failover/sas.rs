//! What the keying daemon reports: it going down and coming back, SAs up and down, and
//! the traffic counters the idle detector reads.

use std::time::Duration;

use tokio::time::Instant;

use super::{Action, FailoverCore, Notice, NoticeKind, Out, PeerSa, SaRef};
use crate::model::{IkeId, TrafficCounters, Vip, VipRole};

/// A peer that deletes an SA this soon after it came up refused it (a back-end's guard
/// deletes a refused SA within milliseconds); rekeying, DPD and drains come much later.
const REFUSAL_WINDOW: Duration = Duration::from_secs(1);

impl FailoverCore {
    pub(super) fn keying_went_down(&mut self, out: &mut Out, detail: String) {
        if self.keying_up == Some(false) {
            return;
        }
        self.keying_up = Some(false);
        out.push(Action::Notify(
            Notice::new(NoticeKind::KeyingDown, None).detail(detail),
        ));
        for h in self.hosted.values_mut() {
            h.sas.clear();
            h.awaiting_record.clear();
        }
        let vips: Vec<Vip> = self.peers.keys().copied().collect();
        for vip in vips {
            let p = self.peers.get_mut(&vip).expect("known peer");
            // The daemon's SAs died with it.
            p.sas.clear();
            p.idle.reset();
        }
    }

    pub(super) fn keying_came_up(&mut self, out: &mut Out, now: Instant, established: Vec<SaRef>) {
        let was = self.keying_up;
        self.keying_up = Some(true);
        if was != Some(true) {
            out.push(Action::Notify(
                Notice::new(NoticeKind::KeyingUp, None)
                    .detail(format!("{} SAs established", established.len())),
            ));
        }
        for h in self.hosted.values_mut() {
            h.sas.clear();
        }
        for p in self.peers.values_mut() {
            p.sas.clear();
            p.idle.reset();
        }
        let store_healthy = self.store_healthy;
        for sa in established {
            match sa.role {
                VipRole::Hosted => {
                    if let Some(h) = self.hosted.get_mut(&sa.vip) {
                        // One that was waiting for this node's record when the daemon
                        // went away waits again, rather than slip in as accepted.
                        if !h.accepting && super::guard::awaits_own_record(h, store_healthy) {
                            h.awaiting_record.insert(sa.ike_id);
                        } else {
                            h.sas.insert(sa.ike_id);
                        }
                    }
                }
                VipRole::Peer => {
                    let tag = self.sa_epoch_tag(sa.vip);
                    if let Some(p) = self.peers.get_mut(&sa.vip) {
                        p.sas.insert(
                            sa.ike_id,
                            PeerSa {
                                since: now,
                                epoch: tag,
                                seen_up: false,
                            },
                        );
                    }
                }
            }
        }
        let vips: Vec<Vip> = self.peers.keys().copied().collect();
        for vip in vips {
            let p = &self.peers[&vip];
            let (has_sa, renegotiating, owner_known) = (
                !p.sas.is_empty(),
                p.renegotiation.is_some(),
                p.owner.is_some(),
            );
            if has_sa {
                if renegotiating {
                    self.finish(out, now, vip);
                }
            } else if renegotiating {
                self.kick(out, vip);
            } else if !self.waits_for_owner_record(vip) || owner_known {
                self.renegotiate(out, now, vip, "no SA toward the VIP".into(), false);
            }
        }
        // SAs the daemon already had for a hosted VIP this node may not accept (a restart
        // in the middle of a split brain) go now, like any refused SA.
        let hosted: Vec<Vip> = self.hosted.keys().copied().collect();
        for vip in hosted {
            self.guard(out, now, vip);
        }
    }

    /// The epoch an SA coming up now belongs to: the latest epoch this node has seen, even
    /// while no record exists or the store is unreachable. An SA made in such a gap leads
    /// to whoever answers on the VIP then (often the old owner, draining or about to go),
    /// so the next owner's record must find it stale; adopting it instead left a front-end
    /// with an SA to a node that no longer held the VIP until its idle detector noticed.
    /// Only a node that never learnt an epoch for the VIP tags it unknown (0).
    fn sa_epoch_tag(&self, vip: Vip) -> u64 {
        match self.peers.get(&vip) {
            Some(p) if p.synced && (p.owner.is_some() || p.epoch > 0) => p.epoch,
            _ => 0,
        }
    }

    pub(super) fn sa_up(&mut self, out: &mut Out, now: Instant, sa: SaRef) {
        match sa.role {
            VipRole::Hosted => {
                if !self.hosted_sa_allowed(out, sa.vip, sa.ike_id) {
                    return;
                }
                if let Some(h) = self.hosted.get_mut(&sa.vip)
                    && h.sas.insert(sa.ike_id)
                {
                    out.push(Action::Notify(
                        Notice::new(NoticeKind::SaUp, Some(sa.vip)).detail(ike(sa.ike_id)),
                    ));
                }
            }
            VipRole::Peer => {
                let tag = self.sa_epoch_tag(sa.vip);
                let Some(p) = self.peers.get_mut(&sa.vip) else {
                    return;
                };
                if p.sas.contains_key(&sa.ike_id) {
                    return;
                }
                p.sas.insert(
                    sa.ike_id,
                    PeerSa {
                        since: now,
                        epoch: tag,
                        seen_up: true,
                    },
                );
                p.idle.reset();
                out.push(Action::Notify(
                    Notice::new(NoticeKind::SaUp, Some(sa.vip))
                        .owner(p.owner.as_ref())
                        .detail(ike(sa.ike_id)),
                ));
                if self.peers[&sa.vip].renegotiation.is_some() {
                    self.finish(out, now, sa.vip);
                }
            }
        }
    }

    pub(super) fn sa_down(&mut self, out: &mut Out, now: Instant, sa: SaRef, reason: String) {
        match sa.role {
            VipRole::Hosted => {
                if let Some(h) = self.hosted.get_mut(&sa.vip)
                    && (h.sas.remove(&sa.ike_id) | h.awaiting_record.remove(&sa.ike_id))
                {
                    out.push(Action::Notify(
                        Notice::new(NoticeKind::SaDeleted, Some(sa.vip))
                            .detail(format!("{}: {reason}", ike(sa.ike_id))),
                    ));
                }
            }
            VipRole::Peer => {
                let keying_up = self.keying_up == Some(true);
                let Some(p) = self.peers.get_mut(&sa.vip) else {
                    return;
                };
                // Unknown SAs are ones we dropped ourselves: already handled.
                let Some(gone) = p.sas.remove(&sa.ike_id) else {
                    return;
                };
                let refused =
                    gone.seen_up && now.saturating_duration_since(gone.since) < REFUSAL_WINDOW;
                out.push(Action::Notify(
                    Notice::new(NoticeKind::SaDeleted, Some(sa.vip))
                        .detail(format!("{}: {reason}", ike(sa.ike_id))),
                ));
                if p.sas.is_empty() && keying_up {
                    let reason = format!("SA deleted ({reason})");
                    if refused {
                        // A streak: each refusal follows the last within the longest
                        // backoff and an exchange. One long after starts over.
                        let streak = self.settings.retry.max + REFUSAL_WINDOW * 2;
                        if p.refused_at
                            .is_some_and(|t| now.saturating_duration_since(t) > streak)
                        {
                            p.refused = 0;
                        }
                        p.refused = p.refused.saturating_add(1);
                        p.refused_at = Some(now);
                        self.renegotiate_refused(out, now, sa.vip, reason);
                    } else {
                        self.renegotiate(out, now, sa.vip, reason, false);
                    }
                }
            }
        }
    }

    pub(super) fn counters(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        counters: TrafficCounters,
    ) {
        let timeout = self.idle_timeout();
        let Some(p) = self.peers.get_mut(&vip) else {
            return;
        };
        if p.sas.is_empty() || p.renegotiation.is_some() {
            p.idle.reset();
            return;
        }
        if let Some(silent) = p.idle.observe(now, counters, timeout) {
            out.push(Action::Notify(
                Notice::new(NoticeKind::IdlePeerDetected, Some(vip))
                    .owner(p.owner.as_ref())
                    .duration(silent)
                    .detail("outbound traffic with nothing back"),
            ));
            self.renegotiate(out, now, vip, "idle peer".into(), true);
        }
    }
}

fn ike(id: IkeId) -> String {
    format!("IKE_SA #{id}")
}
