//! The hub's HTTP port, for operators and their tools: `/metrics` (Prometheus text
//! exposition), `/healthz` (the process serves), `/readyz` (for load balancers and
//! Kubernetes probes: this hub is in a cluster with a leader and has applied what it holds),
//! `/.well-known/jwks.json` (the public keys that verify agent tokens, for services that
//! check a Flotilla token themselves). Plain HTTP on its own listener (`http_listen` in hub.toml): nothing here changes
//! anything. The dashboard (`/`, `crate::dashboard`) needs a login; the rest is open.

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use crate::{cluster::Hub, metrics::RaftView};

/// The routes, on `hub`.
pub fn router(hub: Hub) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/.well-known/jwks.json", get(jwks))
        .merge(crate::dashboard::routes())
        .with_state(hub)
}

fn raft_view(hub: &Hub) -> RaftView {
    // `is_leader` reads the metrics itself: never while this borrow is held (a second
    // read of a watch channel behind a waiting writer deadlocks).
    let is_leader = hub.is_leader();
    let (term, last_log_index, applied_index) = {
        let m = hub.raft().metrics();
        let m = m.borrow();
        (
            m.current_term,
            m.last_log_index.unwrap_or(0),
            m.last_applied.map_or(0, |l| l.index),
        )
    };
    RaftView {
        term,
        is_leader,
        commit_index: hub.commit_index(),
        last_log_index,
        applied_index,
        limits: crate::scheduler::limits(hub),
        heartbeat_ages: hub
            .sessions
            .snapshot()
            .into_iter()
            .map(|(id, n)| (id, n.last_seen.elapsed().as_secs_f64()))
            .collect(),
    }
}

async fn metrics(State(hub): State<Hub>) -> impl IntoResponse {
    let raft = raft_view(&hub);
    let body = hub
        .metrics
        .render(|| hub.state(), &raft, flotilla_common::now_ms());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// Entries a hub may hold unapplied and still be ready: a busy leader always holds a few
/// being committed (group commit keeps up to 4 entries in flight); a hub catching up after a
/// restart or a partition holds thousands.
const READY_LAG: u64 = 256;

/// The keys that verify agent tokens now (the active one and those rotated out but not yet
/// retired), as a JSON Web Key Set (RFC 7517). Public halves only.
async fn jwks(State(hub): State<Hub>) -> impl IntoResponse {
    let keys: Vec<serde_json::Value> = hub
        .state()
        .verifying_keys(flotilla_common::now_ms())
        .iter()
        .filter_map(|k| match k.jwk() {
            Ok(j) => Some(j),
            Err(e) => {
                tracing::error!(kid = %k.kid, error = %e, "cannot publish a signing key");
                None
            }
        })
        .collect();
    (
        [
            (axum::http::header::CONTENT_TYPE, "application/jwk-set+json"),
            (axum::http::header::CACHE_CONTROL, "max-age=60"),
        ],
        serde_json::json!({ "keys": keys }).to_string(),
    )
}

/// Ready when a leader with a quorum is known and this hub is within `READY_LAG` entries of applying
/// everything it holds; otherwise 503 saying which is missing.
async fn ready(State(hub): State<Hub>) -> impl IntoResponse {
    let raft = raft_view(&hub);
    // A leader counts only while a quorum still answers it (`is_leader`); a leader cut off
    // from its quorum does not know it has been replaced.
    let led = match hub.leader() {
        Some((id, _)) if id == hub.id() => hub.is_leader(),
        other => other.is_some(),
    };
    if !led {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no leader known (no quorum answers)\n".to_owned(),
        );
    }
    if raft.last_log_index.saturating_sub(raft.applied_index) > READY_LAG {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: applied {} of {} log entries\n",
                raft.applied_index, raft.last_log_index
            ),
        );
    }
    (StatusCode::OK, "ready\n".to_owned())
}
