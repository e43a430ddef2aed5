//! Integration harness: starts real `flotilla hub` and `flotilla node` processes on port 0
//! in temporary directories, talks to them over real TLS with the generated gRPC clients,
//! and waits for readiness by polling with a deadline (never a bare sleep).
//!
//! - `process`: the binary and child processes;
//! - `cluster`: hubs, nodes and clients for them;
//! - `load`: continuous submissions and the exactly-once check;
//! - `waits`: polling until something holds;
//! - `calls`: building requests and reading results;
//! - `http`: a plain GET (HTTP or HTTPS) for the metrics, health and dashboard endpoints.

mod calls;
mod cluster;
mod http;
mod load;
mod process;
mod waits;

pub use calls::*;
pub use cluster::*;
pub use http::*;
pub use load::*;
pub use process::*;
pub use waits::*;

pub use flotilla_proto::{
    admin_service_client::AdminServiceClient, agent_service_client::AgentServiceClient,
};
