//! `hub.toml`: a hub's settings and `[limits]`, validated into `HubConfig`.

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{defaults, invalid, ConfigError};

/// `[audit]` in hub.toml: how long the audit trail's own records (admin actions, joins,
/// revocations, refusals) are kept. The leader's settings are the cluster's: give every hub
/// the same. Tool calls' records live as long as their tasks (`retention_s`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// Records older than this many seconds leave.
    pub retention_s: u64,
    /// At most this many records of each kind (actions, refusals) are kept, the newest.
    pub max_records: u32,
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            retention_s: defaults::AUDIT_RETENTION_S,
            max_records: defaults::AUDIT_MAX_RECORDS,
        }
    }
}

impl Audit {
    fn check(&self, file: &str) -> Result<(), ConfigError> {
        if self.retention_s == 0 {
            return Err(invalid(file, "audit.retention_s", "must be at least 1"));
        }
        if !(1..=defaults::AUDIT_MAX_RECORDS_LIMIT).contains(&self.max_records) {
            return Err(invalid(
                file,
                "audit.max_records",
                format!(
                    "must be between 1 and {} (the records live in every snapshot)",
                    defaults::AUDIT_MAX_RECORDS_LIMIT
                ),
            ));
        }
        Ok(())
    }
}

/// `[limits]` in hub.toml: what one agent, tenant or connection may use. 0 turns a rate
/// or count limit off. docs/security.md explains each.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Requests per second one agent (tenant + subject) may make, on average.
    pub agent_requests_per_s: u32,
    /// Requests one agent may make at once above that rate.
    pub agent_burst: u32,
    /// Requests per second all agents of one tenant may make together.
    pub tenant_requests_per_s: u32,
    pub tenant_burst: u32,
    /// Watch streams one agent may hold open at once.
    pub agent_streams: u32,
    /// Tasks one tenant may have waiting in the queue.
    pub tenant_queued_tasks: u32,
    /// The most of one MCP server's slots a tenant may hold (at least one), so another
    /// tenant's call finds a free slot. 1.0 lets one tenant take every slot.
    pub tenant_slot_share: f64,
    /// Open client connections on the API port.
    pub max_connections: u32,
    /// A connection must finish its TLS handshake and send the HTTP/2 preface within this.
    pub handshake_timeout_ms: u64,
    /// A connection with no open request (call, watch or session) for this long is closed.
    pub idle_timeout_ms: u64,
    /// Failed joins allowed from one address per minute; more are refused at once.
    pub join_failures_per_min: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            agent_requests_per_s: defaults::AGENT_REQUESTS_PER_S,
            agent_burst: defaults::AGENT_BURST,
            tenant_requests_per_s: defaults::TENANT_REQUESTS_PER_S,
            tenant_burst: defaults::TENANT_BURST,
            agent_streams: defaults::AGENT_STREAMS,
            tenant_queued_tasks: defaults::TENANT_QUEUED_TASKS,
            tenant_slot_share: defaults::TENANT_SLOT_SHARE,
            max_connections: defaults::MAX_CONNECTIONS,
            handshake_timeout_ms: defaults::HANDSHAKE_TIMEOUT_MS,
            idle_timeout_ms: defaults::IDLE_TIMEOUT_MS,
            join_failures_per_min: defaults::JOIN_FAILURES_PER_MIN,
        }
    }
}

impl Limits {
    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("limits.{k}");
        if !(self.tenant_slot_share > 0.0 && self.tenant_slot_share <= 1.0) {
            return Err(invalid(
                file,
                key("tenant_slot_share"),
                "must be above 0 and at most 1",
            ));
        }
        if self.agent_requests_per_s > 0 && self.agent_burst == 0 {
            return Err(invalid(
                file,
                key("agent_burst"),
                "must be at least 1 when agent_requests_per_s is set",
            ));
        }
        if self.tenant_requests_per_s > 0 && self.tenant_burst == 0 {
            return Err(invalid(
                file,
                key("tenant_burst"),
                "must be at least 1 when tenant_requests_per_s is set",
            ));
        }
        if self.handshake_timeout_ms == 0 {
            return Err(invalid(
                file,
                key("handshake_timeout_ms"),
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// `[agent_tokens]` in hub.toml: how long the tokens agents present may live.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentTokens {
    /// The longest lifetime (expiry minus issue time) a token may have: a longer one is
    /// refused when issued and when presented. Revocations and rotated signing keys are kept
    /// this long, since no token they cover can be valid after it.
    pub max_lifetime_hours: u64,
    /// Lifetime of the admin token a hub leaves in its data dir (`admin.token`, renewed
    /// while the hub runs when half of it has passed).
    pub bootstrap_admin_hours: u64,
    /// Identity providers whose tokens agents may present besides this cluster's own
    /// (`[[agent_tokens.issuers]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub issuers: Vec<ExternalIssuer>,
    /// Agents (admins included) must also present a client certificate the cluster CA
    /// issued for the token's subject (`flotilla agent-cert issue`): mutual TLS end to end.
    /// Each hub then keeps one for `admin` in its data dir (`admin.pem`, `admin.key`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub require_client_certificate: bool,
}

/// `[[agent_tokens.issuers]]`: a company identity provider this cluster trusts. Its tokens
/// are verified with the keys it publishes (a JWKS document), must carry its `iss` and this
/// cluster's `audience`, and are mapped to a tenant and scopes by their claims. The
/// cluster's lifetime limit and revocations apply to them as to the cluster's own.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExternalIssuer {
    /// The provider's `iss`, exactly as its tokens carry it.
    pub issuer: String,
    /// The `aud` its tokens must carry to be accepted here.
    pub audience: String,
    /// Its keys: a JWKS document in a file, read again whenever the file changes...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// ...or fetched from this URL (https; http only for a loopback address) every
    /// `refresh_s`, and sooner when a token names a key the hub has not seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Certificates (PEM) trusted for `jwks_url` besides the public web roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_ca_file: Option<PathBuf>,
    #[serde(default = "default_jwks_refresh_s")]
    pub refresh_s: u64,
    /// The claim naming the tenant.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// The tenant of a token without `tenant_claim`; unset: such a token is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_tenant: Option<String>,
    /// The claim holding scopes: a space-separated string (OAuth's `scope`) or a list.
    #[serde(default = "default_scopes_claim")]
    pub scopes_claim: String,
    /// The scopes its tokens may grant (`prefix:*` and `*` as in scopes); others are
    /// dropped. Empty (the default): any scope but `admin` and the wildcards that would
    /// grant it, so a provider opens the admin API only when listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_scopes: Vec<String>,
    /// The tenants its tokens may name; a token for any other is refused. Empty (the
    /// default): any tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_tenants: Vec<String>,
    /// Put before every subject from this provider (e.g. `corp:`), so that its users are
    /// told apart from this cluster's own subjects and another provider's in the audit
    /// trail, in revocations and in client certificates. Empty (the default): none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject_prefix: String,
}

fn default_jwks_refresh_s() -> u64 {
    300
}
fn default_tenant_claim() -> String {
    "tenant".into()
}
fn default_scopes_claim() -> String {
    "scope".into()
}

/// Whether `url` is `http://` to this machine: a loopback IP or exactly `localhost`, with
/// no user part (`http://localhost@elsewhere/` is elsewhere).
fn http_to_loopback(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl ExternalIssuer {
    fn validate(&self, file: &str, i: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("agent_tokens.issuers[{i}].{k}");
        if self.issuer.trim().is_empty() || self.issuer == crate::jwt::ISSUER {
            return Err(invalid(
                file,
                key("issuer"),
                "must be the provider's issuer, not empty and not this cluster's own \"flotilla\"",
            ));
        }
        if self.audience.trim().is_empty() {
            return Err(invalid(file, key("audience"), "must not be empty"));
        }
        match (&self.jwks_file, &self.jwks_url) {
            (Some(_), None) => {}
            (None, Some(url)) => {
                if !url.starts_with("https://") && !http_to_loopback(url) {
                    return Err(invalid(
                        file,
                        key("jwks_url"),
                        "must be https:// (http:// only to a loopback address)",
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    file,
                    key("jwks_file"),
                    "give exactly one of jwks_file and jwks_url",
                ))
            }
        }
        if !(10..=86_400).contains(&self.refresh_s) {
            return Err(invalid(file, key("refresh_s"), "must be from 10 to 86400"));
        }
        if self.tenant_claim.is_empty() || self.scopes_claim.is_empty() {
            return Err(invalid(
                file,
                key("tenant_claim"),
                "tenant_claim and scopes_claim must name claims",
            ));
        }
        if self.allowed_tenants.iter().any(|t| t.is_empty()) {
            return Err(invalid(
                file,
                key("allowed_tenants"),
                "must not hold an empty name",
            ));
        }
        let p = &self.subject_prefix;
        if !p.is_empty()
            && (p.len() > 64 || !p.bytes().all(|b| b.is_ascii_graphic()) || !p.ends_with(':'))
        {
            return Err(invalid(
                file,
                key("subject_prefix"),
                "must be at most 64 printable ASCII characters, no spaces, ending with ':' (e.g. \"corp:\")",
            ));
        }
        Ok(())
    }
}

impl Default for AgentTokens {
    fn default() -> Self {
        Self {
            max_lifetime_hours: defaults::TOKEN_MAX_LIFETIME_HOURS,
            bootstrap_admin_hours: defaults::BOOTSTRAP_ADMIN_HOURS,
            issuers: Vec::new(),
            require_client_certificate: false,
        }
    }
}

impl AgentTokens {
    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("agent_tokens.{k}");
        if !(1..=10 * 366 * 24).contains(&self.max_lifetime_hours) {
            return Err(invalid(
                file,
                key("max_lifetime_hours"),
                "must be from 1 to 87840 (ten years)",
            ));
        }
        if self.bootstrap_admin_hours == 0 || self.bootstrap_admin_hours > self.max_lifetime_hours {
            return Err(invalid(
                file,
                key("bootstrap_admin_hours"),
                "must be at least 1 and at most max_lifetime_hours",
            ));
        }
        for (i, issuer) in self.issuers.iter().enumerate() {
            issuer.validate(file, i)?;
        }
        // Prefixes keep providers' subjects apart only if no two can produce the same one.
        for (i, a) in self.issuers.iter().enumerate() {
            for b in self.issuers.iter().skip(i + 1) {
                let (pa, pb) = (&a.subject_prefix, &b.subject_prefix);
                if pa.is_empty() && pb.is_empty() {
                    continue; // no prefixes at all: subjects shared on purpose
                }
                if pa.starts_with(pb.as_str()) || pb.starts_with(pa.as_str()) {
                    return Err(invalid(
                        file,
                        key("issuers"),
                        format!(
                            "subject_prefix {pa:?} and {pb:?} overlap: give each provider its own"
                        ),
                    ));
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = self.issuers.iter().find(|i| !seen.insert(&i.issuer)) {
            return Err(invalid(
                file,
                "agent_tokens.issuers",
                format!("issuer {:?} is listed twice", dup.issuer),
            ));
        }
        Ok(())
    }

    pub fn max_lifetime_s(&self) -> u64 {
        self.max_lifetime_hours * 3600
    }
}

/// `hub.toml`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HubFile {
    /// Raft id of this hub: a positive integer, unique in the cluster (or see
    /// `id_from_hostname`).
    #[serde(default)]
    pub id: u64,
    /// Take the id from the host name instead, as a StatefulSet's pods are named: the number
    /// after its last `-`, plus one (`flotilla-hub-0` is hub 1).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub id_from_hostname: bool,
    pub data_dir: PathBuf,
    /// Where agents, nodes and admins connect (gRPC over TLS).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The address others use to reach `listen`; defaults to `https://<listen>`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Where other hubs reach this hub's Raft service (hub certificates only).
    #[serde(default = "default_raft_listen")]
    pub raft_listen: String,
    /// The address other hubs use to reach `raft_listen`; defaults to `https://<raft_listen>`.
    #[serde(default)]
    pub raft_advertise: Option<String>,
    /// Plain HTTP for operators: `/metrics` (Prometheus), `/healthz`, `/readyz`. Port 0
    /// (the default) picks a free port, written to `http.addr` in the data dir; give a
    /// fixed port for Prometheus and load balancers.
    #[serde(default = "default_http_listen")]
    pub http_listen: String,
    /// The address people and tools use to reach `http_listen` (the dashboard's login
    /// links, `cluster status`); defaults to `http(s)://<http_listen>`.
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
    /// Start a new cluster when the data dir is empty: with the `peers` as voters, or with
    /// this hub alone when `peers` is empty. Hubs started without it wait to be added.
    #[serde(default)]
    pub bootstrap: bool,
    /// The initial voters, this hub included (bootstrap from a static member list).
    #[serde(default)]
    pub peers: Vec<PeerFile>,
    /// The cluster CA, shared by all hubs. Unset: `<data_dir>/pki/ca.pem` and `ca.key`,
    /// generated on first start (fine for a single hub).
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// While the CA is rotated: a PEM file of CA certificates trusted besides the one that
    /// signs (the old CA, or the next one). Hubs accept hubs', nodes' and agents'
    /// certificates from any of them, and give the bundle to nodes, which then accept hubs
    /// of any of them. Unset: only the signing CA (docs/security.md, "Rotating the CA").
    #[serde(default)]
    pub ca_trust: Option<PathBuf>,
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
    /// Names (DNS or IP) the hub certificate is valid for, besides localhost and 127.0.0.1.
    #[serde(default)]
    pub tls_names: Vec<String>,
    /// A node silent this long is treated as gone.
    #[serde(default = "default_node_ttl")]
    pub node_ttl_ms: u64,
    /// Leader heartbeat interval.
    #[serde(default = "default_raft_heartbeat")]
    pub raft_heartbeat_ms: u64,
    /// Election timeout: a follower that hears no leader for a random time between this and
    /// twice this starts an election. Lower fails over faster; too low for the network and
    /// load causes needless elections.
    #[serde(default = "default_raft_election_timeout")]
    pub raft_election_timeout_ms: u64,
    /// Build a snapshot after this many log entries; the log behind it is then purged.
    #[serde(default = "default_snapshot_logs")]
    pub snapshot_logs: u64,
    /// Failures in a row of one MCP server on one node that open its circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker keeps work away before one trial call (half-open).
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown_ms: u64,
    /// Memory for the storage engine's page cache, in MiB.
    #[serde(default = "default_storage_cache_mb")]
    pub storage_cache_mb: u64,
    /// How long a finished task or workflow stays readable (GetTask, ListTasks, watches),
    /// in seconds, before it expires.
    #[serde(default = "default_retention_s")]
    pub retention_s: u64,
    /// At most this many finished tasks and workflows are kept; beyond it the oldest expire
    /// first. 0: no limit but the time.
    #[serde(default = "default_retention_max_tasks")]
    pub retention_max_tasks: u64,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub audit: Audit,
    #[serde(default)]
    pub agent_tokens: AgentTokens,
    /// How long the certificates nodes get (joining, renewing) are valid, in seconds; a
    /// node renews its own when two thirds of the time have passed.
    #[serde(default = "default_node_cert_lifetime_s")]
    pub node_cert_lifetime_s: u64,
    /// How long the hub's own certificate is valid, in seconds; the hub makes itself a new
    /// one from the CA at two thirds of that, in place (connections go on; new ones use it).
    #[serde(default = "default_node_cert_lifetime_s")]
    pub hub_cert_lifetime_s: u64,
    /// Every node may introduce tool names the cluster has not seen (a single-owner
    /// cluster such as `flotilla dev`). Otherwise only nodes that joined with a token
    /// created with `--may-add-tools` may; a name another node introduces waits until an
    /// admin accepts it with `flotilla tools accept NAME`. (Trust is never by node name: a
    /// joining node chooses its own name.)
    #[serde(default)]
    pub trust_node_tools: bool,
}

fn default_node_cert_lifetime_s() -> u64 {
    defaults::NODE_CERT_LIFETIME_S
}

fn default_storage_cache_mb() -> u64 {
    defaults::STORAGE_CACHE_MB
}

fn default_retention_s() -> u64 {
    defaults::RETENTION_S
}

fn default_retention_max_tasks() -> u64 {
    defaults::RETENTION_MAX_TASKS
}

fn default_breaker_failures() -> u32 {
    defaults::BREAKER_FAILURES
}

fn default_breaker_cooldown() -> u64 {
    defaults::BREAKER_COOLDOWN_MS
}

fn default_snapshot_logs() -> u64 {
    defaults::SNAPSHOT_LOGS
}

fn default_raft_heartbeat() -> u64 {
    defaults::RAFT_HEARTBEAT_MS
}
fn default_raft_election_timeout() -> u64 {
    defaults::RAFT_ELECTION_TIMEOUT_MS
}

fn default_listen() -> String {
    defaults::HUB_LISTEN.to_owned()
}
fn default_raft_listen() -> String {
    defaults::HUB_RAFT_LISTEN.to_owned()
}
fn default_http_listen() -> String {
    defaults::HTTP_LISTEN.to_owned()
}

/// One member of the initial hub cluster.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    pub id: u64,
    /// API address, `https://HOST:PORT`.
    pub api: String,
    /// Raft address, `https://HOST:PORT`.
    pub raft: String,
}
fn default_cluster_name() -> String {
    defaults::CLUSTER_NAME.to_owned()
}
fn default_node_ttl() -> u64 {
    defaults::NODE_TTL_MS
}

/// A validated hub configuration.
#[derive(Clone, Debug)]
pub struct HubConfig {
    pub id: u64,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: String,
    pub raft_listen: SocketAddr,
    pub raft_advertise: String,
    pub http_listen: SocketAddr,
    /// (certificate, key) the HTTP port serves TLS with; `None`: plain HTTP.
    pub http_tls: Option<(PathBuf, PathBuf)>,
    /// How others reach the HTTP port, when it is not `http(s)://<http_listen>`.
    pub http_advertise: Option<String>,
    pub otlp_endpoint: Option<String>,
    pub bootstrap: bool,
    pub peers: Vec<PeerFile>,
    /// (certificate, key) of a shared CA, when configured.
    pub ca: Option<(PathBuf, PathBuf)>,
    /// CA certificates trusted besides the signing one (a CA rotation's overlap).
    pub ca_trust: Option<PathBuf>,
    pub cluster_name: String,
    pub tls_names: Vec<String>,
    pub node_ttl_ms: u64,
    pub raft_heartbeat_ms: u64,
    pub raft_election_timeout_ms: u64,
    pub snapshot_logs: u64,
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    pub storage_cache_mb: u64,
    pub retention_s: u64,
    pub retention_max_tasks: u64,
    pub limits: Limits,
    pub audit: Audit,
    pub agent_tokens: AgentTokens,
    pub node_cert_lifetime_s: u64,
    pub hub_cert_lifetime_s: u64,
    pub trust_node_tools: bool,
}

impl HubFile {
    pub fn validate(self, file: &str) -> Result<HubConfig, ConfigError> {
        self.validate_on(file, &super::hostname())
    }

    /// As [`validate`](Self::validate), on the host named `hostname`.
    pub fn validate_on(mut self, file: &str, hostname: &str) -> Result<HubConfig, ConfigError> {
        match (self.id, self.id_from_hostname) {
            (0, false) => {
                return Err(invalid(
                    file,
                    "id",
                    "must be a positive integer (or set id_from_hostname = true)",
                ))
            }
            (_, false) => {}
            (0, true) => {
                self.id =
                    id_from_hostname(hostname).map_err(|m| invalid(file, "id_from_hostname", m))?;
            }
            (_, true) => {
                return Err(invalid(
                    file,
                    "id",
                    "give `id` or `id_from_hostname = true`, not both",
                ))
            }
        }
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            invalid(
                file,
                "listen",
                format!("{:?} is not HOST:PORT with an IP host", self.listen),
            )
        })?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid(file, "data_dir", "must not be empty"));
        }
        if self.cluster_name.trim().is_empty() {
            return Err(invalid(file, "cluster_name", "must not be empty"));
        }
        if self.raft_heartbeat_ms == 0 || self.raft_heartbeat_ms > 10_000 {
            return Err(invalid(
                file,
                "raft_heartbeat_ms",
                "must be between 1 and 10000",
            ));
        }
        if self.raft_election_timeout_ms < 3 * self.raft_heartbeat_ms {
            return Err(invalid(
                file,
                "raft_election_timeout_ms",
                "must be at least three heartbeats (raft_heartbeat_ms)",
            ));
        }
        if self.breaker_failures == 0 {
            return Err(invalid(file, "breaker_failures", "must be at least 1"));
        }
        self.limits.validate(file)?;
        self.agent_tokens.validate(file)?;
        for (key, v) in [
            ("node_cert_lifetime_s", self.node_cert_lifetime_s),
            ("hub_cert_lifetime_s", self.hub_cert_lifetime_s),
        ] {
            if !(60..=366 * 24 * 3600).contains(&v) {
                return Err(invalid(file, key, "must be from 60 to 31622400 (a year)"));
            }
        }
        if !(8..=65_536).contains(&self.storage_cache_mb) {
            return Err(invalid(
                file,
                "storage_cache_mb",
                "must be between 8 and 65536",
            ));
        }
        if self.retention_s == 0 {
            return Err(invalid(
                file,
                "retention_s",
                "must be at least 1 (finished tasks must stay readable for a while)",
            ));
        }
        self.audit.check(file)?;
        if self.snapshot_logs < 10 {
            return Err(invalid(file, "snapshot_logs", "must be at least 10"));
        }
        if self.node_ttl_ms < 2 * defaults::HEARTBEAT_MS {
            return Err(invalid(
                file,
                "node_ttl_ms",
                format!(
                    "must be at least {} (two heartbeats)",
                    2 * defaults::HEARTBEAT_MS
                ),
            ));
        }
        // A hub listed in `peers` is reached where the list says, unless told otherwise.
        let listed = self.peers.iter().find(|p| p.id == self.id);
        let advertise = match self.advertise.or_else(|| listed.map(|p| p.api.clone())) {
            Some(a) => {
                crate::tls::split_address(&a)
                    .map_err(|e| invalid(file, "advertise", e.to_string()))?;
                a
            }
            None => format!("https://{listen}"),
        };
        let raft_listen: SocketAddr = self.raft_listen.parse().map_err(|_| {
            invalid(
                file,
                "raft_listen",
                format!("{:?} is not HOST:PORT with an IP host", self.raft_listen),
            )
        })?;
        let raft_advertise = match self
            .raft_advertise
            .or_else(|| listed.map(|p| p.raft.clone()))
        {
            Some(a) => {
                crate::tls::split_address(&a)
                    .map_err(|e| invalid(file, "raft_advertise", e.to_string()))?;
                a
            }
            None => format!("https://{raft_listen}"),
        };
        let http_listen: SocketAddr = self.http_listen.parse().map_err(|_| {
            invalid(
                file,
                "http_listen",
                format!("{:?} is not HOST:PORT with an IP host", self.http_listen),
            )
        })?;
        if let Some(e) = &self.otlp_endpoint {
            super::check_otlp_endpoint(e).map_err(|m| invalid(file, "otlp_endpoint", m))?;
        }
        let mut ids = std::collections::HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            if p.id == 0 || !ids.insert(p.id) {
                return Err(invalid(
                    file,
                    format!("peers[{i}].id"),
                    "must be positive and unique",
                ));
            }
            crate::tls::split_address(&p.api)
                .map_err(|e| invalid(file, format!("peers[{i}].api"), e.to_string()))?;
            crate::tls::split_address(&p.raft)
                .map_err(|e| invalid(file, format!("peers[{i}].raft"), e.to_string()))?;
        }
        if !self.peers.is_empty() && !ids.contains(&self.id) {
            return Err(invalid(
                file,
                "peers",
                format!("must include this hub (id {})", self.id),
            ));
        }
        let ca = match (self.ca_cert, self.ca_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => return Err(invalid(file, "ca_key", "is required with ca_cert")),
            (None, Some(_)) => return Err(invalid(file, "ca_cert", "is required with ca_key")),
        };
        let mut tls_names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        if !listen.ip().is_unspecified() {
            tls_names.push(listen.ip().to_string());
        }
        for a in [&advertise, &raft_advertise] {
            if let Ok((host, _)) = crate::tls::split_address(a) {
                tls_names.push(host);
            }
        }
        tls_names.extend(self.tls_names);
        tls_names.sort();
        tls_names.dedup();
        Ok(HubConfig {
            id: self.id,
            data_dir: self.data_dir,
            listen,
            advertise,
            raft_listen,
            raft_advertise,
            http_listen,
            http_advertise: super::check_http_advertise(
                file,
                self.http_advertise,
                self.http_tls_cert.is_some(),
            )?,
            http_tls: super::check_http_tls(file, self.http_tls_cert, self.http_tls_key)?,
            otlp_endpoint: self.otlp_endpoint,
            bootstrap: self.bootstrap,
            peers: self.peers,
            ca,
            ca_trust: self.ca_trust,
            cluster_name: self.cluster_name,
            tls_names,
            node_ttl_ms: self.node_ttl_ms,
            raft_heartbeat_ms: self.raft_heartbeat_ms,
            raft_election_timeout_ms: self.raft_election_timeout_ms,
            snapshot_logs: self.snapshot_logs,
            breaker_failures: self.breaker_failures,
            breaker_cooldown_ms: self.breaker_cooldown_ms,
            storage_cache_mb: self.storage_cache_mb,
            retention_s: self.retention_s,
            retention_max_tasks: self.retention_max_tasks,
            limits: self.limits,
            audit: self.audit,
            agent_tokens: self.agent_tokens,
            node_cert_lifetime_s: self.node_cert_lifetime_s,
            hub_cert_lifetime_s: self.hub_cert_lifetime_s,
            trust_node_tools: self.trust_node_tools,
        })
    }
}

/// Hub id from a StatefulSet pod's host name: the number after its last `-`, plus one.
pub fn id_from_hostname(hostname: &str) -> Result<u64, String> {
    hostname
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| {
            format!("host name {hostname:?} does not end in -<number>, as a StatefulSet pod's does")
        })
}
