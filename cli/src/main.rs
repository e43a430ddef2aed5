//! `flotilla`: one binary for hubs, nodes, the local dev cluster, the demo MCP server and
//! the client commands. `main` parses arguments and calls into the libraries.

#![deny(clippy::print_stdout)]

/// `print!` for what a command prints: see [`output::write_stdout`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` for what a command prints: see [`output::write_stdout`].
macro_rules! outln {
    () => {
        $crate::output::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod audit;
mod call;
mod cluster;
mod connect;
mod dashboard;
mod demo;
mod dev;
mod join;
mod nodes;
mod options;
mod output;
mod progress;
mod setup;
mod task;
mod tokens;
mod tools;
mod top;
mod workflow;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use flotilla_common::config::{self, ConfigError, EXIT_CONFIG};

/// mimalloc rather than glibc's malloc: under a sustained load glibc's free lists fragment
/// and a hub's CPU per call rose by 40% within 100,000 calls (`_int_malloc` went from 6% to
/// 12% of its samples); with mimalloc it rises by about 10% (docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Run AI tool work across a fleet of machines"
)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a whole local cluster (a hub and nodes running the demo MCP server).
    Dev(dev::DevArgs),
    /// Run a hub.
    Hub {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a node (joins with its token on first start).
    Node {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Make this machine a node: join with a token now, write node.toml (without the token).
    Join(join::JoinArgs),
    /// Serve the built-in demo MCP server on stdin/stdout.
    McpDemo,
    /// Call a tool: submit, show progress, print the result.
    Call(call::CallArgs),
    /// Inspect and control tasks.
    #[command(subcommand)]
    Task(task::TaskCommand),
    /// Run and follow workflows (DAGs of tool calls).
    #[command(subcommand)]
    Workflow(workflow::WorkflowCommand),
    /// List the tools you may call, with what each is expected to take; accept a tool a
    /// node introduced (admin).
    Tools(tools::ToolsArgs),
    /// List nodes; cordon, uncordon, drain or remove one (admin).
    Nodes(nodes::NodesArgs),
    /// Pause or resume all scheduling (admin, emergency control).
    #[command(subcommand)]
    Scheduling(nodes::SchedulingCommand),
    /// Cluster state (admin).
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// A one-time login link to the live dashboard (showing what the token may see).
    Dashboard(ClientOnly),
    /// A live view of the cluster in the terminal: hubs, nodes, queue, calls per second by tool
    /// and running tasks (what the token may see). Ctrl-C quits.
    Top(top::TopArgs),
    /// Print a shell completion script: `flotilla completions bash > /etc/bash_completion.d/flotilla`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The cluster CA, for hubs set up by hand or by a Helm chart.
    #[command(subcommand)]
    Ca(setup::CaCommand),
    /// Print the admin token a hub left in its data dir when it first led the cluster.
    AdminToken(setup::AdminTokenArgs),
    /// Join tokens for nodes: create, list, revoke (admin).
    #[command(subcommand)]
    Token(tokens::TokenCommand),
    /// Agent tokens: issue, revoke (admin).
    #[command(subcommand, name = "agent-token")]
    AgentToken(tokens::AgentTokenCommand),
    /// The keys that sign agent tokens: rotate, list (admin).
    #[command(subcommand)]
    Keys(tokens::KeysCommand),
    /// Client certificates for agents, where the cluster requires them (admin).
    #[command(subcommand, name = "agent-cert")]
    AgentCert(tokens::AgentCertCommand),
    /// Roles: names for sets of scopes that tokens hold (admin).
    #[command(subcommand)]
    Roles(tokens::RolesCommand),
    /// The audit trail: admin actions, joins, revocations, refused credentials (admin);
    /// `-o json` prints JSON lines.
    Audit(audit::AuditArgs),
}

/// Flags every client command takes.
#[derive(Args, Clone, Debug)]
pub struct ClientFlags {
    /// Hub address, https://HOST:PORT [env: FLOTILLA_HUB]
    #[arg(long, global = true)]
    hub: Option<String>,
    /// Cluster CA certificate (PEM) [env: FLOTILLA_CA]
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Agent token (JWT) [env: FLOTILLA_TOKEN]
    #[arg(long, global = true)]
    token: Option<String>,
    /// Client certificate (PEM), for clusters that require one [env: FLOTILLA_CERT]
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// The client certificate's key (PEM) [env: FLOTILLA_KEY]
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// Client config file [env: FLOTILLA_CONFIG; default: the dev cluster's client.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = output::Format::Table)]
    output: output::Format,
}

#[derive(Args)]
pub struct ClientOnly {
    #[command(flatten)]
    flags: ClientFlags,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    flotilla_common::tls::install_default_provider();
    let filter = match &cli.command {
        Command::McpDemo => "warn",
        Command::Hub { .. } | Command::Node { .. } | Command::Dev(_) => "info,openraft=warn",
        _ => "warn",
    };
    let _traces = flotilla_common::telemetry::init(cli.log_json, filter, traces_of(&cli.command));
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            if let Some(ce) = e.downcast_ref::<ConfigError>() {
                eprintln!("error: {ce}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where a hub's or node's spans go, read from its config before anything runs (a config
/// that does not load is reported by the command itself).
fn traces_of(command: &Command) -> Option<flotilla_common::telemetry::Traces> {
    use flotilla_common::telemetry::Traces;
    match command {
        Command::Hub { config: path } => {
            let c = config::load_toml::<config::HubFile>(path).ok()?;
            Some(Traces {
                service: "flotilla-hub",
                instance: format!("hub-{}", c.id),
                endpoint: c.otlp_endpoint,
            })
        }
        Command::Node { config: path } => {
            let c = config::load_toml::<config::NodeFile>(path).ok()?;
            Some(Traces {
                service: "flotilla-node",
                instance: c.name,
                endpoint: c.otlp_endpoint,
            })
        }
        _ => None,
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Dev(args) => dev::run(args).await,
        Command::Hub { config: path } => {
            let file = path.display().to_string();
            let cfg = config::load_toml::<config::HubFile>(&path)?.validate(&file)?;
            let bind = |addr: std::net::SocketAddr| async move {
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
            };
            let listeners = flotilla_hub::Listeners {
                api: bind(cfg.listen).await?,
                raft: bind(cfg.raft_listen).await?,
                http: bind(cfg.http_listen).await?,
            };
            // Tell whoever started us where we listen (port 0 picks a free port).
            flotilla_common::pki::private_dir(&cfg.data_dir)?;
            let api = listeners.api.local_addr()?;
            let raft = listeners.raft.local_addr()?;
            let http = listeners.http.local_addr()?;
            flotilla_common::pki::write_whole(
                &cfg.data_dir.join(dev::HTTP_ADDR_FILE),
                flotilla_common::http::url(http, cfg.http_tls.is_some()).as_bytes(),
                0o644,
            )?;
            flotilla_common::pki::write_whole(
                &cfg.data_dir.join(dev::RAFT_ADDR_FILE),
                format!("https://{raft}").as_bytes(),
                0o644,
            )?;
            flotilla_common::pki::write_whole(
                &cfg.data_dir.join(dev::LISTEN_ADDR_FILE),
                format!("https://{api}").as_bytes(),
                0o644,
            )?;
            flotilla_hub::run(cfg, listeners, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Node { config: path } => {
            let file = path.display().to_string();
            let cfg = config::load_toml::<config::NodeFile>(&path)?.validate(&file)?;
            flotilla_node::run(cfg, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::McpDemo => {
            demo::serve_stdio().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Call(args) => call::call(args).await,
        Command::Task(cmd) => task::task(cmd).await,
        Command::Workflow(c) => workflow::workflow(c).await,
        Command::Tools(a) => tools::tools_command(a).await,
        Command::Nodes(a) => nodes::nodes_command(a).await,
        Command::Dashboard(c) => dashboard::dashboard(c).await,
        Command::Top(a) => top::top(a).await,
        Command::Join(a) => join::join(a).await,
        Command::Ca(c) => setup::ca(c),
        Command::AdminToken(a) => setup::admin_token(a),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            // Into memory first: clap_complete panics on a failed write to stdout.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "flotilla", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            Ok(ExitCode::SUCCESS)
        }
        Command::Scheduling(cmd) => nodes::scheduling(cmd).await,
        Command::Cluster(cmd) => cluster::cluster(cmd).await,
        Command::Token(cmd) => tokens::token(cmd).await,
        Command::AgentToken(cmd) => tokens::agent_token(cmd).await,
        Command::Keys(cmd) => tokens::keys(cmd).await,
        Command::Roles(cmd) => tokens::roles(cmd).await,
        Command::AgentCert(cmd) => tokens::agent_cert(cmd).await,
        Command::Audit(a) => audit::audit(a).await,
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled, so a signal that comes in between is not missed (and
/// does not kill the process outright, leaving `dev`'s members behind).
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            match (int, term) {
                (Ok(mut int), Ok(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
