//! How a task runs, from flags or a workflow file, and the `workflow` commands.
//!
//! A workflow file (YAML or JSON) looks like:
//!
//! ```yaml
//! name: report
//! on_failure: fail_fast        # or continue
//! steps:
//!   - name: fetch
//!     tool: echo
//!     args: {text: "42"}
//!   - name: left
//!     tool: hash
//!     depends_on: [fetch]
//!     args: {text: "${steps.fetch.text}"}
//!     retry: {max_attempts: 3, on: [tool_error, timeout]}
//!     timeouts: {attempt_ms: 5000}
//!     placement: {zone: a, require: {gpu: "yes"}}
//!     replicas: 3
//!     aggregate: majority
//! ```

use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context};
use clap::Subcommand;
use flotilla_proto as pb;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    connect::{agent_client, settings, status_error},
    options::{Options, Place, Retry, Timeouts},
    output::{self, Format},
    ClientFlags,
};
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    name: String,
    tool: String,
    #[serde(default)]
    args: Option<Value>,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    retry: Option<Retry>,
    #[serde(default)]
    timeouts: Option<Timeouts>,
    #[serde(default)]
    placement: Option<Place>,
    #[serde(default)]
    replicas: u32,
    #[serde(default)]
    aggregate: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowFile {
    #[serde(default)]
    name: String,
    /// fail_fast (default) or continue
    #[serde(default)]
    on_failure: Option<String>,
    steps: Vec<StepFile>,
}

/// Reads a workflow file (YAML, of which JSON is a subset) into a request.
pub(crate) fn read_workflow(path: &std::path::Path) -> anyhow::Result<pb::SubmitWorkflowRequest> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let f: WorkflowFile = serde_norway::from_str(&text)
        .with_context(|| format!("{} is not a valid workflow file", path.display()))?;
    let failure_policy = match f.on_failure.as_deref() {
        None | Some("fail_fast") => pb::FailurePolicy::FailFast,
        Some("continue") => pb::FailurePolicy::Continue,
        Some(other) => bail!("on_failure {other:?}: use fail_fast or continue"),
    } as i32;
    let steps = f
        .steps
        .into_iter()
        .map(|s| {
            let args = s.args.unwrap_or_else(|| json!({}));
            let options = Options {
                retry: s.retry,
                timeouts: s.timeouts,
                placement: s.placement,
                replicas: s.replicas,
                aggregate: s.aggregate,
            };
            Ok(pb::StepSpec {
                options: options
                    .to_proto()
                    .with_context(|| format!("step {:?}", s.name))?,
                name: s.name,
                tool: s.tool,
                arguments: serde_json::to_vec(&args)?,
                depends_on: s.depends_on,
                priority: s.priority,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(pb::SubmitWorkflowRequest {
        name: if f.name.is_empty() {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            f.name
        },
        steps,
        failure_policy,
        idempotency_key: String::new(),
    })
}

#[derive(Subcommand)]
pub(crate) enum WorkflowCommand {
    /// Submit a workflow from a YAML or JSON file and follow it to the end.
    Run {
        file: PathBuf,
        /// Resubmitting with the same key returns the first workflow.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Print the workflow id and return without waiting.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        flags: ClientFlags,
    },
    /// Show a workflow and its steps.
    Get {
        id: String,
        #[command(flatten)]
        flags: ClientFlags,
    },
    /// Follow a workflow's step events until it ends.
    Watch {
        id: String,
        #[command(flatten)]
        flags: ClientFlags,
    },
    /// Cancel a workflow: running steps are cancelled, the rest skipped.
    Cancel {
        id: String,
        #[command(flatten)]
        flags: ClientFlags,
    },
}

fn step_state(s: i32) -> &'static str {
    match pb::StepState::try_from(s).unwrap_or_default() {
        pb::StepState::Unspecified => "unknown",
        pb::StepState::Pending => "pending",
        pb::StepState::Queued => "queued",
        pb::StepState::Running => "running",
        pb::StepState::Succeeded => "succeeded",
        pb::StepState::Failed => "failed",
        pb::StepState::Skipped => "skipped",
        pb::StepState::Cancelled => "cancelled",
    }
}

fn workflow_state(s: i32) -> &'static str {
    match pb::WorkflowState::try_from(s).unwrap_or_default() {
        pb::WorkflowState::Unspecified => "unknown",
        pb::WorkflowState::Running => "running",
        pb::WorkflowState::Succeeded => "succeeded",
        pb::WorkflowState::Failed => "failed",
        pb::WorkflowState::Cancelled => "cancelled",
    }
}

fn json_or_null(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or(Value::Null)
}

fn workflow_json(w: &pb::Workflow) -> Value {
    json!({
        "id": w.id,
        "name": w.name,
        "state": workflow_state(w.state),
        "error": w.error,
        "steps": w.steps.iter().map(|s| json!({
            "name": s.name,
            "tool": s.tool,
            "state": step_state(s.state),
            "depends_on": s.depends_on,
            "task_id": s.task_id,
            "arguments": json_or_null(&s.arguments),
            "result": json_or_null(&s.result),
            "error": s.error,
        })).collect::<Vec<_>>(),
    })
}

fn print_workflow(w: &pb::Workflow, format: Format) {
    match format {
        Format::Json => output::json(&workflow_json(w)),
        Format::Table => {
            outln!("workflow {} ({}) {}", w.id, w.name, workflow_state(w.state));
            if !w.error.is_empty() {
                outln!("{}", w.error);
            }
            output::table(
                &["STEP", "TOOL", "STATE", "TASK", "RESULT / ERROR"],
                &w.steps
                    .iter()
                    .map(|s| {
                        let text = serde_json::from_slice::<Value>(&s.result)
                            .ok()
                            .map(|r| crate::call::text_of(&r))
                            .unwrap_or_default();
                        vec![
                            s.name.clone(),
                            s.tool.clone(),
                            step_state(s.state).into(),
                            s.task_id.clone(),
                            if s.error.is_empty() {
                                text
                            } else {
                                s.error.clone()
                            },
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
        }
    }
}

/// 0 when the workflow succeeded, 1 otherwise.
fn exit_for(w: &pb::Workflow) -> ExitCode {
    output::exit_code(w.state() == pb::WorkflowState::Succeeded)
}

/// Follows a workflow's events (printing them for people) until it ends; returns it.
async fn follow(
    agent: &mut crate::connect::Agent,
    id: &str,
    people: bool,
) -> anyhow::Result<pb::Workflow> {
    let watcher = agent.clone();
    crate::connect::follow_events(
        0,
        |from| {
            let mut a = watcher.clone();
            let workflow_id = id.to_owned();
            async move {
                a.watch_workflow(pb::WatchWorkflowRequest {
                    workflow_id,
                    from_seq: from,
                })
                .await
            }
        },
        |ev: &pb::WorkflowEvent| {
            let last = ev.step.is_empty();
            if people && !last {
                let note = if ev.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", ev.error)
                };
                eprintln!("step {} {}{note}", ev.step, step_state(ev.step_state));
            }
            (ev.seq, last)
        },
    )
    .await?;
    agent
        .get_workflow(pb::GetWorkflowRequest {
            workflow_id: id.to_owned(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

pub(crate) async fn workflow(cmd: WorkflowCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkflowCommand::Run {
            file,
            idempotency_key,
            no_wait,
            flags,
        } => {
            let mut req = read_workflow(&file)?;
            // A key of its own makes the submission safe to repeat on another hub.
            req.idempotency_key =
                idempotency_key.unwrap_or_else(|| format!("cli-{}", uuid::Uuid::new_v4()));
            let s = settings(&flags)?;
            let mut agent = agent_client(&s)?;
            let r = crate::connect::with_failover(&s, |mut agent| {
                let req = req.clone();
                async move { agent.submit_workflow(req).await.map(|r| r.into_inner()) }
            })
            .await?;
            if no_wait {
                match flags.output {
                    Format::Json => output::json(
                        &json!({"workflow_id": r.workflow_id, "deduplicated": r.deduplicated}),
                    ),
                    Format::Table => outln!("{}", r.workflow_id),
                }
                return Ok(ExitCode::SUCCESS);
            }
            let people = flags.output == Format::Table;
            if people {
                eprintln!("workflow {} submitted", r.workflow_id);
            }
            let w = follow(&mut agent, &r.workflow_id, people).await?;
            print_workflow(&w, flags.output);
            Ok(exit_for(&w))
        }
        WorkflowCommand::Get { id, flags } => {
            let w = agent_client(&settings(&flags)?)?
                .get_workflow(pb::GetWorkflowRequest { workflow_id: id })
                .await
                .map_err(status_error)?
                .into_inner();
            print_workflow(&w, flags.output);
            Ok(ExitCode::SUCCESS)
        }
        WorkflowCommand::Watch { id, flags } => {
            let mut agent = agent_client(&settings(&flags)?)?;
            let w = follow(&mut agent, &id, true).await?;
            print_workflow(&w, flags.output);
            Ok(exit_for(&w))
        }
        WorkflowCommand::Cancel { id, flags } => {
            let w = agent_client(&settings(&flags)?)?
                .cancel_workflow(pb::CancelWorkflowRequest { workflow_id: id })
                .await
                .map_err(status_error)?
                .into_inner();
            print_workflow(&w, flags.output);
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_yaml_workflow_file_becomes_a_request() {
        let dir = std::env::temp_dir().join(format!("flotilla-wf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.yaml");
        std::fs::write(
            &path,
            r#"
name: demo
on_failure: continue
steps:
  - name: a
    tool: echo
    args: {text: "hi"}
  - name: b
    tool: hash
    depends_on: [a]
    args: {text: "${steps.a.text}"}
    retry: {max_attempts: 3, on: [tool_error, timeout]}
    timeouts: {attempt_ms: 500}
    placement: {zone: z, require: {gpu: "yes"}}
    replicas: 3
    aggregate: quorum:2
"#,
        )
        .unwrap();
        let r = read_workflow(&path).unwrap();
        assert_eq!(r.name, "demo");
        assert_eq!(r.failure_policy, pb::FailurePolicy::Continue as i32);
        let b = &r.steps[1];
        assert_eq!(b.depends_on, vec!["a".to_string()]);
        let o = b.options.as_ref().unwrap();
        assert_eq!(o.replicas, 3);
        assert_eq!(
            (o.aggregation, o.quorum),
            (pb::Aggregation::Quorum as i32, 2)
        );
        assert_eq!(o.retry.as_ref().unwrap().retry_on.len(), 2);
        assert_eq!(o.deadlines.as_ref().unwrap().attempt_timeout_ms, 500);
        assert_eq!(o.placement.as_ref().unwrap().required_labels["gpu"], "yes");
        assert!(r.steps[0].options.is_none());
        std::fs::write(
            &path,
            "steps:\n  - name: a\n    tool: echo\n    colour: red\n",
        )
        .unwrap();
        let e = format!("{:#}", read_workflow(&path).unwrap_err());
        assert!(e.contains("colour"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
