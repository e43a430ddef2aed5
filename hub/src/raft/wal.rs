//! The Raft log's entries on disk: a write-ahead log of chunk files (crate `raft-log`) in
//! `data_dir/raft.wal/`, apart from the sled database that holds the state machine.
//!
//! Why apart: with the entries in sled, every append's fsync flushed all of sled's dirty
//! pages (the history store's writes too), and every purge deleted entries key by key,
//! leaving garbage that sled's segment cleaner then copied around. Here an append costs a
//! write and an `fdatasync` of its own bytes, a purge removes whole chunk files once the
//! purge record is durable, and sled flushes in the background (it is made durable where it
//! must be: at each persisted snapshot, which comes before any purge of the log it covers).
//!
//! Each entry is stored as its JSON (`codec` reads it back), keyed by
//! `((term, leader node), index)`. The vote and the committed id stay in sled's `meta` tree.
//!
//! A data dir from before the WAL keeps its entries in sled's `logs` tree and the last purged
//! id in `meta`: `open` copies them into a new WAL beside the final directory, makes it
//! durable, renames it into place, and only then removes them from sled. The rename is what
//! decides: a crash before it leaves the old log in charge, a crash after it leaves only a
//! cleanup to finish.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::LogFlushed;
use openraft::{CommittedLeaderId, LogId};
use serde::Deserialize;

use super::{NodeId, TypeConfig};

pub(super) type Wal = raft_log::RaftLog<WalTypes>;

/// A log id as the WAL keys it: `((term, leader node), index)`, ordered as openraft orders
/// log ids.
pub(super) type WalLogId = ((u64, u64), u64);

/// Chunk files are this size at most: a purge frees whole chunks, and the open chunk's
/// entries are all held in memory by `raft-log`.
const CHUNK_BYTES: usize = 1 << 20;
/// Entries `raft-log` keeps in memory besides those of the open chunk.
const CACHE_ENTRIES: usize = 4096;
const CACHE_BYTES: usize = 8 << 20;
/// Buffer for reading a chunk at open (the crate's default is 64 MiB).
const READ_BUFFER: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct WalTypes;

impl raft_log::Types for WalTypes {
    type LogId = WalLogId;
    /// The entry's JSON.
    type LogPayload = Vec<u8>;
    /// Unused: the vote lives in sled's `meta` tree.
    type Vote = ();
    type UserData = ();
    type Callback = Flushed;

    fn log_index(log_id: &WalLogId) -> u64 {
        log_id.1
    }

    fn payload_size(payload: &Vec<u8>) -> u64 {
        payload.len() as u64
    }
}

/// Who hears that a flush reached the disk.
pub(super) enum Flushed {
    /// openraft, for an append.
    Raft(LogFlushed<TypeConfig>),
    /// A task waiting for it.
    Wait(tokio::sync::oneshot::Sender<io::Result<()>>),
    /// A thread blocked on it (opening and migrating, before the runtime's tasks run).
    Block(std::sync::mpsc::SyncSender<io::Result<()>>),
}

impl raft_log::Callback for Flushed {
    fn send(self, res: io::Result<()>) {
        match self {
            Self::Raft(cb) => cb.log_io_completed(res),
            Self::Wait(tx) => {
                let _ = tx.send(res);
            }
            // The crate's own callback for a channel.
            Self::Block(tx) => raft_log::Callback::send(tx, res),
        }
    }
}

pub(super) fn to_wal(id: &LogId<NodeId>) -> WalLogId {
    ((id.leader_id.term, id.leader_id.node_id), id.index)
}

pub(super) fn from_wal(id: &WalLogId) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(id.0 .0, id.0 .1), id.1)
}

fn config(dir: &Path) -> Arc<raft_log::Config> {
    Arc::new(raft_log::Config {
        dir: dir.to_string_lossy().into_owned(),
        log_cache_max_items: Some(CACHE_ENTRIES),
        log_cache_capacity: Some(CACHE_BYTES),
        read_buffer_size: Some(READ_BUFFER),
        chunk_max_size: Some(CHUNK_BYTES),
        ..Default::default()
    })
}

/// Waits, blocking the thread, until what was written to `wal` is on disk.
pub(super) fn flush_blocking(wal: &mut Wal) -> io::Result<()> {
    use raft_log::api::raft_log_writer::RaftLogWriter;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    wal.flush(Flushed::Block(tx))?;
    rx.recv()
        .map_err(|_| io::Error::other("the log's flush worker stopped"))?
}

/// Removes the entries from `index` on.
///
/// `raft-log` cuts after the entry before `index`, or after the purge point; a log that
/// starts above index 0 with nothing purged (openraft's own logs start at 0, its storage
/// suite's at 1) has neither, so the purge point is first moved to just before its first
/// entry (purging nothing).
pub(super) fn truncate(wal: &mut Wal, index: u64) -> io::Result<()> {
    use raft_log::api::raft_log_writer::RaftLogWriter;
    let state = wal.log_state();
    let at_purge_point = index == <WalTypes as raft_log::Types>::next_log_index(state.purged());
    if !at_purge_point && index > 0 && wal.read(index - 1, index).next().is_none() {
        let Some(first) = wal.read(0, u64::MAX).next().transpose()?.map(|(id, _)| id) else {
            return Ok(());
        };
        if index > first.1 {
            return Err(io::Error::other(format!(
                "cannot cut the log at {index}: entry {} is missing",
                index - 1
            )));
        }
        wal.purge(((first.0 .0, first.0 .1), first.1 - 1))?;
        return wal.truncate(first.1).map(|_| ());
    }
    wal.truncate(index).map(|_| ())
}

/// Only the log id of a stored entry (serde ignores the `payload` field).
#[derive(Deserialize)]
struct StoredLogId {
    log_id: LogId<NodeId>,
}

const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// Opens the WAL at `dir`, first moving a log kept in sled (`logs` tree, and `last_purged`
/// in `meta`) into it when `dir` does not exist yet.
pub(super) fn open(db: &sled::Db, meta: &sled::Tree, dir: &Path) -> io::Result<Wal> {
    let old = db.open_tree("logs").map_err(io::Error::other)?;
    if !dir.exists() {
        let fresh = PathBuf::from(format!("{}.new", dir.display()));
        if fresh.exists() {
            std::fs::remove_dir_all(&fresh)?;
        }
        flotilla_common::pki::private_dir(&fresh).map_err(|e| io::Error::other(e.to_string()))?;
        let mut wal = Wal::open(config(&fresh))?;
        copy_sled_log(&old, meta, &mut wal)?;
        flush_blocking(&mut wal)?;
        drop(wal);
        std::fs::rename(&fresh, dir)?;
        if let Some(parent) = dir.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
    }
    if !old.is_empty()
        || meta
            .contains_key(KEY_LAST_PURGED)
            .map_err(io::Error::other)?
    {
        let moved = old.len();
        old.clear().map_err(io::Error::other)?;
        meta.remove(KEY_LAST_PURGED).map_err(io::Error::other)?;
        db.flush().map_err(io::Error::other)?;
        tracing::info!(
            entries = moved,
            wal = %dir.display(),
            "moved the raft log out of sled into its write-ahead log"
        );
    }
    Wal::open(config(dir))
}

fn copy_sled_log(old: &sled::Tree, meta: &sled::Tree, wal: &mut Wal) -> io::Result<()> {
    use raft_log::api::raft_log_writer::RaftLogWriter;
    if let Some(bytes) = meta.get(KEY_LAST_PURGED).map_err(io::Error::other)? {
        let purged: LogId<NodeId> = super::codec::decode(&bytes).map_err(io::Error::other)?;
        wal.purge(to_wal(&purged))?;
    }
    for kv in old.iter() {
        let (_, v) = kv.map_err(io::Error::other)?;
        let id: StoredLogId = super::codec::decode(&v).map_err(io::Error::other)?;
        // An entry a purge left behind before a crash (the purge id was written first).
        if wal
            .log_state()
            .purged()
            .is_some_and(|p| p.1 >= id.log_id.index)
        {
            continue;
        }
        wal.append([(to_wal(&id.log_id), v.to_vec())])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{Entry, EntryPayload};

    fn entry_json(term: u64, index: u64) -> Vec<u8> {
        serde_json::to_vec(&Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        })
        .unwrap()
    }

    /// A data dir whose log is in sled comes up with the same entries and purge point in
    /// the WAL, and sled no longer holds them; opening again changes nothing.
    #[test]
    fn a_log_kept_in_sled_moves_into_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("raft"))
            .open()
            .unwrap();
        let meta = db.open_tree("meta").unwrap();
        let logs = db.open_tree("logs").unwrap();
        // Purged through 3; entry 3 was left behind by a crash between the two writes.
        let purged = LogId::new(CommittedLeaderId::new(1, 1), 3);
        meta.insert(KEY_LAST_PURGED, serde_json::to_vec(&purged).unwrap())
            .unwrap();
        for (term, index) in [(1u64, 3u64), (1, 4), (2, 5), (2, 6)] {
            logs.insert(index.to_be_bytes(), entry_json(term, index))
                .unwrap();
        }
        let path = dir.path().join("raft.wal");
        let wal = open(&db, &meta, &path).unwrap();
        assert_eq!(wal.log_state().purged().map(from_wal), Some(purged));
        let got: Vec<_> = wal.read(0, 10).map(|r| r.unwrap()).collect();
        assert_eq!(
            got,
            [
                (((1, 1), 4), entry_json(1, 4)),
                (((2, 1), 5), entry_json(2, 5)),
                (((2, 1), 6), entry_json(2, 6)),
            ]
        );
        assert!(logs.is_empty());
        assert!(!meta.contains_key(KEY_LAST_PURGED).unwrap());
        drop(wal);

        let again = open(&db, &meta, &path).unwrap();
        assert_eq!(again.read(0, 10).count(), 3);
        assert_eq!(
            again.log_state().last().map(from_wal).map(|l| l.index),
            Some(6)
        );
    }

    /// A migration cut short before its rename is done again from sled; one cut short after
    /// it only clears sled.
    #[test]
    fn a_migration_cut_short_is_finished_on_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("raft"))
            .open()
            .unwrap();
        let meta = db.open_tree("meta").unwrap();
        let logs = db.open_tree("logs").unwrap();
        for index in 1..=3u64 {
            logs.insert(index.to_be_bytes(), entry_json(1, index))
                .unwrap();
        }
        let path = dir.path().join("raft.wal");
        // Before the rename: a half-written WAL beside the final directory.
        let half = PathBuf::from(format!("{}.new", path.display()));
        std::fs::create_dir_all(&half).unwrap();
        std::fs::write(half.join("garbage"), b"x").unwrap();
        let wal = open(&db, &meta, &path).unwrap();
        assert_eq!(wal.read(0, 10).count(), 3);
        assert!(!half.exists());
        drop(wal);

        // After the rename, before sled was cleared: sled's copy is dropped, the WAL kept.
        logs.insert(9u64.to_be_bytes(), entry_json(1, 9)).unwrap();
        let wal = open(&db, &meta, &path).unwrap();
        assert_eq!(wal.read(0, 10).count(), 3);
        assert!(logs.is_empty());
    }
}
