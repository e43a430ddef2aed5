//! `node.toml`: a node's settings and the MCP servers it hosts.

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{defaults, invalid, ConfigError};

/// One MCP server a node hosts, started as a child process (never through a shell).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    pub name: String,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How many calls may run on this server at once.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// The scope an agent must hold to call this server's tools.
    #[serde(default = "default_scope")]
    pub scope: String,
}

fn default_max_concurrency() -> u32 {
    defaults::MAX_CONCURRENCY
}
fn default_scope() -> String {
    defaults::SERVER_SCOPE.to_owned()
}

/// `node.toml`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// The name the node asks for when it joins.
    pub name: String,
    pub data_dir: PathBuf,
    /// Hub address, `https://HOST:PORT`.
    pub hub: String,
    /// Needed on first start only; afterwards the node uses its certificate.
    #[serde(default)]
    pub join_token: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// On SIGTERM the node takes no new work and lets the calls it runs finish (their
    /// results reach the hub) for at most this long, then stops. Keep it below the
    /// supervisor's own grace (Kubernetes: terminationGracePeriodSeconds, 30 s).
    #[serde(default = "default_stop_grace")]
    pub stop_grace_ms: u64,
    #[serde(default)]
    pub servers: Vec<McpServerConfig>,
    /// Tenants whose tasks this node runs; empty: every tenant.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// No new work while whole-machine CPU is at or above this percent; 0: no limit.
    #[serde(default)]
    pub cpu_high_water_percent: f64,
    /// Plain HTTP for operators: `/metrics`, `/healthz`, `/readyz`. Port 0 (the default)
    /// picks a free port, written to `http.addr` in the data dir.
    #[serde(default = "default_http_listen")]
    pub http_listen: String,
    /// The address people and tools use to reach `http_listen` (`flotilla nodes`);
    /// defaults to `http(s)://<http_listen>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_advertise: Option<String>,
    /// Serve the HTTP port over TLS with this certificate chain (PEM) and `http_tls_key`;
    /// unset: plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_tls_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_tls_key: Option<PathBuf>,
    /// Where to send OpenTelemetry traces (OTLP over plain HTTP, `http://collector:4318`);
    /// unset: the standard `OTEL_EXPORTER_OTLP_ENDPOINT`, and without either no traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

fn default_http_listen() -> String {
    super::defaults::HTTP_LISTEN.to_owned()
}

fn default_heartbeat() -> u64 {
    defaults::HEARTBEAT_MS
}

fn default_stop_grace() -> u64 {
    25_000
}

pub type NodeConfig = NodeFile;

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

impl NodeFile {
    pub fn validate(mut self, file: &str) -> Result<NodeConfig, ConfigError> {
        // `join_token = "${FLOTILLA_JOIN_TOKEN}"` with the variable unset or empty (a node
        // that joined already, started without it) means no token.
        self.join_token = self.join_token.filter(|t| !t.trim().is_empty());
        if !valid_name(&self.name) {
            return Err(invalid(
                file,
                "name",
                "must be 1-63 characters of a-z, 0-9 and '-'",
            ));
        }
        crate::tls::split_address(&self.hub).map_err(|e| invalid(file, "hub", e.to_string()))?;
        if let Some(t) = &self.join_token {
            crate::token::JoinToken::parse(t)
                .map_err(|e| invalid(file, "join_token", e.to_string()))?;
        }
        if !(100..=60_000).contains(&self.heartbeat_ms) {
            return Err(invalid(
                file,
                "heartbeat_ms",
                "must be between 100 and 60000",
            ));
        }
        if self.stop_grace_ms > 600_000 {
            return Err(invalid(
                file,
                "stop_grace_ms",
                "must be at most 600000 (ten minutes)",
            ));
        }
        if self.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                file,
                "http_listen",
                format!("{:?} is not HOST:PORT with an IP host", self.http_listen),
            ));
        }
        if let Some(e) = &self.otlp_endpoint {
            super::check_otlp_endpoint(e).map_err(|m| invalid(file, "otlp_endpoint", m))?;
        }
        super::check_http_tls(file, self.http_tls_cert.clone(), self.http_tls_key.clone())?;
        super::check_http_advertise(
            file,
            self.http_advertise.clone(),
            self.http_tls_cert.is_some(),
        )?;
        if !(0.0..=100.0).contains(&self.cpu_high_water_percent) {
            return Err(invalid(
                file,
                "cpu_high_water_percent",
                "must be between 0 (no limit) and 100",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.servers.iter().enumerate() {
            let key = |k: &str| format!("servers[{i}].{k}");
            if !valid_name(&s.name) {
                return Err(invalid(
                    file,
                    key("name"),
                    "must be 1-63 characters of a-z, 0-9 and '-'",
                ));
            }
            if !seen.insert(&s.name) {
                return Err(invalid(
                    file,
                    key("name"),
                    format!("duplicate server name {:?}", s.name),
                ));
            }
            if s.command.trim().is_empty() {
                return Err(invalid(file, key("command"), "must not be empty"));
            }
            if s.max_concurrency == 0 {
                return Err(invalid(file, key("max_concurrency"), "must be at least 1"));
            }
            if s.scope.trim().is_empty() {
                return Err(invalid(file, key("scope"), "must not be empty"));
            }
        }
        Ok(self)
    }
}
