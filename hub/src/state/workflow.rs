//! Workflows: a DAG of steps, each a task started once every step it depends on succeeded,
//! with arguments that may refer to those steps' results. A failed step either fails the
//! workflow at once (fail-fast: running steps cancelled, the rest skipped) or only skips the
//! steps that depend on it (continue). All of it is applied in the state machine, so a new
//! leader carries on exactly where the old one stopped.
//!
//! Every change of a step bumps the workflow's `seq` and stamps the step with it: a watcher
//! resumes from the last seq it saw on any hub.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Rejection, Response, State, StepRef, TaskRecord, TaskSpec, TaskStatus};

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
}

/// A reference to an earlier step's result inside a string argument.
#[derive(Debug, PartialEq)]
struct Reference<'a> {
    step: &'a str,
    /// `text`, `structured` or `result`, then a path into it.
    part: &'a str,
    path: Vec<&'a str>,
}

/// The `${steps.NAME.PART...}` references in a string, with their byte ranges.
fn references(s: &str) -> Result<Vec<(std::ops::Range<usize>, Reference<'_>)>, String> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(start) = s[from..].find("${").map(|i| i + from) {
        let end = s[start..]
            .find('}')
            .map(|i| i + start)
            .ok_or_else(|| format!("unclosed reference in {s:?}"))?;
        let inner = &s[start + 2..end];
        let mut parts = inner.split('.');
        if parts.next() != Some("steps") {
            return Err(format!(
                "reference ${{{inner}}} must start with `steps.`, as in ${{steps.NAME.text}}"
            ));
        }
        let step = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("reference ${{{inner}}} names no step"))?;
        let part = parts.next().unwrap_or("");
        if !matches!(part, "text" | "structured" | "result") {
            return Err(format!(
                "reference ${{{inner}}}: after the step name comes text, structured or result"
            ));
        }
        let path: Vec<&str> = parts.collect();
        if part == "text" && !path.is_empty() {
            return Err(format!("reference ${{{inner}}}: text has no fields"));
        }
        out.push((start..end + 1, Reference { step, part, path }));
        from = end + 1;
    }
    Ok(out)
}

fn each_string<'a>(
    v: &'a Value,
    f: &mut dyn FnMut(&'a str) -> Result<(), String>,
) -> Result<(), String> {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().try_for_each(|v| each_string(v, f)),
        Value::Object(m) => m.values().try_for_each(|v| each_string(v, f)),
        _ => Ok(()),
    }
}

/// The steps a step's arguments refer to (checked for syntax).
pub fn referenced_steps(arguments: &Value) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    each_string(arguments, &mut |s| {
        for (_, r) in references(s)? {
            out.insert(r.step.to_owned());
        }
        Ok(())
    })?;
    Ok(out)
}

/// The text blocks of a CallToolResult, joined by newlines.
fn result_text(result: &Value) -> String {
    result
        .get("content")
        .and_then(Value::as_array)
        .map(|blocks| {
            blocks
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

fn lookup(r: &Reference<'_>, results: &BTreeMap<&str, &Value>) -> Result<Value, String> {
    let result = results
        .get(r.step)
        .ok_or_else(|| format!("step {:?} has no result", r.step))?;
    let mut v = match r.part {
        "text" => return Ok(Value::String(result_text(result))),
        "result" => (*result).clone(),
        _ => match result.get("structuredContent") {
            Some(s) if !s.is_null() => s.clone(),
            // A tool without structured output may still print JSON.
            _ => serde_json::from_str(&result_text(result)).map_err(|_| {
                format!(
                    "step {:?} returned no structured content and its text is not JSON",
                    r.step
                )
            })?,
        },
    };
    for key in &r.path {
        v = match &v {
            Value::Object(m) => m.get(*key).cloned(),
            Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i).cloned()),
            _ => None,
        }
        .ok_or_else(|| {
            format!(
                "step {:?}: the result has no {:?}",
                r.step,
                r.path.join(".")
            )
        })?;
    }
    Ok(v)
}

/// The arguments with every reference replaced: a string that is exactly one reference
/// becomes the referred value; references inside longer strings are written in place
/// (strings as they are, other values as compact JSON).
fn resolve(template: &Value, results: &BTreeMap<&str, &Value>) -> Result<Value, String> {
    Ok(match template {
        Value::String(s) => {
            let refs = references(s)?;
            match refs.as_slice() {
                [] => template.clone(),
                [(range, r)] if range.start == 0 && range.end == s.len() => lookup(r, results)?,
                _ => {
                    let mut out = String::new();
                    let mut at = 0;
                    for (range, r) in &refs {
                        out.push_str(&s[at..range.start]);
                        match lookup(r, results)? {
                            Value::String(v) => out.push_str(&v),
                            other => out.push_str(&other.to_string()),
                        }
                        at = range.end;
                    }
                    out.push_str(&s[at..]);
                    Value::String(out)
                }
            }
        }
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|v| resolve(v, results))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), resolve(v, results)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// Checks a workflow's shape: step names unique and simple, dependencies known, no cycle,
/// and references only to steps it (transitively) depends on.
pub fn check_shape(steps: &[StepRecord]) -> Result<(), String> {
    if steps.is_empty() {
        return Err("a workflow needs at least one step".into());
    }
    let mut names = BTreeSet::new();
    for s in steps {
        if s.name.is_empty()
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "step name {:?} must be letters, digits, '-' or '_'",
                s.name
            ));
        }
        if !names.insert(s.name.as_str()) {
            return Err(format!("two steps are named {:?}", s.name));
        }
    }
    for s in steps {
        for d in &s.depends_on {
            if !names.contains(d.as_str()) {
                return Err(format!("step {:?} depends on unknown step {d:?}", s.name));
            }
        }
    }
    // Kahn's algorithm with in-degrees (linear in steps + edges): whatever cannot be
    // ordered is on a cycle.
    let at: BTreeMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut waiting: Vec<usize> = steps.iter().map(|s| s.depends_on.len()).collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, s) in steps.iter().enumerate() {
        for d in &s.depends_on {
            children[at[d.as_str()]].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..steps.len()).filter(|&i| waiting[i] == 0).collect();
    let mut ordered = 0;
    while let Some(i) = ready.pop() {
        ordered += 1;
        for &c in &children[i] {
            waiting[c] -= 1;
            if waiting[c] == 0 {
                ready.push(c);
            }
        }
    }
    if ordered < steps.len() {
        let names: Vec<&str> = steps
            .iter()
            .zip(&waiting)
            .filter(|(_, w)| **w > 0)
            .map(|(s, _)| s.name.as_str())
            .collect();
        return Err(format!(
            "the steps {names:?} depend on each other in a cycle"
        ));
    }
    let by_name: BTreeMap<&str, &StepRecord> = steps.iter().map(|s| (s.name.as_str(), s)).collect();
    for s in steps {
        let refs = referenced_steps(&s.arguments).map_err(|e| format!("step {:?}: {e}", s.name))?;
        if refs.is_empty() {
            continue;
        }
        let mut ancestors = BTreeSet::new();
        let mut stack: Vec<&str> = s.depends_on.iter().map(String::as_str).collect();
        while let Some(n) = stack.pop() {
            if ancestors.insert(n) {
                stack.extend(by_name[n].depends_on.iter().map(String::as_str));
            }
        }
        for r in refs {
            if !ancestors.contains(r.as_str()) {
                return Err(format!(
                    "step {:?} refers to step {r:?}, which it does not depend on",
                    s.name
                ));
            }
        }
    }
    Ok(())
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
        let args = resolve(&step.arguments, &results).and_then(|args| {
            flotilla_common::limits::check_depth("resolved arguments", &args)?;
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
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_resolve_to_values_or_in_place_text() {
        let a = json!({"content": [{"type": "text", "text": "abc"}], "structuredContent": {"n": 3, "xs": [7, 8]}});
        let results: BTreeMap<&str, &Value> = [("a", &a)].into_iter().collect();
        let t = json!({
            "whole": "${steps.a.structured}",
            "n": "${steps.a.structured.n}",
            "second": "${steps.a.structured.xs.1}",
            "text": "got ${steps.a.text} and ${steps.a.structured.n}",
            "plain": "no refs",
            "nested": ["${steps.a.text}"],
        });
        let r = resolve(&t, &results).unwrap();
        assert_eq!(r["whole"], json!({"n": 3, "xs": [7, 8]}));
        assert_eq!(r["n"], json!(3));
        assert_eq!(r["second"], json!(8));
        assert_eq!(r["text"], json!("got abc and 3"));
        assert_eq!(r["plain"], json!("no refs"));
        assert_eq!(r["nested"], json!(["abc"]));
        let err = resolve(&json!("${steps.a.structured.missing}"), &results).unwrap_err();
        assert!(err.contains("missing"), "{err}");
        let err = resolve(&json!("${steps.b.text}"), &results).unwrap_err();
        assert!(err.contains("no result"), "{err}");
    }

    #[test]
    fn shape_checks_catch_cycles_unknown_steps_and_undeclared_references() {
        let s = |name: &str, deps: &[&str], args: Value| {
            StepRecord::new(
                name,
                "echo",
                args,
                deps.iter().map(|d| d.to_string()).collect(),
            )
        };
        assert!(check_shape(&[
            s("a", &[], json!({})),
            s("b", &["a"], json!({"x": "${steps.a.text}"}))
        ])
        .is_ok());
        let e = check_shape(&[s("a", &["b"], json!({})), s("b", &["a"], json!({}))]).unwrap_err();
        assert!(e.contains("cycle"), "{e}");
        let e = check_shape(&[s("a", &["zz"], json!({}))]).unwrap_err();
        assert!(e.contains("unknown step"), "{e}");
        let e = check_shape(&[
            s("a", &[], json!({})),
            s("b", &[], json!({"x": "${steps.a.text}"})),
        ])
        .unwrap_err();
        assert!(e.contains("does not depend"), "{e}");
        let e = check_shape(&[s("a", &[], json!({"x": "${oops}"}))]).unwrap_err();
        assert!(e.contains("steps."), "{e}");
        let e = check_shape(&[s("a", &[], json!({})), s("a", &[], json!({}))]).unwrap_err();
        assert!(e.contains("two steps"), "{e}");
        // Transitive dependencies may be referred to.
        assert!(check_shape(&[
            s("a", &[], json!({})),
            s("b", &["a"], json!({})),
            s("c", &["b"], json!({"x": "${steps.a.text}"}))
        ])
        .is_ok());
    }
}
