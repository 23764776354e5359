//! Address watcher on rtnetlink: one socket joined to the IPv4 and IPv6 address groups,
//! an initial dump on that same socket, then one notification per change. No polling.

use std::net::IpAddr;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::{Handle, MulticastGroup, new_multicast_connection};
use tokio_util::sync::CancellationToken;

use super::presence::{AddressSeen, PresenceTable};
use super::{AddrWatchError, AddressWatcher};
use crate::InputSink;
use crate::config::HostedVipConfig;
use crate::failover::Input;

#[derive(Default)]
pub struct NetlinkAddressWatcher;

#[async_trait]
impl AddressWatcher for NetlinkAddressWatcher {
    async fn run(
        &self,
        vips: Vec<HostedVipConfig>,
        sink: InputSink,
        cancel: CancellationToken,
    ) -> Result<(), AddrWatchError> {
        // The socket joins the groups when it is created, before the dump below is sent,
        // so a change racing with the dump shows up as a notification afterwards.
        let (connection, handle, messages) =
            new_multicast_connection(&[MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv6Ifaddr])
                .map_err(|e| AddrWatchError::Netlink(format!("open socket: {e}")))?;
        let watch = watch(handle, messages, PresenceTable::new(&vips), sink);
        // The connection future drives the socket; polled here rather than spawned so that
        // it lives and dies with this watcher.
        tokio::select! {
            _ = cancel.cancelled() => Ok(()),
            r = watch => r,
            _ = connection => Err(AddrWatchError::Netlink("netlink connection closed".into())),
        }
    }
}

type Messages = futures::channel::mpsc::UnboundedReceiver<(
    netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>,
    netlink_sys::SocketAddr,
)>;

async fn watch(
    handle: Handle,
    mut messages: Messages,
    mut table: PresenceTable,
    sink: InputSink,
) -> Result<(), AddrWatchError> {
    if !resync(&handle, &mut table, &sink).await? {
        return Ok(());
    }
    while let Some((message, _)) = messages.next().await {
        let input = match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(msg)) => {
                match seen(&handle, &table, &msg).await {
                    Some(s) => {
                        tracing::debug!(vip = %s.vip, ifindex = s.ifindex, usable = s.usable, "address added");
                        table.added(&s)
                    }
                    None => None,
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(msg)) => {
                match address_of(&msg) {
                    Some(vip) => {
                        tracing::debug!(%vip, ifindex = msg.header.index, "address removed");
                        table.removed(vip, msg.header.index)
                    }
                    None => None,
                }
            }
            NetlinkPayload::Overrun(_) => {
                // The kernel dropped notifications (socket buffer full): dump again.
                tracing::warn!("address notifications were lost; re-reading all addresses");
                if !resync(&handle, &mut table, &sink).await? {
                    return Ok(());
                }
                None
            }
            _ => None,
        };
        if let Some(input) = input
            && !send(&sink, input).await
        {
            return Ok(());
        }
    }
    Err(AddrWatchError::Netlink("notification stream ended".into()))
}

/// Dumps every address and reports the differences; false when the sink is gone.
async fn resync(
    handle: &Handle,
    table: &mut PresenceTable,
    sink: &InputSink,
) -> Result<bool, AddrWatchError> {
    let mut dump = Vec::new();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|e| AddrWatchError::Netlink(format!("address dump: {e}")))?
    {
        if let Some(s) = seen(handle, table, &msg).await {
            dump.push(s);
        }
    }
    for input in table.replace(&dump) {
        tracing::info!(?input, "hosted VIP state from address dump");
        if !send(sink, input).await {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn send(sink: &InputSink, input: Input) -> bool {
    sink.send(input).await.is_ok()
}

/// The local address of a message: IFA_LOCAL when present (IPv4, point-to-point), else
/// IFA_ADDRESS (IPv6).
fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(a) => return Some(*a),
            AddressAttribute::Address(a) => address = Some(*a),
            _ => {}
        }
    }
    address
}

/// IFA_FLAGS (32 bits) when the kernel sends it, else the 8 bits of the header.
fn flags_of(msg: &AddressMessage) -> AddressFlags {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits())))
}

async fn seen(handle: &Handle, table: &PresenceTable, msg: &AddressMessage) -> Option<AddressSeen> {
    let vip = address_of(msg)?;
    if !table.wants(&vip) {
        return None;
    }
    let flags = flags_of(msg);
    let ifindex = msg.header.index;
    let ifname = if table.needs_ifname(&vip) {
        link_name(handle, ifindex).await
    } else {
        None
    };
    Some(AddressSeen {
        vip,
        ifindex,
        ifname,
        usable: !flags.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed),
    })
}

async fn link_name(handle: &Handle, index: u32) -> Option<String> {
    let mut links = handle.link().get().match_index(index).execute();
    match links.try_next().await {
        Ok(Some(link)) => link.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n),
            _ => None,
        }),
        Ok(None) => None,
        Err(e) => {
            // The link may be gone already; then the address is not on a matching one.
            tracing::debug!(index, error = %e, "interface name lookup failed");
            None
        }
    }
}
