//! The edge's tests on kas-testkit: a GitLab stand-in and kas pods on their own loopback
//! addresses, and this package's `kas-edge` binary in front with a generated self-signed
//! certificate. The token, the pods' timings and how the edge runs are this crate's.
#![allow(dead_code, unused_imports)]

use std::time::Duration;

use kas::Config;
use kas_testkit::edge::{EdgeOptions, EdgeProfile};
use kas_testkit::Profile;

pub use kas_testkit::clients::{
    grpc_channel, http_get, tls_connect, tls_connector, tls_connector_trusting, ws_channel,
};
pub use kas_testkit::metrics::{metric, metric_value};
pub use kas_testkit::net::{ip, next_subnet};
pub use kas_testkit::pods::{serve_readiness, AGENT_PORT, HEALTH_PORT};
pub use kas_testkit::wait::{eventually, STEP};

pub const TOKEN: &str = "glagent-edge-test-token";

pub struct EdgeTests;

impl Profile for EdgeTests {
    const TOKEN: &'static str = TOKEN;

    fn pod_config(config: &mut Config) {
        config.agent_configuration.poll_interval = Duration::from_millis(200);
        config.shutdown.readiness_delay = Duration::from_secs(30);
        config.shutdown.drain_deadline = Duration::from_secs(30);
    }
}

impl EdgeProfile for EdgeTests {
    fn edge() -> EdgeOptions {
        EdgeOptions::new(env!("CARGO_BIN_EXE_kas-edge"))
    }
}

pub type Cluster = kas_testkit::pods::Cluster<EdgeTests>;
pub type Edge = kas_testkit::edge::Edge<EdgeTests>;

/// `message` with this crate's [`TOKEN`], as agentk sends it.
pub fn with_token<T>(message: T) -> tonic::Request<T> {
    kas_testkit::clients::with_token(message, TOKEN)
}

/// A TLS handshake with the edge from `client` (within [`STEP`]).
pub async fn tls_from(edge: &Edge, client: std::net::IpAddr) -> std::io::Result<()> {
    tokio::time::timeout(
        STEP,
        tls_connect(edge.https, &edge.tls_client(&[b"h2"]), Some(client)),
    )
    .await
    .map_err(|_| std::io::Error::other("timeout"))?
    .map(|_| ())
}

/// A Diagnostics Ping over a new `wss://` tunnel from `client`; the pod that answered.
pub async fn ping_from(edge: &Edge, client: std::net::IpAddr) -> Result<String, String> {
    use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
    let channel = ws_channel(edge.https, edge.tls_client(&[b"http/1.1"]), Some(client))
        .await
        .map_err(|e| e.to_string())?;
    DiagnosticsClient::new(channel)
        .ping(with_token(kas_proto::diagnostics::PingRequest::default()))
        .await
        .map(|r| r.into_inner().pod)
        .map_err(|e| e.to_string())
}

/// A `wss://` tunnel from `client`, proven by one Ping.
pub async fn tunnel(
    edge: &Edge,
    client: std::net::IpAddr,
) -> kas_proto::diagnostics::diagnostics_client::DiagnosticsClient<tonic::transport::Channel> {
    let channel = ws_channel(edge.https, edge.tls_client(&[b"http/1.1"]), Some(client))
        .await
        .unwrap();
    let mut c = kas_proto::diagnostics::diagnostics_client::DiagnosticsClient::new(channel);
    c.ping(with_token(kas_proto::diagnostics::PingRequest::default()))
        .await
        .unwrap();
    c
}

/// How long after `since` the tunnel stopped answering Pings (asked every 20 ms); panics
/// naming `what` when it still answers a step later.
pub async fn cut_after(
    tunnel: &mut kas_proto::diagnostics::diagnostics_client::DiagnosticsClient<
        tonic::transport::Channel,
    >,
    since: std::time::Instant,
    what: &str,
) -> Duration {
    loop {
        let ping = with_token(kas_proto::diagnostics::PingRequest::default());
        if tunnel.ping(ping).await.is_err() {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < STEP,
            "{what}: the tunnel was never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An Echo stream (`kas_edge.diagnostics.v1.Diagnostics/Echo`), held open to exchange
/// messages one round trip at a time, as an agent holds its streams.
pub struct Echo {
    pub tx: tokio::sync::mpsc::Sender<kas_proto::diagnostics::PingRequest>,
    pub rx: tonic::Streaming<kas_proto::diagnostics::PingResponse>,
}

impl Echo {
    pub async fn open(channel: &tonic::transport::Channel) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let rx =
            kas_proto::diagnostics::diagnostics_client::DiagnosticsClient::new(channel.clone())
                .echo(with_token(tokio_stream::wrappers::ReceiverStream::new(rx)))
                .await
                .unwrap()
                .into_inner();
        Self { tx, rx }
    }

    /// Sends `payload` and waits (at most [`STEP`]) for it to come back.
    pub async fn round_trip(
        &mut self,
        payload: impl Into<Vec<u8>>,
    ) -> Result<kas_proto::diagnostics::PingResponse, String> {
        let request = kas_proto::diagnostics::PingRequest {
            payload: payload.into(),
        };
        self.tx.send(request).await.map_err(|e| e.to_string())?;
        match tokio::time::timeout(STEP, self.rx.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            other => Err(format!("{other:?}")),
        }
    }
}
