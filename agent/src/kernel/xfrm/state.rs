//! XFRM states (SAs) as the kernel holds them, with their counters, mapped to VIPs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use netlink_packet_xfrm::{XfrmAttrs, state::ModifyMessage};

use super::netlink::ip_of;
use crate::config::Config;
use crate::model::{TrafficCounters, Vip, VipRole};

/// One kernel SA with its lifetime counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSa {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPsec protocol number (50 = ESP, 51 = AH, 108 = IPComp).
    pub proto: u8,
    pub spi: u32,
    pub reqid: u32,
    /// 0 = transport, 1 = tunnel.
    pub mode: u8,
    /// XFRM mark (value, mask); needed to address the state for deletion.
    pub mark: Option<(u32, u32)>,
    pub bytes: u64,
    pub packets: u64,
    /// When the SA was added (seconds since the Unix epoch).
    pub added_at: u64,
    /// When the SA last carried a packet (seconds since the Unix epoch), if ever.
    pub last_used: Option<u64>,
}

impl KernelSa {
    pub fn from_dump(msg: &ModifyMessage) -> Option<KernelSa> {
        let info = &msg.user_sa_info;
        let mark = msg.nlas.iter().find_map(|a| match a {
            XfrmAttrs::Mark(m) => Some((m.value, m.mask)),
            _ => None,
        });
        Some(KernelSa {
            src: ip_of(&info.saddr, info.family)?,
            dst: ip_of(&info.id.daddr, info.family)?,
            proto: info.id.proto,
            spi: info.id.spi,
            reqid: info.reqid,
            mode: info.mode,
            mark,
            bytes: info.lifetime_cur.bytes,
            packets: info.lifetime_cur.packets,
            added_at: info.lifetime_cur.add_time,
            last_used: (info.lifetime_cur.use_time != 0).then_some(info.lifetime_cur.use_time),
        })
    }
}

/// Which way an SA carries traffic, seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaDirection {
    Outbound,
    Inbound,
}

/// A kernel SA that belongs to one of the configured VIPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipSa {
    pub vip: Vip,
    pub role: VipRole,
    pub direction: SaDirection,
    pub sa: KernelSa,
}

/// The configured VIPs, to tell which SAs belong to which VIP.
#[derive(Debug, Clone, Default)]
pub struct VipMap {
    pub hosted: BTreeSet<Vip>,
    pub peer: BTreeSet<Vip>,
}

impl VipMap {
    pub fn from_config(config: &Config) -> VipMap {
        VipMap {
            hosted: config.hosted_vips.iter().map(|v| v.address).collect(),
            peer: config.peer_vips.iter().map(|v| v.address).collect(),
        }
    }

    /// Hosted VIPs are the local end (outbound SAs leave from them), peer VIPs the remote
    /// end (outbound SAs go to them); the reverse SA of each pair is the inbound one.
    pub fn classify(&self, src: IpAddr, dst: IpAddr) -> Option<(Vip, VipRole, SaDirection)> {
        if self.hosted.contains(&src) {
            Some((src, VipRole::Hosted, SaDirection::Outbound))
        } else if self.hosted.contains(&dst) {
            Some((dst, VipRole::Hosted, SaDirection::Inbound))
        } else if self.peer.contains(&dst) {
            Some((dst, VipRole::Peer, SaDirection::Outbound))
        } else if self.peer.contains(&src) {
            Some((src, VipRole::Peer, SaDirection::Inbound))
        } else {
            None
        }
    }

    pub fn map(&self, sas: Vec<KernelSa>) -> Vec<VipSa> {
        sas.into_iter()
            .filter_map(|sa| {
                let (vip, role, direction) = self.classify(sa.src, sa.dst)?;
                Some(VipSa {
                    vip,
                    role,
                    direction,
                    sa,
                })
            })
            .collect()
    }
}

/// Sums the counters of each VIP's SAs, split by direction.
pub fn counters_by_vip(sas: &[VipSa]) -> BTreeMap<Vip, TrafficCounters> {
    let mut out: BTreeMap<Vip, TrafficCounters> = BTreeMap::new();
    for s in sas {
        let c = out.entry(s.vip).or_default();
        match s.direction {
            SaDirection::Outbound => {
                c.bytes_out += s.sa.bytes;
                c.packets_out += s.sa.packets;
            }
            SaDirection::Inbound => {
                c.bytes_in += s.sa.bytes;
                c.packets_in += s.sa.packets;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(src: &str, dst: &str, bytes: u64) -> KernelSa {
        KernelSa {
            src: ip(src),
            dst: ip(dst),
            proto: 50,
            spi: 1,
            reqid: 1,
            mode: 0,
            mark: None,
            bytes,
            packets: 1,
            added_at: 0,
            last_used: None,
        }
    }

    #[test]
    fn maps_sas_to_hosted_and_peer_vips() {
        let map = VipMap {
            hosted: [ip("192.0.2.10")].into(),
            peer: [ip("192.0.2.100")].into(),
        };
        let sas = map.map(vec![
            sa("192.0.2.1", "192.0.2.100", 100),
            sa("192.0.2.100", "192.0.2.1", 40),
            sa("192.0.2.10", "192.0.2.1", 7),
            sa("192.0.2.1", "192.0.2.2", 5),
        ]);
        assert_eq!(sas.len(), 3);
        assert_eq!(sas[0].role, VipRole::Peer);
        assert_eq!(sas[2].role, VipRole::Hosted);
        let c = counters_by_vip(&sas);
        let peer = c[&ip("192.0.2.100")];
        assert_eq!((peer.bytes_out, peer.bytes_in), (100, 40));
        assert_eq!(c[&ip("192.0.2.10")].bytes_out, 7);
    }
}

#[cfg(test)]
mod ipv6_tests {
    use netlink_packet_xfrm::{AF_INET6, Address};

    use super::*;

    #[test]
    fn an_ipv6_state_from_a_dump_maps_to_its_vip() {
        let src: IpAddr = "2001:db8:1::11".parse().unwrap();
        let dst: IpAddr = "2001:db8:1::100".parse().unwrap();
        let mut msg = ModifyMessage::default();
        msg.user_sa_info.family = AF_INET6;
        msg.user_sa_info.saddr = Address::from_ip(&src);
        msg.user_sa_info.id.daddr = Address::from_ip(&dst);
        msg.user_sa_info.id.proto = 50;
        msg.user_sa_info.id.spi = 0xc0ffee;
        msg.user_sa_info.lifetime_cur.bytes = 1500;
        let sa = KernelSa::from_dump(&msg).unwrap();
        assert_eq!((sa.src, sa.dst), (src, dst));
        let map = VipMap {
            hosted: BTreeSet::new(),
            peer: [dst].into(),
        };
        let mapped = map.map(vec![sa.clone()]);
        assert_eq!(mapped.len(), 1);
        assert_eq!(mapped[0].direction, SaDirection::Outbound);
        assert_eq!(counters_by_vip(&mapped)[&dst].bytes_out, 1500);
        // The same 16 bytes read as IPv4 would be another address: the family decides.
        msg.user_sa_info.family = 0;
        assert_eq!(KernelSa::from_dump(&msg), None);
    }
}
