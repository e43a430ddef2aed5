//! `flotilla tools`: the catalogue, and accepting a node's new tools.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use flotilla_proto as pb;
use serde_json::{json, Value};

use crate::{
    call::json_bytes,
    connect::{admin_client, agent_client, settings, status_error},
    output::{self, Format},
    ClientFlags,
};

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
        Format::Table => outln!(
            "tool {} (introduced by {}, scope {}) is accepted",
            r.name,
            r.first_seen_node,
            r.required_scope
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
