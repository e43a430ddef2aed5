//! Waits: poll with a deadline until something holds (never a bare sleep).

use std::{
    future::Future,
    time::{Duration, Instant},
};

use anyhow::bail;
use flotilla_proto as pb;

use crate::{Admin, Agent};

/// How long readiness waits may take before a test fails.
pub const READY: Duration = Duration::from_secs(60);

/// Polls `f` every 50 ms until it returns `Some`, failing after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Watches a task from `from_seq` until the stream ends; returns every event.
pub async fn watch_all(
    agent: &Agent,
    id: &str,
    from_seq: u64,
) -> anyhow::Result<Vec<pb::TaskEvent>> {
    let mut stream = agent
        .clone()
        .watch_task(pb::WatchTaskRequest {
            task_id: id.to_owned(),
            from_seq,
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(ev) = stream.message().await? {
        events.push(ev);
    }
    Ok(events)
}

/// Polls task `id` until `done` holds for it; returns it.
pub async fn wait_task_where(
    agent: &Agent,
    id: &str,
    what: &str,
    done: impl Fn(&pb::Task) -> bool,
) -> anyhow::Result<pb::Task> {
    wait_until(&format!("task {id} {what}"), READY, || {
        let mut agent = agent.clone();
        let id = id.to_owned();
        let done = &done;
        async move {
            let t = agent
                .get_task(pb::GetTaskRequest { task_id: id })
                .await
                .ok()?
                .into_inner();
            done(&t).then_some(t)
        }
    })
    .await
}

/// Polls a task until it ended; returns it.
pub async fn wait_done(agent: &Agent, id: &str) -> anyhow::Result<pb::Task> {
    wait_task_where(agent, id, "to end", |t| {
        pb::TaskState::try_from(t.state).is_ok_and(pb::TaskState::is_terminal)
    })
    .await
}

/// Polls a task until the scheduler says why it waits; returns it.
pub async fn wait_pending(agent: &Agent, id: &str) -> anyhow::Result<pb::Task> {
    wait_task_where(agent, id, "to show why it waits", |t| {
        !t.pending_reason.is_empty()
    })
    .await
}

/// Polls a task until it is in `want`; returns it.
pub async fn wait_state(agent: &Agent, id: &str, want: pb::TaskState) -> anyhow::Result<pb::Task> {
    wait_task_where(agent, id, &format!("to be {want:?}"), |t| {
        t.state == want as i32
    })
    .await
}

/// Polls the cluster status as the hub behind `admin` sees it until `ok` holds; returns it.
pub async fn wait_status(
    admin: &Admin,
    what: &str,
    ok: impl Fn(&pb::ClusterStatusResponse) -> bool,
) -> anyhow::Result<pb::ClusterStatusResponse> {
    wait_until(what, READY, || {
        let mut admin = admin.clone();
        let ok = &ok;
        async move {
            let s = admin
                .cluster_status(pb::ClusterStatusRequest {})
                .await
                .ok()?
                .into_inner();
            ok(&s).then_some(s)
        }
    })
    .await
}

/// Submits `req` until a hub acknowledges it, as a client would while a cluster elects
/// a leader (give it an idempotency key so a repeat is the same task); returns the task id.
pub async fn submit_until_acknowledged(
    agent: &Agent,
    req: pb::SubmitTaskRequest,
) -> anyhow::Result<String> {
    let what = format!("a hub to acknowledge {:?}", req.idempotency_key);
    wait_until(&what, READY, || {
        let mut agent = agent.clone();
        let req = req.clone();
        async move {
            agent
                .submit_task(req)
                .await
                .ok()
                .map(|r| r.into_inner().task_id)
        }
    })
    .await
}

/// Polls a workflow until it ended; returns it.
pub async fn wait_workflow_done(agent: &Agent, id: &str) -> anyhow::Result<pb::Workflow> {
    wait_until(&format!("workflow {id} to end"), READY, || {
        let mut agent = agent.clone();
        let id = id.to_owned();
        async move {
            let w = agent
                .get_workflow(pb::GetWorkflowRequest { workflow_id: id })
                .await
                .ok()?
                .into_inner();
            (w.state != pb::WorkflowState::Running as i32).then_some(w)
        }
    })
    .await
}
