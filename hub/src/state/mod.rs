//! The replicated state machine: every durable fact of the cluster (tasks and their
//! transitions, workflows, nodes, join tokens, signing keys, the tool catalogue, what past
//! results taught about each node) and the only code that changes it. `apply` is
//! deterministic: commands carry their own timestamps, and the fence of an assignment is the
//! Raft log index that committed it.
//!
//! Every change to a task goes through `State::update`, which keeps the derived indexes
//! (`index`) exact and records the effects the hub acts on after the apply (`Effects`:
//! which tasks moved, which running attempts a node must stop). Changes then settle: a
//! replica that ends may decide its fan-out task, a step that ends may start or skip others.

mod archive;
mod command;
mod fanout;
pub mod history;
pub mod index;
mod nodes;
mod records;
pub mod spec;
mod tasks;
mod workflow;

use std::collections::BTreeMap;

use flotilla_common::jwt::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::tasks::{check_current, check_reporter};
pub use self::{
    command::*,
    fanout::vote_of,
    history::{History, Lookup},
    index::Index,
    records::*,
    spec::{Aggregation, Constraints, Deadlines, FailureKind, RetryPolicy, TaskSpec, Timeout},
    workflow::{
        check_shape as check_workflow_shape, referenced_steps as workflow_references,
        FailurePolicy, StepRecord, StepState, WorkflowRecord, WorkflowStatus,
    },
};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub tasks: BTreeMap<String, TaskRecord>,
    /// `tenant` NUL `key` → task id.
    pub idempotency: BTreeMap<String, String>,
    pub nodes: BTreeMap<String, NodeRecord>,
    pub join_tokens: BTreeMap<String, JoinTokenRecord>,
    pub signing_keys: Vec<SigningKey>,
    pub catalogue: BTreeMap<String, CatalogueEntry>,
    /// An admin stopped all placement (emergency control).
    #[serde(default)]
    pub scheduling_paused: bool,
    #[serde(default)]
    pub workflows: BTreeMap<String, WorkflowRecord>,
    /// `tenant` NUL `key` → workflow id.
    #[serde(default)]
    pub workflow_idempotency: BTreeMap<String, String>,
    /// Tool → node → what its results taught.
    #[serde(default)]
    pub tool_stats: BTreeMap<String, BTreeMap<String, ToolStats>>,
    /// `breaker_key(node, server)` → failures in a row.
    #[serde(default)]
    pub breakers: BTreeMap<String, BreakerRecord>,
    #[serde(skip)]
    pub index: Index,
    #[serde(skip)]
    effects: Effects,
    /// Finished tasks and workflows (on disk in a hub; in memory by default).
    #[serde(skip)]
    pub history: History,
}

pub fn idempotency_index(tenant: &str, key: &str) -> String {
    format!("{tenant}\0{key}")
}

impl State {
    /// Applies one command committed at log index `index`.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Response {
        if let Command::Batch(cmds) = cmd {
            return Response::Batch(
                cmds.iter()
                    .map(|c| match c.batchable() {
                        true => self.apply(index, c),
                        false => Response::Rejected(Rejection::NotBatchable),
                    })
                    .collect(),
            );
        }
        let settled_to = self.effects.touched.len();
        match self.try_apply(index, cmd) {
            Ok(r) => {
                self.settle(settled_to, cmd.at_ms());
                self.archive_ended(settled_to, index);
                r
            }
            Err(rej) => Response::Rejected(rej),
        }
    }

    /// What the applies since the last call did.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
    }

    /// Makes the derived indexes anew (after loading a snapshot).
    pub fn rebuild_index(&mut self) {
        let mut ix = Index::default();
        for t in self.tasks.values() {
            ix.link_task(t);
        }
        for n in self.nodes.values() {
            ix.link_node(n);
        }
        self.index = ix;
    }

    /// Changes task `id` through `f`, keeping indexes and effects true. `f` must check
    /// before it changes anything: on `Err` the task must be as it was. `by_node` says the
    /// change came from the node running it (which then needs no cancel).
    fn update<R>(
        &mut self,
        id: &str,
        by_node: bool,
        f: impl FnOnce(&mut TaskRecord) -> Result<R, Rejection>,
    ) -> Result<R, Rejection> {
        let t = self
            .tasks
            .get_mut(id)
            .ok_or_else(|| Rejection::NoSuchTask(id.to_owned()))?;
        let transitions = t.transitions;
        let was = t
            .status
            .is_active()
            .then(|| t.current_attempt().map(|a| (a.number, a.node_id.clone())))
            .flatten();
        self.index.unlink_task(t);
        let r = f(t);
        self.index.link_task(t);
        if t.transitions != transitions {
            self.effects.touched.push(id.to_owned());
        }
        if let Some((attempt, node_id)) = was {
            let still =
                t.status.is_active() && t.current_attempt().map(|a| a.number) == Some(attempt);
            if !still && !by_node {
                self.effects.stopped.push(Stopped {
                    task_id: id.to_owned(),
                    node_id,
                    attempt,
                });
            }
        }
        r
    }

    /// Adds a new task (a submission, a replica, a workflow step). An id that exists is
    /// left alone (generated ids cannot collide; this keeps the index true if one did).
    fn insert_task(&mut self, t: TaskRecord) {
        if self.tasks.contains_key(&t.id) {
            return;
        }
        self.index.link_task(&t);
        self.effects.touched.push(t.id.clone());
        self.tasks.insert(t.id.clone(), t);
    }

    /// Ends a task that has not ended (and, for a fan-out task, its replicas).
    fn end_task(&mut self, id: &str, status: TaskStatus, why: &str, at_ms: i64) {
        let replicas = self
            .tasks
            .get(id)
            .and_then(|t| t.group.as_ref())
            .map(|g| g.replicas.clone())
            .unwrap_or_default();
        for r in replicas {
            self.end_task(&r, TaskStatus::Cancelled, why, at_ms);
        }
        let _ = self.update(id, false, |t| {
            if t.status.is_terminal() {
                return Err(Rejection::WrongState(t.status));
            }
            t.close_attempt(at_ms, why);
            t.error = Some(why.to_owned());
            t.set(status, at_ms);
            Ok(())
        });
    }

    /// Carries changes through: replicas decide fan-out tasks, steps move workflows on.
    /// Handles tasks touched from position `from` of the effects, including ones the
    /// handling itself touches.
    fn settle(&mut self, from: usize, at_ms: i64) {
        let mut i = from;
        while i < self.effects.touched.len() {
            let id = self.effects.touched[i].clone();
            i += 1;
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            let parent = t.parent.clone();
            let step = t.workflow.clone();
            if let Some(p) = parent {
                self.aggregate(&p, at_ms);
            }
            if let Some(s) = step {
                self.step_changed(&s, &id, at_ms);
            }
        }
    }

    fn try_apply(&mut self, index: u64, cmd: &Command) -> Result<Response, Rejection> {
        match cmd {
            Command::SubmitTask(task) => Ok(self.submit(index, task)),
            Command::AssignTask {
                task_id,
                node_id,
                server,
                at_ms,
            } => {
                if !self.nodes.contains_key(node_id) {
                    return Err(Rejection::NoSuchNode(node_id.clone()));
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
                        node_id: node_id.clone(),
                        server: server.clone(),
                        fence: index,
                        assigned_at_ms: *at_ms,
                        started_at_ms: None,
                        finished_at_ms: None,
                        error: None,
                        requeued: false,
                    });
                    t.not_before_ms = None;
                    t.set(TaskStatus::Assigned, *at_ms);
                    Ok(Response::Assigned {
                        attempt,
                        fence: index,
                    })
                })
            }
            Command::StartTask {
                task_id,
                attempt,
                fence,
                at_ms,
                node_id,
            } => self.update(task_id, true, |t| {
                check_reporter(t, *attempt, *fence, node_id)?;
                if t.status != TaskStatus::Assigned {
                    return Err(Rejection::WrongState(t.status));
                }
                t.set(TaskStatus::Running, *at_ms);
                if let Some(a) = t.attempts.last_mut() {
                    a.started_at_ms = Some(*at_ms);
                }
                Ok(Response::TaskNow(t.status))
            }),
            Command::FinishTask {
                task_id,
                attempt,
                fence,
                at_ms,
                result,
                error,
                node_id,
                started_at_ms,
            } => {
                let (status, tool, node, server, ok, took) = self.update(task_id, true, |t| {
                    check_reporter(t, *attempt, *fence, node_id)?;
                    if !t.status.is_active() {
                        return Err(Rejection::WrongState(t.status));
                    }
                    let tool_error = result
                        .as_ref()
                        .and_then(|r| r.get("isError"))
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    let ok = result.is_some() && error.is_none() && !tool_error;
                    let a = t
                        .attempts
                        .last_mut()
                        .expect("an active task has an attempt");
                    if a.started_at_ms.is_none() {
                        a.started_at_ms = started_at_ms.filter(|s| *s <= *at_ms);
                    }
                    a.finished_at_ms = Some(*at_ms);
                    a.error = error
                        .clone()
                        .or_else(|| tool_error.then(|| "the tool returned isError".into()));
                    let took = (*at_ms - a.started_at_ms.unwrap_or(a.assigned_at_ms)).max(0) as u64;
                    let (node, server) = (a.node_id.clone(), a.server.clone());
                    t.result = result.clone();
                    if ok {
                        t.error = None;
                        t.set(TaskStatus::Succeeded, *at_ms);
                    } else {
                        let why = error.clone().unwrap_or_else(|| {
                            format!("attempt {attempt} on {node}: the tool returned isError")
                        });
                        t.fail_or_retry(FailureKind::ToolError, TaskStatus::Failed, why, *at_ms);
                    }
                    Ok((t.status, t.tool.clone(), node, server, ok, took))
                })?;
                // A tool's own isError is its answer; only failures of the call itself
                // count against the server's breaker.
                self.learn(&tool, &node, &server, ok, error.is_none(), took, *at_ms);
                Ok(Response::TaskNow(status))
            }
            Command::RequeueTask {
                task_id,
                attempt,
                fence,
                at_ms,
                reason,
            } => self.update(task_id, false, |t| {
                check_current(t, *attempt, *fence)?;
                if t.status != TaskStatus::Assigned {
                    return Err(Rejection::WrongState(t.status));
                }
                t.close_attempt(*at_ms, reason);
                if let Some(a) = t.attempts.last_mut() {
                    a.requeued = true;
                }
                t.set(TaskStatus::Queued, *at_ms);
                Ok(Response::TaskNow(t.status))
            }),
            Command::CancelTask { task_id, at_ms } => {
                let Some(t) = self.tasks.get(task_id) else {
                    return Err(self.missing_task(task_id, index));
                };
                if t.status.is_terminal() {
                    return Err(Rejection::WrongState(t.status));
                }
                self.end_task(task_id, TaskStatus::Cancelled, "cancelled", *at_ms);
                Ok(Response::TaskNow(TaskStatus::Cancelled))
            }
            Command::TimeoutTask {
                task_id,
                kind,
                attempt,
                at_ms,
                detail,
            } => self.timeout(task_id, *kind, *attempt, *at_ms, detail),
            Command::CreateJoinToken(rec) => {
                self.join_tokens.insert(rec.id.clone(), rec.clone());
                Ok(Response::Done)
            }
            Command::RegisterNode {
                node_id,
                token_id,
                secret_hash,
                labels,
                at_ms,
            } => {
                let tok = self
                    .join_tokens
                    .get_mut(token_id)
                    .filter(|t| {
                        t.uses_left > 0
                            && t.expires_at_ms > *at_ms
                            && flotilla_common::secret_eq(&t.secret_hash, secret_hash)
                    })
                    .ok_or(Rejection::BadJoinToken)?;
                if self.nodes.contains_key(node_id) {
                    return Err(Rejection::NodeExists(node_id.clone()));
                }
                tok.uses_left -= 1;
                let mut node = NodeRecord::new(node_id, labels.clone(), *at_ms);
                node.may_add_tools = tok.may_add_tools;
                self.nodes.insert(node_id.clone(), node);
                Ok(Response::Done)
            }
            Command::NodeHello {
                node_id,
                labels,
                servers,
                at_ms,
                tenants,
                cpu_high_water_percent,
                may_add_tools,
            } => {
                if !self.nodes.contains_key(node_id) {
                    return Err(Rejection::NoSuchNode(node_id.clone()));
                }
                let records = servers
                    .iter()
                    .map(|s| self.check_offer(node_id, s, *at_ms, *may_add_tools))
                    .collect();
                let node = self.nodes.get_mut(node_id).expect("checked above");
                self.index.unlink_node(node);
                if node.status == NodeStatus::Down {
                    node.status = NodeStatus::Ready;
                }
                node.labels = labels.clone();
                node.servers = records;
                node.last_hello_ms = Some(*at_ms);
                node.tenants = tenants.clone();
                node.cpu_high_water_percent = *cpu_high_water_percent;
                self.index.link_node(node);
                Ok(Response::Done)
            }
            Command::NodeDown { node_id, at_ms } => {
                let node = self
                    .nodes
                    .get_mut(node_id)
                    .ok_or_else(|| Rejection::NoSuchNode(node_id.clone()))?;
                node.status = NodeStatus::Down;
                node.drain_deadline_ms = None;
                let (requeued, lost) =
                    self.release_tasks(node_id, *at_ms, true, TaskStatus::Lost, || {
                        format!(
                            "node {node_id} was lost before the task finished; the tool is not marked idempotent and the retry policy does not cover node loss, so it was not re-run"
                        )
                    });
                Ok(Response::NodeWentDown { requeued, lost })
            }
            Command::SetNodeStatus {
                node_id, status, ..
            } => {
                let node = self
                    .nodes
                    .get_mut(node_id)
                    .ok_or_else(|| Rejection::NoSuchNode(node_id.clone()))?;
                if node.status != NodeStatus::Down {
                    node.status = *status;
                }
                node.drain_deadline_ms = None;
                Ok(Response::Done)
            }
            Command::DrainNode {
                node_id,
                deadline_ms,
                ..
            } => {
                let node = self
                    .nodes
                    .get_mut(node_id)
                    .ok_or_else(|| Rejection::NoSuchNode(node_id.clone()))?;
                node.status = NodeStatus::Draining;
                node.drain_deadline_ms = Some(*deadline_ms);
                Ok(Response::Done)
            }
            Command::EvictNode { node_id, at_ms } => {
                if !self.nodes.contains_key(node_id) {
                    return Err(Rejection::NoSuchNode(node_id.clone()));
                }
                let (requeued, lost) = self.release_tasks(node_id, *at_ms, false, TaskStatus::Cancelled, || {
                    format!("node {node_id} was drained before the task finished; the tool is not marked idempotent, so it was cancelled rather than re-run")
                });
                if let Some(n) = self.nodes.get_mut(node_id) {
                    n.drain_deadline_ms = None;
                }
                Ok(Response::NodeWentDown { requeued, lost })
            }
            Command::SetSchedulingPaused(paused) => {
                self.scheduling_paused = *paused;
                Ok(Response::Done)
            }
            Command::CancelTenantTasks { tenant, at_ms } => {
                let why = "cancelled with every task of the tenant by an admin";
                let workflows: Vec<String> = self
                    .workflows
                    .values()
                    .filter(|w| &w.tenant == tenant && !w.status.is_terminal())
                    .map(|w| w.id.clone())
                    .collect();
                for w in workflows {
                    self.cancel_workflow(&w, why, *at_ms);
                }
                // Fan-out tasks first: they end their replicas with them.
                let mut ids: Vec<(bool, String)> = self
                    .index
                    .open
                    .iter()
                    .filter_map(|id| self.tasks.get(id))
                    .filter(|t| &t.tenant == tenant)
                    .map(|t| (t.group.is_none(), t.id.clone()))
                    .collect();
                ids.sort();
                let mut cancelled = Vec::new();
                for (_, id) in ids {
                    if self.tasks.get(&id).is_some_and(|t| !t.status.is_terminal()) {
                        self.end_task(&id, TaskStatus::Cancelled, why, *at_ms);
                        cancelled.push(id);
                    }
                }
                Ok(Response::TasksCancelled(cancelled))
            }
            Command::AcceptTool { name } => {
                let entry = self
                    .catalogue
                    .get_mut(name)
                    .ok_or_else(|| Rejection::NoSuchTool(name.clone()))?;
                entry.accepted = true;
                for node in self.nodes.values_mut() {
                    self.index.unlink_node(node);
                    for s in &mut node.servers {
                        if let Some(i) = s.pending_tools.iter().position(|t| t == name) {
                            s.tools.push(s.pending_tools.remove(i));
                        }
                    }
                    self.index.link_node(node);
                }
                Ok(Response::Done)
            }
            Command::AddSigningKey(key) => {
                if !self.signing_keys.iter().any(|k| k.kid == key.kid) {
                    self.signing_keys.push(key.clone());
                }
                Ok(Response::Done)
            }
            Command::SubmitWorkflow(wf) => Ok(self.submit_workflow(index, wf)),
            Command::Batch(_) => Err(Rejection::NotBatchable),
            Command::ExpireHistory {
                through_ms,
                through_entry,
                ..
            } => {
                let cut = History::cut(*through_ms, through_entry.as_deref());
                if let Err(e) = self.history.expire(index, &cut) {
                    self.effects.store_error = Some(e.to_string());
                }
                Ok(Response::Done)
            }
            Command::CancelWorkflow { workflow_id, at_ms } => {
                let Some(w) = self.workflows.get(workflow_id) else {
                    return Err(match self.stored(|h| h.workflow_at(workflow_id, index)) {
                        Some(_) => Rejection::WorkflowEnded,
                        None => Rejection::NoSuchWorkflow(workflow_id.clone()),
                    });
                };
                if w.status.is_terminal() {
                    return Err(Rejection::WorkflowEnded);
                }
                self.cancel_workflow(workflow_id, "workflow cancelled", *at_ms);
                Ok(Response::WorkflowNow(WorkflowStatus::Cancelled))
            }
        }
    }

    /// The key new tokens are signed with: the newest.
    pub fn active_signing_key(&self) -> Option<&SigningKey> {
        self.signing_keys.iter().max_by_key(|k| k.created_at_ms)
    }
}

#[cfg(test)]
mod tests;
