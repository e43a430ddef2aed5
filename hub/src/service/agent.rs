//! AgentService: submit, inspect, watch, cancel and list tasks; list the tool catalogue.

use std::pin::Pin;

use flotilla_common::jwt::Claims;
use flotilla_proto::{
    agent_service_server::AgentService, CancelTaskRequest, GetTaskRequest, ListTasksRequest,
    ListTasksResponse, ListToolsRequest, ListToolsResponse, SubmitTaskRequest, SubmitTaskResponse,
    Task, TaskEvent, TaskState, Tool, WatchTaskRequest,
};
use futures::Stream;
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::{
    app::Hub,
    auth, convert,
    error::{HubError, HubResult},
    events::is_terminal_event,
    state::{self, Command, State, TaskRecord, TaskStatus},
};

/// Largest accepted `arguments` document.
pub const MAX_ARGUMENT_BYTES: usize = 1024 * 1024;

pub struct AgentApi {
    pub hub: Hub,
}

/// A task the caller may see: it must exist and belong to the caller's tenant.
fn visible_task(state: &State, claims: &Claims, id: &str) -> HubResult<TaskRecord> {
    let t = state
        .tasks
        .get(id)
        .ok_or_else(|| HubError::NotFound(format!("no task {id:?}")))?;
    if t.tenant != claims.tenant {
        return Err(HubError::PermissionDenied(format!(
            "task {id:?} belongs to another tenant"
        )));
    }
    Ok(t.clone())
}

impl AgentApi {
    fn validate_submission(
        &self,
        claims: &Claims,
        req: &SubmitTaskRequest,
    ) -> HubResult<(Value, Option<String>)> {
        if req.arguments.len() > MAX_ARGUMENT_BYTES {
            return Err(HubError::InvalidArgument(format!(
                "arguments are {} bytes; the limit is {MAX_ARGUMENT_BYTES}",
                req.arguments.len()
            )));
        }
        let args: Value = if req.arguments.is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_slice(&req.arguments).map_err(|e| {
                HubError::InvalidArgument(format!("arguments are not valid JSON: {e}"))
            })?
        };
        if !args.is_object() {
            return Err(HubError::InvalidArgument(
                "arguments must be a JSON object".into(),
            ));
        }
        let state = self.hub.state();
        let entry = state.catalogue.get(&req.tool).ok_or_else(|| {
            HubError::NotFound(format!(
                "unknown tool {:?}; `flotilla tools` lists the tools you may call",
                req.tool
            ))
        })?;
        if !claims.has_scope(&entry.required_scope) {
            return Err(HubError::PermissionDenied(format!(
                "tool {:?} needs scope {:?}, which this token does not hold",
                req.tool, entry.required_scope
            )));
        }
        let validator = jsonschema::validator_for(&entry.def.input_schema).map_err(|e| {
            HubError::FailedPrecondition(format!(
                "tool {:?} has an input schema that cannot be compiled: {e}",
                req.tool
            ))
        })?;
        let problems: Vec<String> = validator
            .iter_errors(&args)
            .take(5)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                }
            })
            .collect();
        if !problems.is_empty() {
            return Err(HubError::InvalidArgument(format!(
                "arguments do not match the input schema of {:?}: {}",
                req.tool,
                problems.join("; ")
            )));
        }
        let key = (!req.idempotency_key.is_empty()).then(|| req.idempotency_key.clone());
        Ok((args, key))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<TaskEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn submit_task(
        &self,
        req: Request<SubmitTaskRequest>,
    ) -> Result<Response<SubmitTaskResponse>, Status> {
        let claims = auth::agent(&req, &self.hub.state())?;
        let req = req.into_inner();
        let (args, key) = self.validate_submission(&claims, &req)?;
        if let Some(k) = &key {
            let ix = state::idempotency_index(&claims.tenant, k);
            if let Some(id) = self.hub.state().idempotency.get(&ix) {
                return Ok(Response::new(SubmitTaskResponse {
                    task_id: id.clone(),
                    deduplicated: true,
                }));
            }
        }
        let now = flotilla_common::now_ms();
        let task = TaskRecord {
            id: uuid::Uuid::now_v7().to_string(),
            tool: req.tool,
            tenant: claims.tenant.clone(),
            agent: claims.sub.clone(),
            arguments: args,
            status: TaskStatus::Queued,
            result: None,
            error: None,
            created_at_ms: now,
            updated_at_ms: now,
            priority: req.priority,
            idempotency_key: key,
            attempts: Vec::new(),
            transitions: 0,
        };
        match self.hub.write(Command::SubmitTask(Box::new(task))).await? {
            state::Response::Submitted {
                task_id,
                deduplicated,
            } => {
                tracing::info!(task_id, agent = %claims.sub, tenant = %claims.tenant, deduplicated, "task accepted");
                Ok(Response::new(SubmitTaskResponse {
                    task_id,
                    deduplicated,
                }))
            }
            other => Err(HubError::Internal(format!("submit answered {other:?}")).into()),
        }
    }

    async fn get_task(&self, req: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        self.hub.read_barrier().await?;
        let state = self.hub.state();
        let claims = auth::agent(&req, &state)?;
        let t = visible_task(&state, &claims, &req.get_ref().task_id)?;
        drop(state);
        Ok(Response::new(convert::task(
            &t,
            self.hub.pending.get(&t.id),
        )))
    }

    type WatchTaskStream = EventStream;

    async fn watch_task(
        &self,
        req: Request<WatchTaskRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.hub.read_barrier().await?;
        let (task, from) = {
            let state = self.hub.state();
            let claims = auth::agent(&req, &state)?;
            let r = req.get_ref();
            (visible_task(&state, &claims, &r.task_id)?, r.from_seq)
        };
        let (backlog, mut rx) = self.hub.events.subscribe(&task, from);
        let events = self.hub.events.clone();
        let stream = async_stream(move |tx| async move {
            let mut last = from.saturating_sub(1);
            for ev in backlog {
                last = ev.seq;
                let done = is_terminal_event(&ev);
                if tx.send(Ok(ev)).await.is_err() || done {
                    return;
                }
            }
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.seq <= last => continue,
                    Ok(ev) => {
                        last = ev.seq;
                        let done = is_terminal_event(&ev);
                        if tx.send(Ok(ev)).await.is_err() || done {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind: read what was missed from the log itself.
                        let (missed, fresh) = events.subscribe(&task, last + 1);
                        rx = fresh;
                        for ev in missed {
                            last = ev.seq;
                            let done = is_terminal_event(&ev);
                            if tx.send(Ok(ev)).await.is_err() || done {
                                return;
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "hub is shutting down; resume the watch from the last seq",
                            )))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn cancel_task(&self, req: Request<CancelTaskRequest>) -> Result<Response<Task>, Status> {
        let task = {
            let state = self.hub.state();
            let claims = auth::agent(&req, &state)?;
            visible_task(&state, &claims, &req.get_ref().task_id)?
        };
        if task.status.is_terminal() {
            return Err(HubError::FailedPrecondition(format!(
                "task {} already ended ({:?})",
                task.id, task.status
            ))
            .into());
        }
        let cmd = Command::CancelTask {
            task_id: task.id.clone(),
            at_ms: flotilla_common::now_ms(),
        };
        match self.hub.write(cmd).await? {
            state::Response::TaskNow(_) => {}
            state::Response::Rejected(r) => {
                return Err(HubError::FailedPrecondition(r.to_string()).into())
            }
            other => return Err(HubError::Internal(format!("cancel answered {other:?}")).into()),
        }
        if let Some(a) = task.current_attempt().filter(|_| task.status.is_active()) {
            self.hub
                .sessions
                .send(&a.node_id, convert::cancel_message(&task.id, a.number));
        }
        let now = self
            .hub
            .state()
            .tasks
            .get(&task.id)
            .cloned()
            .unwrap_or(task);
        Ok(Response::new(convert::task(&now, None)))
    }

    async fn list_tasks(
        &self,
        req: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        self.hub.read_barrier().await?;
        let state = self.hub.state();
        let claims = auth::agent(&req, &state)?;
        let r = req.get_ref();
        let wanted: Vec<TaskState> = r
            .states
            .iter()
            .filter_map(|s| TaskState::try_from(*s).ok())
            .collect();
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(10_000)
        } as usize;
        // Task ids are UUIDv7, so reverse id order is newest first.
        let tasks = state
            .tasks
            .values()
            .rev()
            .filter(|t| t.tenant == claims.tenant)
            .filter(|t| wanted.is_empty() || wanted.contains(&convert::task_state(t.status)))
            .take(limit)
            .map(|t| convert::task(t, self.hub.pending.get(&t.id)))
            .collect();
        Ok(Response::new(ListTasksResponse { tasks }))
    }

    async fn list_tools(
        &self,
        req: Request<ListToolsRequest>,
    ) -> Result<Response<ListToolsResponse>, Status> {
        // Verify first, then ask for live state (which may await the leader).
        let claims = auth::agent(&req, &self.hub.state())?;
        let live = self.hub.live_nodes().await;
        let state = self.hub.state();
        let tools = state
            .catalogue
            .values()
            .filter(|e| claims.has_scope(&e.required_scope))
            .map(|e| {
                let nodes = state
                    .nodes
                    .values()
                    .filter(|n| live.contains_key(&n.id))
                    .filter(|n| n.servers.iter().any(|s| s.tools.contains(&e.def.name)))
                    .map(|n| n.id.clone())
                    .collect();
                Tool {
                    name: e.def.name.clone(),
                    description: e.def.description.clone(),
                    input_schema: serde_json::to_vec(&e.def.input_schema).unwrap_or_default(),
                    required_scope: e.required_scope.clone(),
                    read_only: e.def.read_only,
                    idempotent: e.def.idempotent,
                    destructive: e.def.destructive,
                    nodes,
                }
            })
            .collect();
        Ok(Response::new(ListToolsResponse { tools }))
    }
}

/// A response stream fed by a spawned task through a bounded channel.
pub(crate) fn async_stream<T, F, Fut>(f: F) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
