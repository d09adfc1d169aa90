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

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

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
}

/// What the agent's tunnels did; every count since start.
#[derive(Default)]
pub struct Counters {
    idle: AtomicUsize,
    busy: AtomicUsize,
    opened: AtomicU64,
    used: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<tonic::Status>>,
}

pub(crate) struct Shared {
    channel: Channel,
    options: AgentOptions,
    upstream: replay::Upstream,
    misbehaviour: Mutex<Misbehaviour>,
    counters: Counters,
    cancel: CancellationToken,
}

impl Shared {
    fn misbehaviour(&self) -> Misbehaviour {
        *self.misbehaviour.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_error(&self, status: tonic::Status) {
        self.counters.failed.fetch_add(1, Ordering::SeqCst);
        *self
            .counters
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
        let upstream = replay::Upstream::new(&options.kube_api, &options.via);
        let shared = Arc::new(Shared {
            channel,
            upstream,
            misbehaviour: Mutex::new(options.misbehaviour),
            counters: Counters::default(),
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

    /// Tunnels open and waiting for a request (the descriptor sent; kas may not have read
    /// it yet: to know kas holds them, ask kas).
    pub fn idle(&self) -> usize {
        self.shared.counters.idle.load(Ordering::SeqCst)
    }

    /// Tunnels carrying a request now.
    pub fn busy(&self) -> usize {
        self.shared.counters.busy.load(Ordering::SeqCst)
    }

    /// Tunnels opened since start.
    pub fn opened(&self) -> u64 {
        self.shared.counters.opened.load(Ordering::SeqCst)
    }

    /// Tunnels that received a request since start.
    pub fn used(&self) -> u64 {
        self.shared.counters.used.load(Ordering::SeqCst)
    }

    /// Tunnels or requests that ended in an error since start.
    pub fn failed(&self) -> u64 {
        self.shared.counters.failed.load(Ordering::SeqCst)
    }

    /// The latest error: a tunnel kas refused or broke, or a request that failed.
    pub fn last_error(&self) -> Option<tonic::Status> {
        self.shared
            .counters
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
