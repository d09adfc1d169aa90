use super::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;

pub(crate) const BOUND: Duration = Duration::from_secs(10);

/// A connected loopback pair: (the duplex's socket, its peer).
pub(crate) async fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let near = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (far, _) = listener.accept().await.unwrap();
    (near, far)
}

/// An in-memory stream side, so the stream end is shown to be anything readable and
/// writable: (the duplex's stream, its peer).
pub(crate) fn stream_pair(capacity: usize) -> (DuplexStream, DuplexStream) {
    tokio::io::duplex(capacity)
}

pub(crate) async fn read_n(from: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(BOUND, from.read_exact(&mut buf))
        .await
        .expect("bytes arrive in time")
        .unwrap();
    buf
}

pub(crate) async fn read_to_eof(from: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(BOUND, from.read_to_end(&mut buf))
        .await
        .expect("EOF arrives in time")
        .unwrap();
    buf
}

/// Writes to `to` until its writes stop completing; returns the task that keeps trying.
pub(crate) async fn flood_until_stuck(
    mut to: impl AsyncWrite + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let written = Arc::new(AtomicU64::new(0));
    let count = written.clone();
    let task = tokio::spawn(async move {
        let chunk = vec![0x5a; 64 * 1024];
        while let Ok(n) = to.write(&chunk).await {
            count.fetch_add(n as u64, Ordering::SeqCst);
        }
    });
    let deadline = Instant::now() + BOUND;
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = written.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the flood never stalled");
        last = now;
    }
    task
}

#[test]
fn the_read_buffer_grows_with_bulk_and_shrinks_when_quiet() {
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

#[tokio::test]
async fn first_bytes_go_first_and_each_eof_is_passed_on() {
    let (stream, mut stream_peer) = stream_pair(1024);
    let (socket, socket_peer) = socket_pair().await;
    let duplex = Duplex::new(
        stream,
        socket,
        b"early ",
        b"first ",
        DuplexLimits::default(),
    );
    let carried = tokio::spawn(async move {
        let mut duplex = duplex;
        let end = (&mut duplex).await;
        (end, duplex.carried_to_socket(), duplex.carried_to_stream())
    });
    let (mut from_socket, mut to_socket) = socket_peer.into_split();
    stream_peer.write_all(b"request").await.unwrap();
    stream_peer.shutdown().await.unwrap();
    assert_eq!(read_to_eof(&mut from_socket).await, b"early request");
    to_socket.write_all(b"answer").await.unwrap();
    drop(to_socket);
    assert_eq!(read_to_eof(&mut stream_peer).await, b"first answer");
    let (end, to_socket_bytes, to_stream_bytes) =
        tokio::time::timeout(BOUND, carried).await.unwrap().unwrap();
    assert_eq!(end, DuplexEnd::Closed(Side::Stream));
    assert_eq!((to_socket_bytes, to_stream_bytes), (13, 12));
}

/// The peer of `stalled` stops reading while the other peer floods it: the bytes the
/// stalled peer sends still get through.
async fn one_stalled_direction_leaves_the_other_free(stalled: Side) {
    let (stream, stream_peer) = socket_pair().await;
    let (socket, socket_peer) = socket_pair().await;
    let carried = tokio::spawn(Duplex::new(
        stream,
        socket,
        b"",
        b"",
        DuplexLimits::default(),
    ));
    let (mut stalled_peer, flooding_peer) = match stalled {
        Side::Stream => (stream_peer, socket_peer),
        Side::Socket => (socket_peer, stream_peer),
    };
    let (mut from_stalled, to_stalled) = flooding_peer.into_split();
    let flood = flood_until_stuck(to_stalled).await;
    stalled_peer.write_all(b"still here").await.unwrap();
    assert_eq!(read_n(&mut from_stalled, 10).await, b"still here");
    flood.abort();
    carried.abort();
}

#[tokio::test]
async fn a_stream_that_stops_reading_still_reaches_the_socket() {
    one_stalled_direction_leaves_the_other_free(Side::Stream).await;
}

#[tokio::test]
async fn a_socket_that_stops_reading_still_reaches_the_stream() {
    one_stalled_direction_leaves_the_other_free(Side::Socket).await;
}

#[tokio::test]
async fn a_write_stalled_past_the_limit_is_the_destinations_failure() {
    // The stream's peer never reads: what the socket sends backs up towards it.
    let (stream, _stream_peer) = stream_pair(4096);
    let (socket, socket_peer) = socket_pair().await;
    let limits = DuplexLimits {
        write_stall: Duration::from_millis(300),
        half_closed: Duration::from_secs(30),
    };
    let carried = tokio::spawn(Duplex::new(stream, socket, b"", b"", limits));
    let (_from_socket, to_stream) = socket_peer.into_split();
    let flood = flood_until_stuck(to_stream).await;
    let end = tokio::time::timeout(BOUND, carried)
        .await
        .expect("a stalled stream is cut")
        .unwrap();
    assert_eq!(end, DuplexEnd::Failed(Side::Stream));
    flood.abort();
}

/// A stream whose reads fail and whose writes never complete.
struct FailingStream;

impl AsyncRead for FailingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
    }
}

impl AsyncWrite for FailingStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Pending
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

#[tokio::test]
async fn a_failed_read_is_the_sources_failure() {
    let (socket, _socket_peer) = socket_pair().await;
    let end = tokio::time::timeout(
        BOUND,
        Duplex::new(FailingStream, socket, b"", b"", DuplexLimits::default()),
    )
    .await
    .expect("a failed read ends the duplex at once");
    assert_eq!(end, DuplexEnd::Failed(Side::Stream));
}

#[tokio::test]
async fn a_half_closed_duplex_ends_at_its_limit() {
    let (stream, _stream_peer) = stream_pair(1024);
    let (socket, socket_peer) = socket_pair().await;
    let limits = DuplexLimits {
        write_stall: Duration::from_secs(30),
        half_closed: Duration::from_millis(300),
    };
    let carried = tokio::spawn(Duplex::new(stream, socket, b"", b"", limits));
    let (_from_socket, mut to_stream) = socket_peer.into_split();
    to_stream.shutdown().await.unwrap();
    // The stream's peer never closes its side.
    let end = tokio::time::timeout(BOUND, carried)
        .await
        .expect("the half-closed duplex ends at its limit")
        .unwrap();
    assert_eq!(end, DuplexEnd::Closed(Side::Socket));
}

#[tokio::test]
async fn an_idle_duplex_holds_no_socket_buffer_and_no_timer() {
    let (stream, mut stream_peer) = socket_pair().await;
    let (socket, mut socket_peer) = socket_pair().await;
    let mut duplex = Duplex::new(stream, socket, b"", b"", DuplexLimits::default());
    // Bulk both ways first, so both buffers grow.
    let bulk = vec![1u8; 256 * 1024];
    let moved = async {
        let (mut stream_read, mut stream_write) = stream_peer.split();
        let (mut socket_read, mut socket_write) = socket_peer.split();
        tokio::join!(
            async { socket_write.write_all(&bulk).await.unwrap() },
            async { assert_eq!(read_n(&mut stream_read, bulk.len()).await, bulk) },
            async { stream_write.write_all(&bulk).await.unwrap() },
            async { assert_eq!(read_n(&mut socket_read, bulk.len()).await, bulk) },
        );
    };
    tokio::select! {
        _ = &mut duplex => panic!("the duplex ended"),
        _ = moved => {}
    }
    assert_eq!(duplex.carried_to_socket(), bulk.len() as u64);
    assert_eq!(duplex.carried_to_stream(), bulk.len() as u64);
    // Then a quiet spell: a keepalive-sized message each way.
    stream_peer.write_all(b"ping").await.unwrap();
    socket_peer.write_all(b"pong").await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(300), &mut duplex).await;
    assert!(quiet.is_err(), "the duplex ended");
    assert_eq!(read_n(&mut stream_peer, 4).await, b"pong");
    assert_eq!(read_n(&mut socket_peer, 4).await, b"ping");
    let _ = tokio::time::timeout(Duration::from_millis(100), &mut duplex).await;
    assert_eq!(
        duplex.to_stream.buf.capacity(),
        0,
        "the socket side holds no buffer when idle"
    );
    assert_eq!(
        duplex.to_socket.buf.len(),
        READ_MIN,
        "the stream side shrank back"
    );
    assert!(
        duplex.timer.is_none(),
        "no timer while nothing waits on a deadline"
    );
}
