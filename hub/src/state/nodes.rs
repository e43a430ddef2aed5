//! Nodes: joining, saying hello (what a node may offer, `check_offer`), going down, being
//! cordoned, drained and evicted; what its results teach the catalogue (`learn`), and
//! what becomes of its tasks when it goes down or is drained (`release_tasks`).

use std::collections::BTreeMap;

use super::{
    breaker_key, spec, CatalogueEntry, FailureKind, NodeRecord, NodeStatus, OfferedServer,
    Rejection, Response, ServerRecord, State, TaskRecord, TaskStatus,
};

/// What a node says when its session opens.
pub(super) struct Hello<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub servers: &'a [OfferedServer],
    pub tenants: &'a [String],
    pub cpu_high_water_percent: f64,
    pub may_add_tools: bool,
}

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

    /// A node joins with a join token: one use of the token is spent, the node recorded.
    /// The same join asked again (same name, token and key: the node never got the
    /// answer) spends nothing and adds the new certificate.
    pub(super) fn register_node(
        &mut self,
        node_id: &str,
        (token_id, secret_hash): (&str, &str),
        labels: &BTreeMap<String, String>,
        (cert_serial, key_pin): (&str, &str),
        at_ms: i64,
    ) -> Result<Response, Rejection> {
        let tok = self
            .join_tokens
            .get_mut(token_id)
            .filter(|t| {
                t.expires_at_ms > at_ms && flotilla_common::secret_eq(&t.secret_hash, secret_hash)
            })
            .ok_or(Rejection::BadJoinToken)?;
        if let Some(node) = self.nodes.get_mut(node_id) {
            let again = !key_pin.is_empty()
                && node
                    .joined_with
                    .as_ref()
                    .is_some_and(|(t, k)| t == token_id && k == key_pin);
            if !again {
                return Err(Rejection::NodeExists(node_id.to_owned()));
            }
            if !cert_serial.is_empty() && !node.cert_serials.iter().any(|s| s == cert_serial) {
                node.cert_serials.push(cert_serial.to_owned());
                let extra = node
                    .cert_serials
                    .len()
                    .saturating_sub(super::credentials::MAX_NODE_CERTIFICATES);
                node.cert_serials.drain(..extra);
            }
            return Ok(Response::Done);
        }
        if tok.uses_left == 0 {
            return Err(Rejection::BadJoinToken);
        }
        tok.uses_left -= 1;
        let mut node = NodeRecord::new(node_id, labels.clone(), at_ms);
        node.may_add_tools = tok.may_add_tools;
        if !cert_serial.is_empty() {
            node.cert_serials.push(cert_serial.to_owned());
        }
        if !key_pin.is_empty() {
            node.joined_with = Some((token_id.to_owned(), key_pin.to_owned()));
        }
        self.nodes.insert(node_id.to_owned(), node);
        Ok(Response::Done)
    }

    /// A node's session opened: what it offers now (checked against the catalogue), its
    /// labels and tenants. A node that was down is ready again.
    pub(super) fn hello(
        &mut self,
        node_id: &str,
        hello: &Hello<'_>,
        at_ms: i64,
    ) -> Result<Response, Rejection> {
        if !self.nodes.contains_key(node_id) {
            return Err(Rejection::NoSuchNode(node_id.to_owned()));
        }
        let records = hello
            .servers
            .iter()
            .map(|s| self.check_offer(node_id, s, at_ms, hello.may_add_tools))
            .collect();
        let node = self.nodes.get_mut(node_id).expect("checked above");
        self.index.unlink_node(node);
        if node.status == NodeStatus::Down {
            node.status = NodeStatus::Ready;
        }
        node.labels = hello.labels.clone();
        node.servers = records;
        node.last_hello_ms = Some(at_ms);
        node.tenants = hello.tenants.to_vec();
        node.cpu_high_water_percent = hello.cpu_high_water_percent;
        self.index.link_node(node);
        Ok(Response::Done)
    }

    /// A node stayed silent past its TTL: down, its tasks re-queued or lost.
    pub(super) fn node_down(
        &mut self,
        node_id: &str,
        at_ms: i64,
        seen_hello_ms: Option<i64>,
    ) -> Result<Response, Rejection> {
        let node = self.node_mut(node_id)?;
        if seen_hello_ms.is_some_and(|seen| node.last_hello_ms.unwrap_or(0) != seen) {
            // It said hello after the leader found it gone: it is back.
            return Err(Rejection::Stale);
        }
        node.status = NodeStatus::Down;
        node.drain_deadline_ms = None;
        let (requeued, lost) = self.release_tasks(node_id, at_ms, true, TaskStatus::Lost, || {
            format!(
                "node {node_id} was lost before the task finished; the tool is not marked idempotent and the retry policy does not cover node loss, so it was not re-run"
            )
        });
        Ok(Response::NodeWentDown { requeued, lost })
    }

    /// Cordon or make ready; a down node stays down until it says hello.
    pub(super) fn set_node_status(
        &mut self,
        node_id: &str,
        status: NodeStatus,
    ) -> Result<Response, Rejection> {
        let node = self.node_mut(node_id)?;
        if node.status != NodeStatus::Down {
            node.status = status;
        }
        node.drain_deadline_ms = None;
        Ok(Response::Done)
    }

    /// No new work for the node; what runs may finish until `deadline_ms`.
    pub(super) fn drain_node(
        &mut self,
        node_id: &str,
        deadline_ms: i64,
    ) -> Result<Response, Rejection> {
        let node = self.node_mut(node_id)?;
        node.status = NodeStatus::Draining;
        node.drain_deadline_ms = Some(deadline_ms);
        Ok(Response::Done)
    }

    /// A drain's deadline passed: the node's unfinished tasks are re-queued or cancelled.
    pub(super) fn evict_node(&mut self, node_id: &str, at_ms: i64) -> Result<Response, Rejection> {
        self.node_mut(node_id)?;
        let (requeued, lost) = self.release_tasks(node_id, at_ms, false, TaskStatus::Cancelled, || {
            format!("node {node_id} was drained before the task finished; the tool is not marked idempotent, so it was cancelled rather than re-run")
        });
        if let Some(n) = self.nodes.get_mut(node_id) {
            n.drain_deadline_ms = None;
        }
        Ok(Response::NodeWentDown { requeued, lost })
    }

    pub(super) fn node_mut(&mut self, node_id: &str) -> Result<&mut NodeRecord, Rejection> {
        self.nodes
            .get_mut(node_id)
            .ok_or_else(|| Rejection::NoSuchNode(node_id.to_owned()))
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
            let safe = self.safe_to_rerun(t);
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
