//! Calls that must run at most once, written down before they run. The hub marks an
//! assignment `at_most_once` when its tool is neither read-only nor idempotent; the node
//! puts a small file for the attempt in `calls/` under its data dir (synced, with the
//! folder) before calling the tool, and deletes it once the hub has acknowledged the
//! result. A file still there when the node starts is an attempt that was running when
//! the node stopped: the node cannot tell whether it took effect, so it reports it
//! interrupted (the hub ends it as lost) rather than running it again when the hub sends
//! the assignment once more.
//!
//! The folder holds one file per call in flight or awaiting its acknowledgement, so it
//! is bounded by the node's concurrency.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// An attempt written down before its call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub task_id: String,
    pub attempt: u32,
    pub fence: u64,
}

#[derive(Clone, Debug)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal in `data_dir/calls`, made if missing.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let dir = data_dir.join("calls");
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, task_id: &str, attempt: u32) -> PathBuf {
        // Hex keeps any task id a plain file name.
        let hex: String = task_id.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{hex}.{attempt}"))
    }

    /// Writes `e` down for good (file and folder synced). Blocking: call it off the
    /// runtime's worker threads.
    pub fn begin(&self, e: &Entry) -> io::Result<()> {
        let path = self.path(&e.task_id, e.attempt);
        let mut f = fs::File::create(&path)?;
        f.write_all(&serde_json::to_vec(e).map_err(io::Error::other)?)?;
        f.sync_all()?;
        fs::File::open(&self.dir)?.sync_all()
    }

    /// The hub has the attempt's result: forget it. A delete lost to a crash only means the
    /// attempt is reported again after the restart, which the hub refuses as stale.
    pub fn end(&self, task_id: &str, attempt: u32) {
        match fs::remove_file(self.path(task_id, attempt)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(task_id, attempt, error = %e, "cannot delete a finished call's journal entry");
            }
        }
    }

    /// The attempts written down and not yet acknowledged: at start, the ones that were
    /// running when the node stopped. A file that reads but is not a whole entry was being
    /// written when the node stopped, so its call never began: it is deleted. A file that
    /// cannot be read at all is an error: the node must not start without knowing.
    pub fn unfinished(&self) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for f in fs::read_dir(&self.dir)? {
            let path = f?.path();
            let bytes = fs::read(&path)?;
            match serde_json::from_slice::<Entry>(&bytes)
                .ok()
                .filter(|e| path == self.path(&e.task_id, e.attempt))
            {
                Some(e) => out.push(e),
                None => {
                    tracing::warn!(path = %path.display(), "deleting an unreadable call journal entry (its call never began)");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        out.sort_by(|a, b| (&a.task_id, a.attempt).cmp(&(&b.task_id, b.attempt)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(task: &str, attempt: u32) -> Entry {
        Entry {
            task_id: task.into(),
            attempt,
            fence: 7,
        }
    }

    #[test]
    fn an_attempt_written_down_is_found_after_a_restart_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.begin(&entry("t1", 1)).unwrap();
        j.begin(&entry("../evil/t2", 2)).unwrap();
        let again = Journal::open(dir.path()).unwrap();
        assert_eq!(
            again.unfinished().unwrap(),
            vec![entry("../evil/t2", 2), entry("t1", 1)]
        );
        again.end("t1", 1);
        again.end("t1", 1); // twice is harmless
        assert_eq!(again.unfinished().unwrap(), vec![entry("../evil/t2", 2)]);
        assert_eq!(fs::read_dir(dir.path().join("calls")).unwrap().count(), 1);
    }

    #[test]
    fn a_half_written_entry_is_a_call_that_never_began() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.begin(&entry("t1", 1)).unwrap();
        let torn = j.path("t2", 1);
        fs::write(&torn, br#"{"task_id":"t2","att"#).unwrap();
        fs::write(dir.path().join("calls").join("stray"), b"{}").unwrap();
        assert_eq!(j.unfinished().unwrap(), vec![entry("t1", 1)]);
        assert!(!torn.exists());
    }
}
