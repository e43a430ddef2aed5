//! Reaching the hubs: client settings, TLS channels with the bearer token, failing over
//! between hubs, resumable event streams, and gRPC errors as people read them.

use std::{collections::HashMap, path::PathBuf};

use anyhow::Context;
use flotilla_common::{
    config::{ClientFile, ClientSettings},
    tls,
};
use flotilla_proto as pb;
use pb::{admin_service_client::AdminServiceClient, agent_service_client::AgentServiceClient};
use tonic::{
    metadata::MetadataValue, service::interceptor::InterceptedService, transport::Channel, Request,
    Status,
};

use crate::ClientFlags;

/// Adds `authorization: Bearer <jwt>` to every request.
#[derive(Clone)]
pub(crate) struct Auth(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}
pub(crate) type Agent = AgentServiceClient<InterceptedService<Channel, Auth>>;
pub(crate) type Admin = AdminServiceClient<InterceptedService<Channel, Auth>>;

/// `~/.flotilla/dev`, or `.flotilla/dev` when there is no home directory: where `flotilla
/// dev` keeps its cluster, and so where clients find its `client.toml`.
pub(crate) fn dev_data_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".flotilla")
        .join("dev")
}

/// The default client config: the dev cluster's, under the default data dir.
pub(crate) fn default_client_config() -> PathBuf {
    dev_data_dir().join("client.toml")
}

pub(crate) fn settings(flags: &ClientFlags) -> anyhow::Result<ClientSettings> {
    let env: HashMap<String, String> = std::env::vars().collect();
    Ok(ClientSettings::resolve(
        ClientFile {
            hub: flags.hub.clone(),
            hubs: Vec::new(),
            ca: flags.ca.clone(),
            token: flags.token.clone(),
            cert: flags.cert.clone(),
            key: flags.key.clone(),
        },
        flags.config.as_deref(),
        &default_client_config(),
        &env,
    )?)
}

/// A channel to the hubs (each connection tries them in turn, from the `start`th) and an
/// interceptor that adds the bearer token.
pub(crate) fn connect_with(s: &ClientSettings, start: usize) -> anyhow::Result<(Channel, Auth)> {
    let ca = std::fs::read_to_string(&s.ca)
        .with_context(|| format!("reading CA certificate {}", s.ca.display()))?;
    let identity = match &s.identity {
        Some((cert, key)) => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).with_context(|| {
                    format!("cannot read the client certificate file {}", p.display())
                })
            };
            Some(flotilla_common::pki::CertifiedKey {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
            })
        }
        None => None,
    };
    let channel = tls::channel_any(&s.hubs, tls::client_config(&ca, identity.as_ref())?, start)?;
    let value: MetadataValue<_> = format!("Bearer {}", s.token.trim())
        .parse()
        .context("token contains characters not allowed in a header")?;
    Ok((channel, Auth(value)))
}

pub(crate) fn agent_client(s: &ClientSettings) -> anyhow::Result<Agent> {
    agent_client_from(s, 0)
}

fn agent_client_from(s: &ClientSettings, start: usize) -> anyhow::Result<Agent> {
    let (ch, auth) = connect_with(s, start)?;
    Ok(AgentServiceClient::with_interceptor(ch, auth)
        .max_decoding_message_size(flotilla_common::config::defaults::MAX_MESSAGE_BYTES))
}

pub(crate) fn admin_client(s: &ClientSettings) -> anyhow::Result<Admin> {
    let (ch, auth) = connect_with(s, 0)?;
    Ok(AdminServiceClient::with_interceptor(ch, auth))
}

/// How long a submission keeps trying other hubs while they answer UNAVAILABLE.
const FAILOVER_FOR: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs `f` (a submission made safe to repeat by its idempotency key) against the hubs:
/// while it answers UNAVAILABLE (a hub down or cut off, an election under way) it tries
/// again on the next hub, for up to `FAILOVER_FOR`.
pub(crate) async fn with_failover<T, F, Fut>(s: &ClientSettings, mut f: F) -> anyhow::Result<T>
where
    F: FnMut(Agent) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = std::time::Instant::now() + FAILOVER_FOR;
    let mut start = 0;
    loop {
        match f(agent_client_from(s, start)?).await {
            Ok(v) => return Ok(v),
            Err(e)
                if e.code() == tonic::Code::Unavailable
                    && !no_hub_answered(&e)
                    && std::time::Instant::now() < deadline =>
            {
                start += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return Err(status_error(e)),
        }
    }
}

/// Whether the call failed because not one hub accepted a connection (nothing to wait for).
fn no_hub_answered(s: &Status) -> bool {
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A gRPC error as a one-line message for people, with its cause (for a connection that
/// failed: which hubs were tried and why).
pub(crate) fn status_error(s: Status) -> anyhow::Error {
    let mut msg = format!("{:?}: {}", s.code(), s.message());
    let mut cause = std::error::Error::source(&s);
    while let Some(c) = cause {
        let text = c.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cause = c.source();
    }
    anyhow::anyhow!(msg)
}

/// Reads a resumable event stream until `on` says the end was seen: `open(from)` opens it
/// from sequence number `from`, `on(event)` returns the event's number and whether it was the
/// last. A stream broken by an unavailable hub (a failover) is reopened after the last
/// number seen.
pub(crate) async fn follow_events<E, Open, Fut>(
    mut from: u64,
    mut open: Open,
    mut on: impl FnMut(&E) -> (u64, bool),
) -> anyhow::Result<()>
where
    Open: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<tonic::Streaming<E>>, Status>>,
{
    let mut failures = 0;
    loop {
        let mut stream = match open(from).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && failures < 30 => {
                failures += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            Err(s) => return Err(status_error(s)),
        };
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    let (seq, last) = on(&ev);
                    from = seq + 1;
                    if last {
                        return Ok(());
                    }
                }
                Ok(None) => break,
                Err(s) if s.code() == tonic::Code::Unavailable && failures < 30 => {
                    failures += 1;
                    break;
                }
                Err(s) => return Err(status_error(s)),
            }
        }
    }
}
