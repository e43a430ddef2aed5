//! The AdminService calls that end or replace credentials: listing and revoking join tokens,
//! removing a node, revoking agent tokens, rotating and listing signing keys. Each is one
//! replicated command (`state::credentials` says what it does); these check the request,
//! commit it, and say what happened, to the caller and in the hub's log.

use flotilla_common::jwt::{Claims, SigningKey};
use flotilla_proto::{
    AuditRecord, JoinTokenInfo, ListAuditRequest, ListAuditResponse, ListJoinTokensResponse,
    ListSigningKeysResponse, RemoveNodeResponse, RevokeAgentTokensRequest,
    RevokeAgentTokensResponse, SigningKeyInfo,
};

use crate::{
    cluster::Hub,
    error::{HubError, HubResult},
    state::{self, Command, JoinTokenRecord, Rejection},
};

/// What a state machine refusal means to the caller of a credential command.
fn refused(r: Rejection) -> HubError {
    match r {
        Rejection::NoSuchJoinToken(_) | Rejection::NoSuchNode(_) => {
            HubError::NotFound(r.to_string())
        }
        Rejection::TooMany(m) => HubError::FailedPrecondition(m),
        other => HubError::FailedPrecondition(other.to_string()),
    }
}

async fn commit(hub: &Hub, by: &Claims, cmd: Command) -> HubResult<state::Response> {
    match crate::audit::write_by(hub, by, cmd).await? {
        state::Response::Rejected(r) => Err(refused(r)),
        other => Ok(other),
    }
}

fn join_token_info(t: &JoinTokenRecord) -> JoinTokenInfo {
    JoinTokenInfo {
        token_id: t.id.clone(),
        description: t.description.clone(),
        uses_left: t.uses_left,
        expires_at_ms: t.expires_at_ms,
        created_at_ms: t.created_at_ms,
        created_by: t.created_by.clone(),
        revoked_at_ms: t.revoked_at_ms.unwrap_or(0),
        may_add_tools: t.may_add_tools,
    }
}

/// Join tokens that have not expired, newest first (used-up and revoked ones included).
pub fn list_join_tokens(hub: &Hub) -> ListJoinTokensResponse {
    let now = flotilla_common::now_ms();
    let state = hub.state();
    let mut tokens: Vec<JoinTokenInfo> = state
        .join_tokens
        .values()
        .filter(|t| t.expires_at_ms > now)
        .map(join_token_info)
        .collect();
    tokens.sort_by(|a, b| {
        b.created_at_ms
            .cmp(&a.created_at_ms)
            .then(a.token_id.cmp(&b.token_id))
    });
    ListJoinTokensResponse { tokens }
}

pub async fn revoke_join_token(hub: &Hub, by: &Claims, token_id: &str) -> HubResult<JoinTokenInfo> {
    flotilla_common::limits::check_len("token_id", token_id, 64)?;
    commit(
        hub,
        by,
        Command::RevokeJoinToken {
            token_id: token_id.to_owned(),
            at_ms: flotilla_common::now_ms(),
        },
    )
    .await?;
    tracing::warn!(token_id = ?token_id, by = ?by.sub, "join token revoked");
    // On a follower the revocation may not be applied here yet.
    hub.read_barrier().await?;
    let state = hub.state();
    let t = state
        .join_tokens
        .get(token_id)
        .ok_or_else(|| HubError::NotFound(format!("no join token {token_id:?}")))?;
    Ok(join_token_info(t))
}

pub async fn remove_node(hub: &Hub, by: &Claims, node_id: &str) -> HubResult<RemoveNodeResponse> {
    flotilla_common::limits::check_len("node_id", node_id, 63)?;
    let cmd = Command::RemoveNode {
        node_id: node_id.to_owned(),
        at_ms: flotilla_common::now_ms(),
    };
    let (requeued, lost) = match commit(hub, by, cmd).await? {
        state::Response::NodeWentDown { requeued, lost } => (requeued, lost),
        other => return Err(HubError::Internal(format!("remove answered {other:?}"))),
    };
    tracing::warn!(node_id, by = ?by.sub, requeued = requeued.len(), lost = lost.len(), "node removed; its certificates no longer open a session");
    hub.wake();
    Ok(RemoveNodeResponse {
        node_id: node_id.to_owned(),
        requeued,
        lost,
    })
}

pub async fn revoke_agent_tokens(
    hub: &Hub,
    by: &Claims,
    r: RevokeAgentTokensRequest,
) -> HubResult<RevokeAgentTokensResponse> {
    let jti = r.jti.trim();
    let subject = r.subject.trim();
    if jti.is_empty() && subject.is_empty() {
        return Err(HubError::InvalidArgument(
            "say which tokens: a jti, a subject, or both".into(),
        ));
    }
    flotilla_common::limits::check_len("jti", jti, 128)?;
    flotilla_common::limits::check_len("subject", subject, 256)?;
    let now = flotilla_common::now_ms();
    // No token this covers can be valid after the longest lifetime a token may have.
    let keep_until_ms = now + hub.config().agent_tokens.max_lifetime_s() as i64 * 1000;
    commit(
        hub,
        by,
        Command::RevokeAgentTokens {
            jti: (!jti.is_empty()).then(|| jti.to_owned()),
            subject: (!subject.is_empty()).then(|| subject.to_owned()),
            keep_until_ms,
            at_ms: now,
        },
    )
    .await?;
    tracing::warn!(jti = ?jti, subject = ?subject, by = ?by.sub, "agent tokens revoked");
    Ok(RevokeAgentTokensResponse {
        kept_until_ms: keep_until_ms,
    })
}

fn key_info(k: &SigningKey, active: bool) -> SigningKeyInfo {
    SigningKeyInfo {
        kid: k.kid.clone(),
        created_at_ms: k.created_at_ms,
        retire_at_ms: k.retire_at_ms.unwrap_or(0),
        active,
    }
}

/// A new key signs from now on. The older keys verify the tokens they signed until no such
/// token can be valid (the longest lifetime from now), or, when `retire_now` (a key that
/// leaked), stop at once: every token they signed is refused.
pub async fn rotate_signing_key(
    hub: &Hub,
    by: &Claims,
    retire_now: bool,
) -> HubResult<SigningKeyInfo> {
    let now = flotilla_common::now_ms();
    let key = SigningKey::generate(now).map_err(|e| HubError::Internal(e.to_string()))?;
    let retire_old_at_ms = if retire_now {
        now
    } else {
        now + hub.config().agent_tokens.max_lifetime_s() as i64 * 1000
    };
    commit(
        hub,
        by,
        Command::RotateSigningKey {
            key: key.clone(),
            retire_old_at_ms,
        },
    )
    .await?;
    tracing::warn!(kid = %key.kid, by = ?by.sub, retire_old_at_ms, "agent token signing key rotated");
    Ok(key_info(&key, true))
}

/// The keys held, the active one first, then newest first.
pub fn list_signing_keys(hub: &Hub) -> ListSigningKeysResponse {
    let state = hub.state();
    let active = state.active_signing_key().map(|k| k.kid.clone());
    let mut keys: Vec<SigningKeyInfo> = state
        .signing_keys
        .iter()
        .map(|k| key_info(k, Some(&k.kid) == active.as_ref()))
        .collect();
    keys.sort_by(|a, b| {
        b.active
            .cmp(&a.active)
            .then(b.created_at_ms.cmp(&a.created_at_ms))
    });
    ListSigningKeysResponse { keys }
}

/// Whether the audit record `a` is one `r` asks for.
fn wanted(r: &ListAuditRequest, a: &state::audit::AuditRecord) -> bool {
    (r.since_ms == 0 || a.at_ms >= r.since_ms)
        && (r.until_ms == 0 || a.at_ms < r.until_ms)
        && (r.actor.is_empty() || a.actor == r.actor)
        && (r.tenant.is_empty() || a.tenant == r.tenant)
        && (r.kind.is_empty() || a.kind == r.kind)
}

/// The audit records that match `r`, oldest first (the newest `limit`). The trail's own
/// records and the open tasks' are read under the state lock; finished tasks are read from
/// the history store after it is released, off the async threads, so a large listing
/// never holds up the state machine.
pub async fn list_audit(hub: &Hub, r: &ListAuditRequest) -> ListAuditResponse {
    let limit = match r.limit {
        0 => 1000,
        n => n.min(20_000),
    } as usize;
    let calls = !r.without_calls
        && (r.kind.is_empty() || state::audit::CALL_KINDS.contains(&r.kind.as_str()));
    let (mut matching, open, history) = {
        let state = hub.state();
        let mut matching: Vec<state::audit::AuditRecord> = state
            .audit
            .all()
            .into_iter()
            .filter(|a| wanted(r, a))
            .cloned()
            .collect();
        let mut open = std::collections::HashSet::new();
        if calls {
            for t in state
                .tasks
                .values()
                .filter(|t| r.tenant.is_empty() || t.tenant == r.tenant)
            {
                let before = matching.len();
                matching.extend(
                    state::audit::call_records(t)
                        .into_iter()
                        .filter(|a| wanted(r, a)),
                );
                if matching.len() > before {
                    open.insert(t.id.clone());
                }
            }
        }
        (matching, open, state.history.clone())
    };
    if calls {
        // Finished tasks, newest end first, in the window, that have a record asked for:
        // the newest `limit` of them hold the newest `limit` records (each has a record
        // at its end). A task that finished since the open ones were read is taken once.
        let req = r.clone();
        let read = tokio::task::spawn_blocking(move || {
            // From the newest end: a task that ended after `until` may have its submission
            // or assignment inside the window.
            history.ended_between(req.since_ms, 0, limit, |t| {
                (req.tenant.is_empty() || t.tenant == req.tenant)
                    && state::audit::call_records(t)
                        .iter()
                        .any(|a| wanted(&req, a))
            })
        })
        .await;
        let ended = match read {
            Ok(Ok(ended)) => ended,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read finished tasks for the audit trail");
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "reading finished tasks for the audit trail failed");
                Vec::new()
            }
        };
        for t in ended.iter().filter(|t| !open.contains(&t.id)) {
            matching.extend(
                state::audit::call_records(t)
                    .into_iter()
                    .filter(|a| wanted(r, a)),
            );
        }
        // By time; a call's records made in one millisecond in the order they happen.
        let step = |kind: &str| {
            state::audit::CALL_KINDS
                .iter()
                .position(|k| *k == kind)
                .unwrap_or(state::audit::CALL_KINDS.len())
        };
        matching.sort_by(|a, b| {
            (a.at_ms, a.seq, step(&a.kind), &a.target).cmp(&(
                b.at_ms,
                b.seq,
                step(&b.kind),
                &b.target,
            ))
        });
    }
    let matching: Vec<AuditRecord> = matching
        .into_iter()
        .map(|a| AuditRecord {
            seq: a.seq,
            at_ms: a.at_ms,
            kind: a.kind.clone(),
            actor: a.actor.clone(),
            tenant: a.tenant.clone(),
            target: a.target.clone(),
            outcome: a.outcome.clone(),
            hub: a.hub,
            source: a.source.clone(),
            count: a.count,
        })
        .collect();
    let skip = matching.len().saturating_sub(limit);
    ListAuditResponse {
        records: matching.into_iter().skip(skip).collect(),
    }
}
