//! The hub's error kinds and their one mapping to gRPC status codes. Callers get a clear,
//! safe message; internal details go to the log only.

use tonic::{metadata::MetadataValue, Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Retryable: no leader, shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// No leader is known right now (an election is under way): retry the same hub shortly.
    #[error("no leader elected yet; retry shortly")]
    NoLeader,
    /// This hub is not the leader and the caller must talk to the leader (node sessions).
    #[error("this hub is not the leader; hub {leader_id} at {leader_api} is")]
    NotLeader { leader_id: u64, leader_api: String },
    /// Over a rate or quota: retry after the hint.
    #[error("{message}; retry in {retry_after_ms} ms")]
    ResourceExhausted {
        message: String,
        retry_after_ms: u64,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

/// Metadata key carrying how long to wait before retrying a RESOURCE_EXHAUSTED call.
pub const RETRY_AFTER_HEADER: &str = "x-flotilla-retry-after-ms";

pub type HubResult<T> = Result<T, HubError>;

impl HubError {
    /// The same error with `what` in front of a caller-facing message.
    pub fn context(self, what: &str) -> Self {
        match self {
            Self::Unauthenticated(m) => Self::Unauthenticated(format!("{what}: {m}")),
            Self::PermissionDenied(m) => Self::PermissionDenied(format!("{what}: {m}")),
            Self::NotFound(m) => Self::NotFound(format!("{what}: {m}")),
            Self::InvalidArgument(m) => Self::InvalidArgument(format!("{what}: {m}")),
            Self::FailedPrecondition(m) => Self::FailedPrecondition(format!("{what}: {m}")),
            other => other,
        }
    }
}

/// Input over a limit is the caller's to fix.
impl From<flotilla_common::limits::LimitError> for HubError {
    fn from(e: flotilla_common::limits::LimitError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

impl From<HubError> for Status {
    fn from(e: HubError) -> Self {
        let code = match &e {
            HubError::Unauthenticated(_) => Code::Unauthenticated,
            HubError::PermissionDenied(_) => Code::PermissionDenied,
            HubError::NotFound(_) => Code::NotFound,
            HubError::InvalidArgument(_) => Code::InvalidArgument,
            HubError::FailedPrecondition(_) => Code::FailedPrecondition,
            HubError::AlreadyExists(_) => Code::AlreadyExists,
            HubError::Unavailable(_) | HubError::NoLeader | HubError::NotLeader { .. } => {
                Code::Unavailable
            }
            HubError::ResourceExhausted { .. } => Code::ResourceExhausted,
            HubError::Internal(_) => Code::Internal,
        };
        let message = match &e {
            HubError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                "internal error; the hub log has the details".to_owned()
            }
            other => other.to_string(),
        };
        let mut status = Status::new(code, message);
        // Hints a node's session loop acts on.
        match &e {
            HubError::NoLeader => {
                status.metadata_mut().insert(
                    flotilla_proto::NO_LEADER_HEADER,
                    MetadataValue::from_static("1"),
                );
            }
            HubError::ResourceExhausted { retry_after_ms, .. } => {
                status
                    .metadata_mut()
                    .insert(RETRY_AFTER_HEADER, MetadataValue::from(*retry_after_ms));
            }
            HubError::NotLeader { leader_api, .. } => {
                if let Ok(v) = leader_api.parse() {
                    status
                        .metadata_mut()
                        .insert(flotilla_proto::LEADER_HEADER, v);
                }
            }
            _ => {}
        }
        status
    }
}
