//! Connection-level behaviour of the agent port over real sockets: kas's own maximum
//! connection age and the websocket message limits.

mod common;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{SinkExt, Stream, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tonic::transport::{Endpoint, Uri};

use common::{with_token, Harness, TOKEN};
use tokio::time::Instant;
use tonic::transport::Channel;

use kas_proto::agent_configuration::agent_configuration_client::AgentConfigurationClient;
use kas_proto::agent_configuration::ConfigurationRequest;
use kas_proto::agent_registrar::agent_registrar_client::AgentRegistrarClient;
use kas_proto::agent_registrar::RegisterRequest;
use kas_proto::reverse_tunnel::connect_request::Msg;
use kas_proto::reverse_tunnel::reverse_tunnel_client::ReverseTunnelClient;
use kas_proto::reverse_tunnel::{ConnectRequest, ConnectResponse, Descriptor};

/// Upper bound on any single wait in these tests.
const STEP: Duration = Duration::from_secs(10);

/// Opens a reverse tunnel and sends its descriptor: the stream kas parks. The sender is
/// returned so the agent side stays open.
async fn park_tunnel(
    channel: Channel,
) -> (
    tokio::sync::mpsc::Sender<ConnectRequest>,
    tonic::Streaming<ConnectResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ConnectRequest {
        msg: Some(Msg::Descriptor(Descriptor {
            agent_descriptor: Some(kas::tunnel::kubernetes_api_descriptor()),
        })),
    })
    .await
    .expect("descriptor queued");
    let inbound = ReverseTunnelClient::new(channel)
        .connect(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            TOKEN,
        ))
        .await
        .expect("tunnel accepted")
        .into_inner();
    (tx, inbound)
}

/// Waits for a parked stream to end and insists that it ended with OK (end of stream, no
/// error status) and without any message.
async fn ends_with_ok<T: std::fmt::Debug>(stream: &mut tonic::Streaming<T>, what: &str) {
    match tokio::time::timeout(STEP, stream.message()).await {
        Err(_) => panic!("{what}: still open after {STEP:?}"),
        Ok(Ok(None)) => {}
        Ok(Ok(Some(m))) => panic!("{what}: unexpected message {m:?}"),
        Ok(Err(status)) => panic!("{what}: ended with an error instead of OK: {status:?}"),
    }
}

async fn register(channel: Channel) -> Result<(), tonic::Status> {
    AgentRegistrarClient::new(channel)
        .register(with_token(RegisterRequest::default(), TOKEN))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn an_aged_connection_ends_its_parked_streams_with_ok_and_the_agent_reconnects() {
    let age = Duration::from_secs(2);
    let kas = Harness::start_with(|c| c.agent.max_connection_age = age).await;
    let started = Instant::now();
    let (h2c, ws) = (kas.h2c_channel().await, kas.ws_channel().await);

    // One agent over h2c holding its configuration stream, one over a websocket holding
    // a reverse tunnel.
    let mut config = AgentConfigurationClient::new(h2c.clone())
        .get_configuration(with_token(ConfigurationRequest::default(), TOKEN))
        .await
        .expect("GetConfiguration accepted")
        .into_inner();
    let first = tokio::time::timeout(STEP, config.message())
        .await
        .expect("configuration in time")
        .expect("configuration stream healthy")
        .expect("a configuration");
    assert!(!first.commit_id.is_empty());
    let (_agent_side, mut tunnel) = park_tunnel(ws.clone()).await;

    ends_with_ok(&mut config, "configuration stream").await;
    ends_with_ok(&mut tunnel, "reverse tunnel").await;
    let ended = started.elapsed();
    // Not before the earliest point of the spread, and not long after the age.
    assert!(
        ended >= age.mul_f64(0.8),
        "streams ended after {ended:?}, before 80 % of the {age:?} age"
    );
    assert!(
        ended < age + Duration::from_secs(3),
        "streams ended only after {ended:?}"
    );

    // The same clients carry on: their old connections sent GOAWAY, so these calls go
    // over new connections (a GOAWAY'd connection accepts no new stream).
    register(h2c.clone()).await.expect("h2c agent reconnects");
    register(ws.clone())
        .await
        .expect("websocket agent reconnects");
    let mut again = AgentConfigurationClient::new(h2c)
        .get_configuration(with_token(
            ConfigurationRequest {
                commit_id: first.commit_id.clone(),
                ..Default::default()
            },
            TOKEN,
        ))
        .await
        .expect("a new configuration stream on the new connection")
        .into_inner();
    // Resumed with the commit it has: parked, nothing resent, until that connection ages too.
    ends_with_ok(&mut again, "resumed configuration stream").await;
    let (_agent_side2, mut tunnel2) = park_tunnel(kas.ws_channel().await).await;
    ends_with_ok(&mut tunnel2, "tunnel on a fresh websocket").await;
}

#[tokio::test]
async fn connection_ages_are_spread_so_agents_do_not_reconnect_together() {
    let age = Duration::from_secs(1);
    let kas = Harness::start_with(|c| c.agent.max_connection_age = age).await;
    let started = Instant::now();
    let mut tunnels = Vec::new();
    for _ in 0..8 {
        tunnels.push(park_tunnel(kas.ws_channel().await).await);
    }
    let opened = started.elapsed();
    let ends = futures_util::future::join_all(tunnels.iter_mut().map(|(_, t)| async {
        ends_with_ok(t, "reverse tunnel").await;
        started.elapsed()
    }))
    .await;
    let first = ends.iter().min().copied().unwrap_or_default();
    let last = ends.iter().max().copied().unwrap_or_default();
    assert!(
        first >= age.mul_f64(0.8),
        "a tunnel ended after {first:?}, before 80 % of the {age:?} age"
    );
    assert!(
        last <= opened + age + Duration::from_secs(1),
        "a tunnel outlived its age: {last:?}"
    );
    // Eight draws from a 200 ms window: all within 30 ms of each other has a chance of
    // about 1 in 70,000; without the spread they would all end within a few ms.
    assert!(
        last - first >= Duration::from_millis(30),
        "all tunnels ended within {:?} of each other: {ends:?}",
        last - first
    );
}

// ---- websocket message limit before authentication ----

/// kas's default limit before the first authenticated call is 64 KiB; this is above it
/// and far below the 10 MiB that applies afterwards.
const BIG_MESSAGE: usize = 100 * 1024;

/// One websocket message of valid HTTP/2 that needs no answer: connection-level
/// WINDOW_UPDATE frames (increment 1) adding up to at least `size` bytes.
fn window_updates(size: usize) -> Vec<u8> {
    const FRAME: [u8; 13] = [0, 0, 4, 0x8, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    FRAME
        .iter()
        .copied()
        .cycle()
        .take(size.div_ceil(13) * 13)
        .collect()
}

async fn ws_connect(addr: SocketAddr) -> WebSocketStream<TcpStream> {
    let tcp = kas_testkit::clients::tcp_connect(addr, None)
        .await
        .expect("connect to kas");
    let mut request = format!("ws://{addr}/")
        .into_client_request()
        .expect("a websocket request");
    request.headers_mut().insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::HeaderValue::from_static(kas::transport::wstunnel::SUBPROTOCOL),
    );
    tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("websocket handshake")
        .0
}

/// The client side of a tunnel the test can add raw messages to: each HTTP/2 write of
/// the gRPC client is one binary message (as agentk's transport does), and messages
/// `inject`ed go out between them, at HTTP/2 frame boundaries.
struct TunnelIo {
    out: mpsc::UnboundedSender<Vec<u8>>,
    incoming: futures_util::stream::SplitStream<WebSocketStream<TcpStream>>,
    pending: Bytes,
    closed: watch::Sender<bool>,
}

/// What the test keeps of one tunnel.
struct TunnelHandle {
    inject: mpsc::UnboundedSender<Vec<u8>>,
    closed: watch::Receiver<bool>,
}

impl TunnelHandle {
    /// True once kas closed the tunnel, false if it is still open after `wait`.
    async fn closed_within(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.closed.wait_for(|c| *c))
            .await
            .is_ok()
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.incoming).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Close(_))) | None => {
                    self.closed.send_replace(true);
                    return Poll::Ready(Ok(()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    self.closed.send_replace(true);
                    return Poll::Ready(Err(io::Error::other(e)));
                }
            }
        }
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.out.send(buf.to_vec()) {
            Ok(()) => Poll::Ready(Ok(buf.len())),
            Err(_) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A gRPC channel over [`TunnelIo`] tunnels; every tunnel it opens lands in the list.
async fn injectable_channel(addr: SocketAddr) -> (Channel, Arc<Mutex<Vec<TunnelHandle>>>) {
    let tunnels = Arc::new(Mutex::new(Vec::new()));
    let list = tunnels.clone();
    let channel = Endpoint::from_static("http://kas.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let list = list.clone();
            async move {
                let (mut sink, incoming) = ws_connect(addr).await.split();
                let (out, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
                tokio::spawn(async move {
                    while let Some(bytes) = rx.recv().await {
                        if sink.send(Message::Binary(bytes.into())).await.is_err() {
                            break;
                        }
                    }
                });
                let (closed, closed_rx) = watch::channel(false);
                list.lock().expect("tunnel list").push(TunnelHandle {
                    inject: out.clone(),
                    closed: closed_rx,
                });
                Ok::<_, io::Error>(TokioIo::new(TunnelIo {
                    out,
                    incoming,
                    pending: Bytes::new(),
                    closed,
                }))
            }
        }))
        .await
        .expect("tunnel channel");
    (channel, tunnels)
}

fn only_tunnel(tunnels: &Arc<Mutex<Vec<TunnelHandle>>>) -> TunnelHandle {
    let list = tunnels.lock().expect("tunnel list");
    assert_eq!(list.len(), 1, "the channel opened {} tunnels", list.len());
    TunnelHandle {
        inject: list[0].inject.clone(),
        closed: list[0].closed.clone(),
    }
}

#[tokio::test]
async fn an_oversized_first_message_on_a_fresh_tunnel_closes_it() {
    let kas = Harness::start().await;
    let mut ws = ws_connect(kas.agent_addr).await;
    // Valid HTTP/2 from the first byte (preface, SETTINGS, then WINDOW_UPDATEs), one
    // message: without the limit kas would answer and keep the tunnel open.
    let mut first = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    first.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    first.extend(window_updates(BIG_MESSAGE));
    ws.send(Message::Binary(first.into())).await.expect("sent");
    let closed = tokio::time::timeout(STEP, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "kas kept a tunnel open after a {BIG_MESSAGE}-byte first message"
    );

    // The same size split into messages under the limit is ordinary traffic.
    let mut ws = ws_connect(kas.agent_addr).await;
    ws.send(Message::Binary(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0"[..].into(),
    ))
    .await
    .expect("sent");
    for _ in 0..BIG_MESSAGE / (16 * 1024) {
        ws.send(Message::Binary(window_updates(16 * 1024).into()))
            .await
            .expect("sent");
    }
    let got_settings = tokio::time::timeout(STEP, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) if b.get(3) == Some(&0x4) => return true,
                Some(Ok(_)) => {}
                _ => return false,
            }
        }
    })
    .await;
    assert_eq!(
        got_settings.ok(),
        Some(true),
        "kas did not speak HTTP/2 back"
    );
}

#[tokio::test]
async fn the_full_message_size_applies_only_after_an_authenticated_call() {
    let kas = Harness::start().await;

    // A refused call does not lift the limit.
    let (refused_channel, tunnels) = injectable_channel(kas.agent_addr).await;
    let status = AgentRegistrarClient::new(refused_channel.clone())
        .register(with_token(RegisterRequest::default(), "glagent-wrong"))
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let mut tunnel = only_tunnel(&tunnels);
    tunnel
        .inject
        .send(window_updates(BIG_MESSAGE))
        .expect("injected");
    assert!(
        tunnel.closed_within(STEP).await,
        "an unauthenticated tunnel accepted a {BIG_MESSAGE}-byte message"
    );
    // (The channel is held until here: dropping it would close the tunnel by itself.)
    drop(refused_channel);

    // After a call GitLab accepts, the same message passes and the tunnel carries on.
    let (channel, tunnels) = injectable_channel(kas.agent_addr).await;
    register(channel.clone()).await.expect("authenticated call");
    let mut tunnel = only_tunnel(&tunnels);
    tunnel
        .inject
        .send(window_updates(BIG_MESSAGE))
        .expect("injected");
    register(channel.clone())
        .await
        .expect("a call after the big message");
    assert!(
        !tunnel.closed_within(Duration::from_millis(300)).await,
        "kas closed an authenticated tunnel over a {BIG_MESSAGE}-byte message"
    );
    // Still the same tunnel: the second call did not need a new one.
    only_tunnel(&tunnels);
    drop(channel);
}
