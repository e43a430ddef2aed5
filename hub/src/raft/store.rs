//! The Raft log: its entries in segment files of their own (`wal`), the vote and the
//! committed id in sled's `meta` tree (JSON). An append is acknowledged to openraft only
//! once its segment is synced; a vote is saved only once sled has flushed it.
//!
//! The newest entries are also kept decoded in memory (`Recent`): openraft reads every
//! entry back right after appending it, to apply it and to send it to followers, and
//! decoding it from JSON again each time was a visible share of a call's CPU.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::LogFlushed;
use openraft::storage::RaftLogStorage;
use openraft::AnyError;
use openraft::Entry;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
use openraft::LogId;
use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::StorageError;
use openraft::StorageIOError;
use openraft::Vote;

use super::wal::{Done, Wal};
use super::NodeId;
use super::StorageResult;
use super::TypeConfig;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";

/// Log store. Cheap to clone (the handles are shared); the clone is also the `LogReader`
/// handed to replication tasks.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: sled::Db,
    meta: sled::Tree,
    /// Never locked together with `recent`.
    wal: Arc<Mutex<Wal>>,
    recent: Arc<Mutex<Recent>>,
    /// One more than the last index the state machine has made durable (0: none).
    snapshot_durable: Arc<std::sync::atomic::AtomicU64>,
    /// The last log index openraft said is committed (for `flotilla_raft_commit_index`).
    committed: Arc<std::sync::atomic::AtomicU64>,
}

/// Most entries, and most bytes of their JSON, kept decoded in memory.
const RECENT_ENTRIES: usize = 256;
const RECENT_BYTES: usize = 8 << 20;

/// The newest appended entries, decoded: a contiguous run of indexes ending at the last
/// append, the same as the segment files hold for them. Only the one `&mut LogStore`
/// changes either, and never holds an entry here that the files do not: an append writes
/// the files first, a truncation or purge changes this first.
#[derive(Debug, Default)]
struct Recent {
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

impl Recent {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, entry: Entry<TypeConfig>, size: usize) {
        // Appends follow on from the last entry (after a truncation if needed); anything
        // else starts the run again.
        if self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index + 1 != entry.log_id.index)
        {
            self.clear();
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.entries.len() > RECENT_ENTRIES || self.bytes > RECENT_BYTES {
            let Some((_, n)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= n;
        }
    }

    /// Drops entries from index `from` on.
    fn truncate(&mut self, from: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index >= from)
        {
            let (_, n) = self.entries.pop_back().expect("checked");
            self.bytes -= n;
        }
    }

    /// Drops entries up to index `through`.
    fn purge(&mut self, through: u64) {
        while self
            .entries
            .front()
            .is_some_and(|(e, _)| e.log_id.index <= through)
        {
            let (_, n) = self.entries.pop_front().expect("checked");
            self.bytes -= n;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Entries `lo..=hi` if all of them are here.
    fn get(&self, lo: u64, hi: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let first = self.first_index()?;
        let last = self.entries.back()?.0.log_id.index;
        if lo < first || hi > last {
            return None;
        }
        let from = (lo - first) as usize;
        let to = (hi - first) as usize;
        Some(
            self.entries
                .range(from..=to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

impl LogStore {
    /// Opens the log: the vote and committed id in `db`, the entries in segment files in
    /// `wal_dir` (moved there from `db` if an older build kept them in it).
    /// `snapshot_durable` is the state machine's (`StateMachineStore::durable_snapshot`):
    /// the log is not purged on disk past it.
    pub fn new(
        db: sled::Db,
        wal_dir: &Path,
        snapshot_durable: Arc<std::sync::atomic::AtomicU64>,
    ) -> StorageResult<Self> {
        let meta = db
            .open_tree("meta")
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        let wal = super::wal::open(&db, &meta, wal_dir)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        Ok(Self {
            db,
            meta,
            wal: Arc::new(Mutex::new(wal)),
            snapshot_durable,
            recent: Arc::default(),
            committed: Arc::default(),
        })
    }

    /// The last index the state machine has made durable in a snapshot, if any.
    fn durable_snapshot(&self) -> Option<u64> {
        self.snapshot_durable
            .load(std::sync::atomic::Ordering::Acquire)
            .checked_sub(1)
    }

    /// The last log index known committed here, as openraft reports it to the store.
    pub fn committed_index(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.committed.clone()
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        subject: ErrorSubject<NodeId>,
    ) -> StorageResult<Option<T>> {
        let Some(bytes) = self
            .meta
            .get(key)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        let v = super::codec::decode(&bytes).map_err(|e| io_err(subject, ErrorVerb::Read, e))?;
        Ok(Some(v))
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        v: &T,
        subject: ErrorSubject<NodeId>,
    ) -> StorageResult<()> {
        let bytes =
            serde_json::to_vec(v).map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        self.meta
            .insert(key, bytes)
            .map_err(|e| io_err(subject, ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn flush(&self, subject: ErrorSubject<NodeId>) -> StorageResult<()> {
        // sled flushes the whole Db (all trees share one pagecache/log).
        self.db
            .flush_async()
            .await
            .map_err(|e| io_err(subject, ErrorVerb::Write, e))?;
        Ok(())
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().expect("log cache lock")
    }

    fn wal(&self) -> std::sync::MutexGuard<'_, Wal> {
        self.wal.lock().expect("log lock")
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        // Normalize to an inclusive [lo, hi] range; empty ranges return no entries.
        let lo = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => match i.checked_add(1) {
                Some(i) => i,
                None => return Ok(vec![]),
            },
            Bound::Unbounded => 0,
        };
        let hi = match range.end_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&0) => return Ok(vec![]),
            Bound::Excluded(&i) => i - 1,
            Bound::Unbounded => u64::MAX,
        };
        if lo > hi {
            return Ok(vec![]);
        }
        if let Some(entries) = self.recent().get(lo, hi) {
            return Ok(entries);
        }

        // Where they are, under the lock; read and decoded outside it.
        let found = self.wal().locate(lo, hi);
        let mut entries = Vec::with_capacity(found.len());
        for pos in found {
            let index = pos.log_id.index;
            let json = match Wal::read(&pos) {
                Ok(json) => json,
                // Truncated or purged since it was found (a replication task of a leader
                // that has just stepped down): the log ends before it now, as the
                // entries read so far do.
                Err(_) if !self.wal().holds(&pos) => break,
                Err(e) => {
                    return Err(StorageIOError::read_log_at_index(index, AnyError::new(&e)).into())
                }
            };
            let entry: Entry<TypeConfig> = super::codec::decode(&json)
                .map_err(|e| StorageIOError::read_log_at_index(index, AnyError::new(&e)))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let wal = self.wal();
        let last_purged_log_id = wal.purged();
        Ok(LogState {
            last_purged_log_id,
            last_log_id: wal.last().or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta(KEY_VOTE, vote, ErrorSubject::Vote)?;
        // Vote must be durable before returning.
        self.flush(ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.get_meta(KEY_VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        if let Some(c) = &committed {
            self.committed
                .store(c.index, std::sync::atomic::Ordering::Relaxed);
        }
        // Not flushed here (it would cost an fsync per commit): the next vote or snapshot
        // flush, or sled's periodic flush (every 500ms by default), persists it. A stale
        // `committed` only means fewer entries are re-applied inside `Raft::new()`; the rest
        // is re-committed and applied once the node has a leader again.
        self.put_meta(KEY_COMMITTED, &committed, ErrorSubject::Store)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        let committed = self
            .get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED, ErrorSubject::Store)?
            .flatten();
        // Defensive: openraft re-applies (last_applied, committed] from the log at startup and
        // fails if an entry is missing. Never report a committed id beyond the last stored log
        // (a lower committed is always safe to return).
        let last_log_id = self.get_log_state().await?.last_log_id;
        match (committed, last_log_id) {
            (Some(c), Some(last)) if c.index > last.index => Ok(Some(last)),
            (Some(_), None) => Ok(None),
            (c, _) => Ok(c),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut written = Vec::new();
        let mut decoded = Vec::new();
        for entry in entries {
            let v = serde_json::to_vec(&entry)
                .map_err(|e| StorageIOError::write_log_entry(entry.log_id, AnyError::new(&e)))?;
            written.push((entry.log_id, v));
            decoded.push(entry);
        }
        // The two locks are never held together: a reader that finds entries in `recent`
        // does not wait on the log's I/O. Only this `&mut` store changes either, and a
        // reader that misses `recent` finds the entries in the log.
        let purged = {
            let mut wal = self.wal();
            if let Err(e) = wal.append(&written, self.durable_snapshot()) {
                drop(wal);
                self.recent().clear();
                return Err(io_err(ErrorSubject::Logs, ErrorVerb::Write, e));
            }
            // Readable now; openraft hears they are flushed once they are on disk.
            wal.flush(Done::Raft(callback));
            wal.purged().map(|p| p.index)
        };
        // What the log skipped (at or below its purge point) is not held here either.
        let mut recent = self.recent();
        for (entry, (_, v)) in decoded.into_iter().zip(&written) {
            if purged.is_none_or(|p| entry.log_id.index > p) {
                recent.push(entry, v.len());
            }
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        tracing::debug!(%log_id, "truncate logs since (inclusive)");
        self.recent().truncate(log_id.index);
        self.wal()
            .truncate(log_id.index)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        tracing::debug!(%log_id, "purge logs upto (inclusive)");
        self.recent().purge(log_id.index);
        let durable = self.durable_snapshot();
        self.wal()
            .purge(log_id, durable)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, TaskRecord};
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn ids(entries: &[Entry<TypeConfig>]) -> Vec<(u64, u64)> {
        entries
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    /// The decoded copy answers only for runs it holds whole, and follows truncation,
    /// purges and its bounds.
    #[test]
    fn recent_entries_follow_the_log() {
        let mut r = Recent::default();
        for i in 1..=5 {
            r.push(entry(1, i), 10);
        }
        assert_eq!(ids(&r.get(2, 4).unwrap()), [(1, 2), (1, 3), (1, 4)]);
        assert!(r.get(0, 3).is_none(), "index 0 is not held");
        assert!(r.get(4, 6).is_none(), "index 6 is not held");
        // A follower's conflicting suffix is replaced by a new leader's entries.
        r.truncate(4);
        r.push(entry(2, 4), 10);
        assert_eq!(ids(&r.get(3, 4).unwrap()), [(1, 3), (2, 4)]);
        r.purge(2);
        assert!(r.get(2, 4).is_none());
        assert_eq!(r.bytes, 20);
        // A gap (an install of a snapshot moved the log on) starts the run again.
        r.push(entry(2, 9), 10);
        assert!(r.get(4, 4).is_none());
        assert_eq!(ids(&r.get(9, 9).unwrap()), [(2, 9)]);
        // Bounded by count and by bytes.
        for i in 10..10 + RECENT_ENTRIES as u64 + 5 {
            r.push(entry(2, i), 1);
        }
        assert_eq!(r.entries.len(), RECENT_ENTRIES);
        r.push(entry(2, 10 + RECENT_ENTRIES as u64 + 5), RECENT_BYTES);
        assert_eq!(
            r.entries.len(),
            1,
            "one entry over the byte budget alone is kept"
        );
    }

    /// The poison entry of issue #8: arguments nested close to serde_json's limit, wrapped
    /// by the entry in more levels. It must read back, or Raft stops for good.
    #[tokio::test]
    async fn an_entry_deeper_than_serde_json_allows_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = LogStore::new(db, &dir.path().join("wal"), Arc::default()).unwrap();
        let mut args = serde_json::json!("x");
        for _ in 0..300 {
            args = serde_json::json!({ "a": args });
        }
        let task = TaskRecord::new("t", "echo", "t", "a", args, 1);
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 7),
            payload: EntryPayload::Normal(Command::SubmitTask(Box::new(task.clone()))),
        };
        let bytes = serde_json::to_vec(&entry).unwrap();
        assert!(serde_json::from_slice::<Entry<TypeConfig>>(&bytes).is_err());
        store.wal().append(&[(entry.log_id, bytes)], None).unwrap();
        let mut reader = store.clone();
        let got = reader.try_get_log_entries(7..8).await.unwrap();
        match &got[0].payload {
            EntryPayload::Normal(Command::SubmitTask(t)) => assert_eq!(**t, task),
            other => panic!("{other:?}"),
        }
    }
}
