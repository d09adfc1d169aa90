//! kas over real sockets: h2c and websocket clients, the GitLab stand-in behind it.

mod common;

use std::time::Duration;

use common::{eventually, with_token, Harness, FORBIDDEN_TOKEN, TOKEN};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

use kas_proto::agent_configuration::agent_configuration_client::AgentConfigurationClient;
use kas_proto::agent_configuration::{ConfigurationRequest, ConfigurationResponse};
use kas_proto::agent_registrar::agent_registrar_client::AgentRegistrarClient;
use kas_proto::agent_registrar::RegisterRequest;
use kas_proto::agentcfg::LogLevelEnum;
use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::{PingRequest, PingResponse};
use kas_proto::reverse_tunnel::connect_request::Msg;
use kas_proto::reverse_tunnel::reverse_tunnel_client::ReverseTunnelClient;
use kas_proto::reverse_tunnel::{ConnectRequest, Descriptor};

const STEP: Duration = Duration::from_secs(10);

async fn next<T>(stream: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(STEP, stream.message())
        .await
        .expect("no message in time")
        .expect("stream failed")
        .expect("stream ended")
}

async fn config_stream(
    channel: Channel,
    commit_id: &str,
) -> tonic::Streaming<ConfigurationResponse> {
    AgentConfigurationClient::new(channel)
        .get_configuration(with_token(
            ConfigurationRequest {
                commit_id: commit_id.into(),
                ..Default::default()
            },
            TOKEN,
        ))
        .await
        .expect("GetConfiguration accepted")
        .into_inner()
}

#[tokio::test]
async fn configuration_is_streamed_over_h2c_and_websocket_and_resent_on_change() {
    let kas = Harness::start().await;
    let mut h2c = config_stream(kas.h2c_channel().await, "").await;
    let mut ws = config_stream(kas.ws_channel().await, "").await;

    let first_h2c = next(&mut h2c).await;
    let first_ws = next(&mut ws).await;
    for first in [&first_h2c, &first_ws] {
        let cfg = first.configuration.as_ref().unwrap();
        assert!(!first.commit_id.is_empty());
        assert_eq!(cfg.agent_id, kas.agent.agent_id);
        assert_eq!(cfg.project_id, kas.agent.project_id);
        assert_eq!(cfg.project_path, kas.agent.project_path);
        assert_eq!(cfg.gitlab_external_url, kas.gitlab.url());
        let level = cfg
            .observability
            .as_ref()
            .unwrap()
            .logging
            .as_ref()
            .unwrap()
            .level;
        assert_eq!(level, LogLevelEnum::Debug as i32);
    }
    assert_eq!(first_h2c.commit_id, first_ws.commit_id);

    kas.gitlab
        .write_agent_config(&kas.agent, "observability:\n  logging:\n    level: warn\n")
        .unwrap();
    for stream in [&mut h2c, &mut ws] {
        let second = next(stream).await;
        assert_ne!(second.commit_id, first_h2c.commit_id);
        let level = second
            .configuration
            .unwrap()
            .observability
            .unwrap()
            .logging
            .unwrap()
            .level;
        assert_eq!(level, LogLevelEnum::Warn as i32);
    }
}

#[tokio::test]
async fn a_known_commit_is_not_sent_again() {
    let kas = Harness::start().await;
    let mut stream = config_stream(kas.h2c_channel().await, "").await;
    let current = next(&mut stream).await.commit_id;
    drop(stream);

    // Reconnect with the commit the agent already has: the first message must be the
    // next commit, not a repeat of the current one.
    let mut resumed = config_stream(kas.ws_channel().await, &current).await;
    kas.gitlab
        .write_agent_config(&kas.agent, "observability:\n  logging:\n    level: error\n")
        .unwrap();
    let next_config = next(&mut resumed).await;
    assert_ne!(next_config.commit_id, current);
}

#[tokio::test]
async fn bad_and_refused_tokens_map_to_grpc_codes() {
    let kas = Harness::start().await;
    let mut client = AgentRegistrarClient::new(kas.h2c_channel().await);
    let cases = [
        (Some("glagent-wrong"), Code::Unauthenticated),
        (Some(FORBIDDEN_TOKEN), Code::PermissionDenied),
        (None, Code::Unauthenticated),
    ];
    for (token, code) in cases {
        let request = match token {
            Some(t) => with_token(RegisterRequest::default(), t),
            None => tonic::Request::new(RegisterRequest::default()),
        };
        let status = client.register(request).await.unwrap_err();
        assert_eq!(status.code(), code, "token {token:?}: {status:?}");
    }
    client
        .register(with_token(RegisterRequest::default(), TOKEN))
        .await
        .expect("good token registers");
}

#[tokio::test]
async fn gitlab_down_is_unavailable_and_not_cached() {
    let kas = Harness::start().await;
    let mut client = AgentRegistrarClient::new(kas.ws_channel().await);
    kas.gitlab.set_down(true);
    let status = client
        .register(with_token(RegisterRequest::default(), TOKEN))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    kas.gitlab.set_down(false);
    client
        .register(with_token(RegisterRequest::default(), TOKEN))
        .await
        .expect("works again once GitLab is back");
}

#[tokio::test]
async fn gitlab_unreachable_is_unavailable() {
    let kas = Harness::start_with(|cfg| {
        // Nothing listens on port 1 of loopback: connection refused.
        cfg.gitlab.address = "http://127.0.0.1:1".into();
    })
    .await;
    let status = AgentRegistrarClient::new(kas.h2c_channel().await)
        .register(with_token(RegisterRequest::default(), TOKEN))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
}

#[tokio::test]
async fn the_jwt_sent_to_gitlab_verifies_with_the_shared_secret() {
    let kas = Harness::start().await;
    AgentRegistrarClient::new(kas.h2c_channel().await)
        .register(with_token(RegisterRequest::default(), TOKEN))
        .await
        .unwrap();
    let jwt = kas.gitlab.last_jwt().expect("kas sent a JWT");
    let claims = kas::gitlab::verify_api_request_jwt(&jwt, &kas.secret).expect("verifies");
    assert_eq!(claims.iss, "gitlab-kas");
    assert_eq!(claims.aud, vec!["gitlab".to_string()]);
    assert!(claims.exp > claims.iat && claims.exp - claims.iat <= 60);
    assert!(claims.nbf <= claims.iat);
    let other = kas::gitlab::SharedSecret::generate();
    assert!(kas::gitlab::verify_api_request_jwt(&jwt, &other).is_err());
}

#[tokio::test]
async fn successful_authentication_is_cached() {
    let kas = Harness::start().await;
    let mut client = AgentRegistrarClient::new(kas.h2c_channel().await);
    for _ in 0..5 {
        client
            .register(with_token(RegisterRequest::default(), TOKEN))
            .await
            .unwrap();
    }
    assert_eq!(kas.gitlab.agent_info_requests(), 1);
}

async fn echo_for(channel: Channel, rounds: u32) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = DiagnosticsClient::new(channel)
        .echo(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    for i in 0..rounds {
        let payload = format!("ping {i}").into_bytes();
        tx.send(PingRequest {
            payload: payload.clone(),
        })
        .await
        .unwrap();
        let PingResponse { payload: back, pod } = next(&mut responses).await;
        assert_eq!(back, payload);
        assert_eq!(pod, "kas-test");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(tx);
    assert!(tokio::time::timeout(STEP, responses.message())
        .await
        .unwrap()
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn bidirectional_stream_holds_for_seconds_over_both_transports() {
    let kas = Harness::start().await;
    let (h2c, ws) = (kas.h2c_channel().await, kas.ws_channel().await);
    tokio::join!(echo_for(h2c, 12), echo_for(ws, 12));
}

#[tokio::test]
async fn reverse_tunnel_parks_after_its_descriptor() {
    let kas = Harness::start().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ConnectRequest {
        msg: Some(Msg::Descriptor(Descriptor {
            agent_descriptor: Some(kas::tunnel::kubernetes_api_descriptor()),
        })),
    })
    .await
    .unwrap();
    let mut inbound = ReverseTunnelClient::new(kas.ws_channel().await)
        .connect(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    // Parked: nothing arrives while the agent holds the tunnel.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), inbound.message())
            .await
            .is_err()
    );
    let (_, obs) = kas.http_get("/metrics").await;
    assert!(
        obs.contains("kas_open_streams{method=\"Connect\"} 1"),
        "{obs}"
    );
    assert!(
        obs.contains("kas_reverse_tunnels{state=\"ready\"} 1"),
        "{obs}"
    );
    drop(tx);
    let end = tokio::time::timeout(STEP, inbound.message()).await.unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
}

#[tokio::test]
async fn a_descriptor_must_describe_the_agent() {
    let kas = Harness::start().await;
    for descriptor in [
        Descriptor::default(),
        Descriptor {
            agent_descriptor: Some(
                kas_proto::gitlab::agent::reverse_tunnel::info::AgentDescriptor {
                    services: vec![kas_proto::gitlab::agent::reverse_tunnel::info::Service {
                        name: String::new(),
                        methods: vec![],
                    }],
                },
            ),
        },
    ] {
        let first = ConnectRequest {
            msg: Some(Msg::Descriptor(descriptor)),
        };
        let status = ReverseTunnelClient::new(kas.h2c_channel().await)
            .connect(with_token(tokio_stream::iter(vec![first]), TOKEN))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
}

#[tokio::test]
async fn a_tunnel_must_start_with_its_descriptor() {
    let kas = Harness::start().await;
    let first = ConnectRequest {
        msg: Some(Msg::Message(Default::default())),
    };
    let status = ReverseTunnelClient::new(kas.h2c_channel().await)
        .connect(with_token(tokio_stream::iter(vec![first]), TOKEN))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn observability_port_reports_health_and_metrics() {
    let kas = Harness::start().await;
    assert_eq!(kas.http_get("/liveness").await.0, 200);
    assert_eq!(kas.http_get("/readiness").await.0, 200);
    assert_eq!(kas.http_get("/nope").await.0, 404);
    let _ws = {
        let channel = kas.ws_channel().await;
        let mut c = DiagnosticsClient::new(channel.clone());
        c.ping(with_token(PingRequest::default(), TOKEN))
            .await
            .unwrap();
        channel
    };
    let _h2 = {
        let channel = kas.h2c_channel().await;
        let mut c = DiagnosticsClient::new(channel.clone());
        c.ping(with_token(PingRequest::default(), TOKEN))
            .await
            .unwrap();
        channel
    };
    let (status, metrics) = kas.http_get("/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "kas_connected_agents{transport=\"websocket\"} 1",
        "kas_connected_agents{transport=\"grpc\"} 1",
        "kas_auth_results_total{outcome=\"ok\"} 1",
        "kas_auth_results_total{outcome=\"cached_ok\"} 1",
        "kas_gitlab_api_request_duration_seconds_count{endpoint=\"agent_info\",outcome=\"ok\"} 1",
        "kas_ready 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
}

/// Real kas's `observability.*.url_path`: the probes and the metrics answer where the
/// configuration puts them, the default paths are 404, and the readiness probe still turns
/// 503 at shutdown.
#[tokio::test]
async fn observability_paths_follow_the_configuration() {
    let mut kas = Harness::start_with(|cfg| {
        cfg.observability.liveness_probe.url_path = "/-/live".into();
        cfg.observability.readiness_probe.url_path = "/-/ready".into();
        cfg.observability.prometheus.url_path = "/-/prometheus".into();
    })
    .await;
    assert_eq!(kas.http_get("/-/live").await, (200, "ok\n".into()));
    assert_eq!(kas.http_get("/-/ready").await, (200, "ready\n".into()));
    let (status, metrics) = kas.http_get("/-/prometheus").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("kas_ready 1"), "{metrics}");
    for default in ["/liveness", "/readiness", "/metrics"] {
        let (status, body) = kas.http_get(default).await;
        assert_eq!(status, 404, "{default}");
        assert!(body.contains("/-/ready"), "the 404 names the paths: {body}");
    }
    kas.begin_shutdown();
    eventually("the custom readiness path turns 503", STEP, || async {
        kas.http_get("/-/ready").await.0 == 503
    })
    .await;
    assert_eq!(kas.http_get("/-/live").await.0, 200);
}

#[tokio::test]
async fn websocket_needs_the_ws_tunnel_subprotocol_and_plain_http_is_refused() {
    let kas = Harness::start().await;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let request = format!("ws://{}/", kas.agent_addr)
        .into_client_request()
        .unwrap();
    let err = tokio_tungstenite::connect_async(request).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 400)
        }
        other => panic!("expected an HTTP 400, got {other:?}"),
    }
    let (status, body) = common::http_get(kas.agent_addr, "/").await;
    assert_eq!(status, 400);
    assert!(body.contains("kas agent port"), "{body}");
}

#[tokio::test]
async fn drain_order_readiness_first_then_listener_then_streams_at_deadline() {
    let mut kas = Harness::start_with(|cfg| {
        cfg.shutdown.readiness_delay = Duration::from_millis(1500);
        cfg.shutdown.drain_deadline = Duration::from_secs(3);
    })
    .await;
    // An agent holding a configuration stream and an echo stream over a websocket.
    let channel = kas.ws_channel().await;
    let mut config = config_stream(channel.clone(), "").await;
    next(&mut config).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut echo = DiagnosticsClient::new(channel.clone())
        .echo(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();

    kas.begin_shutdown();
    eventually("readiness 503", STEP, || async {
        kas.http_get("/readiness").await.0 == 503
    })
    .await;
    // Readiness is 503 but the listener still takes new agents.
    let mut late = AgentRegistrarClient::new(kas.h2c_channel().await);
    late.register(with_token(RegisterRequest::default(), TOKEN))
        .await
        .expect("listener still open while readiness is 503");

    let addr = kas.agent_addr;
    eventually("listener closed", STEP, || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    // The listener is closed, yet the open streams keep working.
    tx.send(PingRequest {
        payload: b"still here".to_vec(),
    })
    .await
    .unwrap();
    assert_eq!(next(&mut echo).await.payload, b"still here");
    kas.gitlab
        .write_agent_config(&kas.agent, "observability:\n  logging:\n    level: error\n")
        .unwrap();
    next(&mut config).await;

    // At the deadline the streams end cleanly (OK) and kas exits.
    let end = tokio::time::timeout(STEP, config.message()).await.unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    let end = tokio::time::timeout(STEP, echo.next()).await.unwrap();
    assert!(end.is_none(), "{end:?}");
    let result = tokio::time::timeout(STEP, kas.task.take().unwrap())
        .await
        .unwrap();
    result.unwrap().unwrap();
}
