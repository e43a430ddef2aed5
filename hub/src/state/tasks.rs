//! Tasks: accepting a submission (with its replicas), assigning an attempt, requeueing one
//! that never started, cancelling, and timeouts. What a node's reports do is in
//! `reports.rs`.

use super::{
    idempotency_index, AttemptRecord, FailureKind, Group, Rejection, Response, State, TaskRecord,
    TaskStatus, Timeout,
};

impl State {
    /// Whether running `t`'s tool twice is harmless: the catalogue marks it read-only or
    /// idempotent. Any other tool runs at most once: its start is committed, and its node
    /// writes the attempt down before calling it.
    pub fn safe_to_rerun(&self, t: &TaskRecord) -> bool {
        self.catalogue
            .get(&t.tool)
            .is_some_and(|e| e.def.safe_to_rerun())
    }

    /// Whether another replica of `task_id`'s fan-out task is assigned or running on `node`.
    pub(super) fn sibling_on(&self, task_id: &str, node: &str) -> bool {
        let Some(group) = self
            .tasks
            .get(task_id)
            .and_then(|t| t.parent.as_ref())
            .and_then(|p| self.tasks.get(p))
            .and_then(|p| p.group.as_ref())
        else {
            return false;
        };
        group.replicas.iter().filter(|r| *r != task_id).any(|r| {
            self.tasks.get(r).is_some_and(|s| {
                s.status.is_active() && s.current_attempt().is_some_and(|a| a.node_id == node)
            })
        })
    }

    pub(super) fn submit(&mut self, index: u64, task: &TaskRecord) -> Response {
        // The same submission committed twice (a forwarded write retried) is one task.
        if self.tasks.contains_key(&task.id)
            || self.stored(|h| h.task_at(&task.id, index)).is_some()
        {
            return Response::Submitted {
                task_id: task.id.clone(),
                deduplicated: true,
            };
        }
        if let Some(key) = &task.idempotency_key {
            let ix = idempotency_index(&task.tenant, key);
            let existing = self
                .idempotency
                .get(&ix)
                .cloned()
                .or_else(|| self.stored(|h| h.keyed_at(false, &task.tenant, key, index)));
            if let Some(existing) = existing {
                return Response::Submitted {
                    task_id: existing,
                    deduplicated: true,
                };
            }
            self.idempotency.insert(ix, task.id.clone());
        }
        self.insert_with_replicas((*task).clone());
        Response::Submitted {
            task_id: task.id.clone(),
            deduplicated: false,
        }
    }

    /// Inserts a task; one asking for several replicas becomes a fan-out task plus one
    /// task per replica (ids `<id>/r<i>`: `/` is in no step name or generated id).
    pub(super) fn insert_with_replicas(&mut self, mut task: TaskRecord) {
        let n = task.spec.replicas;
        if n <= 1 {
            self.insert_task(task);
            return;
        }
        let ids: Vec<String> = (0..n).map(|i| format!("{}/r{i}", task.id)).collect();
        task.group = Some(Group {
            replicas: ids.clone(),
        });
        for id in ids {
            let mut r = task.clone();
            r.id = id;
            r.group = None;
            r.parent = Some(task.id.clone());
            r.idempotency_key = None;
            r.workflow = None;
            r.spec.replicas = 1;
            self.insert_task(r);
        }
        self.insert_task(task);
    }

    /// A node is given the task's next attempt; the attempt's fence is the log index of
    /// the entry that assigns it.
    pub(super) fn assign(
        &mut self,
        index: u64,
        task_id: &str,
        node_id: &str,
        server: &str,
        at_ms: i64,
    ) -> Result<Response, Rejection> {
        if !self.nodes.contains_key(node_id) {
            return Err(Rejection::NoSuchNode(node_id.to_owned()));
        }
        if self.sibling_on(task_id, node_id) {
            return Err(Rejection::SiblingOnNode);
        }
        self.update(task_id, false, |t| {
            if t.status != TaskStatus::Queued || t.group.is_some() {
                return Err(Rejection::WrongState(t.status));
            }
            let attempt = t.attempts.len() as u32 + 1;
            t.attempts.push(AttemptRecord {
                number: attempt,
                node_id: node_id.to_owned(),
                server: server.to_owned(),
                fence: index,
                assigned_at_ms: at_ms,
                started_at_ms: None,
                finished_at_ms: None,
                error: None,
                requeued: false,
            });
            t.not_before_ms = None;
            t.set(TaskStatus::Assigned, at_ms);
            Ok(Response::Assigned {
                attempt,
                fence: index,
            })
        })
    }

    /// An assigned attempt that never reached its node goes back to the queue. Refused
    /// when the node said hello after the attempt was assigned: that hello's session sent
    /// the assignment again, so the node may be running it.
    pub(super) fn requeue(
        &mut self,
        task_id: &str,
        attempt: u32,
        fence: u64,
        at_ms: i64,
        reason: &str,
    ) -> Result<Response, Rejection> {
        let resent = self
            .tasks
            .get(task_id)
            .and_then(|t| t.current_attempt())
            .is_some_and(|a| {
                self.nodes.get(&a.node_id).is_some_and(|n| {
                    n.last_hello_ms
                        .is_some_and(|hello| hello > a.assigned_at_ms)
                })
            });
        if resent {
            return Err(Rejection::Stale);
        }
        self.update(task_id, false, |t| {
            check_current(t, attempt, fence)?;
            if t.status != TaskStatus::Assigned {
                return Err(Rejection::WrongState(t.status));
            }
            t.close_attempt(at_ms, reason);
            if let Some(a) = t.attempts.last_mut() {
                a.requeued = true;
            }
            t.set(TaskStatus::Queued, at_ms);
            Ok(Response::TaskNow(t.status))
        })
    }

    /// An agent cancels a task that has not ended (a fan-out task with its replicas).
    pub(super) fn cancel(
        &mut self,
        index: u64,
        task_id: &str,
        at_ms: i64,
    ) -> Result<Response, Rejection> {
        let Some(t) = self.tasks.get(task_id) else {
            return Err(self.missing_task(task_id, index));
        };
        if t.status.is_terminal() {
            return Err(Rejection::WrongState(t.status));
        }
        self.end_task(task_id, TaskStatus::Cancelled, "cancelled", at_ms);
        Ok(Response::TaskNow(TaskStatus::Cancelled))
    }

    pub(super) fn timeout(
        &mut self,
        task_id: &str,
        kind: Timeout,
        attempt: u32,
        at_ms: i64,
        detail: &str,
    ) -> Result<Response, Rejection> {
        let t = self
            .tasks
            .get(task_id)
            .ok_or_else(|| Rejection::NoSuchTask(task_id.to_owned()))?;
        let d = &t.spec.deadlines;
        match kind {
            Timeout::Queue => {
                if t.status != TaskStatus::Queued || t.group.is_some() {
                    return Err(Rejection::WrongState(t.status));
                }
                let limit = d.queue_timeout_ms;
                if t.queue_deadline_ms().is_none_or(|due| at_ms < due) {
                    return Err(Rejection::NotDue);
                }
                let why = if detail.is_empty() {
                    format!("not placed within its queue timeout of {limit} ms")
                } else {
                    format!("not placed within its queue timeout of {limit} ms: {detail}")
                };
                self.update(task_id, false, |t| {
                    t.error = Some(why);
                    t.dead_lettered = true;
                    t.set(TaskStatus::Failed, at_ms);
                    Ok(())
                })?;
            }
            Timeout::Attempt => {
                let limit = d.attempt_timeout_ms;
                let a = t.current_attempt().filter(|a| a.number == attempt);
                let Some(a) = a.filter(|_| t.status.is_active()) else {
                    return Err(Rejection::Stale);
                };
                if limit == 0 || at_ms < a.assigned_at_ms.saturating_add(limit as i64) {
                    return Err(Rejection::NotDue);
                }
                let (tool, node, server) = (t.tool.clone(), a.node_id.clone(), a.server.clone());
                let why = format!("attempt {attempt} on {node} timed out after {limit} ms");
                self.update(task_id, false, |t| {
                    t.close_attempt(at_ms, &why);
                    t.fail_or_retry(FailureKind::Timeout, TaskStatus::Failed, why.clone(), at_ms);
                    Ok(())
                })?;
                self.learn(&tool, &node, &server, false, false, limit, at_ms);
            }
            Timeout::Total => {
                if t.status.is_terminal() {
                    return Err(Rejection::WrongState(t.status));
                }
                let limit = d.total_timeout_ms;
                if limit == 0 || at_ms < t.created_at_ms.saturating_add(limit as i64) {
                    return Err(Rejection::NotDue);
                }
                let why = format!("did not finish within its total timeout of {limit} ms");
                self.end_task(task_id, TaskStatus::Failed, &why, at_ms);
                if let Some(t) = self.tasks.get_mut(task_id) {
                    t.dead_lettered = true;
                }
            }
        }
        Ok(Response::TaskNow(self.tasks[task_id].status))
    }
}

pub(super) fn check_current(t: &TaskRecord, attempt: u32, fence: u64) -> Result<(), Rejection> {
    match t.current_attempt() {
        Some(a) if a.number == attempt && a.fence == fence => Ok(()),
        _ => Err(Rejection::Stale),
    }
}
