//! Placement and execution with several real nodes: placement follows locality, labels,
//! tenants and load; a crashing MCP server opens its breaker; deadlines and retries play
//! out and reach the MCP server; fan-out aggregates disagreeing replicas; a workflow runs a
//! parallel phase and hands results on.

use flotilla_proto as pb;
use flotilla_tests::{
    demo_server, result_text, step, submit, wait_pending, wait_state, wait_until, Agent, Cluster,
    NodeSpec, READY,
};
use serde_json::json;

fn with(tool: &str, args: serde_json::Value, options: pb::TaskOptions) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        options: Some(options),
        ..submit(tool, args)
    }
}

fn place(f: impl FnOnce(&mut pb::PlacementConstraints)) -> pb::TaskOptions {
    let mut p = pb::PlacementConstraints::default();
    f(&mut p);
    pb::TaskOptions {
        placement: Some(p),
        ..Default::default()
    }
}

async fn run(
    c: &Cluster,
    agent: &mut Agent,
    req: pb::SubmitTaskRequest,
) -> anyhow::Result<pb::Task> {
    let id = agent.submit_task(req).await?.into_inner().task_id;
    c.wait_task(agent, &id).await
}

fn node_of(t: &pb::Task) -> &str {
    t.attempts.last().map(|a| a.node_id.as_str()).unwrap_or("")
}

fn zone_node(name: &str, zone: &str) -> NodeSpec {
    let mut n = NodeSpec::demo(name)
        .label("zone", zone)
        .label("region", "eu");
    n.servers = vec![demo_server("demo", 4)];
    n
}

#[tokio::test]
async fn placement_follows_locality_labels_tenants_and_load() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(zone_node("node-a", "a")).await?;
    c.add_node(zone_node("node-b", "b").label("gpu", "yes"))
        .await?;
    let mut other = zone_node("node-c", "c");
    other.tenants = vec!["other".into()];
    c.add_node(other).await?;
    let mut agent = c.agent();

    // Locality: the task's zone wins.
    let t = run(
        &c,
        &mut agent,
        with("echo", json!({"text": "b"}), place(|p| p.zone = "b".into())),
    )
    .await?;
    assert_eq!(node_of(&t), "node-b");
    // A required label.
    let t = run(
        &c,
        &mut agent,
        with(
            "echo",
            json!({"text": "g"}),
            place(|p| {
                p.required_labels.insert("gpu".into(), "yes".into());
            }),
        ),
    )
    .await?;
    assert_eq!(node_of(&t), "node-b");
    // A node serving another tenant is never used, even when it is the preferred zone.
    for i in 0..6 {
        let t = run(
            &c,
            &mut agent,
            with(
                "echo",
                json!({"text": format!("{i}")}),
                place(|p| p.zone = "c".into()),
            ),
        )
        .await?;
        assert_ne!(node_of(&t), "node-c");
    }
    let id = agent
        .submit_task(with(
            "echo",
            json!({"text": "c"}),
            place(|p| {
                p.required_labels.insert("zone".into(), "c".into());
            }),
        ))
        .await?
        .into_inner()
        .task_id;
    let waiting = wait_pending(&agent, &id).await?;
    assert!(
        waiting.pending_reason.contains("tenant"),
        "{}",
        waiting.pending_reason
    );
    agent
        .cancel_task(pb::CancelTaskRequest { task_id: id })
        .await?;

    // Load: with two long calls on node-a, the next call goes to the emptier node-b...
    let mut sleeps = Vec::new();
    for _ in 0..2 {
        let req = with(
            "sleep",
            json!({"ms": 60_000}),
            place(|p| {
                p.required_labels.insert("zone".into(), "a".into());
            }),
        );
        let id = agent.submit_task(req).await?.into_inner().task_id;
        wait_state(&agent, &id, pb::TaskState::Running).await?;
        sleeps.push(id);
    }
    let t = run(&c, &mut agent, submit("echo", json!({"text": "free"}))).await?;
    assert_eq!(node_of(&t), "node-b");
    // ...unless the agent's token says it sits in zone a: locality outweighs half a node.
    let token = c
        .admin()
        .issue_agent_token(pb::IssueAgentTokenRequest {
            subject: "local".into(),
            tenant: "default".into(),
            scopes: vec!["tools".into()],
            ttl_seconds: 600,
            zone: "a".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .token;
    let mut local = c.agent_with(&token);
    let t = run(&c, &mut local, submit("echo", json!({"text": "near"}))).await?;
    assert_eq!(node_of(&t), "node-a");
    for id in sleeps {
        agent
            .cancel_task(pb::CancelTaskRequest { task_id: id })
            .await?;
    }
    Ok(())
}

async fn breaker_of(c: &Cluster, node: &str) -> anyhow::Result<String> {
    let nodes = c
        .admin()
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    Ok(nodes
        .iter()
        .find(|n| n.id == node)
        .and_then(|n| n.servers.first())
        .map(|s| s.breaker.clone())
        .unwrap_or_default())
}

#[tokio::test]
async fn a_crashing_server_opens_its_breaker_and_work_goes_elsewhere() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(zone_node("flaky", "x")).await?;
    c.add_node(zone_node("steady", "y")).await?;
    let mut agent = c.agent();
    let on_flaky = || {
        place(|p| {
            p.required_labels.insert("zone".into(), "x".into());
        })
    };
    // Three crashes in a row (the hub's threshold): each fails, the server is restarted.
    for _ in 0..3 {
        wait_until("flaky's server to be ready", READY, || async {
            let nodes = c
                .admin()
                .list_nodes(pb::ListNodesRequest {})
                .await
                .ok()?
                .into_inner()
                .nodes;
            let s = nodes
                .iter()
                .find(|n| n.id == "flaky")?
                .servers
                .first()?
                .clone();
            (s.state == "ready" && s.breaker != "open").then_some(())
        })
        .await?;
        let t = run(&c, &mut agent, with("crash", json!({}), on_flaky())).await?;
        assert_eq!(t.state, pb::TaskState::Failed as i32, "{t:?}");
    }
    assert_eq!(breaker_of(&c, "flaky").await?, "open");
    // While open, even a call that prefers flaky's zone runs on steady.
    let t = run(
        &c,
        &mut agent,
        with("echo", json!({"text": "x"}), place(|p| p.zone = "x".into())),
    )
    .await?;
    assert_eq!(node_of(&t), "steady");
    // A call that can only run there waits, saying why.
    let id = agent
        .submit_task(with("echo", json!({"text": "only flaky"}), on_flaky()))
        .await?
        .into_inner()
        .task_id;
    // After the cooldown one trial goes through (half-open); its success closes the breaker.
    let t = c.wait_task(&mut agent, &id).await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    assert_eq!(node_of(&t), "flaky");
    assert_eq!(breaker_of(&c, "flaky").await?, "closed");
    Ok(())
}

#[tokio::test]
async fn deadlines_retries_and_dead_letters() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(zone_node("edge", "a")).await?;
    let mut agent = c.agent();

    // An attempt timeout ends the call and the cancel reaches the MCP server.
    let opts = pb::TaskOptions {
        deadlines: Some(pb::Deadlines {
            attempt_timeout_ms: 700,
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = run(
        &c,
        &mut agent,
        with("sleep", json!({"ms": 30_000, "steps": 300}), opts),
    )
    .await?;
    assert_eq!(t.state, pb::TaskState::Failed as i32);
    assert!(t.error.contains("timed out after 700 ms"), "{}", t.error);
    assert!(t.dead_lettered);
    let log = c.node_dir("edge").join("node.log");
    wait_until("the server to see the cancel", READY, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("sleep cancelled at step").then_some(()) }
    })
    .await?;

    // A queue timeout: nothing matches, so it fails with the reason it waited.
    let mut opts = place(|p| {
        p.required_labels.insert("zone".into(), "nowhere".into());
    });
    opts.deadlines = Some(pb::Deadlines {
        queue_timeout_ms: 500,
        ..Default::default()
    });
    let t = run(&c, &mut agent, with("echo", json!({"text": "late"}), opts)).await?;
    assert_eq!(t.state, pb::TaskState::Failed as i32);
    assert!(t.error.contains("queue timeout of 500 ms"), "{}", t.error);
    assert!(t.error.contains("labels"), "{}", t.error);

    // Retries on tool errors with backoff, then a dead letter.
    let opts = pb::TaskOptions {
        retry: Some(pb::RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 50,
            retry_on: vec![pb::FailureKind::ToolError as i32],
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = run(
        &c,
        &mut agent,
        with("fail", json!({"message": "nope"}), opts),
    )
    .await?;
    assert_eq!(t.state, pb::TaskState::Failed as i32);
    assert_eq!(t.attempts.len(), 3, "{:?}", t.attempts);
    assert!(t.dead_lettered);
    let dead = agent
        .list_tasks(pb::ListTasksRequest {
            dead_lettered: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .tasks;
    assert!(dead.iter().any(|d| d.id == t.id));
    assert!(dead.iter().all(|d| d.dead_lettered));
    // A bad policy is refused with a precise error.
    let bad = pb::TaskOptions {
        retry: Some(pb::RetryPolicy {
            max_attempts: 3,
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = agent
        .submit_task(with("echo", json!({"text": "x"}), bad))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("retry_on"), "{}", e.message());
    let huge = pb::TaskOptions {
        deadlines: Some(pb::Deadlines {
            queue_timeout_ms: u64::MAX,
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = agent
        .submit_task(with("echo", json!({"text": "x"}), huge))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("30 days"), "{}", e.message());
    Ok(())
}

#[tokio::test]
async fn fan_out_majority_outvotes_a_disagreeing_replica() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    for (name, vote) in [("v1", "yes"), ("v2", "yes"), ("v3", "no")] {
        let mut n = zone_node(name, name);
        n.servers[0]
            .env
            .insert("FLOTILLA_DEMO_VOTE".into(), vote.into());
        c.add_node(n).await?;
    }
    let mut agent = c.agent();
    let opts = pb::TaskOptions {
        replicas: 3,
        aggregation: pb::Aggregation::Majority as i32,
        ..Default::default()
    };
    let t = run(&c, &mut agent, with("vote", json!({}), opts.clone())).await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    assert_eq!(result_text(&t), "yes");
    assert_eq!(t.replicas.len(), 3);
    let mut nodes: Vec<&str> = t.replicas.iter().map(|r| r.node_id.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["v1", "v2", "v3"], "replicas run on distinct nodes");
    for r in &t.replicas {
        assert_eq!(r.agreed, r.node_id != "v3", "{r:?}");
    }
    // Three identical answers cannot be had: quorum(3) fails, saying so.
    let q = pb::TaskOptions {
        aggregation: pb::Aggregation::Quorum as i32,
        quorum: 3,
        ..opts
    };
    let t = run(&c, &mut agent, with("vote", json!({}), q)).await?;
    assert_eq!(t.state, pb::TaskState::Failed as i32);
    assert!(t.error.contains("quorum(3)"), "{}", t.error);
    Ok(())
}

#[tokio::test]
async fn a_workflow_runs_a_parallel_phase_and_hands_results_on() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(zone_node("w1", "a")).await?;
    c.add_node(zone_node("w2", "b")).await?;
    let mut agent = c.agent();
    let req = pb::SubmitWorkflowRequest {
        name: "fan".into(),
        steps: vec![
            step("seed", "echo", &[], json!({"text": "abc"})),
            step(
                "left",
                "hash",
                &["seed"],
                json!({"data": "${steps.seed.structured.text}", "algorithm": "sha256"}),
            ),
            step("right", "sleep", &["seed"], json!({"ms": 300})),
            step(
                "join",
                "echo",
                &["left", "right"],
                json!({"text": "${steps.left.text} after ${steps.right.text}"}),
            ),
        ],
        failure_policy: pb::FailurePolicy::FailFast as i32,
        idempotency_key: "wf-1".into(),
    };
    let first = agent.submit_workflow(req.clone()).await?.into_inner();
    let again = agent.submit_workflow(req).await?.into_inner();
    assert!(again.deduplicated);
    assert_eq!(again.workflow_id, first.workflow_id);

    let mut events = agent
        .watch_workflow(pb::WatchWorkflowRequest {
            workflow_id: first.workflow_id.clone(),
            from_seq: 0,
        })
        .await?
        .into_inner();
    let mut seen = Vec::new();
    let mut last_seq = 0;
    while let Some(ev) = events.message().await? {
        assert!(ev.seq > last_seq, "events are numbered in order");
        last_seq = ev.seq;
        if ev.step.is_empty() {
            assert_eq!(
                ev.workflow_state,
                pb::WorkflowState::Succeeded as i32,
                "{ev:?}"
            );
            break;
        }
        seen.push((ev.step.clone(), ev.step_state));
    }
    let ok = pb::StepState::Succeeded as i32;
    for s in ["seed", "left", "right", "join"] {
        assert!(
            seen.contains(&(s.to_string(), ok)),
            "{s} not seen succeeding: {seen:?}"
        );
    }
    let w = agent
        .get_workflow(pb::GetWorkflowRequest {
            workflow_id: first.workflow_id.clone(),
        })
        .await?
        .into_inner();
    let join = w.steps.iter().find(|s| s.name == "join").expect("join");
    let args: serde_json::Value = serde_json::from_slice(&join.arguments)?;
    assert_eq!(
        args["text"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad after slept 300 ms in 5 steps"
    );
    // left and right ran at the same time: each started before the other ended.
    let task = |name: &str| {
        let id = w
            .steps
            .iter()
            .find(|s| s.name == name)
            .expect("step")
            .task_id
            .clone();
        let mut a = agent.clone();
        async move {
            a.get_task(pb::GetTaskRequest { task_id: id })
                .await
                .map(|r| r.into_inner())
        }
    };
    let (l, r) = (task("left").await?, task("right").await?);
    let (la, ra) = (&l.attempts[0], &r.attempts[0]);
    assert!(
        la.assigned_at_ms <= ra.finished_at_ms && ra.assigned_at_ms <= la.finished_at_ms,
        "{la:?} {ra:?}"
    );

    // A failing step fails the workflow fast; a dependent is skipped.
    let req = pb::SubmitWorkflowRequest {
        name: "broken".into(),
        steps: vec![
            step("bad", "fail", &[], json!({"message": "no"})),
            step("after", "echo", &["bad"], json!({"text": "never"})),
        ],
        ..Default::default()
    };
    let id = agent.submit_workflow(req).await?.into_inner().workflow_id;
    let w = wait_until("the workflow to fail", READY, || {
        let mut a = agent.clone();
        let id = id.clone();
        async move {
            let w = a
                .get_workflow(pb::GetWorkflowRequest { workflow_id: id })
                .await
                .ok()?
                .into_inner();
            (w.state == pb::WorkflowState::Failed as i32).then_some(w)
        }
    })
    .await?;
    assert_eq!(w.steps[1].state, pb::StepState::Skipped as i32);
    // A cycle is refused at submission.
    let e = agent
        .submit_workflow(pb::SubmitWorkflowRequest {
            steps: vec![
                step("x", "echo", &["y"], json!({"text": "1"})),
                step("y", "echo", &["x"], json!({"text": "2"})),
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("cycle"), "{}", e.message());
    Ok(())
}
