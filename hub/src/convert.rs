//! Conversions between the replicated state's types and the `flotilla.v1` wire types, in one
//! place.

use flotilla_common::limits;
use flotilla_proto as pb;

use crate::error::{HubError, HubResult};

use crate::state::{
    Aggregation, AttemptRecord, Constraints, Deadlines, FailureKind, FailurePolicy, OfferedServer,
    RetryPolicy, State, StepState, TaskRecord, TaskSpec, TaskStatus, ToolDef, WorkflowRecord,
    WorkflowStatus,
};

/// Most replicas one task may ask for.
pub const MAX_REPLICAS: u32 = 16;
/// Most attempts one task may ask for.
pub const MAX_ATTEMPTS: u32 = 100;
/// Longest deadline or backoff a task may ask for: 30 days.
pub const MAX_DURATION_MS: u64 = 30 * 24 * 3600 * 1000;

/// A request that asks for something it may not: INVALID_ARGUMENT, with why.
fn invalid(why: impl Into<String>) -> HubError {
    HubError::InvalidArgument(why.into())
}

fn duration(what: &str, ms: u64) -> HubResult<u64> {
    if ms > MAX_DURATION_MS {
        return Err(invalid(format!(
            "{what} is {ms} ms; the limit is {MAX_DURATION_MS} (30 days)"
        )));
    }
    Ok(ms)
}

pub fn task_state(s: TaskStatus) -> pb::TaskState {
    match s {
        TaskStatus::Queued => pb::TaskState::Queued,
        TaskStatus::Assigned => pb::TaskState::Assigned,
        TaskStatus::Running => pb::TaskState::Running,
        TaskStatus::Succeeded => pb::TaskState::Succeeded,
        TaskStatus::Failed => pb::TaskState::Failed,
        TaskStatus::Cancelled => pb::TaskState::Cancelled,
        TaskStatus::Lost => pb::TaskState::Lost,
    }
}

fn attempt(a: &AttemptRecord) -> pb::Attempt {
    pb::Attempt {
        number: a.number,
        node_id: a.node_id.clone(),
        server: a.server.clone(),
        fence: a.fence,
        assigned_at_ms: a.assigned_at_ms,
        finished_at_ms: a.finished_at_ms.unwrap_or(0),
        error: a.error.clone().unwrap_or_default(),
        started_at_ms: a.started_at_ms.unwrap_or(0),
    }
}

/// A task as agents see it; `pending` is the scheduler's reason for a queued task.
pub fn task(state: &State, t: &TaskRecord, pending: Option<String>) -> pb::Task {
    let winner = t
        .result
        .as_ref()
        .filter(|_| t.spec.aggregation.needed(1).is_some() && t.status == TaskStatus::Succeeded)
        .map(crate::state::vote_of);
    let replicas = t
        .group
        .iter()
        .flat_map(|g| &g.replicas)
        .filter_map(|id| {
            state
                .find_task(id)
                .ok()
                .and_then(crate::state::Lookup::found)
        })
        .map(|r| pb::Replica {
            task_id: r.id.clone(),
            state: task_state(r.status) as i32,
            node_id: r
                .current_attempt()
                .map(|a| a.node_id.clone())
                .unwrap_or_default(),
            result: bytes(&r.result),
            error: r.error.clone().unwrap_or_default(),
            agreed: r.status == TaskStatus::Succeeded
                && winner.is_some()
                && r.result.as_ref().map(crate::state::vote_of) == winner,
        })
        .collect();
    pb::Task {
        id: t.id.clone(),
        tool: t.tool.clone(),
        tenant: t.tenant.clone(),
        agent: t.agent.clone(),
        state: task_state(t.status) as i32,
        arguments: serde_json::to_vec(&t.arguments).unwrap_or_default(),
        result: bytes(&t.result),
        error: t.error.clone().unwrap_or_default(),
        created_at_ms: t.created_at_ms,
        updated_at_ms: t.updated_at_ms,
        pending_reason: if t.status == TaskStatus::Queued {
            pending.unwrap_or_default()
        } else {
            String::new()
        },
        attempts: t.attempts.iter().map(attempt).collect(),
        priority: t.priority,
        idempotency_key: t.idempotency_key.clone().unwrap_or_default(),
        options: Some(options(&t.spec)),
        dead_lettered: t.dead_lettered,
        not_before_ms: t.not_before_ms.unwrap_or(0),
        replicas,
        parent_id: t.parent.clone().unwrap_or_default(),
        workflow_id: t
            .workflow
            .as_ref()
            .map(|w| w.workflow_id.clone())
            .unwrap_or_default(),
        step: t
            .workflow
            .as_ref()
            .map(|w| w.step.clone())
            .unwrap_or_default(),
    }
}

fn failure_kind(k: FailureKind) -> pb::FailureKind {
    match k {
        FailureKind::NodeLost => pb::FailureKind::NodeLost,
        FailureKind::Timeout => pb::FailureKind::Timeout,
        FailureKind::ToolError => pb::FailureKind::ToolError,
    }
}

/// A task's options as the API shows them.
pub fn options(s: &TaskSpec) -> pb::TaskOptions {
    let (aggregation, quorum) = match s.aggregation {
        Aggregation::All => (pb::Aggregation::All, 0),
        Aggregation::First => (pb::Aggregation::First, 0),
        Aggregation::Majority => (pb::Aggregation::Majority, 0),
        Aggregation::Quorum(k) => (pb::Aggregation::Quorum, k),
    };
    pb::TaskOptions {
        retry: Some(pb::RetryPolicy {
            max_attempts: s.retry.max_attempts,
            initial_backoff_ms: s.retry.initial_backoff_ms,
            max_backoff_ms: s.retry.max_backoff_ms,
            retry_on: s
                .retry
                .retry_on
                .iter()
                .map(|k| failure_kind(*k) as i32)
                .collect(),
        }),
        deadlines: Some(pb::Deadlines {
            queue_timeout_ms: s.deadlines.queue_timeout_ms,
            attempt_timeout_ms: s.deadlines.attempt_timeout_ms,
            total_timeout_ms: s.deadlines.total_timeout_ms,
        }),
        placement: Some(pb::PlacementConstraints {
            region: s.placement.region.clone().unwrap_or_default(),
            zone: s.placement.zone.clone().unwrap_or_default(),
            required_labels: s.placement.required.clone().into_iter().collect(),
            preferred_labels: s.placement.preferred.clone().into_iter().collect(),
        }),
        replicas: s.replicas.max(1),
        aggregation: aggregation as i32,
        quorum,
    }
}

/// A task's options from a request, checked. The placement's locality defaults to the
/// token's (`region`, `zone`).
pub fn spec(
    o: Option<&pb::TaskOptions>,
    region: Option<&str>,
    zone: Option<&str>,
) -> HubResult<TaskSpec> {
    let default = pb::TaskOptions::default();
    let o = o.unwrap_or(&default);
    let mut s = TaskSpec::default();
    if let Some(r) = &o.retry {
        if r.max_attempts > MAX_ATTEMPTS {
            return Err(invalid(format!(
                "retry.max_attempts is {}; the limit is {MAX_ATTEMPTS}",
                r.max_attempts
            )));
        }
        let d = RetryPolicy::default();
        let mut retry_on = Vec::new();
        // Checked before the loop: a million repeats must not cost a million look-ups.
        limits::check_count("retry.retry_on", r.retry_on.len(), limits::MAX_RETRY_ON)?;
        for k in &r.retry_on {
            let kind = match pb::FailureKind::try_from(*k) {
                Ok(pb::FailureKind::NodeLost) => FailureKind::NodeLost,
                Ok(pb::FailureKind::Timeout) => FailureKind::Timeout,
                Ok(pb::FailureKind::ToolError) => FailureKind::ToolError,
                _ => {
                    return Err(invalid(format!(
                    "retry.retry_on: {k} is not a failure kind (node_lost, timeout, tool_error)"
                )))
                }
            };
            if !retry_on.contains(&kind) {
                retry_on.push(kind);
            }
        }
        s.retry = RetryPolicy {
            max_attempts: r.max_attempts.max(1),
            initial_backoff_ms: if r.initial_backoff_ms == 0 {
                d.initial_backoff_ms
            } else {
                duration("retry.initial_backoff_ms", r.initial_backoff_ms)?
            },
            max_backoff_ms: if r.max_backoff_ms == 0 {
                d.max_backoff_ms
            } else {
                duration("retry.max_backoff_ms", r.max_backoff_ms)?
            },
            retry_on,
        };
        if s.retry.max_attempts > 1 && s.retry.retry_on.is_empty() {
            return Err(invalid("retry.max_attempts > 1 needs retry_on: which failures (node_lost, timeout, tool_error) to retry"));
        }
    }
    if let Some(d) = &o.deadlines {
        s.deadlines = Deadlines {
            queue_timeout_ms: duration("deadlines.queue_timeout_ms", d.queue_timeout_ms)?,
            attempt_timeout_ms: duration("deadlines.attempt_timeout_ms", d.attempt_timeout_ms)?,
            total_timeout_ms: duration("deadlines.total_timeout_ms", d.total_timeout_ms)?,
        };
    }
    let p = o.placement.clone().unwrap_or_default();
    check_placement(&p)?;
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    s.placement = Constraints {
        region: nonempty(&p.region).or(region.map(str::to_owned)),
        zone: nonempty(&p.zone).or(zone.map(str::to_owned)),
        required: p.required_labels.into_iter().collect(),
        preferred: p.preferred_labels.into_iter().collect(),
    };
    if o.replicas > MAX_REPLICAS {
        return Err(invalid(format!(
            "replicas is {}; the limit is {MAX_REPLICAS}",
            o.replicas
        )));
    }
    s.replicas = o.replicas.max(1);
    s.aggregation = match pb::Aggregation::try_from(o.aggregation) {
        Ok(pb::Aggregation::Unspecified | pb::Aggregation::All) => Aggregation::All,
        Ok(pb::Aggregation::First) => Aggregation::First,
        Ok(pb::Aggregation::Majority) => Aggregation::Majority,
        Ok(pb::Aggregation::Quorum) => {
            if o.quorum == 0 || o.quorum > s.replicas {
                return Err(invalid(format!(
                    "quorum must be between 1 and replicas ({}); it is {}",
                    s.replicas, o.quorum
                )));
            }
            Aggregation::Quorum(o.quorum)
        }
        Err(_) => return Err(invalid(format!("aggregation {} is unknown", o.aggregation))),
    };
    Ok(s)
}

/// Placement wishes within the limits: few labels, short names.
fn check_placement(p: &pb::PlacementConstraints) -> HubResult<()> {
    limits::check_count(
        "placement labels (required and preferred)",
        p.required_labels.len() + p.preferred_labels.len(),
        limits::MAX_LABELS,
    )?;
    limits::check_len("placement.region", &p.region, limits::MAX_NAME_BYTES)?;
    limits::check_len("placement.zone", &p.zone, limits::MAX_NAME_BYTES)?;
    for (k, v) in p.required_labels.iter().chain(&p.preferred_labels) {
        limits::check_len("a placement label key", k, limits::MAX_NAME_BYTES)?;
        limits::check_len("a placement label value", v, limits::MAX_NAME_BYTES)?;
    }
    Ok(())
}

pub fn workflow_state(s: WorkflowStatus) -> pb::WorkflowState {
    match s {
        WorkflowStatus::Running => pb::WorkflowState::Running,
        WorkflowStatus::Succeeded => pb::WorkflowState::Succeeded,
        WorkflowStatus::Failed => pb::WorkflowState::Failed,
        WorkflowStatus::Cancelled => pb::WorkflowState::Cancelled,
    }
}

pub fn step_state(s: StepState) -> pb::StepState {
    match s {
        StepState::Pending => pb::StepState::Pending,
        StepState::Queued => pb::StepState::Queued,
        StepState::Running => pb::StepState::Running,
        StepState::Succeeded => pb::StepState::Succeeded,
        StepState::Failed => pb::StepState::Failed,
        StepState::Skipped => pb::StepState::Skipped,
        StepState::Cancelled => pb::StepState::Cancelled,
    }
}

/// An optional JSON value as UTF-8 JSON bytes; empty when absent.
fn bytes(v: &Option<serde_json::Value>) -> Vec<u8> {
    v.as_ref()
        .map(|v| serde_json::to_vec(v).unwrap_or_default())
        .unwrap_or_default()
}

pub fn workflow(w: &WorkflowRecord) -> pb::Workflow {
    pb::Workflow {
        id: w.id.clone(),
        name: w.name.clone(),
        tenant: w.tenant.clone(),
        agent: w.agent.clone(),
        state: workflow_state(w.status) as i32,
        failure_policy: match w.failure_policy {
            FailurePolicy::FailFast => pb::FailurePolicy::FailFast,
            FailurePolicy::Continue => pb::FailurePolicy::Continue,
        } as i32,
        steps: w
            .steps
            .iter()
            .map(|s| pb::Step {
                name: s.name.clone(),
                tool: s.tool.clone(),
                depends_on: s.depends_on.clone(),
                state: step_state(s.state) as i32,
                task_id: s.task_id.clone().unwrap_or_default(),
                arguments: bytes(&s.resolved),
                result: bytes(&s.result),
                error: s.error.clone().unwrap_or_default(),
            })
            .collect(),
        created_at_ms: w.created_at_ms,
        updated_at_ms: w.updated_at_ms,
        error: w.error.clone().unwrap_or_default(),
        idempotency_key: w.idempotency_key.clone().unwrap_or_default(),
    }
}

/// A workflow's events numbered `from` or later, in order: each step's latest change, then
/// the workflow's end. Steps not started yet have no event.
pub fn workflow_events(w: &WorkflowRecord, from: u64) -> Vec<pb::WorkflowEvent> {
    let mut steps: Vec<_> = w
        .steps
        .iter()
        .filter(|s| s.seq >= from && s.seq > 0)
        .collect();
    steps.sort_by_key(|s| s.seq);
    let mut out: Vec<pb::WorkflowEvent> = steps
        .into_iter()
        .map(|s| pb::WorkflowEvent {
            seq: s.seq,
            workflow_id: w.id.clone(),
            step: s.name.clone(),
            step_state: step_state(s.state) as i32,
            workflow_state: pb::WorkflowState::Running as i32,
            task_id: s.task_id.clone().unwrap_or_default(),
            at_ms: s.changed_at_ms,
            result: bytes(&s.result),
            error: s.error.clone().unwrap_or_default(),
        })
        .collect();
    if let Some(seq) = w.ended_seq.filter(|s| *s >= from) {
        out.push(pb::WorkflowEvent {
            seq,
            workflow_id: w.id.clone(),
            workflow_state: workflow_state(w.status) as i32,
            at_ms: w.updated_at_ms,
            error: w.error.clone().unwrap_or_default(),
            ..Default::default()
        });
    }
    out
}

pub fn cancel_message(task_id: &str, attempt: u32) -> pb::HubMessage {
    pb::HubMessage {
        msg: Some(pb::hub_message::Msg::Cancel(pb::Cancel {
            task_id: task_id.to_owned(),
            attempt,
        })),
    }
}

/// The assignment of `t` to `server`; `traceparent` is what the node's span continues;
/// `at_most_once` asks the node to write the attempt down before it calls the tool.
pub fn assign_message(
    t: &TaskRecord,
    server: &str,
    attempt: u32,
    fence: u64,
    at_most_once: bool,
    traceparent: String,
) -> pb::HubMessage {
    pb::HubMessage {
        msg: Some(pb::hub_message::Msg::Assign(pb::Assign {
            task_id: t.id.clone(),
            attempt,
            fence,
            server: server.to_owned(),
            tool: t.tool.clone(),
            arguments: serde_json::to_vec(&t.arguments).unwrap_or_default(),
            traceparent,
            at_most_once,
        })),
    }
}

/// Most MCP servers one node may offer, and tools one server may offer.
pub const MAX_SERVERS: usize = 64;
pub const MAX_TOOLS_PER_SERVER: usize = 512;
/// Longest tool description.
pub const MAX_DESCRIPTION_BYTES: usize = 16 * 1024;

/// A node's hello, checked: within the limits, tool schemas JSON objects.
pub fn offered_servers(hello: &pb::Hello) -> HubResult<Vec<OfferedServer>> {
    limits::check_count("servers", hello.servers.len(), MAX_SERVERS)?;
    limits::check_count("labels", hello.labels.len(), limits::MAX_LABELS)?;
    for (k, v) in &hello.labels {
        limits::check_len("a label key", k, limits::MAX_NAME_BYTES)?;
        limits::check_len("a label value", v, limits::MAX_NAME_BYTES)?;
    }
    limits::check_count("tenants", hello.tenants.len(), limits::MAX_LABELS)?;
    for t in &hello.tenants {
        limits::check_len("a tenant", t, limits::MAX_NAME_BYTES)?;
    }
    hello
        .servers
        .iter()
        .map(|s| {
            limits::check_len("a server name", &s.name, limits::MAX_NAME_BYTES)?;
            limits::check_len(
                "a server's scope",
                &s.required_scope,
                limits::MAX_NAME_BYTES,
            )?;
            limits::check_count(
                &format!("server {:?}'s tools", s.name),
                s.tools.len(),
                MAX_TOOLS_PER_SERVER,
            )?;
            let tools = s
                .tools
                .iter()
                .map(|t| {
                    limits::check_len("a tool name", &t.name, limits::MAX_NAME_BYTES)?;
                    limits::check_len(
                        &format!("tool {:?}'s description", t.name),
                        &t.description,
                        MAX_DESCRIPTION_BYTES,
                    )?;
                    let schema: serde_json::Value = serde_json::from_slice(&t.input_schema)
                        .map_err(|e| {
                            invalid(format!("tool {:?}: input schema is not JSON: {e}", t.name))
                        })?;
                    if !schema.is_object() {
                        return Err(invalid(format!(
                            "tool {:?}: input schema is not an object",
                            t.name
                        )));
                    }
                    limits::check_depth(&format!("tool {:?}'s input schema", t.name), &schema)?;
                    Ok(ToolDef {
                        name: t.name.clone(),
                        description: t.description.clone(),
                        input_schema: schema,
                        read_only: t.read_only,
                        idempotent: t.idempotent,
                        destructive: t.destructive,
                    })
                })
                .collect::<HubResult<Vec<_>>>()?;
            Ok(OfferedServer {
                name: s.name.clone(),
                max_concurrency: s.max_concurrency.max(1),
                required_scope: s.required_scope.clone(),
                tools,
            })
        })
        .collect()
}

/// Sums per-node statistics; the estimated duration is the call-weighted mean.
pub fn tool_stats<'a>(
    per_node: impl IntoIterator<Item = &'a crate::state::ToolStats>,
) -> pb::ToolStats {
    let mut out = pb::ToolStats::default();
    let mut weighted = 0u128;
    for s in per_node {
        out.calls += s.calls;
        out.succeeded += s.succeeded;
        out.failed += s.failed;
        weighted += u128::from(s.ewma_ms) * u128::from(s.calls);
    }
    if out.calls > 0 {
        out.estimated_duration_ms = (weighted / u128::from(out.calls)) as u64;
    }
    out
}
