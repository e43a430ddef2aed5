//! AdminService: join tokens, nodes, agent tokens, roles, cluster status. Each call needs
//! `admin` or its own narrower admin scope (`jwt::ADMIN_READ`, ...).

use flotilla_common::{jwt, token::JoinToken};
use flotilla_proto::{
    admin_service_server::AdminService, AddHubRequest, CancelTenantTasksRequest,
    CancelTenantTasksResponse, ClusterMember, ClusterStatusRequest, ClusterStatusResponse,
    CreateJoinTokenRequest, CreateJoinTokenResponse, DeleteRoleRequest, DeleteRoleResponse,
    DrainNodeRequest, IssueAgentCertificateRequest, IssueAgentCertificateResponse,
    IssueAgentTokenRequest, IssueAgentTokenResponse, JoinTokenInfo, ListAuditRequest,
    ListAuditResponse, ListJoinTokensRequest, ListJoinTokensResponse, ListNodesRequest,
    ListNodesResponse, ListRolesRequest, ListRolesResponse, ListSigningKeysRequest,
    ListSigningKeysResponse, NodeInfo, NodeRequest, NodeServer, NodeStatusResponse,
    RemoveHubRequest, RemoveNodeResponse, RevokeAgentTokensRequest, RevokeAgentTokensResponse,
    RevokeJoinTokenRequest, RoleInfo, RotateSigningKeyRequest, SetSchedulingPausedRequest,
    SigningKeyInfo,
};
use tonic::{Request, Response, Status};

use crate::{
    audit, auth,
    cluster::Hub,
    convert,
    error::HubError,
    raft::{
        peer::{ClusterView, MembershipChange},
        HubNode,
    },
    service::credentials,
    state::{self, Command, JoinTokenRecord, NodeStatus},
};

impl AdminApi {
    /// Refuses `subject` for a credential of ours when an external provider's users get
    /// subjects like it (its `subject_prefix`).
    fn not_a_providers(&self, subject: &str) -> Result<(), HubError> {
        let issuers = &self.hub.config().agent_tokens.issuers;
        match issuers
            .iter()
            .find(|i| !i.subject_prefix.is_empty() && subject.starts_with(&i.subject_prefix))
        {
            Some(i) => Err(HubError::InvalidArgument(format!(
                "subjects starting with {:?} belong to the provider {:?}",
                i.subject_prefix, i.issuer
            ))),
            None => Ok(()),
        }
    }

    async fn set_status(
        &self,
        req: Request<NodeRequest>,
        status: NodeStatus,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_NODES)?;
        let id = req.into_inner().node_id;
        let cmd = Command::SetNodeStatus {
            node_id: id.clone(),
            status,
            at_ms: flotilla_common::now_ms(),
        };
        self.node_status(&claims, &id, cmd).await
    }

    /// Refuses a token that would hold more than its issuer: every scope asked for, and
    /// every scope of every role asked for (as the role stands now), must be one the
    /// issuer holds, unless it holds `admin`. Unknown roles are refused.
    fn may_grant(
        &self,
        issuer: &jwt::Claims,
        scopes: &[String],
        roles: &[String],
    ) -> Result<(), HubError> {
        flotilla_common::limits::check_count("roles", roles.len(), 16)?;
        let state = self.hub.state();
        if let Some(r) = roles.iter().find(|r| !state.role_exists(r)) {
            return Err(HubError::InvalidArgument(format!(
                "no role {r:?}; `flotilla roles list` shows the roles"
            )));
        }
        if issuer.has_scope(jwt::ADMIN_SCOPE) {
            return Ok(());
        }
        let role_scopes = roles.iter().flat_map(|r| state.role_scopes(r));
        if let Some(s) = scopes
            .iter()
            .cloned()
            .chain(role_scopes)
            .find(|s| !issuer.has_scope(s))
        {
            return Err(HubError::PermissionDenied(format!(
                "a token may hold only scopes its issuer holds; {:?} does not hold {s:?}",
                issuer.sub
            )));
        }
        Ok(())
    }

    async fn node_status(
        &self,
        by: &jwt::Claims,
        node_id: &str,
        cmd: Command,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        if !self.hub.state().nodes.contains_key(node_id) {
            return Err(HubError::NotFound(format!("no node {node_id:?}")).into());
        }
        if let state::Response::Rejected(r) = audit::write_by(&self.hub, by, cmd).await? {
            return Err(HubError::FailedPrecondition(r.to_string()).into());
        }
        let status = self
            .hub
            .state()
            .nodes
            .get(node_id)
            .map(|n| n.status.as_str().to_owned())
            .unwrap_or_default();
        tracing::info!(node_id, status = %status, "node status changed by an admin");
        self.hub.wake();
        Ok(Response::new(NodeStatusResponse {
            node_id: node_id.to_owned(),
            status,
        }))
    }
}

const DEFAULT_JOIN_TTL_S: u64 = 3600;
/// A year: nodes of a Deployment or DaemonSet join whenever a pod is made, with a token kept
/// in a Secret; `flotilla token list` and `token revoke` keep such a token under control.
const MAX_JOIN_TTL_S: u64 = 366 * 24 * 3600;
pub const DEFAULT_AGENT_TTL_S: u64 = 24 * 3600;

pub struct AdminApi {
    pub hub: Hub,
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_CREDENTIALS)?;
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
        flotilla_common::limits::check_len("description", &r.description, 1024)
            .map_err(HubError::from)?;
        let uses = if r.uses == 0 { 1 } else { r.uses };
        let token = JoinToken::generate(&self.hub.ca().pin());
        let now = flotilla_common::now_ms();
        let expires = now + (ttl as i64) * 1000;
        let created = audit::write_by(
            &self.hub,
            &claims,
            Command::CreateJoinToken(JoinTokenRecord {
                id: token.id.clone(),
                secret_hash: token.secret_hash(),
                expires_at_ms: expires,
                uses_left: uses,
                description: r.description,
                created_at_ms: now,
                may_add_tools: r.may_add_tools,
                created_by: claims.sub.clone(),
                revoked_at_ms: None,
            }),
        )
        .await?;
        if let state::Response::Rejected(r) = created {
            return Err(HubError::FailedPrecondition(r.to_string()).into());
        }
        tracing::info!(token_id = ?token.id, by = ?claims.sub, uses, ttl_s = ttl, may_add_tools = r.may_add_tools, "join token created");
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
        auth::admin(&req, &self.hub, jwt::ADMIN_READ)?;
        let live = self.hub.live_nodes().await;
        let nodes = node_infos(&self.hub, &live);
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn issue_agent_token(
        &self,
        req: Request<IssueAgentTokenRequest>,
    ) -> Result<Response<IssueAgentTokenResponse>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_CREDENTIALS)?;
        let r = req.into_inner();
        if r.subject.trim().is_empty() {
            return Err(HubError::InvalidArgument("subject must not be empty".into()).into());
        }
        self.not_a_providers(&r.subject)?;
        let ttl = if r.ttl_seconds == 0 {
            DEFAULT_AGENT_TTL_S
        } else {
            r.ttl_seconds
        };
        let max = self.hub.config().agent_tokens.max_lifetime_s();
        if ttl > max {
            return Err(HubError::InvalidArgument(format!(
                "ttl_seconds may be at most {max} (hub.toml [agent_tokens] max_lifetime_hours)"
            ))
            .into());
        }
        let tenant = if r.tenant.is_empty() {
            jwt::DEFAULT_TENANT.to_owned()
        } else {
            r.tenant
        };
        self.may_grant(&claims, &r.scopes, &r.roles)?;
        let (token, expires_at_ms) = auth::issue_agent_token(
            &self.hub,
            &r.subject,
            &tenant,
            (r.scopes.clone(), r.roles.clone()),
            ttl,
            (
                (!r.region.is_empty()).then(|| r.region.clone()),
                (!r.zone.is_empty()).then(|| r.zone.clone()),
            ),
        )?;
        tracing::info!(subject = ?r.subject, tenant = ?tenant, scopes = ?r.scopes, by = ?claims.sub, "agent token issued");
        self.hub.audit.event(
            self.hub.id(),
            "issue_agent_token",
            &claims.sub,
            &format!(
                "subject {}, tenant {tenant}, scopes {}, roles {}",
                r.subject,
                r.scopes.join(","),
                r.roles.join(",")
            ),
        );
        Ok(Response::new(IssueAgentTokenResponse {
            token,
            expires_at_ms,
        }))
    }

    async fn cluster_status(
        &self,
        req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        auth::admin(&req, &self.hub, jwt::ADMIN_READ)?;
        let mut status = status_response(self.hub.cluster_view().await);
        // Each hub's build, asked of it (at once, each within 2 s).
        let asked = status.members.iter().map(|m| {
            let hub = self.hub.clone();
            let (id, raft) = (m.id, m.raft_address.clone());
            async move {
                if id == hub.id() {
                    Some(crate::raft::peer::HubVersion::this())
                } else {
                    hub.hub_version(&raft).await
                }
            }
        });
        let versions = futures::future::join_all(asked).await;
        for (m, v) in status.members.iter_mut().zip(versions) {
            if let Some(v) = v {
                m.command_level = v.command_level;
                m.version = v.version;
            }
        }
        // Level 1 (what every build applies) is never written: 0 reads as 1.
        status.command_level = self.hub.state().cluster_level.max(1);
        Ok(Response::new(status))
    }

    async fn add_hub(
        &self,
        req: Request<AddHubRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_CLUSTER)?;
        let r = req.into_inner();
        if r.id == 0 {
            return Err(HubError::InvalidArgument("hub id must be positive".into()).into());
        }
        for (name, a) in [
            ("api_address", &r.api_address),
            ("raft_address", &r.raft_address),
        ] {
            flotilla_common::tls::split_address(a)
                .map_err(|e| HubError::InvalidArgument(format!("{name}: {e}")))?;
        }
        tracing::info!(hub = r.id, by = ?claims.sub, "adding hub");
        self.hub.audit.event(
            self.hub.id(),
            "add_hub",
            &claims.sub,
            &format!("hub {}", r.id),
        );
        self.hub
            .change_membership(MembershipChange::Add {
                id: r.id,
                node: HubNode {
                    api: r.api_address,
                    raft: r.raft_address,
                },
            })
            .await?;
        Ok(Response::new(status_response(
            self.hub.cluster_view().await,
        )))
    }

    async fn remove_hub(
        &self,
        req: Request<RemoveHubRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_CLUSTER)?;
        let id = req.into_inner().id;
        let view = self.hub.leaders_view().await;
        if !view.members.iter().any(|m| m.id == id) {
            return Err(HubError::NotFound(format!("hub {id} is not a member")).into());
        }
        tracing::info!(hub = id, by = ?claims.sub, "removing hub");
        self.hub.audit.event(
            self.hub.id(),
            "remove_hub",
            &claims.sub,
            &format!("hub {id}"),
        );
        self.hub
            .change_membership(MembershipChange::Remove { id })
            .await?;
        Ok(Response::new(status_response(
            self.hub.cluster_view().await,
        )))
    }

    async fn cordon_node(
        &self,
        req: Request<NodeRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        self.set_status(req, NodeStatus::Cordoned).await
    }

    async fn uncordon_node(
        &self,
        req: Request<NodeRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        self.set_status(req, NodeStatus::Ready).await
    }

    async fn drain_node(
        &self,
        req: Request<DrainNodeRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_NODES)?;
        let r = req.into_inner();
        let secs = if r.deadline_seconds == 0 {
            300
        } else {
            r.deadline_seconds.min(7 * 24 * 3600)
        };
        let now = flotilla_common::now_ms();
        let cmd = Command::DrainNode {
            node_id: r.node_id.clone(),
            deadline_ms: now + secs as i64 * 1000,
            at_ms: now,
        };
        self.node_status(&claims, &r.node_id, cmd).await
    }

    async fn set_scheduling_paused(
        &self,
        req: Request<SetSchedulingPausedRequest>,
    ) -> Result<Response<SetSchedulingPausedRequest>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_TASKS)?;
        let paused = req.into_inner().paused;
        audit::write_by(&self.hub, &claims, Command::SetSchedulingPaused(paused)).await?;
        tracing::warn!(paused, by = ?claims.sub, "scheduling paused state changed");
        self.hub.wake();
        Ok(Response::new(SetSchedulingPausedRequest { paused }))
    }

    async fn cancel_tenant_tasks(
        &self,
        req: Request<CancelTenantTasksRequest>,
    ) -> Result<Response<CancelTenantTasksResponse>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_TASKS)?;
        let tenant = req.into_inner().tenant;
        if tenant.is_empty() {
            return Err(HubError::InvalidArgument("tenant must not be empty".into()).into());
        }
        // Running attempts, to tell their nodes after the commit.
        let running: Vec<(String, String, u32)> = self
            .hub
            .state()
            .tasks
            .values()
            .filter(|t| t.tenant == tenant && t.status.is_active())
            .filter_map(|t| {
                t.current_attempt()
                    .map(|a| (t.id.clone(), a.node_id.clone(), a.number))
            })
            .collect();
        let cmd = Command::CancelTenantTasks {
            tenant: tenant.clone(),
            at_ms: flotilla_common::now_ms(),
        };
        let ids = match audit::write_by(&self.hub, &claims, cmd).await? {
            state::Response::TasksCancelled(ids) => ids,
            other => {
                return Err(HubError::Internal(format!("cancel-all answered {other:?}")).into())
            }
        };
        for (task_id, node, attempt) in running {
            self.hub
                .sessions
                .send(&node, convert::cancel_message(&task_id, attempt));
        }
        tracing::warn!(tenant = ?tenant, cancelled = ids.len(), by = ?claims.sub, "cancelled every task of a tenant");
        Ok(Response::new(CancelTenantTasksResponse { task_ids: ids }))
    }

    async fn accept_tool(
        &self,
        req: Request<flotilla_proto::AcceptToolRequest>,
    ) -> Result<Response<flotilla_proto::AcceptToolResponse>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_NODES)?;
        let name = req.into_inner().name;
        match crate::audit::write_by(
            &self.hub,
            &claims,
            Command::AcceptTool { name: name.clone() },
        )
        .await?
        {
            state::Response::Done => {}
            state::Response::Rejected(r) => return Err(HubError::NotFound(r.to_string()).into()),
            other => return Err(HubError::Internal(format!("accept answered {other:?}")).into()),
        }
        let state = self.hub.state();
        let e = state
            .catalogue
            .get(&name)
            .ok_or_else(|| HubError::NotFound(format!("no tool {name:?} in the catalogue")))?;
        tracing::warn!(tool = ?name, introduced_by = %e.first_seen_node, scope = ?e.required_scope, by = ?claims.sub, "tool accepted by an admin");
        Ok(Response::new(flotilla_proto::AcceptToolResponse {
            name,
            first_seen_node: e.first_seen_node.clone(),
            required_scope: e.required_scope.clone(),
        }))
    }

    async fn list_join_tokens(
        &self,
        req: Request<ListJoinTokensRequest>,
    ) -> Result<Response<ListJoinTokensResponse>, Status> {
        auth::admin(&req, &self.hub, jwt::ADMIN_READ)?;
        Ok(Response::new(credentials::list_join_tokens(&self.hub)))
    }

    async fn revoke_join_token(
        &self,
        req: Request<RevokeJoinTokenRequest>,
    ) -> Result<Response<JoinTokenInfo>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_CREDENTIALS)?;
        let id = req.into_inner().token_id;
        Ok(Response::new(
            credentials::revoke_join_token(&self.hub, &claims, &id).await?,
        ))
    }

    async fn remove_node(
        &self,
        req: Request<NodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_NODES)?;
        let id = req.into_inner().node_id;
        Ok(Response::new(
            credentials::remove_node(&self.hub, &claims, &id).await?,
        ))
    }

    async fn revoke_agent_tokens(
        &self,
        req: Request<RevokeAgentTokensRequest>,
    ) -> Result<Response<RevokeAgentTokensResponse>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_CREDENTIALS)?;
        Ok(Response::new(
            credentials::revoke_agent_tokens(&self.hub, &claims, req.into_inner()).await?,
        ))
    }

    async fn rotate_signing_key(
        &self,
        req: Request<RotateSigningKeyRequest>,
    ) -> Result<Response<SigningKeyInfo>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_CREDENTIALS)?;
        let retire_now = req.into_inner().retire_now;
        Ok(Response::new(
            credentials::rotate_signing_key(&self.hub, &claims, retire_now).await?,
        ))
    }

    async fn list_audit(
        &self,
        req: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        auth::admin(&req, &self.hub, jwt::ADMIN_READ)?;
        self.hub.read_barrier().await?;
        Ok(Response::new(
            credentials::list_audit(&self.hub, req.get_ref()).await,
        ))
    }

    async fn list_signing_keys(
        &self,
        req: Request<ListSigningKeysRequest>,
    ) -> Result<Response<ListSigningKeysResponse>, Status> {
        auth::admin(&req, &self.hub, jwt::ADMIN_READ)?;
        Ok(Response::new(credentials::list_signing_keys(&self.hub)))
    }

    async fn list_roles(
        &self,
        req: Request<ListRolesRequest>,
    ) -> Result<Response<ListRolesResponse>, Status> {
        auth::admin(&req, &self.hub, jwt::ADMIN_READ)?;
        let state = self.hub.state();
        let builtin = jwt::BUILTIN_ROLES.iter().map(|(name, scopes)| RoleInfo {
            name: (*name).to_owned(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            builtin: true,
        });
        let defined = state.roles.iter().map(|(name, scopes)| RoleInfo {
            name: name.clone(),
            scopes: scopes.clone(),
            builtin: false,
        });
        Ok(Response::new(ListRolesResponse {
            roles: builtin.chain(defined).collect(),
        }))
    }

    async fn set_role(&self, req: Request<RoleInfo>) -> Result<Response<RoleInfo>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_CREDENTIALS)?;
        let r = req.into_inner();
        let name_ok = !r.name.is_empty()
            && r.name.len() <= 64
            && r.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
        if !name_ok {
            return Err(HubError::InvalidArgument(
                "a role name is 1 to 64 of a-z, A-Z, 0-9, '-', '_', '.', ':'".into(),
            )
            .into());
        }
        flotilla_common::limits::check_count(
            "scopes",
            r.scopes.len(),
            state::credentials::MAX_ROLE_SCOPES,
        )
        .map_err(HubError::from)?;
        for s in &r.scopes {
            if s.is_empty()
                || s.len() > 256
                || s.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(HubError::InvalidArgument(format!(
                    "scope {s:?}: 1 to 256 bytes, no spaces"
                ))
                .into());
            }
        }
        // Whoever changes a role changes what every token holding it may do: only a role
        // whose scopes, now and after, the changer holds.
        let now = self
            .hub
            .state()
            .roles
            .get(&r.name)
            .cloned()
            .unwrap_or_default();
        self.may_grant(&claims, &r.scopes, &[])?;
        self.may_grant(&claims, &now, &[])?;
        let cmd = Command::SetRole {
            name: r.name.clone(),
            scopes: r.scopes.clone(),
        };
        match audit::write_by(&self.hub, &claims, cmd).await? {
            state::Response::Rejected(rej) => {
                Err(HubError::FailedPrecondition(rej.to_string()).into())
            }
            _ => {
                tracing::info!(role = %r.name, scopes = ?r.scopes, by = ?claims.sub, "role set");
                Ok(Response::new(RoleInfo {
                    builtin: false,
                    ..r
                }))
            }
        }
    }

    async fn issue_agent_certificate(
        &self,
        req: Request<IssueAgentCertificateRequest>,
    ) -> Result<Response<IssueAgentCertificateResponse>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_CREDENTIALS)?;
        let r = req.into_inner();
        if r.subject.trim().is_empty() {
            return Err(HubError::InvalidArgument("subject must not be empty".into()).into());
        }
        self.not_a_providers(&r.subject)?;
        flotilla_common::limits::check_len("subject", &r.subject, 256).map_err(HubError::from)?;
        flotilla_common::limits::check_len("csr_pem", &r.csr_pem, 16 * 1024)
            .map_err(HubError::from)?;
        let max = 366 * 24 * 3600;
        let ttl = match r.ttl_seconds {
            0 => self.hub.config().node_cert_lifetime_s,
            t if (60..=max).contains(&t) => t,
            _ => {
                return Err(HubError::InvalidArgument(format!(
                    "ttl_seconds must be from 60 to {max} (a year)"
                ))
                .into())
            }
        };
        let pem = self
            .hub
            .ca()
            .sign_agent_csr_for(&r.csr_pem, &r.subject, std::time::Duration::from_secs(ttl))
            .map_err(|e| HubError::InvalidArgument(e.to_string()))?;
        let expires_at_ms = flotilla_common::pki::pem_validity(&pem)
            .map(|(_, to)| to * 1000)
            .unwrap_or_default();
        tracing::info!(subject = ?r.subject, by = ?claims.sub, "agent certificate issued");
        self.hub.audit.event(
            self.hub.id(),
            "issue_agent_certificate",
            &claims.sub,
            &format!("subject {}", r.subject),
        );
        Ok(Response::new(IssueAgentCertificateResponse {
            certificate_pem: pem,
            expires_at_ms,
        }))
    }

    async fn delete_role(
        &self,
        req: Request<DeleteRoleRequest>,
    ) -> Result<Response<DeleteRoleResponse>, Status> {
        let claims = auth::admin(&req, &self.hub, jwt::ADMIN_CREDENTIALS)?;
        let name = req.into_inner().name;
        let now = self
            .hub
            .state()
            .roles
            .get(&name)
            .cloned()
            .unwrap_or_default();
        self.may_grant(&claims, &now, &[])?;
        let cmd = Command::DeleteRole { name: name.clone() };
        match audit::write_by(&self.hub, &claims, cmd).await? {
            state::Response::Rejected(r @ state::Rejection::NoSuchRole(_)) => {
                Err(HubError::NotFound(r.to_string()).into())
            }
            state::Response::Rejected(r) => Err(HubError::FailedPrecondition(r.to_string()).into()),
            _ => {
                tracing::info!(role = %name, by = ?claims.sub, "role deleted");
                Ok(Response::new(DeleteRoleResponse {}))
            }
        }
    }
}

pub fn status_response(v: ClusterView) -> ClusterStatusResponse {
    ClusterStatusResponse {
        leader_id: v.leader_id.unwrap_or(0),
        term: v.term,
        last_log_index: v.last_log_index,
        // From the leader's view when it answered; an older leader that does not say
        // reports what it applied, which is committed.
        commit_index: v.commit_index.max(v.applied_index),
        applied_index: v.applied_index,
        members: v
            .members
            .into_iter()
            .map(|m| ClusterMember {
                id: m.id,
                address: m.api,
                role: m.role,
                raft_address: m.raft,
                matched_index: m.matched_index,
                lag: m.lag,
                http_address: m.http,
                ..Default::default()
            })
            .collect(),
        this_hub: v.this_hub,
        ..Default::default()
    }
}

/// Every registered node with its servers, as the replicated state and (for connected
/// nodes) the leader's sessions say: `ListNodes`, and the dashboard.
pub fn node_infos(
    hub: &Hub,
    live: &std::collections::HashMap<String, crate::sessions::LiveView>,
) -> Vec<NodeInfo> {
    let state = hub.state();
    let in_flight = &state.index.active;
    let limits = crate::scheduler::limits(hub);
    let now = flotilla_common::now_ms();
    state
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
                            .map(|x| {
                                flotilla_proto::ServerState::try_from(x.state)
                                    .unwrap_or_default()
                                    .name()
                            })
                            .unwrap_or("disconnected")
                            .to_owned(),
                        max_concurrency: s.max_concurrency,
                        running: in_flight
                            .get(&(n.id.clone(), s.name.clone()))
                            .copied()
                            .unwrap_or(0),
                        tools: s.tools.clone(),
                        error: ls.map(|x| x.error.clone()).unwrap_or_default(),
                        breaker: crate::scheduler::breaker(&state, &n.id, &s.name, limits, now)
                            .as_str()
                            .to_owned(),
                        consecutive_failures: state
                            .breakers
                            .get(&crate::state::breaker_key(&n.id, &s.name))
                            .map_or(0, |b| b.consecutive_failures),
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
                tenants: n.tenants.clone(),
                cpu_high_water_percent: n.cpu_high_water_percent,
                http_address: l.map(|l| l.http.clone()).unwrap_or_default(),
                stopping: l.is_some_and(|l| l.stopping),
            }
        })
        .collect()
}
