//! The leader's side of placement: the scheduling chore's passes, a submission placed the
//! moment it arrives, the bookkeeping they share (placements decided but not yet applied,
//! tenants seen active), and sending a committed assignment to its node. What to place
//! where is decided by the pure planner in this module's parent.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use super::{place, plan_from, Context, InFlight, Limits, Placement, SAMPLE_ALL};
use crate::state::{Command, Response, State};

/// How long a tenant counts as active after it last had work queued or running.
pub const TENANT_ACTIVE_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// Tenants seen with work in the last `TENANT_ACTIVE_WINDOW`, as this leader saw them (a
/// new leader starts empty and learns within one pass of each tenant's next task).
#[derive(Default)]
pub struct ActiveTenants(HashMap<String, std::time::Instant>);

impl ActiveTenants {
    /// Notes the tenants with queued or running work now; returns how many are active.
    pub fn update(&mut self, state: &State, now: std::time::Instant) -> usize {
        for t in state
            .index
            .queue
            .keys()
            .chain(state.index.active_by_tenant.keys())
        {
            match self.0.get_mut(t) {
                Some(at) => *at = now,
                None => {
                    self.0.insert(t.clone(), now);
                }
            }
        }
        self.0
            .retain(|_, at| now.saturating_duration_since(*at) < TENANT_ACTIVE_WINDOW);
        self.0.len()
    }
}

/// The leader's placement bookkeeping shared by the scheduling loop and submissions placed
/// at once: placements decided but not yet applied (so two placers never count the same
/// free slot twice), and the tenants seen active. Cheap to clone.
#[derive(Clone, Default)]
pub struct Placing(Arc<Mutex<PlacingState>>);

#[derive(Default)]
struct PlacingState {
    tenants: ActiveTenants,
    /// (tenant, node, server) → placements being committed.
    reserved: BTreeMap<(String, String, String), u32>,
}

impl PlacingState {
    /// What is being committed, beyond what the state counts.
    fn in_flight(&self) -> InFlight {
        let mut f = InFlight::default();
        for ((tenant, node, server), n) in &self.reserved {
            let p = Placement {
                node_id: node.clone(),
                server: server.clone(),
            };
            f.add(tenant, &p, *n);
        }
        f
    }
}

/// A placement being committed; its slot stays counted until this is dropped (after the
/// commit returns, when the state holds the assignment or its refusal).
pub struct Reservation {
    placing: Placing,
    key: (String, String, String),
}

impl Placing {
    fn lock(&self) -> std::sync::MutexGuard<'_, PlacingState> {
        self.0.lock().expect("placing lock")
    }

    fn reserve(&self, st: &mut PlacingState, tenant: &str, p: &Placement) -> Reservation {
        let key = (tenant.to_owned(), p.node_id.clone(), p.server.clone());
        *st.reserved.entry(key.clone()).or_default() += 1;
        Reservation {
            placing: self.clone(),
            key,
        }
    }

    /// Forgets the tenants seen (this hub stopped leading).
    fn reset(&self) {
        self.lock().tenants = ActiveTenants::default();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut st = self.placing.lock();
        if let Some(n) = st.reserved.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                st.reserved.remove(&self.key);
            }
        }
    }
}

/// A submission placed before it was committed: it commits as one entry with its
/// assignment (`command`), and `dispatch` sends the assignment once it is applied.
pub struct Placed {
    task_id: String,
    placement: Placement,
    at_ms: i64,
    _reservation: Reservation,
}

/// On the leader, places a task being submitted when nothing is queued (so no one waits
/// behind it) and a node can take it now: one entry instead of two for the common call.
/// Anything else (a fan-out, a retry backoff, paused scheduling, no free node) goes the
/// usual way, through the queue and the next pass.
pub fn at_submission(hub: &crate::cluster::Hub, cmd: &Command) -> Option<Placed> {
    let Command::SubmitTask(task) = cmd else {
        return None;
    };
    if task.spec.replicas > 1
        || task.parent.is_some()
        || task.workflow.is_some()
        || task.not_before_ms.is_some()
        || !hub.is_leader()
    {
        return None;
    }
    let live = hub.sessions.snapshot();
    let mut st = hub.placing.lock();
    let state = hub.state();
    if state.scheduling_paused
        || state.index.queue.values().any(|q| !q.is_empty())
        || state.tasks.contains_key(&task.id)
    {
        return None;
    }
    let now_ms = flotilla_common::now_ms();
    let mut active_tenants = st.tenants.update(&state, std::time::Instant::now());
    if !st.tenants.0.contains_key(&task.tenant) {
        active_tenants += 1;
    }
    let cx = Context {
        live: &live,
        limits: limits(hub),
        now_ms,
        active_tenants,
        sample_above: SAMPLE_ALL,
    };
    let in_flight = st.in_flight();
    let placement = place(&state, &cx, &in_flight, task, &mut rand::thread_rng()).ok()?;
    drop(state);
    let reservation = hub.placing.reserve(&mut st, &task.tenant, &placement);
    Some(Placed {
        task_id: task.id.clone(),
        placement,
        at_ms: now_ms,
        _reservation: reservation,
    })
}

impl Placed {
    /// The submission `cmd` with its assignment, to commit as one entry.
    pub fn command(&self, cmd: Command) -> Command {
        Command::Batch(vec![
            cmd,
            Command::AssignTask {
                task_id: self.task_id.clone(),
                node_id: self.placement.node_id.clone(),
                server: self.placement.server.clone(),
                at_ms: self.at_ms,
            },
        ])
    }

    /// Sends the assignment if it was applied; returns what the submission answered.
    pub async fn dispatch(self, hub: &crate::cluster::Hub, answer: Response) -> Response {
        let Response::Batch(mut answers) = answer else {
            return answer;
        };
        let assigned = answers.pop();
        let submitted = answers.pop();
        match assigned {
            Some(Response::Assigned { attempt, fence }) => {
                send_assignment(hub, &self.task_id, &self.placement, attempt, fence).await;
            }
            other => tracing::debug!(
                task_id = self.task_id,
                ?other,
                "placement at submission not applied"
            ),
        }
        submitted.unwrap_or(Response::Rejected(crate::state::Rejection::NotBatchable))
    }
}

/// The scheduling chore: a pass whenever something changed (or every 250 ms, which also
/// ends retry backoffs), while this hub is the leader.
pub(crate) struct Scheduling;

impl crate::chores::Chore for Scheduling {
    fn period(&self) -> std::time::Duration {
        std::time::Duration::from_millis(250)
    }

    fn on_wake(&self) -> bool {
        true
    }

    async fn run(&mut self, hub: &crate::cluster::Hub) {
        pass(hub).await;
    }

    fn idle(&mut self, hub: &crate::cluster::Hub) {
        hub.placing.reset();
    }
}

pub fn limits(hub: &crate::cluster::Hub) -> Limits {
    Limits {
        breaker_failures: hub.config().breaker_failures,
        breaker_cooldown_ms: hub.config().breaker_cooldown_ms,
        tenant_slot_share: hub.config().limits.tenant_slot_share,
    }
}

async fn pass(hub: &crate::cluster::Hub) {
    let live = hub.sessions.snapshot();
    let plans: Vec<(String, Placement, Reservation)> = {
        let mut st = hub.placing.lock();
        let state = hub.state();
        if state.scheduling_paused {
            let waiting = state
                .index
                .queue
                .values()
                .flatten()
                .map(|k| (k.2.clone(), "scheduling is paused by an admin".to_owned()))
                .collect();
            hub.pending.set_many(waiting);
            return;
        }
        let cx = Context {
            live: &live,
            limits: limits(hub),
            now_ms: flotilla_common::now_ms(),
            active_tenants: st.tenants.update(&state, std::time::Instant::now()),
            sample_above: SAMPLE_ALL,
        };
        let in_flight = st.in_flight();
        let plan = plan_from(&state, &cx, in_flight, &mut rand::thread_rng());
        hub.pending.set_many(plan.waiting);
        plan.assign
            .into_iter()
            .map(|(id, p)| {
                let tenant = state.tasks.get(&id).map_or("", |t| t.tenant.as_str());
                let r = hub.placing.reserve(&mut st, tenant, &p);
                (id, p, r)
            })
            .collect()
    };
    let writes = plans
        .into_iter()
        .map(|(task_id, p, reservation)| async move {
            hub.pending.clear(&task_id);
            let cmd = Command::AssignTask {
                task_id: task_id.clone(),
                node_id: p.node_id.clone(),
                server: p.server.clone(),
                at_ms: flotilla_common::now_ms(),
            };
            let written = hub.write(cmd).await;
            drop(reservation);
            match written {
                Ok(Response::Assigned { attempt, fence }) => {
                    send_assignment(hub, &task_id, &p, attempt, fence).await
                }
                Ok(other) => tracing::debug!(task_id, ?other, "assignment not committed"),
                Err(e) => tracing::warn!(task_id, error = %e, "assignment not committed"),
            }
        });
    futures::future::join_all(writes).await;
}

/// Sends a committed assignment to its node; if the node's session is gone, the node never
/// ran it, so the task goes back to the queue.
async fn send_assignment(
    hub: &crate::cluster::Hub,
    task_id: &str,
    p: &Placement,
    attempt: u32,
    fence: u64,
) {
    fail::fail_point!(crate::faults::ASSIGN_BEFORE_SEND);
    let msg = {
        let state = hub.state();
        match state.tasks.get(task_id) {
            Some(t) => {
                let trace = crate::trace::assignment(t, &p.node_id, &p.server, attempt, true);
                let once = !state.safe_to_rerun(t);
                crate::convert::assign_message(t, &p.server, attempt, fence, once, trace)
            }
            None => return,
        }
    };
    tracing::debug!(task_id, node_id = %p.node_id, server = %p.server, attempt, fence, "task assigned");
    if hub.sessions.send(&p.node_id, msg) {
        return;
    }
    let cmd = Command::RequeueTask {
        task_id: task_id.to_owned(),
        attempt,
        fence,
        at_ms: flotilla_common::now_ms(),
        reason: format!(
            "node {} disconnected before the assignment reached it",
            p.node_id
        ),
    };
    if let Err(e) = hub.write(cmd).await {
        tracing::warn!(task_id, error = %e, "requeue not committed");
    }
}
