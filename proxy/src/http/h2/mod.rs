//! HTTP/2 from agents (`grpcs://`), forwarded by the edge itself to its pods' shared
//! HTTP/2 connections.
//!
//! Why not pingora's HTTP/2 proxy: measured (`loadtest/bench.sh`, README "Performance"),
//! it cost ≈100 µs of CPU and about one cross-thread hand-off per gRPC call, where an
//! HTTP/2 forwarder needs a fraction of that. pingora 0.9 spawns a task per stream, takes
//! a pooled upstream connection out of its pool while opening a stream on it (concurrent
//! streams then dial new connections: 70–136 edge→pod connections during a 3-pod gRPC
//! run) and builds a full proxy session per stream. Here one task serves one agent
//! connection: it accepts streams and drives every open stream's forwarding itself, so a
//! call wakes no other task on the agent's side; pods are reached over a few
//! long-lived connections per pod ([`crate::upstream::h2c`]).
//!
//! What pingora did on this path and this module now does: policies (header rules, rate
//! limits, per-token keys), least-in-flight pod choice with passive back-off, another pod
//! when connecting fails, trailers-only `grpc-status` refusals, access log and metrics,
//! GOAWAY on drain, and the HTTP/2 abuse limits: bounded streams and header lists,
//! streams reset before they were accepted (h2's own limit), rapid cancellation of
//! accepted streams, malformed requests, `CONNECT`, more stalled answers than a
//! connection may hold ([`relay::Stalls`]). Connection-wide limits (block, maximum age,
//! idle deadline) stay in [`crate::connection`], around this server. Header rules are
//! every path's ([`super::headers`]); what keeps one agent from hurting the others on the
//! pod connections they share is in [`crate::upstream::h2c`] and [`relay`].

mod relay;

use std::future::{poll_fn, Future};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::uri::Authority;
use http::{HeaderMap, Method, Request, Response};
use pingora::protocols::Stream;

use super::access_log::{AccessRecord, HotMetrics};
use super::headers::{self, Hop};
use super::refusal::{header_too_large, unavailable, Denial, DenialResponse, GrpcCode};
use super::{Protocol, RequestGate};
use crate::connection::{ClientConnection, ServeHttp2};
use crate::telemetry::metrics::GaugeGuard;
use crate::upstream::connect::{Connect, Unconnected};
use crate::upstream::h2c::{H2cSettings, OpenError, PodAnswer, PodStream};
use crate::upstream::pool::Pod;
use crate::upstream::pool::PodGuard;
use crate::upstream::route::Route;
use relay::{relay, upload, Broken, Stalls, StreamFlow, ToAgent};

/// Streams one agent connection may have open at once (pingora's default, kept).
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Malformed requests one connection may send before it is closed with
/// ENHANCE_YOUR_CALM: no agent sends any.
const MALFORMED_BUDGET: u32 = 32;
/// Streams the client may cancel before their answer within [`CANCEL_WINDOW`] before the
/// connection is closed with ENHANCE_YOUR_CALM ("rapid reset", CVE-2023-44487): each one
/// costs the edge a policy check and a pod stream. Agents cancel a handful per hour.
const CANCEL_BUDGET: u32 = 100;
const CANCEL_WINDOW: Duration = Duration::from_secs(10);
/// How long streams of a closed connection get to notice and log their end.
const STREAMS_AFTER_CLOSE: Duration = Duration::from_secs(2);
/// How long a connection closed with ENHANCE_YOUR_CALM gets to take its GOAWAY before it
/// is dropped (a client that reads nothing would hold it open).
const CALM_DOWN_GRACE: Duration = Duration::from_secs(1);
/// Flow-control windows the edge grants an agent: how much it may send before the edge
/// passed it on to a pod. They bound what a connection can make the edge hold.
const AGENT_STREAM_WINDOW: u32 = 256 * 1024;
const AGENT_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// The HTTP/2 side of the edge: agents' gRPC (and any other HTTP/2 request) to pods.
pub struct H2Edge {
    gate: Arc<RequestGate>,
    upstream: H2cSettings,
    hot: HotMetrics,
}

/// A stream's end, as its connection's abuse limits need it.
struct StreamEnd {
    /// The client cancelled the stream before it got an answer.
    cancelled_early: bool,
}

/// A request the connection answers without looking further: the stream is reset
/// (malformed framing) or answered at once.
enum Malformed {
    Reset(&'static str),
    Answer(u16, &'static str),
}

impl H2Edge {
    pub fn new(gate: Arc<RequestGate>, upstream: H2cSettings) -> Self {
        Self {
            hot: HotMetrics::new(&gate.metrics),
            gate,
            upstream,
        }
    }

    fn server(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        // h2 answers heads beyond this itself (431); between our own limit and this one
        // the edge answers with its gRPC-aware refusal.
        let header_list = (self.gate.max_request_header_bytes * 2).max(64 * 1024);
        builder
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(u32::try_from(header_list).unwrap_or(u32::MAX))
            .initial_window_size(AGENT_STREAM_WINDOW)
            .initial_connection_window_size(AGENT_CONNECTION_WINDOW)
            // Streams reset before they were accepted (h2's rapid-reset guard) and local
            // resets forced by protocol errors: stated, not left to the crate's defaults.
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(Some(1024));
        builder
    }
}

#[async_trait]
impl ServeHttp2 for H2Edge {
    async fn serve(&self, stream: Stream, connection: ClientConnection) {
        let mut conn = match self.server().handshake::<_, Bytes>(stream).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP/2 handshake failed");
                return;
            }
        };
        // GOAWAY at this connection's moment in a drain, not every connection's at once.
        let goaway = connection.drain.reached();
        tokio::pin!(goaway);
        let mut draining = false;
        let mut malformed = 0u32;
        let mut cancels = CancelWindow::default();
        let stalls = Stalls::default();
        // Set once the connection was told to calm down: it is dropped then.
        let mut cut_at: Option<tokio::time::Instant> = None;
        let mut streams = FuturesUnordered::new();
        loop {
            tokio::select! {
                biased;
                Some(end) = streams.next(), if !streams.is_empty() => {
                    let end: StreamEnd = end;
                    if end.cancelled_early && cancels.count() > CANCEL_BUDGET {
                        self.calm_down(&connection, "streams cancelled before their answer");
                        conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                        cut_at.get_or_insert_with(|| tokio::time::Instant::now() + CALM_DOWN_GRACE);
                    }
                }
                _ = stalls.exceeded(), if cut_at.is_none() => {
                    self.calm_down(&connection, "more stalled streams than a connection may hold");
                    conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                    cut_at = Some(tokio::time::Instant::now() + CALM_DOWN_GRACE);
                }
                _ = sleep_until(cut_at) => break,
                _ = &mut goaway, if !draining => {
                    conn.graceful_shutdown();
                    draining = true;
                }
                accepted = conn.accept() => match accepted {
                    Some(Ok((request, mut respond))) => match screen(&request) {
                        Ok(target) => streams.push(self.forward(&connection, &stalls, request, target, respond)),
                        Err(bad) => {
                            let (status, why) = match bad {
                                Malformed::Reset(why) => {
                                    respond.send_reset(Reason::PROTOCOL_ERROR);
                                    (0, why)
                                }
                                Malformed::Answer(status, why) => {
                                    (answer_plain(&mut respond, status, why), why)
                                }
                            };
                            let record = AccessRecord::new(
                                connection.client,
                                classify(request.headers()),
                                request.method(),
                                request.uri(),
                                status,
                            );
                            self.finish(record, None, Some(why.to_owned()));
                            malformed += 1;
                            if malformed > MALFORMED_BUDGET {
                                self.calm_down(&connection, "malformed requests");
                                conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                                cut_at.get_or_insert_with(|| tokio::time::Instant::now() + CALM_DOWN_GRACE);
                            }
                        }
                    },
                    Some(Err(e)) => {
                        if e.reason() == Some(Reason::ENHANCE_YOUR_CALM) && !e.is_remote() {
                            // h2's own guard: too many streams reset before accept.
                            self.calm_down(&connection, "streams reset before they were accepted");
                        } else {
                            tracing::debug!(client = %connection.client, error = %e, "HTTP/2 connection failed");
                        }
                        break;
                    }
                    None => break,
                },
            }
        }
        // Streams still open lose their connection with it: each sees that at once and
        // ends, so every one still gets its access-log line and metrics.
        drop(conn);
        let ended = async { while streams.next().await.is_some() {} };
        if tokio::time::timeout(STREAMS_AFTER_CLOSE, ended)
            .await
            .is_err()
        {
            tracing::debug!(client = %connection.client, "streams outlived their closed connection; dropped");
        }
    }
}

/// Sleeps until `at`; never resolves without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether the client has reset the stream by now, asked without waiting.
fn client_reset(respond: &mut SendResponse<Bytes>) -> bool {
    respond
        .poll_reset(&mut Context::from_waker(Waker::noop()))
        .is_ready()
}

/// Counts early cancels in fixed windows.
#[derive(Default)]
struct CancelWindow {
    since: Option<Instant>,
    count: u32,
}

impl CancelWindow {
    /// Counts one more; returns the count within the current window.
    fn count(&mut self) -> u32 {
        let now = Instant::now();
        match self.since {
            Some(since) if now.duration_since(since) < CANCEL_WINDOW => self.count += 1,
            _ => {
                self.since = Some(now);
                self.count = 1;
            }
        }
        self.count
    }
}

/// Framing checks the h2 crate leaves to its user, done before a request costs anything:
/// RFC 9113 §8.1.1 forbids forwarding a malformed request. Returns the request's target.
fn screen(request: &Request<RecvStream>) -> Result<Authority, Malformed> {
    if request.method() == Method::CONNECT {
        return Err(Malformed::Answer(405, "CONNECT is not served here"));
    }
    // Control bytes and spaces have no place in a request target, whatever a URI parser
    // lets through.
    let target = request.uri().path_and_query().map_or("", |p| p.as_str());
    if target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(Malformed::Reset("control bytes in the request target"));
    }
    // Conflicting lengths are ambiguous framing (h2 itself reads only the first).
    let mut lengths = request
        .headers()
        .get_all(http::header::CONTENT_LENGTH)
        .iter();
    if let Some(first) = lengths.next() {
        let parse = |v: &http::HeaderValue| {
            v.to_str()
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
        };
        let ambiguous = Malformed::Reset("ambiguous content-length");
        let first = parse(first).ok_or(ambiguous)?;
        if lengths.any(|v| parse(v) != Some(first)) {
            return Err(Malformed::Reset("ambiguous content-length"));
        }
    }
    // One target: `:authority`, `host`, or both agreeing.
    headers::http2_target(request.uri(), request.headers())
        .map_err(|headers::Refused(why)| Malformed::Answer(400, why))
}

/// Answers a stream with a status and a one-line reason, ending it; returns the status.
fn answer_plain(respond: &mut SendResponse<Bytes>, status: u16, why: &str) -> u16 {
    let denial = Denial {
        http_status: status,
        grpc_code: GrpcCode::from_http(status),
        message: why.to_owned(),
        retry_after: None,
    };
    answer_denied(respond, Protocol::Http, &denial)
}

/// Writes a refusal (see [`DenialResponse`]); returns the HTTP status written.
fn answer_denied(respond: &mut SendResponse<Bytes>, protocol: Protocol, denial: &Denial) -> u16 {
    let answer = DenialResponse::new(protocol, denial);
    let mut response = Response::new(());
    *response.status_mut() =
        http::StatusCode::from_u16(answer.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    response.headers_mut().extend(answer.headers);
    let end = answer.body.is_none();
    match respond.send_response(response, end) {
        Ok(mut body) => {
            if let Some(bytes) = answer.body {
                // Fits any initial window; if not, h2 buffers this one short body.
                if let Err(e) = body.send_data(bytes, true) {
                    tracing::debug!(error = %e, "could not write the refusal's body");
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "could not write the refusal"),
    }
    answer.status
}

fn classify(headers: &HeaderMap) -> Protocol {
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        Protocol::Grpc
    } else {
        Protocol::Http
    }
}

/// The bytes a request head takes, counted as HTTP/1 heads are ([`super::head_bytes`]).
fn head_bytes(parts: &http::request::Parts) -> usize {
    let line =
        parts.method.as_str().len() + parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    super::head_bytes(line, &parts.headers)
}

/// The request as it goes to a pod: the same method, target and end-to-end headers
/// ([`headers`]) over cleartext, the target as `:authority` alone.
fn pod_request(parts: &http::request::Parts, target: &Authority) -> Request<()> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(target.clone())
        .path_and_query(path)
        .build()
        .unwrap_or_else(|_| parts.uri.clone());
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = parts.headers.clone();
    request
}

/// Why no pod stream was opened.
enum Unopened {
    /// The client reset its stream first: nothing reached a pod.
    Abandoned,
    /// No pod took it; the client is told this.
    Unavailable(&'static str),
}

/// How the pod's side of a forwarded stream ended.
enum Answer {
    /// The pod's answer reached the client in full.
    Complete { status: u16, grpc: Option<GrpcCode> },
    /// The client reset the stream or its connection failed.
    ClientGone { status: u16 },
    /// The pod failed before answering; the client got the edge's refusal.
    Unanswered { status: u16, error: h2::Error },
    /// The pod failed mid-answer; the client's stream was ended with `grpc`.
    Cut {
        status: u16,
        grpc: GrpcCode,
        error: h2::Error,
    },
}

impl H2Edge {
    fn calm_down(&self, connection: &ClientConnection, why: &'static str) {
        self.gate.policies.blocked("h2_abuse", "h2");
        tracing::info!(client = %connection.client, why, "closing an HTTP/2 connection: ENHANCE_YOUR_CALM");
    }

    /// One stream, from its request to its end: checked, sent to a pod, its answer
    /// relayed back, logged.
    async fn forward(
        &self,
        connection: &ClientConnection,
        stalls: &Stalls,
        request: Request<RecvStream>,
        target: Authority,
        mut respond: SendResponse<Bytes>,
    ) -> StreamEnd {
        let _busy = connection.activity.start();
        let protocol = classify(request.headers());
        let (mut parts, mut body) = request.into_parts();
        let _active = GaugeGuard::hold(self.hot.active(protocol).clone());
        let mut record =
            AccessRecord::new(connection.client, protocol, &parts.method, &parts.uri, 0);
        if let Some(denial) =
            self.gate
                .refused(Some(connection.client), head_bytes(&parts), &parts.headers)
        {
            record.status = answer_denied(&mut respond, protocol, &denial);
            self.finish(record, Some(denial.grpc_code), None);
            return StreamEnd {
                cancelled_early: false,
            };
        }
        headers::strip_hop_by_hop(&mut parts.headers, Hop::Http2);
        // The pod gets the target once, as `:authority`.
        parts.headers.remove(http::header::HOST);
        let list = headers::http2_header_list_size(&pod_request(&parts, &target));
        if list > headers::POD_HEADER_LIST_MAX {
            let denial = header_too_large(list, headers::POD_HEADER_LIST_MAX);
            record.status = answer_denied(&mut respond, protocol, &denial);
            self.finish(record, Some(denial.grpc_code), None);
            return StreamEnd {
                cancelled_early: false,
            };
        }
        let request_ends = body.is_end_stream();

        // A pod stream: on another pod when connecting fails (nothing reached the pod).
        // Whether the client reset its stream is asked once more right before the stream
        // goes out, so a stream reset in the write that opened it never reaches a pod.
        let opened = {
            let mut abandoned = || client_reset(&mut respond);
            self.open_stream(&parts, &target, request_ends, &mut abandoned)
                .await
        };
        let (guard, mut stream) = match opened {
            Ok(opened) => opened,
            Err(Unopened::Abandoned) => {
                record.status = 0;
                self.finish(
                    record,
                    Some(GrpcCode::Cancelled),
                    Some("client cancelled".into()),
                );
                return StreamEnd {
                    cancelled_early: true,
                };
            }
            Err(Unopened::Unavailable(why)) => {
                let denial = unavailable(why);
                record.status = answer_denied(&mut respond, protocol, &denial);
                self.finish(record, Some(denial.grpc_code), Some(why.to_owned()));
                return StreamEnd {
                    cancelled_early: false,
                };
            }
        };
        record.pod = Some(guard.pod().clone());
        let (response, to_pod) = stream.parts();

        let flow = StreamFlow::default();
        let mut bytes_in = 0u64;
        let mut bytes_out = 0u64;
        let mut upload_error = None;
        let answer = {
            let download = self.download(
                protocol,
                response,
                &mut respond,
                &mut bytes_out,
                record.started,
                ToAgent {
                    stalls,
                    flow: &flow,
                },
            );
            let upload = async {
                if request_ends {
                    return Ok(());
                }
                upload(&mut body, to_pod, &mut bytes_in, &flow).await
            };
            tokio::pin!(download, upload);
            let mut uploading = !request_ends;
            loop {
                tokio::select! {
                    biased;
                    answer = &mut download => break answer,
                    sent = &mut upload, if uploading => {
                        uploading = false;
                        match sent {
                            Ok(()) => {}
                            // The pod reset or finished its side: its answer says how.
                            Err(Broken::Destination) => {}
                            Err(Broken::Source(e)) => {
                                upload_error = Some(e);
                                break Answer::ClientGone { status: 0 };
                            }
                        }
                    }
                }
            }
        };
        let early = !flow.answered.load(Ordering::Relaxed);
        let (status, grpc, error) = match answer {
            Answer::Complete { status, grpc } => (status, grpc, None),
            Answer::ClientGone { status } => {
                // The pod's stream ends as `stream` is dropped (see `PodStream`).
                let why =
                    upload_error.map_or_else(|| "client went away".to_owned(), |e| e.to_string());
                (status, Some(GrpcCode::Cancelled), Some(why))
            }
            Answer::Unanswered { status, error } => {
                (status, Some(GrpcCode::Unavailable), Some(error.to_string()))
            }
            Answer::Cut {
                status,
                grpc,
                error,
            } => (status, Some(grpc), Some(error.to_string())),
        };
        record.status = status;
        record.bytes_in = bytes_in;
        record.bytes_out = bytes_out;
        let cancelled_early = early && matches!(grpc, Some(GrpcCode::Cancelled));
        self.finish(record, grpc, error);
        drop(stream);
        drop(guard);
        StreamEnd { cancelled_early }
    }

    /// Opens a stream for the request on the least-loaded pod, trying another pod when
    /// one cannot be reached. Returns the pod's slot and the stream.
    async fn open_stream(
        &self,
        parts: &http::request::Parts,
        target: &Authority,
        request_ends: bool,
        abandoned: &mut (dyn FnMut() -> bool + Send),
    ) -> Result<(PodGuard, PodStream), Unopened> {
        let mut how = OpenStream {
            parts,
            target,
            route: self.gate.routes.for_path(parts.uri.path()),
            settings: &self.upstream,
            request_ends,
            abandoned,
        };
        let opened = self.gate.connect.connect(&mut 0, &mut how).await;
        match opened {
            Ok(opened) => Ok(opened),
            Err(Unconnected::NoPod) => Err(Unopened::Unavailable("no healthy kas pod")),
            Err(Unconnected::Failed(_, OpenError::Abandoned)) => Err(Unopened::Abandoned),
            Err(Unconnected::Failed(guard, failure)) => {
                tracing::warn!(pod = %guard.pod().label, error = %failure, "request not forwarded");
                Err(Unopened::Unavailable("kas is unavailable"))
            }
        }
    }

    /// The pod's answer to the client: head, body and trailers, or the edge's refusal if
    /// the pod fails before it answers.
    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        protocol: Protocol,
        response: &mut PodAnswer,
        respond: &mut SendResponse<Bytes>,
        bytes_out: &mut u64,
        started: Instant,
        to_agent: ToAgent<'_>,
    ) -> Answer {
        let response = tokio::select! {
            response = response.head() => response,
            _ = poll_fn(|cx| respond.poll_reset(cx)) => return Answer::ClientGone { status: 0 },
        };
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                let status = answer_denied(respond, protocol, &unavailable("kas is unavailable"));
                return Answer::Unanswered { status, error };
            }
        };
        self.hot
            .latency(protocol)
            .observe(started.elapsed().as_secs_f64());
        let (mut head, mut from_pod) = response.into_parts();
        let status = head.status.as_u16();
        let head_grpc = head
            .headers
            .get("grpc-status")
            .map(|s| GrpcCode::from_wire(s.as_bytes()));
        headers::strip_hop_by_hop(&mut head.headers, Hop::Http2);
        let ends = from_pod.is_end_stream();
        let mut to_client = match respond.send_response(Response::from_parts(head, ()), ends) {
            Ok(send) => send,
            Err(_) => return Answer::ClientGone { status },
        };
        to_agent.flow.answered.store(true, Ordering::Relaxed);
        // The call's status as its client sees it: the trailers', else a trailers-only
        // head's; without one, a 200 that ended is INTERNAL and any other status maps as
        // gRPC clients map it.
        let outcome = |trailer_status: Option<http::HeaderValue>| {
            let trailer_grpc = trailer_status.map(|s| GrpcCode::from_wire(s.as_bytes()));
            let grpc = trailer_grpc.or(head_grpc).unwrap_or(match status {
                200 => GrpcCode::Internal,
                _ => GrpcCode::from_http(status),
            });
            Answer::Complete {
                status,
                grpc: Some(grpc),
            }
        };
        if ends {
            return outcome(None);
        }
        match relay(&mut from_pod, &mut to_client, bytes_out, Some(to_agent)).await {
            Ok(trailer_status) => outcome(trailer_status),
            Err(Broken::Destination) => Answer::ClientGone { status },
            Err(Broken::Source(error)) => {
                let grpc = cut_short(protocol, &mut to_client, &error);
                Answer::Cut {
                    status,
                    grpc,
                    error,
                }
            }
        }
    }

    fn finish(&self, record: AccessRecord, grpc: Option<GrpcCode>, error: Option<String>) {
        if record.protocol == Protocol::Grpc {
            let code = grpc.unwrap_or(GrpcCode::Unavailable);
            self.gate
                .metrics
                .grpc_responses
                .with_label_values(&[code.name()])
                .inc();
        }
        record.log(&self.gate.metrics, error);
    }
}

/// Ends a client's stream whose pod failed mid-answer. gRPC gets trailers with
/// UNAVAILABLE (the agent reconnects, as for any lost pod) unless the pod reset the
/// stream on purpose, whose reason is passed on; anything else gets the reset.
fn cut_short(
    protocol: Protocol,
    to_client: &mut h2::SendStream<Bytes>,
    error: &h2::Error,
) -> GrpcCode {
    let pod_reset = error.is_reset() && error.is_remote();
    if protocol == Protocol::Grpc && !pod_reset {
        let mut trailers = HeaderMap::new();
        trailers.insert(
            "grpc-status",
            http::HeaderValue::from_static(GrpcCode::Unavailable.as_str()),
        );
        trailers.insert(
            "grpc-message",
            http::HeaderValue::from_static("kas pod connection lost"),
        );
        if to_client.send_trailers(trailers).is_ok() {
            return GrpcCode::Unavailable;
        }
    }
    let reason = error.reason().unwrap_or(Reason::INTERNAL_ERROR);
    to_client.send_reset(reason);
    match reason {
        Reason::CANCEL => GrpcCode::Cancelled,
        Reason::REFUSED_STREAM => GrpcCode::Unavailable,
        Reason::ENHANCE_YOUR_CALM => GrpcCode::ResourceExhausted,
        _ => GrpcCode::Internal,
    }
}

/// Connecting for a gRPC request: a stream on one of the edge's h2c connections to the
/// pod's port for the request's route.
struct OpenStream<'a> {
    parts: &'a http::request::Parts,
    target: &'a Authority,
    route: Route,
    settings: &'a H2cSettings,
    request_ends: bool,
    abandoned: &'a mut (dyn FnMut() -> bool + Send),
}

impl Connect for OpenStream<'_> {
    type Connected = PodStream;
    type Error = OpenError;

    fn connect(
        &mut self,
        pod: &Arc<Pod>,
    ) -> impl Future<Output = Result<PodStream, OpenError>> + Send {
        let request = pod_request(self.parts, self.target);
        let pod = pod.clone();
        async move {
            let port = pod.port(self.route);
            port.h2c
                .open(
                    port.addr,
                    self.settings,
                    request,
                    self.request_ends,
                    &mut *self.abandoned,
                )
                .await
        }
    }
}
