//! `flotilla nodes` and `flotilla scheduling`: the fleet and operator controls.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use flotilla_proto as pb;
use serde_json::{json, Value};

use crate::{
    connect::{admin_client, settings, status_error},
    output::{self, Format},
    ClientFlags,
};

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
    /// Remove the node for good: its certificate stops working on every hub at once, its
    /// unfinished tasks go as when a node is lost, and it comes back only by joining again
    /// with a new token (a lost or stolen machine).
    Remove { node: String },
}

pub(crate) async fn nodes_command(a: NodesArgs) -> anyhow::Result<ExitCode> {
    let Some(action) = a.action else {
        return nodes(a.flags).await;
    };
    let mut admin = admin_client(&settings(&a.flags)?)?;
    if let NodesAction::Remove { node } = action {
        let r = admin
            .remove_node(pb::NodeRequest { node_id: node })
            .await
            .map_err(status_error)?
            .into_inner();
        match a.flags.output {
            Format::Json => output::json(
                &json!({"node": r.node_id, "removed": true, "requeued": r.requeued, "lost": r.lost}),
            ),
            Format::Table => outln!(
                "node {} removed: {} of its tasks run again elsewhere, {} ended lost",
                r.node_id,
                r.requeued.len(),
                r.lost.len()
            ),
        }
        return Ok(ExitCode::SUCCESS);
    }
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
        NodesAction::Remove { .. } => unreachable!("handled above"),
    }
    .map_err(status_error)?
    .into_inner();
    match a.flags.output {
        Format::Json => output::json(&json!({"node": r.node_id, "status": r.status})),
        Format::Table => outln!("node {} is {}", r.node_id, r.status),
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
        Format::Table => outln!("scheduling {}", if r.paused { "paused" } else { "running" }),
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
                        "stopping": n.stopping,
                        "http_address": n.http_address,
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
                        match (n.connected, n.stopping) {
                            (true, true) => "stopping",
                            (true, false) => "yes",
                            _ => "no",
                        }
                        .into(),
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
