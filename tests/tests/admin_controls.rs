//! Operator controls over real nodes: cordon and uncordon, drain with a deadline, pausing
//! scheduling, cancelling every task of a tenant.

use flotilla_proto as pb;
use flotilla_tests::{recording_node, result_text, submit, wait_pending, wait_state, Cluster};
use serde_json::json;

#[tokio::test]
async fn cordon_pause_and_cancel_all() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    let (one, _) = recording_node(&c, "edge-1");
    let (two, _) = recording_node(&c, "edge-2");
    c.add_node(one).await?;
    c.add_node(two).await?;
    let mut admin = c.admin();
    let mut agent = c.agent();

    // Cordoned: no new work goes to edge-1.
    let r = admin
        .cordon_node(pb::NodeRequest {
            node_id: "edge-1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(r.status, "cordoned");
    for i in 0..6 {
        let t = c
            .call(&mut agent, "echo", json!({"text": format!("{i}")}))
            .await?;
        assert_eq!(t.attempts[0].node_id, "edge-2");
    }
    let r = admin
        .uncordon_node(pb::NodeRequest {
            node_id: "edge-1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(r.status, "ready");
    let e = admin
        .cordon_node(pb::NodeRequest {
            node_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Paused: tasks wait with the reason; resumed: they run.
    admin
        .set_scheduling_paused(pb::SetSchedulingPausedRequest { paused: true })
        .await?;
    let id = agent
        .submit_task(submit("echo", json!({"text": "later"})))
        .await?
        .into_inner()
        .task_id;
    let waiting = wait_pending(&agent, &id).await?;
    assert_eq!(waiting.state, pb::TaskState::Queued as i32);
    assert!(
        waiting.pending_reason.contains("paused"),
        "{}",
        waiting.pending_reason
    );
    admin
        .set_scheduling_paused(pb::SetSchedulingPausedRequest { paused: false })
        .await?;
    let t = c.wait_task(&mut agent, &id).await?;
    assert_eq!(result_text(&t), "later");

    // Cancel every task of one tenant; the other tenant's work goes on.
    let mut a = c.agent_with(&c.agent_token("a", "tenant-a", &["tools"]).await?);
    let mut b = c.agent_with(&c.agent_token("b", "tenant-b", &["tools"]).await?);
    let mut a_ids = Vec::new();
    for _ in 0..3 {
        a_ids.push(
            a.submit_task(submit("sleep", json!({"ms": 60000})))
                .await?
                .into_inner()
                .task_id,
        );
    }
    let b_id = b
        .submit_task(submit("sleep", json!({"ms": 1500})))
        .await?
        .into_inner()
        .task_id;
    wait_state(&a, &a_ids[0], pb::TaskState::Running).await?;
    let r = admin
        .cancel_tenant_tasks(pb::CancelTenantTasksRequest {
            tenant: "tenant-a".into(),
        })
        .await?
        .into_inner();
    assert_eq!(r.task_ids.len(), 3, "{r:?}");
    for id in &a_ids {
        let t = a
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(t.state, pb::TaskState::Cancelled as i32);
    }
    let t = c.wait_task(&mut b, &b_id).await?;
    assert_eq!(
        t.state,
        pb::TaskState::Succeeded as i32,
        "tenant-b's task was not touched"
    );
    Ok(())
}

#[tokio::test]
async fn drain_lets_work_finish_then_moves_or_cancels_the_rest() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    let (one, _) = recording_node(&c, "edge-1");
    c.add_node(one).await?;
    let mut agent = c.agent();
    // On edge-1: a short call that finishes within the deadline, a long read-only one, and a
    // long non-idempotent one.
    let short = agent
        .submit_task(submit("sleep", json!({"ms": 500, "steps": 1})))
        .await?
        .into_inner()
        .task_id;
    let long_safe = agent
        .submit_task(submit("sleep", json!({"ms": 4000, "steps": 2})))
        .await?
        .into_inner()
        .task_id;
    let long_risky = agent
        .submit_task(submit("record", json!({"key": "risky", "delay_ms": 60000})))
        .await?
        .into_inner()
        .task_id;
    for id in [&short, &long_safe, &long_risky] {
        wait_state(&agent, id, pb::TaskState::Running).await?;
    }
    let (two, _) = recording_node(&c, "edge-2");
    c.add_node(two).await?;

    let r = c
        .admin()
        .drain_node(pb::DrainNodeRequest {
            node_id: "edge-1".into(),
            deadline_seconds: 2,
        })
        .await?
        .into_inner();
    assert_eq!(r.status, "draining");
    // New work goes elsewhere at once.
    let t = c
        .call(&mut agent, "echo", json!({"text": "elsewhere"}))
        .await?;
    assert_eq!(t.attempts[0].node_id, "edge-2");

    // The short call finished where it was.
    let t = c.wait_task(&mut agent, &short).await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32);
    assert_eq!(t.attempts.len(), 1);
    assert_eq!(t.attempts[0].node_id, "edge-1");
    // After the deadline: the read-only call ran again on edge-2, the other was cancelled.
    let t = c.wait_task(&mut agent, &long_safe).await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    assert_eq!(
        t.attempts.last().map(|a| a.node_id.as_str()),
        Some("edge-2")
    );
    let t = c.wait_task(&mut agent, &long_risky).await?;
    assert_eq!(t.state, pb::TaskState::Cancelled as i32, "{t:?}");
    assert!(t.error.contains("drained"), "{}", t.error);

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
            .expect("edge-1")
            .status,
        "draining"
    );
    Ok(())
}
