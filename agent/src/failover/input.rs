//! What the failover core is told (inputs) and what it asks for (actions and notices).

use std::time::Duration;

use serde::Serialize;

use crate::model::{IkeId, Mode, TrafficCounters, Vip, VipOwner, VipRole};

/// Everything that can happen to the agent, as the failover core sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A hosted VIP was added to one of this node's interfaces (or was there at start-up).
    VipAppeared(Vip),
    /// A hosted VIP was removed from this node.
    VipDisappeared(Vip),
    /// The full set of owner records, after every (re)connection to the store.
    OwnerSnapshot(Vec<(Vip, Option<VipOwner>)>),
    /// One VIP's owner record changed; `None` means the record was withdrawn or expired.
    OwnerChanged {
        vip: Vip,
        owner: Option<VipOwner>,
    },
    /// Which nodes hold each VIP's address, as they mark it in the store, after every
    /// (re)connection, each with how many front-ends it says it serves for it.
    HoldersSnapshot(Vec<(Vip, String, u32)>),
    /// A node started or stopped holding a VIP's address (or its count of front-ends
    /// changed).
    HolderChanged {
        vip: Vip,
        node: String,
        holds: bool,
        followers: u32,
    },
    StoreHealth {
        healthy: bool,
        detail: String,
    },
    /// The keying daemon answers; `established` is its current inventory of SAs.
    KeyingUp {
        established: Vec<SaRef>,
    },
    KeyingDown {
        detail: String,
    },
    SaUp(SaRef),
    SaDown {
        sa: SaRef,
        reason: String,
    },
    /// Summed counters of the CHILD_SAs toward a peer VIP.
    CountersSampled {
        vip: Vip,
        counters: TrafficCounters,
    },
    /// The reconnect pacer handed an initiation to the keying daemon (it waited its turn).
    /// The core has nothing to decide on it; the move timeline marks it.
    InitiateStarted {
        vip: Vip,
        attempt: u32,
    },
    InitiateFinished {
        vip: Vip,
        attempt: u32,
        result: Result<(), String>,
    },
    TimerFired(Timer),
    SetMode {
        mode: Mode,
        idle_timeout: Option<Duration>,
    },
    Drain(Vip),
    /// Recording this node as a hosted VIP's owner failed (the store did not answer).
    PublishFailed(Vip),
    /// What the VIP's link said when asked whether the owner of record at `epoch` still
    /// holds the address (`Action::ProbeHolder`).
    HolderProbed {
        vip: Vip,
        epoch: u64,
        answer: HolderAnswer,
    },
    /// Whether anything answered IKE at a peer VIP (`Action::ProbeIke`).
    IkeProbed {
        vip: Vip,
        answered: bool,
    },
}

/// What the link said about a VIP another node is recorded as owning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderAnswer {
    /// Nobody else answered for the address within the window.
    Silent,
    /// Another station answered for it: its link-layer address.
    Answered(String),
    /// The link cannot tell (loopback, not Ethernet, IPv6, an error): why.
    Unknown(String),
}

/// An SA the keying daemon (or the kernel) reported, mapped to its VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaRef {
    pub vip: Vip,
    pub role: VipRole,
    pub ike_id: IkeId,
}

/// Timers the core asks the runtime to start; a fired timer whose generation no longer
/// matches the VIP's state is ignored, so the core never has to cancel one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Try to initiate again after a failed attempt.
    Retry { vip: Vip, generation: u64 },
    /// The owner record vanished; stop waiting for a new one and initiate anyway.
    OwnerWait { vip: Vip, generation: u64 },
    /// A renegotiation cycle gave up; start a new one.
    Cooldown { vip: Vip, generation: u64 },
    /// A drained VIP is still here; publish ownership again.
    DrainHold { vip: Vip, generation: u64 },
    /// Another node's record has stood while the VIP is here: is it a split brain yet?
    SplitBrainGrace { vip: Vip },
    /// A failed publish: try again if the VIP is still here and still unrecorded.
    Republish { vip: Vip, generation: u64 },
    /// A peer VIP's record vanished while our SA stood, and no owner came back: the SA's
    /// peer is taken as gone.
    Vacant { vip: Vip, generation: u64 },
}

/// What the core wants done. The runtime performs each action and reports results back
/// as inputs (e.g. `InitiateFinished`).
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Record this node as the VIP's owner (the store picks the next epoch).
    PublishOwnership {
        vip: Vip,
    },
    WithdrawOwnership {
        vip: Vip,
    },
    /// Mark this node's record as draining: front-ends wait for the next owner.
    MarkDraining {
        vip: Vip,
    },
    /// Delete every SA of the VIP with an IKE DELETE to each peer.
    DeleteSas {
        vip: Vip,
        role: VipRole,
    },
    /// Delete one hosted IKE_SA that came up while this node could not accept SAs for the
    /// VIP. Only that one: a delete of every SA, run after this node became the owner of
    /// record, would take down the SAs its front-ends built since (a crash's stale
    /// attempts reach the new owner in that window, and the 20-front-end bench lost every
    /// SA of a VIP to such deletes, twice, just after recovering).
    RefuseSa {
        vip: Vip,
        ike_id: IkeId,
    },
    /// Remove the IKE_SAs toward a peer VIP at once, without waiting for the dead peer.
    DropStaleSas {
        vip: Vip,
    },
    /// The same after the VIP went silent and answers again (a new holder): also the
    /// attempts the former holder answered, which a `DropStaleSas` spares. Their IKE_AUTH
    /// goes to an address that holder no longer has, so they can never complete, and
    /// followed through charon's retransmission they held up the next attempt for 4.5 s.
    DropSilencedSas {
        vip: Vip,
    },
    /// Start a fresh IKE_SA (IKE_SA_INIT) and its CHILD_SA toward the VIP. `crowd`: how
    /// many initiations are expected to reach the VIP's owner at the same time: the
    /// front-ends moving with it, each with as many at once as its pacer allows (the
    /// pacer spreads first attempts over a window that grows with it).
    Initiate {
        vip: Vip,
        attempt: u32,
        crowd: u32,
        /// The attempt follows news of a new holder (a new owner record, or the VIP's IKE
        /// port answering after silence): failures before it were about the old one, so
        /// the pacer's pause after them does not apply.
        news: bool,
    },
    StartTimer {
        timer: Timer,
        after: Duration,
    },
    /// Answer IKE for a hosted VIP (this node is its owner) or stop answering it.
    AcceptSas {
        vip: Vip,
        accept: bool,
    },
    /// Ask the VIP's link whether another station still holds the address, for up to
    /// `window` (the VIP is here while `epoch`'s owner of record is another node).
    ProbeHolder {
        vip: Vip,
        epoch: u64,
        window: Duration,
    },
    /// After `after`, send one IKE_SA_INIT probe to a peer VIP and wait up to `window`
    /// for any answer (`keying::ike_probe`); reported as `Input::IkeProbed`.
    ProbeIke {
        vip: Vip,
        after: Duration,
        window: Duration,
    },
    /// Replace the owner record `from` (another node's, whose address nobody answers for
    /// any more) with this node's at a new epoch, if it still stands unchanged.
    TakeOver {
        vip: Vip,
        from: VipOwner,
    },
    Notify(Notice),
}

impl Action {
    /// Whether this drops `vip`'s IKE_SAs, either way.
    pub fn drops(&self, vip: Vip) -> bool {
        matches!(self, Action::DropStaleSas { vip: v } | Action::DropSilencedSas { vip: v } if *v == vip)
    }

    /// The VIP an action is about (none for node-wide notices).
    pub fn vip(&self) -> Option<Vip> {
        match self {
            Action::PublishOwnership { vip }
            | Action::WithdrawOwnership { vip }
            | Action::MarkDraining { vip }
            | Action::DeleteSas { vip, .. }
            | Action::RefuseSa { vip, .. }
            | Action::DropStaleSas { vip }
            | Action::DropSilencedSas { vip }
            | Action::Initiate { vip, .. }
            | Action::AcceptSas { vip, .. }
            | Action::ProbeHolder { vip, .. }
            | Action::ProbeIke { vip, .. }
            | Action::TakeOver { vip, .. } => Some(*vip),
            Action::StartTimer { .. } => None,
            Action::Notify(n) => n.vip,
        }
    }
}

/// A failover event for logs, metrics and the `WatchEvents` stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notice {
    pub kind: NoticeKind,
    pub vip: Option<Vip>,
    pub owner: Option<String>,
    pub epoch: u64,
    pub duration: Option<Duration>,
    pub detail: String,
}

impl Notice {
    pub fn new(kind: NoticeKind, vip: Option<Vip>) -> Self {
        Notice {
            kind,
            vip,
            owner: None,
            epoch: 0,
            duration: None,
            detail: String::new(),
        }
    }
    pub fn owner(mut self, owner: Option<&VipOwner>) -> Self {
        if let Some(o) = owner {
            self.owner = Some(o.node.clone());
            self.epoch = o.epoch;
        }
        self
    }
    pub fn epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration = Some(d);
        self
    }
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = d.into();
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoticeKind {
    VipAcquired,
    VipReleased,
    OwnerChanged,
    SaUp,
    SaDeleted,
    RenegotiationStarted,
    RenegotiationFinished,
    RenegotiationFailed,
    IdlePeerDetected,
    FailSecureEngaged,
    FailSecureReleased,
    KeyingDown,
    KeyingUp,
    StoreDown,
    StoreUp,
    ModeChanged,
    Drained,
    StaleRecordIgnored,
    ActionFailed,
    /// The VIP is on this node while the store records another owner (or two nodes claim it).
    SplitBrain,
    SplitBrainCleared,
    /// An SA for a hosted VIP came up on a node that is not its owner of record.
    SaRefused,
    /// An action decided under an epoch that has since been superseded was not carried out.
    ActionFenced,
    /// A stored policy is in force for the VIP.
    PolicyApplied,
    /// A stored policy was not applied (invalid, not understood, conflicting, missing).
    PolicyRefused,
    /// The VIP is here, its owner of record is another node, and nobody answers for the
    /// address on the link any more: this node takes the record over at a new epoch.
    Takeover,
    /// No takeover: the old owner still answers for the address, or the link cannot tell.
    TakeoverRefused,
    /// Without an owner record to go by, a peer VIP's IKE port answered again after
    /// silence (a new holder): the next attempt goes at once.
    PeerAnswers,
}

impl NoticeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::VipAcquired => "vip-acquired",
            NoticeKind::VipReleased => "vip-released",
            NoticeKind::OwnerChanged => "owner-changed",
            NoticeKind::SaUp => "sa-up",
            NoticeKind::SaDeleted => "sa-deleted",
            NoticeKind::RenegotiationStarted => "renegotiation-started",
            NoticeKind::RenegotiationFinished => "renegotiation-finished",
            NoticeKind::RenegotiationFailed => "renegotiation-failed",
            NoticeKind::IdlePeerDetected => "idle-peer-detected",
            NoticeKind::FailSecureEngaged => "fail-secure-engaged",
            NoticeKind::FailSecureReleased => "fail-secure-released",
            NoticeKind::KeyingDown => "keying-down",
            NoticeKind::KeyingUp => "keying-up",
            NoticeKind::StoreDown => "store-down",
            NoticeKind::StoreUp => "store-up",
            NoticeKind::ModeChanged => "mode-changed",
            NoticeKind::Drained => "drained",
            NoticeKind::StaleRecordIgnored => "stale-record-ignored",
            NoticeKind::ActionFailed => "action-failed",
            NoticeKind::SplitBrain => "split-brain",
            NoticeKind::SplitBrainCleared => "split-brain-cleared",
            NoticeKind::SaRefused => "sa-refused",
            NoticeKind::ActionFenced => "action-fenced",
            NoticeKind::PolicyApplied => "policy-applied",
            NoticeKind::PolicyRefused => "policy-refused",
            NoticeKind::Takeover => "takeover",
            NoticeKind::TakeoverRefused => "takeover-refused",
            NoticeKind::PeerAnswers => "peer-answers",
        }
    }
}
