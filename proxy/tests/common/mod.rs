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
