//! The replicated state machine: every durable fact of the cluster (tasks and their
//! transitions, nodes, join tokens, signing keys, the tool catalogue) and the only code that
//! changes it. `apply` is deterministic: commands carry their own timestamps, and the fence
//! of an assignment is the Raft log index that committed it.

use std::collections::BTreeMap;

use flotilla_common::jwt::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Queued,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Lost,
}

impl TaskStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Lost
        )
    }
    /// Assigned or running on a node.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Assigned | Self::Running)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub number: u32,
    pub node_id: String,
    pub server: String,
    pub fence: u64,
    pub assigned_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub tool: String,
    pub tenant: String,
    pub agent: String,
    pub arguments: Value,
    pub status: TaskStatus,
    /// MCP CallToolResult, when the server answered.
    pub result: Option<Value>,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub priority: i32,
    pub idempotency_key: Option<String>,
    pub attempts: Vec<AttemptRecord>,
    /// How many state transitions the task has made (0 when queued): numbers its events
    /// the same way on every hub.
    #[serde(default)]
    pub transitions: u32,
}

impl TaskRecord {
    pub fn current_attempt(&self) -> Option<&AttemptRecord> {
        self.attempts.last()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Ready,
    Cordoned,
    Draining,
    Down,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Cordoned => "cordoned",
            Self::Draining => "draining",
            Self::Down => "down",
        }
    }
}

/// A tool definition as first seen. Later offers must match it to be used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolDef {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
    pub read_only: bool,
    pub idempotent: bool,
    pub destructive: bool,
}

impl ToolDef {
    /// Same name, description and schema: the same tool (annotations may differ).
    pub fn same_definition(&self, other: &ToolDef) -> bool {
        self.name == other.name
            && self.description == other.description
            && self.input_schema == other.input_schema
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CatalogueEntry {
    pub def: ToolDef,
    pub required_scope: String,
    pub first_seen_node: String,
    pub first_seen_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub name: String,
    pub max_concurrency: u32,
    pub required_scope: String,
    /// Tools this server offers whose definition matches the catalogue.
    pub tools: Vec<String>,
    /// Tools offered under a name the catalogue holds with another definition: not used.
    pub conflicting_tools: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub status: NodeStatus,
    pub joined_at_ms: i64,
    pub last_hello_ms: Option<i64>,
    pub servers: Vec<ServerRecord>,
    /// While draining: when unfinished tasks are taken off the node.
    #[serde(default)]
    pub drain_deadline_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub id: String,
    /// SHA-256 hex of the secret; the secret itself is never stored.
    pub secret_hash: String,
    pub expires_at_ms: i64,
    pub uses_left: u32,
    pub description: String,
    pub created_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OfferedServer {
    pub name: String,
    pub max_concurrency: u32,
    pub required_scope: String,
    pub tools: Vec<ToolDef>,
}

/// A change to the replicated state. Everything a command needs is inside it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    SubmitTask(Box<TaskRecord>),
    AssignTask {
        task_id: String,
        node_id: String,
        server: String,
        at_ms: i64,
    },
    StartTask {
        task_id: String,
        attempt: u32,
        fence: u64,
        at_ms: i64,
    },
    FinishTask {
        task_id: String,
        attempt: u32,
        fence: u64,
        at_ms: i64,
        result: Option<Value>,
        error: Option<String>,
    },
    /// Puts an assigned task that never started back in the queue.
    RequeueTask {
        task_id: String,
        attempt: u32,
        fence: u64,
        at_ms: i64,
        reason: String,
    },
    CancelTask {
        task_id: String,
        at_ms: i64,
    },
    CreateJoinToken(JoinTokenRecord),
    /// Consumes one use of a join token and records the node.
    RegisterNode {
        node_id: String,
        token_id: String,
        secret_hash: String,
        labels: BTreeMap<String, String>,
        at_ms: i64,
    },
    NodeHello {
        node_id: String,
        labels: BTreeMap<String, String>,
        servers: Vec<OfferedServer>,
        at_ms: i64,
    },
    AddSigningKey(SigningKey),
    /// A node stayed silent past its TTL. Its unfinished tasks are re-queued when the tool
    /// is read-only or idempotent, and end `lost` otherwise.
    NodeDown {
        node_id: String,
        at_ms: i64,
    },
    /// Cordon (no new work) or make ready again. A down node stays down until it says hello.
    SetNodeStatus {
        node_id: String,
        status: NodeStatus,
        at_ms: i64,
    },
    /// No new work; running tasks may finish until the deadline.
    DrainNode {
        node_id: String,
        deadline_ms: i64,
        at_ms: i64,
    },
    /// A draining node's deadline passed: its unfinished tasks are re-queued when the tool
    /// is read-only or idempotent, and cancelled otherwise.
    EvictNode {
        node_id: String,
        at_ms: i64,
    },
    SetSchedulingPaused(bool),
    /// Cancels every unfinished task of a tenant.
    CancelTenantTasks {
        tenant: String,
        at_ms: i64,
    },
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Done,
    Submitted {
        task_id: String,
        deduplicated: bool,
    },
    Assigned {
        attempt: u32,
        fence: u64,
    },
    /// Applied to a task: its status afterwards.
    TaskNow(TaskStatus),
    /// A node went down (or was evicted): the tasks it had, re-queued and ended.
    NodeWentDown {
        requeued: Vec<String>,
        lost: Vec<String>,
    },
    /// Tasks cancelled at once.
    TasksCancelled(Vec<String>),
    /// The command was refused by the state machine; nothing changed.
    Rejected(Rejection),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("no task {0}")]
    NoSuchTask(String),
    #[error("no node {0}")]
    NoSuchNode(String),
    #[error("stale attempt or fence: the task has moved on")]
    Stale,
    #[error("task is {0:?}, which does not allow this")]
    WrongState(TaskStatus),
    #[error("join token is unknown, expired or used up")]
    BadJoinToken,
    #[error("a node named {0} exists already")]
    NodeExists(String),
}

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
}

pub fn idempotency_index(tenant: &str, key: &str) -> String {
    format!("{tenant}\0{key}")
}

impl State {
    /// Applies one command committed at log index `index`.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Response {
        match self.try_apply(index, cmd) {
            Ok(r) => r,
            Err(rej) => Response::Rejected(rej),
        }
    }

    fn task_mut(&mut self, id: &str) -> Result<&mut TaskRecord, Rejection> {
        self.tasks
            .get_mut(id)
            .ok_or_else(|| Rejection::NoSuchTask(id.to_owned()))
    }

    fn try_apply(&mut self, index: u64, cmd: &Command) -> Result<Response, Rejection> {
        match cmd {
            Command::SubmitTask(task) => {
                // The same submission committed twice (a forwarded write retried) is one task.
                if self.tasks.contains_key(&task.id) {
                    return Ok(Response::Submitted {
                        task_id: task.id.clone(),
                        deduplicated: true,
                    });
                }
                if let Some(key) = &task.idempotency_key {
                    let ix = idempotency_index(&task.tenant, key);
                    if let Some(existing) = self.idempotency.get(&ix) {
                        return Ok(Response::Submitted {
                            task_id: existing.clone(),
                            deduplicated: true,
                        });
                    }
                    self.idempotency.insert(ix, task.id.clone());
                }
                self.tasks.insert(task.id.clone(), (**task).clone());
                Ok(Response::Submitted {
                    task_id: task.id.clone(),
                    deduplicated: false,
                })
            }
            Command::AssignTask {
                task_id,
                node_id,
                server,
                at_ms,
            } => {
                if !self.nodes.contains_key(node_id) {
                    return Err(Rejection::NoSuchNode(node_id.clone()));
                }
                let t = self.task_mut(task_id)?;
                if t.status != TaskStatus::Queued {
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
                });
                t.status = TaskStatus::Assigned;
                t.updated_at_ms = *at_ms;
                t.transitions += 1;
                Ok(Response::Assigned {
                    attempt,
                    fence: index,
                })
            }
            Command::StartTask {
                task_id,
                attempt,
                fence,
                at_ms,
            } => {
                let t = self.task_mut(task_id)?;
                check_current(t, *attempt, *fence)?;
                if t.status != TaskStatus::Assigned {
                    return Err(Rejection::WrongState(t.status));
                }
                t.status = TaskStatus::Running;
                t.updated_at_ms = *at_ms;
                t.transitions += 1;
                if let Some(a) = t.attempts.last_mut() {
                    a.started_at_ms = Some(*at_ms);
                }
                Ok(Response::TaskNow(t.status))
            }
            Command::FinishTask {
                task_id,
                attempt,
                fence,
                at_ms,
                result,
                error,
            } => {
                let t = self.task_mut(task_id)?;
                check_current(t, *attempt, *fence)?;
                if !t.status.is_active() {
                    return Err(Rejection::WrongState(t.status));
                }
                let tool_error = result
                    .as_ref()
                    .and_then(|r| r.get("isError"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                t.status = if result.is_some() && error.is_none() && !tool_error {
                    TaskStatus::Succeeded
                } else {
                    TaskStatus::Failed
                };
                t.result = result.clone();
                t.error = error.clone();
                t.updated_at_ms = *at_ms;
                t.transitions += 1;
                if let Some(a) = t.attempts.last_mut() {
                    a.finished_at_ms = Some(*at_ms);
                    a.error = error.clone();
                }
                Ok(Response::TaskNow(t.status))
            }
            Command::RequeueTask {
                task_id,
                attempt,
                fence,
                at_ms,
                reason,
            } => {
                let t = self.task_mut(task_id)?;
                check_current(t, *attempt, *fence)?;
                if t.status != TaskStatus::Assigned {
                    return Err(Rejection::WrongState(t.status));
                }
                t.status = TaskStatus::Queued;
                t.updated_at_ms = *at_ms;
                t.transitions += 1;
                if let Some(a) = t.attempts.last_mut() {
                    a.finished_at_ms = Some(*at_ms);
                    a.error = Some(reason.clone());
                }
                Ok(Response::TaskNow(t.status))
            }
            Command::CancelTask { task_id, at_ms } => {
                let t = self.task_mut(task_id)?;
                if t.status.is_terminal() {
                    return Err(Rejection::WrongState(t.status));
                }
                t.status = TaskStatus::Cancelled;
                t.updated_at_ms = *at_ms;
                t.transitions += 1;
                if let Some(a) = t.attempts.last_mut() {
                    if a.finished_at_ms.is_none() {
                        a.finished_at_ms = Some(*at_ms);
                        a.error = Some("cancelled".into());
                    }
                }
                Ok(Response::TaskNow(t.status))
            }
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
                self.nodes.insert(
                    node_id.clone(),
                    NodeRecord {
                        id: node_id.clone(),
                        labels: labels.clone(),
                        status: NodeStatus::Ready,
                        joined_at_ms: *at_ms,
                        last_hello_ms: None,
                        servers: Vec::new(),
                        drain_deadline_ms: None,
                    },
                );
                Ok(Response::Done)
            }
            Command::NodeHello {
                node_id,
                labels,
                servers,
                at_ms,
            } => {
                if !self.nodes.contains_key(node_id) {
                    return Err(Rejection::NoSuchNode(node_id.clone()));
                }
                let mut records = Vec::with_capacity(servers.len());
                for s in servers {
                    let mut rec = ServerRecord {
                        name: s.name.clone(),
                        max_concurrency: s.max_concurrency,
                        required_scope: s.required_scope.clone(),
                        tools: Vec::new(),
                        conflicting_tools: Vec::new(),
                    };
                    for def in &s.tools {
                        match self.catalogue.get(&def.name) {
                            Some(e)
                                if e.def.same_definition(def)
                                    && e.required_scope == s.required_scope =>
                            {
                                rec.tools.push(def.name.clone())
                            }
                            Some(_) => rec.conflicting_tools.push(def.name.clone()),
                            None => {
                                self.catalogue.insert(
                                    def.name.clone(),
                                    CatalogueEntry {
                                        def: def.clone(),
                                        required_scope: s.required_scope.clone(),
                                        first_seen_node: node_id.clone(),
                                        first_seen_at_ms: *at_ms,
                                    },
                                );
                                rec.tools.push(def.name.clone());
                            }
                        }
                    }
                    records.push(rec);
                }
                let node = self.nodes.get_mut(node_id).expect("checked above");
                if node.status == NodeStatus::Down {
                    node.status = NodeStatus::Ready;
                }
                node.labels = labels.clone();
                node.servers = records;
                node.last_hello_ms = Some(*at_ms);
                Ok(Response::Done)
            }
            Command::NodeDown { node_id, at_ms } => {
                let node = self
                    .nodes
                    .get_mut(node_id)
                    .ok_or_else(|| Rejection::NoSuchNode(node_id.clone()))?;
                node.status = NodeStatus::Down;
                node.drain_deadline_ms = None;
                let (requeued, lost) = self.release_tasks(node_id, *at_ms, TaskStatus::Lost, |running| {
                    format!(
                        "node {node_id} was lost while the task was {}; the tool is not marked idempotent, so it was not re-run",
                        if running { "running" } else { "assigned" }
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
                let (requeued, lost) = self.release_tasks(node_id, *at_ms, TaskStatus::Cancelled, |_| {
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
                let mut cancelled = Vec::new();
                for t in self
                    .tasks
                    .values_mut()
                    .filter(|t| &t.tenant == tenant && !t.status.is_terminal())
                {
                    t.status = TaskStatus::Cancelled;
                    t.updated_at_ms = *at_ms;
                    t.transitions += 1;
                    t.error = Some("cancelled with every task of the tenant by an admin".into());
                    if let Some(a) = t.attempts.last_mut() {
                        if a.finished_at_ms.is_none() {
                            a.finished_at_ms = Some(*at_ms);
                            a.error = Some("cancelled".into());
                        }
                    }
                    cancelled.push(t.id.clone());
                }
                Ok(Response::TasksCancelled(cancelled))
            }
            Command::AddSigningKey(key) => {
                if !self.signing_keys.iter().any(|k| k.kid == key.kid) {
                    self.signing_keys.push(key.clone());
                }
                Ok(Response::Done)
            }
        }
    }

    /// Takes a node's unfinished tasks off it: re-queued when the tool is read-only or
    /// idempotent, otherwise ended with `other` and the reason `why(running)`.
    fn release_tasks(
        &mut self,
        node_id: &str,
        at_ms: i64,
        other: TaskStatus,
        why: impl Fn(bool) -> String,
    ) -> (Vec<String>, Vec<String>) {
        let mut requeued = Vec::new();
        let mut ended = Vec::new();
        for t in self.tasks.values_mut().filter(|t| t.status.is_active()) {
            if t.current_attempt().map(|a| a.node_id.as_str()) != Some(node_id) {
                continue;
            }
            let rerun = self
                .catalogue
                .get(&t.tool)
                .is_some_and(|e| e.def.read_only || e.def.idempotent);
            let running = t.status == TaskStatus::Running;
            let Some(a) = t.attempts.last_mut() else {
                continue;
            };
            a.finished_at_ms = Some(at_ms);
            t.updated_at_ms = at_ms;
            t.transitions += 1;
            if rerun {
                a.error = Some(format!(
                    "node {node_id} was lost or drained; re-running (the tool is read-only or idempotent)"
                ));
                t.status = TaskStatus::Queued;
                requeued.push(t.id.clone());
            } else {
                let reason = why(running);
                a.error = Some(reason.clone());
                t.error = Some(reason);
                t.status = other;
                ended.push(t.id.clone());
            }
        }
        (requeued, ended)
    }

    /// The key new tokens are signed with: the newest.
    pub fn active_signing_key(&self) -> Option<&SigningKey> {
        self.signing_keys.iter().max_by_key(|k| k.created_at_ms)
    }

    /// How many tasks are assigned or running on each (node, server).
    pub fn active_counts(&self) -> BTreeMap<(String, String), u32> {
        let mut m = BTreeMap::new();
        for t in self.tasks.values().filter(|t| t.status.is_active()) {
            if let Some(a) = t.current_attempt() {
                *m.entry((a.node_id.clone(), a.server.clone())).or_default() += 1;
            }
        }
        m
    }
}

fn check_current(t: &TaskRecord, attempt: u32, fence: u64) -> Result<(), Rejection> {
    match t.current_attempt() {
        Some(a) if a.number == attempt && a.fence == fence => Ok(()),
        _ => Err(Rejection::Stale),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(id: &str, key: Option<&str>) -> Command {
        Command::SubmitTask(Box::new(TaskRecord {
            id: id.into(),
            tool: "echo".into(),
            tenant: "t".into(),
            agent: "a".into(),
            arguments: json!({}),
            status: TaskStatus::Queued,
            result: None,
            error: None,
            created_at_ms: 1,
            updated_at_ms: 1,
            priority: 0,
            idempotency_key: key.map(Into::into),
            attempts: vec![],
            transitions: 0,
        }))
    }

    fn with_node() -> State {
        let mut s = State::default();
        s.nodes.insert(
            "n1".into(),
            NodeRecord {
                id: "n1".into(),
                labels: Default::default(),
                status: NodeStatus::Ready,
                joined_at_ms: 0,
                last_hello_ms: None,
                servers: vec![],
                drain_deadline_ms: None,
            },
        );
        s
    }

    fn assign(id: &str) -> Command {
        Command::AssignTask {
            task_id: id.into(),
            node_id: "n1".into(),
            server: "demo".into(),
            at_ms: 2,
        }
    }

    fn finish(id: &str, attempt: u32, fence: u64) -> Command {
        Command::FinishTask {
            task_id: id.into(),
            attempt,
            fence,
            at_ms: 3,
            result: Some(json!({"content": [], "isError": false})),
            error: None,
        }
    }

    #[test]
    fn a_result_is_recorded_once_and_only_for_the_current_attempt() {
        let mut s = with_node();
        s.apply(1, &task("t1", None));
        assert_eq!(
            s.apply(2, &assign("t1")),
            Response::Assigned {
                attempt: 1,
                fence: 2
            }
        );
        // A result with the wrong fence is refused.
        assert_eq!(
            s.apply(3, &finish("t1", 1, 99)),
            Response::Rejected(Rejection::Stale)
        );
        assert_eq!(
            s.apply(4, &finish("t1", 1, 2)),
            Response::TaskNow(TaskStatus::Succeeded)
        );
        // The same result again changes nothing.
        let before = s.clone();
        assert!(matches!(
            s.apply(5, &finish("t1", 1, 2)),
            Response::Rejected(_)
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn requeue_makes_the_old_attempt_stale() {
        let mut s = with_node();
        s.apply(1, &task("t1", None));
        s.apply(2, &assign("t1"));
        let rq = Command::RequeueTask {
            task_id: "t1".into(),
            attempt: 1,
            fence: 2,
            at_ms: 3,
            reason: "gone".into(),
        };
        assert_eq!(s.apply(3, &rq), Response::TaskNow(TaskStatus::Queued));
        assert_eq!(
            s.apply(4, &assign("t1")),
            Response::Assigned {
                attempt: 2,
                fence: 4
            }
        );
        assert_eq!(
            s.apply(5, &finish("t1", 1, 2)),
            Response::Rejected(Rejection::Stale)
        );
        assert_eq!(
            s.apply(6, &finish("t1", 2, 4)),
            Response::TaskNow(TaskStatus::Succeeded)
        );
    }

    #[test]
    fn idempotency_key_returns_the_first_task() {
        let mut s = State::default();
        s.apply(1, &task("t1", Some("k")));
        assert_eq!(
            s.apply(2, &task("t2", Some("k"))),
            Response::Submitted {
                task_id: "t1".into(),
                deduplicated: true
            }
        );
        assert!(!s.tasks.contains_key("t2"));
    }

    #[test]
    fn tool_error_result_fails_the_task_and_cancel_is_terminal() {
        let mut s = with_node();
        s.apply(1, &task("t1", None));
        s.apply(2, &assign("t1"));
        let c = Command::FinishTask {
            task_id: "t1".into(),
            attempt: 1,
            fence: 2,
            at_ms: 3,
            result: Some(json!({"content": [], "isError": true})),
            error: None,
        };
        assert_eq!(s.apply(3, &c), Response::TaskNow(TaskStatus::Failed));
        s.apply(4, &task("t2", None));
        let cancel = Command::CancelTask {
            task_id: "t2".into(),
            at_ms: 5,
        };
        assert_eq!(
            s.apply(5, &cancel),
            Response::TaskNow(TaskStatus::Cancelled)
        );
        assert!(matches!(s.apply(6, &cancel), Response::Rejected(_)));
        assert!(matches!(s.apply(7, &assign("t2")), Response::Rejected(_)));
    }

    #[test]
    fn join_token_uses_are_counted_and_expiry_checked() {
        let mut s = State::default();
        s.apply(
            1,
            &Command::CreateJoinToken(JoinTokenRecord {
                id: "tok".into(),
                secret_hash: "h".into(),
                expires_at_ms: 100,
                uses_left: 1,
                description: String::new(),
                created_at_ms: 0,
            }),
        );
        let reg = |node: &str, hash: &str, at| Command::RegisterNode {
            node_id: node.into(),
            token_id: "tok".into(),
            secret_hash: hash.into(),
            labels: Default::default(),
            at_ms: at,
        };
        assert!(matches!(
            s.apply(2, &reg("a", "wrong", 10)),
            Response::Rejected(Rejection::BadJoinToken)
        ));
        assert!(matches!(
            s.apply(3, &reg("a", "h", 200)),
            Response::Rejected(Rejection::BadJoinToken)
        ));
        assert_eq!(s.apply(4, &reg("a", "h", 10)), Response::Done);
        assert!(matches!(
            s.apply(5, &reg("b", "h", 10)),
            Response::Rejected(Rejection::BadJoinToken)
        ));
    }

    #[test]
    fn node_down_reruns_idempotent_tools_and_loses_the_others() {
        let mut s = with_node();
        let def = |name: &str, idempotent: bool| CatalogueEntry {
            def: ToolDef {
                name: name.into(),
                description: String::new(),
                input_schema: json!({"type": "object"}),
                read_only: false,
                idempotent,
                destructive: !idempotent,
            },
            required_scope: "tools".into(),
            first_seen_node: "n1".into(),
            first_seen_at_ms: 0,
        };
        s.catalogue.insert("echo".into(), def("echo", true));
        s.catalogue.insert("charge".into(), def("charge", false));
        s.apply(1, &task("safe", None));
        let mut unsafe_task = task("risky", None);
        if let Command::SubmitTask(t) = &mut unsafe_task {
            t.tool = "charge".into();
        }
        s.apply(2, &unsafe_task);
        s.apply(3, &assign("safe"));
        s.apply(4, &assign("risky"));
        let down = Command::NodeDown {
            node_id: "n1".into(),
            at_ms: 9,
        };
        assert_eq!(
            s.apply(5, &down),
            Response::NodeWentDown {
                requeued: vec!["safe".into()],
                lost: vec!["risky".into()]
            }
        );
        assert_eq!(s.tasks["safe"].status, TaskStatus::Queued);
        assert_eq!(s.tasks["risky"].status, TaskStatus::Lost);
        assert_eq!(s.nodes["n1"].status, NodeStatus::Down);
        // The lost attempt's late result is refused; the re-queued one's too.
        assert!(matches!(
            s.apply(6, &finish("risky", 1, 4)),
            Response::Rejected(_)
        ));
        assert!(matches!(
            s.apply(7, &finish("safe", 1, 3)),
            Response::Rejected(_)
        ));
    }

    #[test]
    fn a_changed_tool_definition_is_not_used() {
        let mut s = with_node();
        let def = |desc: &str| ToolDef {
            name: "echo".into(),
            description: desc.into(),
            input_schema: json!({"type": "object"}),
            read_only: true,
            idempotent: true,
            destructive: false,
        };
        let hello = |desc: &str| Command::NodeHello {
            node_id: "n1".into(),
            labels: Default::default(),
            servers: vec![OfferedServer {
                name: "demo".into(),
                max_concurrency: 2,
                required_scope: "tools".into(),
                tools: vec![def(desc)],
            }],
            at_ms: 1,
        };
        s.apply(1, &hello("first"));
        assert_eq!(s.nodes["n1"].servers[0].tools, vec!["echo".to_string()]);
        s.apply(2, &hello("changed"));
        assert!(s.nodes["n1"].servers[0].tools.is_empty());
        assert_eq!(
            s.nodes["n1"].servers[0].conflicting_tools,
            vec!["echo".to_string()]
        );
        assert_eq!(s.catalogue["echo"].def.description, "first");
    }
}
