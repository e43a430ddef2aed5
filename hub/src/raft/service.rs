//! Raft RPC server between hubs, on its own port: only certificates the cluster CA issued to
//! hubs are accepted. Besides openraft's RPCs it serves what followers ask of the leader:
//! forwarded writes, read indexes, membership changes and the cluster view.

use flotilla_common::{pki, tls::PeerInfo};
use flotilla_proto::{raft_service_server::RaftService, RaftMessage};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::{
    network::{decode, encode},
    HubNode,
};
use crate::{app::Hub, state::Command};

/// Why the leader could not do what a follower asked.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
pub enum PeerError {
    /// This hub is not (or no longer) the leader: ask again.
    #[error("not the leader")]
    NotLeader,
    #[error("{0}")]
    Failed(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MembershipChange {
    Add { id: u64, node: HubNode },
    Remove { id: u64 },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemberView {
    pub id: u64,
    pub api: String,
    pub raft: String,
    pub role: String,
    pub matched_index: u64,
    pub lag: u64,
}

/// A hub's view of the cluster; the leader's is the one with replication figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterView {
    pub this_hub: u64,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub members: Vec<MemberView>,
}

pub struct RaftApi {
    pub hub: Hub,
}

fn check_hub<T>(req: &Request<T>) -> Result<(), Status> {
    let cert = req
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.client_cert.clone())
        .ok_or_else(|| Status::unauthenticated("the raft port needs a hub certificate"))?;
    match pki::peer_identity(&cert) {
        Some(id) if id.role == pki::ROLE_HUB => Ok(()),
        _ => {
            tracing::warn!("refused a non-hub certificate on the raft port");
            Err(Status::permission_denied("only hubs may use the raft port"))
        }
    }
}

fn bad(e: serde_json::Error) -> Status {
    Status::invalid_argument(format!("undecodable raft message: {e}"))
}

#[tonic::async_trait]
impl RaftService for RaftApi {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        check_hub(&req)?;
        let rpc = decode(req.get_ref()).map_err(bad)?;
        Ok(Response::new(encode(
            &self.hub.raft().append_entries(rpc).await,
        )))
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        check_hub(&req)?;
        let mut rpc: openraft::raft::InstallSnapshotRequest<super::TypeConfig> =
            decode(req.get_ref()).map_err(bad)?;
        if rpc.data.is_empty() {
            rpc.data = req.into_inner().data;
        }
        Ok(Response::new(encode(
            &self.hub.raft().install_snapshot(rpc).await,
        )))
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        check_hub(&req)?;
        let rpc = decode(req.get_ref()).map_err(bad)?;
        Ok(Response::new(encode(&self.hub.raft().vote(rpc).await)))
    }

    async fn forward(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        check_hub(&req)?;
        let cmd: Command = decode(req.get_ref()).map_err(bad)?;
        Ok(Response::new(encode(&self.hub.write_as_leader(cmd).await)))
    }

    async fn read_index(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        check_hub(&req)?;
        Ok(Response::new(encode(
            &self.hub.read_index_as_leader().await,
        )))
    }

    async fn change_membership(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        check_hub(&req)?;
        let change: MembershipChange = decode(req.get_ref()).map_err(bad)?;
        Ok(Response::new(encode(
            &self.hub.change_membership_as_leader(change).await,
        )))
    }

    async fn status(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        check_hub(&req)?;
        Ok(Response::new(encode(&self.hub.local_view())))
    }

    async fn live(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        check_hub(&req)?;
        Ok(Response::new(encode(&self.hub.sessions.views())))
    }
}
