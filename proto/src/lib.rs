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
}
