//! Requests from the API that the core decides, and how they can fail.

use std::time::Duration;

use tokio::sync::oneshot;

use super::fence::Fenced;
use crate::keying::KeyingError;
use crate::model::{Mode, Vip};

/// Why a command was not carried out. The API maps each to one status code
/// (`api::error`): a fenced delete is not the same failure as an unreachable daemon.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("{0} is not a hosted VIP of this node")]
    NotHosted(Vip),
    /// The VIP moved on while the command waited: acting now would hurt the new owner.
    #[error("fenced: {0}")]
    Fenced(#[from] Fenced),
    #[error(transparent)]
    Keying(#[from] KeyingError),
}

/// What a drain answers: the number of IKE_SAs deleted.
pub type DrainReply = oneshot::Sender<Result<u32, CommandError>>;

pub enum Command {
    Drain {
        vip: Vip,
        reply: DrainReply,
    },
    SetMode {
        mode: Mode,
        idle_timeout: Option<Duration>,
        reply: oneshot::Sender<(Mode, Duration)>,
    },
}
