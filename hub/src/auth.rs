//! Who is calling: agents by JWT (`authorization: Bearer ...`), nodes by the client
//! certificate the cluster CA issued them when they joined.

use flotilla_common::{
    jwt::{self, Claims, JwtError},
    pki::{self, PeerIdentity},
    tls::PeerInfo,
};
use tonic::Request;

use crate::{error::HubError, state::State};

/// Verifies the request's bearer token against the signing keys in `state`.
pub fn agent<T>(req: &Request<T>, state: &State) -> Result<Claims, HubError> {
    let token =
        bearer(req).ok_or_else(|| HubError::Unauthenticated(JwtError::Missing.to_string()))?;
    jwt::verify(token, &state.signing_keys).map_err(|e| {
        tracing::info!(error = %e, "rejected agent token");
        HubError::Unauthenticated(e.user_message())
    })
}

/// Like [`agent`], and the token must hold the admin scope.
pub fn admin<T>(req: &Request<T>, state: &State) -> Result<Claims, HubError> {
    let claims = agent(req, state)?;
    if !claims.has_scope(jwt::ADMIN_SCOPE) {
        return Err(HubError::PermissionDenied(format!(
            "this needs the `{}` scope, which the token of {:?} does not hold",
            jwt::ADMIN_SCOPE,
            claims.sub
        )));
    }
    Ok(claims)
}

fn bearer<T>(req: &Request<T>) -> Option<&str> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?;
    Some(t.trim())
}

/// The node identity in the verified client certificate of the connection.
pub fn node<T>(req: &Request<T>) -> Result<String, HubError> {
    let cert = req
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.client_cert.clone())
        .ok_or_else(|| {
            HubError::Unauthenticated(
                "a node session needs the client certificate the node got when it joined".into(),
            )
        })?;
    match pki::peer_identity(&cert) {
        Some(PeerIdentity { common_name, role }) if role == pki::ROLE_NODE => Ok(common_name),
        _ => Err(HubError::PermissionDenied(
            "this certificate was not issued to a node".into(),
        )),
    }
}
