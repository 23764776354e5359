//! Fail-secure block policies: how the agent builds them and recognises its own.
//!
//! # Recognition: a reserved policy index range
//!
//! The agent must find its own block policies again after a restart, and must never take
//! a policy it did not install for one of its own. An XFRM mark or an `if_id` cannot serve
//! as a tag: both take part in the lookup (a policy with mark v/m only matches packets with
//! `skb->mark & m == v`; an `if_id` policy only matches traffic of that xfrm interface), so
//! tagging would change what the policy blocks. The policy *index* does not: it only names
//! the policy. `XFRM_MSG_NEWPOLICY` accepts a requested index as long as
//! `index & 7 == dir`, so every block policy is added with an index from
//! [`INDEX_BASE`]..[`INDEX_BASE`] + 8 × [`INDEX_SLOTS`]. The kernel generates indexes
//! from 8 upwards in steps of 8 per network namespace, so it would take some 250 million
//! policy creations before a generated index reached this range.
//!
//! The kernel silently picks another index when the requested one is taken, so the
//! engage path re-reads the policies after adding and replaces any policy that did not
//! get its index (see [`super::XfrmKernel::engage_fail_secure`]).
//!
//! A policy is the agent's when all of these hold: direction out, action block, no
//! templates, index in the range, destination a single host (the VIP), any source. The
//! priority is deliberately not part of the test, so that a changed `block_priority` in
//! the configuration still lets the agent release the policies of an earlier run.
//!
//! Note that the kernel refuses (EEXIST) a second policy with the same selector, mark and
//! `if_id` whatever its priority: a foreign policy with exactly the selector of one of the
//! agent's flows makes that flow's engage report it as not blocked by the agent.

use std::collections::BTreeSet;
use std::net::IpAddr;

use netlink_packet_xfrm::{XFRM_POLICY_BLOCK, XFRM_POLICY_OUT, XfrmAttrs, policy::ModifyMessage};

use super::netlink::{full_prefix, ip_of};
use crate::model::{FlowDirection, FlowProtocol, ProtectedFlow, Vip};

/// First index of the agent's range: "vi" in ASCII, aligned to 8.
pub const INDEX_BASE: u32 = 0x7669_0000;
/// Number of policies the range holds (one per flow and VIP).
pub const INDEX_SLOTS: u32 = 8192;

/// The index of slot `slot` for an outbound policy.
pub fn slot_index(slot: u32) -> u32 {
    INDEX_BASE + slot * 8 + u32::from(XFRM_POLICY_OUT)
}

pub fn is_agent_index(index: u32) -> bool {
    (INDEX_BASE..INDEX_BASE + 8 * INDEX_SLOTS).contains(&index)
        && index & 7 == u32::from(XFRM_POLICY_OUT)
}

/// What one block policy blocks: the key by which a configured flow is found in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockSelector {
    pub vip: Vip,
    /// `ToVip`: destination VIP, `dport` a destination port, any source. `FromVip`: source
    /// VIP, `dport` holds the source port, any destination.
    pub direction: FlowDirection,
    /// IP protocol number; 0 = any.
    pub proto: u8,
    /// The flow's port (destination or source, per `direction`); `None` = any.
    pub dport: Option<u16>,
    /// Interface the selector is bound to; 0 = any.
    pub ifindex: i32,
}

impl BlockSelector {
    pub fn for_flow(flow: &ProtectedFlow, ifindex: i32) -> BlockSelector {
        BlockSelector {
            vip: flow.vip,
            direction: flow.direction,
            proto: flow.protocol.ip_number().unwrap_or(0),
            // A port only means something with a protocol that has ports.
            dport: match flow.protocol {
                FlowProtocol::Any => None,
                _ => flow.port,
            },
            ifindex,
        }
    }
}

/// A block policy found in the kernel that carries the agent's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentPolicy {
    pub index: u32,
    pub priority: u32,
    pub selector: BlockSelector,
}

/// An outbound host policy that is not the agent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForeignPolicy {
    pub index: u32,
    pub selector: BlockSelector,
    pub action: u8,
    pub priority: u32,
    /// Carries a mark or an `if_id` (the agent's policies never do).
    pub tagged: bool,
}

/// Every policy seen in one dump: the agent's, and the indexes in use (to pick free slots).
#[derive(Debug, Default)]
pub struct PolicyTable {
    pub agent: Vec<AgentPolicy>,
    pub used_indexes: BTreeSet<u32>,
    pub foreign: Vec<ForeignPolicy>,
}

impl PolicyTable {
    pub fn from_dump(dump: &[ModifyMessage]) -> PolicyTable {
        let mut table = PolicyTable::default();
        for msg in dump {
            let info = &msg.user_policy_info;
            table.used_indexes.insert(info.index);
            let Some(sel) = host_selector(msg) else {
                continue;
            };
            if is_agent_policy(msg) {
                table.agent.push(AgentPolicy {
                    index: info.index,
                    priority: info.priority,
                    selector: sel,
                });
            } else if info.direction == XFRM_POLICY_OUT {
                table.foreign.push(ForeignPolicy {
                    index: info.index,
                    selector: sel,
                    action: info.action,
                    priority: info.priority,
                    tagged: is_tagged(msg),
                });
            }
        }
        table
    }

    pub fn agent_for(&self, vip: Vip) -> impl Iterator<Item = &AgentPolicy> {
        self.agent.iter().filter(move |p| p.selector.vip == vip)
    }

    /// Free indexes of the agent's range, lowest first.
    pub fn free_indexes(&self) -> impl Iterator<Item = u32> + '_ {
        (0..INDEX_SLOTS)
            .map(slot_index)
            .filter(|i| !self.used_indexes.contains(i))
    }
}

/// The selector of an outbound policy toward one host from any source, or from one host
/// to any destination; `None` for any other shape.
fn host_selector(msg: &ModifyMessage) -> Option<BlockSelector> {
    let info = &msg.user_policy_info;
    let sel = &info.selector;
    let to = ip_of(&sel.daddr, sel.family)
        .filter(|d| sel.prefixlen_d == full_prefix(d) && sel.prefixlen_s == 0);
    let from = ip_of(&sel.saddr, sel.family)
        .filter(|s| sel.prefixlen_s == full_prefix(s) && sel.prefixlen_d == 0);
    let (vip, direction, port, mask) = match (to, from) {
        (Some(vip), None) => (vip, FlowDirection::ToVip, sel.dport, sel.dport_mask),
        (None, Some(vip)) => (vip, FlowDirection::FromVip, sel.sport, sel.sport_mask),
        _ => return None,
    };
    Some(BlockSelector {
        vip,
        direction,
        proto: sel.proto,
        dport: (mask == u16::MAX).then_some(port),
        ifindex: sel.ifindex,
    })
}

fn is_agent_policy(msg: &ModifyMessage) -> bool {
    let info = &msg.user_policy_info;
    info.direction == XFRM_POLICY_OUT
        && info.action == XFRM_POLICY_BLOCK
        && is_agent_index(info.index)
        && !is_tagged(msg)
        && !msg
            .nlas
            .iter()
            .any(|a| matches!(a, XfrmAttrs::Template(t) if !t.is_empty()))
}

/// A mark or an `if_id` narrows what a policy matches; the agent never sets either.
fn is_tagged(msg: &ModifyMessage) -> bool {
    msg.nlas.iter().any(|a| match a {
        XfrmAttrs::Mark(m) => m.mask != 0 || m.value != 0,
        XfrmAttrs::IfId(id) => *id != 0,
        _ => false,
    })
}

/// The distinct VIPs that have at least one agent block policy.
pub fn blocked_vips(table: &PolicyTable) -> Vec<IpAddr> {
    let set: BTreeSet<IpAddr> = table.agent.iter().map(|p| p.selector.vip).collect();
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_range_holds_only_outbound_indexes() {
        assert!(is_agent_index(slot_index(0)));
        assert!(is_agent_index(slot_index(INDEX_SLOTS - 1)));
        assert!(!is_agent_index(slot_index(INDEX_SLOTS)));
        assert!(!is_agent_index(INDEX_BASE)); // direction in
        assert!(!is_agent_index(9)); // a kernel-generated outbound index
        assert_eq!(slot_index(0) & 7, u32::from(XFRM_POLICY_OUT));
    }

    fn policy(index: u32, action: u8, dport: u16) -> ModifyMessage {
        let mut m = ModifyMessage::default();
        let info = &mut m.user_policy_info;
        info.selector.source_prefix(&"0.0.0.0".parse().unwrap(), 0);
        info.selector
            .destination_prefix(&"192.0.2.100".parse().unwrap(), 32);
        info.selector.proto = 6;
        info.selector.dport = dport;
        info.selector.dport_mask = u16::MAX;
        info.direction = XFRM_POLICY_OUT;
        info.action = action;
        info.index = index;
        m
    }

    #[test]
    fn only_untagged_blocks_in_the_range_are_the_agents() {
        let mut marked = policy(slot_index(2), XFRM_POLICY_BLOCK, 110);
        marked.nlas.push(XfrmAttrs::Mark(netlink_packet_xfrm::Mark {
            value: 1,
            mask: 0xffff_ffff,
        }));
        let dump = vec![
            policy(slot_index(0), XFRM_POLICY_BLOCK, 143),
            policy(9, XFRM_POLICY_BLOCK, 25),
            policy(slot_index(1), netlink_packet_xfrm::XFRM_POLICY_ALLOW, 22),
            marked,
        ];
        let table = PolicyTable::from_dump(&dump);
        assert_eq!(table.agent.len(), 1);
        assert_eq!(table.agent[0].selector.dport, Some(143));
        assert_eq!(table.foreign.len(), 3);
        assert_eq!(
            blocked_vips(&table),
            vec!["192.0.2.100".parse::<IpAddr>().unwrap()]
        );
        // Slot 0 and 1 are taken (by whoever), slot 2 too.
        assert_eq!(table.free_indexes().next(), Some(slot_index(3)));
    }

    #[test]
    fn any_protocol_flow_has_no_port() {
        let flow = ProtectedFlow {
            vip: "192.0.2.100".parse().unwrap(),
            protocol: FlowProtocol::Any,
            port: Some(143),
            direction: FlowDirection::ToVip,
        };
        let sel = BlockSelector::for_flow(&flow, 3);
        assert_eq!((sel.proto, sel.dport, sel.ifindex), (0, None, 3));
    }
}
