//! Clients (and pods) that do not behave, through the real `kas-edge` binary: an agent that
//! stops reading its websocket, pods that frame a refused upgrade badly.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use kas_testkit::edge::{EdgeOptions, EdgeProfile, EdgeStdout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// A stand-in kas pod that accepts websockets (a real websocket server) and floods each
/// one with binary messages as fast as it can, while reporting every message it receives.
/// Returns its address, the received messages and the bytes it managed to send so far.
async fn flooding_pod(
    ip: IpAddr,
) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>, Arc<AtomicU64>) {
    serve_readiness(ip).await;
    let listener = TcpListener::bind((ip, AGENT_PORT)).await.unwrap();
    let (received_tx, received) = mpsc::unbounded_channel();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (received_tx, counter) = (received_tx.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(sock).await else {
                    return;
                };
                let (mut sink, mut stream) = ws.split();
                let flood = async move {
                    let chunk = vec![0xabu8; 32 * 1024];
                    while sink.send(Message::binary(chunk.clone())).await.is_ok() {
                        counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    }
                };
                let listen = async move {
                    while let Some(Ok(message)) = stream.next().await {
                        if let Message::Binary(data) = message {
                            let _ = received_tx.send(data.to_vec());
                        }
                    }
                };
                tokio::join!(flood, listen);
            });
        }
    });
    (SocketAddr::new(ip, AGENT_PORT), received, sent)
}

/// Waits (bounded) until `counter` stops moving: whatever it counts is stuck.
async fn until_stuck(counter: &AtomicU64, what: &str) {
    let deadline = tokio::time::Instant::now() + STEP;
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = counter.load(Ordering::SeqCst);
        if now == last && now > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never stalled"
        );
        last = now;
    }
}

/// An agent that stops reading its websocket (a stuck process, a full receive window) while
/// the pod keeps sending: the pod → agent direction stalls, and the agent → pod direction
/// must not stall with it. Before the two directions were independent, the edge sat in its
/// write to the agent and read nothing more from it.
#[tokio::test]
async fn an_agent_that_stops_reading_its_websocket_still_reaches_the_pod() {
    let subnet = next_subnet();
    let (pod, mut received, sent) = flooding_pod(ip(subnet, 10)).await;
    let edge = Edge::start(subnet, &[pod], "").await;
    edge.wait_healthy(1).await;
    let tls = tls_connect(edge.https, &edge.tls_client(&[b"http/1.1"]), None)
        .await
        .unwrap();
    let (ws, response) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::client_async("wss://localhost/", tls),
    )
    .await
    .expect("the upgrade is answered")
    .unwrap();
    assert_eq!(response.status(), 101);
    let (mut agent_sink, mut agent_stream) = ws.split();

    // The agent reads nothing; the pod's flood fills every buffer on the way and stops.
    until_stuck(&sent, "the pod's flood").await;

    for i in 0..3 {
        let text = format!("agent message {i}");
        tokio::time::timeout(
            STEP,
            agent_sink.send(Message::binary(text.clone().into_bytes())),
        )
        .await
        .expect("the agent's send completes")
        .unwrap();
        let got = tokio::time::timeout(STEP, received.recv())
            .await
            .expect("the agent's message reaches the pod while the agent is not reading")
            .unwrap();
        assert_eq!(got, text.as_bytes());
    }

    // Once the agent reads again, the flood resumes intact.
    for _ in 0..10 {
        let message = tokio::time::timeout(STEP, agent_stream.next())
            .await
            .expect("the flood resumes")
            .unwrap()
            .unwrap();
        assert!(
            matches!(&message, Message::Binary(d) if d.len() == 32 * 1024 && d.iter().all(|b| *b == 0xab))
        );
    }
}

/// A stand-in kas pod that refuses every upgrade with the raw answer its request path
/// names, then holds the connection open for a while (a pod that does not close after an
/// error page must not matter either).
async fn refusing_pod(ip: IpAddr) -> SocketAddr {
    serve_readiness(ip).await;
    let listener = TcpListener::bind((ip, AGENT_PORT)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = kas_testkit::clients::read_http_head(&mut sock).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&head);
                let (answer, close): (&[u8], bool) = if head.starts_with("GET /chunked ") {
                    (
                        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\
                          Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
                          Proxy-Authenticate: Basic\r\nTrailer: X-Sum\r\n\
                          Content-Type: text/plain\r\n\r\n\
                          6\r\nforbid\r\n7;ext=1\r\nden too\r\n0\r\nX-Sum: 1\r\n\r\n",
                        false,
                    )
                } else if head.starts_with("GET /short ") {
                    // Declares more than it sends, then closes.
                    (
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 100\r\n\r\nonly-part",
                        true,
                    )
                } else if head.starts_with("GET /long ") {
                    // Sends more than it declares: the rest is not body.
                    (
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\nnope!EXTRA-GARBAGE",
                        false,
                    )
                } else {
                    // No length: the body ends when the pod closes.
                    (
                        b"HTTP/1.1 500 Internal Server Error\r\n\r\nuntil close",
                        true,
                    )
                };
                let _ = sock.write_all(answer).await;
                if !close {
                    tokio::time::sleep(Duration::from_secs(8)).await;
                }
            });
        }
    });
    SocketAddr::new(ip, AGENT_PORT)
}

/// What the agent received for a refused upgrade: status, headers, body.
struct Refusal {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Refusal {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends an upgrade request for `path` and reads the answer to the end: the edge closes
/// the connection after a refusal, so everything after the head is the body as framed.
async fn refused(edge: &Edge, path: &str) -> Refusal {
    let mut tls = tls_connect(edge.https, &edge.tls_client(&[b"http/1.1"]), None)
        .await
        .unwrap();
    tls.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, tls.read_to_end(&mut answer))
        .await
        .expect("the edge answers and closes within the bound")
        .ok();
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(&answer) {
        Ok(httparse::Status::Complete(len)) => len,
        other => panic!("{other:?}: {}", String::from_utf8_lossy(&answer)),
    };
    Refusal {
        status: parsed.code.unwrap(),
        headers: parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        body: answer[head_len..].to_vec(),
    }
}

/// A refused upgrade reaches the agent framed correctly whatever the pod did: a chunked
/// body is decoded and sent with its length, a body shorter than declared is sent with the
/// length it has, bytes beyond a declared length are not body, and hop-by-hop headers stay
/// behind. Before, the pod's `Transfer-Encoding: chunked` and `Content-Length` went through
/// unchanged over a body that did not match them.
#[tokio::test]
async fn refused_upgrades_are_relayed_with_correct_framing() {
    let subnet = next_subnet();
    let pod = refusing_pod(ip(subnet, 10)).await;
    let edge = Edge::start(subnet, &[pod], "").await;
    edge.wait_healthy(1).await;

    let cases: [(&str, u16, &[u8]); 4] = [
        ("/chunked", 403, b"forbidden too"),
        ("/short", 401, b"only-part"),
        ("/long", 401, b"nope!"),
        ("/until-close", 500, b"until close"),
    ];
    for (path, status, body) in cases {
        let started = tokio::time::Instant::now();
        let refusal = refused(&edge, path).await;
        let context = format!(
            "{path}: {} {:?} {:?}",
            refusal.status,
            refusal.headers,
            String::from_utf8_lossy(&refusal.body)
        );
        assert_eq!(refusal.status, status, "{context}");
        assert_eq!(refusal.body, body, "{context}");
        assert_eq!(
            refusal.header("content-length"),
            Some(body.len().to_string().as_str()),
            "{context}"
        );
        for hop in [
            "transfer-encoding",
            "x-hop",
            "keep-alive",
            "proxy-authenticate",
            "trailer",
            "upgrade",
        ] {
            assert_eq!(refusal.header(hop), None, "{hop} relayed: {context}");
        }
        assert_eq!(refusal.header("connection"), Some("close"), "{context}");
        // A pod that keeps its connection open after a complete body holds no one up.
        if path == "/chunked" || path == "/long" {
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "{path} took {:?}",
                started.elapsed()
            );
        }
    }
    assert_eq!(
        refused(&edge, "/chunked").await.header("content-type"),
        Some("text/plain")
    );
}

/// One authenticated Ping through the edge; `None` if no answer came within `limit`.
async fn ping_within(channel: &tonic::transport::Channel, limit: Duration) -> Option<tonic::Code> {
    use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
    use kas_proto::diagnostics::PingRequest;
    let mut client = DiagnosticsClient::new(channel.clone());
    let call = client.ping(with_token(PingRequest {
        payload: b"x".to_vec(),
    }));
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(_)) => Some(tonic::Code::Ok),
        Ok(Err(status)) => Some(status.code()),
        Err(_) => None,
    }
}

/// The edge's stdout goes to a consumer that stopped reading (a stuck log shipper): the
/// pipe fills, and requests must still be answered promptly, with the access lines that do
/// not fit dropped and counted. Before, the access line was written on pingora's worker
/// threads, which blocked in `write(2)` and stopped serving once the pipe was full.
#[tokio::test]
async fn a_log_consumer_that_stops_reading_costs_log_lines_not_requests() {
    let cluster = Cluster::start(1).await;
    let options = EdgeOptions {
        stdout: EdgeStdout::StuckPipe,
        ..EdgeTests::edge()
    };
    let host = ip(cluster.subnet, 250);
    let edge = Edge::launch(&options, host, &cluster.endpoints(), "").await;
    let admin = edge.admin;
    eventually("a healthy pod", STEP, || async move {
        http_get(admin, "/metrics")
            .await
            .is_some_and(|(_, m)| m.contains("edge_upstream_healthy{pod=") && m.contains("} 1"))
    })
    .await;
    let channel = grpc_channel(edge.https, tls_connector(&edge.ca_file, &[b"h2"])).await;

    // About 260 bytes per access line: 5,000 calls are 1.3 MB, more than the pipe (64 KiB)
    // and the edge's queue (1 MiB) together.
    let started = tokio::time::Instant::now();
    for batch in 0..100 {
        let calls = (0..50).map(|_| ping_within(&channel, Duration::from_secs(5)));
        let answers = futures_util::future::join_all(calls).await;
        let unanswered = answers.iter().filter(|a| a.is_none()).count();
        assert_eq!(
            unanswered, 0,
            "batch {batch}: calls went unanswered while stdout was stuck"
        );
        assert!(
            answers.iter().all(|a| *a == Some(tonic::Code::Ok)),
            "{answers:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "5,000 calls took {:?}",
        started.elapsed()
    );
    // And the edge still answers after the flood, promptly.
    assert_eq!(
        ping_within(&channel, Duration::from_secs(5)).await,
        Some(tonic::Code::Ok)
    );
    let dropped = metric_value(&edge.metrics().await, "edge_access_log_dropped_total");
    assert!(
        dropped.is_some_and(|d| d > 0.0),
        "dropped lines are counted: {dropped:?}"
    );
}

/// `edge_grpc_responses_total{grpc_status=...}` from the edge's metrics (0 when absent).
async fn grpc_responses(edge: &Edge, status: &str) -> u64 {
    let line = format!("edge_grpc_responses_total{{grpc_status=\"{status}\"}} ");
    edge.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// gRPC answers are counted by the status their client got, not by the HTTP status (a
/// gRPC error travels in an HTTP 200): kas rejecting a token shows up as UNAUTHENTICATED,
/// a stream's trailers count, and so do the edge's own refusals when no pod is left.
#[tokio::test]
async fn grpc_answers_are_counted_by_their_grpc_status() {
    use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
    use kas_proto::diagnostics::PingRequest;

    let mut cluster = Cluster::start(1).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    edge.wait_healthy(1).await;
    let channel = edge.grpc_channel().await;
    let mut client = DiagnosticsClient::new(channel.clone());
    let ping = || PingRequest {
        payload: b"hi".to_vec(),
    };

    for _ in 0..3 {
        client.ping(with_token(ping())).await.unwrap();
    }
    for _ in 0..2 {
        let mut request = tonic::Request::new(ping());
        request.metadata_mut().insert(
            "authorization",
            "Bearer glagent-not-a-token".parse().unwrap(),
        );
        let status = client.ping(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    // A stream whose OK comes in trailers, after messages.
    let (tx, rx) = mpsc::channel(1);
    let mut replies = client
        .echo(with_token(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    tx.send(ping()).await.unwrap();
    assert!(replies.message().await.unwrap().is_some());
    drop(tx);
    assert!(tokio::time::timeout(STEP, replies.message())
        .await
        .unwrap()
        .unwrap()
        .is_none());

    eventually("OK and UNAUTHENTICATED counted", STEP, || async {
        grpc_responses(&edge, "OK").await == 4
            && grpc_responses(&edge, "UNAUTHENTICATED").await == 2
    })
    .await;
    // All of them were HTTP 200s.
    let metrics = edge.metrics().await;
    assert!(
        metrics.contains("edge_requests_total{protocol=\"grpc\",status=\"200\"} 6"),
        "{metrics}"
    );

    // No pod left: the edge answers UNAVAILABLE itself, and counts it.
    cluster.pods[0].kill();
    let admin = edge.admin;
    eventually("no healthy pod", STEP, || async move {
        http_get(admin, "/metrics").await.is_some_and(|(_, m)| {
            !m.lines()
                .any(|l| l.starts_with("edge_upstream_healthy{") && l.ends_with(" 1"))
        })
    })
    .await;
    let mut fresh = DiagnosticsClient::new(edge.grpc_channel().await);
    let status = fresh.ping(with_token(ping())).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    eventually("UNAVAILABLE counted", STEP, || async {
        grpc_responses(&edge, "UNAVAILABLE").await == 1
    })
    .await;
}
