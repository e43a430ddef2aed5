//! The state machine's rules, one command at a time.

use super::*;
use serde_json::json;

fn task(id: &str, key: Option<&str>) -> Command {
    let mut t = TaskRecord::new(id, "echo", "t", "a", json!({}), 1);
    t.idempotency_key = key.map(Into::into);
    Command::SubmitTask(Box::new(t))
}

/// A task, live or finished (then read from the history store).
fn task_now(s: &State, id: &str) -> TaskRecord {
    s.find_task(id).unwrap().found().expect("task exists")
}

fn workflow_now(s: &State, id: &str) -> WorkflowRecord {
    s.find_workflow(id)
        .unwrap()
        .found()
        .expect("workflow exists")
}

fn with_node() -> State {
    let mut s = State::default();
    s.nodes
        .insert("n1".into(), NodeRecord::new("n1", Default::default(), 0));
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
        node_id: "n1".into(),
        started_at_ms: None,
    }
}

#[test]
fn only_the_node_holding_the_attempt_may_report_on_it() {
    let mut s = with_node();
    s.apply(1, &task("t1", None));
    s.apply(2, &assign("t1"));
    let forged = |cmd: Command| match cmd {
        Command::FinishTask {
            task_id,
            attempt,
            fence,
            at_ms,
            error,
            ..
        } => Command::FinishTask {
            task_id,
            attempt,
            fence,
            at_ms,
            result: Some(json!({"content": [{"type": "text", "text": "forged"}]})),
            error,
            node_id: "n2".into(),
            started_at_ms: None,
        },
        other => other,
    };
    let start = |node: &str| Command::StartTask {
        task_id: "t1".into(),
        attempt: 1,
        fence: 2,
        at_ms: 3,
        node_id: node.into(),
    };
    assert_eq!(
        s.apply(3, &start("n2")),
        Response::Rejected(Rejection::NotYourAttempt)
    );
    assert_eq!(task_now(&s, "t1").status, TaskStatus::Assigned);
    assert_eq!(
        s.apply(4, &forged(finish("t1", 1, 2))),
        Response::Rejected(Rejection::NotYourAttempt)
    );
    assert_eq!(task_now(&s, "t1").status, TaskStatus::Assigned);
    assert_eq!(
        s.apply(5, &start("n1")),
        Response::TaskNow(TaskStatus::Running)
    );
    assert_eq!(
        s.apply(6, &finish("t1", 1, 2)),
        Response::TaskNow(TaskStatus::Succeeded)
    );
    assert_eq!(
        task_now(&s, "t1").result.as_ref().unwrap()["content"],
        json!([])
    );
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
    // The node said hello after the assignment: its new session was sent the
    // assignment, so the task stays with it.
    s.nodes.get_mut("n1").unwrap().last_hello_ms = Some(3);
    assert_eq!(s.apply(3, &rq), Response::Rejected(Rejection::Stale));
    assert_eq!(task_now(&s, "t1").status, TaskStatus::Assigned);
    s.nodes.get_mut("n1").unwrap().last_hello_ms = Some(1);
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
        node_id: String::new(),
        started_at_ms: None,
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
            may_add_tools: true,
            created_by: "admin".into(),
            revoked_at_ms: None,
        }),
    );
    let reg = |node: &str, hash: &str, at| Command::RegisterNode {
        node_id: node.into(),
        token_id: "tok".into(),
        secret_hash: hash.into(),
        labels: Default::default(),
        at_ms: at,
        cert_serial: format!("serial-{node}"),
        key_pin: "pin-1".into(),
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
    assert!(
        s.nodes["a"].may_add_tools,
        "the token's trust goes to its node"
    );
    assert!(matches!(
        s.apply(5, &reg("b", "h", 10)),
        Response::Rejected(Rejection::BadJoinToken)
    ));
    // The token is used up, but "a" asking again with the same token and key (it never
    // got the answer) is the same join: its new certificate is added, nothing spent.
    let again = |key_pin: &str, serial: &str| match reg("a", "h", 11) {
        Command::RegisterNode {
            node_id,
            token_id,
            secret_hash,
            labels,
            at_ms,
            ..
        } => Command::RegisterNode {
            node_id,
            token_id,
            secret_hash,
            labels,
            at_ms,
            cert_serial: serial.into(),
            key_pin: key_pin.into(),
        },
        _ => unreachable!(),
    };
    assert_eq!(s.apply(6, &again("pin-1", "serial-a2")), Response::Done);
    assert_eq!(s.nodes["a"].cert_serials, ["serial-a", "serial-a2"]);
    // Another key under the same name is another node: refused.
    assert_eq!(
        s.apply(7, &again("pin-2", "serial-x")),
        Response::Rejected(Rejection::NodeExists("a".into()))
    );
    assert_eq!(s.nodes["a"].cert_serials, ["serial-a", "serial-a2"]);
    assert_eq!(s.join_tokens["tok"].uses_left, 0);
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
        accepted: true,
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
        seen_hello_ms: None,
    };
    assert_eq!(
        s.apply(5, &down),
        Response::NodeWentDown {
            requeued: vec!["safe".into()],
            lost: vec!["risky".into()]
        }
    );
    assert_eq!(task_now(&s, "safe").status, TaskStatus::Queued);
    assert_eq!(task_now(&s, "risky").status, TaskStatus::Lost);
    assert_eq!(s.nodes["n1"].status, NodeStatus::Down);
    // A down decided before the node's last hello is stale: the node came back.
    s.nodes.get_mut("n1").unwrap().status = NodeStatus::Ready;
    s.nodes.get_mut("n1").unwrap().last_hello_ms = Some(8);
    let late = Command::NodeDown {
        node_id: "n1".into(),
        at_ms: 10,
        seen_hello_ms: Some(0),
    };
    assert_eq!(s.apply(8, &late), Response::Rejected(Rejection::Stale));
    assert_eq!(s.nodes["n1"].status, NodeStatus::Ready);
    s.nodes.get_mut("n1").unwrap().status = NodeStatus::Down;
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
        may_add_tools: true,
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

#[test]
fn a_new_tool_name_from_an_untrusted_node_waits_for_an_admin() {
    let mut s = with_node();
    s.nodes
        .insert("n2".into(), NodeRecord::new("n2", Default::default(), 0));
    let hello = |node: &str, may_add_tools: bool| Command::NodeHello {
        node_id: node.into(),
        labels: Default::default(),
        servers: vec![OfferedServer {
            name: "x".into(),
            max_concurrency: 2,
            required_scope: "admin".into(),
            tools: vec![ToolDef {
                name: "exfiltrate".into(),
                description: String::new(),
                input_schema: json!({"type": "object"}),
                read_only: false,
                idempotent: false,
                destructive: true,
            }],
        }],
        at_ms: 1,
        tenants: vec![],
        cpu_high_water_percent: 0.0,
        may_add_tools,
    };
    s.apply(1, &hello("n1", false));
    assert!(!s.catalogue["exfiltrate"].accepted);
    assert!(s.nodes["n1"].servers[0].tools.is_empty());
    assert_eq!(s.nodes["n1"].servers[0].pending_tools, ["exfiltrate"]);
    assert!(!s.index.tool_nodes.contains_key("exfiltrate"));
    // A trusted node offering the same definition later does not make it usable either.
    s.apply(2, &hello("n2", true));
    assert!(!s.index.tool_nodes.contains_key("exfiltrate"));
    assert_eq!(
        s.apply(
            3,
            &Command::AcceptTool {
                name: "nope".into()
            }
        ),
        Response::Rejected(Rejection::NoSuchTool("nope".into()))
    );
    assert_eq!(
        s.apply(
            4,
            &Command::AcceptTool {
                name: "exfiltrate".into()
            }
        ),
        Response::Done
    );
    assert_eq!(s.index.tool_nodes["exfiltrate"].len(), 2);
    assert_eq!(s.nodes["n1"].servers[0].tools, ["exfiltrate"]);
    let mut rebuilt = s.clone();
    rebuilt.rebuild_index();
    assert_eq!(rebuilt.index, s.index);
}

/// A state with `nodes` ready nodes offering `echo`, and a log index counter.
struct Sm {
    s: State,
    ix: u64,
}

impl Sm {
    fn new(nodes: &[&str]) -> Self {
        let mut s = State::default();
        for n in nodes {
            s.nodes
                .insert(n.to_string(), NodeRecord::new(n, Default::default(), 0));
        }
        s.catalogue.insert(
            "echo".into(),
            CatalogueEntry {
                def: ToolDef {
                    name: "echo".into(),
                    description: String::new(),
                    input_schema: json!({"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}),
                    read_only: true,
                    idempotent: true,
                    destructive: false,
                },
                required_scope: "tools".into(),
                first_seen_node: "n".into(),
                first_seen_at_ms: 0,
                accepted: true,
            },
        );
        Self { s, ix: 0 }
    }

    fn apply(&mut self, c: Command) -> Response {
        self.ix += 1;
        self.s.apply(self.ix, &c)
    }

    fn submit(&mut self, id: &str, f: impl FnOnce(&mut TaskRecord)) {
        let mut t = TaskRecord::new(id, "echo", "t", "a", json!({"text": "x"}), 1);
        f(&mut t);
        self.apply(Command::SubmitTask(Box::new(t)));
    }

    /// Assigns and returns (attempt, fence).
    fn assign(&mut self, id: &str, node: &str, at_ms: i64) -> (u32, u64) {
        match self.apply(Command::AssignTask {
            task_id: id.into(),
            node_id: node.into(),
            server: "demo".into(),
            at_ms,
        }) {
            Response::Assigned { attempt, fence } => (attempt, fence),
            other => panic!("assign {id}: {other:?}"),
        }
    }

    fn finish(&mut self, id: &str, (attempt, fence): (u32, u64), text: &str, ok: bool) -> Response {
        self.apply(Command::FinishTask {
            task_id: id.into(),
            attempt,
            fence,
            at_ms: 10,
            result: Some(json!({"content": [{"type": "text", "text": text}], "isError": !ok})),
            error: None,
            node_id: String::new(),
            started_at_ms: None,
        })
    }

    fn status(&self, id: &str) -> TaskStatus {
        task_now(&self.s, id).status
    }

    /// The incrementally kept index equals one built from scratch.
    fn check_index(&self) {
        let mut fresh = self.s.clone();
        fresh.rebuild_index();
        assert_eq!(fresh.index, self.s.index);
    }
}

#[test]
fn a_retryable_failure_requeues_with_backoff_and_the_last_one_dead_letters() {
    let mut m = Sm::new(&["n1"]);
    m.submit("t", |t| {
        t.spec.retry = RetryPolicy {
            max_attempts: 2,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            retry_on: vec![FailureKind::ToolError],
        }
    });
    let a1 = m.assign("t", "n1", 2);
    assert_eq!(
        m.finish("t", a1, "bad", false),
        Response::TaskNow(TaskStatus::Queued)
    );
    let nb = task_now(&m.s, "t").not_before_ms.unwrap();
    assert!((60..=110).contains(&nb), "backoff ends at {nb}");
    assert!(!task_now(&m.s, "t").dead_lettered);
    let a2 = m.assign("t", "n1", 200);
    assert_eq!(
        m.finish("t", a2, "bad again", false),
        Response::TaskNow(TaskStatus::Failed)
    );
    assert!(task_now(&m.s, "t").dead_lettered);
    assert_eq!(m.s.tool_stats["echo"]["n1"].failed, 2);
    // isError is the tool's answer: the server's breaker is not charged for it.
    assert_eq!(
        m.s.breakers[&breaker_key("n1", "demo")].consecutive_failures,
        0
    );
    m.check_index();
}

#[test]
fn timeouts_are_checked_against_the_command_time_and_stop_the_node() {
    let mut m = Sm::new(&["n1"]);
    m.submit("q", |t| t.spec.deadlines.queue_timeout_ms = 50);
    let early = Command::TimeoutTask {
        task_id: "q".into(),
        kind: Timeout::Queue,
        attempt: 0,
        at_ms: 20,
        detail: String::new(),
    };
    assert_eq!(m.apply(early), Response::Rejected(Rejection::NotDue));
    let due = Command::TimeoutTask {
        task_id: "q".into(),
        kind: Timeout::Queue,
        attempt: 0,
        at_ms: 60,
        detail: "no node offers it".into(),
    };
    assert_eq!(m.apply(due), Response::TaskNow(TaskStatus::Failed));
    assert!(task_now(&m.s, "q")
        .error
        .as_deref()
        .unwrap()
        .contains("no node offers it"));

    m.submit("a", |t| {
        t.spec.deadlines.attempt_timeout_ms = 100;
        t.spec.retry.max_attempts = 2;
        t.spec.retry.retry_on = vec![FailureKind::Timeout];
    });
    let a1 = m.assign("a", "n1", 100);
    m.s.take_effects();
    let late = |attempt, at_ms| Command::TimeoutTask {
        task_id: "a".into(),
        kind: Timeout::Attempt,
        attempt,
        at_ms,
        detail: String::new(),
    };
    assert_eq!(m.apply(late(1, 150)), Response::Rejected(Rejection::NotDue));
    assert_eq!(m.apply(late(1, 200)), Response::TaskNow(TaskStatus::Queued));
    let fx = m.s.take_effects();
    assert_eq!(
        fx.stopped,
        vec![Stopped {
            task_id: "a".into(),
            node_id: "n1".into(),
            attempt: 1
        }]
    );
    // The timed-out attempt's late result is refused.
    assert!(matches!(
        m.finish("a", a1, "late", true),
        Response::Rejected(_)
    ));
    let _ = m.assign("a", "n1", 300);
    assert_eq!(m.apply(late(2, 400)), Response::TaskNow(TaskStatus::Failed));
    assert!(task_now(&m.s, "a").dead_lettered);
    assert_eq!(
        m.s.breakers[&breaker_key("n1", "demo")].consecutive_failures,
        2
    );

    m.submit("tot", |t| t.spec.deadlines.total_timeout_ms = 500);
    let _ = m.assign("tot", "n1", 2);
    let total = Command::TimeoutTask {
        task_id: "tot".into(),
        kind: Timeout::Total,
        attempt: 0,
        at_ms: 501,
        detail: String::new(),
    };
    assert_eq!(m.apply(total), Response::TaskNow(TaskStatus::Failed));
    m.check_index();
}

#[test]
fn majority_fan_out_wins_over_one_disagreeing_replica() {
    let mut m = Sm::new(&["n1", "n2", "n3"]);
    m.submit("f", |t| {
        t.spec.replicas = 3;
        t.spec.aggregation = Aggregation::Majority;
    });
    assert_eq!(
        task_now(&m.s, "f").group.as_ref().unwrap().replicas.len(),
        3
    );
    assert!(
        !m.s.index.queue["t"].iter().any(|k| k.2 == "f"),
        "the fan-out task itself is never placed"
    );
    let a0 = m.assign("f/r0", "n1", 2);
    assert_eq!(m.status("f"), TaskStatus::Running);
    let a1 = m.assign("f/r1", "n2", 2);
    let a2 = m.assign("f/r2", "n3", 2);
    m.finish("f/r0", a0, "42", true);
    m.finish("f/r1", a1, "41", true);
    assert_eq!(m.status("f"), TaskStatus::Running);
    m.s.take_effects();
    m.finish("f/r2", a2, "42", true);
    assert_eq!(m.status("f"), TaskStatus::Succeeded);
    assert_eq!(
        fanout::vote_of(task_now(&m.s, "f").result.as_ref().unwrap()),
        fanout::vote_of(&json!({"content": [{"type": "text", "text": "42"}]}))
    );
    m.check_index();
}

#[test]
fn first_fan_out_cancels_the_rest_and_quorum_fails_when_it_cannot_be_reached() {
    let mut m = Sm::new(&["n1", "n2", "n3"]);
    m.submit("f", |t| {
        t.spec.replicas = 3;
        t.spec.aggregation = Aggregation::First;
    });
    let a0 = m.assign("f/r0", "n1", 2);
    let _ = m.assign("f/r1", "n2", 2);
    m.s.take_effects();
    m.finish("f/r0", a0, "fast", true);
    assert_eq!(m.status("f"), TaskStatus::Succeeded);
    assert_eq!(m.status("f/r1"), TaskStatus::Cancelled);
    assert_eq!(m.status("f/r2"), TaskStatus::Cancelled);
    let fx = m.s.take_effects();
    assert_eq!(
        fx.stopped.len(),
        1,
        "only the running replica needs a cancel: {:?}",
        fx.stopped
    );
    assert_eq!(fx.stopped[0].task_id, "f/r1");

    m.submit("q", |t| {
        t.spec.replicas = 3;
        t.spec.aggregation = Aggregation::Quorum(3);
    });
    let b0 = m.assign("q/r0", "n1", 2);
    let b1 = m.assign("q/r1", "n2", 2);
    m.finish("q/r0", b0, "1", true);
    m.finish("q/r1", b1, "2", true);
    assert_eq!(m.status("q"), TaskStatus::Failed);
    assert!(task_now(&m.s, "q")
        .error
        .as_deref()
        .unwrap()
        .contains("quorum(3)"));
    assert_eq!(m.status("q/r2"), TaskStatus::Cancelled);

    // Cancelling a fan-out task cancels its replicas.
    m.submit("c", |t| t.spec.replicas = 2);
    let _ = m.assign("c/r0", "n1", 2);
    m.apply(Command::CancelTask {
        task_id: "c".into(),
        at_ms: 5,
    });
    assert_eq!(m.status("c"), TaskStatus::Cancelled);
    assert_eq!(m.status("c/r0"), TaskStatus::Cancelled);
    m.check_index();
}

fn workflow(steps: Vec<StepRecord>, policy: FailurePolicy) -> Command {
    Command::SubmitWorkflow(Box::new(WorkflowRecord {
        id: "w".into(),
        name: "test".into(),
        tenant: "t".into(),
        agent: "a".into(),
        scopes: vec!["tools".into()],
        failure_policy: policy,
        status: WorkflowStatus::Running,
        steps,
        created_at_ms: 1,
        updated_at_ms: 1,
        error: None,
        idempotency_key: None,
        seq: 0,
        ended_seq: None,
        trace: None,
    }))
}

fn step(name: &str, deps: &[&str], args: serde_json::Value) -> StepRecord {
    StepRecord::new(
        name,
        "echo",
        args,
        deps.iter().map(|d| d.to_string()).collect(),
    )
}

#[test]
fn a_workflow_runs_a_parallel_phase_and_hands_results_on() {
    let mut m = Sm::new(&["n1", "n2"]);
    m.apply(workflow(
        vec![
            step("a", &[], json!({"text": "seed"})),
            step("b", &["a"], json!({"text": "b got ${steps.a.text}"})),
            step("c", &["a"], json!({"text": "c got ${steps.a.text}"})),
            step(
                "d",
                &["b", "c"],
                json!({"text": "${steps.b.text} + ${steps.c.text}"}),
            ),
        ],
        FailurePolicy::FailFast,
    ));
    assert_eq!(workflow_now(&m.s, "w").steps[0].state, StepState::Queued);
    assert!(!m.s.tasks.contains_key("w.b"));
    let a = m.assign("w.a", "n1", 2);
    m.finish("w.a", a, "seed-out", true);
    // b and c start together: a parallel phase.
    assert_eq!(
        task_now(&m.s, "w.b").arguments,
        json!({"text": "b got seed-out"})
    );
    assert_eq!(
        task_now(&m.s, "w.c").arguments,
        json!({"text": "c got seed-out"})
    );
    let b = m.assign("w.b", "n1", 3);
    let c = m.assign("w.c", "n2", 3);
    m.finish("w.c", c, "C", true);
    assert!(!m.s.tasks.contains_key("w.d"));
    m.finish("w.b", b, "B", true);
    assert_eq!(task_now(&m.s, "w.d").arguments, json!({"text": "B + C"}));
    let d = m.assign("w.d", "n1", 4);
    m.finish("w.d", d, "done", true);
    let w = &workflow_now(&m.s, "w");
    assert_eq!(w.status, WorkflowStatus::Succeeded);
    assert!(w.ended_seq.unwrap() > w.steps.iter().map(|s| s.seq).max().unwrap());
    m.check_index();
}

#[test]
fn fail_fast_cancels_running_steps_and_continue_only_skips_dependents() {
    let mut m = Sm::new(&["n1", "n2"]);
    m.apply(workflow(
        vec![
            step("a", &[], json!({"text": "1"})),
            step("b", &[], json!({"text": "2"})),
            step("c", &["a"], json!({"text": "3"})),
        ],
        FailurePolicy::FailFast,
    ));
    let a = m.assign("w.a", "n1", 2);
    let _ = m.assign("w.b", "n2", 2);
    m.s.take_effects();
    m.finish("w.a", a, "broken", false);
    let w = &workflow_now(&m.s, "w");
    assert_eq!(w.status, WorkflowStatus::Failed);
    let states: Vec<StepState> = w.steps.iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        [StepState::Failed, StepState::Cancelled, StepState::Skipped]
    );
    let fx = m.s.take_effects();
    assert!(
        fx.stopped.iter().any(|s| s.task_id == "w.b"),
        "{:?}",
        fx.stopped
    );

    let mut m = Sm::new(&["n1", "n2"]);
    m.apply(workflow(
        vec![
            step("a", &[], json!({"text": "1"})),
            step("b", &[], json!({"text": "2"})),
            step("c", &["a"], json!({"text": "3"})),
            // Resolved arguments that break the schema fail the step, not the hub.
            step("d", &["b"], json!({"text": "${steps.b.structured}"})),
        ],
        FailurePolicy::Continue,
    ));
    let a = m.assign("w.a", "n1", 2);
    let b = m.assign("w.b", "n2", 2);
    m.finish("w.a", a, "broken", false);
    assert_eq!(workflow_now(&m.s, "w").status, WorkflowStatus::Running);
    assert_eq!(workflow_now(&m.s, "w").steps[2].state, StepState::Skipped);
    m.finish("w.b", b, "{\"not\": \"text\"}", true);
    let w = &workflow_now(&m.s, "w");
    assert_eq!(w.steps[1].state, StepState::Succeeded);
    assert_eq!(w.steps[3].state, StepState::Failed);
    assert!(
        w.steps[3].error.as_deref().unwrap().contains("schema"),
        "{:?}",
        w.steps[3].error
    );
    assert_eq!(w.status, WorkflowStatus::Failed);
    m.check_index();
}

#[test]
fn cancel_all_of_a_tenant_reaches_workflows_and_fan_outs() {
    let mut m = Sm::new(&["n1", "n2"]);
    m.apply(workflow(
        vec![
            step("a", &[], json!({"text": "1"})),
            step("b", &["a"], json!({"text": "2"})),
        ],
        FailurePolicy::FailFast,
    ));
    m.submit("f", |t| t.spec.replicas = 2);
    let _ = m.assign("f/r0", "n1", 2);
    let r = m.apply(Command::CancelTenantTasks {
        tenant: "t".into(),
        at_ms: 9,
    });
    let Response::TasksCancelled(ids) = r else {
        panic!("{r:?}")
    };
    assert!(ids.contains(&"f".to_string()));
    assert_eq!(workflow_now(&m.s, "w").status, WorkflowStatus::Cancelled);
    assert_eq!(m.status("f"), TaskStatus::Cancelled);
    assert!(m.s.index.open.is_empty(), "{:?}", m.s.index.open);
    m.check_index();
}

#[test]
fn a_requeued_task_counts_its_queue_timeout_from_its_return_and_requeues_are_not_tries() {
    let mut m = Sm::new(&["n1"]);
    m.submit("t", |t| {
        t.spec.deadlines.queue_timeout_ms = 100;
        t.spec.retry = RetryPolicy {
            max_attempts: 2,
            initial_backoff_ms: 50,
            max_backoff_ms: 50,
            retry_on: vec![FailureKind::ToolError],
        };
    });
    // Taken back before it reached the node: not a try.
    let (attempt, fence) = m.assign("t", "n1", 5);
    m.apply(Command::RequeueTask {
        task_id: "t".into(),
        attempt,
        fence,
        at_ms: 6,
        reason: "gone".into(),
    });
    assert_eq!(task_now(&m.s, "t").tries(), 0);
    let a = m.assign("t", "n1", 7);
    // Ran long, then failed at 1000: back in the queue after its backoff.
    m.apply(Command::FinishTask {
        task_id: "t".into(),
        attempt: a.0,
        fence: a.1,
        at_ms: 1000,
        result: None,
        error: Some("boom".into()),
        node_id: String::new(),
        started_at_ms: None,
    });
    assert_eq!(m.status("t"), TaskStatus::Queued);
    let due = task_now(&m.s, "t").queue_deadline_ms().unwrap();
    assert!(
        due >= 1000 + 100,
        "the queue timeout counts from the requeue: {due}"
    );
    let early = Command::TimeoutTask {
        task_id: "t".into(),
        kind: Timeout::Queue,
        attempt: 0,
        at_ms: 1010,
        detail: String::new(),
    };
    assert_eq!(m.apply(early), Response::Rejected(Rejection::NotDue));
    m.check_index();
}

/// A run that archives, deduplicates through the history store, expires, and reuses an
/// expired key: (commands, the index each is committed at).
fn history_run() -> Vec<Command> {
    let finish_at = |id: &str, fence: u64, at_ms: i64| Command::FinishTask {
        task_id: id.into(),
        attempt: 1,
        fence,
        at_ms,
        result: Some(json!({"content": [], "isError": false})),
        error: None,
        node_id: "n1".into(),
        started_at_ms: None,
    };
    vec![
        task("t1", Some("k")), // 1
        assign("t1"),          // 2
        finish_at("t1", 2, 3), // 3: t1 archived
        task("t2", Some("k")), // 4: deduplicated to t1 (from the store)
        task("t1", None),      // 5: the same id again: deduplicated
        Command::ExpireHistory {
            through_ms: 3,
            through_entry: None,
            at_ms: 100,
        }, // 6: t1 expires
        task("t3", Some("k")), // 7: the key is free again: t3
        assign("t3"),          // 8
        Command::CancelTask {
            task_id: "t1".into(),
            at_ms: 9,
        }, // 9: no such task any more
        finish_at("t3", 8, 200), // 10: t3 archived
        task("t4", Some("k")), // 11: deduplicated to t3
        Command::Batch(vec![
            task("t5", None),
            task("t6", Some("k")),
            Command::ExpireHistory {
                through_ms: 1_000,
                through_entry: None,
                at_ms: 300,
            },
        ]), // 12: t5 new, t6 deduplicated to t3, the expiry refused inside a batch
    ]
}

fn run_from(s: &mut State, cmds: &[Command], after: usize) -> Vec<Response> {
    cmds.iter()
        .enumerate()
        .skip(after)
        .map(|(i, c)| s.apply(i as u64 + 1, c))
        .collect()
}

fn dump(h: &History) -> Vec<u8> {
    let mut out = Vec::new();
    h.dump_to(&mut out).unwrap();
    out
}

#[test]
fn finished_tasks_move_to_the_history_store_and_expire_deterministically() {
    let cmds = history_run();
    let mut a = with_node();
    let responses = run_from(&mut a, &cmds, 0);
    assert!(!a.tasks.contains_key("t1") && !a.tasks.contains_key("t3"));
    assert!(
        a.idempotency.is_empty(),
        "keys of finished tasks live in the store"
    );
    assert_eq!(
        responses[3],
        Response::Submitted {
            task_id: "t1".into(),
            deduplicated: true
        }
    );
    assert_eq!(
        responses[4],
        Response::Submitted {
            task_id: "t1".into(),
            deduplicated: true
        }
    );
    assert_eq!(
        responses[6],
        Response::Submitted {
            task_id: "t3".into(),
            deduplicated: false
        }
    );
    assert_eq!(
        responses[8],
        Response::Rejected(Rejection::NoSuchTask("t1".into()))
    );
    assert_eq!(
        responses[10],
        Response::Submitted {
            task_id: "t3".into(),
            deduplicated: true
        }
    );
    assert_eq!(
        responses[11],
        Response::Batch(vec![
            Response::Submitted {
                task_id: "t5".into(),
                deduplicated: false
            },
            Response::Submitted {
                task_id: "t3".into(),
                deduplicated: true
            },
            Response::Rejected(Rejection::NotBatchable),
        ])
    );
    assert!(matches!(a.find_task("t1").unwrap(), Lookup::Expired { .. }));
    assert_eq!(task_now(&a, "t3").status, TaskStatus::Succeeded);
    assert_eq!(a.history.len(), 1);

    // Another state machine applying the same entries has the same store.
    let mut b = with_node();
    assert_eq!(run_from(&mut b, &cmds, 0), responses);
    assert_eq!(dump(&a.history), dump(&b.history));

    // Tombstones a durable snapshot covers are purged; the record is simply gone.
    a.history.purge(6).unwrap();
    assert_eq!(a.find_task("t1").unwrap(), Lookup::Missing);
}

#[test]
fn replay_over_a_history_store_that_is_ahead_gives_the_same_answers() {
    // A hub restarts from a snapshot at index `s` while its store already holds what was
    // archived (and expired) after `s`: replaying the rest must decide exactly as before.
    let cmds = history_run();
    let mut first = with_node();
    let responses = run_from(&mut first, &cmds, 0);
    for s in 0..cmds.len() {
        let mut live = with_node();
        run_from(&mut live, &cmds[..s], 0);
        let json = serde_json::to_vec(&live).unwrap();

        let mut ahead = with_node();
        run_from(&mut ahead, &cmds, 0);
        // What a snapshot at `s` lets the hub purge is gone.
        ahead.history.purge(s as u64).unwrap();
        let mut restarted: State = serde_json::from_slice(&json).unwrap();
        restarted.history = ahead.history.clone();
        restarted.rebuild_index();
        assert_eq!(
            run_from(&mut restarted, &cmds, s),
            responses[s..].to_vec(),
            "replay from snapshot at {s}"
        );
        let mut end = with_node();
        run_from(&mut end, &cmds, 0);
        end.history.purge(s as u64).unwrap();
        assert_eq!(
            dump(&restarted.history),
            dump(&end.history),
            "store after replay from {s}"
        );
        assert_eq!(restarted.tasks, first.tasks);
    }
}

#[test]
fn retention_expires_by_age_and_beyond_the_count_oldest_first() {
    let h = History::default();
    let mut recs = Vec::new();
    for i in 0..10 {
        let mut t = TaskRecord::new(&format!("t{i}"), "echo", "t", "a", json!({}), i);
        t.status = TaskStatus::Succeeded;
        t.updated_at_ms = 1_000 * i;
        recs.push(t);
    }
    h.archive(1, &recs, &[]).unwrap();
    assert_eq!(h.len(), 10);
    // Nothing is a minute old at 10 s.
    assert_eq!(h.expiry_due(10_000, 60_000, 0).unwrap(), None);
    // Older than 5 s at 10 s: ended at 0..=5 s.
    assert_eq!(
        h.expiry_due(10_000, 5_000, 0).unwrap(),
        Some((5_000, "tt5".to_owned()))
    );
    // At most 7 kept: the 3 oldest.
    let (ms, entry) = h.expiry_due(10_000, 60_000, 7).unwrap().unwrap();
    assert_eq!((ms, entry.as_str()), (2_000, "tt2"));
    assert_eq!(h.expire(2, &History::cut(ms, Some(&entry))).unwrap(), 3);
    assert_eq!(h.len(), 7);
    assert!(matches!(h.task("t2").unwrap(), Lookup::Expired { .. }));
    assert!(matches!(h.task("t3").unwrap(), Lookup::Found(_)));
    let listed = h.list("t", false, 100, |_| true).unwrap();
    let ids: Vec<&str> = listed.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["t9", "t8", "t7", "t6", "t5", "t4", "t3"]);
    // Expiring is idempotent, and a replay of the same expiry changes nothing.
    assert_eq!(h.expire(3, &History::cut(2_000, None)).unwrap(), 0);
    assert_eq!(h.expire(2, &History::cut(ms, Some(&entry))).unwrap(), 0);
    assert_eq!(h.len(), 7);
}

#[test]
fn a_batch_applies_each_command_in_order_as_if_alone() {
    let mut s = with_node();
    let r = s.apply(
        1,
        &Command::Batch(vec![
            task("t1", Some("k")),
            task("t2", Some("k")),
            task("t3", None),
            Command::Batch(vec![task("t4", None)]),
        ]),
    );
    assert_eq!(
        r,
        Response::Batch(vec![
            Response::Submitted {
                task_id: "t1".into(),
                deduplicated: false
            },
            // The second command sees the first one's effect.
            Response::Submitted {
                task_id: "t1".into(),
                deduplicated: true
            },
            Response::Submitted {
                task_id: "t3".into(),
                deduplicated: false
            },
            Response::Rejected(Rejection::NotBatchable),
        ])
    );
    assert!(!s.tasks.contains_key("t4"));
    // Assignments in one entry share its index as their fence; each task has its own.
    let r = s.apply(2, &Command::Batch(vec![assign("t1"), assign("t3")]));
    let fence = Response::Assigned {
        attempt: 1,
        fence: 2,
    };
    assert_eq!(r, Response::Batch(vec![fence.clone(), fence]));
    let r = s.apply(
        3,
        &Command::Batch(vec![finish("t1", 1, 2), finish("t3", 1, 2)]),
    );
    let done = Response::TaskNow(TaskStatus::Succeeded);
    assert_eq!(r, Response::Batch(vec![done.clone(), done]));
    assert_eq!(task_now(&s, "t1").status, TaskStatus::Succeeded);
    assert_eq!(task_now(&s, "t3").status, TaskStatus::Succeeded);
    assert!(s.tasks.is_empty());
}

#[test]
fn a_task_record_leaves_its_defaults_out_and_reads_back_the_same() {
    let mut s = with_node();
    s.apply(1, &task("t1", None));
    s.apply(2, &assign("t1"));
    s.apply(3, &finish("t1", 1, 2));
    let done = task_now(&s, "t1");
    let json = serde_json::to_value(&done).unwrap();
    let fields: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    for absent in [
        "error",
        "priority",
        "idempotency_key",
        "spec",
        "scopes",
        "dead_lettered",
        "group",
        "parent",
        "workflow",
    ] {
        assert!(!fields.contains(&absent), "{absent} in {json}");
    }
    let back: TaskRecord = serde_json::from_value(json).unwrap();
    assert_eq!(back, done);

    // A record written with every field spelled out (as hubs did before) reads the same.
    let mut full = serde_json::to_value(&done).unwrap();
    let obj = full.as_object_mut().unwrap();
    for (k, v) in [
        ("error", json!(null)),
        ("priority", json!(0)),
        ("idempotency_key", json!(null)),
        ("scopes", json!([])),
        ("not_before_ms", json!(null)),
        ("queued_at_ms", json!(null)),
        ("dead_lettered", json!(false)),
        ("group", json!(null)),
        ("parent", json!(null)),
        ("workflow", json!(null)),
        (
            "spec",
            json!({"placement":{"region":null,"zone":null,"required":{},"preferred":{}},
                   "retry":{"max_attempts":1,"initial_backoff_ms":500,"max_backoff_ms":30000,"retry_on":[]},
                   "deadlines":{"queue_timeout_ms":0,"attempt_timeout_ms":0,"total_timeout_ms":0},
                   "replicas":0,"aggregation":"all"}),
        ),
    ] {
        obj.insert(k.into(), v);
    }
    let old: TaskRecord = serde_json::from_value(full).unwrap();
    assert_eq!(old, done);
}

#[test]
fn an_attempt_its_node_lost_in_a_restart_ends_lost_unless_the_policy_covers_node_loss() {
    let mut s = with_node();
    s.nodes
        .insert("n2".into(), NodeRecord::new("n2", Default::default(), 0));
    let mut retried = task("retried", None);
    if let Command::SubmitTask(t) = &mut retried {
        t.spec.retry = RetryPolicy {
            max_attempts: 2,
            retry_on: vec![FailureKind::NodeLost],
            ..Default::default()
        };
    }
    s.apply(1, &task("t1", None));
    s.apply(2, &retried);
    s.apply(3, &assign("t1"));
    s.apply(4, &assign("retried"));
    let fence = |s: &State, id: &str| task_now(s, id).current_attempt().unwrap().fence;
    for (i, id) in ["t1", "retried"].into_iter().enumerate() {
        let start = Command::StartTask {
            task_id: id.into(),
            attempt: 1,
            fence: fence(&s, id),
            at_ms: 4,
            node_id: "n1".into(),
        };
        s.apply(40 + i as u64, &start);
    }
    let lose = |id: &str, node: &str, fence: u64| Command::LoseTask {
        task_id: id.into(),
        attempt: 1,
        fence,
        at_ms: 5,
        node_id: node.into(),
        reason: "node restarted".into(),
    };
    let (f1, f2) = (fence(&s, "t1"), fence(&s, "retried"));
    // Only the node holding the attempt, with its fence, may say it lost it.
    assert_eq!(
        s.apply(5, &lose("t1", "n2", f1)),
        Response::Rejected(Rejection::NotYourAttempt)
    );
    assert!(matches!(
        s.apply(6, &lose("t1", "n1", f1 + 100)),
        Response::Rejected(_)
    ));
    assert_eq!(task_now(&s, "t1").status, TaskStatus::Running);
    assert_eq!(
        s.apply(7, &lose("t1", "n1", f1)),
        Response::TaskNow(TaskStatus::Lost)
    );
    let t = task_now(&s, "t1");
    assert!(t.dead_lettered);
    assert_eq!(t.error.as_deref(), Some("node restarted"));
    assert_eq!(t.attempts[0].error.as_deref(), Some("node restarted"));
    // Said again (the node's delete was lost to a crash): refused, nothing changes.
    assert!(matches!(
        s.apply(8, &lose("t1", "n1", f1)),
        Response::Rejected(_)
    ));
    // A policy that covers node loss runs it again.
    assert_eq!(
        s.apply(9, &lose("retried", "n1", f2)),
        Response::TaskNow(TaskStatus::Queued)
    );
    // An attempt whose start the log never took never ran: back to the queue, whatever
    // the policy, and not counted as a try.
    s.apply(10, &task("unstarted", None));
    s.apply(11, &assign("unstarted"));
    let f3 = fence(&s, "unstarted");
    assert_eq!(
        s.apply(12, &lose("unstarted", "n1", f3)),
        Response::TaskNow(TaskStatus::Queued)
    );
    let t = task_now(&s, "unstarted");
    assert!(t.attempts[0].requeued && !t.dead_lettered, "{t:?}");
}

#[test]
fn a_commands_level_is_its_newest_part_and_the_clusters_level_never_goes_down() {
    let role = Command::SetRole {
        name: "r".into(),
        scopes: vec![],
    };
    assert_eq!(role.level(), 2);
    let audited = Command::Audited {
        by: "ops".into(),
        at_ms: 1,
        cmd: Box::new(role.clone()),
    };
    assert_eq!(audited.level(), 2, "wrapped, it needs what it wraps");
    assert_eq!(Command::SetSchedulingPaused(true).level(), 1);
    assert_eq!(
        Command::Batch(vec![Command::SetSchedulingPaused(true), audited]).level(),
        2
    );

    let mut s = State::default();
    assert_eq!(s.cluster_level, 0);
    s.apply(1, &Command::SetClusterLevel { level: 2 });
    s.apply(2, &Command::SetClusterLevel { level: 1 });
    assert_eq!(s.cluster_level, 2, "a level is never lowered");
}
