//! `flotilla dev`: a whole local cluster in one command. It writes a hub.toml and node.toml
//! per member into the data dir, starts `flotilla hub` and `flotilla node` as child
//! processes (each can be killed on its own), waits until the demo tools are served,
//! writes `client.toml` so other shells need no setup, and stops everything on Ctrl-C.

use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;
use flotilla_common::config::{ClientFile, ClientSettings, HubFile, McpServerConfig, NodeFile};
use flotilla_proto as pb;
use tokio::process::{Child, Command};

use crate::output;

/// A hub writes the address it actually listens on into this file in its data dir.
pub(crate) const LISTEN_ADDR_FILE: &str = "listen.addr";
/// ...and the address of its Raft port into this one.
pub(crate) const RAFT_ADDR_FILE: &str = "raft.addr";
/// ...and where it serves metrics and health over HTTP into this one.
pub(crate) const HTTP_ADDR_FILE: &str = "http.addr";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args)]
pub(crate) struct DevArgs {
    /// Where the cluster keeps its state and credentials [default: ~/.flotilla/dev]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address the first hub listens on; hub N uses the ports after it (API, then Raft).
    /// Port 0 picks free ports.
    #[arg(long, default_value = flotilla_common::config::defaults::HUB_LISTEN)]
    listen: String,
    /// Number of hubs (1, 3 or 5), each a separate process.
    #[arg(long, default_value_t = 1)]
    hubs: u32,
    /// Number of nodes, each running the demo MCP server, in zones a, b, c...
    #[arg(long, default_value_t = 1)]
    nodes: u32,
}

struct Children(Vec<(String, Child)>);

impl Children {
    async fn stop(&mut self) {
        for (name, c) in &mut self.0 {
            if let Some(pid) = c.id() {
                // SIGTERM first: hubs and nodes shut down cleanly on it.
                let _ = std::process::Command::new("kill")
                    .arg(pid.to_string())
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(5), c.wait())
                .await
                .is_err()
            {
                tracing::warn!(member = %name, "did not stop in 5s; killing");
                let _ = c.kill().await;
            }
        }
    }

    /// The first child that has exited, if any.
    fn exited(&mut self) -> Option<String> {
        self.0.iter_mut().find_map(|(name, c)| match c.try_wait() {
            Ok(Some(status)) => Some(format!("{name} exited ({status})")),
            _ => None,
        })
    }

    /// Reports children that exited since the last call (and forgets them); true when
    /// none is left running.
    fn reap(&mut self) -> bool {
        self.0.retain_mut(|(name, c)| match c.try_wait() {
            Ok(Some(status)) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "{name} exited ({status}); the rest of the cluster carries on"
                );
                false
            }
            _ => true,
        });
        self.0.is_empty()
    }
}

fn spawn(exe: &Path, role: &str, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    Command::new(exe)
        .arg(role)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {role}"))
}

async fn wait_for<T, F, Fut>(what: &str, children: &mut Children, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if let Some(why) = children.exited() {
            bail!("{why} while waiting for {what}; see the logs in the data dir");
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn run(a: DevArgs) -> anyhow::Result<ExitCode> {
    if ![1, 3, 5].contains(&a.hubs) {
        bail!("--hubs must be 1, 3 or 5 (a Raft group wants an odd number of voters)");
    }
    if a.nodes == 0 || a.nodes > 26 {
        bail!("--nodes must be between 1 and 26");
    }
    let dir = a
        .data_dir
        .clone()
        .unwrap_or_else(crate::connect::dev_data_dir);
    flotilla_common::pki::private_dir(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let exe = std::env::current_exe().context("locating the flotilla binary")?;
    let mut children = Children(Vec::new());
    // Ctrl-C is heard from the start: while members start up too, so that it stops the
    // ones already running rather than killing dev and leaving them behind.
    let mut signal = std::pin::pin!(crate::shutdown_signal());
    let result = tokio::select! {
        r = start(&a, &dir, &exe, &mut children) => r,
        _ = &mut signal => Err(anyhow::anyhow!(
            "interrupted before the cluster was up; stopped the members already started"
        )),
    };
    if let Err(e) = result {
        children.stop().await;
        return Err(e);
    }
    // Members may be killed on purpose (to watch a failover): report it and carry on.
    // (Not `eprintln!`: it panics when stderr's reader has gone, and dev must still stop
    // its members.)
    loop {
        tokio::select! {
            _ = &mut signal => {
                let _ = writeln!(std::io::stderr(), "\nstopping the dev cluster");
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if children.reap() {
                    let _ = writeln!(std::io::stderr(), "every member has exited");
                    break;
                }
            }
        }
    }
    children.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// The API and Raft listen addresses of hub `i` (0-based): consecutive ports after `listen`.
fn hub_addrs(listen: &str, i: u32) -> anyhow::Result<(String, String)> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen:?} is not IP:PORT"))?;
    if addr.port() == 0 {
        return Ok((listen.to_owned(), listen.to_owned()));
    }
    let port = |k: u32| -> anyhow::Result<u16> {
        u16::try_from(u32::from(addr.port()) + k).context("--listen port too high")
    };
    Ok((
        std::net::SocketAddr::new(addr.ip(), port(2 * i)?).to_string(),
        std::net::SocketAddr::new(addr.ip(), port(2 * i + 1)?).to_string(),
    ))
}

async fn start(a: &DevArgs, dir: &Path, exe: &Path, children: &mut Children) -> anyhow::Result<()> {
    // One CA for the whole cluster.
    let pki = dir.join("pki");
    flotilla_common::pki::Ca::load_or_generate(&pki, "flotilla-dev")?;
    let mut hubs = Vec::new();
    for i in 0..a.hubs {
        let id = u64::from(i) + 1;
        let hub_dir = dir.join(format!("hub-{id}"));
        flotilla_common::pki::private_dir(&hub_dir)?;
        let _ = std::fs::remove_file(hub_dir.join(LISTEN_ADDR_FILE));
        let _ = std::fs::remove_file(hub_dir.join(RAFT_ADDR_FILE));
        let (listen, raft_listen) = hub_addrs(&a.listen, i)?;
        let hub_cfg = HubFile {
            id_from_hostname: false,
            id,
            data_dir: hub_dir.clone(),
            listen,
            advertise: None,
            raft_listen,
            raft_advertise: None,
            http_listen: "127.0.0.1:0".into(),
            otlp_endpoint: None,
            http_advertise: None,
            http_tls_cert: None,
            http_tls_key: None,
            // The first hub starts the cluster; the others are added to it below.
            bootstrap: id == 1,
            peers: vec![],
            ca_cert: Some(pki.join("ca.pem")),
            ca_key: Some(pki.join("ca.key")),
            ca_trust: None,
            cluster_name: "flotilla-dev".into(),
            tls_names: vec![],
            node_ttl_ms: flotilla_common::config::defaults::NODE_TTL_MS,
            raft_heartbeat_ms: flotilla_common::config::defaults::RAFT_HEARTBEAT_MS,
            raft_election_timeout_ms: flotilla_common::config::defaults::RAFT_ELECTION_TIMEOUT_MS,
            snapshot_logs: flotilla_common::config::defaults::SNAPSHOT_LOGS,
            breaker_failures: flotilla_common::config::defaults::BREAKER_FAILURES,
            breaker_cooldown_ms: flotilla_common::config::defaults::BREAKER_COOLDOWN_MS,
            storage_cache_mb: flotilla_common::config::defaults::STORAGE_CACHE_MB,
            retention_s: flotilla_common::config::defaults::RETENTION_S,
            retention_max_tasks: flotilla_common::config::defaults::RETENTION_MAX_TASKS,
            limits: Default::default(),
            audit: Default::default(),
            // client.toml keeps the admin token: a local cluster's lasts as long as any.
            agent_tokens: flotilla_common::config::AgentTokens {
                bootstrap_admin_hours: flotilla_common::config::defaults::TOKEN_MAX_LIFETIME_HOURS,
                ..Default::default()
            },
            // Its own nodes, started just above: their tools are usable at once.
            node_cert_lifetime_s: flotilla_common::config::defaults::NODE_CERT_LIFETIME_S,
            hub_cert_lifetime_s: flotilla_common::config::defaults::NODE_CERT_LIFETIME_S,
            trust_node_tools: true,
        };
        let hub_toml = hub_dir.join("hub.toml");
        std::fs::write(&hub_toml, toml::to_string(&hub_cfg)?)?;
        let child = spawn(exe, "hub", &hub_toml, &hub_dir.join("hub.log"))?;
        children.0.push((format!("hub-{id}"), child));
        hubs.push((id, hub_dir));
    }
    let mut addrs = Vec::new();
    for (id, hub_dir) in &hubs {
        let api_file = hub_dir.join(LISTEN_ADDR_FILE);
        let raft_file = hub_dir.join(RAFT_ADDR_FILE);
        let api = wait_for(&format!("hub {id} to listen"), children, || async {
            std::fs::read_to_string(&api_file).ok()
        })
        .await?;
        let raft = std::fs::read_to_string(&raft_file)?;
        let http = std::fs::read_to_string(hub_dir.join(HTTP_ADDR_FILE))?;
        addrs.push((*id, api, raft, http));
    }
    let hub_dir = hubs[0].1.clone();
    let hub_addr = addrs[0].1.clone();
    let token_file = hub_dir.join(flotilla_hub::ADMIN_TOKEN_FILE);
    let admin_token = wait_for(
        "the first hub to elect itself and issue an admin token",
        children,
        || async {
            std::fs::read_to_string(&token_file)
                .ok()
                .filter(|t| !t.is_empty())
        },
    )
    .await?;

    // The client config other shells use.
    let client = ClientFile {
        hub: None,
        hubs: addrs.iter().map(|(_, api, _, _)| api.clone()).collect(),
        ca: Some(pki.join("ca.pem")),
        token: Some(admin_token),
        ..Default::default()
    };
    let client_toml = dir.join("client.toml");
    flotilla_common::pki::write_secret(&client_toml, toml::to_string(&client)?.as_bytes())?;
    let settings = ClientSettings::resolve(
        ClientFile::default(),
        Some(&client_toml),
        &client_toml,
        &Default::default(),
    )?;
    let mut admin = crate::connect::admin_client(&settings)?;
    let agent = crate::connect::agent_client(&settings)?;

    // The other hubs join as learners, catch up, and become voters.
    let members: Vec<u64> = admin
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .map_err(crate::connect::status_error)?
        .into_inner()
        .members
        .iter()
        .map(|m| m.id)
        .collect();
    for (id, api, raft, _) in addrs.iter().skip(1) {
        if members.contains(id) {
            continue;
        }
        admin
            .add_hub(pb::AddHubRequest {
                id: *id,
                api_address: api.clone(),
                raft_address: raft.clone(),
            })
            .await
            .map_err(crate::connect::status_error)
            .with_context(|| format!("adding hub {id}"))?;
    }

    // The nodes.
    for i in 0..a.nodes {
        let name = format!("node-{}", i + 1);
        let node_dir = dir.join(&name);
        flotilla_common::pki::private_dir(&node_dir)?;
        let needs_join = !node_dir.join("identity").join("node.pem").exists();
        let join_token = if needs_join {
            let r = admin
                .create_join_token(pb::CreateJoinTokenRequest {
                    ttl_seconds: 600,
                    uses: 1,
                    description: format!("flotilla dev {name}"),
                    may_add_tools: false,
                })
                .await
                .map_err(crate::connect::status_error)?
                .into_inner();
            Some(r.token)
        } else {
            None
        };
        let zone = char::from(b'a' + (i % 26) as u8).to_string();
        let node_cfg = NodeFile {
            name: name.clone(),
            data_dir: node_dir.clone(),
            hub: hub_addr.clone(),
            join_token,
            labels: [
                ("region".to_string(), "local".to_string()),
                ("zone".to_string(), zone),
            ]
            .into_iter()
            .collect(),
            heartbeat_ms: flotilla_common::config::defaults::HEARTBEAT_MS,
            stop_grace_ms: 25_000,
            tenants: Vec::new(),
            cpu_high_water_percent: 0.0,
            http_listen: "127.0.0.1:0".into(),
            otlp_endpoint: None,
            http_advertise: None,
            http_tls_cert: None,
            http_tls_key: None,
            servers: vec![McpServerConfig {
                name: "demo".into(),
                command: exe.display().to_string(),
                args: vec!["mcp-demo".into()],
                env: Default::default(),
                max_concurrency: flotilla_common::config::defaults::MAX_CONCURRENCY,
                scope: flotilla_common::config::defaults::SERVER_SCOPE.into(),
            }],
        };
        let node_toml = node_dir.join("node.toml");
        flotilla_common::pki::write_secret(&node_toml, toml::to_string(&node_cfg)?.as_bytes())?;
        let child = spawn(exe, "node", &node_toml, &node_dir.join("node.log"))?;
        children.0.push((name, child));
    }

    // Ready when every node serves the demo tools.
    let want = a.nodes as usize;
    wait_for(
        "the nodes to connect and offer the demo tools",
        children,
        || {
            let mut agent = agent.clone();
            async move {
                let tools = agent
                    .list_tools(pb::ListToolsRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .tools;
                let echo = tools.iter().find(|t| t.name == "echo")?;
                (echo.nodes.len() >= want).then_some(())
            }
        },
    )
    .await?;

    // One write, and a reader that went away does not stop the cluster: a hub or node
    // does not stop when its log's reader goes, and neither does dev.
    let mut banner = String::new();
    let _ = writeln!(
        banner,
        "Flotilla dev cluster is up: {} hub(s) ({}), {} node(s) serving the demo MCP server.",
        a.hubs,
        addrs
            .iter()
            .map(|(_, api, _, _)| api.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        a.nodes
    );
    let _ = writeln!(banner, "Data, logs and credentials: {}", dir.display());
    let _ = writeln!(
        banner,
        "Prometheus metrics: {}",
        addrs
            .iter()
            .map(|(_, _, _, http)| format!("{http}/metrics"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    match agent
        .clone()
        .create_dashboard_login(pb::CreateDashboardLoginRequest {})
        .await
    {
        Ok(login) => {
            let _ = writeln!(
                banner,
                "Dashboard: {} (a one-time link, valid 5 minutes; `flotilla dashboard` prints another)",
                login.into_inner().url
            );
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "no dashboard link: {}", e.message());
        }
    }
    banner.push('\n');
    let _ = writeln!(banner, "In another shell, try:");
    if a.data_dir.is_some() {
        let _ = writeln!(banner, "  export FLOTILLA_CONFIG={}", client_toml.display());
    }
    let _ = writeln!(banner, "  flotilla call echo --args '{{\"text\":\"hi\"}}'");
    let _ = writeln!(banner, "  flotilla call sleep --args '{{\"ms\":2000}}'");
    let _ = writeln!(banner, "  flotilla tools");
    let _ = writeln!(banner, "  flotilla nodes");
    banner.push('\n');
    let _ = writeln!(
        banner,
        "Ctrl-C stops the cluster; its state stays in the data dir."
    );
    output::write_stdout_or_drop(&banner);
    Ok(())
}
