//! The Raft log's entries on disk, apart from the sled database that holds the state
//! machine: segment files in `data_dir/raft.wal/`.
//!
//! Why apart: with the entries in sled, every append's fsync flushed all of sled's dirty
//! pages (the history store's writes too), and every purge deleted entries key by key,
//! leaving garbage that sled's segment cleaner then copied around. Here an append costs a
//! write and an `fdatasync` of its own bytes, and a purge unlinks whole files.
//!
//! Layout:
//! - `<first index, 20 digits>.seg`: records, each `[len u32][crc32 u32][body]` (little
//!   endian) with body = `[index u64][term u64][leader node u64][entry JSON]` and the CRC
//!   over the body. Indexes run on without a gap within a segment and from one segment to
//!   the next. A segment is created as `segment_bytes` of zeros (written under another
//!   name, synced, renamed into place), so that an append's `fdatasync` writes back only
//!   data, not the file's size or block map (a full segment goes past that size by its
//!   last record); the records end at a header of zeros or at the end of the file (older
//!   builds did not fill segments), and only zeros follow.
//! - `purged`: the last purged log id (JSON), replaced whole (written beside, synced,
//!   renamed). Records at or below it are ignored wherever they still are.
//!
//! What makes it survive a crash at any point:
//! - an append is acknowledged only after `fdatasync` of the segment it went to;
//! - a segment is full before the next is created, and is synced before the next is
//!   created, so only the last segment can end in a torn write: at open, the last segment
//!   is cut at its first record that does not check out (length, CRC, index), or where a
//!   zero header is followed by anything but zeros, by writing zeros over the rest (a
//!   record left there could otherwise be read as a later entry once new records are
//!   written over the start of it). A bad record or bytes after the end in any other
//!   segment are damage this log did not make, and opening fails;
//! - a purge makes `purged` durable before it unlinks anything, so a crash in between
//!   leaves files that the next open removes;
//! - a purge past what the state machine has made durable (a follower installing a
//!   snapshot: openraft purges the log while the install is still running) takes effect in
//!   memory at once and on disk only once the snapshot is durable, so a crash in between
//!   leaves the old log, not a log purged past a state machine that never got there;
//! - a truncation unlinks whole segments from the newest back and syncs the directory,
//!   then writes zeros over the cut records of the one left and syncs it, so what survives
//!   a crash is always a prefix.
//!
//! Log ids are ordered by index alone: a truncation cuts at an index, whatever the terms.
//!
//! Syncs for appends run on a thread of their own (`Flusher`): appends that arrive while
//! one sync runs share the next one.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use openraft::storage::LogFlushed;
use openraft::{CommittedLeaderId, LogId};
use serde::Deserialize;

use super::{NodeId, TypeConfig};

/// A segment takes no more appends once it holds this much; purges free whole segments.
/// (A failpoints build takes `FLOTILLA_TEST_WAL_SEGMENT_BYTES`, for tests that need many
/// rollovers.)
const SEGMENT_BYTES: u64 = 2 << 20;
/// Record header: length and CRC.
const HEADER: usize = 8;
/// Body prefix: index, term, leader node.
const ID_BYTES: usize = 24;
/// No record is larger (entries are bounded far below by the request limits); a length
/// above it is a torn or damaged header, not a record.
const MAX_BODY: usize = 256 << 20;
const PURGED: &str = "purged";

/// Where a held entry's record is.
#[derive(Clone, Debug)]
pub(super) struct Pos {
    pub(super) log_id: LogId<NodeId>,
    file: Arc<File>,
    offset: u64,
    /// The whole record, header included.
    len: u32,
}

#[derive(Debug)]
struct Segment {
    first: u64,
    /// One past the index of its last record.
    next: u64,
    path: PathBuf,
    file: Arc<File>,
    len: u64,
}

/// The log's files and where each held entry is.
#[derive(Debug)]
pub(super) struct Wal {
    dir: PathBuf,
    /// The purge point openraft set: nothing at or below it is held.
    purged: Option<LogId<NodeId>>,
    /// The purge point in the `purged` file; records between the two are still on disk.
    purged_on_disk: Option<LogId<NodeId>>,
    /// Oldest first; the last takes appends.
    segments: VecDeque<Segment>,
    /// Every entry above `purged`, in index order without gaps.
    entries: VecDeque<Pos>,
    segment_bytes: u64,
    flusher: mpsc::Sender<Flush>,
}

/// Who hears that an append reached the disk.
pub(super) enum Done {
    Raft(LogFlushed<TypeConfig>),
    Wait(std::sync::mpsc::SyncSender<io::Result<()>>),
}

impl Done {
    fn send(self, res: io::Result<()>) {
        match self {
            Done::Raft(cb) => cb.log_io_completed(res),
            Done::Wait(tx) => {
                let _ = tx.send(res);
            }
        }
    }
}

struct Flush {
    file: Option<Arc<File>>,
    done: Done,
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

fn open_segment(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes zeros over `from..to` of `file`.
fn zero(file: &File, from: u64, to: u64) -> io::Result<()> {
    const CHUNK: u64 = 64 << 10;
    let zeros = vec![0u8; CHUNK.min(to.saturating_sub(from)) as usize];
    let mut at = from;
    while at < to {
        let n = CHUNK.min(to - at) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Creates the segment file at `path`, `size` bytes of zeros already on disk: appends then
/// overwrite blocks that exist, and the `fdatasync` after each has no file size or block
/// map to write back, only the data (on ext4, one write to the disk instead of two). It is
/// filled under a name of its own and renamed into place, so a segment file is always
/// whole. Only the `fdatasync` after the last record of a segment, the one that goes past
/// its end, writes a new size.
fn create_segment(dir: &Path, path: &Path, size: u64) -> io::Result<File> {
    let name = path.file_name().expect("a segment name").to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    zero(&file, 0, size)?;
    file.sync_data()?;
    // This process is the directory's only writer (a second hub on the data dir stops at
    // sled's lock on its database, taken before the log is opened), so nothing can create
    // the name between the check and the rename. (Not a hard link that fails if the name
    // exists: some volumes, SMB and some FUSE mounts, have no hard links.)
    if path.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{}: a segment is already there", path.display()),
        ));
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)?;
    Ok(file)
}

/// Whether `bytes` starts where a segment's records end: a header of zeros (a segment is
/// created full of zeros) or fewer bytes than a header, all zero.
fn is_end(bytes: &[u8]) -> bool {
    bytes[..HEADER.min(bytes.len())].iter().all(|b| *b == 0)
}

/// Encodes one record.
fn record(log_id: &LogId<NodeId>, json: &[u8], out: &mut Vec<u8>) {
    let body_len = ID_BYTES + json.len();
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&log_id.index.to_le_bytes());
    out.extend_from_slice(&log_id.leader_id.term.to_le_bytes());
    out.extend_from_slice(&log_id.leader_id.node_id.to_le_bytes());
    out.extend_from_slice(json);
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes the record at the start of `buf`: its log id, its JSON and its whole length, or
/// why it is not a record.
fn parse(buf: &[u8]) -> Result<(LogId<NodeId>, &[u8], usize), String> {
    if buf.len() < HEADER {
        return Err(format!("{} bytes, shorter than a record header", buf.len()));
    }
    let body_len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if !(ID_BYTES..=MAX_BODY).contains(&body_len) {
        return Err(format!("a record length of {body_len} bytes"));
    }
    let Some(body) = buf.get(HEADER..HEADER + body_len) else {
        return Err(format!(
            "a record of {body_len} bytes with {} left",
            buf.len() - HEADER
        ));
    };
    if crc32fast::hash(body) != crc {
        return Err("a record whose CRC does not match".into());
    }
    let word = |i: usize| u64::from_le_bytes(body[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let log_id = LogId::new(CommittedLeaderId::new(word(1), word(2)), word(0));
    Ok((log_id, &body[ID_BYTES..], HEADER + body_len))
}

impl Wal {
    /// Opens the log in `dir`, creating it if needed, and cuts a torn tail off its last
    /// segment.
    pub(super) fn open(dir: &Path) -> io::Result<Wal> {
        flotilla_common::pki::private_dir(dir).map_err(|e| io::Error::other(e.to_string()))?;
        let purged = match std::fs::read(dir.join(PURGED)) {
            Ok(bytes) => Some(
                super::codec::decode::<LogId<NodeId>>(&bytes)
                    .map_err(|e| corrupt(format!("{}: {e}", dir.join(PURGED).display())))?,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut firsts = Vec::new();
        for item in std::fs::read_dir(dir)? {
            let name = item?.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name
                .strip_suffix(".seg")
                .and_then(|n| n.parse::<u64>().ok())
            {
                if name != segment_name(first) {
                    return Err(corrupt(format!(
                        "{}: a segment file this log did not name",
                        dir.join(&*name).display()
                    )));
                }
                firsts.push(first);
            } else if name.starts_with('.') && name.ends_with(".tmp") {
                // A `purged` file or a new segment whose rename never happened.
                let _ = std::fs::remove_file(dir.join(&*name));
            }
        }
        firsts.sort_unstable();

        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("raft-wal-sync".into())
            .spawn(move || Flusher { rx }.run())?;
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            purged,
            purged_on_disk: purged,
            segments: VecDeque::new(),
            entries: VecDeque::new(),
            segment_bytes: crate::faults::test_setting(
                "FLOTILLA_TEST_WAL_SEGMENT_BYTES",
                SEGMENT_BYTES,
            ),
            flusher: tx,
        };
        let count = firsts.len();
        let mut next: Option<u64> = None;
        for (i, first) in firsts.into_iter().enumerate() {
            let path = dir.join(segment_name(first));
            let last = i + 1 == count;
            // A gap is damage, unless all it leaves out is purged anyway (unlinks of purged
            // segments reordered by a crash).
            let covered = wal
                .purged
                .is_some_and(|p| first <= p.index.saturating_add(1));
            if next.is_some_and(|n| n != first) && !covered {
                return Err(corrupt(format!(
                    "{}: the previous segment ends at {}, this one starts at {first}",
                    path.display(),
                    next.unwrap_or_default().saturating_sub(1)
                )));
            }
            let file = Arc::new(open_segment(&path)?);
            let bytes = std::fs::read(&path)?;
            let mut at = 0usize;
            let mut index = first;
            while at < bytes.len() {
                let problem = if is_end(&bytes[at..]) {
                    // The records end here; nothing may follow but zeros, or a record
                    // left from before a crash could be read as a later entry once new
                    // ones are written over the start of it.
                    match bytes[at..].iter().position(|b| *b != 0) {
                        None => break,
                        Some(n) => format!("{n} zero bytes, then more after the last record"),
                    }
                } else {
                    match parse(&bytes[at..]) {
                        Ok((log_id, _, len)) if log_id.index == index && index < u64::MAX => {
                            if wal.purged.is_none_or(|p| log_id.index > p.index) {
                                wal.entries.push_back(Pos {
                                    log_id,
                                    file: file.clone(),
                                    offset: at as u64,
                                    len: len as u32,
                                });
                            }
                            at += len;
                            index = index.saturating_add(1);
                            continue;
                        }
                        Ok((log_id, _, _)) => {
                            format!("entry {} where {index} belongs", log_id.index)
                        }
                        Err(problem) => problem,
                    }
                };
                if !last {
                    return Err(corrupt(format!(
                        "{}: {problem} at byte {at}; only the last segment may end in a torn write",
                        path.display()
                    )));
                }
                tracing::warn!(
                    segment = %path.display(),
                    at,
                    dropped_bytes = bytes.iter().rposition(|b| *b != 0).map_or(at, |p| p + 1).saturating_sub(at),
                    %problem,
                    "cutting the raft log at its first record that does not check out: a torn write from a crash during an append, which was never acknowledged; or, if the disk damaged a record, entries this hub acknowledged are gone and it relies on the other hubs for them"
                );
                zero(&file, at as u64, bytes.len() as u64)?;
                file.sync_data()?;
                break;
            }
            if at == 0 && last {
                // Created at a rollover, crashed before its first record was durable.
                std::fs::remove_file(&path)?;
                sync_dir(dir)?;
                break;
            }
            next = Some(index);
            wal.segments.push_back(Segment {
                first,
                next: index,
                path,
                file,
                len: at as u64,
            });
        }
        // Segments a purge made durable but did not get to unlink.
        wal.unlink_purged()?;
        Ok(wal)
    }

    pub(super) fn purged(&self) -> Option<LogId<NodeId>> {
        self.purged
    }

    /// Whether the entry at `pos` is still held there (a truncation or purge since may
    /// have removed it).
    pub(super) fn holds(&self, pos: &Pos) -> bool {
        self.locate(pos.log_id.index, pos.log_id.index)
            .first()
            .is_some_and(|p| {
                p.log_id == pos.log_id && p.offset == pos.offset && Arc::ptr_eq(&p.file, &pos.file)
            })
    }

    pub(super) fn last(&self) -> Option<LogId<NodeId>> {
        self.entries.back().map(|p| p.log_id)
    }

    /// Where the held entries `lo..=hi` are.
    pub(super) fn locate(&self, lo: u64, hi: u64) -> Vec<Pos> {
        let Some(first) = self.entries.front().map(|p| p.log_id.index) else {
            return vec![];
        };
        let from = lo.saturating_sub(first) as usize;
        let to = hi.saturating_sub(first).saturating_add(1);
        let to = usize::try_from(to)
            .unwrap_or(usize::MAX)
            .min(self.entries.len());
        if hi < first || from >= to {
            return vec![];
        }
        self.entries.range(from..to).cloned().collect()
    }

    /// Writes entries (log id and JSON) after the last one held: they are readable when
    /// this returns and durable once a `flush` after it reports so. Entries at or below the
    /// purge point are skipped; entries at or below the last one held replace it and all
    /// after it. `durable_upto` is as for `purge`.
    pub(super) fn append(
        &mut self,
        entries: &[(LogId<NodeId>, Vec<u8>)],
        durable_upto: Option<u64>,
    ) -> io::Result<()> {
        let purged = self.purged.map(|p| p.index);
        let entries: Vec<_> = entries
            .iter()
            .filter(|(id, _)| purged.is_none_or(|p| id.index > p))
            .collect();
        let Some(first) = entries.first().map(|(id, _)| id.index) else {
            return Ok(());
        };
        self.persist_purge(durable_upto)?;
        if self.last().is_some_and(|l| first <= l.index) {
            self.truncate(first)?;
        }
        if self.segments.back().is_some_and(|s| s.next != first)
            && self.purged.map(|p| p.index) > self.purged_on_disk.map(|p| p.index)
        {
            // The log goes on past a purge not yet on disk, after records that purge
            // covers: the purge must be on disk first, or the segments would have a gap.
            // openraft sends a follower entries past an installed snapshot only once the
            // install is done, so this is not reached in a cluster.
            tracing::debug!(
                first,
                "making a pending purge durable before an append past it"
            );
            self.persist_purge(Some(u64::MAX))?;
        }
        if let Some(back) = self.segments.back().filter(|s| s.next != first) {
            return Err(io::Error::other(format!(
                "append of entry {first} after records up to {}: the log has no gaps",
                back.next.saturating_sub(1)
            )));
        }
        let mut expect = self.last().map(|l| l.index.saturating_add(1));
        let mut buf = Vec::new();
        let mut offsets = Vec::new();
        for (id, json) in entries {
            if expect.is_some_and(|e| e != id.index) {
                return Err(io::Error::other(format!(
                    "append of entry {} after {}: the log has no gaps",
                    id.index,
                    expect.unwrap_or_default() - 1
                )));
            }
            expect = Some(id.index.saturating_add(1));
            if self
                .segments
                .back()
                .is_none_or(|s| s.len + buf.len() as u64 >= self.segment_bytes)
            {
                self.write_out(&mut buf, &mut offsets)?;
                self.roll_over(id.index)?;
            }
            let start = buf.len();
            record(id, json, &mut buf);
            offsets.push((*id, start, buf.len() - start));
        }
        self.write_out(&mut buf, &mut offsets)
    }

    /// Writes what `append` encoded for the last segment and records where it went.
    fn write_out(
        &mut self,
        buf: &mut Vec<u8>,
        offsets: &mut Vec<(LogId<NodeId>, usize, usize)>,
    ) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let seg = self.segments.back_mut().expect("a segment to write to");
        seg.file.write_all_at(buf, seg.len)?;
        for (log_id, start, len) in offsets.drain(..) {
            seg.next = log_id.index.saturating_add(1);
            self.entries.push_back(Pos {
                log_id,
                file: seg.file.clone(),
                offset: seg.len + start as u64,
                len: len as u32,
            });
        }
        seg.len += buf.len() as u64;
        buf.clear();
        Ok(())
    }

    /// Starts a new segment at `first`, after making the one before it durable.
    fn roll_over(&mut self, first: u64) -> io::Result<()> {
        if let Some(seg) = self.segments.back() {
            seg.file.sync_data()?;
        }
        let path = self.dir.join(segment_name(first));
        let file = create_segment(&self.dir, &path, self.segment_bytes)?;
        self.segments.push_back(Segment {
            first,
            next: first,
            path,
            file: Arc::new(file),
            len: 0,
        });
        Ok(())
    }

    /// Asks for what was written so far to be made durable; `done` hears when it is.
    pub(super) fn flush(&self, done: Done) {
        let file = self.segments.back().map(|s| s.file.clone());
        if let Err(mpsc::SendError(f)) = self.flusher.send(Flush { file, done }) {
            f.done
                .send(Err(io::Error::other("the raft log's sync thread stopped")));
        }
    }

    /// `flush`, waiting for it (blocking the thread).
    pub(super) fn sync(&self) -> io::Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.flush(Done::Wait(tx));
        rx.recv()
            .map_err(|_| io::Error::other("the raft log's sync thread stopped"))?
    }

    /// Removes the entries from `index` on, durably.
    pub(super) fn truncate(&mut self, index: u64) -> io::Result<()> {
        let mut unlinked = false;
        while self.segments.back().is_some_and(|s| s.first >= index) {
            let seg = self.segments.pop_back().expect("checked");
            std::fs::remove_file(&seg.path)?;
            unlinked = true;
        }
        if unlinked {
            // Before the cut below: a cut segment followed by one it no longer leads to
            // would not open.
            sync_dir(&self.dir)?;
        }
        // Where the first removed entry starts, if it is in the segment that is left.
        let mut cut = None;
        while self.entries.back().is_some_and(|p| p.log_id.index >= index) {
            let pos = self.entries.pop_back().expect("checked");
            if let Some(seg) = self.segments.back() {
                if Arc::ptr_eq(&pos.file, &seg.file) {
                    cut = Some((pos.offset, pos.log_id.index));
                }
            }
        }
        if let (Some(seg), Some((offset, next))) = (self.segments.back_mut(), cut) {
            if offset < seg.len {
                // Zeros, not a shorter file: the next records are written over blocks
                // that exist, and the records now end at `offset` for the next open.
                zero(&seg.file, offset, seg.len)?;
                seg.file.sync_data()?;
                seg.len = offset;
                seg.next = next;
            }
        }
        Ok(())
    }

    /// Forgets the entries up to `log_id`. On disk, the purge point is written and the
    /// segments that hold nothing else are unlinked now if `log_id` is at or below
    /// `durable_upto` (the last index the state machine has made durable; `None` for
    /// none), and otherwise at a later call once it is.
    pub(super) fn purge(
        &mut self,
        log_id: LogId<NodeId>,
        durable_upto: Option<u64>,
    ) -> io::Result<()> {
        if self.purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        self.purged = Some(log_id);
        while self
            .entries
            .front()
            .is_some_and(|p| p.log_id.index <= log_id.index)
        {
            self.entries.pop_front();
        }
        self.persist_purge(durable_upto)
    }

    /// Writes the purge point to disk if it is newer there and at or below `durable_upto`,
    /// then unlinks what it covers.
    fn persist_purge(&mut self, durable_upto: Option<u64>) -> io::Result<()> {
        let Some(purged) = self.purged else {
            return Ok(());
        };
        if self.purged_on_disk.is_some_and(|p| p.index >= purged.index)
            || durable_upto.is_none_or(|d| purged.index > d)
        {
            return Ok(());
        }
        let json = serde_json::to_vec(&purged).map_err(io::Error::other)?;
        flotilla_common::pki::write_whole(&self.dir.join(PURGED), &json, 0o600)
            .map_err(|e| io::Error::other(e.to_string()))?;
        // `write_whole` syncs the rename as best it can; here a failure must stop the
        // unlinks below.
        sync_dir(&self.dir)?;
        self.purged_on_disk = Some(purged);
        self.unlink_purged()
    }

    /// Unlinks the oldest segments while every record they hold is at or below the purge
    /// point on disk.
    fn unlink_purged(&mut self) -> io::Result<()> {
        let Some(purged) = self.purged_on_disk.map(|p| p.index) else {
            return Ok(());
        };
        while self
            .segments
            .front()
            .is_some_and(|s| s.next <= purged.saturating_add(1))
        {
            let seg = self.segments.pop_front().expect("checked");
            std::fs::remove_file(&seg.path)?;
        }
        Ok(())
    }

    /// Reads the JSON of the entry at `pos`, checking that the record is whole and is that
    /// entry.
    pub(super) fn read(pos: &Pos) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; pos.len as usize];
        pos.file.read_exact_at(&mut buf, pos.offset)?;
        match parse(&buf) {
            Ok((log_id, json, _)) if log_id == pos.log_id => Ok(json.to_vec()),
            Ok((log_id, _, _)) => Err(corrupt(format!(
                "read entry {log_id} where {} was written",
                pos.log_id
            ))),
            Err(problem) => Err(corrupt(format!("entry {}: {problem}", pos.log_id))),
        }
    }
}

/// Makes appends durable, in the order they were asked for, and says so.
struct Flusher {
    rx: mpsc::Receiver<Flush>,
}

impl Flusher {
    fn run(self) {
        while let Ok(first) = self.rx.recv() {
            let mut batch = vec![first];
            batch.extend(self.rx.try_iter());
            // One sync per file, oldest file first (a rollover already synced the file
            // before the newest, so this is one sync in all but rare cases).
            let mut synced: Vec<Arc<File>> = Vec::new();
            let mut failed: Option<(io::ErrorKind, String)> = None;
            for f in &batch {
                let Some(file) = &f.file else { continue };
                if failed.is_some() || synced.iter().any(|s| Arc::ptr_eq(s, file)) {
                    continue;
                }
                if let Err(e) = file.sync_data() {
                    tracing::error!(error = %e, "syncing the raft log failed");
                    failed = Some((e.kind(), e.to_string()));
                }
                synced.push(file.clone());
            }
            for f in batch {
                f.done.send(match &failed {
                    None => Ok(()),
                    Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
                });
            }
        }
    }
}

/// Only the log id of an entry's JSON (serde ignores the `payload` field).
#[derive(Deserialize)]
struct StoredLogId {
    log_id: LogId<NodeId>,
}

const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// Opens the log at `dir`, first moving a log kept in sled by older builds (`logs` tree,
/// and `last_purged` in `meta`) into it when `dir` does not exist yet.
///
/// The copy is made in a directory beside `dir`, made durable, and renamed into place;
/// only then is sled's copy removed. The rename decides: a crash before it leaves the old
/// log in charge (the copy is made again), a crash after it leaves only sled to clear.
pub(super) fn open(db: &sled::Db, meta: &sled::Tree, dir: &Path) -> io::Result<Wal> {
    let old = db.open_tree("logs").map_err(io::Error::other)?;
    if !dir.exists() {
        let fresh = PathBuf::from(format!("{}.new", dir.display()));
        if fresh.exists() {
            std::fs::remove_dir_all(&fresh)?;
        }
        let mut wal = Wal::open(&fresh)?;
        copy_sled_log(&old, meta, &mut wal)?;
        wal.sync()?;
        drop(wal);
        std::fs::rename(&fresh, dir)?;
        flotilla_common::pki::sync_dir(dir);
    }
    if let Some((_, v)) = old.last().map_err(io::Error::other)? {
        // Left by a migration cut short after its rename, sled's entries are all in the
        // segment files too (or purged there). Any other entry was written by an older
        // build run on this data dir after this one: dropping it could lose what was
        // acknowledged.
        let id: StoredLogId = super::codec::decode(&v).map_err(io::Error::other)?;
        let id = id.log_id;
        let wal = Wal::open(dir)?;
        let purged = wal.purged().is_some_and(|p| id.index <= p.index);
        let held = wal.locate(id.index, id.index).first().map(|p| p.log_id);
        if !purged && held != Some(id) {
            return Err(io::Error::other(format!(
                "the raft log in sled ends at entry {id}, which {} does not hold: an older \
                 flotilla ran on this data dir after this one moved its log out of sled; run \
                 the older build, or restore the data dir from before it ran",
                dir.display()
            )));
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
            "moved the raft log out of sled into its own segment files"
        );
    }
    Wal::open(dir)
}

fn copy_sled_log(old: &sled::Tree, meta: &sled::Tree, wal: &mut Wal) -> io::Result<()> {
    if let Some(bytes) = meta.get(KEY_LAST_PURGED).map_err(io::Error::other)? {
        let purged: LogId<NodeId> = super::codec::decode(&bytes).map_err(io::Error::other)?;
        wal.purge(purged, Some(u64::MAX))?;
    }
    let mut batch = Vec::new();
    for kv in old.iter() {
        let (_, v) = kv.map_err(io::Error::other)?;
        let id: StoredLogId = super::codec::decode(&v).map_err(io::Error::other)?;
        batch.push((id.log_id, v.to_vec()));
        if batch.len() >= 1024 {
            wal.append(&batch, None)?;
            batch.clear();
        }
    }
    wal.append(&batch, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{Entry, EntryPayload};

    fn id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entry_json(term: u64, index: u64) -> Vec<u8> {
        serde_json::to_vec(&Entry::<TypeConfig> {
            log_id: id(term, index),
            payload: EntryPayload::Blank,
        })
        .unwrap()
    }

    fn append(wal: &mut Wal, term: u64, indexes: std::ops::RangeInclusive<u64>) {
        let batch: Vec<_> = indexes
            .map(|i| (id(term, i), entry_json(term, i)))
            .collect();
        wal.append(&batch, None).unwrap();
        wal.sync().unwrap();
    }

    /// (term, index) of every held entry, read back from disk.
    fn held(wal: &Wal) -> Vec<(u64, u64)> {
        wal.locate(0, u64::MAX)
            .iter()
            .map(|p| {
                let json = Wal::read(p).unwrap();
                let e: StoredLogId = serde_json::from_slice(&json).unwrap();
                assert_eq!(e.log_id, p.log_id);
                (e.log_id.leader_id.term, e.log_id.index)
            })
            .collect()
    }

    fn segments(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".seg"))
            .collect();
        names.sort();
        names
    }

    /// A big entry, so that a few fill a segment.
    fn big(term: u64, index: u64) -> (LogId<NodeId>, Vec<u8>) {
        let mut json = entry_json(term, index);
        json.extend(std::iter::repeat_n(b' ', (SEGMENT_BYTES / 4) as usize));
        (id(term, index), json)
    }

    #[test]
    fn entries_survive_a_reopen_across_segments_truncation_and_purge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let mut wal = Wal::open(&path).unwrap();
        assert_eq!(wal.last(), None);
        let batch: Vec<_> = (1..=10).map(|i| big(1, i)).collect();
        wal.append(&batch, None).unwrap();
        wal.sync().unwrap();
        assert_eq!(
            segments(&path),
            [segment_name(1), segment_name(5), segment_name(9)]
        );
        // A new leader's entries replace a conflicting suffix, across a segment boundary.
        append(&mut wal, 2, 7..=8);
        assert_eq!(wal.last(), Some(id(2, 8)));
        assert_eq!(segments(&path), [segment_name(1), segment_name(5)]);
        drop(wal);

        let mut wal = Wal::open(&path).unwrap();
        let expect: Vec<_> = (1..=6)
            .map(|i| (1, i))
            .chain((7..=8).map(|i| (2, i)))
            .collect();
        assert_eq!(held(&wal), expect);
        // Purging through 5 frees the first segment (1-4) whole; the second holds 6-8 too.
        wal.purge(id(1, 5), Some(5)).unwrap();
        assert_eq!(held(&wal), expect[5..]);
        assert_eq!(segments(&path), [segment_name(5)]);
        drop(wal);

        let mut wal = Wal::open(&path).unwrap();
        assert_eq!(wal.purged(), Some(id(1, 5)));
        assert_eq!(held(&wal), expect[5..]);
        // A purge past the last entry (a snapshot installed) empties the log; appends go on
        // after the purge point.
        wal.purge(id(3, 20), Some(20)).unwrap();
        assert_eq!(wal.last(), None);
        assert!(segments(&path).is_empty());
        append(&mut wal, 3, 21..=22);
        drop(wal);
        let wal = Wal::open(&path).unwrap();
        assert_eq!(held(&wal), [(3, 21), (3, 22)]);
        assert_eq!(wal.purged(), Some(id(3, 20)));
    }

    /// A follower installing a snapshot: openraft purges the log past the state machine
    /// before the install is durable. A crash then must find the old log, not one purged
    /// past a state machine that never got there; once the snapshot is durable, the purge
    /// reaches the disk.
    #[test]
    fn a_purge_past_the_durable_snapshot_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        append(&mut wal, 1, 1..=5);
        wal.purge(id(2, 100), Some(3)).unwrap();
        assert_eq!(wal.last(), None, "nothing is held past the purge point");
        assert_eq!(wal.purged(), Some(id(2, 100)));
        drop(wal);

        // The crash: the old log is all there.
        let mut wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.purged(), None);
        assert_eq!(held(&wal).len(), 5);
        wal.purge(id(2, 100), Some(3)).unwrap();
        // The install is durable by the next append: the purge reaches the disk first.
        wal.append(&[(id(2, 101), entry_json(2, 101))], Some(100))
            .unwrap();
        wal.sync().unwrap();
        assert_eq!(segments(dir.path()), [segment_name(101)]);
        drop(wal);
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.purged(), Some(id(2, 100)));
        assert_eq!(held(&wal), [(2, 101)]);
    }

    /// A crash can persist one unlink of purged segments and not an older one: the gap
    /// it leaves holds only purged entries, and the log opens.
    #[test]
    fn a_gap_of_purged_segments_opens() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        wal.append(&(1..=10).map(|i| big(1, i)).collect::<Vec<_>>(), None)
            .unwrap();
        wal.sync().unwrap();
        let oldest = dir.path().join(segment_name(1));
        let kept = std::fs::read(&oldest).unwrap();
        wal.purge(id(1, 8), Some(8)).unwrap();
        assert_eq!(segments(dir.path()), [segment_name(9)]);
        drop(wal);
        std::fs::write(&oldest, kept).unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(held(&wal), [(1, 9), (1, 10)]);
        assert_eq!(segments(dir.path()), [segment_name(9)]);
    }

    /// Truncation is by index: a suffix from a higher term is cut like any other.
    #[test]
    fn truncation_cuts_by_index_whatever_the_terms() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        append(&mut wal, 1, 1..=3);
        append(&mut wal, 5, 4..=6);
        wal.truncate(4).unwrap();
        assert_eq!(wal.last(), Some(id(1, 3)));
        // The cut records stay cut across a reopen, also once a new record of the same
        // length is written where the first of them was.
        drop(wal);
        let mut wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.last(), Some(id(1, 3)));
        append(&mut wal, 3, 4..=4);
        drop(wal);
        let mut wal = Wal::open(dir.path()).unwrap();
        assert_eq!(held(&wal), [(1, 1), (1, 2), (1, 3), (3, 4)]);
        assert!(
            wal.append(&[(id(3, 9), entry_json(3, 9))], None).is_err(),
            "a gap"
        );
    }

    /// A log of entries 1..=5 in one segment, closed: its directory, the segment, where its
    /// records end and the file's size.
    fn five_entries() -> (tempfile::TempDir, PathBuf, u64, u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        append(&mut wal, 1, 1..=5);
        let whole = wal.segments.back().unwrap().len;
        drop(wal);
        let last = dir.path().join(segment_name(1));
        let size = std::fs::metadata(&last).unwrap().len();
        (dir, last, whole, size)
    }

    /// A crash in the middle of an append leaves part of a record at the end of the last
    /// segment: the next open cuts it off and keeps every whole record before it.
    #[test]
    fn a_torn_tail_is_cut_off_at_open() {
        let (dir, last, whole, size) = five_entries();
        let mut torn = Vec::new();
        record(&id(1, 6), &entry_json(1, 6), &mut torn);
        let mut bad = torn.clone();
        *bad.last_mut().unwrap() ^= 1;
        // (what the crash left, whether the segment is as an older build left it: no
        // longer than its records, then what the crash wrote)
        for (garbage, older) in [
            (torn[..torn.len() - 3].to_vec(), false),
            (bad.clone(), false),
            (torn[..torn.len() - 3].to_vec(), true),
            (bad, true),
            (vec![0; 40], true),
        ] {
            let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
            if older {
                f.set_len(whole).unwrap();
            }
            f.write_all_at(&garbage, whole).unwrap();
            drop(f);
            let mut wal = Wal::open(dir.path()).unwrap();
            assert_eq!(wal.last(), Some(id(1, 5)));
            let bytes = std::fs::read(&last).unwrap();
            if older {
                assert_eq!(bytes.len(), whole as usize + garbage.len());
            } else {
                assert_eq!(bytes.len() as u64, size, "the segment keeps its blocks");
            }
            assert!(bytes[whole as usize..].iter().all(|b| *b == 0));
            append(&mut wal, 1, 6..=6);
            assert_eq!(held(&wal).len(), 6);
            wal.truncate(6).unwrap();
        }
    }

    /// A segment is created at its full size, so appends never change its size; and a
    /// record left past the end of the records (a crash lost the header before it) is
    /// wiped at open, not read back as a later entry once new records fill the gap.
    #[test]
    fn segments_are_filled_ahead_and_nothing_past_the_end_comes_back() {
        let (dir, last, whole, size) = five_entries();
        assert_eq!(size, Wal::open(dir.path()).unwrap().segment_bytes);
        // A segment whose creation was cut short is removed.
        let leftover = dir.path().join(format!(".{}.tmp", segment_name(6)));
        std::fs::write(&leftover, b"").unwrap();
        // Where entry 6 would go, zeros as long as its record; then an old entry 7.
        let mut six = Vec::new();
        record(&id(2, 6), &entry_json(2, 6), &mut six);
        let mut stale = vec![0; six.len()];
        record(&id(1, 7), &entry_json(1, 7), &mut stale);
        let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
        f.write_all_at(&stale, whole).unwrap();
        drop(f);
        let mut wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.last(), Some(id(1, 5)));
        append(&mut wal, 2, 6..=6);
        drop(wal);
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(
            held(&wal),
            vec![(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 6)]
        );
        assert_eq!(std::fs::metadata(&last).unwrap().len(), size);
        assert!(!leftover.exists());
    }

    /// Damage in a segment that is not the last is not a torn write: opening refuses.
    #[test]
    fn damage_before_the_last_segment_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        wal.append(&(1..=6).map(|i| big(1, i)).collect::<Vec<_>>(), None)
            .unwrap();
        wal.sync().unwrap();
        drop(wal);
        let first = dir.path().join(segment_name(1));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&first)
            .unwrap();
        f.write_all_at(b"XX", 100).unwrap();
        let err = Wal::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("CRC"), "{err}");
    }

    /// A crash after a rollover created the next segment and before anything in it was
    /// durable leaves an empty last segment: it is removed, and the full one before it is
    /// whole (it was synced before the new one was created).
    #[test]
    fn a_crash_at_a_rollover_loses_nothing_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        wal.append(&(1..=4).map(|i| big(1, i)).collect::<Vec<_>>(), None)
            .unwrap();
        wal.sync().unwrap();
        let full = segments(dir.path());
        // The next append fills no new record: the crash came between the create and the
        // write.
        wal.roll_over(5).unwrap();
        drop(wal);
        assert_eq!(segments(dir.path()).len(), full.len() + 1);
        let mut wal = Wal::open(dir.path()).unwrap();
        assert_eq!(segments(dir.path()), full);
        assert_eq!(wal.last(), Some(id(1, 4)));
        wal.append(&[big(1, 5)], None).unwrap();
        wal.sync().unwrap();
        assert_eq!(held(&wal).len(), 5);
    }

    /// An older build's database in `dir`: the whole db, its `meta` and `logs` trees.
    fn sled_log(dir: &Path) -> (sled::Db, sled::Tree, sled::Tree) {
        let db = sled::Config::new().path(dir.join("raft")).open().unwrap();
        let meta = db.open_tree("meta").unwrap();
        let logs = db.open_tree("logs").unwrap();
        (db, meta, logs)
    }

    /// A data dir whose log is in sled comes up with the same entries and purge point in
    /// segment files, and sled no longer holds them; opening again changes nothing.
    #[test]
    fn a_log_kept_in_sled_moves_into_segment_files() {
        let dir = tempfile::tempdir().unwrap();
        let (db, meta, logs) = sled_log(dir.path());
        // Purged through 3; entry 3 was left behind by a crash between the two writes.
        let purged = id(1, 3);
        meta.insert(KEY_LAST_PURGED, serde_json::to_vec(&purged).unwrap())
            .unwrap();
        for (term, index) in [(1u64, 3u64), (1, 4), (2, 5), (2, 6)] {
            logs.insert(index.to_be_bytes(), entry_json(term, index))
                .unwrap();
        }
        let path = dir.path().join("raft.wal");
        let wal = open(&db, &meta, &path).unwrap();
        assert_eq!(wal.purged(), Some(purged));
        assert_eq!(held(&wal), [(1, 4), (2, 5), (2, 6)]);
        assert_eq!(Wal::read(&wal.locate(5, 5)[0]).unwrap(), entry_json(2, 5));
        assert!(logs.is_empty());
        assert!(!meta.contains_key(KEY_LAST_PURGED).unwrap());
        drop(wal);

        let again = open(&db, &meta, &path).unwrap();
        assert_eq!(held(&again), [(1, 4), (2, 5), (2, 6)]);
    }

    /// A migration cut short before its rename is done again from sled; one cut short after
    /// it only clears sled.
    #[test]
    fn a_migration_cut_short_is_finished_on_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let (db, meta, logs) = sled_log(dir.path());
        for index in 1..=3u64 {
            logs.insert(index.to_be_bytes(), entry_json(1, index))
                .unwrap();
        }
        let path = dir.path().join("raft.wal");
        // Before the rename: a half-written log beside the final directory.
        let half = PathBuf::from(format!("{}.new", path.display()));
        std::fs::create_dir_all(&half).unwrap();
        std::fs::write(half.join(segment_name(1)), b"x").unwrap();
        let wal = open(&db, &meta, &path).unwrap();
        assert_eq!(held(&wal).len(), 3);
        assert!(!half.exists());
        drop(wal);

        // After the rename, before sled was cleared: sled's copy is dropped, the log kept.
        logs.insert(3u64.to_be_bytes(), entry_json(1, 3)).unwrap();
        let wal = open(&db, &meta, &path).unwrap();
        assert_eq!(held(&wal).len(), 3);
        assert!(logs.is_empty());
        drop(wal);

        // An older build ran after this one and wrote entries past the segment files':
        // opening refuses rather than drop them.
        for (term, index) in [(1u64, 4u64), (7, 3)] {
            logs.clear().unwrap();
            logs.insert(index.to_be_bytes(), entry_json(term, index))
                .unwrap();
            let err = open(&db, &meta, &path).unwrap_err();
            assert!(err.to_string().contains("an older flotilla"), "{err}");
            assert_eq!(logs.len(), 1);
        }
    }
}
