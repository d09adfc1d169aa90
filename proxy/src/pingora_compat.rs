//! Every place the edge relies on pingora 0.9 behaviour that is not a stable API: digest
//! layout, the order of timing digests, swapping a session's stream, and how an upgrade is
//! recognised. Each function has a test that pins the behaviour to the pingora version, so
//! an upgrade fails loudly here and nowhere else.

use std::io;
use std::net::SocketAddr;
use std::os::unix::io::AsRawFd;

use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession as HttpSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use pingora::proxy::Session;
use tokio::io::AsyncWriteExt;

/// The protocol the client and the edge agreed on in the TLS handshake.
pub fn alpn_label(stream: &Stream) -> &'static str {
    match stream.selected_alpn_proto() {
        Some(pingora::protocols::ALPN::H2) => "h2",
        Some(pingora::protocols::ALPN::H1) => "http/1.1",
        Some(_) => "other",
        None => "none",
    }
}

/// The TLS handshake's duration, as pingora measured it for this connection.
pub fn tls_handshake_duration(stream: &Stream) -> Option<std::time::Duration> {
    stream
        .get_timing_digest()
        .into_iter()
        .flatten()
        .nth(1)
        .and_then(|tls| tls.establishment_duration)
}

/// The peer of the raw socket, asked of the socket itself: reading the stream's digest
/// would fix its peer address for good (a `OnceCell`) before a PROXY header can correct it.
pub fn socket_peer(stream: &L4Stream) -> Option<SocketAddr> {
    SocketDigest::from_raw_fd(stream.as_raw_fd())
        .peer_addr()
        .and_then(|a| a.as_inet())
        .copied()
}

/// The socket's cookie: an identity the kernel never reuses, unlike a descriptor number.
pub fn socket_cookie(stream: &L4Stream) -> Option<u64> {
    pingora::protocols::l4::ext::get_socket_cookie(stream.as_raw_fd()).ok()
}

/// The cookie of the socket under a connection (TLS or not), as [`socket_cookie`] saw
/// it before the handshake. A stream's id is its socket's descriptor in pingora 0.9.
pub fn connection_cookie(stream: &Stream) -> Option<u64> {
    pingora::protocols::l4::ext::get_socket_cookie(stream.id()).ok()
}

/// The cookie of the socket a request arrived on (HTTP/1 or HTTP/2).
pub fn session_cookie(session: &Session) -> Option<u64> {
    let downstream = session.as_downstream();
    match downstream.stream() {
        Some(stream) => connection_cookie(stream),
        None => downstream
            .digest()?
            .socket_digest
            .as_ref()?
            .socket_cookie()
            .ok(),
    }
}

/// Runs `closed` when pingora drops the connection's socket, whatever the reason: pingora
/// reports nothing when a TLS handshake fails, it just drops the stream. The hook is the
/// L4 stream's `tracer` (meant for upstream connections), whose `on_disconnected` its
/// `Drop` calls before the descriptor closes, so the peer sees the close only after
/// `closed` ran. Replaces any tracer the stream had (pingora sets none on accepted
/// connections).
pub fn on_socket_dropped(stream: &mut L4Stream, closed: impl Fn() + Send + Sync + 'static) {
    stream.tracer = Some(pingora::upstreams::peer::Tracer(Box::new(DropHook(
        std::sync::Arc::new(closed),
    ))));
}

#[derive(Clone)]
struct DropHook(std::sync::Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for DropHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DropHook")
    }
}

impl pingora::upstreams::peer::Tracing for DropHook {
    fn on_connected(&self) {}

    fn on_disconnected(&self) {
        (self.0)()
    }

    fn boxed_clone(&self) -> Box<dyn pingora::upstreams::peer::Tracing> {
        Box::new(self.clone())
    }
}

/// The descriptor of a stream pingora owns, for [`shutdown_socket`] later.
pub fn raw_fd(stream: &L4Stream) -> std::os::unix::io::RawFd {
    stream.as_raw_fd()
}

/// Whether descriptor `fd` still is the socket with `cookie` (not closed, not reused).
fn is_same_socket(fd: std::os::unix::io::RawFd, cookie: u64) -> bool {
    pingora::protocols::l4::ext::get_socket_cookie(fd).ok() == Some(cookie)
}

/// Shuts down both directions of the socket on descriptor `fd` if it still is the socket
/// with `cookie`, which makes whoever waits on it (pingora's handshake) fail at once. The
/// descriptor is pingora's: it may have been closed, and its number reused, since; the
/// cookie check makes sure another connection is never touched.
pub fn shutdown_socket(fd: std::os::unix::io::RawFd, cookie: u64) {
    if !is_same_socket(fd, cookie) {
        return;
    }
    // SAFETY: `fd` is only borrowed for this call, and the cookie check above shows it is
    // (still) an open socket; shutting down a socket closes no descriptor.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
}

/// Records `client` as the stream's peer (the real client behind a PROXY header): a fresh
/// socket digest whose peer address is set before anyone reads it.
pub fn set_client_addr(stream: &mut L4Stream, client: SocketAddr) {
    let real = SocketDigest::from_raw_fd(stream.as_raw_fd());
    let _ = real
        .peer_addr
        .set(Some(pingora::protocols::l4::socket::SocketAddr::Inet(
            client,
        )));
    stream.set_socket_digest(real);
}

/// Whether the agent's session accepts `response` as a completed upgrade: a `101` that is
/// not one (HTTP/1.0, or an agent that never asked) must not start a tunnel.
pub fn completes_upgrade(session: &Session, response: &ResponseHeader) -> bool {
    match session.as_downstream() {
        HttpSession::H1(h1) => h1.is_upgrade(response) == Some(true),
        _ => false,
    }
}

/// Takes the agent's connection out of its pingora session, leaving a stand-in session in
/// its place that holds the same request head (`head`, the session's request head as
/// bytes) and no connection.
///
/// Why: pingora has no API to hand an upgraded connection over, and reading the tunnel
/// through the session keeps a 64 KiB body buffer per tunnel for as long as it is idle,
/// which for tens of thousands of mostly idle agents is most of the edge's memory. The
/// stand-in keeps pingora's bookkeeping after `request_filter` working (its `finish` sees
/// no keep-alive and returns nothing to reuse); the access log takes its numbers from
/// `TunnelOutcome`.
///
/// Bytes the agent sent before receiving the `101` (a websocket client must not, RFC 6455
/// 4.1, but an eager one might) are taken out first by `http::websocket::take_buffered`.
pub async fn take_h1_stream(
    session: &mut Session,
    head: &[u8],
) -> io::Result<pingora::protocols::Stream> {
    if !matches!(session.as_downstream(), HttpSession::H1(_)) {
        return Err(io::Error::other("not an HTTP/1.1 session"));
    }
    let (stand_in_io, mut feed) = tokio::io::duplex(head.len());
    feed.write_all(head).await?;
    drop(feed);
    let mut stand_in = HttpSession::new_http1(Box::new(stand_in_io));
    match stand_in.read_request().await {
        Ok(true) => {}
        Ok(false) => return Err(io::Error::other("stand-in session read no request")),
        Err(e) => return Err(io::Error::other(e.to_string())),
    }
    stand_in.set_keepalive(None);
    match std::mem::replace(session.downstream_session.as_mut(), stand_in) {
        HttpSession::H1(agent) => Ok(agent.into_inner()),
        _ => unreachable!("checked above that the session is HTTP/1"),
    }
}

/// A connection with bytes already read off it put back in front, for pingora's HTTP/1
/// session to read first: how the edge's own HTTP/1 server ([`crate::http::h1`]) hands a
/// connection to pingora after reading a request it leaves to pingora (a websocket
/// upgrade, anything unusual). Everything else is the connection's own: its id (socket),
/// TLS state and digests.
#[derive(Debug)]
pub struct Replayed {
    prefix: bytes::Bytes,
    inner: Stream,
}

impl Replayed {
    /// `inner` with `prefix` in front, as a connection pingora can serve.
    pub fn stream(prefix: bytes::Bytes, inner: Stream) -> Stream {
        Box::new(Self { prefix, inner })
    }
}

impl tokio::io::AsyncRead for Replayed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        let head = self.prefix.split_to(n);
        buf.put_slice(&head);
        if self.prefix.is_empty() {
            // An empty slice still holds the whole buffer it came from; a tunnel lives
            // for hours.
            self.prefix = bytes::Bytes::new();
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Replayed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait::async_trait]
impl pingora::protocols::Shutdown for Replayed {
    async fn shutdown(&mut self) {
        pingora::protocols::Shutdown::shutdown(self.inner.as_mut()).await
    }
}

impl pingora::protocols::UniqueID for Replayed {
    fn id(&self) -> pingora::protocols::UniqueIDType {
        self.inner.id()
    }
}

impl pingora::protocols::Ssl for Replayed {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<std::sync::Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl pingora::protocols::GetTimingDigest for Replayed {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> std::time::Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> std::time::Duration {
        self.inner.get_write_pending_time()
    }
}

impl pingora::protocols::GetProxyDigest for Replayed {
    fn get_proxy_digest(
        &self,
    ) -> Option<std::sync::Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Replayed {
    fn get_socket_digest(&self) -> Option<std::sync::Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait::async_trait]
impl pingora::protocols::Peek for Replayed {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if self.prefix.is_empty() {
            self.inner.try_peek(buf).await
        } else {
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// The pingora version these adapters were written and tested against.
    const PINGORA_VERSION: &str = "0.9.1";

    /// A connected pair over loopback: (accepted side as pingora's L4 stream, client side).
    async fn pair() -> (L4Stream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (L4Stream::from(accepted), client)
    }

    #[test]
    fn written_for_the_pingora_in_cargo_lock() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
        let expected = format!("name = \"pingora-core\"\nversion = \"{PINGORA_VERSION}\"");
        assert!(
            lock.contains(&expected),
            "pingora changed: re-check every adapter in pingora_compat.rs, then its version"
        );
    }

    #[tokio::test]
    async fn a_dropped_socket_runs_its_hook_before_the_peer_sees_the_close() {
        let (mut stream, mut client) = pair().await;
        let ran = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = ran.clone();
        on_socket_dropped(&mut stream, move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        // What pingora does with a connection whose TLS handshake failed.
        let tls: Stream = Box::new(stream);
        drop(tls);
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the close reaches the peer");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn client_address_set_before_tls_is_the_one_the_connection_reports() {
        let (mut stream, client) = pair().await;
        assert_eq!(socket_peer(&stream), Some(client.local_addr().unwrap()));
        let real: SocketAddr = "203.0.113.9:4711".parse().unwrap();
        set_client_addr(&mut stream, real);
        let stream: Stream = Box::new(stream);
        // What `Session::client_addr` and the access log read.
        let recorded = stream.get_socket_digest().unwrap().peer_addr().cloned();
        assert_eq!(recorded.and_then(|a| a.as_inet().copied()), Some(real));
        assert_eq!(alpn_label(&stream), "none");
    }

    #[tokio::test]
    async fn a_replayed_connection_reads_its_prefix_first_and_keeps_its_identity() {
        let (stream, mut client) = pair().await;
        let plain: Stream = Box::new(stream);
        let id = plain.id();
        let mut replayed =
            Replayed::stream(bytes::Bytes::from_static(b"GET / HTTP/1.1\r\n"), plain);
        assert_eq!(
            replayed.id(),
            id,
            "the same socket, for cookies and digests"
        );
        client.write_all(b"host: x\r\n\r\n").await.unwrap();
        let mut got = vec![0u8; 27];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            replayed.read_exact(&mut got),
        )
        .await
        .expect("prefix and socket bytes within the deadline")
        .unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
        replayed.write_all(b"ok").await.unwrap();
        let mut answer = [0u8; 2];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"ok");
    }

    #[tokio::test]
    async fn tls_handshake_duration_is_the_second_timing_digest() {
        let (stream, client) = pair().await;
        let plain: Stream = Box::new(stream);
        assert_eq!(tls_handshake_duration(&plain), None, "no TLS, no duration");
        let plain = *plain.into_any().downcast::<L4Stream>().unwrap();

        // A certificate of its own: this module depends on no layer of the edge.
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = issued.cert.der().clone();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(issued.signing_key.serialize_der().into());
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = pingora::listeners::tls::Acceptor::from_server_config(Arc::new(server));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let connector = kas_testkit::clients::tls_connector_trusting(roots, &[b"h2"]);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (server, client) = tokio::join!(
            acceptor.tls_handshake(plain),
            connector.connect(name, client)
        );
        client.unwrap();
        let tls: Stream = Box::new(server.unwrap());
        assert!(tls_handshake_duration(&tls).is_some());
        assert_eq!(alpn_label(&tls), "h2");
    }

    #[tokio::test]
    async fn h1_stream_taken_out_of_its_session_keeps_flowing_and_completes_an_upgrade() {
        let (stream, mut client) = pair().await;
        client
            .write_all(
                b"GET /agent HTTP/1.1\r\nHost: kas\r\nConnection: Upgrade\r\n\
                  Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            )
            .await
            .unwrap();
        let mut session = Session::new_h1(Box::new(stream));
        assert!(session.read_request().await.unwrap());

        let mut switching = ResponseHeader::build(101, None).unwrap();
        switching.insert_header("Upgrade", "websocket").unwrap();
        switching.insert_header("Connection", "Upgrade").unwrap();
        assert!(completes_upgrade(&session, &switching));
        let ok = ResponseHeader::build(200, None).unwrap();
        assert!(!completes_upgrade(&session, &ok));

        let head = b"GET /agent HTTP/1.1\r\nHost: kas\r\n\r\n";
        let mut agent = take_h1_stream(&mut session, head).await.unwrap();
        // The stand-in left behind still describes the request for pingora's bookkeeping.
        assert_eq!(session.req_header().uri.path(), "/agent");
        agent.write_all(b"from the edge").await.unwrap();
        agent.flush().await.unwrap();
        let mut got = [0u8; 13];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"from the edge");
    }

    #[tokio::test]
    async fn a_socket_is_shut_down_only_while_its_cookie_matches() {
        let (stream, mut client) = pair().await;
        let cookie = socket_cookie(&stream).unwrap();
        let stream: Stream = Box::new(stream);
        assert_eq!(connection_cookie(&stream), Some(cookie));
        let stream = *stream.into_any().downcast::<L4Stream>().unwrap();
        let fd = raw_fd(&stream);
        shutdown_socket(fd, cookie.wrapping_add(1));
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        let mut server = stream;
        server.read_exact(&mut one).await.unwrap();
        // The right cookie: the peer sees its connection end.
        shutdown_socket(fd, cookie);
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the shutdown reaches the peer")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
