//! Finished work leaves memory: archiving ended tasks and workflows into the history
//! store at the index that ended them, and finding a task or workflow live or archived.

use std::collections::BTreeSet;

use super::{
    history, idempotency_index, Effects, History, Lookup, Rejection, Response, State, TaskRecord,
    WorkflowRecord,
};

impl State {
    /// A read of the history store from `apply`. A store failure is recorded (the hub
    /// stops on it) and reads as nothing there.
    pub(super) fn stored<T>(
        &mut self,
        f: impl FnOnce(&History) -> history::StoreResult<Option<T>>,
    ) -> Option<T> {
        match f(&self.history) {
            Ok(v) => v,
            Err(e) => {
                self.effects.store_error = Some(e.to_string());
                None
            }
        }
    }

    /// Retention: what ended at or before the cut (`History::cut`) leaves the store.
    pub(super) fn expire_history(
        &mut self,
        index: u64,
        through_ms: i64,
        through_entry: Option<&str>,
    ) -> Response {
        let cut = History::cut(through_ms, through_entry);
        if let Err(e) = self.history.expire(index, &cut) {
            self.effects.store_error = Some(e.to_string());
        }
        Response::Done
    }

    /// The rejection for a task not in memory at log index `index`: one that ended (and
    /// moved to the history store) cannot change; any other is unknown.
    pub(super) fn missing_task(&mut self, id: &str, index: u64) -> Rejection {
        match self.stored(|h| h.task_at(id, index)) {
            Some(status) => Rejection::WrongState(status),
            None => Rejection::NoSuchTask(id.to_owned()),
        }
    }

    /// Moves what ended in this apply to the history store: every task touched from
    /// position `from` of the effects, and every workflow that ended, once the whole unit
    /// it belongs to ended (a fan-out task with its replicas, a workflow with its steps'
    /// tasks), so what is still live never refers to the store.
    pub(super) fn archive_ended(&mut self, from: usize, index: u64) {
        let mut units = BTreeSet::new();
        for id in &self.effects.touched[from..] {
            let Some(t) = self.tasks.get(id).filter(|t| t.status.is_terminal()) else {
                continue;
            };
            let root = t
                .parent
                .as_ref()
                .and_then(|p| self.tasks.get(p))
                .unwrap_or(t);
            units.insert(match &root.workflow {
                Some(w) => (true, w.workflow_id.clone()),
                None => (false, root.id.clone()),
            });
        }
        for w in std::mem::take(&mut self.effects.ended_workflows) {
            units.insert((true, w));
        }
        for (workflow, id) in units {
            self.archive_unit(workflow, &id, index);
        }
    }

    /// Archives one unit at `index` if every part of it ended.
    pub(super) fn archive_unit(&mut self, workflow: bool, id: &str, index: u64) {
        let roots: Vec<String> = if workflow {
            match self.workflows.get(id) {
                Some(w) if w.status.is_terminal() => {
                    w.steps.iter().filter_map(|s| s.task_id.clone()).collect()
                }
                _ => return,
            }
        } else {
            vec![id.to_owned()]
        };
        let mut members = Vec::new();
        for r in roots {
            if let Some(t) = self.tasks.get(&r) {
                members.extend(t.group.iter().flat_map(|g| g.replicas.iter().cloned()));
                members.push(r);
            }
        }
        let ended = |id: &String| self.tasks.get(id).is_none_or(|t| t.status.is_terminal());
        if !members.iter().all(ended) {
            return;
        }
        let mut tasks = Vec::with_capacity(members.len());
        for m in &members {
            if let Some(t) = self.tasks.remove(m) {
                self.index.unlink_task(&t);
                if let Some(key) = &t.idempotency_key {
                    let ix = idempotency_index(&t.tenant, key);
                    if self.idempotency.get(&ix) == Some(&t.id) {
                        self.idempotency.remove(&ix);
                    }
                }
                tasks.push(t);
            }
        }
        let wf = workflow.then(|| self.workflows.remove(id)).flatten();
        if let Some(w) = &wf {
            if let Some(key) = &w.idempotency_key {
                let ix = idempotency_index(&w.tenant, key);
                if self.workflow_idempotency.get(&ix) == Some(&w.id) {
                    self.workflow_idempotency.remove(&ix);
                }
            }
        }
        if let Err(e) = self.history.archive(index, &tasks, wf.as_slice()) {
            self.effects.store_error = Some(e.to_string());
        }
        self.effects.archived.extend(tasks);
    }

    /// Archives, at `index`, everything that ended: for state written before finished work
    /// left memory (a snapshot of an older hub).
    pub fn archive_all_ended(&mut self, index: u64) {
        let mut units: BTreeSet<(bool, String)> = self
            .workflows
            .values()
            .filter(|w| w.status.is_terminal())
            .map(|w| (true, w.id.clone()))
            .collect();
        units.extend(
            self.tasks
                .values()
                .filter(|t| t.status.is_terminal() && t.parent.is_none() && t.workflow.is_none())
                .map(|t| (false, t.id.clone())),
        );
        for (workflow, id) in units {
            self.archive_unit(workflow, &id, index);
        }
        self.effects = Effects::default();
    }

    /// A task, live or finished, as it is now.
    pub fn find_task(&self, id: &str) -> history::StoreResult<Lookup<TaskRecord>> {
        match self.tasks.get(id) {
            Some(t) => Ok(Lookup::Found(t.clone())),
            None => self.history.task(id),
        }
    }

    /// A workflow, live or finished, as it is now.
    pub fn find_workflow(&self, id: &str) -> history::StoreResult<Lookup<WorkflowRecord>> {
        match self.workflows.get(id) {
            Some(w) => Ok(Lookup::Found(w.clone())),
            None => self.history.workflow(id),
        }
    }

    /// The task (or, with `workflow`, the workflow) a tenant's idempotency key names now.
    pub fn keyed(
        &self,
        workflow: bool,
        tenant: &str,
        key: &str,
    ) -> history::StoreResult<Option<String>> {
        let ix = idempotency_index(tenant, key);
        let live = if workflow {
            self.workflow_idempotency.get(&ix)
        } else {
            self.idempotency.get(&ix)
        };
        match live {
            Some(id) => Ok(Some(id.clone())),
            None => self.history.keyed_at(workflow, tenant, key, u64::MAX),
        }
    }
}
