//! `flotilla call`: one tool call, streamed to its end; and how a task is shown.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use flotilla_proto as pb;
use serde_json::{json, Value};
use tonic::Status;

use crate::{
    connect::{agent_client, follow_events, settings, status_error, with_failover, Agent},
    output::{self, Format},
    progress::Progress,
    ClientFlags,
};

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
    options: crate::options::OptionFlags,
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
            Format::Table => outln!("{}", resp.task_id),
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
    let progress = Progress::new(people);
    let mut last = first;
    loop {
        progress.event(&last);
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
        watch_until_done(&mut agent, &task_id, last.seq + 1, &progress).await?;
    }
    progress.finish();
    let final_task = task_now(&mut agent, &task_id).await?;
    print_result(&final_task, a.flags.output);
    Ok(exit_for(&final_task))
}

/// 0 when the task succeeded, 1 otherwise.
pub(crate) fn exit_for(t: &pb::Task) -> ExitCode {
    output::exit_code(t.state() == pb::TaskState::Succeeded)
}

/// Follows a task's events from `from` until it ends.
pub(crate) async fn watch_until_done(
    agent: &mut Agent,
    task_id: &str,
    from: u64,
    progress: &Progress,
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
            progress.event(ev);
            (ev.seq, ev.is_terminal())
        },
    )
    .await
}

pub(crate) async fn task_now(agent: &mut Agent, task_id: &str) -> anyhow::Result<pb::Task> {
    agent
        .get_task(pb::GetTaskRequest {
            task_id: task_id.to_owned(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

pub(crate) fn json_bytes(b: &[u8]) -> Value {
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
pub(crate) fn result_text(t: &pb::Task) -> String {
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

pub(crate) fn print_result(t: &pb::Task, format: Format) {
    match format {
        Format::Json => output::json(&task_json(t)),
        Format::Table => {
            let text = result_text(t);
            if t.state == pb::TaskState::Succeeded as i32 {
                outln!("{text}");
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
