//! When an address arrives on a node, as the kernel announces it (rtnetlink RTM_NEWADDR),
//! timed on receipt. The scenarios' takeover is this moment: polling `ip addr` every 10 ms
//! read it up to a poll and a process start late (tens of ms under a storm's load; planned
//! moves showed recoveries "before" the takeover), which flattered recovery − takeover.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use vipsec_testbed::netns::Netns;

use crate::clock::now_ns;

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const NLMSG_HDRLEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_DADFAILED: u32 = 0x08;
const IFA_F_TENTATIVE: u32 = 0x40;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// An address the kernel announced: which, whether it is usable yet (IPv6 DAD done), or
/// that it went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrChange {
    pub addr: IpAddr,
    pub usable: bool,
    pub gone: bool,
}

/// Address announcements in one namespace, from when it was opened, read on a thread of
/// their own so that each is timed as it arrives, also while the caller is busy (a fault
/// being injected takes a while, and a planned move's takeover can come meanwhile).
pub struct AddrEvents {
    seen: Arc<(Mutex<Seen>, Condvar)>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Seen {
    /// CLOCK_MONOTONIC ns when each address was first announced, and first usable.
    present: HashMap<IpAddr, u64>,
    usable: HashMap<IpAddr, u64>,
    /// Why reading stopped, if it did.
    failed: Option<String>,
}

/// How often the reader looks whether it is to stop.
const STOP_CHECK_MS: i32 = 50;

impl AddrEvents {
    /// Subscribes to `ns`'s IPv4 and IPv6 address announcements.
    pub fn open(ns: &Netns) -> anyhow::Result<AddrEvents> {
        let fd = ns.run_in(subscribe)??;
        let seen = Arc::new((Mutex::new(Seen::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = std::thread::Builder::new()
            .name("addr-events".into())
            .spawn({
                let (seen, stop) = (seen.clone(), stop.clone());
                move || read_until_stopped(&fd, &seen, &stop)
            })?;
        Ok(AddrEvents {
            seen,
            stop,
            reader: Some(reader),
        })
    }

    /// Counts addresses the namespace already holds as announced at `at` (no announcement
    /// will come for them); `usable` says which of them are past DAD.
    pub fn already_held(&self, held: &[(IpAddr, bool)], at: u64) {
        let mut seen = self.seen.0.lock().unwrap_or_else(|e| e.into_inner());
        for &(addr, usable) in held {
            seen.present.entry(addr).or_insert(at);
            if usable {
                seen.usable.entry(addr).or_insert(at);
            }
        }
    }

    /// When every one of `addrs` had been announced (`usable`: and usable), waiting until
    /// then or until `deadline_ns` (CLOCK_MONOTONIC); the moment of the last one to arrive.
    pub fn wait_all(
        &self,
        addrs: &[IpAddr],
        usable: bool,
        deadline_ns: u64,
    ) -> anyhow::Result<Option<u64>> {
        let (lock, cv) = &*self.seen;
        let mut seen = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let times = if usable { &seen.usable } else { &seen.present };
            if let Some(times) = addrs
                .iter()
                .map(|a| times.get(a).copied())
                .collect::<Option<Vec<u64>>>()
            {
                return Ok(times.into_iter().max());
            }
            if let Some(why) = &seen.failed {
                anyhow::bail!("address announcements: {why}");
            }
            let now = now_ns();
            if now >= deadline_ns {
                return Ok(None);
            }
            let wait = std::time::Duration::from_nanos(deadline_ns - now);
            seen = cv
                .wait_timeout(seen, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for AddrEvents {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

/// A route netlink socket in the calling thread's namespace, in the address groups.
fn subscribe() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor this process just opened and nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_nl is valid; fields are set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
    // SAFETY: binding a valid descriptor to a sockaddr_nl of its stated size.
    let ok = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    } == 0;
    if !ok {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn read_until_stopped(fd: &OwnedFd, seen: &(Mutex<Seen>, Condvar), stop: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    let failed = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match read_once(fd, &mut buf, STOP_CHECK_MS) {
            Ok(None) => continue,
            Ok(Some((at, arrived))) => {
                let mut s = seen.0.lock().unwrap_or_else(|e| e.into_inner());
                for a in arrived {
                    // An address that went counts from its next arrival: the takeover is
                    // when every VIP is there at once.
                    if a.gone {
                        s.present.remove(&a.addr);
                        s.usable.remove(&a.addr);
                        continue;
                    }
                    s.present.entry(a.addr).or_insert(at);
                    if a.usable {
                        s.usable.entry(a.addr).or_insert(at);
                    }
                }
                seen.1.notify_all();
            }
            Err(why) => break why,
        }
    };
    seen.0.lock().unwrap_or_else(|e| e.into_inner()).failed = Some(failed);
    seen.1.notify_all();
}

/// One datagram, if one arrives within `wait_ms`, with the moment it was read.
fn read_once(
    fd: &OwnedFd,
    buf: &mut [u8],
    wait_ms: i32,
) -> Result<Option<(u64, Vec<AddrChange>)>, String> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polling one valid descriptor.
    let ready = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
    if ready <= 0 {
        let e = std::io::Error::last_os_error();
        if ready == 0 || e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(format!("poll rtnetlink: {e}"));
    }
    // SAFETY: reading into a buffer of its stated length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    let at = now_ns();
    if n < 0 {
        let e = std::io::Error::last_os_error();
        // Announcements lost to a full buffer cannot be timed: say so, do not guess.
        return match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
            _ => Err(format!("read rtnetlink: {e}")),
        };
    }
    Ok(Some((at, parse(&buf[..n as usize]))))
}

/// The RTM_NEWADDR and RTM_DELADDR announcements in one datagram.
pub fn parse(mut buf: &[u8]) -> Vec<AddrChange> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        if (kind == RTM_NEWADDR || kind == RTM_DELADDR)
            && let Some(mut a) = addr_change(&buf[NLMSG_HDRLEN..len])
        {
            a.gone = kind == RTM_DELADDR;
            out.push(a);
        }
        buf = &buf[align(len).min(buf.len())..];
    }
    out
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// An ifaddrmsg and its attributes.
fn addr_change(msg: &[u8]) -> Option<AddrChange> {
    if msg.len() < IFADDRMSG_LEN {
        return None;
    }
    let family = i32::from(msg[0]);
    let mut flags = u32::from(msg[2]);
    let (mut local, mut address) = (None, None);
    let mut attrs = &msg[IFADDRMSG_LEN..];
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        let data = &attrs[4..len];
        match kind {
            IFA_LOCAL => local = ip_of(family, data),
            IFA_ADDRESS => address = ip_of(family, data),
            IFA_FLAGS if data.len() >= 4 => {
                flags = u32::from_ne_bytes(data[..4].try_into().expect("4 bytes"));
            }
            _ => {}
        }
        attrs = &attrs[align(len).min(attrs.len())..];
    }
    // IPv4 names the node's own address in IFA_LOCAL (IFA_ADDRESS is the peer's on a
    // point-to-point link); IPv6 has only IFA_ADDRESS.
    let addr = local.or(address)?;
    Some(AddrChange {
        addr,
        usable: flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED) == 0,
        gone: false,
    })
}

fn ip_of(family: i32, data: &[u8]) -> Option<IpAddr> {
    match family {
        libc::AF_INET if data.len() >= 4 => Some(IpAddr::V4(Ipv4Addr::new(
            data[0], data[1], data[2], data[3],
        ))),
        libc::AF_INET6 if data.len() >= 16 => {
            let o: [u8; 16] = data[..16].try_into().expect("16 bytes");
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
        a.extend(kind.to_ne_bytes());
        a.extend(data);
        a.resize(align(a.len()), 0);
        a
    }

    fn message(kind: u16, family: u8, flags: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![family, 32, flags, 0, 2, 0, 0, 0];
        for a in attrs {
            body.extend(a);
        }
        let mut m = ((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend(kind.to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend(body);
        m
    }

    #[test]
    fn announcements_in_one_datagram_are_read_with_their_dad_state() {
        let v4 = message(
            RTM_NEWADDR,
            libc::AF_INET as u8,
            0,
            &[
                attr(IFA_ADDRESS, &[192, 0, 2, 1]),
                attr(IFA_LOCAL, &[192, 0, 2, 100]),
            ],
        );
        let v6: Ipv6Addr = "2001:db8:1::100".parse().unwrap();
        let tentative = message(
            RTM_NEWADDR,
            libc::AF_INET6 as u8,
            0,
            &[
                attr(IFA_ADDRESS, &v6.octets()),
                attr(IFA_FLAGS, &IFA_F_TENTATIVE.to_ne_bytes()),
            ],
        );
        let done = message(
            RTM_NEWADDR,
            libc::AF_INET6 as u8,
            0,
            &[
                attr(IFA_ADDRESS, &v6.octets()),
                attr(IFA_FLAGS, &0u32.to_ne_bytes()),
            ],
        );
        let deleted = message(
            RTM_DELADDR,
            libc::AF_INET as u8,
            0,
            &[attr(IFA_LOCAL, &[192, 0, 2, 7])],
        );
        let route = message(24, libc::AF_INET as u8, 0, &[attr(1, &[192, 0, 2, 9])]);
        let datagram = [v4, tentative, deleted, route, done].concat();
        let change = |addr: &str, usable, gone| AddrChange {
            addr: addr.parse().unwrap(),
            usable,
            gone,
        };
        assert_eq!(
            parse(&datagram),
            vec![
                change("192.0.2.100", true, false),
                change("2001:db8:1::100", false, false),
                change("192.0.2.7", true, true),
                change("2001:db8:1::100", true, false),
            ]
        );
        // A truncated message ends the datagram instead of reading past it.
        assert_eq!(parse(&datagram[..datagram.len() - 3]).len(), 3);
    }
}
