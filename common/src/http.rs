//! The HTTP port every hub and node serves for operators (metrics, health, the dashboard):
//! plain HTTP, or TLS with the operator's certificate when the config names one
//! (`http_tls_cert`, `http_tls_key`).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls::ServerConfig;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes under way at once, in all and from one address; a connection beyond either
/// is closed at once (the accept loop never waits, so one client cannot stall the rest).
const MAX_HANDSHAKES: usize = 256;
const MAX_HANDSHAKES_PER_IP: usize = 16;

/// The URL scheme and address of a port served with `tls` or without.
pub fn url(addr: SocketAddr, tls: bool) -> String {
    format!("{}://{addr}", if tls { "https" } else { "http" })
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(config) => {
            axum::serve(TlsListener::new(listener, config)?, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// A listener whose connections are TLS streams: handshakes run concurrently, each within
/// `HANDSHAKE_TIMEOUT`, at most `MAX_HANDSHAKES` in all and `MAX_HANDSHAKES_PER_IP` from
/// one address (beyond, a connection is closed at once); failed handshakes are logged at
/// debug level and dropped.
struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
}

impl TlsListener {
    fn new(listener: TcpListener, config: Arc<ServerConfig>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let pending: Arc<Mutex<HashMap<IpAddr, usize>>> = Default::default();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of file descriptors, mostly: wait rather than spin.
                            tracing::warn!(error = %e, "http: accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => return,
                };
                let Some(slot) = Pending::take(&pending, peer.ip()) else {
                    tracing::debug!(%peer, "http: too many tls handshakes under way; closed");
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "http: tls handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "http: no tls handshake in time"),
                    }
                });
            }
        });
        Ok(Self { local, ready })
    }
}

/// A handshake's place among those under way; given back when dropped.
struct Pending {
    all: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Pending {
    fn take(all: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut m = all.lock().expect("handshakes lock");
        let total: usize = m.values().sum();
        let mine = m.entry(ip).or_default();
        if total >= MAX_HANDSHAKES || *mine >= MAX_HANDSHAKES_PER_IP {
            if *mine == 0 {
                m.remove(&ip);
            }
            return None;
        }
        *mine += 1;
        Some(Self {
            all: all.clone(),
            ip,
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut m = self.all.lock().expect("handshakes lock");
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task ended (it never does while this listener lives).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_cannot_take_every_handshake_place() {
        let all = Arc::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let held: Vec<_> = std::iter::from_fn(|| Pending::take(&all, a))
            .take(100)
            .collect();
        assert_eq!(held.len(), MAX_HANDSHAKES_PER_IP);
        let other = Pending::take(&all, b).expect("another address still gets a place");
        drop(held);
        drop(other);
        assert!(all.lock().unwrap().is_empty(), "places are given back");
    }
}
