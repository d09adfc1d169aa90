use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use kas_proto::reverse_tunnel::connect_request::Msg;
use kas_proto::reverse_tunnel::reverse_tunnel_server::ReverseTunnel;
use kas_proto::reverse_tunnel::{ConnectRequest, ConnectResponse};

use super::Shared;

/// Holds the reverse tunnels agents keep open. This kas routes no requests through them
/// yet: a tunnel is parked after its descriptor until the agent leaves or the pod drains,
/// which is exactly the long-lived, mostly idle stream the edge must carry.
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
    type ConnectStream = ReceiverStream<Result<ConnectResponse, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let agent = self.shared.authenticate(&request).await?;
        let end = self.shared.stream_end(&request);
        let mut inbound = request.into_inner();
        match inbound.message().await? {
            Some(ConnectRequest {
                msg: Some(Msg::Descriptor(_)),
            }) => {}
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
        }
        let guard = self.shared.stream_guard("Connect");
        let (tx, rx) = mpsc::channel::<Result<ConnectResponse, Status>>(1);
        let agent_id = agent.info.agent_id;
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                tokio::select! {
                    msg = inbound.message() => match msg {
                        // Nothing was routed, so the agent has nothing to send; ignore noise.
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => break,
                    },
                    _ = tx.closed() => break,
                    _ = end.cancelled() => break,
                }
            }
            tracing::debug!(agent_id, "reverse tunnel closed");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
