//! Logging setup: `tracing` to stderr, human-readable or JSON, filtered by `RUST_LOG`.
//! Colours only on a terminal: a log written to a file or a pipe is plain text.

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

/// Histogram buckets for durations in seconds, from 5 ms to 20 minutes (tool calls and
/// the time they wait), shared by the hub's and the node's metrics.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 1200.0,
];

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset.
pub fn init(json: bool, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
