//! Execution under faults, with real processes: how long a dead node's tasks take to run
//! elsewhere, and what one failing node in four costs in calls/s (measured next to four
//! healthy nodes in the same run).

use std::time::{Duration, Instant};

use flotilla_proto as pb;
use flotilla_tests::{demo_server, Cluster, NodeSpec, NODE_TTL_MS};
use serde_json::json;

fn node(name: &str, zone: &str, slots: u32) -> NodeSpec {
    let mut n = NodeSpec::demo(name).label("zone", zone);
    n.servers = vec![demo_server("demo", slots)];
    n
}

/// The node each task's current attempt runs on, when every one of them runs.
async fn running_on(agent: &mut flotilla_tests::Agent, ids: &[String]) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for id in ids {
        let t = agent
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await
            .ok()?
            .into_inner();
        if t.state != pb::TaskState::Running as i32 {
            return None;
        }
        out.push(t.attempts.last()?.node_id.clone());
    }
    Some(out)
}

pub(crate) async fn node_loss(trials: usize, tasks: usize) -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    let slots = tasks as u32;
    // Plenty of room on the doomed node, so its zone keeps winning as it fills.
    c.add_node(node("doomed", "a", 4 * slots)).await?;
    c.add_node(node("survivor", "b", slots)).await?;
    let mut agent = c.agent();
    let mut took = Vec::new();
    for trial in 0..trials {
        // Zone a is preferred, so every task starts on the doomed node.
        let mut ids = Vec::new();
        for _ in 0..tasks {
            let req = pb::SubmitTaskRequest {
                tool: "sleep".into(),
                arguments: serde_json::to_vec(&json!({"ms": 600_000, "steps": 600}))?,
                options: Some(pb::TaskOptions {
                    placement: Some(pb::PlacementConstraints {
                        zone: "a".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            ids.push(agent.submit_task(req).await?.into_inner().task_id);
        }
        // Placement is by score, so a task may start on the survivor: follow the doomed ones.
        let doomed: Vec<String> = loop {
            if let Some(nodes) = running_on(&mut agent, &ids).await {
                break ids
                    .iter()
                    .zip(nodes)
                    .filter(|(_, n)| n == "doomed")
                    .map(|(id, _)| id.clone())
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        anyhow::ensure!(!doomed.is_empty(), "no task started on the doomed node");
        let killed = Instant::now();
        if let Some(p) = c.nodes.get_mut("doomed") {
            p.kill();
        }
        loop {
            if let Some(nodes) = running_on(&mut agent, &doomed).await {
                if nodes.iter().all(|n| n == "survivor") {
                    break;
                }
            }
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(120),
                "tasks never moved"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ms = killed.elapsed().as_secs_f64() * 1000.0;
        eprintln!("trial {trial}: {} tasks moved in {ms:.0} ms", doomed.len());
        took.push(ms);
        for id in ids {
            let _ = agent
                .cancel_task(pb::CancelTaskRequest { task_id: id })
                .await;
        }
        c.add_node(node("doomed", "a", 4 * slots)).await?;
    }
    took.sort_by(f64::total_cmp);
    let p = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    println!(
        "node TTL {NODE_TTL_MS} ms, {tasks} read-only tasks on the killed node, {trials} trials: kill -9 to all running elsewhere p50 {:.0} ms, max {:.0} ms (TTL excluded: p50 {:.0} ms)",
        p(0.5),
        p(1.0),
        p(0.5) - NODE_TTL_MS as f64
    );
    Ok(())
}

/// Calls made by `agents` concurrent callers until `calls` ended; returns (calls/s,
/// failed calls, attempts beyond the first).
async fn drive(c: &Cluster, agents: usize, calls: usize) -> anyhow::Result<(f64, usize, usize)> {
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..agents {
        let mut agent = c.agent();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let (mut failed, mut extra) = (0, 0);
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                let req = pb::SubmitTaskRequest {
                    tool: "echo".into(),
                    arguments: serde_json::to_vec(&json!({"text": "x"}))?,
                    options: Some(pb::TaskOptions {
                        retry: Some(pb::RetryPolicy {
                            max_attempts: 4,
                            initial_backoff_ms: 20,
                            retry_on: vec![pb::FailureKind::ToolError as i32],
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let id = agent.submit_task(req).await?.into_inner().task_id;
                let mut events = agent
                    .watch_task(pb::WatchTaskRequest {
                        task_id: id.clone(),
                        from_seq: 1,
                    })
                    .await?
                    .into_inner();
                while let Some(ev) = events.message().await? {
                    if ev.is_terminal() {
                        break;
                    }
                }
                let t = agent
                    .get_task(pb::GetTaskRequest { task_id: id })
                    .await?
                    .into_inner();
                if t.state != pb::TaskState::Succeeded as i32 {
                    failed += 1;
                }
                extra += t.attempts.len().saturating_sub(1);
            }
            anyhow::Ok((failed, extra))
        }));
    }
    let (mut failed, mut extra) = (0, 0);
    for w in workers {
        let (f, e) = w.await??;
        failed += f;
        extra += e;
    }
    Ok((
        calls as f64 / started.elapsed().as_secs_f64(),
        failed,
        extra,
    ))
}

pub(crate) async fn failing(agents: usize, calls: usize) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for (broken, breaker) in [(false, true), (true, true), (true, false)] {
        let opts = flotilla_tests::Options {
            breaker_failures: if breaker {
                flotilla_common::config::defaults::BREAKER_FAILURES
            } else {
                u32::MAX
            },
            ..Default::default()
        };
        let mut c = Cluster::with_options(1, opts).await?;
        for i in 0..4 {
            let mut n = node(&format!("n{i}"), "a", 16);
            if broken && i == 0 {
                n.servers[0]
                    .env
                    .insert("FLOTILLA_DEMO_BROKEN".into(), "1".into());
            }
            c.add_node(n).await?;
        }
        let (rate, failed, extra) = drive(&c, agents, calls).await?;
        rows.push((broken, breaker, rate, failed, extra));
    }
    println!("agents: {agents}, calls per run: {calls}, tool: echo with retry (4 attempts on tool errors)");
    println!();
    println!("| nodes | calls/s | calls failed | retries |");
    println!("|---|---|---|---|");
    for (broken, breaker, rate, failed, extra) in &rows {
        let what = match (broken, breaker) {
            (false, _) => "4 healthy",
            (true, true) => "3 healthy + 1 failing every call",
            (true, false) => "3 healthy + 1 failing, breaker off",
        };
        println!("| {what} | {rate:.0} | {failed} | {extra} |");
    }
    println!();
    println!(
        "throughput ratio to all healthy: one failing {:.2}, one failing without the breaker {:.2}",
        rows[1].2 / rows[0].2,
        rows[2].2 / rows[0].2
    );
    Ok(())
}
