//! Letting the agent's own IKE packets (the IKE port probe) past the tunnel, the way
//! charon's IKE packets get past it.
//!
//! A front-end's connection toward a VIP often covers every protocol (a host-to-host
//! tunnel), so a plain UDP packet to the VIP's port 500 is the tunnel's: with kernel ESP an
//! XFRM policy (or trap) takes it, with kernel-libipsec a route in charon's table 220 sends
//! it into the TUN device. charon's own sockets escape both: an XFRM socket policy that
//! allows everything in and out, and, under kernel-libipsec, a firewall mark that charon's
//! routing rule (`not fwmark M lookup 220`) lets by. A probe must escape the same way, or
//! it is swallowed by the very tunnel it is trying to bring back.

use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use netlink_packet_route::rule::{RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::IpVersion;

/// charon's routing table (kernel-netlink's default `routing_table`).
const CHARON_TABLE: u32 = 220;

/// The firewall mark charon's IKE packets carry to skip its routing table: the mark of
/// the inverted `fwmark` rule that sends everything else to table 220. None when there is
/// no such rule (kernel ESP, or charon not running yet).
pub async fn charon_ike_mark() -> Option<u32> {
    let (conn, handle, _) = rtnetlink::new_connection().ok()?;
    let task = tokio::spawn(conn);
    let mut found = None;
    for v in [IpVersion::V4, IpVersion::V6] {
        let rules: Vec<RuleMessage> = handle
            .rule()
            .get(v)
            .execute()
            .try_collect()
            .await
            .unwrap_or_default();
        found = rules.iter().find_map(ike_mark_of);
        if found.is_some() {
            break;
        }
    }
    task.abort();
    found
}

fn ike_mark_of(rule: &RuleMessage) -> Option<u32> {
    let table = rule
        .attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(rule.header.table));
    if table != CHARON_TABLE || !rule.header.flags.contains(RuleFlags::Invert) {
        return None;
    }
    rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::FwMark(m) => Some(*m),
        _ => None,
    })
}

/// `struct xfrm_userpolicy_info` of linux/xfrm.h, as `IP_XFRM_POLICY` takes it.
#[repr(C)]
struct XfrmUserPolicyInfo {
    sel: [u8; 56],
    lft: [u64; 8],
    curlft: [u64; 4],
    priority: u32,
    index: u32,
    dir: u8,
    action: u8,
    flags: u8,
    share: u8,
}

const XFRM_POLICY_IN: u8 = 0;
const XFRM_POLICY_OUT: u8 = 1;
const XFRM_POLICY_ALLOW: u8 = 0;
/// Offset of `family` in `struct xfrm_selector` (after two addresses and four ports).
const SELECTOR_FAMILY: usize = 40;

/// Puts `socket` past every XFRM policy (both directions) and, with `mark`, past charon's
/// routing table. Errors say which step failed; the caller logs them and probes anyway.
pub fn bypass(socket: &impl AsRawFd, ipv6: bool, mark: Option<u32>) -> Result<(), String> {
    let fd = socket.as_raw_fd();
    if let Some(mark) = mark {
        set(fd, libc::SOL_SOCKET, libc::SO_MARK, &mark, "SO_MARK")?;
    }
    let (level, name, family) = if ipv6 {
        (libc::SOL_IPV6, libc::IPV6_XFRM_POLICY, libc::AF_INET6)
    } else {
        (libc::SOL_IP, libc::IP_XFRM_POLICY, libc::AF_INET)
    };
    for dir in [XFRM_POLICY_IN, XFRM_POLICY_OUT] {
        let mut policy = XfrmUserPolicyInfo {
            sel: [0; 56],
            // No limits, as charon leaves them for its own sockets.
            lft: [0; 8],
            curlft: [0; 4],
            priority: 0,
            index: 0,
            dir,
            action: XFRM_POLICY_ALLOW,
            flags: 0,
            share: 0,
        };
        policy.sel[SELECTOR_FAMILY..SELECTOR_FAMILY + 2]
            .copy_from_slice(&(family as u16).to_ne_bytes());
        set(fd, level, name, &policy, "XFRM socket policy")?;
    }
    Ok(())
}

fn set<T>(fd: i32, level: i32, name: i32, value: &T, what: &str) -> Result<(), String> {
    // SAFETY: `value` is a live, initialised T and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::rule::RuleHeader;

    #[test]
    fn the_policy_has_the_kernels_layout() {
        // sizeof(struct xfrm_userpolicy_info) on 64-bit Linux.
        assert_eq!(std::mem::size_of::<XfrmUserPolicyInfo>(), 168);
    }

    fn rule(table: u32, invert: bool, mark: Option<u32>) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header = RuleHeader::default();
        if invert {
            m.header.flags = RuleFlags::Invert;
        }
        m.attributes.push(RuleAttribute::Table(table));
        if let Some(mark) = mark {
            m.attributes.push(RuleAttribute::FwMark(mark));
        }
        m
    }

    #[test]
    fn charons_mark_is_the_one_its_table_is_skipped_for() {
        assert_eq!(ike_mark_of(&rule(220, true, Some(0x42))), Some(0x42));
        assert_eq!(
            ike_mark_of(&rule(220, false, Some(0x42))),
            None,
            "not inverted"
        );
        assert_eq!(
            ike_mark_of(&rule(100, true, Some(0x42))),
            None,
            "another table"
        );
        assert_eq!(ike_mark_of(&rule(220, true, None)), None);
    }
}
