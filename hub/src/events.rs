//! Task events as agents see them through WatchTask: state transitions (emitted as the
//! state machine applies them, on every hub) and progress (from node sessions, on the
//! leader only, never replicated). Sequence numbers are the same on every hub: the k-th
//! transition of a task (counted in the replicated state) is `k * SEQ_STRIDE + 1`, and the
//! progress events after it take the numbers that follow. A watcher that resumes from the
//! last number it saw, on any hub, misses no transition; progress is best effort.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use flotilla_proto::{EventKind, TaskEvent};
use tokio::sync::broadcast;

use crate::state::{TaskRecord, TaskStatus};

/// Sequence numbers reserved per transition: the transition itself and the progress after it.
pub const SEQ_STRIDE: u64 = 1 << 20;
/// Progress events kept after one transition; later ones are dropped.
const MAX_PROGRESS_EVENTS: u64 = 1000;

struct TaskLog {
    events: Vec<TaskEvent>,
    tx: broadcast::Sender<TaskEvent>,
}

impl TaskLog {
    fn new() -> Self {
        Self {
            events: Vec::new(),
            tx: broadcast::channel(256).0,
        }
    }

    /// Appends an event whose `seq` is set; older or repeated numbers are ignored.
    fn push(&mut self, ev: TaskEvent) {
        if self.events.last().is_some_and(|e| e.seq >= ev.seq) {
            return;
        }
        let _ = self.tx.send(ev.clone());
        self.events.push(ev);
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

#[derive(Clone, Default)]
pub struct EventLogs {
    inner: Arc<Mutex<HashMap<String, TaskLog>>>,
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
        let mut logs = self.inner.lock().expect("event log lock");
        logs.entry(task.id.clone())
            .or_insert_with(TaskLog::new)
            .push(transition_event(task));
    }

    /// Records progress reported by the node running `task_id`.
    pub fn progress(&self, mut ev: TaskEvent) {
        let mut logs = self.inner.lock().expect("event log lock");
        if let Some(log) = logs.get_mut(&ev.task_id) {
            if let Some(seq) = log.next_progress_seq() {
                ev.seq = seq;
                log.push(ev);
            }
        }
    }

    /// Events from `from_seq` on, and a receiver for later ones. A task with no log here
    /// (known only from a snapshot) gets one made from its record.
    pub fn subscribe(
        &self,
        task: &TaskRecord,
        from_seq: u64,
    ) -> (Vec<TaskEvent>, broadcast::Receiver<TaskEvent>) {
        let mut logs = self.inner.lock().expect("event log lock");
        let log = logs.entry(task.id.clone()).or_insert_with(|| {
            let mut log = TaskLog::new();
            log.push(transition_event(task));
            log
        });
        let backlog = log
            .events
            .iter()
            .filter(|e| e.seq >= from_seq)
            .cloned()
            .collect();
        (backlog, log.tx.subscribe())
    }

    /// Forgets everything (after a snapshot replaced the state).
    pub fn clear(&self) {
        self.inner.lock().expect("event log lock").clear();
    }
}

pub fn is_terminal_event(ev: &TaskEvent) -> bool {
    matches!(
        EventKind::try_from(ev.kind),
        Ok(EventKind::Succeeded | EventKind::Failed | EventKind::Cancelled | EventKind::Lost)
    )
}
