//! The Flotilla node: joins with a token, supervises its MCP servers, keeps a session with
//! the hub and runs the tool calls assigned to it.

pub mod http;
pub mod identity;
pub mod journal;
pub mod load;
pub mod mcp;
pub mod mcp_client;
pub mod metrics;
pub mod reconnect;
pub mod session;
pub mod stderr;

use std::{future::Future, sync::Arc};

use flotilla_common::config::NodeConfig;
use tokio_util::sync::CancellationToken;

/// Runs a node until `shutdown` resolves.
pub async fn run(
    cfg: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    flotilla_common::pki::private_dir(&cfg.data_dir)?;
    let http_listen: std::net::SocketAddr = cfg.http_listen.parse()?;
    let http = tokio::net::TcpListener::bind(http_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {http_listen}: {e}"))?;
    let http_addr = http.local_addr()?;
    let http_tls = match (&cfg.http_tls_cert, &cfg.http_tls_key) {
        (Some(cert), Some(key)) => Some(flotilla_common::tls::http_server_config(cert, key)?),
        _ => None,
    };
    let http_url = flotilla_common::http::url(http_addr, http_tls.is_some());
    flotilla_common::pki::write_whole(&cfg.data_dir.join("http.addr"), http_url.as_bytes(), 0o644)?;
    let identity = identity::load_or_join(&cfg).await?;
    tracing::info!(node_id = %identity.node_id, hub = %cfg.hub, http = %http_addr, "node starting");
    let journal = journal::Journal::open(&cfg.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the call journal in {}: {e}",
            cfg.data_dir.display()
        )
    })?;
    let metrics = Arc::new(metrics::NodeMetrics::new());
    let servers = mcp::Servers::start(&cfg.servers, metrics.clone()).await;
    let advertised = cfg.http_advertise.clone().unwrap_or(http_url);
    let grace = std::time::Duration::from_millis(cfg.stop_grace_ms);
    let session = session::Session::new(
        Arc::new(cfg),
        identity,
        journal,
        servers.clone(),
        metrics.clone(),
        advertised,
    )?;
    let stop = CancellationToken::new();
    let trigger = stop.clone();
    let finishing = session.clone();
    tokio::spawn(async move {
        shutdown.await;
        // No new work; the calls running finish and are reported, within the grace.
        finishing.finish_work(grace).await;
        trigger.cancel();
    });
    let http_server =
        {
            let stop = stop.clone();
            let app = http::router(servers.clone(), metrics.clone());
            tokio::spawn(async move {
                let served = flotilla_common::http::serve(http, http_tls, app, async move {
                    stop.cancelled().await
                })
                .await;
                if let Err(e) = served {
                    tracing::warn!(error = %e, "http server");
                }
            })
        };
    let result = session.run(stop.clone()).await;
    stop.cancel();
    servers.shutdown().await;
    let _ = http_server.await;
    result
}
