//! Supervision of the node's MCP servers: each is started as a child process, its tools
//! listed, and restarted with backoff when it dies. The state of each server (starting,
//! ready, failing, restarting) is reported to the hub with every heartbeat.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use flotilla_common::config::McpServerConfig;
use flotilla_proto::{McpServerInfo, ServerState, ServerStatus, ToolInfo as PbTool};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use crate::mcp_client::Progress;
use crate::{
    mcp_client::{CallError, McpClient, ToolInfo},
    metrics::{NodeMetrics, Outcome},
    stderr::StderrTail,
};

/// Why a tool call got no result from its MCP server.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("this node has no MCP server {0:?}")]
    NoServer(String),
    #[error("MCP server {server:?} is not ready ({state}){}", if why.is_empty() { String::new() } else { format!(": {why}") })]
    NotReady {
        server: String,
        state: &'static str,
        why: String,
    },
    #[error("MCP server {server:?} refused the call: {message} (code {code})")]
    Refused {
        server: String,
        message: String,
        code: i32,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("MCP server {server:?} died during the call{}", exit.as_ref().map(|s| format!(" ({s})")).unwrap_or_default())]
    Died {
        server: String,
        exit: Option<String>,
    },
    #[error("MCP server {server:?}: {message}")]
    Other { server: String, message: String },
}

/// How long start-up waits for every server's first attempt before saying hello.
const FIRST_START_WAIT: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Slot {
    state: ServerState,
    error: String,
    client: Option<McpClient>,
    tools: Vec<ToolInfo>,
    running: u32,
}

struct Supervised {
    cfg: McpServerConfig,
    slot: Mutex<Slot>,
}

#[derive(Clone)]
pub struct Servers {
    servers: Arc<Vec<Arc<Supervised>>>,
    /// Bumped whenever a server's tool list changes, so the session says hello again.
    tools_version: Arc<watch::Sender<u64>>,
    stop: CancellationToken,
    metrics: Arc<NodeMetrics>,
}

impl Servers {
    /// Starts every configured server and waits (bounded) for each first attempt to end.
    pub async fn start(configs: &[McpServerConfig], metrics: Arc<NodeMetrics>) -> Self {
        let servers: Vec<Arc<Supervised>> = configs
            .iter()
            .map(|cfg| {
                Arc::new(Supervised {
                    cfg: cfg.clone(),
                    slot: Mutex::new(Slot {
                        state: ServerState::Starting,
                        error: String::new(),
                        client: None,
                        tools: Vec::new(),
                        running: 0,
                    }),
                })
            })
            .collect();
        let this = Self {
            servers: Arc::new(servers),
            tools_version: Arc::new(watch::channel(0).0),
            stop: CancellationToken::new(),
            metrics,
        };
        let mut first = Vec::new();
        for s in this.servers.iter() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            first.push(rx);
            tokio::spawn(supervise(
                s.clone(),
                this.tools_version.clone(),
                this.stop.clone(),
                this.metrics.clone(),
                tx,
            ));
        }
        let _ = tokio::time::timeout(FIRST_START_WAIT, futures::future::join_all(first)).await;
        this
    }

    pub fn tools_changed(&self) -> watch::Receiver<u64> {
        self.tools_version.subscribe()
    }

    /// What the node tells the hub in its hello.
    pub fn hello_info(&self) -> Vec<McpServerInfo> {
        self.servers
            .iter()
            .map(|s| {
                let slot = s.slot.lock().expect("slot lock");
                McpServerInfo {
                    name: s.cfg.name.clone(),
                    max_concurrency: s.cfg.max_concurrency,
                    state: slot.state as i32,
                    required_scope: s.cfg.scope.clone(),
                    tools: slot
                        .tools
                        .iter()
                        .map(|t| PbTool {
                            name: t.name.clone(),
                            description: t.description.clone().unwrap_or_default(),
                            input_schema: serde_json::to_vec(&t.input_schema).unwrap_or_default(),
                            read_only: t.read_only_hint.unwrap_or(false),
                            idempotent: t.idempotent_hint.unwrap_or(false),
                            destructive: t.destructive_hint.unwrap_or(false),
                        })
                        .collect(),
                    error: slot.error.clone(),
                }
            })
            .collect()
    }

    pub fn statuses(&self) -> Vec<ServerStatus> {
        self.servers
            .iter()
            .map(|s| {
                let slot = s.slot.lock().expect("slot lock");
                ServerStatus {
                    name: s.cfg.name.clone(),
                    state: slot.state as i32,
                    running: slot.running,
                    error: slot.error.clone(),
                }
            })
            .collect()
    }

    /// Calls `tool` on `server`. Ok is the CallToolResult (which may itself say isError);
    /// Err says why there is no result. Every call is counted, refused ones too.
    pub async fn call(
        &self,
        server: &str,
        tool: &str,
        args: Map<String, Value>,
        progress: mpsc::Sender<Progress>,
        cancel: CancellationToken,
    ) -> Result<Value, McpError> {
        let began = std::time::Instant::now();
        let r = self.call_once(server, tool, args, progress, cancel).await;
        let outcome = match &r {
            Ok(v) if v.get("isError").and_then(Value::as_bool) == Some(true) => Outcome::ToolError,
            Ok(_) => Outcome::Ok,
            Err(_) => Outcome::NoResult,
        };
        self.metrics.call(server, tool, outcome, began.elapsed());
        r
    }

    async fn call_once(
        &self,
        server: &str,
        tool: &str,
        args: Map<String, Value>,
        progress: mpsc::Sender<Progress>,
        cancel: CancellationToken,
    ) -> Result<Value, McpError> {
        let s = self
            .servers
            .iter()
            .find(|s| s.cfg.name == server)
            .ok_or_else(|| McpError::NoServer(server.to_owned()))?;
        let client = {
            let mut slot = s.slot.lock().expect("slot lock");
            match (&slot.client, slot.state) {
                (Some(c), ServerState::Ready) => {
                    let c = c.clone();
                    slot.running += 1;
                    c
                }
                _ => {
                    return Err(McpError::NotReady {
                        server: server.to_owned(),
                        state: slot.state.name(),
                        why: slot.error.clone(),
                    })
                }
            }
        };
        let r = client.call_tool(tool, args, Some(progress), cancel).await;
        s.slot.lock().expect("slot lock").running -= 1;
        let server = server.to_owned();
        match r {
            Ok(v) => Ok(v),
            Err(CallError::Mcp(e)) => Err(McpError::Refused {
                server,
                message: e.message.to_string(),
                code: e.code.0,
            }),
            Err(CallError::Cancelled) => Err(McpError::Cancelled),
            Err(CallError::ServerGone) => {
                let status = tokio::time::timeout(Duration::from_secs(2), client.wait_exit())
                    .await
                    .ok()
                    .flatten();
                Err(McpError::Died {
                    server,
                    exit: status.map(|s| s.to_string()),
                })
            }
            Err(CallError::Other(e)) => Err(McpError::Other {
                server,
                message: e.to_string(),
            }),
        }
    }

    /// Stops every server.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let clients: Vec<McpClient> = self
            .servers
            .iter()
            .filter_map(|s| s.slot.lock().expect("slot lock").client.take())
            .collect();
        futures::future::join_all(clients.iter().map(|c| c.shutdown())).await;
    }
}

async fn supervise(
    s: Arc<Supervised>,
    tools_version: Arc<watch::Sender<u64>>,
    stop: CancellationToken,
    metrics: Arc<NodeMetrics>,
    first_done: tokio::sync::oneshot::Sender<()>,
) {
    let mut first_done = Some(first_done);
    let mut backoff = Duration::from_millis(500);
    let name = s.cfg.name.clone();
    loop {
        let env: HashMap<String, String> = s.cfg.env.clone().into_iter().collect();
        let stderr = StderrTail::new(&name);
        let started = tokio::select! {
            r = start_once(&s.cfg, &env, &stderr) => r,
            _ = stop.cancelled() => return,
        };
        let client = match started {
            Ok((client, tools)) => {
                tracing::info!(server = %name, tools = tools.len(), pid = ?client.pid(), "MCP server ready");
                let changed = {
                    let mut slot = s.slot.lock().expect("slot lock");
                    let changed = slot
                        .tools
                        .iter()
                        .map(|t| (&t.name, &t.input_schema, &t.description))
                        .collect::<Vec<_>>()
                        != tools
                            .iter()
                            .map(|t| (&t.name, &t.input_schema, &t.description))
                            .collect::<Vec<_>>();
                    slot.state = ServerState::Ready;
                    slot.error.clear();
                    slot.client = Some(client.clone());
                    slot.tools = tools;
                    changed
                };
                if changed {
                    tools_version.send_modify(|v| *v += 1);
                }
                backoff = Duration::from_millis(500);
                Some(client)
            }
            Err(e) => {
                tracing::warn!(server = %name, error = %e, "MCP server failed to start");
                let mut slot = s.slot.lock().expect("slot lock");
                slot.state = ServerState::Failing;
                slot.error = e;
                None
            }
        };
        if let Some(tx) = first_done.take() {
            let _ = tx.send(());
        }
        if let Some(client) = client {
            let status = tokio::select! {
                s = client.wait_exit() => s,
                _ = stop.cancelled() => return,
            };
            let why = match status {
                Some(st) => format!("process exited ({st})"),
                None => "process ended".to_owned(),
            };
            let why = stderr.explain(why).await;
            tracing::warn!(server = %name, reason = %why, "MCP server died; restarting");
            let mut slot = s.slot.lock().expect("slot lock");
            slot.state = ServerState::Failing;
            slot.error = why;
            slot.client = None;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        s.slot.lock().expect("slot lock").state = ServerState::Restarting;
        metrics.restarted(&name);
    }
}

async fn start_once(
    cfg: &McpServerConfig,
    env: &HashMap<String, String>,
    stderr: &StderrTail,
) -> Result<(McpClient, Vec<ToolInfo>), String> {
    let spawned = tokio::time::timeout(
        Duration::from_secs(20),
        McpClient::spawn(&cfg.command, &cfg.args, env, stderr),
    )
    .await;
    let client = match spawned {
        Ok(Ok(c)) => c,
        Err(_) => {
            let why = format!("{:?} did not finish the MCP handshake in 20s", cfg.command);
            return Err(stderr.explain(why).await);
        }
        Ok(Err(e)) => {
            let why = format!("cannot start {:?}: {e}", cfg.command);
            return Err(stderr.explain(why).await);
        }
    };
    match tokio::time::timeout(Duration::from_secs(20), client.list_tools()).await {
        Ok(Ok(tools)) => Ok((client, tools)),
        Ok(Err(e)) => {
            client.shutdown().await;
            Err(format!("listing tools failed: {e}"))
        }
        Err(_) => {
            client.shutdown().await;
            Err("listing tools took more than 20s".into())
        }
    }
}

#[cfg(test)]
mod error_tests {
    use super::McpError;

    #[test]
    fn a_call_without_a_result_says_why_in_words_a_user_reads() {
        let not_ready = |why: &str| McpError::NotReady {
            server: "demo".into(),
            state: "restarting",
            why: why.into(),
        };
        assert_eq!(
            not_ready("").to_string(),
            r#"MCP server "demo" is not ready (restarting)"#
        );
        assert_eq!(
            not_ready("exit status: 1").to_string(),
            r#"MCP server "demo" is not ready (restarting): exit status: 1"#
        );
        let died = |exit: Option<&str>| McpError::Died {
            server: "demo".into(),
            exit: exit.map(Into::into),
        };
        assert_eq!(
            died(None).to_string(),
            r#"MCP server "demo" died during the call"#
        );
        assert_eq!(
            died(Some("signal: 9")).to_string(),
            r#"MCP server "demo" died during the call (signal: 9)"#
        );
        let refused = McpError::Refused {
            server: "demo".into(),
            message: "unknown tool".into(),
            code: -32602,
        };
        assert_eq!(
            refused.to_string(),
            r#"MCP server "demo" refused the call: unknown tool (code -32602)"#
        );
    }
}
