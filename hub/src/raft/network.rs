//! Raft RPC client between hubs: gRPC over TLS 1.3 with the hub's own certificate, to the
//! peer's Raft port. openraft's request and response types travel as JSON.

use std::{collections::HashMap, sync::Arc, time::Duration};

use flotilla_common::tls;
use flotilla_proto::{raft_service_client::RaftServiceClient, RaftMessage};
use openraft::{
    error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable},
    network::{RPCOption, RaftNetwork, RaftNetworkFactory},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    },
};
use serde::{de::DeserializeOwned, Serialize};
use tonic::transport::Channel;

use super::{HubNode, NodeId, TypeConfig};

/// Makes clients to other hubs; channels are cached per peer address.
#[derive(Clone)]
pub struct Network {
    tls: Arc<rustls::ClientConfig>,
    channels: Arc<std::sync::Mutex<HashMap<String, Channel>>>,
}

impl Network {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            tls,
            channels: Arc::default(),
        }
    }

    /// A client for the Raft service at `addr`.
    pub fn client(&self, addr: &str) -> Result<RaftServiceClient<Channel>, tls::TlsError> {
        let mut m = self.channels.lock().expect("channel cache");
        let ch = match m.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = tls::channel(addr, self.tls.clone())?;
                m.insert(addr.to_owned(), c.clone());
                c
            }
        };
        Ok(RaftServiceClient::new(ch)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024))
    }
}

pub struct Client {
    target: NodeId,
    addr: String,
    net: Network,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Client;
    async fn new_client(&mut self, target: NodeId, node: &HubNode) -> Client {
        Client {
            target,
            addr: node.raft.clone(),
            net: self.clone(),
        }
    }
}

/// Encodes a request as a RaftMessage.
pub fn encode<T: Serialize>(v: &T) -> RaftMessage {
    RaftMessage {
        json: serde_json::to_vec(v).unwrap_or_default(),
        data: Vec::new(),
    }
}

pub fn decode<T: DeserializeOwned>(m: &RaftMessage) -> Result<T, serde_json::Error> {
    super::codec::decode(&m.json)
}

impl Client {
    /// Sends one RPC; `call` picks the method. Transport failures are `Unreachable` (openraft
    /// backs off) and the remote's own error comes back as `RemoteError`.
    async fn rpc<Resp, E, F, Fut>(
        &self,
        req: RaftMessage,
        timeout: Duration,
        call: F,
    ) -> Result<Resp, RPCError<NodeId, HubNode, E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftServiceClient<Channel>, RaftMessage) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<RaftMessage>, tonic::Status>>,
    {
        let client = self
            .net
            .client(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let reply = match tokio::time::timeout(timeout, call(client, req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                let e = std::io::Error::other(format!("hub {}: {}", self.target, status.message()));
                return Err(if status.code() == tonic::Code::Unavailable {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                });
            }
            Err(_) => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("hub {} timed out", self.target),
                );
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
        };
        let result: Result<Resp, E> =
            decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Client {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, HubNode, RaftError<NodeId>>> {
        self.rpc(encode(&rpc), option.hard_ttl(), |mut c, m| async move {
            c.append_entries(m).await
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        mut rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, HubNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let data = std::mem::take(&mut rpc.data);
        let mut msg = encode(&rpc);
        msg.data = data;
        self.rpc(msg, option.hard_ttl(), |mut c, m| async move {
            c.install_snapshot(m).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, HubNode, RaftError<NodeId>>> {
        self.rpc(encode(&rpc), option.hard_ttl(), |mut c, m| async move {
            c.vote(m).await
        })
        .await
    }
}
