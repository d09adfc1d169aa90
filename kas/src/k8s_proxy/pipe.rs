//! One HTTP request carried through a tunnel as `KubernetesApi/MakeRequest`: the request
//! head, its body in chunks and a trailer go to the agent as `grpctool.HttpRequest`
//! messages; the agent's `grpctool.HttpResponse` messages come back as the response, each
//! chunk passed on as it arrives so `watch` and `logs -f` stream. A `101 Switching
//! Protocols` answer turns the connection into a byte pipe both ways (`UpgradeData`) for
//! `exec`, `attach` and `port-forward` over websocket or SPDY.
//!
//! Backpressure holds end to end: each direction is a bounded channel, so a slow reader
//! stops the tunnel's stream, and HTTP/2 flow control stops the other side.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use kas_proto::grpctool::{http_request, http_response, HttpRequest, HttpResponse};
use kas_proto::kubernetes_api::{HeaderExtra, ImpersonationConfig};
use kas_proto::prototool;
use kas_proto::prototool::Values;

use super::headers;
use super::status::ProxyError;
use super::ProxyBody;
use crate::tunnel::{CallSender, FromAgent, TunnelCall};

/// Request bodies and upgraded bytes travel in messages of at most this size (as real kas).
const CHUNK: usize = 32 * 1024;

/// What the caller asked, already cleaned for the cluster.
pub struct ClusterRequest {
    pub method: String,
    pub url_path: String,
    pub headers: HashMap<String, Values>,
    pub query: HashMap<String, Values>,
    pub impersonation: Option<ImpersonationConfig>,
    pub upgrade: bool,
}

fn encode_request(message: http_request::Message) -> Bytes {
    HttpRequest {
        message: Some(message),
    }
    .encode_to_vec()
    .into()
}

fn header_message(req: &ClusterRequest, content_length: i64) -> Bytes {
    let extra = req.impersonation.as_ref().map(|imp| prost_types::Any {
        type_url: kas_proto::HEADER_EXTRA_TYPE_URL.to_owned(),
        value: HeaderExtra {
            imp_config: Some(imp.clone()),
        }
        .encode_to_vec(),
    });
    encode_request(http_request::Message::Header(http_request::Header {
        request: Some(prototool::HttpRequest {
            method: req.method.clone(),
            header: req.headers.clone(),
            url_path: req.url_path.clone(),
            query: req.query.clone(),
        }),
        extra,
        content_length: Some(content_length),
    }))
}

/// Why a request got no answer from the cluster.
#[derive(Debug)]
pub enum Unanswered {
    /// The tunnel went away before the agent's answer began (the agent's connection was
    /// cut, its pod or edge drained it): the request may not have reached the cluster, and
    /// whether it did cannot be known.
    TunnelLost(ProxyError),
    /// Anything else: the agent's explicit error, a broken protocol.
    Failed(ProxyError),
}

impl Unanswered {
    pub fn into_error(self) -> ProxyError {
        match self {
            Unanswered::TunnelLost(e) | Unanswered::Failed(e) => e,
        }
    }
}

/// Whether a request may be sent again through another tunnel when its tunnel is lost
/// before the answer began: idempotent methods (RFC 9110 section 9.2.2) with no body and
/// no upgrade, which is what kubectl's get, list and watch requests are. Sending such a
/// request twice cannot change the cluster; anything else could, so its caller gets the
/// 502 and decides.
pub fn replayable(request: &http::Request<Incoming>, upgrade: bool) -> bool {
    let idempotent = matches!(
        *request.method(),
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    );
    idempotent && !upgrade && hyper::body::Body::size_hint(request.body()).exact() == Some(0)
}

/// Sends a request without a body (see [`replayable`]) and answers with the agent's
/// response; the caller's request stays with the caller, so it can be sent again.
pub async fn forward_bodiless(
    call: TunnelCall,
    cluster: &ClusterRequest,
) -> Result<Response<ProxyBody>, Unanswered> {
    let TunnelCall {
        to_agent,
        mut from_agent,
    } = call;
    if !(to_agent.send(header_message(cluster, 0)).await && send_trailer(&to_agent).await) {
        return Err(tunnel_closed());
    }
    to_agent.close_send().await;
    let head = read_response_head(&mut from_agent).await?;
    respond(head, from_agent, None)
}

/// Sends the request to the agent and answers with the agent's response.
pub async fn forward(
    call: TunnelCall,
    mut request: http::Request<Incoming>,
    cluster: &ClusterRequest,
) -> Result<Response<ProxyBody>, Unanswered> {
    let on_upgrade = cluster.upgrade.then(|| hyper::upgrade::on(&mut request));
    let body = request.into_body();
    let content_length = match hyper::body::Body::size_hint(&body).exact() {
        Some(n) => i64::try_from(n).unwrap_or(i64::MAX),
        None => -1,
    };
    let TunnelCall {
        to_agent,
        mut from_agent,
    } = call;
    if !to_agent.send(header_message(cluster, content_length)).await {
        return Err(tunnel_closed());
    }
    // Where the upgraded connection's read half goes once the cluster said 101.
    let (upgraded_tx, upgraded_rx) = oneshot::channel();
    tokio::spawn(send_request_body(
        body,
        to_agent,
        cluster.upgrade,
        upgraded_rx,
    ));
    let head = read_response_head(&mut from_agent).await?;
    respond(head, from_agent, on_upgrade.map(|u| (u, upgraded_tx)))
}

fn tunnel_closed() -> Unanswered {
    Unanswered::TunnelLost(ProxyError::bad_gateway("the agent's tunnel closed"))
}

type ReadHalfSender = oneshot::Sender<tokio::io::ReadHalf<TokioIo<hyper::upgrade::Upgraded>>>;

/// The caller's response from the agent's response head. The body streams from a task of
/// its own; a 101 answer to an upgrade request turns the tunnel into the byte pipe.
fn respond(
    head: prototool::HttpResponse,
    from_agent: mpsc::Receiver<FromAgent>,
    upgrade: Option<(hyper::upgrade::OnUpgrade, ReadHalfSender)>,
) -> Result<Response<ProxyBody>, Unanswered> {
    let status =
        StatusCode::from_u16(u16::try_from(head.status_code).unwrap_or(0)).map_err(|_| {
            Unanswered::Failed(ProxyError::bad_gateway(format!(
                "the cluster answered status {}",
                head.status_code
            )))
        })?;
    let upgraded = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut response = Response::new(super::empty_body());
    *response.status_mut() = status;
    *response.headers_mut() = headers::response_headers(&head.header, upgraded);
    match upgrade {
        Some((on_upgrade, read_half)) if upgraded => {
            tokio::spawn(pipe_upgraded(on_upgrade, from_agent, read_half));
        }
        _ => {
            *response.body_mut() = TunnelBody {
                from_agent,
                done: false,
            }
            .boxed();
        }
    }
    Ok(response)
}

/// The request's end (`Trailer`); `false` once the tunnel is gone.
async fn send_trailer(to_agent: &CallSender) -> bool {
    let trailer = http_request::Message::Trailer(http_request::Trailer {});
    to_agent.send(encode_request(trailer)).await
}

/// The request body as `Data` messages, then `Trailer`; then, for an upgrade, the client's
/// bytes as `UpgradeData` until it closes; then the half-close.
async fn send_request_body(
    mut body: Incoming,
    to_agent: CallSender,
    upgrade: bool,
    upgraded: oneshot::Receiver<tokio::io::ReadHalf<TokioIo<hyper::upgrade::Upgraded>>>,
) {
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // The caller broke off its body: the request is not complete, so it must not
            // reach the cluster as if it were.
            return;
        };
        if let Ok(data) = frame.into_data() {
            for chunk in data.chunks(CHUNK) {
                let msg = http_request::Message::Data(http_request::Data {
                    data: Bytes::copy_from_slice(chunk).into(),
                });
                if !to_agent.send(encode_request(msg)).await {
                    return;
                }
            }
        }
    }
    if !send_trailer(&to_agent).await {
        return;
    }
    if upgrade {
        // Not upgraded (the cluster answered something else): nothing more to send.
        if let Ok(mut read) = upgraded.await {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let msg = http_request::Message::UpgradeData(http_request::UpgradeData {
                            data: buf[..n].to_vec(),
                        });
                        if !to_agent.send(encode_request(msg)).await {
                            return;
                        }
                    }
                }
            }
        }
    }
    to_agent.close_send().await;
}

/// The agent's next event that matters to the caller: the gRPC header and trailer of
/// MakeRequest carry nothing for it. `None` at the end of the tunnel.
async fn next_event(from_agent: &mut mpsc::Receiver<FromAgent>) -> Option<FromAgent> {
    std::future::poll_fn(|cx| poll_next_event(from_agent, cx)).await
}

/// [`next_event`] for a poll (the response body's).
fn poll_next_event(
    from_agent: &mut mpsc::Receiver<FromAgent>,
    cx: &mut Context<'_>,
) -> Poll<Option<FromAgent>> {
    loop {
        match ready!(from_agent.poll_recv(cx)) {
            Some(FromAgent::Header(_)) | Some(FromAgent::Trailer(_)) => continue,
            other => return Poll::Ready(other),
        }
    }
}

/// The `HttpResponse` an event carries; `Ok(None)` at a clean end of the tunnel.
fn decode_response(event: Option<FromAgent>) -> Result<Option<http_response::Message>, ProxyError> {
    match event {
        None | Some(FromAgent::Header(_)) | Some(FromAgent::Trailer(_)) => Ok(None),
        Some(FromAgent::Message(data)) => HttpResponse::decode(data)
            .map_err(|e| {
                ProxyError::bad_gateway(format!("the agent sent an invalid response message: {e}"))
            })?
            .message
            .map(Some)
            .ok_or_else(|| ProxyError::bad_gateway("the agent sent an empty response message")),
        Some(FromAgent::Error(status)) => Err(grpc_failure(&status)),
    }
}

/// A gRPC error of the tunnel or of routing to it, worded as real kas words it.
pub(super) fn grpc_failure(status: &tonic::Status) -> ProxyError {
    ProxyError::bad_gateway(format!(
        "HTTP->gRPC: failed to read gRPC response: rpc error: code = {:?} desc = {}",
        status.code(),
        status.message()
    ))
}

/// The next `HttpResponse` from the agent; `Ok(None)` at a clean end of the tunnel.
async fn next_response(
    from_agent: &mut mpsc::Receiver<FromAgent>,
) -> Result<Option<http_response::Message>, ProxyError> {
    decode_response(next_event(from_agent).await)
}

/// The agent's response head. A tunnel that ends before it, or that kas's side reports
/// lost (UNAVAILABLE: the agent's connection or stream failed or closed before
/// answering), is [`Unanswered::TunnelLost`].
async fn read_response_head(
    from_agent: &mut mpsc::Receiver<FromAgent>,
) -> Result<prototool::HttpResponse, Unanswered> {
    let lost_before_answer = || {
        Unanswered::TunnelLost(ProxyError::bad_gateway(
            "the agent's tunnel closed before the response",
        ))
    };
    match next_event(from_agent).await {
        None => Err(lost_before_answer()),
        Some(FromAgent::Error(status)) if status.code() == tonic::Code::Unavailable => {
            Err(Unanswered::TunnelLost(grpc_failure(&status)))
        }
        event => match decode_response(event).map_err(Unanswered::Failed)? {
            Some(http_response::Message::Header(h)) => h.response.ok_or_else(|| {
                Unanswered::Failed(ProxyError::bad_gateway(
                    "the agent sent a response header without a response",
                ))
            }),
            Some(_) => Err(Unanswered::Failed(ProxyError::bad_gateway(
                "the agent's response did not start with its header",
            ))),
            None => Err(lost_before_answer()),
        },
    }
}

/// The response body, chunk by chunk as the agent sends it, read from the tunnel by the
/// caller's connection as it writes (no task or channel of its own in between: the
/// tunnel's channel is the only queue, so a slow caller stops the tunnel). An error after
/// the head has gone out aborts the response (the caller must not take a cut body for a
/// whole one); a clean end of the tunnel (kas draining) ends it cleanly.
struct TunnelBody {
    from_agent: mpsc::Receiver<FromAgent>,
    done: bool,
}

impl hyper::body::Body for TunnelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let event = ready!(poll_next_event(&mut self.from_agent, cx));
        let frame = match decode_response(event) {
            Ok(Some(http_response::Message::Data(d))) => {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(d.data)))))
            }
            Ok(Some(http_response::Message::Trailer(_))) | Ok(None) => None,
            Ok(Some(_)) => Some(Err(io::Error::other(
                "the agent's response broke the message order",
            ))),
            Err(e) => Some(Err(io::Error::other(e.message))),
        };
        self.done = true;
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// After a 101: the client's connection and the tunnel become one byte pipe.
async fn pipe_upgraded(
    on_upgrade: hyper::upgrade::OnUpgrade,
    mut from_agent: mpsc::Receiver<FromAgent>,
    read_half: oneshot::Sender<tokio::io::ReadHalf<TokioIo<hyper::upgrade::Upgraded>>>,
) {
    let Ok(upgraded) = on_upgrade.await else {
        return;
    };
    let (read, mut write) = tokio::io::split(TokioIo::new(upgraded));
    if read_half.send(read).is_err() {
        return;
    }
    loop {
        match next_response(&mut from_agent).await {
            Ok(Some(http_response::Message::UpgradeData(d))) => {
                if write.write_all(&d.data).await.is_err() {
                    break;
                }
            }
            // The response trailer precedes the upgraded bytes.
            Ok(Some(http_response::Message::Trailer(_))) => continue,
            Ok(Some(_)) | Ok(None) | Err(_) => break,
        }
    }
    let _ = write.shutdown().await;
}
