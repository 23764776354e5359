//! Kernel XFRM events (acquire, expire, SA and policy changes), logged with tracing.
//!
//! A hard expire of an SA toward a peer VIP is not turned into `Input::SaDown`: the
//! failover core speaks of IKE_SAs (charon's unique ids), and the kernel's SA carries
//! only SPI and reqid, which charon does not expose as a mapping to the IKE id. The
//! keying backend reports the same loss as `SaDown` with the right id (charon sees the
//! expire first, as the kernel's registered key manager), so the kernel side only logs.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_xfrm::{
    XFRMNLGRP_ACQUIRE, XFRMNLGRP_EXPIRE, XFRMNLGRP_POLICY, XFRMNLGRP_SA, XfrmMessage,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::netlink::ip_of;
use super::policy::is_agent_index;
use super::state::VipMap;
use crate::InputSink;

const GROUPS: [u32; 4] = [
    XFRMNLGRP_ACQUIRE,
    XFRMNLGRP_EXPIRE,
    XFRMNLGRP_SA,
    XFRMNLGRP_POLICY,
];
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// Logs kernel events until cancelled; re-subscribes if the socket fails.
pub(super) async fn watch(vips: &VipMap, _sink: InputSink, cancel: CancellationToken) {
    while !cancel.is_cancelled() {
        if let Err(e) = watch_once(vips, &cancel).await {
            warn!(error = %e, "XFRM event subscription failed; retrying");
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
        }
    }
}

async fn watch_once(vips: &VipMap, cancel: &CancellationToken) -> std::io::Result<()> {
    let (mut conn, _handle, mut messages) = xfrmnetlink::new_connection()?;
    let fd = conn.socket_mut().as_raw_fd();
    for group in GROUPS {
        add_membership(fd, group)?;
    }
    let task = tokio::spawn(conn);
    let _stop = AbortOnDrop(task);
    info!("watching XFRM events (acquire, expire, sa, policy)");
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            msg = messages.next() => match msg {
                Some((msg, _)) => {
                    if let NetlinkPayload::InnerMessage(m) = msg.payload {
                        log_event(vips, &m);
                    }
                }
                None => return Err(std::io::Error::other("XFRM netlink socket closed")),
            },
        }
    }
}

/// Joins a netlink multicast group. xfrmnetlink's socket type comes from netlink-sys 0.8,
/// whose `AsyncSocket` trait this crate cannot name (it uses netlink-sys 0.9), so the
/// membership is set on the raw descriptor, as `Socket::add_membership` itself does.
fn add_membership(fd: RawFd, group: u32) -> std::io::Result<()> {
    // SAFETY: `fd` is an open netlink socket owned by the connection, and the option value
    // points to a live u32 of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            (&group as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
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

fn log_event(vips: &VipMap, m: &XfrmMessage) {
    match m {
        XfrmMessage::Acquire(a) => {
            let a = &a.acquire;
            let fam = a.selector.family;
            info!(
                event = "acquire",
                src = ?ip_of(&a.saddr, fam), dst = ?ip_of(&a.id.daddr, fam),
                proto = a.selector.proto, dport = a.selector.dport,
                policy_index = a.policy.index,
                "XFRM acquire: traffic hit a policy without an SA"
            );
        }
        XfrmMessage::Expire(e) => {
            let s = &e.expire.state;
            let (src, dst) = (ip_of(&s.saddr, s.family), ip_of(&s.id.daddr, s.family));
            let mapped = src.zip(dst).and_then(|(s, d)| vips.classify(s, d));
            let hard = e.expire.hard != 0;
            info!(
                event = "expire", hard, src = ?src, dst = ?dst,
                spi = format_args!("{:#010x}", s.id.spi), reqid = s.reqid,
                vip = ?mapped.map(|m| m.0), role = ?mapped.map(|m| m.1),
                "XFRM SA expire (no IKE id in the kernel: left to the keying backend)"
            );
        }
        XfrmMessage::AddSa(s) | XfrmMessage::UpdateSa(s) => {
            let s = &s.user_sa_info;
            debug!(event = "sa-new", src = ?ip_of(&s.saddr, s.family),
                dst = ?ip_of(&s.id.daddr, s.family), spi = format_args!("{:#010x}", s.id.spi),
                "XFRM SA added");
        }
        XfrmMessage::DeleteSa(s) => {
            let id = &s.user_sa_id;
            debug!(event = "sa-delete", dst = ?ip_of(&id.daddr, id.family),
                spi = format_args!("{:#010x}", id.spi), "XFRM SA deleted");
        }
        XfrmMessage::FlushSa(_) => info!(event = "sa-flush", "XFRM SAs flushed"),
        XfrmMessage::AddPolicy(p) | XfrmMessage::UpdatePolicy(p) => {
            let p = &p.user_policy_info;
            debug!(
                event = "policy-new",
                index = p.index,
                dir = p.direction,
                action = p.action,
                priority = p.priority,
                "XFRM policy added"
            );
        }
        XfrmMessage::DeletePolicy(p) => {
            let index = p.user_policy_id.index;
            if is_agent_index(index) {
                // Expected on release; unexpected if someone else removed a block.
                info!(event = "policy-delete", index, "agent block policy removed");
            } else {
                debug!(event = "policy-delete", index, "XFRM policy deleted");
            }
        }
        XfrmMessage::FlushPolicy(_) => {
            warn!(
                event = "policy-flush",
                "XFRM policies flushed (agent block policies too)"
            )
        }
        XfrmMessage::PolicyExpire(p) => {
            info!(
                event = "policy-expire",
                index = p.expire.pol.index,
                hard = p.expire.hard != 0,
                "XFRM policy expire"
            );
        }
        other => debug!(message_type = other.message_type(), "XFRM event"),
    }
}
