//! How many front-ends renegotiate at once when a VIP moves: the size of the burst the new
//! owner is about to take, so that the reconnect pacer spreads first attempts only when
//! there is a crowd to spread (and adds nothing on a small cluster).
//!
//! Each back-end that holds a VIP says in its holder mark how many front-ends (IKE_SAs) it
//! serves for it. When a node fails or hands over, every VIP it owned moves, and every
//! front-end of each of them renegotiates. So the crowd a front-end is part of is the sum,
//! over the VIPs the old owner had, of the front-ends each one had. A mark vanishes with
//! its VIP's lease (or a takeover), so the last count seen is kept.

use std::collections::{BTreeMap, HashMap};

use crate::model::Vip;

#[derive(Debug, Clone, Default)]
pub struct Crowds {
    /// Front-ends each holder of a VIP says it serves.
    marks: HashMap<Vip, BTreeMap<String, u32>>,
    /// The last non-zero count seen for each VIP.
    last: HashMap<Vip, u32>,
    /// The owner of record now (None while there is none).
    owner: HashMap<Vip, Option<String>>,
    /// The last owner known, kept while the record is absent.
    known: HashMap<Vip, String>,
    /// The owner before the last change of owner.
    previous: HashMap<Vip, String>,
}

impl Crowds {
    pub fn holders_snapshot(&mut self, marks: &[(Vip, String, u32)]) {
        self.marks.clear();
        for (vip, node, followers) in marks {
            self.holder(*vip, node, true, *followers);
        }
    }

    pub fn holder(&mut self, vip: Vip, node: &str, holds: bool, followers: u32) {
        let m = self.marks.entry(vip).or_default();
        if holds {
            m.insert(node.to_string(), followers);
        } else {
            m.remove(node);
        }
        let now = m.values().copied().max().unwrap_or(0);
        if now > 0 {
            self.last.insert(vip, now);
        }
    }

    pub fn owner(&mut self, vip: Vip, owner: Option<&str>) {
        match owner {
            Some(node) => {
                if let Some(before) = self.known.get(&vip)
                    && before != node
                {
                    self.previous.insert(vip, before.clone());
                }
                self.known.insert(vip, node.to_string());
                self.owner.insert(vip, Some(node.to_string()));
            }
            None => {
                self.owner.insert(vip, None);
            }
        }
    }

    /// Front-ends expected to renegotiate at once with `vip`'s new owner: every front-end
    /// of every VIP the previous owner had (those still recorded as its, and those that
    /// already moved to the same new owner). 0 when no holder said how many it serves (a
    /// cluster starting up, back-ends of an older version): the crowd is unknown.
    pub fn crowd(&self, vip: Vip) -> u32 {
        let own = self.last.get(&vip).copied().unwrap_or(0);
        let Some(set) = self.moving_together(vip) else {
            return own;
        };
        let total: u32 = set
            .map(|v| self.last.get(v).copied().unwrap_or(0))
            .fold(0u32, u32::saturating_add);
        total.max(own)
    }

    /// How many of `mine` move together with `vip` (itself included): those the previous
    /// owner had. A node's initiations toward one owner share its pacer, so only a few of
    /// them reach the owner at once however many VIPs the node follows.
    pub fn together(&self, vip: Vip, mine: impl Fn(&Vip) -> bool) -> u32 {
        match self.moving_together(vip) {
            Some(set) => set.filter(|v| mine(v)).count().max(1) as u32,
            None => 1,
        }
    }

    /// The VIPs that move with `vip` from its previous owner to its new one, if both are
    /// known.
    fn moving_together(&self, vip: Vip) -> Option<impl Iterator<Item = &Vip>> {
        let (Some(from), Some(to)) = (self.previous.get(&vip), self.known.get(&vip)) else {
            return None;
        };
        Some(self.known.keys().filter(move |v| {
            let still_old = self.owner.get(*v).and_then(|o| o.as_deref()) == Some(from);
            let moved_along = self.previous.get(*v) == Some(from) && self.known.get(*v) == Some(to);
            still_old || moved_along
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(n: u8) -> Vip {
        Vip::from([192, 0, 2, n])
    }

    #[test]
    fn a_crowd_is_every_front_end_of_every_vip_the_old_owner_had() {
        let mut c = Crowds::default();
        // be1 owns .100 (20 front-ends) and .101 (20), be2 owns .102 (5).
        for (v, node, n) in [(100, "be1", 20), (101, "be1", 20), (102, "be2", 5)] {
            c.owner(vip(v), Some(node));
            c.holder(vip(v), node, true, n);
        }
        // be1 crashes; its marks go with its leases as .100 moves to be2.
        c.holder(vip(100), "be1", false, 0);
        c.owner(vip(100), Some("be2"));
        assert_eq!(c.crowd(vip(100)), 40, "both of be1's VIPs follow");
        // .101 moves too: still one crowd of 40, and be2's own .102 does not count.
        c.owner(vip(101), None);
        c.owner(vip(101), Some("be2"));
        assert_eq!(c.crowd(vip(101)), 40);
    }

    #[test]
    fn without_counts_the_crowd_is_unknown() {
        let mut c = Crowds::default();
        c.owner(vip(100), Some("be1"));
        c.owner(vip(100), Some("be2"));
        assert_eq!(c.crowd(vip(100)), 0);
        // A first owner (nothing moved): its own count.
        let mut c = Crowds::default();
        c.holder(vip(100), "be1", true, 3);
        c.owner(vip(100), Some("be1"));
        assert_eq!(c.crowd(vip(100)), 3);
    }

    #[test]
    fn a_refused_holder_counting_nothing_does_not_hide_the_owners_count() {
        let mut c = Crowds::default();
        c.owner(vip(100), Some("be1"));
        c.holder(vip(100), "be1", true, 12);
        c.holder(vip(100), "be2", true, 0);
        c.owner(vip(100), Some("be2"));
        assert_eq!(c.crowd(vip(100)), 12);
        c.holders_snapshot(&[(vip(100), "be2".into(), 0)]);
        assert_eq!(c.crowd(vip(100)), 12, "the last count is kept");
    }
}
