//! Placement. Only the leader schedules; each assignment is committed through Raft before it
//! is sent to the node.
//!
//! A pass takes queued tasks tenant by tenant, always from the tenant with the fewest tasks
//! in flight (fair share: one tenant's flood cannot starve another), and within a tenant by
//! priority, then age. For each task it looks at the (node, server) pairs offering the tool
//! (an index kept by the state machine), drops those that cannot take it (the filters), and
//! picks the best by score. Beyond `SAMPLE_ALL` candidates it scores a random sample of
//! about log2(n) feasible ones instead of all of them (the power of k choices), so a pass
//! costs in proportion to the tasks it places, not to the fleet. A task no node can take
//! waits, with the reason kept for GetTask.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap},
};

use rand::Rng;

use crate::{
    sessions::LiveNode,
    state::{breaker_key, NodeRecord, NodeStatus, ServerRecord, State, TaskRecord},
};

/// Up to this many candidates, every one is scored.
pub const SAMPLE_ALL: usize = 32;

/// Where a task should run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub node_id: String,
    pub server: String,
}

/// The hub's breaker thresholds and tenant share.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    /// The most of one server's slots a tenant may hold (at least one slot), so another
    /// tenant's call finds one free; 1.0 lets a tenant take them all.
    pub tenant_slot_share: f64,
}

impl Default for Limits {
    fn default() -> Self {
        use flotilla_common::config::defaults;
        Self {
            breaker_failures: defaults::BREAKER_FAILURES,
            breaker_cooldown_ms: defaults::BREAKER_COOLDOWN_MS,
            tenant_slot_share: defaults::TENANT_SLOT_SHARE,
        }
    }
}

/// Tasks in flight beyond what the state's index counts: placed earlier in the current
/// pass, or being committed. Lookups add the two, so planning never copies the index.
#[derive(Clone, Debug, Default)]
pub struct InFlight {
    pub per_server: BTreeMap<(String, String), u32>,
    pub per_tenant: BTreeMap<(String, String, String), u32>,
}

impl InFlight {
    fn add(&mut self, tenant: &str, p: &Placement, n: u32) {
        *self
            .per_server
            .entry((p.node_id.clone(), p.server.clone()))
            .or_default() += n;
        *self
            .per_tenant
            .entry((tenant.to_owned(), p.node_id.clone(), p.server.clone()))
            .or_default() += n;
    }

    /// Tasks assigned or running on `server` of `node`.
    fn on_server(&self, state: &State, node: &str, server: &str) -> u32 {
        let k = (node.to_owned(), server.to_owned());
        let count = |m: &BTreeMap<(String, String), u32>| m.get(&k).copied().unwrap_or(0);
        count(&state.index.active) + count(&self.per_server)
    }

    /// Of those, `tenant`'s.
    fn of_tenant(&self, state: &State, tenant: &str, node: &str, server: &str) -> u32 {
        let k = (tenant.to_owned(), node.to_owned(), server.to_owned());
        let count = |m: &BTreeMap<(String, String, String), u32>| m.get(&k).copied().unwrap_or(0);
        count(&state.index.active_by_tenant_server) + count(&self.per_tenant)
    }
}

/// How many of a server's `slots` one tenant may hold.
pub fn tenant_cap(slots: u32, share: f64) -> u32 {
    ((f64::from(slots) * share).floor() as u32).clamp(1, slots.max(1))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breaker {
    Closed,
    /// Too many failures in a row, recently: no work.
    Open,
    /// The cooldown passed: one trial call at a time.
    HalfOpen,
}

impl Breaker {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// The breaker of one MCP server on one node, now.
pub fn breaker(state: &State, node: &str, server: &str, limits: Limits, now_ms: i64) -> Breaker {
    match state.breakers.get(&breaker_key(node, server)) {
        Some(b) if b.consecutive_failures >= limits.breaker_failures => {
            if now_ms < b.last_failure_ms + limits.breaker_cooldown_ms as i64 {
                Breaker::Open
            } else {
                Breaker::HalfOpen
            }
        }
        _ => Breaker::Closed,
    }
}

/// Why one candidate was passed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Miss {
    NotReady,
    Disconnected,
    Stopping,
    ServerNotReady,
    Tenant,
    Scope,
    Labels,
    ReplicaThere,
    BreakerOpen,
    CpuHigh,
    Full,
    TenantShare,
}

impl Miss {
    fn describe(self) -> &'static str {
        match self {
            Self::NotReady => "cordoned, draining or down",
            Self::Disconnected => "not connected",
            Self::Stopping => "stopping (finishing its calls, taking no new work)",
            Self::ServerNotReady => "MCP server not ready",
            Self::Tenant => "not serving this tenant",
            Self::Scope => "server needs a scope the agent lacks",
            Self::Labels => "labels do not match the required ones",
            Self::ReplicaThere => "already running another replica",
            Self::BreakerOpen => "circuit breaker open",
            Self::CpuHigh => "CPU above its high-water mark",
            Self::Full => "at capacity",
            Self::TenantShare => "running as many of this tenant's calls as its share allows",
        }
    }
}

/// What a pass knows besides the state: live load, limits, the time.
pub struct Context<'a> {
    pub live: &'a HashMap<String, LiveNode>,
    pub limits: Limits,
    pub now_ms: i64,
    /// Tenants with work recently (`TENANT_ACTIVE_WINDOW`): a tenant's share of a server
    /// only applies while another one is active, so a single tenant gets every slot.
    pub active_tenants: usize,
    /// Above this many candidates, score a sample (`SAMPLE_ALL`; the placement benchmark
    /// raises it to compare with scoring every node).
    pub sample_above: usize,
}

/// Per-pass facts about a task's fan-out siblings.
#[derive(Default)]
struct Siblings<'a> {
    nodes: Vec<&'a str>,
    zones: Vec<&'a str>,
}

/// Where `task`'s sibling replicas run, plus `placed`: nodes given to siblings earlier in
/// this pass (not committed yet, so not in the state).
fn siblings<'a>(state: &'a State, task: &TaskRecord, placed: &[&'a str]) -> Siblings<'a> {
    let mut s = Siblings::default();
    for n in placed {
        s.nodes.push(n);
        if let Some(z) = state.nodes.get(*n).and_then(|n| n.labels.get("zone")) {
            s.zones.push(z.as_str());
        }
    }
    let Some(group) = task
        .parent
        .as_ref()
        .and_then(|p| state.tasks.get(p))
        .and_then(|p| p.group.as_ref())
    else {
        return s;
    };
    for id in group.replicas.iter().filter(|id| **id != task.id) {
        let Some(r) = state.tasks.get(id) else {
            continue;
        };
        if r.status == crate::state::TaskStatus::Queued {
            continue;
        }
        if let Some(a) = r.current_attempt() {
            s.nodes.push(a.node_id.as_str());
            if let Some(z) = state
                .nodes
                .get(&a.node_id)
                .and_then(|n| n.labels.get("zone"))
            {
                s.zones.push(z.as_str());
            }
        }
    }
    s
}

fn check(
    state: &State,
    cx: &Context<'_>,
    in_flight: &InFlight,
    task: &TaskRecord,
    sib: &Siblings<'_>,
    node: &NodeRecord,
    server: &ServerRecord,
) -> Result<u32, Miss> {
    if node.status != NodeStatus::Ready {
        return Err(Miss::NotReady);
    }
    let Some(l) = cx.live.get(&node.id) else {
        return Err(Miss::Disconnected);
    };
    if l.stopping {
        return Err(Miss::Stopping);
    }
    if !l.server_ready(&server.name) {
        return Err(Miss::ServerNotReady);
    }
    if !node.serves(&task.tenant) {
        return Err(Miss::Tenant);
    }
    if !flotilla_common::jwt::scope_allows(&task.scopes, &server.required_scope) {
        return Err(Miss::Scope);
    }
    if !task.spec.placement.admits(&node.labels) {
        return Err(Miss::Labels);
    }
    if sib.nodes.contains(&node.id.as_str()) {
        return Err(Miss::ReplicaThere);
    }
    let used = in_flight.on_server(state, &node.id, &server.name);
    match breaker(state, &node.id, &server.name, cx.limits, cx.now_ms) {
        Breaker::Open => return Err(Miss::BreakerOpen),
        Breaker::HalfOpen if used > 0 => return Err(Miss::BreakerOpen),
        _ => {}
    }
    if node.cpu_high_water_percent > 0.0 && l.cpu_percent >= node.cpu_high_water_percent {
        return Err(Miss::CpuHigh);
    }
    let free = server.max_concurrency.saturating_sub(used);
    if free == 0 {
        return Err(Miss::Full);
    }
    // Nobody to keep a slot for: no other tenant active, or a node serving only this one.
    let only_this = node.tenants.len() == 1 && node.tenants[0] == task.tenant;
    if cx.active_tenants > 1 && !only_this {
        let mine = in_flight.of_tenant(state, &task.tenant, &node.id, &server.name);
        if mine >= tenant_cap(server.max_concurrency, cx.limits.tenant_slot_share) {
            return Err(Miss::TenantShare);
        }
    }
    Ok(free)
}

/// How good a feasible candidate is; higher is better. The parts, each about 0..1:
/// free capacity (slots, then CPU), locality (same zone, else same region), preferred
/// labels, history (success rate and speed of this tool on this node), and for replicas a
/// zone not used by a sibling. A node where this task failed before is avoided.
fn score(
    state: &State,
    cx: &Context<'_>,
    task: &TaskRecord,
    sib: &Siblings<'_>,
    tool_mean_ms: u64,
    (node, server, free): (&NodeRecord, &ServerRecord, u32),
) -> f64 {
    let cpu = cx.live.get(&node.id).map_or(100.0, |l| l.cpu_percent);
    let mut s = f64::from(free) / f64::from(server.max_concurrency.max(1));
    s += 0.5 * (1.0 - (cpu / 100.0).clamp(0.0, 1.0));
    let p = &task.spec.placement;
    let zone = node.labels.get("zone");
    if p.zone.is_some() && zone == p.zone.as_ref() {
        s += 1.0;
    } else if p.region.is_some() && node.labels.get("region") == p.region.as_ref() {
        s += 0.5;
    }
    if !p.preferred.is_empty() {
        let hits = p
            .preferred
            .iter()
            .filter(|(k, v)| node.labels.get(*k) == Some(*v))
            .count();
        s += 0.5 * hits as f64 / p.preferred.len() as f64;
    }
    if let Some(h) = state
        .tool_stats
        .get(&task.tool)
        .and_then(|m| m.get(&node.id))
    {
        s += h.success_rate() - 0.5;
        if tool_mean_ms > 0 {
            let speed = tool_mean_ms as f64 / (tool_mean_ms + h.ewma_ms).max(1) as f64;
            s += 0.5 * (speed - 0.5);
        }
    }
    if zone.is_some_and(|z| sib.zones.contains(&z.as_str())) {
        s -= 0.5;
    }
    if task
        .attempts
        .iter()
        .any(|a| a.node_id == node.id && a.error.is_some())
    {
        s -= 1.0;
    }
    s
}

/// Candidates per tool and the tool's mean duration, built once per pass.
#[derive(Default)]
struct PassCache<'a> {
    candidates: HashMap<&'a str, Vec<(&'a NodeRecord, &'a ServerRecord)>>,
    mean_ms: HashMap<&'a str, u64>,
}

impl<'a> PassCache<'a> {
    fn candidates(
        &mut self,
        state: &'a State,
        tool: &'a str,
    ) -> &[(&'a NodeRecord, &'a ServerRecord)] {
        self.candidates.entry(tool).or_insert_with(|| {
            state
                .index
                .tool_nodes
                .get(tool)
                .into_iter()
                .flatten()
                .filter_map(|(n, s)| {
                    let node = state.nodes.get(n)?;
                    let server = node.servers.iter().find(|x| &x.name == s)?;
                    Some((node, server))
                })
                .collect()
        })
    }

    fn mean_ms(&mut self, state: &State, tool: &'a str) -> u64 {
        *self.mean_ms.entry(tool).or_insert_with(|| {
            let m = state.tool_stats.get(tool);
            let (sum, n) = m
                .into_iter()
                .flatten()
                .fold((0u64, 0u64), |(s, n), (_, h)| (s + h.ewma_ms, n + 1));
            sum.checked_div(n).unwrap_or(0)
        })
    }
}

/// Why no node can take a task now: how many offer its tool, and why each candidate looked
/// at was passed over. Its text is the task's pending reason.
#[derive(Clone, Debug, PartialEq)]
pub struct NoFit {
    tool: String,
    offered: usize,
    misses: BTreeMap<Miss, usize>,
}

impl std::fmt::Display for NoFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.offered == 0 {
            return write!(f, "no node offers {:?}; waiting for one", self.tool);
        }
        write!(
            f,
            "{} node(s) offer {:?}, none can take it now: ",
            self.offered, self.tool
        )?;
        for (i, (m, n)) in self.misses.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{n} {}", m.describe())?;
        }
        Ok(())
    }
}

/// Chooses a node for `task`, or says why none fits. `in_flight` counts tasks assigned or
/// running per (node, server), including ones placed earlier in this pass.
pub fn place(
    state: &State,
    cx: &Context<'_>,
    in_flight: &InFlight,
    task: &TaskRecord,
    rng: &mut impl Rng,
) -> Result<Placement, NoFit> {
    place_cached(
        state,
        cx,
        in_flight,
        task,
        rng,
        &mut PassCache::default(),
        &[],
    )
}

fn place_cached<'a>(
    state: &'a State,
    cx: &Context<'_>,
    in_flight: &InFlight,
    task: &'a TaskRecord,
    rng: &mut impl Rng,
    cache: &mut PassCache<'a>,
    placed: &[&'a str],
) -> Result<Placement, NoFit> {
    let sib = siblings(state, task, placed);
    let mean = cache.mean_ms(state, &task.tool);
    let cands = cache.candidates(state, &task.tool);
    let n = cands.len();
    let mut best: Option<(f64, usize)> = None;
    let mut consider = |i: usize, misses: &mut BTreeMap<Miss, usize>| -> bool {
        let (node, server) = cands[i];
        match check(state, cx, in_flight, task, &sib, node, server) {
            Ok(free) => {
                let s = score(state, cx, task, &sib, mean, (node, server, free));
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, i));
                }
                true
            }
            Err(m) => {
                *misses.entry(m).or_default() += 1;
                false
            }
        }
    };
    let mut misses = BTreeMap::new();
    if n > cx.sample_above {
        // Sample until k feasible candidates were scored (or give up and look at all).
        let k = (usize::BITS - n.leading_zeros()) as usize;
        let mut found = 0;
        for _ in 0..4 * k {
            if consider(rng.gen_range(0..n), &mut misses) {
                found += 1;
                if found == k {
                    break;
                }
            }
        }
        if found == 0 {
            misses.clear();
            (0..n).for_each(|i| {
                consider(i, &mut misses);
            });
        }
    } else {
        (0..n).for_each(|i| {
            consider(i, &mut misses);
        });
    }
    match best {
        Some((_, i)) => Ok(Placement {
            node_id: cands[i].0.id.clone(),
            server: cands[i].1.name.clone(),
        }),
        None => Err(NoFit {
            tool: task.tool.clone(),
            offered: n,
            misses,
        }),
    }
}

/// The outcome of a pass.
#[derive(Default, Debug)]
pub struct Plan {
    pub assign: Vec<(String, Placement)>,
    /// Queued tasks left waiting, with why.
    pub waiting: Vec<(String, String)>,
}

/// Plans one pass over the queue (see the module comment).
pub fn plan(state: &State, cx: &Context<'_>, rng: &mut impl Rng) -> Plan {
    plan_from(state, cx, InFlight::default(), rng)
}

/// `plan`, counting `in_flight` as what is assigned or running.
fn plan_from(state: &State, cx: &Context<'_>, mut in_flight: InFlight, rng: &mut impl Rng) -> Plan {
    let mut out = Plan::default();
    let mut cache = PassCache::default();
    // A tool (with the same constraints) no node could take stays that way for this pass:
    // placements only use capacity up.
    let mut exhausted: HashMap<String, String> = HashMap::new();
    // Fan-out task → nodes its replicas got in this pass: replicas stay on distinct nodes
    // even when several are placed at once.
    let mut replicas_placed: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut cursors: HashMap<&str, _> = state
        .index
        .queue
        .iter()
        .map(|(tenant, q)| (tenant.as_str(), q.iter()))
        .collect();
    let mut turn: BinaryHeap<(Reverse<u32>, Reverse<&str>)> = cursors
        .keys()
        .map(|t| {
            let active = state.index.active_by_tenant.get(*t).copied().unwrap_or(0);
            (Reverse(active), Reverse(*t))
        })
        .collect();
    while let Some((Reverse(active), Reverse(tenant))) = turn.pop() {
        let Some(next) = cursors.get_mut(tenant).and_then(Iterator::next) else {
            continue;
        };
        let Some(task) = state.tasks.get(&next.2) else {
            turn.push((Reverse(active), Reverse(tenant)));
            continue;
        };
        if let Some(at) = task.not_before_ms.filter(|at| *at > cx.now_ms) {
            let reason = task.error.clone().unwrap_or_default();
            out.waiting.push((
                task.id.clone(),
                format!(
                    "retrying no sooner than {} ms from now ({reason})",
                    at - cx.now_ms
                ),
            ));
            turn.push((Reverse(active), Reverse(tenant)));
            continue;
        }
        let memo = task.parent.is_none().then(|| {
            format!(
                "{}\0{}\0{:?}\0{:?}",
                task.tool, task.tenant, task.spec.placement.required, task.scopes
            )
        });
        if let Some(why) = memo.as_ref().and_then(|k| exhausted.get(k)) {
            out.waiting.push((task.id.clone(), why.clone()));
            turn.push((Reverse(active), Reverse(tenant)));
            continue;
        }
        let placed = task
            .parent
            .as_deref()
            .and_then(|p| replicas_placed.get(p))
            .cloned()
            .unwrap_or_default();
        match place_cached(state, cx, &in_flight, task, rng, &mut cache, &placed) {
            Ok(p) => {
                if let (Some(parent), Some((node, _))) = (
                    task.parent.as_deref(),
                    state.nodes.get_key_value(&p.node_id),
                ) {
                    replicas_placed
                        .entry(parent)
                        .or_default()
                        .push(node.as_str());
                }
                in_flight.add(&task.tenant, &p, 1);
                out.assign.push((task.id.clone(), p));
                turn.push((Reverse(active + 1), Reverse(tenant)));
            }
            Err(no_fit) => {
                let why = no_fit.to_string();
                if let Some(k) = memo {
                    exhausted.insert(k, why.clone());
                }
                out.waiting.push((task.id.clone(), why));
                turn.push((Reverse(active), Reverse(tenant)));
            }
        }
    }
    out
}

mod leader;

pub use leader::*;

#[cfg(test)]
mod tests;
