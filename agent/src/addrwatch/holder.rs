//! Does anyone else answer for a VIP on its link? The evidence a fast takeover rests on.
//!
//! When the cluster manager gives this node a VIP while the store still records another
//! node as its owner, either that node died (its record lives on until its lease runs out,
//! up to the lease TTL plus etcd's rounding) or the address was put here by hand next to a
//! live owner (a split brain that must stay refused). A live owner still holds the address
//! and its kernel answers an ARP probe for it; a dead or cut-off one does not. So the node
//! asks the link, a few times within a short window (RFC 5227 probes: sender address
//! 0.0.0.0, so no neighbour's cache changes), and only silence lets it take over.
//!
//! For IPv6 the question is a neighbour solicitation for the VIP from this node's
//! link-local address: a node holding the address answers with a neighbour advertisement.
//! (The VIP is past duplicate address detection when the node asks, so an answer cannot
//! make the kernel give up its own copy.)
//!
//! Where the link cannot answer — a VIP on a loopback or a non-Ethernet interface (routed
//! set-ups such as BGP announce it from `lo`), an interface without a link-local address —
//! the probe says `Unknown` and the node waits for the old record's lease as before.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use async_trait::async_trait;

pub use crate::failover::HolderAnswer;
use crate::model::Vip;

#[async_trait]
pub trait HolderProbe: Send + Sync + 'static {
    /// Asks the VIP's link whether another station holds the address, for up to `window`.
    async fn probe(&self, vip: Vip, window: Duration) -> HolderAnswer;

    /// Tells the link this node holds the VIP now (gratuitous ARP), so that peers stop
    /// sending to the old holder's MAC before the cluster manager gets round to it. Best
    /// effort: why it could not is returned for the log.
    async fn announce(&self, vip: Vip) -> Result<(), String> {
        let _ = vip;
        Ok(())
    }

    /// Forgets the link-layer address this node has cached for a peer VIP, so that the
    /// next packet (an initiation's IKE_SA_INIT) asks the link who holds it now; returns
    /// how many entries went. Best effort, like `announce`.
    async fn forget_holder(&self, vip: Vip) -> Result<u32, String> {
        let _ = vip;
        Ok(0)
    }
}

/// Most a forgotten neighbour entry is waited for: it saves one resolution at most, and
/// the caller is on an initiation's path.
const FORGET_WITHIN: Duration = Duration::from_millis(500);

/// [`HolderProbe::forget_holder`] for `vip`, waited for at most `FORGET_WITHIN`, the
/// outcome logged with `why` it was asked for. Best effort, like the call itself.
pub async fn forget_holder_for(holder: &dyn HolderProbe, vip: Vip, why: &'static str) {
    match tokio::time::timeout(FORGET_WITHIN, holder.forget_holder(vip)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::debug!(%vip, entries = n, why, "neighbour entries deleted"),
        Ok(Err(e)) => tracing::debug!(%vip, error = %e, why, "neighbour entries not deleted"),
        Err(_) => tracing::debug!(%vip, why, "neighbour entries not deleted in time"),
    }
}

/// ARP probes on the interface that holds the VIP.
pub struct ArpProbe;

#[async_trait]
impl HolderProbe for ArpProbe {
    async fn probe(&self, vip: Vip, window: Duration) -> HolderAnswer {
        let asked = answered_early(move |reply| match vip {
            IpAddr::V4(v4) => arp_probe(v4, window, reply),
            IpAddr::V6(v6) => reply(ndp_probe(v6, window)),
        })
        .await;
        match asked {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) | Err(e) => HolderAnswer::Unknown(e),
        }
    }

    async fn announce(&self, vip: Vip) -> Result<(), String> {
        match vip {
            // IPv6 peers learn the new holder from the kernel's own neighbour
            // advertisement after DAD, or by solicitation when they find it unreachable.
            IpAddr::V6(_) => Ok(()),
            IpAddr::V4(v4) => answered_early(move |reply| arp_announce(v4, reply)).await?,
        }
    }

    async fn forget_holder(&self, vip: Vip) -> Result<u32, String> {
        super::neighbour::forget(vip).await
    }
}

/// A reply handed over from a blocking thread.
type Reply<T> = Box<dyn FnOnce(T) + Send>;

/// Runs `work` on a blocking thread and returns what it hands to its reply as soon as it
/// does, not when `work` returns: closing a packet socket waits for an RCU grace period
/// (`synchronize_net` on every release, 5 ms and more under load), and neither the
/// takeover nor the record it announces needs to wait for that.
async fn answered_early<T: Send + 'static>(
    work: impl FnOnce(Reply<T>) + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reply: Reply<T> = Box::new(move |answer| {
        let _ = tx.send(answer);
    });
    let task = tokio::task::spawn_blocking(move || work(reply));
    match rx.await {
        Ok(answer) => Ok(answer),
        Err(_) => Err(match task.await {
            Err(e) => format!("link task: {e}"),
            Ok(()) => "link task ended without an answer".into(),
        }),
    }
}

/// The link a VIP is on, as `getifaddrs` shows it.
#[derive(Debug)]
struct Link {
    name: String,
    index: i32,
    mac: [u8; 6],
    /// The interface's IPv6 link-local address, if it has one.
    link_local: Option<Ipv6Addr>,
}

const ARPHRD_ETHER: u16 = 1;
const ETH_P_ARP: u16 = 0x0806;

/// Finds the Ethernet interface carrying `vip`, or says why there is none.
fn link_of(vip: IpAddr) -> Result<Link, String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(format!("getifaddrs: {}", std::io::Error::last_os_error()));
    }
    let mut name: Option<(String, u32)> = None;
    let mut links: Vec<(String, i32, u16, [u8; 6])> = Vec::new();
    let mut link_locals: Vec<(String, Ipv6Addr)> = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` walks the list getifaddrs returned, which stays valid until freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        let ifname = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and at least a sockaddr.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family == libc::AF_INET {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            if IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))) == vip {
                name = Some((ifname, ifa.ifa_flags));
            }
        } else if family == libc::AF_INET6 {
            // SAFETY: an AF_INET6 address is a sockaddr_in6.
            let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            if IpAddr::V6(a) == vip {
                name = Some((ifname, ifa.ifa_flags));
            } else if a.is_unicast_link_local() {
                link_locals.push((ifname, a));
            }
        } else if family == libc::AF_PACKET {
            // SAFETY: an AF_PACKET address is a sockaddr_ll.
            let ll = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_ll) };
            let mut mac = [0u8; 6];
            if ll.sll_halen == 6 {
                mac.copy_from_slice(&ll.sll_addr[..6]);
            }
            links.push((ifname, ll.sll_ifindex, ll.sll_hatype, mac));
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    let Some((ifname, flags)) = name else {
        return Err(format!("{vip} is on no interface here"));
    };
    // A label such as `eth0:vip` shares eth0's link.
    let base = ifname.split(':').next().unwrap_or(&ifname).to_string();
    if flags & libc::IFF_LOOPBACK as u32 != 0 {
        return Err(format!(
            "{vip} is on {ifname}, a loopback: no link to ask; waiting for the old record's lease"
        ));
    }
    let Some((_, index, hatype, mac)) = links.into_iter().find(|(n, ..)| *n == base) else {
        return Err(format!("{ifname}: no link-layer address"));
    };
    if hatype != ARPHRD_ETHER {
        return Err(format!(
            "{vip} is on {ifname}, which is not Ethernet (type {hatype}): no ARP to ask; waiting for the old record's lease"
        ));
    }
    let link_local = link_locals
        .into_iter()
        .find(|(n, _)| *n == ifname || *n == base)
        .map(|(_, a)| a);
    Ok(Link {
        name: base,
        index,
        mac,
        link_local,
    })
}

fn format_mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An ARP probe for `vip` from `mac` (RFC 5227: sender protocol address zero).
fn probe_packet(mac: [u8; 6], vip: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&mac);
    // sender IP 0.0.0.0, target MAC zero
    p[24..28].copy_from_slice(&vip.octets());
    p
}

/// A gratuitous ARP for `vip` from `mac` (RFC 5227's announcement: a request with the VIP
/// as both sender and target address), which updates every neighbour cache that has it.
fn announcement_packet(mac: [u8; 6], vip: Ipv4Addr) -> [u8; 28] {
    let mut p = probe_packet(mac, vip);
    p[14..18].copy_from_slice(&vip.octets());
    p
}

/// Whether an ARP packet shows another station using `vip`: a reply from it, or a
/// request it sent from that address. Returns the station's MAC.
fn answer_in(packet: &[u8], vip: Ipv4Addr, own: [u8; 6]) -> Option<[u8; 6]> {
    if packet.len() < 28 || packet[4] != 6 || packet[5] != 4 {
        return None;
    }
    let op = u16::from_be_bytes([packet[6], packet[7]]);
    let mut sha = [0u8; 6];
    sha.copy_from_slice(&packet[8..14]);
    let spa = Ipv4Addr::new(packet[14], packet[15], packet[16], packet[17]);
    ((op == 1 || op == 2) && spa == vip && sha != own).then_some(sha)
}

/// Closes the descriptor however the probe ends.
struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: closing a descriptor this struct owns.
        unsafe { libc::close(self.0) };
    }
}

/// "what on link: the OS error", for the socket calls below.
fn link_error(link: &Link, what: &str) -> String {
    format!(
        "{what} on {}: {}",
        link.name,
        std::io::Error::last_os_error()
    )
}

/// Whether an ARP socket receives the link's ARP traffic or only sends.
#[derive(Clone, Copy, PartialEq)]
enum Arp {
    Listen,
    SendOnly,
}

/// An ARP socket on the VIP's link, and the link's broadcast address to send to.
///
/// Opened with protocol 0, which receives nothing, and given ARP by `bind` when it is to
/// listen: a packet socket opened for a protocol already listens, and binding it then
/// stops and restarts that, which waits for an RCU grace period (10–30 ms measured in the
/// lab, on the takeover's critical path). A socket that only sends is never bound: the
/// destination names the link. Closing any of them waits for a grace period too, so
/// callers hand their result over first (`answered_early`).
fn arp_socket(link: &Link, mode: Arp) -> Result<(Fd, libc::sockaddr_ll), String> {
    // SAFETY: plain socket(2); the descriptor is owned by `Fd`.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(link_error(link, "ARP socket"));
    }
    let fd = Fd(fd);
    // SAFETY: an all-zero sockaddr_ll is valid; fields are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ARP.to_be();
    addr.sll_ifindex = link.index;
    if mode == Arp::Listen && !bind_to(&fd, &addr) {
        return Err(link_error(link, "bind ARP socket"));
    }
    let mut broadcast = addr;
    broadcast.sll_halen = 6;
    broadcast.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    Ok((fd, broadcast))
}

/// Hands the answer to `reply` before the socket closes (see `answered_early`).
fn arp_probe(vip: Ipv4Addr, window: Duration, reply: impl FnOnce(Result<HolderAnswer, String>)) {
    let link = match link_of(IpAddr::V4(vip)) {
        Ok(l) => l,
        Err(why) => return reply(Ok(HolderAnswer::Unknown(why))),
    };
    let (fd, to) = match arp_socket(&link, Arp::Listen) {
        Ok(s) => s,
        Err(e) => return reply(Err(e)),
    };
    let packet = probe_packet(link.mac, vip);
    let send = || {
        if send_to(&fd, &packet, &to) {
            Ok(())
        } else {
            Err(link_error(&link, "send ARP probe"))
        }
    };
    reply(
        ask(&fd, window, send, |p| {
            answer_in(p, vip, link.mac).map(|mac| format_mac(&mac))
        })
        .map_err(|what| link_error(&link, what)),
    );
}

/// Two gratuitous ARPs for `vip` on its link (two, as RFC 5227 announces, in case one is
/// lost; back to back, since the point is to beat the peers' next packet).
/// Hands the outcome to `reply` before the socket closes (see `answered_early`).
fn arp_announce(vip: Ipv4Addr, reply: impl FnOnce(Result<(), String>)) {
    let link = match link_of(IpAddr::V4(vip)) {
        Ok(l) => l,
        Err(e) => return reply(Err(e)),
    };
    let (fd, to) = match arp_socket(&link, Arp::SendOnly) {
        Ok(s) => s,
        Err(e) => return reply(Err(e)),
    };
    let packet = announcement_packet(link.mac, vip);
    let sent = (0..2).all(|_| send_to(&fd, &packet, &to));
    reply(if sent {
        Ok(())
    } else {
        Err(link_error(&link, "send gratuitous ARP"))
    });
}

/// A neighbour solicitation for `vip` from `mac` (ICMPv6 type 135; the kernel fills in the
/// checksum of a raw ICMPv6 socket).
fn solicitation(mac: [u8; 6], vip: Ipv6Addr) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = 135;
    p[8..24].copy_from_slice(&vip.octets());
    // Source link-layer address option, so the answer needs no resolution of its own.
    p[24] = 1;
    p[25] = 1;
    p[26..32].copy_from_slice(&mac);
    p
}

/// The solicited-node multicast address a node holding `vip` listens on.
fn solicited_node(vip: Ipv6Addr) -> Ipv6Addr {
    let o = vip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// Whether an ICMPv6 message is another node advertising `vip`: the advertiser's
/// link-layer address when it says, else "a neighbour".
fn advertisement_of(packet: &[u8], vip: Ipv6Addr, own: [u8; 6]) -> Option<String> {
    if packet.len() < 24 || packet[0] != 136 || packet[8..24] != vip.octets() {
        return None;
    }
    // Options: type 2 is the target link-layer address.
    let mut rest = &packet[24..];
    while rest.len() >= 8 {
        let (kind, len) = (rest[0], usize::from(rest[1]) * 8);
        if len == 0 || len > rest.len() {
            break;
        }
        if kind == 2 && len >= 8 {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&rest[2..8]);
            return (mac != own).then(|| format_mac(&mac));
        }
        rest = &rest[len..];
    }
    Some("a neighbour".into())
}

/// Binds to a socket address (`sockaddr_ll`, `sockaddr_in6`); false on failure.
fn bind_to<A>(fd: &Fd, addr: &A) -> bool {
    let len = std::mem::size_of::<A>() as libc::socklen_t;
    // SAFETY: `addr` is a socket address structure of `len` bytes.
    unsafe { libc::bind(fd.0, addr as *const A as *const libc::sockaddr, len) == 0 }
}

/// Sends `buf` to a socket address (`sockaddr_ll`, `sockaddr_in6`); false on failure.
fn send_to<A>(fd: &Fd, buf: &[u8], to: &A) -> bool {
    let len = std::mem::size_of::<A>() as libc::socklen_t;
    // SAFETY: sending a buffer of its own length to a socket address of `len` bytes.
    let n = unsafe {
        libc::sendto(
            fd.0,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            0,
            to as *const A as *const libc::sockaddr,
            len,
        )
    };
    n >= 0
}

fn setsockopt_int(fd: &Fd, level: i32, name: i32, value: i32) -> bool {
    // SAFETY: setting an int option on a valid descriptor.
    unsafe {
        libc::setsockopt(
            fd.0,
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        ) == 0
    }
}

fn sockaddr_v6(a: Ipv6Addr, scope: i32) -> libc::sockaddr_in6 {
    // SAFETY: an all-zero sockaddr_in6 is valid; fields are set below.
    let mut s: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    s.sin6_family = libc::AF_INET6 as u16;
    s.sin6_addr.s6_addr = a.octets();
    s.sin6_scope_id = scope as u32;
    s
}

fn ndp_probe(vip: Ipv6Addr, window: Duration) -> Result<HolderAnswer, String> {
    let link = match link_of(IpAddr::V6(vip)) {
        Ok(l) => l,
        Err(why) => return Ok(HolderAnswer::Unknown(why)),
    };
    let Some(link_local) = link.link_local else {
        return Ok(HolderAnswer::Unknown(format!(
            "{} has no link-local address to ask from; waiting for the old record's lease",
            link.name
        )));
    };
    let err = |what: &str| {
        format!(
            "{what} on {}: {}",
            link.name,
            std::io::Error::last_os_error()
        )
    };
    // SAFETY: plain socket(2); the descriptor is owned by `Fd`.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMPV6,
        )
    };
    if fd < 0 {
        return Err(err("ICMPv6 socket"));
    }
    let fd = Fd(fd);
    // Neighbour discovery is only believed with a hop limit of 255 (RFC 4861).
    let ok = setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, 255)
        && setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, 255)
        && setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_IF, link.index)
        && setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP, 0);
    if !ok {
        return Err(err("ICMPv6 socket options"));
    }
    // From the link-local address, not the VIP: the owner answers to where it was asked
    // from, and an address it holds itself would not be an address to answer.
    let from = sockaddr_v6(link_local, link.index);
    if !bind_to(&fd, &from) {
        return Err(err("bind ICMPv6 socket"));
    }
    let to = sockaddr_v6(solicited_node(vip), link.index);
    let packet = solicitation(link.mac, vip);
    let send = || {
        if send_to(&fd, &packet, &to) {
            Ok(())
        } else {
            Err(err("send neighbour solicitation"))
        }
    };
    ask(&fd, window, send, |p| advertisement_of(p, vip, link.mac)).map_err(err)
}

/// Sends the question three times spread over `window` (one lost frame does not make a
/// live owner look dead) and waits for an answer `answer` recognises.
fn ask(
    fd: &Fd,
    window: Duration,
    send: impl Fn() -> Result<(), String>,
    answer: impl Fn(&[u8]) -> Option<String>,
) -> Result<HolderAnswer, &'static str> {
    let start = Instant::now();
    let deadline = start + window;
    let mut sends = [Duration::ZERO, window / 3, window * 2 / 3]
        .into_iter()
        .peekable();
    let mut buf = [0u8; 512];
    loop {
        let now = Instant::now();
        while let Some(at) = sends.peek() {
            if start + *at <= now {
                if send().is_err() {
                    return Err("send probe");
                }
                sends.next();
            } else {
                break;
            }
        }
        if now >= deadline {
            return Ok(HolderAnswer::Silent);
        }
        let next_send = sends.peek().map(|at| start + *at).unwrap_or(deadline);
        let wait = next_send.min(deadline).saturating_duration_since(now);
        let mut pfd = libc::pollfd {
            fd: fd.0,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: polling one valid descriptor.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err("poll probe socket");
        }
        if ready == 0 {
            continue;
        }
        // SAFETY: reading into a buffer of its stated length.
        let n = unsafe {
            libc::recv(
                fd.0,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            continue;
        }
        if let Some(who) = answer(&buf[..n as usize]) {
            return Ok(HolderAnswer::Answered(who));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const OTHER: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn vip() -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, 100)
    }

    #[test]
    fn the_probe_asks_for_the_vip_without_claiming_it() {
        let p = probe_packet(OWN, vip());
        assert_eq!(&p[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &OWN);
        assert_eq!(
            &p[14..18],
            &[0, 0, 0, 0],
            "sender address zero: no cache changes"
        );
        assert_eq!(&p[24..28], &[192, 0, 2, 100]);
        // Our own probe coming back is no answer.
        assert_eq!(answer_in(&p, vip(), OWN), None);
    }

    #[test]
    fn the_announcement_claims_the_vip_for_this_station() {
        let mac = [2, 0, 0, 0, 0, 0x21];
        let p = announcement_packet(mac, vip());
        assert_eq!(&p[6..8], &[0, 1], "a request");
        assert_eq!(&p[8..14], &mac);
        assert_eq!(&p[14..18], &vip().octets(), "sender: the VIP");
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&p[24..28], &vip().octets(), "target: the VIP");
        // Another node's probe logic sees it as this station holding the address.
        assert_eq!(answer_in(&p, vip(), [2, 0, 0, 0, 0, 0x22]), Some(mac));
    }

    #[test]
    fn a_reply_or_a_request_from_the_vip_by_another_station_is_an_answer() {
        let mut reply = probe_packet(OTHER, vip());
        reply[6..8].copy_from_slice(&2u16.to_be_bytes());
        reply[14..18].copy_from_slice(&vip().octets());
        assert_eq!(answer_in(&reply, vip(), OWN), Some(OTHER));
        let mut request = reply;
        request[6..8].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(answer_in(&request, vip(), OWN), Some(OTHER));
        // Another address, or a truncated frame, says nothing about this VIP.
        let mut elsewhere = reply;
        elsewhere[14..18].copy_from_slice(&[192, 0, 2, 7]);
        assert_eq!(answer_in(&elsewhere, vip(), OWN), None);
        assert_eq!(answer_in(&reply[..20], vip(), OWN), None);
        assert_eq!(format_mac(&OTHER), "02:00:00:00:00:02");
    }

    fn vip6() -> Ipv6Addr {
        "2001:db8:1::100".parse().unwrap()
    }

    #[test]
    fn the_solicitation_goes_to_the_vips_solicited_node_group() {
        assert_eq!(
            solicited_node(vip6()),
            "ff02::1:ff00:100".parse::<Ipv6Addr>().unwrap()
        );
        let p = solicitation(OWN, vip6());
        assert_eq!(p[0], 135);
        assert_eq!(&p[8..24], &vip6().octets());
        assert_eq!(&p[24..26], &[1, 1]);
        assert_eq!(&p[26..32], &OWN);
    }

    #[test]
    fn an_advertisement_of_the_vip_by_another_node_is_an_answer() {
        let mut na = [0u8; 32];
        na[0] = 136;
        na[8..24].copy_from_slice(&vip6().octets());
        na[24] = 2;
        na[25] = 1;
        na[26..32].copy_from_slice(&OTHER);
        assert_eq!(
            advertisement_of(&na, vip6(), OWN).as_deref(),
            Some("02:00:00:00:00:02")
        );
        // Our own, another address, a solicitation: no answer.
        let mut own = na;
        own[26..32].copy_from_slice(&OWN);
        assert_eq!(advertisement_of(&own, vip6(), OWN), None);
        assert_eq!(
            advertisement_of(&na, "2001:db8:1::7".parse().unwrap(), OWN),
            None
        );
        let mut ns = na;
        ns[0] = 135;
        assert_eq!(advertisement_of(&ns, vip6(), OWN), None);
        // Without the option it is still someone else's answer.
        assert_eq!(
            advertisement_of(&na[..24], vip6(), OWN).as_deref(),
            Some("a neighbour")
        );
    }
}
