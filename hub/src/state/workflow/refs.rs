//! References from a step's arguments to earlier steps' results: `${steps.NAME.text}`,
//! `${steps.NAME.structured.PATH}`, `${steps.NAME.result.PATH}`. Checked for syntax when a
//! workflow is submitted, resolved when the step starts.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Why a reference cannot be read or resolved. The text is what the agent sees (in the
/// refusal of a submission, or as the error of the step that could not start).
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum RefError {
    #[error("unclosed reference in {0:?}")]
    Unclosed(String),
    #[error("reference ${{{0}}} must start with `steps.`, as in ${{steps.NAME.text}}")]
    NotSteps(String),
    #[error("reference ${{{0}}} names no step")]
    NoStep(String),
    #[error("reference ${{{0}}}: after the step name comes text, structured or result")]
    BadPart(String),
    #[error("reference ${{{0}}}: text has no fields")]
    TextHasFields(String),
    #[error("step {0:?} has no result")]
    NoResult(String),
    #[error("step {0:?} returned no structured content and its text is not JSON")]
    NotStructured(String),
    #[error("step {step:?}: the result has no {path:?}")]
    NoField { step: String, path: String },
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
fn references(s: &str) -> Result<Vec<(std::ops::Range<usize>, Reference<'_>)>, RefError> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(start) = s[from..].find("${").map(|i| i + from) {
        let end = s[start..]
            .find('}')
            .map(|i| i + start)
            .ok_or_else(|| RefError::Unclosed(s.to_owned()))?;
        let inner = &s[start + 2..end];
        let mut parts = inner.split('.');
        if parts.next() != Some("steps") {
            return Err(RefError::NotSteps(inner.to_owned()));
        }
        let step = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| RefError::NoStep(inner.to_owned()))?;
        let part = parts.next().unwrap_or("");
        if !matches!(part, "text" | "structured" | "result") {
            return Err(RefError::BadPart(inner.to_owned()));
        }
        let path: Vec<&str> = parts.collect();
        if part == "text" && !path.is_empty() {
            return Err(RefError::TextHasFields(inner.to_owned()));
        }
        out.push((start..end + 1, Reference { step, part, path }));
        from = end + 1;
    }
    Ok(out)
}

fn each_string<'a>(
    v: &'a Value,
    f: &mut dyn FnMut(&'a str) -> Result<(), RefError>,
) -> Result<(), RefError> {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().try_for_each(|v| each_string(v, f)),
        Value::Object(m) => m.values().try_for_each(|v| each_string(v, f)),
        _ => Ok(()),
    }
}

/// The steps a step's arguments refer to (checked for syntax).
pub fn referenced_steps(arguments: &Value) -> Result<BTreeSet<String>, RefError> {
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

fn lookup(r: &Reference<'_>, results: &BTreeMap<&str, &Value>) -> Result<Value, RefError> {
    let result = results
        .get(r.step)
        .ok_or_else(|| RefError::NoResult(r.step.to_owned()))?;
    let mut v = match r.part {
        "text" => return Ok(Value::String(result_text(result))),
        "result" => (*result).clone(),
        _ => match result.get("structuredContent") {
            Some(s) if !s.is_null() => s.clone(),
            // A tool without structured output may still print JSON.
            _ => serde_json::from_str(&result_text(result))
                .map_err(|_| RefError::NotStructured(r.step.to_owned()))?,
        },
    };
    for key in &r.path {
        v = match &v {
            Value::Object(m) => m.get(*key).cloned(),
            Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i).cloned()),
            _ => None,
        }
        .ok_or_else(|| RefError::NoField {
            step: r.step.to_owned(),
            path: r.path.join("."),
        })?;
    }
    Ok(v)
}

/// The arguments with every reference replaced: a string that is exactly one reference
/// becomes the referred value; references inside longer strings are written in place
/// (strings as they are, other values as compact JSON).
pub(super) fn resolve(
    template: &Value,
    results: &BTreeMap<&str, &Value>,
) -> Result<Value, RefError> {
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
                .collect::<Result<_, RefError>>()?,
        ),
        other => other.clone(),
    })
}
