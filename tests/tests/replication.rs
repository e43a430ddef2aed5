//! A replicated hub cluster of real processes: formation, any hub serving writes and reads,
//! and the core invariant under a leader crash: every acknowledged task reaches exactly one
//! terminal state and no acknowledged task is lost.

use std::collections::BTreeMap;

use flotilla_proto as pb;
use flotilla_tests::{
    check_every_acknowledged_task_ran_once, record_call, recording_node, result_text, step, submit,
    submit_until_acknowledged, wait_state, wait_status, wait_until, wait_workflow_done, Cluster,
    Load, NodeSpec, Options, READY,
};
use serde_json::json;

#[tokio::test]
async fn three_hubs_any_hub_serves_writes_and_consistent_reads() -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    let status = c
        .admin()
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner();
    assert_eq!(status.members.len(), 3, "{status:?}");
    let roles: BTreeMap<u64, String> = status
        .members
        .iter()
        .map(|m| (m.id, m.role.clone()))
        .collect();
    assert_eq!(
        roles.values().filter(|r| *r == "leader").count(),
        1,
        "{roles:?}"
    );
    assert_eq!(
        roles.values().filter(|r| *r == "follower").count(),
        2,
        "{roles:?}"
    );
    assert!(status
        .members
        .iter()
        .all(|m| m.raft_address.starts_with("https://127.0.0.1:")));

    c.add_node(NodeSpec::demo("edge-1")).await?;
    let leader = status.leader_id;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();

    // A write through one follower, read back at once through the other follower.
    let mut writer = c.agent_at(followers[0], &c.admin_token);
    let mut reader = c.agent_at(followers[1], &c.admin_token);
    for i in 0..5 {
        let id = writer
            .submit_task(submit("echo", json!({"text": format!("via follower {i}")})))
            .await?
            .into_inner()
            .task_id;
        let seen = reader
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(
            seen.id, id,
            "a follower reads what another follower just acknowledged"
        );
        let done = c.wait_task(&mut reader, &id).await?;
        assert_eq!(result_text(&done), format!("via follower {i}"));
    }

    // Every hub answers cluster status with the same leader and term.
    for h in 1..=3 {
        let mut admin = flotilla_tests::AdminServiceClient::with_interceptor(
            c.channel_to(h),
            flotilla_tests::Bearer::new(&c.admin_token),
        );
        let s = admin
            .cluster_status(pb::ClusterStatusRequest {})
            .await?
            .into_inner();
        assert_eq!(s.leader_id, leader);
        assert_eq!(s.this_hub, h);
        assert_eq!(s.members.len(), 3);
        // Live node state is the leader's; every hub reports it.
        let nodes = admin
            .list_nodes(pb::ListNodesRequest {})
            .await?
            .into_inner()
            .nodes;
        assert!(
            nodes.iter().any(|n| n.id == "edge-1" && n.connected),
            "hub {h}: {nodes:?}"
        );
        let tools = c
            .agent_at(h, &c.admin_token)
            .list_tools(pb::ListToolsRequest {})
            .await?
            .into_inner()
            .tools;
        let echo = tools.iter().find(|t| t.name == "echo").expect("echo");
        assert_eq!(echo.nodes, vec!["edge-1".to_string()], "hub {h}");
    }
    Ok(())
}

/// Reads a CallTool (or WatchTask) stream to its end.
async fn all_events(
    mut events: tonic::Streaming<pb::TaskEvent>,
) -> anyhow::Result<Vec<pb::TaskEvent>> {
    let mut out = Vec::new();
    while let Some(ev) = events.message().await? {
        out.push(ev);
    }
    Ok(out)
}

#[tokio::test]
async fn call_tool_on_any_hub_streams_the_call_to_its_end_and_a_repeat_replays_it(
) -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let leader = c.wait_leader().await?;
    for h in 1..=3 {
        let mut agent = c.agent_at(h, &c.admin_token);
        let text = format!("one call through hub {h}");
        let events = all_events(
            agent
                .call_tool(submit("echo", json!({ "text": text })))
                .await?
                .into_inner(),
        )
        .await?;
        // Transitions are replicated; "started" is news only the leader has (a node's
        // session lives there), so a follower's stream goes from assigned to the end.
        let kinds: Vec<pb::EventKind> = events.iter().map(|e| e.kind()).collect();
        let mut want = vec![pb::EventKind::Queued, pb::EventKind::Assigned];
        if h == leader {
            want.push(pb::EventKind::Started);
        }
        want.push(pb::EventKind::Succeeded);
        assert_eq!(kinds, want, "hub {h} (leader {leader})");
        assert_eq!(events[0].seq, 1, "hub {h}");
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq), "{events:?}");
        let id = &events[0].task_id;
        assert!(events.iter().all(|e| &e.task_id == id));
        let result: serde_json::Value =
            serde_json::from_slice(&events.last().expect("an end").result)?;
        assert_eq!(result["content"][0]["text"], json!(text), "hub {h}");
        // Another hub agrees on what the stream said.
        let other = c
            .agent_at(h % 3 + 1, &c.admin_token)
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(other.state(), pb::TaskState::Succeeded);
        assert_eq!(result_text(&other), text);
    }

    // The same key through two hubs: one task, and the repeat streams it from the start.
    let mut req = submit("echo", json!({"text": "keyed"}));
    req.idempotency_key = "call-tool-once".into();
    let first = all_events(
        c.agent_at(1, &c.admin_token)
            .call_tool(req.clone())
            .await?
            .into_inner(),
    )
    .await?;
    let again = all_events(
        c.agent_at(2, &c.admin_token)
            .call_tool(req)
            .await?
            .into_inner(),
    )
    .await?;
    assert_eq!(
        first.last().map(|e| e.kind()),
        Some(pb::EventKind::Succeeded),
        "{first:?}"
    );
    let replicated = |evs: &[pb::TaskEvent]| -> Vec<pb::TaskEvent> {
        evs.iter()
            .filter(|e| !matches!(e.kind(), pb::EventKind::Started | pb::EventKind::Progress))
            .cloned()
            .collect()
    };
    assert_eq!(
        replicated(&first),
        replicated(&again),
        "a repeat replays the first call's events"
    );

    // A call that cannot be accepted fails before any event, and leaves no task.
    let mut third = c.agent_at(3, &c.admin_token);
    let tasks = |mut a: flotilla_tests::Agent| async move {
        let r = a.list_tasks(pb::ListTasksRequest::default()).await?;
        anyhow::Ok(r.into_inner().tasks.len())
    };
    let before = tasks(third.clone()).await?;
    let refused = third
        .call_tool(submit("no-such-tool", json!({})))
        .await
        .expect_err("an unknown tool is refused");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    let after = tasks(third).await?;
    assert_eq!(before, after);
    Ok(())
}

#[tokio::test]
async fn killing_the_leader_under_load_loses_no_acknowledged_task() -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    let (spec, record) = recording_node(&c, "edge-1");
    c.add_node(spec).await?;
    let leader = c.wait_leader().await?;

    let load = Load::start(&c, 4);
    load.wait_more(20).await?;
    // kill -9 the leader and keep submitting through the election.
    c.kill_hub(leader);
    load.wait_more(40).await?;
    let acked = load.stop().await?;

    // A new leader was elected among the survivors.
    let survivor = (1..=3).find(|id| *id != leader).expect("a survivor");
    c.hub_addr = c.hub(survivor).api.clone();
    let new_leader = c.wait_leader().await?;
    assert_ne!(new_leader, leader);
    check_every_acknowledged_task_ran_once(&c, survivor, &acked, &record).await?;

    // And the restarted old leader catches up and agrees.
    c.start_hub(leader).await?;
    let mut old = c.agent_at(leader, &c.admin_token);
    let (key, id) = acked.iter().next_back().expect("some task");
    let t = wait_state(&old, id, pb::TaskState::Succeeded).await?;
    assert_eq!(result_text(&t), format!("recorded {key}"));
    let _ = old.list_tools(pb::ListToolsRequest {}).await?;
    Ok(())
}

/// kill -9 of a lone hub, again and again under load, with small log segments and frequent
/// snapshots so that the kills land in appends, segment rollovers and purges: the hub
/// reopens its log every time (a torn append is cut off, nothing acknowledged is lost) and
/// every acknowledged task still runs exactly once.
#[tokio::test]
async fn a_hub_killed_again_and_again_under_load_reopens_its_log_and_loses_nothing(
) -> anyhow::Result<()> {
    let mut opts = Options {
        snapshot_logs: 40,
        ..Default::default()
    };
    opts.hub_env.insert(
        1,
        vec![("FLOTILLA_TEST_WAL_SEGMENT_BYTES".into(), "8192".into())],
    );
    let mut c = Cluster::with_options(1, opts).await?;
    let (spec, record) = recording_node(&c, "edge-1");
    c.add_node(spec).await?;
    let load = Load::start(&c, 4);
    for _ in 0..6 {
        load.wait_more(25).await?;
        c.restart_hub(true).await?;
    }
    load.wait_more(25).await?;
    let acked = load.stop().await?;
    check_every_acknowledged_task_ran_once(&c, 1, &acked, &record).await?;
    // The log rolled over into new segments all along (each is named by its first index).
    let wal = c.hub(1).dir.join("raft.wal");
    let newest = std::fs::read_dir(&wal)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".seg")?.parse::<u64>().ok()
        })
        .max();
    anyhow::ensure!(
        newest.is_some_and(|n| n > 100),
        "newest segment in {}: {newest:?}",
        wal.display()
    );
    Ok(())
}

/// Sequence numbers of transition events (the ones every hub numbers the same way).
fn is_transition(ev: &pb::TaskEvent) -> bool {
    ev.kind != pb::EventKind::Progress as i32
}

#[tokio::test]
async fn a_watch_broken_by_a_leader_crash_resumes_on_another_hub_without_gaps() -> anyhow::Result<()>
{
    let mut c = Cluster::with_hubs(3).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let leader = c.wait_leader().await?;
    let other = (1..=3).find(|h| *h != leader).expect("a follower");

    let mut agent = c.agent_at(leader, &c.admin_token);
    let id = agent
        .submit_task(submit("sleep", json!({"ms": 4000, "steps": 8})))
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
    let mut seen = Vec::new();
    // Read until the call runs and has reported some progress, then kill the leader.
    while let Some(ev) = stream.message().await? {
        let progress = ev.kind == pb::EventKind::Progress as i32;
        seen.push(ev);
        if progress {
            break;
        }
    }
    c.kill_hub(leader);
    // The old stream breaks (or ends); resume on another hub from the last number seen.
    while let Ok(Some(ev)) = stream.message().await {
        seen.push(ev);
    }
    let last = seen.last().map(|e| e.seq).unwrap_or(0);
    let mut agent = c.agent_at(other, &c.admin_token);
    let mut resumed = wait_until("the watch to resume on another hub", READY, || {
        let mut agent = agent.clone();
        let id = id.clone();
        async move {
            agent
                .watch_task(pb::WatchTaskRequest {
                    task_id: id,
                    from_seq: last + 1,
                })
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await?;
    while let Some(ev) = resumed.message().await? {
        assert!(ev.seq > last, "resumed events come after the last one seen");
        seen.push(ev);
    }
    let kinds: Vec<pb::EventKind> = seen
        .iter()
        .filter(|e| is_transition(e))
        .map(|e| pb::EventKind::try_from(e.kind).unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        [
            pb::EventKind::Queued,
            pb::EventKind::Assigned,
            pb::EventKind::Started,
            pb::EventKind::Succeeded
        ],
        "every transition exactly once, across the leader change"
    );
    let t = c.wait_task(&mut agent, &id).await?;
    assert_eq!(result_text(&t), "slept 4000 ms in 8 steps");
    Ok(())
}

#[tokio::test]
async fn a_paused_leader_steps_down_and_no_task_is_recorded_twice() -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    let (spec, record) = recording_node(&c, "edge-1");
    c.add_node(spec).await?;
    let leader = c.wait_leader().await?;
    let others: Vec<u64> = (1..=3).filter(|h| *h != leader).collect();

    // Work in flight when the leader freezes.
    let mut agent = c.agent_at(others[0], &c.admin_token);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            agent
                .submit_task(pb::SubmitTaskRequest {
                    tool: "record".into(),
                    arguments: serde_json::to_vec(
                        &json!({"key": format!("before-{i}"), "delay_ms": 1500}),
                    )?,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .task_id,
        );
    }
    c.hub(leader).proc.pause();
    // The others elect a new leader and keep taking work.
    c.hub_addr = c.hub(others[0]).api.clone();
    wait_status(&c.admin(), "a new leader", |s| {
        s.leader_id != 0 && s.leader_id != leader
    })
    .await?;
    for i in 0..5 {
        let key = format!("during-{i}");
        ids.push(submit_until_acknowledged(&agent, record_call(&key)).await?);
    }
    // Thaw the old leader: it must step down and follow.
    c.hub(leader).proc.resume();
    let mut old = flotilla_tests::AdminServiceClient::with_interceptor(
        c.channel_to(leader),
        flotilla_tests::Bearer::new(&c.admin_token),
    );
    wait_status(&old, "the old leader to follow the new one", |s| {
        s.leader_id != leader && s.leader_id != 0
    })
    .await?;
    let _ = old.list_nodes(pb::ListNodesRequest {}).await?;

    let mut recorded = 0;
    for id in &ids {
        let t = c.wait_task(&mut agent, id).await?;
        assert!(pb::TaskState::try_from(t.state)?.is_terminal());
        let results = t
            .attempts
            .iter()
            .filter(|a| a.finished_at_ms != 0 && a.error.is_empty())
            .count();
        assert!(results <= 1, "a result recorded twice: {:?}", t.attempts);
        if t.state == pb::TaskState::Succeeded as i32 {
            recorded += 1;
        }
    }
    // Tasks that succeeded ran; each key appears in the record at least once.
    let lines = std::fs::read_to_string(&record)?;
    assert!(
        recorded >= 5,
        "work submitted during the pause succeeded ({recorded})"
    );
    for key in (0..5).map(|i| format!("during-{i}")) {
        assert!(lines.lines().any(|l| l == key), "{key} never ran");
    }
    Ok(())
}

#[tokio::test]
async fn the_raft_port_accepts_only_hub_certificates() -> anyhow::Result<()> {
    use flotilla_common::{pki, tls};
    use flotilla_proto::{raft_service_client::RaftServiceClient, RaftMessage};

    let c = Cluster::with_hubs(3).await?;
    let ca_key = std::fs::read_to_string(c.dir.path().join("pki/ca.key"))?;
    let ca = pki::Ca::from_pem(&c.ca_pem, &ca_key)?;
    let raft_addr = c.hub(1).raft.clone();
    let status = |identity: Option<pki::CertifiedKey>| {
        let ch = tls::channel(
            &raft_addr,
            tls::client_config(&c.ca_pem, identity.as_ref()).expect("tls"),
        );
        async move {
            let mut client = RaftServiceClient::new(ch?);
            anyhow::Ok(
                client
                    .status(RaftMessage {
                        json: b"null".to_vec(),
                        ..Default::default()
                    })
                    .await,
            )
        }
    };

    // An agent's client certificate from the same CA: refused.
    let agent_cert = ca.issue_client("mallory")?;
    let e = status(Some(agent_cert)).await?.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());

    // A node's certificate (what joining gives a node): refused.
    let (key_pem, csr) = pki::node_key_and_csr("edge-x")?;
    let node_cert = pki::CertifiedKey {
        cert_pem: ca.sign_node_csr(&csr, "edge-x")?,
        key_pem,
    };
    let e = status(Some(node_cert)).await?.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());

    // No client certificate at all: the TLS handshake itself fails.
    assert!(status(None).await?.is_err());

    // A hub certificate is accepted.
    let hub_cert = ca.issue_hub("hub-9", &["localhost".into()])?;
    let ok = status(Some(hub_cert)).await?;
    assert!(ok.is_ok(), "{ok:?}");
    Ok(())
}

#[tokio::test]
async fn a_workflow_and_a_fan_out_carry_on_across_a_leader_crash() -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    c.add_node(NodeSpec::demo("edge-2")).await?;
    let leader = c.wait_leader().await?;
    let other = (1..=3).find(|h| *h != leader).expect("a follower");
    let mut agent = c.agent_at(leader, &c.admin_token);
    let wf = agent
        .submit_workflow(pb::SubmitWorkflowRequest {
            name: "across".into(),
            steps: vec![
                step("slow", "sleep", &[], json!({"ms": 1500, "steps": 3})),
                step(
                    "x",
                    "echo",
                    &["slow"],
                    json!({"text": "x:${steps.slow.text}"}),
                ),
                step("y", "echo", &["slow"], json!({"text": "y"})),
                step(
                    "z",
                    "echo",
                    &["x", "y"],
                    json!({"text": "${steps.x.text}|${steps.y.text}"}),
                ),
            ],
            ..Default::default()
        })
        .await?
        .into_inner()
        .workflow_id;
    let fan = agent
        .submit_task(pb::SubmitTaskRequest {
            tool: "sleep".into(),
            arguments: serde_json::to_vec(&json!({"ms": 1500, "steps": 3}))?,
            options: Some(pb::TaskOptions {
                replicas: 2,
                aggregation: pb::Aggregation::All as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .task_id;
    wait_state(&agent, &fan, pb::TaskState::Running).await?;
    c.kill_hub(leader);

    let mut agent = c.agent_at(other, &c.admin_token);
    let w = wait_workflow_done(&agent, &wf).await?;
    assert_eq!(w.state, pb::WorkflowState::Succeeded as i32, "{w:?}");
    let z = w.steps.iter().find(|s| s.name == "z").expect("z");
    let args: serde_json::Value = serde_json::from_slice(&z.arguments)?;
    assert_eq!(args["text"], "x:slept 1500 ms in 3 steps|y");
    // A watch on a follower replays every step's end and the workflow's.
    let mut events = agent
        .watch_workflow(pb::WatchWorkflowRequest {
            workflow_id: wf.clone(),
            from_seq: 0,
        })
        .await?
        .into_inner();
    let mut ended = Vec::new();
    while let Some(ev) = events.message().await? {
        if ev.step.is_empty() {
            break;
        }
        ended.push(ev.step);
    }
    assert_eq!(ended.len(), 4, "{ended:?}");

    let t = c.wait_task(&mut agent, &fan).await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    let nodes: std::collections::BTreeSet<&str> =
        t.replicas.iter().map(|r| r.node_id.as_str()).collect();
    assert_eq!(nodes.len(), 2, "replicas on distinct nodes: {t:?}");
    for r in &t.replicas {
        let rt = agent
            .get_task(pb::GetTaskRequest {
                task_id: r.task_id.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(rt.state, pb::TaskState::Succeeded as i32);
        assert_eq!(rt.parent_id, fan);
    }
    Ok(())
}
