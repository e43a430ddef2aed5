//! AgentService: submit, inspect, watch, cancel and list tasks; list the tool catalogue.

use std::pin::Pin;
use tracing::Instrument;

use flotilla_common::jwt::Claims;
use flotilla_proto::{
    agent_service_server::AgentService, CancelTaskRequest, CancelWorkflowRequest,
    CreateDashboardLoginRequest, DashboardLogin, GetOverviewRequest, GetTaskRequest,
    GetWorkflowRequest, ListTasksRequest, ListTasksResponse, ListToolsRequest, ListToolsResponse,
    NodeToolStats, Overview, SubmitTaskRequest, SubmitTaskResponse, SubmitWorkflowRequest,
    SubmitWorkflowResponse, Task, TaskEvent, TaskState, Tool, WatchTaskRequest,
    WatchWorkflowRequest, Workflow, WorkflowEvent,
};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::{
    admission::{self, check_call},
    auth,
    cluster::Hub,
    convert,
    error::{HubError, HubResult},
    quota::StreamPermit,
    state::{self, Command, Lookup, State, TaskRecord, WorkflowRecord},
};

/// How long CallTool on a follower waits to apply the task it just forwarded before it
/// asks the leader for a read barrier instead.
const APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

pub struct AgentApi {
    pub hub: Hub,
}

/// A task the caller may see, live or finished: it must exist and belong to the caller's
/// tenant. Another tenant's task answers exactly as a missing one, so ids reveal nothing
/// across tenants; one whose retention ended says so.
fn visible_task(state: &State, claims: &Claims, id: &str) -> HubResult<TaskRecord> {
    let found = state
        .find_task(id)
        .map_err(|e| HubError::Internal(e.to_string()))?;
    visible(found, claims, "task", id)
}

fn visible<T: Owned>(found: Lookup<T>, claims: &Claims, what: &str, id: &str) -> HubResult<T> {
    match found {
        Lookup::Found(t) if t.tenant() == claims.tenant => Ok(t),
        Lookup::Expired {
            tenant,
            ended_at_ms,
        } if tenant == claims.tenant => Err(HubError::NotFound(format!(
            "{what} {id:?} expired: it ended {} s ago, and finished work is kept only as long as the hub's retention (retention_s, retention_max_tasks in hub.toml)",
            (flotilla_common::now_ms() - ended_at_ms).max(0) / 1000
        ))),
        _ => Err(HubError::NotFound(format!("no {what} {id:?}"))),
    }
}

/// Records that belong to a tenant.
trait Owned {
    fn tenant(&self) -> &str;
}

impl Owned for TaskRecord {
    fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl Owned for WorkflowRecord {
    fn tenant(&self) -> &str {
        &self.tenant
    }
}

fn store_error(e: state::history::StoreError) -> HubError {
    HubError::Internal(e.to_string())
}

/// A task as the API shows it: the record, plus what only this hub's memory knows (why a
/// queued task waits; that an assigned task's node started it).
fn task_view(hub: &Hub, state: &State, t: &TaskRecord) -> flotilla_proto::Task {
    let mut view = convert::task(state, t, hub.pending.get(&t.id));
    if t.status == state::TaskStatus::Assigned {
        let at = t
            .current_attempt()
            .and_then(|a| hub.events.started_at(&t.id, a.number));
        if let (Some(at), Some(a)) = (at, view.attempts.last_mut()) {
            view.state = TaskState::Running as i32;
            a.started_at_ms = at;
        }
    }
    view
}

/// A workflow the caller may see, live or finished.
fn visible_workflow(state: &State, claims: &Claims, id: &str) -> HubResult<WorkflowRecord> {
    let found = state.find_workflow(id).map_err(store_error)?;
    visible(found, claims, "workflow", id)
}

impl AgentApi {
    /// The verified caller, counted against its agent's and tenant's request rate.
    fn caller<T>(&self, req: &Request<T>) -> HubResult<Claims> {
        let claims = auth::agent(req, &self.hub)?;
        self.hub.quota.request(&claims)?;
        Ok(claims)
    }

    /// Puts a refusal for a missing tool scope in the audit trail (`what`: the call or
    /// workflow refused), and hands the error on.
    fn audit_refusal(&self, claims: &Claims, what: &str, e: HubError) -> HubError {
        if matches!(e, HubError::PermissionDenied(_)) {
            self.hub.audit.denied(
                self.hub.id(),
                &claims.sub,
                &claims.tenant,
                what,
                "missing_scope",
                "",
            );
            self.hub.metrics.auth_failed("missing_scope");
        }
        e
    }

    /// Refuses `adding` more tasks when the caller's tenant has a full queue.
    fn room_in_queue(&self, claims: &Claims, adding: usize) -> HubResult<()> {
        let queued = self
            .hub
            .state()
            .index
            .queue
            .get(&claims.tenant)
            .map_or(0, |q| q.len());
        self.hub.quota.queue(&claims.tenant, queued, adding)
    }

    /// Validates and commits one submission (SubmitTask, CallTool), in the trace
    /// `trace` (a `traceparent`) if it has one.
    async fn submit(
        &self,
        claims: &Claims,
        trace: Option<String>,
        req: SubmitTaskRequest,
    ) -> HubResult<SubmitTaskResponse> {
        let admitted =
            tracing::info_span!("admission", gen_ai.tool.name = %req.tool).in_scope(|| {
                admission::task(claims, &req, |tool, args| {
                    check_call(&self.hub.state(), &self.hub.schemas, claims, tool, args)
                })
            });
        let mut task = match admitted {
            // Nobody offers it: a server that fails to start may be why.
            Err(HubError::NotFound(m)) if !self.hub.state().catalogue.contains_key(&req.tool) => {
                return Err(HubError::NotFound(m + &self.failing_servers(claims).await));
            }
            other => {
                other.map_err(|e| self.audit_refusal(claims, &format!("tool {}", req.tool), e))?
            }
        };
        task.trace = trace;
        // A repeat of an accepted submission answers as it did, even with a full queue.
        if let Some(k) = &task.idempotency_key {
            let known = self
                .hub
                .state()
                .keyed(false, &claims.tenant, k)
                .map_err(store_error)?;
            if let Some(id) = known {
                return Ok(SubmitTaskResponse {
                    task_id: id,
                    deduplicated: true,
                });
            }
        }
        self.room_in_queue(claims, 1)?;
        let commit = tracing::info_span!("raft commit");
        match self
            .hub
            .write(Command::SubmitTask(Box::new(task)))
            .instrument(commit)
            .await?
        {
            state::Response::Submitted {
                task_id,
                deduplicated,
            } => {
                tracing::debug!(task_id, agent = ?claims.sub, tenant = ?claims.tenant, deduplicated, "task accepted");
                Ok(SubmitTaskResponse {
                    task_id,
                    deduplicated,
                })
            }
            other => Err(HubError::Internal(format!("submit answered {other:?}"))),
        }
    }

    /// The MCP servers failing now on nodes that serve the caller's tenant, for the
    /// answer to a call of a tool that no server offers (a server that cannot start never
    /// said which tools it has); "" if none. Why each fails (its stderr may hold anything)
    /// is told to admins only; others see it in `flotilla nodes` if they are.
    async fn failing_servers(&self, claims: &Claims) -> String {
        const SHOWN: usize = 3;
        const WHY_CHARS: usize = 400;
        let admin = claims.may(flotilla_common::jwt::ADMIN_READ);
        let live = self.hub.live_nodes().await;
        let mut failing: Vec<String> = {
            let state = self.hub.state();
            live.into_iter()
                .filter(|(node, _)| {
                    state
                        .nodes
                        .get(node)
                        .is_some_and(|n| n.serves(&claims.tenant))
                })
                .flat_map(|(node, view)| {
                    view.servers
                        .into_iter()
                        .filter(|s| {
                            s.state != flotilla_proto::ServerState::Ready as i32
                                && !s.error.is_empty()
                        })
                        .map(move |s| {
                            if admin {
                                let why: String = s.error.chars().take(WHY_CHARS).collect();
                                format!("{:?} on node {node} ({why})", s.name)
                            } else {
                                format!("{:?} on node {node}", s.name)
                            }
                        })
                })
                .collect()
        };
        if failing.is_empty() {
            return String::new();
        }
        failing.sort();
        let more = failing.len().saturating_sub(SHOWN);
        failing.truncate(SHOWN);
        let more = if more > 0 {
            format!(" and {more} more (`flotilla nodes`)")
        } else {
            String::new()
        };
        format!(
            ". Servers that are failing now, and may offer it once they start: {}{more}",
            failing.join("; ")
        )
    }

    /// A task just committed through this hub, once this hub has applied it: at once on
    /// the leader; a follower applies it moments after the leader answered the forwarded
    /// write, and a read barrier settles it if that takes long.
    async fn applied_here(&self, claims: &Claims, id: &str) -> HubResult<TaskRecord> {
        if let Ok(t) = visible_task(&self.hub.state(), claims, id) {
            return Ok(t);
        }
        let (hub, who, id2) = (self.hub.clone(), claims.clone(), id.to_owned());
        let seen = self
            .hub
            .raft()
            .wait(Some(APPLY_WAIT))
            .metrics(
                move |_| visible_task(&hub.state(), &who, &id2).is_ok(),
                "a submitted task applied here",
            )
            .await;
        if seen.is_err() {
            self.hub.read_barrier().await?;
        }
        visible_task(&self.hub.state(), claims, id)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<TaskEvent, Status>> + Send>>;
type WorkflowEventStream = Pin<Box<dyn Stream<Item = Result<WorkflowEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn submit_task(
        &self,
        req: Request<SubmitTaskRequest>,
    ) -> Result<Response<SubmitTaskResponse>, Status> {
        let claims = self.caller(&req)?;
        let trace = crate::trace::of_submission(req.metadata());
        Ok(Response::new(
            self.submit(&claims, trace, req.into_inner()).await?,
        ))
    }

    async fn get_task(&self, req: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        let claims = self.caller(&req)?;
        self.hub.read_barrier().await?;
        let state = self.hub.state();
        let t = visible_task(&state, &claims, &req.get_ref().task_id)?;
        Ok(Response::new(task_view(&self.hub, &state, &t)))
    }

    type WatchTaskStream = EventStream;

    async fn watch_task(
        &self,
        req: Request<WatchTaskRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // Verified and counted before the read barrier costs a round trip to the leader.
        let claims = self.caller(&req)?;
        let r = req.get_ref();
        // A watch is a stream: if this hub already has the task, whatever it has not
        // applied yet arrives as it applies it, so only a task it does not know yet (one
        // just submitted through another hub) needs the barrier.
        let local = visible_task(&self.hub.state(), &claims, &r.task_id);
        let task = match local {
            Ok(t) => t,
            Err(_) => {
                self.hub.read_barrier().await?;
                visible_task(&self.hub.state(), &claims, &r.task_id)?
            }
        };
        let (from, permit) = (r.from_seq, self.hub.quota.stream(&claims)?);
        Ok(Response::new(task_events(
            self.hub.clone(),
            task,
            from,
            permit,
        )))
    }

    type CallToolStream = EventStream;

    async fn call_tool(
        &self,
        req: Request<SubmitTaskRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let claims = self.caller(&req)?;
        // Counted before the commit: a caller at its stream limit leaves no task behind.
        let permit = self.hub.quota.stream(&claims)?;
        let trace = crate::trace::of_submission(req.metadata());
        let accepted = self.submit(&claims, trace, req.into_inner()).await?;
        let task = self.applied_here(&claims, &accepted.task_id).await?;
        Ok(Response::new(task_events(
            self.hub.clone(),
            task,
            1,
            permit,
        )))
    }

    async fn cancel_task(&self, req: Request<CancelTaskRequest>) -> Result<Response<Task>, Status> {
        let task = {
            let claims = self.caller(&req)?;
            let state = self.hub.state();
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
        // The node running it (if any) was told to stop as the cancel was applied.
        let state = self.hub.state();
        let now = state.find_task(&task.id).ok().and_then(Lookup::found);
        Ok(Response::new(task_view(
            &self.hub,
            &state,
            now.as_ref().unwrap_or(&task),
        )))
    }

    async fn list_tasks(
        &self,
        req: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let claims = self.caller(&req)?;
        self.hub.read_barrier().await?;
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
        // Cheap first: an assigned task may show as running (its node started it).
        let may_match = |t: &TaskRecord| {
            (!r.dead_lettered || t.dead_lettered)
                && (wanted.is_empty()
                    || wanted.contains(&convert::task_state(t.status))
                    || (t.status == state::TaskStatus::Assigned
                        && wanted.contains(&TaskState::Running)))
        };
        // Task ids are UUIDv7, so reverse id order is newest first: live tasks (memory)
        // and finished ones (the history store) are merged in that order.
        let (live, history) = {
            let state = self.hub.state();
            let live: Vec<flotilla_proto::Task> = state
                .tasks
                .values()
                .rev()
                .filter(|t| t.tenant == claims.tenant)
                .filter(|t| may_match(t))
                .map(|t| task_view(&self.hub, &state, t))
                .filter(|v| wanted.is_empty() || wanted.contains(&v.state()))
                .take(limit)
                .collect();
            (live, state.history.clone())
        };
        // Finished tasks only when an ended state is asked for.
        let ended = wanted.is_empty()
            || wanted.iter().any(|w| {
                matches!(
                    w,
                    TaskState::Succeeded
                        | TaskState::Failed
                        | TaskState::Cancelled
                        | TaskState::Lost
                )
            });
        // Read without holding the state lock: applies go on meanwhile.
        let finished = if ended {
            history
                .list(&claims.tenant, r.dead_lettered, limit, may_match)
                .map_err(store_error)?
        } else {
            Vec::new()
        };
        let finished: Vec<flotilla_proto::Task> = {
            let state = self.hub.state();
            finished
                .iter()
                .map(|t| task_view(&self.hub, &state, t))
                .collect()
        };
        let mut finished = finished.into_iter().peekable();
        let mut live = live.into_iter().peekable();
        let mut tasks = Vec::with_capacity(limit);
        while tasks.len() < limit {
            let take_live = match (live.peek(), finished.peek()) {
                // Both (a store ahead of memory while a hub replays): the live view.
                (Some(a), Some(b)) if a.id == b.id => {
                    finished.next();
                    true
                }
                (Some(a), Some(b)) => a.id > b.id,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let next = if take_live {
                live.next()
            } else {
                finished.next()
            };
            tasks.extend(next);
        }
        Ok(Response::new(ListTasksResponse { tasks }))
    }

    async fn list_tools(
        &self,
        req: Request<ListToolsRequest>,
    ) -> Result<Response<ListToolsResponse>, Status> {
        // Verify first, then ask for live state (which may await the leader).
        let claims = self.caller(&req)?;
        let live = self.hub.live_nodes().await;
        let state = self.hub.state();
        let tools = state
            .catalogue
            .values()
            .filter(|e| claims.has_scope(&e.required_scope))
            .filter(|e| e.accepted || claims.may(flotilla_common::jwt::ADMIN_READ))
            .map(|e| {
                let nodes = state
                    .nodes
                    .values()
                    .filter(|n| live.contains_key(&n.id))
                    .filter(|n| {
                        n.servers.iter().any(|s| {
                            s.tools.contains(&e.def.name) || s.pending_tools.contains(&e.def.name)
                        })
                    })
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
                    accepted: e.accepted,
                    nodes,
                    stats: Some(convert::tool_stats(
                        state
                            .tool_stats
                            .get(&e.def.name)
                            .into_iter()
                            .flatten()
                            .map(|(_, s)| s),
                    )),
                    node_stats: state
                        .tool_stats
                        .get(&e.def.name)
                        .into_iter()
                        .flatten()
                        .map(|(node, s)| NodeToolStats {
                            node_id: node.clone(),
                            stats: Some(convert::tool_stats([s])),
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(ListToolsResponse { tools }))
    }

    async fn submit_workflow(
        &self,
        req: Request<SubmitWorkflowRequest>,
    ) -> Result<Response<SubmitWorkflowResponse>, Status> {
        let claims = self.caller(&req)?;
        let trace = crate::trace::of_submission(req.metadata());
        let req = req.into_inner();
        if !req.idempotency_key.is_empty() {
            let known = self
                .hub
                .state()
                .keyed(true, &claims.tenant, &req.idempotency_key)
                .map_err(store_error)?;
            if let Some(id) = known {
                return Ok(Response::new(SubmitWorkflowResponse {
                    workflow_id: id,
                    deduplicated: true,
                }));
            }
        }
        let name = req.name.clone();
        let mut wf = admission::workflow(&self.hub.state(), &self.hub.schemas, &claims, req)
            .map_err(|e| self.audit_refusal(&claims, &format!("workflow {name}"), e))?;
        wf.trace = trace;
        let steps = wf.steps.len();
        self.room_in_queue(&claims, steps)?;
        match self
            .hub
            .write(Command::SubmitWorkflow(Box::new(wf)))
            .await?
        {
            state::Response::WorkflowSubmitted {
                workflow_id,
                deduplicated,
            } => {
                tracing::info!(workflow_id, steps, agent = ?claims.sub, tenant = ?claims.tenant, deduplicated, "workflow accepted");
                Ok(Response::new(SubmitWorkflowResponse {
                    workflow_id,
                    deduplicated,
                }))
            }
            other => Err(HubError::Internal(format!("submit workflow answered {other:?}")).into()),
        }
    }

    async fn get_workflow(
        &self,
        req: Request<GetWorkflowRequest>,
    ) -> Result<Response<Workflow>, Status> {
        let claims = self.caller(&req)?;
        self.hub.read_barrier().await?;
        let state = self.hub.state();
        let w = visible_workflow(&state, &claims, &req.get_ref().workflow_id)?;
        Ok(Response::new(convert::workflow(&w)))
    }

    type WatchWorkflowStream = WorkflowEventStream;

    async fn watch_workflow(
        &self,
        req: Request<WatchWorkflowRequest>,
    ) -> Result<Response<WorkflowEventStream>, Status> {
        let claims = self.caller(&req)?;
        self.hub.read_barrier().await?;
        let (claims, id, from) = {
            let state = self.hub.state();
            let r = req.get_ref();
            visible_workflow(&state, &claims, &r.workflow_id)?;
            (claims, r.workflow_id.clone(), r.from_seq)
        };
        let permit = self.hub.quota.stream(&claims)?;
        let hub = self.hub.clone();
        let stream = async_stream(move |tx| async move {
            let _permit = permit;
            let mut changed = hub.workflows.subscribe();
            let mut next = from;
            loop {
                changed.mark_unchanged();
                let found = visible_workflow(&hub.state(), &claims, &id);
                let events = match found {
                    Ok(w) => convert::workflow_events(&w, next),
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                for ev in events {
                    next = ev.seq + 1;
                    let done = ev.step.is_empty();
                    if tx.send(Ok(ev)).await.is_err() || done {
                        return;
                    }
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn cancel_workflow(
        &self,
        req: Request<CancelWorkflowRequest>,
    ) -> Result<Response<Workflow>, Status> {
        let (claims, id) = {
            let claims = self.caller(&req)?;
            let state = self.hub.state();
            let w = visible_workflow(&state, &claims, &req.get_ref().workflow_id)?;
            (claims, w.id)
        };
        let cmd = Command::CancelWorkflow {
            workflow_id: id.clone(),
            at_ms: flotilla_common::now_ms(),
        };
        match self.hub.write(cmd).await? {
            state::Response::WorkflowNow(_) => {}
            state::Response::Rejected(r) => {
                return Err(HubError::FailedPrecondition(r.to_string()).into())
            }
            other => return Err(HubError::Internal(format!("cancel answered {other:?}")).into()),
        }
        tracing::info!(workflow_id = %id, by = ?claims.sub, "workflow cancelled");
        let state = self.hub.state();
        let w = visible_workflow(&state, &claims, &id)?;
        Ok(Response::new(convert::workflow(&w)))
    }

    async fn get_overview(
        &self,
        req: Request<GetOverviewRequest>,
    ) -> Result<Response<Overview>, Status> {
        let claims = self.caller(&req)?;
        let viewer = crate::dashboard::Viewer::of(&claims);
        Ok(Response::new(
            crate::dashboard::overview(&self.hub, &viewer).await,
        ))
    }

    async fn create_dashboard_login(
        &self,
        req: Request<CreateDashboardLoginRequest>,
    ) -> Result<Response<DashboardLogin>, Status> {
        let claims = self.caller(&req)?;
        let viewer = crate::dashboard::Viewer::of(&claims);
        let token = auth::bearer(&req).unwrap_or_default();
        let ticket =
            self.hub
                .dashboard
                .ticket(viewer.clone(), token, claims.exp.saturating_mul(1000));
        tracing::info!(by = ?claims.sub, tenant = ?viewer.tenant, "dashboard login link issued");
        Ok(Response::new(DashboardLogin {
            url: format!("{}/login?ticket={ticket}", self.hub.http_url()),
            expires_at_ms: (flotilla_common::now_ms()
                + crate::dashboard::TICKET_TTL.as_millis() as i64)
                .min(claims.exp.saturating_mul(1000)),
        }))
    }
}

/// A task's events from `from` until its end, for one watcher holding `permit`.
fn task_events(hub: Hub, task: TaskRecord, from: u64, permit: StreamPermit) -> EventStream {
    let (backlog, mut rx) = hub.events.subscribe(&task, from);
    async_stream(move |tx| async move {
        let _permit = permit;
        let mut last = from.saturating_sub(1);
        for ev in backlog {
            last = ev.seq;
            let done = ev.is_terminal();
            if tx.send(Ok(ev)).await.is_err() || done {
                return;
            }
        }
        if task.status.is_terminal() {
            // It had ended and the caller already saw the end: nothing more will come.
            return;
        }
        loop {
            // A client that went away ends the watch now, not at the task's next event.
            let next = tokio::select! {
                r = rx.recv() => r,
                _ = tx.closed() => return,
            };
            match next {
                Ok(ev) if ev.seq <= last => continue,
                Ok(ev) => {
                    last = ev.seq;
                    let done = ev.is_terminal();
                    if tx.send(Ok(ev)).await.is_err() || done {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Fell behind: read what was missed from the log itself.
                    // The task as it is now (its log may be gone if it ended).
                    let now = hub.state().find_task(&task.id).ok().and_then(Lookup::found);
                    let (missed, fresh) = hub
                        .events
                        .subscribe(now.as_ref().unwrap_or(&task), last + 1);
                    rx = fresh;
                    for ev in missed {
                        last = ev.seq;
                        let done = ev.is_terminal();
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
    })
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
