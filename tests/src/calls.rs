//! Requests and results: building submissions and workflow steps, reading results.

use flotilla_proto as pb;

/// A submission of `tool` with `args`.
pub fn submit(tool: &str, args: serde_json::Value) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        tool: tool.into(),
        arguments: serde_json::to_vec(&args).unwrap_or_default(),
        ..Default::default()
    }
}

/// A call of the demo server's `record` tool, keyed by `key` (the tool appends the key to
/// its record file, so a test can count how often a call ran).
pub fn record_call(key: &str) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        idempotency_key: key.into(),
        ..submit("record", serde_json::json!({ "key": key }))
    }
}

/// A workflow step calling `tool` after `deps` with `args`.
pub fn step(name: &str, tool: &str, deps: &[&str], args: serde_json::Value) -> pb::StepSpec {
    pb::StepSpec {
        name: name.into(),
        tool: tool.into(),
        arguments: serde_json::to_vec(&args).unwrap_or_default(),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    }
}

/// The text blocks of a task's CallToolResult, joined.
pub fn result_text(t: &pb::Task) -> String {
    let v: serde_json::Value = serde_json::from_slice(&t.result).unwrap_or_default();
    v["content"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}
