//! Writes seed inputs for the fuzz targets into `corpus/<target>/` (run from `fuzz/`).

use std::{fs, path::Path};

use prost::Message;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    fs::write(dir.join(name), bytes).expect("seed file");
}

fn main() {
    use flotilla_proto as pb;
    let commands = flotilla_fuzz::seed_commands();
    for (i, c) in commands.iter().enumerate() {
        write(
            "committed_entry",
            &format!("cmd-{i}.json"),
            &serde_json::to_vec(c).unwrap(),
        );
    }
    write(
        "committed_entry",
        "all.json",
        &serde_json::to_vec(&commands).unwrap(),
    );
    let state = flotilla_fuzz::seeded_state();
    write(
        "snapshot",
        "state.json",
        &serde_json::to_vec(&state).unwrap(),
    );
    let task = pb::SubmitTaskRequest {
        tool: "echo".into(),
        arguments: br#"{"text":"hi","n":[1,{"a":null}]}"#.to_vec(),
        idempotency_key: "k".into(),
        priority: 1,
        options: Some(pb::TaskOptions {
            retry: Some(pb::RetryPolicy {
                max_attempts: 3,
                retry_on: vec![1, 2],
                ..Default::default()
            }),
            placement: Some(pb::PlacementConstraints {
                zone: "a".into(),
                required_labels: [("gpu".to_owned(), "yes".to_owned())].into(),
                ..Default::default()
            }),
            replicas: 3,
            aggregation: pb::Aggregation::Quorum as i32,
            quorum: 2,
            ..Default::default()
        }),
    };
    write("task_request", "task.pb", &task.encode_to_vec());
    let step = |name: &str, deps: &[&str], args: &str| pb::StepSpec {
        name: name.into(),
        tool: "echo".into(),
        arguments: args.as_bytes().to_vec(),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    };
    let wf = pb::SubmitWorkflowRequest {
        name: "wf".into(),
        steps: vec![
            step("a", &[], r#"{"text":"x"}"#),
            step("b", &["a"], r#"{"text":"${steps.a.text}"}"#),
            step("c", &["a", "b"], r#"{"text":"${steps.b.structured.x.0}"}"#),
        ],
        ..Default::default()
    };
    write("workflow_request", "wf.pb", &wf.encode_to_vec());
    let hello = pb::Hello {
        labels: [("zone".to_owned(), "a".to_owned())].into(),
        servers: vec![pb::McpServerInfo {
            name: "demo".into(),
            max_concurrency: 2,
            required_scope: "tools".into(),
            tools: vec![pb::ToolInfo {
                name: "echo".into(),
                description: "Echo".into(),
                input_schema: br#"{"type":"object","properties":{"text":{"type":"string"}}}"#
                    .to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    write("node_hello", "hello.pb", &hello.encode_to_vec());
    let (_, csr) = flotilla_common::pki::node_key_and_csr("edge-1").unwrap();
    let join = pb::JoinRequest {
        name: "edge-1".into(),
        token_id: "abcd".into(),
        token_secret: "s".into(),
        csr_pem: csr,
    };
    write("join_request", "join.pb", &join.encode_to_vec());
    write(
        "config",
        "hub.toml",
        b"id = 1\ndata_dir = \"/tmp/x\"\nlisten = \"127.0.0.1:0\"\n[limits]\nagent_burst = 3\n",
    );
    write(
        "config",
        "node.toml",
        b"name = \"n\"\ndata_dir = \"/tmp/n\"\nhub = \"https://127.0.0.1:1\"\n[[servers]]\nname = \"s\"\ncommand = \"x\"\n",
    );
    write(
        "mcp_message",
        "result.json",
        br#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}],"isError":false}}"#,
    );
    write(
        "mcp_message",
        "progress.json",
        br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":0.5,"total":1}}"#,
    );
}
