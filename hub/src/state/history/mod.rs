//! Finished work. A task or workflow that ended (with every task that belongs to it) leaves
//! the in-memory state for this store, which lives on the hub's disk (sled trees) and is
//! written by `apply` on every hub at the same log index. It is kept for the retention and
//! then expired by a replicated command (`Command::ExpireHistory`).
//!
//! The store is versioned by log index so that replaying the log is exact even though the
//! store on disk may be ahead of the in-memory state being replayed (a hub restarts from its
//! last snapshot at index S, but its store already holds what was archived after S; a hub
//! installing a snapshot receives the sender's current store). Each record says at which
//! index it was archived and, once expired, at which index it expired; `apply` only sees
//! records that existed at the index being applied. An expired record stays (readers see it
//! as expired) until a snapshot covers its expiry, so no replay can look at it again, and is
//! purged then.
//!
//! Trees (keys; values are JSON `Stored` or empty):
//! - tasks: id → `Stored<TaskRecord>`; workflows: id → `Stored<WorkflowRecord>`. The
//!   record itself (its body) is in a file of bodies (`bodies`), and `Stored` says where;
//!   older stores hold it inline. A snapshot carries records inline either way.
//! - keys: kind, tenant, NUL, idempotency key, NUL, id → (): every record a key named
//! - by_tenant: tenant, NUL, id → () (ids are UUIDv7: id order is time order)
//! - dead: tenant, NUL, id → () (dead-lettered tasks)
//! - by_finish: end time (big-endian, sign flipped), kind, id → `Header`: what expires
//!   first, with what expiring it needs to know (so expiring reads no record)
//! - gone: kind, id → expiry index (big-endian), `Header`: the records expired and not yet
//!   purged, with what purging needs to know. Kept apart so that expiring a record writes
//!   a few bytes rather than the whole record again.
//!
//! A record's life is an append of its body and three writes to archive it (record,
//! by_tenant, by_finish), three to expire it (gone in, by_tenant and by_finish out) and two
//! to purge it (record and gone out), plus one each way for an idempotency key or a dead
//! letter; no read of a body. A file of bodies is deleted once no record points into it.
//!
//! Older stores: `by_finish` values were empty and `gone` held the index alone (the record
//! is read instead); the `expired` tree (expiry index, kind, id → ()) listed tombstones to
//! purge, and records written before `gone` existed carry `expired_at` inside. All are
//! still read and purged; nothing new is written there.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, RwLock,
};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{TaskRecord, TaskStatus, WorkflowRecord, WorkflowStatus};

mod backend;
mod bodies;

use backend::{bodies_dir, drop_other_generations, tree_name, Backend, TREES};
use bodies::Loc;

/// Most records one `ExpireHistory` command expires: bounds the work of one apply.
pub const EXPIRE_BATCH: usize = 5_000;

/// Most finished tasks one listing reads.
pub const LIST_SCAN: usize = 50_000;

const TASKS: usize = 0;
const WORKFLOWS: usize = 1;
const KEYS: usize = 2;
const BY_TENANT: usize = 3;
const DEAD: usize = 4;
const BY_FINISH: usize = 5;
const EXPIRED: usize = 6;
const GONE: usize = 7;

const KIND_TASK: u8 = b't';
const KIND_WORKFLOW: u8 = b'w';

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("history store: {0}")]
    Disk(#[from] sled::Error),
    #[error("history store holds an unreadable record: {0}")]
    Corrupt(String),
    #[error("history store: {0}")]
    Io(#[from] std::io::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One archived record, or its tombstone once expired.
#[derive(Debug, Serialize, Deserialize)]
struct Stored<T> {
    archived_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expired_at: Option<u64>,
    tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    ended_at_ms: i64,
    /// The record inline: older stores, and snapshots. (Missing reads as `None`.)
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<T>,
    /// Where the record's body is, when it is not inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<Loc>,
    /// The record's status, beside the body, for `apply` (which reads no body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<serde_json::Value>,
}

/// What the store keeps of a record besides its body.
trait Archived: Serialize + DeserializeOwned {
    fn status_value(&self) -> serde_json::Value;
}

impl Archived for TaskRecord {
    fn status_value(&self) -> serde_json::Value {
        serde_json::to_value(self.status).expect("a status serializes")
    }
}

impl Archived for WorkflowRecord {
    fn status_value(&self) -> serde_json::Value {
        serde_json::to_value(self.status).expect("a status serializes")
    }
}

impl<T> Stored<T> {
    /// Existed after applying log index `at`, given when it expired (`gone`), if it did.
    fn visible_at(&self, at: u64, gone: Option<u64>) -> bool {
        self.archived_at <= at && self.expired(gone).is_none_or(|e| e > at)
    }

    /// The index it expired at: from the `gone` tree, or (older records) its own field.
    fn expired(&self, gone: Option<u64>) -> Option<u64> {
        gone.or(self.expired_at)
    }
}

/// What expiring and purging a record need to know of it: the value of its `by_finish`
/// key, and of its `gone` mark after the expiry index.
#[derive(Debug, Clone, PartialEq)]
struct Header {
    archived_at: u64,
    dead: bool,
    tenant: String,
    key: Option<String>,
}

impl Header {
    const DEAD: u8 = 1;
    const KEYED: u8 = 2;

    fn of<T>(s: &Stored<T>, dead: bool) -> Self {
        Self {
            archived_at: s.archived_at,
            dead,
            tenant: s.tenant.clone(),
            key: s.key.clone(),
        }
    }

    /// `archived_at` (8 bytes, big-endian), flags (1), tenant length (4), tenant, key.
    fn encode(&self) -> Vec<u8> {
        let flags = if self.dead { Self::DEAD } else { 0 }
            | if self.key.is_some() { Self::KEYED } else { 0 };
        let key = self.key.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(13 + self.tenant.len() + key.len());
        out.extend_from_slice(&self.archived_at.to_be_bytes());
        out.push(flags);
        out.extend_from_slice(&(self.tenant.len() as u32).to_be_bytes());
        out.extend_from_slice(self.tenant.as_bytes());
        out.extend_from_slice(key.as_bytes());
        out
    }

    /// `None` for an older store's empty value (or anything else it cannot read).
    fn decode(v: &[u8]) -> Option<Self> {
        let archived_at = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
        let flags = *v.get(8)?;
        let len = u32::from_be_bytes(v.get(9..13)?.try_into().ok()?) as usize;
        let tenant = std::str::from_utf8(v.get(13..13usize.checked_add(len)?)?).ok()?;
        let key = std::str::from_utf8(&v[13 + len..]).ok()?;
        Some(Self {
            archived_at,
            dead: flags & Self::DEAD != 0,
            tenant: tenant.to_owned(),
            key: (flags & Self::KEYED != 0).then(|| key.to_owned()),
        })
    }
}

/// The expiry index a `gone` value starts with.
fn mark_index(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
}

/// What a read of finished work found.
#[derive(Debug, PartialEq)]
pub enum Lookup<T> {
    Found(T),
    /// It existed and its retention ended (known until the next snapshot purges it).
    Expired {
        tenant: String,
        ended_at_ms: i64,
    },
    Missing,
}

impl<T> Lookup<T> {
    pub fn found(self) -> Option<T> {
        match self {
            Self::Found(t) => Some(t),
            _ => None,
        }
    }
}

/// The finished-work store. Cheap to clone; clones share it (the state machine's copy and
/// the readers' are the same store, also across a snapshot install).
#[derive(Clone)]
pub struct History {
    backend: Arc<RwLock<Arc<Backend>>>,
    /// Records not expired (tasks and workflows): what count-based retention looks at.
    count: Arc<AtomicU64>,
    /// Records expired and not yet purged (their `gone` marks): what a snapshot would free.
    tombstones: Arc<AtomicU64>,
}

impl Default for History {
    /// A store in memory (tests, fuzzing, tools that replay entries).
    fn default() -> Self {
        Self::with(Backend::memory())
    }
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "History({} records)", self.len())
    }
}

/// Two handles are equal when they are the same store.
impl PartialEq for History {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.backend, &other.backend)
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> StoreResult<T> {
    crate::raft::codec::decode(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("history records serialize")
}

/// Where the body of `v` (a `Stored` value) is, if it is in a file.
fn body_of(v: &[u8]) -> Option<Loc> {
    #[derive(Deserialize)]
    struct BodyOnly {
        #[serde(default)]
        body: Option<Loc>,
    }
    decode::<BodyOnly>(v).ok()?.body
}

/// A `Stored` value from a snapshot (record inline) as this store keeps it: the record's
/// body in a file of `b`. A value it cannot read is kept as it came (readers say so).
fn outline<T: Archived>(b: &Backend, v: Vec<u8>) -> StoreResult<Vec<u8>> {
    let Ok(mut s) = decode::<Stored<T>>(&v) else {
        return Ok(v);
    };
    let Some(record) = s.record.take() else {
        // Where a body is on the sender's disk (a build that sends values as it keeps
        // them) means nothing here: without it the record reads as expired.
        if s.body.take().is_some() {
            return Ok(encode(&s));
        }
        return Ok(v);
    };
    let loc = b.bodies().append(&[encode(&record)])?;
    s.status = Some(record.status_value());
    s.body = loc.into_iter().next();
    Ok(encode(&s))
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn time_key(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn key_prefix(kind: u8, tenant: &str, key: &str) -> Vec<u8> {
    join(&[&[kind], tenant.as_bytes(), b"\0", key.as_bytes(), b"\0"])
}

/// The tree holding records of `kind`.
fn tree_of(kind: u8) -> usize {
    if kind == KIND_TASK {
        TASKS
    } else {
        WORKFLOWS
    }
}

/// The `gone` key of record `id` of `kind`.
fn mark_key(kind: u8, id: &[u8]) -> Vec<u8> {
    join(&[&[kind], id])
}

/// The kind of the records in tree `tree` (tasks or workflows).
fn kind_of(tree: usize) -> u8 {
    if tree == WORKFLOWS {
        KIND_WORKFLOW
    } else {
        KIND_TASK
    }
}

fn tenant_key(tenant: &str, id: &str) -> Vec<u8> {
    join(&[tenant.as_bytes(), b"\0", id.as_bytes()])
}

impl History {
    fn with(backend: Backend) -> Self {
        Self {
            backend: Arc::new(RwLock::new(Arc::new(backend))),
            count: Arc::default(),
            tombstones: Arc::default(),
        }
    }

    /// Opens generation `generation` of the store in `db`, with the records' bodies under
    /// `dir`, dropping any other generation (one a snapshot install wrote but did not
    /// finish, or one it replaced).
    pub fn open(db: &sled::Db, dir: &std::path::Path, generation: u64) -> StoreResult<Self> {
        let h = Self::with(Backend::open(db, dir, generation)?);
        drop_other_generations(db, dir, generation)?;
        h.recount()?;
        Ok(h)
    }

    /// Makes the bodies written so far durable (the trees are sled's to flush): before a
    /// snapshot that covers them is.
    pub fn sync(&self) -> StoreResult<()> {
        Ok(self.backend().bodies().sync()?)
    }

    fn backend(&self) -> Arc<Backend> {
        self.backend.read().expect("history lock").clone()
    }

    /// The sled generation in use (0 in memory).
    pub fn generation(&self) -> u64 {
        match &*self.backend() {
            Backend::Memory { .. } => 0,
            Backend::Sled { generation, .. } => *generation,
        }
    }

    /// Records (tasks and workflows) not expired.
    pub fn len(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records expired and waiting for a snapshot to cover their expiry before they are
    /// purged (they take disk until then). Exact at open and after a snapshot install;
    /// between them it may read low if a store swap raced a purge.
    pub fn tombstones(&self) -> u64 {
        self.tombstones.load(Ordering::Relaxed)
    }

    /// One `gone` mark fewer. Counted down (not set from a scan) because `expire` may add
    /// marks while a purge runs; never below zero, so a count that was low stays low until
    /// the next open or install counts again, rather than wrapping around.
    fn untomb(&self) {
        let _ = self
            .tombstones
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
    }

    fn recount(&self) -> StoreResult<()> {
        let count = |tree| -> StoreResult<u64> {
            let mut n = 0;
            self.backend().scan(tree, b"", false, |_, _| {
                n += 1;
                true
            })?;
            Ok(n)
        };
        self.count.store(count(BY_FINISH)?, Ordering::Relaxed);
        self.tombstones.store(count(GONE)?, Ordering::Relaxed);
        // Which files of bodies records point into; the others go.
        let b = self.backend();
        b.bodies().uncount();
        for tree in [TASKS, WORKFLOWS] {
            b.scan(tree, b"", false, |_, v| {
                if let Some(loc) = body_of(v) {
                    b.bodies().adopt(&loc);
                }
                true
            })?;
        }
        b.bodies().drop_unused()?;
        Ok(())
    }

    /// One record fewer points to the body `v` (a `Stored` value) names, if any.
    fn release(&self, b: &Backend, v: &[u8]) -> StoreResult<()> {
        if let Some(loc) = body_of(v) {
            b.bodies().release(&loc)?;
        }
        Ok(())
    }

    /// Archives tasks and workflows that ended, at log index `at`.
    pub fn archive(
        &self,
        at: u64,
        tasks: &[TaskRecord],
        workflows: &[WorkflowRecord],
    ) -> StoreResult<()> {
        let b = self.backend();
        // Every body in one append.
        let bodies: Vec<Vec<u8>> = (tasks.iter().map(encode))
            .chain(workflows.iter().map(encode))
            .collect();
        let mut locs = b.bodies().append(&bodies)?.into_iter();
        for (t, loc) in tasks.iter().zip(&mut locs) {
            let stored = Stored {
                archived_at: at,
                expired_at: None,
                tenant: t.tenant.clone(),
                key: t.idempotency_key.clone(),
                ended_at_ms: t.updated_at_ms,
                record: None::<()>,
                body: Some(loc),
                status: Some(t.status_value()),
            };
            self.put(&b, KIND_TASK, &t.id, &stored, t.dead_lettered)?;
            b.insert(BY_TENANT, &tenant_key(&t.tenant, &t.id), b"")?;
            if t.dead_lettered {
                b.insert(DEAD, &tenant_key(&t.tenant, &t.id), b"")?;
            }
        }
        for (w, loc) in workflows.iter().zip(locs) {
            let stored = Stored {
                archived_at: at,
                expired_at: None,
                tenant: w.tenant.clone(),
                key: w.idempotency_key.clone(),
                ended_at_ms: w.updated_at_ms,
                record: None::<()>,
                body: Some(loc),
                status: Some(w.status_value()),
            };
            self.put(&b, KIND_WORKFLOW, &w.id, &stored, false)?;
        }
        Ok(())
    }

    /// Writes one archived record with its key and expiry entries. A record it replaces
    /// (the same archive, replayed) no longer points to its body.
    fn put<T: Serialize>(
        &self,
        b: &Backend,
        kind: u8,
        id: &str,
        stored: &Stored<T>,
        dead: bool,
    ) -> StoreResult<()> {
        let tree = tree_of(kind);
        if let Some(prev) = b.replace(tree, id.as_bytes(), &encode(stored))? {
            self.release(b, &prev)?;
        }
        if let Some(key) = &stored.key {
            let k = join(&[&key_prefix(kind, &stored.tenant, key), id.as_bytes()]);
            b.insert(KEYS, &k, b"")?;
        }
        let f = join(&[&time_key(stored.ended_at_ms), &[kind], id.as_bytes()]);
        // `count` is the number of `by_finish` keys: records not expired.
        if b.replace(BY_FINISH, &f, &Header::of(stored, dead).encode())?
            .is_none()
        {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// When the record with `gone` key `key` (`mark_key`) expired, if it did.
    fn gone(&self, b: &Backend, key: &[u8]) -> StoreResult<Option<u64>> {
        Ok(b.get(GONE, key)?.as_deref().and_then(mark_index))
    }

    fn drop_finish_key(&self, b: &Backend, key: &[u8]) -> StoreResult<()> {
        if b.remove(BY_FINISH, key)? {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Expires, at log index `at`, every record that existed at `at` whose end-time key is
    /// at or before `through` (a cut the leader chose; `cut` makes one). There is no limit
    /// here, so a replay expires exactly what the first run did: a record visible at `at`
    /// below the cut was expired at `at`, whatever the store holds by now. Steps a crash cut
    /// short (the record marked, its keys not yet removed) are finished. Returns how many.
    pub fn expire(&self, at: u64, through: &[u8]) -> StoreResult<usize> {
        let b = self.backend();
        let mut due = Vec::new();
        b.scan(BY_FINISH, b"", false, |k, v| {
            if k > through {
                return false;
            }
            due.push((k.to_vec(), Header::decode(v)));
            true
        })?;
        let mut n = 0;
        for (fk, head) in due {
            if fk.len() < 9 {
                self.drop_finish_key(&b, &fk)?;
                continue;
            }
            let (kind, id) = (fk[8], &fk[9..]);
            let head = match head {
                Some(h) => h,
                None => match self.older_header(&b, kind, id, at)? {
                    Some(h) => h,
                    None => {
                        // No record, or one an older store expired before `at`.
                        self.drop_finish_key(&b, &fk)?;
                        continue;
                    }
                },
            };
            // Archived after `at`: a store that is ahead of the replay.
            if head.archived_at > at {
                continue;
            }
            // The record stays whole until purged: a replay before `at` still reads it.
            let gk = mark_key(kind, id);
            let mut mark = at.to_be_bytes().to_vec();
            mark.extend_from_slice(&head.encode());
            // Marked only if not marked yet: one write, and an earlier mark is never
            // overwritten, even for a moment.
            match b.insert_new(GONE, &gk, &mark)? {
                None => {
                    n += 1;
                    self.tombstones.fetch_add(1, Ordering::Relaxed);
                }
                Some(prev) => match mark_index(&prev) {
                    // Expired before (only its key was left behind): that expiry stands.
                    Some(e) if e < at => {
                        self.drop_finish_key(&b, &fk)?;
                        continue;
                    }
                    // This expiry, cut short by a crash and now replayed.
                    Some(e) if e == at => {}
                    _ => {
                        b.insert(GONE, &gk, &mark)?;
                        n += 1;
                    }
                },
            }
            if kind == KIND_TASK {
                let tk = join(&[head.tenant.as_bytes(), b"\0", id]);
                b.remove(BY_TENANT, &tk)?;
                if head.dead {
                    b.remove(DEAD, &tk)?;
                }
            }
            self.drop_finish_key(&b, &fk)?;
        }
        Ok(n)
    }

    /// An older store's `by_finish` key has no header: it is read from the record. `None`
    /// if there is no record, or it expired before `at` (its expiry inside, or in `gone`).
    fn older_header(
        &self,
        b: &Backend,
        kind: u8,
        id: &[u8],
        at: u64,
    ) -> StoreResult<Option<Header>> {
        let Some(v) = b.get(tree_of(kind), id)? else {
            return Ok(None);
        };
        let s: Stored<serde::de::IgnoredAny> = decode(&v)?;
        if s.expired(self.gone(b, &mark_key(kind, id))?)
            .is_some_and(|e| e < at)
        {
            return Ok(None);
        }
        // Not known: removing an absent dead letter is harmless.
        Ok(Some(Header::of(&s, true)))
    }

    /// The `expire` cut through end time `ms` and the record `entry` (`None`: every record
    /// that ended at `ms`).
    pub fn cut(ms: i64, entry: Option<&str>) -> Vec<u8> {
        match entry {
            Some(e) => join(&[&time_key(ms), e.as_bytes()]),
            None => join(&[&time_key(ms), &[0xFF]]),
        }
    }

    /// Removes the records expired at or before log index `through`: a snapshot at
    /// `through` is durable, so no replay will look at them again. Returns how many.
    pub fn purge(&self, through: u64) -> StoreResult<usize> {
        let b = self.backend();
        let mut n = self.purge_listed(&b, through)?;
        let mut due = Vec::new();
        b.scan(GONE, b"", false, |k, v| {
            if k.len() > 1 && mark_index(v).is_some_and(|e| e <= through) {
                due.push((k.to_vec(), Header::decode(&v[8..])));
            }
            true
        })?;
        for (gk, head) in due {
            let (kind, id) = (gk[0], &gk[1..]);
            let tree = tree_of(kind);
            let key = match head {
                Some(h) => h.key.map(|k| (h.tenant, k)),
                // An older mark (the index alone): the record says.
                None => match b.get(tree, id)? {
                    Some(v) => {
                        let s: Stored<serde::de::IgnoredAny> = decode(&v)?;
                        s.key.map(|k| (s.tenant, k))
                    }
                    None => None,
                },
            };
            if let Some(v) = b.take(tree, id)? {
                self.release(&b, &v)?;
            }
            if let Some((tenant, key)) = key {
                b.remove(KEYS, &join(&[&key_prefix(kind, &tenant, &key), id]))?;
            }
            // Last: a purge a crash cut short finds the mark again.
            if b.remove(GONE, &gk)? {
                self.untomb();
            }
            n += 1;
        }
        Ok(n)
    }

    /// Purges what an older store listed in the `expired` tree (expiry index, kind, id).
    fn purge_listed(&self, b: &Backend, through: u64) -> StoreResult<usize> {
        let mut listed = Vec::new();
        b.scan(EXPIRED, b"", false, |k, _| {
            if k.len() < 9 || u64::from_be_bytes(k[..8].try_into().expect("8 bytes")) > through {
                return false;
            }
            listed.push(k.to_vec());
            true
        })?;
        for k in &listed {
            let (kind, id) = (k[8], &k[9..]);
            let tree = tree_of(kind);
            let gk = mark_key(kind, id);
            let mark = self.gone(b, &gk)?;
            if let Some(v) = b.get(tree, id)? {
                let s: Stored<serde::de::IgnoredAny> = decode(&v)?;
                if s.expired(mark).is_some_and(|e| e <= through) {
                    // Released only by whoever took it out, should two purges meet.
                    if let Some(v) = b.take(tree, id)? {
                        self.release(b, &v)?;
                    }
                    if let Some(key) = &s.key {
                        b.remove(KEYS, &join(&[&key_prefix(kind, &s.tenant, key), id]))?;
                    }
                }
            }
            // Last, and even without its record (a crash may have come between the two):
            // the listing stays until its mark is gone, so nothing is left behind.
            if mark.is_some_and(|e| e <= through) && b.remove(GONE, &gk)? {
                self.untomb();
            }
            b.remove(EXPIRED, k)?;
        }
        Ok(listed.len())
    }

    /// Where retention should expire through, if anything is due: records that ended
    /// `retention_ms` before `now_ms` or earlier, and beyond `max_records` the oldest ones,
    /// at most `EXPIRE_BATCH` of them. The cut is (end time, record) for `cut`.
    pub fn expiry_due(
        &self,
        now_ms: i64,
        retention_ms: u64,
        max_records: u64,
    ) -> StoreResult<Option<(i64, String)>> {
        let by_time = now_ms.saturating_sub(retention_ms.min(i64::MAX as u64) as i64);
        let excess = if max_records == 0 {
            0
        } else {
            self.len().saturating_sub(max_records)
        };
        let mut through = None;
        let mut seen = 0u64;
        self.backend().scan(BY_FINISH, b"", false, |k, _| {
            if k.len() < 9 {
                return true;
            }
            let ms = (u64::from_be_bytes(k[..8].try_into().expect("8 bytes")) ^ (1 << 63)) as i64;
            seen += 1;
            if ms <= by_time || seen <= excess {
                through = Some((ms, String::from_utf8_lossy(&k[8..]).into_owned()));
                seen < EXPIRE_BATCH as u64
            } else {
                false
            }
        })?;
        Ok(through)
    }

    fn read<T: DeserializeOwned>(&self, tree: usize, id: &str) -> StoreResult<Lookup<T>> {
        let mark = mark_key(kind_of(tree), id.as_bytes());
        // A body missing is damage only if the record still says the same after: a replay
        // may have written it again, a purge taken it, or an install replaced the store
        // between reading the record and reading its body.
        let mut tries = 0;
        loop {
            let b = self.backend();
            let Some(v) = b.get(tree, id.as_bytes())? else {
                return Ok(Lookup::Missing);
            };
            let s: Stored<T> = decode(&v)?;
            let gone = self.gone(&b, &mark)?;
            let loc = match (s.expired(gone), s.record, s.body) {
                (None, Some(r), _) => return Ok(Lookup::Found(r)),
                (None, None, Some(loc)) => loc,
                _ => {
                    return Ok(Lookup::Expired {
                        tenant: s.tenant,
                        ended_at_ms: s.ended_at_ms,
                    })
                }
            };
            if let Some(body) = b.bodies().read(&loc)? {
                return Ok(Lookup::Found(decode(&body)?));
            }
            let same = Arc::ptr_eq(&b, &self.backend())
                && b.get(tree, id.as_bytes())?.as_deref() == Some(&v[..])
                && self.gone(&b, &mark)? == gone;
            tries += 1;
            if same || tries == 3 {
                return Err(StoreError::Corrupt(format!(
                    "the body of finished record {id} is missing"
                )));
            }
        }
    }

    /// A finished task, as it is now.
    pub fn task(&self, id: &str) -> StoreResult<Lookup<TaskRecord>> {
        self.read(TASKS, id)
    }

    /// A finished workflow, as it is now.
    pub fn workflow(&self, id: &str) -> StoreResult<Lookup<WorkflowRecord>> {
        self.read(WORKFLOWS, id)
    }

    /// How a task id stood after log index `at` (for `apply`): ended with this status, or
    /// not in the store then.
    pub fn task_at(&self, id: &str, at: u64) -> StoreResult<Option<TaskStatus>> {
        self.status_at(TASKS, id, at)
    }

    /// Whether workflow `id` was in the store after log index `at`, and how it ended.
    pub fn workflow_at(&self, id: &str, at: u64) -> StoreResult<Option<WorkflowStatus>> {
        self.status_at(WORKFLOWS, id, at)
    }

    /// The `status` of record `id` in `tree`, if it existed after log index `at`.
    fn status_at<S: DeserializeOwned>(
        &self,
        tree: usize,
        id: &str,
        at: u64,
    ) -> StoreResult<Option<S>> {
        #[derive(Deserialize)]
        struct Status<S> {
            status: S,
        }
        let b = self.backend();
        let Some(v) = b.get(tree, id.as_bytes())? else {
            return Ok(None);
        };
        let s: Stored<Status<S>> = decode(&v)?;
        let gone = self.gone(&b, &mark_key(kind_of(tree), id.as_bytes()))?;
        if !s.visible_at(at, gone) {
            return Ok(None);
        }
        Ok(match (s.record, s.status) {
            (Some(r), _) => Some(r.status),
            (None, Some(status)) => Some(
                serde_json::from_value(status).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            ),
            (None, None) => None,
        })
    }

    /// The finished task (or, with `workflow`, workflow) that idempotency key `key` of
    /// `tenant` named after log index `at` (`u64::MAX`: now).
    pub fn keyed_at(
        &self,
        workflow: bool,
        tenant: &str,
        key: &str,
        at: u64,
    ) -> StoreResult<Option<String>> {
        let (kind, tree) = if workflow {
            (KIND_WORKFLOW, WORKFLOWS)
        } else {
            (KIND_TASK, TASKS)
        };
        let prefix = key_prefix(kind, tenant, key);
        let b = self.backend();
        let mut ids = Vec::new();
        b.scan(KEYS, &prefix, false, |k, _| {
            ids.push(k[prefix.len()..].to_vec());
            true
        })?;
        for id in ids {
            if let Some(v) = b.get(tree, &id)? {
                let s: Stored<serde::de::IgnoredAny> = decode(&v)?;
                if s.visible_at(at, self.gone(&b, &mark_key(kind, &id))?) {
                    return Ok(Some(String::from_utf8_lossy(&id).into_owned()));
                }
            }
        }
        Ok(None)
    }

    /// A tenant's finished tasks, newest first, that `keep` accepts, at most `limit`
    /// (only dead-lettered ones with `dead`). Looks at the newest `LIST_SCAN` at most, so a
    /// filter that matches little costs a bounded read.
    pub fn list(
        &self,
        tenant: &str,
        dead: bool,
        limit: usize,
        mut keep: impl FnMut(&TaskRecord) -> bool,
    ) -> StoreResult<Vec<TaskRecord>> {
        let b = self.backend();
        let prefix = join(&[tenant.as_bytes(), b"\0"]);
        let mut ids = Vec::new();
        let mut out = Vec::new();
        // Read in pages so a filter that rejects most tasks does not hold a scan open.
        let mut from: Option<Vec<u8>> = None;
        let mut scanned = 0;
        loop {
            ids.clear();
            let tree = if dead { DEAD } else { BY_TENANT };
            b.scan_before(tree, &prefix, from.as_deref(), true, |k, _| {
                ids.push(k.to_vec());
                ids.len() < 256
            })?;
            for k in &ids {
                if let Lookup::Found(t) = self.task(&String::from_utf8_lossy(&k[prefix.len()..]))? {
                    if keep(&t) {
                        out.push(t);
                        if out.len() >= limit {
                            return Ok(out);
                        }
                    }
                }
            }
            scanned += ids.len();
            match ids.last() {
                Some(last) if ids.len() == 256 && scanned < LIST_SCAN => from = Some(last.clone()),
                _ => return Ok(out),
            }
        }
    }

    /// The `limit` tasks that ended last, of every tenant, newest first.
    pub fn recent(&self, limit: usize) -> StoreResult<Vec<TaskRecord>> {
        self.ended_between(0, 0, limit, |_| true)
    }

    /// Tasks that ended at or after `since_ms` and before `until_ms` (0: no bound), newest
    /// end first, that `keep` accepts, at most `limit`. Looks at `LIST_SCAN` at most.
    pub fn ended_between(
        &self,
        since_ms: i64,
        until_ms: i64,
        limit: usize,
        mut keep: impl FnMut(&TaskRecord) -> bool,
    ) -> StoreResult<Vec<TaskRecord>> {
        let b = self.backend();
        let since = time_key(if since_ms == 0 { i64::MIN } else { since_ms });
        let until = (until_ms != 0).then(|| time_key(until_ms));
        let mut out = Vec::new();
        let mut ids = Vec::new();
        let mut from: Option<Vec<u8>> = until.map(|u| u.to_vec());
        let mut scanned = 0;
        while out.len() < limit && scanned < LIST_SCAN {
            ids.clear();
            let mut last = None;
            let mut ended = false;
            b.scan_before(BY_FINISH, b"", from.as_deref(), true, |k, _| {
                last = Some(k.to_vec());
                if k.len() < 8 || k[..8] < since[..] {
                    ended = true;
                    return false;
                }
                if k.len() > 9 && k[8] == KIND_TASK {
                    ids.push(String::from_utf8_lossy(&k[9..]).into_owned());
                }
                ids.len() < 256
            })?;
            scanned += ids.len().max(1);
            for id in &ids {
                if let Lookup::Found(t) = self.task(id)? {
                    if keep(&t) {
                        out.push(t);
                        if out.len() >= limit {
                            return Ok(out);
                        }
                    }
                }
            }
            match last {
                Some(k) if !ended && ids.len() == 256 => from = Some(k),
                _ => break,
            }
        }
        Ok(out)
    }

    /// `v` (a value of tree `tree`, key `id`) with its record inline, as a snapshot carries
    /// it (every hub reads that, also one that keeps records inline); `None` if it is
    /// inline already.
    fn inline(
        &self,
        b: &Backend,
        tree: usize,
        id: &[u8],
        v: &[u8],
    ) -> StoreResult<Option<Vec<u8>>> {
        let Some(loc) = body_of(v) else {
            return Ok(None);
        };
        let mut s: Stored<()> = decode(v)?;
        s.body = None;
        s.status = None;
        let mut out = encode(&s);
        match b.bodies().read(&loc)? {
            Some(body) => {
                // The body is the record's JSON as `encode` wrote it, checked by its CRC.
                out.pop();
                out.extend_from_slice(b",\"record\":");
                out.extend_from_slice(&body);
                out.push(b'}');
            }
            // Expired, and its file went before a crash let the purge finish: a tombstone
            // no replay reads (its expiry is covered by a durable snapshot).
            None if self.gone(b, &mark_key(kind_of(tree), id))?.is_some() => {}
            None => {
                return Err(StoreError::Corrupt(format!(
                    "the body of finished record {} is missing",
                    String::from_utf8_lossy(id)
                )))
            }
        }
        Ok(Some(out))
    }

    /// Every record, for a snapshot: (tree, key, value) written to `out` as
    /// `tree:u8 key_len:u32 key value_len:u32 value`, one record at a time, with the
    /// records' bodies inline.
    pub fn dump_to(&self, out: &mut impl std::io::Write) -> StoreResult<()> {
        let b = self.backend();
        let mut failed = None;
        let mut unreadable = None;
        for t in 0..TREES.len() {
            b.scan(t, b"", false, |k, v| {
                let inline = if t == TASKS || t == WORKFLOWS {
                    match self.inline(&b, t, k, v) {
                        Ok(i) => i,
                        Err(e) => {
                            unreadable = Some(e);
                            return false;
                        }
                    }
                } else {
                    None
                };
                let v = inline.as_deref().unwrap_or(v);
                let wrote = (|| {
                    out.write_all(&[t as u8])?;
                    out.write_all(&(k.len() as u32).to_be_bytes())?;
                    out.write_all(k)?;
                    out.write_all(&(v.len() as u32).to_be_bytes())?;
                    out.write_all(v)
                })();
                match wrote {
                    Ok(()) => true,
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            })?;
            if let Some(e) = failed.take() {
                return Err(e.into());
            }
            if let Some(e) = unreadable.take() {
                return Err(e);
            }
        }
        Ok(())
    }

    /// A new store (the next sled generation, or memory) holding what `dump_to` wrote,
    /// read from `input` one record at a time.
    pub fn load_next_from(&self, input: &mut impl std::io::Read) -> StoreResult<History> {
        let next = match &*self.backend() {
            Backend::Memory { .. } => Backend::memory(),
            Backend::Sled {
                db,
                dir,
                generation,
                ..
            } => {
                let b = Backend::open(db, dir, generation + 1)?;
                b.clear()?;
                // Bodies an install that did not finish wrote.
                b.bodies().drop_unused()?;
                b
            }
        };
        let truncated = || StoreError::Corrupt("truncated history section in snapshot".into());
        let mut tree = [0u8; 1];
        let mut len = [0u8; 4];
        loop {
            match input.read(&mut tree)? {
                0 => break,
                _ if tree[0] as usize >= TREES.len() => {
                    return Err(StoreError::Corrupt(format!(
                        "unknown history tree {}",
                        tree[0]
                    )))
                }
                _ => {}
            }
            let mut field = |input: &mut dyn std::io::Read| -> StoreResult<Vec<u8>> {
                input.read_exact(&mut len).map_err(|_| truncated())?;
                let mut v = vec![0; u32::from_be_bytes(len) as usize];
                input.read_exact(&mut v).map_err(|_| truncated())?;
                Ok(v)
            };
            let k = field(input)?;
            let mut v = field(input)?;
            let t = tree[0] as usize;
            if t == TASKS {
                v = outline::<TaskRecord>(&next, v)?;
            } else if t == WORKFLOWS {
                v = outline::<WorkflowRecord>(&next, v)?;
            }
            next.insert(t, &k, &v)?;
        }
        next.bodies().sync()?;
        let h = Self::with(next);
        h.recount()?;
        Ok(h)
    }

    /// Makes this handle (and every clone) use `other`'s store. Returns the store it used
    /// before, to drop from disk with `Retired::remove` (outside any lock: it takes time
    /// in proportion to its size).
    pub fn replace_with(&self, other: History) -> Retired {
        let new = other.backend();
        let old = std::mem::replace(&mut *self.backend.write().expect("history lock"), new);
        self.count
            .store(other.count.load(Ordering::Relaxed), Ordering::Relaxed);
        self.tombstones
            .store(other.tombstones.load(Ordering::Relaxed), Ordering::Relaxed);
        Retired(old)
    }
}

/// A store generation no longer in use.
pub struct Retired(Arc<Backend>);

impl Retired {
    pub fn remove(self) -> StoreResult<()> {
        if let Backend::Sled {
            db,
            dir,
            generation,
            ..
        } = &*self.0
        {
            for t in TREES {
                db.drop_tree(tree_name(*generation, t))?;
            }
            std::fs::remove_dir_all(bodies_dir(dir, *generation))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
