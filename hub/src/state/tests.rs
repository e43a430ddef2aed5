//! The state machine's rules, one command at a time.

use super::*;
use serde_json::json;

fn task(id: &str, key: Option<&str>) -> Command {
    let mut t = TaskRecord::new(id, "echo", "t", "a", json!({}), 1);
    t.idempotency_key = key.map(Into::into);
    Command::SubmitTask(Box::new(t))
}

fn with_node() -> State {
    let mut s = State::default();
    s.nodes.insert(
        "n1".into(),
        NodeRecord {
            id: "n1".into(),
            labels: Default::default(),
            status: NodeStatus::Ready,
            joined_at_ms: 0,
            last_hello_ms: None,
            servers: vec![],
            drain_deadline_ms: None,
            tenants: vec![],
            cpu_high_water_percent: 0.0,
        },
    );
    s
}

fn assign(id: &str) -> Command {
    Command::AssignTask {
        task_id: id.into(),
        node_id: "n1".into(),
        server: "demo".into(),
        at_ms: 2,
    }
}

fn finish(id: &str, attempt: u32, fence: u64) -> Command {
    Command::FinishTask {
        task_id: id.into(),
        attempt,
        fence,
        at_ms: 3,
        result: Some(json!({"content": [], "isError": false})),
        error: None,
    }
}

#[test]
fn a_result_is_recorded_once_and_only_for_the_current_attempt() {
    let mut s = with_node();
    s.apply(1, &task("t1", None));
    assert_eq!(
        s.apply(2, &assign("t1")),
        Response::Assigned {
            attempt: 1,
            fence: 2
        }
    );
    // A result with the wrong fence is refused.
    assert_eq!(
        s.apply(3, &finish("t1", 1, 99)),
        Response::Rejected(Rejection::Stale)
    );
    assert_eq!(
        s.apply(4, &finish("t1", 1, 2)),
        Response::TaskNow(TaskStatus::Succeeded)
    );
    // The same result again changes nothing.
    let before = s.clone();
    assert!(matches!(
        s.apply(5, &finish("t1", 1, 2)),
        Response::Rejected(_)
    ));
    assert_eq!(s, before);
}

#[test]
fn requeue_makes_the_old_attempt_stale() {
    let mut s = with_node();
    s.apply(1, &task("t1", None));
    s.apply(2, &assign("t1"));
    let rq = Command::RequeueTask {
        task_id: "t1".into(),
        attempt: 1,
        fence: 2,
        at_ms: 3,
        reason: "gone".into(),
    };
    assert_eq!(s.apply(3, &rq), Response::TaskNow(TaskStatus::Queued));
    assert_eq!(
        s.apply(4, &assign("t1")),
        Response::Assigned {
            attempt: 2,
            fence: 4
        }
    );
    assert_eq!(
        s.apply(5, &finish("t1", 1, 2)),
        Response::Rejected(Rejection::Stale)
    );
    assert_eq!(
        s.apply(6, &finish("t1", 2, 4)),
        Response::TaskNow(TaskStatus::Succeeded)
    );
}

#[test]
fn idempotency_key_returns_the_first_task() {
    let mut s = State::default();
    s.apply(1, &task("t1", Some("k")));
    assert_eq!(
        s.apply(2, &task("t2", Some("k"))),
        Response::Submitted {
            task_id: "t1".into(),
            deduplicated: true
        }
    );
    assert!(!s.tasks.contains_key("t2"));
}

#[test]
fn tool_error_result_fails_the_task_and_cancel_is_terminal() {
    let mut s = with_node();
    s.apply(1, &task("t1", None));
    s.apply(2, &assign("t1"));
    let c = Command::FinishTask {
        task_id: "t1".into(),
        attempt: 1,
        fence: 2,
        at_ms: 3,
        result: Some(json!({"content": [], "isError": true})),
        error: None,
    };
    assert_eq!(s.apply(3, &c), Response::TaskNow(TaskStatus::Failed));
    s.apply(4, &task("t2", None));
    let cancel = Command::CancelTask {
        task_id: "t2".into(),
        at_ms: 5,
    };
    assert_eq!(
        s.apply(5, &cancel),
        Response::TaskNow(TaskStatus::Cancelled)
    );
    assert!(matches!(s.apply(6, &cancel), Response::Rejected(_)));
    assert!(matches!(s.apply(7, &assign("t2")), Response::Rejected(_)));
}

#[test]
fn join_token_uses_are_counted_and_expiry_checked() {
    let mut s = State::default();
    s.apply(
        1,
        &Command::CreateJoinToken(JoinTokenRecord {
            id: "tok".into(),
            secret_hash: "h".into(),
            expires_at_ms: 100,
            uses_left: 1,
            description: String::new(),
            created_at_ms: 0,
        }),
    );
    let reg = |node: &str, hash: &str, at| Command::RegisterNode {
        node_id: node.into(),
        token_id: "tok".into(),
        secret_hash: hash.into(),
        labels: Default::default(),
        at_ms: at,
    };
    assert!(matches!(
        s.apply(2, &reg("a", "wrong", 10)),
        Response::Rejected(Rejection::BadJoinToken)
    ));
    assert!(matches!(
        s.apply(3, &reg("a", "h", 200)),
        Response::Rejected(Rejection::BadJoinToken)
    ));
    assert_eq!(s.apply(4, &reg("a", "h", 10)), Response::Done);
    assert!(matches!(
        s.apply(5, &reg("b", "h", 10)),
        Response::Rejected(Rejection::BadJoinToken)
    ));
}

#[test]
fn node_down_reruns_idempotent_tools_and_loses_the_others() {
    let mut s = with_node();
    let def = |name: &str, idempotent: bool| CatalogueEntry {
        def: ToolDef {
            name: name.into(),
            description: String::new(),
            input_schema: json!({"type": "object"}),
            read_only: false,
            idempotent,
            destructive: !idempotent,
        },
        required_scope: "tools".into(),
        first_seen_node: "n1".into(),
        first_seen_at_ms: 0,
    };
    s.catalogue.insert("echo".into(), def("echo", true));
    s.catalogue.insert("charge".into(), def("charge", false));
    s.apply(1, &task("safe", None));
    let mut unsafe_task = task("risky", None);
    if let Command::SubmitTask(t) = &mut unsafe_task {
        t.tool = "charge".into();
    }
    s.apply(2, &unsafe_task);
    s.apply(3, &assign("safe"));
    s.apply(4, &assign("risky"));
    let down = Command::NodeDown {
        node_id: "n1".into(),
        at_ms: 9,
    };
    assert_eq!(
        s.apply(5, &down),
        Response::NodeWentDown {
            requeued: vec!["safe".into()],
            lost: vec!["risky".into()]
        }
    );
    assert_eq!(s.tasks["safe"].status, TaskStatus::Queued);
    assert_eq!(s.tasks["risky"].status, TaskStatus::Lost);
    assert_eq!(s.nodes["n1"].status, NodeStatus::Down);
    // The lost attempt's late result is refused; the re-queued one's too.
    assert!(matches!(
        s.apply(6, &finish("risky", 1, 4)),
        Response::Rejected(_)
    ));
    assert!(matches!(
        s.apply(7, &finish("safe", 1, 3)),
        Response::Rejected(_)
    ));
}

#[test]
fn a_changed_tool_definition_is_not_used() {
    let mut s = with_node();
    let def = |desc: &str| ToolDef {
        name: "echo".into(),
        description: desc.into(),
        input_schema: json!({"type": "object"}),
        read_only: true,
        idempotent: true,
        destructive: false,
    };
    let hello = |desc: &str| Command::NodeHello {
        node_id: "n1".into(),
        labels: Default::default(),
        servers: vec![OfferedServer {
            name: "demo".into(),
            max_concurrency: 2,
            required_scope: "tools".into(),
            tools: vec![def(desc)],
        }],
        at_ms: 1,
        tenants: vec![],
        cpu_high_water_percent: 0.0,
    };
    s.apply(1, &hello("first"));
    assert_eq!(s.nodes["n1"].servers[0].tools, vec!["echo".to_string()]);
    s.apply(2, &hello("changed"));
    assert!(s.nodes["n1"].servers[0].tools.is_empty());
    assert_eq!(
        s.nodes["n1"].servers[0].conflicting_tools,
        vec!["echo".to_string()]
    );
    assert_eq!(s.catalogue["echo"].def.description, "first");
}
