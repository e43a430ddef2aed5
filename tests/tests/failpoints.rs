//! Crashes at the exact lines that only timing reaches otherwise, through the hub's
//! failpoints (`hub/src/faults.rs`; the harness builds the binary with them). A failpoint
//! that fires stops its hub at once, as `kill -9` at that line would. Each test checks the
//! core invariant across the crash: the call reaches exactly one terminal state, its tool
//! ran once, and every hub (the crashed one too, once restarted) tells the same story.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::process::ExitStatusExt,
    path::Path,
};

use flotilla_proto as pb;
use flotilla_tests::{
    check_every_acknowledged_task_ran_once, record_call, recording_node, result_text, submit,
    submit_until_acknowledged, wait_done, wait_state, wait_status, wait_until, Cluster, Options,
    READY,
};

/// Three hubs, hub 1 leading with `failpoints` armed, and a node whose `record` tool
/// writes to the returned file.
async fn cluster(failpoints: &str) -> anyhow::Result<(Cluster, std::path::PathBuf)> {
    let opts = Options {
        failpoints: [(1, failpoints.to_owned())].into_iter().collect(),
        ..Options::default()
    };
    let mut c = Cluster::with_options(3, opts).await?;
    anyhow::ensure!(
        c.wait_leader().await? == 1,
        "hub 1 bootstraps the cluster and should lead it"
    );
    let (spec, record) = recording_node(&c, "edge-1");
    c.add_node(spec).await?;
    Ok((c, record))
}

/// Waits until hub `id` stopped, and checks a failpoint stopped it (SIGABRT, with the
/// failpoint's name in its log) rather than anything else.
async fn wait_stopped_at(c: &mut Cluster, id: u64, failpoint: &str) -> anyhow::Result<()> {
    let proc = &mut c.hub_mut(id).proc;
    let status = wait_until(&format!("hub {id} to stop at {failpoint}"), READY, || {
        let st = proc.exited();
        async move { st }
    })
    .await?;
    assert_eq!(status.signal(), Some(6), "stopped by abort: {status:?}");
    let log = proc.log_text();
    assert!(
        log.contains(failpoint),
        "the hub's log names the failpoint that stopped it:\n{log}"
    );
    Ok(())
}

/// How many times the `record` tool ran for `key`.
fn runs(record: &Path, key: &str) -> usize {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == key)
        .count()
}

/// Restarts hub `id` without failpoints and waits until it reports `task` as `want` has it.
async fn restart_and_agree(c: &mut Cluster, id: u64, want: &pb::Task) -> anyhow::Result<()> {
    c.opts.failpoints.remove(&id);
    c.start_hub(id).await?;
    let restarted = c.agent_at(id, &c.admin_token);
    let seen = wait_state(&restarted, &want.id, pb::TaskState::Succeeded).await?;
    assert_eq!(result_text(&seen), result_text(want));
    assert_eq!(seen.attempts.len(), want.attempts.len(), "{seen:?}");
    Ok(())
}

#[tokio::test]
async fn a_leader_that_dies_between_committing_an_assignment_and_sending_it_loses_no_call(
) -> anyhow::Result<()> {
    let (mut c, record) = cluster("hub-assign-before-send=panic").await?;
    let agent = c.agent_at(2, &c.admin_token);
    let key = "assigned-then-crashed";
    let id = submit_until_acknowledged(&agent, record_call(key)).await?;
    // Hub 1 commits the assignment and dies before the node hears of it.
    wait_stopped_at(&mut c, 1, "hub-assign-before-send").await?;

    // The new leader finds the node holding an assignment it never received and sends it
    // again when the node reconnects: the call runs once and succeeds.
    c.hub_addr = c.hub(2).api.clone();
    let t = wait_done(&agent, &id).await?;
    let acked: BTreeMap<String, String> = [(key.to_owned(), id.clone())].into_iter().collect();
    check_every_acknowledged_task_ran_once(&c, 2, &acked, &record).await?;
    assert_eq!(runs(&record, key), 1, "the tool ran once");
    restart_and_agree(&mut c, 1, &t).await
}

#[tokio::test]
async fn a_leader_that_dies_between_committing_a_result_and_acknowledging_it_records_it_once(
) -> anyhow::Result<()> {
    let (mut c, record) = cluster("hub-result-before-ack=panic").await?;
    let agent = c.agent_at(2, &c.admin_token);
    let key = "finished-then-crashed";
    let id = submit_until_acknowledged(&agent, record_call(key)).await?;
    // Hub 1 commits the result and dies before telling the node.
    wait_stopped_at(&mut c, 1, "hub-result-before-ack").await?;

    // The node sends the unacknowledged result again to the next leader, which refuses it:
    // the task already ended. One result, one attempt, one run.
    c.hub_addr = c.hub(2).api.clone();
    let leader = wait_status(&c.admin(), "a new leader", |s| {
        s.leader_id != 0 && s.leader_id != 1
    })
    .await?
    .leader_id;
    let t = wait_done(&agent, &id).await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    assert_eq!(result_text(&t), format!("recorded {key}"));
    assert_eq!(t.attempts.len(), 1, "{:?}", t.attempts);
    let new_leader = &c.hub(leader).proc;
    wait_until(
        "the new leader to refuse the result sent again",
        READY,
        || {
            let seen = new_leader.log_text().contains("stale result refused");
            async move { seen.then_some(()) }
        },
    )
    .await?;
    assert_eq!(runs(&record, key), 1, "the tool ran once");
    restart_and_agree(&mut c, 1, &t).await
}

#[tokio::test]
async fn a_hub_that_dies_inside_the_apply_hook_replays_to_the_state_the_others_have(
) -> anyhow::Result<()> {
    // Hub 2, a follower, stops on the 21st command entry it applies: with the state (and
    // the history store) written and the hooks not run.
    let opts = Options {
        failpoints: [(2, "hub-apply-before-hook=20*off->panic".to_owned())]
            .into_iter()
            .collect(),
        ..Options::default()
    };
    let mut c = Cluster::with_options(3, opts).await?;
    let leader = c.wait_leader().await?;
    assert_ne!(leader, 2, "hub 2 should follow");
    let (spec, record) = recording_node(&c, "edge-1");
    c.add_node(spec).await?;
    let mut agent = c.agent_at(leader, &c.admin_token);
    let mut acked = BTreeMap::new();
    for i in 0..30 {
        let key = format!("call-{i}");
        let id = agent
            .submit_task(record_call(&key))
            .await?
            .into_inner()
            .task_id;
        c.wait_task(&mut agent, &id).await?;
        acked.insert(key, id);
    }
    wait_stopped_at(&mut c, 2, "hub-apply-before-hook").await?;
    check_every_acknowledged_task_ran_once(&c, leader, &acked, &record).await?;

    // Restarted, hub 2 replays its log and ends up where the leader is: every call
    // readable with the leader's answer, and listed once.
    c.opts.failpoints.remove(&2);
    c.start_hub(2).await?;
    let replayed = c.agent_at(2, &c.admin_token);
    for (key, id) in &acked {
        let t = wait_state(&replayed, id, pb::TaskState::Succeeded).await?;
        assert_eq!(result_text(&t), format!("recorded {key}"));
        assert_eq!(t.attempts.len(), 1, "{key}: {:?}", t.attempts);
    }
    let listed = |mut a: flotilla_tests::Agent| async move {
        let tasks = a
            .list_tasks(pb::ListTasksRequest {
                limit: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .tasks;
        anyhow::Ok(tasks.into_iter().map(|t| t.id).collect::<Vec<_>>())
    };
    let on_2 = listed(replayed).await?;
    let on_leader = listed(c.agent_at(leader, &c.admin_token)).await?;
    let distinct: BTreeSet<&String> = on_2.iter().collect();
    assert_eq!(
        distinct.len(),
        on_2.len(),
        "each task listed once: {on_2:?}"
    );
    assert_eq!(on_2, on_leader, "hub 2 lists what the leader lists");
    Ok(())
}

/// A node that comes back just as the leader finds it gone (the leader decided, and the
/// node's hello lands before the leader's "down" does) must end up ready and serving: a
/// node marked down while connected would never be given work again, and every call would
/// wait in the queue (seen in the compose chaos run with a node cut off under load).
#[tokio::test]
async fn a_node_that_returns_just_as_the_leader_marks_it_down_ends_up_ready() -> anyhow::Result<()>
{
    // The leader holds its first "down" for 8 s after deciding it: the node returns then.
    let (c, _record) = cluster("hub-liveness-before-down=1*sleep(8000)").await?;
    let node = &c.nodes["edge-1"];
    node.pause();
    let hub_log = || c.hub(1).proc.log_text();
    wait_until("the leader to find edge-1 gone", READY, || {
        let found = hub_log().contains("node gone past its TTL");
        async move { found.then_some(()) }
    })
    .await?;
    node.resume();
    c.wait_node_connected("edge-1").await?;
    // The node is back (well inside the 8 s); once the leader has acted on its held
    // decision, the node must be ready, connected and running calls.
    wait_until("the leader to act on its decision", READY, || {
        let log = hub_log();
        let acted = log.contains("node marked down")
            || log.contains("node came back before it was marked down");
        async move { acted.then_some(()) }
    })
    .await?;
    let mut agent = c.agent();
    let t = c
        .call(&mut agent, "echo", serde_json::json!({"text": "back"}))
        .await?;
    assert_eq!(result_text(&t), "back", "{t:?}");
    let nodes = c
        .admin()
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    let n = nodes.iter().find(|n| n.id == "edge-1").expect("listed");
    assert!(n.connected && n.status == "ready", "{n:?}");
    // And the race was run: the leader saw the node back before committing it down, or
    // the two crossed and it ended the session for a fresh hello.
    let log = hub_log();
    assert!(
        log.contains("node came back before it was marked down")
            || log.contains("node is marked down but connected"),
        "the node returned while the leader held its decision"
    );
    Ok(())
}

/// A tool that must not run twice is called only once the hub has committed the call's
/// start. Here every start is dropped before its commit (as when the leader dies or the
/// session breaks first): the node waits, sending the start again, and never calls the
/// tool while the task is only assigned (which a hub may send again, or give to another
/// node). Cancelled, the task is dropped by the node without ever running.
#[tokio::test]
async fn a_call_that_must_not_run_twice_waits_for_its_start_to_be_committed() -> anyhow::Result<()>
{
    let (c, record) = cluster("hub-start-before-commit=return").await?;
    let agent = c.agent();
    let key = "unstarted";
    let call = pb::SubmitTaskRequest {
        idempotency_key: key.into(),
        ..submit("record", serde_json::json!({"key": key}))
    };
    let id = submit_until_acknowledged(&agent, call).await?;
    let node_log = || c.nodes["edge-1"].log_text();
    let resent = "the hub has not answered this call's start; sending it again";
    wait_until("edge-1 to send the start again twice", READY, || {
        let n = node_log().matches(resent).count();
        async move { (n >= 2).then_some(()) }
    })
    .await?;
    assert_eq!(runs(&record, key), 0, "the tool was not called");
    let calls = c.node_dir("edge-1").join("calls");
    let written = || std::fs::read_dir(&calls).map(|d| d.count()).unwrap_or(0);
    assert_eq!(written(), 1, "written down before its start was sent");
    let mut a = agent.clone();
    let t = a
        .get_task(pb::GetTaskRequest {
            task_id: id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(t.state(), pb::TaskState::Assigned, "{t:?}");

    a.cancel_task(pb::CancelTaskRequest {
        task_id: id.clone(),
    })
    .await?;
    wait_until("edge-1 to drop the cancelled call", READY, || {
        let n = written();
        async move { (n == 0).then_some(()) }
    })
    .await?;
    assert_eq!(runs(&record, key), 0, "the tool was never called");
    let t = wait_done(&agent, &id).await?;
    assert_eq!(t.state(), pb::TaskState::Cancelled, "{t:?}");
    Ok(())
}

/// A node killed while it runs a tool that must not run twice (the call's start is
/// committed, so the task is running on it) comes back knowing from its journal that the
/// call was in flight: it reports it interrupted instead of running it again, and the task
/// ends lost (seen in the compose chaos run: a `record` call ran twice across a restart of
/// everything).
#[tokio::test]
async fn a_node_restarted_mid_call_reports_the_call_interrupted_and_never_runs_it_again(
) -> anyhow::Result<()> {
    let (mut c, record) = cluster("").await?;
    let agent = c.agent();
    let key = "interrupted";
    let call = pb::SubmitTaskRequest {
        idempotency_key: key.into(),
        // The tool waits before it records, so the node is caught mid-call.
        ..submit(
            "record",
            serde_json::json!({"key": key, "delay_ms": 60_000}),
        )
    };
    let id = submit_until_acknowledged(&agent, call).await?;
    wait_state(&agent, &id, pb::TaskState::Running).await?;
    let calls = c.node_dir("edge-1").join("calls");
    let written = || std::fs::read_dir(&calls).map(|d| d.count()).unwrap_or(0);
    assert_eq!(written(), 1, "the call is written down while it runs");

    c.nodes.remove("edge-1").expect("edge-1").kill();
    let (spec, _) = recording_node(&c, "edge-1");
    c.add_node(spec).await?;
    let t = wait_done(&agent, &id).await?;
    assert_eq!(t.state(), pb::TaskState::Lost, "{t:?}");
    assert!(
        t.error.contains("stopped while the call ran"),
        "{}",
        t.error
    );
    assert_eq!(t.attempts.len(), 1, "{:?}", t.attempts);
    assert_eq!(runs(&record, key), 0, "the call was not run again");
    // The hub acknowledged the report: the node forgets the call.
    wait_until("edge-1 to forget the reported call", READY, || {
        let n = written();
        async move { (n == 0).then_some(()) }
    })
    .await?;
    Ok(())
}

/// A node whose join was committed but never answered (the hub died in between) asks
/// again with the same token and key, and joins: not "name taken", even though the
/// token's only use is spent.
#[tokio::test]
async fn a_node_whose_join_answer_was_lost_joins_when_it_asks_again() -> anyhow::Result<()> {
    // edge-1 joins as usual; hub 1 dies answering the next join.
    let (mut c, _record) = cluster("hub-join-before-answer=1*off->panic").await?;
    let (spec, _) = recording_node(&c, "edge-2");
    let config = c.write_node_config(&spec).await?;
    let node = flotilla_tests::Proc::spawn(
        "edge-2",
        &["node", "--config", config.to_str().unwrap_or_default()],
        &c.node_dir("edge-2").join("node.log"),
    )?;
    c.nodes.insert("edge-2".into(), node);
    wait_stopped_at(&mut c, 1, "hub-join-before-answer").await?;

    // The node keeps asking hub 1, the only hub it knows before it has joined.
    c.opts.failpoints.remove(&1);
    c.start_hub(1).await?;
    c.wait_node_connected("edge-2").await?;
    let log = c.nodes["edge-2"].log_text();
    assert!(log.contains("joined the cluster"), "{log}");
    assert!(!log.contains("join refused"), "{log}");
    let t = c
        .call(
            &mut c.agent(),
            "echo",
            serde_json::json!({"text": "joined"}),
        )
        .await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    Ok(())
}
