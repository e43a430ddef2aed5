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

mod admin;
mod archive;
pub mod audit;
mod command;
pub mod credentials;
mod fanout;
pub mod history;
pub mod index;
mod nodes;
mod records;
mod reports;
pub mod spec;
mod tasks;
mod workflow;

use std::collections::BTreeMap;

use flotilla_common::jwt::SigningKey;
use serde::{Deserialize, Serialize};

pub use self::{
    command::*,
    credentials::{
        Revocations, Revoked, MAX_JOIN_TOKENS, MAX_NODE_CERTIFICATES, MAX_REVOCATIONS,
        MAX_SIGNING_KEYS,
    },
    fanout::vote_of,
    history::{History, Lookup},
    index::Index,
    records::*,
    spec::{Aggregation, Constraints, Deadlines, FailureKind, RetryPolicy, TaskSpec, Timeout},
    workflow::{
        check_shape as check_workflow_shape, referenced_steps as workflow_references,
        FailurePolicy, RefError, ShapeError, StepRecord, StepState, WorkflowRecord, WorkflowStatus,
    },
};
use self::{nodes::Hello, reports::Report};

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
    /// Agent tokens and subjects refused before their tokens expire.
    #[serde(default)]
    pub revoked: Revocations,
    /// Roles defined by admins: name → scopes (the built-in ones are not stored).
    #[serde(default)]
    pub roles: BTreeMap<String, Vec<String>>,
    /// Who did what, and who was refused (bounded rings).
    #[serde(default)]
    pub audit: audit::AuditLog,
    /// The newest commands every hub can apply (`command::COMMAND_LEVEL`); 0 until the
    /// first leader of a build with levels has asked every hub.
    #[serde(default)]
    pub cluster_level: u32,
    /// The log index of the last audit record made, and how many that entry made so far.
    #[serde(skip)]
    audit_seq: (u64, u32),
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
        if let Command::Audited {
            by,
            at_ms,
            cmd: inner,
        } = cmd
        {
            let r = match inner.batchable() {
                true => self.apply(index, inner),
                false => Response::Rejected(Rejection::NotBatchable),
            };
            self.audit_action(index, by, inner, &r, *at_ms);
            return r;
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
        self.effects.inserted.push(t.id.clone());
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

    /// Applies one command: each subject's handlers live in its own file (tasks, nodes,
    /// admin, archive, workflow). A rejected command changed nothing.
    fn try_apply(&mut self, index: u64, cmd: &Command) -> Result<Response, Rejection> {
        match cmd {
            Command::SubmitTask(task) => Ok(self.submit(index, task)),
            Command::AssignTask {
                task_id,
                node_id,
                server,
                at_ms,
            } => self.assign(index, task_id, node_id, server, *at_ms),
            Command::StartTask {
                task_id,
                attempt,
                fence,
                at_ms,
                node_id,
            } => self.start(&Report {
                task_id,
                attempt: *attempt,
                fence: *fence,
                node_id,
                at_ms: *at_ms,
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
            } => self.finish(
                &Report {
                    task_id,
                    attempt: *attempt,
                    fence: *fence,
                    node_id,
                    at_ms: *at_ms,
                },
                result.as_ref(),
                error.as_deref(),
                *started_at_ms,
            ),
            Command::LoseTask {
                task_id,
                attempt,
                fence,
                at_ms,
                node_id,
                reason,
            } => self.lose(
                &Report {
                    task_id,
                    attempt: *attempt,
                    fence: *fence,
                    node_id,
                    at_ms: *at_ms,
                },
                reason,
            ),
            Command::RequeueTask {
                task_id,
                attempt,
                fence,
                at_ms,
                reason,
            } => self.requeue(task_id, *attempt, *fence, *at_ms, reason),
            Command::CancelTask { task_id, at_ms } => self.cancel(index, task_id, *at_ms),
            Command::TimeoutTask {
                task_id,
                kind,
                attempt,
                at_ms,
                detail,
            } => self.timeout(task_id, *kind, *attempt, *at_ms, detail),
            Command::CreateJoinToken(rec) => self.create_join_token(rec),
            Command::RevokeJoinToken { token_id, at_ms } => {
                self.revoke_join_token(token_id, *at_ms)
            }
            Command::RegisterNode {
                node_id,
                token_id,
                secret_hash,
                labels,
                at_ms,
                cert_serial,
                key_pin,
            } => self.register_node(
                node_id,
                (token_id, secret_hash),
                labels,
                (cert_serial, key_pin),
                *at_ms,
            ),
            Command::RemoveNode { node_id, at_ms } => self.remove_node(node_id, *at_ms),
            Command::Audit { records, at_ms } => {
                self.audit_records(index, records, *at_ms);
                Ok(Response::Done)
            }
            Command::Audited { .. } => Err(Rejection::NotBatchable),
            Command::RenewNodeCertificate {
                node_id,
                presented,
                serial,
                ..
            } => self.renew_node_certificate(node_id, presented, serial),
            Command::NodeHello {
                node_id,
                labels,
                servers,
                at_ms,
                tenants,
                cpu_high_water_percent,
                may_add_tools,
            } => self.hello(
                node_id,
                &Hello {
                    labels,
                    servers,
                    tenants,
                    cpu_high_water_percent: *cpu_high_water_percent,
                    may_add_tools: *may_add_tools,
                },
                *at_ms,
            ),
            Command::NodeDown {
                node_id,
                at_ms,
                seen_hello_ms,
            } => self.node_down(node_id, *at_ms, *seen_hello_ms),
            Command::SetNodeStatus {
                node_id, status, ..
            } => self.set_node_status(node_id, *status),
            Command::DrainNode {
                node_id,
                deadline_ms,
                ..
            } => self.drain_node(node_id, *deadline_ms),
            Command::EvictNode { node_id, at_ms } => self.evict_node(node_id, *at_ms),
            Command::SetSchedulingPaused(paused) => Ok(self.pause_scheduling(*paused)),
            Command::CancelTenantTasks { tenant, at_ms } => {
                Ok(self.cancel_tenant_tasks(tenant, *at_ms))
            }
            Command::AcceptTool { name } => self.accept_tool(name),
            Command::AddSigningKey(key) => Ok(self.add_signing_key(key)),
            Command::RotateSigningKey {
                key,
                retire_old_at_ms,
            } => self.rotate_signing_key(key, *retire_old_at_ms),
            Command::RevokeAgentTokens {
                jti,
                subject,
                keep_until_ms,
                at_ms,
            } => {
                self.revoke_agent_tokens(jti.as_deref(), subject.as_deref(), *keep_until_ms, *at_ms)
            }
            Command::SetRole { name, scopes } => self.set_role(name, scopes),
            Command::DeleteRole { name } => self.delete_role(name),
            Command::SubmitWorkflow(wf) => Ok(self.submit_workflow(index, wf)),
            Command::Batch(_) => Err(Rejection::NotBatchable),
            Command::SetClusterLevel { level } => {
                self.cluster_level = self.cluster_level.max(*level);
                Ok(Response::Done)
            }
            Command::ExpireAudit {
                through_ms,
                max_records,
            } => Ok(self.expire_audit(*through_ms, *max_records)),
            Command::ExpireHistory {
                through_ms,
                through_entry,
                ..
            } => Ok(self.expire_history(index, *through_ms, through_entry.as_deref())),
            Command::CancelWorkflow { workflow_id, at_ms } => {
                self.cancel_workflow_request(index, workflow_id, *at_ms)
            }
        }
    }
}

#[cfg(test)]
mod tests;
