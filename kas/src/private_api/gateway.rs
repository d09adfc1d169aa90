//! The gateway role: another kas asks this pod, on the private API, for one of an agent's
//! tunnels here (`kas-hop-routing-agent-id`). The answer is a `GatewayKasResponse` stream:
//! `no_tunnel` when none is ready yet (the caller may look elsewhere meanwhile), then
//! `tunnel_ready` when one is; the caller answers `StartStreaming` if it picks this pod —
//! or goes away, and the tunnel goes back to the registry unused. After `StartStreaming`
//! the caller's messages go to the agent and the agent's answer comes back as `header`,
//! `message`*, `trailer`, `error`?.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::server::{NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use kas_proto::google::rpc::Status as RpcStatus;
use kas_proto::kasapp::gateway_kas_response::{self as gkr, Msg};
use kas_proto::kasapp::GatewayKasResponse;
use kas_proto::prototool::Values;

use super::codec::RawCodec;
use crate::fleet::jwt;
use crate::gitlab::SharedSecret;
use crate::tunnel::{split_method, FromAgent, Meta, Routed, TunnelCall, TunnelRegistry};

/// The metadata key naming the agent a routed call is for (real kas's).
pub const ROUTING_AGENT_ID: &str = "kas-hop-routing-agent-id";
/// Metadata keys starting with this are for kas only and never reach an agent.
pub const HOP_PREFIX: &str = "kas-hop-";

/// The private API's one service: every method of the Kubernetes API service agents serve
/// through their tunnels, carried raw.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<GatewayInner>,
}

struct GatewayInner {
    tunnels: TunnelRegistry,
    secret: SharedSecret,
}

impl Gateway {
    pub fn new(tunnels: TunnelRegistry, secret: SharedSecret) -> Self {
        Self {
            inner: Arc::new(GatewayInner { tunnels, secret }),
        }
    }
}

impl NamedService for Gateway {
    const NAME: &'static str = kas_proto::paths::KUBERNETES_API_SERVICE;
}

impl<B> tower::Service<http::Request<B>> for Gateway
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = Call {
            inner: self.inner.clone(),
            full_method: req.uri().path().to_owned(),
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.streaming(method, req).await)
        })
    }
}

struct Call {
    inner: Arc<GatewayInner>,
    full_method: String,
}

type Out = mpsc::Sender<Result<Bytes, Status>>;

impl StreamingService<Bytes> for Call {
    type Response = Bytes;
    type ResponseStream = ReceiverStream<Result<Bytes, Status>>;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Response<Self::ResponseStream>, Status>> + Send,
        >,
    >;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let inner = self.inner.clone();
        let full_method = self.full_method.clone();
        Box::pin(async move {
            jwt::verify(request.metadata(), &inner.secret, Some(jwt::KAS_ISSUER))?;
            let agent_id = routing_agent_id(request.metadata())?;
            if split_method(&full_method).is_none() {
                return Err(Status::unimplemented(format!(
                    "unknown method {full_method}"
                )));
            }
            let meta = forwarded_meta(request.metadata());
            let inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(8);
            tokio::spawn(serve(inner, agent_id, full_method, meta, inbound, tx));
            Ok(Response::new(ReceiverStream::new(rx)))
        })
    }
}

fn routing_agent_id(md: &tonic::metadata::MetadataMap) -> Result<i64, Status> {
    let mut values = md.get_all(ROUTING_AGENT_ID).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(Status::invalid_argument(format!(
            "expecting exactly one {ROUTING_AGENT_ID} value"
        )));
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Status::invalid_argument(format!("invalid {ROUTING_AGENT_ID}")))
}

/// The caller's metadata the agent may see: no `kas-hop-*`, no credentials, nothing the
/// gRPC transport owns.
fn forwarded_meta(md: &tonic::metadata::MetadataMap) -> Meta {
    let mut meta: Meta = HashMap::new();
    for (key, value) in md.clone().into_headers().iter() {
        let k = key.as_str();
        if k.starts_with(HOP_PREFIX)
            || k.starts_with("grpc-")
            || matches!(k, "authorization" | "te" | "content-type" | "user-agent")
        {
            continue;
        }
        if let Ok(v) = value.to_str() {
            meta.entry(k.to_owned())
                .or_insert_with(|| Values { value: Vec::new() })
                .value
                .push(v.to_owned());
        }
    }
    meta
}

fn encode(msg: Msg) -> Result<Bytes, Status> {
    Ok(GatewayKasResponse { msg: Some(msg) }.encode_to_vec().into())
}

async fn serve(
    inner: Arc<GatewayInner>,
    agent_id: i64,
    full_method: String,
    meta: Meta,
    mut inbound: Streaming<Bytes>,
    out: Out,
) {
    let Some((service, method)) = split_method(&full_method) else {
        return;
    };
    let tunnels = &inner.tunnels;
    let tunnel = match tunnels.find_now(agent_id, service, method) {
        Ok(Some(tunnel)) => tunnel,
        Ok(None) => {
            if out
                .send(encode(Msg::NoTunnel(gkr::NoTunnel {})))
                .await
                .is_err()
            {
                return;
            }
            // Waits as long as the caller does (it gives up by going away), at most the
            // registry's find timeout.
            tokio::select! {
                found = tunnels.wait_for(agent_id, service, method) => match found {
                    Ok(tunnel) => tunnel,
                    Err(e) => {
                        let _ = out.send(Err(e.into())).await;
                        return;
                    }
                },
                _ = out.closed() => return,
            }
        }
        Err(e) => {
            let _ = out.send(Err(e.into())).await;
            return;
        }
    };
    if out
        .send(encode(Msg::TunnelReady(gkr::TunnelReady {})))
        .await
        .is_err()
    {
        return; // the tunnel, dropped unused, offers itself again
    }
    // StartStreaming, or the caller's end: it picked another pod.
    let start = tokio::time::timeout(tunnels.limits().find_timeout, inbound.message()).await;
    match start {
        Ok(Ok(Some(_start_streaming))) => {}
        _ => return,
    }
    let (call, to_rx, from_tx) = TunnelCall::pair();
    let routed = Routed {
        method_name: full_method,
        meta,
        to_agent: to_rx,
        from_agent: from_tx,
    };
    if tunnel.start(routed).is_err() {
        let _ = out
            .send(Err(Status::unavailable(
                "the agent's tunnel closed before the call started",
            )))
            .await;
        return;
    }
    let TunnelCall {
        to_agent,
        mut from_agent,
    } = call;
    // The caller's messages to the agent; its end is the call's half-close.
    let forward = tokio::spawn(async move {
        loop {
            match inbound.message().await {
                Ok(Some(data)) => {
                    if !to_agent.send(data).await {
                        return;
                    }
                }
                Ok(None) => {
                    to_agent.close_send().await;
                    return;
                }
                // Cancelled: dropping the sender cancels the call at the agent.
                Err(_) => return,
            }
        }
    });
    while let Some(event) = from_agent.recv().await {
        let msg = match event {
            FromAgent::Header(meta) => Msg::Header(gkr::Header { meta }),
            FromAgent::Message(data) => Msg::Message(gkr::Message {
                data: data.to_vec(),
            }),
            FromAgent::Trailer(meta) => Msg::Trailer(gkr::Trailer { meta }),
            FromAgent::Error(status) => Msg::Error(gkr::Error {
                status: Some(RpcStatus {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                    details: Vec::new(),
                }),
            }),
        };
        if out.send(encode(msg)).await.is_err() {
            break;
        }
    }
    forward.abort();
}
