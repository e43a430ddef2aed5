//! Nodes connected to this hub right now: their outgoing message queue and their live
//! load. Nothing here is replicated; after a failover nodes reconnect and say hello again.
//! What a session does, from hello to end, is `protocol`.

pub mod protocol;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use flotilla_proto::{HubMessage, ServerState};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the leader knows live about a connected node, as followers see it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LiveView {
    pub cpu_percent: f64,
    pub running: u32,
    pub servers: Vec<LiveServerView>,
    pub last_seen_ms: i64,
    /// Where the node's HTTP port is reached (an older leader does not say).
    #[serde(default)]
    pub http: String,
    /// The node is stopping: no new work for it.
    #[serde(default)]
    pub stopping: bool,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LiveServerView {
    pub name: String,
    pub state: i32,
    pub error: String,
}

#[derive(Clone, Debug)]
pub struct LiveServer {
    pub name: String,
    pub state: ServerState,
    pub error: String,
    pub running: u32,
}

#[derive(Clone, Debug)]
pub struct LiveNode {
    pub session: u64,
    pub tx: mpsc::Sender<HubMessage>,
    /// Cancelled to end the session from the hub's side.
    pub ended: CancellationToken,
    pub cpu_percent: f64,
    pub running: u32,
    pub servers: Vec<LiveServer>,
    pub last_seen: Instant,
    pub last_seen_ms: i64,
    /// Where the node's HTTP port is reached, as its hello said.
    pub http: String,
    /// The serial of the certificate the session was opened with.
    pub serial: String,
    /// The node said it is stopping (SIGTERM): it finishes its calls, takes no new work.
    pub stopping: bool,
}

impl LiveNode {
    pub fn server_ready(&self, name: &str) -> bool {
        self.servers
            .iter()
            .any(|s| s.name == name && s.state == ServerState::Ready)
    }
}

#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<String, LiveNode>>>,
    /// When each node whose session closed was last heard from.
    departed: Arc<Mutex<HashMap<String, Instant>>>,
    next_session: Arc<AtomicU64>,
}

impl Sessions {
    /// Registers a node's session, replacing (and ending) an older one. Returns the session
    /// number and the token that ends it.
    pub fn open(
        &self,
        node_id: &str,
        serial: &str,
        tx: mpsc::Sender<HubMessage>,
        servers: Vec<LiveServer>,
        http: String,
    ) -> (u64, CancellationToken) {
        self.departed.lock().expect("departed lock").remove(node_id);
        let session = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        let ended = CancellationToken::new();
        let live = LiveNode {
            session,
            tx,
            ended: ended.clone(),
            cpu_percent: 0.0,
            running: 0,
            servers,
            last_seen: Instant::now(),
            last_seen_ms: flotilla_common::now_ms(),
            http,
            serial: serial.to_owned(),
            stopping: false,
        };
        if let Some(old) = self
            .inner
            .lock()
            .expect("sessions lock")
            .insert(node_id.to_owned(), live)
        {
            old.ended.cancel();
        }
        (session, ended)
    }

    /// Ends every session (this hub is no longer the leader, or is stopping).
    pub fn close_all(&self) {
        for (_, l) in self.inner.lock().expect("sessions lock").drain() {
            l.ended.cancel();
        }
    }

    /// Removes the node's session if it is still `session` (a newer one stays).
    pub fn close(&self, node_id: &str, session: u64) {
        let mut m = self.inner.lock().expect("sessions lock");
        if m.get(node_id).is_some_and(|l| l.session == session) {
            if let Some(l) = m.remove(node_id) {
                l.ended.cancel();
                self.departed
                    .lock()
                    .expect("departed lock")
                    .insert(node_id.to_owned(), l.last_seen);
            }
        }
    }

    /// Ends the node's session, whichever it is (the node was removed).
    pub fn end(&self, node_id: &str) {
        let live = self.inner.lock().expect("sessions lock").remove(node_id);
        if let Some(l) = live {
            l.ended.cancel();
        }
        self.departed.lock().expect("departed lock").remove(node_id);
    }

    /// When a node whose session closed was last heard from (none once it reconnected).
    pub fn departed_at(&self, node_id: &str) -> Option<Instant> {
        self.departed
            .lock()
            .expect("departed lock")
            .get(node_id)
            .copied()
    }

    pub fn heartbeat(
        &self,
        node_id: &str,
        session: u64,
        cpu: f64,
        running: u32,
        servers: Vec<LiveServer>,
        stopping: bool,
    ) {
        let mut m = self.inner.lock().expect("sessions lock");
        if let Some(l) = m.get_mut(node_id).filter(|l| l.session == session) {
            l.cpu_percent = cpu;
            l.running = running;
            l.stopping = stopping;
            if !servers.is_empty() {
                l.servers = servers;
            }
            l.last_seen = Instant::now();
            l.last_seen_ms = flotilla_common::now_ms();
        }
    }

    /// The node said in its hello that it is stopping.
    pub fn mark_stopping(&self, node_id: &str, session: u64) {
        let mut m = self.inner.lock().expect("sessions lock");
        if let Some(l) = m.get_mut(node_id).filter(|l| l.session == session) {
            l.stopping = true;
        }
    }

    pub fn get(&self, node_id: &str) -> Option<LiveNode> {
        self.inner
            .lock()
            .expect("sessions lock")
            .get(node_id)
            .cloned()
    }

    /// Every connected node's live view.
    pub fn views(&self) -> HashMap<String, LiveView> {
        self.inner
            .lock()
            .expect("sessions lock")
            .iter()
            .map(|(id, l)| {
                (
                    id.clone(),
                    LiveView {
                        cpu_percent: l.cpu_percent,
                        running: l.running,
                        servers: l
                            .servers
                            .iter()
                            .map(|s| LiveServerView {
                                name: s.name.clone(),
                                state: s.state as i32,
                                error: s.error.clone(),
                            })
                            .collect(),
                        last_seen_ms: l.last_seen_ms,
                        stopping: l.stopping,
                        http: l.http.clone(),
                    },
                )
            })
            .collect()
    }

    pub fn snapshot(&self) -> HashMap<String, LiveNode> {
        self.inner.lock().expect("sessions lock").clone()
    }

    /// Queues a message for a node; false when it is not connected or its queue is full.
    pub fn send(&self, node_id: &str, msg: HubMessage) -> bool {
        match self.get(node_id) {
            Some(l) => l.tx.try_send(msg).is_ok(),
            None => false,
        }
    }
}
