//! One keep-alive stream per lease, kept open between renewals.
//!
//! Every hosted VIP has a lease of its own, renewed every sixth to third of its TTL. Opening a new
//! keep-alive stream for each renewal (what `Client::lease_keep_alive` does) cost a node
//! with 100 VIPs 150 HTTP/2 streams a second and most of its idle CPU. A renewal now sends
//! one request on the lease's open stream and reads one answer; a stream that fails, ends
//! or goes unanswered is dropped and the next renewal opens a new one (on whichever
//! member the store talks to by then).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};

/// An open stream and the member it goes to.
struct Open {
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
    member: usize,
}

type Slot = Arc<tokio::sync::Mutex<Option<Open>>>;

#[derive(Default)]
pub(super) struct KeepAlives {
    streams: Mutex<HashMap<i64, Slot>>,
}

impl KeepAlives {
    fn slot(&self, lease: i64) -> Slot {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.entry(lease).or_default().clone()
    }

    /// Closes the lease's stream: the lease was given up or is gone.
    pub(super) fn forget(&self, lease: i64) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.remove(&lease);
    }

    /// Renews `lease` once, within `timeout`, over its open stream to `member` or a new one.
    pub(super) async fn renew(
        &self,
        client: &Client,
        member: usize,
        lease: i64,
        timeout: Duration,
    ) -> Renewal {
        let slot = self.slot(lease);
        let mut open = slot.lock().await;
        let r =
            match tokio::time::timeout(timeout, renew_on(&mut open, client, member, lease)).await {
                Ok(r) => r,
                Err(_) => Renewal::Unanswered,
            };
        if !matches!(r, Renewal::Renewed) {
            // A late answer must not pass for the next renewal's.
            *open = None;
        }
        r
    }
}

/// How one renewal went.
#[derive(Debug)]
pub(super) enum Renewal {
    Renewed,
    /// etcd answered that the lease is gone (expired or revoked).
    LeaseGone,
    Unanswered,
    Failed(etcd_client::Error),
}

async fn renew_on(open: &mut Option<Open>, client: &Client, member: usize, lease: i64) -> Renewal {
    if let Some(o) = open.as_mut().filter(|o| o.member == member) {
        if let Err(e) = o.keeper.keep_alive().await {
            return Renewal::Failed(e);
        }
        return match o.answers.message().await {
            Ok(Some(a)) if a.ttl() > 0 => Renewal::Renewed,
            Ok(Some(_)) => Renewal::LeaseGone,
            Ok(None) => Renewal::Failed(etcd_client::Error::WatchError(
                "keep-alive stream ended".into(),
            )),
            Err(e) => Renewal::Failed(e),
        };
    }
    // Opening the stream sends the first request and reads its answer: a renewal. The
    // client answers a lease etcd no longer has with LeaseKeepAliveError.
    let mut c = client.clone();
    match c.lease_keep_alive(lease).await {
        Ok((keeper, answers)) => {
            *open = Some(Open {
                keeper,
                answers,
                member,
            });
            Renewal::Renewed
        }
        Err(etcd_client::Error::LeaseKeepAliveError(_)) => Renewal::LeaseGone,
        Err(e) => Renewal::Failed(e),
    }
}
