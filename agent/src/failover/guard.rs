//! The split-brain guard of hosted VIPs.
//!
//! A node is a VIP's owner only while the kernel and the cluster store agree: the address
//! is on this node (IPv6: past duplicate address detection, which the address watcher
//! waits for) and the store records this node at the current epoch. Otherwise the node
//! accepts no SA for the VIP: it asks the runtime to stop answering IKE for it
//! (`AcceptSas`), deletes any SA that comes up anyway, and, when another node holds the
//! record while the address is here too, reports a split brain once it has lasted longer
//! than a hand-off takes. It never touches the address: the cluster manager owns it.

use std::time::Duration;

use tokio::time::Instant;

use super::state::HostedVip;
use super::{Action, FailoverCore, HolderAnswer, Notice, NoticeKind, Out, Timer};
use crate::model::{IkeId, Vip, VipRole};

/// Whether this node may accept SAs for a hosted VIP, and why not.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Ownership {
    /// The VIP is not on this node.
    #[default]
    Absent,
    /// On this node and recorded as this node's: SAs accepted.
    Owner,
    /// On this node while the store is unreachable: accepted on the kernel's word alone
    /// (`failover.trust_kernel_when_store_down`), and shown as such.
    Unconfirmed,
    /// Being drained: its SAs are deleted and no new ones are accepted.
    Draining,
    /// On this node but not recorded as this node's.
    NotOwner { reason: String },
}

impl Ownership {
    pub fn accepts_sas(&self) -> bool {
        matches!(self, Ownership::Owner | Ownership::Unconfirmed)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Ownership::Absent => "absent",
            Ownership::Owner => "owner",
            Ownership::Unconfirmed => "unconfirmed",
            Ownership::Draining => "draining",
            Ownership::NotOwner { .. } => "not-owner",
        }
    }

    pub fn reason(&self) -> String {
        match self {
            Ownership::Absent => "the VIP is not on this node".into(),
            Ownership::Owner => "on this node and recorded as this node's".into(),
            Ownership::Unconfirmed => {
                "on this node; the store is unreachable, so ownership is unconfirmed".into()
            }
            Ownership::Draining => "draining: SAs deleted, none accepted".into(),
            Ownership::NotOwner { reason } => reason.clone(),
        }
    }
}

impl FailoverCore {
    fn assess(&self, vip: Vip) -> Ownership {
        let h = &self.hosted[&vip];
        if !h.present {
            return Ownership::Absent;
        }
        if h.draining {
            return Ownership::Draining;
        }
        match &h.owner {
            Some(o) if o.node == self.settings.node => Ownership::Owner,
            // With the store unreachable the kernel's word is trusted for a VIP that was
            // unrecorded, or that arrived during the outage (a takeover: the cluster
            // manager moved it; the store cannot say yet whether the old owner is gone).
            // A VIP refused because another node held its record when the store went
            // away stays refused: an outage does not turn a split brain into an owner.
            o if self.settings.cluster_store
                && self.store_healthy != Some(true)
                && self.settings.trust_kernel_when_store_down
                && (o.is_none() || h.arrived_in_outage) =>
            {
                Ownership::Unconfirmed
            }
            Some(o) => Ownership::NotOwner {
                reason: format!(
                    "{vip} is on this node, but the store records {} as its owner at epoch {}",
                    o.node, o.epoch
                ),
            },
            None => Ownership::NotOwner {
                reason: format!("{vip} is on this node; its ownership is not recorded yet"),
            },
        }
    }

    /// Re-evaluates a hosted VIP's ownership after anything that may change it.
    pub(super) fn guard(&mut self, out: &mut Out, now: Instant, vip: Vip) {
        if !self.hosted.contains_key(&vip) {
            return;
        }
        let ownership = self.assess(vip);
        let grace = self.settings.split_brain_grace;
        let h = self.hosted.get_mut(&vip).expect("hosted VIP");
        let accept = ownership.accepts_sas();
        if accept != h.accepting {
            h.accepting = accept;
            out.push(Action::AcceptSas { vip, accept });
        }
        let refused = matches!(&h.owner, Some(o) if o.node != self.settings.node)
            && matches!(ownership, Ownership::NotOwner { .. });
        // The cluster manager may have given us the VIP because its owner of record died:
        // its record outlives it by up to a lease. Ask the link whether that node still
        // holds the address (once per arrival and record); only silence lets this node
        // take over (`holder_probed`). A VIP added by hand next to a live owner is
        // answered for by that owner, and stays refused.
        if refused
            && self.settings.cluster_store
            && self.store_healthy == Some(true)
            && let Some(window) = self.settings.takeover_probe
            && let Some(o) = &h.owner
            && h.probed != Some((h.generation, o.epoch))
        {
            h.probed = Some((h.generation, o.epoch));
            out.push(Action::ProbeHolder {
                vip,
                epoch: o.epoch,
                window,
            });
        }
        // Ours on record while another node marks the address as its own too: keep
        // serving (the other node refuses), but it is a split brain all the same.
        let shared = ownership == Ownership::Owner && !h.also_held_by.is_empty();
        if refused || shared {
            if h.conflict_since.is_none() {
                h.conflict_since = Some(now);
                // A hand-off passes through this state for a moment (the new owner's
                // address shows up before the old owner's record is gone); only a
                // conflict that outlasts the grace is a split brain.
                out.push(Action::StartTimer {
                    timer: Timer::SplitBrainGrace { vip },
                    after: grace,
                });
            }
            // SAs this node already had are deleted only if the conflict outlasts the
            // grace (`split_brain_timer`): a node that wakes from a pause hears of the new
            // owner's record a moment before its own address removal, and must not act on
            // a tenure that is over. New SAs are refused at once (`AcceptSas`, and
            // `hosted_sa_allowed`).
        } else {
            h.conflict_since = None;
            if h.split_brain {
                h.split_brain = false;
                out.push(Action::Notify(
                    Notice::new(NoticeKind::SplitBrainCleared, Some(vip))
                        .owner(h.owner.as_ref())
                        .detail(ownership.reason()),
                ));
            }
        }
        h.ownership = ownership;
        self.settle_awaiting(out, vip);
    }

    /// SAs kept while this node wrote its record: accepted once the VIP is this node's,
    /// refused once the record (or the VIP's absence, or a drain) says otherwise.
    fn settle_awaiting(&mut self, out: &mut Out, vip: Vip) {
        let store_healthy = self.store_healthy;
        let Some(h) = self.hosted.get_mut(&vip) else {
            return;
        };
        if h.awaiting_record.is_empty() {
            return;
        }
        if h.accepting {
            for id in std::mem::take(&mut h.awaiting_record) {
                if h.sas.insert(id) {
                    out.push(Action::Notify(
                        Notice::new(NoticeKind::SaUp, Some(vip)).detail(format!(
                            "IKE_SA #{id}, up before the record, which is now this node's"
                        )),
                    ));
                }
            }
        } else if !awaits_own_record(h, store_healthy) {
            let why = h.ownership.reason();
            self.refuse_awaiting(out, vip, &why);
        }
    }

    /// Refuses, one by one, the SAs that waited for a record that will not be this node's.
    pub(super) fn refuse_awaiting(&mut self, out: &mut Out, vip: Vip, why: &str) {
        let Some(h) = self.hosted.get_mut(&vip) else {
            return;
        };
        for ike_id in std::mem::take(&mut h.awaiting_record) {
            out.push(Action::RefuseSa { vip, ike_id });
            out.push(Action::Notify(
                Notice::new(NoticeKind::SaRefused, Some(vip))
                    .owner(h.owner.as_ref())
                    .detail(format!("IKE_SA #{ike_id}, up before the record: {why}")),
            ));
        }
    }

    pub(super) fn split_brain_timer(&mut self, out: &mut Out, now: Instant, vip: Vip) {
        let grace = self.settings.split_brain_grace;
        let Some(h) = self.hosted.get_mut(&vip) else {
            return;
        };
        let lasted = h
            .conflict_since
            .map(|s| now.saturating_duration_since(s))
            .unwrap_or(Duration::ZERO);
        if h.split_brain || h.conflict_since.is_none() || lasted < grace {
            return;
        }
        let refused = matches!(h.ownership, Ownership::NotOwner { .. });
        if refused && !h.sas.is_empty() {
            h.sas.clear();
            out.push(Action::DeleteSas {
                vip,
                role: VipRole::Hosted,
            });
            out.push(Action::Notify(
                Notice::new(NoticeKind::SaRefused, Some(vip))
                    .owner(h.owner.as_ref())
                    .detail(h.ownership.reason()),
            ));
        }
        h.split_brain = true;
        let detail = if h.ownership == Ownership::Owner {
            format!(
                "{vip} is recorded as this node's, but {} hold(s) its address too; \
                 serving it here while the others refuse, and leaving the address to the \
                 cluster manager",
                h.also_held_by
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!(
                "{}; refusing SAs for it and leaving the address to the cluster manager",
                h.ownership.reason()
            )
        };
        out.push(Action::Notify(
            Notice::new(NoticeKind::SplitBrain, Some(vip))
                .owner(h.owner.as_ref())
                .duration(lasted)
                .detail(detail),
        ));
    }

    /// The link answered a `ProbeHolder`: take the record over only if nobody holds the
    /// address any more and nothing changed meanwhile (still here, not draining, the same
    /// record). The store takes it over only if that record still stands unchanged.
    pub(super) fn holder_probed(
        &mut self,
        out: &mut Out,
        vip: Vip,
        epoch: u64,
        answer: HolderAnswer,
    ) {
        let window = self.settings.takeover_probe.unwrap_or_default();
        let Some(h) = self.hosted.get(&vip) else {
            return;
        };
        let Some(o) = h
            .owner
            .as_ref()
            .filter(|o| o.node != self.settings.node && o.epoch == epoch)
        else {
            return;
        };
        if !h.present || h.draining {
            return;
        }
        match answer {
            HolderAnswer::Silent => {
                out.push(Action::TakeOver {
                    vip,
                    from: o.clone(),
                });
                out.push(Action::Notify(
                    Notice::new(NoticeKind::Takeover, Some(vip))
                        .owner(Some(o))
                        .detail(format!(
                            "{vip} is here and nobody else answers for it on the link within {}: taking over {}'s record of epoch {epoch}",
                            humantime::format_duration(window),
                            o.node
                        )),
                ));
            }
            HolderAnswer::Answered(station) => out.push(Action::Notify(
                Notice::new(NoticeKind::TakeoverRefused, Some(vip))
                    .owner(Some(o))
                    .detail(format!(
                        "{station} still answers for {vip} on the link: {} keeps the record of epoch {epoch}, and this node refuses the VIP until it goes",
                        o.node
                    )),
            )),
            HolderAnswer::Unknown(why) => out.push(Action::Notify(
                Notice::new(NoticeKind::TakeoverRefused, Some(vip))
                    .owner(Some(o))
                    .detail(format!(
                        "the link cannot tell whether {} still holds {vip} ({why}); waiting for its record to go",
                        o.node
                    )),
            )),
        }
    }

    /// A hosted SA came up: keep it only if this node may accept SAs for the VIP.
    pub(super) fn hosted_sa_allowed(&mut self, out: &mut Out, vip: Vip, ike_id: IkeId) -> bool {
        let store_healthy = self.store_healthy;
        let Some(h) = self.hosted.get_mut(&vip) else {
            return false;
        };
        // An SA for a VIP that is not here cannot carry anything; leave it to the
        // keying daemon rather than act on a presence not yet reported.
        if h.accepting || h.ownership == Ownership::Absent {
            return true;
        }
        if awaits_own_record(h, store_healthy) {
            // After a crash the front-ends' retransmitted IKE_SA_INITs reach this node
            // as soon as the address is here, a store round trip before its record is:
            // refusing them costs each front-end a second IKE_SA at the busiest moment.
            // The verdict waits for the record this node is writing (`settle_awaiting`).
            h.awaiting_record.insert(ike_id);
            return false;
        }
        out.push(Action::RefuseSa { vip, ike_id });
        out.push(Action::Notify(
            Notice::new(NoticeKind::SaRefused, Some(vip))
                .owner(h.owner.as_ref())
                .detail(format!(
                    "IKE_SA #{ike_id}: not the owner of record: {}",
                    h.ownership.reason()
                )),
        ));
        false
    }
}

/// The VIP is here, nobody's record stands, and this node, with the store answering, is
/// writing its own: an SA that comes up now waits for that record.
pub(super) fn awaits_own_record(h: &HostedVip, store_healthy: Option<bool>) -> bool {
    h.present
        && !h.draining
        && h.owner.is_none()
        && store_healthy == Some(true)
        && matches!(h.ownership, Ownership::NotOwner { .. })
}
