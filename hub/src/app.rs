//! Wiring: opens the Raft storage, starts Raft, the scheduler and the gRPC services, and
//! runs until the shutdown future resolves. `run(config, listener, shutdown)` takes an
//! already-bound listener so tests can start hubs on port 0.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use flotilla_common::{config::HubConfig, pki::Ca, tls};
use flotilla_proto as pb;
use tokio::{net::TcpListener, sync::Notify};

use crate::{
    chores,
    cluster::{Hub, Parts},
    events::EventLogs,
    liveness::Liveness,
    raft::{self, network::Network, ApplyHook, Raft},
    retention::{AuditRetention, Retention},
    scheduler::Scheduling,
    sessions::Sessions,
    state::{Effects, Response, State},
    timers::Deadlines,
};

/// How long a stopping hub lets open calls and streams finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// The two listeners a hub serves on, already bound.
pub struct Listeners {
    /// Agents, nodes and admins.
    pub api: TcpListener,
    /// Other hubs (Raft).
    pub raft: TcpListener,
    /// Operators: metrics and health over plain HTTP.
    pub http: TcpListener,
}

/// Largest gRPC message accepted or sent.
pub const MAX_MESSAGE_BYTES: usize = flotilla_common::config::defaults::MAX_MESSAGE_BYTES;

struct Hooks {
    events: EventLogs,
    wake: Arc<Notify>,
    sessions: Sessions,
    workflows: tokio::sync::watch::Sender<u64>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl ApplyHook for Hooks {
    fn applied(&self, index: u64, state: &State, _resp: &Response, effects: &Effects) {
        let mut seen = std::collections::HashSet::new();
        let archived: std::collections::HashMap<&str, &crate::state::TaskRecord> = effects
            .archived
            .iter()
            .map(|t| (t.id.as_str(), t))
            .collect();
        let task = |id: &str| state.tasks.get(id).or(archived.get(id).copied());
        // Entries replayed on start count nothing again.
        let counts = self.metrics.counts(index);
        for id in &effects.touched {
            if seen.insert(id) {
                if let Some(t) = task(id) {
                    self.events.transition(t);
                    if counts {
                        self.metrics.transitioned(t);
                    }
                }
            }
        }
        if counts {
            for t in effects.inserted.iter().filter_map(|id| task(id)) {
                self.metrics.submitted(t);
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
        // Removed nodes: their sessions end now (their certificates open no other).
        for node_id in &effects.removed_nodes {
            self.sessions.end(node_id);
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

/// The CA certificates this hub trusts: its signing CA, and `ca_trust`'s while the CA is
/// rotated.
fn trust_bundle(config: &HubConfig, ca: &Ca) -> anyhow::Result<String> {
    let extra = match &config.ca_trust {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            anyhow::ensure!(
                !text.trim().is_empty(),
                "{} is empty: it should hold the CA certificates to trust (PEM)",
                path.display()
            );
            text
        }
        None => String::new(),
    };
    let bundle = flotilla_common::pki::trust_bundle(ca.cert_pem(), &extra)?;
    let others = bundle.matches("BEGIN CERTIFICATE").count() - 1;
    if others > 0 {
        tracing::info!(
            others,
            "trusting CA certificates besides the signing one (ca_trust)"
        );
    }
    Ok(bundle)
}

/// Where others reach the HTTP port bound at `bound`: `http_advertise`; else, when it
/// listens on every address (`0.0.0.0`), the host others reach the API at, with its port;
/// else the bound address.
fn http_address(config: &HubConfig, bound: std::net::SocketAddr, tls: bool) -> String {
    if let Some(a) = &config.http_advertise {
        return a.clone();
    }
    if bound.ip().is_unspecified() {
        if let Ok((host, _)) = tls::split_address(&config.advertise) {
            let ip = host.parse::<std::net::IpAddr>().ok();
            if !ip.is_some_and(|ip| ip.is_unspecified()) {
                let scheme = if tls { "https" } else { "http" };
                let host = match ip {
                    Some(std::net::IpAddr::V6(_)) => format!("[{host}]"),
                    _ => host,
                };
                return format!("{scheme}://{host}:{}", bound.port());
            }
        }
    }
    flotilla_common::http::url(bound, tls)
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
    crate::faults::arm()?;
    let data_dir = config.data_dir.clone();
    flotilla_common::pki::private_dir(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let ca = load_ca(&config).context("cluster CA")?;
    let trust_pem = trust_bundle(&config, &ca).context("ca_trust")?;
    let identity = tls::LiveIdentity::new(
        &chores::issue_hub_certificate(&config, &ca).context("hub certificate")?,
        ca.cert_pem(),
    )?;
    let api_tls = tls::server_config(&trust_pem, identity.clone())?;
    let raft_tls = tls::server_config_mtls(&trust_pem, identity.clone())?;
    let net = Network::new(tls::hub_client_config(&trust_pem, identity.clone())?);

    let events = EventLogs::default();
    let wake = Arc::new(Notify::new());
    let sessions = Sessions::default();
    let (workflows, _) = tokio::sync::watch::channel(0u64);
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let hooks = Arc::new(Hooks {
        events: events.clone(),
        wake: wake.clone(),
        sessions: sessions.clone(),
        workflows: workflows.clone(),
        metrics: metrics.clone(),
    });
    let (mut log_store, sm_store) = raft::open(
        &data_dir.join("raft"),
        config.storage_cache_mb * 1024 * 1024,
        hooks,
    )?;
    // What the log held at start is replayed, not new: the task metrics skip it.
    let held = openraft::storage::RaftLogStorage::get_log_state(&mut log_store)
        .await
        .context("reading the raft log")?
        .last_log_id
        .map_or(0, |l| l.index);
    metrics.count_after(held);
    let committed = log_store.committed_index();
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

    let http_tls = match &config.http_tls {
        Some((cert, key)) => Some(tls::http_server_config(cert, key)?),
        None => None,
    };
    let http_url = http_address(&config, listeners.http.local_addr()?, http_tls.is_some());
    let hub = Hub::new(Parts {
        committed,
        config,
        http_url,
        raft: raft.clone(),
        state,
        ca,
        trust_pem,
        wake,
        net,
        events,
        sessions,
        workflows,
        metrics,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(follow_leadership(hub.clone(), stop_rx.clone()));
    tokio::spawn(chores::drive(
        hub.clone(),
        chores::Housekeeping::default(),
        stop_rx.clone(),
    ));
    tokio::spawn(chores::drive(
        hub.clone(),
        chores::ClusterLevel::default(),
        stop_rx.clone(),
    ));
    tokio::spawn(chores::keep_admin_token(hub.clone(), stop_rx.clone()));
    tokio::spawn(chores::keep_hub_certificate(
        hub.clone(),
        identity,
        stop_rx.clone(),
    ));
    tokio::spawn(crate::issuers::keep_issuers(hub.clone(), stop_rx.clone()));
    tokio::spawn(crate::audit::flush(hub.clone(), stop_rx.clone()));
    tokio::spawn(chores::drive(hub.clone(), Scheduling, stop_rx.clone()));
    tokio::spawn(chores::drive(
        hub.clone(),
        Liveness::new(hub.config()),
        stop_rx.clone(),
    ));
    tokio::spawn(chores::drive(hub.clone(), Deadlines, stop_rx.clone()));
    tokio::spawn(chores::drive(
        hub.clone(),
        Retention::new(hub.config()),
        stop_rx.clone(),
    ));
    tokio::spawn(chores::drive(
        hub.clone(),
        AuditRetention::new(hub.config()),
        stop_rx.clone(),
    ));
    tokio::spawn(crate::retention::purge_sooner(hub.clone(), stop_rx.clone()));

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

    let http_addr = listeners.http.local_addr()?;
    tracing::info!(hub = hub.id(), api = %api_addr, raft = %raft_addr, http = %http_addr, "hub serving");
    let http_server = {
        let mut stop = stop_rx.clone();
        let app = crate::http::router(hub.clone());
        tokio::spawn(async move {
            let served = flotilla_common::http::serve(listeners.http, http_tls, app, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "http server");
            }
        })
    };
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
    // A new cluster, or this hub into an existing one (hub.toml `bootstrap`), now that the
    // Raft port answers the other hubs.
    tokio::spawn(raft::bootstrap::start(hub.clone(), stop_rx.clone()));
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
        .trace_fn({
            let metrics = hub.metrics.clone();
            move |req| crate::trace::request_span(&metrics, req)
        })
        .layer(crate::conn::track_requests())
        .layer(crate::metrics::grpc::layer(hub.metrics.clone()))
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
    let _ = http_server.await;
    result.context("grpc server")?;
    tracing::info!("hub stopped");
    Ok(())
}

/// Node sessions belong with the leader: when this hub stops being leader, it ends them so
/// the nodes reconnect to the new one.
async fn follow_leadership(hub: Hub, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut metrics = hub.raft().metrics();
    let mut was_leader = false;
    let mut seen_leader = None;
    loop {
        let current = metrics.borrow().current_leader;
        if current != seen_leader {
            hub.metrics.leader_changed();
            seen_leader = current;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http_port_is_advertised_at_a_reachable_host() {
        let base = "id = 1\ndata_dir = \"/x\"\nlisten = \"0.0.0.0:7443\"\n";
        let config = |extra: &str| {
            flotilla_common::config::parse_toml::<flotilla_common::config::HubFile>(
                "hub.toml",
                &format!("{base}{extra}"),
            )
            .unwrap()
            .validate("hub.toml")
            .unwrap()
        };
        let any: std::net::SocketAddr = "0.0.0.0:7480".parse().unwrap();
        let local: std::net::SocketAddr = "127.0.0.1:7480".parse().unwrap();
        let named = config("advertise = \"https://hub-1.example:7443\"");
        assert_eq!(
            http_address(&named, any, false),
            "http://hub-1.example:7480"
        );
        assert_eq!(
            http_address(&named, any, true),
            "https://hub-1.example:7480"
        );
        assert_eq!(http_address(&named, local, false), "http://127.0.0.1:7480");
        // Nothing better known: the bound address.
        assert_eq!(http_address(&config(""), any, false), "http://0.0.0.0:7480");
        let v6 = config("advertise = \"https://[fd00::1]:7443\"");
        assert_eq!(http_address(&v6, any, false), "http://[fd00::1]:7480");
        let told = config("http_advertise = \"http://lb.example\"");
        assert_eq!(http_address(&told, any, false), "http://lb.example");
    }
}
