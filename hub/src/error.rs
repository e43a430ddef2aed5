//! The hub's error kinds and their one mapping to gRPC status codes. Callers get a clear,
//! safe message; internal details go to the log only.

use tonic::{Code, Status};

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
    #[error("internal error: {0}")]
    Internal(String),
}

pub type HubResult<T> = Result<T, HubError>;

fn e_no_leader() -> String {
    HubError::NoLeader.to_string()
}

impl From<HubError> for Status {
    fn from(e: HubError) -> Self {
        let (code, msg) = match e {
            HubError::Unauthenticated(m) => (Code::Unauthenticated, m),
            HubError::PermissionDenied(m) => (Code::PermissionDenied, m),
            HubError::NotFound(m) => (Code::NotFound, m),
            HubError::InvalidArgument(m) => (Code::InvalidArgument, m),
            HubError::FailedPrecondition(m) => (Code::FailedPrecondition, m),
            HubError::AlreadyExists(m) => (Code::AlreadyExists, m),
            HubError::Unavailable(m) => (Code::Unavailable, m),
            HubError::NoLeader => {
                let mut status = Status::new(Code::Unavailable, e_no_leader());
                status.metadata_mut().insert(
                    crate::app::NO_LEADER_HEADER,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                return status;
            }
            e @ HubError::NotLeader { .. } => {
                let HubError::NotLeader { leader_api, .. } = &e else {
                    unreachable!()
                };
                let mut status = Status::new(Code::Unavailable, e.to_string());
                if let Ok(v) = leader_api.parse() {
                    status.metadata_mut().insert(crate::app::LEADER_HEADER, v);
                }
                return status;
            }
            HubError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                (
                    Code::Internal,
                    "internal error; the hub log has the details".to_owned(),
                )
            }
        };
        Status::new(code, msg)
    }
}
