//! AdminService: join tokens, nodes, agent tokens, cluster status. Needs the `admin` scope.

use flotilla_common::{
    jwt::{self, Claims},
    token::JoinToken,
};
use flotilla_proto::{
    admin_service_server::AdminService, ClusterMember, ClusterStatusRequest, ClusterStatusResponse,
    CreateJoinTokenRequest, CreateJoinTokenResponse, IssueAgentTokenRequest,
    IssueAgentTokenResponse, ListNodesRequest, ListNodesResponse, NodeInfo, NodeServer,
};
use tonic::{Request, Response, Status};

use crate::{
    app::Hub,
    auth, convert,
    error::HubError,
    state::{Command, JoinTokenRecord},
};

const DEFAULT_JOIN_TTL_S: u64 = 3600;
const MAX_JOIN_TTL_S: u64 = 7 * 24 * 3600;
pub const DEFAULT_AGENT_TTL_S: u64 = 24 * 3600;
const MAX_AGENT_TTL_S: u64 = 366 * 24 * 3600;

pub struct AdminApi {
    pub hub: Hub,
}

/// Signs an agent token with the cluster's active key.
pub fn issue_agent_token(
    hub: &Hub,
    subject: &str,
    tenant: &str,
    scopes: Vec<String>,
    ttl_s: u64,
) -> Result<(String, i64), HubError> {
    let state = hub.state();
    let key = state
        .active_signing_key()
        .ok_or_else(|| HubError::Unavailable(jwt::JwtError::NoSigningKey.to_string()))?;
    let now_s = flotilla_common::now_ms() / 1000;
    let exp = now_s + ttl_s as i64;
    let claims = Claims {
        iss: jwt::ISSUER.into(),
        aud: jwt::AUDIENCE.into(),
        sub: subject.to_owned(),
        tenant: tenant.to_owned(),
        scopes,
        iat: now_s,
        exp,
        jti: flotilla_common::random_id(12),
    };
    let token = jwt::sign(key, &claims).map_err(|e| HubError::Internal(e.to_string()))?;
    Ok((token, exp * 1000))
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let claims = auth::admin(&req, &self.hub.state())?;
        let r = req.into_inner();
        let ttl = if r.ttl_seconds == 0 {
            DEFAULT_JOIN_TTL_S
        } else {
            r.ttl_seconds
        };
        if ttl > MAX_JOIN_TTL_S {
            return Err(HubError::InvalidArgument(format!(
                "ttl_seconds may be at most {MAX_JOIN_TTL_S}"
            ))
            .into());
        }
        let uses = if r.uses == 0 { 1 } else { r.uses };
        let token = JoinToken::generate(&self.hub.ca().pin());
        let now = flotilla_common::now_ms();
        let expires = now + (ttl as i64) * 1000;
        self.hub
            .write(Command::CreateJoinToken(JoinTokenRecord {
                id: token.id.clone(),
                secret_hash: token.secret_hash(),
                expires_at_ms: expires,
                uses_left: uses,
                description: r.description,
                created_at_ms: now,
            }))
            .await?;
        tracing::info!(token_id = %token.id, by = %claims.sub, uses, ttl_s = ttl, "join token created");
        Ok(Response::new(CreateJoinTokenResponse {
            token: token.to_string(),
            token_id: token.id.clone(),
            expires_at_ms: expires,
            ca_pin: token.ca_pin,
        }))
    }

    async fn list_nodes(
        &self,
        req: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let state = self.hub.state();
        auth::admin(&req, &state)?;
        let live = self.hub.sessions.snapshot();
        let in_flight = state.active_counts();
        let nodes = state
            .nodes
            .values()
            .map(|n| {
                let l = live.get(&n.id);
                let servers = n
                    .servers
                    .iter()
                    .map(|s| {
                        let ls = l.and_then(|l| l.servers.iter().find(|x| x.name == s.name));
                        NodeServer {
                            name: s.name.clone(),
                            state: ls
                                .map(|x| convert::server_state_name(x.state))
                                .unwrap_or("disconnected")
                                .to_owned(),
                            max_concurrency: s.max_concurrency,
                            running: in_flight
                                .get(&(n.id.clone(), s.name.clone()))
                                .copied()
                                .unwrap_or(0),
                            tools: s.tools.clone(),
                            error: ls.map(|x| x.error.clone()).unwrap_or_default(),
                        }
                    })
                    .collect();
                NodeInfo {
                    id: n.id.clone(),
                    name: n.id.clone(),
                    labels: n.labels.clone().into_iter().collect(),
                    status: n.status.as_str().to_owned(),
                    connected: l.is_some(),
                    cpu_percent: l.map_or(0.0, |l| l.cpu_percent),
                    running: l.map_or(0, |l| l.running),
                    servers,
                    joined_at_ms: n.joined_at_ms,
                    last_seen_ms: l.map_or(n.last_hello_ms.unwrap_or(0), |l| l.last_seen_ms),
                }
            })
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn issue_agent_token(
        &self,
        req: Request<IssueAgentTokenRequest>,
    ) -> Result<Response<IssueAgentTokenResponse>, Status> {
        let claims = auth::admin(&req, &self.hub.state())?;
        let r = req.into_inner();
        if r.subject.trim().is_empty() {
            return Err(HubError::InvalidArgument("subject must not be empty".into()).into());
        }
        let ttl = if r.ttl_seconds == 0 {
            DEFAULT_AGENT_TTL_S
        } else {
            r.ttl_seconds
        };
        if ttl > MAX_AGENT_TTL_S {
            return Err(HubError::InvalidArgument(format!(
                "ttl_seconds may be at most {MAX_AGENT_TTL_S}"
            ))
            .into());
        }
        let tenant = if r.tenant.is_empty() {
            jwt::DEFAULT_TENANT.to_owned()
        } else {
            r.tenant
        };
        let (token, expires_at_ms) =
            issue_agent_token(&self.hub, &r.subject, &tenant, r.scopes.clone(), ttl)?;
        tracing::info!(subject = %r.subject, tenant = %tenant, scopes = ?r.scopes, by = %claims.sub, "agent token issued");
        Ok(Response::new(IssueAgentTokenResponse {
            token,
            expires_at_ms,
        }))
    }

    async fn cluster_status(
        &self,
        req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        auth::admin(&req, &self.hub.state())?;
        let m = self.hub.raft().metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| ClusterMember {
                id: *id,
                address: node.addr.clone(),
                role: if Some(*id) == m.current_leader {
                    "leader"
                } else if voters.contains(id) {
                    "follower"
                } else {
                    "learner"
                }
                .to_owned(),
            })
            .collect();
        Ok(Response::new(ClusterStatusResponse {
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: m.last_applied.map_or(0, |l| l.index),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            members,
            this_hub: m.id,
        }))
    }
}
