//! `flotilla token` and `flotilla agent-token`: join tokens for nodes, tokens for agents.

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
