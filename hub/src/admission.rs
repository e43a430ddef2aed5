//! Admission: whether a request may enter the hub, decided before anything is committed.
//! The shape of a request (names, sizes, nesting, list lengths: `flotilla_common::limits`),
//! its arguments, a workflow's DAG, and against the catalogue: the caller's scope and the
//! tool's input schema. Services call these; the fuzz targets drive the same functions.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex},
};

use flotilla_common::{
    jwt::Claims,
    limits::{self, MAX_ARGUMENT_BYTES, MAX_STEPS},
};
use flotilla_proto as pb;
use lru::LruCache;
use serde_json::Value;

use crate::{
    convert,
    error::{HubError, HubResult},
    state::{self, State, StepRecord},
};

/// Parses a request's `arguments`: a JSON object of at most `MAX_ARGUMENT_BYTES`, nested at
/// most `MAX_JSON_DEPTH` deep.
pub fn parse_arguments(raw: &[u8]) -> HubResult<Value> {
    if raw.len() > MAX_ARGUMENT_BYTES {
        return Err(HubError::InvalidArgument(format!(
            "arguments are {} bytes; the limit is {MAX_ARGUMENT_BYTES}",
            raw.len()
        )));
    }
    let args: Value = if raw.is_empty() {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(raw)
            .map_err(|e| HubError::InvalidArgument(format!("arguments are not valid JSON: {e}")))?
    };
    if !args.is_object() {
        return Err(HubError::InvalidArgument(
            "arguments must be a JSON object".into(),
        ));
    }
    limits::check_depth("arguments", &args)?;
    Ok(args)
}

/// The names a request carries are within the limits.
pub fn check_names(name: &str, idempotency_key: &str) -> HubResult<()> {
    limits::check_len("the tool or workflow name", name, limits::MAX_NAME_BYTES)
        .and_then(|()| {
            limits::check_len(
                "idempotency_key",
                idempotency_key,
                limits::MAX_IDEMPOTENCY_KEY_BYTES,
            )
        })
        .map_err(HubError::from)
}

/// Compiled input schemas, by tool. Compiling a schema costs far more than validating
/// arguments against it (under load it was 2% of the leader's CPU, and done under the
/// state's lock), so a tool's schema is compiled once and used for as long as the
/// catalogue holds the same schema. A schema that does not compile is remembered too, so
/// calls to its tool are refused without compiling it again each time.
#[derive(Clone)]
pub struct Schemas(Arc<Mutex<LruCache<String, Compiled>>>);

/// A schema and what compiling it gave.
type Compiled = (Value, Result<Arc<jsonschema::Validator>, String>);

/// Tools whose compiled schema is kept.
const CACHED_SCHEMAS: usize = 1024;

impl Default for Schemas {
    fn default() -> Self {
        let cap = NonZeroUsize::new(CACHED_SCHEMAS).expect("non-zero");
        Self(Arc::new(Mutex::new(LruCache::new(cap))))
    }
}

impl Schemas {
    /// `schema`, the input schema of `tool`, compiled. The lock is not held while
    /// compiling: two callers that miss at once both compile, and one keeps its result.
    fn compiled(&self, tool: &str, schema: &Value) -> Result<Arc<jsonschema::Validator>, String> {
        if let Some((s, v)) = self.0.lock().expect("schema cache lock").get(tool) {
            if s == schema {
                return v.clone();
            }
        }
        let v = jsonschema::validator_for(schema)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        self.0
            .lock()
            .expect("schema cache lock")
            .put(tool.to_owned(), (schema.clone(), v.clone()));
        v
    }
}

/// Checks that the caller may call `tool` and, unless `args` is `None` (a workflow step
/// whose arguments refer to earlier results), that they match its input schema.
pub fn check_call(
    state: &State,
    schemas: &Schemas,
    claims: &Claims,
    tool: &str,
    args: Option<&Value>,
) -> HubResult<()> {
    let entry = state.catalogue.get(tool).ok_or_else(|| {
        HubError::NotFound(format!(
            "unknown tool {tool:?}; `flotilla tools` lists the tools you may call"
        ))
    })?;
    if !entry.accepted {
        return Err(HubError::NotFound(format!(
            "tool {tool:?} was introduced by node {:?} and waits for an admin to accept it (`flotilla tools accept {tool}`)",
            entry.first_seen_node
        )));
    }
    if !claims.has_scope(&entry.required_scope) {
        return Err(HubError::PermissionDenied(format!(
            "tool {tool:?} needs scope {:?}, which this token does not hold",
            entry.required_scope
        )));
    }
    let Some(args) = args else { return Ok(()) };
    let validator = schemas
        .compiled(tool, &entry.def.input_schema)
        .map_err(|e| {
            HubError::FailedPrecondition(format!(
                "tool {tool:?} has an input schema that cannot be compiled: {e}"
            ))
        })?;
    let problems: Vec<String> = validator
        .iter_errors(args)
        .take(5)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("{at}: {e}")
            }
        })
        .collect();
    if !problems.is_empty() {
        return Err(HubError::InvalidArgument(format!(
            "arguments do not match the input schema of {tool:?}: {}",
            problems.join("; ")
        )));
    }
    Ok(())
}

/// A workflow's steps, admitted: within the limits, dependencies de-duplicated, arguments
/// parsed, options converted (locality defaults from `region`/`zone`), and the DAG's shape
/// checked. `check(tool, args)` decides whether the caller may call each step's tool (args
/// are `None` for a step whose arguments refer to earlier results: checked once resolved).
pub fn workflow_steps(
    specs: Vec<pb::StepSpec>,
    region: Option<&str>,
    zone: Option<&str>,
    mut check: impl FnMut(&str, Option<&Value>) -> HubResult<()>,
) -> HubResult<Vec<StepRecord>> {
    limits::check_count("steps", specs.len(), MAX_STEPS)?;
    let mut steps = Vec::with_capacity(specs.len());
    for mut s in specs {
        limits::check_len("a step name", &s.name, limits::MAX_NAME_BYTES)?;
        let at = |e: HubError| e.context(&format!("step {:?}", s.name));
        check_names(&s.tool, "").map_err(at)?;
        // Repeats say nothing more; dropping them keeps the shape check linear.
        let mut seen = std::collections::HashSet::new();
        s.depends_on.retain(|d| seen.insert(d.clone()));
        limits::check_count("depends_on", s.depends_on.len(), limits::MAX_DEPENDS_ON)
            .map_err(|e| at(e.into()))?;
        let args = parse_arguments(&s.arguments).map_err(at)?;
        let refers = !state::workflow_references(&args)
            .map_err(|e| at(HubError::InvalidArgument(e.to_string())))?
            .is_empty();
        check(&s.tool, (!refers).then_some(&args)).map_err(at)?;
        let spec = convert::spec(s.options.as_ref(), region, zone).map_err(at)?;
        let mut step = StepRecord::new(&s.name, &s.tool, args, s.depends_on);
        step.spec = spec;
        step.priority = s.priority;
        steps.push(step);
    }
    state::check_workflow_shape(&steps).map_err(|e| HubError::InvalidArgument(e.to_string()))?;
    Ok(steps)
}

/// A submission admitted: the task to commit, under a new id, with the caller's tenant,
/// scopes and locality; or why it is refused (names, arguments, options, and what
/// `check` says of the call: `check_call` against the catalogue, which the caller runs
/// under the state's lock, held for that alone).
pub fn task(
    claims: &Claims,
    req: &pb::SubmitTaskRequest,
    check: impl FnOnce(&str, Option<&Value>) -> HubResult<()>,
) -> HubResult<state::TaskRecord> {
    check_names(&req.tool, &req.idempotency_key)?;
    let args = parse_arguments(&req.arguments)?;
    check(&req.tool, Some(&args))?;
    let spec = convert::spec(
        req.options.as_ref(),
        claims.region.as_deref(),
        claims.zone.as_deref(),
    )?;
    let mut task = state::TaskRecord::new(
        &uuid::Uuid::now_v7().to_string(),
        &req.tool,
        &claims.tenant,
        &claims.sub,
        args,
        flotilla_common::now_ms(),
    );
    task.priority = req.priority;
    task.idempotency_key = (!req.idempotency_key.is_empty()).then(|| req.idempotency_key.clone());
    task.spec = spec;
    task.scopes = claims.scopes.clone();
    Ok(task)
}

/// A workflow submission admitted: the workflow to commit, every step checked as a call
/// of its own; or why it is refused.
pub fn workflow(
    state: &State,
    schemas: &Schemas,
    claims: &Claims,
    req: pb::SubmitWorkflowRequest,
) -> HubResult<state::WorkflowRecord> {
    check_names(&req.name, &req.idempotency_key)?;
    let steps = workflow_steps(
        req.steps,
        claims.region.as_deref(),
        claims.zone.as_deref(),
        |tool, args| check_call(state, schemas, claims, tool, args),
    )?;
    let now = flotilla_common::now_ms();
    Ok(state::WorkflowRecord {
        id: uuid::Uuid::now_v7().to_string(),
        name: req.name,
        tenant: claims.tenant.clone(),
        agent: claims.sub.clone(),
        scopes: claims.scopes.clone(),
        failure_policy: match pb::FailurePolicy::try_from(req.failure_policy) {
            Ok(pb::FailurePolicy::Continue) => state::FailurePolicy::Continue,
            _ => state::FailurePolicy::FailFast,
        },
        status: state::WorkflowStatus::Running,
        steps,
        created_at_ms: now,
        updated_at_ms: now,
        error: None,
        idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
        seq: 0,
        ended_seq: None,
        trace: None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::state::{CatalogueEntry, ToolDef};

    fn catalogue_with(schema: &Value) -> State {
        let mut state = State::default();
        let def = ToolDef {
            name: "t".into(),
            description: String::new(),
            input_schema: schema.clone(),
            read_only: false,
            idempotent: false,
            destructive: false,
        };
        state.catalogue.insert(
            "t".into(),
            CatalogueEntry {
                def,
                required_scope: "tools:t".into(),
                first_seen_node: "n".into(),
                first_seen_at_ms: 0,
                accepted: true,
            },
        );
        state
    }

    /// A tool's schema is compiled once while the catalogue keeps it, and arguments are
    /// always checked against the schema the catalogue holds now: a changed schema is
    /// compiled again, and one that cannot compile refuses the call (and is not compiled
    /// again for each call).
    #[test]
    fn arguments_meet_the_schema_the_catalogue_holds_now() {
        let schemas = Schemas::default();
        let claims = Claims {
            scopes: vec!["tools:*".into()],
            ..Default::default()
        };
        let number = json!({"type": "object", "properties": {"x": {"type": "number"}}});
        let text = json!({"type": "object", "properties": {"x": {"type": "string"}}});
        let args = json!({"x": 1});

        let state = catalogue_with(&number);
        check_call(&state, &schemas, &claims, "t", Some(&args)).expect("a number is a number");
        let compiled = schemas.compiled("t", &number).expect("compiles");
        check_call(&state, &schemas, &claims, "t", Some(&args)).expect("again");
        let reused = schemas.compiled("t", &number).expect("compiles");
        assert!(Arc::ptr_eq(&compiled, &reused), "compiled once");

        let state = catalogue_with(&text);
        match check_call(&state, &schemas, &claims, "t", Some(&args)) {
            Err(HubError::InvalidArgument(m)) => assert!(m.contains("/x"), "{m}"),
            other => panic!("checked against the old schema: {other:?}"),
        }

        let state = catalogue_with(&json!({"type": 12}));
        match check_call(&state, &schemas, &claims, "t", Some(&args)) {
            Err(HubError::FailedPrecondition(m)) => {
                assert!(m.contains("cannot be compiled"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let kept = schemas
            .0
            .lock()
            .expect("schema cache lock")
            .get("t")
            .map(|(s, v)| (s.clone(), v.is_err()));
        assert_eq!(
            kept,
            Some((json!({"type": 12}), true)),
            "the failure is kept"
        );
    }
}
