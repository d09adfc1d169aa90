//! Websocket tunnels from agents to kas pods, forwarded by the edge itself.
//!
//! Why not pingora's HTTP/1 proxy loop: pingora 0.9.1 ends an upgraded connection when the
//! pod's `101` is read before the upgrade request's own (empty) body has reached the upstream
//! half of its pipe (cloudflare/pingora#946). The agent then gets the `101`, maybe the pod's
//! first frame, and EOF. On a busy edge that was about one tunnel in a thousand, which for a
//! fleet that holds connections for hours means a steady trickle of pointless reconnects.
//!
//! So for an upgrade request the edge does the handshake with the pod itself: it writes the
//! request head, reads the response head, relays it to the agent, and only a `101` turns the
//! connection into a byte tunnel. The agent's raw connection is then taken out of pingora
//! (with any bytes pingora had already read past the request head) and handed, with the
//! pod's socket, to the connection layer ([`Handoffs`]), which carries it in a small task of
//! its own: pingora's per-request state is freed, and an idle tunnel holds its TLS state,
//! two sockets and a few hundred bytes of buffer (pod reads wait for readiness before they
//! take a buffer).
//!
//! A tunnel is two half-duplex copies joined in one task, agent → pod and pod → agent, each
//! with its own adaptive buffer, so an agent that stops reading stalls only the bytes meant
//! for it: what it sends still reaches the pod. One side's EOF shuts down the edge's write
//! towards the other side (TCP FIN, TLS close_notify) and the other direction continues until
//! it ends, for at most [`TunnelLimits::half_closed`]. A write that makes no progress for
//! [`TunnelLimits::write_stall`] (a peer that stopped reading) ends the tunnel.
//!
//! A refused upgrade (anything but `101`) is relayed with its status and end-to-end headers
//! and a body read within a bound and re-framed with a correct `Content-Length`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::UniqueIDType;
use pingora::proxy::Session;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::headers::Hop;
use crate::pingora_compat;
use crate::upstream::connect::{Connect, ConnectFailure};
use crate::upstream::pool::Pod;
use crate::upstream::route::Route;

/// The largest response head a pod may send for an upgrade.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Header lines in a response head; kas sends a handful.
const MAX_RESPONSE_HEADERS: usize = 64;
/// Bounds of both directions' read buffers. Each follows its traffic: it doubles after a
/// read that filled it and shrinks back after small reads ([`next_read_size`]), so a quiet
/// tunnel reads in small steps while a busy one reads in big ones. The agent side's buffer
/// is held while the tunnel waits (TLS has no readiness to wait on without one): an idle
/// agent that last sent a keepalive holds [`READ_MIN`] bytes, and rustls has already
/// decrypted the record, so a small buffer costs copies, never syscalls. The pod side waits
/// for readiness and only then takes a buffer, so an idle pod side holds none.
const READ_MIN: usize = 512;
const READ_MAX: usize = 16 * 1024;
/// The most body relayed from a pod that refused the upgrade (an error page).
const MAX_REFUSAL_BODY: usize = 64 * 1024;
/// Raw bytes read from a refusing pod at most (chunk framing included), so a pod that
/// frames a small body in endless chunk extensions cannot keep the edge reading.
const MAX_REFUSAL_RAW: usize = 4 * MAX_REFUSAL_BODY;
/// How long a refused upgrade's body may take to arrive from the pod.
const REFUSAL_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the agent may take to accept a refused upgrade's answer.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on waiting for a peer of an established tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelLimits {
    /// A write (to the agent or to the pod) that makes no progress for this long ends the
    /// tunnel: the peer stopped reading. An idle tunnel writes nothing and is not affected.
    pub write_stall: Duration,
    /// After one side's EOF, how long the other direction may continue (the pod's last
    /// bytes after the agent hung up, or the agent's after the pod did).
    pub half_closed: Duration,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        Self {
            write_stall: Duration::from_secs(60),
            half_closed: Duration::from_secs(30),
        }
    }
}

/// Why an upgrade handshake with a pod failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Nothing reached the pod: another pod may be tried.
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("pod {addr} did not answer the upgrade within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("pod {addr} closed the connection before answering the upgrade")]
    Closed { addr: SocketAddr },
    #[error("pod {addr} sent an invalid response head: {reason}")]
    Invalid { addr: SocketAddr, reason: String },
    #[error("talking to pod {addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
}

impl HandshakeError {
    /// True when the request never reached the pod, so retrying elsewhere is safe.
    pub fn is_connect(&self) -> bool {
        matches!(self, HandshakeError::Connect { .. })
    }
}

impl ConnectFailure for HandshakeError {
    fn pod_unreachable(&self) -> bool {
        self.is_connect()
    }

    fn may_try_another(&self) -> bool {
        self.is_connect()
    }
}

/// How the edge reaches pods for tunnels.
#[derive(Clone, Debug)]
pub struct PodDialer {
    pub connect_timeout: Duration,
    /// How long a pod may take to answer the upgrade request.
    pub response_timeout: Duration,
    /// TCP keepalive idle time: finds pods that vanished under an idle tunnel.
    pub tcp_keepalive: Duration,
}

/// The upgrade handshake on a pod, on the port `route` goes to.
pub struct Upgrade<'a> {
    dialer: &'a PodDialer,
    route: Route,
    request: &'a RequestHeader,
}

impl PodDialer {
    /// Connecting means doing the upgrade handshake with `request`.
    pub fn upgrade<'a>(&'a self, route: Route, request: &'a RequestHeader) -> Upgrade<'a> {
        Upgrade {
            dialer: self,
            route,
            request,
        }
    }
}

impl Connect for Upgrade<'_> {
    type Connected = PodAnswer;
    type Error = HandshakeError;

    fn connect(
        &mut self,
        pod: &Arc<Pod>,
    ) -> impl Future<Output = Result<PodAnswer, HandshakeError>> + Send {
        self.dialer
            .handshake(pod.port(self.route).addr, self.request)
    }
}

/// A pod that answered an upgrade request. `early` holds bytes the pod sent right after its
/// response head (with a `101`, the first tunnel bytes), which must reach the agent first.
pub struct PodAnswer {
    pub stream: TcpStream,
    pub response: ResponseHeader,
    pub early: Bytes,
}

impl PodDialer {
    /// Connects to `addr`, sends `request` and reads the pod's response head.
    pub async fn handshake(
        &self,
        addr: SocketAddr,
        request: &RequestHeader,
    ) -> Result<PodAnswer, HandshakeError> {
        let mut stream = self.connect(addr).await?;
        let io_err = |source| HandshakeError::Io { addr, source };
        stream
            .write_all(&encode_request_head(request))
            .await
            .map_err(io_err)?;
        let timeout = self.response_timeout;
        let (response, early) =
            tokio::time::timeout(timeout, read_response_head(&mut stream, addr))
                .await
                .map_err(|_| HandshakeError::Timeout { addr, timeout })??;
        Ok(PodAnswer {
            stream,
            response,
            early,
        })
    }

    pub(super) async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, HandshakeError> {
        let connect_err = |source| HandshakeError::Connect { addr, source };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err(io::ErrorKind::TimedOut.into()))?
            .map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        crate::support::keepalive::apply(&stream, self.tcp_keepalive).map_err(connect_err)?;
        Ok(stream)
    }
}

/// The upgrade request as the pod sees it: the agent's request line and end-to-end
/// headers ([`super::headers`]), and this hop's own `Connection: upgrade` and the
/// agent's `Upgrade`.
fn encode_request_head(request: &RequestHeader) -> Vec<u8> {
    let target = request
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let hop_by_hop = super::headers::hop_by_hop(&request.headers, Hop::Http1);
    let upgrade = request
        .headers
        .get(http::header::UPGRADE)
        .map(|v| (&b"upgrade"[..], v.as_bytes()));
    let mut head = Vec::with_capacity(256);
    encode_head_into(
        &mut head,
        request.method.as_str(),
        target,
        request
            .headers
            .iter()
            .filter(|(name, _)| !hop_by_hop.contains(name))
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
            .chain([(&b"connection"[..], &b"upgrade"[..])])
            .chain(upgrade),
    );
    head
}

/// Appends an HTTP/1.1 request head: `method target HTTP/1.1`, the headers, the blank line.
pub(super) fn encode_head_into<'a>(
    out: &mut Vec<u8>,
    method: &str,
    target: &str,
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) {
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Reads until a complete response head, bounded by [`MAX_RESPONSE_HEAD`].
pub(super) async fn read_response_head(
    stream: &mut TcpStream,
    addr: SocketAddr,
) -> Result<(ResponseHeader, Bytes), HandshakeError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let read = stream
            .read_buf(&mut buf)
            .await
            .map_err(|source| HandshakeError::Io { addr, source })?;
        if read == 0 {
            return Err(HandshakeError::Closed { addr });
        }
        let invalid = |reason: String| HandshakeError::Invalid { addr, reason };
        if let Some((response, head_len)) = parse_response_head(&buf).map_err(invalid)? {
            let early = buf.split_off(head_len).freeze();
            return Ok((response, early));
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(invalid(format!("longer than {MAX_RESPONSE_HEAD} bytes")));
        }
    }
}

/// How a tunnel or refused upgrade ended: the access log's `tunnel_end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelEnd {
    /// The pod answered something other than `101`; it was relayed and the connection closed.
    Refused,
    AgentClosed,
    PodClosed,
    AgentError,
    PodError,
    /// The edge closed it: the client was blocked, or the connection reached its maximum age.
    ClosedByEdge,
}

impl TunnelEnd {
    pub fn label(self) -> &'static str {
        match self {
            TunnelEnd::Refused => "refused",
            TunnelEnd::AgentClosed => "agent_closed",
            TunnelEnd::PodClosed => "pod_closed",
            TunnelEnd::AgentError => "agent_error",
            TunnelEnd::PodError => "pod_error",
            TunnelEnd::ClosedByEdge => "closed_by_edge",
        }
    }
}

/// What the access log reports for a forwarded upgrade. The agent's pingora session is
/// handed over to the tunnel, so its counters cannot be read afterwards.
#[derive(Clone, Copy, Debug)]
pub struct TunnelOutcome {
    /// The status the agent got from the pod.
    pub status: u16,
    /// Bytes from the agent to the pod after the upgrade.
    pub bytes_in: u64,
    /// Bytes from the pod to the agent after the response head.
    pub bytes_out: u64,
    pub end: TunnelEnd,
}

/// Where a forwarded upgrade stands once pingora's part is over.
pub enum RelayOutcome {
    /// Refused by the pod, or failed before the tunnel existed: nothing left to carry.
    Finished(TunnelOutcome),
    /// The `101` is on the wire; the tunnel waits to be carried by its connection
    /// (see [`crate::connection::handoff`]).
    Established(PendingTunnel),
}

/// An established tunnel that nothing carries yet: the agent's raw connection (taken out
/// of its pingora session), the pod's socket and the pod's first bytes.
pub struct PendingTunnel {
    agent: pingora::protocols::Stream,
    pod: TcpStream,
    /// From the pod, right behind its `101`.
    early: Bytes,
    /// From the agent, right behind its upgrade request.
    pre_read: Bytes,
    status: u16,
}

impl PendingTunnel {
    /// The agent connection's id (its socket), the key under which it is handed over.
    pub fn connection_id(&self) -> UniqueIDType {
        self.agent.id()
    }

    /// Carries bytes both ways until both sides are done, one fails, or `stop` (the edge
    /// closing the connection: a block, its maximum age) resolves with the reason.
    pub fn carry(
        self,
        stop: impl Future<Output = TunnelEnd>,
    ) -> impl Future<Output = TunnelOutcome> {
        self.carry_within(TunnelLimits::default(), stop)
    }

    /// [`PendingTunnel::carry`] with explicit limits.
    pub fn carry_within(
        self,
        limits: TunnelLimits,
        stop: impl Future<Output = TunnelEnd>,
    ) -> impl Future<Output = TunnelOutcome> {
        let status = self.status;
        let mut pump = Pump::new(self, limits);
        async move {
            let end = tokio::select! {
                end = &mut pump => end,
                end = stop => end,
            };
            TunnelOutcome {
                status,
                bytes_in: pump.up.carried,
                bytes_out: pump.down.carried,
                end,
            }
        }
    }
}

/// Relays the pod's answer to the agent. A refusal is relayed with correct framing; after
/// a `101` the agent's connection is taken out of pingora and returned with the pod's,
/// ready to be carried. Errors are reported in the outcome, not propagated: the response is already
/// on the wire.
pub async fn relay(session: &mut Session, answered: PodAnswer) -> RelayOutcome {
    let PodAnswer {
        stream,
        response,
        early,
    } = answered;
    let mut outcome = TunnelOutcome {
        status: response.status.as_u16(),
        bytes_in: 0,
        bytes_out: 0,
        end: TunnelEnd::Refused,
    };
    if response.status != 101 {
        // The agent's connection cannot be reused: the pod may not have finished the body.
        session.set_keepalive(None);
        match relay_refusal(session, response, stream, early).await {
            Ok(sent) => outcome.bytes_out = sent,
            Err(e) => tracing::debug!(error = %e, "relaying a refused upgrade"),
        }
        return RelayOutcome::Finished(outcome);
    }
    // pingora writes (and flushes) the 101, and so knows the session is upgraded.
    if let Err(e) = session
        .write_response_header(Box::new(response), false)
        .await
    {
        tracing::debug!(error = %e, "writing the 101 to the agent");
        outcome.end = TunnelEnd::AgentError;
        return RelayOutcome::Finished(outcome);
    }
    let head = encode_request_head(session.req_header());
    let taken = match take_buffered(session).await {
        Ok(pre_read) => pingora_compat::take_h1_stream(session, &head)
            .await
            .map(|agent| (agent, pre_read)),
        Err(e) => Err(e),
    };
    match taken {
        Ok((agent, pre_read)) => RelayOutcome::Established(PendingTunnel {
            agent,
            pod: stream,
            early,
            pre_read,
            status: outcome.status,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "could not take over the agent's connection");
            outcome.end = TunnelEnd::AgentError;
            RelayOutcome::Finished(outcome)
        }
    }
}

/// Bytes the agent sent right behind its upgrade request, without waiting for the `101`,
/// that pingora has already read into the session's buffers: taken now, so they are not
/// dropped with the session, and without waiting on the socket for more.
async fn take_buffered(session: &mut Session) -> io::Result<Bytes> {
    let mut taken = BytesMut::new();
    // Bounded: pingora buffers at most a header's worth; a client streaming fast past
    // that is simply read by the pump instead.
    for _ in 0..16 {
        let read = session.downstream_session.read_request_body();
        // A zero timeout still polls the read once: buffered bytes come back at once.
        match tokio::time::timeout(Duration::ZERO, read).await {
            Ok(Ok(Some(data))) => taken.extend_from_slice(&data),
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(e)) => return Err(io::Error::other(e.to_string())),
        }
    }
    Ok(taken.freeze())
}

/// Why one direction of a tunnel stopped before its source closed.
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("reading: {0}")]
    Read(#[source] io::Error),
    #[error("writing: {0}")]
    Write(#[source] io::Error),
    #[error("the peer accepted nothing for {0:?}")]
    Stalled(Duration),
}

/// One direction of a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    AgentToPod,
    PodToAgent,
}

impl Way {
    fn label(self) -> &'static str {
        match self {
            Way::AgentToPod => "agent to pod",
            Way::PodToAgent => "pod to agent",
        }
    }

    /// How the tunnel ends when this direction's source closed first.
    fn closed(self) -> TunnelEnd {
        match self {
            Way::AgentToPod => TunnelEnd::AgentClosed,
            Way::PodToAgent => TunnelEnd::PodClosed,
        }
    }

    /// How the tunnel ends when this direction broke: a failed read is its source's fault,
    /// a failed or stalled write its destination's.
    fn broken(self, broken: &Broken) -> TunnelEnd {
        let source_failed = matches!(broken, Broken::Read(_));
        match (self, source_failed) {
            (Way::AgentToPod, true) | (Way::PodToAgent, false) => TunnelEnd::AgentError,
            (Way::AgentToPod, false) | (Way::PodToAgent, true) => TunnelEnd::PodError,
        }
    }
}

/// Two half-duplex copies joined in one future: agent → pod and pod → agent progress
/// independently, so a peer that stops reading stalls only the direction towards it. The
/// first direction to see its source close shuts down its destination's write side; the
/// other continues until it ends too, for at most [`TunnelLimits::half_closed`]. A failure
/// (or a write stalled for [`TunnelLimits::write_stall`]) ends the tunnel at once.
///
/// Hand-written rather than two `async` loops joined: it owns both sockets without a split
/// lock, its timer exists only while a deadline runs, and the whole state is a few hundred
/// bytes, which every idle agent holds for hours.
struct Pump {
    agent: pingora::protocols::Stream,
    pod: TcpStream,
    /// Agent → pod.
    up: HalfDuplex,
    /// Pod → agent.
    down: HalfDuplex,
    limits: TunnelLimits,
    /// The direction whose source closed first, and when.
    half_closed: Option<(Way, Instant)>,
    /// Armed only while a deadline runs (a stalled write, a half-closed tunnel).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// One direction: bytes read from its source wait in `buf[pos..end]` until its destination
/// has taken them all.
struct HalfDuplex {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// The next read's size ([`next_read_size`]).
    size: usize,
    phase: Phase,
    /// Since when the destination has accepted nothing (a write, flush or shutdown pending).
    stalled_since: Option<Instant>,
    /// Bytes the destination accepted.
    carried: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Read,
    Write,
    Flush,
    /// The source closed: end the destination's write side.
    Shutdown,
    Done,
}

/// Steps one direction takes in one poll before yielding, so a busy direction cannot
/// starve the other.
const STEPS_PER_POLL: usize = 32;

impl HalfDuplex {
    /// Starts with `first` (bytes that arrived with the handshake) to deliver.
    fn new(first: &[u8]) -> Self {
        Self {
            buf: first.to_vec(),
            pos: 0,
            end: first.len(),
            size: READ_MIN,
            phase: if first.is_empty() {
                Phase::Read
            } else {
                Phase::Write
            },
            stalled_since: None,
            carried: 0,
        }
    }

    fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn read_into_buffer(&mut self, n: usize) {
        if n == 0 {
            self.phase = Phase::Shutdown;
        } else {
            self.pos = 0;
            self.end = n;
            self.phase = Phase::Write;
        }
    }

    /// Makes the read buffer `size` bytes long (it may have held handshake bytes).
    fn sized_buffer(&mut self) -> &mut [u8] {
        if self.buf.len() != self.size {
            self.buf = vec![0u8; self.size];
        }
        &mut self.buf
    }

    /// Reads from a source that has no readiness to wait on (TLS): the buffer is held
    /// while waiting.
    fn poll_read_held<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
    ) -> Poll<Result<(), Broken>> {
        let mut read = ReadBuf::new(self.sized_buffer());
        ready!(Pin::new(from).poll_read(cx, &mut read)).map_err(Broken::Read)?;
        let n = read.filled().len();
        self.read_into_buffer(n);
        Poll::Ready(Ok(()))
    }

    /// Reads from a socket, waiting for readiness first so an idle direction holds no
    /// buffer; a busy one keeps its buffer until the socket runs dry.
    fn poll_read_ready(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
    ) -> Poll<Result<(), Broken>> {
        loop {
            ready!(from.poll_read_ready(cx)).map_err(Broken::Read)?;
            match from.try_read(self.sized_buffer()) {
                Ok(n) => {
                    self.read_into_buffer(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.buf = Vec::new(),
                Err(e) => return Poll::Ready(Err(Broken::Read(e))),
            }
        }
    }

    /// Writes, flushes or shuts down towards the destination, whichever is due; ready once
    /// the direction is back to reading (or done).
    fn poll_deliver<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut W,
    ) -> Poll<Result<(), Broken>> {
        loop {
            let polled = match self.phase {
                Phase::Read | Phase::Done => return Poll::Ready(Ok(())),
                Phase::Write => {
                    let pending = self.buf.get(self.pos..self.end).unwrap_or_default();
                    match Pin::new(&mut *to).poll_write(cx, pending) {
                        Poll::Ready(Ok(0)) => {
                            Poll::Ready(Err(Broken::Write(io::ErrorKind::WriteZero.into())))
                        }
                        Poll::Ready(Ok(n)) => {
                            self.carried += n as u64;
                            self.pos = (self.pos + n).min(self.end);
                            if self.pos == self.end {
                                self.phase = Phase::Flush;
                            }
                            Poll::Ready(Ok(()))
                        }
                        Poll::Ready(Err(e)) => Poll::Ready(Err(Broken::Write(e))),
                        Poll::Pending => Poll::Pending,
                    }
                }
                Phase::Flush => match Pin::new(&mut *to).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.size = next_read_size(self.size, self.end);
                        self.phase = Phase::Read;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(Broken::Write(e))),
                    Poll::Pending => Poll::Pending,
                },
                Phase::Shutdown => match Pin::new(&mut *to).poll_shutdown(cx) {
                    Poll::Ready(result) => {
                        // A peer that is gone is noticed by the direction reading from it.
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "shutting down a tunnel's write side");
                        }
                        self.buf = Vec::new();
                        self.phase = Phase::Done;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Pending => Poll::Pending,
                },
            };
            match polled {
                Poll::Pending => {
                    self.stalled_since.get_or_insert_with(Instant::now);
                    return Poll::Pending;
                }
                Poll::Ready(result) => {
                    self.stalled_since = None;
                    result?;
                }
            }
        }
    }
}

impl Pump {
    fn new(tunnel: PendingTunnel, limits: TunnelLimits) -> Self {
        Self {
            up: HalfDuplex::new(&tunnel.pre_read),
            down: HalfDuplex::new(&tunnel.early),
            agent: tunnel.agent,
            pod: tunnel.pod,
            limits,
            half_closed: None,
            timer: None,
        }
    }

    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Broken>> {
        for _ in 0..STEPS_PER_POLL {
            match self.up.phase {
                Phase::Done => return Poll::Ready(Ok(())),
                Phase::Read => ready!(self.up.poll_read_held(cx, &mut self.agent))?,
                _ => ready!(self.up.poll_deliver(cx, &mut self.pod))?,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Broken>> {
        for _ in 0..STEPS_PER_POLL {
            match self.down.phase {
                Phase::Done => return Poll::Ready(Ok(())),
                Phase::Read => ready!(self.down.poll_read_ready(cx, &self.pod))?,
                _ => ready!(self.down.poll_deliver(cx, &mut self.agent))?,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The earliest running deadline and how the tunnel ends if it passes.
    fn next_deadline(&self) -> Option<(Instant, TunnelEnd)> {
        let stall = self.limits.write_stall;
        let stalled = Broken::Stalled(stall);
        [
            self.up
                .stalled_since
                .map(|t| (t + stall, Way::AgentToPod.broken(&stalled))),
            self.down
                .stalled_since
                .map(|t| (t + stall, Way::PodToAgent.broken(&stalled))),
            self.half_closed
                .map(|(way, t)| (t + self.limits.half_closed, way.closed())),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(at, _)| *at)
    }
}

impl Future for Pump {
    type Output = TunnelEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<TunnelEnd> {
        let this = self.get_mut();
        for way in [Way::AgentToPod, Way::PodToAgent] {
            let polled = match way {
                Way::AgentToPod if !this.up.done() => this.poll_up(cx),
                Way::PodToAgent if !this.down.done() => this.poll_down(cx),
                _ => continue,
            };
            match polled {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => {
                    this.half_closed.get_or_insert((way, Instant::now()));
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, way = way.label(), "tunnel direction failed");
                    // After a half-close the tunnel was ending anyway: the first close is
                    // what ended it (a pod that closed fully resets the agent's last bytes).
                    return Poll::Ready(match this.half_closed {
                        Some((first, _)) => first.closed(),
                        None => way.broken(&e),
                    });
                }
            }
        }
        if this.up.done() && this.down.done() {
            let first = this.half_closed.map_or(Way::AgentToPod, |(way, _)| way);
            return Poll::Ready(first.closed());
        }
        loop {
            let Some((at, end)) = this.next_deadline() else {
                // Nothing is waiting on a deadline: an idle tunnel keeps no timer.
                this.timer = None;
                return Poll::Pending;
            };
            if at <= Instant::now() {
                tracing::debug!(end = end.label(), "tunnel deadline passed");
                return Poll::Ready(end);
            }
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            ready!(timer.as_mut().poll(cx));
        }
    }
}

/// A read buffer's next size after a read of `n` bytes into `current`.
fn next_read_size(current: usize, n: usize) -> usize {
    if n == current {
        (current * 2).min(READ_MAX)
    } else if n < current / 4 {
        (n * 2).clamp(READ_MIN, READ_MAX)
    } else {
        current
    }
}

/// Relays a refused upgrade: the pod's status and end-to-end headers, and its body read
/// within bounds ([`read_refusal_body`]) and re-framed with a correct `Content-Length`
/// whatever framing the pod used. Returns the body bytes sent.
async fn relay_refusal(
    session: &mut Session,
    response: ResponseHeader,
    stream: TcpStream,
    early: Bytes,
) -> pingora::Result<u64> {
    let framing = ResponseFraming::of(&response);
    let (body, complete) = read_refusal_body(framing, stream, early).await;
    if !complete {
        tracing::debug!(status = response.status.as_u16(), framing = ?framing, relayed = body.len(),
            "a refused upgrade's body did not arrive whole; relaying what did");
    }
    let mut head = response;
    strip_hop_by_hop(&mut head);
    if framing != ResponseFraming::NoBody {
        head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    }
    let sent = body.len() as u64;
    // The session has no write timeout (tunnels must not have one): an agent that does not
    // read its refusal must not hold the edge either.
    let write = async {
        session.write_response_header(Box::new(head), false).await?;
        if !body.is_empty() {
            session.write_response_body(Some(body), false).await?;
        }
        session.write_response_body(None, true).await
    };
    match tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, write).await {
        Ok(written) => written.map(|()| sent),
        Err(_) => Err(pingora::Error::explain(
            pingora::ErrorType::WriteTimedout,
            "the agent did not take the refused upgrade's answer",
        )),
    }
}

/// Removes what must not cross to the agent ([`super::headers::hop_by_hop`]) and the
/// pod's `Content-Length` (the relay sets its own).
pub(super) fn strip_hop_by_hop(head: &mut ResponseHeader) {
    let mut names = super::headers::hop_by_hop(&head.headers, Hop::Http1);
    names.push(http::header::CONTENT_LENGTH);
    for name in &names {
        // A removal takes every value of the name.
        let _ = head.remove_header(name);
    }
}

/// How a refusing pod delimits its body (RFC 9112 6.3, for a response to a GET).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ResponseFraming {
    /// 1xx, 204, 304: no body.
    NoBody,
    /// The answer to a HEAD request: no body, and the `Content-Length` a GET would get.
    HeadOnly(u64),
    Chunked,
    Length(u64),
    /// No length (or a transfer coding other than chunked last): until the pod closes.
    UntilClose,
    /// Conflicting or unparsable `Content-Length`: the body cannot be delimited and is
    /// not relayed.
    Invalid,
}

impl ResponseFraming {
    pub(super) fn of(response: &ResponseHeader) -> Self {
        let status = response.status;
        if status.is_informational() || status == 204 || status == 304 {
            return Self::NoBody;
        }
        let headers = &response.headers;
        if headers.contains_key(http::header::TRANSFER_ENCODING) {
            let last = headers
                .get_all(http::header::TRANSFER_ENCODING)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .rfind(|coding| !coding.is_empty());
            return match last {
                Some(coding) if coding.eq_ignore_ascii_case("chunked") => Self::Chunked,
                _ => Self::UntilClose,
            };
        }
        let mut length = None;
        for value in headers.get_all(http::header::CONTENT_LENGTH) {
            let Ok(value) = value.to_str() else {
                return Self::Invalid;
            };
            for item in value.split(',') {
                let item = item.trim();
                let Some(n) = item
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| item.parse::<u64>().ok())
                    .flatten()
                else {
                    return Self::Invalid;
                };
                if length.is_some_and(|l| l != n) {
                    return Self::Invalid;
                }
                length = Some(n);
            }
        }
        length.map_or(Self::UntilClose, Self::Length)
    }
}

/// Reads a refused upgrade's body: at most [`MAX_REFUSAL_BODY`] bytes of it, at most
/// [`MAX_REFUSAL_RAW`] bytes off the wire, within [`REFUSAL_BODY_TIMEOUT`]. Returns the
/// body (decoded from chunks, cut at a declared length) and whether it arrived whole.
async fn read_refusal_body(
    framing: ResponseFraming,
    mut stream: TcpStream,
    early: Bytes,
) -> (Bytes, bool) {
    let mut raw = BytesMut::from(&early[..]);
    drop(early);
    let mut body = BytesMut::new();
    let mut chunks = ChunkedBody::default();
    let read = async {
        let mut raw_total = raw.len();
        loop {
            let complete = match framing {
                ResponseFraming::NoBody | ResponseFraming::HeadOnly(_) => return true,
                ResponseFraming::Invalid => return false,
                ResponseFraming::Length(n) => {
                    let missing = n.saturating_sub(body.len() as u64);
                    let take = missing.min(raw.len() as u64) as usize;
                    body.extend_from_slice(&raw.split_to(take));
                    body.len() as u64 >= n
                }
                ResponseFraming::UntilClose => {
                    body.extend_from_slice(&raw.split());
                    false
                }
                ResponseFraming::Chunked => match chunks.decode(&mut raw, &mut body) {
                    Ok(done) => done,
                    Err(e) => {
                        tracing::debug!(error = %e, "a refused upgrade's chunked body");
                        return false;
                    }
                },
            };
            if complete {
                return body.len() <= MAX_REFUSAL_BODY;
            }
            if body.len() > MAX_REFUSAL_BODY || raw_total > MAX_REFUSAL_RAW {
                return false;
            }
            raw.reserve(8 * 1024);
            match stream.read_buf(&mut raw).await {
                Ok(0) => return framing == ResponseFraming::UntilClose,
                Ok(n) => raw_total += n,
                Err(_) => return false,
            }
        }
    };
    let complete = tokio::time::timeout(REFUSAL_BODY_TIMEOUT, read)
        .await
        .unwrap_or(false);
    body.truncate(MAX_REFUSAL_BODY);
    (body.freeze(), complete)
}

/// Decodes a chunked body incrementally (RFC 9112 7.1); trailers are not needed and not read.
#[derive(Debug, Default)]
pub(super) struct ChunkedBody {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// The last (zero-size) chunk was read.
    Done,
}

/// The longest chunk-size line accepted (extensions included).
const MAX_CHUNK_SIZE_LINE: usize = 4 * 1024;

impl ChunkedBody {
    /// Moves what `raw` holds into `body`; `Ok(true)` once the last chunk is read.
    pub(super) fn decode(
        &mut self,
        raw: &mut BytesMut,
        body: &mut BytesMut,
    ) -> Result<bool, String> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(true),
                ChunkState::Size => match httparse::parse_chunk_size(raw) {
                    Ok(httparse::Status::Complete((used, 0))) => {
                        let _ = raw.split_to(used);
                        self.state = ChunkState::Done;
                    }
                    Ok(httparse::Status::Complete((used, size))) => {
                        let _ = raw.split_to(used);
                        self.state = ChunkState::Data(size);
                    }
                    Ok(httparse::Status::Partial) if raw.len() > MAX_CHUNK_SIZE_LINE => {
                        return Err("chunk-size line too long".into())
                    }
                    Ok(httparse::Status::Partial) => return Ok(false),
                    Err(_) => return Err("invalid chunk size".into()),
                },
                ChunkState::Data(left) => {
                    if raw.is_empty() {
                        return Ok(false);
                    }
                    let take = left.min(raw.len() as u64) as usize;
                    body.extend_from_slice(&raw.split_to(take));
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd => {
                    if raw.len() < 2 {
                        return Ok(false);
                    }
                    if raw.split_to(2)[..] != b"\r\n"[..] {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    self.state = ChunkState::Size;
                }
            }
        }
    }
}

/// `Ok(None)` while the head is incomplete.
fn parse_response_head(buf: &[u8]) -> Result<Option<(ResponseHeader, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(buf).map_err(|e| e.to_string())? {
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(len) => len,
    };
    let code = parsed.code.ok_or("no status code")?;
    let mut response =
        ResponseHeader::build(code, Some(parsed.headers.len())).map_err(|e| e.to_string())?;
    if let Some(reason) = parsed.reason {
        // Best effort: an unusual reason phrase is not worth failing the tunnel over.
        let _ = response.set_reason_phrase(Some(reason));
    }
    for header in parsed.headers.iter() {
        let value = http::HeaderValue::from_bytes(header.value).map_err(|e| e.to_string())?;
        response
            .append_header(header.name.to_owned(), value)
            .map_err(|e| e.to_string())?;
    }
    Ok(Some((response, head_len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn upgrade_request() -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/ws?x=1", None).unwrap();
        req.insert_header("Host", "kas.example.test").unwrap();
        req.insert_header("Upgrade", "websocket").unwrap();
        req.insert_header("Connection", "Upgrade").unwrap();
        req
    }

    fn dialer() -> PodDialer {
        PodDialer {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_millis(500),
            tcp_keepalive: Duration::from_secs(30),
        }
    }

    /// A one-shot pod: reads the request head, answers with `answer`, returns the head seen.
    async fn pod(answer: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut byte = [0u8; 1];
            while !seen.ends_with(b"\r\n\r\n") {
                if sock.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                seen.push(byte[0]);
            }
            sock.write_all(answer).await.unwrap();
            // Hold the connection open briefly so the client sees the answer, not EOF.
            tokio::time::sleep(Duration::from_millis(700)).await;
            String::from_utf8(seen).unwrap()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_101_with_early_bytes_in_the_same_segment_keeps_them() {
        let (addr, task) = pod(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n\r\n\x82\x03hey").await;
        let answered = dialer().handshake(addr, &upgrade_request()).await.unwrap();
        assert_eq!(answered.response.status, 101);
        assert_eq!(
            answered
                .response
                .headers
                .get("sec-websocket-accept")
                .unwrap(),
            "abc"
        );
        assert_eq!(&answered.early[..], b"\x82\x03hey");
        let seen = task.await.unwrap();
        assert!(seen.starts_with("GET /ws?x=1 HTTP/1.1\r\n"), "{seen}");
        assert!(seen.contains("upgrade: websocket\r\n"), "{seen}");
    }

    #[tokio::test]
    async fn a_refusal_is_returned_for_relaying() {
        let (addr, _task) =
            pod(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\nnope!").await;
        let answered = dialer().handshake(addr, &upgrade_request()).await.unwrap();
        assert_eq!(answered.response.status, 401);
        assert_eq!(
            ResponseFraming::of(&answered.response),
            ResponseFraming::Length(5)
        );
        assert_eq!(&answered.early[..], b"nope!");
    }

    #[tokio::test]
    async fn garbage_silence_and_refused_connections_are_distinct_errors() {
        let (addr, _task) = pod(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        let err = dialer()
            .handshake(addr, &upgrade_request())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, HandshakeError::Invalid { .. }), "{err}");

        // A pod that accepts but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = listener.local_addr().unwrap();
        let err = dialer()
            .handshake(silent, &upgrade_request())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, HandshakeError::Timeout { .. }), "{err}");
        drop(listener);

        // Nothing listens any more: a connect error, the only retryable kind.
        let err = dialer()
            .handshake(silent, &upgrade_request())
            .await
            .err()
            .unwrap();
        assert!(err.is_connect(), "{err}");
    }

    #[test]
    fn the_agent_read_buffer_grows_with_bulk_and_shrinks_when_quiet() {
        let mut size = READ_MIN;
        for _ in 0..10 {
            size = next_read_size(size, size);
        }
        assert_eq!(size, READ_MAX, "full reads double up to the cap");
        assert_eq!(
            next_read_size(size, size / 2),
            size,
            "steady traffic keeps it"
        );
        assert_eq!(
            next_read_size(size, 100),
            READ_MIN,
            "a keepalive shrinks it"
        );
        assert_eq!(next_read_size(READ_MIN, 10), READ_MIN);
        assert_eq!(next_read_size(8192, 1500), 3000);
    }

    /// An established tunnel over loopback sockets: (tunnel, the agent's end, the pod's end).
    async fn tunnel_over_loopback() -> (PendingTunnel, TcpStream, TcpStream) {
        let agents = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = TcpStream::connect(agents.local_addr().unwrap())
            .await
            .unwrap();
        let (agent_at_edge, _) = agents.accept().await.unwrap();
        let pods = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pod_at_edge = TcpStream::connect(pods.local_addr().unwrap())
            .await
            .unwrap();
        let (pod, _) = pods.accept().await.unwrap();
        let tunnel = PendingTunnel {
            agent: Box::new(pingora::protocols::l4::stream::Stream::from(agent_at_edge)),
            pod: pod_at_edge,
            early: Bytes::new(),
            pre_read: Bytes::new(),
            status: 101,
        };
        (tunnel, agent, pod)
    }

    const BOUND: Duration = Duration::from_secs(10);

    /// Reads exactly `n` bytes, bounded in time.
    async fn read_n(from: &mut (impl tokio::io::AsyncRead + Unpin), n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(BOUND, from.read_exact(&mut buf))
            .await
            .expect("bytes arrive in time")
            .unwrap();
        buf
    }

    /// Reads until EOF, bounded in time.
    async fn read_to_eof(from: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
        let mut buf = Vec::new();
        tokio::time::timeout(BOUND, from.read_to_end(&mut buf))
            .await
            .expect("EOF arrives in time")
            .unwrap();
        buf
    }

    /// Writes to `to` until its writes stop completing (every buffer on the way is full);
    /// returns the task that keeps trying and the bytes it got written.
    async fn flood_until_stuck(
        mut to: impl AsyncWrite + Unpin + Send + 'static,
    ) -> (tokio::task::JoinHandle<()>, Arc<AtomicU64>) {
        let written = Arc::new(AtomicU64::new(0));
        let count = written.clone();
        let task = tokio::spawn(async move {
            let chunk = vec![0x5a; 64 * 1024];
            while let Ok(n) = to.write(&chunk).await {
                count.fetch_add(n as u64, Ordering::SeqCst);
            }
        });
        let deadline = tokio::time::Instant::now() + BOUND;
        let mut last = u64::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = written.load(Ordering::SeqCst);
            if now == last && now > 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the flood never stalled"
            );
            last = now;
        }
        (task, written)
    }

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn an_agent_that_stops_reading_still_reaches_the_pod() {
        let (tunnel, mut agent, pod) = tunnel_over_loopback().await;
        let carried = tokio::spawn(tunnel.carry(std::future::pending()));
        let (mut from_pod, to_agent) = pod.into_split();
        // The pod floods the agent, which never reads, until the edge stops taking more.
        let (flood, _) = flood_until_stuck(to_agent).await;
        agent.write_all(b"still here").await.unwrap();
        assert_eq!(read_n(&mut from_pod, 10).await, b"still here");
        flood.abort();
        carried.abort();
    }

    #[tokio::test]
    async fn a_pod_that_stops_reading_still_reaches_the_agent() {
        let (tunnel, agent, mut pod) = tunnel_over_loopback().await;
        let carried = tokio::spawn(tunnel.carry(std::future::pending()));
        let (mut from_agent, to_pod) = agent.into_split();
        let (flood, _) = flood_until_stuck(to_pod).await;
        pod.write_all(b"answer").await.unwrap();
        assert_eq!(read_n(&mut from_agent, 6).await, b"answer");
        flood.abort();
        carried.abort();
    }

    #[tokio::test]
    async fn a_peer_that_accepts_nothing_for_the_stall_limit_ends_the_tunnel() {
        let (tunnel, _agent, pod) = tunnel_over_loopback().await;
        let limits = TunnelLimits {
            write_stall: Duration::from_millis(300),
            half_closed: Duration::from_secs(30),
        };
        let carried = tokio::spawn(tunnel.carry_within(limits, std::future::pending()));
        let (_from_pod, to_agent) = pod.into_split();
        let (flood, _) = flood_until_stuck(to_agent).await;
        let outcome = tokio::time::timeout(BOUND, carried)
            .await
            .expect("a stalled agent is cut")
            .unwrap();
        assert_eq!(outcome.end, TunnelEnd::AgentError);
        assert!(outcome.bytes_out > 0);
        flood.abort();
    }

    #[tokio::test]
    async fn agent_half_close_reaches_the_pod_and_the_pods_answer_still_arrives() {
        let (mut tunnel, agent, pod) = tunnel_over_loopback().await;
        tunnel.pre_read = Bytes::from_static(b"eager ");
        tunnel.early = Bytes::from_static(b"first ");
        let carried = tokio::spawn(tunnel.carry(std::future::pending()));
        let (mut from_agent, mut to_pod) = agent.into_split();
        let (mut from_pod, mut to_agent) = pod.into_split();
        to_pod.write_all(b"request").await.unwrap();
        to_pod.shutdown().await.unwrap();
        // The pod sees the agent's bytes, then EOF: the edge passed the half-close on.
        assert_eq!(read_to_eof(&mut from_pod).await, b"eager request");
        // The other direction still works until the pod closes it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        to_agent.write_all(b"late answer").await.unwrap();
        drop(to_agent);
        assert_eq!(read_to_eof(&mut from_agent).await, b"first late answer");
        let outcome = tokio::time::timeout(BOUND, carried).await.unwrap().unwrap();
        assert_eq!(outcome.end, TunnelEnd::AgentClosed);
        assert_eq!(outcome.bytes_in, 13);
        assert_eq!(outcome.bytes_out, 17);
    }

    #[tokio::test]
    async fn pod_half_close_reaches_the_agent_and_the_agents_bytes_still_arrive() {
        let (tunnel, agent, pod) = tunnel_over_loopback().await;
        let carried = tokio::spawn(tunnel.carry(std::future::pending()));
        let (mut from_agent, mut to_pod) = agent.into_split();
        let (mut from_pod, mut to_agent) = pod.into_split();
        to_agent.write_all(b"goodbye").await.unwrap();
        to_agent.shutdown().await.unwrap();
        assert_eq!(read_to_eof(&mut from_agent).await, b"goodbye");
        to_pod.write_all(b"last words").await.unwrap();
        drop(to_pod);
        assert_eq!(read_to_eof(&mut from_pod).await, b"last words");
        let outcome = tokio::time::timeout(BOUND, carried).await.unwrap().unwrap();
        assert_eq!(outcome.end, TunnelEnd::PodClosed);
        assert_eq!((outcome.bytes_in, outcome.bytes_out), (10, 7));
    }

    #[tokio::test]
    async fn a_half_closed_tunnel_ends_at_its_limit() {
        let (tunnel, agent, _pod) = tunnel_over_loopback().await;
        let limits = TunnelLimits {
            write_stall: Duration::from_secs(30),
            half_closed: Duration::from_millis(300),
        };
        let carried = tokio::spawn(tunnel.carry_within(limits, std::future::pending()));
        let (_from_agent, mut to_pod) = agent.into_split();
        to_pod.shutdown().await.unwrap();
        // The pod never closes its side.
        let outcome = tokio::time::timeout(BOUND, carried)
            .await
            .expect("the half-closed tunnel ends at its limit")
            .unwrap();
        assert_eq!(outcome.end, TunnelEnd::AgentClosed);
    }

    #[tokio::test]
    async fn an_idle_tunnel_holds_no_pod_buffer_and_no_timer() {
        let (tunnel, mut agent, mut pod) = tunnel_over_loopback().await;
        let mut pump = Pump::new(tunnel, TunnelLimits::default());
        // Bulk both ways first, so both buffers grow.
        let bulk = vec![1u8; 256 * 1024];
        let moved = async {
            let (mut agent_read, mut agent_write) = agent.split();
            let (mut pod_read, mut pod_write) = pod.split();
            tokio::join!(
                async { pod_write.write_all(&bulk).await.unwrap() },
                async { assert_eq!(read_n(&mut agent_read, bulk.len()).await, bulk) },
                async { agent_write.write_all(&bulk).await.unwrap() },
                async { assert_eq!(read_n(&mut pod_read, bulk.len()).await, bulk) },
            );
        };
        tokio::select! {
            _ = &mut pump => panic!("the tunnel ended"),
            _ = moved => {}
        }
        assert_eq!(pump.up.carried, bulk.len() as u64);
        assert_eq!(pump.down.carried, bulk.len() as u64);
        // Then a quiet spell: a keepalive-sized message each way.
        agent.write_all(b"ping").await.unwrap();
        pod.write_all(b"pong").await.unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(300), &mut pump).await;
        assert!(quiet.is_err(), "the tunnel ended");
        assert_eq!(read_n(&mut agent, 4).await, b"pong");
        assert_eq!(read_n(&mut pod, 4).await, b"ping");
        let _ = tokio::time::timeout(Duration::from_millis(100), &mut pump).await;
        assert_eq!(
            pump.down.buf.capacity(),
            0,
            "the pod side holds no buffer when idle"
        );
        assert_eq!(pump.up.buf.len(), READ_MIN, "the agent side shrank back");
        assert!(
            pump.timer.is_none(),
            "no timer while nothing waits on a deadline"
        );
    }

    #[tokio::test]
    async fn the_edge_stopping_a_tunnel_reports_its_reason() {
        let (tunnel, _agent, _pod) = tunnel_over_loopback().await;
        let outcome = tokio::time::timeout(
            BOUND,
            tunnel.carry(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                TunnelEnd::ClosedByEdge
            }),
        )
        .await
        .unwrap();
        assert_eq!(outcome.end, TunnelEnd::ClosedByEdge);
    }

    /// An idle tunnel's task holds this future, its agent read buffer ([`READ_MIN`]) and
    /// the sockets' own state, and no pod-side buffer or timer; the future must stay small
    /// for the ~15 KiB per idle agent.
    #[tokio::test]
    async fn an_idle_tunnel_future_stays_small() {
        let (tunnel, _agent, _pod) = tunnel_over_loopback().await;
        let carry = tunnel.carry(std::future::pending());
        let size = std::mem::size_of_val(&carry);
        // 312 bytes in a debug build when written; the two-way `select!` loop before it
        // was 760.
        assert!(size <= 512, "the tunnel future grew to {size} bytes");
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_segmentation() {
        let wire = b"5\r\nhello\r\n6;name=value\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            let mut decoder = ChunkedBody::default();
            let mut raw = BytesMut::new();
            let mut body = BytesMut::new();
            let mut done = false;
            for piece in wire.chunks(step) {
                raw.extend_from_slice(piece);
                done = decoder.decode(&mut raw, &mut body).unwrap();
                if done {
                    break;
                }
            }
            assert!(done, "step {step}");
            assert_eq!(&body[..], b"hello world", "step {step}");
        }
    }

    #[test]
    fn malformed_chunking_is_an_error_not_a_panic() {
        for wire in [
            &b"zz\r\nhello\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"ffffffffffffffffffffff\r\n",
            b"-1\r\n",
        ] {
            let mut raw = BytesMut::from(wire);
            let result = ChunkedBody::default().decode(&mut raw, &mut BytesMut::new());
            assert!(result.is_err(), "{:?}", String::from_utf8_lossy(wire));
        }
        let mut endless = BytesMut::from(&b"5;"[..]);
        endless.extend_from_slice(&[b'x'; MAX_CHUNK_SIZE_LINE + 1]);
        assert!(ChunkedBody::default()
            .decode(&mut endless, &mut BytesMut::new())
            .is_err());
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut response = ResponseHeader::build(status, None).unwrap();
        for (name, value) in headers {
            response
                .append_header(name.to_string(), value.to_string())
                .unwrap();
        }
        response
    }

    #[test]
    fn refusal_framing_follows_rfc_9112() {
        use ResponseFraming::*;
        type Case<'a> = (u16, &'a [(&'a str, &'a str)], ResponseFraming);
        let cases: &[Case] = &[
            (401, &[("content-length", "5")], Length(5)),
            (401, &[("content-length", "5, 5")], Length(5)),
            (
                401,
                &[("content-length", "5"), ("content-length", "6")],
                Invalid,
            ),
            (401, &[("content-length", "+5")], Invalid),
            (
                401,
                &[("content-length", "99999999999999999999999")],
                Invalid,
            ),
            (
                401,
                &[("transfer-encoding", "chunked"), ("content-length", "5")],
                Chunked,
            ),
            (401, &[("transfer-encoding", "gzip, Chunked")], Chunked),
            (401, &[("transfer-encoding", "chunked, gzip")], UntilClose),
            (401, &[], UntilClose),
            (204, &[("content-length", "5")], NoBody),
            (304, &[], NoBody),
        ];
        for (status, headers, expected) in cases {
            assert_eq!(
                ResponseFraming::of(&response(*status, headers)),
                *expected,
                "{status} {headers:?}"
            );
        }
    }

    #[test]
    fn hop_by_hop_headers_are_not_relayed() {
        let mut head = response(
            426,
            &[
                ("Connection", "close, X-Hop"),
                ("Connection", "x-other-hop"),
                ("X-Hop", "1"),
                ("X-Other-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Transfer-Encoding", "chunked"),
                ("TE", "trailers"),
                ("Trailer", "X-Checksum"),
                ("Upgrade", "websocket"),
                ("Proxy-Authenticate", "Basic"),
                ("Proxy-Connection", "keep-alive"),
                ("Content-Length", "12"),
                ("Sec-WebSocket-Version", "13"),
                ("Content-Type", "text/plain"),
            ],
        );
        strip_hop_by_hop(&mut head);
        let mut left: Vec<&str> = head.headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "sec-websocket-version"]);
    }

    proptest::proptest! {
        #[test]
        fn chunked_decoding_never_panics(wire in proptest::collection::vec(proptest::num::u8::ANY, 0..512), step in 1usize..64) {
            let mut decoder = ChunkedBody::default();
            let mut raw = BytesMut::new();
            let mut body = BytesMut::new();
            for piece in wire.chunks(step) {
                raw.extend_from_slice(piece);
                if !matches!(decoder.decode(&mut raw, &mut body), Ok(false)) {
                    break;
                }
            }
            proptest::prop_assert!(body.len() <= wire.len());
        }

        #[test]
        fn chunked_encoding_round_trips(body in proptest::collection::vec(proptest::num::u8::ANY, 0..2048), sizes in proptest::collection::vec(1usize..300, 1..20)) {
            let mut wire = Vec::new();
            let mut rest = &body[..];
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at((*size).min(rest.len()));
                wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                wire.extend_from_slice(chunk);
                wire.extend_from_slice(b"\r\n");
                rest = tail;
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let mut raw = BytesMut::from(&wire[..]);
            let mut decoded = BytesMut::new();
            proptest::prop_assert!(ChunkedBody::default().decode(&mut raw, &mut decoded).unwrap());
            proptest::prop_assert_eq!(&decoded[..], &body[..]);
        }
    }

    #[test]
    fn oversized_or_malformed_heads_never_panic() {
        assert!(parse_response_head(b"HTTP/1.1 101 OK\r\nX: \x01\r\n\r\n").is_err());
        assert!(parse_response_head(b"HTTP/1.1 1").unwrap().is_none());
        assert!(parse_response_head(b"HTTP/1.1 101 OK\r\nBad Name: x\r\n\r\n").is_err());
    }
}
