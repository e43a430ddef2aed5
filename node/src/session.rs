//! The node's session with the hub: one bidirectional stream, re-established with backoff
//! whenever it breaks. Assignments are run on the MCP servers; results are kept until the
//! hub acknowledges them, and sent again after a reconnect, so a result is never lost to a
//! broken connection (the hub's fencing makes a repeat harmless).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tracing::Instrument;

use flotilla_common::{config::NodeConfig, tls};
use flotilla_proto::{
    hub_message, node_message, node_service_client::NodeServiceClient, Assign, Heartbeat, Hello,
    NodeMessage, TaskProgress, TaskResult, TaskStarted,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    identity::Identity,
    journal::{Entry, Journal},
    load::Load,
    mcp::Servers,
    metrics::NodeMetrics,
    reconnect::{Ended, Reconnect},
};

type Key = (String, u32);

/// What the node holds: calls running, starts the hub has not answered, results the hub
/// has not acknowledged, and the open session's outgoing queue. A result leaves only
/// when acknowledged, so every session sends the ones still held again (the hub's
/// fencing makes a repeat harmless); so does a start.
#[derive(Default)]
struct Work {
    running: HashMap<Key, CancellationToken>,
    /// Attempts of at-most-once tools, written down, whose start the hub has not yet
    /// answered: the call waits for the answer.
    awaiting: HashMap<Key, Awaiting>,
    unacked: HashMap<Key, TaskResult>,
    /// When each unacknowledged result was last sent.
    sent: HashMap<Key, std::time::Instant>,
    out: Option<mpsc::Sender<NodeMessage>>,
}

/// A start sent and not yet answered: when it was last sent, and who waits for the answer.
struct Awaiting {
    start: TaskStarted,
    sent: std::time::Instant,
    answer: oneshot::Sender<bool>,
}

/// How long a start goes unanswered before the node sends it again (the hub answers a
/// repeat as it answered the first, so a repeat is harmless).
const START_RESEND: Duration = Duration::from_secs(2);
/// How long a result goes unacknowledged on an open session before the node sends it
/// again (the hub could not commit it then: no quorum, or a command not every hub can
/// apply yet during a rolling upgrade). Its fence makes a repeat harmless.
const RESULT_RESEND: Duration = Duration::from_secs(10);

impl Work {
    /// Starts `key` unless the node already runs it or holds its result (the hub sends
    /// an assignment again when it cannot know the node got it).
    fn start(&mut self, key: &Key, cancel: CancellationToken) -> bool {
        if self.running.contains_key(key) || self.unacked.contains_key(key) {
            return false;
        }
        self.running.insert(key.clone(), cancel);
        true
    }

    /// `key` finished with `result`, held until acknowledged; the queue to send it on now.
    fn finish(&mut self, key: Key, result: TaskResult) -> Option<mpsc::Sender<NodeMessage>> {
        self.running.remove(&key);
        self.sent.insert(key.clone(), std::time::Instant::now());
        self.unacked.insert(key, result);
        self.out.clone()
    }

    /// The hub has the result of `key` (accepted or refused as stale): drop it.
    fn acknowledged(&mut self, key: &Key) {
        self.unacked.remove(key);
        self.sent.remove(key);
    }

    /// Results unacknowledged for at least `after`, marked sent again now.
    fn results_to_resend(&mut self, after: Duration) -> Vec<TaskResult> {
        let now = std::time::Instant::now();
        let mut again = Vec::new();
        for (key, r) in &self.unacked {
            let last = self.sent.entry(key.clone()).or_insert(now);
            if now.duration_since(*last) >= after {
                *last = now;
                again.push(r.clone());
            }
        }
        again
    }

    /// `start` is sent (or about to be): the answer comes on the receiver.
    fn await_start(&mut self, start: TaskStarted) -> oneshot::Receiver<bool> {
        let (answer, rx) = oneshot::channel();
        let key = (start.task_id.clone(), start.attempt);
        self.awaiting.insert(
            key,
            Awaiting {
                start,
                sent: std::time::Instant::now(),
                answer,
            },
        );
        rx
    }

    /// The hub answered the start of `key`.
    fn start_answered(&mut self, key: &Key, accepted: bool) {
        if let Some(a) = self.awaiting.remove(key) {
            let _ = a.answer.send(accepted);
        }
    }

    /// Starts unanswered for at least `after`, marked sent again now.
    fn starts_to_resend(&mut self, after: Duration) -> Vec<TaskStarted> {
        let now = std::time::Instant::now();
        self.awaiting
            .values_mut()
            .filter(|a| now.duration_since(a.sent) >= after)
            .map(|a| {
                a.sent = now;
                a.start.clone()
            })
            .collect()
    }

    /// A session opened with `out`: the results and starts it must send first.
    fn connected(&mut self, out: mpsc::Sender<NodeMessage>) -> (Vec<TaskResult>, Vec<TaskStarted>) {
        self.out = Some(out);
        let starts = self.starts_to_resend(Duration::ZERO);
        (self.results_to_resend(Duration::ZERO), starts)
    }
}

#[derive(Clone)]
pub struct Session {
    cfg: Arc<NodeConfig>,
    /// Replaced when the certificate is renewed; the next connection uses the new one.
    identity: Arc<Mutex<Identity>>,
    servers: Servers,
    /// Attempts of at-most-once tools, written down before their calls.
    journal: Journal,
    /// Set on SIGTERM: the hub is told, and gives this node no new work.
    stopping: Arc<AtomicBool>,
    /// Notified when a hub asks for the certificate to be renewed now (the CA rotated).
    renew_now: Arc<tokio::sync::Notify>,
    work: Arc<Mutex<Work>>,
    load: Load,
    metrics: Arc<NodeMetrics>,
    /// Where this node's HTTP port is reached, told to the hub in every hello.
    http_address: String,
}

fn msg(m: node_message::Msg) -> NodeMessage {
    NodeMessage { msg: Some(m) }
}

/// The report of an attempt the node was running when it stopped.
fn interrupted(e: Entry) -> TaskResult {
    TaskResult {
        task_id: e.task_id,
        attempt: e.attempt,
        fence: e.fence,
        error: "the node stopped while the call ran; whether it took effect is unknown".into(),
        interrupted: true,
        ..Default::default()
    }
}

impl Session {
    /// A session for `identity`. Attempts the journal still holds were running when the
    /// node last stopped: they are reported interrupted as soon as a session opens, and an
    /// assignment of one of them again is not run. A journal that cannot be read stops the
    /// start: running without it could run a call a second time.
    pub fn new(
        cfg: Arc<NodeConfig>,
        identity: Identity,
        journal: Journal,
        servers: Servers,
        metrics: Arc<NodeMetrics>,
        http_address: String,
    ) -> anyhow::Result<Self> {
        let mut work = Work::default();
        let entries = journal.unfinished().map_err(|e| {
            anyhow::anyhow!("cannot read the call journal (calls/ in the data dir): {e}")
        })?;
        for e in entries {
            tracing::warn!(task_id = %e.task_id, attempt = e.attempt, "a call was running when the node stopped; reporting it interrupted, not running it again");
            work.unacked
                .insert((e.task_id.clone(), e.attempt), interrupted(e));
        }
        Ok(Self {
            cfg,
            identity: Arc::new(Mutex::new(identity)),
            servers,
            journal,
            stopping: Arc::default(),
            renew_now: Arc::default(),
            work: Arc::new(Mutex::new(work)),
            load: Load::new(),
            metrics,
            http_address,
        })
    }

    /// The hubs to try, the configured one first.
    fn endpoints(&self) -> Vec<String> {
        let mut v = vec![self.cfg.hub.clone()];
        for h in &self.identity.lock().expect("identity lock").hubs {
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
        let mut reconnect = Reconnect::new(self.endpoints());
        loop {
            let tls = self.identity.lock().expect("identity lock").client_tls()?;
            let target = reconnect.target().to_owned();
            let started = std::time::Instant::now();
            let result = tokio::select! {
                r = self.once(&target, tls.clone()) => r,
                _ = shutdown.cancelled() => break,
            };
            self.work.lock().expect("work lock").out = None;
            self.metrics.connected(false);
            let how = match result {
                Ok(()) => Ended::Closed,
                Err(e) => {
                    if e.refused {
                        // Removed from the cluster: nothing it runs can be reported any more,
                        // and the hub may be running the same calls elsewhere.
                        let running: Vec<CancellationToken> = self
                            .work
                            .lock()
                            .expect("work lock")
                            .running
                            .drain()
                            .map(|(_, ct)| ct)
                            .collect();
                        if !running.is_empty() {
                            tracing::warn!(calls = running.len(), "the hub refused this node's certificate; stopping the calls it runs");
                        }
                        for ct in running {
                            ct.cancel();
                        }
                    }
                    if e.leader.is_none() && !e.no_leader {
                        tracing::warn!(hub = %target, error = %e.message, unreachable = e.unreachable, "session with the hub ended");
                    }
                    Ended::Failed {
                        leader: e.leader,
                        no_leader: e.no_leader,
                        unreachable: e.unreachable,
                    }
                }
            };
            let Some(pause) = reconnect.ended(&how, started.elapsed()) else {
                continue;
            };
            let jitter = Duration::from_millis(rand_ms(pause.as_millis() as u64 / 2 + 1));
            tokio::select! {
                _ = tokio::time::sleep(pause + jitter) => {}
                _ = shutdown.cancelled() => break,
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
            http_address: self.http_address.clone(),
            stopping: self.stopping.load(Ordering::Relaxed),
        })))
        .await
        .map_err(SessionError::other)?;
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(SessionError::from_status)?
            .into_inner();
        // Connected: results and starts the hub has not answered go again.
        let (results, starts) = self.work.lock().expect("work lock").connected(tx.clone());
        let again = results
            .into_iter()
            .map(node_message::Msg::Result)
            .chain(starts.into_iter().map(node_message::Msg::Started));
        for m in again {
            tx.send(msg(m)).await.map_err(SessionError::other)?;
        }
        let hb = tokio::spawn(self.clone().heartbeats(tx.clone()));
        let renewal = tokio::spawn(self.clone().keep_certificate(client.clone()));
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
                        self.metrics.connected(true);
                        self.keep_trust(&w.ca_pem);
                        if w.renew_certificate {
                            tracing::info!(
                                "the hub asks for a certificate from its current CA; renewing now"
                            );
                            self.renew_now.notify_one();
                        }
                    }
                    Some(hub_message::Msg::Assign(a)) => self.assign(a),
                    Some(hub_message::Msg::Cancel(c)) => {
                        let w = self.work.lock().expect("work lock");
                        if let Some(ct) = w.running.get(&(c.task_id.clone(), c.attempt)) {
                            tracing::info!(task_id = %c.task_id, attempt = c.attempt, "cancelling");
                            ct.cancel();
                        }
                    }
                    Some(hub_message::Msg::StartAck(a)) => {
                        self.work
                            .lock()
                            .expect("work lock")
                            .start_answered(&(a.task_id, a.attempt), a.accepted);
                    }
                    Some(hub_message::Msg::ResultAck(a)) => {
                        self.journal.end(&a.task_id, a.attempt);
                        self.work
                            .lock()
                            .expect("work lock")
                            .acknowledged(&(a.task_id, a.attempt));
                    }
                    None => {}
                }
            }
            Ok::<_, SessionError>(())
        }
        .await;
        hb.abort();
        renewal.abort();
        result
    }

    /// Renews the node's certificate over the open connection when two thirds of its life
    /// have passed (the session goes on; the next connection uses the new certificate).
    /// A failed renewal is tried again a minute later.
    async fn keep_certificate(self, mut client: NodeServiceClient<tonic::transport::Channel>) {
        loop {
            let cert = self
                .identity
                .lock()
                .expect("identity lock")
                .key
                .cert_pem
                .clone();
            let Some((from, to)) = flotilla_common::pki::pem_validity(&cert) else {
                tracing::error!("cannot read the node's own certificate; it will not be renewed");
                return;
            };
            let due_s = from + (to - from) * 2 / 3;
            let wait_ms = (due_s * 1000 - flotilla_common::now_ms()).max(0) as u64;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
                _ = self.renew_now.notified() => {}
            }
            match self.renew(&mut client).await {
                Ok(until_ms) => {
                    tracing::info!(valid_until = %until_ms, "renewed the node's certificate");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the node's certificate; trying again in a minute");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            }
        }
    }

    /// Asks for a certificate for a new key, keeps it on disk and in memory; returns when
    /// it expires (ms since the epoch).
    async fn renew(
        &self,
        client: &mut NodeServiceClient<tonic::transport::Channel>,
    ) -> anyhow::Result<i64> {
        let node_id = self.identity.lock().expect("identity lock").node_id.clone();
        let (key_pem, csr_pem) = flotilla_common::pki::node_key_and_csr(&node_id)?;
        let r = client
            .renew_certificate(flotilla_proto::RenewCertificateRequest { csr_pem })
            .await?
            .into_inner();
        let issued = flotilla_common::pki::pem_identity(&r.certificate_pem).ok_or_else(|| {
            anyhow::anyhow!("the hub answered something that is not a certificate")
        })?;
        anyhow::ensure!(
            issued.common_name == node_id,
            "the hub issued a certificate for {:?}, not this node",
            issued.common_name
        );
        let mut renewed = self.identity.lock().expect("identity lock").clone();
        renewed.key = flotilla_common::pki::CertifiedKey {
            cert_pem: r.certificate_pem,
            key_pem,
        };
        renewed.save_renewed(&self.cfg.data_dir)?;
        *self.identity.lock().expect("identity lock") = renewed;
        Ok(r.not_after_ms)
    }

    /// Keeps the CA certificates a hub's welcome names, when they differ from the ones the
    /// node trusts: during a CA rotation the bundle grows to hold the new CA (so hubs with
    /// certificates of either are trusted), and later shrinks to the new one. The hub that
    /// sends it was trusted by the old bundle over this very connection.
    fn keep_trust(&self, ca_pem: &str) {
        if ca_pem.is_empty() {
            return; // a hub from before bundles
        }
        let mut renewed = self.identity.lock().expect("identity lock").clone();
        if renewed.ca_pem == ca_pem {
            return;
        }
        match tls::parse_certs(ca_pem) {
            Ok(certs) if !certs.is_empty() => {}
            _ => {
                tracing::warn!(
                    "the hub sent CA certificates that do not read; keeping the ones this node has"
                );
                return;
            }
        }
        renewed.ca_pem = ca_pem.to_owned();
        if let Err(e) = renewed.save_ca(&self.cfg.data_dir) {
            tracing::warn!(error = %e, "cannot keep the cluster's CA certificates; using them until the node restarts");
        }
        let count = ca_pem.matches("BEGIN CERTIFICATE").count();
        *self.identity.lock().expect("identity lock") = renewed;
        tracing::info!(
            certificates = count,
            "now trusting the cluster's CA certificates the hub sent"
        );
    }

    fn heartbeat(&self) -> NodeMessage {
        let running = self.work.lock().expect("work lock").running.len() as u32;
        msg(node_message::Msg::Heartbeat(Heartbeat {
            cpu_percent: self.load.cpu_percent(),
            running,
            servers: self.servers.statuses(),
            stopping: self.stopping.load(Ordering::Relaxed),
        }))
    }

    /// Sends a heartbeat every interval, and starts the hub has left unanswered for a
    /// while (its commit failed, or the leader changed under it).
    async fn heartbeats(self, tx: mpsc::Sender<NodeMessage>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        loop {
            tick.tick().await;
            if tx.send(self.heartbeat()).await.is_err() {
                return;
            }
            let (starts, results) = {
                let mut w = self.work.lock().expect("work lock");
                (
                    w.starts_to_resend(START_RESEND),
                    w.results_to_resend(RESULT_RESEND),
                )
            };
            for s in starts {
                tracing::info!(task_id = %s.task_id, attempt = s.attempt, "the hub has not answered this call's start; sending it again");
                if tx.send(msg(node_message::Msg::Started(s))).await.is_err() {
                    return;
                }
            }
            for r in results {
                tracing::info!(task_id = %r.task_id, attempt = r.attempt, "the hub has not acknowledged this result; sending it again");
                if tx.send(msg(node_message::Msg::Result(r))).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Stops gracefully: tells the hub at once that this node takes no new work, then
    /// waits until the calls it runs have finished and the hub has acknowledged their
    /// results, for at most `grace` (the session stays open meanwhile). Calls still
    /// running after that are stopped with the session; for a tool that must not run
    /// twice the journal reports them interrupted when the node starts again.
    pub async fn finish_work(&self, grace: Duration) {
        self.stopping.store(true, Ordering::Relaxed);
        self.send(self.heartbeat());
        let (running, unacked) = self.held();
        tracing::info!(
            running,
            unacked,
            grace_ms = grace.as_millis() as u64,
            "stopping: no new work; finishing the calls this node runs"
        );
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let (running, unacked) = self.held();
            if running == 0 && unacked == 0 {
                tracing::info!("every call finished and reported; stopping");
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    running,
                    unacked,
                    "stop grace over; stopping with calls unfinished or unreported"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Calls running, and results the hub has not acknowledged.
    fn held(&self) -> (usize, usize) {
        let w = self.work.lock().expect("work lock");
        (w.running.len(), w.unacked.len())
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
        if !self.work.lock().expect("work lock").start(&key, ct.clone()) {
            return; // a repeat of an assignment the node already has
        }
        tracing::info!(task_id = %a.task_id, attempt = a.attempt, tool = %a.tool, server = %a.server, "running task");
        let this = self.clone();
        // The call's span continues the trace the assignment carries (the agent's call).
        let span = tracing::info_span!(
            "tool call",
            otel.name = %format!("tools/call {}", a.tool),
            otel.kind = "client",
            mcp.method.name = "tools/call",
            gen_ai.operation.name = "execute_tool",
            gen_ai.tool.name = %a.tool,
            flotilla.task_id = %a.task_id,
            flotilla.attempt = a.attempt,
            flotilla.node_id = %self.identity.lock().expect("identity lock").node_id,
            flotilla.server = %a.server,
            error.type = tracing::field::Empty,
        );
        flotilla_common::telemetry::set_parent(
            &span,
            flotilla_common::telemetry::from_traceparent(&a.traceparent),
        );
        tokio::spawn(async move {
            let Some(result) = this.execute(&a, ct).instrument(span.clone()).await else {
                // Never ran: the hub refused its start, or it was cancelled before.
                this.work.lock().expect("work lock").running.remove(&key);
                return;
            };
            if !result.error.is_empty() {
                span.record("error.type", "tool_error");
            }
            let out = this
                .work
                .lock()
                .expect("work lock")
                .finish(key, result.clone());
            if let Some(out) = out {
                let _ = out.try_send(msg(node_message::Msg::Result(result)));
            }
        });
    }

    /// Runs the call of `a`; `None` when it never ran and there is nothing to report
    /// (an at-most-once start the hub refused, or a cancel before the hub answered it).
    async fn execute(&self, a: &Assign, ct: CancellationToken) -> Option<TaskResult> {
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
                return Some(result);
            }
        };
        let start = TaskStarted {
            task_id: a.task_id.clone(),
            attempt: a.attempt,
            fence: a.fence,
        };
        if a.at_most_once {
            if let Err(e) = self.write_down(a).await {
                tracing::error!(task_id = %a.task_id, error = %e, "cannot write the call journal; not running the call");
                result.error = format!("the node cannot write down the call before running it, so it did not run it: {e}");
                return Some(result);
            }
            // The call waits for the hub's committed start: from then on the task is
            // running in the log, and no hub sends it again or gives it to another node.
            let answer = self
                .work
                .lock()
                .expect("work lock")
                .await_start(start.clone());
            self.send(msg(node_message::Msg::Started(start)));
            let accepted = tokio::select! {
                a = answer => a.ok(),
                _ = ct.cancelled() => None,
            };
            let key = (a.task_id.clone(), a.attempt);
            match accepted {
                Some(true) => {}
                Some(false) => {
                    // Refused: the log does not have this attempt running here, and the
                    // call never ran. Nothing to report.
                    tracing::info!(task_id = %a.task_id, attempt = a.attempt, "start refused; the call did not run");
                    self.journal.end(&a.task_id, a.attempt);
                    return None;
                }
                None => {
                    // Cancelled (by the hub, or the node stops) with no answer: the start
                    // may be in the log all the same. Reported like a call cut short, and
                    // the entry stays until the hub has the report (or the node restarts
                    // and reports it), so the task never stays running here for good.
                    self.work.lock().expect("work lock").awaiting.remove(&key);
                    tracing::info!(task_id = %a.task_id, attempt = a.attempt, "stopped before the hub answered the call's start; the call did not run; reporting it interrupted");
                    return Some(interrupted(Entry {
                        task_id: a.task_id.clone(),
                        attempt: a.attempt,
                        fence: a.fence,
                    }));
                }
            }
        } else {
            self.send(msg(node_message::Msg::Started(start)));
        }
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
        Some(result)
    }

    /// Writes the attempt of `a` down (synced) before its start is sent, so that after a
    /// restart the node reports it interrupted instead of running it a second time.
    async fn write_down(&self, a: &Assign) -> std::io::Result<()> {
        let journal = self.journal.clone();
        let entry = Entry {
            task_id: a.task_id.clone(),
            attempt: a.attempt,
            fence: a.fence,
        };
        tokio::task::spawn_blocking(move || journal.begin(&entry))
            .await
            .map_err(std::io::Error::other)?
    }
}

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
    /// The hub refused this node's certificate (the node was removed).
    refused: bool,
}

impl SessionError {
    fn other(e: impl std::fmt::Display) -> Self {
        Self {
            message: e.to_string(),
            leader: None,
            unreachable: false,
            no_leader: false,
            refused: false,
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
            refused: s.code() == tonic::Code::PermissionDenied,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn result(task: &str, attempt: u32) -> TaskResult {
        TaskResult {
            task_id: task.into(),
            attempt,
            ..Default::default()
        }
    }

    #[test]
    fn an_assignment_the_node_has_is_not_run_again_until_its_result_is_acknowledged() {
        let mut w = Work::default();
        let key: Key = ("t1".into(), 1);
        assert!(w.start(&key, CancellationToken::new()));
        assert!(!w.start(&key, CancellationToken::new()), "running");
        assert!(
            w.finish(key.clone(), result("t1", 1)).is_none(),
            "no session"
        );
        assert!(!w.start(&key, CancellationToken::new()), "result held");
        // Another attempt of the same task is other work.
        assert!(w.start(&("t1".into(), 2), CancellationToken::new()));
        w.acknowledged(&key);
        assert!(w.unacked.is_empty());
    }

    #[test]
    fn every_session_sends_the_results_still_held_until_one_is_acknowledged() {
        let mut w = Work::default();
        for (t, a) in [("t1", 1), ("t2", 3)] {
            let key: Key = (t.into(), a);
            w.start(&key, CancellationToken::new());
            w.finish(key, result(t, a));
        }
        let (tx, _rx) = mpsc::channel(8);
        let mut first: Vec<Key> = w
            .connected(tx.clone())
            .0
            .into_iter()
            .map(|r| (r.task_id, r.attempt))
            .collect();
        first.sort();
        assert_eq!(first, vec![("t1".into(), 1), ("t2".into(), 3)]);
        w.acknowledged(&("t1".into(), 1));
        let again: Vec<Key> = w
            .connected(tx)
            .0
            .into_iter()
            .map(|r| (r.task_id, r.attempt))
            .collect();
        assert_eq!(again, vec![("t2".into(), 3)]);
        assert!(w.out.is_some());
        // On an open session an unacknowledged result goes again only after a while.
        assert!(w.results_to_resend(Duration::from_secs(60)).is_empty());
        assert_eq!(w.results_to_resend(Duration::ZERO).len(), 1);
        w.acknowledged(&("t2".into(), 3));
        assert!(w.results_to_resend(Duration::ZERO).is_empty() && w.sent.is_empty());
    }

    fn start(task: &str, attempt: u32) -> TaskStarted {
        TaskStarted {
            task_id: task.into(),
            attempt,
            fence: 7,
        }
    }

    #[test]
    fn a_start_goes_again_on_every_session_and_after_a_while_until_the_hub_answers_it() {
        let mut w = Work::default();
        let mut first = w.await_start(start("t1", 1));
        let mut second = w.await_start(start("t2", 1));
        // Sent just now: not again yet.
        assert!(w.starts_to_resend(Duration::from_secs(60)).is_empty());
        assert_eq!(w.starts_to_resend(Duration::ZERO).len(), 2);

        w.start_answered(&("t1".into(), 1), true);
        assert_eq!(first.try_recv(), Ok(true));
        let (tx, _rx) = mpsc::channel(8);
        let (_, starts) = w.connected(tx);
        assert_eq!(starts, vec![start("t2", 1)], "only the unanswered start");

        w.start_answered(&("t2".into(), 1), false);
        assert_eq!(second.try_recv(), Ok(false), "refused: the call never runs");
        assert!(w.awaiting.is_empty());
        // An answer to a start the node no longer waits for changes nothing.
        w.start_answered(&("t3".into(), 1), true);
        assert!(w.starts_to_resend(Duration::ZERO).is_empty());
    }

    #[test]
    fn a_hubs_refusal_says_where_to_go_next() {
        let mut s = tonic::Status::unavailable("not the leader");
        s.metadata_mut().insert(
            flotilla_proto::LEADER_HEADER,
            "https://hub-2:7443".parse().unwrap(),
        );
        let e = SessionError::from_status(s);
        assert_eq!(e.leader.as_deref(), Some("https://hub-2:7443"));
        assert!(!e.unreachable, "a redirect is not a dead hub");

        let mut s = tonic::Status::unavailable("no leader");
        s.metadata_mut()
            .insert(flotilla_proto::NO_LEADER_HEADER, "1".parse().unwrap());
        let e = SessionError::from_status(s);
        assert!(e.no_leader && !e.unreachable && e.leader.is_none());

        let e = SessionError::from_status(tonic::Status::unavailable("connection refused"));
        assert!(e.unreachable);
        let e = SessionError::from_status(tonic::Status::permission_denied("not registered"));
        assert!(!e.unreachable && !e.no_leader && e.leader.is_none());
        assert!(e.message.contains("not registered"), "{}", e.message);
    }
}
