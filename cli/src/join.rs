//! `flotilla join`: makes this machine a node, in one command. It joins the cluster with the
//! token now (the token is used once and never written down), keeps the identity it gets in
//! the data dir, and writes node.toml; `flotilla node --config` (or the systemd unit in
//! deploy/systemd) then runs it.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Args;
use flotilla_common::config::{McpServerConfig, NodeFile};

#[derive(Args)]
pub(crate) struct JoinArgs {
    /// A hub's address, https://HOST:PORT.
    #[arg(long)]
    hub: String,
    /// The join token (`flotilla token create`); better given as FLOTILLA_JOIN_TOKEN, out of
    /// the shell's history and the process list.
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// The node's name [default: this machine's host name].
    #[arg(long)]
    name: Option<String>,
    /// Where the node keeps its identity.
    #[arg(long, default_value = "/var/lib/flotilla/node")]
    data_dir: PathBuf,
    /// The node.toml to write (never over an existing one).
    #[arg(long, default_value = "/etc/flotilla/node.toml")]
    config: PathBuf,
    /// A label for placement, KEY=VALUE (region=eu-west, zone=b); repeat for more.
    #[arg(long = "label", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// An MCP server to host, NAME=COMMAND [ARGS...] (split at spaces); repeat for more.
    /// More settings per server: edit node.toml afterwards.
    #[arg(long = "server", value_parser = key_value)]
    servers: Vec<(String, String)>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() || v.is_empty() {
        return Err(format!("{s:?} is not KEY=VALUE"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// A host name made into a node name: lowercase a-z, 0-9 and '-', at most 63.
fn node_name(host: &str) -> String {
    let name: String = host
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    name.trim_matches('-').to_owned()
}

pub(crate) async fn join(a: JoinArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !a.config.exists(),
        "{} exists: this machine may already be a node (remove it to join again)",
        a.config.display()
    );
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| node_name(&flotilla_common::config::hostname()));
    let servers = a
        .servers
        .iter()
        .map(|(name, command)| {
            let mut words = command.split_whitespace().map(str::to_owned);
            McpServerConfig {
                name: name.clone(),
                command: words.next().unwrap_or_default(),
                args: words.collect(),
                env: BTreeMap::new(),
                max_concurrency: flotilla_common::config::defaults::MAX_CONCURRENCY,
                scope: flotilla_common::config::defaults::SERVER_SCOPE.to_owned(),
            }
        })
        .collect();
    let mut file = NodeFile {
        name,
        data_dir: a.data_dir.clone(),
        hub: a.hub.clone(),
        join_token: Some(a.token.clone()),
        labels: a.labels.iter().cloned().collect(),
        heartbeat_ms: flotilla_common::config::defaults::HEARTBEAT_MS,
        stop_grace_ms: 25_000,
        servers,
        tenants: Vec::new(),
        cpu_high_water_percent: 0.0,
        http_listen: flotilla_common::config::defaults::HTTP_LISTEN.to_owned(),
        http_advertise: None,
        http_tls_cert: None,
        http_tls_key: None,
        otlp_endpoint: None,
    };
    // The same checks `flotilla node` makes, before anything is sent or written.
    let shown = a.config.display().to_string();
    let cfg = file.clone().validate(&shown)?;
    flotilla_common::pki::private_dir(&a.data_dir)
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    let identity = flotilla_node::identity::load_or_join(&cfg).await?;
    file.join_token = None;
    if let Some(dir) = a.config.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    flotilla_common::pki::write_whole(&a.config, toml::to_string(&file)?.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", a.config.display()))?;
    outln!("joined as node {}", identity.node_id);
    outln!("wrote {} (the join token is not in it)", a.config.display());
    outln!(
        "start it: flotilla node --config {}   (or: systemctl enable --now flotilla-node)",
        a.config.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_name_becomes_a_node_name() {
        assert_eq!(node_name("Edge-Box_7.lan.example"), "edge-box-7");
        assert_eq!(node_name("-x-"), "x");
        assert_eq!(node_name(&"a".repeat(100)).len(), 63);
    }

    #[test]
    fn labels_and_servers_are_key_value() {
        assert_eq!(key_value("region=eu"), Ok(("region".into(), "eu".into())));
        assert_eq!(
            key_value("time=python3 -m mcp_server_time"),
            Ok(("time".into(), "python3 -m mcp_server_time".into()))
        );
        assert!(key_value("region").is_err());
        assert!(key_value("=x").is_err());
    }
}
