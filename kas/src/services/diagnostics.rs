use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use kas_proto::diagnostics::diagnostics_server::Diagnostics;
use kas_proto::diagnostics::{PingRequest, PingResponse};

use super::Shared;

pub struct DiagnosticsService {
    shared: Arc<Shared>,
}

impl DiagnosticsService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn answer(&self, request: PingRequest) -> PingResponse {
        PingResponse {
            payload: request.payload,
            pod: self.shared.pod_name.clone(),
        }
    }
}

#[tonic::async_trait]
impl Diagnostics for DiagnosticsService {
    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        self.shared.authenticate(&request).await?;
        Ok(Response::new(self.answer(request.into_inner())))
    }

    type EchoStream = ReceiverStream<Result<PingResponse, Status>>;

    async fn echo(
        &self,
        request: Request<Streaming<PingRequest>>,
    ) -> Result<Response<Self::EchoStream>, Status> {
        self.shared.authenticate(&request).await?;
        let end = self.shared.stream_end(&request);
        let mut inbound = request.into_inner();
        let guard = self.shared.stream_guard("Echo");
        let (tx, rx) = mpsc::channel(16);
        let this = Self {
            shared: self.shared.clone(),
        };
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(ping)) => {
                            if tx.send(Ok(this.answer(ping))).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    _ = end.cancelled() => break,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
