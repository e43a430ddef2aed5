//! Wiring: opens the Raft storage, starts Raft, the scheduler and the gRPC services, and
//! runs until the shutdown future resolves. `run(config, listener, shutdown)` takes an
//! already-bound listener so tests can start hubs on port 0.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::{Arc, RwLock, RwLockReadGuard},
    time::{Duration, Instant},
};

use anyhow::Context;
use flotilla_common::{config::HubConfig, jwt::SigningKey, pki::Ca, tls};
use flotilla_proto as pb;
use openraft::{
    error::{ClientWriteError, RaftError},
    ChangeMembers,
};
use tokio::{net::TcpListener, sync::Notify};

use crate::{
    error::{HubError, HubResult},
    events::EventLogs,
    raft::{
        self,
        network::{decode, encode, Network},
        service::{ClusterView, MemberView, MembershipChange, PeerError},
        ApplyHook, HubNode, Raft,
    },
    scheduler::PendingReasons,
    sessions::Sessions,
    state::{Command, Effects, Response, State},
};

/// How long a stopping hub lets open calls and streams finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a write or read waits for a leader before answering UNAVAILABLE.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// Metadata key carrying the leader's API address on a redirect.
pub const LEADER_HEADER: &str = "x-flotilla-leader";
/// Metadata key set when no leader is known yet (an election is under way).
pub const NO_LEADER_HEADER: &str = "x-flotilla-no-leader";

/// The two listeners a hub serves on, already bound.
pub struct Listeners {
    /// Agents, nodes and admins.
    pub api: TcpListener,
    /// Other hubs (Raft).
    pub raft: TcpListener,
}

/// Largest gRPC message accepted or sent.
pub const MAX_MESSAGE_BYTES: usize = flotilla_common::config::defaults::MAX_MESSAGE_BYTES;
/// File in the data dir holding a bootstrap admin token (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

struct Inner {
    config: HubConfig,
    raft: Raft,
    /// Every write goes through it: writes that arrive together share one entry.
    commit: crate::commit::GroupCommit,
    state: Arc<RwLock<State>>,
    ca: Ca,
    wake: Arc<Notify>,
    net: Network,
}

/// A running hub's shared handles.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
    pub events: EventLogs,
    pub sessions: Sessions,
    pub pending: PendingReasons,
    /// The leader's placements being committed, and the tenants it saw active.
    pub placing: crate::scheduler::Placing,
    /// Per-agent and per-tenant limits on what callers may use of this hub.
    pub quota: crate::quota::Quota,
    /// Agent tokens verified recently.
    pub tokens: crate::auth::TokenCache,
    /// Bumped whenever a workflow changes: WatchWorkflow streams wait on it.
    pub workflows: tokio::sync::watch::Sender<u64>,
}

struct Hooks {
    events: EventLogs,
    wake: Arc<Notify>,
    sessions: Sessions,
    workflows: tokio::sync::watch::Sender<u64>,
}

impl ApplyHook for Hooks {
    fn applied(&self, state: &State, _resp: &Response, effects: &Effects) {
        let mut seen = std::collections::HashSet::new();
        let archived: std::collections::HashMap<&str, &crate::state::TaskRecord> = effects
            .archived
            .iter()
            .map(|t| (t.id.as_str(), t))
            .collect();
        for id in &effects.touched {
            if seen.insert(id) {
                let t = state.tasks.get(id).or(archived.get(id.as_str()).copied());
                if let Some(t) = t {
                    self.events.transition(t);
                }
            }
        }
        // Attempts the hub ended (cancel, timeout, a decided fan-out, a failed workflow,
        // a drain deadline): tell their node. Only the leader has node sessions.
        for s in &effects.stopped {
            self.sessions.send(
                &s.node_id,
                crate::convert::cancel_message(&s.task_id, s.attempt),
            );
        }
        if effects.workflows_changed {
            self.workflows.send_modify(|v| *v += 1);
        }
        self.wake.notify_one();
    }

    fn replaced(&self, _state: &State) {
        self.events.clear();
        self.workflows.send_modify(|v| *v += 1);
        self.wake.notify_one();
    }
}

impl Hub {
    pub fn state(&self) -> RwLockReadGuard<'_, State> {
        self.inner.state.read().expect("state lock poisoned")
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub fn ca(&self) -> &Ca {
        &self.inner.ca
    }

    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    pub fn id(&self) -> u64 {
        self.inner.config.id
    }

    /// Wakes the scheduler.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    pub(crate) fn wake_signal(&self) -> &Notify {
        &self.inner.wake
    }

    /// True when this hub leads and a quorum acknowledged it recently. A leader cut off
    /// from its quorum keeps believing it leads (openraft 0.9 does not step down by itself);
    /// treating it as not leading makes it stop scheduling and send its nodes elsewhere.
    pub fn is_leader(&self) -> bool {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        if m.current_leader != Some(self.id()) {
            return false;
        }
        if m.membership_config.membership().voter_ids().count() <= 1 {
            return true;
        }
        m.millis_since_quorum_ack
            .is_none_or(|ms| ms <= self.quorum_grace_ms())
    }

    /// How long a leader may go without a quorum's acknowledgement: two leader leases.
    fn quorum_grace_ms(&self) -> u64 {
        4 * self.inner.config.raft_election_timeout_ms
    }

    /// The current leader's id and node, if one is known.
    pub fn leader(&self) -> Option<(u64, HubNode)> {
        let m = self.inner.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }

    pub fn require_leader(&self) -> HubResult<()> {
        if self.is_leader() {
            return Ok(());
        }
        Err(self.not_leader())
    }

    fn not_leader(&self) -> HubError {
        match self.leader() {
            Some((id, _)) if id == self.id() => HubError::Unavailable(
                "this hub has lost contact with the other hubs; try another one".into(),
            ),
            Some((id, node)) => HubError::NotLeader {
                leader_id: id,
                leader_api: node.api,
            },
            None => HubError::NoLeader,
        }
    }

    /// Commits a command through Raft and returns what applying it did. On a follower the
    /// command is forwarded to the leader, so any hub serves every write.
    pub async fn write(&self, cmd: Command) -> HubResult<Response> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let written = tokio::time::timeout(LEADER_WAIT, self.commit(cmd.clone())).await;
            let Ok(written) = written else {
                return Err(HubError::Unavailable(format!(
                    "the write was not committed within {}s (no quorum?); its outcome is unknown, retry with an idempotency key",
                    LEADER_WAIT.as_secs()
                )));
            };
            let retry = match written {
                Ok(r) => return Ok(r),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    match f.leader_node {
                        Some(node) => match self.forward(&node, &cmd).await {
                            Ok(r) => return Ok(r),
                            Err(ForwardFailure::Retry(why)) => why,
                            Err(ForwardFailure::Final(e)) => return Err(e),
                        },
                        None => "no leader elected yet".to_owned(),
                    }
                }
                Err(RaftError::APIError(e)) => {
                    return Err(HubError::Unavailable(format!("cannot commit: {e}")))
                }
                Err(RaftError::Fatal(e)) => {
                    return Err(HubError::Unavailable(format!("raft stopped: {e}")))
                }
            };
            if Instant::now() > deadline {
                return Err(HubError::Unavailable(format!("{retry}; retry shortly")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Commits `cmd` here (openraft refuses unless this hub leads). A submission the leader
    /// can place at once commits with its assignment in one entry.
    /// (Boxed: sending an assignment may write again, a requeue, through here.)
    fn commit(
        &self,
        cmd: Command,
    ) -> futures::future::BoxFuture<'_, Result<Response, crate::commit::WriteError>> {
        Box::pin(async move {
            match crate::scheduler::at_submission(self, &cmd) {
                Some(placed) => {
                    // Once queued, the unit commits whatever becomes of the caller (a client
                    // that gives up, a timeout), and then its assignment must reach the node
                    // and its reservation hold until then: both go on a task of their own.
                    let hub = self.clone();
                    let unit = placed.command(cmd);
                    tokio::spawn(async move {
                        let answer = hub.inner.commit.write(unit).await?;
                        Ok(placed.dispatch(&hub, answer).await)
                    })
                    .await
                    .unwrap_or(Err(RaftError::Fatal(openraft::error::Fatal::Panicked)))
                }
                None => self.inner.commit.write(cmd).await,
            }
        })
    }

    async fn forward(&self, leader: &HubNode, cmd: &Command) -> Result<Response, ForwardFailure> {
        let mut client = self
            .inner
            .net
            .client(&leader.raft)
            .map_err(|e| ForwardFailure::Final(HubError::Internal(e.to_string())))?;
        match client.forward(encode(cmd)).await {
            Ok(reply) => match decode::<Result<Response, PeerError>>(reply.get_ref()) {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(PeerError::NotLeader)) => Err(ForwardFailure::Retry("the leader changed".into())),
                Ok(Err(PeerError::Failed(e))) => Err(ForwardFailure::Final(HubError::Unavailable(e))),
                Err(e) => Err(ForwardFailure::Final(HubError::Internal(format!("leader reply: {e}")))),
            },
            // Not connected: nothing was sent, so trying again cannot commit twice.
            Err(s) if s.code() == tonic::Code::Unavailable && s.message().contains("connect") => {
                Err(ForwardFailure::Retry(format!("leader unreachable: {}", s.message())))
            }
            Err(s) => Err(ForwardFailure::Final(HubError::Unavailable(format!(
                "forwarding to the leader failed ({}); the outcome is unknown, retry with an idempotency key",
                s.message()
            )))),
        }
    }

    /// Only on the leader: commit a forwarded command.
    pub(crate) async fn write_as_leader(&self, cmd: Command) -> Result<Response, PeerError> {
        let written = tokio::time::timeout(LEADER_WAIT, self.commit(cmd)).await;
        let Ok(written) = written else {
            return Err(PeerError::Failed(
                "the write was not committed in time (no quorum?); its outcome is unknown".into(),
            ));
        };
        match written {
            Ok(r) => Ok(r),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(PeerError::NotLeader)
            }
            Err(e) => Err(PeerError::Failed(e.to_string())),
        }
    }

    /// Only on the leader: the index a linearizable read must wait for.
    pub(crate) async fn read_index_as_leader(&self) -> Result<u64, PeerError> {
        match tokio::time::timeout(Duration::from_secs(2), self.inner.raft.get_read_log_id()).await
        {
            Ok(Ok((read, _applied))) => Ok(read.map_or(0, |l| l.index)),
            Ok(Err(RaftError::APIError(_))) => Err(PeerError::NotLeader),
            Ok(Err(e)) => Err(PeerError::Failed(e.to_string())),
            Err(_) => Err(PeerError::Failed(
                "no quorum confirmed the leader in time".into(),
            )),
        }
    }

    /// Waits until this hub has applied everything committed before the call: a read after
    /// it sees every write acknowledged before it, whichever hub took the write.
    pub async fn read_barrier(&self) -> HubResult<()> {
        let deadline = Instant::now() + LEADER_WAIT;
        let index = loop {
            let r = if self.is_leader() {
                self.read_index_as_leader().await
            } else if let Some((_, node)) = self.leader() {
                match self.inner.net.client(&node.raft) {
                    Ok(mut c) => match c.read_index(encode(&())).await {
                        Ok(reply) => decode::<Result<u64, PeerError>>(reply.get_ref())
                            .unwrap_or_else(|e| Err(PeerError::Failed(e.to_string()))),
                        Err(s) => Err(PeerError::Failed(s.message().to_owned())),
                    },
                    Err(e) => Err(PeerError::Failed(e.to_string())),
                }
            } else {
                Err(PeerError::NotLeader)
            };
            match r {
                Ok(i) => break i,
                Err(e) if Instant::now() > deadline => {
                    return Err(HubError::Unavailable(format!(
                        "cannot confirm a consistent read: {e}"
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.inner
            .raft
            .wait(Some(LEADER_WAIT))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(|e| HubError::Unavailable(format!("this hub is behind: {e}")))?;
        Ok(())
    }

    /// Adds or removes a hub (on the leader; forwarded from a follower).
    pub async fn change_membership(&self, change: MembershipChange) -> HubResult<()> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let r = if self.is_leader() {
                self.change_membership_as_leader(change.clone()).await
            } else if let Some((_, node)) = self.leader() {
                match self.inner.net.client(&node.raft) {
                    Ok(mut c) => match c.change_membership(encode(&change)).await {
                        Ok(reply) => decode::<Result<(), PeerError>>(reply.get_ref())
                            .unwrap_or_else(|e| Err(PeerError::Failed(e.to_string()))),
                        Err(s) => Err(PeerError::Failed(s.message().to_owned())),
                    },
                    Err(e) => Err(PeerError::Failed(e.to_string())),
                }
            } else {
                Err(PeerError::NotLeader)
            };
            match r {
                Ok(()) => return Ok(()),
                Err(PeerError::NotLeader) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => {
                    return Err(HubError::FailedPrecondition(format!(
                        "membership change failed: {e}"
                    )))
                }
            }
        }
    }

    pub(crate) async fn change_membership_as_leader(
        &self,
        change: MembershipChange,
    ) -> Result<(), PeerError> {
        let map = |e: RaftError<u64, ClientWriteError<u64, HubNode>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => PeerError::NotLeader,
            other => PeerError::Failed(other.to_string()),
        };
        let raft = &self.inner.raft;
        match change {
            MembershipChange::Add { id, node } => {
                tracing::info!(hub = id, %node, "adding hub as learner");
                raft.add_learner(id, node, true).await.map_err(map)?;
                tracing::info!(hub = id, "learner caught up; promoting to voter");
                raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(map)?;
            }
            MembershipChange::Remove { id } => {
                tracing::info!(hub = id, "removing hub");
                raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                    .await
                    .map_err(map)?;
            }
        }
        Ok(())
    }

    /// This hub's own view of the cluster.
    pub fn local_view(&self) -> ClusterView {
        let m = self.inner.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let last = m.last_log_index.unwrap_or(0);
        let replication = m.replication.clone().unwrap_or_default();
        let members = membership
            .nodes()
            .map(|(id, node)| {
                let matched = if Some(*id) == m.current_leader && *id == m.id {
                    Some(last)
                } else {
                    replication.get(id).map(|l| l.map_or(0, |l| l.index))
                };
                MemberView {
                    id: *id,
                    api: node.api.clone(),
                    raft: node.raft.clone(),
                    role: if Some(*id) == m.current_leader {
                        "leader"
                    } else if voters.contains(id) {
                        "follower"
                    } else {
                        "learner"
                    }
                    .into(),
                    matched_index: matched.unwrap_or(0),
                    lag: matched.map_or(0, |x| last.saturating_sub(x)),
                }
            })
            .collect();
        ClusterView {
            this_hub: m.id,
            leader_id: m.current_leader,
            term: m.current_term,
            last_log_index: last,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            members,
        }
    }

    /// Connected nodes and their live load: held by the leader, asked for from a follower
    /// (empty when no leader can be reached).
    pub async fn live_nodes(&self) -> std::collections::HashMap<String, crate::sessions::LiveView> {
        if self.is_leader() {
            return self.sessions.views();
        }
        let Some((id, node)) = self.leader() else {
            return Default::default();
        };
        if id == self.id() {
            return Default::default();
        }
        let Ok(mut c) = self.inner.net.client(&node.raft) else {
            return Default::default();
        };
        match tokio::time::timeout(Duration::from_secs(2), c.live(encode(&()))).await {
            Ok(Ok(reply)) => decode(reply.get_ref()).unwrap_or_default(),
            _ => Default::default(),
        }
    }

    /// The leader's view when it can be reached (it knows replication lag), else our own.
    pub async fn cluster_view(&self) -> ClusterView {
        if !self.is_leader() {
            if let Some((_, node)) = self.leader() {
                if let Ok(mut c) = self.inner.net.client(&node.raft) {
                    if let Ok(Ok(reply)) =
                        tokio::time::timeout(Duration::from_secs(2), c.status(encode(&()))).await
                    {
                        if let Ok(mut v) = decode::<ClusterView>(reply.get_ref()) {
                            v.this_hub = self.id();
                            return v;
                        }
                    }
                }
            }
        }
        self.local_view()
    }
}

enum ForwardFailure {
    Retry(String),
    Final(HubError),
}

/// How long sending one snapshot chunk may take, and the last one with its install.
const INSTALL_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes of snapshot per InstallSnapshot message.
const SNAPSHOT_CHUNK_BYTES: u64 = 4 << 20;

fn raft_config(c: &HubConfig) -> anyhow::Result<Arc<openraft::Config>> {
    let cfg = openraft::Config {
        cluster_name: c.cluster_name.clone(),
        heartbeat_interval: c.raft_heartbeat_ms,
        election_timeout_min: c.raft_election_timeout_ms,
        election_timeout_max: 2 * c.raft_election_timeout_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(c.snapshot_logs),
        // Keep some log behind a snapshot so a briefly lagging follower catches up from
        // the log; one further behind gets the snapshot.
        max_in_snapshot_log_to_keep: (c.snapshot_logs / 10).min(1000),
        // A chunk must arrive within this, and the last one also covers installing the
        // snapshot: loading every finished task it carries into the history store. The
        // default (200 ms) is too short for either once the store holds thousands of
        // records, and a timed-out transfer starts again from the first chunk.
        install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT.as_millis() as u64,
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        ..Default::default()
    };
    Ok(Arc::new(cfg.validate().context("raft configuration")?))
}

/// Loads the shared CA named in the config, or the hub's own under `<data_dir>/pki`
/// (generated on first start).
fn load_ca(config: &HubConfig) -> anyhow::Result<Ca> {
    match &config.ca {
        Some((cert, key)) => {
            let cert_pem = std::fs::read_to_string(cert)
                .with_context(|| format!("reading {}", cert.display()))?;
            let key_pem = std::fs::read_to_string(key)
                .with_context(|| format!("reading {}", key.display()))?;
            Ok(Ca::from_pem(&cert_pem, &key_pem)?)
        }
        None => Ok(Ca::load_or_generate(
            &config.data_dir.join("pki"),
            &config.cluster_name,
        )?),
    }
}

/// Starts a hub on already-bound listeners and serves until `shutdown` resolves.
pub async fn run(
    mut config: HubConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let api_addr = listeners.api.local_addr()?;
    let raft_addr = listeners.raft.local_addr()?;
    // Listening on port 0: advertise the ports actually bound.
    if config.advertise.ends_with(":0") {
        config.advertise = format!("https://{api_addr}");
    }
    if config.raft_advertise.ends_with(":0") {
        config.raft_advertise = format!("https://{raft_addr}");
    }
    let data_dir = config.data_dir.clone();
    flotilla_common::pki::private_dir(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let ca = load_ca(&config).context("cluster CA")?;
    let identity = ca
        .issue_hub(&format!("hub-{}", config.id), &config.tls_names)
        .context("hub certificate")?;
    let api_tls = tls::server_config(ca.cert_pem(), &identity)?;
    let raft_tls = tls::server_config_mtls(ca.cert_pem(), &identity)?;
    let net = Network::new(tls::client_config(ca.cert_pem(), Some(&identity))?);

    let events = EventLogs::default();
    let wake = Arc::new(Notify::new());
    let sessions = Sessions::default();
    let (workflows, _) = tokio::sync::watch::channel(0u64);
    let hooks = Arc::new(Hooks {
        events: events.clone(),
        wake: wake.clone(),
        sessions: sessions.clone(),
        workflows: workflows.clone(),
    });
    let (log_store, sm_store) = raft::open(
        &data_dir.join("raft"),
        config.storage_cache_mb * 1024 * 1024,
        hooks,
    )?;
    let state = sm_store.state();
    let raft = Raft::new(
        config.id,
        raft_config(&config)?,
        net.clone(),
        log_store,
        sm_store,
    )
    .await
    .context("starting raft")?;

    if config.bootstrap && !raft.is_initialized().await? {
        let members: BTreeMap<u64, HubNode> = if config.peers.is_empty() {
            BTreeMap::from([(
                config.id,
                HubNode {
                    api: config.advertise.clone(),
                    raft: config.raft_advertise.clone(),
                },
            )])
        } else {
            config
                .peers
                .iter()
                .map(|p| {
                    (
                        p.id,
                        HubNode {
                            api: p.api.clone(),
                            raft: p.raft.clone(),
                        },
                    )
                })
                .collect()
        };
        let ids: Vec<u64> = members.keys().copied().collect();
        match raft.initialize(members).await {
            Ok(()) => tracing::info!(hub = config.id, voters = ?ids, "bootstrapped a new cluster"),
            // Another peer initialized first with the same members: nothing to do.
            Err(e) => tracing::info!(hub = config.id, error = %e, "cluster already initialized"),
        }
    }

    let quota = crate::quota::Quota::new(config.limits.clone());
    let hub = Hub {
        inner: Arc::new(Inner {
            config,
            commit: crate::commit::GroupCommit::start(raft.clone()),
            raft: raft.clone(),
            state,
            ca,
            wake,
            net,
        }),
        events,
        sessions,
        pending: PendingReasons::default(),
        placing: Default::default(),
        quota,
        tokens: crate::auth::TokenCache::default(),
        workflows,
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(leader_housekeeping(hub.clone(), stop_rx.clone()));
    tokio::spawn(crate::scheduler::run(hub.clone(), stop_rx.clone()));
    tokio::spawn(follow_leadership(hub.clone(), stop_rx.clone()));
    tokio::spawn(crate::liveness::run(hub.clone(), stop_rx.clone()));
    tokio::spawn(crate::timers::run(hub.clone(), stop_rx.clone()));
    tokio::spawn(crate::retention::run(hub.clone(), stop_rx.clone()));

    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::agent_service_server::AgentServiceServer<crate::service::agent::AgentApi>>()
        .await;
    health
        .set_serving::<pb::node_service_server::NodeServiceServer<crate::service::node::NodeApi>>()
        .await;
    health
        .set_serving::<pb::admin_service_server::AdminServiceServer<crate::service::admin::AdminApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection service")?;

    let agent =
        pb::agent_service_server::AgentServiceServer::new(crate::service::agent::AgentApi {
            hub: hub.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let node = pb::node_service_server::NodeServiceServer::new(crate::service::node::NodeApi {
        hub: hub.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin =
        pb::admin_service_server::AdminServiceServer::new(crate::service::admin::AdminApi {
            hub: hub.clone(),
        });
    let raft_svc = pb::raft_service_server::RaftServiceServer::new(raft::service::RaftApi {
        hub: hub.clone(),
    })
    .max_decoding_message_size(64 * 1024 * 1024)
    .max_encoding_message_size(64 * 1024 * 1024);

    tracing::info!(hub = hub.id(), api = %api_addr, raft = %raft_addr, "hub serving");
    let (raft_stop_tx, raft_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let raft_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(raft_svc)
            .serve_with_incoming_shutdown(
                tls::incoming(listeners.raft, raft_tls, Default::default()),
                async {
                    let _ = raft_stop_rx.await;
                },
            ),
    );
    // On shutdown: end node sessions first (nodes move to another hub at once), then give
    // in-flight calls and watches a bounded time to finish.
    let (drain_tx, mut drain_rx) = tokio::sync::watch::channel(false);
    let sessions = hub.sessions.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: closing node sessions");
        sessions.close_all();
        let _ = drain_tx.send(true);
    });
    let mut drain_signal = drain_rx.clone();
    let limits = &hub.config().limits;
    let conn_limits = tls::ConnLimits {
        max_connections: limits.max_connections,
        handshake_timeout: Duration::from_millis(limits.handshake_timeout_ms),
        idle_timeout: (limits.idle_timeout_ms > 0)
            .then(|| Duration::from_millis(limits.idle_timeout_ms)),
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(crate::conn::track_requests())
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(agent)
        .add_service(node)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            tls::incoming(listeners.api, api_tls, conn_limits),
            async move {
                let _ = drain_signal.wait_for(|d| *d).await;
            },
        );
    let result = tokio::select! {
        r = server => r,
        _ = async {
            let _ = drain_rx.wait_for(|d| *d).await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => {
            tracing::warn!(timeout_s = DRAIN_TIMEOUT.as_secs(), "streams still open after the drain timeout; closing them");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    hub.sessions.close_all();
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    let _ = raft_stop_tx.send(());
    let _ = raft_server.await;
    result.context("grpc server")?;
    tracing::info!("hub stopped");
    Ok(())
}

/// Node sessions belong with the leader: when this hub stops being leader, it ends them so
/// the nodes reconnect to the new one.
async fn follow_leadership(hub: Hub, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut metrics = hub.raft().metrics();
    let mut was_leader = false;
    loop {
        let leader = hub.is_leader();
        if was_leader && !leader {
            tracing::warn!(hub = hub.id(), "lost leadership; closing node sessions");
            hub.sessions.close_all();
        }
        if !was_leader && leader {
            tracing::info!(
                hub = hub.id(),
                term = metrics.borrow().current_term,
                "became leader"
            );
        }
        was_leader = leader;
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// What only the leader does once: make sure a signing key exists, and leave a bootstrap
/// admin token in the data dir for the operator.
async fn leader_housekeeping(hub: Hub, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !hub.is_leader() {
            continue;
        }
        if hub.state().signing_keys.is_empty() {
            let key = match SigningKey::generate(flotilla_common::now_ms()) {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!(error = %e, "cannot generate a signing key");
                    continue;
                }
            };
            if let Err(e) = hub.write(Command::AddSigningKey(key)).await {
                tracing::warn!(error = %e, "could not store the signing key yet");
                continue;
            }
            tracing::info!("created the agent token signing key");
        }
        let path = hub.config().data_dir.join(ADMIN_TOKEN_FILE);
        if !path.exists() {
            match crate::service::admin::issue_agent_token(
                &hub,
                "admin",
                flotilla_common::jwt::DEFAULT_TENANT,
                vec!["*".into()],
                365 * 24 * 3600,
                (None, None),
            ) {
                Ok((token, _)) => {
                    if let Err(e) = flotilla_common::pki::write_secret(&path, token.as_bytes()) {
                        tracing::error!(error = %e, "cannot write the admin token");
                    } else {
                        tracing::info!(path = %path.display(), "wrote a bootstrap admin token");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot issue the admin token yet"),
            }
        }
        return;
    }
}
