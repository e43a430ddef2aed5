//! Filters, scores and fair share, against hand-built state.

use super::*;
use crate::{
    sessions::LiveServer,
    state::{
        BreakerRecord, Command, Group, OfferedServer, TaskRecord, TaskStatus, ToolDef, ToolStats,
    },
};
use flotilla_proto::ServerState;
use rand::{rngs::StdRng, SeedableRng};
use serde_json::json;

fn live(cpu: f64) -> LiveNode {
    LiveNode {
        session: 1,
        tx: tokio::sync::mpsc::channel(1).0,
        ended: Default::default(),
        cpu_percent: cpu,
        running: 0,
        servers: vec![LiveServer {
            name: "demo".into(),
            state: ServerState::Ready,
            error: String::new(),
            running: 0,
        }],
        last_seen: std::time::Instant::now(),
        last_seen_ms: 0,
        http: String::new(),
        serial: String::new(),
        stopping: false,
    }
}

/// A cluster of nodes offering `echo` through server `demo`, built through commands so the
/// indexes are the ones the state machine keeps.
struct World {
    state: State,
    live: HashMap<String, LiveNode>,
    index: u64,
    limits: Limits,
    active_tenants: usize,
}

impl World {
    /// Most tests look at one rule at a time: the tenant share is off unless a test sets it.
    fn new() -> Self {
        Self {
            state: State::default(),
            live: HashMap::new(),
            index: 0,
            limits: Limits {
                tenant_slot_share: 1.0,
                ..Limits::default()
            },
            active_tenants: 1,
        }
    }

    fn apply(&mut self, c: Command) -> crate::state::Response {
        self.index += 1;
        self.state.apply(self.index, &c)
    }

    fn node(&mut self, id: &str, slots: u32, labels: &[(&str, &str)]) -> &mut Self {
        self.state
            .nodes
            .insert(id.into(), NodeRecord::new(id, Default::default(), 0));
        self.apply(Command::NodeHello {
            node_id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            servers: vec![OfferedServer {
                name: "demo".into(),
                max_concurrency: slots,
                required_scope: "tools".into(),
                tools: vec![ToolDef {
                    name: "echo".into(),
                    description: String::new(),
                    input_schema: json!({"type": "object"}),
                    read_only: true,
                    idempotent: true,
                    destructive: false,
                }],
            }],
            at_ms: 0,
            tenants: vec![],
            cpu_high_water_percent: 0.0,
            may_add_tools: true,
        });
        self.live.insert(id.into(), live(10.0));
        self
    }

    fn submit(&mut self, id: &str, tenant: &str, f: impl FnOnce(&mut TaskRecord)) {
        let mut t = TaskRecord::new(id, "echo", tenant, "agent", json!({}), 1);
        t.scopes = vec!["tools".into()];
        f(&mut t);
        self.apply(Command::SubmitTask(Box::new(t)));
    }

    fn cx(&self) -> Context<'_> {
        Context {
            live: &self.live,
            limits: self.limits,
            now_ms: 1_000,
            active_tenants: self.active_tenants,
            sample_above: SAMPLE_ALL,
        }
    }

    fn place(&self, id: &str) -> Result<String, String> {
        place(
            &self.state,
            &self.cx(),
            &InFlight::default(),
            &self.state.tasks[id],
            &mut StdRng::seed_from_u64(7),
        )
        .map(|p| p.node_id)
        .map_err(|why| why.to_string())
    }

    fn assign(&mut self, id: &str, node: &str) {
        let r = self.apply(Command::AssignTask {
            task_id: id.into(),
            node_id: node.into(),
            server: "demo".into(),
            at_ms: 2,
        });
        assert!(
            matches!(r, crate::state::Response::Assigned { .. }),
            "{r:?}"
        );
    }
}

#[test]
fn most_free_capacity_wins_and_full_nodes_are_skipped() {
    let mut w = World::new();
    w.node("a", 4, &[]).node("b", 4, &[]);
    for i in 0..3 {
        w.submit(&format!("x{i}"), "t", |_| {});
        w.assign(&format!("x{i}"), "a");
    }
    w.submit("t1", "t", |_| {});
    assert_eq!(w.place("t1").unwrap(), "b");
    for i in 0..4 {
        w.submit(&format!("y{i}"), "t", |_| {});
        w.assign(&format!("y{i}"), "b");
    }
    assert_eq!(w.place("t1").unwrap(), "a");
    w.submit("x3", "t", |_| {});
    w.assign("x3", "a");
    let why = w.place("t1").unwrap_err();
    assert!(why.contains("2 at capacity"), "{why}");
}

#[test]
fn a_tenant_holds_at_most_its_share_of_a_server_and_others_still_get_in() {
    let mut w = World::new();
    w.limits.tenant_slot_share = 0.75;
    w.active_tenants = 2;
    w.node("a", 4, &[]);
    assert_eq!(tenant_cap(4, 0.75), 3);
    assert_eq!(
        tenant_cap(1, 0.75),
        1,
        "a one-slot server still serves someone"
    );
    for i in 0..3 {
        w.submit(&format!("a{i}"), "big", |_| {});
        w.assign(&format!("a{i}"), "a");
    }
    w.submit("a3", "big", |_| {});
    let why = w.place("a3").unwrap_err();
    assert!(why.contains("share"), "{why}");
    w.submit("b0", "small", |_| {});
    assert_eq!(w.place("b0").unwrap(), "a");
    // A pass does the same: the last slot goes to the other tenant.
    let plan = plan(&w.state, &w.cx(), &mut StdRng::seed_from_u64(3));
    let ids: Vec<&str> = plan.assign.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["b0"]);
    // With no other tenant active, one tenant may take every slot.
    w.active_tenants = 1;
    assert_eq!(w.place("a3").unwrap(), "a");
    // Nor does a node serving only that tenant keep anything back.
    w.active_tenants = 2;
    w.state.nodes.get_mut("a").unwrap().tenants = vec!["big".into()];
    assert_eq!(w.place("a3").unwrap(), "a");
}

#[test]
fn tenants_count_as_active_for_a_window_after_their_last_work() {
    let mut w = World::new();
    w.node("a", 4, &[]);
    let mut seen = ActiveTenants::default();
    let t0 = std::time::Instant::now();
    w.submit("x", "one", |_| {});
    assert_eq!(seen.update(&w.state, t0), 1);
    w.submit("y", "two", |_| {});
    w.assign("y", "a");
    assert_eq!(seen.update(&w.state, t0), 2);
    // Nothing queued or running any more: they age out after the window.
    let mut empty = World::new();
    empty.node("a", 4, &[]);
    assert_eq!(seen.update(&empty.state, t0 + TENANT_ACTIVE_WINDOW / 2), 2);
    assert_eq!(seen.update(&empty.state, t0 + TENANT_ACTIVE_WINDOW * 2), 0);
}

#[test]
fn cpu_breaks_ties() {
    let mut w = World::new();
    w.node("a", 4, &[]).node("b", 4, &[]);
    w.live.insert("a".into(), live(90.0));
    w.submit("t1", "t", |_| {});
    assert_eq!(w.place("t1").unwrap(), "b");
}

#[test]
fn hard_filters_each_exclude_a_node_with_their_reason() {
    let mut w = World::new();
    w.node("a", 4, &[("zone", "x")]);
    w.submit("t1", "t", |_| {});
    assert_eq!(w.place("t1").unwrap(), "a");

    w.state.nodes.get_mut("a").unwrap().status = NodeStatus::Cordoned;
    assert!(w.place("t1").unwrap_err().contains("cordoned"));
    w.state.nodes.get_mut("a").unwrap().status = NodeStatus::Ready;

    w.live.remove("a");
    assert!(w.place("t1").unwrap_err().contains("not connected"));
    w.live.insert("a".into(), live(10.0));

    w.state.nodes.get_mut("a").unwrap().tenants = vec!["other".into()];
    assert!(w.place("t1").unwrap_err().contains("tenant"));
    w.state.nodes.get_mut("a").unwrap().tenants = vec!["t".into()];
    assert_eq!(w.place("t1").unwrap(), "a");

    w.state.tasks.get_mut("t1").unwrap().scopes = vec!["other".into()];
    assert!(w.place("t1").unwrap_err().contains("scope"));
    w.state.tasks.get_mut("t1").unwrap().scopes = vec!["*".into()];

    let t = w.state.tasks.get_mut("t1").unwrap();
    t.spec.placement.required.insert("zone".into(), "y".into());
    assert!(w.place("t1").unwrap_err().contains("labels"));
    let t = w.state.tasks.get_mut("t1").unwrap();
    t.spec.placement.required.insert("zone".into(), "x".into());
    assert_eq!(w.place("t1").unwrap(), "a");

    w.state.nodes.get_mut("a").unwrap().cpu_high_water_percent = 80.0;
    w.live.insert("a".into(), live(85.0));
    assert!(w.place("t1").unwrap_err().contains("high-water"));
    w.live.insert("a".into(), live(50.0));
    assert_eq!(w.place("t1").unwrap(), "a");

    w.live.get_mut("a").unwrap().servers[0].state = ServerState::Restarting;
    assert!(w.place("t1").unwrap_err().contains("MCP server not ready"));
}

#[test]
fn breaker_opens_after_failures_and_lets_one_trial_through_after_the_cooldown() {
    let mut w = World::new();
    w.node("a", 4, &[]).node("b", 4, &[]);
    w.live.insert("b".into(), live(99.0)); // a is better unless its breaker is open
    w.submit("t1", "t", |_| {});
    assert_eq!(w.place("t1").unwrap(), "a");
    let limits = Limits::default();
    w.state.breakers.insert(
        breaker_key("a", "demo"),
        BreakerRecord {
            consecutive_failures: limits.breaker_failures,
            last_failure_ms: 900,
        },
    );
    assert_eq!(breaker(&w.state, "a", "demo", limits, 1_000), Breaker::Open);
    assert_eq!(w.place("t1").unwrap(), "b");
    // After the cooldown: half-open, one trial at a time.
    let later = 900 + limits.breaker_cooldown_ms as i64;
    assert_eq!(
        breaker(&w.state, "a", "demo", limits, later),
        Breaker::HalfOpen
    );
    let cx = Context {
        live: &w.live,
        limits,
        now_ms: later,
        active_tenants: 1,
        sample_above: SAMPLE_ALL,
    };
    let mut rng = StdRng::seed_from_u64(1);
    let p = place(
        &w.state,
        &cx,
        &InFlight::default(),
        &w.state.tasks["t1"],
        &mut rng,
    );
    assert_eq!(p.unwrap().node_id, "a");
    let mut busy = InFlight::default();
    busy.per_server.insert(("a".into(), "demo".into()), 1);
    let p = place(&w.state, &cx, &busy, &w.state.tasks["t1"], &mut rng);
    assert_eq!(p.unwrap().node_id, "b", "a trial is already running on a");
}

#[test]
fn a_failing_server_trips_its_breaker_through_results() {
    let mut w = World::new();
    w.node("a", 4, &[]);
    for i in 0..3u64 {
        let id = format!("f{i}");
        w.submit(&id, "t", |_| {});
        w.assign(&id, "a");
        let fence = w.index;
        w.apply(Command::FinishTask {
            task_id: id,
            attempt: 1,
            fence,
            at_ms: 500,
            result: None,
            error: Some("MCP server exited".into()),
            node_id: String::new(),
            started_at_ms: None,
        });
    }
    assert_eq!(
        breaker(&w.state, "a", "demo", Limits::default(), 1_000),
        Breaker::Open
    );
    w.submit("t1", "t", |_| {});
    assert!(w.place("t1").unwrap_err().contains("breaker"));
}

#[test]
fn locality_then_preferred_labels_then_history_decide() {
    let mut w = World::new();
    w.node("far", 4, &[("zone", "z9"), ("region", "r2")])
        .node("region", 4, &[("zone", "z2"), ("region", "r1")])
        .node(
            "zone",
            4,
            &[("zone", "z1"), ("region", "r1"), ("gpu", "yes")],
        );
    w.submit("t1", "t", |t| {
        t.spec.placement.zone = Some("z1".into());
        t.spec.placement.region = Some("r1".into());
    });
    assert_eq!(w.place("t1").unwrap(), "zone");
    w.submit("t2", "t", |t| t.spec.placement.region = Some("r1".into()));
    let p = w.place("t2").unwrap();
    assert!(p == "region" || p == "zone", "{p}");
    w.submit("t3", "t", |t| {
        t.spec
            .placement
            .preferred
            .insert("gpu".into(), "yes".into());
    });
    assert_eq!(w.place("t3").unwrap(), "zone");
    // History: a node that keeps failing the tool loses to one that succeeds.
    w.submit("t4", "t", |_| {});
    let stats = w.state.tool_stats.entry("echo".into()).or_default();
    stats.insert(
        "far".into(),
        ToolStats {
            calls: 20,
            succeeded: 20,
            failed: 0,
            ewma_ms: 10,
        },
    );
    stats.insert(
        "region".into(),
        ToolStats {
            calls: 20,
            succeeded: 2,
            failed: 18,
            ewma_ms: 10,
        },
    );
    stats.insert(
        "zone".into(),
        ToolStats {
            calls: 20,
            succeeded: 2,
            failed: 18,
            ewma_ms: 500,
        },
    );
    assert_eq!(w.place("t4").unwrap(), "far");
}

#[test]
fn a_retry_avoids_the_node_it_failed_on() {
    let mut w = World::new();
    w.node("a", 4, &[]).node("b", 4, &[]);
    w.live.insert("b".into(), live(60.0));
    w.submit("t1", "t", |t| {
        t.spec.retry.max_attempts = 2;
        t.spec.retry.retry_on = vec![crate::state::FailureKind::ToolError];
        t.spec.retry.initial_backoff_ms = 1;
    });
    assert_eq!(w.place("t1").unwrap(), "a");
    w.assign("t1", "a");
    let fence = w.index;
    let r = w.apply(Command::FinishTask {
        task_id: "t1".into(),
        attempt: 1,
        fence,
        at_ms: 3,
        result: None,
        error: Some("boom".into()),
        node_id: String::new(),
        started_at_ms: None,
    });
    assert_eq!(r, crate::state::Response::TaskNow(TaskStatus::Queued));
    assert_eq!(w.place("t1").unwrap(), "b");
}

#[test]
fn replicas_go_to_distinct_nodes_and_spread_over_zones() {
    let mut w = World::new();
    w.node("a1", 4, &[("zone", "a")])
        .node("a2", 4, &[("zone", "a")])
        .node("b1", 4, &[("zone", "b")]);
    w.live.insert("b1".into(), live(80.0));
    w.submit("f", "t", |t| t.spec.replicas = 2);
    assert!(w.state.tasks["f"].group.is_some());
    let r0 = w.place("f/r0").unwrap();
    w.assign("f/r0", &r0);
    let r1 = w.place("f/r1").unwrap();
    assert_ne!(r0, r1);
    let zone = |n: &str| w.state.nodes[n].labels["zone"].clone();
    assert_ne!(zone(&r0), zone(&r1), "{r0} and {r1} share a zone");
    // With one node only, the second replica waits.
    let mut solo = World::new();
    solo.node("a1", 4, &[]);
    solo.submit("f", "t", |t| t.spec.replicas = 2);
    solo.assign("f/r0", "a1");
    assert!(solo.place("f/r1").unwrap_err().contains("another replica"));
    let _ = Group { replicas: vec![] };
}

#[test]
fn fair_share_interleaves_tenants_and_priority_orders_within_one() {
    let mut w = World::new();
    w.node("a", 4, &[]);
    for i in 0..20 {
        w.submit(&format!("flood{i:02}"), "noisy", |_| {});
    }
    w.submit("quiet-low", "quiet", |_| {});
    w.submit("quiet-high", "quiet", |t| {
        t.priority = 5;
        t.created_at_ms = 9;
    });
    let plan = plan(&w.state, &w.cx(), &mut StdRng::seed_from_u64(3));
    let placed: Vec<&str> = plan.assign.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(placed.len(), 4, "{placed:?}");
    assert!(
        placed.contains(&"quiet-high") && placed.contains(&"quiet-low"),
        "{placed:?}"
    );
    let pos = |id: &str| placed.iter().position(|p| *p == id).unwrap();
    assert!(pos("quiet-high") < pos("quiet-low"));
    assert_eq!(plan.waiting.len(), 18);
    assert!(plan.waiting.iter().all(|(_, why)| why.contains("capacity")));
}

#[test]
fn sampling_places_among_thousands_of_nodes_without_scoring_all() {
    let mut w = World::new();
    for i in 0..2_000 {
        w.node(&format!("n{i:04}"), 2, &[]);
    }
    // Half the fleet is full: sampling still finds free nodes.
    for i in 0..1_000 {
        w.live.insert(format!("n{i:04}"), live(10.0));
        w.state.nodes.get_mut(&format!("n{i:04}")).unwrap().status = NodeStatus::Cordoned;
    }
    w.submit("t1", "t", |_| {});
    let n = w.place("t1").unwrap();
    assert!(n.as_str() >= "n1000", "{n} is cordoned");
    for i in 0..300 {
        w.submit(&format!("b{i:03}"), "t", |_| {});
    }
    let plan = plan(&w.state, &w.cx(), &mut StdRng::seed_from_u64(9));
    assert_eq!(plan.assign.len(), 301);
}

#[test]
fn backoff_keeps_a_task_waiting_until_its_time() {
    let mut w = World::new();
    w.node("a", 4, &[]);
    w.submit("t1", "t", |_| {});
    w.state.index.unlink_task(&w.state.tasks["t1"].clone());
    w.state.tasks.get_mut("t1").unwrap().not_before_ms = Some(5_000);
    w.state.rebuild_index();
    let p = plan(&w.state, &w.cx(), &mut StdRng::seed_from_u64(1));
    assert!(p.assign.is_empty());
    assert!(p.waiting[0].1.contains("retrying"), "{:?}", p.waiting);
}

#[test]
fn replicas_placed_in_one_pass_still_go_to_distinct_nodes() {
    let mut w = World::new();
    w.node("a", 8, &[("zone", "a")])
        .node("b", 8, &[("zone", "b")])
        .node("c", 8, &[("zone", "c")]);
    // Zone a is preferred: without pass-level bookkeeping every replica would pick a.
    w.submit("f", "t", |t| {
        t.spec.replicas = 3;
        t.spec.placement.zone = Some("a".into());
    });
    let plan = plan(&w.state, &w.cx(), &mut StdRng::seed_from_u64(5));
    let mut nodes: Vec<&str> = plan
        .assign
        .iter()
        .map(|(_, p)| p.node_id.as_str())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["a", "b", "c"]);
    // And the state machine refuses a second replica on a node anyway.
    w.assign("f/r0", "a");
    let r = w.apply(Command::AssignTask {
        task_id: "f/r1".into(),
        node_id: "a".into(),
        server: "demo".into(),
        at_ms: 3,
    });
    assert_eq!(
        r,
        crate::state::Response::Rejected(crate::state::Rejection::SiblingOnNode)
    );
}
