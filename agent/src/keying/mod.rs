//! Keying daemon: lists, deletes, drops and initiates SAs.
//!
//! One trait, one file per implementation: `none` (no daemon) and `strongswan` (charon
//! over VICI).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::InputSink;
use crate::config::{Config, KeyingBackend};
use crate::model::{IkeId, IkeSaInfo, LoadedConnection, PeerConnection, Vip, VipRole};
use crate::policy::{ConnectionSpec, SecretKey};

pub mod ike_probe;
pub mod memory;
pub mod none;
pub mod strongswan;

#[derive(Debug, thiserror::Error)]
pub enum KeyingError {
    #[error("keying daemon unreachable: {0}")]
    Unreachable(String),
    #[error("keying daemon refused {command}: {reason}")]
    Refused { command: String, reason: String },
    #[error("{command} timed out after {after:?}")]
    Timeout { command: String, after: Duration },
    /// Given up because the daemon lost an answer the responder had sent and would only
    /// retransmit seconds later (see [`Initiated::AfterLostAnswer`]).
    #[error("{command} given up: the keying daemon lost the responder's answer")]
    AnswerLost { command: String },
}

/// How an initiation that brought its CHILD_SA up got there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiated {
    /// Within the exchanges the responder answered.
    Answered,
    /// Only through the daemon's own retransmission, after it lost an answer the responder
    /// had sent (charon 5.9.8 drops the answer to a COOKIE retry that comes back at once):
    /// the seconds it took say nothing about how busy the responder is.
    AfterLostAnswer,
}

/// An IKE_SA a drop is about to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropCandidate {
    pub ike_id: IkeId,
    /// Half-open as initiator with its IKE_SA_INIT answered: IKE_AUTH is under way with
    /// whoever holds the VIP now.
    pub answered: bool,
}

/// Which IKE_SAs a drop leaves alone (see [`Keying::drop_sas`]).
pub type SpareSa<'a> = dyn Fn(DropCandidate) -> bool + Send + Sync + 'a;

#[async_trait]
pub trait Keying: Send + Sync + 'static {
    fn kind(&self) -> &'static str;

    /// Until cancelled: connects (reconnecting with backoff), reports `KeyingUp` with the
    /// inventory of SAs or `KeyingDown`, turns the daemon's events into `SaUp`/`SaDown`,
    /// and samples counters of peer VIPs' SAs into `CountersSampled`.
    async fn run(&self, sink: InputSink, cancel: CancellationToken);

    /// Every IKE_SA the daemon holds, with its CHILD_SAs and counters.
    async fn list_sas(&self) -> Result<Vec<IkeSaInfo>, KeyingError>;

    /// Deletes every SA of the VIP, sending an IKE DELETE to each peer; returns how many
    /// IKE_SAs were deleted.
    async fn delete_sas(&self, vip: Vip, role: VipRole) -> Result<u32, KeyingError>;

    /// Removes the IKE_SAs toward a peer VIP at once, without waiting for the peer, except
    /// those `spare` names when their turn comes (asked just before each is removed: an
    /// SA that came up while the listing ran is judged on what is known then).
    async fn drop_sas(&self, vip: Vip, spare: &SpareSa<'_>) -> Result<u32, KeyingError>;

    /// Starts a fresh IKE_SA and CHILD_SA toward the VIP; returns when the CHILD_SA is
    /// installed or the timeout passes.
    async fn initiate(
        &self,
        vip: Vip,
        conn: &PeerConnection,
        timeout: Duration,
    ) -> Result<Initiated, KeyingError>;

    /// Deletes one IKE_SA gracefully (an IKE DELETE to its peer).
    async fn terminate_sa(&self, ike_id: crate::model::IkeId) -> Result<(), KeyingError> {
        Err(no_daemon(format!("terminate IKE_SA #{ike_id}")))
    }

    /// Loads (or replaces, by name) a connection rendered from the cluster policy.
    async fn load_connection(&self, spec: &ConnectionSpec) -> Result<(), KeyingError> {
        Err(no_daemon(format!("load-conn {}", spec.name)))
    }

    /// Unloads a connection and its traps; one not loaded counts as done.
    async fn unload_connection(&self, name: &str) -> Result<(), KeyingError> {
        Err(no_daemon(format!("unload-conn {name}")))
    }

    /// Loads (or replaces) this node's pre-shared key.
    async fn load_psk(&self, _key: &SecretKey) -> Result<(), KeyingError> {
        Err(no_daemon("load-shared".into()))
    }

    /// The connections the daemon has loaded, with their children's traffic selectors.
    async fn list_connections(&self) -> Result<Vec<LoadedConnection>, KeyingError> {
        Err(no_daemon("list-conns".into()))
    }

    /// Loads this node's private key (PEM or DER) for `auth = pubkey`.
    async fn load_private_key(&self, _key: &SecretKey) -> Result<(), KeyingError> {
        Err(no_daemon("load-key".into()))
    }

    /// The DH groups the daemon can negotiate, by its names (`MODP_3072`, `ECP_256`);
    /// see `Policy::check_supported`.
    async fn key_exchange_methods(&self) -> Result<Vec<String>, KeyingError> {
        Err(no_daemon("get-algorithms".into()))
    }
}

/// What a backend without a keying daemon answers to configuration commands.
fn no_daemon(command: String) -> KeyingError {
    KeyingError::Refused {
        command,
        reason: "no keying daemon is configured ([keying] backend = \"none\")".into(),
    }
}

pub fn from_config(config: &Config) -> Arc<dyn Keying> {
    match config.keying.backend {
        KeyingBackend::None => Arc::new(none::NoKeying),
        KeyingBackend::Strongswan => Arc::new(strongswan::StrongswanKeying::new(config)),
    }
}
