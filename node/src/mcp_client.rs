//! One MCP session with a server the node started as a child process (no shell): list and
//! call tools, route progress notifications per call, cancel with notifications/cancelled,
//! and notice when the process dies.
use std::{
    collections::{HashMap, VecDeque},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use rmcp::{
    model::{
        CallToolRequestParams, CancelledNotificationParam, ClientConfig, ClientRequest,
        ProgressNotificationParam, ProgressToken, Request, RequestId, ServerResult,
    },
    service::{PeerRequestOptions, RunningService},
    ClientHandler, ErrorData, Peer, RoleClient, ServiceError, ServiceExt,
};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Progress {
    pub progress: f64,
    pub total: Option<f64>,
    pub message: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ToolInfo {
    pub name: String,
    pub description: Option<String>,
    pub input_schema: Value,
    pub read_only_hint: Option<bool>,
    pub idempotent_hint: Option<bool>,
    pub destructive_hint: Option<bool>,
}

#[derive(Debug)]
pub enum CallError {
    /// JSON-RPC error from the server (e.g. -32602 invalid params, unknown tool).
    Mcp(ErrorData),
    /// We cancelled the call (notifications/cancelled was sent).
    Cancelled,
    /// The connection is gone: the server process died or closed stdout.
    ServerGone,
    Other(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Mcp(e) => write!(f, "mcp error {}: {}", e.code.0, e.message),
            CallError::Cancelled => write!(f, "cancelled"),
            CallError::ServerGone => write!(f, "server gone (transport closed)"),
            CallError::Other(s) => write!(f, "{s}"),
        }
    }
}
impl std::error::Error for CallError {}

impl From<ServiceError> for CallError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::McpError(e) => CallError::Mcp(e),
            ServiceError::Cancelled { .. } => CallError::Cancelled,
            ServiceError::TransportClosed | ServiceError::TransportSend(_) => CallError::ServerGone,
            other => CallError::Other(other.to_string()),
        }
    }
}

/// Routes notifications/progress to per-call senders by progress token. Notifications
/// that arrive before the caller registered its token (rmcp assigns the token inside
/// send_request, so there is a tiny window) are buffered for a few tokens.
#[derive(Clone, Default)]
struct ProgressRouter(Arc<Mutex<RouterState>>);

#[derive(Default)]
struct RouterState {
    senders: HashMap<ProgressToken, mpsc::Sender<Progress>>,
    early: VecDeque<(ProgressToken, Progress)>,
}

impl ProgressRouter {
    const EARLY_CAP: usize = 256;

    fn dispatch(&self, p: ProgressNotificationParam) {
        let item = Progress {
            progress: p.progress,
            total: p.total,
            message: p.message,
        };
        let mut st = self.0.lock().expect("mcp lock");
        match st.senders.get(&p.progress_token) {
            // try_send: a slow consumer loses progress updates instead of stalling rmcp.
            Some(tx) => drop(tx.try_send(item)),
            None => {
                if st.early.len() >= Self::EARLY_CAP {
                    st.early.pop_front();
                }
                st.early.push_back((p.progress_token, item));
            }
        }
    }

    fn register(&self, token: ProgressToken, tx: mpsc::Sender<Progress>) -> ProgressRegistration {
        let mut st = self.0.lock().expect("mcp lock");
        let early = std::mem::take(&mut st.early);
        for (t, item) in early {
            if t == token {
                let _ = tx.try_send(item);
            } else {
                st.early.push_back((t, item));
            }
        }
        st.senders.insert(token.clone(), tx);
        ProgressRegistration {
            router: self.clone(),
            token,
        }
    }
}

struct ProgressRegistration {
    router: ProgressRouter,
    token: ProgressToken,
}
impl Drop for ProgressRegistration {
    fn drop(&mut self) {
        self.router
            .0
            .lock()
            .expect("mcp lock")
            .senders
            .remove(&self.token);
    }
}

/// Reads the server's stdout for rmcp and, as the bytes pass, hands every
/// notifications/progress line to the router. rmcp runs each notification's handler as a
/// task of its own, so a call's last progress could still be queued when the response that
/// followed it woke the call; dispatched here, progress reaches its call in stream order,
/// before rmcp has even read the response.
struct ProgressTap<R> {
    inner: R,
    router: ProgressRouter,
    /// The line read so far (only while it may be a progress notification).
    line: Vec<u8>,
    /// The current line grew past `TAP_LINE_MAX`: not progress, skipped to its end.
    skipping: bool,
}

/// Longer lines are results or requests, never progress worth parsing here.
const TAP_LINE_MAX: usize = 64 * 1024;

impl<R> ProgressTap<R> {
    fn new(inner: R, router: ProgressRouter) -> Self {
        Self {
            inner,
            router,
            line: Vec::new(),
            skipping: false,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let end = bytes.iter().position(|b| *b == b'\n');
            let (part, rest) = match end {
                Some(i) => (&bytes[..i], &bytes[i + 1..]),
                None => (bytes, &[][..]),
            };
            if !self.skipping {
                self.line.extend_from_slice(part);
                if self.line.len() > TAP_LINE_MAX {
                    self.line.clear();
                    self.skipping = true;
                }
            }
            if end.is_some() {
                if !self.skipping {
                    self.line_done();
                }
                self.line.clear();
                self.skipping = false;
            }
            bytes = rest;
        }
    }

    fn line_done(&self) {
        #[derive(serde::Deserialize)]
        struct Notification {
            method: String,
            params: ProgressNotificationParam,
        }
        const METHOD: &str = "notifications/progress";
        if !self
            .line
            .windows(METHOD.len())
            .any(|w| w == METHOD.as_bytes())
        {
            return;
        }
        if let Ok(n) = serde_json::from_slice::<Notification>(&self.line) {
            if n.method == METHOD {
                self.router.dispatch(n.params);
            }
        }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ProgressTap<R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled {
            this.feed(&buf.filled()[before..]);
        }
        polled
    }
}

/// Sends notifications/cancelled if the call future is dropped before the response.
struct CancelOnDrop {
    peer: Peer<RoleClient>,
    id: Option<RequestId>,
}
impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let (Some(id), Ok(rt)) = (self.id.take(), tokio::runtime::Handle::try_current()) {
            let peer = self.peer.clone();
            rt.spawn(async move {
                let p = CancelledNotificationParam::new(Some(id), Some("call dropped".into()));
                let _ = peer.notify_cancelled(p).await;
            });
        }
    }
}

/// The rmcp client-side handler. Progress, the only notification a node uses, is taken
/// from the stream by `ProgressTap` before rmcp sees it.
#[derive(Clone)]
struct NodeHandler;

impl ClientHandler for NodeHandler {
    fn get_info(&self) -> ClientConfig {
        // Default protocolVersion is 2026-07-28 (no initialize); servers fall back in
        // the initialize reply. Client name/version default to this crate's.
        ClientConfig::default()
    }
}

struct Shared {
    running: tokio::sync::Mutex<Option<RunningService<RoleClient, NodeHandler>>>,
    exit: watch::Receiver<Option<ExitStatus>>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    pid: Option<u32>,
}

/// Cheap to clone; all clones share one MCP session, calls may run concurrently.
#[derive(Clone)]
pub struct McpClient {
    peer: Peer<RoleClient>,
    progress: ProgressRouter,
    shared: Arc<Shared>,
}

impl McpClient {
    /// Spawn `program args` (no shell) with extra `env`, and run the MCP initialize
    /// handshake. What it writes to stderr goes to `stderr`.
    pub async fn spawn(
        program: &str,
        args: &[String],
        env: &HashMap<String, String>,
        stderr: &crate::stderr::StderrTail,
    ) -> anyhow::Result<McpClient> {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let pid = child.id();
        if let Some(e) = child.stderr.take() {
            stderr.follow(e);
        }
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            anyhow::bail!("child process has no stdio pipes");
        };

        // Reaper task: records the exit status; kills the child when asked.
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill_rx => { let _ = child.start_kill(); child.wait().await }
            };
            let _ = exit_tx.send(status.ok());
        });

        let progress = ProgressRouter::default();
        let stdout = ProgressTap::new(stdout, progress.clone());
        // (AsyncRead, AsyncWrite) tuple is an rmcp transport (feature transport-async-rw).
        let running = match NodeHandler.serve((stdout, stdin)).await {
            Ok(r) => r,
            Err(e) => {
                // A process that exited says more than the broken pipe the handshake saw.
                let mut exit = exit_rx.clone();
                let waited = tokio::time::timeout(
                    Duration::from_millis(500),
                    exit.wait_for(|s| s.is_some()),
                )
                .await;
                if let Ok(Ok(status)) = waited {
                    if let Some(st) = *status {
                        anyhow::bail!("it exited ({st}) before finishing the MCP handshake");
                    }
                }
                return Err(e.into());
            }
        };
        let peer = running.peer().clone();
        Ok(McpClient {
            peer,
            progress,
            shared: Arc::new(Shared {
                running: tokio::sync::Mutex::new(Some(running)),
                exit: exit_rx,
                kill: Mutex::new(Some(kill_tx)),
                pid,
            }),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.shared.pid
    }

    pub async fn list_tools(&self) -> Result<Vec<ToolInfo>, CallError> {
        let tools = self.peer.list_all_tools().await?;
        Ok(tools
            .into_iter()
            .map(|t| {
                let a = t.annotations.clone().unwrap_or_default();
                ToolInfo {
                    name: t.name.to_string(),
                    description: t.description.as_ref().map(|d| d.to_string()),
                    input_schema: Value::Object((*t.input_schema).clone()),
                    read_only_hint: a.read_only_hint,
                    idempotent_hint: a.idempotent_hint,
                    destructive_hint: a.destructive_hint,
                }
            })
            .collect())
    }

    /// Call a tool. Progress notifications for this call go to `progress` (if given).
    /// Cancelling `cancel` (or dropping the returned future) sends notifications/cancelled
    /// with this request's id. Returns the CallToolResult as MCP wire JSON.
    pub async fn call_tool(
        &self,
        name: &str,
        args: Map<String, Value>,
        progress: Option<mpsc::Sender<Progress>>,
        cancel: CancellationToken,
    ) -> Result<Value, CallError> {
        let params = CallToolRequestParams::new(name.to_owned()).with_arguments(args);
        let request = ClientRequest::CallToolRequest(Request::new(params));
        // rmcp always puts a fresh progressToken into the request's _meta.
        let handle = self
            .peer
            .send_cancellable_request(request, PeerRequestOptions::no_options())
            .await?;
        let id = handle.id.clone();
        let _reg = progress.map(|tx| self.progress.register(handle.progress_token.clone(), tx));
        let mut guard = CancelOnDrop {
            peer: self.peer.clone(),
            id: Some(id.clone()),
        };

        let result = tokio::select! {
            r = handle.await_response() => r,
            _ = cancel.cancelled() => {
                guard.id = None;
                let p = CancelledNotificationParam::new(Some(id), Some("cancelled by node".into()));
                self.peer.notify_cancelled(p).await?;
                return Err(CallError::Cancelled);
            }
        };
        guard.id = None;
        match result? {
            ServerResult::CallToolResult(r) => {
                serde_json::to_value(r).map_err(|e| CallError::Other(e.to_string()))
            }
            other => Err(CallError::Other(format!("unexpected result: {other:?}"))),
        }
    }

    /// Resolves when the server process exits (use it to trigger a restart).
    pub async fn wait_exit(&self) -> Option<ExitStatus> {
        let mut rx = self.shared.exit.clone();
        let status = rx
            .wait_for(|s| s.is_some())
            .await
            .map(|s| *s)
            .ok()
            .flatten();
        status
    }

    /// Close the session (closes the child's stdin), wait up to 3 s, then kill.
    pub async fn shutdown(&self) -> Option<ExitStatus> {
        if let Some(mut running) = self.shared.running.lock().await.take() {
            let _ = running.close_with_timeout(Duration::from_secs(3)).await;
        }
        if let Ok(s) = tokio::time::timeout(Duration::from_secs(3), self.wait_exit()).await {
            return s;
        }
        if let Some(kill) = self.shared.kill.lock().expect("mcp lock").take() {
            let _ = kill.send(());
        }
        self.wait_exit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn progress_line(token: &str, n: u32) -> String {
        format!(
            r#"{{"jsonrpc":"2.0","method":"notifications/progress","params":{{"progressToken":"{token}","progress":{n}}}}}"#
        )
    }

    /// Progress lines are dispatched as they pass, in order, whatever the read sizes; other
    /// lines (a long result, text that only mentions the method) pass untouched.
    #[tokio::test]
    async fn the_tap_dispatches_progress_in_stream_order_and_passes_every_byte() {
        let router = ProgressRouter::default();
        let (tx, mut rx) = mpsc::channel(16);
        let _reg = router.register(
            ProgressToken(rmcp::model::NumberOrString::String("a".into())),
            tx,
        );
        let long = format!(
            r#"{{"jsonrpc":"2.0","id":1,"result":{{"text":"{} notifications/progress"}}}}"#,
            "x".repeat(TAP_LINE_MAX * 2)
        );
        let stream = [
            progress_line("a", 1),
            progress_line("b", 9),
            long,
            progress_line("a", 2),
            r#"{"jsonrpc":"2.0","id":2,"result":{"text":"notifications/progress"}}"#.to_owned(),
            progress_line("a", 3),
        ]
        .join("\n")
            + "\n";
        let mut tap = ProgressTap::new(stream.as_bytes(), router.clone());
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = tap.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, stream.as_bytes(), "rmcp reads every byte");
        let mut got = Vec::new();
        while let Ok(p) = rx.try_recv() {
            got.push(p.progress);
        }
        assert_eq!(got, [1.0, 2.0, 3.0]);
        assert!(!tap.skipping && tap.line.is_empty());
    }
}
