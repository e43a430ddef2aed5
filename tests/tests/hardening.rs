//! No request can hurt the cluster: deeply nested documents, a node reporting on another
//! node's attempt, oversized lists and strings, floods from one agent, one tenant holding
//! every slot, idle TLS connections, guessed join tokens, secrets readable by others.
//! Each test fails if its defence is removed.

use std::os::unix::fs::PermissionsExt;

use flotilla_common::{config::Limits, pki, tls};
use flotilla_proto as pb;
use flotilla_tests::{
    demo_server, result_text, step, submit, wait_done, wait_state, wait_until, Cluster, NodeSpec,
    Options, READY,
};
use serde_json::{json, Value};
use tonic::Code;

/// A JSON object nested `depth` levels deep.
fn nested(depth: usize) -> Value {
    let mut v = json!("x");
    for _ in 0..depth {
        v = json!({ "text": v });
    }
    v
}

/// 126 levels: under serde_json's own limit of 128, so only Flotilla's limit refuses it.
const POISON_DEPTH: usize = 126;

async fn send_poison(agent: &mut flotilla_tests::Agent) -> anyhow::Result<()> {
    let e = agent
        .submit_task(submit("echo", nested(POISON_DEPTH)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(
        e.message()
            .contains("arguments nests 126 levels deep; the limit is 64"),
        "{}",
        e.message()
    );
    // The same document as a workflow step that refers to an earlier step (which skips
    // the schema check until the reference is resolved).
    let mut args = nested(POISON_DEPTH);
    args["ref"] = json!("${steps.first.text}");
    let e = agent
        .submit_workflow(pb::SubmitWorkflowRequest {
            name: "poison".into(),
            steps: vec![
                step("first", "echo", &[], json!({"text": "a"})),
                step("second", "echo", &["first"], args),
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("the limit is 64"), "{}", e.message());
    Ok(())
}

#[tokio::test]
async fn deeply_nested_documents_are_refused_and_the_hub_keeps_serving_and_restarts(
) -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent();
    send_poison(&mut agent).await?;
    // A document at the limit is accepted, committed, and read back after a restart.
    let deep = nested(flotilla_common::limits::MAX_JSON_DEPTH - 1);
    let id = agent
        .submit_task(submit("echo", json!({"text": "deep", "extra": deep})))
        .await?
        .into_inner()
        .task_id;
    wait_done(&agent, &id).await?;
    let t = c
        .call(&mut agent, "echo", json!({"text": "still here"}))
        .await?;
    assert_eq!(result_text(&t), "still here");
    c.restart_hub(true).await?;
    c.wait_node_connected("edge-1").await?;
    let mut agent = c.agent();
    let t = c.call(&mut agent, "echo", json!({"text": "after"})).await?;
    assert_eq!(result_text(&t), "after");
    Ok(())
}

#[tokio::test]
async fn three_hubs_keep_a_quorum_after_poison_sent_to_each_leader() -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    for _ in 0..3 {
        let leader = c.wait_leader().await?;
        let mut agent = c.agent_at(leader, &c.admin_token);
        send_poison(&mut agent).await?;
        let t = c.call(&mut agent, "echo", json!({"text": "ok"})).await?;
        assert_eq!(result_text(&t), "ok");
        assert_eq!(c.wait_leader().await?, leader, "no election was needed");
        // Next round, ask a follower too: it forwards nothing it refused.
        let follower = (1..=3).find(|h| *h != leader).unwrap_or(1);
        let mut agent = c.agent_at(follower, &c.admin_token);
        send_poison(&mut agent).await?;
    }
    Ok(())
}

/// Waits until hub 1's log has a line containing `text`.
async fn wait_log(c: &Cluster, text: &str) -> anyhow::Result<()> {
    wait_until(&format!("the hub to log {text:?}"), READY, || {
        let found = c.hubs[0].proc.log_text().contains(text);
        async move { found.then_some(()) }
    })
    .await
}

/// The identity a node got when it joined: its certificate, key and the CA.
fn node_identity(c: &Cluster, name: &str) -> anyhow::Result<pki::CertifiedKey> {
    pki::CertifiedKey::read(&c.node_dir(name).join("identity"), "node")?
        .ok_or_else(|| anyhow::anyhow!("{name} has no identity"))
}

#[tokio::test]
async fn a_node_cannot_report_on_another_nodes_attempt() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1").label("pin", "1"))
        .await?;
    // edge-2 joins as any node would, then its process stops; its certificate is the
    // attacker's.
    c.add_node(NodeSpec::demo("edge-2")).await?;
    c.nodes.get_mut("edge-2").expect("edge-2").kill();
    let mallory = node_identity(&c, "edge-2")?;
    let agent = c.agent();
    let mut a = agent.clone();
    let id = a
        .submit_task(pb::SubmitTaskRequest {
            tool: "sleep".into(),
            arguments: serde_json::to_vec(&json!({"ms": 3000, "steps": 3}))?,
            options: Some(pb::TaskOptions {
                placement: Some(pb::PlacementConstraints {
                    required_labels: [("pin".to_owned(), "1".to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .task_id;
    let running = wait_state(&agent, &id, pb::TaskState::Running).await?;
    let at = running.attempts.last().expect("an attempt").clone();
    assert_eq!(at.node_id, "edge-1");

    // edge-2 opens a session and reports progress and a result for edge-1's attempt.
    let channel = tls::channel(&c.hub_addr, tls::client_config(&c.ca_pem, Some(&mallory))?)?;
    let mut node = pb::node_service_client::NodeServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let msg = |m: pb::node_message::Msg| pb::NodeMessage { msg: Some(m) };
    tx.send(msg(pb::node_message::Msg::Hello(pb::Hello::default())))
        .await?;
    let mut inbound = node
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tx.send(msg(pb::node_message::Msg::Progress(pb::TaskProgress {
        task_id: id.clone(),
        attempt: at.number,
        fence: at.fence,
        progress: 99.0,
        message: "forged".into(),
        ..Default::default()
    })))
    .await?;
    let forged = json!({"content": [{"type": "text", "text": "forged"}], "isError": false});
    tx.send(msg(pb::node_message::Msg::Result(pb::TaskResult {
        task_id: id.clone(),
        attempt: at.number,
        fence: at.fence,
        result: serde_json::to_vec(&forged)?,
        ..Default::default()
    })))
    .await?;
    // And claims the attempt was interrupted, which would end it lost.
    tx.send(msg(pb::node_message::Msg::Result(pb::TaskResult {
        task_id: id.clone(),
        attempt: at.number,
        fence: at.fence,
        error: "forged".into(),
        interrupted: true,
        ..Default::default()
    })))
    .await?;
    // The hub answers both (skipping its welcome).
    let acks = tokio::time::timeout(READY, async {
        let mut acks = Vec::new();
        while acks.len() < 2 {
            match inbound.message().await? {
                Some(pb::HubMessage {
                    msg: Some(pb::hub_message::Msg::ResultAck(a)),
                }) => acks.push(a),
                Some(_) => continue,
                None => anyhow::bail!("the hub closed the session without an answer"),
            }
        }
        anyhow::Ok(acks)
    })
    .await??;
    assert!(
        acks.iter().all(|a| !a.accepted),
        "forged reports must be refused: {acks:?}"
    );

    let done = wait_done(&agent, &id).await?;
    assert_eq!(done.state(), pb::TaskState::Succeeded);
    assert_ne!(
        result_text(&done),
        "forged",
        "the real node's result stands"
    );
    // The watcher never saw the forged progress.
    let mut events = a
        .watch_task(pb::WatchTaskRequest {
            task_id: id.clone(),
            from_seq: 0,
        })
        .await?
        .into_inner();
    while let Some(ev) = events.message().await? {
        assert_ne!(ev.message, "forged", "{ev:?}");
        assert_ne!(ev.node_id, "edge-2", "{ev:?}");
    }
    assert!(c.hubs[0]
        .proc
        .log_text()
        .contains("for an attempt another node holds"));
    Ok(())
}

#[tokio::test]
async fn oversized_lists_and_strings_are_refused_naming_the_field_and_limit() -> anyhow::Result<()>
{
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent();
    let call = |options: pb::TaskOptions, key: String| pb::SubmitTaskRequest {
        tool: "echo".into(),
        arguments: br#"{"text":"x"}"#.to_vec(),
        idempotency_key: key,
        options: Some(options),
        ..Default::default()
    };
    let cases = [
        (
            call(
                pb::TaskOptions {
                    retry: Some(pb::RetryPolicy {
                        max_attempts: 2,
                        retry_on: vec![pb::FailureKind::Timeout as i32; 100_000],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                String::new(),
            ),
            "retry.retry_on has 100000 entries; the limit is 12",
        ),
        (
            call(pb::TaskOptions::default(), "k".repeat(10_000)),
            "idempotency_key is 10000 bytes; the limit is 256",
        ),
        (
            call(
                pb::TaskOptions {
                    placement: Some(pb::PlacementConstraints {
                        required_labels: (0..1000).map(|i| (format!("k{i}"), "v".into())).collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                String::new(),
            ),
            "placement labels (required and preferred) has 1000 entries; the limit is 32",
        ),
        (
            call(
                pb::TaskOptions {
                    placement: Some(pb::PlacementConstraints {
                        zone: "z".repeat(5000),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                String::new(),
            ),
            "placement.zone is 5000 bytes; the limit is 256",
        ),
    ];
    for (req, want) in cases {
        let e = agent.submit_task(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(
            e.message().contains(want),
            "{} (wanted {want})",
            e.message()
        );
    }
    // Repeated retry kinds are one kind each: accepted.
    let ok = agent
        .submit_task(call(
            pb::TaskOptions {
                retry: Some(pb::RetryPolicy {
                    max_attempts: 2,
                    retry_on: vec![pb::FailureKind::Timeout as i32; 6],
                    ..Default::default()
                }),
                ..Default::default()
            },
            String::new(),
        ))
        .await;
    assert!(ok.is_ok(), "{ok:?}");

    // A workflow: repeated dependencies collapse; too many distinct ones are refused.
    let many: Vec<pb::StepSpec> = (0..70)
        .map(|i| step(&format!("s{i}"), "echo", &[], json!({"text": "x"})))
        .collect();
    let names: Vec<String> = (0..70).map(|i| format!("s{i}")).collect();
    let mut last = step("last", "echo", &[], json!({"text": "x"}));
    last.depends_on = names.clone();
    let mut steps = many.clone();
    steps.push(last);
    let e = agent
        .submit_workflow(pb::SubmitWorkflowRequest {
            name: "wide".into(),
            steps,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("depends_on has 70 entries; the limit is 64"),
        "{}",
        e.message()
    );
    let mut chain = vec![step("s0", "echo", &[], json!({"text": "x"}))];
    for i in 1..200 {
        let mut s = step(&format!("s{i}"), "echo", &[], json!({"text": "x"}));
        s.depends_on = vec![format!("s{}", i - 1); 1000];
        chain.push(s);
    }
    let r = agent
        .submit_workflow(pb::SubmitWorkflowRequest {
            name: "long-chain".into(),
            steps: chain,
            ..Default::default()
        })
        .await;
    assert!(r.is_ok(), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn a_flooding_agent_is_refused_while_another_is_served() -> anyhow::Result<()> {
    let mut c = Cluster::with_options(
        1,
        Options {
            limits: Limits {
                agent_requests_per_s: 20,
                agent_burst: 20,
                agent_streams: 3,
                ..Limits::default()
            },
            ..Default::default()
        },
    )
    .await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let flood = c.agent_with(&c.agent_token("flood", "default", &["tools"]).await?);
    let calm = c.agent_with(&c.agent_token("calm", "default", &["tools"]).await?);
    let flooding = tokio::spawn({
        let flood = flood.clone();
        async move {
            let calls = (0..300).map(|_| {
                let mut f = flood.clone();
                async move { f.list_tools(pb::ListToolsRequest {}).await }
            });
            futures_join(calls).await
        }
    });
    // The calm agent keeps being served while the flood goes on.
    for _ in 0..10 {
        calm.clone().list_tools(pb::ListToolsRequest {}).await?;
    }
    let results = flooding.await?;
    let refused: Vec<&tonic::Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        !refused.is_empty(),
        "300 calls at once must exceed a burst of 20"
    );
    for e in &refused {
        assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
        assert!(e.message().contains("\"flood\""), "{}", e.message());
        let hint = e
            .metadata()
            .get("x-flotilla-retry-after-ms")
            .expect("a retry hint");
        assert!(hint.to_str()?.parse::<u64>()? > 0);
    }

    // Watch streams: at most three open per agent; closing one makes room.
    let mut watcher = calm.clone();
    // A long call: its watches stay open.
    let id = watcher
        .submit_task(submit("sleep", json!({"ms": 60000, "steps": 2})))
        .await?
        .into_inner()
        .task_id;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            watcher
                .watch_task(pb::WatchTaskRequest {
                    task_id: id.clone(),
                    from_seq: 0,
                })
                .await?
                .into_inner(),
        );
    }
    let e = watcher
        .watch_task(pb::WatchTaskRequest {
            task_id: id.clone(),
            from_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    drop(open.pop());
    wait_until("a closed watch to free its slot", READY, || {
        let mut w = watcher.clone();
        let id = id.clone();
        async move {
            w.watch_task(pb::WatchTaskRequest {
                task_id: id,
                from_seq: 0,
            })
            .await
            .ok()
        }
    })
    .await?;
    Ok(())
}

async fn futures_join<F, T>(calls: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("call task"));
    }
    out
}

#[tokio::test]
async fn one_tenants_long_calls_leave_a_slot_for_another_tenant() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    let mut spec = NodeSpec::demo("edge-1");
    spec.servers = vec![demo_server("demo", 4)];
    c.add_node(spec).await?;
    let a = c.agent_with(&c.agent_token("a", "tenant-a", &["tools"]).await?);
    let b = c.agent_with(&c.agent_token("b", "tenant-b", &["tools"]).await?);
    // Tenant B has been working: from now on each tenant keeps to its share.
    let t = c
        .call(&mut b.clone(), "echo", json!({"text": "first"}))
        .await?;
    assert_eq!(result_text(&t), "first");
    let mut long = Vec::new();
    for _ in 0..6 {
        long.push(
            a.clone()
                .submit_task(submit("sleep", json!({"ms": 20000, "steps": 2})))
                .await?
                .into_inner()
                .task_id,
        );
    }
    // Three of four slots (the default share of 0.75) go to tenant A...
    for id in &long[..3] {
        wait_state(&a, id, pb::TaskState::Running).await?;
    }
    let waiting = flotilla_tests::wait_pending(&a, &long[5]).await?;
    assert!(
        waiting.pending_reason.contains("share"),
        "{}",
        waiting.pending_reason
    );
    // ...so tenant B's call runs at once, while A's calls are still running.
    let mut bb = b.clone();
    let t = c.call(&mut bb, "echo", json!({"text": "b"})).await?;
    assert_eq!(result_text(&t), "b");
    let first = a
        .clone()
        .get_task(pb::GetTaskRequest {
            task_id: long[0].clone(),
        })
        .await?
        .into_inner();
    assert_eq!(first.state(), pb::TaskState::Running, "A's calls still run");
    Ok(())
}

#[tokio::test]
async fn connections_that_never_speak_http2_are_closed() -> anyhow::Result<()> {
    let c = Cluster::with_options(
        1,
        Options {
            limits: Limits {
                handshake_timeout_ms: 500,
                ..Limits::default()
            },
            ..Default::default()
        },
    )
    .await?;
    let (host, port) = tls::split_address(&c.hub_addr)?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(&c.ca_pem, None)?);
    let name = rustls::pki_types::ServerName::try_from(host.clone())?;
    let mut conn = connector.connect(name, tcp).await?;
    // Never send the preface: the hub closes the connection.
    let mut buf = [0u8; 64];
    let read =
        tokio::time::timeout(READY, tokio::io::AsyncReadExt::read(&mut conn, &mut buf)).await?;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the hub should close a silent connection: {read:?}"
    );
    // The hub drops the connection as its deadline fires and logs just after.
    wait_log(&c, "preface in time").await?;
    // Real clients still get through.
    c.agent().list_tools(pb::ListToolsRequest {}).await?;
    Ok(())
}

#[tokio::test]
async fn failed_joins_are_throttled_per_source() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let mut node = pb::node_service_client::NodeServiceClient::new(c.channel());
    let attempt = || pb::JoinRequest {
        name: "guess".into(),
        token_id: "nosuchid".into(),
        token_secret: "wrong".into(),
        csr_pem: String::new(),
    };
    let mut codes = Vec::new();
    for _ in 0..12 {
        let e = node.join(attempt()).await.unwrap_err();
        codes.push(e.code());
    }
    assert_eq!(codes[..10], [Code::Unauthenticated; 10]);
    assert_eq!(codes[10..], [Code::ResourceExhausted; 2], "{codes:?}");
    Ok(())
}

#[tokio::test]
async fn secrets_on_disk_are_private() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mode = |p: std::path::PathBuf| -> anyhow::Result<u32> {
        Ok(std::fs::metadata(&p)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
            .permissions()
            .mode()
            & 0o777)
    };
    let hub = &c.hubs[0].dir;
    assert_eq!(mode(hub.clone())?, 0o700, "hub data dir");
    assert_eq!(mode(hub.join("admin.token"))?, 0o600);
    let node = c.node_dir("edge-1");
    assert_eq!(mode(node.clone())?, 0o700, "node data dir");
    assert_eq!(mode(node.join("identity"))?, 0o700);
    assert_eq!(mode(node.join("identity").join("node.key"))?, 0o600);
    assert_eq!(mode(c.dir.path().join("pki").join("ca.key"))?, 0o600);
    Ok(())
}

#[tokio::test]
async fn a_tool_name_from_an_untrusted_node_waits_for_an_admin() -> anyhow::Result<()> {
    let mut c = Cluster::with_options(
        1,
        Options {
            trust_node_tools: false,
            ..Default::default()
        },
    )
    .await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut admin_agent = c.agent();
    let listed = admin_agent
        .list_tools(pb::ListToolsRequest {})
        .await?
        .into_inner()
        .tools;
    let echo = listed
        .iter()
        .find(|t| t.name == "echo")
        .expect("echo listed");
    assert!(!echo.accepted, "admins see it, not accepted");
    assert_eq!(echo.nodes, ["edge-1"]);
    let mut agent = c.agent_with(&c.agent_token("a", "default", &["tools"]).await?);
    let tools = agent
        .list_tools(pb::ListToolsRequest {})
        .await?
        .into_inner()
        .tools;
    assert!(
        tools.is_empty(),
        "agents see no tool waiting for acceptance: {tools:?}"
    );
    let e = agent
        .submit_task(submit("echo", json!({"text": "x"})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().contains("flotilla tools accept echo"),
        "{}",
        e.message()
    );
    let r = c
        .admin()
        .accept_tool(pb::AcceptToolRequest {
            name: "echo".into(),
        })
        .await?
        .into_inner();
    assert_eq!(r.first_seen_node, "edge-1");
    let t = c
        .call(&mut agent, "echo", json!({"text": "accepted"}))
        .await?;
    assert_eq!(result_text(&t), "accepted");
    // Others stay waiting, and acceptance survives a restart (it is replicated state).
    c.restart_hub(true).await?;
    c.wait_node_connected("edge-1").await?;
    let mut agent = c.agent_with(&c.agent_token("a", "default", &["tools"]).await?);
    let names: Vec<String> = agent
        .list_tools(pb::ListToolsRequest {})
        .await?
        .into_inner()
        .tools
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["echo"]);

    // A node that joined with a `--may-add-tools` token introduces a new name usable at
    // once (trust comes with the token, never with a name the node chose).
    c.opts.trusted_join_tokens = true;
    c.add_node(NodeSpec {
        name: "py-1".into(),
        labels: Default::default(),
        servers: vec![flotilla_common::config::McpServerConfig {
            name: "time".into(),
            command: "python3".into(),
            args: vec!["-m".into(), "mcp_server_time".into()],
            env: Default::default(),
            max_concurrency: 2,
            scope: "tools".into(),
        }],
        tenants: Vec::new(),
    })
    .await?;
    let listed = agent
        .list_tools(pb::ListToolsRequest {})
        .await?
        .into_inner()
        .tools;
    let time = listed
        .iter()
        .find(|t| t.name == "get_current_time")
        .expect("the trusted node's tool is listed to agents");
    assert!(time.accepted);
    Ok(())
}

#[tokio::test]
async fn idle_connections_are_closed_and_open_streams_keep_theirs() -> anyhow::Result<()> {
    let mut c = Cluster::with_options(
        1,
        Options {
            limits: Limits {
                idle_timeout_ms: 1000,
                ..Limits::default()
            },
            ..Default::default()
        },
    )
    .await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    // A client that speaks HTTP/2 (preface and settings) but never makes a request.
    let (host, port) = tls::split_address(&c.hub_addr)?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(&c.ca_pem, None)?);
    let mut conn = connector
        .connect(rustls::pki_types::ServerName::try_from(host.clone())?, tcp)
        .await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?; // an empty SETTINGS frame
    conn.flush().await?;
    tokio::time::timeout(READY, async {
        let mut buf = [0u8; 1024];
        while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await?;
    wait_log(&c, "closed an idle connection").await?;

    // A watch of a call that outlasts the idle timeout keeps its connection to the end,
    // and so does the node's session.
    let mut agent = c.agent();
    let id = agent
        .submit_task(submit("sleep", json!({"ms": 3000, "steps": 3})))
        .await?
        .into_inner()
        .task_id;
    let events = flotilla_tests::watch_all(&agent, &id, 0).await?;
    assert_eq!(
        events.last().map(|e| e.kind()),
        Some(pb::EventKind::Succeeded),
        "the watch ran to the end"
    );
    assert_eq!(
        c.hubs[0]
            .proc
            .log_text()
            .matches("node session open")
            .count(),
        1,
        "the node's session was never cut"
    );
    Ok(())
}

/// Callers that give up mid-submission (a 1-3 ms deadline, so the hub drops their request
/// at every point of its path) leave no task behind: whatever was accepted runs and ends,
/// none stays assigned to a node that was never told.
#[tokio::test]
async fn submissions_abandoned_by_their_callers_never_leave_a_task_stranded() -> anyhow::Result<()>
{
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let agent = c.agent();
    let mut callers = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let mut a = agent.clone();
        callers.spawn(async move {
            let mut req = tonic::Request::new(submit("echo", json!({ "text": format!("a{i}") })));
            req.set_timeout(std::time::Duration::from_millis(1 + i % 3));
            a.submit_task(req).await.is_ok()
        });
    }
    let mut answered = 0;
    while let Some(ok) = callers.join_next().await {
        answered += usize::from(ok?);
    }
    // Every task the hub holds, answered or not, reaches its end.
    let all = wait_until("every accepted task to end", READY, || {
        let mut a = agent.clone();
        async move {
            let tasks = a
                .list_tasks(pb::ListTasksRequest {
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .tasks;
            tasks
                .iter()
                .all(|t| t.state() == pb::TaskState::Succeeded)
                .then_some(tasks)
        }
    })
    .await?;
    assert!(
        all.len() >= answered,
        "{} tasks, {answered} answered",
        all.len()
    );
    Ok(())
}
