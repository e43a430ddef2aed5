//! The thinnest complete path, with real processes: a hub, a node that joins with a token
//! and runs the built-in demo MCP server, and an agent calling tools through the hub.

use flotilla_proto as pb;
use flotilla_tests::{result_text, submit, wait_pending, wait_until, Cluster, NodeSpec, READY};
use serde_json::json;

#[tokio::test]
async fn agent_calls_demo_tools_through_hub_and_node() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent();

    let t = c.call(&mut agent, "echo", json!({"text": "hi"})).await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    assert_eq!(result_text(&t), "hi");
    let r: serde_json::Value = serde_json::from_slice(&t.result)?;
    assert_eq!(r["structuredContent"]["text"], "hi");
    assert_eq!(t.attempts.len(), 1);
    assert_eq!(t.attempts[0].node_id, "edge-1");

    // Real work on the node: SHA-256 of "abc".
    let t = c
        .call(
            &mut agent,
            "hash",
            json!({"data": "abc", "algorithm": "sha256"}),
        )
        .await?;
    assert_eq!(
        result_text(&t),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    // Progress streams through WatchTask, in order, ending with the result.
    let id = agent
        .submit_task(submit("sleep", json!({"ms": 400, "steps": 4})))
        .await?
        .into_inner()
        .task_id;
    let mut stream = agent
        .watch_task(pb::WatchTaskRequest {
            task_id: id.clone(),
            from_seq: 1,
        })
        .await?
        .into_inner();
    let mut kinds = Vec::new();
    let mut progress = Vec::new();
    let mut last_seq = 0;
    while let Some(ev) = stream.message().await? {
        assert!(ev.seq > last_seq, "sequence numbers increase");
        last_seq = ev.seq;
        let kind = pb::EventKind::try_from(ev.kind)?;
        if kind == pb::EventKind::Progress {
            progress.push((ev.progress, ev.total));
        }
        kinds.push(kind);
    }
    assert_eq!(kinds.first(), Some(&pb::EventKind::Queued));
    assert_eq!(kinds.last(), Some(&pb::EventKind::Succeeded));
    assert!(kinds.contains(&pb::EventKind::Assigned) && kinds.contains(&pb::EventKind::Started));
    assert_eq!(
        progress,
        vec![
            (1.0, Some(4.0)),
            (2.0, Some(4.0)),
            (3.0, Some(4.0)),
            (4.0, Some(4.0))
        ]
    );

    // Resuming from a sequence number replays only what came after it.
    let mut again = agent
        .watch_task(pb::WatchTaskRequest {
            task_id: id.clone(),
            from_seq: last_seq,
        })
        .await?
        .into_inner();
    let ev = again.message().await?.expect("the terminal event");
    assert_eq!(ev.seq, last_seq);
    assert_eq!(pb::EventKind::try_from(ev.kind)?, pb::EventKind::Succeeded);
    assert!(again.message().await?.is_none());
    // Past the end of an ended task, a watch simply ends (no error, no wait).
    let mut after = agent
        .watch_task(pb::WatchTaskRequest {
            task_id: id,
            from_seq: last_seq + 1,
        })
        .await?
        .into_inner();
    assert!(after.message().await?.is_none());

    // The catalogue lists the demo tools with their annotations and the node offering them.
    let tools = agent
        .list_tools(pb::ListToolsRequest {})
        .await?
        .into_inner()
        .tools;
    let sleep = tools
        .iter()
        .find(|t| t.name == "sleep")
        .expect("sleep listed");
    assert!(sleep.read_only && sleep.idempotent);
    assert_eq!(sleep.nodes, vec!["edge-1".to_string()]);
    Ok(())
}

#[tokio::test]
async fn hub_restart_keeps_tasks_and_nodes_and_node_restart_needs_no_token() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent();
    let before = c.call(&mut agent, "echo", json!({"text": "kept"})).await?;

    // kill -9 the hub and start it again from its data dir.
    c.restart_hub(true).await?;
    let mut agent = c.agent();
    let after = agent
        .get_task(pb::GetTaskRequest {
            task_id: before.id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(after.state, pb::TaskState::Succeeded as i32);
    assert_eq!(
        after.result, before.result,
        "the recorded result is the same one"
    );
    let nodes = c
        .admin()
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    assert!(
        nodes.iter().any(|n| n.id == "edge-1"),
        "node record survived the restart"
    );

    // The node reconnects on its own and serves again.
    c.wait_node_connected("edge-1").await?;
    let t = c.call(&mut agent, "echo", json!({"text": "again"})).await?;
    assert_eq!(result_text(&t), "again");

    // Restart the node: it uses its stored certificate; its config has no join token now.
    let mut node = c.nodes.remove("edge-1").expect("node");
    node.terminate();
    let cfg = c.write_node_config(&NodeSpec::demo("edge-1")).await?;
    assert!(!std::fs::read_to_string(&cfg)?.contains("join_token"));
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let t = c.call(&mut agent, "echo", json!({"text": "third"})).await?;
    assert_eq!(result_text(&t), "third");
    Ok(())
}

#[tokio::test]
async fn a_task_waits_for_a_node_that_offers_its_tool() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut node = c.nodes.remove("edge-1").expect("node");
    node.terminate();
    let admin = c.admin();
    wait_until("node to be seen as disconnected", READY, || {
        let mut admin = admin.clone();
        async move {
            let n = admin
                .list_nodes(pb::ListNodesRequest {})
                .await
                .ok()?
                .into_inner()
                .nodes;
            n.iter().all(|n| !n.connected).then_some(())
        }
    })
    .await?;

    let mut agent = c.agent();
    let id = agent
        .submit_task(submit("echo", json!({"text": "patience"})))
        .await?
        .into_inner()
        .task_id;
    let waiting = wait_pending(&agent, &id).await?;
    assert_eq!(waiting.state, pb::TaskState::Queued as i32);
    assert!(
        waiting.pending_reason.contains("not connected"),
        "{}",
        waiting.pending_reason
    );

    c.add_node(NodeSpec::demo("edge-1")).await?;
    let t = c.wait_task(&mut agent, &id).await?;
    assert_eq!(result_text(&t), "patience");
    Ok(())
}

#[tokio::test]
async fn cancellation_reaches_the_mcp_server() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent();
    let id = agent
        .submit_task(submit("sleep", json!({"ms": 60000, "steps": 600})))
        .await?
        .into_inner()
        .task_id;
    flotilla_tests::wait_state(&agent, &id, pb::TaskState::Running).await?;
    let t = agent
        .cancel_task(pb::CancelTaskRequest {
            task_id: id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(t.state, pb::TaskState::Cancelled as i32);
    // The demo server prints this when it receives notifications/cancelled for the call.
    let node = &c.nodes["edge-1"];
    wait_until("the MCP server to see the cancellation", READY, || {
        let seen = node.log_text().contains("sleep cancelled at step");
        async move { seen.then_some(()) }
    })
    .await?;
    // Cancelling again is refused: the task already ended.
    let again = agent
        .cancel_task(pb::CancelTaskRequest { task_id: id })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    Ok(())
}

#[tokio::test]
async fn health_and_reflection_serve_generic_grpc_tools() -> anyhow::Result<()> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };

    let c = Cluster::start().await?;
    let mut health = HealthClient::new(c.channel());
    for svc in [
        "flotilla.v1.AgentService",
        "flotilla.v1.NodeService",
        "flotilla.v1.AdminService",
    ] {
        let r = health
            .check(HealthCheckRequest {
                service: svc.into(),
            })
            .await?
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{svc}");
    }
    let e = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    let mut refl = ServerReflectionClient::new(c.channel());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await?
        .into_inner();
    let msg = resp.message().await?.expect("a reflection answer");
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer: {msg:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for svc in [
        "flotilla.v1.AgentService",
        "flotilla.v1.NodeService",
        "flotilla.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == svc),
            "{svc} missing from {names:?}"
        );
    }
    Ok(())
}

/// A call costs two Raft commits: accepted and assigned together (a node was free and
/// nothing was queued, so the leader placed it as it arrived), then finished. The node's
/// "started" is an event and a time carried by the result, not a commit of its own.
/// Watchers and GetTask still see every step: queued, assigned, started, succeeded.
#[tokio::test]
async fn a_call_costs_two_commits_and_still_reports_each_step() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent();
    // Warm up (signing key, node hello, tool statistics are all committed by now).
    c.call(&mut agent, "echo", json!({"text": "warm"})).await?;
    let index = || async {
        let st = c
            .admin()
            .cluster_status(pb::ClusterStatusRequest {})
            .await?
            .into_inner();
        anyhow::Ok(st.last_log_index)
    };
    let before = index().await?;
    let id = agent
        .submit_task(submit("sleep", json!({"ms": 600, "steps": 2})))
        .await?
        .into_inner()
        .task_id;
    let running = flotilla_tests::wait_state(&agent, &id, pb::TaskState::Running).await?;
    assert!(running.attempts[0].started_at_ms > 0, "{running:?}");
    let kinds: Vec<pb::EventKind> = flotilla_tests::watch_all(&agent, &id, 0)
        .await?
        .iter()
        .map(|e| e.kind())
        .collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k != pb::EventKind::Progress)
            .collect::<Vec<_>>(),
        [
            &pb::EventKind::Queued,
            &pb::EventKind::Assigned,
            &pb::EventKind::Started,
            &pb::EventKind::Succeeded
        ],
        "{kinds:?}"
    );
    let done = flotilla_tests::wait_done(&agent, &id).await?;
    let a = &done.attempts[0];
    assert!(a.started_at_ms >= a.assigned_at_ms && a.started_at_ms <= a.finished_at_ms);
    assert_eq!(
        index().await? - before,
        2,
        "accepted and assigned, finished"
    );
    Ok(())
}
