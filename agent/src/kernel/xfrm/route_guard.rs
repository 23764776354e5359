//! The clear-text guard of a hosted IPv6 VIP under kernel-libipsec: policy routing rules,
//! because an XFRM policy cannot do it.
//!
//! The guard must refuse the server's answers (`from VIP sport 143`) when they would leave
//! in clear text and let them pass when they go into the tunnel. With IPv4 an XFRM block
//! policy bound to the physical interface tells the two apart. With IPv6 it cannot: the
//! IPv6 output route lookup does not write the chosen device into the flow, so an
//! interface-bound IPv6 selector never matches an unbound socket (agent/tests/kernel_xfrm.rs
//! shows it), and an unbound one blocks the tunnel too.
//!
//! What does tell them apart is routing. charon's kernel-libipsec sends tunnel traffic by
//! routes in its table (220, looked up by a rule at priority 220 for everything without
//! its IKE fwmark); without a CHILD_SA there is no route there and the lookup falls
//! through to the main table and out in clear. A rule just after charon's,
//! `from VIP/128 ipproto tcp sport 143 prohibit`, catches exactly that fall-through: the
//! packet is refused (EACCES) instead of leaving. The rules carry a protocol tag of their
//! own so the agent finds its rules again (and only its rules) after a restart.
//!
//! Only for the kernel-libipsec set-up (`kernel.interface` set). With kernel ESP the
//! tunnel's packets are routed by the main table and transformed by XFRM, so such a rule
//! would refuse them; there an unbound XFRM policy below charon's does the job.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::IpProtocol;
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use rtnetlink::IpVersion;

use crate::kernel::KernelError;
use crate::model::{FlowDirection, FlowProtocol, ProtectedFlow, Vip};

/// The rules' priority: right after charon's table-220 rule, long before main (32766).
pub const RULE_PRIORITY: u32 = 221;
/// FRA_PROTOCOL of the agent's rules ("v"), so that it never touches anyone else's.
pub const RULE_TAG: u8 = 0x76;

/// What one guard rule matches: from the VIP, a protocol, a source port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GuardRule {
    pub vip: Vip,
    /// IP protocol number; 0 = any.
    pub proto: u8,
    pub sport: Option<u16>,
}

impl GuardRule {
    /// The rule for a hosted VIP's flow (`FromVip`); `None` for other flows.
    pub fn for_flow(flow: &ProtectedFlow) -> Option<GuardRule> {
        (flow.direction == FlowDirection::FromVip).then(|| GuardRule {
            vip: flow.vip,
            proto: flow.protocol.ip_number().unwrap_or(0),
            sport: match flow.protocol {
                FlowProtocol::Any => None,
                _ => flow.port,
            },
        })
    }

    fn message(&self) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = match self.vip {
            IpAddr::V4(_) => netlink_packet_route::AddressFamily::Inet,
            IpAddr::V6(_) => netlink_packet_route::AddressFamily::Inet6,
        };
        m.header.src_len = if self.vip.is_ipv4() { 32 } else { 128 };
        // `ip rule add ... prohibit` leaves the table unspecified: the action decides.
        m.header.table = 0;
        m.header.action = RuleAction::Prohibit;
        m.attributes.push(RuleAttribute::Source(self.vip));
        m.attributes.push(RuleAttribute::Priority(RULE_PRIORITY));
        m.attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(RULE_TAG)));
        if self.proto != 0 {
            m.attributes
                .push(RuleAttribute::IpProtocol(IpProtocol::from(self.proto)));
        }
        if let Some(p) = self.sport {
            m.attributes
                .push(RuleAttribute::SourcePortRange(RulePortRange {
                    start: p,
                    end: p,
                }));
        }
        m
    }

    /// The guard rule a dumped rule is, if it is one of the agent's.
    pub fn from_message(m: &RuleMessage) -> Option<GuardRule> {
        if m.header.action != RuleAction::Prohibit {
            return None;
        }
        let mut tagged = false;
        let mut priority = None;
        let mut vip = None;
        let mut proto = 0;
        let mut sport = None;
        for a in &m.attributes {
            match a {
                RuleAttribute::Protocol(RouteProtocol::Other(t)) => tagged = *t == RULE_TAG,
                RuleAttribute::Priority(p) => priority = Some(*p),
                RuleAttribute::Source(ip) => vip = Some(*ip),
                RuleAttribute::IpProtocol(p) => proto = i32::from(*p) as u8,
                RuleAttribute::SourcePortRange(r) if r.start == r.end => sport = Some(r.start),
                _ => {}
            }
        }
        let vip = vip?;
        let full = if vip.is_ipv4() { 32 } else { 128 };
        (tagged && priority == Some(RULE_PRIORITY) && m.header.src_len == full)
            .then_some(GuardRule { vip, proto, sport })
    }
}

fn error(what: &str, e: rtnetlink::Error) -> KernelError {
    KernelError::Netlink(format!("{what}: {e}"))
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.map(|c| -c.get()) == Some(errno))
}

/// One rtnetlink session in the calling thread's namespace, as the XFRM side opens one.
struct Rtnl {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Rtnl {
    fn open() -> Result<Rtnl, KernelError> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| KernelError::Netlink(format!("open rtnetlink socket: {e}")))?;
        let task = tokio::spawn(conn);
        Ok(Rtnl { handle, task })
    }
}

impl Drop for Rtnl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The agent's guard rules now in the kernel, both families, with their messages.
async fn dump(rtnl: &Rtnl) -> Result<Vec<(GuardRule, RuleMessage)>, KernelError> {
    let mut out = Vec::new();
    for v in [IpVersion::V4, IpVersion::V6] {
        let rules: Vec<RuleMessage> = rtnl
            .handle
            .rule()
            .get(v)
            .execute()
            .try_collect()
            .await
            .map_err(|e| error("dump rules", e))?;
        out.extend(
            rules
                .into_iter()
                .filter_map(|m| GuardRule::from_message(&m).map(|g| (g, m))),
        );
    }
    Ok(out)
}

/// The agent's guard rules in the kernel.
pub async fn rules() -> Result<Vec<GuardRule>, KernelError> {
    let rtnl = Rtnl::open()?;
    Ok(dump(&rtnl).await?.into_iter().map(|(g, _)| g).collect())
}

/// Adds the missing rules of `wanted`; returns how many of them are in place.
pub async fn engage(wanted: &[GuardRule]) -> Result<u32, KernelError> {
    let rtnl = Rtnl::open()?;
    let present: Vec<GuardRule> = dump(&rtnl).await?.into_iter().map(|(g, _)| g).collect();
    for rule in wanted.iter().filter(|r| !present.contains(r)) {
        let mut req = rtnl.handle.rule().add();
        *req.message_mut() = rule.message();
        match req.execute().await {
            Ok(()) => tracing::debug!(?rule, "guard rule added"),
            Err(e) if is_errno(&e, libc::EEXIST) => {}
            Err(e) => return Err(error(&format!("add guard rule {rule:?}"), e)),
        }
    }
    let present: Vec<GuardRule> = dump(&rtnl).await?.into_iter().map(|(g, _)| g).collect();
    Ok(wanted.iter().filter(|r| present.contains(r)).count() as u32)
}

/// Removes every guard rule of `vip`; returns how many.
pub async fn release(vip: Vip) -> Result<u32, KernelError> {
    let rtnl = Rtnl::open()?;
    let mut removed = 0;
    for (_, m) in dump(&rtnl).await?.into_iter().filter(|(g, _)| g.vip == vip) {
        match rtnl.handle.rule().del(m).execute().await {
            Ok(()) => removed += 1,
            Err(e) if is_errno(&e, libc::ENOENT) => {}
            Err(e) => return Err(error("delete guard rule", e)),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(
        vip: &str,
        protocol: FlowProtocol,
        port: Option<u16>,
        d: FlowDirection,
    ) -> ProtectedFlow {
        ProtectedFlow {
            vip: vip.parse().unwrap(),
            protocol,
            port,
            direction: d,
        }
    }

    #[test]
    fn a_hosted_flow_becomes_a_rule_that_reads_back_the_same() {
        let f = flow(
            "2001:db8::100",
            FlowProtocol::Tcp,
            Some(143),
            FlowDirection::FromVip,
        );
        let rule = GuardRule::for_flow(&f).unwrap();
        assert_eq!((rule.proto, rule.sport), (6, Some(143)));
        assert_eq!(GuardRule::from_message(&rule.message()), Some(rule));
        let any = GuardRule::for_flow(&flow(
            "2001:db8::100",
            FlowProtocol::Any,
            None,
            FlowDirection::FromVip,
        ))
        .unwrap();
        assert_eq!(GuardRule::from_message(&any.message()), Some(any));
        assert_eq!(
            GuardRule::for_flow(&flow(
                "2001:db8::100",
                FlowProtocol::Tcp,
                Some(143),
                FlowDirection::ToVip
            )),
            None
        );
    }

    #[test]
    fn rules_without_the_tag_or_at_another_priority_are_not_the_agents() {
        let rule = GuardRule::for_flow(&flow(
            "2001:db8::100",
            FlowProtocol::Tcp,
            Some(143),
            FlowDirection::FromVip,
        ))
        .unwrap();
        let mut untagged = rule.message();
        untagged
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::Protocol(_)));
        assert_eq!(GuardRule::from_message(&untagged), None);
        let mut moved = rule.message();
        for a in &mut moved.attributes {
            if let RuleAttribute::Priority(p) = a {
                *p = 220;
            }
        }
        assert_eq!(GuardRule::from_message(&moved), None);
        let mut lookup = rule.message();
        lookup.header.action = RuleAction::ToTable;
        assert_eq!(GuardRule::from_message(&lookup), None);
    }
}
