//! The node session protocol, hub side: what a node's session does from its hello to its
//! end. A session opens only on the leader: the hello is committed (what the node offers,
//! checked against the catalogue), the node is registered here, assignments it may have
//! missed are sent again, and then its messages are handled as they come: heartbeats
//! (live load, never committed), starts, progress, and results. **What a node's report
//! does** is decided here (who may report: `holds`) and in the state machine
//! (`state/reports.rs`); a result is acknowledged only once committed, so a node keeps
//! sending it until some leader has it.
//!
//! The registry of open sessions is `sessions` (this module's parent); the gRPC service
//! that authenticates a session and hands it here is `service/node.rs`.

use std::time::Duration;

use flotilla_common::limits;
use flotilla_proto::{
    hub_message, node_message, EventKind, HubMessage, NodeMessage, ResultAck, StartAck, TaskEvent,
    TaskStarted, Welcome,
};
use futures::Stream;
use tonic::{Status, Streaming};

use crate::{
    cluster::Hub,
    convert,
    error::{HubError, HubResult},
    sessions::LiveServer,
    state::{self, Command, Rejection, TaskStatus},
};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEARTBEAT_INTERVAL_MS: u64 = flotilla_common::config::defaults::HEARTBEAT_MS;

fn live_servers(servers: &[flotilla_proto::ServerStatus]) -> Vec<LiveServer> {
    servers
        .iter()
        .map(|s| LiveServer {
            name: s.name.clone(),
            state: flotilla_proto::ServerState::try_from(s.state).unwrap_or_default(),
            error: s.error.clone(),
            running: s.running,
        })
        .collect()
}

/// Runs the session of `node_id` (authenticated, registered, and this hub the leader):
/// waits for its hello, commits it, and returns what the hub sends the node. The node's
/// messages are handled on a task of their own until the session ends. `old_ca`: the
/// node's certificate is from a CA the cluster no longer signs with; the welcome tells it
/// to renew.
pub async fn serve(
    hub: &Hub,
    node_id: String,
    serial: String,
    old_ca: bool,
    mut inbound: Streaming<NodeMessage>,
) -> Result<impl Stream<Item = HubMessage> + Send + 'static, Status> {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(NodeMessage {
            msg: Some(node_message::Msg::Hello(h)),
        }))) => h,
        Ok(Err(e)) => return Err(e),
        _ => {
            return Err(HubError::InvalidArgument("a session must start with hello".into()).into())
        }
    };
    let servers = convert::offered_servers(&hello)?;
    let http = hello.http_address.clone();
    let stopping = hello.stopping;
    if http.len() > 256 || !http.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HubError::InvalidArgument(
            "hello: http_address must be at most 256 printable ASCII characters".into(),
        )
        .into());
    }
    let live: Vec<LiveServer> = hello
        .servers
        .iter()
        .map(|s| LiveServer {
            name: s.name.clone(),
            state: flotilla_proto::ServerState::try_from(s.state).unwrap_or_default(),
            error: s.error.clone(),
            running: 0,
        })
        .collect();
    let said = hub
        .write(Command::NodeHello {
            node_id: node_id.clone(),
            labels: hello.labels.into_iter().collect(),
            servers,
            at_ms: flotilla_common::now_ms(),
            tenants: hello.tenants,
            cpu_high_water_percent: hello.cpu_high_water_percent,
            may_add_tools: hub.config().trust_node_tools
                || hub
                    .state()
                    .nodes
                    .get(&node_id)
                    .is_some_and(|n| n.may_add_tools),
        })
        .await?;
    if let state::Response::Rejected(r) = said {
        // Removed between the session's check and its hello.
        return Err(HubError::PermissionDenied(format!("hello refused: {r}")).into());
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let (session, ended) = hub.sessions.open(&node_id, &serial, tx.clone(), live, http);
    if stopping {
        hub.sessions.mark_stopping(&node_id, session);
    }
    let _ = tx
        .send(HubMessage {
            msg: Some(hub_message::Msg::Welcome(Welcome {
                node_id: node_id.clone(),
                heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
                ca_pem: hub.trust_pem().to_owned(),
                renew_certificate: old_ca,
            })),
        })
        .await;
    // Assignments that may not have reached the node: send them again. The node
    // ignores an (task, attempt) it already has.
    let resend: Vec<HubMessage> = {
        let state = hub.state();
        state
            .index
            .on_node
            .get(&node_id)
            .into_iter()
            .flatten()
            .filter_map(|id| state.tasks.get(id))
            .filter(|t| t.status == TaskStatus::Assigned)
            .filter_map(|t| {
                let a = t.current_attempt()?;
                (a.node_id == node_id).then(|| {
                    let trace = crate::trace::assignment(t, &node_id, &a.server, a.number, false);
                    let once = !state.safe_to_rerun(t);
                    convert::assign_message(t, &a.server, a.number, a.fence, once, trace)
                })
            })
            .collect()
    };
    for m in resend {
        let _ = tx.send(m).await;
    }
    if old_ca {
        tracing::info!(node_id = %node_id, "node's certificate is from a CA no longer signing; asking it to renew");
    }
    tracing::info!(node_id = %node_id, session, "node session open");
    hub.wake();
    let hub = hub.clone();
    let ended_in = ended.clone();
    let starting = Starting::default();
    tokio::spawn(async move {
        loop {
            let m = tokio::select! {
                m = inbound.message() => m,
                _ = ended_in.cancelled() => break,
            };
            match m {
                Ok(Some(msg)) => handle(&hub, &node_id, session, &tx, &starting, msg),
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(node_id = %node_id, error = %e, "node session broken");
                    break;
                }
            }
        }
        hub.sessions.close(&node_id, session);
        tracing::info!(node_id = %node_id, session, "node session closed");
        hub.wake();
    });
    let out = futures::StreamExt::take_until(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        ended.cancelled_owned(),
    );
    Ok(out)
}

/// Whether `node_id` holds the current, active attempt `(attempt, fence)` of the task: the
/// only reports a node may make. Checked before anything is written, so reports about other
/// nodes' work or stale attempts cost no Raft commit; the state machine checks again.
fn holds(hub: &Hub, node_id: &str, task_id: &str, attempt: u32, fence: u64) -> bool {
    hub.state().tasks.get(task_id).is_some_and(|t| {
        t.status.is_active()
            && t.current_attempt()
                .is_some_and(|a| a.number == attempt && a.fence == fence && a.node_id == node_id)
    })
}

/// Whether the log has `node_id` running the attempt `s` names.
fn started_by(hub: &Hub, node_id: &str, s: &TaskStarted) -> bool {
    hub.state().tasks.get(&s.task_id).is_some_and(|t| {
        t.status == TaskStatus::Running
            && t.current_attempt().is_some_and(|a| {
                a.number == s.attempt && a.fence == s.fence && a.node_id == node_id
            })
    })
}

/// Tells the node whether its start of `s` is in the log (`accepted`) or refused.
fn answer_start(tx: &tokio::sync::mpsc::Sender<HubMessage>, s: &TaskStarted, accepted: bool) {
    let _ = tx.try_send(HubMessage {
        msg: Some(hub_message::Msg::StartAck(StartAck {
            task_id: s.task_id.clone(),
            attempt: s.attempt,
            accepted,
        })),
    });
}

/// Logs a report about an attempt the node does not hold (another node's, or one that
/// ended), at warning level when another node holds it.
fn refused_report(hub: &Hub, node_id: &str, task_id: &str, attempt: u32, what: &str) {
    let other = hub
        .state()
        .tasks
        .get(task_id)
        .and_then(|t| t.current_attempt().map(|a| a.node_id.clone()))
        .filter(|holder| holder != node_id);
    match other {
        Some(holder) => {
            tracing::warn!(node_id, task_id = ?task_id, attempt, holder = %holder, "node sent a {what} for an attempt another node holds; refused")
        }
        None => tracing::info!(node_id, task_id = ?task_id, attempt, "stale {what} refused"),
    }
}

/// Starts of at-most-once attempts whose commit is in flight on this session: a repeat
/// the node sends meanwhile (a commit slower than its resend) adds no second write; the
/// first one's answer serves both.
type Starting = std::sync::Arc<std::sync::Mutex<std::collections::HashSet<(String, u32)>>>;

fn handle(
    hub: &Hub,
    node_id: &str,
    session: u64,
    tx: &tokio::sync::mpsc::Sender<HubMessage>,
    starting: &Starting,
    msg: NodeMessage,
) {
    let Some(msg) = msg.msg else { return };
    match msg {
        node_message::Msg::Hello(_) => {
            tracing::warn!(node_id, "second hello on one session ignored");
        }
        node_message::Msg::Heartbeat(hb) => {
            hub.sessions.heartbeat(
                node_id,
                session,
                hb.cpu_percent,
                hb.running,
                live_servers(&hb.servers),
                hb.stopping,
            );
            hub.wake();
        }
        node_message::Msg::Started(s) => {
            if !holds(hub, node_id, &s.task_id, s.attempt, s.fence) {
                refused_report(hub, node_id, &s.task_id, s.attempt, "start");
                // A node holding an at-most-once call waits for this: it never runs it.
                answer_start(tx, &s, false);
                return;
            }
            let at_ms = flotilla_common::now_ms();
            // For a read-only or idempotent tool a start is not a Raft commit: an event for
            // watchers, and a time the result carries into the record. Running it twice
            // would be harmless, so an assignment still marked assigned may be sent again
            // (to a node that restarted). Any other tool's start is committed, so the task
            // is never sent again once it ran.
            let safe = {
                let state = hub.state();
                state
                    .tasks
                    .get(&s.task_id)
                    .is_some_and(|t| state.safe_to_rerun(t))
            };
            if safe {
                hub.events.started(&s.task_id, node_id, s.attempt, at_ms);
                return;
            }
            // The node calls the tool only once this start is answered accepted, and an
            // answer is sent only for what the log holds: a repeat of a start already
            // committed is accepted at once; a start whose commit fails is not answered
            // (the node sends it again).
            if started_by(hub, node_id, &s) {
                answer_start(tx, &s, true);
                return;
            }
            fail::fail_point!(crate::faults::START_BEFORE_COMMIT, |_| {});
            let key = (s.task_id.clone(), s.attempt);
            if !starting.lock().expect("starting lock").insert(key.clone()) {
                return;
            }
            let hub = hub.clone();
            let node_id = node_id.to_owned();
            let tx = tx.clone();
            let starting = starting.clone();
            tokio::spawn(async move {
                let cmd = Command::StartTask {
                    task_id: s.task_id.clone(),
                    attempt: s.attempt,
                    fence: s.fence,
                    at_ms,
                    node_id: node_id.clone(),
                };
                match hub.write(cmd).await {
                    Ok(state::Response::TaskNow(_)) => answer_start(&tx, &s, true),
                    Ok(state::Response::Rejected(r)) => {
                        // A repeat that raced the first commit finds the task started.
                        let accepted = started_by(&hub, &node_id, &s);
                        if !accepted {
                            tracing::info!(node_id = %node_id, task_id = ?s.task_id, attempt = s.attempt, reason = %r, "start refused; the node will not run the call");
                        }
                        answer_start(&tx, &s, accepted);
                    }
                    Ok(other) => {
                        tracing::error!(node_id = %node_id, task_id = ?s.task_id, "start answered {other:?}; not acknowledged");
                    }
                    Err(e) => {
                        tracing::warn!(node_id = %node_id, task_id = ?s.task_id, error = %e, "start not recorded; the node will send it again");
                    }
                }
                starting.lock().expect("starting lock").remove(&key);
            });
        }
        node_message::Msg::Progress(p) => {
            if holds(hub, node_id, &p.task_id, p.attempt, p.fence) {
                hub.events.progress(TaskEvent {
                    seq: 0,
                    task_id: p.task_id,
                    kind: EventKind::Progress as i32,
                    at_ms: flotilla_common::now_ms(),
                    node_id: node_id.to_owned(),
                    attempt: p.attempt,
                    progress: p.progress,
                    total: p.total,
                    message: p.message,
                    ..Default::default()
                });
            }
        }
        node_message::Msg::Result(r) => {
            if !holds(hub, node_id, &r.task_id, r.attempt, r.fence) {
                refused_report(hub, node_id, &r.task_id, r.attempt, "result");
                let _ = tx.try_send(HubMessage {
                    msg: Some(hub_message::Msg::ResultAck(ResultAck {
                        task_id: r.task_id,
                        attempt: r.attempt,
                        accepted: false,
                    })),
                });
                return;
            }
            let hub = hub.clone();
            let tx = tx.clone();
            let node_id = node_id.to_owned();
            tokio::spawn(async move {
                if let Err(e) = record_result(&hub, &node_id, &tx, r).await {
                    // Not acknowledged: the node sends it again after reconnecting.
                    tracing::warn!(node_id = %node_id, error = %e, "result not recorded");
                }
            });
        }
    }
}

async fn record_result(
    hub: &Hub,
    node_id: &str,
    tx: &tokio::sync::mpsc::Sender<HubMessage>,
    r: flotilla_proto::TaskResult,
) -> HubResult<()> {
    let cmd = if r.interrupted {
        Command::LoseTask {
            task_id: r.task_id.clone(),
            attempt: r.attempt,
            fence: r.fence,
            at_ms: flotilla_common::now_ms(),
            node_id: node_id.to_owned(),
            reason: format!(
                "node {node_id} stopped while the call ran (it restarted) and cannot tell whether the call took effect; the tool is not marked idempotent"
            ),
        }
    } else {
        finish_command(hub, node_id, &r)
    };
    let accepted = match hub.write(cmd).await? {
        state::Response::TaskNow(status) => {
            tracing::debug!(node_id, task_id = ?r.task_id, attempt = r.attempt, ?status, interrupted = r.interrupted, "task finished");
            true
        }
        state::Response::Rejected(Rejection::NotYourAttempt) => {
            tracing::warn!(node_id, task_id = ?r.task_id, attempt = r.attempt, "node sent a result for an attempt another node holds; refused");
            false
        }
        state::Response::Rejected(rej) => {
            tracing::info!(node_id, task_id = ?r.task_id, attempt = r.attempt, reason = %rej, "stale result refused");
            false
        }
        other => return Err(HubError::Internal(format!("finish answered {other:?}"))),
    };
    fail::fail_point!(crate::faults::RESULT_BEFORE_ACK);
    let _ = tx
        .send(HubMessage {
            msg: Some(hub_message::Msg::ResultAck(ResultAck {
                task_id: r.task_id,
                attempt: r.attempt,
                accepted,
            })),
        })
        .await;
    hub.wake();
    Ok(())
}

/// What a node's ordinary result commits: the tool's answer (checked: JSON, not too deep)
/// or the error the node saw.
fn finish_command(hub: &Hub, node_id: &str, r: &flotilla_proto::TaskResult) -> Command {
    let (result, unreadable) = if r.result.is_empty() {
        (None, None)
    } else {
        match serde_json::from_slice::<serde_json::Value>(&r.result)
            .map_err(|e| format!("the node's result is not JSON: {e}"))
            .and_then(|v| {
                limits::check_depth("the node's result", &v)
                    .map(|()| v)
                    .map_err(|e| e.to_string())
            }) {
            Ok(v) => (Some(v), None),
            Err(e) => {
                tracing::warn!(node_id, task_id = ?r.task_id, error = %e, "node sent an unusable result");
                (None, Some(e))
            }
        }
    };
    let error = if r.error.is_empty() {
        result
            .is_none()
            .then(|| unreadable.unwrap_or_else(|| "node sent an empty result".to_owned()))
    } else {
        Some(r.error.clone())
    };
    Command::FinishTask {
        task_id: r.task_id.clone(),
        attempt: r.attempt,
        fence: r.fence,
        at_ms: flotilla_common::now_ms(),
        result,
        error,
        node_id: node_id.to_owned(),
        started_at_ms: hub.events.started_at(&r.task_id, r.attempt),
    }
}
