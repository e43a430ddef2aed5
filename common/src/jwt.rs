//! Agent tokens: ES256 JWTs with pinned algorithm, checked `exp`/`iss`/`aud`, keys by `kid`.
//! The hub keeps its signing keys in replicated state, so any hub can verify and the leader
//! can issue.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const ISSUER: &str = "flotilla";
pub const AUDIENCE: &str = "flotilla";
/// The scope that opens the whole admin API.
pub const ADMIN_SCOPE: &str = "admin";
/// Narrower admin scopes, each opening part of the admin API.
pub const ADMIN_READ: &str = "admin:read";
pub const ADMIN_NODES: &str = "admin:nodes";
pub const ADMIN_TASKS: &str = "admin:tasks";
pub const ADMIN_CREDENTIALS: &str = "admin:credentials";
pub const ADMIN_CLUSTER: &str = "admin:cluster";

/// The roles every cluster has, and the scopes they grant.
pub const BUILTIN_ROLES: [(&str, &[&str]); 3] = [
    ("viewer", &[ADMIN_READ]),
    ("operator", &[ADMIN_READ, ADMIN_NODES, ADMIN_TASKS]),
    ("admin", &["*"]),
];

/// Whether `scope` opens any part of the admin API (`*` included).
pub fn is_admin_scope(scope: &str) -> bool {
    scope == "*" || scope == ADMIN_SCOPE || scope.starts_with("admin:")
}
/// The tenant of a token that does not name one.
pub const DEFAULT_TENANT: &str = "default";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub tenant: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    /// Not valid before this (seconds since the epoch), when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub jti: String,
    /// Where the agent runs: the default locality of its tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Roles held: their scopes join `scopes` when the token is checked, as the cluster's
    /// roles say then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

impl Claims {
    pub fn has_scope(&self, required: &str) -> bool {
        scope_allows(&self.scopes, required)
    }

    /// Whether the token opens the admin calls that need `scope`: it holds `admin`, or
    /// that scope.
    pub fn may(&self, scope: &str) -> bool {
        self.has_scope(ADMIN_SCOPE) || self.has_scope(scope)
    }
}

/// True when `held` grants `required`: an exact match, `*`, or a `prefix:*` wildcard.
pub fn scope_allows(held: &[String], required: &str) -> bool {
    held.iter().any(|s| {
        s == "*"
            || s == required
            || s.strip_suffix('*')
                .is_some_and(|p| p.ends_with(':') && required.starts_with(p))
    })
}

/// One signing key, as kept in replicated state. The private half is PKCS#8 PEM.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigningKey {
    pub kid: String,
    pub private_pem: String,
    pub public_pem: String,
    pub created_at_ms: i64,
    /// Set when a newer key took over signing: from then on the key still verifies the
    /// tokens it signed, until this time, when none of them can be valid any more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at_ms: Option<i64>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn generate(now_ms: i64) -> Result<Self, JwtError> {
        let key = rcgen::KeyPair::generate().map_err(|e| JwtError::Key(e.to_string()))?;
        Ok(Self {
            kid: crate::random_id(8),
            private_pem: key.serialize_pem(),
            public_pem: key.public_key_pem(),
            created_at_ms: now_ms,
            retire_at_ms: None,
        })
    }

    /// Still verifies tokens at `now_ms`.
    pub fn live_at(&self, now_ms: i64) -> bool {
        self.retire_at_ms.is_none_or(|t| now_ms < t)
    }

    /// The public half as a JSON Web Key (RFC 7517/7518: EC P-256, for ES256).
    pub fn jwk(&self) -> Result<serde_json::Value, JwtError> {
        use base64::Engine as _;
        let key = rcgen::KeyPair::from_pem(&self.private_pem)
            .map_err(|e| JwtError::Key(e.to_string()))?;
        // The uncompressed point: 0x04, then x and y, 32 bytes each.
        let point = key.public_key_raw();
        if point.len() != 65 || point[0] != 4 {
            return Err(JwtError::Key("not an uncompressed P-256 point".into()));
        }
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        Ok(serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "alg": "ES256",
            "use": "sig",
            "kid": self.kid,
            "x": b64.encode(&point[1..33]),
            "y": b64.encode(&point[33..]),
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("missing bearer token: send `authorization: Bearer <jwt>`")]
    Missing,
    #[error("token has no key id (kid)")]
    NoKid,
    #[error("token signed by unknown key {0:?}")]
    UnknownKey(String),
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("signing key: {0}")]
    Key(String),
    #[error("no signing key yet: the cluster is still starting")]
    NoSigningKey,
    /// An external issuer's token whose claims do not map to this cluster's.
    #[error("invalid token: {0}")]
    Claims(String),
}

impl JwtError {
    /// A short, fixed name for why (a metric label).
    pub fn reason(&self) -> &'static str {
        use jsonwebtoken::errors::ErrorKind as K;
        match self {
            JwtError::Missing => "missing_token",
            JwtError::NoKid | JwtError::UnknownKey(_) => "unknown_key",
            JwtError::Key(_) | JwtError::NoSigningKey => "no_signing_key",
            JwtError::Claims(_) => "bad_claims",
            JwtError::Invalid(e) => match e.kind() {
                K::ExpiredSignature => "expired",
                K::ImmatureSignature => "not_yet_valid",
                K::InvalidSignature => "bad_signature",
                K::InvalidIssuer | K::InvalidAudience => "wrong_issuer_or_audience",
                _ => "malformed",
            },
        }
    }

    /// What to tell the caller: precise, without internals.
    pub fn user_message(&self) -> String {
        use jsonwebtoken::errors::ErrorKind as K;
        match self {
            JwtError::Invalid(e) => match e.kind() {
                K::ExpiredSignature => "invalid token: it has expired; issue a new one".into(),
                K::ImmatureSignature => {
                    "invalid token: not valid yet (its nbf is in the future)".into()
                }
                K::InvalidSignature => "invalid token: signature does not verify".into(),
                K::InvalidIssuer => "invalid token: wrong issuer".into(),
                K::InvalidAudience => "invalid token: wrong audience".into(),
                K::InvalidAlgorithm => {
                    "invalid token: algorithm not accepted (ES256 for this cluster's tokens; an external issuer's key fixes its own)".into()
                }
                K::MissingRequiredClaim(c) => format!("invalid token: missing claim {c:?}"),
                _ => "invalid token: malformed".into(),
            },
            other => other.to_string(),
        }
    }
}

/// Signs `claims` with `key`.
pub fn sign(key: &SigningKey, claims: &Claims) -> Result<String, JwtError> {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    let enc = EncodingKey::from_ec_pem(key.private_pem.as_bytes())?;
    Ok(jsonwebtoken::encode(&header, claims, &enc)?)
}

/// Verifies a token against the known keys: ES256 only, issuer, audience and expiry checked.
pub fn verify<'a>(
    token: &str,
    keys: impl IntoIterator<Item = &'a SigningKey>,
) -> Result<Claims, JwtError> {
    verify_with_kid(token, keys).map(|(_, c)| c)
}

/// [`verify`], also saying which key signed the token.
pub fn verify_with_kid<'a>(
    token: &str,
    keys: impl IntoIterator<Item = &'a SigningKey>,
) -> Result<(String, Claims), JwtError> {
    let header = jsonwebtoken::decode_header(token)?;
    let kid = header.kid.ok_or(JwtError::NoKid)?;
    let key = keys
        .into_iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| JwtError::UnknownKey(kid.clone()))?;
    let dec = DecodingKey::from_ec_pem(key.public_pem.as_bytes())?;
    let mut v = Validation::new(Algorithm::ES256);
    v.set_issuer(&[ISSUER]);
    v.set_audience(&[AUDIENCE]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.validate_nbf = true;
    v.leeway = 5;
    Ok((kid, jsonwebtoken::decode::<Claims>(token, &dec, &v)?.claims))
}

/// A signing key of an external issuer (a company identity provider), read from its
/// JWKS document. The algorithm is the key's own (its `alg`, or what its type and curve
/// allow), never what a token's header asks for.
#[derive(Clone)]
pub struct ExternalKey {
    pub kid: String,
    pub alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for ExternalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The signature keys of a JWKS document (RFC 7517). Keys without a `kid`, meant for
/// encryption, symmetric (`oct`: a JWKS is public, a shared secret in one is a mistake),
/// or of a type or algorithm this build cannot verify are skipped, each with the reason
/// in the second list. An error only when the document is not a JWKS at all.
pub fn parse_jwks(bytes: &[u8]) -> Result<(Vec<ExternalKey>, Vec<String>), String> {
    use jsonwebtoken::jwk::{AlgorithmParameters as P, EllipticCurve as C, Jwk, PublicKeyUse};
    #[derive(Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
    let (mut keys, mut skipped) = (Vec::new(), Vec::new());
    for (i, v) in doc.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(v) {
            Ok(j) => j,
            Err(e) => {
                skipped.push(format!("key {i}: unreadable: {e}"));
                continue;
            }
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            skipped.push(format!("key {i}: no kid"));
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            skipped.push(format!("key {kid:?}: not for signatures"));
            continue;
        }
        let natural = match &jwk.algorithm {
            P::RSA(_) => Some(Algorithm::RS256),
            P::EllipticCurve(p) if p.curve == C::P256 => Some(Algorithm::ES256),
            P::EllipticCurve(p) if p.curve == C::P384 => Some(Algorithm::ES384),
            P::OctetKeyPair(p) if p.curve == C::Ed25519 => Some(Algorithm::EdDSA),
            _ => None,
        };
        let alg = match (jwk.common.key_algorithm, natural) {
            (_, None) => None,
            (None, n) => n,
            (Some(a), Some(n)) => a
                .to_string()
                .parse::<Algorithm>()
                .ok()
                .filter(|a| a.family() == n.family()),
        };
        let Some(alg) = alg else {
            skipped.push(format!(
                "key {kid:?}: a key type or algorithm that cannot verify here"
            ));
            continue;
        };
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => keys.push(ExternalKey { kid, alg, key }),
            Err(e) => skipped.push(format!("key {kid:?}: {e}")),
        }
    }
    Ok((keys, skipped))
}

/// Verifies an external issuer's token with `key`: its algorithm pinned to the key's,
/// `iss` and `aud` as given, `exp` required, `nbf` honoured. Returns every claim, for the
/// issuer's mapping to tenant and scopes.
pub fn verify_external(
    token: &str,
    key: &ExternalKey,
    issuer: &str,
    audience: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, JwtError> {
    let mut v = Validation::new(key.alg);
    v.set_issuer(&[issuer]);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.validate_nbf = true;
    v.leeway = 5;
    Ok(jsonwebtoken::decode(token, &key.key, &v)?.claims)
}

/// The key id a token's header names, if it names one.
pub fn token_kid(token: &str) -> Result<Option<String>, JwtError> {
    Ok(jsonwebtoken::decode_header(token)?.kid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: "alice".into(),
            tenant: "t1".into(),
            scopes: vec!["tools".into()],
            iat: 0,
            exp,
            nbf: None,
            jti: "j".into(),
            region: None,
            zone: None,
            roles: Vec::new(),
        }
    }

    fn now() -> i64 {
        crate::now_ms() / 1000
    }

    #[test]
    fn round_trip_and_rejections() {
        let k1 = SigningKey::generate(0).unwrap();
        let k2 = SigningKey::generate(0).unwrap();
        let tok = sign(&k1, &claims(now() + 60)).unwrap();
        assert_eq!(verify(&tok, [&k1]).unwrap().sub, "alice");
        assert!(matches!(verify(&tok, [&k2]), Err(JwtError::UnknownKey(_))));
        // Same kid, other key: a forged signature.
        let forged = SigningKey {
            kid: k1.kid.clone(),
            ..k2.clone()
        };
        assert!(matches!(verify(&tok, [&forged]), Err(JwtError::Invalid(_))));
        let expired = sign(&k1, &claims(now() - 600)).unwrap();
        assert!(matches!(verify(&expired, [&k1]), Err(JwtError::Invalid(_))));
        assert!(verify("not.a.jwt", [&k1]).is_err());
        let early = sign(
            &k1,
            &Claims {
                nbf: Some(now() + 600),
                ..claims(now() + 3600)
            },
        )
        .unwrap();
        let e = verify(&early, [&k1]).unwrap_err();
        assert!(e.user_message().contains("not valid yet"), "{e}");
    }

    #[test]
    fn the_jwk_of_a_key_verifies_what_the_key_signed() {
        let k = SigningKey::generate(0).unwrap();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(k.jwk().unwrap()).unwrap();
        assert_eq!(jwk.common.key_id.as_deref(), Some(k.kid.as_str()));
        let tok = sign(&k, &claims(now() + 60)).unwrap();
        let dec = DecodingKey::from_jwk(&jwk).unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[AUDIENCE]);
        let got = jsonwebtoken::decode::<Claims>(&tok, &dec, &v).unwrap();
        assert_eq!(got.claims.sub, "alice");
        // Another key's JWK does not.
        let other: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(SigningKey::generate(0).unwrap().jwk().unwrap()).unwrap();
        let dec = DecodingKey::from_jwk(&other).unwrap();
        assert!(jsonwebtoken::decode::<Claims>(&tok, &dec, &v).is_err());
    }

    #[test]
    fn scope_matching() {
        let held = vec!["tools:*".to_string(), "admin".to_string()];
        assert!(scope_allows(&held, "tools:time"));
        assert!(scope_allows(&held, "admin"));
        assert!(!scope_allows(&held, "other"));
        assert!(!scope_allows(&["tool*".to_string()], "tools"));
        assert!(scope_allows(&["*".to_string()], "anything"));
    }
}
