//! Client commands: talk to a hub's AgentService and AdminService over TLS with a JWT.

use std::{collections::HashMap, path::PathBuf, process::ExitCode};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use flotilla_common::{
    config::{ClientFile, ClientSettings},
    tls,
};
use flotilla_proto as pb;
use pb::{admin_service_client::AdminServiceClient, agent_service_client::AgentServiceClient};
use serde_json::{json, Value};
use tonic::{
    metadata::MetadataValue, service::interceptor::InterceptedService, transport::Channel, Request,
    Status,
};

use crate::{
    output::{self, Format},
    ClientFlags,
};

/// Adds `authorization: Bearer <jwt>` to every request.
#[derive(Clone)]
pub(crate) struct Auth(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}
pub(crate) type Agent = AgentServiceClient<InterceptedService<Channel, Auth>>;
pub(crate) type Admin = AdminServiceClient<InterceptedService<Channel, Auth>>;

/// The default client config: the dev cluster's, under the default data dir.
pub(crate) fn default_client_config() -> PathBuf {
    crate::dev::default_data_dir().join("client.toml")
}

pub(crate) fn settings(flags: &ClientFlags) -> anyhow::Result<ClientSettings> {
    let env: HashMap<String, String> = std::env::vars().collect();
    Ok(ClientSettings::resolve(
        ClientFile {
            hub: flags.hub.clone(),
            hubs: Vec::new(),
            ca: flags.ca.clone(),
            token: flags.token.clone(),
        },
        flags.config.as_deref(),
        &default_client_config(),
        &env,
    )?)
}

/// A channel to the hubs (each connection tries them in turn, from the `start`th) and an
/// interceptor that adds the bearer token.
pub(crate) fn connect_with(s: &ClientSettings, start: usize) -> anyhow::Result<(Channel, Auth)> {
    let ca = std::fs::read_to_string(&s.ca)
        .with_context(|| format!("reading CA certificate {}", s.ca.display()))?;
    let channel = tls::channel_any(&s.hubs, tls::client_config(&ca, None)?, start)?;
    let value: MetadataValue<_> = format!("Bearer {}", s.token.trim())
        .parse()
        .context("token contains characters not allowed in a header")?;
    Ok((channel, Auth(value)))
}

pub(crate) fn agent_client(s: &ClientSettings) -> anyhow::Result<Agent> {
    agent_client_from(s, 0)
}

fn agent_client_from(s: &ClientSettings, start: usize) -> anyhow::Result<Agent> {
    let (ch, auth) = connect_with(s, start)?;
    Ok(AgentServiceClient::with_interceptor(ch, auth)
        .max_decoding_message_size(flotilla_common::config::defaults::MAX_MESSAGE_BYTES))
}

pub(crate) fn admin_client(s: &ClientSettings) -> anyhow::Result<Admin> {
    let (ch, auth) = connect_with(s, 0)?;
    Ok(AdminServiceClient::with_interceptor(ch, auth))
}

/// How long a submission keeps trying other hubs while they answer UNAVAILABLE.
const FAILOVER_FOR: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs `f` (a submission made safe to repeat by its idempotency key) against the hubs:
/// while it answers UNAVAILABLE (a hub down or cut off, an election under way) it tries
/// again on the next hub, for up to `FAILOVER_FOR`.
pub(crate) async fn with_failover<T, F, Fut>(s: &ClientSettings, mut f: F) -> anyhow::Result<T>
where
    F: FnMut(Agent) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = std::time::Instant::now() + FAILOVER_FOR;
    let mut start = 0;
    loop {
        match f(agent_client_from(s, start)?).await {
            Ok(v) => return Ok(v),
            Err(e)
                if e.code() == tonic::Code::Unavailable
                    && !no_hub_answered(&e)
                    && std::time::Instant::now() < deadline =>
            {
                start += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return Err(status_error(e)),
        }
    }
}

/// Whether the call failed because not one hub accepted a connection (nothing to wait for).
fn no_hub_answered(s: &Status) -> bool {
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A gRPC error as a one-line message for people, with its cause (for a connection that
/// failed: which hubs were tried and why).
pub(crate) fn status_error(s: Status) -> anyhow::Error {
    let mut msg = format!("{:?}: {}", s.code(), s.message());
    let mut cause = std::error::Error::source(&s);
    while let Some(c) = cause {
        let text = c.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cause = c.source();
    }
    anyhow::anyhow!(msg)
}

#[derive(Args)]
pub(crate) struct CallArgs {
    /// Tool name.
    tool: String,
    /// Arguments as a JSON object.
    #[arg(long, default_value = "{}")]
    args: String,
    /// Resubmitting with the same key returns the first task instead of running again.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Print the task id and return without waiting.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    options: crate::workflow::OptionFlags,
    #[command(flatten)]
    flags: ClientFlags,
}

pub(crate) async fn call(a: CallArgs) -> anyhow::Result<ExitCode> {
    let args: Value = serde_json::from_str(&a.args).context("--args is not valid JSON")?;
    if !args.is_object() {
        bail!("--args must be a JSON object, like '{{\"text\":\"hi\"}}'");
    }
    let s = settings(&a.flags)?;
    // A key of its own makes the submission safe to repeat on another hub.
    let req = pb::SubmitTaskRequest {
        tool: a.tool.clone(),
        arguments: serde_json::to_vec(&args)?,
        idempotency_key: a
            .idempotency_key
            .unwrap_or_else(|| format!("cli-{}", uuid::Uuid::new_v4())),
        priority: a.priority,
        options: a.options.to_proto()?,
    };
    if a.no_wait {
        let resp = with_failover(&s, |mut agent| {
            let req = req.clone();
            async move { agent.submit_task(req).await.map(|r| r.into_inner()) }
        })
        .await?;
        match a.flags.output {
            Format::Json => {
                output::json(&json!({"task_id": resp.task_id, "deduplicated": resp.deduplicated}))
            }
            Format::Table => println!("{}", resp.task_id),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let people = a.flags.output == Format::Table;
    // One CallTool submits and streams. Until its first event names the task, the call is
    // made again on the next hub (the idempotency key makes that safe).
    let (first, mut events) = with_failover(&s, |mut agent| {
        let req = req.clone();
        async move {
            let mut events = agent.call_tool(req).await?.into_inner();
            match events.message().await? {
                Some(ev) => Ok((ev, events)),
                None => Err(Status::unavailable(
                    "the hub ended the call before its first event",
                )),
            }
        }
    })
    .await?;
    let task_id = first.task_id.clone();
    if people {
        eprintln!("task {task_id} submitted");
    }
    let mut last = first;
    loop {
        if people {
            print_event(&last);
        }
        if last.is_terminal() {
            break;
        }
        match events.message().await {
            Ok(Some(ev)) => last = ev,
            // The hub went away mid-call: the rest comes from a watch, below.
            Ok(None) => break,
            Err(st) if st.code() == tonic::Code::Unavailable => break,
            Err(st) => return Err(status_error(st)),
        }
    }
    let mut agent = agent_client(&s)?;
    if !last.is_terminal() {
        watch_until_done(&mut agent, &task_id, last.seq + 1, people).await?;
    }
    let final_task = task_now(&mut agent, &task_id).await?;
    print_result(&final_task, a.flags.output);
    Ok(exit_for(&final_task))
}

fn exit_for(t: &pb::Task) -> ExitCode {
    if t.state == pb::TaskState::Succeeded as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Reads a resumable event stream until `on` says the end was seen: `open(from)` opens it
/// from sequence number `from`, `on(event)` returns the event's number and whether it was the
/// last. A stream broken by an unavailable hub (a failover) is reopened after the last
/// number seen.
pub(crate) async fn follow_events<E, Open, Fut>(
    mut from: u64,
    mut open: Open,
    mut on: impl FnMut(&E) -> (u64, bool),
) -> anyhow::Result<()>
where
    Open: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<tonic::Streaming<E>>, Status>>,
{
    let mut failures = 0;
    loop {
        let mut stream = match open(from).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && failures < 30 => {
                failures += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            Err(s) => return Err(status_error(s)),
        };
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    let (seq, last) = on(&ev);
                    from = seq + 1;
                    if last {
                        return Ok(());
                    }
                }
                Ok(None) => break,
                Err(s) if s.code() == tonic::Code::Unavailable && failures < 30 => {
                    failures += 1;
                    break;
                }
                Err(s) => return Err(status_error(s)),
            }
        }
    }
}

/// Follows a task's events from `from` until it ends.
async fn watch_until_done(
    agent: &mut Agent,
    task_id: &str,
    from: u64,
    people: bool,
) -> anyhow::Result<()> {
    let watcher = agent.clone();
    follow_events(
        from,
        |from| {
            let mut a = watcher.clone();
            let task_id = task_id.to_owned();
            async move {
                a.watch_task(pb::WatchTaskRequest {
                    task_id,
                    from_seq: from,
                })
                .await
            }
        },
        |ev: &pb::TaskEvent| {
            if people {
                print_event(ev);
            }
            (ev.seq, ev.is_terminal())
        },
    )
    .await
}

async fn task_now(agent: &mut Agent, task_id: &str) -> anyhow::Result<pb::Task> {
    agent
        .get_task(pb::GetTaskRequest {
            task_id: task_id.to_owned(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

fn print_event(ev: &pb::TaskEvent) {
    let kind = pb::EventKind::try_from(ev.kind).unwrap_or_default();
    match kind {
        pb::EventKind::Progress => {
            let total = ev.total.map(|t| format!("/{t}")).unwrap_or_default();
            let msg = if ev.message.is_empty() {
                String::new()
            } else {
                format!(" {}", ev.message)
            };
            eprintln!("  progress {}{total}{msg}", ev.progress);
        }
        pb::EventKind::Assigned => {
            eprintln!("  assigned to {} (attempt {})", ev.node_id, ev.attempt)
        }
        pb::EventKind::Queued if !ev.message.is_empty() => {
            eprintln!("  queued again: {}", ev.message)
        }
        _ => eprintln!("  {}", ev.kind().name()),
    }
}

fn json_bytes(b: &[u8]) -> Value {
    if b.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into_owned()))
    }
}

pub(crate) fn task_json(t: &pb::Task) -> Value {
    json!({
        "id": t.id,
        "tool": t.tool,
        "tenant": t.tenant,
        "agent": t.agent,
        "state": t.state().name(),
        "arguments": json_bytes(&t.arguments),
        "result": json_bytes(&t.result),
        "error": if t.error.is_empty() { Value::Null } else { Value::String(t.error.clone()) },
        "pending_reason": if t.pending_reason.is_empty() { Value::Null } else { Value::String(t.pending_reason.clone()) },
        "priority": t.priority,
        "idempotency_key": if t.idempotency_key.is_empty() { Value::Null } else { Value::String(t.idempotency_key.clone()) },
        "created_at": output::time(t.created_at_ms),
        "updated_at": output::time(t.updated_at_ms),
        "attempts": t.attempts.iter().map(|a| json!({
            "number": a.number,
            "node": a.node_id,
            "server": a.server,
            "fence": a.fence,
            "assigned_at": output::time(a.assigned_at_ms),
            "finished_at": output::time(a.finished_at_ms),
            "error": if a.error.is_empty() { Value::Null } else { Value::String(a.error.clone()) },
        })).collect::<Vec<_>>(),
        "dead_lettered": t.dead_lettered,
        "replicas": t.replicas.iter().map(|r| json!({
            "task_id": r.task_id,
            "state": r.state().name(),
            "node": r.node_id,
            "result": json_bytes(&r.result),
            "error": if r.error.is_empty() { Value::Null } else { Value::String(r.error.clone()) },
            "agreed": r.agreed,
        })).collect::<Vec<_>>(),
        "parent_id": if t.parent_id.is_empty() { Value::Null } else { Value::String(t.parent_id.clone()) },
        "workflow_id": if t.workflow_id.is_empty() { Value::Null } else { Value::String(t.workflow_id.clone()) },
        "step": if t.step.is_empty() { Value::Null } else { Value::String(t.step.clone()) },
    })
}

/// The text a person wants from a task's result.
fn result_text(t: &pb::Task) -> String {
    text_of(&json_bytes(&t.result))
}

/// The text a person wants from a CallToolResult: its text blocks, else its JSON.
pub(crate) fn text_of(r: &Value) -> String {
    let texts: Vec<&str> = r
        .get("content")
        .and_then(Value::as_array)
        .map(|c| {
            c.iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    if !texts.is_empty() {
        texts.join("\n")
    } else if r.is_null() {
        String::new()
    } else {
        serde_json::to_string_pretty(r).unwrap_or_default()
    }
}

fn print_result(t: &pb::Task, format: Format) {
    match format {
        Format::Json => output::json(&task_json(t)),
        Format::Table => {
            let text = result_text(t);
            if t.state == pb::TaskState::Succeeded as i32 {
                println!("{text}");
            } else {
                eprintln!("task {} {}", t.id, t.state().name());
                if !t.error.is_empty() {
                    eprintln!("error: {}", t.error);
                }
                if !text.is_empty() {
                    eprintln!("{text}");
                }
            }
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum TaskCommand {
    /// Show one task.
    Get {
        id: String,
        #[command(flatten)]
        flags: ClientFlags,
    },
    /// List your tenant's tasks, newest first.
    List {
        /// Only these states (queued, assigned, running, succeeded, failed, cancelled, lost).
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only dead letters: tasks that failed or were lost after their last attempt.
        #[arg(long)]
        dead: bool,
        #[command(flatten)]
        flags: ClientFlags,
    },
    /// Follow a task's events until it ends.
    Watch {
        id: String,
        #[command(flatten)]
        flags: ClientFlags,
    },
    /// Cancel a task.
    Cancel {
        id: String,
        #[command(flatten)]
        flags: ClientFlags,
    },
    /// Cancel every unfinished task of a tenant (admin, emergency control).
    CancelAll {
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        flags: ClientFlags,
    },
}

fn parse_state(s: &str) -> anyhow::Result<pb::TaskState> {
    Ok(match s {
        "queued" => pb::TaskState::Queued,
        "assigned" => pb::TaskState::Assigned,
        "running" => pb::TaskState::Running,
        "succeeded" => pb::TaskState::Succeeded,
        "failed" => pb::TaskState::Failed,
        "cancelled" => pb::TaskState::Cancelled,
        "lost" => pb::TaskState::Lost,
        other => bail!("unknown state {other:?}: use queued, assigned, running, succeeded, failed, cancelled or lost"),
    })
}

fn task_row(t: &pb::Task) -> Vec<String> {
    let node = t
        .attempts
        .last()
        .map(|a| a.node_id.clone())
        .unwrap_or_else(|| "-".into());
    vec![
        t.id.clone(),
        t.tool.clone(),
        t.state().name().into(),
        node,
        output::time(t.created_at_ms),
        if t.pending_reason.is_empty() {
            t.error.clone()
        } else {
            t.pending_reason.clone()
        },
    ]
}

pub(crate) async fn task(cmd: TaskCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TaskCommand::Get { id, flags } => {
            let t = agent_client(&settings(&flags)?)?
                .get_task(pb::GetTaskRequest { task_id: id })
                .await
                .map_err(status_error)?
                .into_inner();
            match flags.output {
                Format::Json => output::json(&task_json(&t)),
                Format::Table => {
                    output::table(
                        &["ID", "TOOL", "STATE", "NODE", "CREATED", "NOTE"],
                        &[task_row(&t)],
                    );
                    let text = result_text(&t);
                    if !text.is_empty() {
                        println!("\n{text}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::List {
            state,
            limit,
            dead,
            flags,
        } => {
            let states = state
                .iter()
                .map(|s| parse_state(s).map(|s| s as i32))
                .collect::<anyhow::Result<_>>()?;
            let tasks = agent_client(&settings(&flags)?)?
                .list_tasks(pb::ListTasksRequest {
                    states,
                    limit,
                    dead_lettered: dead,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .tasks;
            match flags.output {
                Format::Json => output::json(&Value::Array(tasks.iter().map(task_json).collect())),
                Format::Table => output::table(
                    &["ID", "TOOL", "STATE", "NODE", "CREATED", "NOTE"],
                    &tasks.iter().map(task_row).collect::<Vec<_>>(),
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Watch { id, flags } => {
            let mut agent = agent_client(&settings(&flags)?)?;
            watch_until_done(&mut agent, &id, 1, true).await?;
            let t = task_now(&mut agent, &id).await?;
            print_result(&t, flags.output);
            Ok(exit_for(&t))
        }
        TaskCommand::CancelAll { tenant, flags } => {
            let r = admin_client(&settings(&flags)?)?
                .cancel_tenant_tasks(pb::CancelTenantTasksRequest {
                    tenant: tenant.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            match flags.output {
                Format::Json => output::json(&json!({"tenant": tenant, "cancelled": r.task_ids})),
                Format::Table => {
                    println!("cancelled {} task(s) of tenant {tenant}", r.task_ids.len())
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Cancel { id, flags } => {
            let t = agent_client(&settings(&flags)?)?
                .cancel_task(pb::CancelTaskRequest { task_id: id })
                .await
                .map_err(status_error)?
                .into_inner();
            match flags.output {
                Format::Json => output::json(&task_json(&t)),
                Format::Table => println!("task {} {}", t.id, t.state().name()),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Args)]
pub(crate) struct ToolsArgs {
    #[command(subcommand)]
    action: Option<ToolsAction>,
    #[command(flatten)]
    flags: ClientFlags,
}

#[derive(Subcommand)]
pub(crate) enum ToolsAction {
    /// Make a tool name a node introduced usable (a node that joined without a
    /// `--may-add-tools` token cannot make new names usable itself).
    Accept { name: String },
}

pub(crate) async fn tools_command(a: ToolsArgs) -> anyhow::Result<ExitCode> {
    let Some(ToolsAction::Accept { name }) = a.action else {
        return tools(a.flags).await;
    };
    let r = admin_client(&settings(&a.flags)?)?
        .accept_tool(pb::AcceptToolRequest { name })
        .await
        .map_err(status_error)?
        .into_inner();
    match a.flags.output {
        Format::Json => output::json(&json!({
            "name": r.name,
            "first_seen_node": r.first_seen_node,
            "required_scope": r.required_scope,
        })),
        Format::Table => println!(
            "tool {} (introduced by {}, scope {}) is accepted",
            r.name, r.first_seen_node, r.required_scope
        ),
    }
    Ok(ExitCode::SUCCESS)
}

async fn tools(flags: ClientFlags) -> anyhow::Result<ExitCode> {
    let tools = agent_client(&settings(&flags)?)?
        .list_tools(pb::ListToolsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .tools;
    match flags.output {
        Format::Json => output::json(&Value::Array(
            tools
                .iter()
                .map(|t| {
                    json!({
                        "name": t.name,
                        "description": t.description,
                        "input_schema": json_bytes(&t.input_schema),
                        "required_scope": t.required_scope,
                        "read_only": t.read_only,
                        "idempotent": t.idempotent,
                        "destructive": t.destructive,
                        "accepted": t.accepted,
                        "nodes": t.nodes,
                        "stats": t.stats.as_ref().map(|s| json!({
                            "calls": s.calls,
                            "succeeded": s.succeeded,
                            "failed": s.failed,
                            "estimated_duration_ms": s.estimated_duration_ms,
                        })),
                        "node_stats": t.node_stats.iter().map(|n| {
                            let s = n.stats.unwrap_or_default();
                            json!({"node": n.node_id, "calls": s.calls, "succeeded": s.succeeded, "failed": s.failed, "estimated_duration_ms": s.estimated_duration_ms})
                        }).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        )),
        Format::Table => output::table(
            &["TOOL", "SCOPE", "NODES", "CALLS", "OK%", "EST", "DESCRIPTION"],
            &tools
                .iter()
                .map(|t| {
                    let s = t.stats.unwrap_or_default();
                    vec![
                        if t.accepted {
                            t.name.clone()
                        } else {
                            format!("{} (not accepted)", t.name)
                        },
                        t.required_scope.clone(),
                        if t.nodes.is_empty() {
                            "-".into()
                        } else {
                            t.nodes.join(",")
                        },
                        s.calls.to_string(),
                        if s.calls == 0 { "-".into() } else { format!("{:.0}", 100.0 * s.succeeded as f64 / s.calls as f64) },
                        if s.calls == 0 { "-".into() } else { format!("{}ms", s.estimated_duration_ms) },
                        t.description.lines().next().unwrap_or_default().to_owned(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub(crate) struct NodesArgs {
    #[command(subcommand)]
    action: Option<NodesAction>,
    #[command(flatten)]
    flags: ClientFlags,
}

#[derive(Subcommand)]
pub(crate) enum NodesAction {
    /// No new work for the node; running tasks go on.
    Cordon { node: String },
    /// Ready for work again.
    Uncordon { node: String },
    /// No new work; running tasks may finish until the deadline, then read-only or idempotent
    /// ones run again elsewhere and the others are cancelled.
    Drain {
        node: String,
        /// Seconds running tasks may go on.
        #[arg(long, default_value_t = 300)]
        deadline: u64,
    },
}

pub(crate) async fn nodes_command(a: NodesArgs) -> anyhow::Result<ExitCode> {
    let Some(action) = a.action else {
        return nodes(a.flags).await;
    };
    let mut admin = admin_client(&settings(&a.flags)?)?;
    let r = match action {
        NodesAction::Cordon { node } => admin.cordon_node(pb::NodeRequest { node_id: node }).await,
        NodesAction::Uncordon { node } => {
            admin.uncordon_node(pb::NodeRequest { node_id: node }).await
        }
        NodesAction::Drain { node, deadline } => {
            admin
                .drain_node(pb::DrainNodeRequest {
                    node_id: node,
                    deadline_seconds: deadline,
                })
                .await
        }
    }
    .map_err(status_error)?
    .into_inner();
    match a.flags.output {
        Format::Json => output::json(&json!({"node": r.node_id, "status": r.status})),
        Format::Table => println!("node {} is {}", r.node_id, r.status),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub(crate) enum SchedulingCommand {
    /// Stop placing tasks (queued tasks wait; running ones go on).
    Pause(crate::ClientOnly),
    /// Place tasks again.
    Resume(crate::ClientOnly),
}

pub(crate) async fn scheduling(cmd: SchedulingCommand) -> anyhow::Result<ExitCode> {
    let (paused, c) = match cmd {
        SchedulingCommand::Pause(c) => (true, c),
        SchedulingCommand::Resume(c) => (false, c),
    };
    let r = admin_client(&settings(&c.flags)?)?
        .set_scheduling_paused(pb::SetSchedulingPausedRequest { paused })
        .await
        .map_err(status_error)?
        .into_inner();
    match c.flags.output {
        Format::Json => output::json(&json!({"paused": r.paused})),
        Format::Table => println!("scheduling {}", if r.paused { "paused" } else { "running" }),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn nodes(flags: ClientFlags) -> anyhow::Result<ExitCode> {
    let nodes = admin_client(&settings(&flags)?)?
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .nodes;
    match flags.output {
        Format::Json => output::json(&Value::Array(
            nodes
                .iter()
                .map(|n| {
                    json!({
                        "id": n.id,
                        "labels": n.labels,
                        "zone": n.labels.get("zone"),
                        "region": n.labels.get("region"),
                        "status": n.status,
                        "connected": n.connected,
                        "cpu_percent": n.cpu_percent,
                        "running": n.running,
                        "joined_at": output::time(n.joined_at_ms),
                        "last_seen": output::time(n.last_seen_ms),
                        "servers": n.servers.iter().map(|s| json!({
                            "name": s.name,
                            "state": s.state,
                            "max_concurrency": s.max_concurrency,
                            "running": s.running,
                            "tools": s.tools,
                            "error": if s.error.is_empty() { Value::Null } else { Value::String(s.error.clone()) },
                            "breaker": s.breaker,
                            "consecutive_failures": s.consecutive_failures,
                        })).collect::<Vec<_>>(),
                        "tenants": n.tenants,
                    })
                })
                .collect(),
        )),
        Format::Table => output::table(
            &["NODE", "STATUS", "CONNECTED", "ZONE", "CPU%", "RUNNING", "SERVERS"],
            &nodes
                .iter()
                .map(|n| {
                    vec![
                        n.id.clone(),
                        n.status.clone(),
                        if n.connected { "yes" } else { "no" }.into(),
                        n.labels.get("zone").cloned().unwrap_or_else(|| "-".into()),
                        format!("{:.0}", n.cpu_percent),
                        n.running.to_string(),
                        n.servers
                            .iter()
                            .map(|s| {
                                let breaker = if s.breaker == "closed" || s.breaker.is_empty() {
                                    String::new()
                                } else {
                                    format!(" breaker {}", s.breaker)
                                };
                                format!("{}({} {}/{}{breaker})", s.name, s.state, s.running, s.max_concurrency)
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub(crate) enum ClusterCommand {
    /// Members, leader, term, log indexes and replication lag.
    Status(crate::ClientOnly),
    /// Add a hub: it joins as a learner, catches up from the log or a snapshot, then votes.
    AddHub {
        /// The new hub's id (its `id` in hub.toml).
        #[arg(long)]
        id: u64,
        /// Where agents and nodes reach it, https://HOST:PORT.
        #[arg(long)]
        api: String,
        /// Where hubs reach its Raft port, https://HOST:PORT.
        #[arg(long)]
        raft: String,
        #[command(flatten)]
        flags: ClientFlags,
    },
    /// Remove a hub from the cluster.
    RemoveHub {
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        flags: ClientFlags,
    },
}

pub(crate) async fn cluster(cmd: ClusterCommand) -> anyhow::Result<ExitCode> {
    let (st, format) = match cmd {
        ClusterCommand::Status(c) => (
            admin_client(&settings(&c.flags)?)?
                .cluster_status(pb::ClusterStatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner(),
            c.flags.output,
        ),
        ClusterCommand::AddHub {
            id,
            api,
            raft,
            flags,
        } => (
            admin_client(&settings(&flags)?)?
                .add_hub(pb::AddHubRequest {
                    id,
                    api_address: api,
                    raft_address: raft,
                })
                .await
                .map_err(status_error)?
                .into_inner(),
            flags.output,
        ),
        ClusterCommand::RemoveHub { id, flags } => (
            admin_client(&settings(&flags)?)?
                .remove_hub(pb::RemoveHubRequest { id })
                .await
                .map_err(status_error)?
                .into_inner(),
            flags.output,
        ),
    };
    print_status(&st, format);
    Ok(ExitCode::SUCCESS)
}

fn print_status(st: &pb::ClusterStatusResponse, format: Format) {
    match format {
        Format::Json => output::json(&json!({
            "leader_id": st.leader_id,
            "term": st.term,
            "last_log_index": st.last_log_index,
            "commit_index": st.commit_index,
            "applied_index": st.applied_index,
            "this_hub": st.this_hub,
            "members": st.members.iter().map(|m| json!({
                "id": m.id,
                "address": m.address,
                "raft_address": m.raft_address,
                "role": m.role,
                "matched_index": m.matched_index,
                "lag": m.lag,
            })).collect::<Vec<_>>(),
        })),
        Format::Table => {
            println!(
                "leader {}  term {}  last log {}  applied {}  (answered by hub {})",
                st.leader_id, st.term, st.last_log_index, st.applied_index, st.this_hub
            );
            output::table(
                &["HUB", "ROLE", "ADDRESS", "RAFT ADDRESS", "MATCHED", "LAG"],
                &st.members
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.to_string(),
                            m.role.clone(),
                            m.address.clone(),
                            m.raft_address.clone(),
                            m.matched_index.to_string(),
                            m.lag.to_string(),
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a join token for new nodes.
    Create {
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        #[arg(long, default_value = "")]
        description: String,
        /// Nodes joining with it may introduce tool names the cluster has not seen
        /// (others' new names wait for `flotilla tools accept`).
        #[arg(long)]
        may_add_tools: bool,
        #[command(flatten)]
        flags: ClientFlags,
    },
}

pub(crate) async fn token(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    let TokenCommand::Create {
        ttl,
        uses,
        description,
        may_add_tools,
        flags,
    } = cmd;
    let r = admin_client(&settings(&flags)?)?
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl_seconds: ttl,
            uses,
            description,
            may_add_tools,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    match flags.output {
        Format::Json => output::json(&json!({
            "token": r.token, "token_id": r.token_id, "expires_at": output::time(r.expires_at_ms), "ca_pin": r.ca_pin,
        })),
        Format::Table => println!("{}", r.token),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub(crate) enum AgentTokenCommand {
    /// Issue a JWT for an agent.
    Issue {
        #[arg(long)]
        subject: String,
        /// Comma-separated scopes, e.g. tools,admin or tools:*
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        #[arg(long, default_value = flotilla_common::jwt::DEFAULT_TENANT)]
        tenant: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
        /// Where the agent runs: its tasks prefer nodes in this region...
        #[arg(long, default_value = "")]
        region: String,
        /// ...and, more, in this zone.
        #[arg(long, default_value = "")]
        zone: String,
        #[command(flatten)]
        flags: ClientFlags,
    },
}

pub(crate) async fn agent_token(cmd: AgentTokenCommand) -> anyhow::Result<ExitCode> {
    let AgentTokenCommand::Issue {
        subject,
        scopes,
        tenant,
        ttl,
        region,
        zone,
        flags,
    } = cmd;
    let r = admin_client(&settings(&flags)?)?
        .issue_agent_token(pb::IssueAgentTokenRequest {
            subject,
            tenant,
            scopes,
            ttl_seconds: ttl,
            region,
            zone,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    match flags.output {
        Format::Json => {
            output::json(&json!({"token": r.token, "expires_at": output::time(r.expires_at_ms)}))
        }
        Format::Table => println!("{}", r.token),
    }
    Ok(ExitCode::SUCCESS)
}
