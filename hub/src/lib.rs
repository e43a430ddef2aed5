//! The Flotilla hub: Raft-replicated state (openraft on sled), the scheduler, node sessions
//! and the gRPC services agents, nodes and admins call.

pub mod admission;
pub mod app;
pub mod audit;
pub mod auth;
pub mod chores;
pub mod cluster;
pub mod commit;
pub mod conn;
pub mod convert;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod faults;
pub mod http;
pub mod issuers;
pub mod liveness;
pub mod metrics;
pub mod pending;
pub mod quota;
pub mod raft;
pub mod retention;
pub mod scheduler;
pub mod service;
pub mod sessions;
pub mod state;
pub mod timers;
pub mod trace;

pub use app::{run, Listeners};
pub use chores::ADMIN_TOKEN_FILE;
pub use cluster::Hub;
