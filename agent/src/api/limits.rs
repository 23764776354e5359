//! Every limit the API puts on its callers, in one place.
//!
//! Sizes of request fields are refused with `INVALID_ARGUMENT`, the number of open streams
//! with `RESOURCE_EXHAUSTED`; each message names the limit (by the constant's name in lower
//! case, as the README lists them), its value and what the caller sent. The transport
//! limits below them (message size, HTTP/2 streams per connection) are backstops for
//! clients that never reach the field checks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::Status;

/// A VIP argument: the longest IPv6 text form with brackets is 47 characters.
pub const MAX_VIP_LEN: usize = 64;
/// A node name (`Drill.to_node`): a DNS name is at most 253 characters.
pub const MAX_NODE_NAME_LEN: usize = 253;
/// A service name asked of `grpc.health.v1.Health`.
pub const MAX_HEALTH_SERVICE_LEN: usize = 128;
/// A log filter (`SetLogLevel.filter`): a long per-module filter stays far below this.
pub const MAX_LOG_FILTER_LEN: usize = 4096;
/// A policy document (`ApplyPolicy.document`), TOML or JSON; the store keeps it whole.
pub const MAX_POLICY_DOCUMENT_LEN: usize = 256 * 1024;
/// Any request message, decoded: above the largest field limit, so that a field's own
/// limit is what a caller meets first (tonic refuses a larger message with OUT_OF_RANGE).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// HTTP/2 streams one connection may have open at once (h2's SETTINGS): grpc clients queue
/// calls above it once they have read the server's settings, but calls opened in a burst
/// on a fresh connection before that are refused (`vipsec drain` keeps below it).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Open `WatchEvents` and `grpc.health.v1.Health/Watch` streams of one client (one process
/// on the Unix socket, one address over TCP).
pub const MAX_SUBSCRIBERS_PER_CLIENT: usize = 8;
/// Open subscriber streams of all clients together.
pub const MAX_SUBSCRIBERS: usize = 64;

/// Refuses a string field longer than `max` bytes.
pub fn check_len(field: &str, value: &str, limit: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes, above the limit {limit} = {max}",
            value.len()
        )));
    }
    Ok(())
}

/// Who a stream counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A process on the Unix socket (its pid, from the socket's peer credentials).
    Process(i32),
    /// A TCP peer's address.
    Address(std::net::IpAddr),
    /// A peer the transport could not name: all such share one count.
    Unknown,
}

impl ClientKey {
    pub fn of<T>(req: &tonic::Request<T>) -> ClientKey {
        if let Some(info) = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            && let Some(pid) = info.peer_cred.and_then(|c| c.pid())
        {
            return ClientKey::Process(pid);
        }
        match req.remote_addr() {
            Some(addr) => ClientKey::Address(addr.ip()),
            None => ClientKey::Unknown,
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Process(pid) => write!(f, "process {pid}"),
            ClientKey::Address(ip) => write!(f, "{ip}"),
            ClientKey::Unknown => write!(f, "an unnamed peer"),
        }
    }
}

/// Counts the open subscriber streams, per client and in all.
#[derive(Clone, Default)]
pub struct Subscribers {
    open: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

/// One open subscriber stream; dropping it (the stream ends or the client goes) frees it.
pub struct SubscriberSlot {
    open: Arc<Mutex<HashMap<ClientKey, usize>>>,
    key: ClientKey,
}

impl Subscribers {
    pub fn acquire(&self, key: ClientKey) -> Result<SubscriberSlot, Status> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = open.values().sum();
        if total >= MAX_SUBSCRIBERS {
            return Err(Status::resource_exhausted(format!(
                "{total} subscriber streams are open: the limit max_subscribers = {MAX_SUBSCRIBERS} is reached"
            )));
        }
        let mine = open.entry(key.clone()).or_default();
        if *mine >= MAX_SUBSCRIBERS_PER_CLIENT {
            return Err(Status::resource_exhausted(format!(
                "{key} has {mine} subscriber streams open: the limit max_subscribers_per_client = {MAX_SUBSCRIBERS_PER_CLIENT} is reached"
            )));
        }
        *mine += 1;
        Ok(SubscriberSlot {
            open: self.open.clone(),
            key,
        })
    }

    #[cfg(test)]
    fn total(&self) -> usize {
        self.open.lock().unwrap().values().sum()
    }
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_over_its_limit_is_refused_naming_the_limit_and_the_size() {
        assert!(check_len("filter", &"a".repeat(10), "max_log_filter_len", 10).is_ok());
        let e = check_len("filter", &"a".repeat(11), "max_log_filter_len", 10).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            e.message(),
            "filter is 11 bytes, above the limit max_log_filter_len = 10"
        );
    }

    #[test]
    fn subscribers_are_limited_per_client_and_in_all_and_freed_on_drop() {
        let subs = Subscribers::default();
        let a = ClientKey::Process(1);
        let mut held: Vec<_> = (0..MAX_SUBSCRIBERS_PER_CLIENT)
            .map(|_| subs.acquire(a.clone()).unwrap())
            .collect();
        let e = subs.acquire(a.clone()).err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("max_subscribers_per_client = 8")
                && e.message().contains("process 1"),
            "{}",
            e.message()
        );
        // Another client is not held back by the first one's streams.
        held.push(subs.acquire(ClientKey::Process(2)).unwrap());
        held.truncate(MAX_SUBSCRIBERS_PER_CLIENT - 1);
        assert!(subs.acquire(a.clone()).is_ok(), "a dropped slot is freed");
        drop(held);
        assert_eq!(subs.total(), 0);

        // The total across clients.
        let held: Vec<_> = (0..MAX_SUBSCRIBERS)
            .map(|i| subs.acquire(ClientKey::Process(i as i32)).unwrap())
            .collect();
        let e = subs.acquire(ClientKey::Unknown).err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("max_subscribers = 64"),
            "{}",
            e.message()
        );
        drop(held);
        assert_eq!(subs.total(), 0);
    }
}
