//! Where the history store lives: sled trees of one generation in a hub's database
//! (`history.<generation>.<tree>`) with the records' bodies in `<dir>/<generation>/`, or
//! maps in memory (tests, and the state a unit test applies). A snapshot install writes
//! the next generation and drops the old.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use super::{bodies::Bodies, StoreResult};

/// The trees, in the order their indexes name them.
pub(super) const TREES: [&str; 8] = [
    "tasks",
    "workflows",
    "keys",
    "by_tenant",
    "dead",
    "by_finish",
    "expired",
    "gone",
];

pub(super) enum Backend {
    Memory {
        trees: Mutex<[BTreeMap<Vec<u8>, Vec<u8>>; 8]>,
        bodies: Bodies,
    },
    Sled {
        db: sled::Db,
        /// Where the bodies of every generation are (one directory each).
        dir: PathBuf,
        generation: u64,
        trees: Box<[sled::Tree; 8]>,
        bodies: Bodies,
    },
}

impl Backend {
    pub(super) fn memory() -> Self {
        Self::Memory {
            trees: Mutex::default(),
            bodies: Bodies::memory(),
        }
    }

    pub(super) fn open(db: &sled::Db, dir: &Path, generation: u64) -> StoreResult<Self> {
        let mut trees = Vec::with_capacity(TREES.len());
        for t in TREES {
            trees.push(db.open_tree(tree_name(generation, t))?);
        }
        flotilla_common::pki::private_dir(dir).map_err(|e| std::io::Error::other(e.to_string()))?;
        flotilla_common::pki::sync_dir(dir);
        Ok(Self::Sled {
            db: db.clone(),
            dir: dir.to_owned(),
            generation,
            trees: Box::new(trees.try_into().expect("one sled tree per name")),
            bodies: Bodies::open(&bodies_dir(dir, generation))?,
        })
    }

    pub(super) fn bodies(&self) -> &Bodies {
        match self {
            Self::Memory { bodies, .. } | Self::Sled { bodies, .. } => bodies,
        }
    }

    pub(super) fn get(&self, t: usize, k: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(match self {
            Self::Memory { trees: m, .. } => m.lock().expect("history lock")[t].get(k).cloned(),
            Self::Sled { trees, .. } => trees[t].get(k)?.map(|v| v.to_vec()),
        })
    }

    /// Writes `k`; whether it was there before.
    pub(super) fn insert(&self, t: usize, k: &[u8], v: &[u8]) -> StoreResult<bool> {
        Ok(match self {
            Self::Memory { trees: m, .. } => m.lock().expect("history lock")[t]
                .insert(k.to_vec(), v.to_vec())
                .is_some(),
            Self::Sled { trees, .. } => trees[t].insert(k, v)?.is_some(),
        })
    }

    /// Writes `k` unless it is there: `None` when written, else the value it holds.
    pub(super) fn insert_new(&self, t: usize, k: &[u8], v: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(match self {
            Self::Memory { trees: m, .. } => {
                match m.lock().expect("history lock")[t].entry(k.to_vec()) {
                    std::collections::btree_map::Entry::Occupied(e) => Some(e.get().clone()),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(v.to_vec());
                        None
                    }
                }
            }
            Self::Sled { trees, .. } => {
                match trees[t].compare_and_swap(k, None::<&[u8]>, Some(v))? {
                    Ok(()) => None,
                    Err(e) => e.current.map(|c| c.to_vec()),
                }
            }
        })
    }

    /// Writes `k`; the value it had before.
    pub(super) fn replace(&self, t: usize, k: &[u8], v: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(match self {
            Self::Memory { trees: m, .. } => {
                m.lock().expect("history lock")[t].insert(k.to_vec(), v.to_vec())
            }
            Self::Sled { trees, .. } => trees[t].insert(k, v)?.map(|v| v.to_vec()),
        })
    }

    /// Removes `k`; the value it had.
    pub(super) fn take(&self, t: usize, k: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(match self {
            Self::Memory { trees: m, .. } => m.lock().expect("history lock")[t].remove(k),
            Self::Sled { trees, .. } => trees[t].remove(k)?.map(|v| v.to_vec()),
        })
    }

    /// Removes `k`; whether it was there.
    pub(super) fn remove(&self, t: usize, k: &[u8]) -> StoreResult<bool> {
        Ok(match self {
            Self::Memory { trees: m, .. } => m.lock().expect("history lock")[t].remove(k).is_some(),
            Self::Sled { trees, .. } => trees[t].remove(k)?.is_some(),
        })
    }

    /// Keys (and values) of tree `t` starting with `prefix`, in order (reversed with
    /// `rev`), while `f` says go on.
    pub(super) fn scan(
        &self,
        t: usize,
        prefix: &[u8],
        rev: bool,
        f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> StoreResult<()> {
        self.scan_before(t, prefix, None, rev, f)
    }

    /// `scan`, of the keys below `before` only.
    pub(super) fn scan_before(
        &self,
        t: usize,
        prefix: &[u8],
        before: Option<&[u8]>,
        rev: bool,
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> StoreResult<()> {
        let below = |k: &[u8]| before.is_none_or(|b| k < b);
        match self {
            Self::Memory { trees: m, .. } => {
                // Copied out first: `f` may read the store again.
                let mut items: Vec<(Vec<u8>, Vec<u8>)> = m.lock().expect("history lock")[t]
                    .range(prefix.to_vec()..)
                    .take_while(|(k, _)| k.starts_with(prefix) && below(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if rev {
                    items.reverse();
                }
                for (k, v) in items {
                    if !f(&k, &v) {
                        break;
                    }
                }
            }
            Self::Sled { trees, .. } => {
                let it = match before {
                    Some(b) => trees[t].range(prefix.to_vec()..b.to_vec()),
                    None => trees[t].scan_prefix(prefix),
                };
                let it: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if rev {
                    Box::new(it.rev())
                } else {
                    Box::new(it)
                };
                for item in it {
                    let (k, v) = item?;
                    if !f(&k, &v) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn clear(&self) -> StoreResult<()> {
        match self {
            Self::Memory { trees: m, .. } => m
                .lock()
                .expect("history lock")
                .iter_mut()
                .for_each(BTreeMap::clear),
            Self::Sled { trees, .. } => {
                for t in trees.iter() {
                    t.clear()?;
                }
            }
        }
        Ok(())
    }
}

pub(super) fn tree_name(generation: u64, tree: &str) -> String {
    format!("history.{generation}.{tree}")
}

/// The directory of generation `generation`'s bodies.
pub(super) fn bodies_dir(dir: &Path, generation: u64) -> PathBuf {
    dir.join(generation.to_string())
}

/// Drops the trees and bodies of every history generation but `keep`.
pub(super) fn drop_other_generations(db: &sled::Db, dir: &Path, keep: u64) -> StoreResult<()> {
    let prefix = format!("history.{keep}.");
    for name in db.tree_names() {
        let name = String::from_utf8_lossy(&name).into_owned();
        if name.starts_with("history.") && !name.starts_with(&prefix) {
            db.drop_tree(name)?;
        }
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let generation = entry.file_name().to_string_lossy().parse::<u64>().ok();
        if generation.is_some_and(|g| g != keep) {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}
