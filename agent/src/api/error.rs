//! The one place where domain errors become gRPC status codes.

use tonic::{Code, Status};

use crate::keying::KeyingError;
use crate::logging::LogError;
use crate::runtime::{CommandError, LogLevelError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    /// The request is fine but this node cannot do it now (e.g. a drill off the owner).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = match &e {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<KeyingError> for ApiError {
    fn from(e: KeyingError) -> ApiError {
        match e {
            KeyingError::Unreachable(_)
            | KeyingError::Timeout { .. }
            | KeyingError::AnswerLost { .. } => ApiError::Unavailable(e.to_string()),
            KeyingError::Refused { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<crate::drill::DrillError> for ApiError {
    fn from(e: crate::drill::DrillError) -> ApiError {
        use crate::drill::DrillError;
        match e {
            DrillError::NotConfigured | DrillError::Refused(_) => {
                ApiError::FailedPrecondition(e.to_string())
            }
            DrillError::CommandFailed(_) => ApiError::Internal(e.to_string()),
            DrillError::SameNode { .. } => ApiError::InvalidArgument(e.to_string()),
            DrillError::UnknownVip(_) => ApiError::NotFound(e.to_string()),
            DrillError::Busy => ApiError::FailedPrecondition(e.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> ApiError {
        match e {
            CommandError::ShuttingDown => ApiError::Unavailable(e.to_string()),
            CommandError::NotHosted(_) => ApiError::NotFound(e.to_string()),
            // The VIP moved on while the command waited: asking again here cannot help.
            CommandError::Fenced(_) => ApiError::FailedPrecondition(e.to_string()),
            CommandError::Keying(k) => k.into(),
        }
    }
}

impl From<LogLevelError> for ApiError {
    fn from(e: LogLevelError) -> ApiError {
        match e {
            LogLevelError::NotReloadable => ApiError::Unavailable(e.to_string()),
            LogLevelError::Filter(f) => f.into(),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> ApiError {
        match e {
            LogError::InvalidFilter { .. } => ApiError::InvalidArgument(e.to_string()),
            LogError::Reload(_) => ApiError::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(
            Status::from(ApiError::InvalidArgument("x".into())).code(),
            Code::InvalidArgument
        );
        let refused = KeyingError::Refused {
            command: "terminate".into(),
            reason: "no such SA".into(),
        };
        assert_eq!(Status::from(ApiError::from(refused)).code(), Code::Internal);
        let down = KeyingError::Unreachable("connection refused".into());
        assert_eq!(Status::from(ApiError::from(down)).code(), Code::Unavailable);
    }
}
