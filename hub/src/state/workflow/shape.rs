//! A workflow's shape, checked when it is submitted: step names unique and simple,
//! dependencies known, no cycle, and references only to steps a step (transitively)
//! depends on.

use std::collections::{BTreeMap, BTreeSet};

use super::{referenced_steps, RefError, StepRecord};

/// Why a workflow's shape is refused (the text is what the agent sees).
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ShapeError {
    #[error("a workflow needs at least one step")]
    NoSteps,
    #[error("step name {0:?} must be letters, digits, '-' or '_'")]
    BadName(String),
    #[error("two steps are named {0:?}")]
    Duplicate(String),
    #[error("step {step:?} depends on unknown step {dep:?}")]
    UnknownDependency { step: String, dep: String },
    #[error("the steps {0:?} depend on each other in a cycle")]
    Cycle(Vec<String>),
    #[error("step {step:?}: {error}")]
    Reference { step: String, error: RefError },
    #[error("step {step:?} refers to step {refers:?}, which it does not depend on")]
    NotADependency { step: String, refers: String },
}

/// Checks a workflow's shape: step names unique and simple, dependencies known, no cycle,
/// and references only to steps it (transitively) depends on.
pub fn check_shape(steps: &[StepRecord]) -> Result<(), ShapeError> {
    if steps.is_empty() {
        return Err(ShapeError::NoSteps);
    }
    let mut names = BTreeSet::new();
    for s in steps {
        if s.name.is_empty()
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ShapeError::BadName(s.name.clone()));
        }
        if !names.insert(s.name.as_str()) {
            return Err(ShapeError::Duplicate(s.name.clone()));
        }
    }
    for s in steps {
        for d in &s.depends_on {
            if !names.contains(d.as_str()) {
                return Err(ShapeError::UnknownDependency {
                    step: s.name.clone(),
                    dep: d.clone(),
                });
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
        let names = steps
            .iter()
            .zip(&waiting)
            .filter(|(_, w)| **w > 0)
            .map(|(s, _)| s.name.clone())
            .collect();
        return Err(ShapeError::Cycle(names));
    }
    let by_name: BTreeMap<&str, &StepRecord> = steps.iter().map(|s| (s.name.as_str(), s)).collect();
    for s in steps {
        let refs = referenced_steps(&s.arguments).map_err(|error| ShapeError::Reference {
            step: s.name.clone(),
            error,
        })?;
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
                return Err(ShapeError::NotADependency {
                    step: s.name.clone(),
                    refers: r,
                });
            }
        }
    }
    Ok(())
}
