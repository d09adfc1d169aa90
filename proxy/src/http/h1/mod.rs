//! HTTP/1.1 requests from agents, served by the edge itself when they are plain: no
//! upgrade, a known small body. Everything else (websocket upgrades above all, and any
//! request this server does not take on: chunked or large bodies, `Expect`, HTTP/1.0,
//! absolute targets, anything it cannot parse) goes to pingora with the bytes read so far
//! put back ([`crate::pingora_compat::Replayed`]), so pingora serves it, and the rest of
//! the connection, exactly as before.
//!
//! Why: pingora's HTTP/1 proxy cost ≈135 µs of CPU and about one context switch per
//! request (`loadtest/bench.sh`: a per-request session, its upstream pool's idle-watcher
//! task woken on every reuse). Here the agent connection's own task reads the request,
//! writes it to the pod over the connection's own pod connection (kept alive; between
//! agent connections it waits in its pod's small idle set, [`crate::upstream::idle`]) and
//! writes the answer back, head and body in one write.
//!
//! Duties kept from pingora's path: request-head size limit (431), policies (header rules,
//! rate limits, per-token keys), least-in-flight pod choice (the first request; later ones
//! stay on that pod while it takes new traffic), another pod when connecting fails, 503
//! when no pod is healthy, the response's framing (length, chunked, until close, none),
//! keep-alive, `Connection: close` once draining, access log and metrics. Deadlines on
//! the client between requests stay in [`crate::connection::activity`]; a request body
//! has to arrive within the request-head timeout, and a client that stops reading an
//! answer is cut after [`CLIENT_WRITE_STALL`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use pingora::http::ResponseHeader;
use pingora::protocols::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::access_log::{AccessRecord, HotMetrics};
use super::dial::{encode_forwarded_head, read_response_head, HandshakeError, PodDialer};
use super::framing::{strip_hop_by_hop, ChunkedBody, ResponseFraming};
use super::headers;
use super::refusal::{bad_gateway, bad_request, unavailable, Denial, DenialResponse};
use super::{Protocol, RequestGate};
use crate::connection::{ClientConnection, ServeHttp1};
use crate::pingora_compat::Replayed;
use crate::telemetry::metrics::GaugeGuard;
use crate::upstream::connect::{Connect, Unconnected};
use crate::upstream::idle::still_open;
use crate::upstream::pool::{Pod, PodGuard};

/// Request bodies up to this size are served here: read whole before a pod is chosen, so
/// a failed connect can still move to another pod. Larger ones go to pingora.
const INLINE_BODY_MAX: usize = 64 * 1024;
/// Headers one request may have (more: pingora decides).
const MAX_HEADERS: usize = 100;
/// How long a client may take no bytes of its answer before the connection is closed.
const CLIENT_WRITE_STALL: Duration = Duration::from_secs(30);
/// What one read from a pod may bring in while relaying a body.
const RELAY_CHUNK: usize = 16 * 1024;

/// The HTTP/1.1 side of the edge for plain requests.
pub struct H1Edge {
    gate: Arc<RequestGate>,
    hot: HotMetrics,
    dialer: PodDialer,
    /// How long a request body may take to arrive once its head did.
    body_timeout: Duration,
}

impl H1Edge {
    pub fn new(gate: Arc<RequestGate>, dialer: PodDialer, body_timeout: Duration) -> Self {
        Self {
            hot: HotMetrics::new(&gate.metrics),
            gate,
            dialer,
            body_timeout,
        }
    }
}

/// A request this server serves itself.
struct PlainRequest {
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
    head_len: usize,
    body_len: usize,
    /// The client asked to close after this request.
    close: bool,
    /// The head's size as the limit counts it.
    head_bytes: usize,
}

enum Parsed {
    Incomplete,
    Plain(Box<PlainRequest>),
    /// For pingora.
    Other,
}

fn parse(buf: &[u8]) -> Parsed {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Incomplete,
        Err(_) => return Parsed::Other,
    };
    let (Some(1), Some(method), Some(target)) = (req.version, req.method, req.path) else {
        return Parsed::Other;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Other;
    };
    if !target.starts_with('/') || method == Method::CONNECT {
        return Parsed::Other;
    }
    let Ok(uri) = target.parse::<http::Uri>() else {
        return Parsed::Other;
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut body_len = None;
    let mut close = false;
    for header in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) else {
            return Parsed::Other;
        };
        match name {
            http::header::UPGRADE | http::header::TRANSFER_ENCODING | http::header::EXPECT => {
                return Parsed::Other
            }
            http::header::CONTENT_LENGTH => {
                let length = value
                    .to_str()
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<usize>().ok());
                match (length, body_len) {
                    (Some(n), None) if n <= INLINE_BODY_MAX => body_len = Some(n),
                    _ => return Parsed::Other,
                }
            }
            http::header::CONNECTION => {
                for token in value.to_str().unwrap_or("").split(',') {
                    let token = token.trim();
                    if token.eq_ignore_ascii_case("upgrade") {
                        return Parsed::Other;
                    }
                    close |= token.eq_ignore_ascii_case("close");
                }
            }
            _ => {}
        }
        headers.append(name, value);
    }
    let head_bytes = super::head_bytes(method.as_str().len() + target.len(), &headers);
    Parsed::Plain(Box::new(PlainRequest {
        method,
        uri,
        headers,
        head_len,
        body_len: body_len.unwrap_or(0),
        close,
        head_bytes,
    }))
}

/// A connection to the pod this agent connection's requests go to, kept between them.
struct PodLink {
    pod: Arc<Pod>,
    stream: TcpStream,
}

impl PodLink {
    /// Whether the pod still keeps the connection open (it closes idle ones).
    fn alive(&self) -> bool {
        still_open(&self.stream)
    }
}

/// The pod connection an agent connection holds between its requests; when the agent
/// connection ends, it goes to its pod's idle connections for the next agent.
#[derive(Default)]
struct KeptLink(Option<PodLink>);

impl Drop for KeptLink {
    fn drop(&mut self) {
        if let Some(link) = self.0.take() {
            link.pod.idle_h1.put(link.stream);
        }
    }
}

/// A request that got no answer from a pod: the client was told already (the status
/// written, or 0 when it was gone), and why, for the access log.
struct Unanswered(u16, String);

#[async_trait]
impl ServeHttp1 for H1Edge {
    async fn serve(&self, mut client: Stream, connection: ClientConnection) -> Option<Stream> {
        let mut buf = BytesMut::new();
        let mut link = KeptLink::default();
        loop {
            let request = loop {
                match parse(&buf) {
                    // Another port of the pods (the Kubernetes API proxy): pingora's path
                    // dials it; this loop keeps its pod connections for agents' requests.
                    Parsed::Plain(request)
                        if !self.gate.routes.for_path(request.uri.path()).is_agent() =>
                    {
                        return Some(Replayed::stream(buf.freeze(), client))
                    }
                    Parsed::Plain(request) => break request,
                    Parsed::Other => return Some(Replayed::stream(buf.freeze(), client)),
                    Parsed::Incomplete => {}
                }
                if buf.len() > self.gate.max_request_header_bytes {
                    // pingora reads the rest and the request is refused there (431).
                    return Some(Replayed::stream(buf.freeze(), client));
                }
                buf.reserve(4096);
                match client.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            };
            let _busy = connection.activity.start();
            let keep_alive = self
                .exchange(&mut client, &mut buf, request, &mut link.0, &connection)
                .await;
            if !keep_alive {
                let _ = tokio::time::timeout(CLIENT_WRITE_STALL, client.shutdown()).await;
                return None;
            }
            if buf.is_empty() {
                // An idle keep-alive connection holds no buffer.
                buf = BytesMut::new();
            }
        }
    }
}

impl H1Edge {
    /// One request and its answer; returns whether the connection stays open.
    async fn exchange(
        &self,
        client: &mut Stream,
        buf: &mut BytesMut,
        request: Box<PlainRequest>,
        link: &mut Option<PodLink>,
        connection: &ClientConnection,
    ) -> bool {
        let _active = GaugeGuard::hold(self.hot.active(Protocol::Http).clone());
        let mut record = AccessRecord::new(
            connection.client,
            Protocol::Http,
            &request.method,
            &request.uri,
            0,
        );
        let total = request.head_len + request.body_len;
        let body_read = async {
            while buf.len() < total {
                buf.reserve(total - buf.len());
                match client.read_buf(buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(_) => {}
                }
            }
            true
        };
        if !matches!(
            tokio::time::timeout(self.body_timeout, body_read).await,
            Ok(true)
        ) {
            record.log(&self.gate.metrics, Some("request body incomplete".into()));
            return false;
        }
        let raw = buf.split_to(total).freeze();
        record.bytes_in = request.body_len as u64;
        if let Err(headers::Refused(why)) = headers::check_http1_target(&request.headers, true) {
            record.status = answer_denied(client, &bad_request(why)).await;
            record.log(&self.gate.metrics, None);
            return false;
        }
        if let Some(denial) = self.gate.refused(
            Some(connection.client),
            request.head_bytes,
            &request.headers,
        ) {
            record.status = answer_denied(client, &denial).await;
            record.log(&self.gate.metrics, None);
            return false;
        }
        let mut out = Vec::with_capacity(total + 64);
        let target = request.uri.path_and_query().map_or("/", |p| p.as_str());
        encode_forwarded_head(
            &mut out,
            request.method.as_str(),
            target,
            &request.headers,
            [],
        );
        out.extend_from_slice(&raw[request.head_len..]);
        drop(raw);

        let (guard, mut pod, head, early) = match self.round_trip(client, link, &out).await {
            Ok(answered) => answered,
            Err(Unanswered(status, why)) => {
                record.status = status;
                record.log(&self.gate.metrics, Some(why));
                return false;
            }
        };
        record.pod = Some(guard.pod().clone());
        self.hot
            .latency(Protocol::Http)
            .observe(record.started.elapsed().as_secs_f64());
        if head.status.is_informational() {
            tracing::warn!(pod = %guard.pod().label, status = head.status.as_u16(), "pod answered a plain request with an interim response");
            record.status = answer_denied(client, &bad_gateway("kas answered incorrectly")).await;
            record.log(&self.gate.metrics, None);
            return false;
        }
        let framing = if request.method == Method::HEAD {
            // The length the pod states is the body a GET would get: kept as it is.
            match ResponseFraming::of(&head) {
                ResponseFraming::Length(n) => ResponseFraming::HeadOnly(n),
                _ => ResponseFraming::NoBody,
            }
        } else {
            ResponseFraming::of(&head)
        };
        if framing == ResponseFraming::Invalid {
            record.status = answer_denied(client, &bad_gateway("kas answered incorrectly")).await;
            record.log(&self.gate.metrics, None);
            return false;
        }
        let pod_keeps = !asks_close(&head.headers) && framing != ResponseFraming::UntilClose;
        let close = request.close
            || *connection.shutdown.borrow()
            || framing == ResponseFraming::UntilClose;
        record.status = head.status.as_u16();
        let head = reframed(head, framing, close);
        let relayed = relay_body(client, &mut pod.stream, framing, early, head).await;
        let (sent, pod_clean, error) = match relayed {
            Ok((sent, clean)) => (sent, clean, None),
            Err((sent, why)) => (sent, false, Some(why)),
        };
        record.bytes_out = sent;
        let failed = error.is_some();
        record.log(&self.gate.metrics, error);
        drop(guard);
        if pod_keeps && pod_clean && !failed {
            *link = Some(pod);
        }
        !close && !failed
    }

    /// Sends the request to a pod and reads its answer's head: on the pod this
    /// connection already talks to while that pod takes new traffic, else on the
    /// least-loaded one, moving on when connecting fails. A kept-alive pod connection the
    /// pod had closed meanwhile is replaced once.
    async fn round_trip(
        &self,
        client: &mut Stream,
        link: &mut Option<PodLink>,
        request: &[u8],
    ) -> Result<(PodGuard, PodLink, ResponseHeader, Bytes), Unanswered> {
        let mut attempts = 0;
        loop {
            let kept = link
                .take()
                .filter(PodLink::alive)
                .and_then(|l| Some((self.gate.pool.hold(&l.pod)?, l)));
            let mut reused = kept.is_some();
            let (guard, mut pod) = match kept {
                Some(kept) => kept,
                None => {
                    let connected = self
                        .gate
                        .connect
                        .connect(&mut attempts, &mut Http1Connect(&self.dialer))
                        .await;
                    match connected {
                        Ok((guard, (stream, idle))) => {
                            reused = idle;
                            let pod = guard.pod().clone();
                            (guard, PodLink { pod, stream })
                        }
                        Err(Unconnected::NoPod) => {
                            let status =
                                answer_denied(client, &unavailable("no healthy kas pod")).await;
                            return Err(Unanswered(status, "no healthy kas pod".into()));
                        }
                        Err(Unconnected::Failed(_, e)) => {
                            let status =
                                answer_denied(client, &unavailable("kas is unavailable")).await;
                            return Err(Unanswered(status, e.to_string()));
                        }
                    }
                }
            };
            let addr = pod.pod.addr;
            let answered = async {
                pod.stream
                    .write_all(request)
                    .await
                    .map_err(|source| HandshakeError::Io { addr, source })?;
                read_response_head(&mut pod.stream, addr).await
            }
            .await;
            match answered {
                Ok((head, early)) => return Ok((guard, pod, head, early)),
                Err(HandshakeError::Closed { .. } | HandshakeError::Io { .. }) if reused => {
                    tracing::debug!(pod = %pod.pod.label, "a kept-alive pod connection was closed; dialling again");
                }
                Err(e) => {
                    tracing::warn!(pod = %pod.pod.label, error = %e, "request not forwarded");
                    let status = answer_denied(client, &bad_gateway("kas did not answer")).await;
                    return Err(Unanswered(status, e.to_string()));
                }
            }
        }
    }
}

/// Connecting for an HTTP/1.1 request: the pod's idle connection if it has one (says
/// `true`: kept alive, so maybe closed by the pod meanwhile), else a new one.
struct Http1Connect<'a>(&'a PodDialer);

impl Connect for Http1Connect<'_> {
    type Connected = (TcpStream, bool);
    type Error = HandshakeError;

    fn connect(
        &mut self,
        pod: &Arc<Pod>,
    ) -> impl Future<Output = Result<(TcpStream, bool), HandshakeError>> + Send {
        let idle = pod.idle_h1.take();
        let (dialer, addr) = (self.0, pod.addr);
        async move {
            match idle {
                Some(stream) => Ok((stream, true)),
                None => Ok((dialer.connect(addr).await?, false)),
            }
        }
    }
}

fn asks_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// The pod's head as the agent gets it: end-to-end headers, the framing the edge uses
/// for the body, and `Connection: close` when the connection ends after it.
fn reframed(mut head: ResponseHeader, framing: ResponseFraming, close: bool) -> Vec<u8> {
    strip_hop_by_hop(&mut head);
    let mut out = Vec::with_capacity(256);
    push_status_line(&mut out, head.status);
    for (name, value) in head.headers.iter() {
        push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        ResponseFraming::Length(n) | ResponseFraming::HeadOnly(n) => {
            push_header(&mut out, b"content-length", n.to_string().as_bytes())
        }
        ResponseFraming::Chunked => push_header(&mut out, b"transfer-encoding", b"chunked"),
        _ => {}
    }
    if close {
        push_header(&mut out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn push_status_line(out: &mut Vec<u8>, status: http::StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes to the client, which must take the bytes within [`CLIENT_WRITE_STALL`].
async fn write_client(client: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> Result<(), String> {
    let write = async {
        client.write_all(bytes).await?;
        client.flush().await
    };
    match tokio::time::timeout(CLIENT_WRITE_STALL, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("writing to the client: {e}")),
        Err(_) => Err("the client took no bytes of its answer".into()),
    }
}

/// Relays the answer's body after `head` (sent together with the first body bytes).
/// Returns the body bytes sent and whether the pod connection ended cleanly after the
/// body (nothing extra came); on failure, what was sent and why.
async fn relay_body(
    client: &mut Stream,
    pod: &mut (impl AsyncRead + Unpin),
    framing: ResponseFraming,
    early: Bytes,
    mut out: Vec<u8>,
) -> Result<(u64, bool), (u64, String)> {
    let mut sent = 0u64;
    let pod_gone = |sent| (sent, "the pod closed mid-answer".to_owned());
    match framing {
        ResponseFraming::NoBody | ResponseFraming::HeadOnly(_) | ResponseFraming::Invalid => {
            write_client(client, &out).await.map_err(|e| (0, e))?;
            Ok((0, early.is_empty()))
        }
        ResponseFraming::Length(n) => {
            let first = early.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            out.extend_from_slice(&early[..first]);
            write_client(client, &out).await.map_err(|e| (0, e))?;
            sent += first as u64;
            let mut chunk = BytesMut::with_capacity(RELAY_CHUNK.min((n - sent) as usize));
            while sent < n {
                chunk.clear();
                match pod.read_buf(&mut chunk).await {
                    Ok(0) | Err(_) => return Err(pod_gone(sent)),
                    Ok(_) => {}
                }
                let take = chunk.len().min((n - sent) as usize);
                write_client(client, &chunk[..take])
                    .await
                    .map_err(|e| (sent, e))?;
                sent += take as u64;
                if take < chunk.len() {
                    return Ok((sent, false));
                }
            }
            Ok((sent, first == early.len()))
        }
        ResponseFraming::Chunked => {
            let mut raw = BytesMut::from(&early[..]);
            let mut body = BytesMut::new();
            let mut chunks = ChunkedBody::default();
            loop {
                let done = chunks
                    .decode(&mut raw, &mut body)
                    .map_err(|e| (sent, format!("the pod's chunked body: {e}")))?;
                if !body.is_empty() {
                    out.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
                    out.extend_from_slice(&body);
                    out.extend_from_slice(b"\r\n");
                    sent += body.len() as u64;
                    body.clear();
                }
                if done {
                    // Trailers are not relayed (the pod's trailer section ends the body).
                    out.extend_from_slice(b"0\r\n\r\n");
                    write_client(client, &out).await.map_err(|e| (sent, e))?;
                    return Ok((sent, false));
                }
                if !out.is_empty() {
                    write_client(client, &out).await.map_err(|e| (sent, e))?;
                    out.clear();
                }
                raw.reserve(RELAY_CHUNK);
                match pod.read_buf(&mut raw).await {
                    Ok(0) | Err(_) => return Err(pod_gone(sent)),
                    Ok(_) => {}
                }
            }
        }
        ResponseFraming::UntilClose => {
            out.extend_from_slice(&early);
            sent += early.len() as u64;
            write_client(client, &out).await.map_err(|e| (0, e))?;
            let mut chunk = BytesMut::with_capacity(RELAY_CHUNK);
            loop {
                chunk.clear();
                match pod.read_buf(&mut chunk).await {
                    Ok(0) => return Ok((sent, false)),
                    Err(_) => return Err(pod_gone(sent)),
                    Ok(n) => {
                        write_client(client, &chunk).await.map_err(|e| (sent, e))?;
                        sent += n as u64;
                    }
                }
            }
        }
    }
}

/// Writes a refusal (see [`DenialResponse`]) and closes the connection after it.
/// Returns the HTTP status written.
async fn answer_denied(client: &mut Stream, denial: &Denial) -> u16 {
    let answer = DenialResponse::new(Protocol::Http, denial);
    let status = http::StatusCode::from_u16(answer.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    let mut out = Vec::with_capacity(256);
    push_status_line(&mut out, status);
    for (name, value) in &answer.headers {
        push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    push_header(&mut out, b"connection", b"close");
    out.extend_from_slice(b"\r\n");
    if let Some(body) = &answer.body {
        out.extend_from_slice(body);
    }
    if let Err(e) = write_client(client, &out).await {
        tracing::debug!(error = %e, "could not write the refusal");
    }
    answer.status
}
