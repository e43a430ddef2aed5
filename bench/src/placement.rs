//! Placement decisions per second, in process: a state machine holding N simulated nodes
//! (built through the same commands a real cluster applies) and a queue of queued tasks,
//! planned by the scheduler exactly as the leader plans a pass. Sampled placement (the
//! default) is measured next to scoring every candidate, on the same state, in one run.

use std::{collections::HashMap, time::Instant};

use flotilla_hub::{
    scheduler::{self, Context, Limits},
    sessions::{LiveNode, LiveServer},
    state::{Command, NodeRecord, OfferedServer, State, TaskRecord, ToolDef},
};
use flotilla_proto::ServerState;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;

fn world(nodes: usize, queued: usize, slots: u32) -> (State, HashMap<String, LiveNode>) {
    let mut s = State::default();
    let mut rng = StdRng::seed_from_u64(42);
    let mut live = HashMap::new();
    let mut ix = 0u64;
    let tool = ToolDef {
        name: "echo".into(),
        description: String::new(),
        input_schema: json!({"type": "object"}),
        read_only: true,
        idempotent: true,
        destructive: false,
    };
    for i in 0..nodes {
        let id = format!("node-{i:05}");
        s.nodes
            .insert(id.clone(), NodeRecord::new(&id, Default::default(), 0));
        ix += 1;
        s.apply(
            ix,
            &Command::NodeHello {
                node_id: id.clone(),
                labels: [
                    ("zone".to_string(), format!("z{}", i % 12)),
                    ("region".to_string(), format!("r{}", i % 3)),
                ]
                .into_iter()
                .collect(),
                servers: vec![OfferedServer {
                    name: "demo".into(),
                    max_concurrency: slots,
                    required_scope: "tools".into(),
                    tools: vec![tool.clone()],
                }],
                at_ms: 0,
                tenants: vec![],
                cpu_high_water_percent: 0.0,
                may_add_tools: true,
            },
        );
        live.insert(
            id,
            LiveNode {
                session: 1,
                tx: tokio::sync::mpsc::channel(1).0,
                ended: Default::default(),
                cpu_percent: rng.gen_range(0.0..100.0),
                running: 0,
                servers: vec![LiveServer {
                    name: "demo".into(),
                    state: ServerState::Ready,
                    error: String::new(),
                    running: 0,
                }],
                last_seen: Instant::now(),
                last_seen_ms: 0,
                http: String::new(),
                serial: String::new(),
                stopping: false,
            },
        );
    }
    for i in 0..queued {
        let mut t = TaskRecord::new(
            &format!("task-{i:07}"),
            "echo",
            &format!("tenant-{}", i % 8),
            "bench",
            json!({}),
            i as i64,
        );
        t.scopes = vec!["tools".into()];
        t.spec.placement.zone = Some(format!("z{}", i % 12));
        ix += 1;
        s.apply(ix, &Command::SubmitTask(Box::new(t)));
    }
    (s, live)
}

/// One pass; returns (placements, tasks looked at, seconds).
fn pass(s: &State, live: &HashMap<String, LiveNode>, sample_above: usize) -> (usize, usize, f64) {
    let cx = Context {
        live,
        limits: Limits::default(),
        now_ms: 1,
        active_tenants: 1,
        sample_above,
    };
    let started = Instant::now();
    let plan = scheduler::plan(s, &cx, &mut StdRng::seed_from_u64(7));
    let secs = started.elapsed().as_secs_f64();
    (
        plan.assign.len(),
        plan.assign.len() + plan.waiting.len(),
        secs,
    )
}

pub(crate) fn run(node_counts: &[usize], queued: usize, slots: u32) {
    println!(
        "queued tasks: {queued} (8 tenants, each with a preferred zone), slots per node: {slots}"
    );
    println!();
    println!("| nodes | scoring | placements | placements/s | tasks looked at/s | pass ms |");
    println!("|---|---|---|---|---|---|");
    for &n in node_counts {
        let built = Instant::now();
        let (s, live) = world(n, queued, slots);
        let build_s = built.elapsed().as_secs_f64();
        let mut rates = Vec::new();
        for (name, above) in [
            ("sampled (log2 n)", scheduler::SAMPLE_ALL),
            ("every candidate", usize::MAX),
        ] {
            let (placed, looked, secs) = pass(&s, &live, above);
            rates.push(placed as f64 / secs);
            println!(
                "| {n} | {name} | {placed} | {:.0} | {:.0} | {:.0} |",
                placed as f64 / secs,
                looked as f64 / secs,
                secs * 1000.0
            );
        }
        println!(
            "| {n} | ratio sampled / every | | {:.1} | | |",
            rates[0] / rates[1]
        );
        eprintln!("({n} nodes: state built in {build_s:.1} s)");
    }
}
