//! HTTP/2 duties the edge took over from pingora when it began forwarding gRPC itself:
//! shared pod connections, flow control end to end, a pod lost mid-answer, abuse limits
//! (rapid cancels, malformed requests, CONNECT) and GOAWAY on drain. Raw HTTP/2 clients
//! (the h2 crate) over real TLS to the real `kas-edge` binary, in front of stand-in pods
//! that speak HTTP/2 cleartext as kas does.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use h2::client::SendRequest;
use h2::{Reason, RecvStream};
use http::{HeaderMap, Request, Response};
use tokio::net::TcpListener;

const GRPC_PATH: &str = "https://localhost/kas_edge.test.v1.Test/Call";

/// How a stand-in pod answers each stream.
#[derive(Clone, Copy)]
enum PodAnswers {
    /// Waits `delay`, then a small body and `grpc-status: 0`.
    Small { delay: Duration },
    /// Sends `total` bytes as fast as the edge's window lets it, then `grpc-status: 0`.
    Bulk { total: usize },
    /// Sends a head and one DATA frame, then drops the whole connection.
    DiesMidway,
    /// Like `Small` without delay, but takes a new stream off its connection only every
    /// 50 ms: streams wait in h2's accept queue, where a reset counts against the
    /// connection's limit of streams reset before they were accepted (h2's default, 20,
    /// as in kas).
    AcceptsSlowly,
    /// Never reads a request body; with `answers`, sends a head and 64 KiB of body.
    NeverReads { answers: bool },
}

/// Answers every stream at once.
const AT_ONCE: PodAnswers = PodAnswers::Small {
    delay: Duration::ZERO,
};

/// A stand-in pod (`max_streams` per connection) and the edge in front of it, with
/// `extra` edge configuration.
async fn edge_before(answers: PodAnswers, max_streams: u32, extra: &str) -> (Edge, Arc<PodSeen>) {
    let subnet = next_subnet();
    let (pod, seen) = h2_pod(ip(subnet, 10), answers, max_streams).await;
    let edge = Edge::start(subnet, &[pod], extra).await;
    edge.wait_healthy(1).await;
    (edge, seen)
}

/// What a stand-in pod saw.
#[derive(Default)]
struct PodSeen {
    connections: AtomicU64,
    streams: AtomicU64,
    /// Bytes the edge's flow control let the pod send.
    sent: AtomicU64,
    /// Connections the pod closed with ENHANCE_YOUR_CALM (too many early resets).
    calmed: AtomicU64,
    /// Every request's `:authority` and headers.
    requests: std::sync::Mutex<Vec<(Option<String>, HeaderMap)>>,
}

/// A stand-in pod that allows `max_streams` concurrent streams per connection.
async fn h2_pod(ip: IpAddr, answers: PodAnswers, max_streams: u32) -> (SocketAddr, Arc<PodSeen>) {
    serve_readiness(ip).await;
    let listener = TcpListener::bind((ip, AGENT_PORT)).await.unwrap();
    let seen = Arc::new(PodSeen::default());
    let pod = seen.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            pod.connections.fetch_add(1, Ordering::SeqCst);
            let pod = pod.clone();
            tokio::spawn(async move {
                let handshake = h2::server::Builder::new()
                    .max_concurrent_streams(max_streams)
                    .handshake(sock);
                let Ok(mut conn) = handshake.await else {
                    return;
                };
                loop {
                    if let PodAnswers::AcceptsSlowly = answers {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let (request, respond) = match conn.accept().await {
                        Some(Ok(stream)) => stream,
                        Some(Err(e)) => {
                            if e.reason() == Some(Reason::ENHANCE_YOUR_CALM) {
                                pod.calmed.fetch_add(1, Ordering::SeqCst);
                            }
                            return;
                        }
                        None => return,
                    };
                    pod.streams.fetch_add(1, Ordering::SeqCst);
                    let authority = request.uri().authority().map(|a| a.to_string());
                    let headers = request.headers().clone();
                    pod.requests.lock().unwrap().push((authority, headers));
                    if let PodAnswers::NeverReads { answers } = answers {
                        tokio::spawn(hold_unread(request, respond, answers));
                        continue;
                    }
                    if let PodAnswers::DiesMidway = answers {
                        answer_then_die(respond);
                        // Drive the connection a moment so the frames leave, then
                        // close the socket.
                        let _ =
                            tokio::time::timeout(Duration::from_millis(200), conn.accept()).await;
                        return;
                    }
                    tokio::spawn(answer(request, respond, answers, pod.clone()));
                }
            });
        }
    });
    (SocketAddr::new(ip, AGENT_PORT), seen)
}

fn grpc_ok() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers
}

fn grpc_head() -> Response<()> {
    Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .unwrap()
}

async fn answer(
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    answers: PodAnswers,
    pod: Arc<PodSeen>,
) {
    let mut body = request.into_body();
    // Read the request body to its end (gRPC sends it first).
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
    }
    let Ok(mut send) = respond.send_response(grpc_head(), false) else {
        return;
    };
    match answers {
        PodAnswers::AcceptsSlowly => {
            let _ = send.send_data(Bytes::from_static(b"\0\0\0\0\x02ok"), false);
        }
        PodAnswers::Small { delay } => {
            tokio::time::sleep(delay).await;
            let _ = send.send_data(Bytes::from_static(b"\0\0\0\0\x02ok"), false);
        }
        PodAnswers::Bulk { total } => {
            let mut left = total;
            while left > 0 {
                send.reserve_capacity(left.min(64 * 1024));
                let Some(Ok(granted)) = std::future::poll_fn(|cx| send.poll_capacity(cx)).await
                else {
                    return;
                };
                let n = granted.min(left);
                if n == 0 {
                    continue;
                }
                if send.send_data(Bytes::from(vec![7u8; n]), false).is_err() {
                    return;
                }
                pod.sent.fetch_add(n as u64, Ordering::SeqCst);
                left -= n;
            }
        }
        PodAnswers::DiesMidway | PodAnswers::NeverReads { .. } => unreachable!(),
    }
    let _ = send.send_trailers(grpc_ok());
}

/// Holds a stream without ever reading its body: every DATA frame stays buffered in h2,
/// where small ones count against the connection's framing budget.
async fn hold_unread(
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    answers: bool,
) {
    if answers {
        if let Ok(mut send) = respond.send_response(grpc_head(), false) {
            let _ = send.send_data(Bytes::from(vec![7u8; 64 * 1024]), false);
            // Held until the test ends.
            let _ = std::future::poll_fn(|cx| send.poll_reset(cx)).await;
        }
    } else {
        let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
    }
    drop(request);
}

fn answer_then_die(mut respond: h2::server::SendResponse<Bytes>) {
    if let Ok(mut send) = respond.send_response(grpc_head(), false) {
        let _ = send.send_data(Bytes::from_static(b"\0\0\0\0\x05part"), false);
    }
}

/// An HTTP/2 connection to the edge over TLS; its driver runs in a task whose result
/// says how the connection ended.
async fn h2_client(
    edge: &Edge,
) -> (
    SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tls = tls_connect(edge.https, &edge.tls_client(&[b"h2"]), None)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    (send, tokio::spawn(conn))
}

fn grpc_request() -> Request<()> {
    Request::builder()
        .method("POST")
        .uri(GRPC_PATH)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// One unary call: the request's 5-byte empty message, then the answer's body and
/// `grpc-status`.
async fn call(send: &mut SendRequest<Bytes>) -> (Vec<u8>, Option<String>) {
    let mut ready = send.clone().ready().await.unwrap();
    let (response, mut body) = ready.send_request(grpc_request(), false).unwrap();
    body.send_data(Bytes::from_static(b"\0\0\0\0\0"), true)
        .unwrap();
    let response = tokio::time::timeout(STEP, response)
        .await
        .expect("an answer")
        .unwrap();
    read_answer(response).await
}

async fn read_answer(response: Response<RecvStream>) -> (Vec<u8>, Option<String>) {
    let status = response
        .headers()
        .get("grpc-status")
        .map(|s| s.to_str().unwrap().to_owned());
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = tokio::time::timeout(STEP, body.data()).await.unwrap() {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = tokio::time::timeout(STEP, body.trailers())
        .await
        .unwrap()
        .unwrap();
    let status = trailers
        .and_then(|t| t.get("grpc-status").map(|s| s.to_str().unwrap().to_owned()))
        .or(status);
    (data, status)
}

/// The reason a connection ended with, waiting (bounded) for it to end.
async fn ended_with(conn: tokio::task::JoinHandle<Result<(), h2::Error>>) -> Option<Reason> {
    match tokio::time::timeout(STEP, conn).await {
        Ok(Ok(Err(e))) => e.reason(),
        Ok(Ok(Ok(()))) => Some(Reason::NO_ERROR),
        Ok(Err(join)) => panic!("connection task failed: {join}"),
        Err(_) => panic!("the connection did not end"),
    }
}

/// Many agent connections, many calls: the pod sees at most one connection per edge
/// worker thread (the test edge runs 2), not one per concurrent call.
#[tokio::test]
async fn agents_calls_share_a_few_connections_to_each_pod() {
    let (edge, seen) = edge_before(
        PodAnswers::Small {
            delay: Duration::from_millis(5),
        },
        u32::MAX,
        "",
    )
    .await;
    let mut agents = Vec::new();
    for _ in 0..16 {
        let (send, conn) = h2_client(&edge).await;
        agents.push(tokio::spawn(async move {
            let calls = (0..10).map(|_| {
                let mut send = send.clone();
                async move { call(&mut send).await }
            });
            let answers = futures_util::future::join_all(calls).await;
            drop(conn);
            answers
        }));
    }
    for agent in agents {
        for (body, status) in agent.await.unwrap() {
            assert_eq!(body, b"\0\0\0\0\x02ok");
            assert_eq!(status.as_deref(), Some("0"));
        }
    }
    assert_eq!(seen.streams.load(Ordering::SeqCst), 160);
    let connections = seen.connections.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&connections),
        "160 concurrent calls from 16 agents took {connections} pod connections"
    );
}

/// kas allows 200 streams per connection and agents hold theirs for hours: a stream
/// beyond what a pod connection allows goes on another connection, never waits.
#[tokio::test]
async fn streams_beyond_a_pod_connections_limit_take_another_connection() {
    let (edge, seen) = edge_before(
        PodAnswers::Small {
            delay: Duration::from_secs(3),
        },
        20,
        "",
    )
    .await;
    let (send, _conn) = h2_client(&edge).await;
    let calls = (0..90).map(|_| {
        let mut send = send.clone();
        async move { tokio::time::timeout(Duration::from_secs(6), call(&mut send)).await }
    });
    for answer in futures_util::future::join_all(calls).await {
        let (_, status) = answer.expect("every held stream is answered in one round");
        assert_eq!(status.as_deref(), Some("0"));
    }
    let connections = seen.connections.load(Ordering::SeqCst);
    assert!(
        (5..=7).contains(&connections),
        "90 streams at 20 per connection took {connections} connections"
    );
}

/// An agent that reads nothing of a big answer holds the pod back through flow control:
/// the edge lets the pod send about one window ahead, not the whole answer. Once the
/// agent reads, every byte and the trailers arrive.
#[tokio::test]
async fn a_slow_agent_holds_back_its_pod_and_loses_nothing() {
    const TOTAL: usize = 16 * 1024 * 1024;
    let (edge, seen) = edge_before(PodAnswers::Bulk { total: TOTAL }, u32::MAX, "").await;
    let (send, _conn) = h2_client(&edge).await;
    let mut ready = send.ready().await.unwrap();
    let (response, mut body) = ready.send_request(grpc_request(), false).unwrap();
    body.send_data(Bytes::from_static(b"\0\0\0\0\0"), true)
        .unwrap();
    let response = tokio::time::timeout(STEP, response).await.unwrap().unwrap();

    // Nothing read: the pod's sending stalls.
    let deadline = tokio::time::Instant::now() + STEP;
    let mut last = u64::MAX;
    let stalled_at = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = seen.sent.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pod never stalled"
        );
        last = now;
    };
    // The agent's window (64 KiB, h2's default) plus what the edge grants a pod per
    // stream (256 KiB), with room for rounding; far below the 16 MiB answer.
    assert!(
        stalled_at <= 1024 * 1024,
        "the pod sent {stalled_at} bytes to an agent that read nothing"
    );

    let (data, status) = read_answer(response).await;
    assert_eq!(data.len(), TOTAL);
    assert!(data.iter().all(|&b| b == 7));
    assert_eq!(status.as_deref(), Some("0"));
}

/// A pod that dies mid-answer: the agent gets what was sent, then `grpc-status: 14`
/// (UNAVAILABLE, so it reconnects), not a reset that would read as INTERNAL.
#[tokio::test]
async fn a_pod_lost_mid_answer_ends_the_call_with_unavailable() {
    let (edge, _seen) = edge_before(PodAnswers::DiesMidway, u32::MAX, "").await;
    let (mut send, _conn) = h2_client(&edge).await;
    let (body, status) = call(&mut send).await;
    assert_eq!(body, b"\0\0\0\0\x05part");
    assert_eq!(status.as_deref(), Some("14"));
    let metrics = edge.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "edge_grpc_responses_total{grpc_status=\"UNAVAILABLE\"}"
        ),
        1.0
    );
}

/// Streams cancelled right after they were accepted, over and over (HTTP/2 "rapid
/// reset"): each costs the edge a pod stream, so the connection is closed with
/// ENHANCE_YOUR_CALM after a budget; other agents are unaffected.
#[tokio::test]
async fn rapid_cancels_close_the_connection_with_enhance_your_calm() {
    let (edge, seen) = edge_before(
        PodAnswers::Small {
            delay: Duration::from_secs(2),
        },
        u32::MAX,
        "",
    )
    .await;
    let (send, conn) = h2_client(&edge).await;
    let mut cancelled = 0;
    for _ in 0..400 {
        let Ok(mut ready) = send.clone().ready().await else {
            break;
        };
        let Ok((_response, mut body)) = ready.send_request(grpc_request(), false) else {
            break;
        };
        if body
            .send_data(Bytes::from_static(b"\0\0\0\0\0"), false)
            .is_err()
        {
            break;
        }
        // Long enough for the edge to accept and forward the stream.
        tokio::time::sleep(Duration::from_millis(3)).await;
        body.send_reset(Reason::CANCEL);
        cancelled += 1;
    }
    assert_eq!(ended_with(conn).await, Some(Reason::ENHANCE_YOUR_CALM));
    assert!(
        cancelled < 400,
        "the connection survived {cancelled} cancels"
    );
    let reached = seen.streams.load(Ordering::SeqCst);
    assert!(
        reached <= 200,
        "{reached} cancelled streams reached the pod"
    );

    // A well-behaved agent still gets through.
    let (mut send, _conn) = h2_client(&edge).await;
    assert_eq!(call(&mut send).await.1.as_deref(), Some("0"));
}

/// A stream the client reset in the same write that opened it is already reset when the
/// edge takes it: it never reaches a pod, whatever the order the edge's tasks run in.
#[tokio::test]
async fn streams_reset_in_the_write_that_opened_them_never_reach_a_pod() {
    let (edge, seen) = edge_before(AT_ONCE, u32::MAX, "").await;
    let (send, _conn) = h2_client(&edge).await;
    let mut send = send.ready().await.unwrap();
    // The pod connection is up: nothing stands between the edge and the pod.
    assert_eq!(call(&mut send).await.1.as_deref(), Some("0"));
    for _ in 0..4 {
        // 20: the most h2 lets a connection reset before they are accepted.
        for _ in 0..20 {
            let (_response, mut body) = send.send_request(grpc_request(), false).unwrap();
            body.send_reset(Reason::CANCEL);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, status) = call(&mut send).await;
    assert_eq!(status.as_deref(), Some("0"));
    assert_eq!(
        seen.streams.load(Ordering::SeqCst),
        2,
        "streams reset before the edge forwarded them reached the pod"
    );
}

/// Streams the clients cancel after the edge forwarded them, while the pod has not yet
/// taken them off its accept queue: however many, the edge's resets never make the pod
/// close the shared connection (h2 does past 20 such resets), and it stays in use.
#[tokio::test]
async fn cancels_of_streams_a_pod_has_not_accepted_never_close_its_connection() {
    let (edge, seen) = edge_before(PodAnswers::AcceptsSlowly, u32::MAX, "").await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (mut send, conn) = h2_client(&edge).await;
        // Its pod connection is up: the edge forwards the burst at once.
        assert_eq!(call(&mut send).await.1.as_deref(), Some("0"));
        clients.push((send, conn));
    }
    let bursts = clients.iter().map(|(send, _)| {
        let send = send.clone();
        async move {
            let mut send = send.ready().await.unwrap();
            let mut opened = Vec::new();
            for _ in 0..25 {
                opened.push(send.send_request(grpc_request(), false).unwrap());
            }
            // The edge forwards them meanwhile; the pod takes one every 50 ms.
            tokio::time::sleep(Duration::from_millis(300)).await;
            for (_response, mut body) in opened {
                body.send_reset(Reason::CANCEL);
            }
        }
    });
    futures_util::future::join_all(bursts).await;
    // The pod works through its queue: the 4 first calls, the 100 streams and, for resets
    // that had to wait, probes.
    let pod = seen.clone();
    eventually("the pod took every stream", Duration::from_secs(30), || {
        let pod = pod.clone();
        async move {
            pod.streams.load(Ordering::SeqCst) >= 104 || pod.calmed.load(Ordering::SeqCst) > 0
        }
    })
    .await;
    assert_eq!(
        seen.calmed.load(Ordering::SeqCst),
        0,
        "the pod closed a connection over resets of streams it had not accepted"
    );
    let (mut send, _conn) = h2_client(&edge).await;
    let (_, status) = tokio::time::timeout(Duration::from_secs(30), call(&mut send))
        .await
        .expect("answered once the pod caught up");
    assert_eq!(status.as_deref(), Some("0"));
    // One per edge worker, never replaced.
    let connections = seen.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 2,
        "{connections} pod connections: some were replaced"
    );
}

/// Sends `n` DATA frames of one byte each on `body`, one at a time (fewer if the stream
/// ends meanwhile).
async fn trickle(body: &mut h2::SendStream<Bytes>, n: usize) {
    for _ in 0..n {
        if body.send_data(Bytes::from_static(b"z"), false).is_err() {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// After an attack on `seen`'s pod: its connections were never closed over it, and a new
/// stream still reaches it.
async fn pod_unharmed(edge: &Edge, seen: &PodSeen) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        seen.calmed.load(Ordering::SeqCst),
        0,
        "the pod closed a connection"
    );
    let before = seen.streams.load(Ordering::SeqCst);
    let (send, _conn) = h2_client(edge).await;
    let mut ready = send.ready().await.unwrap();
    let (_response, _body) = ready.send_request(grpc_request(), false).unwrap();
    eventually("a new stream reaches the pod", STEP, || async {
        seen.streams.load(Ordering::SeqCst) > before
    })
    .await;
    let connections = seen.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 2,
        "{connections} pod connections: some were replaced"
    );
}

/// A pod reads no stream before it answers it (kas authenticates first). One-byte DATA
/// frames on such a stream, forwarded frame for frame, would spend the framing budget h2
/// keeps per connection for small frames nobody read (GOAWAY ENHANCE_YOUR_CALM): the edge
/// sends a few, then gathers the rest into larger frames.
#[tokio::test]
async fn tiny_frames_to_a_stream_its_pod_has_not_answered_go_out_together() {
    let (edge, seen) = edge_before(PodAnswers::NeverReads { answers: false }, u32::MAX, "").await;
    let (send, _conn) = h2_client(&edge).await;
    let mut ready = send.ready().await.unwrap();
    let (_response, mut body) = ready.send_request(grpc_request(), false).unwrap();
    // The stand-in's budget (h2's default for its window): 128 one-byte frames.
    trickle(&mut body, 1000).await;
    pod_unharmed(&edge, &seen).await;
}

/// The same once the pod answered, while its answer waits on an agent that reads nothing
/// (a pod whose answers back up stops reading, as kas's Echo does).
#[tokio::test]
async fn tiny_frames_while_an_answer_waits_on_its_agent_go_out_together() {
    let (edge, seen) = edge_before(PodAnswers::NeverReads { answers: true }, u32::MAX, "").await;
    let tls = tls_connect(edge.https, &edge.tls_client(&[b"h2"]), None)
        .await
        .unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut ready = send.ready().await.unwrap();
    let (response, mut body) = ready.send_request(grpc_request(), false).unwrap();
    body.send_data(Bytes::from_static(b"\0\0\0\0\0"), false)
        .unwrap();
    let _response = tokio::time::timeout(STEP, response).await.unwrap().unwrap();
    // The answer's body now waits at the edge for a window this client never opens.
    tokio::time::sleep(Duration::from_millis(300)).await;
    trickle(&mut body, 1000).await;
    pod_unharmed(&edge, &seen).await;
}

fn request_with(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(()).unwrap()
}

/// Sends one request without a body; its answer's status, or the reset reason.
async fn status_of(send: &SendRequest<Bytes>, request: Request<()>) -> Result<u16, Reason> {
    let mut ready = send.clone().ready().await.map_err(|_| Reason::NO_ERROR)?;
    let (response, _) = ready
        .send_request(request, true)
        .map_err(|_| Reason::NO_ERROR)?;
    match tokio::time::timeout(STEP, response).await.unwrap() {
        Ok(response) => Ok(response.status().as_u16()),
        Err(e) => Err(e.reason().unwrap_or(Reason::NO_ERROR)),
    }
}

/// Requests no agent sends never reach a pod: CONNECT is refused (405), a `host` that
/// contradicts `:authority` is a 400, conflicting lengths reset the stream; a connection
/// that keeps sending them is closed with ENHANCE_YOUR_CALM.
#[tokio::test]
async fn malformed_requests_and_connect_are_refused_then_the_connection_is_closed() {
    let (edge, seen) = edge_before(AT_ONCE, u32::MAX, "").await;
    let (send, conn) = h2_client(&edge).await;

    let connect = request_with("CONNECT", "elsewhere.example:443", &[]);
    assert_eq!(status_of(&send, connect).await, Ok(405));
    let two_hosts = request_with(
        "GET",
        "https://localhost/",
        &[("host", "elsewhere.example")],
    );
    assert_eq!(status_of(&send, two_hosts).await, Ok(400));
    let two_lengths = request_with(
        "POST",
        "https://localhost/",
        &[("content-length", "0"), ("content-length", "5")],
    );
    assert_eq!(
        status_of(&send, two_lengths).await,
        Err(Reason::PROTOCOL_ERROR)
    );
    // A well-formed request on the same connection still works.
    let fine = request_with("GET", "https://localhost/", &[]);
    assert_eq!(status_of(&send, fine).await, Ok(200));
    assert_eq!(seen.streams.load(Ordering::SeqCst), 1);

    for _ in 0..40 {
        let connect = request_with("CONNECT", "elsewhere.example:443", &[]);
        if status_of(&send, connect).await.is_err() {
            break;
        }
    }
    assert_eq!(ended_with(conn).await, Some(Reason::ENHANCE_YOUR_CALM));
    assert_eq!(seen.streams.load(Ordering::SeqCst), 1);
}

/// A `host` must agree with `:authority`, every one of them: a second `host` naming
/// another target is refused like the first would be (400), and never reaches the pod.
#[tokio::test]
async fn every_host_must_agree_with_the_authority() {
    let (edge, seen) = edge_before(AT_ONCE, u32::MAX, "").await;
    let (send, _conn) = h2_client(&edge).await;
    for hosts in [
        &[("host", "elsewhere.example")][..],
        &[("host", "localhost"), ("host", "elsewhere.example")],
        &[("host", "localhost"), ("host", "localhost")],
    ] {
        let request = request_with("GET", "https://localhost/", hosts);
        assert_eq!(status_of(&send, request).await, Ok(400), "{hosts:?}");
    }
    let agreeing = request_with("GET", "https://localhost/", &[("host", "localhost")]);
    assert_eq!(status_of(&send, agreeing).await, Ok(200));
    let requests = seen.requests.lock().unwrap();
    assert_eq!(requests.len(), 1);
    // The pod gets the one authority, as `:authority`.
    assert_eq!(requests[0].0.as_deref(), Some("localhost"));
    assert!(requests[0].1.get("host").is_none(), "{:?}", requests[0].1);
}

/// One header field of a request's raw HTTP/2 header block: a literal, not indexed.
fn hpack_literal(name: &str, value: &str) -> Vec<u8> {
    assert!(
        name.len() < 127 && value.len() < 127,
        "one-byte lengths only"
    );
    let mut field = vec![0x00, name.len() as u8];
    field.extend_from_slice(name.as_bytes());
    field.push(value.len() as u8);
    field.extend_from_slice(value.as_bytes());
    field
}

/// Sends one GET on a raw HTTP/2 connection, its header block exactly `fields` (which
/// the h2 crate would not send: `:scheme` without `:authority`), and returns the answer's
/// status: the edge's HPACK encoder sends 200 and 400 as static-table indexes.
async fn raw_get_status(edge: &Edge, fields: &[(&str, &str)]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_connect(edge.https, &edge.tls_client(&[b"h2"]), None)
        .await
        .unwrap();
    let block: Vec<u8> = fields
        .iter()
        .flat_map(|(name, value)| hpack_literal(name, value))
        .collect();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // empty SETTINGS
    let len = block.len() as u32;
    // HEADERS on stream 1, END_HEADERS | END_STREAM.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, 0x1, 0x5]);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&block);
    tls.write_all(&out).await.unwrap();
    for _ in 0..64 {
        let mut header = [0u8; 9];
        tokio::time::timeout(STEP, tls.read_exact(&mut header))
            .await
            .expect("a frame in time")
            .expect("the connection stays open until the answer");
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; length];
        tls.read_exact(&mut payload).await.unwrap();
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
        match (header[3], stream) {
            (0x1, 1) => match payload.first() {
                Some(0x88) => return 200,
                Some(0x8c) => return 400,
                other => panic!("an unexpected status encoding: {other:?}"),
            },
            (0x3, 1) => panic!("the stream was reset"),
            _ => {}
        }
    }
    panic!("no answer within 64 frames");
}

/// A request without `:authority` names its target with `host` alone: the pod gets that
/// as `:authority` (not its own address next to the client's `host`, a mismatch a strict
/// pod may treat as an error). Without either, the request names no target: 400.
#[tokio::test]
async fn a_request_without_authority_takes_its_host_as_authority() {
    let (edge, seen) = edge_before(AT_ONCE, u32::MAX, "").await;
    let head = [(":method", "GET"), (":scheme", "https"), (":path", "/")];
    let with_host = [&head[..], &[("host", "localhost")]].concat();
    assert_eq!(raw_get_status(&edge, &with_host).await, 200);
    assert_eq!(raw_get_status(&edge, &head).await, 400);
    let requests = seen.requests.lock().unwrap();
    assert_eq!(
        requests.len(),
        1,
        "the request without a target reached the pod"
    );
    assert_eq!(requests[0].0.as_deref(), Some("localhost"));
    assert!(requests[0].1.get("host").is_none(), "{:?}", requests[0].1);
}

/// On SIGTERM the edge sends GOAWAY: a stream open before it finishes, new streams on the
/// same connection are refused (the agent reconnects to another replica).
#[tokio::test]
async fn a_drain_sends_goaway_and_open_streams_finish() {
    let (edge, _seen) = edge_before(
        PodAnswers::Small {
            delay: Duration::from_secs(3),
        },
        u32::MAX,
        // No spread: connections are closed only at the deadline, after this test.
        "[shutdown]\nreadiness_delay = \"0s\"\ndrain_deadline = \"10s\"\nclose_spread = 0.0\n",
    )
    .await;
    let (send, conn) = h2_client(&edge).await;
    let mut open = send.clone();
    let open_call = tokio::spawn(async move { call(&mut open).await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    edge.signal("TERM");
    let https = edge.https;
    eventually("listener closed", STEP, || async move {
        tokio::net::TcpStream::connect(https).await.is_err()
    })
    .await;
    // Streams the agent opens before the GOAWAY reaches it are still served (HTTP/2's
    // two-step GOAWAY); once it has arrived, new ones are refused.
    let mut refused = false;
    for _ in 0..50 {
        let Ok(mut ready) = send.clone().ready().await else {
            refused = true;
            break;
        };
        let Ok((response, _)) = ready.send_request(grpc_request(), true) else {
            refused = true;
            break;
        };
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(200), response).await {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused,
        "new streams were still served long after the drain began"
    );
    let (body, status) = open_call.await.unwrap();
    assert_eq!(body, b"\0\0\0\0\x02ok");
    assert_eq!(status.as_deref(), Some("0"));
    assert_eq!(ended_with(conn).await, Some(Reason::NO_ERROR));
}

/// The HTTP/2 error codes of every GOAWAY frame in `bytes` (a server's side of a
/// connection, after its preface).
fn goaway_codes(mut bytes: &[u8]) -> Vec<u32> {
    let mut codes = Vec::new();
    while bytes.len() >= 9 {
        let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let kind = bytes[3];
        if bytes.len() < 9 + length {
            break;
        }
        let payload = &bytes[9..9 + length];
        if kind == 0x7 && payload.len() >= 8 {
            codes.push(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ]));
        }
        bytes = &bytes[9 + length..];
    }
    codes
}

/// A malformed frame (a PING of the wrong size) is a connection error: the edge answers
/// GOAWAY with an error code and closes that connection; other agents are unaffected.
#[tokio::test]
async fn a_malformed_frame_ends_its_connection_with_goaway() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (edge, _seen) = edge_before(AT_ONCE, u32::MAX, "").await;
    let mut tls = tls_connect(edge.https, &edge.tls_client(&[b"h2"]), None)
        .await
        .unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // empty SETTINGS
    hello.extend_from_slice(&[0, 0, 7, 0x6, 0, 0, 0, 0, 0]); // PING, 7 bytes (must be 8)
    hello.extend_from_slice(&[0; 7]);
    tls.write_all(&hello).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(STEP, tls.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection was not closed");
    // RFC 9113 names FRAME_SIZE_ERROR; the h2 crate answers PROTOCOL_ERROR. Either is a
    // connection error, never NO_ERROR.
    const PROTOCOL_ERROR: u32 = 0x1;
    const FRAME_SIZE_ERROR: u32 = 0x6;
    let codes = goaway_codes(&answer);
    assert!(
        matches!(codes[..], [PROTOCOL_ERROR] | [FRAME_SIZE_ERROR]),
        "GOAWAY codes {codes:?}"
    );

    let (mut send, _conn) = h2_client(&edge).await;
    assert_eq!(call(&mut send).await.1.as_deref(), Some("0"));
}

/// An HTTP/2 connection that opens no stream gets no longer than an HTTP/1 client gets for
/// its first request head, not the (minutes long) idle time between an agent's streams.
#[tokio::test]
async fn an_http2_connection_that_opens_no_stream_ends_at_the_request_head_deadline() {
    let (edge, _seen) = edge_before(
        AT_ONCE,
        u32::MAX,
        "[downstream]\nrequest_head_timeout = \"1s\"\nh2_idle_timeout = \"5m\"\n",
    )
    .await;
    let (_send, conn) = h2_client(&edge).await;
    let started = std::time::Instant::now();
    ended_with(conn).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a connection without streams lived {:?}",
        started.elapsed()
    );
    // Asked until it shows: under load one scrape of the admin port may time out (and
    // read as no metrics at all).
    eventually("the request-head timeout counted", STEP, || async {
        metric(
            &edge.metrics().await,
            "edge_timeouts_total{stage=\"request_head\"}",
        ) == 1.0
    })
    .await;
}
