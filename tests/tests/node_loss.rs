//! A node killed mid-task: after its TTL the hub marks it down through Raft; a read-only
//! tool's task runs again on another node, a non-idempotent one ends `lost`.

use flotilla_proto as pb;
use flotilla_tests::{demo_server, result_text, submit, wait_state, Cluster, NodeSpec};
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
