//! The clear-text guard of an IPv6 VIP under kernel-libipsec: policy routing rules,
//! because an XFRM policy cannot do it.
//!
//! The guard must refuse a protected flow (a front-end's `to VIP dport 143`, a back-end's
//! answers `from VIP sport 143`) when it would leave in clear text and let it pass when it
//! goes into the tunnel. With IPv4 an XFRM block policy bound to the physical interface
//! tells the two apart. With IPv6 it cannot: the IPv6 output route lookup does not write
//! the chosen device into the flow, so an interface-bound IPv6 selector never matches an
//! unbound socket (agent/tests/kernel_xfrm.rs shows it), and an unbound one blocks the
//! tunnel too.
//!
//! What does tell them apart is routing. charon's kernel-libipsec sends tunnel traffic by
//! routes in its table (220, looked up by a rule at priority 220 for everything without
//! its IKE fwmark); without a CHILD_SA there is no route there and the lookup falls
//! through to the main table and out in clear. A rule just after charon's,
//! `to VIP/128 ipproto tcp dport 143 prohibit` (or `from VIP/128 ... sport 143`), catches
//! exactly that fall-through: the packet is refused (EACCES) instead of leaving. The rules
//! carry a protocol tag of their own so the agent finds its rules again (and only its
//! rules) after a restart.
//!
//! A flow of every protocol would also catch IKE itself (charon's IKE packets carry its
//! fwmark, so they skip table 220 and would meet the `prohibit`): such a VIP gets two
//! `pass` rules ahead of charon's, UDP 500 and 4500 by the main table. IKE and ESP-in-UDP
//! are never tunnelled, so nothing protected goes by them.
//!
//! Only for the kernel-libipsec set-up. With kernel ESP the tunnel's packets are routed by
//! the main table and transformed by XFRM, so such a rule would refuse them; there an
//! unbound XFRM policy below charon's does the job.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::IpProtocol;
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use rtnetlink::IpVersion;

use crate::kernel::KernelError;
use crate::model::{FlowDirection, FlowProtocol, ProtectedFlow, Vip};

/// The `prohibit` rules' priority: right after charon's table-220 rule, long before main
/// (32766).
pub const RULE_PRIORITY: u32 = 221;
/// The `pass` rules' priority (IKE by the main table, see the module notes): ahead of
/// charon's rule.
pub const PASS_PRIORITY: u32 = 219;
/// FRA_PROTOCOL of the agent's rules ("v"), so that it never touches anyone else's.
pub const RULE_TAG: u8 = 0x76;
/// The main routing table.
const MAIN_TABLE: u8 = 254;
/// IKE and NAT-T: what a `pass` rule lets by.
const IKE_PORTS: [u16; 2] = [500, 4500];

/// What one guard rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RuleKind {
    /// Refuses the flow (after charon's table 220 had no route for it).
    Prohibit,
    /// Sends IKE by the main table, ahead of the `prohibit` of an all-protocol flow.
    Pass,
}

/// What one guard rule matches: to or from the VIP, a protocol, a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GuardRule {
    pub vip: Vip,
    /// `ToVip`: destination VIP and destination port; `FromVip`: source VIP and port.
    pub direction: FlowDirection,
    /// IP protocol number; 0 = any.
    pub proto: u8,
    pub port: Option<u16>,
    pub kind: RuleKind,
}

impl GuardRule {
    /// The rules that guard one flow: its `prohibit`, and for a flow of every protocol the
    /// `pass` rules that keep IKE out of it.
    pub fn for_flow(flow: &ProtectedFlow) -> Vec<GuardRule> {
        let proto = flow.protocol.ip_number().unwrap_or(0);
        let prohibit = GuardRule {
            vip: flow.vip,
            direction: flow.direction,
            proto,
            port: match flow.protocol {
                FlowProtocol::Any => None,
                _ => flow.port,
            },
            kind: RuleKind::Prohibit,
        };
        let mut rules = vec![prohibit];
        if proto == 0 {
            rules.extend(IKE_PORTS.iter().map(|&p| GuardRule {
                vip: flow.vip,
                direction: flow.direction,
                proto: 17,
                port: Some(p),
                kind: RuleKind::Pass,
            }));
        }
        rules
    }

    fn priority(&self) -> u32 {
        match self.kind {
            RuleKind::Prohibit => RULE_PRIORITY,
            RuleKind::Pass => PASS_PRIORITY,
        }
    }

    fn message(&self) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = match self.vip {
            IpAddr::V4(_) => netlink_packet_route::AddressFamily::Inet,
            IpAddr::V6(_) => netlink_packet_route::AddressFamily::Inet6,
        };
        let full = if self.vip.is_ipv4() { 32 } else { 128 };
        match self.kind {
            // `ip rule add ... prohibit` leaves the table unspecified: the action decides.
            RuleKind::Prohibit => {
                m.header.table = 0;
                m.header.action = RuleAction::Prohibit;
            }
            RuleKind::Pass => {
                m.header.table = MAIN_TABLE;
                m.header.action = RuleAction::ToTable;
            }
        }
        match self.direction {
            FlowDirection::ToVip => {
                m.header.dst_len = full;
                m.attributes.push(RuleAttribute::Destination(self.vip));
            }
            FlowDirection::FromVip => {
                m.header.src_len = full;
                m.attributes.push(RuleAttribute::Source(self.vip));
            }
        }
        m.attributes.push(RuleAttribute::Priority(self.priority()));
        m.attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(RULE_TAG)));
        if self.proto != 0 {
            m.attributes
                .push(RuleAttribute::IpProtocol(IpProtocol::from(self.proto)));
        }
        if let Some(p) = self.port {
            let range = RulePortRange { start: p, end: p };
            m.attributes.push(match self.direction {
                FlowDirection::ToVip => RuleAttribute::DestinationPortRange(range),
                FlowDirection::FromVip => RuleAttribute::SourcePortRange(range),
            });
        }
        m
    }

    /// The guard rule a dumped rule is, if it is one of the agent's.
    pub fn from_message(m: &RuleMessage) -> Option<GuardRule> {
        let kind = match m.header.action {
            RuleAction::Prohibit => RuleKind::Prohibit,
            RuleAction::ToTable => RuleKind::Pass,
            _ => return None,
        };
        let mut tagged = false;
        let mut priority = None;
        let mut src = None;
        let mut dst = None;
        let mut proto = 0;
        let mut sport = None;
        let mut dport = None;
        for a in &m.attributes {
            match a {
                RuleAttribute::Protocol(RouteProtocol::Other(t)) => tagged = *t == RULE_TAG,
                RuleAttribute::Priority(p) => priority = Some(*p),
                RuleAttribute::Source(ip) => src = Some(*ip),
                RuleAttribute::Destination(ip) => dst = Some(*ip),
                RuleAttribute::IpProtocol(p) => proto = i32::from(*p) as u8,
                RuleAttribute::SourcePortRange(r) if r.start == r.end => sport = Some(r.start),
                RuleAttribute::DestinationPortRange(r) if r.start == r.end => dport = Some(r.start),
                _ => {}
            }
        }
        let full = |ip: &IpAddr| if ip.is_ipv4() { 32 } else { 128 };
        let (vip, direction, port) = match (src, dst) {
            (Some(v), None) if m.header.src_len == full(&v) => (v, FlowDirection::FromVip, sport),
            (None, Some(v)) if m.header.dst_len == full(&v) => (v, FlowDirection::ToVip, dport),
            _ => return None,
        };
        let rule = GuardRule {
            vip,
            direction,
            proto,
            port,
            kind,
        };
        let table_ok = kind == RuleKind::Prohibit || m.header.table == MAIN_TABLE;
        (tagged && table_ok && priority == Some(rule.priority())).then_some(rule)
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

/// Tells `disturbed` whenever a routing rule is deleted, and when notifications may have
/// been lost (a new subscription, a full socket buffer), until cancelled or the socket
/// fails. The guard keeper then compares its rules with the kernel at once.
pub async fn watch_deletions(
    disturbed: &tokio::sync::Notify,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), KernelError> {
    use futures::StreamExt;
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage;
    use rtnetlink::MulticastGroup;

    let (connection, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Ipv4Rule, MulticastGroup::Ipv6Rule])
            .map_err(|e| KernelError::Netlink(format!("subscribe to rule changes: {e}")))?;
    disturbed.notify_one();
    let watch = async {
        while let Some((message, _)) = messages.next().await {
            match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRule(_)) => {
                    disturbed.notify_one()
                }
                NetlinkPayload::Overrun(_) => {
                    tracing::warn!("rule notifications were lost (socket buffer full)");
                    disturbed.notify_one();
                }
                _ => {}
            }
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => Ok(()),
        _ = watch => Err(KernelError::Netlink("rule notifications ended".into())),
        _ = connection => Err(KernelError::Netlink("rule notification socket closed".into())),
    }
}

/// Adds the missing rules of `wanted` (all of one VIP), `pass` rules first, then removes
/// the VIP's rules no longer wanted; returns how many of `wanted` are in place.
pub async fn engage(vip: Vip, wanted: &[GuardRule]) -> Result<u32, KernelError> {
    let rtnl = Rtnl::open()?;
    let present: Vec<GuardRule> = dump(&rtnl).await?.into_iter().map(|(g, _)| g).collect();
    let mut missing: Vec<&GuardRule> = wanted.iter().filter(|r| !present.contains(r)).collect();
    // IKE must never meet a `prohibit` of its VIP without its `pass` in front.
    missing.sort_by_key(|r| r.kind != RuleKind::Pass);
    for rule in missing {
        let mut req = rtnl.handle.rule().add();
        *req.message_mut() = rule.message();
        match req.execute().await {
            Ok(()) => tracing::debug!(?rule, "guard rule added"),
            Err(e) if is_errno(&e, libc::EEXIST) => {}
            Err(e) => return Err(error(&format!("add guard rule {rule:?}"), e)),
        }
    }
    let dumped = dump(&rtnl).await?;
    // Flows no longer protected go only now, after the wanted ones are in place.
    for (_, m) in dumped
        .iter()
        .filter(|(g, _)| g.vip == vip && !wanted.contains(g))
    {
        match rtnl.handle.rule().del(m.clone()).execute().await {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::ENOENT) => {}
            Err(e) => return Err(error("delete guard rule", e)),
        }
    }
    Ok(wanted
        .iter()
        .filter(|r| dumped.iter().any(|(g, _)| g == *r))
        .count() as u32)
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
    fn hosted_and_peer_flows_become_rules_that_read_back_the_same() {
        for d in [FlowDirection::FromVip, FlowDirection::ToVip] {
            let rules =
                GuardRule::for_flow(&flow("2001:db8::100", FlowProtocol::Tcp, Some(143), d));
            assert_eq!(rules.len(), 1);
            let rule = rules[0];
            assert_eq!((rule.proto, rule.port, rule.direction), (6, Some(143), d));
            assert_eq!(GuardRule::from_message(&rule.message()), Some(rule));
        }
        let m = GuardRule::for_flow(&flow(
            "2001:db8::100",
            FlowProtocol::Tcp,
            Some(143),
            FlowDirection::ToVip,
        ))[0]
            .message();
        assert_eq!(m.header.dst_len, 128);
        assert_eq!(m.header.src_len, 0);
    }

    #[test]
    fn a_flow_of_every_protocol_lets_ike_pass_ahead_of_charons_rule() {
        let rules = GuardRule::for_flow(&flow(
            "2001:db8::100",
            FlowProtocol::Any,
            None,
            FlowDirection::ToVip,
        ));
        let pass: Vec<_> = rules.iter().filter(|r| r.kind == RuleKind::Pass).collect();
        assert_eq!(
            pass.iter().map(|r| (r.proto, r.port)).collect::<Vec<_>>(),
            vec![(17, Some(500)), (17, Some(4500))]
        );
        const { assert!(PASS_PRIORITY < 220 && RULE_PRIORITY > 220) };
        for r in &rules {
            assert_eq!(GuardRule::from_message(&r.message()), Some(*r));
        }
    }

    #[test]
    fn rules_without_the_tag_or_at_another_priority_are_not_the_agents() {
        let rule = GuardRule::for_flow(&flow(
            "2001:db8::100",
            FlowProtocol::Tcp,
            Some(143),
            FlowDirection::FromVip,
        ))[0];
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
        lookup.header.table = 220;
        assert_eq!(GuardRule::from_message(&lookup), None);
    }
}
