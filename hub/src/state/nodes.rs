//! Nodes: what a node may offer (`check_offer`), what its results teach the catalogue
//! (`learn`), and what becomes of its tasks when it goes down or is drained
//! (`release_tasks`).

use super::{
    breaker_key, spec, CatalogueEntry, FailureKind, OfferedServer, ServerRecord, State, TaskRecord,
    TaskStatus,
};

impl State {
    /// The server record for an offer, checked against the tool catalogue (pinning). A
    /// name not seen before enters the catalogue usable only when the node may add tools;
    /// otherwise it waits for an admin to accept it.
    pub(super) fn check_offer(
        &mut self,
        node_id: &str,
        s: &OfferedServer,
        at_ms: i64,
        may_add_tools: bool,
    ) -> ServerRecord {
        let mut rec = ServerRecord {
            name: s.name.clone(),
            max_concurrency: s.max_concurrency,
            required_scope: s.required_scope.clone(),
            tools: Vec::new(),
            conflicting_tools: Vec::new(),
            pending_tools: Vec::new(),
        };
        for def in &s.tools {
            let accepted = match self.catalogue.get(&def.name) {
                Some(e) if e.def.same_definition(def) && e.required_scope == s.required_scope => {
                    e.accepted
                }
                Some(_) => {
                    rec.conflicting_tools.push(def.name.clone());
                    continue;
                }
                None => {
                    self.catalogue.insert(
                        def.name.clone(),
                        CatalogueEntry {
                            def: def.clone(),
                            required_scope: s.required_scope.clone(),
                            first_seen_node: node_id.to_owned(),
                            first_seen_at_ms: at_ms,
                            accepted: may_add_tools,
                        },
                    );
                    may_add_tools
                }
            };
            if accepted {
                rec.tools.push(def.name.clone());
            } else {
                rec.pending_tools.push(def.name.clone());
            }
        }
        rec
    }

    /// Records what a finished attempt taught: the tool's statistics on that node, and the
    /// server's breaker (when `call_ok` is false the call itself failed).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn learn(
        &mut self,
        tool: &str,
        node: &str,
        server: &str,
        ok: bool,
        call_ok: bool,
        took_ms: u64,
        at_ms: i64,
    ) {
        self.tool_stats
            .entry(tool.to_owned())
            .or_default()
            .entry(node.to_owned())
            .or_default()
            .record(ok, took_ms);
        let b = self.breakers.entry(breaker_key(node, server)).or_default();
        if call_ok {
            b.consecutive_failures = 0;
        } else {
            b.consecutive_failures += 1;
            b.last_failure_ms = at_ms;
        }
    }

    /// Takes a node's unfinished tasks off it: re-queued when the tool is read-only or
    /// idempotent (up to `NODE_LOSS_RERUNS` attempts) or the task's retry policy covers node
    /// loss, otherwise ended with `other` and the reason `why`.
    pub(super) fn release_tasks(
        &mut self,
        node_id: &str,
        at_ms: i64,
        by_node: bool,
        other: TaskStatus,
        why: impl Fn() -> String,
    ) -> (Vec<String>, Vec<String>) {
        let mut requeued = Vec::new();
        let mut ended = Vec::new();
        let ids: Vec<String> = self
            .index
            .on_node
            .get(node_id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for id in ids {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            let safe = self
                .catalogue
                .get(&t.tool)
                .is_some_and(|e| e.def.safe_to_rerun());
            let made = t.tries();
            let rerun = (safe
                && made < t.spec.retry.max_attempts.max(spec::NODE_LOSS_RERUNS) as usize)
                || t.spec.retry.allows(FailureKind::NodeLost, made);
            let on_node = |t: &TaskRecord| {
                t.status.is_active() && t.current_attempt().is_some_and(|a| a.node_id == node_id)
            };
            if !on_node(t) {
                continue;
            }
            let _ = self.update(&id, by_node, |t| {
                if rerun {
                    t.close_attempt(
                        at_ms,
                        &format!("node {node_id} was lost or drained; running it again"),
                    );
                    t.set(TaskStatus::Queued, at_ms);
                } else {
                    let reason = why();
                    t.close_attempt(at_ms, &reason);
                    t.error = Some(reason);
                    t.dead_lettered = other == TaskStatus::Lost;
                    t.set(other, at_ms);
                }
                Ok(())
            });
            if rerun {
                requeued.push(id);
            } else {
                ended.push(id);
            }
        }
        (requeued, ended)
    }
}
