//! Which hosted VIPs are present on this node, per interface, with no I/O.
//!
//! A VIP counts as present while it sits, usable, on at least one interface its config
//! allows. Only the transitions absent -> present and present -> absent become inputs, so
//! repeated or overlapping kernel notifications never produce duplicates.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::HostedVipConfig;
use crate::failover::Input;
use crate::model::Vip;

/// One address as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressSeen {
    pub vip: Vip,
    pub ifindex: u32,
    /// The interface's name when known; needed only for VIPs bound to one interface.
    pub ifname: Option<String>,
    /// False while IPv6 duplicate address detection runs (tentative) or after it failed.
    pub usable: bool,
}

pub struct PresenceTable {
    wanted: BTreeMap<Vip, Option<String>>,
    /// Interfaces (by index) on which each VIP is present and usable.
    present: BTreeMap<Vip, BTreeSet<u32>>,
}

impl PresenceTable {
    pub fn new(vips: &[HostedVipConfig]) -> Self {
        PresenceTable {
            wanted: vips
                .iter()
                .map(|v| (v.address, v.interface.clone()))
                .collect(),
            present: BTreeMap::new(),
        }
    }

    /// Whether `vip` is configured, and so worth resolving an interface name for.
    pub fn wants(&self, vip: &Vip) -> bool {
        self.wanted.contains_key(vip)
    }

    /// Whether the VIP is bound to one interface (its name must then be resolved).
    pub fn needs_ifname(&self, vip: &Vip) -> bool {
        matches!(self.wanted.get(vip), Some(Some(_)))
    }

    fn counts(&self, seen: &AddressSeen) -> bool {
        match self.wanted.get(&seen.vip) {
            None => false,
            Some(None) => seen.usable,
            Some(Some(ifname)) => seen.usable && seen.ifname.as_deref() == Some(ifname),
        }
    }

    fn is_present(&self, vip: &Vip) -> bool {
        self.present.get(vip).is_some_and(|s| !s.is_empty())
    }

    /// RTM_NEWADDR: the address exists, possibly still tentative.
    pub fn added(&mut self, seen: &AddressSeen) -> Option<Input> {
        if !self.wants(&seen.vip) {
            return None;
        }
        let before = self.is_present(&seen.vip);
        let counts = self.counts(seen);
        let set = self.present.entry(seen.vip).or_default();
        if counts {
            set.insert(seen.ifindex);
        } else {
            set.remove(&seen.ifindex);
        }
        self.transition(seen.vip, before)
    }

    /// RTM_DELADDR: the address left the interface.
    pub fn removed(&mut self, vip: Vip, ifindex: u32) -> Option<Input> {
        if !self.wants(&vip) {
            return None;
        }
        let before = self.is_present(&vip);
        if let Some(set) = self.present.get_mut(&vip) {
            set.remove(&ifindex);
        }
        self.transition(vip, before)
    }

    /// Replaces the whole state with a fresh dump (start-up, or after the kernel dropped
    /// notifications) and returns the transitions this makes.
    pub fn replace(&mut self, dump: &[AddressSeen]) -> Vec<Input> {
        let mut next: BTreeMap<Vip, BTreeSet<u32>> = BTreeMap::new();
        for seen in dump.iter().filter(|s| self.counts(s)) {
            next.entry(seen.vip).or_default().insert(seen.ifindex);
        }
        let mut inputs = Vec::new();
        for vip in self.wanted.keys() {
            let before = self.is_present(vip);
            let after = next.get(vip).is_some_and(|s| !s.is_empty());
            match (before, after) {
                (false, true) => inputs.push(Input::VipAppeared(*vip)),
                (true, false) => inputs.push(Input::VipDisappeared(*vip)),
                _ => {}
            }
        }
        self.present = next;
        inputs
    }

    fn transition(&self, vip: Vip, before: bool) -> Option<Input> {
        match (before, self.is_present(&vip)) {
            (false, true) => Some(Input::VipAppeared(vip)),
            (true, false) => Some(Input::VipDisappeared(vip)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(addr: &str, iface: Option<&str>) -> HostedVipConfig {
        HostedVipConfig {
            address: addr.parse().unwrap(),
            interface: iface.map(str::to_string),
            protect: Vec::new(),
        }
    }

    fn seen(addr: &str, ifindex: u32, ifname: &str, usable: bool) -> AddressSeen {
        AddressSeen {
            vip: addr.parse().unwrap(),
            ifindex,
            ifname: Some(ifname.into()),
            usable,
        }
    }

    #[test]
    fn present_on_two_interfaces_disappears_only_when_both_go() {
        let mut t = PresenceTable::new(&[cfg("192.0.2.10", None)]);
        let vip: Vip = "192.0.2.10".parse().unwrap();
        assert_eq!(
            t.added(&seen("192.0.2.10", 2, "eth0", true)),
            Some(Input::VipAppeared(vip))
        );
        assert_eq!(t.added(&seen("192.0.2.10", 3, "eth1", true)), None);
        assert_eq!(t.added(&seen("192.0.2.10", 3, "eth1", true)), None);
        assert_eq!(t.removed(vip, 2), None);
        assert_eq!(t.removed(vip, 3), Some(Input::VipDisappeared(vip)));
        assert_eq!(t.removed(vip, 3), None);
    }

    #[test]
    fn tentative_is_absent_until_the_flag_clears() {
        let mut t = PresenceTable::new(&[cfg("2001:db8::10", None)]);
        let vip: Vip = "2001:db8::10".parse().unwrap();
        assert_eq!(t.added(&seen("2001:db8::10", 2, "eth0", false)), None);
        assert_eq!(
            t.added(&seen("2001:db8::10", 2, "eth0", true)),
            Some(Input::VipAppeared(vip))
        );
        // DAD again (link flap): the address is tentative once more, so it is gone.
        assert_eq!(
            t.added(&seen("2001:db8::10", 2, "eth0", false)),
            Some(Input::VipDisappeared(vip))
        );
    }

    #[test]
    fn interface_filter_and_unknown_addresses_are_ignored() {
        let mut t = PresenceTable::new(&[cfg("192.0.2.20", Some("eth1"))]);
        let vip: Vip = "192.0.2.20".parse().unwrap();
        assert_eq!(t.added(&seen("192.0.2.20", 2, "eth0", true)), None);
        assert_eq!(t.added(&seen("192.0.2.99", 3, "eth1", true)), None);
        assert_eq!(
            t.added(&seen("192.0.2.20", 3, "eth1", true)),
            Some(Input::VipAppeared(vip))
        );
        assert_eq!(t.removed(vip, 2), None);
    }

    #[test]
    fn replace_reports_only_differences() {
        let mut t = PresenceTable::new(&[cfg("192.0.2.10", None), cfg("192.0.2.11", None)]);
        let a: Vip = "192.0.2.10".parse().unwrap();
        let b: Vip = "192.0.2.11".parse().unwrap();
        assert_eq!(
            t.replace(&[seen("192.0.2.10", 2, "eth0", true)]),
            vec![Input::VipAppeared(a)]
        );
        assert_eq!(
            t.replace(&[seen("192.0.2.11", 2, "eth0", true)]),
            vec![Input::VipDisappeared(a), Input::VipAppeared(b)]
        );
    }
}
