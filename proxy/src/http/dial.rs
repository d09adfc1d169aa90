//! Reaching a pod over HTTP/1.1: the TCP connection (with its deadline and keepalive), the
//! request head the edge writes and the response head it reads back, bounded. Both of the
//! edge's own HTTP/1.1 paths use it: plain requests ([`super::h1`]) and websocket upgrades
//! ([`super::websocket`]), so both fail the same way ([`HandshakeError`]) and a connect
//! failure is what lets either move to another pod.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use pingora::http::ResponseHeader;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::headers::Hop;
use crate::upstream::connect::ConnectFailure;

/// The largest response head a pod may send.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Header lines in a response head; kas sends a handful.
const MAX_RESPONSE_HEADERS: usize = 64;

/// Why talking to a pod failed before its response head was read.
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

/// How the edge reaches pods over HTTP/1.1 (websocket tunnels and plain requests).
#[derive(Clone, Debug)]
pub struct PodDialer {
    pub connect_timeout: Duration,
    /// How long a pod may take to answer the upgrade request.
    pub response_timeout: Duration,
    /// TCP keepalive idle time: finds pods that vanished under an idle tunnel.
    pub tcp_keepalive: Duration,
}

impl PodDialer {
    /// A TCP connection to `addr` within `connect_timeout`, without Nagle's delay and with
    /// keepalive probes.
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

/// Appends the head a pod gets for a forwarded request: `method target HTTP/1.1`, the
/// client's end-to-end headers (its hop-by-hop ones dropped: [`super::headers`]), this
/// hop's own `extra` headers, the blank line. Plain requests and websocket upgrades alike.
pub(super) fn encode_forwarded_head<'a>(
    out: &mut Vec<u8>,
    method: &str,
    target: &str,
    headers: &'a HeaderMap,
    extra: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) {
    let hop_by_hop = super::headers::hop_by_hop(headers, Hop::Http1);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let end_to_end = headers
        .iter()
        .filter(|(name, _)| !hop_by_hop.contains(name))
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    for (name, value) in end_to_end.chain(extra) {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Reads until a complete response head, bounded by [`MAX_RESPONSE_HEAD`]. Returns the
/// head and the bytes read past it (the body's start, or a tunnel's first bytes).
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

    #[test]
    fn oversized_or_malformed_heads_never_panic() {
        assert!(parse_response_head(b"HTTP/1.1 101 OK\r\nX: \x01\r\n\r\n").is_err());
        assert!(parse_response_head(b"HTTP/1.1 1").unwrap().is_none());
        assert!(parse_response_head(b"HTTP/1.1 101 OK\r\nBad Name: x\r\n\r\n").is_err());
    }
}
