//! The hub's Prometheus metrics (`/metrics` on its HTTP port; docs/metrics.md lists each).
//! Counters and histograms of tasks are fed by the apply hook, so every hub counts every
//! task the cluster committed (from its own start: counters reset with the process, as
//! Prometheus expects). Gauges are read from the state and Raft when scraped. Label sets
//! stay bounded: tools, tenants with queued work, nodes, servers; never a task id.

use flotilla_common::telemetry::DURATION_BUCKETS;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::collections::HashMap;

use crate::state::{State, TaskRecord, TaskStatus};

pub mod grpc;

pub struct Metrics {
    registry: Registry,
    tasks_submitted: IntCounterVec,
    tasks_finished: IntCounterVec,
    queue_wait: Histogram,
    task_duration: HistogramVec,
    queue_depth: IntGaugeVec,
    tasks_running: IntGaugeVec,
    nodes: IntGaugeVec,
    breaker_open: IntGaugeVec,
    raft_term: IntGauge,
    raft_is_leader: IntGauge,
    raft_leader_changes: IntCounter,
    raft_last_log_index: IntGauge,
    raft_commit_index: IntGauge,
    raft_applied_index: IntGauge,
    raft_apply_lag: IntGauge,
    history_records: IntGauge,
    history_tombstones: IntGauge,
    auth_failures: IntCounterVec,
    heartbeat_age: prometheus::GaugeVec,
    /// gRPC requests on the API port (`grpc::layer` feeds it).
    pub grpc: grpc::GrpcMetrics,
    scraping: std::sync::Mutex<()>,
    /// Finished calls by tenant and tool, for the dashboard (a tenant's page shows only its
    /// own); at most `MAX_TOOL_TOTALS` pairs.
    tool_totals: std::sync::Mutex<HashMap<(String, String), ToolTotals>>,
    /// Entries up to this log index were in the log when the hub started: replaying them
    /// counts nothing again.
    counted_after: std::sync::atomic::AtomicU64,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone()))
        .expect("each metric is registered once, with a valid name");
    m
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new_custom(Some("flotilla".into()), None).expect("a valid metric prefix");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"),
            )
        };
        let one =
            |name: &str, help: &str| register(&r, IntGauge::new(name, help).expect("valid gauge"));
        Self {
            tasks_submitted: counter(
                "tasks_submitted_total",
                "Tasks the cluster accepted (replicas and workflow steps included), by tool.",
                &["tool"],
            ),
            tasks_finished: counter(
                "tasks_finished_total",
                "Tasks that ended, by tool and outcome (succeeded, failed, cancelled, lost).",
                &["tool", "outcome"],
            ),
            queue_wait: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "task_queue_wait_seconds",
                        "From submission to the first assignment.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                )
                .expect("valid histogram"),
            ),
            task_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "task_duration_seconds",
                        "The last attempt of a finished task, from its start (or assignment) to its result, by tool.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["tool"],
                )
                .expect("valid histogram"),
            ),
            queue_depth: gauge(
                "task_queue_depth",
                "Tasks queued, by tenant (tenants with queued tasks only).",
                &["tenant"],
            ),
            tasks_running: gauge(
                "tasks_running",
                "Tasks assigned or running, by node.",
                &["node"],
            ),
            nodes: gauge(
                "nodes",
                "Registered nodes, by status (ready, cordoned, draining, down).",
                &["status"],
            ),
            breaker_open: gauge(
                "breaker_open",
                "1 when the circuit breaker of a node's MCP server is open or half-open.",
                &["node", "server"],
            ),
            raft_term: one("raft_term", "The Raft term this hub is in."),
            raft_is_leader: one("raft_is_leader", "1 when this hub is the Raft leader."),
            raft_leader_changes: register(
                &r,
                IntCounter::new(
                    "raft_leader_changes_total",
                    "Times this hub saw the leader change (including to no leader).",
                )
                .expect("valid counter"),
            ),
            raft_last_log_index: one(
                "raft_last_log_index",
                "The index of the last Raft log entry this hub holds.",
            ),
            raft_commit_index: one(
                "raft_commit_index",
                "The index of the last log entry this hub knows committed.",
            ),
            raft_applied_index: one(
                "raft_applied_index",
                "The index of the last entry this hub applied to its state.",
            ),
            raft_apply_lag: one(
                "raft_apply_lag",
                "Entries this hub holds but has not applied yet.",
            ),
            history_records: one(
                "history_records",
                "Finished tasks and workflows this hub keeps in its history store (until retention expires them).",
            ),
            history_tombstones: one(
                "history_tombstones",
                "Expired finished work still on this hub's disk, waiting for a snapshot to cover its expiry.",
            ),
            auth_failures: counter(
                "auth_failures_total",
                "Requests refused for their credentials, by reason (missing_token, expired, bad_signature, unknown_key, missing_scope, bad_join_token, ...).",
                &["reason"],
            ),
            heartbeat_age: register(
                &r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "node_heartbeat_age_seconds",
                        "Seconds since each connected node was last heard from (on the leader, which holds the sessions).",
                    ),
                    &["node"],
                )
                .expect("valid gauge"),
            ),
            grpc: grpc::GrpcMetrics::new(
                &r,
                &[
                    flotilla_proto::FILE_DESCRIPTOR_SET,
                    tonic_health::pb::FILE_DESCRIPTOR_SET,
                    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                ],
            ),
            scraping: std::sync::Mutex::new(()),
            tool_totals: Default::default(),
            counted_after: std::sync::atomic::AtomicU64::new(0),
            registry: r,
        }
    }

    /// Entries up to `index` (the log's end when the hub started) are replayed, not new:
    /// they count nothing.
    pub fn count_after(&self, index: u64) {
        self.counted_after
            .store(index, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the entry at log index `index` is new to this process (not replayed).
    pub fn counts(&self, index: u64) -> bool {
        index
            > self
                .counted_after
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Task `t` was created.
    pub fn submitted(&self, t: &TaskRecord) {
        self.tasks_submitted.with_label_values(&[&t.tool]).inc();
    }

    /// Task `t` made a transition (seen once per applied entry).
    pub fn transitioned(&self, t: &TaskRecord) {
        if t.status == TaskStatus::Assigned && t.attempts.len() == 1 {
            let a = &t.attempts[0];
            self.queue_wait
                .observe(seconds(a.assigned_at_ms - t.created_at_ms));
        }
        if t.status.is_terminal() {
            self.tasks_finished
                .with_label_values(&[&t.tool, t.status.as_str()])
                .inc();
            let took = t.attempts.last().filter(|a| !a.requeued).and_then(|a| {
                Some(a.finished_at_ms? - a.started_at_ms.unwrap_or(a.assigned_at_ms))
            });
            if let Some(ms) = took {
                self.task_duration
                    .with_label_values(&[&t.tool])
                    .observe(seconds(ms));
            }
            self.total(t, took);
        }
    }

    /// Adds finished task `t` (which ran `took` ms) to its tenant's and tool's totals.
    fn total(&self, t: &TaskRecord, took: Option<i64>) {
        let mut totals = self.tool_totals.lock().expect("tool totals lock");
        let key = (t.tenant.clone(), t.tool.clone());
        if totals.len() >= MAX_TOOL_TOTALS && !totals.contains_key(&key) {
            return;
        }
        let e = totals.entry(key).or_insert_with(|| ToolTotals {
            tool: t.tool.clone(),
            ..Default::default()
        });
        if t.status == TaskStatus::Succeeded {
            e.succeeded += 1;
        } else {
            e.failed += 1;
        }
        if let Some(ms) = took {
            e.seconds_sum += seconds(ms);
            e.seconds_count += 1;
        }
    }

    /// A request refused for its credentials; `reason` is one of a fixed few.
    pub fn auth_failed(&self, reason: &'static str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    /// A change of leader seen by this hub.
    pub fn leader_changed(&self) {
        self.raft_leader_changes.inc();
    }

    /// Every metric in the text exposition format, with the gauges read now from the
    /// state `state` locks (held only while the gauges are set, not while encoding). One
    /// scrape at a time: gauges are reset and set again, and two at once would see gaps.
    pub fn render<'s>(
        &self,
        state: impl FnOnce() -> std::sync::RwLockReadGuard<'s, State>,
        raft: &RaftView,
        now_ms: i64,
    ) -> String {
        let _one = self.scraping.lock().expect("scrape lock");
        {
            let state = state();
            self.set_gauges(&state, raft, now_ms);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("the text encoder writes to memory");
        String::from_utf8(out).expect("the text exposition is UTF-8")
    }

    fn set_gauges(&self, state: &State, raft: &RaftView, now_ms: i64) {
        self.queue_depth.reset();
        for (tenant, queue) in &state.index.queue {
            self.queue_depth
                .with_label_values(&[tenant])
                .set(queue.len() as i64);
        }
        self.tasks_running.reset();
        self.nodes.reset();
        for (id, n) in &state.nodes {
            self.nodes.with_label_values(&[n.status.as_str()]).inc();
            let running = state.index.on_node.get(id).map_or(0, |s| s.len());
            self.tasks_running
                .with_label_values(&[id])
                .set(running as i64);
        }
        self.breaker_open.reset();
        for (id, n) in &state.nodes {
            for server in &n.servers {
                let key = crate::state::breaker_key(id, &server.name);
                if !state.breakers.contains_key(&key) {
                    continue;
                }
                let b = crate::scheduler::breaker(state, id, &server.name, raft.limits, now_ms);
                self.breaker_open
                    .with_label_values(&[id, &server.name])
                    .set(i64::from(b != crate::scheduler::Breaker::Closed));
            }
        }
        self.heartbeat_age.reset();
        for (node, age) in &raft.heartbeat_ages {
            self.heartbeat_age.with_label_values(&[node]).set(*age);
        }
        self.raft_term.set(raft.term as i64);
        self.raft_is_leader.set(i64::from(raft.is_leader));
        self.raft_last_log_index.set(raft.last_log_index as i64);
        self.raft_commit_index.set(raft.commit_index as i64);
        self.raft_applied_index.set(raft.applied_index as i64);
        self.raft_apply_lag
            .set(raft.last_log_index.saturating_sub(raft.applied_index) as i64);
        self.history_records.set(state.history.len() as i64);
        self.history_tombstones
            .set(state.history.tombstones() as i64);
    }
}

/// One tool's finished calls since this hub started, and their durations (the dashboard
/// charts their growth).
#[derive(Debug, Default, serde::Serialize)]
pub struct ToolTotals {
    pub tool: String,
    pub succeeded: u64,
    pub failed: u64,
    pub seconds_sum: f64,
    pub seconds_count: u64,
}

/// (tenant, tool) pairs the dashboard's totals keep; calls of pairs beyond it are left
/// out of the dashboard's charts (never out of the Prometheus counters).
const MAX_TOOL_TOTALS: usize = 4096;

impl Metrics {
    /// `ToolTotals` of every tool that finished a call, by name: of `tenant`'s calls, or of
    /// every tenant's with `None`.
    pub fn tool_totals(&self, tenant: Option<&str>) -> Vec<ToolTotals> {
        let mut by: std::collections::BTreeMap<&str, ToolTotals> = Default::default();
        let totals = self.tool_totals.lock().expect("tool totals lock");
        for ((of, tool), t) in totals.iter() {
            if tenant.is_some_and(|want| want != of) {
                continue;
            }
            let e = by.entry(tool).or_insert_with(|| ToolTotals {
                tool: tool.clone(),
                ..Default::default()
            });
            e.succeeded += t.succeeded;
            e.failed += t.failed;
            e.seconds_sum += t.seconds_sum;
            e.seconds_count += t.seconds_count;
        }
        by.into_values().collect()
    }
}

/// What a scrape reads from Raft.
pub struct RaftView {
    pub term: u64,
    pub is_leader: bool,
    /// The last log index this hub knows committed.
    pub commit_index: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    /// The hub's breaker thresholds.
    pub limits: crate::scheduler::Limits,
    /// Seconds since each connected node was last heard from (the leader's sessions).
    pub heartbeat_ages: Vec<(String, f64)>,
}

fn seconds(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}
