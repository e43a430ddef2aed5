//! A node's reports on the attempt it holds: it started, it finished (with the tool's
//! result or an error), it was interrupted (the node restarted mid-call). A report counts only from the node holding the current attempt,
//! with that attempt's number and fence; anything else is refused and changes nothing.

use serde_json::Value;

use super::{
    tasks::check_current, FailureKind, Rejection, Response, State, TaskRecord, TaskStatus,
};

/// Who reports on which attempt, and when.
pub(super) struct Report<'a> {
    pub task_id: &'a str,
    pub attempt: u32,
    pub fence: u64,
    /// The reporting node's certificate name (empty: the hub, in entries written before
    /// the check existed).
    pub node_id: &'a str,
    pub at_ms: i64,
}

impl State {
    /// The attempt started (committed only for tools that must not run twice).
    pub(super) fn start(&mut self, r: &Report<'_>) -> Result<Response, Rejection> {
        self.update(r.task_id, true, |t| {
            check_reporter(t, r)?;
            if t.status != TaskStatus::Assigned {
                return Err(Rejection::WrongState(t.status));
            }
            t.set(TaskStatus::Running, r.at_ms);
            if let Some(a) = t.attempts.last_mut() {
                a.started_at_ms = Some(r.at_ms);
            }
            Ok(Response::TaskNow(t.status))
        })
    }

    /// The attempt finished: the task succeeds, or fails (or is retried, as its policy
    /// says); what happened teaches the node's tool statistics and breaker.
    pub(super) fn finish(
        &mut self,
        r: &Report<'_>,
        result: Option<&Value>,
        error: Option<&str>,
        started_at_ms: Option<i64>,
    ) -> Result<Response, Rejection> {
        let at_ms = r.at_ms;
        let (status, tool, node, server, ok, took) = self.update(r.task_id, true, |t| {
            check_reporter(t, r)?;
            if !t.status.is_active() {
                return Err(Rejection::WrongState(t.status));
            }
            let tool_error = result
                .and_then(|v| v.get("isError"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let ok = result.is_some() && error.is_none() && !tool_error;
            let a = t
                .attempts
                .last_mut()
                .expect("an active task has an attempt");
            if a.started_at_ms.is_none() {
                a.started_at_ms = started_at_ms.filter(|s| *s <= at_ms);
            }
            a.finished_at_ms = Some(at_ms);
            a.error = error
                .map(str::to_owned)
                .or_else(|| tool_error.then(|| "the tool returned isError".into()));
            let took = (at_ms - a.started_at_ms.unwrap_or(a.assigned_at_ms)).max(0) as u64;
            let (node, server) = (a.node_id.clone(), a.server.clone());
            t.result = result.cloned();
            if ok {
                t.error = None;
                t.set(TaskStatus::Succeeded, at_ms);
            } else {
                let why = error.map(str::to_owned).unwrap_or_else(|| {
                    format!("attempt {} on {node}: the tool returned isError", r.attempt)
                });
                t.fail_or_retry(FailureKind::ToolError, TaskStatus::Failed, why, at_ms);
            }
            Ok((t.status, t.tool.clone(), node, server, ok, took))
        })?;
        // A tool's own isError is its answer; only failures of the call itself count
        // against the server's breaker.
        self.learn(&tool, &node, &server, ok, error.is_none(), took, at_ms);
        Ok(Response::TaskNow(status))
    }
}

impl State {
    /// The node holding the attempt stopped while the call ran and cannot tell whether it
    /// took effect: lost, as on node loss (run again only when the retry policy covers
    /// node loss). The server's breaker learns nothing: the server did not fail. An
    /// attempt whose start the log never took (still assigned) never ran, since the node
    /// calls such a tool only once its start is committed: it goes back to the queue,
    /// not counted as a try.
    pub(super) fn lose(&mut self, r: &Report<'_>, reason: &str) -> Result<Response, Rejection> {
        self.update(r.task_id, true, |t| {
            check_reporter(t, r)?;
            if !t.status.is_active() {
                return Err(Rejection::WrongState(t.status));
            }
            if t.status == TaskStatus::Assigned {
                t.close_attempt(r.at_ms, "its node stopped before the call started");
                if let Some(a) = t.attempts.last_mut() {
                    a.requeued = true;
                }
                t.set(TaskStatus::Queued, r.at_ms);
                return Ok(Response::TaskNow(t.status));
            }
            t.close_attempt(r.at_ms, reason);
            t.fail_or_retry(
                FailureKind::NodeLost,
                TaskStatus::Lost,
                reason.to_owned(),
                r.at_ms,
            );
            Ok(Response::TaskNow(t.status))
        })
    }
}

/// A node's report on an attempt: it must be the current one, and held by that node (an
/// empty `node_id` is the hub speaking for itself, in entries written before the check).
fn check_reporter(t: &TaskRecord, r: &Report<'_>) -> Result<(), Rejection> {
    check_current(t, r.attempt, r.fence)?;
    match t.current_attempt() {
        Some(a) if !r.node_id.is_empty() && a.node_id != r.node_id => {
            Err(Rejection::NotYourAttempt)
        }
        _ => Ok(()),
    }
}
