//! One tunnel's life: open `Connect` with the token, send the descriptor, wait idle; kas
//! either ends it (OK: open another at once, as agentk does after a clean end), breaks it
//! (retry after a backoff) or routes a request to it (a replacement opens, this one serves
//! the request and is done: tunnels are single-use).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use kas_proto::codec::LeanCodec;
use kas_proto::paths::{KUBERNETES_API_MAKE_REQUEST, REVERSE_TUNNEL_CONNECT};
use kas_proto::reverse_tunnel::{connect_response, ConnectRequest, ConnectResponse, RequestInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

use super::inbound::{self, Failure};
use super::{wire, Misbehaviour, Shared};
use crate::dev::channels::with_token;

/// The most a `Data` or `UpgradeData` message carries, as agentk's 32 KiB buffers.
pub const CHUNK: usize = 32 * 1024;

/// The largest message a tunnel encodes. [`Misbehaviour::DisconnectMidRequest`] sends a
/// larger one on purpose: tonic then fails the request body and hyper resets the stream,
/// the only way to reset one stream of a shared connection from a tonic client.
const MAX_MESSAGE: usize = 1 << 20;

/// How long one proxied request may take at most (a watch or an exec included).
const MAX_REQUEST: Duration = Duration::from_secs(600);

/// After its half-close, how long the agent waits for kas to end the stream.
const END_WAIT: Duration = Duration::from_secs(10);

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// An idle tunnel ended by kas sooner than this counts as refused (backoff), so a kas that
/// ends tunnels at once does not make the agent spin.
const MIN_IDLE_LIFE: Duration = Duration::from_millis(100);

/// One tunnel slot: holds a tunnel, replacing it when kas ends it idle (at once) or breaks
/// it (after a backoff), until a request uses it (the replacement is a new worker) or the
/// agent stops.
pub fn spawn_worker(shared: Arc<Shared>) {
    tokio::spawn(worker(shared));
}

async fn worker(shared: Arc<Shared>) {
    let mut backoff = BACKOFF_MIN;
    while !shared.cancel.is_cancelled() {
        let opened = Instant::now();
        match hold(&shared).await {
            Outcome::Used | Outcome::Cancelled => return,
            Outcome::EndedIdle if opened.elapsed() >= MIN_IDLE_LIFE => {
                backoff = BACKOFF_MIN;
                continue;
            }
            Outcome::EndedIdle => {}
            Outcome::Failed(status) => shared.record_error("tunnel", status).await,
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shared.cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

enum Outcome {
    /// kas ended the idle tunnel with OK.
    EndedIdle,
    /// A request came; a replacement was started.
    Used,
    Failed(tonic::Status),
    Cancelled,
}

/// Counts a tunnel as idle while it lives.
struct IdleGuard<'a>(&'a Shared);

impl<'a> IdleGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.counters().idle.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        self.0.counters().idle.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The request stream of a tunnel: the first message, then — only once a request arrived
/// and `later` delivers one — what the agent answers on a channel. An idle tunnel holds no
/// channel (its buffer is most of a tunnel's memory in a fleet of thousands).
fn outbound(
    first: ConnectRequest,
    later: oneshot::Receiver<mpsc::Receiver<ConnectRequest>>,
) -> impl futures_util::Stream<Item = ConnectRequest> + Send + 'static {
    use futures_util::StreamExt;
    let answers = futures_util::stream::once(later)
        .filter_map(|rx| std::future::ready(rx.ok()))
        .map(ReceiverStream::new)
        .flatten();
    futures_util::stream::once(std::future::ready(first)).chain(answers)
}

async fn connect(
    shared: &Shared,
    request: tonic::Request<impl futures_util::Stream<Item = ConnectRequest> + Send + 'static>,
) -> Result<Streaming<ConnectResponse>, tonic::Status> {
    let conn = &shared.conn;
    let mut grpc = tonic::client::Grpc::with_origin(conn.service.clone(), conn.origin.clone())
        .max_encoding_message_size(MAX_MESSAGE)
        .max_decoding_message_size(MAX_MESSAGE * 4);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static(REVERSE_TUNNEL_CONNECT);
    let response = grpc.streaming(request, path, LeanCodec::default()).await?;
    Ok(response.into_inner())
}

async fn hold(shared: &Arc<Shared>) -> Outcome {
    let first = match shared.misbehaviour() {
        Misbehaviour::WrongFirstMessage => wire::header(),
        Misbehaviour::DescriptorWithoutMethod => wire::descriptor(false),
        _ => wire::descriptor(true),
    };
    let (later_tx, later_rx) = oneshot::channel();
    let request = with_token(outbound(first, later_rx), &shared.options.token);
    shared.counters().opened.fetch_add(1, Ordering::SeqCst);
    let response = tokio::select! {
        response = connect(shared, request) => response,
        () = shared.cancel.cancelled() => return Outcome::Cancelled,
    };
    let mut stream = match response {
        Ok(stream) => stream,
        Err(status) => return Outcome::Failed(status),
    };
    // kas answers a tunnel once it holds it: idle from here.
    let idle = IdleGuard::new(shared);
    let first = tokio::select! {
        first = stream.message() => first,
        () = shared.cancel.cancelled() => return Outcome::Cancelled,
    };
    let info = match first {
        Ok(None) => return Outcome::EndedIdle,
        Err(status) => return Outcome::Failed(status),
        Ok(Some(ConnectResponse {
            msg: Some(connect_response::Msg::RequestInfo(info)),
        })) => info,
        Ok(Some(other)) => {
            // agentk's visitor refuses anything but RequestInfo first; it ends the stream
            // (here: drops it) and reports.
            return Outcome::Failed(tonic::Status::invalid_argument(format!(
                "kas sent {other:?} before RequestInfo"
            )));
        }
    };
    drop(idle);
    let counters = shared.counters();
    let busy = counters.busy.fetch_add(1, Ordering::SeqCst) + 1;
    counters.busy_peak.fetch_max(busy, Ordering::SeqCst);
    counters.used.fetch_add(1, Ordering::SeqCst);
    spawn_worker(shared.clone());
    let (tx, rx) = mpsc::channel::<ConnectRequest>(8);
    if later_tx.send(rx).is_err() {
        counters.busy.fetch_sub(1, Ordering::SeqCst);
        return Outcome::Used;
    }
    // Boxed: an idle worker's task then holds only the idle part of this future.
    let result = Box::pin(serve(shared, info, stream, tx)).await;
    counters.busy.fetch_sub(1, Ordering::SeqCst);
    if let Err((code, message)) = result {
        shared
            .record_error("request", tonic::Status::new(code, message))
            .await;
    }
    Outcome::Used
}

/// The agent's side of the proxied call, kept in order: the gRPC `Header` before any
/// message, `Trailer` then an optional `Error` last.
struct Responder {
    tx: mpsc::Sender<ConnectRequest>,
    header_sent: bool,
}

impl Responder {
    /// Sends `msg`, the `Header` first if not yet sent; false once kas is gone.
    async fn send(&mut self, msg: ConnectRequest) -> bool {
        if !self.header_sent {
            self.header_sent = true;
            if self.tx.send(wire::header()).await.is_err() {
                return false;
            }
        }
        self.tx.send(msg).await.is_ok()
    }

    /// Waits (up to 2 s) until tonic has taken every queued message.
    async fn drained(&self) {
        for _ in 0..400 {
            if self.tx.capacity() == self.tx.max_capacity() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `Trailer`, the `Error` if failed, then the half-close (dropping the sender).
    async fn finish(mut self, failure: Option<&Failure>) {
        if !self.send(wire::trailer()).await {
            return;
        }
        if let Some((code, message)) = failure {
            let _ = self.tx.send(wire::error(*code, message.clone())).await;
        }
    }
}

async fn serve(
    shared: &Arc<Shared>,
    info: RequestInfo,
    stream: Streaming<ConnectResponse>,
    tx: mpsc::Sender<ConnectRequest>,
) -> Result<(), Failure> {
    let abort = shared.cancel.child_token();
    let mut inbound = inbound::spawn(stream, abort.clone());
    let mut out = Responder {
        tx,
        header_sent: false,
    };
    let misbehaviour = shared.take_misbehaviour();
    match misbehaviour {
        Misbehaviour::ResetNextRequestUnanswered => {
            abort.cancel();
            return Err((Code::Aborted, "misbehaved: reset before answering".into()));
        }
        Misbehaviour::MessageBeforeHeader => {
            out.header_sent = true; // skip it
            let _ = out.send(wire::response_trailer()).await;
            drop(out);
            end(&mut inbound, &abort).await;
            // What kas answered the misbehaviour with, if it ended the stream with an error.
            return Err(inbound
                .failure()
                .unwrap_or((Code::Internal, "misbehaved: Message before Header".into())));
        }
        Misbehaviour::TrailerAfterError => {
            let _ = out
                .send(wire::error(Code::Unavailable, "misbehaving agent"))
                .await;
            let _ = out.tx.send(wire::trailer()).await;
            drop(out);
            end(&mut inbound, &abort).await;
            return Err(inbound
                .failure()
                .unwrap_or((Code::Internal, "misbehaved: Trailer after Error".into())));
        }
        _ => {}
    }
    let result = if info.method_name == KUBERNETES_API_MAKE_REQUEST {
        proxy(shared, &mut inbound, &mut out, &abort, misbehaviour).await
    } else {
        Err((
            Code::Unimplemented,
            format!("unknown method {}", info.method_name),
        ))
    };
    if misbehaviour == Misbehaviour::DisconnectMidRequest {
        abort.cancel();
        return Err((Code::Aborted, "misbehaved: disconnected mid-request".into()));
    }
    // The request side's own failure (order, broken stream) is the better reason.
    let result = match (inbound.failure(), result) {
        (Some(failure), _) => Err(failure),
        (None, result) => result,
    };
    out.finish(result.as_ref().err()).await;
    end(&mut inbound, &abort).await;
    result
}

/// Waits (bounded) for kas to end the stream after the agent's half-close, then stops
/// reading.
async fn end(inbound: &mut inbound::Inbound, abort: &tokio_util::sync::CancellationToken) {
    let _ = tokio::time::timeout(END_WAIT, &mut inbound.task).await;
    abort.cancel();
}

async fn proxy(
    shared: &Shared,
    inbound: &mut inbound::Inbound,
    out: &mut Responder,
    abort: &tokio_util::sync::CancellationToken,
    misbehaviour: Misbehaviour,
) -> Result<(), Failure> {
    let gone = || (Code::Cancelled, "kas ended the tunnel".to_owned());
    let deadline = Instant::now() + MAX_REQUEST;
    let head = tokio::select! {
        head = &mut inbound.header => head.map_err(|_| gone())?,
        () = abort.cancelled() => return Err(gone()),
    };
    let body = std::mem::replace(&mut inbound.body, mpsc::channel(1).1);
    let upstream = &shared.fleet.upstream;
    let request = upstream.build(&head, body)?;
    let mut response = tokio::select! {
        response = upstream.send(request) => response?,
        () = abort.cancelled() => return Err(gone()),
    };
    let switching = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let on_upgrade = switching.then(|| hyper::upgrade::on(&mut response));
    let (code, text, header) = upstream.response_head(&response);
    if !out.send(wire::response_header(code, text, header)).await {
        return Err(gone());
    }
    if misbehaviour == Misbehaviour::DisconnectMidRequest {
        // What was sent must be on the wire first: a reset drops what h2 still queues.
        out.drained().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Too large to encode: the stream is reset (see MAX_MESSAGE).
        let _ = out
            .send(wire::raw_message(vec![0u8; MAX_MESSAGE + 1]))
            .await;
        return Ok(());
    }
    let mut body = response.into_body();
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = abort.cancelled() => return Err(gone()),
            () = tokio::time::sleep_until(deadline) => {
                return Err((Code::DeadlineExceeded, "request took too long".into()))
            }
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| {
            (
                Code::Unavailable,
                format!("gRPC -> HTTP: response body: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for chunk in data.chunks(CHUNK) {
            if !out.send(wire::data(Bytes::copy_from_slice(chunk))).await {
                return Err(gone());
            }
        }
    }
    if !out.send(wire::response_trailer()).await {
        return Err(gone());
    }
    match on_upgrade {
        Some(on_upgrade) => {
            let upgraded = on_upgrade
                .await
                .map_err(|e| (Code::Unavailable, format!("gRPC -> HTTP: upgrade: {e}")))?;
            pipe_upgraded(TokioIo::new(upgraded), inbound, out, abort, deadline).await
        }
        // Upgrade bytes are only allowed after a 101 (agentk: Internal).
        None => match inbound.upgrade.try_recv() {
            Ok(_) => Err((
                Code::Internal,
                "UpgradeData, but the response was not 101".into(),
            )),
            Err(_) => Ok(()),
        },
    }
}

/// Bytes both ways over the upgraded connection: the API server's as `UpgradeData`
/// messages, kas's written to it; kas's `CloseSend` half-closes it. Ends when the API
/// server closes its side.
async fn pipe_upgraded<S>(
    io: S,
    inbound: &mut inbound::Inbound,
    out: &mut Responder,
    abort: &tokio_util::sync::CancellationToken,
    deadline: Instant,
) -> Result<(), Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let gone = || (Code::Cancelled, "kas ended the tunnel".to_owned());
    let (mut read, mut write) = tokio::io::split(io);
    let mut buf = vec![0u8; CHUNK];
    let mut from_kas_open = true;
    loop {
        tokio::select! {
            n = read.read(&mut buf) => match n {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => {
                    if !out.send(wire::upgrade_data(Bytes::copy_from_slice(&buf[..n]))).await {
                        return Err(gone());
                    }
                }
            },
            data = inbound.upgrade.recv(), if from_kas_open => match data {
                Some(data) => {
                    if write.write_all(&data).await.is_err() {
                        from_kas_open = false;
                    }
                }
                None => {
                    from_kas_open = false;
                    let _ = write.shutdown().await;
                }
            },
            () = abort.cancelled() => return Err(gone()),
            () = tokio::time::sleep_until(deadline) => {
                return Err((Code::DeadlineExceeded, "upgraded connection open too long".into()))
            }
        }
    }
}
