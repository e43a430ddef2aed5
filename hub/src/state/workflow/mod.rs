//! Workflows: a DAG of steps, each a task started once every step it depends on succeeded,
//! with arguments that may refer to those steps' results. A failed step either fails the
//! workflow at once (fail-fast: running steps cancelled, the rest skipped) or only skips the
//! steps that depend on it (continue). All of it is applied in the state machine, so a new
//! leader carries on exactly where the old one stopped.
//!
//! Every change of a step bumps the workflow's `seq` and stamps the step with it: a watcher
//! resumes from the last seq it saw on any hub.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Rejection, Response, State, StepRef, TaskRecord, TaskSpec, TaskStatus};

mod refs;
mod shape;

use refs::resolve;
pub use refs::{referenced_steps, RefError};
pub use shape::{check_shape, ShapeError};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    #[default]
    FailFast,
    Continue,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl WorkflowStatus {
    pub fn is_terminal(self) -> bool {
        self != Self::Running
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Queued,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Cancelled,
}

impl StepState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Skipped | Self::Cancelled
        )
    }

    fn of(task: TaskStatus) -> Self {
        match task {
            TaskStatus::Queued => Self::Queued,
            TaskStatus::Assigned | TaskStatus::Running => Self::Running,
            TaskStatus::Succeeded => Self::Succeeded,
            TaskStatus::Failed | TaskStatus::Lost => Self::Failed,
            TaskStatus::Cancelled => Self::Cancelled,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    pub tool: String,
    /// The arguments as submitted, references unresolved.
    pub arguments: Value,
    pub depends_on: Vec<String>,
    pub spec: TaskSpec,
    pub priority: i32,
    pub state: StepState,
    pub task_id: Option<String>,
    /// The arguments it ran with.
    pub resolved: Option<Value>,
    pub result: Option<Value>,
    pub error: Option<String>,
    /// The workflow's seq at this step's last change.
    pub seq: u64,
    pub changed_at_ms: i64,
}

impl StepRecord {
    pub fn new(name: &str, tool: &str, arguments: Value, depends_on: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            tool: tool.to_owned(),
            arguments,
            depends_on,
            spec: TaskSpec::default(),
            priority: 0,
            state: StepState::Pending,
            task_id: None,
            resolved: None,
            result: None,
            error: None,
            seq: 0,
            changed_at_ms: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkflowRecord {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub agent: String,
    pub scopes: Vec<String>,
    pub failure_policy: FailurePolicy,
    pub status: WorkflowStatus,
    pub steps: Vec<StepRecord>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    pub seq: u64,
    /// The seq of the workflow's end, once it ended.
    pub ended_seq: Option<u64>,
    /// The W3C `traceparent` of the call that submitted it: its steps' tasks join that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

impl State {
    pub(super) fn submit_workflow(&mut self, index: u64, wf: &WorkflowRecord) -> super::Response {
        if self.workflows.contains_key(&wf.id)
            || self.stored(|h| h.workflow_at(&wf.id, index)).is_some()
        {
            return super::Response::WorkflowSubmitted {
                workflow_id: wf.id.clone(),
                deduplicated: true,
            };
        }
        if let Some(key) = &wf.idempotency_key {
            let ix = super::idempotency_index(&wf.tenant, key);
            let existing = self
                .workflow_idempotency
                .get(&ix)
                .cloned()
                .or_else(|| self.stored(|h| h.keyed_at(true, &wf.tenant, key, index)));
            if let Some(existing) = existing {
                return super::Response::WorkflowSubmitted {
                    workflow_id: existing,
                    deduplicated: true,
                };
            }
            self.workflow_idempotency.insert(ix, wf.id.clone());
        }
        self.workflows.insert(wf.id.clone(), wf.clone());
        self.effects.workflows_changed = true;
        self.advance(&wf.id, wf.created_at_ms);
        super::Response::WorkflowSubmitted {
            workflow_id: wf.id.clone(),
            deduplicated: false,
        }
    }

    /// Sets a step's state (and result or error), bumping the workflow's seq.
    fn set_step(
        &mut self,
        wf_id: &str,
        step: usize,
        state: StepState,
        result: Option<Value>,
        error: Option<String>,
        at_ms: i64,
    ) {
        let Some(w) = self.workflows.get_mut(wf_id) else {
            return;
        };
        let s = &mut w.steps[step];
        if s.state == state && s.error == error && s.result == result {
            return;
        }
        w.seq += 1;
        w.updated_at_ms = at_ms;
        s.state = state;
        s.result = result;
        s.error = error;
        s.seq = w.seq;
        s.changed_at_ms = at_ms;
        self.effects.workflows_changed = true;
    }

    /// A step's task moved: the step follows it, and the workflow moves on.
    pub(super) fn step_changed(&mut self, at: &StepRef, task_id: &str, at_ms: i64) {
        let Some(t) = self.tasks.get(task_id) else {
            return;
        };
        let (state, result, error) = (StepState::of(t.status), t.result.clone(), t.error.clone());
        let Some(i) = self
            .workflows
            .get(&at.workflow_id)
            .and_then(|w| w.steps.iter().position(|s| s.name == at.step))
        else {
            return;
        };
        let error = if state.is_terminal() { error } else { None };
        self.set_step(&at.workflow_id, i, state, result, error, at_ms);
        if state.is_terminal() {
            self.advance(&at.workflow_id, at_ms);
        }
    }

    /// Starts every step whose dependencies all succeeded, skips the ones that can no
    /// longer run, applies the failure policy, and ends the workflow when every step ended.
    fn advance(&mut self, wf_id: &str, at_ms: i64) {
        loop {
            let Some(w) = self.workflows.get(wf_id) else {
                return;
            };
            if w.status.is_terminal() {
                return;
            }
            let state_of: BTreeMap<String, StepState> =
                w.steps.iter().map(|s| (s.name.clone(), s.state)).collect();
            let failed = w
                .steps
                .iter()
                .any(|s| matches!(s.state, StepState::Failed | StepState::Cancelled));
            if failed && w.failure_policy == FailurePolicy::FailFast {
                let first = w
                    .steps
                    .iter()
                    .filter(|s| matches!(s.state, StepState::Failed | StepState::Cancelled))
                    .min_by_key(|s| s.seq)
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                self.stop_steps(
                    wf_id,
                    &format!("skipped: step {first:?} failed and the workflow fails fast"),
                    at_ms,
                );
                self.finish_workflow(wf_id, at_ms);
                return;
            }
            let mut changed = false;
            let pending: Vec<(usize, Vec<String>)> = w
                .steps
                .iter()
                .enumerate()
                .filter(|(_, s)| s.state == StepState::Pending)
                .map(|(i, s)| (i, s.depends_on.clone()))
                .collect();
            for (i, deps) in pending {
                let blocked = deps.iter().find(|d| {
                    matches!(
                        state_of[d.as_str()],
                        StepState::Failed | StepState::Skipped | StepState::Cancelled
                    )
                });
                if let Some(d) = blocked {
                    let why = format!("skipped: step {d:?} did not succeed");
                    self.set_step(wf_id, i, StepState::Skipped, None, Some(why), at_ms);
                    changed = true;
                } else if deps
                    .iter()
                    .all(|d| state_of[d.as_str()] == StepState::Succeeded)
                {
                    self.start_step(wf_id, i, at_ms);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        self.finish_workflow(wf_id, at_ms);
    }

    /// Creates the task of step `i`, or fails the step if its arguments cannot be resolved
    /// or do not fit the tool.
    fn start_step(&mut self, wf_id: &str, i: usize, at_ms: i64) {
        let w = &self.workflows[wf_id];
        let step = &w.steps[i];
        let results: BTreeMap<&str, &Value> = w
            .steps
            .iter()
            .filter_map(|s| s.result.as_ref().map(|r| (s.name.as_str(), r)))
            .collect();
        let args = resolve(&step.arguments, &results)
            .map_err(|e| e.to_string())
            .and_then(|args| {
                flotilla_common::limits::check_depth("resolved arguments", &args)
                    .map_err(|e| e.to_string())?;
                match self.catalogue.get(&step.tool) {
                    None => Err(format!("unknown tool {:?}", step.tool)),
                    Some(e) => match jsonschema::validator_for(&e.def.input_schema) {
                        Ok(v) => {
                            let problem = v.iter_errors(&args).next().map(|e| e.to_string());
                            match problem {
                                None => Ok(args),
                                Some(err) => Err(format!(
                                "resolved arguments do not match the input schema of {:?}: {err}",
                                step.tool
                            )),
                            }
                        }
                        Err(e) => Err(format!("tool {:?} has an unusable schema: {e}", step.tool)),
                    },
                }
            });
        let args = match args {
            Ok(a) => a,
            Err(why) => {
                self.set_step(wf_id, i, StepState::Failed, None, Some(why), at_ms);
                return;
            }
        };
        let mut t = TaskRecord::new(
            &format!("{wf_id}.{}", step.name),
            &step.tool,
            &w.tenant,
            &w.agent,
            args.clone(),
            at_ms,
        );
        t.priority = step.priority;
        t.spec = step.spec.clone();
        t.scopes = w.scopes.clone();
        t.trace = w.trace.clone();
        t.workflow = Some(StepRef {
            workflow_id: wf_id.to_owned(),
            step: step.name.clone(),
        });
        let task_id = t.id.clone();
        let w = self.workflows.get_mut(wf_id).expect("checked above");
        w.steps[i].task_id = Some(task_id);
        w.steps[i].resolved = Some(args);
        self.set_step(wf_id, i, StepState::Queued, None, None, at_ms);
        self.insert_with_replicas(t);
    }

    /// Cancels the running steps' tasks and skips the steps not started.
    fn stop_steps(&mut self, wf_id: &str, why: &str, at_ms: i64) {
        let steps: Vec<(usize, StepState, Option<String>)> = self.workflows[wf_id]
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.state, s.task_id.clone()))
            .collect();
        for (i, state, task) in steps {
            match (state, task) {
                (StepState::Pending, _) => self.set_step(
                    wf_id,
                    i,
                    StepState::Skipped,
                    None,
                    Some(why.to_owned()),
                    at_ms,
                ),
                (s, Some(task)) if !s.is_terminal() => {
                    self.end_task(&task, TaskStatus::Cancelled, why, at_ms);
                    let error = Some(why.to_owned());
                    self.set_step(wf_id, i, StepState::Cancelled, None, error, at_ms);
                }
                _ => {}
            }
        }
    }

    /// An agent cancels a workflow that has not ended.
    pub(super) fn cancel_workflow_request(
        &mut self,
        index: u64,
        workflow_id: &str,
        at_ms: i64,
    ) -> Result<Response, Rejection> {
        let Some(w) = self.workflows.get(workflow_id) else {
            return Err(match self.stored(|h| h.workflow_at(workflow_id, index)) {
                Some(_) => Rejection::WorkflowEnded,
                None => Rejection::NoSuchWorkflow(workflow_id.to_owned()),
            });
        };
        if w.status.is_terminal() {
            return Err(Rejection::WorkflowEnded);
        }
        self.cancel_workflow(workflow_id, "workflow cancelled", at_ms);
        Ok(Response::WorkflowNow(WorkflowStatus::Cancelled))
    }

    pub(super) fn cancel_workflow(&mut self, wf_id: &str, why: &str, at_ms: i64) {
        self.stop_steps(wf_id, why, at_ms);
        if let Some(w) = self.workflows.get_mut(wf_id) {
            w.seq += 1;
            w.status = WorkflowStatus::Cancelled;
            w.error = Some(why.to_owned());
            w.updated_at_ms = at_ms;
            w.ended_seq = Some(w.seq);
            self.effects.workflows_changed = true;
            self.effects.ended_workflows.push(wf_id.to_owned());
        }
    }

    /// Ends the workflow once every step ended.
    fn finish_workflow(&mut self, wf_id: &str, at_ms: i64) {
        let Some(w) = self.workflows.get_mut(wf_id) else {
            return;
        };
        if w.status.is_terminal() || !w.steps.iter().all(|s| s.state.is_terminal()) {
            return;
        }
        let failed: Vec<&str> = w
            .steps
            .iter()
            .filter(|s| s.state != StepState::Succeeded)
            .map(|s| s.name.as_str())
            .collect();
        if failed.is_empty() {
            w.status = WorkflowStatus::Succeeded;
        } else {
            let firsts: Vec<String> = w
                .steps
                .iter()
                .filter(|s| matches!(s.state, StepState::Failed | StepState::Cancelled))
                .map(|s| format!("{}: {}", s.name, s.error.as_deref().unwrap_or("failed")))
                .collect();
            w.status = WorkflowStatus::Failed;
            w.error = Some(format!(
                "{} of {} steps did not succeed ({})",
                failed.len(),
                w.steps.len(),
                firsts.join("; ")
            ));
        }
        w.seq += 1;
        w.updated_at_ms = at_ms;
        w.ended_seq = Some(w.seq);
        self.effects.workflows_changed = true;
        self.effects.ended_workflows.push(wf_id.to_owned());
    }
}

#[cfg(test)]
mod tests;
