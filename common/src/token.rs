//! Join tokens: `flt1.<ca-pin-hex>.<id>.<secret>`. The id names the token in the replicated
//! state (which keeps only a hash of the secret); the pin lets the node check the hub's CA
//! before it sends the secret.

use sha2::{Digest, Sha256};

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// `sha256:<hex>` of the CA public key.
    pub ca_pin: String,
    pub id: String,
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_pin", &self.ca_pin)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed join token: expected flt1.<ca-pin>.<id>.<secret> as printed by `flotilla token create`")]
pub struct MalformedToken;

impl JoinToken {
    pub fn generate(ca_pin: &str) -> Self {
        Self {
            ca_pin: ca_pin.to_owned(),
            id: crate::random_id(6),
            secret: crate::random_id(24),
        }
    }

    pub fn parse(s: &str) -> Result<Self, MalformedToken> {
        let mut parts = s.trim().split('.');
        let (Some("flt1"), Some(pin), Some(id), Some(secret), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(MalformedToken);
        };
        let hexish = |v: &str, n: usize| v.len() == n && v.bytes().all(|b| b.is_ascii_hexdigit());
        if !hexish(pin, 64) || id.is_empty() || secret.len() < 16 {
            return Err(MalformedToken);
        }
        Ok(Self {
            ca_pin: format!("sha256:{pin}"),
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pin = self.ca_pin.strip_prefix("sha256:").unwrap_or(&self.ca_pin);
        write!(f, "flt1.{pin}.{}.{}", self.id, self.secret)
    }
}

/// SHA-256 hex of a join secret: what the replicated state keeps.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let pin = format!("sha256:{}", "ab".repeat(32));
        let t = JoinToken::generate(&pin);
        let parsed = JoinToken::parse(&t.to_string()).unwrap();
        assert_eq!(parsed, t);
        assert!(!format!("{t:?}").contains(&t.secret));
    }

    #[test]
    fn malformed() {
        for bad in [
            "",
            "flt1.x.y.z",
            "flt2.aa.id.secretsecretsecret",
            "flt1....",
        ] {
            assert_eq!(JoinToken::parse(bad), Err(MalformedToken), "{bad}");
        }
    }
}
