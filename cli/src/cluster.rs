//! `flotilla cluster`: status and membership of the hub group.

use std::process::ExitCode;

use clap::Subcommand;
use flotilla_proto as pb;
use serde_json::json;

use crate::{
    connect::{admin_client, settings, status_error},
    output::{self, Format},
    ClientFlags,
};

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
            "command_level": st.command_level,
            "members": st.members.iter().map(|m| json!({
                "command_level": m.command_level,
                "version": m.version,
                "id": m.id,
                "address": m.address,
                "raft_address": m.raft_address,
                "http_address": m.http_address,
                "role": m.role,
                "matched_index": m.matched_index,
                "lag": m.lag,
            })).collect::<Vec<_>>(),
        })),
        Format::Table => {
            outln!(
                "leader {}  term {}  last log {}  applied {}  command level {}  (answered by hub {})",
                st.leader_id,
                st.term,
                st.last_log_index,
                st.applied_index,
                st.command_level,
                st.this_hub
            );
            output::table(
                &[
                    "HUB",
                    "ROLE",
                    "ADDRESS",
                    "RAFT ADDRESS",
                    "MATCHED",
                    "LAG",
                    "VERSION",
                    "LEVEL",
                ],
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
                            m.version.clone(),
                            if m.command_level == 0 {
                                "?".to_owned()
                            } else {
                                m.command_level.to_string()
                            },
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
        }
    }
}
