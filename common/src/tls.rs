//! TLS 1.3 (rustls, ring) for every Flotilla connection, done by hand around tonic so that
//! the protocol version, ALPN and certificate checks are ours: the server hands tonic
//! already-established TLS streams that carry the peer's certificate, and clients dial
//! through a connector that does the handshake.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{server::Connected, Channel, Endpoint, Uri};

use crate::pki::{cert_spki_pin, peer_identity, CertifiedKey, PeerIdentity};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate found in PEM input")]
    NoCertificate,
    #[error("no private key found in PEM input")]
    NoKey,
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("invalid hub address {0:?}: expected https://HOST:PORT")]
    BadAddress(String),
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("reading PEM: {0}")]
    Pem(#[from] io::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default TLS crypto provider, for the libraries that build
/// their own TLS configuration from it (the OTLP exporter's HTTP client). Every
/// configuration Flotilla builds itself names its provider. Call once, at start.
pub fn install_default_provider() {
    // Err: a provider is installed already (a second call, or a test harness).
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())?.ok_or(TlsError::NoKey)
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in parse_certs(ca_pem)? {
        store.add(c)?;
    }
    Ok(store)
}

/// Client side for the public web (an identity provider's JWKS URL): the Mozilla roots
/// built in (an image `FROM scratch` has no system store), plus `extra_ca_pem` for a
/// provider behind a private CA. TLS 1.2 and 1.3.
pub fn web_client_config(extra_ca_pem: Option<&str>) -> Result<rustls::ClientConfig, TlsError> {
    let mut store = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(pem) = extra_ca_pem {
        for c in parse_certs(pem)? {
            store.add(c)?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store)
        .with_no_client_auth())
}

/// A certificate chain and key that can be replaced while servers and clients use them:
/// a hub renews its own certificate in place, and every handshake from then on presents
/// the new one (connections already open go on).
#[derive(Debug)]
pub struct LiveIdentity {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl LiveIdentity {
    /// `identity`'s certificate followed by `chain_pem` (the CA that signed it).
    pub fn new(identity: &CertifiedKey, chain_pem: &str) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: std::sync::RwLock::new(certified(identity, chain_pem)?),
        }))
    }

    /// From now on, present `identity` (followed by `chain_pem`).
    pub fn replace(&self, identity: &CertifiedKey, chain_pem: &str) -> Result<(), TlsError> {
        let new = certified(identity, chain_pem)?;
        *self.current.write().expect("identity lock") = new;
        Ok(())
    }

    fn get(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.current.read().expect("identity lock").clone()
    }
}

fn certified(
    identity: &CertifiedKey,
    chain_pem: &str,
) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let mut chain = parse_certs(&identity.cert_pem)?;
    chain.extend(parse_certs(chain_pem)?.into_iter().take(1));
    let key = provider()
        .key_provider
        .load_private_key(parse_key(&identity.key_pem)?)?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(chain, key)))
}

impl rustls::server::ResolvesServerCert for LiveIdentity {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }
}

impl rustls::client::ResolvesClientCert for LiveIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Server side: TLS 1.3 only, ALPN h2, the CA's client certificates accepted but optional
/// (agents may come with a JWT alone; services that need a certificate check for it).
/// `ca_pem` may be a bundle (a CA rotation's overlap), the signing CA first: every CA in it
/// is trusted for client certificates, and the chain sent includes the signing one, so a
/// joining node can check it against its pin.
pub fn server_config(
    ca_pem: &str,
    identity: Arc<LiveIdentity>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
            .allow_unauthenticated()
            .build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Server side of a hub's or node's HTTP port when it serves TLS: the operator's
/// certificate chain and key (PEM files, e.g. from cert-manager or a public CA), TLS 1.2
/// and 1.3 (browsers, Prometheus and load balancers), HTTP/1.1, no client certificate.
pub fn http_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .map_err(|e| TlsError::Pem(io::Error::new(e.kind(), format!("{}: {e}", p.display()))))
    };
    let chain = parse_certs(&read(cert)?)?;
    let key = parse_key(&read(key)?)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Server side for hub-to-hub traffic: like [`server_config`], but a client certificate from
/// the cluster CA is required (the service then checks it was issued to a hub).
pub fn server_config_mtls(
    ca_pem: &str,
    identity: Arc<LiveIdentity>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
            .build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side for a hub calling another: trusting `ca_pem`, presenting `identity` (as it
/// is at each handshake).
pub fn hub_client_config(
    ca_pem: &str,
    identity: Arc<LiveIdentity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_cert_resolver(identity);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side, trusting the cluster CA, optionally presenting a client certificate.
pub fn client_config(
    ca_pem: &str,
    identity: Option<&CertifiedKey>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?);
    let mut cfg = match identity {
        Some(id) => {
            builder.with_client_auth_cert(parse_certs(&id.cert_pem)?, parse_key(&id.key_pem)?)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side for a node that has no CA yet: the server's chain must contain a CA whose
/// public key hashes to `pin`, and the server certificate must verify against that CA.
/// This is what keeps a join secret from ever reaching an impostor hub.
pub fn pinned_client_config(pin: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(PinnedCaVerifier {
        pin: pin.to_owned(),
        provider: provider(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct PinnedCaVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| cert_spki_pin(c).is_some_and(|p| crate::secret_eq(&p, &self.pin)))
            .ok_or_else(|| {
                rustls::Error::General("hub certificate is not from the pinned CA".into())
            })?;
        let mut store = RootCertStore::empty();
        store.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(store),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a handler knows about the connection a request came on.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The verified client certificate, when the peer presented one.
    pub client_cert: Option<Arc<CertificateDer<'static>>>,
    /// What that certificate says of who presented it (read once per connection, not
    /// per request: each Raft RPC is checked against it).
    pub identity: Option<Arc<PeerIdentity>>,
    /// The connection's open requests, when the listener closes idle connections.
    pub activity: Option<Arc<Activity>>,
}

/// Requests open on one connection, and since when none is: the listener closes a
/// connection that has had no open request for its idle timeout. A request is open from
/// its start until its response body is dropped, so a long watch or a node session keeps
/// its connection, and HTTP/2 pings do not.
#[derive(Debug)]
pub struct Activity {
    state: std::sync::Mutex<(usize, std::time::Instant)>,
}

impl Activity {
    fn new() -> Self {
        Self {
            state: std::sync::Mutex::new((0, std::time::Instant::now())),
        }
    }

    /// Counts a request open until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.state.lock().expect("activity").0 += 1;
        ActivityGuard(self.clone())
    }

    /// How long the connection has had no open request (`None` while one is open).
    fn idle_for(&self) -> Option<Duration> {
        let (open, since) = *self.state.lock().expect("activity");
        (open == 0).then(|| since.elapsed())
    }
}

/// An open request on a connection (see [`Activity`]).
#[derive(Debug)]
pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().expect("activity");
        s.0 = s.0.saturating_sub(1);
        if s.0 == 0 {
            s.1 = std::time::Instant::now();
        }
    }
}

/// Closes a connection once it has been idle (no open request) for `timeout`. Polled from
/// the connection's reads, which hyper always has pending, so its timer wakes them.
struct IdleTimer {
    activity: Arc<Activity>,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimer {
    /// `Err` once the connection is due to close.
    fn poll(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.sleep.as_mut().poll(cx).is_ready() {
            let next = match self.activity.idle_for() {
                None => self.timeout,
                Some(idle) if idle >= self.timeout => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "closed an idle connection",
                    ))
                }
                Some(idle) => self.timeout - idle,
            };
            self.sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + next);
        }
        Ok(())
    }
}

/// An accepted TLS connection, as handed to tonic. The HTTP/2 preface, read before the
/// connection was handed over, is replayed first; the permit counts it against the cap
/// until it closes.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    preface: Option<([u8; PREFACE.len()], usize)>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    idle: Option<IdleTimer>,
}

/// What every HTTP/2 client sends first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Limits on the connections a listener accepts.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Open connections at once; more wait in the kernel's backlog. 0: no limit.
    pub max_connections: u32,
    /// From accept to a finished TLS handshake and the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// A connection with no open request for this long is closed (`None`: never). The
    /// server must count requests with [`Activity::begin`] (the hub's `idle` layer).
    pub idle_timeout: Option<Duration>,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 0,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: None,
        }
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(idle) = &mut this.idle {
            if let Err(e) = idle.poll(cx) {
                tracing::info!(peer = ?this.info.remote_addr, "closed an idle connection");
                return Poll::Ready(Err(e));
            }
        }
        if let Some((bytes, at)) = &mut self.preface {
            let n = (bytes.len() - *at).min(buf.remaining());
            buf.put_slice(&bytes[*at..*at + n]);
            *at += n;
            if *at == bytes.len() {
                self.preface = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections on an already-bound listener and completes TLS handshakes
/// concurrently (a slow or hostile peer does not hold up others). A connection must finish
/// its handshake and send the HTTP/2 preface within `limits.handshake_timeout`; failures
/// are logged and dropped. At most `limits.max_connections` are open at once. The stream
/// ends when the consumer goes away.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: ConnLimits,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = (limits.max_connections > 0)
        .then(|| Arc::new(tokio::sync::Semaphore::new(limits.max_connections as usize)));
    tokio::spawn(async move {
        let mut warned = false;
        loop {
            let permit = match &slots {
                Some(s) => {
                    if s.available_permits() == 0 && !warned {
                        tracing::warn!(
                            max = limits.max_connections,
                            "connection limit reached; new connections wait"
                        );
                        warned = true;
                    }
                    let p = tokio::select! {
                        p = s.clone().acquire_owned() => p,
                        _ = tx.closed() => return,
                    };
                    match p {
                        Ok(p) => Some(p),
                        Err(_) => return,
                    }
                }
                None => None,
            };
            if slots.as_ref().is_some_and(|s| s.available_permits() > 0) {
                warned = false;
            }
            let (tcp, addr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = async {
                    let mut tls = acceptor.accept(tcp).await?;
                    let mut preface = [0u8; PREFACE.len()];
                    tokio::io::AsyncReadExt::read_exact(&mut tls, &mut preface).await?;
                    if &preface != PREFACE {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the client did not speak HTTP/2",
                        ));
                    }
                    Ok::<_, io::Error>((tls, preface))
                };
                match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                    Ok(Ok((tls, preface))) => {
                        let client_cert = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| Arc::new(c.clone().into_owned()));
                        let idle = limits.idle_timeout.map(|timeout| IdleTimer {
                            activity: Arc::new(Activity::new()),
                            timeout,
                            sleep: Box::pin(tokio::time::sleep(timeout)),
                        });
                        let identity = client_cert
                            .as_deref()
                            .and_then(|c| peer_identity(c))
                            .map(Arc::new);
                        let info = PeerInfo {
                            remote_addr: Some(addr),
                            client_cert,
                            identity,
                            activity: idle.as_ref().map(|i| i.activity.clone()),
                        };
                        let conn = TlsConn {
                            inner: tls,
                            info,
                            preface: Some((preface, 0)),
                            _permit: permit,
                            idle,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::info!(peer = %addr, error = %e, "tls handshake failed"),
                    Err(_) => tracing::info!(
                        peer = %addr,
                        "no tls handshake and http/2 preface in time; closed"
                    ),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Parses `https://HOST:PORT` (or `HOST:PORT`) into host and port.
pub fn split_address(addr: &str) -> Result<(String, u16), TlsError> {
    let rest = addr.strip_prefix("https://").unwrap_or(addr);
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| TlsError::BadAddress(addr.to_owned()))?;
    let port = port
        .parse()
        .map_err(|_| TlsError::BadAddress(addr.to_owned()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(TlsError::BadAddress(addr.to_owned()));
    }
    Ok((host.to_owned(), port))
}

/// A gRPC channel to `addr` over TLS with `config`. The channel reconnects by itself.
pub fn channel(addr: &str, config: Arc<ClientConfig>) -> Result<Channel, TlsError> {
    channel_any(&[addr.to_owned()], config, 0)
}

/// How long one hub may take to accept a connection before the next one is tried.
const HUB_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A channel to any of `addrs`: each new connection tries them in turn, from `start` at
/// first and then from the one that last answered, so a dead hub costs a refused
/// connection rather than an outage. When none answers, the error names each hub tried
/// and why it failed.
pub fn channel_any(
    addrs: &[String],
    config: Arc<ClientConfig>,
    start: usize,
) -> Result<Channel, TlsError> {
    let hubs: Vec<(String, String, u16)> = addrs
        .iter()
        .map(|a| split_address(a).map(|(h, p)| (a.clone(), h, p)))
        .collect::<Result<_, _>>()?;
    let Some((_, first_host, first_port)) = hubs.first().cloned() else {
        return Err(TlsError::BadAddress(String::new()));
    };
    let hubs = Arc::new(hubs);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(start % hubs.len()));
    // tonic only sees plain HTTP/2: TLS is done inside the connector below.
    let endpoint = Endpoint::from_shared(format!("http://{}", host_port(&first_host, first_port)))
        .map_err(|_| TlsError::BadAddress(addrs.join(",")))?
        .connect_timeout(HUB_CONNECT_TIMEOUT * hubs.len() as u32)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let connector = tower::service_fn(move |_: Uri| {
        let config = config.clone();
        let hubs = hubs.clone();
        let next = next.clone();
        async move {
            let from = next.load(std::sync::atomic::Ordering::Relaxed);
            let mut tried = Vec::new();
            for k in 0..hubs.len() {
                let i = (from + k) % hubs.len();
                let (addr, host, port) = &hubs[i];
                let attempt = tokio::time::timeout(
                    HUB_CONNECT_TIMEOUT,
                    connect_tls(host, *port, config.clone()),
                );
                match attempt.await {
                    Ok(Ok(io)) => {
                        next.store(i, std::sync::atomic::Ordering::Relaxed);
                        return Ok(io);
                    }
                    Ok(Err(e)) => tried.push(format!("{addr} ({e})")),
                    Err(_) => tried.push(format!("{addr} (no answer in {HUB_CONNECT_TIMEOUT:?})")),
                }
            }
            Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("no hub answered; tried {}", tried.join(", ")),
            ))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

async fn connect_tls(
    host: &str,
    port: u16,
    config: Arc<ClientConfig>,
) -> io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(hyper_util::rt::TokioIo::new(tls))
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Ca;

    /// One mutual-TLS handshake in memory: the serials of the certificates the server and
    /// the client presented.
    async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> (String, String) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accept = tokio::spawn(async move {
            let s = tokio_rustls::TlsAcceptor::from(server)
                .accept(a)
                .await
                .expect("server side");
            let der = s.get_ref().1.peer_certificates().expect("client cert")[0].to_vec();
            crate::pki::peer_identity(&der).expect("readable").serial
        });
        let name = ServerName::try_from("localhost").expect("name");
        let c = tokio_rustls::TlsConnector::from(client)
            .connect(name, b)
            .await
            .expect("client side");
        let der = c.get_ref().1.peer_certificates().expect("server cert")[0].to_vec();
        let server_serial = crate::pki::peer_identity(&der).expect("readable").serial;
        (server_serial, accept.await.expect("accepted"))
    }

    fn serial(k: &CertifiedKey) -> String {
        crate::pki::pem_identity(&k.cert_pem)
            .expect("readable")
            .serial
    }

    #[tokio::test]
    async fn a_replaced_identity_is_what_the_next_handshake_presents_on_either_side() {
        install_default_provider();
        let ca = Ca::generate("t").unwrap();
        let names = vec!["localhost".to_owned()];
        let (a1, a2) = (
            ca.issue_hub("hub-1", &names).unwrap(),
            ca.issue_hub("hub-1", &names).unwrap(),
        );
        let (b1, b2) = (
            ca.issue_hub("hub-2", &names).unwrap(),
            ca.issue_hub("hub-2", &names).unwrap(),
        );
        let server_id = LiveIdentity::new(&a1, ca.cert_pem()).unwrap();
        let client_id = LiveIdentity::new(&b1, ca.cert_pem()).unwrap();
        let server = server_config_mtls(ca.cert_pem(), server_id.clone()).unwrap();
        let client = hub_client_config(ca.cert_pem(), client_id.clone()).unwrap();
        assert_eq!(
            handshake(server.clone(), client.clone()).await,
            (serial(&a1), serial(&b1))
        );
        server_id.replace(&a2, ca.cert_pem()).unwrap();
        client_id.replace(&b2, ca.cert_pem()).unwrap();
        assert_eq!(
            handshake(server, client).await,
            (serial(&a2), serial(&b2)),
            "the same configs, the new certificates"
        );
    }
}
