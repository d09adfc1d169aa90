use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use pingora::http::RequestHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::http::dial::{HandshakeError, PodDialer};
use crate::http::framing::ResponseFraming;
use crate::support::duplex::tests::{read_to_eof, socket_pair, BOUND};

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
    let (addr, _task) = pod(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\nnope!").await;
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

/// An established tunnel over loopback sockets: (tunnel, the agent's end, the pod's end).
async fn tunnel_over_loopback() -> (PendingTunnel, TcpStream, TcpStream) {
    let (agent_at_edge, agent) = socket_pair().await;
    let (pod_at_edge, pod) = socket_pair().await;
    let tunnel = PendingTunnel {
        agent: Box::new(pingora::protocols::l4::stream::Stream::from(agent_at_edge)),
        pod: pod_at_edge,
        early: Bytes::new(),
        pre_read: Bytes::new(),
        status: 101,
    };
    (tunnel, agent, pod)
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

/// An idle tunnel's task holds this future, its agent read buffer (the duplex's smallest) and
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

/// The duplex's ends are named for the access log: the agent is its stream end, the pod
/// its socket end.
#[test]
fn duplex_ends_name_the_agent_and_the_pod() {
    use crate::support::duplex::{DuplexEnd, Side};
    assert_eq!(
        tunnel::tunnel_end(DuplexEnd::Closed(Side::Stream)),
        TunnelEnd::AgentClosed
    );
    assert_eq!(
        tunnel::tunnel_end(DuplexEnd::Closed(Side::Socket)),
        TunnelEnd::PodClosed
    );
    assert_eq!(
        tunnel::tunnel_end(DuplexEnd::Failed(Side::Stream)),
        TunnelEnd::AgentError
    );
    assert_eq!(
        tunnel::tunnel_end(DuplexEnd::Failed(Side::Socket)),
        TunnelEnd::PodError
    );
}
