//! The node's Prometheus metrics (`/metrics` on its HTTP port; docs/metrics.md lists
//! each). Label values are server and tool names from the node's own config and its
//! servers' tool lists: bounded, never a task id.

use flotilla_common::telemetry::DURATION_BUCKETS;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct NodeMetrics {
    registry: Registry,
    calls: IntCounterVec,
    call_seconds: HistogramVec,
    restarts: IntCounterVec,
    server_up: IntGaugeVec,
    hub_connected: IntGauge,
}

/// How a tool call ended, as the `outcome` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered with a result.
    Ok,
    /// The server answered with a result that says `isError`.
    ToolError,
    /// No result: refused, cancelled, the server died or was not ready.
    NoResult,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ToolError => "tool_error",
            Self::NoResult => "no_result",
        }
    }
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeMetrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("flotilla".into()), None).expect("a valid metric prefix");
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry
                .register(c)
                .expect("each metric is registered once, with a valid name");
        };
        let calls = IntCounterVec::new(
            Opts::new(
                "node_mcp_calls_total",
                "Tool calls this node made to its MCP servers, by server, tool and outcome (ok, tool_error, no_result).",
            ),
            &["server", "tool", "outcome"],
        )
        .expect("valid counter");
        let call_seconds = HistogramVec::new(
            HistogramOpts::new(
                "node_mcp_call_duration_seconds",
                "How long this node's MCP tool calls took, by server.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["server"],
        )
        .expect("valid histogram");
        let restarts = IntCounterVec::new(
            Opts::new(
                "node_mcp_server_restarts_total",
                "Times an MCP server was started again after it died or failed to start.",
            ),
            &["server"],
        )
        .expect("valid counter");
        let server_up = IntGaugeVec::new(
            Opts::new(
                "node_mcp_server_up",
                "1 while an MCP server is ready for calls.",
            ),
            &["server"],
        )
        .expect("valid gauge");
        let hub_connected = IntGauge::new(
            "node_hub_connected",
            "1 while this node has a session with the leader.",
        )
        .expect("valid gauge");
        reg(Box::new(calls.clone()));
        reg(Box::new(call_seconds.clone()));
        reg(Box::new(restarts.clone()));
        reg(Box::new(server_up.clone()));
        reg(Box::new(hub_connected.clone()));
        Self {
            registry,
            calls,
            call_seconds,
            restarts,
            server_up,
            hub_connected,
        }
    }

    pub fn call(&self, server: &str, tool: &str, outcome: Outcome, took: std::time::Duration) {
        self.calls
            .with_label_values(&[server, tool, outcome.as_str()])
            .inc();
        self.call_seconds
            .with_label_values(&[server])
            .observe(took.as_secs_f64());
    }

    pub fn restarted(&self, server: &str) {
        self.restarts.with_label_values(&[server]).inc();
    }

    pub fn connected(&self, yes: bool) {
        self.hub_connected.set(i64::from(yes));
    }

    pub fn is_connected(&self) -> bool {
        self.hub_connected.get() == 1
    }

    /// Every metric in the text exposition format; `up` says, per server, whether it is
    /// ready now.
    pub fn render(&self, up: &[(String, bool)]) -> String {
        for (server, ready) in up {
            self.server_up
                .with_label_values(&[server])
                .set(i64::from(*ready));
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("the text encoder writes to memory");
        String::from_utf8(out).expect("the text exposition is UTF-8")
    }
}
