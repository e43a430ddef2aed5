//! Limits on what callers may send, applied where input enters the hub. They sit well
//! inside what storage, replication and apply handle, so that no accepted request can make
//! a Raft entry too deep to read, too large to replicate in time, or too costly to apply.
//! docs/security.md lists them with their reasons.

use serde_json::Value;

/// Deepest JSON document accepted anywhere (arguments, results, tool schemas). serde_json
/// refuses 128; entries wrap documents in a few more levels.
pub const MAX_JSON_DEPTH: usize = 64;
/// Largest task arguments document.
pub const MAX_ARGUMENT_BYTES: usize = 1024 * 1024;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Longest tool, step, workflow, label key or label value, zone or region.
pub const MAX_NAME_BYTES: usize = 256;
/// Most placement labels (required plus preferred) on one task.
pub const MAX_LABELS: usize = 32;
/// Most entries in `retry_on` (there are three kinds; repeats are dropped).
pub const MAX_RETRY_ON: usize = 12;
/// Most dependencies of one workflow step.
pub const MAX_DEPENDS_ON: usize = 64;
/// Most steps in one workflow.
pub const MAX_STEPS: usize = 200;

/// How deeply `v` nests (a scalar is 0, `{}` and `[]` are 1), without recursion.
pub fn json_depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        deepest = deepest.max(d + 1);
        stack.extend(children.map(|c| (c, d + 1)));
    }
    deepest
}

/// An input over one of these limits; the text names the field and the limit.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum LimitError {
    #[error("{field} nests {depth} levels deep; the limit is {max}")]
    TooDeep {
        field: String,
        depth: usize,
        max: usize,
    },
    #[error("{field} is {len} bytes; the limit is {max}")]
    TooLong {
        field: String,
        len: usize,
        max: usize,
    },
    #[error("{field} has {count} entries; the limit is {max}")]
    TooMany {
        field: String,
        count: usize,
        max: usize,
    },
}

/// An error naming `field` when `v` nests deeper than `MAX_JSON_DEPTH`.
pub fn check_depth(field: &str, v: &Value) -> Result<(), LimitError> {
    let depth = json_depth(v);
    if depth > MAX_JSON_DEPTH {
        return Err(LimitError::TooDeep {
            field: field.to_owned(),
            depth,
            max: MAX_JSON_DEPTH,
        });
    }
    Ok(())
}

/// An error naming `field` when `s` is longer than `max` bytes.
pub fn check_len(field: &str, s: &str, max: usize) -> Result<(), LimitError> {
    if s.len() > max {
        return Err(LimitError::TooLong {
            field: field.to_owned(),
            len: s.len(),
            max,
        });
    }
    Ok(())
}

/// An error naming `field` when a list has more than `max` entries.
pub fn check_count(field: &str, n: usize, max: usize) -> Result<(), LimitError> {
    if n > max {
        return Err(LimitError::TooMany {
            field: field.to_owned(),
            count: n,
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_counts_containers() {
        assert_eq!(json_depth(&json!(1)), 0);
        assert_eq!(json_depth(&json!({})), 1);
        assert_eq!(json_depth(&json!({"a": [1, {"b": []}]})), 4);
    }

    #[test]
    fn too_deep_is_named() {
        let mut v = json!(1);
        for _ in 0..MAX_JSON_DEPTH {
            v = json!({ "a": v });
        }
        assert!(check_depth("arguments", &v).is_ok());
        let e = check_depth("arguments", &json!({ "a": v })).unwrap_err();
        assert_eq!(
            e.to_string(),
            "arguments nests 65 levels deep; the limit is 64"
        );
        assert_eq!(
            e,
            LimitError::TooDeep {
                field: "arguments".into(),
                depth: 65,
                max: 64
            }
        );
    }
}
