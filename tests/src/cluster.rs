//! A cluster of real hub and node processes sharing one CA, with clients for it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context;
use flotilla_common::{
    config::{HubFile, McpServerConfig, NodeFile},
    pki, tls,
};
use flotilla_proto as pb;
use tonic::{
    metadata::MetadataValue, service::interceptor::InterceptedService, transport::Channel,
};

use crate::{
    flotilla_bin, wait_done, wait_status, wait_until, AdminServiceClient, AgentServiceClient, Proc,
    READY,
};

/// The node TTL of test hubs: short, so node-loss tests are quick.
pub const NODE_TTL_MS: u64 = 5000;

/// Adds a bearer token to every request.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Self {
        Self(format!("Bearer {token}").parse().expect("token header"))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if !self.0.is_empty() {
            req.metadata_mut().insert("authorization", self.0.clone());
        }
        Ok(req)
    }
}

pub type Agent = AgentServiceClient<InterceptedService<Channel, Bearer>>;
pub type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// An MCP server entry running the binary's built-in demo server.
pub fn demo_server(name: &str, max_concurrency: u32) -> McpServerConfig {
    McpServerConfig {
        name: name.into(),
        command: flotilla_bin().display().to_string(),
        args: vec!["mcp-demo".into()],
        env: Default::default(),
        max_concurrency,
        scope: "tools".into(),
    }
}

pub struct NodeSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub servers: Vec<McpServerConfig>,
    /// Tenants it serves; empty: all.
    pub tenants: Vec<String>,
}

impl NodeSpec {
    pub fn demo(name: &str) -> Self {
        Self {
            name: name.into(),
            labels: [("zone".to_string(), "a".to_string())]
                .into_iter()
                .collect(),
            servers: vec![demo_server("demo", 4)],
            tenants: Vec::new(),
        }
    }

    /// Sets a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// Settings a test may change.
#[derive(Clone, Debug)]
pub struct Options {
    /// Log entries between snapshots.
    pub snapshot_logs: u64,
    /// Failures in a row that open a server's breaker.
    pub breaker_failures: u32,
    /// hub.toml's `[limits]`.
    pub limits: flotilla_common::config::Limits,
    /// hub.toml's `[audit]`: how long the trail's own records are kept.
    pub audit: flotilla_common::config::Audit,
    /// hub.toml's `[agent_tokens]`.
    pub agent_tokens: flotilla_common::config::AgentTokens,
    /// How long node certificates last.
    pub node_cert_lifetime_s: u64,
    /// How long hub certificates last.
    pub hub_cert_lifetime_s: u64,
    /// hub.toml's `trust_node_tools` (true by default: every test node may add tools).
    pub trust_node_tools: bool,
    /// Join tokens the harness creates let their nodes add tools.
    pub trusted_join_tokens: bool,
    /// hub.toml's `retention_s`: how long finished tasks stay readable.
    pub retention_s: u64,
    /// hub.toml's `retention_max_tasks`: how many finished tasks are kept.
    pub retention_max_tasks: u64,
    /// `FAILPOINTS` for the hub with this id, each time it starts (see `hub/src/faults.rs`;
    /// remove the entry before starting a hub again to start it clean).
    pub failpoints: BTreeMap<u64, String>,
    /// More environment for the hub with this id, each time it starts (remove the entry
    /// before starting it again to start it without).
    pub hub_env: BTreeMap<u64, Vec<(String, String)>>,
    /// hub.toml's and node.toml's `otlp_endpoint`: where hubs and nodes send traces.
    pub otlp_endpoint: Option<String>,
    /// hub.toml's and node.toml's `http_tls_cert` and `http_tls_key`: the HTTP port
    /// serves TLS with this certificate and key.
    pub http_tls: Option<(PathBuf, PathBuf)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            snapshot_logs: flotilla_common::config::defaults::SNAPSHOT_LOGS,
            breaker_failures: flotilla_common::config::defaults::BREAKER_FAILURES,
            limits: Default::default(),
            audit: Default::default(),
            agent_tokens: Default::default(),
            node_cert_lifetime_s: flotilla_common::config::defaults::NODE_CERT_LIFETIME_S,
            hub_cert_lifetime_s: flotilla_common::config::defaults::NODE_CERT_LIFETIME_S,
            trust_node_tools: true,
            trusted_join_tokens: false,
            retention_s: flotilla_common::config::defaults::RETENTION_S,
            retention_max_tasks: flotilla_common::config::defaults::RETENTION_MAX_TASKS,
            failpoints: BTreeMap::new(),
            hub_env: BTreeMap::new(),
            otlp_endpoint: None,
            http_tls: None,
        }
    }
}

/// A hub process and where it listens.
pub struct HubMember {
    pub id: u64,
    pub dir: PathBuf,
    pub proc: Proc,
    pub api: String,
    pub raft: String,
}

impl HubMember {
    /// Where the hub serves metrics and health (`http://HOST:PORT`; a new port after a
    /// restart).
    pub fn http(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.dir.join("http.addr"))?)
    }
}

/// Hubs and nodes, each a real process.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub hubs: Vec<HubMember>,
    pub opts: Options,
    /// The hub address clients use (hub 1's unless changed).
    pub hub_addr: String,
    pub ca_pem: String,
    pub admin_token: String,
    pub nodes: BTreeMap<String, Proc>,
}

fn spawn_hub(dir: &Path, id: u64, opts: &Options) -> anyhow::Result<Proc> {
    let _ = std::fs::remove_file(dir.join("listen.addr"));
    let _ = std::fs::remove_file(dir.join("raft.addr"));
    let toml = dir.join("hub.toml");
    let env: Vec<(&str, &str)> = opts
        .failpoints
        .get(&id)
        .map(|f| ("FAILPOINTS", f.as_str()))
        .into_iter()
        .chain(
            opts.hub_env
                .get(&id)
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .collect();
    Proc::spawn_program(
        &flotilla_bin().display().to_string(),
        &format!("hub-{id}"),
        &["hub", "--config", toml.to_str().unwrap_or_default()],
        &env,
        &dir.join("hub.log"),
    )
}

async fn wait_hub_listening(proc: &mut Proc, dir: &Path) -> anyhow::Result<(String, String)> {
    let api = wait_until("hub to listen", READY, || {
        let exited = proc.exited();
        let v = std::fs::read_to_string(dir.join("listen.addr")).ok();
        async move {
            if let Some(st) = exited {
                panic!("hub exited early: {st}");
            }
            v
        }
    })
    .await?;
    let raft = std::fs::read_to_string(dir.join("raft.addr"))?;
    Ok((api, raft))
}

/// Writes a hub's config (shared CA, port 0) and starts it.
async fn start_member(
    root: &Path,
    id: u64,
    bootstrap: bool,
    opts: &Options,
) -> anyhow::Result<HubMember> {
    let pki = root.join("pki");
    let hub_dir = root.join(format!("hub-{id}"));
    std::fs::create_dir_all(&hub_dir)?;
    let cfg = HubFile {
        id_from_hostname: false,
        id,
        data_dir: hub_dir.clone(),
        listen: "127.0.0.1:0".into(),
        advertise: None,
        raft_listen: "127.0.0.1:0".into(),
        raft_advertise: None,
        http_listen: "127.0.0.1:0".into(),
        otlp_endpoint: opts.otlp_endpoint.clone(),
        http_advertise: None,
        http_tls_cert: opts.http_tls.as_ref().map(|t| t.0.clone()),
        http_tls_key: opts.http_tls.as_ref().map(|t| t.1.clone()),
        bootstrap,
        peers: vec![],
        ca_cert: Some(pki.join("ca.pem")),
        ca_key: Some(pki.join("ca.key")),
        ca_trust: None,
        cluster_name: "test".into(),
        tls_names: vec![],
        node_ttl_ms: NODE_TTL_MS,
        raft_heartbeat_ms: flotilla_common::config::defaults::RAFT_HEARTBEAT_MS,
        raft_election_timeout_ms: flotilla_common::config::defaults::RAFT_ELECTION_TIMEOUT_MS,
        snapshot_logs: opts.snapshot_logs,
        breaker_failures: opts.breaker_failures,
        breaker_cooldown_ms: 2_000,
        storage_cache_mb: flotilla_common::config::defaults::STORAGE_CACHE_MB,
        retention_s: opts.retention_s,
        retention_max_tasks: opts.retention_max_tasks,
        limits: opts.limits.clone(),
        audit: opts.audit.clone(),
        agent_tokens: opts.agent_tokens.clone(),
        node_cert_lifetime_s: opts.node_cert_lifetime_s,
        hub_cert_lifetime_s: opts.hub_cert_lifetime_s,
        trust_node_tools: opts.trust_node_tools,
    };
    std::fs::write(hub_dir.join("hub.toml"), toml::to_string(&cfg)?)?;
    let mut proc = spawn_hub(&hub_dir, id, opts)?;
    let (api, raft) = wait_hub_listening(&mut proc, &hub_dir).await?;
    Ok(HubMember {
        id,
        dir: hub_dir,
        proc,
        api,
        raft,
    })
}

impl Cluster {
    /// Starts a new hub process (not bootstrapped) and adds it to the cluster through the
    /// admin API: learner first, then voter.
    pub async fn add_hub(&mut self, id: u64) -> anyhow::Result<()> {
        let m = start_member(self.dir.path(), id, false, &self.opts).await?;
        let (api, raft) = (m.api.clone(), m.raft.clone());
        self.hubs.push(m);
        self.admin()
            .add_hub(pb::AddHubRequest {
                id,
                api_address: api,
                raft_address: raft,
            })
            .await
            .with_context(|| format!("adding hub {id}"))?;
        Ok(())
    }

    /// Removes a hub from the cluster through the admin API and stops its process.
    pub async fn remove_hub(&mut self, id: u64) -> anyhow::Result<()> {
        if self.hub_addr == self.hub(id).api {
            let other = self
                .hubs
                .iter()
                .find(|h| h.id != id)
                .expect("another hub")
                .api
                .clone();
            self.hub_addr = other;
        }
        self.admin()
            .remove_hub(pb::RemoveHubRequest { id })
            .await
            .with_context(|| format!("removing hub {id}"))?;
        self.hub_mut(id).proc.terminate();
        Ok(())
    }

    /// One bootstrapped hub on port 0.
    pub async fn start() -> anyhow::Result<Self> {
        Self::with_hubs(1).await
    }

    /// `n` hubs sharing one CA: hub 1 bootstraps, the others are added as learners and
    /// promoted to voters through the admin API, as an operator would.
    pub async fn with_hubs(n: u64) -> anyhow::Result<Self> {
        Self::with_options(n, Options::default()).await
    }

    pub async fn with_options(n: u64, opts: Options) -> anyhow::Result<Self> {
        // FLOTILLA_KEEP_TEST_DIRS=1 keeps data dirs and logs for a look after a failure.
        let dir = tempfile::Builder::new()
            .prefix("flotilla-test-")
            .disable_cleanup(std::env::var_os("FLOTILLA_KEEP_TEST_DIRS").is_some())
            .tempdir()?;
        let ca = flotilla_common::pki::Ca::load_or_generate(&dir.path().join("pki"), "test")?;
        let mut hubs = Vec::new();
        for id in 1..=n {
            hubs.push(start_member(dir.path(), id, id == 1, &opts).await?);
        }
        let mut c = Self {
            hub_addr: hubs[0].api.clone(),
            dir,
            hubs,
            opts,
            ca_pem: ca.cert_pem().to_owned(),
            admin_token: String::new(),
            nodes: BTreeMap::new(),
        };
        let token_file = c.hubs[0].dir.join("admin.token");
        c.admin_token = wait_until("admin token", READY, || {
            let v = std::fs::read_to_string(&token_file)
                .ok()
                .filter(|t| !t.is_empty());
            async move { v }
        })
        .await?;
        c.wait_leader().await?;
        for i in 1..c.hubs.len() {
            let (id, api, raft) = (c.hubs[i].id, c.hubs[i].api.clone(), c.hubs[i].raft.clone());
            c.admin()
                .add_hub(pb::AddHubRequest {
                    id,
                    api_address: api,
                    raft_address: raft,
                })
                .await
                .with_context(|| format!("adding hub {id}"))?;
        }
        Ok(c)
    }

    pub fn hub(&self, id: u64) -> &HubMember {
        self.hubs.iter().find(|h| h.id == id).expect("no such hub")
    }

    pub fn hub_mut(&mut self, id: u64) -> &mut HubMember {
        self.hubs
            .iter_mut()
            .find(|h| h.id == id)
            .expect("no such hub")
    }

    /// Waits until the hub clients use reports a leader; returns its id.
    pub async fn wait_leader(&self) -> anyhow::Result<u64> {
        Ok(wait_status(&self.admin(), "a leader", |s| s.leader_id != 0)
            .await?
            .leader_id)
    }

    /// kill -9 one hub.
    pub fn kill_hub(&mut self, id: u64) {
        self.hub_mut(id).proc.kill();
    }

    /// Starts a stopped hub again from its data dir, on the same addresses.
    pub async fn start_hub(&mut self, id: u64) -> anyhow::Result<()> {
        let opts = self.opts.clone();
        let h = self.hub_mut(id);
        let toml_path = h.dir.join("hub.toml");
        let mut cfg: HubFile = toml::from_str(&std::fs::read_to_string(&toml_path)?)?;
        cfg.listen = h.api.trim_start_matches("https://").to_owned();
        cfg.raft_listen = h.raft.trim_start_matches("https://").to_owned();
        std::fs::write(&toml_path, toml::to_string(&cfg)?)?;
        h.proc = spawn_hub(&h.dir, id, &opts)?;
        let dir = h.dir.clone();
        wait_hub_listening(&mut h.proc, &dir).await?;
        Ok(())
    }

    /// Stops hub 1 (SIGTERM or kill -9) and starts it again from its data dir.
    pub async fn restart_hub(&mut self, hard: bool) -> anyhow::Result<()> {
        if hard {
            self.hubs[0].proc.kill();
        } else {
            self.hubs[0].proc.terminate();
        }
        let id = self.hubs[0].id;
        self.start_hub(id).await?;
        self.wait_leader().await?;
        Ok(())
    }

    /// The client certificate the harness presents: where hub.toml requires agents to
    /// present one, the admin certificate the first hub keeps in its data dir.
    pub fn client_identity(&self) -> Option<pki::CertifiedKey> {
        if !self.opts.agent_tokens.require_client_certificate {
            return None;
        }
        pki::CertifiedKey::read(&self.hubs[0].dir, "admin")
            .ok()
            .flatten()
    }

    /// A channel to a given hub.
    pub fn channel_to(&self, id: u64) -> Channel {
        let addr = &self.hub(id).api;
        let identity = self.client_identity();
        tls::channel(
            addr,
            tls::client_config(&self.ca_pem, identity.as_ref()).expect("tls config"),
        )
        .expect("channel")
    }

    pub fn agent_at(&self, id: u64, token: &str) -> Agent {
        AgentServiceClient::with_interceptor(self.channel_to(id), Bearer::new(token))
    }

    pub fn channel(&self) -> Channel {
        let identity = self.client_identity();
        tls::channel(
            &self.hub_addr,
            tls::client_config(&self.ca_pem, identity.as_ref()).expect("tls config"),
        )
        .expect("channel")
    }

    pub fn agent_with(&self, token: &str) -> Agent {
        let v = if token.is_empty() {
            MetadataValue::from_static("")
        } else {
            format!("Bearer {token}").parse().expect("token header")
        };
        AgentServiceClient::with_interceptor(self.channel(), Bearer(v))
    }

    /// An agent holding every scope (the bootstrap admin token).
    pub fn agent(&self) -> Agent {
        self.agent_with(&self.admin_token)
    }

    pub fn admin(&self) -> Admin {
        let v = format!("Bearer {}", self.admin_token)
            .parse()
            .expect("token header");
        AdminServiceClient::with_interceptor(self.channel(), Bearer(v))
    }

    pub async fn join_token(&self) -> anyhow::Result<String> {
        Ok(self
            .admin()
            .create_join_token(pb::CreateJoinTokenRequest {
                ttl_seconds: 600,
                uses: 1,
                description: "test".into(),
                may_add_tools: self.opts.trusted_join_tokens,
            })
            .await?
            .into_inner()
            .token)
    }

    pub async fn agent_token(
        &self,
        subject: &str,
        tenant: &str,
        scopes: &[&str],
    ) -> anyhow::Result<String> {
        Ok(self
            .admin()
            .issue_agent_token(pb::IssueAgentTokenRequest {
                subject: subject.into(),
                tenant: tenant.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ttl_seconds: 600,
                ..Default::default()
            })
            .await?
            .into_inner()
            .token)
    }

    pub fn node_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the node's config (with a fresh join token when it has no identity yet).
    pub async fn write_node_config(&self, spec: &NodeSpec) -> anyhow::Result<PathBuf> {
        let dir = self.node_dir(&spec.name);
        std::fs::create_dir_all(&dir)?;
        let has_identity = dir.join("identity").join("node.pem").exists();
        let cfg = NodeFile {
            name: spec.name.clone(),
            data_dir: dir.clone(),
            hub: self.hub_addr.clone(),
            join_token: if has_identity {
                None
            } else {
                Some(self.join_token().await?)
            },
            labels: spec.labels.clone(),
            heartbeat_ms: 200,
            stop_grace_ms: 25_000,
            servers: spec.servers.clone(),
            tenants: spec.tenants.clone(),
            cpu_high_water_percent: 0.0,
            http_listen: "127.0.0.1:0".into(),
            otlp_endpoint: self.opts.otlp_endpoint.clone(),
            http_advertise: None,
            http_tls_cert: self.opts.http_tls.as_ref().map(|t| t.0.clone()),
            http_tls_key: self.opts.http_tls.as_ref().map(|t| t.1.clone()),
        };
        let path = dir.join("node.toml");
        std::fs::write(&path, toml::to_string(&cfg)?)?;
        Ok(path)
    }

    /// Starts a node process and waits until the hub sees it connected.
    pub async fn add_node(&mut self, spec: NodeSpec) -> anyhow::Result<()> {
        let path = self.write_node_config(&spec).await?;
        let dir = self.node_dir(&spec.name);
        let proc = Proc::spawn(
            &spec.name,
            &["node", "--config", path.to_str().unwrap_or_default()],
            &dir.join("node.log"),
        )?;
        self.nodes.insert(spec.name.clone(), proc);
        self.wait_node_connected(&spec.name).await
    }

    pub async fn wait_node_connected(&self, name: &str) -> anyhow::Result<()> {
        self.wait_node(name, "connect", |n| n.connected).await
    }

    /// Waits until the hub lists node `name` as `what` says (`ListNodes`).
    pub async fn wait_node(
        &self,
        name: &str,
        what: &str,
        is: impl Fn(&pb::NodeInfo) -> bool,
    ) -> anyhow::Result<()> {
        let admin = self.admin();
        let is = &is;
        wait_until(&format!("node {name} to {what}"), READY, || {
            let mut admin = admin.clone();
            async move {
                let nodes = admin
                    .list_nodes(pb::ListNodesRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .nodes;
                nodes.iter().any(|n| n.id == name && is(n)).then_some(())
            }
        })
        .await
    }

    /// Submits a call and waits for its terminal state.
    pub async fn call(
        &self,
        agent: &mut Agent,
        tool: &str,
        args: serde_json::Value,
    ) -> anyhow::Result<pb::Task> {
        let id = agent
            .submit_task(pb::SubmitTaskRequest {
                tool: tool.into(),
                arguments: serde_json::to_vec(&args)?,
                ..Default::default()
            })
            .await?
            .into_inner()
            .task_id;
        self.wait_task(agent, &id).await
    }

    pub async fn wait_task(&self, agent: &mut Agent, id: &str) -> anyhow::Result<pb::Task> {
        wait_done(agent, id).await
    }
}

/// A node spec whose demo server's `record` tool appends to a file; returns the file.
pub fn recording_node(c: &Cluster, name: &str) -> (NodeSpec, PathBuf) {
    let record = c.dir.path().join(format!("{name}.record"));
    let mut server = demo_server("demo", 16);
    server
        .env
        .insert("FLOTILLA_DEMO_RECORD".into(), record.display().to_string());
    (
        NodeSpec {
            name: name.into(),
            labels: Default::default(),
            servers: vec![server],
            tenants: Vec::new(),
        },
        record,
    )
}
