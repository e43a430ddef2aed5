//! A node killed mid-task: after its TTL the hub marks it down through Raft; a read-only
//! tool's task runs again on another node, a non-idempotent one ends `lost`. A node
//! stopped with SIGTERM instead finishes what it runs and takes no new work.

use flotilla_proto as pb;
use flotilla_tests::{
    demo_server, result_text, submit, wait_state, wait_until, Cluster, NodeSpec, READY,
};
use serde_json::json;

fn node(c: &Cluster, name: &str) -> NodeSpec {
    let mut server = demo_server("demo", 4);
    let record = c.dir.path().join(format!("{name}.record"));
    server
        .env
        .insert("FLOTILLA_DEMO_RECORD".into(), record.display().to_string());
    NodeSpec {
        name: name.into(),
        labels: Default::default(),
        servers: vec![server],
        tenants: Vec::new(),
    }
}

/// The node running task `id`, once it runs.
async fn running_on(agent: &flotilla_tests::Agent, id: &str) -> anyhow::Result<String> {
    let t = wait_state(agent, id, pb::TaskState::Running).await?;
    Ok(t.attempts
        .last()
        .map(|a| a.node_id.clone())
        .unwrap_or_default())
}

#[tokio::test]
async fn a_lost_node_reruns_idempotent_work_elsewhere_and_loses_the_rest() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(node(&c, "edge-1")).await?;
    let mut agent = c.agent();

    // Two calls in flight on edge-1: a read-only, idempotent one and a non-idempotent one.
    let safe = agent
        .submit_task(submit("sleep", json!({"ms": 3000, "steps": 3})))
        .await?
        .into_inner()
        .task_id;
    let risky = agent
        .submit_task(submit("record", json!({"key": "k", "delay_ms": 60000})))
        .await?
        .into_inner()
        .task_id;
    assert_eq!(running_on(&agent, &safe).await?, "edge-1");
    assert_eq!(running_on(&agent, &risky).await?, "edge-1");

    // A second node joins; then edge-1 dies (kill -9).
    c.add_node(node(&c, "edge-2")).await?;
    c.nodes.remove("edge-1").expect("node").kill();

    let t = c.wait_task(&mut agent, &safe).await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    assert_eq!(t.attempts.len(), 2, "{:?}", t.attempts);
    assert_eq!(t.attempts[0].node_id, "edge-1");
    assert!(t.attempts[0].error.contains("lost"), "{:?}", t.attempts[0]);
    assert_eq!(
        t.attempts[1].node_id, "edge-2",
        "re-run on the surviving node"
    );
    assert_eq!(result_text(&t), "slept 3000 ms in 3 steps");

    let t = c.wait_task(&mut agent, &risky).await?;
    assert_eq!(t.state, pb::TaskState::Lost as i32, "{t:?}");
    assert!(t.error.contains("not marked idempotent"), "{}", t.error);
    assert_eq!(t.attempts.len(), 1, "a non-idempotent call is not re-run");

    let nodes = c
        .admin()
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    assert_eq!(
        nodes
            .iter()
            .find(|n| n.id == "edge-1")
            .expect("listed")
            .status,
        "down"
    );

    // The node comes back: ready again, and it takes work.
    c.add_node(node(&c, "edge-1")).await?;
    let nodes = c
        .admin()
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    assert_eq!(
        nodes
            .iter()
            .find(|n| n.id == "edge-1")
            .expect("listed")
            .status,
        "ready"
    );
    Ok(())
}

#[tokio::test]
async fn a_node_stopped_with_sigterm_finishes_its_calls_and_takes_no_new_work() -> anyhow::Result<()>
{
    let mut c = Cluster::start().await?;
    c.add_node(node(&c, "edge-1")).await?;
    let mut agent = c.agent();
    // A call that must not run twice, in flight on edge-1 for three seconds.
    let call = agent
        .submit_task(submit(
            "record",
            json!({"key": "in-flight", "delay_ms": 3000}),
        ))
        .await?
        .into_inner()
        .task_id;
    assert_eq!(running_on(&agent, &call).await?, "edge-1");
    c.add_node(node(&c, "edge-2")).await?;

    // Stopped as Kubernetes or systemd stop it.
    c.nodes["edge-1"].sigterm();
    c.wait_node("edge-1", "be seen stopping", |n| n.stopping)
        .await?;
    // New work goes elsewhere meanwhile...
    let t = c
        .call(&mut agent, "echo", json!({"text": "elsewhere"}))
        .await?;
    assert_eq!(
        t.attempts.last().map(|a| a.node_id.as_str()),
        Some("edge-2")
    );
    // ...and the call in flight completes where it ran, once, before the node exits.
    let t = c.wait_task(&mut agent, &call).await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    assert_eq!(result_text(&t), "recorded in-flight");
    assert_eq!(t.attempts.len(), 1, "{:?}", t.attempts);
    let record = c.dir.path().join("edge-1.record");
    assert_eq!(std::fs::read_to_string(record)?, "in-flight\n");
    let node = c.nodes.get_mut("edge-1").expect("edge-1");
    let status = wait_until("edge-1 to exit", READY, || {
        let st = node.exited();
        async move { st }
    })
    .await?;
    assert!(status.success(), "a graceful stop exits 0: {status:?}");
    assert!(node
        .log_text()
        .contains("every call finished and reported; stopping"));
    Ok(())
}
