//! External issuers: company identity providers whose tokens agents may present besides
//! the cluster's own (`[[agent_tokens.issuers]]` in hub.toml). Each hub keeps every
//! provider's keys in memory, read from its JWKS document: a file is read again when it
//! changes, a URL fetched every `refresh_s` and sooner when a token names a key the hub has
//! not seen (at most every `MIN_FETCH_GAP`). A document that cannot be read keeps the keys
//! the hub had. Nothing here is replicated: every hub reads the same configuration.
//!
//! A token is an external one when its key id is none of the cluster's own keys; it must
//! then verify with the provider's key of that id, carry the provider's `iss` and the
//! configured audience, and its claims are mapped to a tenant and scopes.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        RwLock,
    },
    time::{Duration, Instant},
};

use flotilla_common::{
    config::ExternalIssuer,
    jwt::{self, Claims, ExternalKey, JwtError},
};
use serde_json::Value;
use tokio::sync::watch;

use crate::cluster::Hub;

/// The soonest a URL is fetched again after a fetch, whatever asks for it.
const MIN_FETCH_GAP: Duration = Duration::from_secs(10);
/// How soon a URL that could not be fetched is tried again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// The largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest tenant a provider's claim may name.
const MAX_TENANT_BYTES: usize = 256;

/// Every configured provider, with the keys this hub holds for it.
#[derive(Default)]
pub struct Issuers {
    list: Vec<Issuer>,
}

struct Issuer {
    cfg: ExternalIssuer,
    keys: RwLock<Vec<ExternalKey>>,
    /// A token named a key this provider does not have: fetch its URL again soon.
    wanted: AtomicBool,
}

impl Issuers {
    /// The providers of `cfgs`; the keys of those with a file are read at once.
    pub fn new(cfgs: &[ExternalIssuer]) -> Self {
        let list: Vec<Issuer> = cfgs
            .iter()
            .map(|cfg| Issuer {
                cfg: cfg.clone(),
                keys: RwLock::default(),
                wanted: AtomicBool::new(false),
            })
            .collect();
        for i in &list {
            if let Some(path) = &i.cfg.jwks_file {
                match std::fs::read(path) {
                    Ok(bytes) => i.load(&bytes, &path.display().to_string()),
                    Err(e) => {
                        tracing::error!(issuer = %i.cfg.issuer, path = %path.display(), error = %e, "cannot read the issuer's JWKS file; its tokens are refused until it can be read")
                    }
                }
            }
        }
        Self { list }
    }

    /// Whether a token checked earlier, issued by `issuer` and signed with `kid`, would
    /// still find its key.
    pub fn knows(&self, issuer: &str, kid: &str) -> bool {
        self.list
            .iter()
            .any(|i| i.cfg.issuer == issuer && i.key(kid).is_some())
    }

    /// Verifies `token`, signed with `kid` (a key none of the cluster's own), against the
    /// providers holding a key of that id. `None`: no provider has it.
    pub fn verify(&self, token: &str, kid: &str) -> Option<Result<Claims, JwtError>> {
        let mut last = None;
        for i in &self.list {
            let Some(key) = i.key(kid) else {
                continue;
            };
            match jwt::verify_external(token, &key, &i.cfg.issuer, &i.cfg.audience)
                .and_then(|m| map_claims(&i.cfg, &m))
            {
                Ok(c) => return Some(Ok(c)),
                Err(e) => last = Some(Err(e)),
            }
        }
        if last.is_none() {
            for i in self.list.iter().filter(|i| i.cfg.jwks_url.is_some()) {
                i.wanted.store(true, Ordering::Relaxed);
            }
        }
        last
    }
}

impl Issuer {
    fn key(&self, kid: &str) -> Option<ExternalKey> {
        self.keys
            .read()
            .expect("issuer keys lock")
            .iter()
            .find(|k| k.kid == kid)
            .cloned()
    }

    /// Takes the keys of a JWKS document read from `from`; one that is not a JWKS leaves
    /// the keys as they were.
    fn load(&self, bytes: &[u8], from: &str) {
        let issuer = &self.cfg.issuer;
        match jwt::parse_jwks(bytes) {
            Ok((keys, skipped)) => {
                for why in &skipped {
                    tracing::warn!(issuer, from, "JWKS key skipped: {why}");
                }
                if keys.is_empty() {
                    // The provider published no key this hub can use (or none at all,
                    // after a compromise): none of its tokens is accepted.
                    tracing::warn!(
                        issuer,
                        from,
                        "the issuer's JWKS has no key that can verify tokens; refusing its tokens"
                    );
                }
                let kids: Vec<&str> = keys.iter().map(|k| k.kid.as_str()).collect();
                tracing::info!(issuer, from, keys = ?kids, "issuer keys loaded");
                *self.keys.write().expect("issuer keys lock") = keys;
            }
            Err(e) => {
                tracing::error!(issuer, from, error = %e, "cannot read the issuer's JWKS; keeping the keys held before");
            }
        }
    }
}

/// The cluster's view of an external token: its provider's claims mapped to a subject,
/// tenant and scopes.
fn map_claims(
    cfg: &ExternalIssuer,
    m: &serde_json::Map<String, Value>,
) -> Result<Claims, JwtError> {
    let bad = |why: String| JwtError::Claims(why);
    let text = |name: &str| m.get(name).and_then(Value::as_str).map(str::to_owned);
    let int = |name: &str| m.get(name).and_then(Value::as_i64);
    let sub = text("sub").ok_or_else(|| bad("sub is not a string".into()))?;
    let tenant = match (m.get(&cfg.tenant_claim), &cfg.default_tenant) {
        (Some(Value::String(t)), _) => t.clone(),
        (None, Some(t)) => t.clone(),
        (None, None) => {
            return Err(bad(format!(
                "no {:?} claim to name its tenant",
                cfg.tenant_claim
            )))
        }
        (Some(_), _) => return Err(bad(format!("{:?} is not a string", cfg.tenant_claim))),
    };
    if tenant.is_empty() || tenant.len() > MAX_TENANT_BYTES || tenant.chars().any(char::is_control)
    {
        return Err(bad(format!(
            "{:?} must be 1 to {MAX_TENANT_BYTES} printable bytes",
            cfg.tenant_claim
        )));
    }
    if !cfg.allowed_tenants.is_empty() && !cfg.allowed_tenants.contains(&tenant) {
        return Err(bad(format!(
            "this issuer may not name tenant {tenant:?} (allowed_tenants)"
        )));
    }
    let held: Vec<String> = match m.get(&cfg.scopes_claim) {
        None => Vec::new(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                bad(format!(
                    "{:?} holds something not a string",
                    cfg.scopes_claim
                ))
            })?,
        Some(_) => {
            return Err(bad(format!(
                "{:?} is neither a string nor a list",
                cfg.scopes_claim
            )))
        }
    };
    let scopes = held
        .into_iter()
        .filter(|s| allowed(cfg, s))
        .collect::<Vec<_>>();
    let exp = int("exp").ok_or_else(|| bad("exp is not an integer".into()))?;
    Ok(Claims {
        iss: cfg.issuer.clone(),
        aud: cfg.audience.clone(),
        sub: format!("{}{sub}", cfg.subject_prefix),
        tenant,
        scopes,
        // Revoking a subject covers the tokens issued up to then: it needs to know when.
        iat: int("iat").ok_or_else(|| bad("no iat (issued at) claim".into()))?,
        exp,
        nbf: int("nbf"),
        jti: text("jti").unwrap_or_default(),
        region: None,
        zone: None,
        // Roles are this cluster's names; a provider grants scopes.
        roles: Vec::new(),
    })
}

/// Whether a provider may grant `scope`: listed in `allowed_scopes`, or, with none
/// listed, any scope that opens no part of the admin API.
fn allowed(cfg: &ExternalIssuer, scope: &str) -> bool {
    if cfg.allowed_scopes.is_empty() {
        !jwt::is_admin_scope(scope)
    } else {
        jwt::scope_allows(&cfg.allowed_scopes, scope)
    }
}

/// Keeps every provider's keys fresh on this hub: files checked every second and read
/// again when their bytes change, URLs fetched every `refresh_s` (and soon after a token
/// named an unknown key).
pub(crate) async fn keep_issuers(hub: Hub, mut stop: watch::Receiver<bool>) {
    let issuers = hub.issuers.clone();
    if issuers.list.is_empty() {
        return;
    }
    let client = match web_client(&issuers) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot make the HTTP client for issuers' JWKS URLs");
            return;
        }
    };
    let mut seen_files: Vec<Option<Vec<u8>>> = issuers
        .list
        .iter()
        .map(|i| i.cfg.jwks_file.as_ref().and_then(|p| std::fs::read(p).ok()))
        .collect();
    let mut fetched: Vec<Option<(Instant, bool)>> = vec![None; issuers.list.len()];
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = beat.tick() => {}
            _ = stop.changed() => return,
        }
        for (n, i) in issuers.list.iter().enumerate() {
            if let Some(path) = &i.cfg.jwks_file {
                let now = std::fs::read(path).ok();
                if now.is_some() && now != seen_files[n] {
                    i.load(
                        now.as_deref().unwrap_or_default(),
                        &path.display().to_string(),
                    );
                    seen_files[n] = now;
                }
            }
            let Some(url) = &i.cfg.jwks_url else {
                continue;
            };
            let due = match fetched[n] {
                None => true,
                Some((at, ok)) => {
                    let every = if ok {
                        Duration::from_secs(i.cfg.refresh_s)
                    } else {
                        RETRY_AFTER_FAILURE
                    };
                    at.elapsed() >= every
                        || (i.wanted.load(Ordering::Relaxed) && at.elapsed() >= MIN_FETCH_GAP)
                }
            };
            if !due {
                continue;
            }
            i.wanted.store(false, Ordering::Relaxed);
            let ok = match fetch(&client, url).await {
                Ok(bytes) => {
                    i.load(&bytes, url);
                    true
                }
                Err(e) => {
                    tracing::warn!(issuer = %i.cfg.issuer, url, error = %e, "cannot fetch the issuer's JWKS; keeping the keys held before");
                    false
                }
            };
            fetched[n] = Some((Instant::now(), ok));
        }
    }
}

/// One client for every provider's URL: the public web roots and every `jwks_ca_file`.
fn web_client(issuers: &Issuers) -> anyhow::Result<reqwest::Client> {
    let mut extra = String::new();
    for i in &issuers.list {
        if let Some(path) = &i.cfg.jwks_ca_file {
            extra.push_str(
                &std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("jwks_ca_file {}: {e}", path.display()))?,
            );
            extra.push('\n');
        }
    }
    let tls = flotilla_common::tls::web_client_config((!extra.is_empty()).then_some(&extra[..]))?;
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(FETCH_TIMEOUT)
        .redirect(reqwest::redirect::Policy::custom(|a| {
            // Never from https to cleartext, and not far.
            if a.url().scheme() != "https" || a.previous().len() >= 3 {
                a.stop()
            } else {
                a.follow()
            }
        }))
        .build()?)
}

/// The body at `url`, if it answers 200 with at most `MAX_JWKS_BYTES`.
async fn fetch(client: &reqwest::Client, url: &str) -> anyhow::Result<Vec<u8>> {
    let mut resp = client.get(url).send().await?.error_for_status()?;
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            anyhow::bail!("the document is larger than {MAX_JWKS_BYTES} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> ExternalIssuer {
        serde_json::from_value(json!({
            "issuer": "https://idp.example",
            "audience": "flotilla-prod",
            "jwks_file": "/nonexistent",
        }))
        .unwrap()
    }

    /// An ES256 key as a provider would publish it, and a token it signed over `claims`.
    fn signed(claims: Value) -> (Issuers, String) {
        let key = jwt::SigningKey::generate(0).unwrap();
        let doc = json!({"keys": [key.jwk().unwrap()]});
        let issuers = Issuers::new(&[cfg()]);
        issuers.list[0].load(doc.to_string().as_bytes(), "test");
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        let enc = jsonwebtoken::EncodingKey::from_ec_pem(key.private_pem.as_bytes()).unwrap();
        (
            issuers,
            jsonwebtoken::encode(&header, &claims, &enc).unwrap(),
        )
    }

    fn now() -> i64 {
        flotilla_common::now_ms() / 1000
    }

    fn base() -> Value {
        json!({"iss": "https://idp.example", "aud": "flotilla-prod", "sub": "alice@corp",
               "exp": now() + 600, "iat": now(), "tenant": "payments", "jti": "j1",
               "scope": "tools:read admin * admin:credentials"})
    }

    fn verify(issuers: &Issuers, token: &str) -> Result<Claims, JwtError> {
        let kid = jwt::token_kid(token).unwrap().unwrap();
        issuers.verify(token, &kid).expect("the issuer has the key")
    }

    #[test]
    fn a_providers_token_maps_to_tenant_and_scopes_without_admin_unless_allowed() {
        let (issuers, token) = signed(base());
        let c = verify(&issuers, &token).unwrap();
        assert_eq!(
            (c.sub.as_str(), c.tenant.as_str(), c.iss.as_str()),
            ("alice@corp", "payments", "https://idp.example")
        );
        assert_eq!(
            c.scopes,
            vec!["tools:read"],
            "admin and * dropped by default"
        );
        assert!(!c.has_scope(jwt::ADMIN_SCOPE));

        let mut with_admin = cfg();
        with_admin.allowed_scopes = vec!["tools:*".into(), "admin".into()];
        assert!(allowed(&with_admin, "admin") && allowed(&with_admin, "tools:read"));
        assert!(!allowed(&with_admin, "*") && !allowed(&with_admin, "billing"));
    }

    #[test]
    fn a_provider_names_only_its_allowed_tenants_and_its_subjects_carry_its_prefix() {
        let mut limited = cfg();
        limited.allowed_tenants = vec!["payments".into()];
        limited.subject_prefix = "corp:".into();
        let m = base().as_object().unwrap().clone();
        let c = map_claims(&limited, &m).unwrap();
        assert_eq!(c.sub, "corp:alice@corp");
        let mut other = m.clone();
        other.insert("tenant".into(), json!("billing"));
        let e = map_claims(&limited, &other).unwrap_err();
        assert!(e.to_string().contains("may not name tenant"), "{e}");
        // Without a list, any tenant; without a prefix, the provider's subject as it is.
        assert_eq!(map_claims(&cfg(), &other).unwrap().sub, "alice@corp");
    }

    #[test]
    fn wrong_issuer_audience_tenant_or_key_is_refused() {
        for (field, value) in [
            ("iss", json!("https://evil.example")),
            ("aud", json!("someone-else")),
            ("tenant", json!(7)),
            ("exp", json!(now() - 600)),
        ] {
            let mut claims = base();
            claims[field] = value;
            let (issuers, token) = signed(claims);
            assert!(verify(&issuers, &token).is_err(), "{field} accepted");
        }
        let mut claims = base();
        claims.as_object_mut().unwrap().remove("tenant");
        let (issuers, token) = signed(claims);
        let e = verify(&issuers, &token).unwrap_err();
        assert!(e.user_message().contains("tenant"), "{e}");
        // Without iat a subject's revocation could not tell when it was issued.
        let mut claims = base();
        claims.as_object_mut().unwrap().remove("iat");
        let (issuers, token) = signed(claims);
        let e = verify(&issuers, &token).unwrap_err();
        assert!(e.user_message().contains("iat"), "{e}");
        // A key the provider does not publish: not this provider's token at all.
        let (other, _) = signed(base());
        let (_, token) = signed(base());
        let kid = jwt::token_kid(&token).unwrap().unwrap();
        assert!(other.verify(&token, &kid).is_none());
    }

    #[test]
    fn an_unreadable_document_keeps_the_keys_held_and_an_empty_one_drops_them() {
        let (issuers, token) = signed(base());
        issuers.list[0].load(b"{not json", "test");
        assert!(verify(&issuers, &token).is_ok());
        // A document with no usable key (only a shared secret, which is never trusted)
        // leaves the provider with none.
        let secret_only = br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}"#;
        issuers.list[0].load(secret_only, "test");
        let kid = jwt::token_kid(&token).unwrap().unwrap();
        assert!(issuers.verify(&token, &kid).is_none());
    }
}
