//! NodeService: joining with a token, and opening a node's long-lived session (the
//! session itself, from hello to end, is `sessions::protocol`).

use std::pin::Pin;

use flotilla_common::{pki::PeerIdentity, token::hash_secret};
use flotilla_proto::{
    node_service_server::NodeService, HubMessage, JoinRequest, JoinResponse, NodeMessage,
    RenewCertificateRequest, RenewCertificateResponse,
};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    auth,
    cluster::Hub,
    error::HubError,
    sessions::protocol,
    state::{self, Command, Rejection},
};

pub struct NodeApi {
    pub hub: Hub,
}

fn valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl NodeApi {
    /// The node certificate of the request, if the cluster accepts it: issued to a node that
    /// is registered, and one of the certificates its record lists.
    fn accepted_node<T>(&self, req: &Request<T>) -> Result<PeerIdentity, HubError> {
        let cert = auth::node(req)?;
        let node_id = &cert.common_name;
        let known = self
            .hub
            .state()
            .nodes
            .get(node_id)
            .map(|n| n.holds_certificate(&cert.serial));
        match known {
            Some(true) => Ok(cert),
            Some(false) => {
                tracing::warn!(node_id = %node_id, serial = %cert.serial, "refused a node certificate the cluster no longer accepts");
                self.hub.metrics.auth_failed("revoked_certificate");
                self.hub.audit.denied(
                    self.hub.id(),
                    &format!("node {node_id}"),
                    "",
                    "node certificate",
                    "revoked_certificate",
                    &auth::source(req),
                );
                Err(HubError::PermissionDenied(format!(
                    "this certificate of node {node_id:?} is no longer accepted (replaced by a renewal, or the node was removed and joined again); to bring this machine back, remove the node (`flotilla nodes remove`) and join with a new token"
                )))
            }
            None => {
                tracing::warn!(node_id = %node_id, "refused a node that is not registered (removed, or never joined)");
                self.hub.metrics.auth_failed("unknown_node");
                self.hub.audit.denied(
                    self.hub.id(),
                    &format!("node {node_id}"),
                    "",
                    "node certificate",
                    "unknown_node",
                    &auth::source(req),
                );
                Err(HubError::PermissionDenied(format!(
                    "node {node_id:?} is not registered in this cluster (removed, or never joined); join with a new token"
                )))
            }
        }
    }
}

type HubStream = Pin<Box<dyn Stream<Item = Result<HubMessage, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        // Failed joins are throttled per source address, so a token cannot be guessed.
        let source = req
            .extensions()
            .get::<flotilla_common::tls::PeerInfo>()
            .and_then(|p| p.remote_addr)
            .map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string());
        self.hub.quota.join_allowed(&source)?;
        let r = req.into_inner();
        // Logged when refused: never more of it than a real id could be.
        let token_id: String = r.token_id.chars().take(32).collect();
        let refuse = |why: &str| {
            // The secret is never logged; the token id is not secret.
            tracing::warn!(token_id = ?token_id, source = %source, reason = why, "join refused");
            self.hub.quota.join_failed(&source);
            self.hub.audit.denied(
                self.hub.id(),
                "unauthenticated",
                "",
                &format!("join token {token_id}"),
                "bad_join_token",
                &source,
            );
            self.hub.metrics.auth_failed("bad_join_token");
            HubError::Unauthenticated(
                "join token is unknown, expired or used up; create a new one with `flotilla token create`".into(),
            )
        };
        if !valid_node_name(&r.name) {
            return Err(HubError::InvalidArgument(
                "node name must be 1-63 characters of a-z, 0-9 and '-'".into(),
            )
            .into());
        }
        let hash = hash_secret(&r.token_secret);
        let now = flotilla_common::now_ms();
        {
            let state = self.hub.state();
            // A node of that name that joined with this token may be asking again (its
            // answer was lost): the state machine compares the key too.
            let asking_again = state.nodes.get(&r.name).map(|n| {
                n.joined_with
                    .as_ref()
                    .is_some_and(|(token, _)| *token == r.token_id)
            });
            let ok = state.join_tokens.get(&r.token_id).is_some_and(|t| {
                (t.uses_left > 0 || asking_again == Some(true))
                    && t.expires_at_ms > now
                    && flotilla_common::secret_eq(&t.secret_hash, &hash)
            });
            if !ok {
                return Err(refuse("unknown, expired, used up or wrong secret").into());
            }
            if asking_again == Some(false) {
                return Err(HubError::AlreadyExists(format!(
                    "a node named {:?} has joined already; pick another name",
                    r.name
                ))
                .into());
            }
        }
        // Sign first: a bad CSR must not use up the token.
        let cert = self
            .hub
            .ca()
            .sign_node_csr_for(
                &r.csr_pem,
                &r.name,
                std::time::Duration::from_secs(self.hub.config().node_cert_lifetime_s),
            )
            .map_err(|e| HubError::InvalidArgument(e.to_string()))?;
        let serial = flotilla_common::pki::pem_identity(&cert)
            .map(|id| id.serial)
            .ok_or_else(|| HubError::Internal("cannot read the certificate just signed".into()))?;
        let key_pin = flotilla_common::tls::parse_certs(&cert)
            .ok()
            .and_then(|c| {
                c.first()
                    .and_then(|c| flotilla_common::pki::cert_spki_pin(c))
            })
            .ok_or_else(|| HubError::Internal("cannot read the certificate just signed".into()))?;
        let cmd = Command::RegisterNode {
            node_id: r.name.clone(),
            token_id: r.token_id.clone(),
            secret_hash: hash,
            labels: Default::default(),
            at_ms: now,
            cert_serial: serial,
            key_pin,
        };
        match crate::audit::write_as(&self.hub, &format!("node {}", r.name), cmd).await? {
            state::Response::Done => {}
            state::Response::Rejected(Rejection::NodeExists(n)) => {
                return Err(HubError::AlreadyExists(format!(
                    "a node named {n:?} has joined already"
                ))
                .into())
            }
            state::Response::Rejected(_) => {
                return Err(refuse("lost a race for the last use").into())
            }
            other => return Err(HubError::Internal(format!("join answered {other:?}")).into()),
        }
        fail::fail_point!(crate::faults::JOIN_BEFORE_ANSWER);
        tracing::info!(node_id = %r.name, token_id = ?r.token_id, "node joined");
        Ok(Response::new(JoinResponse {
            node_id: r.name,
            certificate_pem: cert,
            ca_pem: self.hub.trust_pem().to_owned(),
            hub_endpoints: self
                .hub
                .local_view()
                .members
                .into_iter()
                .map(|m| m.api)
                .collect(),
        }))
    }

    type SessionStream = HubStream;

    async fn renew_certificate(
        &self,
        req: Request<RenewCertificateRequest>,
    ) -> Result<Response<RenewCertificateResponse>, Status> {
        let cert = self.accepted_node(&req)?;
        let node_id = cert.common_name;
        flotilla_common::limits::check_len("csr_pem", &req.get_ref().csr_pem, 16 * 1024)
            .map_err(HubError::from)?;
        self.hub
            .quota
            .renewal_allowed(&node_id, self.hub.config().node_cert_lifetime_s)?;
        let lifetime = std::time::Duration::from_secs(self.hub.config().node_cert_lifetime_s);
        let pem = self
            .hub
            .ca()
            .sign_node_csr_for(&req.get_ref().csr_pem, &node_id, lifetime)
            .map_err(|e| HubError::InvalidArgument(e.to_string()))?;
        let (serial, not_after_s) = flotilla_common::pki::pem_identity(&pem)
            .zip(flotilla_common::pki::pem_validity(&pem))
            .map(|(id, (_, to))| (id.serial, to))
            .ok_or_else(|| HubError::Internal("cannot read the certificate just signed".into()))?;
        let cmd = Command::RenewNodeCertificate {
            node_id: node_id.clone(),
            presented: cert.serial,
            serial: serial.clone(),
            at_ms: flotilla_common::now_ms(),
        };
        let by = format!("node {node_id}");
        if let state::Response::Rejected(r) = crate::audit::write_as(&self.hub, &by, cmd).await? {
            return Err(HubError::PermissionDenied(format!(
                "renewal refused ({}); remove the node and join again with a new token",
                match r {
                    state::Rejection::Stale => {
                        "the certificate presented is no longer accepted".to_owned()
                    }
                    other => other.to_string(),
                }
            ))
            .into());
        }
        tracing::info!(node_id = %node_id, serial = %serial, not_after_s, "node certificate renewed");
        Ok(Response::new(RenewCertificateResponse {
            certificate_pem: pem,
            not_after_ms: not_after_s * 1000,
        }))
    }

    async fn session(
        &self,
        req: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<HubStream>, Status> {
        let cert = self.accepted_node(&req)?;
        self.hub.require_leader()?;
        // Signed by a CA the cluster still trusts but no longer signs with (the CA is
        // being rotated): the node is told to renew now.
        let old_ca = req
            .extensions()
            .get::<flotilla_common::tls::PeerInfo>()
            .and_then(|p| p.client_cert.clone())
            .is_some_and(|der| !flotilla_common::pki::issued_by(&der, self.hub.ca().cert_pem()));
        let out = protocol::serve(
            &self.hub,
            cert.common_name,
            cert.serial,
            old_ca,
            req.into_inner(),
        )
        .await?;
        Ok(Response::new(Box::pin(futures::StreamExt::map(
            out,
            Ok::<_, Status>,
        ))))
    }
}
