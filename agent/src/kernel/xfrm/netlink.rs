//! One XFRM netlink session per operation.
//!
//! A fresh socket per call keeps the backend free of reconnect logic and opens the socket
//! in the network namespace of the calling thread, which is what the namespace tests rely
//! on. Opening a netlink socket costs microseconds, far below the kernel work that follows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_xfrm::{AF_INET, AF_INET6, Address};
use tokio::task::JoinHandle;

use crate::kernel::KernelError;

/// A netlink handle and its connection task; dropping it stops the task (netlink-proto
/// would otherwise keep the task alive until the socket closes).
pub(super) struct Session {
    pub handle: xfrmnetlink::Handle,
    task: JoinHandle<()>,
}

impl Session {
    pub fn open() -> Result<Session, KernelError> {
        let (conn, handle, _unsolicited) = xfrmnetlink::new_connection()
            .map_err(|e| KernelError::Netlink(format!("open XFRM netlink socket: {e}")))?;
        let task = tokio::spawn(conn);
        Ok(Session { handle, task })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The errno of a netlink error answer (positive), if that is what `e` is.
pub(super) fn errno(e: &xfrmnetlink::Error) -> Option<i32> {
    match e {
        xfrmnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

pub(super) fn netlink_error(what: &str, e: xfrmnetlink::Error) -> KernelError {
    match errno(&e) {
        Some(code) => KernelError::Netlink(format!(
            "{what}: {}",
            std::io::Error::from_raw_os_error(code)
        )),
        None => KernelError::Netlink(format!("{what}: {e}")),
    }
}

/// Reads an XFRM address (16 bytes, family given elsewhere).
pub(super) fn ip_of(addr: &Address, family: u16) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(addr.to_ipv4())),
        AF_INET6 => Some(IpAddr::V6(addr.to_ipv6())),
        _ => None,
    }
}

pub(super) fn full_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

pub(super) fn unspecified_like(ip: &IpAddr) -> IpAddr {
    if ip.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    }
}
