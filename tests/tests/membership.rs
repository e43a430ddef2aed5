//! Changing and restarting the hub cluster while agents keep submitting: snapshots for hubs
//! that fell behind, adding and removing hubs, rolling restarts, restarting everything.

use flotilla_proto as pb;
use flotilla_tests::{
    check_every_acknowledged_task_ran_once, recording_node, result_text, wait_status, wait_until,
    Cluster, Load, NodeSpec, Options, READY,
};
use serde_json::json;

/// Waits until every member of `c` holds everything the leader held when the wait began
/// (in the leader's view). Under load the leader keeps appending, so "lag 0 for every
/// member at once" is a moment a poll may keep missing; caught up to a fixed point is what
/// converging means.
async fn converged(c: &Cluster, members: usize) -> anyhow::Result<()> {
    let admin = c.admin();
    let target = std::sync::Mutex::new(None::<u64>);
    let target = &target;
    wait_until("the cluster to converge", READY, || {
        let mut admin = admin.clone();
        async move {
            let s = admin
                .cluster_status(pb::ClusterStatusRequest {})
                .await
                .ok()?
                .into_inner();
            if s.leader_id == 0 || s.members.len() != members {
                return None;
            }
            let want = *target
                .lock()
                .expect("target lock")
                .get_or_insert(s.last_log_index.max(1));
            s.members
                .iter()
                .all(|m| m.matched_index >= want)
                .then_some(())
        }
    })
    .await
}

/// Finished calls made while a hub is down: enough that the snapshot it needs carries
/// thousands of finished tasks (about a kibibyte of result each) from the history store.
const CALLS: usize = 2_000;
const WORKERS: usize = 32;

/// Every finished task in `done` (id, result text) reads back whole through `agent`.
async fn all_there(
    mut agent: flotilla_tests::Agent,
    done: &[(String, String)],
) -> anyhow::Result<()> {
    for (id, text) in done {
        let t = agent
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await?
            .into_inner();
        anyhow::ensure!(&result_text(&t) == text, "{t:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_hub_far_behind_and_a_new_hub_catch_up_from_a_snapshot() -> anyhow::Result<()> {
    let mut c = Cluster::with_options(
        3,
        Options {
            snapshot_logs: 20,
            ..Default::default()
        },
    )
    .await?;
    let mut spec = NodeSpec::demo("edge-1");
    spec.servers[0].max_concurrency = WORKERS as u32;
    c.add_node(spec).await?;
    let leader = c.wait_leader().await?;
    let behind = (1..=3).find(|h| *h != leader).expect("a follower");
    c.kill_hub(behind);

    // Enough writes for many snapshots; the log behind them is purged.
    let pad = "x".repeat(1024);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let mut agent = c.agent();
        let pad = pad.clone();
        workers.spawn(async move {
            let mut done = Vec::new();
            for i in (w..CALLS).step_by(WORKERS) {
                let text = format!("n{i} {pad}");
                let id = agent
                    .submit_task(pb::SubmitTaskRequest {
                        tool: "echo".into(),
                        arguments: serde_json::to_vec(&json!({ "text": text }))?,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .task_id;
                let t = flotilla_tests::wait_done(&agent, &id).await?;
                anyhow::ensure!(result_text(&t) == text, "{t:?}");
                done.push((id, text));
            }
            anyhow::Ok(done)
        });
    }
    let mut done = Vec::new();
    while let Some(w) = workers.join_next().await {
        done.extend(w??);
    }
    assert_eq!(done.len(), CALLS);

    // The hub that was down comes back and gets the state (a snapshot, then the log tail).
    c.start_hub(behind).await?;
    converged(&c, 3).await?;
    all_there(c.agent_at(behind, &c.admin_token), &done).await?;
    assert!(
        c.hub(behind).proc.log_text().contains("install snapshot"),
        "the lagging hub caught up through a snapshot"
    );

    // A brand-new hub is added and catches up the same way.
    c.add_hub(4).await?;
    converged(&c, 4).await?;
    all_there(c.agent_at(4, &c.admin_token), &done).await?;
    assert!(c.hub(4).proc.log_text().contains("install snapshot"));
    Ok(())
}

#[tokio::test]
async fn membership_changes_under_load_keep_every_acknowledged_task() -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    let (spec, record) = recording_node(&c, "edge-1");
    c.add_node(spec).await?;
    let load = Load::start(&c, 3);
    load.wait_more(20).await?;

    // Grow to four hubs, then remove the current leader.
    c.add_hub(4).await?;
    load.wait_more(20).await?;
    let leader = c.wait_leader().await?;
    c.remove_hub(leader).await?;
    load.wait_more(20).await?;
    let acked = load.stop().await?;

    let status = c
        .admin()
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner();
    let ids: Vec<u64> = status.members.iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(!ids.contains(&leader) && ids.contains(&4), "{ids:?}");
    assert_ne!(status.leader_id, leader);
    let any = status.members[0].id;
    check_every_acknowledged_task_ran_once(&c, any, &acked, &record).await
}

#[tokio::test]
async fn a_rolling_restart_under_load_fails_no_request_for_good() -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    let (spec, record) = recording_node(&c, "edge-1");
    c.add_node(spec).await?;
    let load = Load::start(&c, 3);
    load.wait_more(10).await?;
    for id in 1..=3 {
        c.hub_mut(id).proc.terminate();
        load.wait_more(5).await?;
        // Clients of the admin API follow the hubs that are up.
        c.hub_addr = c
            .hubs
            .iter()
            .find(|h| h.id != id)
            .expect("another hub")
            .api
            .clone();
        c.start_hub(id).await?;
        converged(&c, 3).await?;
        load.wait_more(5).await?;
    }
    let acked = load.stop().await?;
    check_every_acknowledged_task_ran_once(&c, 1, &acked, &record).await
}

#[tokio::test]
async fn restarting_every_hub_at_once_brings_every_task_and_node_back() -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    let (spec, record) = recording_node(&c, "edge-1");
    c.add_node(spec).await?;
    let load = Load::start(&c, 2);
    load.wait_more(20).await?;
    let acked = load.stop().await?;
    check_every_acknowledged_task_ran_once(&c, 1, &acked, &record).await?;

    for id in 1..=3 {
        c.kill_hub(id);
    }
    for id in 1..=3 {
        c.start_hub(id).await?;
    }
    c.wait_leader().await?;
    // Every task, with its result, and the node are back from disk.
    check_every_acknowledged_task_ran_once(&c, 2, &acked, &record).await?;
    c.wait_node_connected("edge-1").await?;
    let mut agent = c.agent();
    let t = c
        .call(&mut agent, "record", json!({"key": "after-restart"}))
        .await?;
    assert_eq!(result_text(&t), "recorded after-restart");
    Ok(())
}

/// Waits until the cluster's command level is `want`.
async fn level(c: &Cluster, want: u32) -> anyhow::Result<pb::ClusterStatusResponse> {
    wait_status(&c.admin(), &format!("command level {want}"), |s| {
        s.command_level == want
    })
    .await
}

/// A rolling upgrade: while one hub still runs an older build (played here by a test build
/// of this one that reports the command level of the builds before roles), the cluster
/// writes no command that hub could not read: defining a role is refused with a clear
/// error, while tool calls go on. Once that hub runs the new build the cluster's level
/// rises and the role is defined. A hub of an older build than the cluster needs cannot be
/// added at all.
#[tokio::test]
async fn a_rolling_upgrade_writes_no_command_an_older_hub_cannot_apply() -> anyhow::Result<()> {
    let older = vec![("FLOTILLA_COMMAND_LEVEL".to_owned(), "1".to_owned())];
    let opts = Options {
        hub_env: (1..=3).map(|id| (id, older.clone())).collect(),
        ..Options::default()
    };
    // Every hub on the older build; then hubs 1 and 2 get the new one, one at a time.
    let mut c = Cluster::with_options(3, opts).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    for id in [1, 2] {
        c.opts.hub_env.remove(&id);
        c.hub_mut(id).proc.terminate();
        c.hub_addr = c.hub(3).api.clone();
        c.start_hub(id).await?;
    }
    c.hub_addr = c.hub(1).api.clone();
    let st = wait_status(&c.admin(), "hubs 1 and 2 on the new build", |s| {
        let of = |id: u64| {
            s.members
                .iter()
                .find(|m| m.id == id)
                .map(|m| m.command_level)
        };
        let new = Some(flotilla_hub::state::COMMAND_LEVEL);
        (of(1), of(2), of(3)) == (new, new, Some(1))
    })
    .await?;
    assert_eq!(st.command_level, 1, "{st:?}");

    let role = pb::RoleInfo {
        name: "auditor".into(),
        scopes: vec!["admin:read".into()],
        builtin: false,
    };
    let refused = c.admin().set_role(role.clone()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("upgrade every hub"),
        "{}",
        refused.message()
    );
    let t = c
        .call(&mut c.agent(), "echo", json!({"text": "mixed"}))
        .await?;
    assert_eq!(result_text(&t), "mixed");

    // Hub 3 gets the new build.
    c.opts.hub_env.remove(&3);
    c.hub_mut(3).proc.terminate();
    c.start_hub(3).await?;
    level(&c, flotilla_hub::state::COMMAND_LEVEL).await?;
    c.admin().set_role(role).await?;
    let roles = c
        .admin()
        .list_roles(pb::ListRolesRequest {})
        .await?
        .into_inner();
    assert!(roles.roles.iter().any(|r| r.name == "auditor"), "{roles:?}");

    // A hub of the older build is not let in any more.
    c.opts.hub_env.insert(4, older);
    let added = c.add_hub(4).await;
    let e = added.expect_err("an older hub is refused");
    assert!(format!("{e:#}").contains("older build"), "{e:#}");
    Ok(())
}
