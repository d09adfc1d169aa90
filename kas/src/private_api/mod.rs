//! The kas fleet: how a pod reaches an agent whose tunnels are on another pod.
//!
//! - [`gateway`]: the private API's service (real kas's `:8155`): another pod asks for one
//!   of an agent's tunnels here and streams its call through it.
//! - [`router`]: the [`crate::tunnel::Router`] the Kubernetes API proxy uses in a fleet:
//!   this pod first, then the pods Redis names, whichever has a tunnel first.
//! - `pool`: channels to the other pods. `codec`: raw gRPC messages. `own_url`: the URL
//!   this pod registers for itself (`OWN_PRIVATE_API_URL`, `OWN_PRIVATE_API_CIDR`).
//!
//! [`Fleet`] wires it with [`crate::fleet`] (Redis, tunnel tracker). Without Redis and a
//! private API listener everything here is off and the registry routes on its own.

mod codec;
pub mod gateway;
mod own_url;
mod pool;
pub mod router;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus::{HistogramVec, IntCounter, IntCounterVec, Opts};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use kas_common::metrics::register;

use crate::config::Config;
use crate::fleet::tunnel_tracker::TrackerTask;
use crate::fleet::{KasUrlQuerier, Redis, RedisMetrics, RedisTunnelTracker};
use crate::gitlab::SharedSecret;
use crate::telemetry::metrics::Metrics;
use crate::tunnel::{NoTracker, Router, TunnelRegistry, TunnelTracker};

pub use gateway::Gateway;
pub use own_url::own_url;
pub use router::FleetRouter;

/// Streams one other pod may have open on this pod's private API.
const MAX_STREAMS_PER_PEER: u32 = 2000;
/// Agents looked up in Redis (polled or cached) at once on one pod.
const MAX_LOOKED_UP_AGENTS: usize = 100_000;

/// Routing's metrics: real kas's two (shared with the registry's own routing) and where
/// calls went.
#[derive(Clone)]
pub struct RoutingMetrics {
    pub routing_duration: HistogramVec,
    pub routing_timeouts: IntCounter,
    /// Routed calls by where the tunnel was (`self`, `other`).
    pub routed: IntCounterVec,
}

/// The multi-pod parts of one kas: Redis, the tunnel tracker, the private API.
pub struct Fleet {
    pub redis: Option<Arc<Redis>>,
    pub own_url: Option<String>,
    tracker: Option<TrackerTask>,
    listener: Option<TcpListener>,
    secret: Option<SharedSecret>,
    max_connection_age: Duration,
    gateway: Option<Gateway>,
    metrics: Metrics,
    /// The private API's TLS identity, and how this pod checks the others'.
    tls: Option<tonic::transport::ServerTlsConfig>,
    peer_ca: Option<Vec<u8>>,
    peer_name: Option<String>,
}

/// A server TLS identity from a certificate and key file pair (`<section>.certificate_file`).
pub fn server_tls(
    section: &str,
    cert: &Option<std::path::PathBuf>,
    key: &Option<std::path::PathBuf>,
) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (cert, key) else {
        return Ok(None);
    };
    let cert = std::fs::read(cert)
        .with_context(|| format!("{section}.certificate_file: cannot read {}", cert.display()))?;
    let key = std::fs::read(key)
        .with_context(|| format!("{section}.key_file: cannot read {}", key.display()))?;
    Ok(Some(
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key)),
    ))
}

/// The running fleet tasks: the tracker stops at the drain's start (unregistering this
/// pod), the private API at its end.
pub struct FleetTasks {
    stop_tracker: CancellationToken,
    tracker: Option<JoinHandle<()>>,
    stop_api: CancellationToken,
    api: Option<JoinHandle<()>>,
}

impl Fleet {
    /// Reads the secrets, binds the private API and prepares the tracker; connects to
    /// nothing (Redis is connected on first use, so kas serves while it is down).
    pub async fn bind(
        config: &Config,
        metrics: &Metrics,
    ) -> anyhow::Result<(Self, Arc<dyn TunnelTracker>)> {
        let redis = if config.redis.enabled() {
            Some(Arc::new(Redis::new(
                &config.redis,
                RedisMetrics::new(metrics.registry()),
            )?))
        } else {
            None
        };
        let mut fleet = Self {
            redis: redis.clone(),
            own_url: None,
            tracker: None,
            listener: None,
            secret: None,
            max_connection_age: config.private_api.max_connection_age,
            gateway: None,
            metrics: metrics.clone(),
            tls: None,
            peer_ca: None,
            peer_name: None,
        };
        let (Some(listen), Some(redis)) = (config.private_api.listen, redis) else {
            return Ok((fleet, Arc::new(NoTracker)));
        };
        let secret = SharedSecret::from_file(&config.private_api.authentication_secret_file)
            .context("private_api.authentication_secret_file")?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on private_api.listen = {listen}"))?;
        let bound = listener.local_addr().unwrap_or(listen);
        let url = own_url(&config.private_api, bound, |k| std::env::var(k).ok())
            .map_err(anyhow::Error::msg)
            .context("private_api.own_url")?;
        let (tracker, task) = RedisTunnelTracker::new(
            redis,
            url.clone(),
            config.redis.conn_info_ttl,
            config.redis.conn_info_refresh,
        );
        let private = &config.private_api;
        fleet.tls = server_tls("private_api", &private.certificate_file, &private.key_file)?;
        fleet.peer_ca = match &private.ca_certificate_file {
            Some(path) => Some(std::fs::read(path).with_context(|| {
                format!(
                    "private_api.ca_certificate_file: cannot read {}",
                    path.display()
                )
            })?),
            None => None,
        };
        fleet.peer_name = std::env::var("OWN_PRIVATE_API_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| private.tls_server_name.clone());
        fleet.own_url = Some(url);
        fleet.tracker = Some(task);
        fleet.listener = Some(listener);
        fleet.secret = Some(secret);
        Ok((fleet, Arc::new(tracker)))
    }

    pub fn private_api_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The router the Kubernetes API proxy uses: the fleet's with a private API, else the
    /// registry alone.
    pub fn router(&mut self, tunnels: &TunnelRegistry, timeout: Duration) -> Arc<dyn Router> {
        let (Some(redis), Some(own_url), Some(secret)) = (
            self.redis.clone(),
            self.own_url.clone(),
            self.secret.clone(),
        ) else {
            return Arc::new(tunnels.clone());
        };
        self.gateway = Some(Gateway::new(tunnels.clone(), secret.clone()));
        let tm = tunnels.metrics();
        let routed = register(
            self.metrics.registry(),
            IntCounterVec::new(
                Opts::new(
                    "kas_routed_calls_total",
                    "Calls routed to an agent's tunnel, by where the tunnel was (self: this pod, other: another pod over the private API).",
                ),
                &["to"],
            )
            .expect("valid metric"),
        );
        Arc::new(FleetRouter {
            tunnels: tunnels.clone(),
            querier: KasUrlQuerier::new(redis, MAX_LOOKED_UP_AGENTS),
            own_url,
            pool: pool::KasPool::new(self.peer_ca.clone(), self.peer_name.clone()),
            secret,
            timeout,
            metrics: RoutingMetrics {
                routing_duration: tm.routing_duration.clone(),
                routing_timeouts: tm.routing_timeouts.clone(),
                routed,
            },
        })
    }

    /// Starts the tracker and the private API.
    pub fn start(self) -> FleetTasks {
        let stop_tracker = CancellationToken::new();
        let stop_api = CancellationToken::new();
        let tracker = self
            .tracker
            .map(|task| tokio::spawn(task.run(stop_tracker.clone())));
        let api = match (self.listener, self.gateway) {
            (Some(listener), Some(gateway)) => {
                let stop = stop_api.clone();
                let age = self.max_connection_age;
                let tls = self.tls;
                Some(tokio::spawn(async move {
                    // Small frames go out at once (no Nagle wait on the peer's delayed ACK).
                    let incoming = tonic::transport::server::TcpIncoming::from(listener)
                        .with_nodelay(Some(true))
                        .with_keepalive(Some(Duration::from_secs(60)));
                    let mut builder = tonic::transport::Server::builder();
                    if let Some(tls) = tls {
                        match builder.tls_config(tls) {
                            Ok(b) => builder = b,
                            Err(e) => {
                                tracing::error!(error = %e, "private API TLS configuration");
                                return;
                            }
                        }
                    }
                    let result = builder
                        .max_connection_age(age)
                        .http2_keepalive_interval(Some(Duration::from_secs(50)))
                        // Calls one peer pod may route here at once (each holds a tunnel or
                        // waits for one; the registry bounds waiters per agent too).
                        .max_concurrent_streams(Some(MAX_STREAMS_PER_PEER))
                        .add_service(gateway)
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await;
                    if let Err(e) = result {
                        tracing::error!(error = %e, "private API server failed");
                    }
                }))
            }
            _ => None,
        };
        FleetTasks {
            stop_tracker,
            tracker,
            stop_api,
            api,
        }
    }
}

impl FleetTasks {
    /// The drain started: this pod unregisters its agents so others stop routing here.
    pub async fn begin_drain(&mut self) {
        self.stop_tracker.cancel();
        if let Some(task) = self.tracker.take() {
            let _ = task.await;
        }
    }

    /// The drain ended: the private API closes.
    pub async fn stop(mut self) {
        self.begin_drain().await;
        self.stop_api.cancel();
        if let Some(task) = self.api.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}
