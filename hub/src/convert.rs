//! Conversions between the replicated state's types and the `flotilla.v1` wire types, in one
//! place.

use flotilla_proto as pb;

use crate::state::{AttemptRecord, OfferedServer, TaskRecord, TaskStatus, ToolDef};

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
    }
}

/// A task as agents see it; `pending` is the scheduler's reason for a queued task.
pub fn task(t: &TaskRecord, pending: Option<String>) -> pb::Task {
    pb::Task {
        id: t.id.clone(),
        tool: t.tool.clone(),
        tenant: t.tenant.clone(),
        agent: t.agent.clone(),
        state: task_state(t.status) as i32,
        arguments: serde_json::to_vec(&t.arguments).unwrap_or_default(),
        result: t
            .result
            .as_ref()
            .map(|r| serde_json::to_vec(r).unwrap_or_default())
            .unwrap_or_default(),
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
    }
}

pub fn cancel_message(task_id: &str, attempt: u32) -> pb::HubMessage {
    pb::HubMessage {
        msg: Some(pb::hub_message::Msg::Cancel(pb::Cancel {
            task_id: task_id.to_owned(),
            attempt,
        })),
    }
}

pub fn assign_message(t: &TaskRecord, server: &str, attempt: u32, fence: u64) -> pb::HubMessage {
    pb::HubMessage {
        msg: Some(pb::hub_message::Msg::Assign(pb::Assign {
            task_id: t.id.clone(),
            attempt,
            fence,
            server: server.to_owned(),
            tool: t.tool.clone(),
            arguments: serde_json::to_vec(&t.arguments).unwrap_or_default(),
        })),
    }
}

/// A node's hello, checked: tool schemas must be JSON objects.
pub fn offered_servers(hello: &pb::Hello) -> Result<Vec<OfferedServer>, String> {
    hello
        .servers
        .iter()
        .map(|s| {
            let tools = s
                .tools
                .iter()
                .map(|t| {
                    let schema: serde_json::Value = serde_json::from_slice(&t.input_schema)
                        .map_err(|e| format!("tool {:?}: input schema is not JSON: {e}", t.name))?;
                    if !schema.is_object() {
                        return Err(format!("tool {:?}: input schema is not an object", t.name));
                    }
                    Ok(ToolDef {
                        name: t.name.clone(),
                        description: t.description.clone(),
                        input_schema: schema,
                        read_only: t.read_only,
                        idempotent: t.idempotent,
                        destructive: t.destructive,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(OfferedServer {
                name: s.name.clone(),
                max_concurrency: s.max_concurrency.max(1),
                required_scope: s.required_scope.clone(),
                tools,
            })
        })
        .collect()
}

pub fn server_state_name(s: pb::ServerState) -> &'static str {
    match s {
        pb::ServerState::Unspecified => "unknown",
        pb::ServerState::Starting => "starting",
        pb::ServerState::Ready => "ready",
        pb::ServerState::Failing => "failing",
        pb::ServerState::Restarting => "restarting",
    }
}
