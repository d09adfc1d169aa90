//! The attack suite: what a hostile client does to each stage of a connection, over real
//! sockets against the real `kas-edge` binary. Each stage has a deadline, handshakes count
//! against limits, and a blocklist edit reaches connections still in their handshake;
//! established tunnels and streams outlive every one of those deadlines.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_stream::wrappers::ReceiverStream;

/// Short deadlines, so the suite observes every one of them in seconds.
const SHORT: &str = "[downstream]\nhandshake_timeout = \"1s\"\nrequest_head_timeout = \"1s\"\n\
                     keepalive_timeout = \"1s\"\nh2_idle_timeout = \"1s\"\n";

async fn tcp_from(source: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Waits (bounded by `within`) for the peer to end the connection; returns how long it took.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + within).into(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("still open after {within:?}"),
        }
    }
}

/// True if the edge ended the connection at once (refused it), false if it stays open.
async fn refused_at_once(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn connections_that_never_send_a_client_hello_end_at_the_handshake_deadline() {
    let cluster = Cluster::start(1).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), SHORT).await;
    let attacker = ip(cluster.subnet, 101);
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(tcp_from(attacker, edge.https).await);
    }
    for stream in &mut silent {
        // pingora alone would hold each for 60 s.
        closed_within(stream, Duration::from_secs(10)).await;
    }
    let metrics = edge.metrics().await;
    assert!(
        metric(&metrics, "edge_timeouts_total{stage=\"tls_handshake\"}") >= 40.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "edge_connections_in_handshake "), 0.0);
    // The edge still serves others.
    let channel = edge.grpc_channel().await;
    let reply = DiagnosticsClient::new(channel)
        .ping(with_token(PingRequest::default()))
        .await;
    assert!(reply.is_ok(), "{reply:?}");
}

#[tokio::test]
async fn handshakes_count_against_per_client_and_global_caps() {
    let cluster = Cluster::start(1).await;
    let extra = "[downstream]\nhandshake_timeout = \"30s\"\nmax_handshakes = 8\n\
                 max_handshakes_per_client = 5\n";
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), extra).await;
    let (a, b, c) = (
        ip(cluster.subnet, 111),
        ip(cluster.subnet, 112),
        ip(cluster.subnet, 113),
    );
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut s = tcp_from(a, edge.https).await;
        assert!(!refused_at_once(&mut s).await, "within the per-client cap");
        held.push(s);
    }
    let mut sixth = tcp_from(a, edge.https).await;
    assert!(refused_at_once(&mut sixth).await, "over the per-client cap");
    for _ in 0..3 {
        let mut s = tcp_from(b, edge.https).await;
        assert!(!refused_at_once(&mut s).await, "within the global cap");
        held.push(s);
    }
    let mut ninth = tcp_from(c, edge.https).await;
    assert!(refused_at_once(&mut ninth).await, "over the global cap");
    let metrics = edge.metrics().await;
    assert_eq!(metric(&metrics, "edge_connections_in_handshake "), 8.0);
    assert_eq!(
        metric(&metrics, "edge_connections_in_handshake_limit "),
        8.0
    );
    assert!(
        metric(
            &metrics,
            "edge_policy_blocked_total{reason=\"client_handshakes_in_progress\""
        ) >= 1.0
    );
    assert!(
        metric(
            &metrics,
            "edge_policy_blocked_total{reason=\"handshakes_in_progress\""
        ) >= 1.0
    );
    // Freed slots are usable again.
    drop(held);
    eventually("handshake slots freed", STEP, || async {
        metric(&edge.metrics().await, "edge_connections_in_handshake ") == 0.0
    })
    .await;
    let tls = tls_connect(edge.https, &edge.tls_client(&[b"h2"]), Some(c)).await;
    assert!(tls.is_ok(), "{tls:?}");
}

/// A reconnect storm is not an attack: 200 agents' TLS handshakes at once against a cap of
/// 8 in progress all complete. The connections over the cap wait for a slot while
/// handshakes keep completing (the table moves); refusing them, as the edge once did, cost
/// 3 % of a 5,000-agent storm in `loadtest/bench.sh` for nothing.
#[tokio::test]
async fn a_reconnect_storm_over_the_handshake_cap_waits_for_slots_instead_of_being_refused() {
    let cluster = Cluster::start(1).await;
    let extra = "[downstream]\nmax_handshakes = 8\n";
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), extra).await;
    let tls = edge.tls_client(&[b"h2"]);
    let https = edge.https;
    let storm = (0..200u8).map(|i| {
        let tls = tls.clone();
        // 10 agents per address, within the per-client cap of 64.
        let source = ip(cluster.subnet, 140 + i % 20);
        async move { tokio::time::timeout(STEP, tls_connect(https, &tls, Some(source))).await }
    });
    let outcomes = futures_util::future::join_all(storm).await;
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match o {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("no handshake within 15 s".to_owned()),
        })
        .collect();
    let metrics = edge.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "edge_policy_blocked_total{reason=\"handshakes_in_progress\""
        ),
        0.0,
        "{} of 200 failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert!(
        failed.is_empty(),
        "{} of 200 failed: {failed:?}",
        failed.len()
    );
    assert_eq!(
        metric(&metrics, "edge_connections_queued_for_handshake "),
        0.0
    );
}

/// A handshake that fails gives its client's slot back as it fails: one address sends 200
/// garbage handshakes one after another, each closed by the edge before the next starts,
/// and its next real connection is served at once (behind a NAT, one broken client must
/// not lock out the agents that share its address).
#[tokio::test]
async fn a_failed_handshake_frees_its_clients_slot_when_it_fails() {
    let cluster = Cluster::start(1).await;
    let extra = "[downstream]\nmax_handshakes_per_client = 8\n";
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), extra).await;
    let client = ip(cluster.subnet, 131);
    for i in 0..200 {
        let mut garbage = tcp_from(client, edge.https).await;
        // Not a ClientHello: the TLS handshake fails at once.
        let _ = garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(STEP, garbage.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("garbage handshake {i} was not closed"),
            }
        }
    }
    let tls = tls_connect(edge.https, &edge.tls_client(&[b"h2"]), Some(client)).await;
    assert!(tls.is_ok(), "the next real connection was refused: {tls:?}");
    let metrics = edge.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "edge_policy_blocked_total{reason=\"client_handshakes_in_progress\""
        ),
        0.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn http1_head_and_keepalive_have_total_deadlines() {
    let cluster = Cluster::start(1).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), SHORT).await;
    let tls = edge.tls_client(&[b"http/1.1"]);

    // Silent after the handshake.
    let mut silent = tls_connect(edge.https, &tls, None).await.unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_millis(900),
        "not before the deadline: {took:?}"
    );

    // A head dribbled one byte at a time: every read is quick, the head never completes.
    let mut dribble = tls_connect(edge.https, &tls, None).await.unwrap();
    dribble
        .write_all(b"GET /slow HTTP/1.1\r\nHost: kas\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut cut = false;
    for _ in 0..40 {
        if dribble.write_all(b"X").await.is_err() || dribble.flush().await.is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), dribble.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            _ => {}
        }
    }
    assert!(cut, "a dribbled head was not cut");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Idle after a complete request: cut at the keep-alive deadline.
    let mut idle = tls_connect(edge.https, &tls, None).await.unwrap();
    idle.write_all(b"GET /readiness HTTP/1.1\r\nHost: kas\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.unwrap();
    assert!(head.starts_with(b"HTTP/1.1 "), "{head:?}");
    let took = closed_within(&mut idle, Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_millis(800),
        "kept alive until the deadline: {took:?}"
    );

    // Counted before the socket closes; `eventually` only absorbs a slow scrape.
    for (stage, at_least) in [("request_head", 2.0), ("keepalive", 1.0)] {
        let admin = edge.admin;
        let wanted = format!("edge_timeouts_total{{stage=\"{stage}\"}}");
        eventually(&wanted.clone(), STEP, || {
            let wanted = wanted.clone();
            async move {
                let metrics = http_get(admin, "/metrics").await.map(|(_, m)| m);
                metric(&metrics.unwrap_or_default(), &wanted) >= at_least
            }
        })
        .await;
    }
}

#[tokio::test]
async fn an_http2_connection_without_streams_ends_but_held_streams_and_tunnels_live_on() {
    let cluster = Cluster::start(1).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), SHORT).await;

    // HTTP/2 with no stream ever opened.
    let tls = tls_connect(edge.https, &edge.tls_client(&[b"h2"]), None)
        .await
        .unwrap();
    let (_sender, connection) = hyper::client::conn::http2::handshake::<
        _,
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(TokioExecutor::new(), TokioIo::new(tls))
    .await
    .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(
        ended.is_ok(),
        "an HTTP/2 connection without streams stayed open"
    );

    // A gRPC stream and a websocket tunnel, each idle for several deadlines.
    for channel in [edge.grpc_channel().await, edge.ws_channel().await.unwrap()] {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut replies = DiagnosticsClient::new(channel)
            .echo(with_token(ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        tokio::time::sleep(Duration::from_secs(4)).await;
        tx.send(PingRequest {
            payload: b"still here".to_vec(),
        })
        .await
        .unwrap();
        let reply = tokio::time::timeout(STEP, replies.message()).await;
        assert!(
            matches!(&reply, Ok(Ok(Some(r))) if r.payload == b"still here"),
            "{reply:?}"
        );
    }
}

#[tokio::test]
async fn a_blocklist_edit_reaches_connections_still_in_their_handshake() {
    let cluster = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let blocklist = dir.path().join("blocklist.txt");
    std::fs::write(&blocklist, "# empty\n").unwrap();
    let extra = format!(
        "[downstream]\nhandshake_timeout = \"60s\"\n[policies]\nblocklist = {blocklist:?}\n"
    );
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), &extra).await;
    let attacker = ip(cluster.subnet, 121);
    let mut in_handshake = tcp_from(attacker, edge.https).await;
    assert!(!refused_at_once(&mut in_handshake).await);
    eventually("registered in its handshake", STEP, || async {
        metric(&edge.metrics().await, "edge_connections_in_handshake ") == 1.0
    })
    .await;

    std::fs::write(&blocklist, format!("{attacker}  # test\n")).unwrap();
    // Long before the 60 s handshake deadline.
    closed_within(&mut in_handshake, Duration::from_secs(10)).await;
    let metrics = edge.metrics().await;
    assert!(
        metric(&metrics, "edge_policy_closed_connections_total") >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_drain_spreads_tunnel_closes_over_its_window() {
    let cluster = Cluster::start(1).await;
    let extra =
        "[shutdown]\nreadiness_delay = \"0s\"\ndrain_deadline = \"6s\"\nclose_spread = 0.8\n";
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), extra).await;
    let mut tunnels = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut replies = DiagnosticsClient::new(edge.ws_channel().await.unwrap())
            .echo(with_token(ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        tx.send(PingRequest::default()).await.unwrap();
        let first = tokio::time::timeout(STEP, replies.message()).await;
        assert!(matches!(first, Ok(Ok(Some(_)))), "{first:?}");
        tunnels.spawn(async move {
            let _tx = tx;
            while let Ok(Some(_)) = replies.message().await {}
            Instant::now()
        });
    }
    let drain_started = Instant::now();
    edge.signal("TERM");
    let mut closed = Vec::new();
    while let Some(end) = tokio::time::timeout(Duration::from_secs(20), tunnels.join_next())
        .await
        .expect("every tunnel closes by the drain deadline")
    {
        closed.push(end.unwrap().duration_since(drain_started));
    }
    closed.sort();
    let (first, last) = (closed[0], closed[closed.len() - 1]);
    assert!(last < Duration::from_secs(9), "{closed:?}");
    // Spread over the window instead of all at the deadline.
    assert!(first < Duration::from_millis(4800), "{closed:?}");
    assert!(last - first >= Duration::from_secs(1), "{closed:?}");
}

#[tokio::test]
async fn a_trusted_balancer_that_never_sends_its_proxy_header_is_cut() {
    let cluster = Cluster::start(1).await;
    let extra = "[proxy_protocol]\ntrusted = [\"127.0.0.0/8\"]\nheader_timeout = \"1s\"\n";
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), extra).await;
    let balancer = ip(cluster.subnet, 131);
    let mut silent = tcp_from(balancer, edge.https).await;
    let took = closed_within(&mut silent, Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(800), "{took:?}");
    let mut dribble = tcp_from(balancer, edge.https).await;
    let started = Instant::now();
    for byte in b"PROXY TCP4 203.0.113.9 " {
        if dribble.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    closed_within(&mut dribble, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let metrics = edge.metrics().await;
    assert!(
        metric(
            &metrics,
            "edge_policy_blocked_total{reason=\"bad_proxy_header\""
        ) >= 2.0,
        "{metrics}"
    );
}

/// A request head over `downstream.max_request_header_bytes` is answered by the edge (431,
/// gRPC RESOURCE_EXHAUSTED) and never reaches a pod; the connection of the HTTP/1 one is
/// closed; a head just under the limit goes through.
#[tokio::test]
async fn oversized_request_heads_are_refused_at_the_edge() {
    let cluster = Cluster::start(1).await;
    let edge = Edge::start(
        cluster.subnet,
        &cluster.endpoints(),
        "[downstream]\nmax_request_header_bytes = 4096\n",
    )
    .await;
    edge.wait_healthy(1).await;

    // HTTP/1.1: 431 from the edge, then the connection ends.
    let tls = edge.tls_client(&[b"http/1.1"]);
    let mut big = tls_connect(edge.https, &tls, None).await.unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: kas\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(8 * 1024)
    );
    big.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, big.read_to_end(&mut answer))
        .await
        .expect("closed by the edge")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    assert!(answer.contains("request headers too large"), "{answer}");

    // The same request with a head under the limit reaches kas (which answers plain
    // HTTP on its agent port with its own 400).
    let mut small = tls_connect(edge.https, &tls, None).await.unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: kas\r\nX-Padding: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(2 * 1024)
    );
    small.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, small.read_to_end(&mut answer))
        .await
        .expect("answered")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");

    // gRPC: a trailers-only RESOURCE_EXHAUSTED; the channel stays usable.
    let channel = edge.grpc_channel().await;
    let mut request = with_token(PingRequest {
        payload: b"x".to_vec(),
    });
    request
        .metadata_mut()
        .insert("x-padding", "a".repeat(8 * 1024).parse().unwrap());
    let status = DiagnosticsClient::new(channel.clone())
        .ping(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("request headers too large"),
        "{status:?}"
    );
    DiagnosticsClient::new(channel)
        .ping(with_token(PingRequest {
            payload: b"x".to_vec(),
        }))
        .await
        .expect("an ordinary call on the same connection");
}
