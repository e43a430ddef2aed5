//! `flotilla-bench`: drives N concurrent agents making tool calls through a real hub and node
//! (separate processes, TLS, Raft commits on sled), and makes the same calls directly to the
//! same MCP server with rmcp, side by side in one run. The difference is what Flotilla adds.
//!
//! `flotilla-bench failover` kills the leader of a three-hub cluster again and again and
//! measures the time from the kill to the next acknowledged submission.
//!
//! Build the release binaries first, then run:
//!   cargo build --release -p flotilla-cli -p flotilla-bench
//!   target/release/flotilla-bench calls --agents 16 --calls 2000
//!   target/release/flotilla-bench failover --trials 20

mod faults;
mod placement;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use flotilla_node::mcp_client::McpClient;
use flotilla_proto as pb;
use flotilla_tests::{Cluster, NodeSpec};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Cli {
    /// The flotilla binary [default: next to this one]
    #[arg(long, global = true)]
    flotilla: Option<PathBuf>,
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(clap::Subcommand)]
enum BenchCommand {
    /// Tool calls through hub and node, next to the same calls made directly.
    Calls(Args),
    /// Leader kill to next acknowledged submission, on a three-hub cluster.
    Failover {
        #[arg(long, default_value_t = 20)]
        trials: usize,
    },
    /// Placement decisions per second on simulated nodes (in process, no network).
    Placement {
        /// Fleet sizes to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        nodes: Vec<usize>,
        #[arg(long, default_value_t = 100_000)]
        queued: usize,
        #[arg(long, default_value_t = 4)]
        slots: u32,
    },
    /// Kill -9 a node running tasks; time until they all run on another node.
    NodeLoss {
        #[arg(long, default_value_t = 5)]
        trials: usize,
        /// Tasks running on the node when it dies.
        #[arg(long, default_value_t = 8)]
        tasks: usize,
    },
    /// Calls/s with four healthy nodes next to one of four failing every call.
    Failing(Args),
    /// Calls at full speed for a long run; memory, disk and rate every 10,000 calls.
    Soak {
        #[arg(long, default_value_t = 100_000)]
        calls: usize,
        #[arg(long, default_value_t = 1)]
        hubs: u64,
        /// How long finished tasks are kept (hub.toml `retention_s`).
        #[arg(long, default_value_t = 30)]
        retention_s: u64,
        /// How many finished tasks are kept at most (hub.toml `retention_max_tasks`; the
        /// default is the hub's).
        #[arg(long)]
        retention_max_tasks: Option<u64>,
        #[arg(long, default_value_t = 16)]
        agents: usize,
    },
}

#[derive(clap::Args)]
struct Args {
    /// Concurrent agents (and concurrent direct callers).
    #[arg(long, default_value_t = 16)]
    agents: usize,
    /// Calls in total, per side.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Slots on the node's demo server.
    #[arg(long, default_value_t = 64)]
    max_concurrency: u32,
    /// Hubs in the cluster (1, 3 or 5); agents spread over all of them.
    #[arg(long, default_value_t = 1)]
    hubs: u64,
    /// Skip the direct-to-MCP side.
    #[arg(long)]
    no_direct: bool,
    /// Make each call as SubmitTask then WatchTask (two RPCs) rather than one CallTool.
    #[arg(long)]
    submit_watch: bool,
    /// Every agent calls the leader, rather than agents spread over all hubs (whose
    /// followers forward each write to the leader): shows what forwarding costs.
    #[arg(long)]
    at_leader: bool,
}

struct Stats {
    wall: Duration,
    lat: Vec<Duration>,
    errors: usize,
}

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        percentile(&self.lat, p)
    }
    fn rate(&self) -> f64 {
        self.lat.len() as f64 / self.wall.as_secs_f64()
    }
}

/// Runs `calls` calls with `conc` workers; `f` makes one call.
async fn drive<F, Fut>(conc: usize, calls: usize, f: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..conc)
        .map(|_| {
            let f = f.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= calls {
                        break;
                    }
                    let t = Instant::now();
                    match f(i).await {
                        Ok(()) => lat.push(t.elapsed()),
                        Err(e) => {
                            errors += 1;
                            if errors < 3 {
                                eprintln!("call failed: {e:#}");
                            }
                        }
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for w in workers {
        if let Ok((l, e)) = w.await {
            lat.extend(l);
            errors += e;
        }
    }
    let wall = start.elapsed();
    lat.sort();
    Stats { wall, lat, errors }
}

/// CPU time (user + system) a process has used so far, in milliseconds.
fn cpu_ms(pid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks * 1000 / 100
}

/// The child processes of `pid` (every thread's children).
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// CPU milliseconds used so far by the hubs, the node, its MCP servers, and this process.
fn cpu_by_part(cluster: &Cluster) -> [u64; 4] {
    let hubs = cluster.hubs.iter().map(|h| cpu_ms(h.proc.pid())).sum();
    let node = cluster.nodes.get("bench-1").map(|n| n.pid());
    let servers = node.map_or(0, |n| children(n).into_iter().map(cpu_ms).sum());
    [
        hubs,
        node.map_or(0, cpu_ms),
        servers,
        cpu_ms(std::process::id() as i32),
    ]
}

fn rss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bin = match cli.flotilla {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("flotilla"),
    };
    anyhow::ensure!(
        bin.exists(),
        "no flotilla binary at {}; build it or pass --flotilla",
        bin.display()
    );
    // The harness starts processes from FLOTILLA_BIN.
    std::env::set_var("FLOTILLA_BIN", &bin);
    match cli.command {
        BenchCommand::Calls(args) => calls(&bin, args).await,
        BenchCommand::Failover { trials } => failover(trials).await,
        BenchCommand::Placement {
            nodes,
            queued,
            slots,
        } => {
            placement::run(&nodes, queued, slots);
            Ok(())
        }
        BenchCommand::NodeLoss { trials, tasks } => faults::node_loss(trials, tasks).await,
        BenchCommand::Failing(args) => faults::failing(args.agents, args.calls).await,
        BenchCommand::Soak {
            calls,
            hubs,
            retention_s,
            retention_max_tasks,
            agents,
        } => {
            let mut opts = flotilla_tests::Options {
                retention_s,
                ..Default::default()
            };
            if let Some(n) = retention_max_tasks {
                opts.retention_max_tasks = n;
            }
            soak(calls, hubs, opts, agents).await
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Kill -9 the leader, then submit through the surviving hubs until one acknowledges.
async fn failover(trials: usize) -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    c.add_node(NodeSpec::demo("bench-1")).await?;
    let mut times = Vec::new();
    let mut node_times = Vec::new();
    for trial in 0..trials {
        let leader = c.wait_leader().await?;
        let survivors: Vec<u64> = (1..=3).filter(|h| *h != leader).collect();
        let agents: Vec<_> = survivors
            .iter()
            .map(|h| c.agent_at(*h, &c.admin_token))
            .collect();
        let req = pb::SubmitTaskRequest {
            tool: "echo".into(),
            arguments: serde_json::to_vec(&json!({"text": format!("trial {trial}")}))?,
            idempotency_key: format!("failover-{trial}"),
            priority: 0,
            options: None,
        };
        c.kill_hub(leader);
        let killed = Instant::now();
        let mut i = 0;
        loop {
            let mut a = agents[i % agents.len()].clone();
            i += 1;
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(300), a.submit_task(req.clone())).await
            {
                break;
            }
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(60),
                "no submission acknowledged within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = killed.elapsed();
        // The node's session moves to the new leader.
        let survivor_admin = flotilla_tests::AdminServiceClient::with_interceptor(
            c.channel_to(survivors[0]),
            flotilla_tests::Bearer::new(&c.admin_token),
        );
        flotilla_tests::wait_until(
            "the node to reach the new leader",
            flotilla_tests::READY,
            || {
                let mut a = survivor_admin.clone();
                async move {
                    let n = a
                        .list_nodes(pb::ListNodesRequest {})
                        .await
                        .ok()?
                        .into_inner()
                        .nodes;
                    n.iter().any(|n| n.connected).then_some(())
                }
            },
        )
        .await?;
        node_times.push(killed.elapsed());
        eprintln!(
            "trial {trial}: hub {leader} killed, next acknowledged submission after {:.0} ms",
            took.as_secs_f64() * 1000.0
        );
        times.push(took);
        // Bring the hub back and let it catch up before the next trial.
        c.hub_addr = c.hub(survivors[0]).api.clone();
        c.start_hub(leader).await?;
        let admin = c.admin();
        flotilla_tests::wait_until(
            "the restarted hub to catch up",
            flotilla_tests::READY,
            || {
                let mut admin = admin.clone();
                async move {
                    let s = admin
                        .cluster_status(pb::ClusterStatusRequest {})
                        .await
                        .ok()?
                        .into_inner();
                    (s.leader_id != 0
                        && s.members.len() == 3
                        && s.members.iter().all(|m| m.lag == 0 && m.matched_index > 0))
                    .then_some(())
                }
            },
        )
        .await?;
    }
    times.sort();
    node_times.sort();
    println!(
        "failover over {} trials (kill -9 of the leader of 3 hubs, to the next acknowledged submission):",
        times.len()
    );
    println!(
        "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms, min {:.0} ms",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        percentile(&times, 1.0),
        percentile(&times, 0.0)
    );
    println!(
        "node session on the new leader after: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&node_times, 0.5),
        percentile(&node_times, 0.99),
        percentile(&node_times, 1.0)
    );
    Ok(())
}

async fn calls(bin: &std::path::Path, args: Args) -> anyhow::Result<()> {
    // Direct: the same demo MCP server, called with rmcp, no hub in between.
    let skip_direct = args.no_direct;
    let direct_stats = if skip_direct {
        None
    } else {
        let direct = McpClient::spawn(
            &bin.display().to_string(),
            &["mcp-demo".into()],
            &Default::default(),
            &flotilla_node::stderr::StderrTail::new("direct"),
        )
        .await
        .context("starting the demo MCP server")?;
        let d = direct.clone();
        let direct_stats = drive(args.agents, args.calls, move |i| {
            let d = d.clone();
            async move {
                let mut m = serde_json::Map::new();
                m.insert("text".into(), json!(format!("call {i}")));
                d.call_tool("echo", m, None, CancellationToken::new())
                    .await?;
                Ok(())
            }
        })
        .await;
        direct.shutdown().await;
        Some(direct_stats)
    };

    // Through Flotilla: hub + node processes, every call committed through Raft.
    let mut cluster = Cluster::with_hubs(args.hubs).await?;
    let mut spec = NodeSpec::demo("bench-1");
    spec.servers[0].max_concurrency = args.max_concurrency;
    cluster.add_node(spec).await?;
    // One identity per agent (each has its own request quota), spread over the hubs
    // (or all at the leader).
    let leader = cluster.wait_leader().await?;
    let mut agents = Vec::new();
    for j in 0..args.agents {
        let token = cluster
            .agent_token(&format!("bench-{j}"), "default", &["tools"])
            .await?;
        let hub = if args.at_leader {
            leader
        } else {
            cluster.hubs[j % cluster.hubs.len()].id
        };
        agents.push(cluster.agent_at(hub, &token));
    }
    let cpu_before = cpu_by_part(&cluster);
    let index_before = commit_index(&cluster).await;
    let split = args.submit_watch;
    let through_stats = drive(args.agents, args.calls, move |i| {
        let agent = agents[i % agents.len()].clone();
        async move {
            if split {
                submit_and_watch_echo(agent, i).await
            } else {
                call_echo(agent, i).await
            }
        }
    })
    .await;
    let cpu_after = cpu_by_part(&cluster);
    if let (Some(a), Some(b)) = (index_before, commit_index(&cluster).await) {
        // Each entry is one commit: a quorum of hubs wrote and synced it.
        println!(
            "raft_entries_per_call {:.3}",
            b.saturating_sub(a) as f64 / through_stats.lat.len().max(1) as f64
        );
    }
    let per_call =
        |i: usize| (cpu_after[i] - cpu_before[i]) as f64 / through_stats.lat.len().max(1) as f64;
    println!(
        "cpu_ms_per_call hubs={:.3} node={:.3} mcp_server={:.3} bench_client={:.3}",
        per_call(0),
        per_call(1),
        per_call(2),
        per_call(3)
    );
    let hub_rss = rss_kib(cluster.hubs[0].proc.pid());
    let node_rss = cluster.nodes.get("bench-1").and_then(|n| rss_kib(n.pid()));
    report(
        &args,
        direct_stats.as_ref(),
        &through_stats,
        hub_rss,
        node_rss,
    );
    Ok(())
}

/// The last log index hub 1 knows committed (`flotilla_raft_commit_index`), if it answers.
async fn commit_index(cluster: &Cluster) -> Option<u64> {
    let http = cluster.hubs[0].http().ok()?;
    let (_, body) = flotilla_tests::http_get(&http, "/metrics").await.ok()?;
    flotilla_tests::metric_sample(&body, "flotilla_raft_commit_index", &[]).map(|v| v as u64)
}

/// The arguments of the `i`th echo call.
fn echo_request(i: usize) -> anyhow::Result<pb::SubmitTaskRequest> {
    Ok(pb::SubmitTaskRequest {
        tool: "echo".into(),
        arguments: serde_json::to_vec(&json!({"text": format!("call {i}")}))?,
        ..Default::default()
    })
}

/// One echo call through Flotilla, as one CallTool: submitted and streamed until it ends.
async fn call_echo(mut agent: flotilla_tests::Agent, i: usize) -> anyhow::Result<()> {
    let events = agent.call_tool(echo_request(i)?).await?.into_inner();
    until_succeeded(events).await
}

/// One echo call through Flotilla as two RPCs: SubmitTask, then WatchTask until it ends.
async fn submit_and_watch_echo(mut agent: flotilla_tests::Agent, i: usize) -> anyhow::Result<()> {
    let id = agent
        .submit_task(echo_request(i)?)
        .await?
        .into_inner()
        .task_id;
    let events = agent
        .watch_task(pb::WatchTaskRequest {
            task_id: id,
            from_seq: 1,
        })
        .await?
        .into_inner();
    until_succeeded(events).await
}

async fn until_succeeded(mut events: tonic::Streaming<pb::TaskEvent>) -> anyhow::Result<()> {
    while let Some(ev) = events.message().await? {
        match pb::EventKind::try_from(ev.kind)? {
            pb::EventKind::Succeeded => return Ok(()),
            pb::EventKind::Failed | pb::EventKind::Cancelled | pb::EventKind::Lost => {
                anyhow::bail!("task ended {:?}: {}", ev.kind, ev.error)
            }
            _ => {}
        }
    }
    anyhow::bail!("watch ended early")
}

fn report(
    args: &Args,
    direct_stats: Option<&Stats>,
    through_stats: &Stats,
    hub_rss: Option<u64>,
    node_rss: Option<u64>,
) {
    let row = |name: &str, s: &Stats| {
        format!(
            "| {name} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
            s.lat.len(),
            s.errors,
            s.rate(),
            s.pct(0.5),
            s.pct(0.99),
            s.pct(1.0)
        )
    };
    println!(
        "agents: {}, calls per side: {}, hubs: {}, tool: echo, each call: {}",
        args.agents,
        args.calls,
        args.hubs,
        if args.submit_watch {
            "SubmitTask + WatchTask"
        } else {
            "CallTool"
        }
    );
    println!();
    println!("| path | calls ok | errors | calls/s | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|");
    if let Some(d) = direct_stats {
        println!("{}", row("direct rmcp to the MCP server", d));
    }
    println!(
        "{}",
        row(
            &format!("through Flotilla ({} hub(s) + node)", args.hubs),
            through_stats
        )
    );
    println!();
    if let Some(d) = direct_stats {
        println!(
            "throughput ratio (Flotilla / direct): {:.3}; p50 added: {:.2} ms",
            through_stats.rate() / d.rate(),
            through_stats.pct(0.5) - d.pct(0.5)
        );
    }
    // Lines scripts can read.
    println!("flotilla_calls_per_second {:.1}", through_stats.rate());
    if let Some(d) = direct_stats {
        println!("direct_calls_per_second {:.1}", d.rate());
    }
    println!(
        "RSS after the run: hub {} MiB, node {} MiB",
        hub_rss.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
        node_rss.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
    );
}

/// Bytes allocated on disk under `dir`, leaving out the harness's capture of the process's
/// output (`*.log`; in production that goes to the journal or the container runtime).
fn disk_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(_) if e.path().extension().is_some_and(|x| x == "log") => 0,
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Calls per soak window.
const SOAK_WINDOW: usize = 10_000;

/// A cluster for the soak (default settings but a short retention) with one demo node and
/// `conc` agents spread over its hubs.
async fn soak_cluster(
    hubs: u64,
    opts: &flotilla_tests::Options,
    conc: usize,
) -> anyhow::Result<(Cluster, Arc<Vec<flotilla_tests::Agent>>)> {
    let mut cluster = Cluster::with_options(hubs, opts.clone()).await?;
    let mut spec = NodeSpec::demo("bench-1");
    spec.servers[0].max_concurrency = 64;
    cluster.add_node(spec).await?;
    let mut agents = Vec::new();
    for j in 0..conc {
        let token = cluster
            .agent_token(&format!("soak-{j}"), "default", &["tools"])
            .await?;
        agents.push(cluster.agent_at(cluster.hubs[j % cluster.hubs.len()].id, &token));
    }
    Ok((cluster, Arc::new(agents)))
}

/// What one soak window measured. RSS and disk are the largest over the hubs; CPU is the
/// hubs' sum.
struct SoakWindow {
    stats: Stats,
    rss_mib: f64,
    disk_mib: f64,
    cpu_ms_per_call: f64,
}

impl SoakWindow {
    /// `n` echo calls at full speed, the `base`th call first.
    async fn run(
        cluster: &Cluster,
        agents: &Arc<Vec<flotilla_tests::Agent>>,
        conc: usize,
        base: usize,
        n: usize,
    ) -> Self {
        let hub_cpu = || -> u64 { cluster.hubs.iter().map(|h| cpu_ms(h.proc.pid())).sum() };
        let cpu_before = hub_cpu();
        let a = agents.clone();
        let stats = drive(conc, n, move |i| {
            call_echo(a[(base + i) % a.len()].clone(), base + i)
        })
        .await;
        let cpu_ms_per_call = hub_cpu().saturating_sub(cpu_before) as f64 / n as f64;
        let rss = cluster
            .hubs
            .iter()
            .filter_map(|h| rss_kib(h.proc.pid()))
            .max();
        let disk = cluster.hubs.iter().map(|h| disk_bytes(&h.dir)).max();
        Self {
            stats,
            rss_mib: rss.unwrap_or(0) as f64 / 1024.0,
            disk_mib: disk.unwrap_or(0) as f64 / (1024.0 * 1024.0),
            cpu_ms_per_call,
        }
    }

    /// The window's figures as `key=value` pairs.
    fn fields(&self) -> String {
        format!(
            "calls_per_s={:.1} hub_rss_mib={:.1} hub_disk_mib={:.1} p50_ms={:.2} p99_ms={:.2} hub_cpu_ms_per_call={:.3}",
            self.stats.rate(),
            self.rss_mib,
            self.disk_mib,
            self.stats.pct(0.5),
            self.stats.pct(0.99),
            self.cpu_ms_per_call
        )
    }
}

/// Calls at full speed through a cluster it starts (default settings but a short
/// retention), one `soak_window` line every 10,000 calls. Then the same window on a fresh
/// cluster of the same shape (`soak_fresh`), right after the last one: this machine's speed
/// drifts by tens of percent over minutes, so the last window is also compared with a fresh
/// hub measured beside it, not only with the first window minutes before. Last, one
/// `soak_targets` line with the ratios (the window at half the calls stands for the
/// one at 50,000 of a 100,000-call run).
async fn soak(
    calls: usize,
    hubs: u64,
    opts: flotilla_tests::Options,
    conc: usize,
) -> anyhow::Result<()> {
    let (cluster, agents) = soak_cluster(hubs, &opts, conc).await?;
    println!(
        "soak: {calls} echo calls, {hubs} hub(s), {conc} agents, retention {} s and at most {} tasks",
        opts.retention_s, opts.retention_max_tasks
    );
    let mut done = 0;
    let mut errors = 0;
    // (calls so far, the window)
    let mut windows = Vec::new();
    while done < calls {
        let n = SOAK_WINDOW.min(calls - done);
        let w = SoakWindow::run(&cluster, &agents, conc, done, n).await;
        done += n;
        errors += w.stats.errors;
        println!("soak_window calls={done} {} errors={errors}", w.fields());
        windows.push((done, w));
    }
    drop(cluster);
    // The window at half the calls: the last one ending there or before.
    let mid = windows.iter().rposition(|(d, _)| *d <= calls / 2);
    let (Some(mid), true) = (mid, windows.len() >= 3) else {
        println!("soak_targets: too few windows to compare (three or more of 10,000 calls)");
        return Ok(());
    };
    let (first, mid, last) = (
        &windows[0].1,
        &windows[mid].1,
        &windows[windows.len() - 1].1,
    );
    let (fresh_cluster, fresh_agents) = soak_cluster(hubs, &opts, conc).await?;
    let fresh = SoakWindow::run(&fresh_cluster, &fresh_agents, conc, 0, SOAK_WINDOW).await;
    println!(
        "soak_fresh calls={SOAK_WINDOW} {} errors={}",
        fresh.fields(),
        fresh.stats.errors
    );
    // NaN where a figure could not be read: never a ratio that looks like a pass.
    let pct = |a: f64, b: f64| {
        if a > 0.0 && b > 0.0 {
            100.0 * a / b
        } else {
            f64::NAN
        }
    };
    println!(
        "soak_targets rss_last_mib={:.1} rss_last_vs_mid_pct={:.1} disk_last_vs_mid_pct={:.1} rate_last_vs_first_pct={:.1} rate_last_vs_fresh_pct={:.1} cpu_last_vs_fresh_pct={:.1}",
        last.rss_mib,
        pct(last.rss_mib, mid.rss_mib),
        pct(last.disk_mib, mid.disk_mib),
        pct(last.stats.rate(), first.stats.rate()),
        pct(last.stats.rate(), fresh.stats.rate()),
        pct(last.cpu_ms_per_call, fresh.cpu_ms_per_call),
    );
    Ok(())
}
