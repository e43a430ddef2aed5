//! Node liveness, on the leader: a node whose session is gone, or silent, for longer than
//! its TTL is marked down through Raft, and its unfinished tasks are handled by policy (see
//! `Command::NodeDown`). A new leader counts the TTL from when it took over, so nodes get a
//! grace period to reconnect after a failover.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::{
    cluster::Hub,
    state::{Command, NodeStatus, Response},
};

pub async fn run(hub: Hub, mut stop: tokio::sync::watch::Receiver<bool>) {
    let ttl = Duration::from_millis(hub.config().node_ttl_ms);
    // The tick bounds how late past its TTL a node is marked down.
    let mut tick = tokio::time::interval(
        (ttl / 20).clamp(Duration::from_millis(100), Duration::from_millis(500)),
    );
    let mut gone_since: HashMap<String, Instant> = HashMap::new();
    let mut leading_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !hub.is_leader() {
            gone_since.clear();
            leading_since = None;
            continue;
        }
        let leading_since = *leading_since.get_or_insert_with(Instant::now);
        let live = hub.sessions.snapshot();
        // A session whose stream is open but that stopped heartbeating is dead too.
        for (id, l) in &live {
            if l.last_seen.elapsed() > ttl {
                tracing::warn!(node_id = %id, silent_ms = l.last_seen.elapsed().as_millis() as u64, "node stopped heartbeating; closing its session");
                hub.sessions.close(id, l.session);
            }
        }
        let live = hub.sessions.snapshot();
        let absent: Vec<String> = hub
            .state()
            .nodes
            .values()
            .filter(|n| n.status != NodeStatus::Down && !live.contains_key(&n.id))
            .map(|n| n.id.clone())
            .collect();
        gone_since.retain(|id, _| absent.contains(id));
        // Draining nodes past their deadline give up what they still run.
        let now_ms = flotilla_common::now_ms();
        let overdue: Vec<String> = {
            let state = hub.state();
            state
                .nodes
                .values()
                .filter(|n| {
                    n.status == NodeStatus::Draining
                        && n.drain_deadline_ms.is_some_and(|d| d <= now_ms)
                })
                .filter(|n| state.index.on_node.contains_key(&n.id))
                .map(|n| n.id.clone())
                .collect()
        };
        for id in overdue {
            let cmd = Command::EvictNode {
                node_id: id.clone(),
                at_ms: now_ms,
            };
            match hub.write(cmd).await {
                Ok(Response::NodeWentDown { requeued, lost }) => {
                    // The node is told to stop each of them as the eviction is applied.
                    tracing::warn!(node_id = %id, requeued = requeued.len(), cancelled = lost.len(), "drain deadline passed; took unfinished tasks off the node");
                    hub.wake();
                }
                Ok(other) => tracing::debug!(node_id = %id, ?other, "eviction not applied"),
                Err(e) => {
                    tracing::warn!(node_id = %id, error = %e, "could not evict the drained node's tasks")
                }
            }
        }
        let now = Instant::now();
        for id in absent {
            // Counted from when it was last heard (if its session closed on this leader),
            // never from before this hub took over: nodes get a grace period after failover.
            let since = *gone_since.entry(id.clone()).or_insert_with(|| {
                hub.sessions
                    .departed_at(&id)
                    .map_or(now, |t| t.max(leading_since))
            });
            if now.duration_since(since) < ttl {
                continue;
            }
            let cmd = Command::NodeDown {
                node_id: id.clone(),
                at_ms: flotilla_common::now_ms(),
            };
            match hub.write(cmd).await {
                Ok(Response::NodeWentDown { requeued, lost }) => {
                    tracing::warn!(node_id = %id, requeued = requeued.len(), lost = lost.len(), "node marked down");
                    gone_since.remove(&id);
                    hub.wake();
                }
                Ok(other) => tracing::debug!(node_id = %id, ?other, "node down not applied"),
                Err(e) => tracing::warn!(node_id = %id, error = %e, "could not mark node down"),
            }
        }
    }
}
