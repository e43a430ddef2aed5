//! Placement, minimal but real: among the connected, ready nodes whose MCP server offers the
//! tool (with a definition matching the catalogue and the scope the task needs) and has a
//! free slot, pick the one with the most free slots; ties go to the lower CPU load. Queued
//! tasks are taken by priority, then age. A task no node can take waits, with the reason
//! kept for GetTask. Only the leader schedules; each assignment is committed through Raft
//! before it is sent to the node.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use crate::{
    sessions::LiveNode,
    state::{NodeStatus, State, TaskRecord, TaskStatus},
};

/// Where a task should run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub node_id: String,
    pub server: String,
}

/// Why queued tasks are waiting, kept in memory by the leader.
#[derive(Clone, Default)]
pub struct PendingReasons(Arc<Mutex<HashMap<String, String>>>);

impl PendingReasons {
    pub fn set(&self, task_id: &str, reason: String) {
        self.0
            .lock()
            .expect("pending lock")
            .insert(task_id.to_owned(), reason);
    }
    pub fn clear(&self, task_id: &str) {
        self.0.lock().expect("pending lock").remove(task_id);
    }
    pub fn get(&self, task_id: &str) -> Option<String> {
        self.0.lock().expect("pending lock").get(task_id).cloned()
    }
}

/// Queued tasks in the order they should be placed.
pub fn queue_order(state: &State) -> Vec<&TaskRecord> {
    let mut q: Vec<&TaskRecord> = state
        .tasks
        .values()
        .filter(|t| t.status == TaskStatus::Queued)
        .collect();
    q.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.created_at_ms.cmp(&b.created_at_ms))
            .then(a.id.cmp(&b.id))
    });
    q
}

/// Chooses a node for `task`, or says why none fits. `in_flight` counts tasks assigned or
/// running per (node, server), including ones placed earlier in this pass.
pub fn place(
    state: &State,
    live: &HashMap<String, LiveNode>,
    in_flight: &BTreeMap<(String, String), u32>,
    task: &TaskRecord,
) -> Result<Placement, String> {
    let mut offered = false;
    let mut best: Option<(u32, f64, Placement)> = None;
    for (node_id, node) in &state.nodes {
        if node.status != NodeStatus::Ready {
            continue;
        }
        let Some(l) = live.get(node_id) else { continue };
        for s in &node.servers {
            if !s.tools.iter().any(|t| t == &task.tool) {
                continue;
            }
            if !l.server_ready(&s.name) {
                continue;
            }
            offered = true;
            let used = in_flight
                .get(&(node_id.clone(), s.name.clone()))
                .copied()
                .unwrap_or(0);
            let free = s.max_concurrency.saturating_sub(used);
            if free == 0 {
                continue;
            }
            let better = match &best {
                None => true,
                Some((bf, bcpu, _)) => free > *bf || (free == *bf && l.cpu_percent < *bcpu),
            };
            if better {
                best = Some((
                    free,
                    l.cpu_percent,
                    Placement {
                        node_id: node_id.clone(),
                        server: s.name.clone(),
                    },
                ));
            }
        }
    }
    match best {
        Some((_, _, p)) => Ok(p),
        None if offered => Err(format!(
            "every connected node offering {:?} is at capacity",
            task.tool
        )),
        None => Err(format!(
            "no connected, ready node offers {:?}; waiting for one",
            task.tool
        )),
    }
}

/// The scheduling loop: runs a pass whenever something changed (or every second), while
/// this hub is the leader.
pub async fn run(hub: crate::app::Hub, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = hub.wake_signal().notified() => {}
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if hub.is_leader() {
            pass(&hub).await;
        }
    }
}

async fn pass(hub: &crate::app::Hub) {
    use crate::state::{Command, Response};
    let live = hub.sessions.snapshot();
    let plans: Vec<(String, Placement)> = {
        let state = hub.state();
        if state.scheduling_paused {
            for t in queue_order(&state) {
                hub.pending
                    .set(&t.id, "scheduling is paused by an admin".into());
            }
            return;
        }
        let mut in_flight = state.active_counts();
        let mut plans = Vec::new();
        for t in queue_order(&state) {
            match place(&state, &live, &in_flight, t) {
                Ok(p) => {
                    *in_flight
                        .entry((p.node_id.clone(), p.server.clone()))
                        .or_default() += 1;
                    plans.push((t.id.clone(), p));
                }
                Err(reason) => hub.pending.set(&t.id, reason),
            }
        }
        plans
    };
    let writes = plans.into_iter().map(|(task_id, p)| async move {
        hub.pending.clear(&task_id);
        let cmd = Command::AssignTask {
            task_id: task_id.clone(),
            node_id: p.node_id.clone(),
            server: p.server.clone(),
            at_ms: flotilla_common::now_ms(),
        };
        let (attempt, fence) = match hub.write(cmd).await {
            Ok(Response::Assigned { attempt, fence }) => (attempt, fence),
            Ok(other) => {
                tracing::debug!(task_id, ?other, "assignment not committed");
                return;
            }
            Err(e) => {
                tracing::warn!(task_id, error = %e, "assignment not committed");
                return;
            }
        };
        let msg = {
            let state = hub.state();
            match state.tasks.get(&task_id) {
                Some(t) => crate::convert::assign_message(t, &p.server, attempt, fence),
                None => return,
            }
        };
        tracing::info!(task_id, node_id = %p.node_id, server = %p.server, attempt, fence, "task assigned");
        if !hub.sessions.send(&p.node_id, msg) {
            // The node went away before the assignment could be sent: it never ran it.
            let cmd = Command::RequeueTask {
                task_id: task_id.clone(),
                attempt,
                fence,
                at_ms: flotilla_common::now_ms(),
                reason: format!("node {} disconnected before the assignment reached it", p.node_id),
            };
            if let Err(e) = hub.write(cmd).await {
                tracing::warn!(task_id, error = %e, "requeue not committed");
            }
        }
    });
    futures::future::join_all(writes).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{NodeRecord, ServerRecord};
    use flotilla_proto::ServerState;
    use serde_json::json;

    fn node(id: &str, max: u32, status: NodeStatus) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            labels: Default::default(),
            status,
            joined_at_ms: 0,
            last_hello_ms: Some(0),
            drain_deadline_ms: None,
            servers: vec![ServerRecord {
                name: "demo".into(),
                max_concurrency: max,
                required_scope: "tools".into(),
                tools: vec!["echo".into()],
                conflicting_tools: vec![],
            }],
        }
    }

    fn live(cpu: f64) -> LiveNode {
        LiveNode {
            session: 1,
            tx: tokio::sync::mpsc::channel(1).0,
            ended: Default::default(),
            cpu_percent: cpu,
            running: 0,
            servers: vec![crate::sessions::LiveServer {
                name: "demo".into(),
                state: ServerState::Ready,
                error: String::new(),
                running: 0,
            }],
            last_seen: std::time::Instant::now(),
            last_seen_ms: 0,
        }
    }

    fn task(tool: &str) -> TaskRecord {
        TaskRecord {
            id: "t".into(),
            tool: tool.into(),
            tenant: "t".into(),
            agent: "a".into(),
            arguments: json!({}),
            status: TaskStatus::Queued,
            result: None,
            error: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            priority: 0,
            idempotency_key: None,
            attempts: vec![],
            transitions: 0,
        }
    }

    #[test]
    fn most_free_capacity_wins_and_full_or_unready_nodes_are_skipped() {
        let mut s = State::default();
        s.nodes.insert("a".into(), node("a", 4, NodeStatus::Ready));
        s.nodes.insert("b".into(), node("b", 4, NodeStatus::Ready));
        s.nodes
            .insert("c".into(), node("c", 8, NodeStatus::Cordoned));
        let live: HashMap<_, _> = [("a", 0.0), ("b", 0.0), ("c", 0.0)]
            .into_iter()
            .map(|(k, c)| (k.to_string(), live(c)))
            .collect();
        let mut fl = BTreeMap::new();
        fl.insert(("a".to_string(), "demo".to_string()), 3);
        fl.insert(("b".to_string(), "demo".to_string()), 1);
        assert_eq!(place(&s, &live, &fl, &task("echo")).unwrap().node_id, "b");
        fl.insert(("b".to_string(), "demo".to_string()), 4);
        assert_eq!(place(&s, &live, &fl, &task("echo")).unwrap().node_id, "a");
        fl.insert(("a".to_string(), "demo".to_string()), 4);
        let why = place(&s, &live, &fl, &task("echo")).unwrap_err();
        assert!(why.contains("capacity"), "{why}");
        let why = place(&s, &live, &fl, &task("other")).unwrap_err();
        assert!(why.contains("no connected"), "{why}");
    }

    #[test]
    fn cpu_breaks_ties_and_disconnected_nodes_are_not_used() {
        let mut s = State::default();
        s.nodes.insert("a".into(), node("a", 4, NodeStatus::Ready));
        s.nodes.insert("b".into(), node("b", 4, NodeStatus::Ready));
        s.nodes
            .insert("gone".into(), node("gone", 100, NodeStatus::Ready));
        let live: HashMap<_, _> = [("a", 90.0), ("b", 10.0)]
            .into_iter()
            .map(|(k, c)| (k.to_string(), live(c)))
            .collect();
        let p = place(&s, &live, &BTreeMap::new(), &task("echo")).unwrap();
        assert_eq!(p.node_id, "b");
    }

    #[test]
    fn queue_is_by_priority_then_age() {
        let mut s = State::default();
        for (id, prio, at) in [("x", 0, 1), ("y", 5, 3), ("z", 0, 0)] {
            let mut t = task("echo");
            t.id = id.into();
            t.priority = prio;
            t.created_at_ms = at;
            s.tasks.insert(id.into(), t);
        }
        let order: Vec<_> = queue_order(&s).iter().map(|t| t.id.as_str()).collect();
        assert_eq!(order, ["y", "z", "x"]);
    }
}
