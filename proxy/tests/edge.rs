//! The edge over real sockets: TLS handshakes, gRPC over HTTP/2 and over websocket through
//! the `kas-edge` binary to real kas pods, pod health and balancing, drain on SIGTERM.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Code;

use kas_proto::agent_configuration::agent_configuration_client::AgentConfigurationClient;
use kas_proto::agent_configuration::ConfigurationRequest;
use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;

async fn ping(channel: &Channel) -> Result<String, tonic::Status> {
    let response = DiagnosticsClient::new(channel.clone())
        .ping(with_token(PingRequest {
            payload: b"hi".to_vec(),
        }))
        .await?;
    Ok(response.into_inner().pod)
}

#[tokio::test]
async fn tls_alpn_offers_h2_and_http11() {
    let cluster = Cluster::start(1).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    for (offer, expect) in [
        (vec![&b"h2"[..], b"http/1.1"], &b"h2"[..]),
        (vec![&b"http/1.1"[..]], b"http/1.1"),
    ] {
        let tls = tls_connect(edge.https, &edge.tls_client(&offer), None)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(expect));
    }
    let admin = edge.admin;
    eventually("two completed handshakes counted", STEP, || async move {
        http_get(admin, "/metrics").await.is_some_and(|(_, m)| {
            m.contains("edge_tls_handshakes_total{result=\"completed\"} 2")
                && m.contains("edge_tls_handshakes_total{result=\"started\"} 2")
                && m.contains("edge_tls_handshake_seconds_count 2")
        })
    })
    .await;
}

/// `kas-edge run` starts itself again with glibc's malloc set up for bursts (no per-thread
/// caches: `support/memory.rs`): the process the operator started (same pid, what systemd
/// and the kubelet signal) runs with the setting in its environment, where glibc reads it
/// at start, and serves.
#[tokio::test]
async fn the_edge_runs_with_its_malloc_setting_under_the_pid_it_was_started_as() {
    let cluster = Cluster::start(1).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    edge.wait_healthy(1).await;
    assert!(ping(&edge.grpc_channel().await)
        .await
        .unwrap()
        .starts_with("kas-"));
    let pid = edge.child.id();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    for expected in [
        &b"KAS_EDGE_MALLOC_TUNED=1"[..],
        b"GLIBC_TUNABLES=glibc.malloc.tcache_count=0",
    ] {
        assert!(
            environ.contains(&expected),
            "pid {pid} runs without {}: {:?}",
            String::from_utf8_lossy(expected),
            environ
                .iter()
                .map(|v| String::from_utf8_lossy(v))
                .collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn grpc_unary_server_streaming_and_bidi_pass_through_with_trailers() {
    let cluster = Cluster::start(2).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    edge.wait_healthy(2).await;
    let channel = edge.grpc_channel().await;

    // Unary, and an error status carried in trailers end to end.
    assert!(ping(&channel).await.unwrap().starts_with("kas-"));
    let mut bad = tonic::Request::new(PingRequest::default());
    bad.metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    let status = DiagnosticsClient::new(channel.clone())
        .ping(bad)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), "unauthenticated");

    // Server streaming: the configuration, then again after a change.
    let mut config = AgentConfigurationClient::new(channel.clone())
        .get_configuration(with_token(ConfigurationRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(STEP, config.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first.configuration.unwrap().agent_id,
        cluster.agent.agent_id
    );
    cluster
        .gitlab
        .write_agent_config(
            &cluster.agent,
            "observability:\n  logging:\n    level: warn\n",
        )
        .unwrap();
    let second = tokio::time::timeout(STEP, config.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_ne!(second.commit_id, first.commit_id);

    // Bidirectional, many messages each way.
    let mut echo = Echo::open(&channel).await;
    for i in 0..20 {
        let text = format!("message {i}");
        assert_eq!(
            echo.round_trip(text.as_str()).await.unwrap().payload,
            text.as_bytes()
        );
    }
    // Clean end: the server's OK trailers arrive after the client closes its side.
    drop(echo.tx);
    let end = tokio::time::timeout(STEP, echo.rx.message()).await.unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
}

#[tokio::test]
async fn websocket_carries_grpc_through_the_edge() {
    let cluster = Cluster::start(2).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    edge.wait_healthy(2).await;
    let channel = edge.ws_channel().await.unwrap();
    assert!(ping(&channel).await.unwrap().starts_with("kas-"));
    let mut config = AgentConfigurationClient::new(channel.clone())
        .get_configuration(with_token(ConfigurationRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(STEP, config.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!first.commit_id.is_empty());
    let mut echo = Echo::open(&channel).await;
    for i in 0..10 {
        assert!(echo.round_trip(format!("ws {i}")).await.is_ok());
    }
    let metrics = edge.metrics().await;
    assert!(
        metrics.contains("edge_active_streams{protocol=\"websocket\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edge_open_connections_by_alpn{alpn=\"http/1.1\"} 1"),
        "{metrics}"
    );
    // The edge's own readiness probe of its TLS port is not a failed client handshake.
    assert!(
        !edge.log().contains("Downstream handshake error"),
        "{}",
        edge.log()
    );
}

/// Regression for cloudflare/pingora#946: pingora's HTTP/1 proxy loop ended a tunnel whose
/// `101` it read before the upgrade request's own empty body, so about one agent in a
/// thousand got the `101` and then EOF. kas answers the upgrade at once (the losing order
/// for pingora), so many agents at once are what exposes it; every one must get through.
#[tokio::test]
async fn every_one_of_many_concurrent_websocket_agents_gets_a_working_tunnel() {
    let cluster = Cluster::start(2).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    edge.wait_healthy(2).await;
    let (agents, batch) = (400, 50);
    let mut failures = Vec::new();
    for _ in 0..agents / batch {
        let rounds = (0..batch).map(|_| async {
            let channel = edge.ws_channel().await.map_err(|e| format!("{e:?}"))?;
            let mut echo = Echo::open(&channel).await;
            echo.round_trip("first").await?;
            echo.round_trip("second").await.map(|_| ())
        });
        for result in futures_util::future::join_all(rounds).await {
            if let Err(e) = result {
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {agents} failed: {failures:?}",
        failures.len()
    );
    // Every tunnel is in the access log with its client, bytes both ways and how it ended.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = edge.log();
    let tunnels: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access" && v["protocol"] == "websocket")
        .collect();
    assert_eq!(tunnels.len(), agents, "{log}");
    for t in &tunnels {
        assert_eq!(t["status"], 101, "{t}");
        assert_eq!(t["client"], "127.0.0.1", "{t}");
        assert!(t["bytes_in"].as_u64().unwrap() > 0, "{t}");
        assert!(t["bytes_out"].as_u64().unwrap() > 0, "{t}");
        // The agents hang up (GOAWAY, then close): the pod or the agent side ends first.
        let end = t["tunnel_end"].as_str().unwrap();
        assert!(
            ["agent_closed", "agent_error", "pod_closed"].contains(&end),
            "{t}"
        );
    }
}

/// A pod that refuses the upgrade is relayed as it answered (status and body), and the
/// agent's connection is closed rather than left as a half-made tunnel.
#[tokio::test]
async fn a_refused_upgrade_reaches_the_agent_as_the_pod_sent_it() {
    let cluster = Cluster::start(1).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    edge.wait_healthy(1).await;
    let mut tls = tls_connect(edge.https, &edge.tls_client(&[b"http/1.1"]), None)
        .await
        .unwrap();
    // No Sec-WebSocket-Version: kas answers 426 and names the version it speaks.
    tls.write_all(
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, tls.read_to_end(&mut answer))
        .await
        .expect("the edge closes the connection after a refused upgrade")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert!(answer.contains("sec-websocket-version: 13"), "{answer}");
    assert!(
        answer.ends_with("websocket version 13 required\n"),
        "{answer}"
    );
}

#[tokio::test]
async fn idle_websocket_outlives_pingoras_default_timeout() {
    // Must exceed pingora's 60 s HTTP/1 read timeout; shorter only for local iteration.
    let idle: u64 = std::env::var("KAS_EDGE_IDLE_TEST_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(65);
    let cluster = Cluster::start(1).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    edge.wait_healthy(1).await;
    let channel = edge.ws_channel().await.unwrap();
    let mut echo = Echo::open(&channel).await;
    echo.round_trip("before").await.unwrap();
    tokio::time::sleep(Duration::from_secs(idle)).await;
    echo.round_trip("after an idle minute").await.unwrap();
}

#[tokio::test]
async fn unready_pod_gets_no_new_connections_and_keeps_its_open_ones() {
    let mut cluster = Cluster::start(2).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    edge.wait_healthy(2).await;
    // One websocket agent on each pod.
    let (a, b) = (
        edge.ws_channel().await.unwrap(),
        edge.ws_channel().await.unwrap(),
    );
    let (mut echo_a, mut echo_b) = (Echo::open(&a).await, Echo::open(&b).await);
    let pod_a = echo_a.round_trip("a").await.unwrap().pod;
    let pod_b = echo_b.round_trip("b").await.unwrap().pod;
    assert_ne!(
        pod_a, pod_b,
        "least in-flight puts the two agents on different pods"
    );

    let draining = cluster.pods.iter_mut().find(|p| p.name == pod_a).unwrap();
    draining.begin_shutdown();
    edge.wait_healthy(1).await;

    for _ in 0..6 {
        let channel = edge.ws_channel().await.unwrap();
        assert_eq!(
            ping(&channel).await.unwrap(),
            pod_b,
            "new agents avoid the unready pod"
        );
    }
    assert_eq!(echo_a.round_trip("still here").await.unwrap().pod, pod_a);
}

#[tokio::test]
async fn killed_pod_agents_reconnect_to_a_healthy_one() {
    let mut cluster = Cluster::start(2).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    edge.wait_healthy(2).await;
    let first = edge.ws_channel().await.unwrap();
    let mut echo = Echo::open(&first).await;
    let victim = echo.round_trip("x").await.unwrap().pod;
    cluster
        .pods
        .iter_mut()
        .find(|p| p.name == victim)
        .unwrap()
        .kill();

    // The agent's stream is cut with the pod...
    let cut = echo.round_trip("y").await;
    assert!(cut.is_err(), "{cut:?}");
    // ...and reconnecting lands on the survivor at once: connect failures to the dead
    // pod are retried elsewhere before its health check even notices.
    for _ in 0..5 {
        let channel = edge.ws_channel().await.unwrap();
        let pod = ping(&channel).await.unwrap();
        assert_ne!(pod, victim);
    }
}

#[tokio::test]
async fn least_in_flight_spreads_30_agents_over_3_pods() {
    let cluster = Cluster::start(3).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    edge.wait_healthy(3).await;
    let mut channels = Vec::new();
    let mut per_pod: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let channel = edge.ws_channel().await.unwrap();
        *per_pod.entry(ping(&channel).await.unwrap()).or_default() += 1;
        channels.push(channel);
    }
    assert_eq!(per_pod.len(), 3, "{per_pod:?}");
    for (pod, n) in &per_pod {
        assert!((9..=11).contains(n), "{pod} has {n}: {per_pod:?}");
    }
}

#[tokio::test]
async fn no_healthy_pod_answers_grpc_14_and_http_503_promptly() {
    let cluster = Cluster::start(0).await;
    // Addresses where nothing listens.
    let nowhere = [std::net::SocketAddr::new(
        ip(cluster.subnet, 10),
        AGENT_PORT,
    )];
    let edge = Edge::start(cluster.subnet, &nowhere, "").await;
    let channel = edge.grpc_channel().await;
    let status = tokio::time::timeout(Duration::from_secs(5), ping(&channel))
        .await
        .expect("prompt")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let mut tls = tls_connect(edge.https, &edge.tls_client(&[b"http/1.1"]), None)
        .await
        .unwrap();
    tls.write_all(
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("prompt")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
}

#[tokio::test]
async fn plain_http_redirects_to_https_and_answers_health() {
    let cluster = Cluster::start(0).await;
    let edge = Edge::start(
        cluster.subnet,
        &[std::net::SocketAddr::new(
            ip(cluster.subnet, 10),
            AGENT_PORT,
        )],
        "",
    )
    .await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = client
        .get(format!("http://{}/some/path?x=1", edge.http))
        .header("host", "kas.example.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        format!(
            "https://kas.example.test:{}/some/path?x=1",
            edge.https.port()
        )
    );
    assert_eq!(http_get(edge.http, "/healthz").await.unwrap().0, 200);
}

#[tokio::test]
async fn sigterm_drains_readiness_first_then_listener_then_streams() {
    let cluster = Cluster::start(1).await;
    let edge = Edge::start(
        cluster.subnet,
        &cluster.endpoints(),
        "[shutdown]\nreadiness_delay = \"2s\"\ndrain_deadline = \"4s\"\n",
    )
    .await;
    edge.wait_healthy(1).await;
    let channel = edge.ws_channel().await.unwrap();
    let mut echo = Echo::open(&channel).await;
    echo.round_trip("before").await.unwrap();

    edge.signal("TERM");
    let admin = edge.admin;
    eventually("readyz 503", STEP, || async move {
        matches!(http_get(admin, "/readyz").await, Some((503, _)))
    })
    .await;
    // Readiness is 503 but new agents are still accepted during the delay.
    let late = edge
        .ws_channel()
        .await
        .expect("listener open during readiness delay");
    assert!(ping(&late).await.is_ok());

    let https = edge.https;
    eventually("listener closed", STEP, || async move {
        tokio::net::TcpStream::connect(https).await.is_err()
    })
    .await;
    // The open websocket keeps working after the listener closed.
    assert_eq!(
        echo.round_trip("during drain").await.unwrap().payload,
        b"during drain"
    );

    let mut child = edge;
    let deadline = std::time::Instant::now() + STEP;
    let status = loop {
        if let Some(status) = child.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "edge did not exit after the drain deadline"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "exit status {status}");
    assert!(
        echo.round_trip("after").await.is_err(),
        "the tunnel ends with the process"
    );
}

#[tokio::test]
async fn max_connection_age_closes_old_connections_when_enabled() {
    let cluster = Cluster::start(1).await;
    let edge = Edge::start(
        cluster.subnet,
        &cluster.endpoints(),
        "[downstream]\nmax_connection_age = \"2s\"\nmax_connection_age_jitter = 0.0\n",
    )
    .await;
    edge.wait_healthy(1).await;
    let channel = edge.ws_channel().await.unwrap();
    let mut echo = Echo::open(&channel).await;
    echo.round_trip("young").await.unwrap();
    let opened = std::time::Instant::now();
    loop {
        if echo.round_trip("still there?").await.is_err() {
            break;
        }
        assert!(
            opened.elapsed() < STEP,
            "the connection outlived its maximum age"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A reconnect works at once.
    assert!(ping(&edge.ws_channel().await.unwrap()).await.is_ok());
}

/// A stand-in kas pod on `ip`: `/readiness` answers 200 on the health port; the agent port
/// answers one upgrade with `101` and then echoes every byte.
async fn echo_pod(ip: std::net::IpAddr) -> std::net::SocketAddr {
    use tokio::net::TcpListener;
    serve_readiness(ip).await;
    let agents = TcpListener::bind((ip, AGENT_PORT)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = agents.accept().await {
            tokio::spawn(async move {
                let Some(_head) = kas_testkit::clients::read_http_head(&mut sock).await else {
                    return;
                };
                let _ = sock
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .await;
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    std::net::SocketAddr::new(ip, AGENT_PORT)
}

/// An eager client sends its first tunnel bytes in the same write as the upgrade request,
/// before the `101`. pingora has read them with the request head; they must still reach the
/// pod, not vanish with pingora's buffers when the edge takes the connection over.
#[tokio::test]
async fn bytes_sent_with_the_upgrade_request_reach_the_pod() {
    let subnet = next_subnet();
    let pod = echo_pod(ip(subnet, 10)).await;
    let edge = Edge::start(subnet, &[pod], "").await;
    edge.wait_healthy(1).await;
    let mut tls = tls_connect(edge.https, &edge.tls_client(&[b"http/1.1"]), None)
        .await
        .unwrap();
    tls.write_all(
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\
          eager-bytes",
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let done = |seen: &[u8]| String::from_utf8_lossy(seen).ends_with("eager-bytes");
    while !done(&seen) {
        let n = tokio::time::timeout(STEP, tls.read(&mut buf))
            .await
            .expect("the pod's echo arrives")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.starts_with("HTTP/1.1 101"), "{seen}");
    // And the tunnel keeps working afterwards.
    tls.write_all(b"later").await.unwrap();
    let n = tokio::time::timeout(STEP, tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"later");
}

/// GitOps through the edge, as a `wss://` agent: the manifests of the project its
/// configuration names (read through Gitaly), then, on the stream it opens with that
/// commit, the next commit's manifests.
#[tokio::test]
async fn a_gitops_agent_gets_its_manifests_and_their_next_commit_through_the_edge() {
    use kas::dev::gitlab_standin::StandinProject;
    use kas_proto::gitops::gitops_client::GitopsClient;
    use kas_proto::gitops::path_cf::Path;
    use kas_proto::gitops::{ObjectsToSynchronizeRequest, PathCf};
    use kas_testkit::gitops::read_batch;

    let cluster = Cluster::start_with(2, |c| {
        c.gitops.poll_interval = Duration::from_millis(100);
    })
    .await;
    let manifests = StandinProject {
        project_id: 77,
        project_path: "ops/manifests".into(),
        default_branch: "main".into(),
        relative_path: None,
    };
    cluster.gitlab.add_project(manifests.clone());
    let first = cluster
        .gitlab
        .commit_files(
            &manifests,
            &[("deploy/app.yaml", Some(b"kind: Deployment\n"))],
        )
        .unwrap();
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    edge.wait_healthy(2).await;
    let channel = edge.ws_channel().await.unwrap();
    let request = |commit: &str| {
        with_token(ObjectsToSynchronizeRequest {
            project_id: "ops/manifests".into(),
            commit_id: commit.into(),
            paths: vec![PathCf {
                path: Some(Path::Glob("deploy/*.yaml".into())),
            }],
            r#ref: None,
        })
    };
    let mut stream = GitopsClient::new(channel.clone())
        .get_objects_to_synchronize(request(""))
        .await
        .unwrap()
        .into_inner();
    let (commit, files) = read_batch(&mut stream, 77, STEP).await.unwrap();
    assert_eq!(commit, first);
    assert_eq!(
        files.get("deploy/app.yaml").map(String::as_str),
        Some("kind: Deployment\n")
    );

    let mut waiting = GitopsClient::new(channel)
        .get_objects_to_synchronize(request(&commit))
        .await
        .unwrap()
        .into_inner();
    let second = cluster
        .gitlab
        .commit_files(
            &manifests,
            &[("deploy/app.yaml", Some(b"kind: Deployment\nreplicas: 3\n"))],
        )
        .unwrap();
    let (commit, files) = read_batch(&mut waiting, 77, STEP).await.unwrap();
    assert_eq!(commit, second);
    assert_eq!(
        files.get("deploy/app.yaml").map(String::as_str),
        Some("kind: Deployment\nreplicas: 3\n")
    );
}
