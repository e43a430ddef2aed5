//! Fan-out: a task with `replicas: N` runs as N replica tasks on distinct nodes, and its own
//! outcome is decided from theirs by its aggregation. Once decided, the replicas still
//! running are cancelled.

use serde_json::{json, Value};

use super::{Aggregation, State, TaskRecord, TaskStatus};

/// A JSON value with every object's keys sorted, written compactly: equal results compare
/// equal whatever order their producers wrote keys in.
pub(super) fn canonical_json(v: &Value) -> String {
    // serde_json may keep insertion order (preserve_order): sort while writing.
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let ordered: std::collections::BTreeMap<&String, &Value> = m.iter().collect();
                out.push('{');
                for (i, (k, v)) in ordered.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(v, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

/// What replicas vote with: the result's content and structured content (not `_meta`).
pub fn vote_of(result: &Value) -> String {
    canonical_json(&json!({
        "content": result.get("content").cloned().unwrap_or(Value::Null),
        "structuredContent": result.get("structuredContent").cloned().unwrap_or(Value::Null),
    }))
}

enum Decision {
    Undecided,
    Succeeded(Value),
    Failed(String),
}

fn decide(agg: Aggregation, replicas: &[&TaskRecord]) -> Decision {
    let n = replicas.len();
    let ended = replicas.iter().filter(|r| r.status.is_terminal()).count();
    let ok: Vec<&TaskRecord> = replicas
        .iter()
        .copied()
        .filter(|r| r.status == TaskStatus::Succeeded)
        .collect();
    let failures = || {
        replicas
            .iter()
            .filter(|r| r.status.is_terminal() && r.status != TaskStatus::Succeeded)
            .map(|r| {
                format!(
                    "{}: {}",
                    r.id,
                    r.error.as_deref().unwrap_or(match r.status {
                        TaskStatus::Failed => "failed",
                        TaskStatus::Lost => "lost",
                        _ => "cancelled",
                    })
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    match agg {
        Aggregation::All => {
            if ok.len() < ended {
                Decision::Failed(format!("a replica did not succeed ({})", failures()))
            } else if ok.len() == n {
                let results: Vec<Value> = ok.iter().filter_map(|r| r.result.clone()).collect();
                Decision::Succeeded(json!({
                    "content": [{"type": "text", "text": format!("all {n} replicas succeeded")}],
                    "structuredContent": {"replicas": results},
                    "isError": false,
                }))
            } else {
                Decision::Undecided
            }
        }
        Aggregation::First => match ok.first() {
            Some(r) => Decision::Succeeded(r.result.clone().unwrap_or(Value::Null)),
            None if ended == n => {
                Decision::Failed(format!("no replica succeeded ({})", failures()))
            }
            None => Decision::Undecided,
        },
        Aggregation::Majority | Aggregation::Quorum(_) => {
            let need = agg.needed(n).unwrap_or(n).max(1);
            let mut votes: Vec<(String, usize, &Value)> = Vec::new();
            for r in &ok {
                let Some(res) = &r.result else { continue };
                let v = vote_of(res);
                match votes.iter_mut().find(|(k, _, _)| *k == v) {
                    Some(e) => e.1 += 1,
                    None => votes.push((v, 1, res)),
                }
            }
            let best = votes.iter().max_by_key(|(_, c, _)| *c);
            match best {
                Some((_, c, res)) if *c >= need => Decision::Succeeded((*res).clone()),
                _ => {
                    let top = best.map_or(0, |(_, c, _)| *c);
                    if top + (n - ended) < need {
                        Decision::Failed(format!(
                            "{} needed {need} agreeing replicas; the largest agreeing group has {top} of {n} ({} distinct results{})",
                            agg.describe(),
                            votes.len(),
                            if ok.len() < ended { format!("; {}", failures()) } else { String::new() }
                        ))
                    } else {
                        Decision::Undecided
                    }
                }
            }
        }
    }
}

impl State {
    /// Decides fan-out task `parent_id` from its replicas, if it can be decided now, and
    /// cancels the replicas no longer needed. Until then it shows `running` once any
    /// replica was placed.
    pub(super) fn aggregate(&mut self, parent_id: &str, at_ms: i64) {
        let Some(p) = self.tasks.get(parent_id) else {
            return;
        };
        if p.status.is_terminal() {
            return;
        }
        let Some(group) = p.group.clone() else { return };
        let replicas: Vec<&TaskRecord> = group
            .replicas
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .collect();
        let started = replicas
            .iter()
            .any(|r| !r.attempts.is_empty() || r.status.is_terminal());
        let decision = decide(p.spec.aggregation, &replicas);
        let _ = self.update(parent_id, false, |t| {
            match decision {
                Decision::Undecided if started && t.status == TaskStatus::Queued => {
                    t.set(TaskStatus::Running, at_ms)
                }
                Decision::Undecided => {}
                Decision::Succeeded(result) => {
                    t.result = Some(result);
                    t.error = None;
                    t.set(TaskStatus::Succeeded, at_ms);
                }
                Decision::Failed(why) => {
                    t.error = Some(why);
                    t.dead_lettered = true;
                    t.set(TaskStatus::Failed, at_ms);
                }
            }
            Ok(())
        });
        if self.tasks[parent_id].status.is_terminal() {
            for r in &group.replicas {
                self.end_task(
                    r,
                    TaskStatus::Cancelled,
                    "not needed: its fan-out task was already decided",
                    at_ms,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_ignores_key_order() {
        let a: Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"q":2,"p":1}],"x":null}}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a":{"x":null,"y":[1,{"p":1,"q":2}]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"x":null,"y":[1,{"p":1,"q":2}]},"b":1}"#
        );
    }
}
