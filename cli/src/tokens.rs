//! `flotilla token`, `flotilla agent-token`, `flotilla keys` and `flotilla roles`: join
//! tokens for nodes, tokens for agents, the keys that sign them and the roles they hold;
//! each made, listed, revoked or rotated.

use std::process::ExitCode;

use clap::Subcommand;
use flotilla_proto as pb;
use serde_json::json;

use crate::{
    connect::{admin_client, settings, status_error},
    output::{self, Format},
    ClientFlags, ClientOnly,
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
    /// List join tokens that have not expired (never their secrets).
    List(ClientOnly),
    /// Revoke a join token: no node may join with it any more.
    Revoke {
        /// The token's id (the third field of `flt1.PIN.ID.SECRET`; `flotilla token list` shows it).
        id: String,
        #[command(flatten)]
        flags: ClientFlags,
    },
}

pub(crate) async fn token(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    let (ttl, uses, description, may_add_tools, flags) = match cmd {
        TokenCommand::Create {
            ttl,
            uses,
            description,
            may_add_tools,
            flags,
        } => (ttl, uses, description, may_add_tools, flags),
        TokenCommand::List(c) => return list_join_tokens(c.flags).await,
        TokenCommand::Revoke { id, flags } => {
            let t = admin_client(&settings(&flags)?)?
                .revoke_join_token(pb::RevokeJoinTokenRequest { token_id: id })
                .await
                .map_err(status_error)?
                .into_inner();
            match flags.output {
                Format::Json => output::json(&join_token_json(&t)),
                Format::Table => outln!("join token {} revoked", t.token_id),
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
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
        Format::Table => outln!("{}", r.token),
    }
    Ok(ExitCode::SUCCESS)
}

fn join_token_json(t: &pb::JoinTokenInfo) -> serde_json::Value {
    json!({
        "token_id": t.token_id,
        "description": t.description,
        "uses_left": t.uses_left,
        "expires_at": output::time(t.expires_at_ms),
        "created_at": output::time(t.created_at_ms),
        "created_by": t.created_by,
        "revoked_at": (t.revoked_at_ms > 0).then(|| output::time(t.revoked_at_ms)),
        "may_add_tools": t.may_add_tools,
    })
}

async fn list_join_tokens(flags: ClientFlags) -> anyhow::Result<ExitCode> {
    let tokens = admin_client(&settings(&flags)?)?
        .list_join_tokens(pb::ListJoinTokensRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .tokens;
    match flags.output {
        Format::Json => output::json(&serde_json::Value::Array(
            tokens.iter().map(join_token_json).collect(),
        )),
        Format::Table => {
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    let state = if t.revoked_at_ms > 0 {
                        "revoked".to_owned()
                    } else if t.uses_left == 0 {
                        "used up".to_owned()
                    } else {
                        format!("{} uses left", t.uses_left)
                    };
                    vec![
                        t.token_id.clone(),
                        state,
                        output::time(t.expires_at_ms),
                        t.created_by.clone(),
                        output::printable(&t.description),
                    ]
                })
                .collect();
            output::table(&["ID", "STATE", "EXPIRES", "BY", "DESCRIPTION"], &rows);
        }
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
        /// Comma-separated roles (`flotilla roles list`), e.g. operator: their scopes as
        /// the roles say at each call.
        #[arg(long = "role", value_delimiter = ',')]
        roles: Vec<String>,
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
    /// Revoke agent tokens before they expire: one by its `jti`, or every token of a subject
    /// issued so far (tokens issued to it later work).
    Revoke {
        /// The token's `jti` claim.
        #[arg(long)]
        jti: Option<String>,
        /// The subject (`sub` claim) whose tokens go.
        #[arg(long)]
        subject: Option<String>,
        #[command(flatten)]
        flags: ClientFlags,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// A new key signs agent tokens from now on. The older keys verify the tokens they
    /// signed until none can still be valid ([agent_tokens] max_lifetime_hours).
    Rotate {
        /// The older keys stop verifying at once (a key that leaked): every token they
        /// signed is refused, the bootstrap admin tokens in the hubs' data dirs included
        /// (the hubs write new ones within a second).
        #[arg(long)]
        retire_now: bool,
        #[command(flatten)]
        flags: ClientFlags,
    },
    /// The keys that sign and verify agent tokens.
    List(ClientOnly),
}

fn key_json(k: &pb::SigningKeyInfo) -> serde_json::Value {
    json!({
        "kid": k.kid,
        "active": k.active,
        "created_at": output::time(k.created_at_ms),
        "retire_at": (k.retire_at_ms > 0).then(|| output::time(k.retire_at_ms)),
    })
}

pub(crate) async fn keys(cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCommand::Rotate { retire_now, flags } => {
            let k = admin_client(&settings(&flags)?)?
                .rotate_signing_key(pb::RotateSigningKeyRequest { retire_now })
                .await
                .map_err(status_error)?
                .into_inner();
            match flags.output {
                Format::Json => output::json(&key_json(&k)),
                Format::Table => outln!("key {} signs agent tokens from now on", k.kid),
            }
        }
        KeysCommand::List(c) => {
            let keys = admin_client(&settings(&c.flags)?)?
                .list_signing_keys(pb::ListSigningKeysRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .keys;
            match c.flags.output {
                Format::Json => output::json(&serde_json::Value::Array(
                    keys.iter().map(key_json).collect(),
                )),
                Format::Table => {
                    let rows: Vec<Vec<String>> = keys
                        .iter()
                        .map(|k| {
                            vec![
                                k.kid.clone(),
                                if k.active { "signs" } else { "verifies" }.into(),
                                output::time(k.created_at_ms),
                                if k.retire_at_ms > 0 {
                                    output::time(k.retire_at_ms)
                                } else {
                                    "-".into()
                                },
                            ]
                        })
                        .collect();
                    output::table(&["KID", "USE", "CREATED", "RETIRES"], &rows);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn agent_token(cmd: AgentTokenCommand) -> anyhow::Result<ExitCode> {
    let (subject, (scopes, roles), tenant, ttl, region, zone, flags) = match cmd {
        AgentTokenCommand::Issue {
            subject,
            scopes,
            roles,
            tenant,
            ttl,
            region,
            zone,
            flags,
        } => (subject, (scopes, roles), tenant, ttl, region, zone, flags),
        AgentTokenCommand::Revoke {
            jti,
            subject,
            flags,
        } => {
            if jti.is_none() && subject.is_none() {
                anyhow::bail!("say which tokens: --jti J (one token) or --subject S (every token of S issued so far)");
            }
            let r = admin_client(&settings(&flags)?)?
                .revoke_agent_tokens(pb::RevokeAgentTokensRequest {
                    jti: jti.clone().unwrap_or_default(),
                    subject: subject.clone().unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            match flags.output {
                Format::Json => output::json(&json!({
                    "jti": jti, "subject": subject, "kept_until": output::time(r.kept_until_ms),
                })),
                Format::Table => {
                    let what = match (&jti, &subject) {
                        (Some(j), Some(s)) => format!("token {j} and every token of {s:?}"),
                        (Some(j), None) => format!("token {j}"),
                        (None, Some(s)) => format!("every token of {s:?} issued so far"),
                        (None, None) => unreachable!("checked above"),
                    };
                    outln!("revoked {what}; refused on every hub from now on");
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let r = admin_client(&settings(&flags)?)?
        .issue_agent_token(pb::IssueAgentTokenRequest {
            subject,
            tenant,
            scopes,
            ttl_seconds: ttl,
            region,
            zone,
            roles,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    match flags.output {
        Format::Json => {
            output::json(&json!({"token": r.token, "expires_at": output::time(r.expires_at_ms)}))
        }
        Format::Table => outln!("{}", r.token),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub(crate) enum RolesCommand {
    /// Every role and the scopes it grants (the built-in viewer, operator and admin too).
    List(ClientOnly),
    /// Define a role, or change one: every token holding it may do what it says from then
    /// on.
    Set {
        name: String,
        /// Comma-separated scopes, e.g. admin:read,tools:billing
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        #[command(flatten)]
        flags: ClientFlags,
    },
    /// Delete a role: tokens holding it keep their other scopes.
    Delete {
        name: String,
        #[command(flatten)]
        flags: ClientFlags,
    },
}

fn role_json(r: &pb::RoleInfo) -> serde_json::Value {
    json!({"name": r.name, "scopes": r.scopes, "builtin": r.builtin})
}

pub(crate) async fn roles(cmd: RolesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RolesCommand::List(c) => {
            let roles = admin_client(&settings(&c.flags)?)?
                .list_roles(pb::ListRolesRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .roles;
            match c.flags.output {
                Format::Json => output::json(&serde_json::Value::Array(
                    roles.iter().map(role_json).collect(),
                )),
                Format::Table => {
                    let rows: Vec<Vec<String>> = roles
                        .iter()
                        .map(|r| {
                            vec![
                                r.name.clone(),
                                r.scopes.join(","),
                                if r.builtin { "built in" } else { "defined" }.into(),
                            ]
                        })
                        .collect();
                    output::table(&["ROLE", "SCOPES", "KIND"], &rows);
                }
            }
        }
        RolesCommand::Set {
            name,
            scopes,
            flags,
        } => {
            let r = admin_client(&settings(&flags)?)?
                .set_role(pb::RoleInfo {
                    name,
                    scopes,
                    builtin: false,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            match flags.output {
                Format::Json => output::json(&role_json(&r)),
                Format::Table => outln!("role {} grants {}", r.name, r.scopes.join(",")),
            }
        }
        RolesCommand::Delete { name, flags } => {
            admin_client(&settings(&flags)?)?
                .delete_role(pb::DeleteRoleRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            match flags.output {
                Format::Json => output::json(&json!({"deleted": name})),
                Format::Table => outln!("role {name} deleted"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub(crate) enum AgentCertCommand {
    /// Issue a client certificate for an agent, bound to a token subject, for clusters
    /// that require one beside the token (hub.toml [agent_tokens]
    /// require_client_certificate). The key is made here and never leaves this machine.
    Issue {
        /// The subject (`sub`) of the tokens it will be presented with.
        #[arg(long)]
        subject: String,
        /// Where to write `SUBJECT.pem` and `SUBJECT.key` (0600).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Lifetime in seconds; default: the cluster's node certificate lifetime.
        #[arg(long, default_value_t = 0)]
        ttl: u64,
        #[command(flatten)]
        flags: ClientFlags,
    },
}

pub(crate) async fn agent_cert(cmd: AgentCertCommand) -> anyhow::Result<ExitCode> {
    let AgentCertCommand::Issue {
        subject,
        out,
        ttl,
        flags,
    } = cmd;
    let (key_pem, csr_pem) = flotilla_common::pki::node_key_and_csr(&subject)?;
    let r = admin_client(&settings(&flags)?)?
        .issue_agent_certificate(pb::IssueAgentCertificateRequest {
            subject: subject.clone(),
            csr_pem,
            ttl_seconds: ttl,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let file = subject.replace(
        |c: char| !(c.is_ascii_alphanumeric() || "-_.@".contains(c)),
        "_",
    );
    flotilla_common::pki::CertifiedKey {
        cert_pem: r.certificate_pem,
        key_pem,
    }
    .write(&out, &file)?;
    let (cert, key) = (
        out.join(format!("{file}.pem")),
        out.join(format!("{file}.key")),
    );
    match flags.output {
        Format::Json => output::json(&json!({
            "cert": cert, "key": key, "expires_at": output::time(r.expires_at_ms),
        })),
        Format::Table => {
            outln!(
                "wrote {} and {} (valid until {})",
                cert.display(),
                key.display(),
                output::time(r.expires_at_ms)
            );
            outln!("use them with --cert and --key, FLOTILLA_CERT and FLOTILLA_KEY, or cert/key in client.toml");
        }
    }
    Ok(ExitCode::SUCCESS)
}
