//! Wiring: opens the Raft storage, starts Raft, the scheduler and the gRPC services, and
//! runs until the shutdown future resolves. `run(config, listener, shutdown)` takes an
//! already-bound listener so tests can start hubs on port 0.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, RwLock, RwLockReadGuard},
    time::Duration,
};

use anyhow::Context;
use flotilla_common::{config::HubConfig, jwt::SigningKey, pki::Ca, tls};
use flotilla_proto as pb;
use openraft::{error::ClientWriteError, error::RaftError, BasicNode};
use tokio::{net::TcpListener, sync::Notify};

use crate::{
    error::{HubError, HubResult},
    events::EventLogs,
    raft::{self, ApplyHook, Raft},
    scheduler::PendingReasons,
    sessions::Sessions,
    state::{Command, Response, State},
};

/// Largest gRPC message accepted or sent.
pub const MAX_MESSAGE_BYTES: usize = flotilla_common::config::defaults::MAX_MESSAGE_BYTES;
/// File in the data dir holding a bootstrap admin token (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

struct Inner {
    config: HubConfig,
    raft: Raft,
    state: Arc<RwLock<State>>,
    ca: Ca,
    wake: Arc<Notify>,
}

/// A running hub's shared handles.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
    pub events: EventLogs,
    pub sessions: Sessions,
    pub pending: PendingReasons,
}

struct Hooks {
    events: EventLogs,
    wake: Arc<Notify>,
}

impl ApplyHook for Hooks {
    fn applied(&self, state: &State, cmd: &Command, resp: &Response) {
        let task_id = match (cmd, resp) {
            (_, Response::Rejected(_)) => None,
            (
                Command::SubmitTask(_),
                Response::Submitted {
                    deduplicated: true, ..
                },
            ) => None,
            (Command::SubmitTask(t), _) => Some(&t.id),
            (Command::AssignTask { task_id, .. }, _)
            | (Command::StartTask { task_id, .. }, _)
            | (Command::FinishTask { task_id, .. }, _)
            | (Command::RequeueTask { task_id, .. }, _)
            | (Command::CancelTask { task_id, .. }, _) => Some(task_id),
            _ => None,
        };
        if let Some(t) = task_id.and_then(|id| state.tasks.get(id)) {
            self.events.transition(t);
        }
        self.wake.notify_one();
    }

    fn replaced(&self, _state: &State) {
        self.events.clear();
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

    pub fn is_leader(&self) -> bool {
        self.inner.raft.metrics().borrow().current_leader == Some(self.id())
    }

    pub fn require_leader(&self) -> HubResult<()> {
        if self.is_leader() {
            return Ok(());
        }
        Err(self.not_leader())
    }

    fn not_leader(&self) -> HubError {
        let m = self.inner.raft.metrics().borrow().clone();
        match m.current_leader {
            Some(l) => {
                let addr = m
                    .membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.addr.clone())
                    .unwrap_or_default();
                HubError::Unavailable(format!("this hub is not the leader; hub {l} at {addr} is"))
            }
            None => HubError::Unavailable("no leader elected yet; retry shortly".into()),
        }
    }

    /// Commits a command through Raft and returns what applying it did.
    pub async fn write(&self, cmd: Command) -> HubResult<Response> {
        match self.inner.raft.client_write(cmd).await {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(self.not_leader())
            }
            Err(RaftError::APIError(e)) => {
                Err(HubError::Unavailable(format!("cannot commit: {e}")))
            }
            Err(RaftError::Fatal(e)) => Err(HubError::Internal(format!("raft stopped: {e}"))),
        }
    }
}

fn raft_config() -> anyhow::Result<Arc<openraft::Config>> {
    let cfg = openraft::Config {
        cluster_name: "flotilla".into(),
        heartbeat_interval: 250,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(10_000),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    };
    Ok(Arc::new(cfg.validate().context("raft configuration")?))
}

/// Starts a hub on `listener` and serves until `shutdown` resolves.
pub async fn run(
    mut config: HubConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let bound = listener.local_addr()?;
    if config.advertise.ends_with(":0") {
        // Listening on port 0: advertise the port actually bound.
        config.advertise = format!("https://{bound}");
    }
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let pki_dir = data_dir.join("pki");
    let ca = Ca::load_or_generate(&pki_dir, &config.cluster_name).context("cluster CA")?;
    let identity = ca
        .issue_hub(&format!("hub-{}", config.id), &config.tls_names)
        .context("hub certificate")?;
    let tls_config = tls::server_config(ca.cert_pem(), &identity)?;

    let events = EventLogs::default();
    let wake = Arc::new(Notify::new());
    let hooks = Arc::new(Hooks {
        events: events.clone(),
        wake: wake.clone(),
    });
    let (log_store, sm_store) = raft::open(&data_dir.join("raft"), hooks)?;
    let state = sm_store.state();
    let raft = Raft::new(
        config.id,
        raft_config()?,
        raft::network::Network,
        log_store,
        sm_store,
    )
    .await
    .context("starting raft")?;

    if config.bootstrap && !raft.is_initialized().await? {
        let mut members = BTreeMap::new();
        members.insert(
            config.id,
            BasicNode {
                addr: config.advertise.clone(),
            },
        );
        raft.initialize(members)
            .await
            .context("bootstrapping the cluster")?;
        tracing::info!(hub = config.id, "bootstrapped a new cluster");
    }

    let hub = Hub {
        inner: Arc::new(Inner {
            config,
            raft: raft.clone(),
            state,
            ca,
            wake,
        }),
        events,
        sessions: Sessions::default(),
        pending: PendingReasons::default(),
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(leader_housekeeping(hub.clone(), stop_rx.clone()));
    tokio::spawn(crate::scheduler::run(hub.clone(), stop_rx.clone()));

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

    tracing::info!(hub = hub.id(), addr = %bound, "hub serving");
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(agent)
        .add_service(node)
        .add_service(admin)
        .serve_with_incoming_shutdown(tls::incoming(listener, tls_config), shutdown)
        .await;
    let _ = stop_tx.send(true);
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    result.context("grpc server")?;
    tracing::info!("hub stopped");
    Ok(())
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
