//! A plain HTTP/1.1 GET (one request, then the connection closes), enough for a hub's metrics and health endpoints (no client
//! library: the harness talks to the hub as `curl` or a load balancer would).

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GETs `path` from `base` (`http://HOST:PORT`); the status code and the body.
pub async fn http_get(base: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
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
            s.read_to_end(&mut body).await?;
        }
    }
    let body = String::from_utf8(body).context("the response is not UTF-8")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body))
}
