//! The upgrade handshake with a pod: the edge writes the agent's upgrade request itself
//! and reads the pod's response head, so the `101` (or the refusal) is in hand before
//! anything is relayed to the agent (why the edge does this and not pingora: see the
//! module above). Connecting this way is what [`crate::upstream::connect`] retries on
//! another pod when nothing reached the first.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::http::dial::{encode_forwarded_head, read_response_head, HandshakeError, PodDialer};
use crate::upstream::connect::Connect;
use crate::upstream::pool::Pod;
use crate::upstream::route::Route;

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

/// The upgrade request as the pod sees it: the agent's request line and end-to-end
/// headers ([`crate::http::headers`]), and this hop's own `Connection: upgrade` and the
/// agent's `Upgrade`.
pub(super) fn encode_request_head(request: &RequestHeader) -> Vec<u8> {
    let target = request
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let upgrade = request
        .headers
        .get(http::header::UPGRADE)
        .map(|v| (&b"upgrade"[..], v.as_bytes()));
    let mut head = Vec::with_capacity(256);
    encode_forwarded_head(
        &mut head,
        request.method.as_str(),
        target,
        &request.headers,
        [(&b"connection"[..], &b"upgrade"[..])]
            .into_iter()
            .chain(upgrade),
    );
    head
}
