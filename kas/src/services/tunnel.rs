//! `ReverseTunnel/Connect`: authenticates the agent, reads its descriptor, and hands the
//! stream to the tunnel registry ([`crate::tunnel`]), which routes at most one request
//! through it.

use std::sync::Arc;

use futures_util::stream::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use kas_proto::reverse_tunnel::connect_request::Msg;
use kas_proto::reverse_tunnel::reverse_tunnel_server::ReverseTunnel;
use kas_proto::reverse_tunnel::{ConnectRequest, ConnectResponse};

use super::Shared;
use crate::tunnel::forward::tunnel_stream;
use crate::tunnel::Descriptor;

pub struct ReverseTunnelService {
    shared: Arc<Shared>,
}

impl ReverseTunnelService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl ReverseTunnel for ReverseTunnelService {
    type ConnectStream = BoxStream<'static, Result<ConnectResponse, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let agent = self.shared.authenticate(&request).await?;
        let end = self.shared.stream_end(&request);
        let mut inbound = request.into_inner();
        let descriptor = match inbound.message().await? {
            Some(ConnectRequest {
                msg: Some(Msg::Descriptor(d)),
            }) => d.agent_descriptor.ok_or_else(|| {
                Status::invalid_argument("tunnel descriptor without an agent_descriptor")
            })?,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message on a tunnel must be its descriptor",
                ))
            }
            None => {
                return Err(Status::invalid_argument(
                    "tunnel closed before its descriptor",
                ))
            }
        };
        let descriptor = Descriptor::from_proto(descriptor).map_err(Status::invalid_argument)?;
        let agent_id = agent.info.agent_id;
        let registration = self
            .shared
            .tunnels
            .register(agent_id, Arc::new(descriptor))?;
        let guard = self.shared.stream_guard("Connect");
        let busy = self.shared.tunnels.metrics().busy.clone();
        // No task and no channel: the response stream is the tunnel (see `tunnel_stream`).
        Ok(Response::new(Box::pin(tunnel_stream(
            registration,
            inbound,
            end,
            busy,
            guard,
        ))))
    }
}
