//! Connection-level behaviour of the agent port over real sockets: kas's own maximum
//! connection age and the websocket message limits.

mod common;

use std::time::Duration;

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
        msg: Some(Msg::Descriptor(Descriptor::default())),
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
