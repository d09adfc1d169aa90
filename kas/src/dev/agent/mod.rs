//! An agentk stand-in for tests: it connects to a kas agent port (any tonic `Channel`:
//! `grpc://` h2c, `ws://`/`wss://` ws-tunnel, TLS), authenticates with the agent token,
//! keeps [`AgentOptions::idle_tunnels`] idle `ReverseTunnel/Connect` streams whose
//! descriptor offers `KubernetesApi/MakeRequest`, and opens a replacement as soon as one is
//! taken, as agentk does (minus its +10 scale-up step: tests want a known count).
//!
//! A request routed through a tunnel is replayed against [`AgentOptions::kube_api`] (the
//! [`crate::dev::kube_api`] stand-in) with kas's `HeaderExtra` applied as `Impersonate-*`
//! headers, and answered on the tunnel in agentk's order: `Header` → `Message`
//! (`HttpResponse.Header`) → `Message` (`Data`, up to 32 KiB, sent as they arrive so
//! watches stream) … → `Message` (`HttpResponse.Trailer`) → for a `101`, `UpgradeData` both
//! ways → `Trailer` → `Error` if it failed → half-close.
//!
//! The load generator runs thousands of these over connections it drives itself
//! ([`KasConn::new`] over any HTTP/2 client service), all sharing one [`Fleet`]: one
//! connection pool to the API server and one set of counters ([`TestAgent::start_in`]).
//!
//! [`Misbehaviour`] makes it break the protocol on purpose, for kas's error paths.

mod impersonation;
mod inbound;
mod replay;
mod tunnel;
mod url;
mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tower::ServiceExt as _;

use super::channels;

/// How an agent connects and where it replays requests.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The agent token, sent as `authorization: Bearer <token>` on every tunnel.
    pub token: String,
    /// Base URL of the cluster's API server, e.g. `KubeApi::url()`.
    pub kube_api: String,
    /// Idle tunnels to hold (agentk: 2).
    pub idle_tunnels: usize,
    /// The product in the `Via` headers the agent appends (agentk: `gitlab-agent/<v>/<commit>`).
    pub via: String,
    /// How to misbehave from the first tunnel on (see [`TestAgent::set_misbehaviour`]).
    pub misbehaviour: Misbehaviour,
}

impl AgentOptions {
    pub fn new(token: &str, kube_api: &str) -> Self {
        Self {
            token: token.to_owned(),
            kube_api: kube_api.to_owned(),
            idle_tunnels: 2,
            via: VIA.to_owned(),
            misbehaviour: Misbehaviour::None,
        }
    }
}

/// The default `Via` product.
pub const VIA: &str = "gitlab-agent/v16.5.0-kas-testkit/0000000";

/// Ways to break the tunnel protocol, for tests of kas's checks. Read when a tunnel opens
/// (the first two) or when a request arrives on it (the rest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Misbehaviour {
    #[default]
    None,
    /// The first message is a `Header`, not the `Descriptor`.
    WrongFirstMessage,
    /// The descriptor names the service without `MakeRequest`: nothing can be routed to it.
    DescriptorWithoutMethod,
    /// On a request: a `Message` before the `Header`.
    MessageBeforeHeader,
    /// On a request: `Header`, `Error`, then a `Trailer` (nothing may follow `Error`).
    TrailerAfterError,
    /// On a request: the response head is sent, then the stream is reset (RST_STREAM), as
    /// when an agent dies mid-request.
    DisconnectMidRequest,
    /// On the next request only: the stream is reset before any answer, as when the agent's
    /// connection is cut under a tunnel kas just picked; then the agent behaves again.
    ResetNextRequestUnanswered,
}

/// What the agent's tunnels (or a [`Fleet`]'s) did; every count since start.
#[derive(Default)]
pub struct Counters {
    idle: AtomicUsize,
    busy: AtomicUsize,
    busy_peak: AtomicUsize,
    opened: AtomicU64,
    used: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<tonic::Status>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failure of the connection under a tunnel (a concrete type: tonic's clients need the
/// service's error to convert for any lifetime, which a bare boxed error does not).
#[derive(Debug)]
pub struct ConnError(BoxError);

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ConnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// The HTTP/2 client an agent's tunnels are opened on, as tonic's clients take it.
type GrpcService = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    ConnError,
>;

/// How an agent reaches kas: a tonic `Channel` ([`KasConn::from_channel`]) or any HTTP/2
/// client service with the origin its requests name ([`KasConn::new`]).
#[derive(Clone)]
pub struct KasConn {
    service: GrpcService,
    origin: http::Uri,
}

impl KasConn {
    /// Over `service` (e.g. a hyper HTTP/2 connection's request sender) with requests for
    /// `origin` (`http://host:port`).
    pub fn new<S, B>(service: S, origin: http::Uri) -> Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let service = service
            .map_response(|r: http::Response<B>| r.map(tonic::body::Body::new))
            .map_err(|e: S::Error| ConnError(e.into()));
        Self {
            service: GrpcService::new(service),
            origin,
        }
    }

    /// Over a tonic channel, which names its own origin.
    pub fn from_channel(channel: Channel) -> Self {
        Self::new(channel, http::Uri::from_static("http://kas.invalid"))
    }

    /// False once the connection is known to be closed: a tunnel that failed then failed
    /// with it, and whoever drives the connection sees that (a channel reconnects).
    async fn usable(&self) -> bool {
        let ready = self.service.clone().ready_oneshot();
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ready).await,
            Ok(Ok(_)) | Err(_)
        )
    }
}

/// Where an agent's failures are reported: `"tunnel"` (a tunnel kas refused or broke while
/// it was idle) or `"request"` (a request routed through a tunnel failed).
pub type ErrorHook = Box<dyn Fn(&'static str, &tonic::Status) + Send + Sync>;

/// What the agents of a fleet share: one client to their cluster's API server (one
/// connection pool for all), the tunnel [`Counters`] and an optional [`ErrorHook`].
/// [`TestAgent::start`] gives each agent its own.
pub struct Fleet {
    upstream: replay::Upstream,
    counters: Counters,
    on_error: Option<ErrorHook>,
}

impl Fleet {
    /// Agents replaying against `kube_api` (e.g. `KubeApi::url()`), appending `via` to the
    /// `Via` headers.
    pub fn new(kube_api: &str, via: &str) -> Self {
        Self {
            upstream: replay::Upstream::new(kube_api, via),
            counters: Counters::default(),
            on_error: None,
        }
    }

    /// Reports every failure to `hook` as well (failures of a stopped agent, or of a
    /// connection that closed, are not failures of the agent and are not reported).
    pub fn with_error_hook(mut self, hook: ErrorHook) -> Self {
        self.on_error = Some(hook);
        self
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

impl Counters {
    /// Tunnels kas answered and waiting for a request.
    pub fn idle(&self) -> usize {
        self.idle.load(Ordering::SeqCst)
    }

    /// Tunnels carrying a request now.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// The most tunnels that carried a request at once.
    pub fn busy_peak(&self) -> usize {
        self.busy_peak.load(Ordering::SeqCst)
    }

    /// Tunnels opened since start.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }

    /// Tunnels that received a request since start.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Tunnels or requests that ended in an error since start.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// The latest error: a tunnel kas refused or broke, or a request that failed.
    pub fn last_error(&self) -> Option<tonic::Status> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub(crate) struct Shared {
    conn: KasConn,
    options: AgentOptions,
    fleet: Arc<Fleet>,
    misbehaviour: Mutex<Misbehaviour>,
    cancel: CancellationToken,
}

impl Shared {
    fn misbehaviour(&self) -> Misbehaviour {
        *self.misbehaviour.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The misbehaviour for this request: a one-shot one is used up by taking it.
    fn take_misbehaviour(&self) -> Misbehaviour {
        let mut current = self.misbehaviour.lock().unwrap_or_else(|e| e.into_inner());
        let now = *current;
        if now == Misbehaviour::ResetNextRequestUnanswered {
            *current = Misbehaviour::None;
        }
        now
    }

    fn counters(&self) -> &Counters {
        &self.fleet.counters
    }

    /// Counts and reports a failure, unless the agent was stopped or its connection
    /// closed: then the failure is the stop's or the connection's, not the agent's.
    async fn record_error(&self, stage: &'static str, status: tonic::Status) {
        if self.cancel.is_cancelled() || !self.conn.usable().await || self.cancel.is_cancelled() {
            return;
        }
        if let Some(hook) = &self.fleet.on_error {
            hook(stage, &status);
        }
        let counters = self.counters();
        counters.failed.fetch_add(1, Ordering::SeqCst);
        *counters
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(status);
    }
}

/// A running test agent. Dropping it (or [`TestAgent::stop`]) cancels every tunnel at once,
/// like a killed agentk.
pub struct TestAgent {
    shared: Arc<Shared>,
}

impl TestAgent {
    /// Starts holding tunnels over `channel`.
    pub fn start(channel: Channel, options: AgentOptions) -> Self {
        let fleet = Arc::new(Fleet::new(&options.kube_api, &options.via));
        Self::spawn(KasConn::from_channel(channel), options, fleet)
    }

    /// One agent of `fleet` over `conn`: `idle_tunnels` tunnels authenticated with `token`,
    /// requests replayed against the fleet's API server, counted in the fleet's counters
    /// (which the accessors below then read).
    pub fn start_in(fleet: &Arc<Fleet>, conn: KasConn, token: &str, idle_tunnels: usize) -> Self {
        let options = AgentOptions {
            idle_tunnels,
            ..AgentOptions::new(token, "")
        };
        Self::spawn(conn, options, fleet.clone())
    }

    fn spawn(conn: KasConn, options: AgentOptions, fleet: Arc<Fleet>) -> Self {
        let shared = Arc::new(Shared {
            conn,
            fleet,
            misbehaviour: Mutex::new(options.misbehaviour),
            cancel: CancellationToken::new(),
            options,
        });
        for _ in 0..shared.options.idle_tunnels {
            tunnel::spawn_worker(shared.clone());
        }
        Self { shared }
    }

    /// Over gRPC on HTTP/2 cleartext (`grpc://addr`).
    pub async fn connect_h2c(
        addr: SocketAddr,
        options: AgentOptions,
    ) -> Result<Self, tonic::transport::Error> {
        Ok(Self::start(channels::h2c(addr).await?, options))
    }

    /// Over a `ws://addr/` websocket with subprotocol `ws-tunnel`, as agentk on `wss://`
    /// (without TLS).
    pub async fn connect_ws(
        addr: SocketAddr,
        options: AgentOptions,
    ) -> Result<Self, tonic::transport::Error> {
        Ok(Self::start(channels::ws(addr).await?, options))
    }

    /// From now on, break the protocol this way (see [`Misbehaviour`] for when it is read).
    pub fn set_misbehaviour(&self, misbehaviour: Misbehaviour) {
        *self
            .shared
            .misbehaviour
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = misbehaviour;
    }

    /// Tunnels kas answered (kas answers a tunnel once it holds it) and waiting for a
    /// request.
    pub fn idle(&self) -> usize {
        self.shared.counters().idle()
    }

    /// Tunnels carrying a request now.
    pub fn busy(&self) -> usize {
        self.shared.counters().busy()
    }

    /// Tunnels opened since start.
    pub fn opened(&self) -> u64 {
        self.shared.counters().opened()
    }

    /// Tunnels that received a request since start.
    pub fn used(&self) -> u64 {
        self.shared.counters().used()
    }

    /// Tunnels or requests that ended in an error since start.
    pub fn failed(&self) -> u64 {
        self.shared.counters().failed()
    }

    /// The latest error: a tunnel kas refused or broke, or a request that failed.
    pub fn last_error(&self) -> Option<tonic::Status> {
        self.shared.counters().last_error()
    }

    /// Waits until `n` tunnels are idle; false if `timeout` passes first.
    pub async fn wait_idle(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.idle() == n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// Ends every tunnel and request at once (streams reset); nothing reconnects.
    pub fn stop(&self) {
        self.shared.cancel.cancel();
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop();
    }
}
