//! The node's session with the hub: one bidirectional stream, re-established with backoff
//! whenever it breaks. Assignments are run on the MCP servers; results are kept until the
//! hub acknowledges them, and sent again after a reconnect, so a result is never lost to a
//! broken connection (the hub's fencing makes a repeat harmless).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use flotilla_common::{config::NodeConfig, tls};
use flotilla_proto::{
    hub_message, node_message, node_service_client::NodeServiceClient, Assign, Heartbeat, Hello,
    NodeMessage, TaskProgress, TaskResult, TaskStarted,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{identity::Identity, load::Load, mcp::Servers};

type Key = (String, u32);

#[derive(Default)]
struct Work {
    running: HashMap<Key, CancellationToken>,
    unacked: HashMap<Key, TaskResult>,
    out: Option<mpsc::Sender<NodeMessage>>,
}

#[derive(Clone)]
pub struct Session {
    cfg: Arc<NodeConfig>,
    identity: Identity,
    servers: Servers,
    work: Arc<Mutex<Work>>,
    load: Load,
}

fn msg(m: node_message::Msg) -> NodeMessage {
    NodeMessage { msg: Some(m) }
}

impl Session {
    pub fn new(cfg: Arc<NodeConfig>, identity: Identity, servers: Servers) -> Self {
        Self {
            cfg,
            identity,
            servers,
            work: Arc::default(),
            load: Load::new(),
        }
    }

    /// The hubs to try, the configured one first.
    fn endpoints(&self) -> Vec<String> {
        let mut v = vec![self.cfg.hub.clone()];
        for h in &self.identity.hubs {
            if !v.contains(h) {
                v.push(h.clone());
            }
        }
        v
    }

    /// Keeps a session open until `shutdown` is cancelled. A hub that is not the leader
    /// answers with the leader's address, and the node goes there at once; a hub with no
    /// leader yet (an election) is asked again shortly; an unreachable hub is skipped for
    /// the next one the node knows, and only a full round of failures backs off.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tls = self.identity.client_tls()?;
        let endpoints = self.endpoints();
        let mut next = 0usize;
        let mut target = endpoints[0].clone();
        let mut backoff = Duration::from_millis(100);
        let mut unreachable_in_a_row = 0usize;
        loop {
            let started = std::time::Instant::now();
            let result = tokio::select! {
                r = self.once(&target, tls.clone()) => r,
                _ = shutdown.cancelled() => break,
            };
            self.work.lock().expect("work lock").out = None;
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            let pause = match result {
                Ok(()) => {
                    tracing::info!(hub = %target, "hub closed the session; reconnecting");
                    unreachable_in_a_row = 0;
                    Some(Duration::from_millis(100))
                }
                Err(SessionError {
                    leader: Some(leader),
                    ..
                }) if leader != target => {
                    tracing::info!(from = %target, to = %leader, "following the leader");
                    target = leader;
                    unreachable_in_a_row = 0;
                    None
                }
                Err(e) if e.no_leader => {
                    tracing::debug!(hub = %target, "no leader yet; asking again shortly");
                    unreachable_in_a_row = 0;
                    Some(NO_LEADER_RETRY)
                }
                Err(e) if e.unreachable => {
                    tracing::warn!(hub = %target, error = %e.message, "hub unreachable; trying the next one");
                    next = (next + 1) % endpoints.len();
                    target = endpoints[next].clone();
                    unreachable_in_a_row += 1;
                    if unreachable_in_a_row < endpoints.len() {
                        None
                    } else {
                        unreachable_in_a_row = 0;
                        Some(backoff)
                    }
                }
                Err(e) => {
                    tracing::warn!(hub = %target, error = %e.message, "session with the hub ended; reconnecting");
                    Some(backoff)
                }
            };
            let Some(pause) = pause else { continue };
            let jitter = Duration::from_millis(rand_ms(pause.as_millis() as u64 / 2 + 1));
            tokio::select! {
                _ = tokio::time::sleep(pause + jitter) => {}
                _ = shutdown.cancelled() => break,
            }
            if pause == backoff {
                // Capped low: after a failover the node must reach the new leader well
                // within the hub's node TTL, or its running work is treated as lost.
                backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
            }
        }
        // Stop running calls; their results would have nowhere to go.
        for (_, ct) in self.work.lock().expect("work lock").running.drain() {
            ct.cancel();
        }
        Ok(())
    }

    async fn once(&self, hub: &str, tls: Arc<rustls::ClientConfig>) -> Result<(), SessionError> {
        let channel = tls::channel(hub, tls).map_err(SessionError::other)?;
        let mut client = NodeServiceClient::new(channel)
            .max_decoding_message_size(flotilla_common::config::defaults::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(flotilla_common::config::defaults::MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(1024);
        tx.send(msg(node_message::Msg::Hello(Hello {
            labels: self.cfg.labels.clone().into_iter().collect(),
            servers: self.servers.hello_info(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            tenants: self.cfg.tenants.clone(),
            cpu_high_water_percent: self.cfg.cpu_high_water_percent,
        })))
        .await
        .map_err(SessionError::other)?;
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(SessionError::from_status)?
            .into_inner();
        // Connected: results the hub has not acknowledged go again.
        let pending: Vec<TaskResult> = {
            let mut w = self.work.lock().expect("work lock");
            w.out = Some(tx.clone());
            w.unacked.values().cloned().collect()
        };
        for r in pending {
            tx.send(msg(node_message::Msg::Result(r)))
                .await
                .map_err(SessionError::other)?;
        }
        let hb = tokio::spawn(self.clone().heartbeats(tx.clone()));
        let mut tools_changed = self.servers.tools_changed();
        tools_changed.borrow_and_update();
        let result = async {
            loop {
                let m = tokio::select! {
                    m = inbound.message() => match m.map_err(SessionError::from_status)? {
                        Some(m) => m,
                        None => break,
                    },
                    _ = tools_changed.changed() => {
                        tracing::info!("tools changed; saying hello again");
                        break;
                    }
                };
                match m.msg {
                    Some(hub_message::Msg::Welcome(w)) => {
                        tracing::info!(node_id = %w.node_id, "session open");
                    }
                    Some(hub_message::Msg::Assign(a)) => self.assign(a),
                    Some(hub_message::Msg::Cancel(c)) => {
                        let w = self.work.lock().expect("work lock");
                        if let Some(ct) = w.running.get(&(c.task_id.clone(), c.attempt)) {
                            tracing::info!(task_id = %c.task_id, attempt = c.attempt, "cancelling");
                            ct.cancel();
                        }
                    }
                    Some(hub_message::Msg::ResultAck(a)) => {
                        self.work
                            .lock()
                            .expect("work lock")
                            .unacked
                            .remove(&(a.task_id, a.attempt));
                    }
                    None => {}
                }
            }
            Ok::<_, SessionError>(())
        }
        .await;
        hb.abort();
        result
    }

    async fn heartbeats(self, tx: mpsc::Sender<NodeMessage>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        loop {
            tick.tick().await;
            let running = self.work.lock().expect("work lock").running.len() as u32;
            let hb = Heartbeat {
                cpu_percent: self.load.cpu_percent(),
                running,
                servers: self.servers.statuses(),
            };
            if tx
                .send(msg(node_message::Msg::Heartbeat(hb)))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    fn send(&self, m: NodeMessage) {
        let out = self.work.lock().expect("work lock").out.clone();
        if let Some(out) = out {
            let _ = out.try_send(m);
        }
    }

    fn assign(&self, a: Assign) {
        let key = (a.task_id.clone(), a.attempt);
        let ct = CancellationToken::new();
        {
            let mut w = self.work.lock().expect("work lock");
            if w.running.contains_key(&key) || w.unacked.contains_key(&key) {
                return; // a repeat of an assignment we already have
            }
            w.running.insert(key.clone(), ct.clone());
        }
        tracing::info!(task_id = %a.task_id, attempt = a.attempt, tool = %a.tool, server = %a.server, "running task");
        let this = self.clone();
        tokio::spawn(async move {
            let result = this.execute(&a, ct).await;
            let mut w = this.work.lock().expect("work lock");
            w.running.remove(&key);
            w.unacked.insert(key, result.clone());
            if let Some(out) = w.out.clone() {
                drop(w);
                let _ = out.try_send(msg(node_message::Msg::Result(result)));
            }
        });
    }

    async fn execute(&self, a: &Assign, ct: CancellationToken) -> TaskResult {
        let mut result = TaskResult {
            task_id: a.task_id.clone(),
            attempt: a.attempt,
            fence: a.fence,
            ..Default::default()
        };
        let args = match serde_json::from_slice::<serde_json::Value>(&a.arguments) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => {
                result.error = "arguments are not a JSON object".into();
                return result;
            }
        };
        self.send(msg(node_message::Msg::Started(TaskStarted {
            task_id: a.task_id.clone(),
            attempt: a.attempt,
            fence: a.fence,
        })));
        let (ptx, mut prx) = mpsc::channel(64);
        let forward = {
            let this = self.clone();
            let (task_id, attempt, fence) = (a.task_id.clone(), a.attempt, a.fence);
            tokio::spawn(async move {
                while let Some(p) = prx.recv().await {
                    let p: crate::mcp::Progress = p;
                    this.send(msg(node_message::Msg::Progress(TaskProgress {
                        task_id: task_id.clone(),
                        attempt,
                        fence,
                        progress: p.progress,
                        total: p.total,
                        message: p.message.unwrap_or_default(),
                    })));
                }
            })
        };
        match self.servers.call(&a.server, &a.tool, args, ptx, ct).await {
            Ok(v) => result.result = serde_json::to_vec(&v).unwrap_or_default(),
            Err(e) => result.error = e.to_string(),
        }
        let _ = forward.await;
        result
    }
}

/// The longest pause between reconnection attempts (plus up to half of it as jitter).
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(1);
/// How soon to ask a hub again while it has no leader (an election takes about a second).
const NO_LEADER_RETRY: Duration = Duration::from_millis(150);

/// Why a session ended, and where to go next.
#[derive(Debug)]
struct SessionError {
    message: String,
    /// The leader's address, when the hub said it is not the leader.
    leader: Option<String>,
    /// The hub could not be reached, or the connection to it broke.
    unreachable: bool,
    /// The hub is up but knows no leader yet.
    no_leader: bool,
}

impl SessionError {
    fn other(e: impl std::fmt::Display) -> Self {
        Self {
            message: e.to_string(),
            leader: None,
            unreachable: false,
            no_leader: false,
        }
    }

    fn from_status(s: tonic::Status) -> Self {
        let leader = s
            .metadata()
            .get(flotilla_proto::LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let no_leader = s.metadata().get(flotilla_proto::NO_LEADER_HEADER).is_some();
        let broken = matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::Internal
        );
        Self {
            unreachable: broken && leader.is_none() && !no_leader,
            no_leader,
            message: format!("{:?}: {}", s.code(), s.message()),
            leader,
        }
    }
}

fn rand_ms(max: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(max);
    h.finish() % max.max(1)
}
