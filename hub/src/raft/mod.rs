//! Raft for the hub group, split the way openraft's examples split it: `store` (the log,
//! its entries in segment files of their own, `wal`), `sm` (state machine: in memory,
//! durable through snapshots and the log), `network` (RPC client between hubs), `service`
//! (RPC server between hubs).

#![allow(clippy::result_large_err)] // openraft's StorageError is large; every storage fn returns it

pub(crate) mod bootstrap;
pub mod codec;
pub mod network;
pub mod peer;
pub mod service;
pub mod sm;
pub mod store;
mod wal;

use std::{path::Path, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::state::{Command, Effects, Response, State};

openraft::declare_raft_types!(
    /// Type config of the hub Raft group.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = HubNode,
        Entry = openraft::Entry<TypeConfig>,
        // A file: a snapshot sent to another hub carries the history store, streamed in
        // chunks from and into a file rather than held in memory.
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;

/// A hub as Raft knows it: where agents and nodes reach it, and where hubs reach its Raft port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubNode {
    pub api: String,
    pub raft: String,
}

impl std::fmt::Display for HubNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "api={} raft={}", self.api, self.raft)
    }
}
pub type Raft = openraft::Raft<TypeConfig>;
pub type StorageResult<T> = Result<T, openraft::StorageError<NodeId>>;

impl Default for Response {
    /// What blank and membership entries answer.
    fn default() -> Self {
        Response::Done
    }
}

/// Told about every applied command, on every hub, in log order, while the state is locked.
pub trait ApplyHook: Send + Sync + 'static {
    /// The command at log index `index` was applied.
    fn applied(&self, index: u64, state: &State, resp: &Response, effects: &Effects);
    /// The whole state was replaced by a snapshot.
    fn replaced(&self, state: &State);
}

/// Opens (or creates) the sled database at `path`, with a page cache of at most
/// `cache_bytes`, the log's entries in `path` + `.wal` and finished records' bodies in
/// `path` + `.history`, and builds both stores on them.
pub fn open(
    path: &Path,
    cache_bytes: u64,
    hooks: Arc<dyn ApplyHook>,
) -> anyhow::Result<(store::LogStore, sm::StateMachineStore)> {
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .open()
        .map_err(|e| anyhow::anyhow!("opening raft storage at {}: {e}", path.display()))?;
    let sm = sm::StateMachineStore::new(
        db.clone(),
        hooks,
        &path.with_extension("tmp"),
        &path.with_extension("history"),
    )?;
    let log = store::LogStore::new(db, &path.with_extension("wal"), sm.durable_snapshot())?;
    Ok((log, sm))
}
