//! Which IKE_SAs of configured VIPs are up, built from charon's events and listings.
//!
//! An SA counts as up (one `SaRef`) when its IKE_SA is ESTABLISHED (or REKEYING), at
//! least one of its CHILD_SAs is INSTALLED (or being rekeyed) and it maps to a configured
//! VIP. Pure state, no I/O: the VICI
//! task feeds it events and periodic listings and forwards the inputs it returns.
//!
//! Events arrive on one subscription per event name, so two kinds can reach us out of
//! order, and a listing can be newer than the events still queued. charon never reuses
//! IKE_SA or CHILD_SA unique ids, so anything seen gone is remembered as dead and a late
//! event cannot bring it back.

use std::collections::{BTreeMap, BTreeSet};

use crate::failover::{Input, SaRef};
use crate::model::{IkeId, IkeSaInfo, Vip, VipRole};

/// IKE_SA states in which the SA protects traffic: a rekeying IKE_SA still does.
fn ike_usable(state: &str) -> bool {
    matches!(state, "ESTABLISHED" | "REKEYING")
}

/// CHILD_SA states in which the SA carries traffic. During a rekey the old one is
/// REKEYING (then REKEYED) while the new one is still INSTALLING; the old one carries
/// the traffic meanwhile, so neither moment is "no SA".
fn child_usable(state: &str) -> bool {
    matches!(state, "INSTALLED" | "REKEYING" | "REKEYED")
}

/// IKE_SA states a listing can catch half-way: during an IKE rekey the CHILD_SAs move to
/// the new IKE_SA before it is visible in a listing, and a deleting IKE_SA is about to be
/// announced by its event. A listing leaves such an IKE_SA as it was; the `ike-rekey` or
/// `ike-updown` event, or its absence from a later listing, settles it.
fn ike_in_transition(state: &str) -> bool {
    matches!(state, "REKEYING" | "REKEYED" | "DELETING")
}

/// How many dead ids are remembered; the oldest (smallest: ids grow) are forgotten first.
const DEAD_IDS_KEPT: usize = 4096;

/// Something charon reported about one IKE_SA.
#[derive(Debug, Clone, PartialEq)]
pub enum SaEvent {
    /// `ike-updown` with `up = yes` (no CHILD_SA details in that event).
    IkeUp(IkeSaInfo),
    IkeDown(IkeSaInfo),
    /// `child-updown`: the IKE_SA with the one CHILD_SA concerned.
    ChildUp(IkeSaInfo),
    ChildDown(IkeSaInfo),
    /// `ike-rekey`: CHILD_SAs move from `old` to `new`.
    IkeRekey {
        old: Box<IkeSaInfo>,
        new: Box<IkeSaInfo>,
    },
    /// `child-rekey`: same IKE_SA, one CHILD_SA replaced by another.
    ChildRekey {
        ike: IkeSaInfo,
        old_child: u64,
        new_child: u64,
        new_installed: bool,
    },
}

#[derive(Debug, Clone, Default)]
struct IkeState {
    established: bool,
    /// Unique ids of INSTALLED CHILD_SAs.
    children: BTreeSet<u64>,
    mapping: Option<(Vip, VipRole)>,
}

impl IkeState {
    fn is_up(&self) -> bool {
        self.established && !self.children.is_empty() && self.mapping.is_some()
    }
}

#[derive(Debug, Default)]
pub struct SaSet {
    hosted: Vec<Vip>,
    peers: Vec<Vip>,
    sas: BTreeMap<IkeId, IkeState>,
    dead_ike: BTreeSet<IkeId>,
    dead_child: BTreeSet<u64>,
}

impl SaSet {
    pub fn new(hosted: Vec<Vip>, peers: Vec<Vip>) -> SaSet {
        SaSet {
            hosted,
            peers,
            ..Default::default()
        }
    }

    pub fn mapping(&self, sa: &IkeSaInfo) -> Option<(Vip, VipRole)> {
        sa.vip_role(&self.hosted, &self.peers)
    }

    /// Replaces everything with a fresh listing (after a (re)connection) and returns the
    /// SAs that are up, for `KeyingUp`.
    pub fn reset(&mut self, listing: &[IkeSaInfo]) -> Vec<SaRef> {
        self.sas.clear();
        for sa in listing {
            if self.dead_ike.contains(&sa.unique_id) {
                continue;
            }
            let state = self.state_from_listing(sa);
            self.sas.insert(sa.unique_id, state);
        }
        self.up_refs()
    }

    /// Every SA that is up now.
    pub fn up_refs(&self) -> Vec<SaRef> {
        self.sas
            .iter()
            .filter(|(_, s)| s.is_up())
            .filter_map(|(id, s)| sa_ref(*id, s))
            .collect()
    }

    /// Applies a periodic listing: it is the truth about everything it shows, and an
    /// IKE_SA it does not show is gone.
    pub fn reconcile(&mut self, listing: &[IkeSaInfo]) -> Vec<Input> {
        let mut out = Vec::new();
        let listed: BTreeSet<IkeId> = listing.iter().map(|s| s.unique_id).collect();
        let gone: Vec<IkeId> = self
            .sas
            .keys()
            .filter(|id| !listed.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.remove(id, "IKE_SA no longer listed by charon", &mut out);
        }
        for sa in listing {
            if self.dead_ike.contains(&sa.unique_id) || ike_in_transition(&sa.state) {
                continue;
            }
            let new = self.state_from_listing(sa);
            let old = self.sas.get(&sa.unique_id).cloned().unwrap_or_default();
            if old.is_up() && !new.is_up() && !sa.children.is_empty() {
                // A listing can catch a CHILD_SA rekey half-way in several shapes (old one
                // REKEYED or DELETING, new one INSTALLING or not yet INSTALLED). While any
                // CHILD_SA is still listed, only an event (`child-updown`, `child-rekey`)
                // says the VIP lost its SA; a listing says so once none is left.
                continue;
            }
            for c in old.children.difference(&new.children) {
                self.dead_child.insert(*c);
            }
            self.set(sa.unique_id, new, "no INSTALLED CHILD_SA left", &mut out);
        }
        self.prune();
        out
    }

    /// Applies one event and returns the inputs it causes (at most an up and a down).
    pub fn apply(&mut self, event: SaEvent) -> Vec<Input> {
        let mut out = Vec::new();
        match event {
            SaEvent::IkeUp(sa) => {
                if !self.dead_ike.contains(&sa.unique_id) {
                    let mut s = self.sas.get(&sa.unique_id).cloned().unwrap_or_default();
                    s.established = ike_usable(&sa.state);
                    s.mapping = self.mapping(&sa);
                    self.set(sa.unique_id, s, "", &mut out);
                }
            }
            SaEvent::IkeDown(sa) => {
                self.remove(
                    sa.unique_id,
                    &format!("IKE_SA deleted (was {})", sa.state),
                    &mut out,
                );
            }
            SaEvent::ChildUp(sa) => {
                if !self.dead_ike.contains(&sa.unique_id) {
                    let mut s = self.sas.get(&sa.unique_id).cloned().unwrap_or_default();
                    s.established |= ike_usable(&sa.state);
                    s.mapping = self.mapping(&sa);
                    for c in &sa.children {
                        if c.state == "INSTALLED" && !self.dead_child.contains(&c.unique_id) {
                            s.children.insert(c.unique_id);
                        }
                    }
                    self.set(sa.unique_id, s, "", &mut out);
                }
            }
            SaEvent::ChildDown(sa) => {
                if let Some(mut s) = self.sas.get(&sa.unique_id).cloned() {
                    for c in &sa.children {
                        s.children.remove(&c.unique_id);
                        self.dead_child.insert(c.unique_id);
                    }
                    self.set(sa.unique_id, s, "last CHILD_SA deleted", &mut out);
                } else {
                    for c in &sa.children {
                        self.dead_child.insert(c.unique_id);
                    }
                }
            }
            SaEvent::IkeRekey { old, new } => {
                // The new IKE_SA takes over the CHILD_SAs. Report it up before the old
                // one down, so the VIP is never seen without an SA.
                let moved = self
                    .sas
                    .get(&old.unique_id)
                    .map(|s| s.children.clone())
                    .unwrap_or_default();
                if !self.dead_ike.contains(&new.unique_id) {
                    let mut s = self.sas.get(&new.unique_id).cloned().unwrap_or_default();
                    s.established = ike_usable(&new.state);
                    s.mapping = self.mapping(&new);
                    s.children.extend(moved);
                    self.set(new.unique_id, s, "", &mut out);
                }
                let reason = format!("IKE_SA rekeyed into #{}", new.unique_id);
                self.remove(old.unique_id, &reason, &mut out);
            }
            SaEvent::ChildRekey {
                ike,
                old_child,
                new_child,
                new_installed,
            } => {
                if let Some(mut s) = self.sas.get(&ike.unique_id).cloned() {
                    if !new_installed {
                        // Keep the old child counted until the new one is INSTALLED (its
                        // child-updown or a listing says so): the VIP is still covered.
                        return out;
                    }
                    if !self.dead_child.contains(&new_child) {
                        s.children.insert(new_child);
                    }
                    s.children.remove(&old_child);
                    self.dead_child.insert(old_child);
                    self.set(ike.unique_id, s, "CHILD_SA rekeyed away", &mut out);
                }
            }
        }
        self.prune();
        out
    }

    fn state_from_listing(&self, sa: &IkeSaInfo) -> IkeState {
        IkeState {
            established: ike_usable(&sa.state),
            children: sa
                .children
                .iter()
                .filter(|c| child_usable(&c.state) && !self.dead_child.contains(&c.unique_id))
                .map(|c| c.unique_id)
                .collect(),
            mapping: self.mapping(sa),
        }
    }

    /// Stores the new state and reports the up/down transition, if any.
    fn set(&mut self, id: IkeId, new: IkeState, down_reason: &str, out: &mut Vec<Input>) {
        let was = self
            .sas
            .get(&id)
            .and_then(|s| s.is_up().then(|| sa_ref(id, s)).flatten());
        let now = new.is_up().then(|| sa_ref(id, &new)).flatten();
        self.sas.insert(id, new);
        match (was, now) {
            (None, Some(r)) => out.push(Input::SaUp(r)),
            (Some(r), None) => out.push(Input::SaDown {
                sa: r,
                reason: down_reason.to_string(),
            }),
            _ => {}
        }
    }

    fn remove(&mut self, id: IkeId, reason: &str, out: &mut Vec<Input>) {
        self.dead_ike.insert(id);
        if let Some(s) = self.sas.remove(&id) {
            self.dead_child.extend(s.children.iter().copied());
            if s.is_up()
                && let Some(r) = sa_ref(id, &s)
            {
                out.push(Input::SaDown {
                    sa: r,
                    reason: reason.to_string(),
                });
            }
        }
    }

    fn prune(&mut self) {
        while self.dead_ike.len() > DEAD_IDS_KEPT {
            self.dead_ike.pop_first();
        }
        while self.dead_child.len() > DEAD_IDS_KEPT {
            self.dead_child.pop_first();
        }
    }
}

fn sa_ref(id: IkeId, s: &IkeState) -> Option<SaRef> {
    s.mapping.map(|(vip, role)| SaRef {
        vip,
        role,
        ike_id: id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ChildSaInfo;

    const VIP: &str = "192.0.2.100";

    fn vip() -> Vip {
        VIP.parse().unwrap()
    }

    fn ike(id: u64, state: &str, children: &[(u64, &str)]) -> IkeSaInfo {
        IkeSaInfo {
            name: "vip".into(),
            unique_id: id,
            state: state.into(),
            local_host: "192.0.2.1".into(),
            remote_host: VIP.into(),
            children: children
                .iter()
                .map(|(cid, st)| ChildSaInfo {
                    unique_id: *cid,
                    state: st.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn peer_set() -> SaSet {
        SaSet::new(vec![], vec![vip()])
    }

    fn up(id: u64) -> Input {
        Input::SaUp(SaRef {
            vip: vip(),
            role: VipRole::Peer,
            ike_id: id,
        })
    }

    fn is_down(i: &Input, id: u64) -> bool {
        matches!(i, Input::SaDown { sa, .. } if sa.ike_id == id)
    }

    #[test]
    fn up_needs_established_ike_and_installed_child_in_either_order() {
        let mut s = peer_set();
        assert!(
            s.apply(SaEvent::ChildUp(ike(1, "CONNECTING", &[(1, "INSTALLED")])))
                .is_empty()
        );
        assert_eq!(
            s.apply(SaEvent::IkeUp(ike(1, "ESTABLISHED", &[]))),
            vec![up(1)]
        );
        let mut s = peer_set();
        assert!(
            s.apply(SaEvent::IkeUp(ike(2, "ESTABLISHED", &[])))
                .is_empty()
        );
        assert_eq!(
            s.apply(SaEvent::ChildUp(ike(2, "ESTABLISHED", &[(5, "INSTALLED")]))),
            vec![up(2)]
        );
        // A second child changes nothing.
        assert!(
            s.apply(SaEvent::ChildUp(ike(2, "ESTABLISHED", &[(6, "INSTALLED")])))
                .is_empty()
        );
    }

    #[test]
    fn unmapped_sa_is_never_reported() {
        let mut s = SaSet::new(vec![], vec!["192.0.2.200".parse().unwrap()]);
        assert!(
            s.reset(&[ike(1, "ESTABLISHED", &[(1, "INSTALLED")])])
                .is_empty()
        );
        assert!(
            s.apply(SaEvent::IkeDown(ike(1, "DELETING", &[])))
                .is_empty()
        );
    }

    #[test]
    fn hosted_role_maps_by_local_host() {
        let mut s = SaSet::new(vec![vip()], vec![]);
        let mut sa = ike(3, "ESTABLISHED", &[(1, "INSTALLED")]);
        sa.local_host = VIP.into();
        sa.remote_host = "192.0.2.1".into();
        let refs = s.reset(&[sa]);
        assert_eq!(refs[0].role, VipRole::Hosted);
        assert_eq!(refs[0].ike_id, 3);
    }

    #[test]
    fn ipv6_sas_map_to_their_vips_whatever_charons_host_text() {
        let v6: Vip = "2001:db8:1::100".parse().unwrap();
        let mut peer = SaSet::new(vec![], vec![v6]);
        let mut fe = ike(4, "ESTABLISHED", &[(1, "INSTALLED")]);
        fe.local_host = "2001:db8:1::11".into();
        fe.remote_host = "[2001:db8:1::100]".into();
        let refs = peer.reset(&[fe]);
        assert_eq!(refs.len(), 1);
        assert_eq!((refs[0].vip, refs[0].role), (v6, VipRole::Peer));

        let mut hosted = SaSet::new(vec![v6], vec![]);
        let mut be = ike(5, "ESTABLISHED", &[(1, "INSTALLED")]);
        be.local_host = "2001:db8:1::100[4500]".into();
        be.remote_host = "2001:db8:1::11".into();
        let refs = hosted.reset(&[be]);
        assert_eq!((refs[0].vip, refs[0].role), (v6, VipRole::Hosted));

        // Another host of the same /64 is not the VIP.
        let mut other = ike(6, "ESTABLISHED", &[(1, "INSTALLED")]);
        other.remote_host = "2001:db8:1::101".into();
        assert!(SaSet::new(vec![], vec![v6]).reset(&[other]).is_empty());
    }

    #[test]
    fn ike_down_reports_down_once_and_late_up_events_are_ignored() {
        let mut s = peer_set();
        s.reset(&[ike(1, "ESTABLISHED", &[(1, "INSTALLED")])]);
        let out = s.apply(SaEvent::IkeDown(ike(1, "DELETING", &[])));
        assert!(out.len() == 1 && is_down(&out[0], 1), "{out:?}");
        // A child-updown queued on another subscription arrives after the IKE_SA's end.
        assert!(
            s.apply(SaEvent::ChildUp(ike(1, "ESTABLISHED", &[(1, "INSTALLED")])))
                .is_empty()
        );
        assert!(
            s.apply(SaEvent::IkeDown(ike(1, "DELETING", &[])))
                .is_empty()
        );
    }

    #[test]
    fn last_child_down_is_a_down() {
        let mut s = peer_set();
        s.reset(&[ike(1, "ESTABLISHED", &[(1, "INSTALLED"), (2, "INSTALLED")])]);
        assert!(
            s.apply(SaEvent::ChildDown(ike(
                1,
                "ESTABLISHED",
                &[(1, "DELETING")]
            )))
            .is_empty()
        );
        let out = s.apply(SaEvent::ChildDown(ike(
            1,
            "ESTABLISHED",
            &[(2, "DELETING")],
        )));
        assert!(out.len() == 1 && is_down(&out[0], 1), "{out:?}");
    }

    #[test]
    fn a_listing_caught_mid_child_rekey_is_not_a_down() {
        let mut s2 = SaSet::new(vec![], vec![vip()]);
        s2.reset(&[ike(1, "ESTABLISHED", &[(1, "INSTALLED")])]);
        assert!(
            s2.reconcile(&[ike(1, "ESTABLISHED", &[(1, "REKEYED"), (2, "INSTALLING")])])
                .is_empty()
        );
        assert!(
            s2.reconcile(&[ike(1, "ESTABLISHED", &[(2, "INSTALLING")])])
                .is_empty()
        );
        assert!(
            s2.reconcile(&[ike(1, "ESTABLISHED", &[(2, "INSTALLED")])])
                .is_empty()
        );
        // A rekey event for a child not installed yet keeps the old one counted.
        let mut s3 = SaSet::new(vec![], vec![vip()]);
        s3.reset(&[ike(1, "ESTABLISHED", &[(1, "INSTALLED")])]);
        let ev = SaEvent::ChildRekey {
            ike: ike(1, "ESTABLISHED", &[]),
            old_child: 1,
            new_child: 2,
            new_installed: false,
        };
        assert!(s3.apply(ev).is_empty());
        assert_eq!(s3.up_refs().len(), 1);
    }

    #[test]
    fn ike_rekey_reports_new_up_before_old_down() {
        let mut s = peer_set();
        s.reset(&[ike(1, "ESTABLISHED", &[(1, "INSTALLED")])]);
        let out = s.apply(SaEvent::IkeRekey {
            old: Box::new(ike(1, "REKEYED", &[])),
            new: Box::new(ike(2, "ESTABLISHED", &[])),
        });
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0], up(2));
        assert!(is_down(&out[1], 1));
        assert_eq!(s.up_refs().len(), 1);
    }

    #[test]
    fn child_rekey_keeps_the_sa_up() {
        let mut s = peer_set();
        s.reset(&[ike(1, "ESTABLISHED", &[(1, "INSTALLED")])]);
        let out = s.apply(SaEvent::ChildRekey {
            ike: ike(1, "ESTABLISHED", &[]),
            old_child: 1,
            new_child: 2,
            new_installed: true,
        });
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(s.up_refs().len(), 1);
    }

    #[test]
    fn reconcile_reports_missed_ups_and_downs_but_never_revives_the_dead() {
        let mut s = peer_set();
        s.reset(&[]);
        assert_eq!(
            s.reconcile(&[ike(1, "ESTABLISHED", &[(1, "INSTALLED")])]),
            vec![up(1)]
        );
        assert!(
            s.reconcile(&[ike(1, "ESTABLISHED", &[(1, "INSTALLED")])])
                .is_empty()
        );
        let out = s.reconcile(&[]);
        assert!(out.len() == 1 && is_down(&out[0], 1), "{out:?}");
        // A listing can race with a delete; a dead id stays dead.
        assert!(
            s.reconcile(&[ike(1, "ESTABLISHED", &[(1, "INSTALLED")])])
                .is_empty()
        );
        // An IKE_SA that is DELETING is not up.
        assert!(
            s.reconcile(&[ike(2, "DELETING", &[(3, "INSTALLED")])])
                .is_empty()
        );
    }

    #[test]
    fn a_listing_in_the_middle_of_a_child_rekey_is_still_up() {
        let mut s = peer_set();
        s.reset(&[ike(1, "ESTABLISHED", &[(1, "INSTALLED")])]);
        let mid = [ike(1, "ESTABLISHED", &[(1, "REKEYING"), (2, "INSTALLING")])];
        assert!(s.reconcile(&mid).is_empty());
        let after = [ike(1, "ESTABLISHED", &[(1, "REKEYED"), (2, "INSTALLED")])];
        assert!(s.reconcile(&after).is_empty());
        assert_eq!(s.up_refs().len(), 1);
    }

    #[test]
    fn a_listing_in_the_middle_of_an_ike_rekey_reports_nothing_early() {
        let mut s = peer_set();
        s.reset(&[ike(1, "ESTABLISHED", &[(1, "INSTALLED")])]);
        // The CHILD_SAs have left the old IKE_SA, the new one is not listed yet.
        assert!(s.reconcile(&[ike(1, "REKEYED", &[])]).is_empty());
        assert!(s.reconcile(&[ike(1, "DELETING", &[])]).is_empty());
        // The event then reports the new one up first.
        let out = s.apply(SaEvent::IkeRekey {
            old: Box::new(ike(1, "REKEYED", &[])),
            new: Box::new(ike(2, "ESTABLISHED", &[])),
        });
        assert_eq!(out[0], up(2));
        assert!(is_down(&out[1], 1));
    }

    #[test]
    fn dead_ids_are_bounded() {
        let mut s = peer_set();
        for id in 0..(DEAD_IDS_KEPT as u64 + 10) {
            s.apply(SaEvent::IkeDown(ike(id, "DELETING", &[])));
        }
        assert_eq!(s.dead_ike.len(), DEAD_IDS_KEPT);
        assert!(!s.dead_ike.contains(&0));
    }
}
