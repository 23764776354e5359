//! Kernel XFRM events (acquire, expire, SA and policy changes), logged with tracing.
//!
//! A hard expire of an SA toward a peer VIP is not turned into `Input::SaDown`: the core
//! names IKE_SAs by charon's unique id, and the kernel's SA carries only addresses, SPI
//! and reqid. Mapping SPIs to IKE ids needs charon's inventory (VICI `list-sas`), which
//! belongs to the keying backend; that backend reports the loss as `SaDown` with the
//! right id (charon, the registered key manager, hears the same expire). So the kernel
//! backend logs expires, with the VIP and role when the addresses map to one.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_xfrm::{
    XFRM_POLICY_BLOCK, XFRMNLGRP_ACQUIRE, XFRMNLGRP_EXPIRE, XFRMNLGRP_POLICY, XFRMNLGRP_SA,
    XfrmAttrs, XfrmMessage,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::netlink::ip_of;
use super::policy::is_agent_index;
use super::state::VipMap;
use crate::model::{Vip, VipRole};

const GROUPS: [u32; 4] = [
    XFRMNLGRP_ACQUIRE,
    XFRMNLGRP_EXPIRE,
    XFRMNLGRP_SA,
    XFRMNLGRP_POLICY,
];
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// One kernel XFRM event, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XfrmEvent {
    /// Traffic hit a policy whose template has no SA yet (the kernel asks for keys).
    Acquire {
        src: Option<IpAddr>,
        dst: Option<IpAddr>,
        proto: u8,
        dport: u16,
        policy_index: u32,
    },
    /// An SA reached a soft or hard lifetime limit.
    Expire {
        src: Option<IpAddr>,
        dst: Option<IpAddr>,
        spi: u32,
        reqid: u32,
        hard: bool,
        vip: Option<Vip>,
        role: Option<VipRole>,
    },
    SaAdded {
        src: Option<IpAddr>,
        dst: Option<IpAddr>,
        spi: u32,
    },
    SaDeleted {
        dst: Option<IpAddr>,
        spi: u32,
    },
    SasFlushed,
    PolicyAdded {
        index: u32,
        action: u8,
        priority: u32,
    },
    PolicyDeleted {
        /// From the notice's id, or from the policy it carries when deleted by selector.
        index: u32,
        /// One of the agent's block policies.
        agent: bool,
        /// The notice said which policy went (an index, or the policy itself).
        known: bool,
    },
    PoliciesFlushed,
    PolicyExpire {
        index: u32,
        hard: bool,
    },
    Other {
        message_type: u16,
    },
}

/// Decodes and logs kernel events until cancelled, sending each to `events` if given;
/// re-subscribes if the socket fails. `disturbed` is told of every change that may have
/// removed part of the guard, and whenever events may have been missed (a new
/// subscription, a lost notification): the guard keeper then compares the guard with the
/// kernel at once instead of at its next periodic check.
pub(super) async fn watch(
    vips: &VipMap,
    events: Option<mpsc::Sender<XfrmEvent>>,
    disturbed: Option<&Notify>,
    cancel: CancellationToken,
) {
    while !cancel.is_cancelled() {
        if let Err(e) = watch_once(vips, events.as_ref(), disturbed, &cancel).await {
            warn!(error = %e, "XFRM event subscription failed; retrying");
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
        }
    }
}

async fn watch_once(
    vips: &VipMap,
    events: Option<&mpsc::Sender<XfrmEvent>>,
    disturbed: Option<&Notify>,
    cancel: &CancellationToken,
) -> std::io::Result<()> {
    let (mut conn, _handle, mut messages) = xfrmnetlink::new_connection()?;
    let fd = conn.socket_mut().as_raw_fd();
    bind_groups(fd, &GROUPS)?;
    let task = tokio::spawn(conn);
    let _stop = AbortOnDrop(task);
    info!("watching XFRM events (acquire, expire, sa, policy)");
    // Whatever happened while nobody was subscribed is only seen by a check.
    disturbed.inspect(|n| n.notify_one());
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            msg = messages.next() => match msg {
                Some((msg, _)) => match msg.payload {
                    NetlinkPayload::InnerMessage(m) => {
                        let event = decode(vips, &m);
                        log_event(&event);
                        if event.may_touch_the_guard() {
                            disturbed.inspect(|n| n.notify_one());
                        }
                        if let Some(tx) = events {
                            // A slow consumer loses events rather than stall the socket.
                            let _ = tx.try_send(event);
                        }
                    }
                    NetlinkPayload::Overrun(_) => {
                        warn!("XFRM notifications were lost (socket buffer full)");
                        disturbed.inspect(|n| n.notify_one());
                    }
                    _ => {}
                },
                None => return Err(std::io::Error::other("XFRM netlink socket closed")),
            },
        }
    }
}

/// Binds the socket to the multicast groups. xfrmnetlink's socket type comes from
/// netlink-sys 0.8, whose `AsyncSocket` trait this crate cannot name (it uses netlink-sys
/// 0.9), so this is done on the raw descriptor. Binding (rather than only joining groups
/// with NETLINK_ADD_MEMBERSHIP) also gives the socket a port id: the kernel skips
/// listeners whose port id is 0 when it broadcasts, and this socket never sends anything
/// that would bind it automatically.
fn bind_groups(fd: RawFd, groups: &[u32]) -> std::io::Result<()> {
    // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = groups.iter().fold(0, |mask, g| mask | 1 << (g - 1));
    // SAFETY: `fd` is an open netlink socket owned by the connection, and `addr` is a
    // live sockaddr_nl of the given size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl XfrmEvent {
    /// One of the agent's policies went (or a deletion that does not say which), the
    /// policies were flushed, or one of the agent's blocks was replaced: an update with a
    /// block's selector replaces it whatever its priority, keeps its index, and is
    /// announced as that policy with another action. The keying daemon's own policy
    /// changes, many in a mass move, are not.
    fn may_touch_the_guard(&self) -> bool {
        match self {
            XfrmEvent::PolicyDeleted { agent, known, .. } => *agent || !*known,
            XfrmEvent::PoliciesFlushed => true,
            XfrmEvent::PolicyExpire { index, hard } => *hard && is_agent_index(*index),
            XfrmEvent::PolicyAdded { index, action, .. } => {
                is_agent_index(*index) && *action != XFRM_POLICY_BLOCK
            }
            _ => false,
        }
    }
}

fn decode(vips: &VipMap, m: &XfrmMessage) -> XfrmEvent {
    match m {
        XfrmMessage::Acquire(a) => {
            let a = &a.acquire;
            let fam = a.selector.family;
            XfrmEvent::Acquire {
                src: ip_of(&a.saddr, fam),
                dst: ip_of(&a.id.daddr, fam),
                proto: a.selector.proto,
                dport: a.selector.dport,
                policy_index: a.policy.index,
            }
        }
        XfrmMessage::Expire(e) => {
            let s = &e.expire.state;
            let (src, dst) = (ip_of(&s.saddr, s.family), ip_of(&s.id.daddr, s.family));
            let mapped = src.zip(dst).and_then(|(s, d)| vips.classify(s, d));
            XfrmEvent::Expire {
                src,
                dst,
                spi: s.id.spi,
                reqid: s.reqid,
                hard: e.expire.hard != 0,
                vip: mapped.map(|m| m.0),
                role: mapped.map(|m| m.1),
            }
        }
        XfrmMessage::AddSa(s) | XfrmMessage::UpdateSa(s) => {
            let s = &s.user_sa_info;
            XfrmEvent::SaAdded {
                src: ip_of(&s.saddr, s.family),
                dst: ip_of(&s.id.daddr, s.family),
                spi: s.id.spi,
            }
        }
        XfrmMessage::DeleteSa(s) => XfrmEvent::SaDeleted {
            dst: ip_of(&s.user_sa_id.daddr, s.user_sa_id.family),
            spi: s.user_sa_id.spi,
        },
        XfrmMessage::FlushSa(_) => XfrmEvent::SasFlushed,
        XfrmMessage::AddPolicy(p) | XfrmMessage::UpdatePolicy(p) => XfrmEvent::PolicyAdded {
            index: p.user_policy_info.index,
            action: p.user_policy_info.action,
            priority: p.user_policy_info.priority,
        },
        XfrmMessage::DeletePolicy(p) => {
            // Deleted by selector, the notice's id has no index; the kernel attaches the
            // deleted policy itself.
            let attached = p.nlas.iter().find_map(|a| match a {
                XfrmAttrs::PolicyInfo(info) => Some(info.index),
                _ => None,
            });
            let index = match p.user_policy_id.index {
                0 => attached.unwrap_or(0),
                i => i,
            };
            XfrmEvent::PolicyDeleted {
                index,
                agent: is_agent_index(index),
                known: index != 0,
            }
        }
        XfrmMessage::FlushPolicy(_) => XfrmEvent::PoliciesFlushed,
        XfrmMessage::PolicyExpire(p) => XfrmEvent::PolicyExpire {
            index: p.expire.pol.index,
            hard: p.expire.hard != 0,
        },
        other => XfrmEvent::Other {
            message_type: other.message_type(),
        },
    }
}

fn log_event(event: &XfrmEvent) {
    match event {
        XfrmEvent::Acquire {
            src,
            dst,
            proto,
            dport,
            policy_index,
        } => info!(
            event = "acquire", src = ?src, dst = ?dst, proto, dport, policy_index,
            "XFRM acquire: traffic hit a policy without an SA"
        ),
        XfrmEvent::Expire {
            src,
            dst,
            spi,
            reqid,
            hard,
            vip,
            role,
        } => info!(
            event = "expire", hard, src = ?src, dst = ?dst,
            spi = format_args!("{spi:#010x}"), reqid, vip = ?vip, role = ?role,
            "XFRM SA expire (the kernel has no IKE id; the keying backend reports SaDown)"
        ),
        XfrmEvent::SaAdded { src, dst, spi } => debug!(
            event = "sa-new", src = ?src, dst = ?dst, spi = format_args!("{spi:#010x}"),
            "XFRM SA added"
        ),
        XfrmEvent::SaDeleted { dst, spi } => debug!(
            event = "sa-delete", dst = ?dst, spi = format_args!("{spi:#010x}"),
            "XFRM SA deleted"
        ),
        XfrmEvent::SasFlushed => info!(event = "sa-flush", "XFRM SAs flushed"),
        XfrmEvent::PolicyAdded {
            index,
            action,
            priority,
        } => {
            debug!(
                event = "policy-new",
                index, action, priority, "XFRM policy added"
            )
        }
        // Expected on release; worth seeing when someone else removes a block.
        XfrmEvent::PolicyDeleted {
            index, agent: true, ..
        } => {
            info!(event = "policy-delete", index, "agent block policy removed")
        }
        XfrmEvent::PolicyDeleted {
            index,
            agent: false,
            ..
        } => {
            debug!(event = "policy-delete", index, "XFRM policy deleted")
        }
        XfrmEvent::PoliciesFlushed => warn!(
            event = "policy-flush",
            "XFRM policies flushed (agent block policies too)"
        ),
        XfrmEvent::PolicyExpire { index, hard } => {
            info!(event = "policy-expire", index, hard, "XFRM policy expire")
        }
        XfrmEvent::Other { message_type } => debug!(message_type, "XFRM event"),
    }
}
