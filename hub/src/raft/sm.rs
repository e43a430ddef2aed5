//! The state machine: the hub's live [`State`] in memory, durable through snapshots persisted
//! in the sled tree `snapshot` plus the Raft log; finished work in the history store (sled
//! trees written by apply, see `state::history`). On open the live state is restored from the
//! persisted snapshot; openraft then re-applies the log entries in `(snapshot, committed]`
//! inside `Raft::new()` (see `LogStore::save_committed`).
//!
//! Snapshot data is `MAGIC`, the length of the live state's JSON (u64, big-endian), that
//! JSON, then the history store's records (`History::dump`). The persisted snapshot keeps
//! only the live part: the history store is already on disk, and a snapshot sent to another
//! hub appends the store as it is when sent (it may be ahead of the snapshot's index; the
//! store is versioned for that).

use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
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
use crate::state::{History, Response, State};

const KEY_SNAPSHOT_META: &[u8] = b"meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"data";
/// Which generation of the history store's trees goes with the persisted snapshot.
const KEY_HISTORY_GENERATION: &[u8] = b"history_generation";
const MAGIC: &[u8] = b"flotilla-snapshot-2\n";

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
    history: History,
    applied: Arc<std::sync::Mutex<Applied>>,
    hooks: Arc<dyn ApplyHook>,
    db: sled::Db,
    snapshots: sled::Tree,
    /// Serializes snapshot persist/read so meta and data always match.
    snapshot_lock: Arc<Mutex<()>>,
    /// Where snapshot files being sent or received live (unnamed, gone when closed).
    tmp_dir: PathBuf,
    /// One more than the last log index of the persisted snapshot (0: none), for the log
    /// store, which must not purge its disk past it.
    durable: Arc<std::sync::atomic::AtomicU64>,
}

impl Clone for StateMachineStore {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
            history: self.history.clone(),
            applied: self.applied.clone(),
            hooks: self.hooks.clone(),
            db: self.db.clone(),
            snapshots: self.snapshots.clone(),
            snapshot_lock: self.snapshot_lock.clone(),
            tmp_dir: self.tmp_dir.clone(),
            durable: self.durable.clone(),
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
    /// Open the state machine on `db`, restoring from the persisted snapshot if there is one,
    /// with finished records' bodies under `history_dir`.
    pub fn new(
        db: sled::Db,
        hooks: Arc<dyn ApplyHook>,
        tmp_dir: &Path,
        history_dir: &Path,
    ) -> StorageResult<Self> {
        flotilla_common::pki::private_dir(tmp_dir)
            .map_err(|e| snap_err(None, ErrorVerb::Write, std::io::Error::other(e.to_string())))?;
        let snapshots = db
            .open_tree("snapshot")
            .map_err(|e| snap_err(None, ErrorVerb::Read, e))?;
        let snapshot_lock = Arc::new(Mutex::new(()));
        let generation = match snapshots
            .get(KEY_HISTORY_GENERATION)
            .map_err(|e| snap_err(None, ErrorVerb::Read, e))?
        {
            Some(g) => super::codec::decode(&g).map_err(|e| snap_err(None, ErrorVerb::Read, e))?,
            None => 0,
        };
        let history = History::open(&db, history_dir, generation)
            .map_err(|e| snap_err(None, ErrorVerb::Read, e))?;
        let durable = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut initial = match read_persisted_snapshot(&snapshots)? {
            Some((meta, bytes)) => {
                durable.store(durable_mark(&meta), std::sync::atomic::Ordering::Release);
                tracing::info!(snapshot = %meta, finished = history.len(), "state machine restored from snapshot");
                decode_snapshot(&meta, &bytes, &history)?.0
            }
            None => SmData::default(),
        };
        initial.state.history = history.clone();
        let sm = Self {
            state: Arc::new(RwLock::new(initial.state)),
            history,
            applied: Arc::new(std::sync::Mutex::new(Applied {
                last_applied: initial.last_applied,
                last_membership: initial.last_membership,
            })),
            hooks,
            db,
            snapshots,
            snapshot_lock,
            tmp_dir: tmp_dir.to_owned(),
            durable,
        };
        Ok(sm)
    }

    /// One more than the last log index of the snapshot on disk (0: none); the log store
    /// reads it.
    pub fn durable_snapshot(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.durable.clone()
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
        generation: u64,
        only_if_newer: bool,
    ) -> StorageResult<bool> {
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
                    return Ok(false);
                }
            }
        }
        let meta_bytes =
            serde_json::to_vec(meta).map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        let mut batch = sled::Batch::default();
        batch.insert(KEY_SNAPSHOT_META, meta_bytes);
        batch.insert(KEY_SNAPSHOT_DATA, data);
        batch.insert(
            KEY_HISTORY_GENERATION,
            serde_json::to_vec(&generation).expect("a number serializes"),
        );
        // The bodies of what the snapshot covers are durable before the snapshot is.
        let history = self.history.clone();
        tokio::task::spawn_blocking(move || history.sync())
            .await
            .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, std::io::Error::other(e)))?
            .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        self.snapshots
            .apply_batch(batch)
            .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        self.durable
            .store(durable_mark(meta), std::sync::atomic::Ordering::Release);
        Ok(true)
    }

    /// Removes history tombstones the durable snapshot `meta` covers.
    fn purge_history(&self, meta: &Meta) {
        let Some(at) = meta.last_log_id.map(|l| l.index) else {
            return;
        };
        match self.history.purge(at) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, through = at, "history tombstones purged"),
            // Tombstones are only kept longer; the next snapshot tries again.
            Err(e) => tracing::warn!(error = %e, "purging history tombstones failed"),
        }
    }
}

/// What `StateMachineStore::durable` holds for a snapshot on disk.
fn durable_mark(meta: &Meta) -> u64 {
    meta.last_log_id.map_or(0, |l| l.index.saturating_add(1))
}

/// The live part of snapshot data: `MAGIC`, length, JSON.
fn live_part(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 8 + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_be_bytes());
    out.extend_from_slice(json);
    out
}

/// Splits snapshot data into the live state's JSON and the history records (none in the
/// format before finished work left memory: the whole state as JSON).
fn split_snapshot(bytes: &[u8]) -> Result<(&[u8], &[u8]), std::io::Error> {
    let Some(rest) = bytes.strip_prefix(MAGIC) else {
        return Ok((bytes, &[]));
    };
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "truncated snapshot");
    let len: [u8; 8] = rest.get(..8).ok_or_else(bad)?.try_into().expect("8 bytes");
    let len = usize::try_from(u64::from_be_bytes(len)).map_err(|_| bad())?;
    let rest = &rest[8..];
    if rest.len() < len {
        return Err(bad());
    }
    Ok(rest.split_at(len))
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

/// Decodes snapshot data: the live state (its finished work moved to `history` when the
/// snapshot is from before finished work left memory) and the history records it carries.
fn decode_snapshot<'a>(
    meta: &Meta,
    bytes: &'a [u8],
    history: &History,
) -> StorageResult<(SmData, &'a [u8])> {
    let (live, records) =
        split_snapshot(bytes).map_err(|e| snap_err(Some(meta), ErrorVerb::Read, e))?;
    let mut d: SmData =
        super::codec::decode(live).map_err(|e| snap_err(Some(meta), ErrorVerb::Read, e))?;
    // The meta is authoritative (it is what openraft reasons about).
    d.last_applied = meta.last_log_id;
    d.last_membership = meta.last_membership.clone();
    d.state.history = history.clone();
    d.state.rebuild_index();
    if !bytes.starts_with(MAGIC) {
        d.state
            .archive_all_ended(meta.last_log_id.map_or(0, |l| l.index));
    }
    Ok((d, records))
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
            let json = serde_json::to_vec(&cut).map_err(|e| snap_err(None, ErrorVerb::Write, e))?;
            (live_part(&json), a.last_applied, a.last_membership)
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

        // openraft keeps only the meta of a built snapshot; what is sent to another hub
        // comes from `get_current_snapshot`, with the history store appended.
        let generation = self.history.generation();
        if self
            .persist_snapshot(&meta, &bytes, generation, true)
            .await?
        {
            let _g = self.snapshot_lock.lock().await;
            self.purge_history(&meta);
        }

        let file = self
            .file_holding(|f| f.write_all(&bytes).map_err(Into::into))
            .map_err(|e| snap_err(Some(&meta), ErrorVerb::Write, e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl StateMachineStore {
    /// A new unnamed file in `tmp_dir` filled by `fill`, positioned at its start.
    fn file_holding(
        &self,
        fill: impl FnOnce(&mut BufWriter<&mut std::fs::File>) -> Result<(), HistoryError>,
    ) -> Result<tokio::fs::File, HistoryError> {
        let mut f = tempfile::tempfile_in(&self.tmp_dir)?;
        {
            let mut w = BufWriter::new(&mut f);
            fill(&mut w)?;
            w.flush()?;
        }
        f.seek(SeekFrom::Start(0))?;
        Ok(tokio::fs::File::from_std(f))
    }
}

type HistoryError = crate::state::history::StoreError;

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
                    if let Some(e) = &effects.store_error {
                        let e = std::io::Error::other(e.clone());
                        return Err(StorageIOError::new(
                            ErrorSubject::Apply(entry.log_id),
                            ErrorVerb::Write,
                            AnyError::new(&e),
                        )
                        .into());
                    }
                    fail::fail_point!(crate::faults::APPLY_BEFORE_HOOK);
                    self.hooks.applied(entry.log_id.index, &state, &r, &effects);
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

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<tokio::fs::File>> {
        let f = self
            .file_holding(|_| Ok(()))
            .map_err(|e| snap_err(None, ErrorVerb::Write, e))?;
        Ok(Box::new(f))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<tokio::fs::File>,
    ) -> StorageResult<()> {
        tracing::info!(snapshot = %meta, "install snapshot");
        let read_err = |e: std::io::Error| snap_err(Some(meta), ErrorVerb::Read, e);
        let mut input = BufReader::new(snapshot.into_std().await);
        input.seek(SeekFrom::Start(0)).map_err(read_err)?;
        // The live state is read whole (it is bounded); the history records after it are
        // read one at a time into a new generation of trees, durable before the snapshot
        // that names it is persisted. If anything fails first, the hub keeps its state and
        // store as they were.
        let mut head = vec![0; MAGIC.len()];
        let got = input.read(&mut head).map_err(read_err)?;
        head.truncate(got);
        let bytes = if head == MAGIC {
            let mut len = [0u8; 8];
            input.read_exact(&mut len).map_err(read_err)?;
            let len = u64::from_be_bytes(len);
            let size = input.get_ref().metadata().map_err(read_err)?.len();
            if len > size {
                return Err(read_err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("a snapshot's live state of {len} bytes in a file of {size}"),
                )));
            }
            let mut json = vec![0; len as usize];
            input.read_exact(&mut json).map_err(read_err)?;
            live_part(&json)
        } else {
            // The whole state as JSON (an older hub's format): no records follow.
            input.read_to_end(&mut head).map_err(read_err)?;
            head
        };
        let (live, _) =
            split_snapshot(&bytes).map_err(|e| snap_err(Some(meta), ErrorVerb::Read, e))?;
        let next = self
            .history
            .load_next_from(&mut input)
            .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        let (mut new_data, _) = decode_snapshot(meta, &bytes, &next)?;
        // Durable before the snapshot that names them, also what decoding an older
        // hub's snapshot archived.
        next.sync()
            .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        let live = if bytes.starts_with(MAGIC) {
            live_part(live)
        } else {
            // From an older hub: persist the state as it is now (finished work archived),
            // or a restart would load the finished tasks into memory again.
            let json = serde_json::to_vec(&new_data)
                .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
            live_part(&json)
        };
        self.persist_snapshot(meta, &live, next.generation(), false)
            .await?;
        let retired = {
            let mut state = self.state.write().expect("state lock");
            let retired = self.history.replace_with(next);
            new_data.state.history = self.history.clone();
            *state = new_data.state;
            *self.applied.lock().expect("applied lock") = Applied {
                last_applied: new_data.last_applied,
                last_membership: new_data.last_membership,
            };
            self.hooks.replaced(&state);
            retired
        };
        if let Err(e) = retired.remove() {
            // Its trees are dropped at the next start (`History::open`) instead.
            tracing::warn!(error = %e, "dropping the replaced history store failed");
        }
        // Under the lock, as a built snapshot's purge is: one purge at a time.
        let _g = self.snapshot_lock.lock().await;
        self.purge_history(meta);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        // Under the lock, so no purge for a newer snapshot removes tombstones this one's
        // receiver may still replay past.
        let _g = self.snapshot_lock.lock().await;
        let Some((meta, data)) = read_persisted_snapshot(&self.snapshots)? else {
            return Ok(None);
        };
        // Persisted by an older hub, the data is the whole state as JSON: no store to
        // append. Otherwise the live part, then the history store record by record.
        let file = self
            .file_holding(|w| {
                w.write_all(&data)?;
                if data.starts_with(MAGIC) {
                    self.history.dump_to(w)?;
                }
                Ok(())
            })
            .map_err(|e| snap_err(Some(&meta), ErrorVerb::Read, e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}
