//! `flotilla task`: get, list, watch and cancel tasks.

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use flotilla_proto as pb;
use serde_json::{json, Value};

use crate::{
    call::{exit_for, print_result, result_text, task_json, task_now, watch_until_done},
    connect::{admin_client, agent_client, settings, status_error},
    output::{self, Format},
    ClientFlags,
};

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
                        outln!("\n{text}");
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
            let progress =
                crate::progress::Progress::new(flags.output == crate::output::Format::Table);
            watch_until_done(&mut agent, &id, 1, &progress).await?;
            progress.finish();
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
                    outln!("cancelled {} task(s) of tenant {tenant}", r.task_ids.len())
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
                Format::Table => outln!("task {} {}", t.id, t.state().name()),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
