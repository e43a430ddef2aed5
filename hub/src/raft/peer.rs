//! What hubs ask of the leader besides openraft's own RPCs, and its answers: the types that
//! travel on the Raft port between `cluster` (the asking side) and `service` (the leader).

use serde::{Deserialize, Serialize};

use super::HubNode;

/// Why the leader could not do what a follower asked.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
pub enum PeerError {
    /// This hub is not (or no longer) the leader: ask again.
    #[error("not the leader")]
    NotLeader,
    #[error("{0}")]
    Failed(String),
}

/// What a hub's build is: the commands it can apply (`state::COMMAND_LEVEL`) and its
/// version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HubVersion {
    pub command_level: u32,
    pub version: String,
}

impl HubVersion {
    /// This hub's. A test build (with failpoints) reports the level `FLOTILLA_COMMAND_LEVEL`
    /// names, if set, to play a hub of an older build in a rolling upgrade.
    pub fn this() -> Self {
        Self {
            command_level: crate::faults::test_setting(
                "FLOTILLA_COMMAND_LEVEL",
                crate::state::COMMAND_LEVEL,
            ),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MembershipChange {
    Add { id: u64, node: HubNode },
    Remove { id: u64 },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemberView {
    pub id: u64,
    pub api: String,
    pub raft: String,
    pub role: String,
    pub matched_index: u64,
    pub lag: u64,
    /// Where its HTTP port is reached: each hub knows its own (empty: not known here).
    #[serde(default)]
    pub http: String,
}

/// A hub's view of the cluster; the leader's is the one with replication figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterView {
    pub this_hub: u64,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    /// The last index the answering hub knows committed (an older hub does not say: 0).
    #[serde(default)]
    pub commit_index: u64,
    pub members: Vec<MemberView>,
}
