//! The Flotilla node: joins with a token, supervises its MCP servers, keeps a session with
//! the hub and runs the tool calls assigned to it.

pub mod identity;
pub mod load;
pub mod mcp;
pub mod mcp_client;
pub mod reconnect;
pub mod session;

use std::{future::Future, sync::Arc};

use flotilla_common::config::NodeConfig;
use tokio_util::sync::CancellationToken;

/// Runs a node until `shutdown` resolves.
pub async fn run(
    cfg: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    flotilla_common::pki::private_dir(&cfg.data_dir)?;
    let identity = identity::load_or_join(&cfg).await?;
    tracing::info!(node_id = %identity.node_id, hub = %cfg.hub, "node starting");
    let servers = mcp::Servers::start(&cfg.servers).await;
    let stop = CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    let result = session::Session::new(Arc::new(cfg), identity, servers.clone())
        .run(stop)
        .await;
    servers.shutdown().await;
    result
}
