//! Finished work: tasks that ended leave the hubs' memory for the history store on disk,
//! stay readable on every hub (after a restart, and on a hub that caught up through a
//! snapshot install), and expire when the retention says so.

use flotilla_proto as pb;
use flotilla_tests::{
    metric_sample, result_text, wait_until, Agent, Cluster, NodeSpec, Options, READY,
};
use serde_json::json;

/// Makes `n` echo calls named `{prefix}{i}`; their task ids, in order.
async fn calls(
    c: &Cluster,
    agent: &mut Agent,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for i in 0..n {
        let t = c
            .call(agent, "echo", json!({"text": format!("{prefix}{i}")}))
            .await?;
        assert_eq!(t.state(), pb::TaskState::Succeeded, "{t:?}");
        ids.push(t.id);
    }
    Ok(ids)
}

/// Every task of `ids` reads back from hub `hub` with its result.
async fn readable(c: &Cluster, hub: u64, ids: &[String], prefix: &str) -> anyhow::Result<()> {
    let mut a = c.agent_at(hub, &c.admin_token);
    for (i, id) in ids.iter().enumerate() {
        let t = a
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(t.state(), pb::TaskState::Succeeded, "hub {hub}: {t:?}");
        assert_eq!(result_text(&t), format!("{prefix}{i}"), "hub {hub}");
    }
    Ok(())
}

#[tokio::test]
async fn finished_tasks_stay_readable_on_every_hub_across_restarts_and_snapshots_then_expire(
) -> anyhow::Result<()> {
    let opts = Options {
        // Snapshots every 20 entries (a call is three), so a stopped hub falls behind the
        // log and catches up through a snapshot install.
        snapshot_logs: 20,
        retention_max_tasks: 30,
        ..Default::default()
    };
    let mut c = Cluster::with_options(3, opts).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent_at(2, &c.admin_token);

    let first = calls(&c, &mut agent, "a", 10).await?;
    for hub in 1..=3 {
        readable(&c, hub, &first, "a").await?;
    }
    // Listed newest first, finished ones included.
    let listed = agent
        .list_tasks(pb::ListTasksRequest {
            limit: 5,
            ..Default::default()
        })
        .await?
        .into_inner()
        .tasks;
    let ids: Vec<&str> = listed.iter().map(|t| t.id.as_str()).collect();
    let newest: Vec<&str> = first.iter().rev().take(5).map(String::as_str).collect();
    assert_eq!(ids, newest);

    // Hub 3 misses ten calls and comes back through a snapshot that carries the store.
    c.kill_hub(3);
    let second = calls(&c, &mut agent, "b", 10).await?;
    c.start_hub(3).await?;
    let last = second.last().cloned().unwrap_or_default();
    let three = c.agent_at(3, &c.admin_token);
    wait_until("hub 3 to catch up", READY, || {
        let mut three = three.clone();
        let last = last.clone();
        async move {
            three
                .get_task(pb::GetTaskRequest { task_id: last })
                .await
                .ok()
        }
    })
    .await?;
    assert!(
        c.hub(3).proc.log_text().contains("install snapshot"),
        "hub 3 caught up through a snapshot"
    );
    readable(&c, 3, &first, "a").await?;
    readable(&c, 3, &second, "b").await?;

    // Hub 1 killed -9 and started again: its store and state come back from its disk.
    c.kill_hub(1);
    c.start_hub(1).await?;
    c.wait_leader().await?;
    readable(&c, 1, &first, "a").await?;
    readable(&c, 1, &second, "b").await?;

    // Twenty more: forty finished, ten over the limit of thirty, so the oldest expire.
    let third = calls(&c, &mut agent, "c", 20).await?;
    for hub in 1..=3 {
        let mut a = c.agent_at(hub, &c.admin_token);
        let gone = first[0].clone();
        let status = wait_until("the oldest task to expire", READY, || {
            let mut a = a.clone();
            let gone = gone.clone();
            async move { a.get_task(pb::GetTaskRequest { task_id: gone }).await.err() }
        })
        .await?;
        assert_eq!(
            status.code(),
            tonic::Code::NotFound,
            "hub {hub}: {status:?}"
        );
        let msg = status.message();
        assert!(
            msg.contains("expired") || msg.contains("no task"),
            "hub {hub}: {msg}"
        );
        readable(&c, hub, &third, "c").await?;
        let t = a
            .get_task(pb::GetTaskRequest {
                task_id: third[0].clone(),
            })
            .await?
            .into_inner();
        assert_eq!(result_text(&t), "c0");
    }
    Ok(())
}

/// Expired records leave the disk once enough of them wait, not only when `snapshot_logs`
/// entries have passed: the hub snapshots early to purge them (the threshold is lowered
/// to one for the test, so the last expiry's tombstones go too; `snapshot_logs` is set so
/// high that no snapshot would come otherwise).
#[tokio::test]
async fn expired_work_is_purged_without_waiting_for_snapshot_logs() -> anyhow::Result<()> {
    let mut opts = Options {
        snapshot_logs: 1_000_000,
        retention_max_tasks: 5,
        ..Default::default()
    };
    opts.hub_env.insert(
        1,
        vec![("FLOTILLA_TOMBSTONES_FOR_SNAPSHOT".into(), "1".into())],
    );
    let mut c = Cluster::with_options(1, opts).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent_at(1, &c.admin_token);
    let ids = calls(&c, &mut agent, "p", 30).await?;
    let http = c.hub(1).http()?;
    // Twenty-five expire; each expiry is a tombstone until a snapshot covers it, and the
    // gauge reads zero only once they are purged.
    let kept = wait_until("the expired calls to be purged", READY, || {
        let http = http.clone();
        async move {
            let (_, body) = flotilla_tests::http_get(&http, "/metrics").await.ok()?;
            let records = metric_sample(&body, "flotilla_history_records", &[])?;
            (records == 5.0 && metric_sample(&body, "flotilla_history_tombstones", &[])? == 0.0)
                .then_some(records)
        }
    })
    .await?;
    assert_eq!(kept, 5.0);
    // Purged: no longer known at all (an expired record not yet purged reads "expired"),
    // while the newest five still read back.
    for id in &ids[..25] {
        let status = agent
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await
            .expect_err("purged");
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(!status.message().contains("expired"), "{status:?}");
    }
    for (i, id) in ids[25..].iter().enumerate() {
        let t = agent
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(result_text(&t), format!("p{}", 25 + i));
    }
    Ok(())
}
