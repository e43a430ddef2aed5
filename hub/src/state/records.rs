//! The records the state machine keeps: tasks and their attempts, nodes and their servers,
//! the tool catalogue, join tokens, what results taught about each node.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{FailureKind, TaskSpec};

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

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Assigned => "assigned",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Lost => "lost",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub number: u32,
    pub node_id: String,
    pub server: String,
    pub fence: u64,
    pub assigned_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Taken back before it reached the node: it does not count as a try.
    #[serde(default, skip_serializing_if = "is_default")]
    pub requeued: bool,
}

/// A fan-out task's replicas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub replicas: Vec<String>,
}

/// The workflow step a task runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRef {
    pub workflow_id: String,
    pub step: String,
}

/// Optional and defaulted fields are left out of the JSON when they hold their default (most
/// do, for most tasks): records, log entries and snapshots are about half the size, and a
/// missing field reads back as its default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub tool: String,
    pub tenant: String,
    pub agent: String,
    pub arguments: Value,
    pub status: TaskStatus,
    /// MCP CallToolResult, when the server answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(default, skip_serializing_if = "is_default")]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptRecord>,
    /// How many state transitions the task has made (0 when queued): numbers its events
    /// the same way on every hub.
    #[serde(default, skip_serializing_if = "is_default")]
    pub transitions: u32,
    #[serde(default, skip_serializing_if = "is_default")]
    pub spec: TaskSpec,
    /// The submitting agent's scopes: a node's server is only used if they allow it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// A queued task backing off before its next attempt is not placed before this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<i64>,
    /// When it last went (back) to the queue; the queue timeout counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at_ms: Option<i64>,
    /// Ended failed or lost after its last allowed attempt.
    #[serde(default, skip_serializing_if = "is_default")]
    pub dead_lettered: bool,
    /// Set on a fan-out task; it is never placed itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Group>,
    /// Set on a replica: its fan-out task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<StepRef>,
    /// The W3C `traceparent` of the call that submitted it: the spans of its placement
    /// and of its run on a node join that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// Whether a field holds its type's default (and so is left out of the JSON).
pub(crate) fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl TaskRecord {
    /// A queued task with default options.
    pub fn new(
        id: &str,
        tool: &str,
        tenant: &str,
        agent: &str,
        arguments: Value,
        at_ms: i64,
    ) -> Self {
        Self {
            id: id.to_owned(),
            tool: tool.to_owned(),
            tenant: tenant.to_owned(),
            agent: agent.to_owned(),
            arguments,
            status: TaskStatus::Queued,
            result: None,
            error: None,
            created_at_ms: at_ms,
            updated_at_ms: at_ms,
            priority: 0,
            idempotency_key: None,
            attempts: Vec::new(),
            transitions: 0,
            spec: TaskSpec::default(),
            scopes: Vec::new(),
            not_before_ms: None,
            queued_at_ms: None,
            dead_lettered: false,
            group: None,
            parent: None,
            workflow: None,
            trace: None,
        }
    }

    pub fn current_attempt(&self) -> Option<&AttemptRecord> {
        self.attempts.last()
    }

    /// Moves to `status` as one transition.
    pub(crate) fn set(&mut self, status: TaskStatus, at_ms: i64) {
        self.status = status;
        self.updated_at_ms = at_ms;
        self.transitions += 1;
        if status == TaskStatus::Queued {
            self.queued_at_ms = Some(at_ms);
        }
    }

    /// Attempts that count as tries: every one that was not taken back before it ran.
    pub fn tries(&self) -> usize {
        self.attempts.iter().filter(|a| !a.requeued).count()
    }

    /// When a queued task's queue timeout runs out: counted from when it (last) went to the
    /// queue, or from the end of its backoff.
    pub fn queue_deadline_ms(&self) -> Option<i64> {
        let limit = self.spec.deadlines.queue_timeout_ms;
        (limit > 0).then(|| {
            let from = self
                .queued_at_ms
                .unwrap_or(self.created_at_ms)
                .max(self.not_before_ms.unwrap_or(i64::MIN));
            from.saturating_add(limit as i64)
        })
    }

    /// Ends the current attempt, if it is still open, with `why`.
    pub(crate) fn close_attempt(&mut self, at_ms: i64, why: &str) {
        if let Some(a) = self.attempts.last_mut() {
            if a.finished_at_ms.is_none() {
                a.finished_at_ms = Some(at_ms);
                a.error = Some(why.to_owned());
            }
        }
    }

    /// After a failure of `kind`: back to the queue (after a backoff) when the retry
    /// policy allows another attempt, otherwise ended `end` with `why` and dead-lettered.
    pub(crate) fn fail_or_retry(
        &mut self,
        kind: FailureKind,
        end: TaskStatus,
        why: String,
        at_ms: i64,
    ) {
        let made = self.tries();
        if self.spec.retry.allows(kind, made) {
            let wait = self.spec.retry.backoff_ms(made as u32 + 1, &self.id);
            self.not_before_ms = Some(at_ms.saturating_add(wait as i64));
            self.error = Some(format!("{why}; attempt {} in {wait} ms", made + 1));
            self.set(TaskStatus::Queued, at_ms);
        } else {
            self.error = Some(why);
            self.dead_lettered = true;
            self.set(end, at_ms);
        }
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
    /// Running it twice does no harm (its annotations say read-only or idempotent).
    pub fn safe_to_rerun(&self) -> bool {
        self.read_only || self.idempotent
    }

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
    /// Usable: introduced by a node trusted to add tools, or accepted by an admin. A tool
    /// waiting for acceptance is offered by no node as far as scheduling and agents see.
    #[serde(default = "accepted_by_default")]
    pub accepted: bool,
}

/// Entries written before acceptance existed were usable.
pub(crate) fn accepted_by_default() -> bool {
    true
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
    /// Tools whose name waits for an admin to accept it (`flotilla tools accept`).
    #[serde(default)]
    pub pending_tools: Vec<String>,
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
    /// Tenants whose tasks it runs; empty: all.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// No new work while its CPU is at or above this; 0: no limit.
    #[serde(default)]
    pub cpu_high_water_percent: f64,
    /// Joined with a token that lets it introduce new tool names.
    #[serde(default)]
    pub may_add_tools: bool,
    /// Serial numbers (hex) of the certificates the cluster issued it: the only ones that
    /// open its session. Empty only in records from before serials were kept, where any
    /// certificate with the node's name does.
    #[serde(default)]
    pub cert_serials: Vec<String>,
    /// The join token it joined with, and the pin of the key it joined with: a join asked
    /// again with both (its answer was lost) gets a certificate again instead of "name
    /// taken".
    #[serde(default)]
    pub joined_with: Option<(String, String)>,
}

impl NodeRecord {
    /// A ready node that has not said hello yet.
    pub fn new(id: &str, labels: BTreeMap<String, String>, at_ms: i64) -> Self {
        Self {
            id: id.to_owned(),
            labels,
            status: NodeStatus::Ready,
            joined_at_ms: at_ms,
            last_hello_ms: None,
            servers: Vec::new(),
            drain_deadline_ms: None,
            tenants: Vec::new(),
            cpu_high_water_percent: 0.0,
            may_add_tools: false,
            cert_serials: Vec::new(),
            joined_with: None,
        }
    }

    pub fn serves(&self, tenant: &str) -> bool {
        self.tenants.is_empty() || self.tenants.iter().any(|t| t == tenant)
    }

    /// Whether the certificate with `serial` is one the cluster issued this node.
    pub fn holds_certificate(&self, serial: &str) -> bool {
        self.cert_serials.is_empty() || self.cert_serials.iter().any(|s| s == serial)
    }
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
    /// Nodes that join with it may introduce new tool names.
    #[serde(default)]
    pub may_add_tools: bool,
    /// Who made it (the admin token's subject).
    #[serde(default)]
    pub created_by: String,
    /// When an admin revoked it.
    #[serde(default)]
    pub revoked_at_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OfferedServer {
    pub name: String,
    pub max_concurrency: u32,
    pub required_scope: String,
    pub tools: Vec<ToolDef>,
}

/// What past results say about one tool on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolStats {
    pub calls: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Moving average (1/8 weight to each new call) of start-to-result time.
    pub ewma_ms: u64,
}

impl ToolStats {
    pub(crate) fn record(&mut self, ok: bool, duration_ms: u64) {
        self.ewma_ms = if self.calls == 0 {
            duration_ms
        } else {
            (self.ewma_ms * 7 + duration_ms) / 8
        };
        self.calls += 1;
        if ok {
            self.succeeded += 1;
        } else {
            self.failed += 1;
        }
    }

    /// Success rate with one imagined success and failure, so one result is not certainty.
    pub fn success_rate(&self) -> f64 {
        (self.succeeded as f64 + 1.0) / (self.calls as f64 + 2.0)
    }
}

/// Failures in a row of one MCP server on one node. Whether that makes the breaker open or
/// half-open depends on the time and the hub's thresholds (see `scheduler::breaker`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerRecord {
    pub consecutive_failures: u32,
    pub last_failure_ms: i64,
}

pub fn breaker_key(node: &str, server: &str) -> String {
    format!("{node}\0{server}")
}
