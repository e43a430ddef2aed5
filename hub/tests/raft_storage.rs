//! openraft's own storage conformance suite against the hub's sled log and state machine.

#![allow(clippy::result_large_err)] // openraft's StorageError is what its suite returns

use std::sync::Arc;

use flotilla_hub::{
    raft::{self, sm::StateMachineStore, store::LogStore, ApplyHook, TypeConfig},
    state::{Effects, Response, State},
};
use openraft::{
    testing::{StoreBuilder, Suite},
    AnyError, StorageError, StorageIOError,
};
use tempfile::TempDir;

struct NoHooks;

impl ApplyHook for NoHooks {
    fn applied(&self, _: u64, _: &State, _: &Response, _: &Effects) {}
    fn replaced(&self, _: &State) {}
}

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        let (log, sm) = raft::open(&dir.path().join("raft"), 16 << 20, Arc::new(NoHooks))
            .map_err(|e| StorageIOError::write(AnyError::error(e.to_string())))?;
        Ok((dir, log, sm))
    }
}

/// `Suite::test_all` makes its own runtime per case, so this is a plain test.
#[test]
fn openraft_storage_suite() -> Result<(), StorageError<u64>> {
    Suite::test_all(SledBuilder)
}
