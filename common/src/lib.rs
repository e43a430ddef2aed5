//! Pieces shared by hub, node and CLI: configuration, PKI and TLS, JWT claims, join tokens
//! and telemetry setup. Nothing here knows about gRPC-generated types.

pub mod config;
pub mod http;
pub mod jwt;
pub mod limits;
pub mod pki;
pub mod telemetry;
pub mod tls;
pub mod token;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A random lowercase alphanumeric string of `len` characters.
pub fn random_id(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

/// Compares two secrets in constant time.
pub fn secret_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}
