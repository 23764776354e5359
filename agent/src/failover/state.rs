//! What the core knows of each VIP: a hosted VIP's presence, record and guard; a peer
//! VIP's owner, SAs and the renegotiation under way.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::{IdleDetector, Ownership};
use crate::model::{IkeId, VipOwner};

/// A VIP this node may host.
#[derive(Debug, Clone, Default)]
pub struct HostedVip {
    /// The VIP has answers to keep out of clear text (its `protect` flows).
    pub protected: bool,
    pub present: bool,
    pub owner: Option<VipOwner>,
    /// Highest epoch seen; kept after the record is withdrawn.
    pub epoch: u64,
    pub draining: bool,
    pub sas: BTreeSet<IkeId>,
    /// SAs that came up while the VIP was here with no record at all and this node was
    /// writing its own: kept until the record says whose the VIP is (this node's: they
    /// join `sas`; another node's, or the VIP gone: each is refused).
    pub awaiting_record: BTreeSet<IkeId>,
    /// What the split-brain guard concluded last.
    pub ownership: Ownership,
    /// The runtime was told to accept SAs for the VIP.
    pub accepting: bool,
    /// Since when another node's record stands while the VIP is here.
    pub conflict_since: Option<Instant>,
    /// That conflict outlasted the grace and was reported.
    pub split_brain: bool,
    /// Other nodes that mark the VIP's address as theirs in the store.
    pub also_held_by: BTreeSet<String>,
    /// The VIP arrived while the store was unreachable (a takeover the store cannot
    /// confirm yet), as opposed to being here already when the store went away.
    pub arrived_in_outage: bool,
    /// The link was asked about the holder of record at (generation, epoch): once each.
    pub(super) probed: Option<(u64, u64)>,
    pub(super) generation: u64,
}

/// One SA toward a peer VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSa {
    pub since: Instant,
    /// Owner epoch when the SA came up; 0 when the owner was unknown then.
    pub epoch: u64,
    /// Seen coming up (not found established when the daemon connected): `since` is its
    /// real age.
    pub(super) seen_up: bool,
}

/// A running attempt to bring protection toward a peer VIP back.
#[derive(Debug, Clone)]
pub struct Renegotiation {
    pub started: Instant,
    pub reason: String,
    pub attempts: u32,
    pub in_flight: bool,
    pub owner_wait: OwnerWait,
    pub waiting_for_keying: bool,
    /// Something worth an immediate new attempt happened while one was in flight.
    pub(super) retry_now: bool,
    /// When the attempt under way (or the last one) started.
    pub(super) attempt_started: Instant,
    /// The next attempt follows news of a new holder.
    pub(super) news: bool,
}

/// The IKE port probe beside a renegotiation that has no owner record to go by, and for a
/// probation after it (`failover::ike_probing`).
#[derive(Debug, Clone, Default)]
pub struct IkeProbing {
    /// A probe was asked for and has not reported yet.
    pub(super) asked: bool,
    /// When the VIP last stayed silent; None once it answered.
    pub(super) silent_at: Option<Instant>,
    /// Answers in a row. The next probe waits longer after each: a live responder is not
    /// asked ten times a second by every front-end while their attempts run.
    pub(super) answers: u32,
}

/// Whether a renegotiation holds back for a new owner record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerWait {
    NotYet,
    Waiting,
    /// Waited `owner_wait` in vain; initiate whoever answers.
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverOutcome {
    Recovered,
    Running,
    GaveUp,
}

impl FailoverOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverOutcome::Recovered => "recovered",
            FailoverOutcome::Running => "running",
            FailoverOutcome::GaveUp => "gave-up",
        }
    }
}

#[derive(Debug, Clone)]
pub struct FailoverSummary {
    pub started: Instant,
    pub duration: Option<Duration>,
    pub reason: String,
    pub outcome: FailoverOutcome,
    pub attempts: u32,
}

/// A VIP this node talks to.
#[derive(Debug, Clone)]
pub struct PeerVip {
    /// The VIP has flows to block while the keying daemon is down.
    pub protected: bool,
    pub owner: Option<VipOwner>,
    pub epoch: u64,
    /// The first owner snapshot has been seen.
    pub(super) synced: bool,
    pub sas: BTreeMap<IkeId, PeerSa>,
    pub idle: IdleDetector,
    pub renegotiation: Option<Renegotiation>,
    pub last_failover: Option<FailoverSummary>,
    pub(super) generation: u64,
    /// Counts the times the owner record vanished (for `Timer::Vacant`).
    pub(super) vacancies: u64,
    pub(super) probing: IkeProbing,
    /// A store-less renegotiation ended this recently: the SA it brought may be with a
    /// holder that is about to leave, so the probe goes on until then.
    pub(super) probation_until: Option<Instant>,
    /// An attempt of a renegotiation that already ended (its SA came up first) has not
    /// reported yet: the next renegotiation numbers its attempts after it, so that late
    /// result cannot pass for one of its own.
    pub(super) late_attempt: Option<u32>,
    /// SAs in a row that the peer deleted right after they came up (a responder refusing
    /// them: a draining or not-yet-recorded owner). The next renegotiation waits the retry
    /// backoff for this many failures first, so a refusing responder is not sent a fresh
    /// IKE_SA every few milliseconds.
    pub(super) refused: u32,
    /// When the last of them was.
    pub(super) refused_at: Option<Instant>,
}

impl PeerVip {
    pub(super) fn new(protected: bool) -> Self {
        PeerVip {
            protected,
            owner: None,
            epoch: 0,
            synced: false,
            sas: BTreeMap::new(),
            idle: IdleDetector::default(),
            renegotiation: None,
            last_failover: None,
            generation: 0,
            vacancies: 0,
            probing: IkeProbing::default(),
            probation_until: None,
            late_attempt: None,
            refused: 0,
            refused_at: None,
        }
    }

    pub fn established_since(&self) -> Option<Instant> {
        self.sas.values().map(|s| s.since).min()
    }
}
