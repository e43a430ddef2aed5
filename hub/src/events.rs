//! Task events as agents see them through WatchTask: state transitions (emitted as the
//! state machine applies them, on every hub) and progress (from node sessions, on the
//! leader only, never replicated). Sequence numbers are the same on every hub: the k-th
//! transition of a task (counted in the replicated state) is `k * SEQ_STRIDE + 1`, and the
//! progress events after it take the numbers that follow. A watcher that resumes from the
//! last number it saw, on any hub, misses no transition; progress is best effort.
//!
//! Logs are memory, so they are kept only while they matter: a task's log (and its
//! broadcast channel, made when the first watcher comes) lives while the task is open and
//! for `ENDED_GRACE` after it ends, for watchers to catch up; after that a watch of the
//! task replays its final event from the task's record.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use flotilla_proto::{EventKind, TaskEvent};
use tokio::sync::broadcast;

use crate::state::{TaskRecord, TaskStatus};

/// Sequence numbers reserved per transition: the transition itself and the progress after it.
pub const SEQ_STRIDE: u64 = 1 << 20;
/// Progress events kept after one transition; later ones are dropped.
const MAX_PROGRESS_EVENTS: u64 = 1000;
/// How long an ended task's log is kept for watchers to catch up.
pub const ENDED_GRACE: Duration = Duration::from_secs(10);
/// Events a slow watcher may fall behind by before it re-reads the log.
const WATCH_BUFFER: usize = 64;

struct TaskLog {
    events: Vec<TaskEvent>,
    /// Made when the first watcher subscribes: most tasks are never watched live.
    tx: Option<broadcast::Sender<TaskEvent>>,
}

impl TaskLog {
    fn new() -> Self {
        Self {
            events: Vec::new(),
            tx: None,
        }
    }

    /// Appends an event whose `seq` is set; older or repeated numbers are ignored.
    fn push(&mut self, ev: TaskEvent) {
        if self.events.last().is_some_and(|e| e.seq >= ev.seq) {
            return;
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(ev.clone());
        }
        let last = ev.is_terminal();
        self.events.push(ev);
        if last {
            // Nothing follows the end. Watchers already subscribed still receive what was
            // sent (the buffer lives while they do); the channel's slots, allocated whole
            // up front, need not wait for the log's grace period to pass.
            self.tx = None;
        }
    }

    fn subscribe(&mut self) -> broadcast::Receiver<TaskEvent> {
        if self.events.last().is_some_and(TaskEvent::is_terminal) {
            // Everything is in the backlog: a receiver nobody sends to.
            return broadcast::channel(1).1;
        }
        self.tx
            .get_or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
            .subscribe()
    }

    /// The number for a progress event now, if there is room after the last transition.
    fn next_progress_seq(&self) -> Option<u64> {
        let last = self.events.last()?.seq;
        let base = (last - 1) / SEQ_STRIDE * SEQ_STRIDE + 1;
        (last + 1 - base <= MAX_PROGRESS_EVENTS).then_some(last + 1)
    }
}

fn transition_seq(task: &TaskRecord) -> u64 {
    u64::from(task.transitions) * SEQ_STRIDE + 1
}

#[derive(Default)]
struct Logs {
    by_task: HashMap<String, TaskLog>,
    /// Ended tasks in the order they ended: their logs go after `ENDED_GRACE`.
    ended: VecDeque<(Instant, String)>,
    /// Task → (attempt, when) its node said it started the attempt: leader memory, like
    /// progress (the start is not a Raft commit; the result carries the time into the
    /// record). Kept apart from the logs, which may be missing (after a snapshot or a
    /// restart), and dropped when the task leaves assigned/running.
    started: HashMap<String, (u32, i64)>,
}

impl Logs {
    fn prune(&mut self, now: Instant) {
        while let Some((at, _)) = self.ended.front() {
            if now.saturating_duration_since(*at) < ENDED_GRACE {
                break;
            }
            if let Some((_, id)) = self.ended.pop_front() {
                self.by_task.remove(&id);
            }
        }
    }
}

#[derive(Clone, Default)]
pub struct EventLogs {
    inner: Arc<Mutex<Logs>>,
}

pub fn kind_of(status: TaskStatus) -> EventKind {
    match status {
        TaskStatus::Queued => EventKind::Queued,
        TaskStatus::Assigned => EventKind::Assigned,
        TaskStatus::Running => EventKind::Started,
        TaskStatus::Succeeded => EventKind::Succeeded,
        TaskStatus::Failed => EventKind::Failed,
        TaskStatus::Cancelled => EventKind::Cancelled,
        TaskStatus::Lost => EventKind::Lost,
    }
}

/// The event describing `task` as it stands now (its last transition).
pub fn transition_event(task: &TaskRecord) -> TaskEvent {
    let attempt = task.current_attempt();
    let mut ev = TaskEvent {
        seq: transition_seq(task),
        task_id: task.id.clone(),
        kind: kind_of(task.status) as i32,
        at_ms: task.updated_at_ms,
        node_id: attempt.map(|a| a.node_id.clone()).unwrap_or_default(),
        attempt: attempt.map_or(0, |a| a.number),
        ..Default::default()
    };
    if task.status.is_terminal() {
        ev.result = task
            .result
            .as_ref()
            .map(|r| serde_json::to_vec(r).unwrap_or_default())
            .unwrap_or_default();
        ev.error = task.error.clone().unwrap_or_default();
    }
    if task.status == TaskStatus::Queued {
        if let Some(a) = attempt {
            // Requeued: say why.
            ev.message = a.error.clone().unwrap_or_default();
        }
    }
    ev
}

impl EventLogs {
    /// Records the transition `task` just made.
    pub fn transition(&self, task: &TaskRecord) {
        self.transition_at(task, Instant::now());
    }

    fn transition_at(&self, task: &TaskRecord, now: Instant) {
        let mut logs = self.inner.lock().expect("event log lock");
        logs.prune(now);
        let log = match logs.by_task.entry(task.id.clone()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let log = v.insert(TaskLog::new());
                // A task placed as it was submitted is queued and assigned in one entry:
                // its log starts at its second transition, so it gets its first too.
                if task.transitions == 1 && task.status != TaskStatus::Queued {
                    log.push(TaskEvent {
                        seq: 1,
                        task_id: task.id.clone(),
                        kind: EventKind::Queued as i32,
                        at_ms: task.created_at_ms,
                        ..Default::default()
                    });
                }
                log
            }
        };
        log.push(transition_event(task));
        if task.status.is_terminal() {
            logs.ended.push_back((now, task.id.clone()));
        }
        if !task.status.is_active() {
            logs.started.remove(&task.id);
        }
    }

    /// Records that the node running `task_id` started `attempt` at `at_ms`: a `Started`
    /// event for watchers (numbered like progress) and the time, for the result.
    pub fn started(&self, task_id: &str, node_id: &str, attempt: u32, at_ms: i64) {
        let mut logs = self.inner.lock().expect("event log lock");
        if logs
            .started
            .get(task_id)
            .is_some_and(|(a, _)| *a == attempt)
        {
            return;
        }
        logs.started.insert(task_id.to_owned(), (attempt, at_ms));
        let Some(log) = logs.by_task.get_mut(task_id) else {
            return;
        };
        if let Some(seq) = log.next_progress_seq() {
            log.push(TaskEvent {
                seq,
                task_id: task_id.to_owned(),
                kind: EventKind::Started as i32,
                at_ms,
                node_id: node_id.to_owned(),
                attempt,
                ..Default::default()
            });
        }
    }

    /// When `attempt` of `task_id` started, if its node said so to this hub.
    pub fn started_at(&self, task_id: &str, attempt: u32) -> Option<i64> {
        let logs = self.inner.lock().expect("event log lock");
        logs.started
            .get(task_id)
            .filter(|(a, _)| *a == attempt)
            .map(|(_, at)| *at)
    }

    /// The last `max` progress events of `task_id` this hub still holds (while the task is
    /// open and for a short grace after), oldest first.
    pub fn progress_of(&self, task_id: &str, max: usize) -> Vec<TaskEvent> {
        let logs = self.inner.lock().expect("event log lock");
        let Some(log) = logs.by_task.get(task_id) else {
            return Vec::new();
        };
        let progress = log
            .events
            .iter()
            .filter(|e| e.kind == EventKind::Progress as i32);
        let skip = progress.clone().count().saturating_sub(max);
        progress.skip(skip).cloned().collect()
    }

    /// Records progress reported by the node running `task_id`.
    pub fn progress(&self, mut ev: TaskEvent) {
        let mut logs = self.inner.lock().expect("event log lock");
        if let Some(log) = logs.by_task.get_mut(&ev.task_id) {
            if let Some(seq) = log.next_progress_seq() {
                ev.seq = seq;
                log.push(ev);
            }
        }
    }

    /// Events from `from_seq` on, and a receiver for later ones. A task with no log here
    /// (ended past the grace, or known only from a snapshot) is replayed from its record:
    /// its last transition, which for an ended task is the final event.
    pub fn subscribe(
        &self,
        task: &TaskRecord,
        from_seq: u64,
    ) -> (Vec<TaskEvent>, broadcast::Receiver<TaskEvent>) {
        let mut logs = self.inner.lock().expect("event log lock");
        let from_log = |log: &TaskLog| -> Vec<TaskEvent> {
            log.events
                .iter()
                .filter(|e| e.seq >= from_seq)
                .cloned()
                .collect()
        };
        if let Some(log) = logs.by_task.get_mut(&task.id) {
            return (from_log(log), log.subscribe());
        }
        let mut log = TaskLog::new();
        log.push(transition_event(task));
        if task.status.is_terminal() {
            // Nothing will follow: no log to keep, and a receiver nobody sends to.
            return (from_log(&log), broadcast::channel(1).1);
        }
        let backlog = from_log(&log);
        let rx = log.subscribe();
        logs.by_task.insert(task.id.clone(), log);
        (backlog, rx)
    }

    /// Forgets everything (after a snapshot replaced the state).
    pub fn clear(&self) {
        let mut logs = self.inner.lock().expect("event log lock");
        logs.by_task.clear();
        logs.ended.clear();
        logs.started.clear();
    }

    /// Tasks with a log in memory.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("event log lock").by_task.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(id: &str, status: TaskStatus, transitions: u32) -> TaskRecord {
        let mut t = TaskRecord::new(id, "echo", "t", "a", json!({}), 1);
        t.status = status;
        t.transitions = transitions;
        t
    }

    #[test]
    fn ended_tasks_logs_go_after_the_grace_and_replay_from_the_record() {
        let logs = EventLogs::default();
        let t0 = Instant::now();
        for i in 0..100 {
            let id = format!("t{i}");
            logs.transition_at(&task(&id, TaskStatus::Queued, 0), t0);
            logs.transition_at(&task(&id, TaskStatus::Succeeded, 3), t0);
        }
        logs.transition_at(&task("open", TaskStatus::Queued, 0), t0);
        assert_eq!(logs.len(), 101);
        // Within the grace a watcher still reads the whole log.
        let (backlog, _) = logs.subscribe(&task("t1", TaskStatus::Succeeded, 3), 0);
        assert_eq!(backlog.len(), 2);
        logs.transition_at(&task("open", TaskStatus::Assigned, 1), t0 + ENDED_GRACE);
        assert_eq!(logs.len(), 1, "only the open task keeps a log");
        // After it, the record answers: the final event, numbered as before.
        let done = task("t1", TaskStatus::Succeeded, 3);
        let (backlog, _) = logs.subscribe(&done, 0);
        assert_eq!(backlog.len(), 1);
        assert_eq!(backlog[0].seq, 3 * SEQ_STRIDE + 1);
        assert!(backlog[0].is_terminal());
        assert_eq!(logs.len(), 1, "replaying an ended task keeps nothing");
        let (backlog, _) = logs.subscribe(&done, 3 * SEQ_STRIDE + 2);
        assert!(
            backlog.is_empty(),
            "a watcher that saw the end gets nothing more"
        );
    }

    #[test]
    fn a_start_is_an_event_and_a_time_for_its_attempt_only() {
        let logs = EventLogs::default();
        let (_, mut rx) = logs.subscribe(&task("s", TaskStatus::Assigned, 2), 0);
        logs.started("s", "n1", 1, 500);
        logs.started("s", "n1", 1, 600);
        let ev = rx.try_recv().unwrap();
        assert_eq!(ev.kind(), EventKind::Started);
        assert_eq!(ev.seq, 2 * SEQ_STRIDE + 2);
        assert!(rx.try_recv().is_err(), "a repeated start is one event");
        assert_eq!(logs.started_at("s", 1), Some(500));
        assert_eq!(logs.started_at("s", 2), None);
        // A hub with no log for the task (after a snapshot) still keeps the time.
        logs.started("other", "n1", 1, 700);
        assert_eq!(logs.started_at("other", 1), Some(700));
        // Gone when the task leaves assigned/running.
        logs.transition(&task("s", TaskStatus::Succeeded, 3));
        assert_eq!(logs.started_at("s", 1), None);
    }

    #[test]
    fn a_watcher_of_an_open_task_gets_what_follows() {
        let logs = EventLogs::default();
        let (backlog, mut rx) = logs.subscribe(&task("x", TaskStatus::Queued, 0), 0);
        assert_eq!(backlog.len(), 1);
        logs.transition(&task("x", TaskStatus::Assigned, 1));
        assert_eq!(rx.try_recv().unwrap().seq, SEQ_STRIDE + 1);
        // The end reaches the watcher, and then the channel is gone (its slots are
        // allocated whole; ended logs stay for a grace period), and the watcher told so.
        logs.transition(&task("x", TaskStatus::Succeeded, 2));
        assert!(rx.try_recv().unwrap().is_terminal());
        assert_eq!(rx.try_recv(), Err(broadcast::error::TryRecvError::Closed));
        let inner = logs.inner.lock().unwrap();
        assert!(inner.by_task["x"].tx.is_none());
        drop(inner);
        // A later watcher gets the whole log as backlog and a closed receiver.
        let (backlog, mut late) = logs.subscribe(&task("x", TaskStatus::Succeeded, 2), 0);
        assert_eq!(backlog.len(), 3);
        assert_eq!(late.try_recv(), Err(broadcast::error::TryRecvError::Closed));
    }
}
