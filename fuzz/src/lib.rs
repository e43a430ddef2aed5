//! What the fuzz targets share: a state machine with a node, a tool and tasks in every
//! stage, built through commands as a hub would, and the commands that built it (the seed
//! corpus for `committed_entry`).

use flotilla_hub::state::{Command, OfferedServer, State, TaskRecord, ToolDef};
use serde_json::json;

/// Commands that make a small live cluster state: a node offering `echo`, one task
/// queued, one running, one finished.
pub fn seed_commands() -> Vec<Command> {
    let hello = Command::NodeHello {
        node_id: "n1".into(),
        labels: [("zone".to_owned(), "a".to_owned())].into(),
        servers: vec![OfferedServer {
            name: "demo".into(),
            max_concurrency: 4,
            required_scope: "tools".into(),
            tools: vec![ToolDef {
                name: "echo".into(),
                description: "Echo".into(),
                input_schema: json!({"type": "object"}),
                read_only: true,
                idempotent: true,
                destructive: false,
            }],
        }],
        at_ms: 1,
        tenants: vec![],
        cpu_high_water_percent: 0.0,
        may_add_tools: true,
    };
    let task = |id: &str| {
        let mut t = TaskRecord::new(id, "echo", "t", "a", json!({"text": id}), 2);
        t.scopes = vec!["tools".into()];
        Command::SubmitTask(Box::new(t))
    };
    let assign = |id: &str| Command::AssignTask {
        task_id: id.into(),
        node_id: "n1".into(),
        server: "demo".into(),
        at_ms: 3,
    };
    vec![
        hello,
        task("q"),
        task("r"),
        assign("r"),
        task("f"),
        assign("f"),
        Command::FinishTask {
            task_id: "f".into(),
            attempt: 1,
            fence: 6,
            at_ms: 4,
            result: Some(json!({"content": [{"type": "text", "text": "f"}]})),
            error: None,
            node_id: "n1".into(),
            started_at_ms: None,
        },
    ]
}

/// The state `seed_commands` builds, with log indexes 2.. (the node is registered first).
pub fn seeded_state() -> State {
    let mut s = State::default();
    s.nodes.insert(
        "n1".into(),
        flotilla_hub::state::NodeRecord::new("n1", Default::default(), 0),
    );
    for (i, c) in seed_commands().iter().enumerate() {
        s.apply(i as u64 + 1, c);
        s.take_effects();
    }
    s
}
