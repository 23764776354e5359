//! Routing rules that keep a partial policy's unprotected traffic out of charon's TUN.
//!
//! With kernel-libipsec, charon routes every packet to a CHILD_SA's remote subnet into its
//! TUN device through routing table 220 (rule `not fwmark 0x42 lookup 220`, priority 220).
//! The TUN drops what no SA carries, so under `mail-credentials` a front-end's HTTP to the
//! VIP (and a back-end's answers) would vanish instead of flowing in clear. Two rules per
//! VIP ahead of charon's fix it: the protected flows go to table 220, everything else of
//! the VIP by the main table. A policy protecting all traffic needs none.
//!
//! A protected flow that finds no route in table 220 (no SA: the daemon down, the VIP in
//! transit) would fall through to the main table and leave in clear text; a `prohibit`
//! rule right behind the table-220 lookup stops it there, whatever the kernel's XFRM
//! policies can or cannot match (an IPv6 route lookup knows no output interface yet).

use std::fmt;

use crate::model::{FlowDirection, FlowProtocol, Vip, VipRole};

use super::Policy;

/// charon's routing table (kernel-netlink's default `routing_table`).
pub const CHARON_TABLE: u32 = 220;
/// Priority of the rules sending protected flows to charon's table.
pub const PROTECTED_PRIORITY: u32 = 210;
/// Priority of the rules refusing protected flows that table 220 had no route for.
pub const PROHIBIT_PRIORITY: u32 = 211;
/// Priority of the rules sending the rest of a VIP's traffic by the main table.
pub const BYPASS_PRIORITY: u32 = 212;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleTable {
    Charon,
    Main,
    /// No table: the packet is refused (EACCES to the sender).
    Prohibit,
}

/// One `ip rule`: packets to (front-end) or from (back-end) the VIP, optionally of one
/// protocol and port, looked up in `table`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoutingRule {
    pub priority: u32,
    pub vip: Vip,
    /// `ToVip`: matches the destination and destination port; `FromVip`: the source.
    pub direction: FlowDirection,
    pub protocol: Option<u8>,
    pub port: Option<u16>,
    pub table: RuleTable,
}

impl RoutingRule {
    /// The arguments after `ip rule add` (or `ip rule del`).
    pub fn ip_args(&self) -> Vec<String> {
        let mut a = vec!["priority".to_string(), self.priority.to_string()];
        let (addr_kw, port_kw) = match self.direction {
            FlowDirection::ToVip => ("to", "dport"),
            FlowDirection::FromVip => ("from", "sport"),
        };
        a.push(addr_kw.into());
        a.push(self.vip.to_string());
        if let Some(p) = self.protocol {
            a.push("ipproto".into());
            a.push(p.to_string());
        }
        if let Some(port) = self.port {
            a.push(port_kw.into());
            a.push(port.to_string());
        }
        match self.table {
            RuleTable::Charon => a.extend(["lookup".into(), CHARON_TABLE.to_string()]),
            RuleTable::Main => a.extend(["lookup".into(), "main".into()]),
            RuleTable::Prohibit => a.push("prohibit".into()),
        }
        a
    }
}

impl fmt::Display for RoutingRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.ip_args().join(" "))
    }
}

/// The rules this node needs for `vip` under `policy`: none when all traffic is protected.
pub fn routing_rules(policy: &Policy, vip: Vip, role: VipRole) -> Vec<RoutingRule> {
    let flows = policy.flows(vip, role);
    if flows.iter().any(|f| f.protocol == FlowProtocol::Any) {
        return Vec::new();
    }
    let direction = match role {
        VipRole::Peer => FlowDirection::ToVip,
        VipRole::Hosted => FlowDirection::FromVip,
    };
    let mut rules: Vec<RoutingRule> = Vec::new();
    for (priority, table) in [
        (PROTECTED_PRIORITY, RuleTable::Charon),
        (PROHIBIT_PRIORITY, RuleTable::Prohibit),
    ] {
        rules.extend(flows.iter().map(|f| RoutingRule {
            priority,
            vip,
            direction,
            protocol: f.protocol.ip_number(),
            port: f.port,
            table,
        }));
    }
    rules.push(RoutingRule {
        priority: BYPASS_PRIORITY,
        vip,
        direction,
        protocol: None,
        port: None,
        table: RuleTable::Main,
    });
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Template;

    #[test]
    fn partial_policy_routes_only_its_flows_to_charon() {
        let vip: Vip = "192.0.2.100".parse().unwrap();
        let p = Policy::from_template("m", Template::MailCredentials);
        let fe: Vec<String> = routing_rules(&p, vip, VipRole::Peer)
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(
            fe,
            [
                "priority 210 to 192.0.2.100 ipproto 6 dport 110 lookup 220",
                "priority 210 to 192.0.2.100 ipproto 6 dport 143 lookup 220",
                "priority 211 to 192.0.2.100 ipproto 6 dport 110 prohibit",
                "priority 211 to 192.0.2.100 ipproto 6 dport 143 prohibit",
                "priority 212 to 192.0.2.100 lookup main",
            ]
        );
        let be = routing_rules(&p, vip, VipRole::Hosted);
        assert_eq!(
            be[0].to_string(),
            "priority 210 from 192.0.2.100 ipproto 6 sport 110 lookup 220"
        );
        assert_eq!(
            be[4].to_string(),
            "priority 212 from 192.0.2.100 lookup main"
        );
        let udp_all = Policy {
            template: None,
            ports: Some(vec!["udp".parse().unwrap()]),
            ..p.clone()
        };
        assert_eq!(
            routing_rules(&udp_all, vip, VipRole::Peer)[0].to_string(),
            "priority 210 to 192.0.2.100 ipproto 17 lookup 220"
        );
        let all = Policy::from_template("a", Template::All);
        assert!(routing_rules(&all, vip, VipRole::Peer).is_empty());
    }
}
