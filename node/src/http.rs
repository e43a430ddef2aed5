//! The node's plain HTTP port for operators: `/metrics`, `/healthz`, and `/readyz` (a
//! session with the leader, and every MCP server past its first start: ready, or failing
//! and known to be failing).

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use flotilla_proto::ServerState;

use crate::{mcp::Servers, metrics::NodeMetrics};

#[derive(Clone)]
struct Node {
    servers: Servers,
    metrics: Arc<NodeMetrics>,
}

pub fn router(servers: Servers, metrics: Arc<NodeMetrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Node { servers, metrics })
}

async fn metrics_page(State(n): State<Node>) -> impl IntoResponse {
    let up: Vec<(String, bool)> = n
        .servers
        .statuses()
        .into_iter()
        .map(|s| (s.name, s.state == ServerState::Ready as i32))
        .collect();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        n.metrics.render(&up),
    )
}

async fn ready(State(n): State<Node>) -> impl IntoResponse {
    if !n.metrics.is_connected() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no session with the leader\n".to_owned(),
        );
    }
    let starting: Vec<String> = n
        .servers
        .statuses()
        .into_iter()
        .filter(|s| s.state == ServerState::Starting as i32)
        .map(|s| s.name)
        .collect();
    if !starting.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: MCP servers still starting: {}\n",
                starting.join(", ")
            ),
        );
    }
    (StatusCode::OK, "ready\n".to_owned())
}
