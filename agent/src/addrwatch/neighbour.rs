//! Forgetting a peer VIP's link-layer address, so the next packet asks who holds it now.
//!
//! A front-end on the VIP's link keeps the old holder's MAC in its neighbour cache after
//! a move. The new holder announces itself (gratuitous ARP from the cluster manager and
//! from the agent), but a front-end whose IKE_SA_INIT leaves before the announcement
//! arrives sends it to the old holder, where it is lost, and waits a whole retransmission
//! for nothing (about 1 s beside Pacemaker, whose IPaddr2 announces in the background).
//! Deleting the cached entry before an initiation costs one ARP exchange or neighbour
//! solicitation and always reaches whoever holds the address. Entries the operator made
//! permanent are left alone, and a VIP behind a router has no entry of its own.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};

use crate::model::Vip;

/// Deletes this node's neighbour entries for `vip` (every interface); returns how many.
pub async fn forget(vip: Vip) -> Result<u32, String> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("open rtnetlink socket: {e}"))?;
    let task = tokio::spawn(conn);
    let result = async {
        let entries: Vec<NeighbourMessage> = handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| format!("dump neighbours: {e}"))?;
        let mut forgotten = 0;
        for m in entries.into_iter().filter(|m| is_forgettable(m, vip)) {
            handle
                .neighbours()
                .del(m)
                .execute()
                .await
                .map_err(|e| format!("delete the neighbour entry of {vip}: {e}"))?;
            forgotten += 1;
        }
        Ok(forgotten)
    }
    .await;
    task.abort();
    result
}

fn is_forgettable(m: &NeighbourMessage, vip: Vip) -> bool {
    let fixed = matches!(
        m.header.state,
        NeighbourState::Permanent | NeighbourState::Noarp
    );
    !fixed
        && m.attributes.iter().any(|a| match (a, vip) {
            (NeighbourAttribute::Destination(NeighbourAddress::Inet(a)), IpAddr::V4(v)) => *a == v,
            (NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)), IpAddr::V6(v)) => *a == v,
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dst: &str, state: NeighbourState) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.state = state;
        let a = match dst.parse::<IpAddr>().unwrap() {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        };
        m.attributes.push(NeighbourAttribute::Destination(a));
        m
    }

    #[test]
    fn only_the_vips_learnt_entries_are_forgotten() {
        let vip: Vip = "192.0.2.100".parse().unwrap();
        assert!(is_forgettable(
            &entry("192.0.2.100", NeighbourState::Reachable),
            vip
        ));
        assert!(is_forgettable(
            &entry("192.0.2.100", NeighbourState::Stale),
            vip
        ));
        assert!(!is_forgettable(
            &entry("192.0.2.101", NeighbourState::Reachable),
            vip
        ));
        assert!(!is_forgettable(
            &entry("192.0.2.100", NeighbourState::Permanent),
            vip
        ));
        let v6: Vip = "2001:db8:1::100".parse().unwrap();
        assert!(is_forgettable(
            &entry("2001:db8:1::100", NeighbourState::Delay),
            v6
        ));
        assert!(!is_forgettable(
            &entry("2001:db8:1::100", NeighbourState::Noarp),
            v6
        ));
    }
}
