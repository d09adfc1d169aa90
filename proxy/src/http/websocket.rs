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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::UniqueIDType;
use pingora::proxy::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

use crate::pingora_compat;

/// The largest response head a pod may send for an upgrade.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Header lines in a response head; kas sends a handful.
const MAX_RESPONSE_HEADERS: usize = 64;
/// Bytes read from a pod per tunnel read (borrowed only while data is there).
const READ_CHUNK: usize = 16 * 1024;
/// Bounds of the agent side's read buffer, which is held while the tunnel waits (TLS has
/// no readiness to wait on without one). It follows the traffic: it doubles after a read
/// that filled it and shrinks back after small reads, so an idle agent that last sent a
/// keepalive holds [`AGENT_READ_MIN`] bytes while a busy one reads in big steps. rustls
/// has already decrypted the record, so a small buffer costs copies, never syscalls.
const AGENT_READ_MIN: usize = 512;
const AGENT_READ_MAX: usize = 16 * 1024;
/// The most body relayed from a pod that refused the upgrade (an error page).
const MAX_REFUSAL_BODY: u64 = 64 * 1024;
/// After the agent closes its side, how long the pod's last bytes (a websocket close frame,
/// a GOAWAY) are still relayed before the tunnel is torn down.
const LINGER: Duration = Duration::from_secs(5);

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

/// How the edge reaches pods for tunnels.
#[derive(Clone, Debug)]
pub struct PodDialer {
    pub connect_timeout: Duration,
    /// How long a pod may take to answer the upgrade request.
    pub response_timeout: Duration,
    /// TCP keepalive idle time: finds pods that vanished under an idle tunnel.
    pub tcp_keepalive: Duration,
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

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, HandshakeError> {
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

/// The request head as the pod sees it: the agent's request line and headers, unchanged.
pub(crate) fn encode_request_head(request: &RequestHeader) -> Vec<u8> {
    let target = request
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(request.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in request.headers.iter() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Reads until a complete response head, bounded by [`MAX_RESPONSE_HEAD`].
async fn read_response_head(
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

    /// Carries bytes both ways until one side closes or `stop` (the edge closing the
    /// connection: a block, its maximum age) resolves with the reason.
    pub async fn carry(self, stop: impl Future<Output = TunnelEnd>) -> TunnelOutcome {
        let PendingTunnel {
            mut agent,
            mut pod,
            early,
            pre_read,
            status,
        } = self;
        let mut counts = Counts::default();
        let end = 'tunnel: {
            if let Err(e) = pod.write_all(&pre_read).await {
                tracing::debug!(error = %e, "writing the agent's first bytes to the pod");
                break 'tunnel TunnelEnd::PodError;
            }
            counts.to_pod += pre_read.len() as u64;
            drop(pre_read);
            let written = write_to_agent(&mut agent, &early, &mut counts).await;
            // It shares the response head's read buffer; an idle tunnel should not keep that.
            drop(early);
            if written.is_err() {
                break 'tunnel TunnelEnd::AgentError;
            }
            tokio::select! {
                end = pump(&mut agent, pod, &mut counts) => end,
                end = stop => end,
            }
        };
        TunnelOutcome {
            status,
            bytes_in: counts.to_pod,
            bytes_out: counts.to_agent,
            end,
        }
    }
}

/// Relays the pod's answer to the agent. A refusal is relayed whole; after a `101` the
/// agent's connection is taken out of pingora and returned with the pod's, ready to be
/// carried. Errors are reported in the outcome, not propagated: the response is already
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
        let body_len = refusal_body_len(&response);
        match relay_refusal(session, response, stream, early, body_len).await {
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
    let taken = match take_buffered(session).await {
        Ok(pre_read) => pingora_compat::take_h1_stream(session)
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

#[derive(Default)]
struct Counts {
    to_pod: u64,
    to_agent: u64,
}

async fn write_to_agent(
    agent: &mut pingora::protocols::Stream,
    data: &[u8],
    counts: &mut Counts,
) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    agent.write_all(data).await?;
    agent.flush().await?;
    counts.to_agent += data.len() as u64;
    Ok(())
}

/// Moves bytes both ways until one side closes. The agent side (TLS) reads into a buffer
/// sized by [`next_read_size`]; the pod side waits for readiness and only then borrows a
/// buffer, so an idle tunnel holds a few hundred bytes of buffer in all.
async fn pump(
    agent: &mut pingora::protocols::Stream,
    pod: TcpStream,
    counts: &mut Counts,
) -> TunnelEnd {
    let (mut from_pod, mut to_pod) = pod.into_split();
    let mut from_agent = vec![0u8; AGENT_READ_MIN];
    loop {
        tokio::select! {
            read = agent.read(&mut from_agent) => match read {
                Ok(0) => {
                    // The agent is done sending; let the pod's last bytes through, briefly.
                    let _ = to_pod.shutdown().await;
                    // Boxed: a rare path that would otherwise enlarge every idle tunnel.
                    let rest = copy_to_agent(agent, &mut from_pod, counts);
                    let _ = Box::pin(tokio::time::timeout(LINGER, rest)).await;
                    return TunnelEnd::AgentClosed;
                }
                Ok(n) => {
                    if let Err(e) = to_pod.write_all(&from_agent[..n]).await {
                        tracing::debug!(error = %e, "writing to the pod");
                        return TunnelEnd::PodError;
                    }
                    counts.to_pod += n as u64;
                    let size = next_read_size(from_agent.len(), n);
                    if size != from_agent.len() {
                        from_agent = vec![0u8; size];
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading from the agent");
                    return TunnelEnd::AgentError;
                }
            },
            chunk = read_chunk(&mut from_pod) => match chunk {
                Ok(Some(data)) => {
                    if let Err(e) = write_to_agent(agent, &data, counts).await {
                        tracing::debug!(error = %e, "writing to the agent");
                        return TunnelEnd::AgentError;
                    }
                }
                Ok(None) => {
                    let _ = agent.shutdown().await;
                    return TunnelEnd::PodClosed;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading from the pod");
                    let _ = agent.shutdown().await;
                    return TunnelEnd::PodError;
                }
            },
        }
    }
}

/// The agent read buffer's next size after a read of `n` bytes into `current`.
fn next_read_size(current: usize, n: usize) -> usize {
    if n == current {
        (current * 2).min(AGENT_READ_MAX)
    } else if n < current / 4 {
        (n * 2).clamp(AGENT_READ_MIN, AGENT_READ_MAX)
    } else {
        current
    }
}

/// Relays what the pod still sends until it closes (or either side errors).
async fn copy_to_agent(
    agent: &mut pingora::protocols::Stream,
    from_pod: &mut OwnedReadHalf,
    counts: &mut Counts,
) {
    while let Ok(Some(data)) = read_chunk(from_pod).await {
        if write_to_agent(agent, &data, counts).await.is_err() {
            return;
        }
    }
    let _ = agent.shutdown().await;
}

async fn relay_refusal(
    session: &mut Session,
    response: ResponseHeader,
    stream: TcpStream,
    early: Bytes,
    body_len: u64,
) -> pingora::Result<u64> {
    session
        .write_response_header(Box::new(response), false)
        .await?;
    let mut body = early;
    body.truncate(body_len as usize);
    let mut sent = body.len() as u64;
    if !body.is_empty() {
        session.write_response_body(Some(body), false).await?;
    }
    let read = async {
        let (mut reader, _writer) = stream.into_split();
        while sent < body_len {
            match read_chunk(&mut reader).await {
                Ok(Some(mut chunk)) => {
                    chunk.truncate((body_len - sent) as usize);
                    sent += chunk.len() as u64;
                    session.write_response_body(Some(chunk), false).await?;
                }
                _ => break,
            }
        }
        Ok::<_, Box<pingora::Error>>(())
    };
    // A pod that announced no length and keeps the connection open must not hold the agent.
    let _ = tokio::time::timeout(LINGER, read).await;
    session.write_response_body(None, true).await?;
    Ok(sent)
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

/// How much body of a refused upgrade is relayed: what the pod announced, capped; without
/// a length, up to the cap or until the pod closes.
fn refusal_body_len(response: &ResponseHeader) -> u64 {
    let announced = response
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    announced.unwrap_or(MAX_REFUSAL_BODY).min(MAX_REFUSAL_BODY)
}

/// Reads what the pod has next, waiting for readiness first so an idle tunnel holds no
/// buffer. `Ok(None)` at EOF.
async fn read_chunk(stream: &mut OwnedReadHalf) -> io::Result<Option<Bytes>> {
    loop {
        stream.readable().await?;
        let mut buf = BytesMut::zeroed(READ_CHUNK);
        match stream.try_read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf.freeze()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
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
        assert_eq!(refusal_body_len(&answered.response), 5);
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
        let mut size = AGENT_READ_MIN;
        for _ in 0..10 {
            size = next_read_size(size, size);
        }
        assert_eq!(size, AGENT_READ_MAX, "full reads double up to the cap");
        assert_eq!(
            next_read_size(size, size / 2),
            size,
            "steady traffic keeps it"
        );
        assert_eq!(
            next_read_size(size, 100),
            AGENT_READ_MIN,
            "a keepalive shrinks it"
        );
        assert_eq!(next_read_size(AGENT_READ_MIN, 10), AGENT_READ_MIN);
        assert_eq!(next_read_size(8192, 1500), 3000);
    }

    #[test]
    fn oversized_or_malformed_heads_never_panic() {
        assert!(parse_response_head(b"HTTP/1.1 101 OK\r\nX: \x01\r\n\r\n").is_err());
        assert!(parse_response_head(b"HTTP/1.1 1").unwrap().is_none());
        assert!(parse_response_head(b"HTTP/1.1 101 OK\r\nBad Name: x\r\n\r\n").is_err());
    }
}
