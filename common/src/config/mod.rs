//! Configuration files (`hub.toml`, `node.toml`, `client.toml`): parsed strictly (unknown
//! keys are errors), then validated into typed values. A bad value is refused with the
//! key's name, never silently corrected. The CLI exits with [`EXIT_CONFIG`] on these errors.

use std::path::Path;

mod client;
mod hub;
mod node;

pub use client::*;
pub use hub::*;
pub use node::*;

/// Exit code for a configuration error (EX_CONFIG from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

pub(crate) fn invalid(
    file: &str,
    key: impl Into<String>,
    message: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_owned(),
        key: key.into(),
        message: message.into(),
    }
}

/// An OTLP/HTTP collector's base address: `http://`, host and optional port (traces go to
/// `<endpoint>/v1/traces`, as with `OTEL_EXPORTER_OTLP_ENDPOINT`). The exporter speaks
/// plain HTTP only: a collector on the same host or private network.
/// `http_advertise`: an `http://` or `https://` address (`https://` exactly when the port
/// serves TLS) of at most 256 printable characters.
pub(crate) fn check_http_advertise(
    file: &str,
    advertise: Option<String>,
    tls: bool,
) -> Result<Option<String>, ConfigError> {
    let Some(a) = advertise else { return Ok(None) };
    let scheme = if tls { "https://" } else { "http://" };
    let rest = a.strip_prefix(scheme).unwrap_or_default();
    if rest.is_empty() || a.len() > 256 || !a.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            file,
            "http_advertise",
            format!(
                "{a:?} is not a {scheme}HOST:PORT address (the port serves {})",
                if tls { "TLS" } else { "plain HTTP" }
            ),
        ));
    }
    Ok(Some(a.trim_end_matches('/').to_owned()))
}

/// The HTTP port's TLS settings (`http_tls_cert`, `http_tls_key`): both or neither, and
/// when set, a certificate chain and a private key that read, parse and go together.
pub(crate) fn check_http_tls(
    file: &str,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
) -> Result<Option<(std::path::PathBuf, std::path::PathBuf)>, ConfigError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(invalid(
            file,
            "http_tls_key",
            "is required with http_tls_cert",
        )),
        (None, Some(_)) => Err(invalid(
            file,
            "http_tls_cert",
            "is required with http_tls_key",
        )),
        (Some(cert), Some(key)) => {
            let read = |field: &str, p: &std::path::Path| {
                std::fs::read_to_string(p)
                    .map_err(|e| invalid(file, field, format!("{}: {e}", p.display())))
            };
            crate::tls::parse_certs(&read("http_tls_cert", &cert)?)
                .map_err(|e| invalid(file, "http_tls_cert", format!("{}: {e}", cert.display())))?;
            crate::tls::parse_key(&read("http_tls_key", &key)?)
                .map_err(|e| invalid(file, "http_tls_key", format!("{}: {e}", key.display())))?;
            match crate::tls::http_server_config(&cert, &key) {
                Ok(_) => Ok(Some((cert, key))),
                Err(e) => Err(invalid(
                    file,
                    "http_tls_key",
                    format!("does not go with the certificate in http_tls_cert: {e}"),
                )),
            }
        }
    }
}

pub(crate) fn check_otlp_endpoint(e: &str) -> Result<(), String> {
    if e.starts_with("https://") {
        return Err(format!(
            "{e:?}: traces are sent over plain HTTP only; point it at a collector's OTLP/HTTP receiver on this host or a private network (http://...)"
        ));
    }
    let rest = e
        .strip_prefix("http://")
        .ok_or_else(|| format!("{e:?} must start with http://"))?;
    if rest.is_empty() || e.len() > 2048 || !e.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{e:?} is not a collector address"));
    }
    Ok(())
}

/// Reads and parses a TOML file with unknown keys refused.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    let text = expand_env(&file, &text, |name| std::env::var(name).ok())?;
    parse_toml(&file, &text)
}

/// Replaces each `${NAME}` in a config file's text with the environment variable `NAME`
/// (letters, digits and `_`), so one file serves many machines or pods (`name =
/// "${HOSTNAME}"`, a secret from the environment); `$${` writes `${`. A variable that is
/// not set is an error naming it and its line.
pub fn expand_env(
    file: &str,
    text: &str,
    var: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        let Some(body) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let line = text[..text.len() - after.len()].matches('\n').count() + 1;
        let end = body.find('}').ok_or_else(|| ConfigError::Parse {
            file: file.to_owned(),
            message: format!("`${{` without a closing `}}` (at line {line})"),
        })?;
        let name = &body[..end];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ConfigError::Parse {
                file: file.to_owned(),
                message: format!(
                    "`${{{name}}}` is not a variable name (letters, digits, _; at line {line}); write `$${{` for a literal `${{`"
                ),
            });
        }
        let value = var(name).ok_or_else(|| ConfigError::Parse {
            file: file.to_owned(),
            message: format!("environment variable {name} is not set (used at line {line})"),
        })?;
        // A value read from a file (a Secret, `token create > f`) ends in a newline: not
        // part of it. What is left must stay inside the string it is put in.
        let value = value.trim_end_matches(['\n', '\r']);
        if value
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\')
        {
            return Err(ConfigError::Parse {
                file: file.to_owned(),
                message: format!(
                    "environment variable {name} (used at line {line}) holds a quote, a backslash or a control character, which cannot go into a config file as it is"
                ),
            });
        }
        out.push_str(value);
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// This machine's host name (a pod's name in Kubernetes): `HOSTNAME`, else the kernel's.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

pub fn parse_toml<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        file: file.to_owned(),
        message: e.message().to_owned()
            + &e.span()
                .map(|s| format!(" (at line {})", text[..s.start].lines().count().max(1)))
                .unwrap_or_default(),
    })
}

/// Defaults, defined once and used by `Default` and `--help`.
pub mod defaults {
    pub const HUB_LISTEN: &str = "127.0.0.1:7443";
    pub const HUB_RAFT_LISTEN: &str = "127.0.0.1:7444";
    /// Where a hub or node serves HTTP (metrics, health): a free local port unless set.
    pub const HTTP_LISTEN: &str = "127.0.0.1:0";
    pub const RAFT_HEARTBEAT_MS: u64 = 100;
    pub const SNAPSHOT_LOGS: u64 = 10_000;
    pub const BREAKER_FAILURES: u32 = 3;
    pub const BREAKER_COOLDOWN_MS: u64 = 10_000;
    /// The lower bound of the randomized election timeout; the upper bound is twice this.
    /// openraft 0.9 starts an election after its leader lease (the upper bound) plus the
    /// timeout, so a leader's death is noticed after 0.9-1.2 s with these defaults.
    pub const RAFT_ELECTION_TIMEOUT_MS: u64 = 300;
    pub const CLUSTER_NAME: &str = "flotilla";
    pub const HEARTBEAT_MS: u64 = 1000;
    pub const NODE_TTL_MS: u64 = 10_000;
    pub const MAX_CONCURRENCY: u32 = 4;
    pub const SERVER_SCOPE: &str = "tools";
    pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
    pub const AGENT_REQUESTS_PER_S: u32 = 1_000;
    pub const AGENT_BURST: u32 = 2_000;
    pub const TENANT_REQUESTS_PER_S: u32 = 0;
    pub const TENANT_BURST: u32 = 0;
    pub const AGENT_STREAMS: u32 = 64;
    pub const TENANT_QUEUED_TASKS: u32 = 10_000;
    pub const TENANT_SLOT_SHARE: f64 = 0.75;
    pub const MAX_CONNECTIONS: u32 = 4_096;
    pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
    pub const IDLE_TIMEOUT_MS: u64 = 300_000;
    /// sled's page cache; sled's own default is 1 GiB, which a hub fills as it writes.
    pub const STORAGE_CACHE_MB: u64 = 64;
    /// Finished tasks stay readable for a day.
    pub const RETENTION_S: u64 = 24 * 3600;
    pub const RETENTION_MAX_TASKS: u64 = 1_000_000;
    /// The audit trail's own records: 30 days, ...
    pub const AUDIT_RETENTION_S: u64 = 30 * 24 * 3600;
    /// ... and 10,000 of each kind (actions, refusals) ...
    pub const AUDIT_MAX_RECORDS: u32 = 10_000;
    /// ... and never more than 100,000 of each, whatever hub.toml says.
    pub const AUDIT_MAX_RECORDS_LIMIT: u32 = 100_000;
    /// 90 days: as long as a node's certificate.
    pub const TOKEN_MAX_LIFETIME_HOURS: u64 = 90 * 24;
    pub const BOOTSTRAP_ADMIN_HOURS: u64 = 24;
    /// 90 days.
    pub const NODE_CERT_LIFETIME_S: u64 = 90 * 24 * 3600;
    pub const JOIN_FAILURES_PER_MIN: u32 = 10;
}

#[cfg(test)]
mod tests;
