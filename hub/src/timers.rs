//! Task deadlines, on the leader: a task queued past its queue timeout, an attempt running
//! past its attempt timeout, or a task not ended by its total timeout gets a `TimeoutTask`
//! committed through Raft. The state machine re-checks the deadline against the command's
//! time, so a timer that fires twice (or on a leader that just lost office) changes nothing.

use std::time::Duration;

use crate::{
    chores::Chore,
    cluster::Hub,
    state::{Command, Response, State, TaskStatus, Timeout},
};

/// How often deadlines are checked: the resolution of every timeout.
const TICK: Duration = Duration::from_millis(100);

/// The deadlines due at `now_ms`: (task, kind, attempt).
pub fn due(state: &State, now_ms: i64) -> Vec<(String, Timeout, u32)> {
    let mut out = Vec::new();
    for id in &state.index.timed {
        let Some(t) = state.tasks.get(id) else {
            continue;
        };
        let d = &t.spec.deadlines;
        if d.total_timeout_ms > 0
            && now_ms >= t.created_at_ms.saturating_add(d.total_timeout_ms as i64)
        {
            // A replica ends with its fan-out task.
            if t.parent.is_none() {
                out.push((id.clone(), Timeout::Total, 0));
            }
            continue;
        }
        if t.status == TaskStatus::Queued
            && t.group.is_none()
            && t.queue_deadline_ms().is_some_and(|due| now_ms >= due)
        {
            out.push((id.clone(), Timeout::Queue, 0));
        }
        if t.status.is_active() && d.attempt_timeout_ms > 0 {
            if let Some(a) = t.current_attempt() {
                if now_ms >= a.assigned_at_ms.saturating_add(d.attempt_timeout_ms as i64) {
                    out.push((id.clone(), Timeout::Attempt, a.number));
                }
            }
        }
    }
    out
}

/// The chore that commits the deadlines `due` finds.
pub(crate) struct Deadlines;

impl Chore for Deadlines {
    fn period(&self) -> Duration {
        TICK
    }

    async fn run(&mut self, hub: &Hub) {
        let now_ms = flotilla_common::now_ms();
        let due = due(&hub.state(), now_ms);
        for (task_id, kind, attempt) in due {
            let detail = match kind {
                Timeout::Queue => hub.pending.get(&task_id).unwrap_or_default(),
                _ => String::new(),
            };
            let cmd = Command::TimeoutTask {
                task_id: task_id.clone(),
                kind,
                attempt,
                at_ms: now_ms,
                detail,
            };
            match hub.write(cmd).await {
                Ok(Response::TaskNow(status)) => {
                    tracing::info!(task_id, ?kind, attempt, ?status, "deadline passed")
                }
                Ok(other) => tracing::debug!(task_id, ?kind, ?other, "timeout not applied"),
                Err(e) => tracing::warn!(task_id, ?kind, error = %e, "timeout not committed"),
            }
        }
    }
}
