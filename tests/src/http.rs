//! A plain HTTP/1.1 GET (one request, then the connection closes), enough for the metrics,
//! health and dashboard endpoints of hubs and nodes, over plain HTTP or TLS (no client
//! library: the harness talks to them as `curl` or a load balancer would).

use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A response: status code, head (status line and headers) and body.
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// GETs `path` from `base` (`http://HOST:PORT`); the status code and the body.
pub async fn http_get(base: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let s = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    let r = exchange(s, host, path).await?;
    Ok((r.status, r.body))
}

/// GETs `path` from `base` (`https://HOST:PORT`) over TLS, trusting only the CA `ca_pem`.
pub async fn https_get(base: &str, path: &str, ca_pem: &str) -> anyhow::Result<Reply> {
    let host = base.trim_start_matches("https://").trim_end_matches('/');
    let mut roots = rustls::RootCertStore::empty();
    for c in flotilla_common::tls::parse_certs(ca_pem)? {
        roots.add(c)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(
        host.rsplit_once(':').map_or(host, |(h, _)| h).to_owned(),
    )?;
    let tcp = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .with_context(|| format!("tls handshake with {host}"))?;
    exchange(tls, host, path).await
}

async fn exchange(
    mut s: impl AsyncRead + AsyncWrite + Unpin,
    host: &str,
    path: &str,
) -> anyhow::Result<Reply> {
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    // Read the head, then the body: by Content-Length when given (a server may keep the
    // connection open despite `Connection: close`, as Chromium's DevTools port does), else
    // to the end.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "a response without a header end");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    let mut body = raw.split_off(head_end + 4);
    match length {
        Some(n) => {
            while body.len() < n {
                let got = s.read(&mut buf).await?;
                anyhow::ensure!(got > 0, "the response ended before its Content-Length");
                body.extend_from_slice(&buf[..got]);
            }
            body.truncate(n);
        }
        None => {
            // A TLS peer that closes without close_notify ends the body too.
            if let Err(e) = s.read_to_end(&mut body).await {
                anyhow::ensure!(
                    e.kind() == std::io::ErrorKind::UnexpectedEof,
                    "reading the body: {e}"
                );
            }
        }
    }
    let body = String::from_utf8(body).context("the response is not UTF-8")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok(Reply { status, head, body })
}

/// The value of the sample of `name` whose labels include every one of `labels`, in a
/// Prometheus text exposition (what `/metrics` answers).
pub fn metric_sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (set, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|(k, v)| set.split(',').any(|p| p == format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}
