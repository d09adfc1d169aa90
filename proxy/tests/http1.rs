//! Plain HTTP/1.1 requests the edge forwards itself (no upgrade, a small known body):
//! keep-alive on one pod connection, the answer's framing (length, chunked, until close),
//! a pod connection the pod closed meanwhile, a body that never arrives, and requests it
//! leaves to pingora on the same connection. Real TLS to the real `kas-edge` binary, in
//! front of stand-in pods that speak HTTP/1.1.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kas_testkit::clients::read_http_head;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How a stand-in pod answers.
#[derive(Clone, Copy)]
enum Answers {
    /// `200`, `content-length`, body `pong <n>` (n counts requests on the connection);
    /// then waits for the next request.
    KeepAlive,
    /// Answers the first request on a connection like `KeepAlive`; reads the second and
    /// closes without answering (a pod closing an idle keep-alive connection just as a
    /// request arrives).
    CloseOnSecond,
    /// A chunked body in three chunks.
    Chunked,
    /// A body without length, ended by closing.
    UntilClose,
}

/// A stand-in pod and the edge in front of it, with `extra` edge configuration.
async fn edge_before(answers: Answers, extra: &str) -> (Edge, Arc<Seen>) {
    let subnet = next_subnet();
    let (pod, seen) = h1_pod(ip(subnet, 10), answers).await;
    let edge = Edge::start(subnet, &[pod], extra).await;
    edge.wait_healthy(1).await;
    (edge, seen)
}

#[derive(Default)]
struct Seen {
    connections: AtomicU64,
    requests: AtomicU64,
    /// Every request head received, lowercased.
    heads: std::sync::Mutex<Vec<String>>,
    /// Bytes of request bodies received.
    body_bytes: AtomicU64,
}

async fn h1_pod(ip: IpAddr, answers: Answers) -> (SocketAddr, Arc<Seen>) {
    serve_readiness(ip).await;
    let listener = TcpListener::bind((ip, AGENT_PORT)).await.unwrap();
    let seen = Arc::new(Seen::default());
    let pod = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            pod.connections.fetch_add(1, Ordering::SeqCst);
            let pod = pod.clone();
            tokio::spawn(async move {
                let mut n = 0;
                while let Some(head) = read_http_head(&mut sock).await {
                    n += 1;
                    pod.requests.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&head).to_lowercase();
                    pod.heads.lock().unwrap().push(head.clone());
                    if let Some(length) = head_value(&head, "content-length") {
                        let mut body = vec![0u8; length.parse().unwrap()];
                        sock.read_exact(&mut body).await.unwrap();
                        pod.body_bytes
                            .fetch_add(body.len() as u64, Ordering::SeqCst);
                    } else if head_value(&head, "transfer-encoding").is_some() {
                        let body = dechunk(&read_chunked(&mut sock).await);
                        pod.body_bytes
                            .fetch_add(body.len() as u64, Ordering::SeqCst);
                    }
                    if n == 2 && matches!(answers, Answers::CloseOnSecond) {
                        return;
                    }
                    let body = format!("pong {n}");
                    let answer = match answers {
                        Answers::KeepAlive | Answers::CloseOnSecond => format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-pod: yes\r\n\r\n{body}",
                            body.len()
                        ),
                        Answers::Chunked => "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                             3\r\nabc\r\n4\r\ndefg\r\n2\r\nhi\r\n0\r\n\r\n"
                            .to_owned(),
                        Answers::UntilClose => format!("HTTP/1.1 200 OK\r\n\r\n{body}"),
                    };
                    // A HEAD gets the head a GET would, without its body.
                    let answer = match (head.starts_with("head "), answer.find("\r\n\r\n")) {
                        (true, Some(end)) => answer[..end + 4].to_owned(),
                        _ => answer,
                    };
                    if sock.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    if matches!(answers, Answers::UntilClose) {
                        return;
                    }
                }
            });
        }
    });
    (SocketAddr::new(ip, AGENT_PORT), seen)
}

fn head_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        (n.trim() == name).then(|| v.trim().to_owned())
    })
}

/// A TLS connection to the edge speaking HTTP/1.1.
async fn h1_client(edge: &Edge) -> impl AsyncRead + tokio::io::AsyncWrite + Unpin {
    tls_connect(edge.https, &edge.tls_client(&[b"http/1.1"]), None)
        .await
        .unwrap()
}

/// Reads one answer: its head (lowercased) and its body (by length or chunks; until
/// close when neither).
async fn read_answer(conn: &mut (impl AsyncRead + Unpin)) -> (String, Vec<u8>) {
    let head = tokio::time::timeout(STEP, read_http_head(conn))
        .await
        .expect("an answer in time")
        .expect("an answer before the close");
    let head = String::from_utf8(head).unwrap().to_lowercase();
    let body = if let Some(length) = head_value(&head, "content-length") {
        let mut body = vec![0u8; length.parse().unwrap()];
        conn.read_exact(&mut body).await.unwrap();
        body
    } else if head_value(&head, "transfer-encoding").as_deref() == Some("chunked") {
        dechunk(&read_chunked(conn).await)
    } else {
        let mut body = Vec::new();
        tokio::time::timeout(STEP, conn.read_to_end(&mut body))
            .await
            .unwrap()
            .unwrap();
        body
    };
    (head, body)
}

/// A chunked body's raw bytes, up to its last chunk (no trailers in these tests).
async fn read_chunked(conn: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut raw = Vec::new();
    while !raw.ends_with(b"0\r\n\r\n") {
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte).await.unwrap();
        raw.push(byte[0]);
    }
    raw
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap(), 16).unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

async fn closed_within(conn: &mut (impl AsyncRead + Unpin), within: Duration) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(within, conn.read_to_end(&mut rest)).await,
        Ok(Ok(_)) | Ok(Err(_))
    )
}

/// Twenty requests on one agent connection, with bodies: every answer arrives whole,
/// and the pod sees one connection for all of them.
#[tokio::test]
async fn keep_alive_requests_share_one_pod_connection() {
    let (edge, seen) = edge_before(Answers::KeepAlive, "").await;
    let mut conn = h1_client(&edge).await;
    for n in 1..=20 {
        let request: &[u8] = b"POST /things HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5\r\nconnection: keep-alive\r\n\r\nhello";
        conn.write_all(request).await.unwrap();
        let (head, body) = read_answer(&mut conn).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("x-pod: yes"));
        assert!(!head.contains("connection: close"), "{head}");
        assert_eq!(body, format!("pong {n}").as_bytes());
    }
    // A HEAD: the length a GET would get, no body; the connection goes on.
    conn.write_all(b"HEAD /things HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let head = tokio::time::timeout(STEP, read_http_head(&mut conn))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8(head).unwrap().to_lowercase();
    assert!(head.contains("content-length: 7"), "{head}");
    conn.write_all(b"GET /things HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut conn).await.1, b"pong 22");
    assert_eq!(seen.requests.load(Ordering::SeqCst), 22);
    assert_eq!(seen.body_bytes.load(Ordering::SeqCst), 100);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    let metrics = edge.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "edge_requests_total{protocol=\"http\",status=\"200\"}"
        ),
        22.0
    );
}

/// Agent connections that come one after another (one request each) reuse the same
/// pod connection: a new agent costs the pod no new connection.
#[tokio::test]
async fn successive_agent_connections_reuse_an_idle_pod_connection() {
    let (edge, seen) = edge_before(Answers::KeepAlive, "").await;
    for n in 1..=3 {
        let mut conn = h1_client(&edge).await;
        conn.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_answer(&mut conn).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, format!("pong {n}").as_bytes());
        drop(conn);
        // The edge sees the close and parks the pod connection.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

/// A pod that closes a kept-alive connection as the next request arrives: the request
/// goes again on a fresh connection, and the agent never notices.
#[tokio::test]
async fn a_pod_connection_the_pod_closed_is_replaced() {
    let (edge, seen) = edge_before(Answers::CloseOnSecond, "").await;
    let mut conn = h1_client(&edge).await;
    for _ in 0..5 {
        conn.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_answer(&mut conn).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, b"pong 1");
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 5);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 9);
}

/// Chunked answers stay chunked (and whole); an answer without a length ends with the
/// connection, which the agent is told.
#[tokio::test]
async fn chunked_and_until_close_answers_keep_their_framing() {
    let (edge, _) = edge_before(Answers::Chunked, "").await;
    let mut conn = h1_client(&edge).await;
    for _ in 0..2 {
        conn.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_answer(&mut conn).await;
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert_eq!(body, b"abcdefghi");
    }
    drop(edge);

    let (edge, _) = edge_before(Answers::UntilClose, "").await;
    let mut conn = h1_client(&edge).await;
    conn.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut conn).await;
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"pong 1");
}

/// A request whose body never arrives holds the connection only for the request-head
/// timeout.
#[tokio::test]
async fn a_request_body_that_never_arrives_is_cut() {
    let (edge, seen) = edge_before(
        Answers::KeepAlive,
        "[downstream]\nrequest_head_timeout = \"1s\"\n",
    )
    .await;
    let mut conn = h1_client(&edge).await;
    conn.write_all(b"POST / HTTP/1.1\r\nhost: localhost\r\ncontent-length: 10\r\n\r\nabc")
        .await
        .unwrap();
    assert!(
        closed_within(&mut conn, Duration::from_secs(5)).await,
        "the connection outlived its body deadline"
    );
    assert_eq!(seen.requests.load(Ordering::SeqCst), 0);
}

/// After plain requests, the same connection may carry what the edge leaves to pingora
/// (here a chunked request body), answered by the pod as before.
#[tokio::test]
async fn requests_left_to_pingora_continue_the_same_connection() {
    let (edge, seen) = edge_before(Answers::KeepAlive, "").await;
    let mut conn = h1_client(&edge).await;
    conn.write_all(b"GET /first HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_answer(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // A chunked request body: pingora's to serve (it forwards it with a length).
    conn.write_all(
        b"POST /second HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, body) = read_answer(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(body.starts_with(b"pong"));
    assert_eq!(seen.body_bytes.load(Ordering::SeqCst), 5);
}

/// The same request as each path of the edge takes it: its own loop (a plain GET),
/// pingora (a chunked body) and a websocket upgrade (pingora's path, forwarded by the
/// edge's own dialer). `headers` go in every one, and a `Connection` header naming
/// `connection` (plus `upgrade` for the upgrade).
fn on_every_path(headers: &str, connection: &[&str]) -> [(&'static str, String); 3] {
    let named = |extra: &[&str]| {
        let tokens: Vec<&str> = extra.iter().chain(connection).copied().collect();
        match tokens.is_empty() {
            true => String::new(),
            false => format!("connection: {}\r\n", tokens.join(", ")),
        }
    };
    [
        (
            "inline",
            format!("GET /inline HTTP/1.1\r\n{headers}{}\r\n", named(&[])),
        ),
        (
            "pingora",
            format!(
                "POST /pingora HTTP/1.1\r\n{headers}{}transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                named(&[])
            ),
        ),
        (
            "upgrade",
            format!(
                "GET /upgrade HTTP/1.1\r\n{headers}{}upgrade: websocket\r\n\
                 sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 sec-websocket-protocol: ws-tunnel\r\n\r\n",
                named(&["upgrade"])
            ),
        ),
    ]
}

/// Hop-by-hop headers, and whatever a `Connection` header names, describe the agent's
/// connection, not its request: no path forwards them to a pod (RFC 9110 7.6.1). An
/// upgrade keeps its own `Connection: upgrade` and `Upgrade`.
#[tokio::test]
async fn headers_a_connection_header_names_never_reach_a_pod() {
    let (edge, seen) = edge_before(Answers::KeepAlive, "").await;
    let hop = "host: localhost\r\nx-secret: 1\r\nkeep-alive: timeout=5\r\n\
               proxy-authorization: basic eA==\r\n";
    for (path, request) in on_every_path(hop, &["x-secret"]) {
        let mut conn = h1_client(&edge).await;
        conn.write_all(request.as_bytes()).await.unwrap();
        let (head, _) = read_answer(&mut conn).await;
        assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
        let forwarded = seen.heads.lock().unwrap().pop().expect("the pod got it");
        for name in ["x-secret", "keep-alive", "proxy-authorization"] {
            assert!(
                head_value(&forwarded, name).is_none(),
                "{path} forwarded {name}: {forwarded}"
            );
        }
        if path == "upgrade" {
            assert_eq!(
                head_value(&forwarded, "upgrade").as_deref(),
                Some("websocket")
            );
            assert_eq!(
                head_value(&forwarded, "connection").as_deref(),
                Some("upgrade")
            );
        } else {
            assert_eq!(head_value(&forwarded, "connection"), None, "{forwarded}");
        }
    }
}

/// An HTTP/1.1 request names exactly one host (RFC 9112 3.2): with none or two, every
/// path answers 400 and the pod sees nothing.
#[tokio::test]
async fn a_request_without_exactly_one_host_is_refused_on_every_path() {
    let (edge, seen) = edge_before(Answers::KeepAlive, "").await;
    for hosts in ["", "host: localhost\r\nhost: elsewhere.example\r\n"] {
        for (path, request) in on_every_path(hosts, &[]) {
            let mut conn = h1_client(&edge).await;
            conn.write_all(request.as_bytes()).await.unwrap();
            let (head, _) = read_answer(&mut conn).await;
            assert!(
                head.starts_with("http/1.1 400"),
                "{path} with {hosts:?}: {head}"
            );
        }
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 0);
}
