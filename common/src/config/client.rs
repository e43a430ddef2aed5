//! `client.toml` and where client commands look for their settings.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{invalid, load_toml, ConfigError};

/// `client.toml`, written by `flotilla dev` and read by the client commands.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// A hub's address, or several separated by commas (each is tried in turn).
    pub hub: Option<String>,
    /// Every hub of the cluster, tried in turn when one does not answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<String>,
    /// Path of the cluster CA certificate (PEM).
    pub ca: Option<PathBuf>,
    /// The agent JWT.
    pub token: Option<String>,
    /// A client certificate (PEM) and its key, for clusters that require one beside the
    /// token (`flotilla agent-cert issue`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// Where client commands look for settings: flags first, then environment, then the file.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Hub addresses, in the order to try them.
    pub hubs: Vec<String>,
    pub ca: PathBuf,
    pub token: String,
    /// (certificate, key) to present, when set.
    pub identity: Option<(PathBuf, PathBuf)>,
}

pub const ENV_HUB: &str = "FLOTILLA_HUB";
pub const ENV_TOKEN: &str = "FLOTILLA_TOKEN";
pub const ENV_CA: &str = "FLOTILLA_CA";
pub const ENV_CONFIG: &str = "FLOTILLA_CONFIG";
pub const ENV_CERT: &str = "FLOTILLA_CERT";
pub const ENV_KEY: &str = "FLOTILLA_KEY";

impl ClientSettings {
    /// Resolves settings. `env` is passed in so tests need not touch the process environment.
    pub fn resolve(
        flags: ClientFile,
        config_path: Option<&Path>,
        default_path: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let env_path = env.get(ENV_CONFIG).map(PathBuf::from);
        let path = config_path.map(Path::to_path_buf).or(env_path);
        let file: ClientFile = match &path {
            Some(p) => load_toml(p)?,
            None if default_path.exists() => load_toml(default_path)?,
            None => ClientFile::default(),
        };
        let name = path
            .as_deref()
            .unwrap_or(default_path)
            .display()
            .to_string();
        let pick = |flag: Option<String>, env_key: &str, file: Option<String>| {
            flag.or_else(|| env.get(env_key).cloned()).or(file)
        };
        let listed = (!file.hubs.is_empty()).then(|| file.hubs.join(","));
        let hub = pick(flags.hub, ENV_HUB, listed.or(file.hub)).ok_or_else(|| {
            invalid(
                &name,
                "hub",
                format!("no hub address: pass --hub, set {ENV_HUB}, or run `flotilla dev`"),
            )
        })?;
        let hubs: Vec<String> = hub
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        if hubs.is_empty() {
            return Err(invalid(&name, "hub", "no hub address in it"));
        }
        for h in &hubs {
            crate::tls::split_address(h).map_err(|e| invalid(&name, "hub", e.to_string()))?;
        }
        let ca = pick(
            flags.ca.map(|p| p.display().to_string()),
            ENV_CA,
            file.ca.map(|p| p.display().to_string()),
        )
        .ok_or_else(|| {
            invalid(
                &name,
                "ca",
                format!("no CA certificate: pass --ca or set {ENV_CA}"),
            )
        })?;
        let token = pick(flags.token, ENV_TOKEN, file.token).ok_or_else(|| {
            invalid(
                &name,
                "token",
                format!("no agent token: pass --token or set {ENV_TOKEN}"),
            )
        })?;
        let path_of = |flag: Option<PathBuf>, env_key: &str, file: Option<PathBuf>| {
            pick(
                flag.map(|p| p.display().to_string()),
                env_key,
                file.map(|p| p.display().to_string()),
            )
            .map(PathBuf::from)
        };
        let identity = match (
            path_of(flags.cert, ENV_CERT, file.cert),
            path_of(flags.key, ENV_KEY, file.key),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    &name,
                    "cert",
                    format!("a client certificate needs its key: give both --cert and --key (or {ENV_CERT} and {ENV_KEY})"),
                ))
            }
        };
        Ok(Self {
            hubs,
            ca: PathBuf::from(ca),
            token,
            identity,
        })
    }
}
