//! What the state machine is asked to do (`Command`, one per log entry or batched), what it
//! answers (`Response`, `Rejection`), and what an apply leaves for the hub to act on
//! (`Effects`).

use std::collections::BTreeMap;

use flotilla_common::jwt::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    records, JoinTokenRecord, NodeStatus, OfferedServer, TaskRecord, TaskStatus, Timeout,
    WorkflowRecord, WorkflowStatus,
};

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
    /// The node running the attempt started it. `node_id` is the reporting node's
    /// certificate name; only the node holding the attempt may report on it.
    StartTask {
        task_id: String,
        attempt: u32,
        fence: u64,
        at_ms: i64,
        #[serde(default)]
        node_id: String,
    },
    FinishTask {
        task_id: String,
        attempt: u32,
        fence: u64,
        at_ms: i64,
        result: Option<Value>,
        error: Option<String>,
        #[serde(default)]
        node_id: String,
        /// When the node said it started the attempt (a start is not committed by itself).
        #[serde(default)]
        started_at_ms: Option<i64>,
    },
    /// The node holding the attempt stopped while the call ran (it restarted) and cannot
    /// tell whether the call took effect: the attempt ends as on node loss.
    LoseTask {
        task_id: String,
        attempt: u32,
        fence: u64,
        at_ms: i64,
        node_id: String,
        reason: String,
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
    /// A deadline passed (checked by the leader's timers; `attempt` for attempt timeouts).
    TimeoutTask {
        task_id: String,
        kind: Timeout,
        attempt: u32,
        at_ms: i64,
        /// Why it was still waiting, for queue timeouts.
        detail: String,
    },
    CreateJoinToken(JoinTokenRecord),
    /// No node may join with the token any more.
    RevokeJoinToken {
        token_id: String,
        at_ms: i64,
    },
    /// Consumes one use of a join token and records the node, with the serial of the
    /// certificate the hub signed for it.
    RegisterNode {
        node_id: String,
        token_id: String,
        secret_hash: String,
        labels: BTreeMap<String, String>,
        at_ms: i64,
        #[serde(default)]
        cert_serial: String,
        /// The pin of the node's key (`sha256:` of its public key): a join asked again
        /// with the same token and key is the same join.
        #[serde(default)]
        key_pin: String,
    },
    /// A node renewed its certificate: from now on only the one it presented to ask
    /// (`presented`) and the new one (`serial`) open its session.
    RenewNodeCertificate {
        node_id: String,
        presented: String,
        serial: String,
        at_ms: i64,
    },
    /// An admin removes a node for good: its tasks go as on node loss, its certificates
    /// stop opening sessions, and it may come back only by joining again.
    RemoveNode {
        node_id: String,
        at_ms: i64,
    },
    NodeHello {
        node_id: String,
        labels: BTreeMap<String, String>,
        servers: Vec<OfferedServer>,
        at_ms: i64,
        #[serde(default)]
        tenants: Vec<String>,
        #[serde(default)]
        cpu_high_water_percent: f64,
        /// The node may introduce tool names not seen before (it joined with a token that
        /// allows it, or hub.toml `trust_node_tools`); otherwise a new name waits for an
        /// admin.
        #[serde(default = "records::accepted_by_default")]
        may_add_tools: bool,
    },
    /// An admin accepts a tool name a node introduced: every node offering it may run it.
    AcceptTool {
        name: String,
    },
    AddSigningKey(SigningKey),
    /// A new key signs agent tokens from now on; the older ones verify until
    /// `retire_old_at_ms`.
    RotateSigningKey {
        key: SigningKey,
        retire_old_at_ms: i64,
    },
    /// Refuses an agent token by `jti`, and/or every token of `subject` issued so far,
    /// until `keep_until_ms` (when every token they cover has expired).
    RevokeAgentTokens {
        jti: Option<String>,
        subject: Option<String>,
        keep_until_ms: i64,
        at_ms: i64,
    },
    /// Defines or changes a role: a name for a set of scopes (not a built-in one).
    SetRole {
        name: String,
        scopes: Vec<String>,
    },
    /// Deletes a role; tokens holding it keep their other scopes.
    DeleteRole {
        name: String,
    },
    /// A node stayed silent past its TTL. Its unfinished tasks are re-queued when the tool
    /// is read-only or idempotent (or the task's retry policy says so), and end `lost`
    /// otherwise.
    NodeDown {
        node_id: String,
        at_ms: i64,
        /// The node's last hello (ms; 0: none) when the leader found it gone: a node that
        /// said hello since came back, and is not marked down.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seen_hello_ms: Option<i64>,
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
    /// Cancels every unfinished task and workflow of a tenant.
    CancelTenantTasks {
        tenant: String,
        at_ms: i64,
    },
    SubmitWorkflow(Box<WorkflowRecord>),
    CancelWorkflow {
        workflow_id: String,
        at_ms: i64,
    },
    /// An admin's command, recorded in the audit trail with who asked (`by`, the token's
    /// subject) and what came of it.
    Audited {
        by: String,
        at_ms: i64,
        cmd: Box<Command>,
    },
    /// What a hub saw that is not a command of its own, for the audit trail: refusals
    /// (coalesced), tokens issued, hubs added or removed.
    Audit {
        records: Vec<super::audit::AuditRecord>,
        at_ms: i64,
    },
    /// Commands that arrived together, committed as one entry (group commit) and applied in
    /// order, each as if alone (see `batchable` for what may not be in one).
    Batch(Vec<Command>),
    /// Retention: finished tasks and workflows whose end is at or before the cut (end time
    /// `through_ms`, then the record `through_entry`; `None`: all that ended then) leave the
    /// history store. The leader picks the cut (`History::expiry_due`).
    ExpireHistory {
        through_ms: i64,
        #[serde(default)]
        through_entry: Option<String>,
        at_ms: i64,
    },
    /// Every hub of the cluster can apply commands up to `level` (see `COMMAND_LEVEL`):
    /// the leader raises it once every member's build says so. It never goes down.
    SetClusterLevel {
        level: u32,
    },
    /// Retention of the audit trail's own records (hub.toml `[audit]` on the leader): those
    /// made before `through_ms` leave, then each ring keeps its newest `max_records`.
    ExpireAudit {
        through_ms: i64,
        max_records: u32,
    },
}

/// The newest commands this build can apply. A command this build writes that an older
/// build could not read (a new variant) has a higher level than any older build's, and is
/// written only once the cluster's level (`State::cluster_level`, raised by the leader when
/// every hub reports it) reaches it: during a rolling upgrade the hubs still on the older
/// build never meet an entry they cannot read. Level 1: everything up to the builds before
/// levels existed (those report none). Level 2: `LoseTask`, `SetRole`, `DeleteRole`,
/// `SetClusterLevel`. Level 3: `ExpireAudit` (with it, apply stops cutting the audit
/// rings at the fixed 10,000 records and 30 days: see `state::audit`). Raise it, and give
/// the new variants that level in [`Command::level`], whenever a variant is added, or a field an older build would drop,
/// or a change in what applying a command does (an older hub would apply it otherwise,
/// and the hubs' states would differ): such a change must then also depend on
/// `State::cluster_level` in apply until every hub has it. (This build also changed what
/// `LoseTask` does to an attempt that never started; no build with the old behaviour
/// reports level 2, so the cluster writes `LoseTask` only once every hub has the new one.)
pub const COMMAND_LEVEL: u32 = 3;

impl Command {
    /// The level a hub must have to apply this command (see [`COMMAND_LEVEL`]).
    /// Every variant is listed, so a new one cannot be added without choosing its level.
    pub fn level(&self) -> u32 {
        match self {
            Self::LoseTask { .. }
            | Self::SetRole { .. }
            | Self::DeleteRole { .. }
            | Self::SetClusterLevel { .. } => 2,
            Self::ExpireAudit { .. } => super::audit::LEVEL_EXPIRE_AUDIT,
            Self::Audited { cmd, .. } => cmd.level(),
            Self::Batch(cmds) => cmds.iter().map(Command::level).max().unwrap_or(1),
            Self::SubmitTask(_)
            | Self::AssignTask { .. }
            | Self::StartTask { .. }
            | Self::FinishTask { .. }
            | Self::RequeueTask { .. }
            | Self::CancelTask { .. }
            | Self::TimeoutTask { .. }
            | Self::CreateJoinToken(_)
            | Self::RevokeJoinToken { .. }
            | Self::RegisterNode { .. }
            | Self::RenewNodeCertificate { .. }
            | Self::RemoveNode { .. }
            | Self::NodeHello { .. }
            | Self::AcceptTool { .. }
            | Self::AddSigningKey(_)
            | Self::RotateSigningKey { .. }
            | Self::RevokeAgentTokens { .. }
            | Self::NodeDown { .. }
            | Self::SetNodeStatus { .. }
            | Self::DrainNode { .. }
            | Self::EvictNode { .. }
            | Self::SetSchedulingPaused(_)
            | Self::CancelTenantTasks { .. }
            | Self::SubmitWorkflow(_)
            | Self::CancelWorkflow { .. }
            | Self::Audit { .. }
            | Self::ExpireHistory { .. } => 1,
        }
    }

    /// May share an entry with other commands. Expiry may not: every command of an entry
    /// applies at the same log index, and the store's versions cannot order an expiry
    /// against a read in the same entry.
    pub fn batchable(&self) -> bool {
        match self {
            Self::Batch(_) | Self::ExpireHistory { .. } => false,
            Self::Audited { cmd, .. } => cmd.batchable(),
            _ => true,
        }
    }

    /// About how many bytes the command takes encoded: what group commit budgets.
    pub fn approx_bytes(&self) -> usize {
        fn size(v: &Value) -> usize {
            match v {
                Value::String(s) => s.len() + 2,
                Value::Array(a) => 2 + a.iter().map(size).sum::<usize>(),
                Value::Object(o) => 2 + o.iter().map(|(k, v)| k.len() + 4 + size(v)).sum::<usize>(),
                _ => 8,
            }
        }
        512 + match self {
            Self::SubmitTask(t) => size(&t.arguments),
            Self::FinishTask { result, error, .. } => {
                result.as_ref().map_or(0, size) + error.as_ref().map_or(0, String::len)
            }
            Self::SubmitWorkflow(w) => w.steps.iter().map(|s| 256 + size(&s.arguments)).sum(),
            Self::NodeHello { servers, .. } => servers
                .iter()
                .flat_map(|s| &s.tools)
                .map(|t| 256 + t.description.len() + size(&t.input_schema))
                .sum(),
            Self::Batch(cmds) => cmds.iter().map(Command::approx_bytes).sum(),
            Self::Audited { cmd, .. } => cmd.approx_bytes(),
            Self::Audit { records, .. } => records.len() * 512,
            _ => 0,
        }
    }

    pub(crate) fn at_ms(&self) -> i64 {
        match self {
            Self::SubmitTask(t) => t.created_at_ms,
            Self::SubmitWorkflow(w) => w.created_at_ms,
            Self::AssignTask { at_ms, .. }
            | Self::StartTask { at_ms, .. }
            | Self::FinishTask { at_ms, .. }
            | Self::RequeueTask { at_ms, .. }
            | Self::LoseTask { at_ms, .. }
            | Self::CancelTask { at_ms, .. }
            | Self::TimeoutTask { at_ms, .. }
            | Self::RegisterNode { at_ms, .. }
            | Self::RevokeJoinToken { at_ms, .. }
            | Self::RemoveNode { at_ms, .. }
            | Self::RenewNodeCertificate { at_ms, .. }
            | Self::Audited { at_ms, .. }
            | Self::Audit { at_ms, .. }
            | Self::RevokeAgentTokens { at_ms, .. }
            | Self::NodeHello { at_ms, .. }
            | Self::NodeDown { at_ms, .. }
            | Self::SetNodeStatus { at_ms, .. }
            | Self::DrainNode { at_ms, .. }
            | Self::EvictNode { at_ms, .. }
            | Self::CancelTenantTasks { at_ms, .. }
            | Self::CancelWorkflow { at_ms, .. }
            | Self::ExpireHistory { at_ms, .. } => *at_ms,
            Self::CreateJoinToken(t) => t.created_at_ms,
            Self::RotateSigningKey { key, .. } => key.created_at_ms,
            Self::AddSigningKey(_)
            | Self::SetSchedulingPaused(_)
            | Self::AcceptTool { .. }
            | Self::SetRole { .. }
            | Self::DeleteRole { .. }
            | Self::SetClusterLevel { .. }
            | Self::ExpireAudit { .. }
            | Self::Batch(_) => 0,
        }
    }
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
    WorkflowSubmitted {
        workflow_id: String,
        deduplicated: bool,
    },
    WorkflowNow(WorkflowStatus),
    /// What each command of a batch answered, in order.
    Batch(Vec<Response>),
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
    #[error("the attempt is held by another node")]
    NotYourAttempt,
    #[error("task is {0:?}, which does not allow this")]
    WrongState(TaskStatus),
    #[error("join token is unknown, expired or used up")]
    BadJoinToken,
    #[error("a node named {0} exists already")]
    NodeExists(String),
    #[error("no workflow {0}")]
    NoSuchWorkflow(String),
    #[error("the workflow already ended")]
    WorkflowEnded,
    #[error("the deadline has not passed")]
    NotDue,
    #[error("another replica of the same fan-out task is on that node")]
    SiblingOnNode,
    #[error("no tool {0:?} in the catalogue")]
    NoSuchTool(String),
    #[error("this command may not be part of a batch")]
    NotBatchable,
    #[error("no join token {0:?}")]
    NoSuchJoinToken(String),
    #[error("too many: {0}")]
    TooMany(String),
    #[error("role {0:?} is built in and cannot be changed")]
    BuiltinRole(String),
    #[error("no role {0:?}")]
    NoSuchRole(String),
}

/// A running attempt the hub ended: its node should stop it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stopped {
    pub task_id: String,
    pub node_id: String,
    pub attempt: u32,
}

/// What an apply did that the hub acts on: filled by `apply`, drained by `take_effects`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Effects {
    /// Tasks that made a transition (their events go to watchers).
    pub touched: Vec<String>,
    /// Tasks created (submissions, replicas, workflow steps): counted by the metrics.
    pub inserted: Vec<String>,
    /// Running attempts ended by the hub rather than by their node.
    pub stopped: Vec<Stopped>,
    /// Some workflow changed (its watchers look again).
    pub workflows_changed: bool,
    /// Tasks that ended and moved to the history store (with their final transition).
    pub archived: Vec<TaskRecord>,
    /// Workflows that ended in this apply (to move to the history store).
    pub ended_workflows: Vec<String>,
    /// The history store failed: the apply is incomplete and the hub must stop.
    pub store_error: Option<String>,
    /// Nodes removed for good: their sessions end now.
    pub removed_nodes: Vec<String>,
}
