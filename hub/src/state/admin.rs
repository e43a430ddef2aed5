//! Admin controls: pausing all placement, cancelling a tenant's work, accepting a tool a
//! node introduced. Credentials are `credentials`.

use super::{Rejection, Response, State, TaskStatus};

impl State {
    /// Stops (or resumes) all placement: the emergency control.
    pub(super) fn pause_scheduling(&mut self, paused: bool) -> Response {
        self.scheduling_paused = paused;
        Response::Done
    }

    /// Cancels every unfinished workflow and task of `tenant`.
    pub(super) fn cancel_tenant_tasks(&mut self, tenant: &str, at_ms: i64) -> Response {
        let why = "cancelled with every task of the tenant by an admin";
        let workflows: Vec<String> = self
            .workflows
            .values()
            .filter(|w| w.tenant == tenant && !w.status.is_terminal())
            .map(|w| w.id.clone())
            .collect();
        for w in workflows {
            self.cancel_workflow(&w, why, at_ms);
        }
        // Fan-out tasks first: they end their replicas with them.
        let mut ids: Vec<(bool, String)> = self
            .index
            .open
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .filter(|t| t.tenant == tenant)
            .map(|t| (t.group.is_none(), t.id.clone()))
            .collect();
        ids.sort();
        let mut cancelled = Vec::new();
        for (_, id) in ids {
            if self.tasks.get(&id).is_some_and(|t| !t.status.is_terminal()) {
                self.end_task(&id, TaskStatus::Cancelled, why, at_ms);
                cancelled.push(id);
            }
        }
        Response::TasksCancelled(cancelled)
    }

    /// An admin accepts a tool name a node introduced: every node offering it may run it.
    pub(super) fn accept_tool(&mut self, name: &str) -> Result<Response, Rejection> {
        let entry = self
            .catalogue
            .get_mut(name)
            .ok_or_else(|| Rejection::NoSuchTool(name.to_owned()))?;
        entry.accepted = true;
        for node in self.nodes.values_mut() {
            self.index.unlink_node(node);
            for s in &mut node.servers {
                if let Some(i) = s.pending_tools.iter().position(|t| t == name) {
                    s.tools.push(s.pending_tools.remove(i));
                }
            }
            self.index.link_node(node);
        }
        Ok(Response::Done)
    }
}
