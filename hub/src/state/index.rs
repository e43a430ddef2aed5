//! Indexes over the replicated state, derived from it and never serialized: the queue per
//! tenant, tasks in flight per node and server, open tasks, and which nodes offer each
//! tool. Every change to a task or a node's offer goes through `unlink` before and `link`
//! after, so they stay exact; `State::rebuild_index` makes them anew after a snapshot.
//! They let the scheduler and the timers work in proportion to what is live, not to the
//! whole history.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet},
};

use super::{NodeRecord, TaskRecord, TaskStatus};

/// Queue order within a tenant: higher priority first, then older, then by id.
pub type QueueKey = (Reverse<i32>, i64, String);

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Index {
    /// Queued tasks that can be placed (fan-out parents are not), per tenant.
    pub queue: BTreeMap<String, BTreeSet<QueueKey>>,
    /// Assigned or running tasks per (node, server).
    pub active: BTreeMap<(String, String), u32>,
    /// Assigned or running tasks per tenant (fair share).
    pub active_by_tenant: BTreeMap<String, u32>,
    /// Assigned or running tasks per (tenant, node, server): a tenant's share of a server.
    pub active_by_tenant_server: BTreeMap<(String, String, String), u32>,
    /// Assigned or running task ids per node.
    pub on_node: BTreeMap<String, BTreeSet<String>>,
    /// Tasks not yet ended.
    pub open: BTreeSet<String>,
    /// Tasks not yet ended that have a deadline: what the leader's timers look at.
    pub timed: BTreeSet<String>,
    /// Tool name → (node, server) offering it.
    pub tool_nodes: BTreeMap<String, BTreeSet<(String, String)>>,
}

fn queue_key(t: &TaskRecord) -> QueueKey {
    (Reverse(t.priority), t.created_at_ms, t.id.clone())
}

fn dec<K: Ord>(m: &mut BTreeMap<K, u32>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(k);
        }
    }
}

impl Index {
    pub fn link_task(&mut self, t: &TaskRecord) {
        if t.status == TaskStatus::Queued && t.group.is_none() {
            self.queue
                .entry(t.tenant.clone())
                .or_default()
                .insert(queue_key(t));
        }
        if t.status.is_active() {
            if let Some(a) = t.current_attempt() {
                *self
                    .active
                    .entry((a.node_id.clone(), a.server.clone()))
                    .or_default() += 1;
                *self.active_by_tenant.entry(t.tenant.clone()).or_default() += 1;
                *self
                    .active_by_tenant_server
                    .entry((t.tenant.clone(), a.node_id.clone(), a.server.clone()))
                    .or_default() += 1;
                self.on_node
                    .entry(a.node_id.clone())
                    .or_default()
                    .insert(t.id.clone());
            }
        }
        if !t.status.is_terminal() {
            self.open.insert(t.id.clone());
            if t.spec.deadlines != Default::default() {
                self.timed.insert(t.id.clone());
            }
        }
    }

    pub fn unlink_task(&mut self, t: &TaskRecord) {
        if t.status == TaskStatus::Queued && t.group.is_none() {
            if let Some(q) = self.queue.get_mut(&t.tenant) {
                q.remove(&queue_key(t));
                if q.is_empty() {
                    self.queue.remove(&t.tenant);
                }
            }
        }
        if t.status.is_active() {
            if let Some(a) = t.current_attempt() {
                dec(&mut self.active, &(a.node_id.clone(), a.server.clone()));
                dec(&mut self.active_by_tenant, &t.tenant);
                dec(
                    &mut self.active_by_tenant_server,
                    &(t.tenant.clone(), a.node_id.clone(), a.server.clone()),
                );
                if let Some(s) = self.on_node.get_mut(&a.node_id) {
                    s.remove(&t.id);
                    if s.is_empty() {
                        self.on_node.remove(&a.node_id);
                    }
                }
            }
        }
        self.open.remove(&t.id);
        self.timed.remove(&t.id);
    }

    pub fn link_node(&mut self, n: &NodeRecord) {
        for s in &n.servers {
            for tool in &s.tools {
                self.tool_nodes
                    .entry(tool.clone())
                    .or_default()
                    .insert((n.id.clone(), s.name.clone()));
            }
        }
    }

    pub fn unlink_node(&mut self, n: &NodeRecord) {
        for s in &n.servers {
            for tool in &s.tools {
                if let Some(set) = self.tool_nodes.get_mut(tool) {
                    set.remove(&(n.id.clone(), s.name.clone()));
                    if set.is_empty() {
                        self.tool_nodes.remove(tool);
                    }
                }
            }
        }
    }
}
