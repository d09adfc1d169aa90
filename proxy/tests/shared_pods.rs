//! One client must not be able to hurt another through the edge's shared HTTP/2
//! connections to kas pods. The edge runs one worker here, so it keeps a single connection
//! to the one real kas pod and every agent's streams share it: legitimate agents hold a
//! configuration stream and an Echo stream on it while attackers that stay within every
//! edge limit try to make the pod close that connection (reset bursts) or to freeze it
//! (zero-window readers).

mod common;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use h2::client::SendRequest;
use h2::Reason;
use http::Request;
use hyper_util::rt::TokioIo;
use kas_proto::agent_configuration::agent_configuration_client::AgentConfigurationClient;
use kas_proto::agent_configuration::{ConfigurationRequest, ConfigurationResponse};
use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;
use kas_testkit::edge::{EdgeOptions, EdgeProfile};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

const CONFIGURATION: &str =
    "https://localhost/gitlab.agent.agent_configuration.rpc.AgentConfiguration/GetConfiguration";

/// A kas pod and an edge with one worker in front of it: one shared pod connection.
async fn one_shared_pod_connection() -> (Cluster, Edge) {
    one_shared_pod_connection_with("").await
}

/// [`one_shared_pod_connection`] with `extra` edge configuration.
async fn one_shared_pod_connection_with(extra: &str) -> (Cluster, Edge) {
    let cluster = Cluster::start(1).await;
    let options = EdgeOptions {
        threads: 1,
        ..EdgeTests::edge()
    };
    let host = ip(cluster.subnet, 250);
    let edge = Edge::launch(&options, host, &cluster.endpoints(), extra).await;
    edge.wait_healthy(1).await;
    (cluster, edge)
}

/// A legitimate agent holding a configuration stream and an Echo stream.
struct Agent {
    configuration: tonic::Streaming<ConfigurationResponse>,
    echo: Echo,
}

impl Agent {
    async fn connect(edge: &Edge) -> Self {
        let channel = edge.grpc_channel().await;
        let mut configuration = AgentConfigurationClient::new(channel.clone())
            .get_configuration(with_token(ConfigurationRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(STEP, configuration.message()).await;
        assert!(matches!(first, Ok(Ok(Some(_)))), "{first:?}");
        let mut echo = Echo::open(&channel).await;
        echo.round_trip("hello").await.unwrap();
        Self {
            configuration,
            echo,
        }
    }

    /// Whether both streams are still served: the configuration stream has not ended and
    /// the Echo stream answers `payload`.
    async fn still_served(&mut self, payload: Vec<u8>) -> Result<(), String> {
        match tokio::time::timeout(Duration::from_millis(200), self.configuration.message()).await {
            Err(_) | Ok(Ok(Some(_))) => {}
            Ok(ended) => return Err(format!("the configuration stream ended: {ended:?}")),
        }
        let len = payload.len();
        let answer = self.echo.round_trip(payload).await?;
        if answer.payload.len() != len {
            return Err(format!("echoed {} of {len} bytes", answer.payload.len()));
        }
        Ok(())
    }
}

/// An HTTP/2 connection to the edge from `source`, spoken with the h2 crate so the test
/// decides which frames go out together.
async fn raw_h2(edge: &Edge, source: IpAddr) -> SendRequest<Bytes> {
    let tls = tls_connect(edge.https, &edge.tls_client(&[b"h2"]), Some(source))
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send.ready().await.unwrap()
}

/// A configuration stream as an agent opens it, but without a token: the attacker needs
/// none.
fn configuration_request() -> Request<()> {
    Request::builder()
        .method("POST")
        .uri(CONFIGURATION)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Opens `n` streams and resets each: right behind its HEADERS (the same write) or,
/// with `gap`, all of them once `gap` has passed (the edge has forwarded them by then).
async fn reset_burst(send: &mut SendRequest<Bytes>, n: usize, gap: Option<Duration>) {
    let mut opened = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok((response, mut stream)) = send.send_request(configuration_request(), false) else {
            break;
        };
        match gap {
            None => stream.send_reset(Reason::CANCEL),
            Some(_) => opened.push((response, stream)),
        }
    }
    if let Some(gap) = gap {
        tokio::time::sleep(gap).await;
        for (_, mut stream) in opened {
            stream.send_reset(Reason::CANCEL);
        }
    }
}

/// Sixteen clients, each within every edge limit (20 streams cancelled before accept,
/// fewer than 100 cancels in 10 s), reset 20 streams each at the same instant, in rounds;
/// the pod's limit on streams reset before it accepted them is 20 per connection. No
/// legitimate stream on the shared pod connection may end.
#[tokio::test]
async fn reset_bursts_from_many_clients_never_close_the_shared_pod_connection() {
    let (cluster, edge) = one_shared_pod_connection().await;
    let mut agents = Vec::new();
    for _ in 0..3 {
        agents.push(Agent::connect(&edge).await);
    }
    let mut attackers = Vec::new();
    for i in 0..16 {
        attackers.push(raw_h2(&edge, ip(cluster.subnet, 100 + i)).await);
    }
    // Resets in the write that opened their streams, and resets a moment later (after the
    // edge forwarded the streams); 80 cancels per client in all.
    let gaps = [
        None,
        Some(Duration::from_millis(3)),
        None,
        Some(Duration::from_millis(1)),
    ];
    for gap in gaps {
        let start = Arc::new(tokio::sync::Barrier::new(attackers.len()));
        let bursts = attackers.iter().map(|send| {
            let (mut send, start) = (send.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                reset_burst(&mut send, 20, gap).await;
            })
        });
        for burst in futures_util::future::join_all(bursts).await {
            burst.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (i, agent) in agents.iter_mut().enumerate() {
            if let Err(e) = agent.still_served(b"after a burst".to_vec()).await {
                panic!("agent {i} lost a stream to a reset burst ({gap:?}): {e}");
            }
        }
    }
    let metrics = edge.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "edge_grpc_responses_total{grpc_status=\"UNAVAILABLE\"}"
        ),
        0.0,
        "{metrics}"
    );
}

/// However long a head the edge is configured to take, it never sends a pod a header list
/// h2 closes the connection over (more than 4 × kas's 16 KiB, as h2 weighs it: 32 bytes a
/// field on top): it answers itself (431; gRPC: RESOURCE_EXHAUSTED), and the agents on
/// the connection carry on.
#[tokio::test]
async fn a_header_list_a_pod_would_close_its_connection_over_is_answered_by_the_edge() {
    let extra = "[downstream]\nmax_request_header_bytes = 262144\n";
    let (cluster, edge) = one_shared_pod_connection_with(extra).await;
    let mut agent = Agent::connect(&edge).await;
    let mut send = raw_h2(&edge, ip(cluster.subnet, 140)).await;
    // 3,000 short fields: 33 KiB as the edge counts a head, 123 KiB as h2 does.
    let mut request = configuration_request();
    for i in 0..3000 {
        let name = http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap();
        request
            .headers_mut()
            .insert(name, http::HeaderValue::from_static("v"));
    }
    let (response, _body) = send.send_request(request, true).unwrap();
    let response = tokio::time::timeout(STEP, response).await.unwrap().unwrap();
    // gRPC: RESOURCE_EXHAUSTED, the edge's answer to a head over its limit.
    let status = response.headers().get("grpc-status");
    assert_eq!(
        status.map(|s| s.as_bytes()),
        Some(&b"8"[..]),
        "{response:?}"
    );
    agent
        .still_served(b"after a long head".to_vec())
        .await
        .unwrap();
}

/// A gRPC channel to the edge from `source` whose streams grant the edge no window: it
/// opens streams and never takes a byte of their answers.
async fn zero_window_channel(edge: &Edge, source: IpAddr) -> Channel {
    let (addr, tls) = (edge.https, edge.tls_client(&[b"h2"]));
    Endpoint::from_static("http://localhost")
        .initial_stream_window_size(0)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            async move {
                tls_connect(addr, &tls, Some(source))
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .unwrap()
}

/// Echo streams whose client sends and never reads: every message comes back to the edge
/// and stays there, and once the pod's answers back up, the pod stops reading the stream
/// too. Returns once each stream has its answer's head; `sent` counts the messages the
/// client got out.
async fn zero_window_reader(channel: &Channel, streams: usize, sent: &Arc<AtomicU64>) -> Vec<Held> {
    let mut held = Vec::new();
    for _ in 0..streams {
        // One message at a time, so `sent` counts what the connection took.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let answers = DiagnosticsClient::new(channel.clone())
            .echo(with_token(ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        let sent = sent.clone();
        // Far more than every window and buffer on the way: the sender stalls.
        let feed = tokio::spawn(async move {
            for _ in 0..256 {
                let ping = PingRequest {
                    payload: vec![b'z'; 128 * 1024],
                };
                if tx.send(ping).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
            std::future::pending::<()>().await;
        });
        held.push(Held { answers, feed });
    }
    held
}

/// A stream a zero-window reader holds.
struct Held {
    answers: tonic::Streaming<kas_proto::diagnostics::PingResponse>,
    feed: tokio::task::JoinHandle<()>,
}

impl Held {
    /// Waits (bounded) for the edge to end the stream; the error it ended with.
    async fn cut(&mut self) -> Result<tonic::Status, String> {
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            for _ in 0..1024 {
                match self.answers.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err("ended without an error".to_owned()),
                    Err(status) => return Ok(status),
                }
            }
            Err("answers kept coming".to_owned())
        })
        .await;
        ended.unwrap_or_else(|_| Err("still open after 30 s".to_owned()))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.feed.abort();
    }
}

/// Waits until `sent` stops moving for a second (at most 30 s): the attack's bytes have
/// filled every window and buffer they can.
async fn until_stalled(sent: &AtomicU64) {
    let mut last = u64::MAX;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = sent.load(Ordering::SeqCst);
        if now == last {
            return;
        }
        last = now;
    }
    panic!("the zero-window readers never stalled");
}

/// Clients that open Echo streams and never read their answers (a window of 0). Another
/// agent's streams on the same pod connection must still move a MiB each way:
/// - two readers with one stream each, all their bytes on it: the answers back up into
///   the pod, which stops reading those streams (what the pod's windows must absorb);
/// - then two readers with 16 streams each: the answers wait at the edge (what the edge's
///   windows must absorb). Those hold more stalled streams than a connection may and are
///   cut; the single-stream readers are within their share and are not.
#[tokio::test]
async fn zero_window_readers_do_not_freeze_other_agents_and_are_cut() {
    let (cluster, edge) = one_shared_pod_connection().await;
    let mut agent = Agent::connect(&edge).await;
    let big = vec![b'a'; 128 * 1024];
    agent.still_served(big.clone()).await.unwrap();

    let sent = Arc::new(AtomicU64::new(0));
    let mut channels = Vec::new();
    let mut held = Vec::new();
    for (phase, streams) in [(1, 1), (1, 1), (2, 16), (2, 16)] {
        let source = ip(cluster.subnet, 120 + channels.len() as u8);
        let channel = zero_window_channel(&edge, source).await;
        held.push(zero_window_reader(&channel, streams, &sent).await);
        channels.push(channel);
        if held.len() % 2 == 1 {
            continue;
        }
        until_stalled(&sent).await;
        for round in 0..8 {
            if let Err(e) = agent.still_served(big.clone()).await {
                panic!("phase {phase}: round {round} of a MiB each way stalled behind zero-window readers: {e}");
            }
        }
    }

    // The two readers with 16 stalled streams are cut; the single-stream ones are not.
    for (i, stream) in held[2..].iter_mut().flatten().enumerate() {
        if let Err(e) = stream.cut().await {
            panic!("stream {i} of a reader over its share was not cut: {e}");
        }
    }
    let metrics = edge.metrics().await;
    assert_eq!(
        metric(&metrics, "edge_policy_blocked_total{reason=\"h2_abuse\""),
        2.0,
        "{metrics}"
    );
    agent.still_served(big).await.unwrap();
    drop(channels);
}
