//! Node liveness, on the leader: a node whose session is gone, or silent, for longer than
//! its TTL is marked down through Raft, and its unfinished tasks are handled by policy (see
//! `Command::NodeDown`). A new leader counts the TTL from when it took over, so nodes get a
//! grace period to reconnect after a failover.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::{
    chores::Chore,
    cluster::Hub,
    state::{Command, NodeStatus, Response},
};

/// The liveness chore. Remembers, while this hub leads, since when each absent node has been
/// counted as gone.
pub(crate) struct Liveness {
    ttl: Duration,
    gone_since: HashMap<String, Instant>,
    leading_since: Option<Instant>,
}

impl Liveness {
    pub(crate) fn new(c: &flotilla_common::config::HubConfig) -> Self {
        Self {
            ttl: Duration::from_millis(c.node_ttl_ms),
            gone_since: HashMap::new(),
            leading_since: None,
        }
    }
}

/// The absent nodes gone for a whole `ttl` by `now`. `gone_since` keeps since when each
/// absent node is counted (and forgets the ones that came back): from when its session
/// closed on this leader (`departed`), but never from before this hub took over
/// (`leading_since`), so nodes get a grace period to reconnect after a failover.
fn gone_too_long(
    absent: &[String],
    gone_since: &mut HashMap<String, Instant>,
    departed: impl Fn(&str) -> Option<Instant>,
    leading_since: Instant,
    now: Instant,
    ttl: Duration,
) -> Vec<String> {
    gone_since.retain(|id, _| absent.contains(id));
    absent
        .iter()
        .filter(|id| {
            let since = *gone_since
                .entry((*id).clone())
                .or_insert_with(|| departed(id).map_or(now, |t| t.max(leading_since)));
            now.duration_since(since) >= ttl
        })
        .cloned()
        .collect()
}

impl Chore for Liveness {
    /// The beat bounds how late past its TTL a node is marked down.
    fn period(&self) -> Duration {
        (self.ttl / 20).clamp(Duration::from_millis(100), Duration::from_millis(500))
    }

    fn idle(&mut self, _hub: &Hub) {
        self.gone_since.clear();
        self.leading_since = None;
    }

    async fn run(&mut self, hub: &Hub) {
        let ttl = self.ttl;
        let leading_since = *self.leading_since.get_or_insert_with(Instant::now);
        let live = hub.sessions.snapshot();
        // A session whose stream is open but that stopped heartbeating is dead too.
        for (id, l) in &live {
            if l.last_seen.elapsed() > ttl {
                tracing::warn!(node_id = %id, silent_ms = l.last_seen.elapsed().as_millis() as u64, "node stopped heartbeating; closing its session");
                hub.sessions.close(id, l.session);
            }
        }
        let live = hub.sessions.snapshot();
        {
            // A node marked down while its session is open here: its hello and the down
            // crossed (the node came back just as it was found gone). Nothing would make it
            // ready again, so its session ends and its next hello does.
            let state = hub.state();
            for (id, l) in &live {
                match state.nodes.get(id) {
                    Some(n) if n.status == NodeStatus::Down => {
                        tracing::warn!(node_id = %id, "node is marked down but connected; ending its session so it says hello again");
                        hub.sessions.close(id, l.session);
                    }
                    // Removed, or joined again since, while this session was opening: the
                    // certificate it opened with no longer counts.
                    Some(n) if n.holds_certificate(&l.serial) => {}
                    _ => {
                        tracing::warn!(node_id = %id, serial = %l.serial, "ending a session whose certificate the cluster no longer accepts");
                        hub.sessions.close(id, l.session);
                    }
                }
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
        evict_overdue_drains(hub).await;
        let down = gone_too_long(
            &absent,
            &mut self.gone_since,
            |id| hub.sessions.departed_at(id),
            leading_since,
            Instant::now(),
            ttl,
        );
        for id in down {
            // The node's last hello as the leader decides: the fence of its down.
            let seen_hello_ms = hub
                .state()
                .nodes
                .get(&id)
                .map(|n| n.last_hello_ms.unwrap_or(0));
            tracing::info!(node_id = %id, "node gone past its TTL; marking it down");
            // (A test holds the decision here; off the async workers while it does.)
            tokio::task::block_in_place(|| {
                fail::fail_point!(crate::faults::LIVENESS_BEFORE_DOWN);
            });
            if hub.sessions.get(&id).is_some() {
                tracing::info!(node_id = %id, "node came back before it was marked down");
                self.gone_since.remove(&id);
                continue;
            }
            let cmd = Command::NodeDown {
                node_id: id.clone(),
                at_ms: flotilla_common::now_ms(),
                seen_hello_ms,
            };
            match hub.write(cmd).await {
                Ok(Response::NodeWentDown { requeued, lost }) => {
                    tracing::warn!(node_id = %id, requeued = requeued.len(), lost = lost.len(), "node marked down");
                    self.gone_since.remove(&id);
                    hub.wake();
                }
                Ok(Response::Rejected(crate::state::Rejection::Stale)) => {
                    tracing::info!(node_id = %id, "node came back before it was marked down (it said hello since)");
                    self.gone_since.remove(&id);
                }
                Ok(other) => tracing::debug!(node_id = %id, ?other, "node down not applied"),
                Err(e) => tracing::warn!(node_id = %id, error = %e, "could not mark node down"),
            }
        }
    }
}

/// Draining nodes past their deadline give up what they still run.
async fn evict_overdue_drains(hub: &Hub) {
    let now_ms = flotilla_common::now_ms();
    let overdue: Vec<String> = {
        let state = hub.state();
        state
            .nodes
            .values()
            .filter(|n| {
                n.status == NodeStatus::Draining && n.drain_deadline_ms.is_some_and(|d| d <= now_ms)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_node_is_down_after_a_whole_ttl_counted_from_when_it_left() {
        let t0 = Instant::now();
        let mut since = HashMap::new();
        let left = |_: &str| Some(t0);
        let absent = ids(&["a"]);
        let at = |s| t0 + Duration::from_secs(s);
        assert!(gone_too_long(&absent, &mut since, left, t0, at(9), TTL).is_empty());
        assert_eq!(
            gone_too_long(&absent, &mut since, left, t0, at(10), TTL),
            absent
        );
    }

    #[test]
    fn a_new_leader_gives_nodes_a_whole_ttl_to_come_back() {
        let t0 = Instant::now();
        let took_over = t0 + Duration::from_secs(30);
        let mut since = HashMap::new();
        // Left long before this hub led, or never seen here at all.
        let absent = ids(&["left-earlier", "never-seen"]);
        let departed = |id: &str| (id == "left-earlier").then_some(t0);
        // The first beat after taking over sees both absent.
        for s in [0, 5] {
            let now = took_over + Duration::from_secs(s);
            assert!(gone_too_long(&absent, &mut since, departed, took_over, now, TTL).is_empty());
        }
        let later = took_over + Duration::from_secs(10);
        let mut down = gone_too_long(&absent, &mut since, departed, took_over, later, TTL);
        down.sort();
        assert_eq!(down, ids(&["left-earlier", "never-seen"]));
    }

    #[test]
    fn a_node_that_came_back_starts_again_from_zero() {
        let t0 = Instant::now();
        let mut since = HashMap::new();
        let at = |s| t0 + Duration::from_secs(s);
        let gone = ids(&["a"]);
        assert!(gone_too_long(&gone, &mut since, |_| None, t0, at(1), TTL).is_empty());
        // Back at 5 s: forgotten.
        assert!(gone_too_long(&[], &mut since, |_| None, t0, at(5), TTL).is_empty());
        assert!(since.is_empty());
        // Gone again at 8 s: counted from then, not from 1 s.
        assert!(gone_too_long(&gone, &mut since, |_| None, t0, at(8), TTL).is_empty());
        assert!(gone_too_long(&gone, &mut since, |_| None, t0, at(17), TTL).is_empty());
        assert_eq!(
            gone_too_long(&gone, &mut since, |_| None, t0, at(18), TTL),
            gone
        );
    }
}
