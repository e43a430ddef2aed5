//! The bodies of finished records (the task or workflow as JSON), apart from the sled trees
//! that index them: files of their own, appended to and deleted whole.
//!
//! Why apart: a body is most of a record's bytes, written once and read rarely. In sled,
//! every body was copied again each time the tree node holding it was rewritten, and
//! expired bodies were garbage that sled's segment cleaner copied around before it freed
//! them, so the database grew well past what it held. Here a body costs one append, and a
//! file is unlinked once no record points into it. Records expire roughly in the order
//! they were written (by end time), so files die in order and the disk follows what is
//! kept.
//!
//! Layout: `<number, 20 digits>.body` in the store's directory, bodies one after another
//! with nothing between them. Where a body is, how long it is and its CRC live in the
//! index (`Loc`), so a file needs no framing; a read checks the CRC.
//!
//! Crash safety follows from the store being versioned by log index: bodies are synced
//! (`sync`) before a snapshot that covers them is made durable, and anything written after
//! the last durable snapshot is written again when the log is replayed. A body the index
//! points to may therefore be missing after a crash only for a record that the replay
//! rewrites or that expired before the snapshot (read as expired, never as a body).
//! Opening always starts a new file, numbered past every file on disk and every file a
//! record names (a file a power cut lost may still be named), so a torn tail is never
//! appended to and no number is used twice. A failed sync fails every later one and every
//! append: the kernel may have dropped the pages it could not write, and a retry that
//! succeeds would not mean they are on disk.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

/// A file takes no more bodies once it holds this much.
const FILE_BYTES: u64 = 8 << 20;

const SUFFIX: &str = ".body";

/// Where one body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Loc {
    #[serde(rename = "f")]
    file: u64,
    #[serde(rename = "o")]
    offset: u64,
    #[serde(rename = "n")]
    len: u32,
    #[serde(rename = "c")]
    crc: u32,
}

pub(super) struct Bodies {
    inner: Mutex<Inner>,
    /// Held through a whole `sync`, so a second caller waits for the first's syncs.
    syncing: Mutex<()>,
}

struct Inner {
    place: Place,
    /// Records pointing into each file (the current one even at zero; a file a record
    /// names may be missing after a power cut).
    refs: BTreeMap<u64, u64>,
    /// The file appended to, and its length.
    current: u64,
    len: u64,
    /// Nothing appended since the store was opened: `adopt` may still move `current` on.
    fresh: bool,
    /// A file takes no more bodies once it holds this much.
    file_bytes: u64,
    /// Whether the current file was written to since the last `sync`, the files rolled
    /// over since, and whether the directory changed.
    dirty: bool,
    rolled: Vec<File>,
    dir_dirty: bool,
    /// Why a sync failed: from then on nothing is written (until the hub restarts).
    failed: Option<String>,
    /// The file read last, kept open for the next read.
    reading: Option<(u64, Arc<File>)>,
}

enum Place {
    Dir { dir: PathBuf, writing: Option<File> },
    Memory(BTreeMap<u64, Vec<u8>>),
}

pub(super) fn file_name(n: u64) -> String {
    format!("{n:020}{SUFFIX}")
}

/// The numbers of the files of bodies in `dir`, in order.
fn numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(n) = name
            .to_string_lossy()
            .strip_suffix(SUFFIX)
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

impl Bodies {
    /// Bodies kept in memory (tests, and stores that are not on disk).
    pub(super) fn memory() -> Self {
        Self::with(Place::Memory(BTreeMap::new()), BTreeMap::new(), 0)
    }

    /// Opens the files in `dir`, creating it if needed; the next body goes to a new file.
    /// Every file starts with no records pointing into it: `adopt` says which are used,
    /// then `drop_unused` removes the others.
    pub(super) fn open(dir: &Path) -> io::Result<Self> {
        flotilla_common::pki::private_dir(dir).map_err(|e| io::Error::other(e.to_string()))?;
        flotilla_common::pki::sync_dir(dir);
        let refs: BTreeMap<u64, u64> = numbers(dir)?.into_iter().map(|n| (n, 0)).collect();
        let next = refs.last_key_value().map_or(0, |(n, _)| n + 1);
        Ok(Self::with(
            Place::Dir {
                dir: dir.to_owned(),
                writing: None,
            },
            refs,
            next,
        ))
    }

    fn with(place: Place, mut refs: BTreeMap<u64, u64>, current: u64) -> Self {
        refs.insert(current, 0);
        Self {
            inner: Mutex::new(Inner {
                place,
                refs,
                current,
                len: 0,
                fresh: true,
                file_bytes: FILE_BYTES,
                dirty: false,
                rolled: Vec::new(),
                dir_dirty: false,
                failed: None,
                reading: None,
            }),
            syncing: Mutex::new(()),
        }
    }

    /// Forgets what records point where, before `adopt` counts them all again.
    pub(super) fn uncount(&self) {
        let mut inner = self.inner.lock().expect("bodies lock");
        inner.refs.values_mut().for_each(|n| *n = 0);
    }

    /// Counts `loc` as pointed to (for each record the index holds, when it is opened).
    pub(super) fn adopt(&self, loc: &Loc) {
        let mut guard = self.inner.lock().expect("bodies lock");
        let inner = &mut *guard;
        *inner.refs.entry(loc.file).or_default() += 1;
        if inner.fresh && loc.file >= inner.current {
            // Named by a record, missing on disk: never a number to write to again.
            inner.current = loc.file + 1;
            inner.refs.entry(inner.current).or_default();
        }
    }

    /// Removes the files no record points into (after `adopt` has seen every record).
    pub(super) fn drop_unused(&self) -> io::Result<()> {
        let mut inner = self.inner.lock().expect("bodies lock");
        let unused: Vec<u64> = inner
            .refs
            .iter()
            .filter(|(f, n)| **n == 0 && **f != inner.current)
            .map(|(f, _)| *f)
            .collect();
        for f in unused {
            inner.remove_file(f)?;
        }
        Ok(())
    }

    /// Appends `bodies` (one write) and says where each went. One record points to each.
    pub(super) fn append(&self, bodies: &[Vec<u8>]) -> io::Result<Vec<Loc>> {
        let mut guard = self.inner.lock().expect("bodies lock");
        let inner = &mut *guard;
        inner.check()?;
        inner.fresh = false;
        if inner.len >= inner.file_bytes {
            inner.roll()?;
        }
        let mut locs = Vec::with_capacity(bodies.len());
        let mut end = inner.len;
        for b in bodies {
            let len = u32::try_from(b.len()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "a record body over 4 GiB")
            })?;
            locs.push(Loc {
                file: inner.current,
                offset: end,
                len,
                crc: crc32fast::hash(b),
            });
            end += u64::from(len);
        }
        let bytes = bodies.concat();
        match &mut inner.place {
            Place::Memory(files) => files.entry(inner.current).or_default().extend(bytes),
            Place::Dir { dir, writing } => {
                let f = match writing {
                    Some(f) => f,
                    None => {
                        inner.dir_dirty = true;
                        writing.insert(
                            std::fs::OpenOptions::new()
                                .create(true)
                                .truncate(false)
                                .write(true)
                                .mode(0o600)
                                .open(dir.join(file_name(inner.current)))?,
                        )
                    }
                };
                f.write_all_at(&bytes, inner.len)?;
            }
        }
        inner.len = end;
        inner.dirty = true;
        *inner.refs.entry(inner.current).or_default() += bodies.len() as u64;
        Ok(locs)
    }

    /// The body at `loc`; `None` if it is not there or not what was written (a file a
    /// crash cut short, or removed). The read itself runs outside the lock.
    pub(super) fn read(&self, loc: &Loc) -> io::Result<Option<Vec<u8>>> {
        let file = {
            let mut guard = self.inner.lock().expect("bodies lock");
            let inner = &mut *guard;
            match &inner.place {
                Place::Memory(files) => {
                    let body = files
                        .get(&loc.file)
                        .and_then(|f| f.get(loc.offset as usize..)?.get(..loc.len as usize))
                        .map(<[u8]>::to_vec);
                    return Ok(body.filter(|b| crc32fast::hash(b) == loc.crc));
                }
                Place::Dir { dir, .. } => match &inner.reading {
                    Some((n, f)) if *n == loc.file => f.clone(),
                    _ => match File::open(dir.join(file_name(loc.file))) {
                        Ok(f) => {
                            let f = Arc::new(f);
                            inner.reading = Some((loc.file, f.clone()));
                            f
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                        Err(e) => return Err(e),
                    },
                },
            }
        };
        // A length the file cannot hold is not read (nor allocated).
        let end = loc.offset.saturating_add(u64::from(loc.len));
        if file.metadata()?.len() < end {
            return Ok(None);
        }
        let mut body = vec![0; loc.len as usize];
        match file.read_exact_at(&mut body, loc.offset) {
            Ok(()) => Ok((crc32fast::hash(&body) == loc.crc).then_some(body)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One record fewer points to `loc`; its file goes once none does (unless it is the
    /// one appended to).
    pub(super) fn release(&self, loc: &Loc) -> io::Result<()> {
        let mut inner = self.inner.lock().expect("bodies lock");
        let Some(n) = inner.refs.get_mut(&loc.file) else {
            return Ok(());
        };
        *n = n.saturating_sub(1);
        if *n == 0 && loc.file != inner.current {
            inner.remove_file(loc.file)?;
        }
        Ok(())
    }

    /// Makes every body appended so far durable. The syncs run outside the lock that
    /// appends take, so appends go on meanwhile.
    pub(super) fn sync(&self) -> io::Result<()> {
        let _syncing = self.syncing.lock().expect("bodies sync lock");
        let (files, dir, dir_dirty) = {
            let mut guard = self.inner.lock().expect("bodies lock");
            let inner = &mut *guard;
            inner.check()?;
            let Place::Dir { dir, writing } = &inner.place else {
                inner.dirty = false;
                return Ok(());
            };
            let mut files = std::mem::take(&mut inner.rolled);
            if let (true, Some(w)) = (inner.dirty, writing) {
                files.push(w.try_clone()?);
            }
            inner.dirty = false;
            (files, dir.clone(), std::mem::take(&mut inner.dir_dirty))
        };
        let synced = (|| -> io::Result<()> {
            for f in &files {
                f.sync_data()?;
            }
            if dir_dirty {
                File::open(&dir)?.sync_all()?;
            }
            Ok(())
        })();
        if let Err(e) = &synced {
            self.inner.lock().expect("bodies lock").failed = Some(e.to_string());
        }
        synced
    }

    /// Files roll over at `n` bytes (tests).
    #[cfg(test)]
    pub(super) fn set_file_bytes(&self, n: u64) {
        self.inner.lock().expect("bodies lock").file_bytes = n;
    }

    /// The files there are, by number (for tests).
    #[cfg(test)]
    pub(super) fn files(&self) -> Vec<u64> {
        let inner = self.inner.lock().expect("bodies lock");
        match &inner.place {
            Place::Memory(files) => files.keys().copied().collect(),
            Place::Dir { dir, .. } => numbers(dir).expect("listing the files of bodies"),
        }
    }
}

impl Inner {
    /// Refuses to write once a sync failed.
    fn check(&self) -> io::Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(e) => Err(io::Error::other(format!(
                "an earlier sync of finished records failed ({e}); restart the hub"
            ))),
        }
    }

    /// Starts the next file; the one before goes if nothing points into it.
    fn roll(&mut self) -> io::Result<()> {
        let old = self.current;
        if let Place::Dir { writing, .. } = &mut self.place {
            if let Some(f) = writing.take() {
                if std::mem::take(&mut self.dirty) {
                    // The next `sync` syncs it.
                    self.rolled.push(f);
                }
            }
        }
        self.current += 1;
        self.len = 0;
        self.refs.insert(self.current, 0);
        if self.refs.get(&old) == Some(&0) {
            self.remove_file(old)?;
        }
        Ok(())
    }

    fn remove_file(&mut self, n: u64) -> io::Result<()> {
        self.refs.remove(&n);
        if self.reading.as_ref().is_some_and(|(r, _)| *r == n) {
            self.reading = None;
        }
        match &mut self.place {
            Place::Memory(files) => {
                files.remove(&n);
            }
            Place::Dir { dir, .. } => match std::fs::remove_file(dir.join(file_name(n))) {
                Ok(()) => self.dir_dirty = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
        }
        Ok(())
    }
}
