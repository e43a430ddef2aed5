//! Raft RPC server between hubs, on its own port: only certificates the cluster CA issued to
//! hubs are accepted. Besides openraft's RPCs it serves what followers ask of the leader:
//! forwarded writes, read indexes, membership changes and the cluster view.

use flotilla_common::{pki, tls::PeerInfo};
use flotilla_proto::{raft_service_server::RaftService, RaftMessage};
use tonic::{Request, Response, Status};

use super::{
    network::{decode, encode},
    peer::MembershipChange,
};
use crate::{cluster::Hub, state::Command};

pub struct RaftApi {
    pub hub: Hub,
}

fn check_hub<T>(req: &Request<T>) -> Result<(), Status> {
    let peer = req
        .extensions()
        .get::<PeerInfo>()
        .filter(|p| p.client_cert.is_some())
        .ok_or_else(|| Status::unauthenticated("the raft port needs a hub certificate"))?;
    match peer.identity.as_deref() {
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

    async fn version(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        check_hub(&req)?;
        Ok(Response::new(encode(&super::peer::HubVersion::this())))
    }
}
