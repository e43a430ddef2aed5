//! The cluster handle every part of a hub shares: the live state, Raft, and the Raft client
//! built on it (writes forwarded to the leader, read barriers, membership changes, the
//! cluster view).

use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock, RwLockReadGuard},
    time::{Duration, Instant},
};

use flotilla_common::{config::HubConfig, pki::Ca};
use flotilla_proto::{raft_service_client::RaftServiceClient, RaftMessage};
use openraft::{
    error::{ClientWriteError, RaftError},
    ChangeMembers,
};
use tokio::sync::Notify;
use tonic::transport::Channel;

use crate::{
    error::{HubError, HubResult},
    events::EventLogs,
    pending::PendingReasons,
    raft::{
        network::{decode, encode, Network},
        peer::{ClusterView, MemberView, MembershipChange, PeerError},
        HubNode, Raft,
    },
    sessions::Sessions,
    state::{Command, Response, State},
};

/// How long a write or read waits for a leader before answering UNAVAILABLE.
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// What a hub is made of when it starts (see `app::run`).
pub(crate) struct Parts {
    pub config: HubConfig,
    pub raft: Raft,
    pub state: Arc<RwLock<State>>,
    pub ca: Ca,
    /// The CA certificates trusted: the signing CA first, then `ca_trust`'s.
    pub trust_pem: String,
    pub wake: Arc<Notify>,
    pub net: Network,
    pub events: EventLogs,
    pub sessions: Sessions,
    pub workflows: tokio::sync::watch::Sender<u64>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where this hub's HTTP port is reached, http://HOST:PORT.
    pub http_url: String,
    /// The last log index known committed here (the log store keeps it).
    pub committed: Arc<std::sync::atomic::AtomicU64>,
}

struct Inner {
    config: HubConfig,
    http_url: String,
    committed: Arc<std::sync::atomic::AtomicU64>,
    raft: Raft,
    /// Every write goes through it: writes that arrive together share one entry.
    commit: crate::commit::GroupCommit,
    state: Arc<RwLock<State>>,
    ca: Ca,
    trust_pem: String,
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
    /// Tools' input schemas, compiled.
    pub schemas: crate::admission::Schemas,
    /// External identity providers and the keys this hub holds for them.
    pub issuers: Arc<crate::issuers::Issuers>,
    /// Bumped whenever a workflow changes: WatchWorkflow streams wait on it.
    pub workflows: tokio::sync::watch::Sender<u64>,
    /// What `/metrics` shows.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The dashboard's login tickets and sessions (this hub's own).
    pub dashboard: Arc<crate::dashboard::Dashboard>,
    /// What this hub saw for the audit trail, waiting to be committed.
    pub audit: Arc<crate::audit::AuditBuffer>,
}

impl Hub {
    pub(crate) fn new(p: Parts) -> Self {
        let quota = crate::quota::Quota::new(p.config.limits.clone());
        let issuers = Arc::new(crate::issuers::Issuers::new(&p.config.agent_tokens.issuers));
        Hub {
            inner: Arc::new(Inner {
                commit: crate::commit::GroupCommit::start(p.raft.clone()),
                config: p.config,
                http_url: p.http_url,
                committed: p.committed,
                raft: p.raft,
                state: p.state,
                ca: p.ca,
                trust_pem: p.trust_pem,
                wake: p.wake,
                net: p.net,
            }),
            events: p.events,
            sessions: p.sessions,
            pending: PendingReasons::default(),
            placing: Default::default(),
            quota,
            tokens: crate::auth::TokenCache::default(),
            schemas: Default::default(),
            issuers,
            workflows: p.workflows,
            metrics: p.metrics,
            dashboard: Arc::default(),
            audit: Arc::default(),
        }
    }
}

impl Hub {
    pub fn state(&self) -> RwLockReadGuard<'_, State> {
        self.inner.state.read().expect("state lock poisoned")
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Clients to other hubs' Raft ports.
    pub(crate) fn net(&self) -> &Network {
        &self.inner.net
    }

    pub fn ca(&self) -> &Ca {
        &self.inner.ca
    }

    /// The CA certificates this hub trusts, the signing CA first (a PEM bundle): what
    /// nodes are given to trust hubs by.
    pub fn trust_pem(&self) -> &str {
        &self.inner.trust_pem
    }

    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// Where this hub's HTTP port is reached, http://HOST:PORT.
    pub fn http_url(&self) -> &str {
        &self.inner.http_url
    }

    /// The last log index this hub knows committed (0 before the first it learns of).
    pub fn commit_index(&self) -> u64 {
        self.inner
            .committed
            .load(std::sync::atomic::Ordering::Relaxed)
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
    /// (Every write asks: it reads the metrics in place rather than cloning them.)
    pub fn leader(&self) -> Option<(u64, HubNode)> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
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
        self.check_level(&cmd).await?;
        self.ask_leader(
            HubError::Unavailable,
            false,
            || self.write_as_leader(cmd.clone()),
            |mut c| {
                let m = encode(&cmd);
                async move { c.forward(m).await }
            },
        )
        .await
    }

    /// Refuses a command some hub of the cluster could not apply (it runs an older build:
    /// a rolling upgrade is under way). A cluster whose level is not settled yet (just
    /// started, or just upgraded from a build without levels) is given a few seconds for
    /// its leader to ask every hub.
    async fn check_level(&self, cmd: &Command) -> HubResult<()> {
        let needs = cmd.level();
        if needs <= 1 || matches!(cmd, Command::SetClusterLevel { .. }) {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let level = self.state().cluster_level;
            if level >= needs {
                return Ok(());
            }
            if level != 0 || tokio::time::Instant::now() >= deadline {
                return Err(HubError::FailedPrecondition(format!(
                    "not every hub can apply this yet: it needs command level {needs}, and the cluster is at {level} (a hub runs an older build); upgrade every hub first (`flotilla cluster status` shows each hub's level)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks the leader: `here` when Raft names this hub leader, else `there`, an RPC to the
    /// leader's Raft port. While nothing was done (no leader yet, the leader changed, it
    /// could not be reached) it asks again, for up to `LEADER_WAIT`. Writes, read indexes
    /// and membership changes all go through here.
    /// `failed` makes the error of an ask that failed for good (or ran out of time).
    /// `repeatable`: asking twice does no harm, so an RPC that failed in any way (a
    /// connection a healed partition left broken) is asked again too.
    async fn ask_leader<T, H, HF, R, RF>(
        &self,
        failed: impl Fn(String) -> HubError,
        repeatable: bool,
        here: H,
        there: R,
    ) -> HubResult<T>
    where
        T: serde::de::DeserializeOwned,
        H: Fn() -> HF,
        HF: std::future::Future<Output = Result<T, PeerError>>,
        R: Fn(RaftServiceClient<Channel>) -> RF,
        RF: std::future::Future<Output = Result<tonic::Response<RaftMessage>, tonic::Status>>,
    {
        let failed = |e: String| Err(failed(e));
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let why = match self.leader() {
                Some((id, _)) if id == self.id() => match here().await {
                    Ok(v) => return Ok(v),
                    Err(PeerError::NotLeader) => "this hub stopped leading".to_owned(),
                    Err(PeerError::Failed(e)) => return failed(e),
                },
                Some((_, node)) => {
                    let client = self
                        .inner
                        .net
                        .client(&node.raft)
                        .map_err(|e| HubError::Internal(e.to_string()))?;
                    match there(client).await {
                        Ok(reply) => match decode::<Result<T, PeerError>>(reply.get_ref()) {
                            Ok(Ok(v)) => return Ok(v),
                            Ok(Err(PeerError::NotLeader)) => "the leader changed".to_owned(),
                            Ok(Err(PeerError::Failed(e))) => return failed(e),
                            Err(e) => {
                                return Err(HubError::Internal(format!("leader reply: {e}")))
                            }
                        },
                        // Not connected: nothing was sent, so asking again cannot do it twice.
                        Err(s) if s.code() == tonic::Code::Unavailable
                            && s.message().to_ascii_lowercase().contains("connect") =>
                        {
                            format!("leader unreachable: {}", s.message())
                        }
                        Err(s) if repeatable => format!("asking the leader failed: {}", s.message()),
                        Err(s) => {
                            return failed(format!(
                                "asking the leader failed ({}); the outcome is unknown, retry with an idempotency key",
                                s.message()
                            ))
                        }
                    }
                }
                None => "no leader elected yet".to_owned(),
            };
            if Instant::now() > deadline {
                return failed(format!("{why}; retry shortly"));
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
        let index = self
            .ask_leader(
                |e| HubError::Unavailable(format!("cannot confirm a consistent read: {e}")),
                // Asking for a read index twice does nothing twice.
                true,
                || self.read_index_as_leader(),
                |mut c| async move { c.read_index(encode(&())).await },
            )
            .await?;
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
        self.ask_leader(
            |e| HubError::FailedPrecondition(format!("membership change failed: {e}")),
            false,
            || self.change_membership_as_leader(change.clone()),
            |mut c| {
                let m = encode(&change);
                async move { c.change_membership(m).await }
            },
        )
        .await
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
                // A hub of an older build than this one would stop at the first entry it
                // cannot read (the cluster's level may be raised while it is added): add
                // hubs of the newest build only.
                let level = crate::raft::peer::HubVersion::this().command_level;
                match self.hub_version(&node.raft).await {
                    None => {
                        return Err(PeerError::Failed(format!(
                            "cannot reach hub {id} at {} to ask its version; start it first",
                            node.raft
                        )))
                    }
                    Some(v) if v.command_level < level => {
                        return Err(PeerError::Failed(format!(
                            "hub {id} runs an older build ({}, command level {}) than the leader ({level}); give it the newest build",
                            v.version, v.command_level
                        )))
                    }
                    Some(_) => {}
                }
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

    /// What the hub at `raft` (its Raft address) runs: `None` when it cannot be asked now.
    /// A hub of a build before levels answers UNIMPLEMENTED: level 1.
    pub async fn hub_version(&self, raft: &str) -> Option<crate::raft::peer::HubVersion> {
        let mut c = self.inner.net.client(raft).ok()?;
        match tokio::time::timeout(Duration::from_secs(2), c.version(encode(&()))).await {
            Ok(Ok(reply)) => decode(reply.get_ref()).ok(),
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                Some(crate::raft::peer::HubVersion {
                    command_level: 1,
                    version: "older than levels".into(),
                })
            }
            _ => None,
        }
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
                    http: if *id == m.id {
                        self.inner.http_url.clone()
                    } else {
                        String::new()
                    },
                }
            })
            .collect();
        ClusterView {
            this_hub: m.id,
            leader_id: m.current_leader,
            term: m.current_term,
            last_log_index: last,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            commit_index: self.commit_index(),
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
        let mut view = self.leaders_view().await;
        // Each hub knows its own HTTP address: ask the others, all at once, briefly (a hub
        // that does not answer in 2 s shows none).
        let asks = view
            .members
            .iter()
            .filter(|m| m.http.is_empty() && m.id != self.id())
            .map(|m| {
                let (id, raft) = (m.id, m.raft.clone());
                async move { (id, self.member_view(&raft, Duration::from_secs(2)).await) }
            });
        let answers = futures::future::join_all(asks).await;
        for m in &mut view.members {
            if m.id == self.id() {
                m.http = self.inner.http_url.clone();
            }
            let theirs = answers.iter().find(|(id, _)| *id == m.id);
            if let Some((id, Some(v))) = theirs {
                if let Some(me) = v.members.iter().find(|x| x.id == *id) {
                    m.http = me.http.clone();
                }
            }
        }
        view
    }

    /// The leader's view of the cluster (this hub's own if it cannot be reached).
    pub async fn leaders_view(&self) -> ClusterView {
        if !self.is_leader() {
            if let Some((_, node)) = self.leader() {
                if let Some(mut v) = self.member_view(&node.raft, Duration::from_secs(2)).await {
                    v.this_hub = self.id();
                    return v;
                }
            }
        }
        self.local_view()
    }

    /// The view of the hub whose Raft port is `raft`, if it answers within `wait`.
    async fn member_view(&self, raft: &str, wait: Duration) -> Option<ClusterView> {
        let mut c = self.inner.net.client(raft).ok()?;
        let reply = tokio::time::timeout(wait, c.status(encode(&())))
            .await
            .ok()?
            .ok()?;
        decode::<ClusterView>(reply.get_ref()).ok()
    }
}
