//! The gRPC services a hub serves.

pub mod admin;
pub mod agent;
pub mod credentials;
pub mod node;
