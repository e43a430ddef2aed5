//! Who is calling: agents by JWT (`authorization: Bearer ...`), nodes by the client
//! certificate the cluster CA issued them when they joined.

use flotilla_common::{
    jwt::{self, Claims, JwtError},
    pki::{self, PeerIdentity},
    tls::PeerInfo,
};
use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex},
};

use lru::LruCache;
use tonic::Request;

use crate::{cluster::Hub, error::HubError, issuers::Issuers};

/// Tokens this hub verified recently. Checking an ES256 signature cost more CPU than the
/// rest of a tool call (a profile of the hub under load: a fifth of its time), and an agent
/// sends the same token with every request. A cached token is used only while the key that
/// signed it is still in the state and the clock is inside its validity window; anything
/// else is verified in full.
#[derive(Clone)]
pub struct TokenCache(Arc<Mutex<LruCache<String, (String, Claims)>>>);

/// Distinct tokens remembered (about half a KiB each).
const CACHED_TOKENS: usize = 4096;

/// The clock skew `jwt::verify` allows, in seconds.
const LEEWAY_S: i64 = 5;

impl Default for TokenCache {
    fn default() -> Self {
        let cap = NonZeroUsize::new(CACHED_TOKENS).expect("non-zero");
        Self(Arc::new(Mutex::new(LruCache::new(cap))))
    }
}

impl TokenCache {
    /// The claims of `token`, verified against the cluster's `keys` or, when it names a key
    /// none of them has, an external issuer's, unless a still-valid verification is cached.
    fn verify(
        &self,
        token: &str,
        keys: &[jwt::SigningKey],
        issuers: &Issuers,
    ) -> Result<Claims, JwtError> {
        let now = flotilla_common::now_ms() / 1000;
        let hit = self
            .0
            .lock()
            .expect("token cache lock")
            .get(token)
            .filter(|(kid, c)| still_valid(kid, c, keys, issuers, now))
            .map(|(_, c)| c.clone());
        if let Some(c) = hit {
            return Ok(c);
        }
        let (kid, claims) = match jwt::verify_with_kid(token, keys) {
            Err(JwtError::UnknownKey(kid)) => match issuers.verify(token, &kid) {
                Some(verified) => (kid, verified?),
                None => return Err(JwtError::UnknownKey(kid)),
            },
            other => other?,
        };
        self.0
            .lock()
            .expect("token cache lock")
            .put(token.to_owned(), (kid, claims.clone()));
        Ok(claims)
    }
}

/// Whether a token verified earlier (signed by `kid`, saying `c`) is still good at `now`
/// (seconds): its key is still there and the clock is inside its validity window.
fn still_valid(
    kid: &str,
    c: &Claims,
    keys: &[jwt::SigningKey],
    issuers: &Issuers,
    now: i64,
) -> bool {
    let key_held = if c.iss == jwt::ISSUER {
        keys.iter().any(|k| k.kid == kid)
    } else {
        issuers.knows(&c.iss, kid)
    };
    key_held && now <= c.exp + LEEWAY_S && c.nbf.is_none_or(|nbf| now + LEEWAY_S >= nbf)
}

/// Where a request came from, for the audit trail.
pub fn source<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.remote_addr)
        .map_or_else(String::new, |a| a.ip().to_string())
}

/// Verifies the request's bearer token against the signing keys in the hub's state.
pub fn agent<T>(req: &Request<T>, hub: &Hub) -> Result<Claims, HubError> {
    let denied = |actor: &str, tenant: &str, reason: &str| {
        hub.audit
            .denied(hub.id(), actor, tenant, "agent token", reason, &source(req));
    };
    let Some(token) = bearer(req) else {
        hub.metrics.auth_failed(JwtError::Missing.reason());
        denied("unauthenticated", "", JwtError::Missing.reason());
        return Err(HubError::Unauthenticated(JwtError::Missing.to_string()));
    };
    match check_token(hub, token) {
        Ok(claims) => match client_certificate(req, hub, &claims) {
            Ok(()) => Ok(claims),
            Err(why) => {
                tracing::info!(subject = ?claims.sub, why, "refused an agent without its client certificate");
                hub.metrics.auth_failed("client_certificate");
                denied(&claims.sub, &claims.tenant, "client_certificate");
                Err(HubError::Unauthenticated(why.to_owned()))
            }
        },
        Err(Refusal::Invalid(e)) => {
            tracing::info!(error = %e, "rejected agent token");
            hub.metrics.auth_failed(e.reason());
            denied("unauthenticated", "", e.reason());
            Err(HubError::Unauthenticated(e.user_message()))
        }
        Err(Refusal::Policy {
            claims,
            reason,
            why,
        }) => {
            tracing::info!(subject = ?claims.sub, jti = ?claims.jti, reason, "rejected agent token");
            hub.metrics.auth_failed(reason);
            denied(&claims.sub, &claims.tenant, reason);
            Err(HubError::Unauthenticated(format!("invalid token: {why}")))
        }
    }
}

/// Where hub.toml requires agents to present a client certificate beside their token: the
/// connection's certificate must be one the cluster CA issued to an agent (`flotilla
/// agent-cert issue`), for the token's subject.
fn client_certificate<T>(req: &Request<T>, hub: &Hub, claims: &Claims) -> Result<(), &'static str> {
    if !hub.config().agent_tokens.require_client_certificate {
        return Ok(());
    }
    let peer = req
        .extensions()
        .get::<PeerInfo>()
        .filter(|p| p.client_cert.is_some())
        .ok_or("this cluster requires agents to present a client certificate beside the token (flotilla agent-cert issue; --cert and --key)")?;
    match peer.identity.as_deref() {
        Some(id) if id.role == pki::ROLE_AGENT && id.common_name == claims.sub => Ok(()),
        Some(id) if id.role == pki::ROLE_AGENT => {
            Err("the client certificate was issued for another subject than the token's")
        }
        _ => Err("the client certificate was not issued to an agent"),
    }
}

/// Why a token is refused: it does not verify, or this cluster's policy refuses it.
pub enum Refusal {
    Invalid(JwtError),
    Policy {
        claims: Box<Claims>,
        reason: &'static str,
        why: String,
    },
}

/// Every check an agent token passes: its signature against the keys that verify now, its
/// claims, the cluster's lifetime limit, and the revocation list. (Whoever holds a session
/// made from a token, a dashboard page, is checked again with this.)
pub fn check_token(hub: &Hub, token: &str) -> Result<Claims, Refusal> {
    let now_ms = flotilla_common::now_ms();
    let keys = hub.state().verifying_keys(now_ms);
    let claims = hub
        .tokens
        .verify(token, &keys, &hub.issuers)
        .map_err(Refusal::Invalid)?;
    let max_s = hub.config().agent_tokens.max_lifetime_s() as i64;
    if claims.exp.saturating_sub(claims.iat) > max_s + LEEWAY_S {
        return Err(Refusal::Policy {
            why: format!(
                "it lives longer than this cluster allows ({max_s} s from issue to expiry)"
            ),
            claims: Box::new(claims),
            reason: "lifetime_too_long",
        });
    }
    let state = hub.state();
    if let Some(why) = state.revoked.refuses(&claims) {
        return Err(Refusal::Policy {
            claims: Box::new(claims),
            reason: "revoked",
            why,
        });
    }
    let mut claims = claims;
    for role in &claims.roles {
        for scope in state.role_scopes(role) {
            if !claims.scopes.contains(&scope) {
                claims.scopes.push(scope);
            }
        }
    }
    Ok(claims)
}

/// Like [`agent`], and the token must open the admin calls that need `scope` (it holds
/// `admin`, or `scope`, itself or through a role).
pub fn admin<T>(req: &Request<T>, hub: &Hub, scope: &str) -> Result<Claims, HubError> {
    let claims = agent(req, hub)?;
    if !claims.may(scope) {
        hub.metrics.auth_failed("missing_scope");
        hub.audit.denied(
            hub.id(),
            &claims.sub,
            &claims.tenant,
            "admin API",
            "missing_scope",
            &source(req),
        );
        return Err(HubError::PermissionDenied(format!(
            "this needs the `{scope}` scope (or `{}`), which the token of {:?} does not hold",
            jwt::ADMIN_SCOPE,
            claims.sub
        )));
    }
    Ok(claims)
}

/// The request's bearer token, as sent.
pub fn bearer<T>(req: &Request<T>) -> Option<&str> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?;
    Some(t.trim())
}

/// The node identity (name and certificate serial) in the verified client certificate of
/// the connection.
pub fn node<T>(req: &Request<T>) -> Result<PeerIdentity, HubError> {
    let peer = req
        .extensions()
        .get::<PeerInfo>()
        .filter(|p| p.client_cert.is_some())
        .ok_or_else(|| {
            HubError::Unauthenticated(
                "a node session needs the client certificate the node got when it joined".into(),
            )
        })?;
    match peer.identity.as_deref() {
        Some(id) if id.role == pki::ROLE_NODE => Ok(id.clone()),
        _ => Err(HubError::PermissionDenied(
            "this certificate was not issued to a node".into(),
        )),
    }
}

/// Signs an agent token with the cluster's active key.
pub fn issue_agent_token(
    hub: &Hub,
    subject: &str,
    tenant: &str,
    (scopes, roles): (Vec<String>, Vec<String>),
    ttl_s: u64,
    locality: (Option<String>, Option<String>),
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
        nbf: None,
        jti: flotilla_common::random_id(12),
        region: locality.0,
        zone: locality.1,
        roles,
    };
    let token = jwt::sign(key, &claims).map_err(|e| HubError::Internal(e.to_string()))?;
    Ok((token, exp * 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            iss: jwt::ISSUER.into(),
            aud: jwt::AUDIENCE.into(),
            sub: "alice".into(),
            tenant: "t".into(),
            exp,
            ..Default::default()
        }
    }

    #[test]
    fn a_cached_token_is_used_only_while_its_key_and_window_hold() {
        let key = jwt::SigningKey::generate(0).unwrap();
        let other = jwt::SigningKey::generate(1).unwrap();
        let now = flotilla_common::now_ms() / 1000;
        let token = jwt::sign(&key, &claims(now + 60)).unwrap();
        let cache = TokenCache::default();
        let none = Issuers::default();
        let keys = vec![key.clone()];
        assert_eq!(cache.verify(&token, &keys, &none).unwrap().sub, "alice");
        // Cached now; once its key is gone it is refused, as a fresh check would.
        assert!(cache
            .verify(&token, std::slice::from_ref(&other), &none)
            .is_err());
        // A tampered copy is never served from the cache.
        let mut tampered = token.clone();
        tampered.push('x');
        assert!(cache.verify(&tampered, &keys, &none).is_err());

        let c = claims(now + 60);
        assert!(still_valid(&key.kid, &c, &keys, &none, now));
        assert!(still_valid(&key.kid, &c, &keys, &none, now + 65));
        assert!(
            !still_valid(&key.kid, &c, &keys, &none, now + 66),
            "expired"
        );
        assert!(
            !still_valid(&other.kid, &c, &keys, &none, now),
            "key removed"
        );
        let later = Claims {
            nbf: Some(now + 100),
            ..c
        };
        assert!(
            !still_valid(&key.kid, &later, &keys, &none, now),
            "not yet valid"
        );
    }
}
