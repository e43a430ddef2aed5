//! The state machine: the hub's [`State`] in memory, durable through snapshots persisted in
//! the sled tree `snapshot` plus the Raft log. On open it is restored from the persisted
//! snapshot; openraft then re-applies the log entries in `(snapshot, committed]` inside
//! `Raft::new()` (see `LogStore::save_committed`).

use std::io::Cursor;
use std::sync::Arc;

use super::HubNode as BasicNode;
use openraft::storage::RaftStateMachine;
use openraft::AnyError;
use openraft::Entry;
use openraft::EntryPayload;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
use openraft::LogId;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::Snapshot;
use openraft::SnapshotMeta;
use openraft::StorageError;
use openraft::StorageIOError;
use openraft::StoredMembership;
use serde::Deserialize;
use serde::Serialize;
use std::sync::RwLock;
use tokio::sync::Mutex;

use super::{ApplyHook, NodeId, StorageResult, TypeConfig};
use crate::state::{Response, State};

const KEY_SNAPSHOT_META: &[u8] = b"meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"data";

type Meta = SnapshotMeta<NodeId, BasicNode>;

/// Everything the state machine holds; also the JSON format of snapshot data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SmData {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, BasicNode>,
    state: State,
}

/// The applied position, guarded separately from the state but only ever changed while
/// the state's write lock is held, so state + position read under the state lock agree.
#[derive(Debug, Clone, Default)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, BasicNode>,
}

/// State machine store. Cheap to clone; clones share the same state (keep one clone in the
/// app for reads, hand one to `Raft::new`). It is also its own snapshot builder.
pub struct StateMachineStore {
    state: Arc<RwLock<State>>,
    applied: Arc<std::sync::Mutex<Applied>>,
    hooks: Arc<dyn ApplyHook>,
    db: sled::Db,
    snapshots: sled::Tree,
    /// Serializes snapshot persist/read so meta and data always match.
    snapshot_lock: Arc<Mutex<()>>,
}

impl Clone for StateMachineStore {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
            applied: self.applied.clone(),
            hooks: self.hooks.clone(),
            db: self.db.clone(),
            snapshots: self.snapshots.clone(),
            snapshot_lock: self.snapshot_lock.clone(),
        }
    }
}

fn snap_err(
    meta: Option<&Meta>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<NodeId> {
    StorageIOError::new(
        ErrorSubject::Snapshot(meta.map(|m| m.signature())),
        verb,
        AnyError::new(&e),
    )
    .into()
}

impl StateMachineStore {
    /// Open the state machine on `db`, restoring from the persisted snapshot if there is one.
    pub fn new(db: sled::Db, hooks: Arc<dyn ApplyHook>) -> StorageResult<Self> {
        let snapshots = db
            .open_tree("snapshot")
            .map_err(|e| snap_err(None, ErrorVerb::Read, e))?;
        let snapshot_lock = Arc::new(Mutex::new(()));
        let initial = match read_persisted_snapshot(&snapshots)? {
            Some((meta, bytes)) => {
                tracing::info!(snapshot = %meta, "state machine restored from snapshot");
                decode_snapshot(&meta, &bytes)?
            }
            None => SmData::default(),
        };
        let sm = Self {
            state: Arc::new(RwLock::new(initial.state)),
            applied: Arc::new(std::sync::Mutex::new(Applied {
                last_applied: initial.last_applied,
                last_membership: initial.last_membership,
            })),
            hooks,
            db,
            snapshots,
            snapshot_lock,
        };
        Ok(sm)
    }

    /// The shared application state, for readers (never hold its guard across an await).
    pub fn state(&self) -> Arc<RwLock<State>> {
        self.state.clone()
    }

    /// Atomically (one sled batch) store meta + data as the current snapshot and fsync.
    /// With `only_if_newer`, a snapshot older than the stored one is not written (a snapshot
    /// build runs concurrently with apply/install and may finish after a newer install).
    async fn persist_snapshot(
        &self,
        meta: &Meta,
        data: &[u8],
        only_if_newer: bool,
    ) -> StorageResult<()> {
        let _g = self.snapshot_lock.lock().await;
        if only_if_newer {
            if let Some(cur) = self
                .snapshots
                .get(KEY_SNAPSHOT_META)
                .map_err(|e| snap_err(Some(meta), ErrorVerb::Read, e))?
            {
                let cur: Meta = super::codec::decode(&cur)
                    .map_err(|e| snap_err(Some(meta), ErrorVerb::Read, e))?;
                if cur.last_log_id > meta.last_log_id {
                    tracing::info!(current = %cur, built = %meta, "not replacing newer persisted snapshot");
                    return Ok(());
                }
            }
        }
        let meta_bytes =
            serde_json::to_vec(meta).map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        let mut batch = sled::Batch::default();
        batch.insert(KEY_SNAPSHOT_META, meta_bytes);
        batch.insert(KEY_SNAPSHOT_DATA, data);
        self.snapshots
            .apply_batch(batch)
            .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        Ok(())
    }
}

fn read_persisted_snapshot(snapshots: &sled::Tree) -> StorageResult<Option<(Meta, Vec<u8>)>> {
    let meta = snapshots
        .get(KEY_SNAPSHOT_META)
        .map_err(|e| snap_err(None, ErrorVerb::Read, e))?;
    let Some(meta) = meta else { return Ok(None) };
    let meta: Meta = super::codec::decode(&meta).map_err(|e| snap_err(None, ErrorVerb::Read, e))?;
    let data = snapshots
        .get(KEY_SNAPSHOT_DATA)
        .map_err(|e| snap_err(Some(&meta), ErrorVerb::Read, e))?;
    let Some(data) = data else {
        let e = std::io::Error::new(std::io::ErrorKind::NotFound, "snapshot meta without data");
        return Err(snap_err(Some(&meta), ErrorVerb::Read, e));
    };
    Ok(Some((meta, data.to_vec())))
}

fn decode_snapshot(meta: &Meta, bytes: &[u8]) -> StorageResult<SmData> {
    let mut d: SmData =
        super::codec::decode(bytes).map_err(|e| snap_err(Some(meta), ErrorVerb::Read, e))?;
    // The meta is authoritative (it is what openraft reasons about).
    d.last_applied = meta.last_log_id;
    d.last_membership = meta.last_membership.clone();
    d.state.rebuild_index();
    Ok(d)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        // Serialize under the read lock: a consistent cut of state + last_applied + membership.
        let (bytes, last_applied, last_membership) = {
            let state = self.state.read().expect("state lock");
            let a = self.applied.lock().expect("applied lock").clone();
            #[derive(Serialize)]
            struct Cut<'a> {
                last_applied: Option<LogId<NodeId>>,
                last_membership: &'a StoredMembership<NodeId, BasicNode>,
                state: &'a State,
            }
            let cut = Cut {
                last_applied: a.last_applied,
                last_membership: &a.last_membership,
                state: &state,
            };
            let bytes =
                serde_json::to_vec(&cut).map_err(|e| snap_err(None, ErrorVerb::Write, e))?;
            (bytes, a.last_applied, a.last_membership)
        };

        let unique = self
            .db
            .generate_id()
            .map_err(|e| snap_err(None, ErrorVerb::Write, e))?;
        let snapshot_id = match &last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, unique),
            None => format!("--{}", unique),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };

        self.persist_snapshot(&meta, &bytes, true).await?;

        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let a = self.applied.lock().expect("applied lock");
        Ok((a.last_applied, a.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries = entries.into_iter();
        let mut state = self.state.write().expect("state lock");
        let mut applied = self.applied.lock().expect("applied lock");
        let mut replies = Vec::with_capacity(entries.size_hint().0);
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(ref cmd) => {
                    let r = state.apply(entry.log_id.index, cmd);
                    let effects = state.take_effects();
                    self.hooks.applied(&state, &r, &effects);
                    r
                }
                EntryPayload::Membership(m) => {
                    applied.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::default()
                }
            };
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        tracing::info!(snapshot = %meta, "install snapshot");
        let bytes = snapshot.into_inner();
        let new_data = decode_snapshot(meta, &bytes)?;
        // Persist first: if that fails, the in-memory state is left untouched.
        self.persist_snapshot(meta, &bytes, false).await?;
        let mut state = self.state.write().expect("state lock");
        *state = new_data.state;
        *self.applied.lock().expect("applied lock") = Applied {
            last_applied: new_data.last_applied,
            last_membership: new_data.last_membership,
        };
        self.hooks.replaced(&state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let _g = self.snapshot_lock.lock().await;
        Ok(
            read_persisted_snapshot(&self.snapshots)?.map(|(meta, data)| Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            }),
        )
    }
}
