//! The `flotilla.v1` gRPC API. This is the only crate that compiles the proto files; other
//! crates use the generated messages at their gRPC edge and nowhere deeper.

#![allow(unreachable_pub, clippy::all)]

pub mod v1 {
    tonic::include_proto!("flotilla.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("flotilla_descriptor");
}

pub use v1::*;

/// Response metadata on a refused write or read: the leader's API address, to retry there.
pub const LEADER_HEADER: &str = "x-flotilla-leader";
/// Response metadata set when no leader is known yet (an election is under way).
pub const NO_LEADER_HEADER: &str = "x-flotilla-no-leader";

impl TaskState {
    /// True for states a task never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled | TaskState::Lost
        )
    }

    /// The lower-case name people read (`queued`, `running`, `succeeded`...).
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Unspecified => "unknown",
            TaskState::Queued => "queued",
            TaskState::Assigned => "assigned",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Lost => "lost",
        }
    }
}

impl EventKind {
    /// True for the events that end a task: nothing follows them.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventKind::Succeeded | EventKind::Failed | EventKind::Cancelled | EventKind::Lost
        )
    }

    /// The lower-case name people read (`queued`, `progress`, `succeeded`...).
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Unspecified => "unknown",
            EventKind::Queued => "queued",
            EventKind::Assigned => "assigned",
            EventKind::Started => "started",
            EventKind::Progress => "progress",
            EventKind::Succeeded => "succeeded",
            EventKind::Failed => "failed",
            EventKind::Cancelled => "cancelled",
            EventKind::Lost => "lost",
        }
    }
}

impl TaskEvent {
    /// True when this event ends the task's stream (an unknown kind does not).
    pub fn is_terminal(&self) -> bool {
        EventKind::try_from(self.kind).is_ok_and(EventKind::is_terminal)
    }
}

impl ServerState {
    /// The lower-case name people read (`starting`, `ready`...).
    pub fn name(self) -> &'static str {
        match self {
            ServerState::Unspecified => "unknown",
            ServerState::Starting => "starting",
            ServerState::Ready => "ready",
            ServerState::Failing => "failing",
            ServerState::Restarting => "restarting",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_ends_the_stream_exactly_when_its_state_is_final() {
        let pairs = [
            (EventKind::Queued, TaskState::Queued),
            (EventKind::Assigned, TaskState::Assigned),
            (EventKind::Started, TaskState::Running),
            (EventKind::Succeeded, TaskState::Succeeded),
            (EventKind::Failed, TaskState::Failed),
            (EventKind::Cancelled, TaskState::Cancelled),
            (EventKind::Lost, TaskState::Lost),
        ];
        for (kind, state) in pairs {
            assert_eq!(kind.is_terminal(), state.is_terminal(), "{kind:?}");
            assert_eq!(kind.name(), state.name().replace("running", "started"));
        }
        assert!(!EventKind::Progress.is_terminal());
        let unknown = TaskEvent {
            kind: 99,
            ..Default::default()
        };
        assert!(
            !unknown.is_terminal(),
            "a kind from a newer hub ends nothing"
        );
        assert_eq!(unknown.kind().name(), "unknown");
    }
}
