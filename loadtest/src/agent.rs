//! One simulated agent: connect, authenticate, hold the configuration stream and an Echo
//! stream (and optionally idle reverse tunnels, as agentk: kas-dev's agentk stand-in's
//! tunnel workers over this agent's connection), reconnect with jittered back-off when
//! cut — the shape of agentk's traffic, one task per agent plus one per tunnel.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::Streaming;

use kas::dev::agent::{Fleet as TunnelFleet, KasConn, TestAgent};
use kas_proto::agent_configuration::{ConfigurationRequest, ConfigurationResponse};
use kas_proto::codec::LeanCodec;
use kas_proto::diagnostics::{PingRequest, PingResponse};
use kas_proto::paths::{DIAGNOSTICS_ECHO, GET_CONFIGURATION};

use crate::schedule::Schedule;
use crate::stats::Stats;
use crate::target::Target;
use crate::transport::{Connector, GrpcConn, H2Service, Transport};

/// An Echo not answered within this is a broken stream.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

/// One agent token: the header value every request carries, and the token itself for the
/// tunnels.
#[derive(Clone)]
pub struct AgentToken {
    pub header: MetadataValue<Ascii>,
    pub raw: String,
}

/// The reverse tunnels agents hold: the fleet they share (API server client, counters)
/// and how many idle ones each keeps.
pub struct Tunnels {
    pub fleet: Arc<TunnelFleet>,
    pub idle: usize,
}

/// What every agent shares.
pub struct AgentEnv {
    pub connector: Connector,
    pub targets: Vec<Target>,
    /// Agent `i` uses token `i mod len` (never empty).
    pub tokens: Vec<AgentToken>,
    pub stats: Arc<Stats>,
    pub stop: CancellationToken,
    /// Zero: no Echo stream.
    pub echo_interval: Duration,
    pub connect_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub tunnels: Option<Tunnels>,
    pub payload: Bytes,
    /// After a requested reconnect, wait a random time up to this first.
    pub cycle_jitter: Duration,
}

impl AgentEnv {
    /// Agent `slot`'s token.
    pub fn token(&self, slot: &Slot) -> &AgentToken {
        &self.tokens[slot.index % self.tokens.len().max(1)]
    }

    pub fn authed<T>(&self, slot: &Slot, message: T) -> tonic::Request<T> {
        authed(&self.token(slot).header, message)
    }
}

/// A request carrying the agent token, as every agent request does.
pub fn authed<T>(token: &MetadataValue<Ascii>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", token.clone());
    request
}

/// One agent's identity and the state scenarios observe and steer.
pub struct Slot {
    pub index: usize,
    pub source: Option<IpAddr>,
    pub ip_index: usize,
    pub target: usize,
    pub transport: Transport,
    pub connected: AtomicBool,
    /// 1 + the reconnect epoch in force when the agent last became ready; 0 = never.
    pub ready_epoch: AtomicU64,
    /// Microseconds after the run's start when the agent last became ready; 0 = never.
    pub ready_at_us: AtomicU64,
    /// Microseconds after the run's start of the last cut we did not ask for; 0 = none.
    pub cut_at_us: AtomicU64,
    pub cuts: AtomicU64,
    /// A cut of this agent is the scenario's intent: count it apart and do not reconnect.
    pub expect_cut: AtomicBool,
    /// Bumping it makes the agent drop its connection and reconnect at once.
    pub epoch: watch::Sender<u64>,
    /// The commit of the last configuration kas sent this agent ("" before the first).
    pub config_commit: Mutex<String>,
    /// Microseconds after the run's start when that commit first reached the agent.
    pub commit_at_us: AtomicU64,
}

impl Slot {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// The commit of the configuration the agent holds now.
    pub fn commit(&self) -> String {
        self.config_commit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A configuration arrived (at `now_us` after the run's start).
    fn configured(&self, message: &ConfigurationResponse, now_us: u64) {
        let mut commit = self.config_commit.lock().unwrap_or_else(|p| p.into_inner());
        if *commit != message.commit_id {
            commit.clone_from(&message.commit_id);
            self.commit_at_us.store(now_us, Ordering::SeqCst);
        }
    }
}

/// Consecutive loopback addresses from `base`, skipping .0 and .255 host parts.
pub fn source_address(base: Ipv4Addr, index: usize) -> anyhow::Result<Ipv4Addr> {
    let [a, b, c, d] = base.octets();
    if a != 127 {
        bail!("--source-base {base} is not in 127.0.0.0/8");
    }
    let host = u64::from(d.clamp(1, 254)) - 1;
    let linear = (u64::from(b) * 256 + u64::from(c)) * 254 + host + index as u64;
    let prefix = linear / 254;
    if prefix >= 65_536 {
        bail!("{index} source addresses from {base} run past 127.255.255.254");
    }
    Ok(Ipv4Addr::new(
        127,
        (prefix / 256) as u8,
        (prefix % 256) as u8,
        (linear % 254 + 1) as u8,
    ))
}

/// Whether agent `i` uses the websocket: a low-discrepancy sequence, so any share is spread
/// evenly over the fleet and does not line up with the round-robin over targets.
pub fn uses_websocket(i: usize, ws_fraction: f64) -> bool {
    const GOLDEN: f64 = 0.618_033_988_749_894_9;
    ((i as f64 + 0.5) * GOLDEN).fract() < ws_fraction
}

/// Agent (or connection) `i`'s transport, by [`uses_websocket`].
pub fn transport_for(i: usize, ws_fraction: f64) -> Transport {
    if uses_websocket(i, ws_fraction) {
        Transport::Websocket
    } else {
        Transport::Grpc
    }
}

/// Jittered exponential back-off: uniformly within [base/2, base], base doubling per
/// failure, so a fleet cut at once does not come back in lockstep.
pub fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = min.saturating_mul(1u32 << exp).min(max.max(min));
    let lo = base.as_secs_f64() / 2.0;
    let hi = base.as_secs_f64();
    if hi <= lo {
        return base;
    }
    Duration::from_secs_f64(rand::rng().random_range(lo..=hi))
}

enum End {
    Stopped,
    Cycled,
    ConnectFailed,
    Cut(String),
}

/// Marks an agent connected for exactly as long as it lives.
struct UpGuard<'a> {
    stats: &'a Stats,
    slot: &'a Slot,
}

impl<'a> UpGuard<'a> {
    fn new(stats: &'a Stats, slot: &'a Slot) -> Self {
        slot.connected.store(true, Ordering::SeqCst);
        stats.agent_up();
        Self { stats, slot }
    }
}

impl Drop for UpGuard<'_> {
    fn drop(&mut self) {
        self.slot.connected.store(false, Ordering::SeqCst);
        self.stats.agent_down();
    }
}

/// An error with its causes: hyper's own message ("connection error") says little alone.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The error kind of a gRPC failure at `stage`: counted by status code.
pub(crate) fn status_kind(stage: &str, status: &tonic::Status) -> String {
    format!("{stage}: grpc {:?}", status.code())
}

/// Runs the agent until the fleet stops (or, for an agent meant to be cut, until cut).
pub async fn run(env: Arc<AgentEnv>, slot: Arc<Slot>) {
    let mut epoch_rx = slot.epoch.subscribe();
    let mut failures = 0u32;
    loop {
        if env.stop.is_cancelled() {
            return;
        }
        let epoch = *epoch_rx.borrow_and_update();
        let end = session(&env, &slot, epoch, &mut epoch_rx).await;
        let pause = match end {
            End::Stopped => return,
            End::Cycled => {
                env.stats.inc(&env.stats.cycles);
                failures = 0;
                if env.cycle_jitter.is_zero() {
                    continue;
                }
                Duration::from_secs_f64(
                    rand::rng().random_range(0.0..=env.cycle_jitter.as_secs_f64()),
                )
            }
            End::ConnectFailed => {
                failures = failures.saturating_add(1);
                backoff(env.backoff_min, env.backoff_max, failures)
            }
            End::Cut(reason) => {
                slot.cut_at_us.store(
                    (env.stats.start.elapsed().as_micros() as u64).max(1),
                    Ordering::SeqCst,
                );
                slot.cuts.fetch_add(1, Ordering::SeqCst);
                if slot.expect_cut.load(Ordering::SeqCst) {
                    env.stats.inc(&env.stats.expected_cuts);
                    return;
                }
                env.stats.inc(&env.stats.unexpected_cuts);
                env.stats.errors.add("cut", || reason);
                failures = 1;
                backoff(env.backoff_min, env.backoff_max, failures)
            }
        };
        tokio::select! {
            _ = sleep(pause) => {}
            _ = env.stop.cancelled() => return,
            // A requested reconnect does not wait out a back-off.
            _ = epoch_rx.changed() => {}
        }
    }
}

async fn session(
    env: &AgentEnv,
    slot: &Slot,
    epoch: u64,
    epoch_rx: &mut watch::Receiver<u64>,
) -> End {
    let stats = &env.stats;
    stats.inc(&stats.connect_attempts);
    let t0 = Instant::now();
    let deadline = t0 + env.connect_timeout;
    let Some(target) = env.targets.get(slot.target) else {
        stats.errors.add("config", || "agent has no target".into());
        return End::Stopped;
    };
    let source = match (slot.source, target.addr.ip()) {
        (Some(src), IpAddr::V4(dst)) if dst.is_loopback() => Some(src),
        _ => None,
    };
    let connecting = timeout_at(
        deadline,
        env.connector.connect(target, slot.transport, source),
    );
    let (grpc, conn) = tokio::select! {
        r = connecting => match r {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                stats.errors.add(e.stage, || e.to_string());
                return End::ConnectFailed;
            }
            Err(_) => {
                stats.errors.add("timeout: handshake", || {
                    format!("no transport within {:?} ({})", env.connect_timeout, target.url)
                });
                return End::ConnectFailed;
            }
        },
        _ = env.stop.cancelled() => return End::Stopped,
        _ = epoch_rx.changed() => return End::Cycled,
    };
    stats.inc(&stats.handshakes);
    stats.handshake_latency.record(t0.elapsed());
    let ready = AtomicBool::new(false);
    let work = hold(env, slot, grpc, t0, deadline, epoch, &ready);
    tokio::pin!(conn, work);
    tokio::select! {
        r = &mut conn => {
            let from = slot.source.map_or(String::new(), |ip| format!(" (agent {ip})"));
            let why = match r {
                Ok(()) => format!("connection closed by the server{from}"),
                Err(e) => format!("connection failed: {}{from}", error_chain(&e)),
            };
            if ready.load(Ordering::SeqCst) {
                End::Cut(why)
            } else {
                stats.errors.add("http2: closed before ready", || why);
                End::ConnectFailed
            }
        }
        end = &mut work => end,
        _ = env.stop.cancelled() => End::Stopped,
        _ = epoch_rx.changed() => End::Cycled,
    }
}

/// The streams an agent holds once it is authenticated: what agentk keeps open for its
/// whole life, and what the edge has to carry per connection.
struct HeldStreams {
    config: Streaming<ConfigurationResponse>,
    echo: Option<(mpsc::Sender<PingRequest>, Streaming<PingResponse>)>,
    /// The idle tunnels' workers; dropping it ends them.
    _tunnels: Option<TestAgent>,
}

/// Authenticates through the configuration stream, opens the held streams, then keeps
/// them busy until one breaks.
async fn hold(
    env: &AgentEnv,
    slot: &Slot,
    grpc: GrpcConn,
    t0: Instant,
    deadline: Instant,
    epoch: u64,
    ready: &AtomicBool,
) -> End {
    // `grpc` lives until the streams end: hyper closes an HTTP/2 connection once every
    // handle to its request sender is gone, open streams or not.
    let streams = match open_streams(env, slot, &grpc, deadline).await {
        Ok(streams) => streams,
        Err(end) => return end,
    };
    let stats = &env.stats;
    stats.connect_latency.record(t0.elapsed());
    stats.inc(&stats.connects_ok);
    slot.ready_epoch.store(epoch + 1, Ordering::SeqCst);
    slot.ready_at_us.store(
        (stats.start.elapsed().as_micros() as u64).max(1),
        Ordering::SeqCst,
    );
    ready.store(true, Ordering::SeqCst);
    let _up = UpGuard::new(stats, slot);
    keep_busy(env, slot, streams).await
}

/// Opens every held stream within the connect deadline; a stream that does not open is a
/// failed connect (counted, and retried with back-off), not a cut.
async fn open_streams(
    env: &AgentEnv,
    slot: &Slot,
    grpc: &GrpcConn,
    deadline: Instant,
) -> Result<HeldStreams, End> {
    let config = open_configuration(env, slot, grpc, deadline).await?;
    let echo = if env.echo_interval.is_zero() {
        None
    } else {
        Some(open_echo(env, slot, grpc, deadline).await?)
    };
    // The tunnels open in the background, as agentk's do; their failures reach the stats
    // through the fleet's error hook.
    let tunnels = env.tunnels.as_ref().map(|t| {
        let conn = KasConn::new(grpc.service.clone(), grpc.origin.clone());
        TestAgent::start_in(&t.fleet, conn, &env.token(slot).raw, t.idle)
    });
    Ok(HeldStreams {
        config,
        echo,
        _tunnels: tunnels,
    })
}

/// Waits, until the connect deadline, for a stream to open. A gRPC error is counted as
/// `<stage>: grpc <code>`, running out of time as `timeout: <stage>` with `timed_out`'s
/// message; both end the attempt as a failed connect.
async fn opened<T>(
    stats: &Stats,
    stage: &str,
    deadline: Instant,
    opening: impl Future<Output = Result<T, tonic::Status>>,
    timed_out: impl FnOnce() -> String,
) -> Result<T, End> {
    match timeout_at(deadline, opening).await {
        Ok(Ok(opened)) => Ok(opened),
        Ok(Err(status)) => {
            stats
                .errors
                .add(&status_kind(stage, &status), || status.to_string());
            Err(End::ConnectFailed)
        }
        Err(_) => {
            stats.errors.add(&format!("timeout: {stage}"), timed_out);
            Err(End::ConnectFailed)
        }
    }
}

/// A gRPC client on the agent's connection, ready for a call. The held streams use it with
/// [`LeanCodec`]: tonic's default codec keeps 16 KiB of buffers per stream for its whole
/// life, most of an idle agent's memory in a fleet of thousands.
async fn grpc_client(grpc: &GrpcConn) -> Result<tonic::client::Grpc<H2Service>, tonic::Status> {
    let mut client = tonic::client::Grpc::with_origin(grpc.service.clone(), grpc.origin.clone());
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
    Ok(client)
}

fn path(method: &'static str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_static(method)
}

/// `GetConfiguration`, up to its first message. Always the empty commit: kas then sends
/// the configuration at once, and that first message is the proof of an authenticated,
/// working connection.
async fn open_configuration(
    env: &AgentEnv,
    slot: &Slot,
    grpc: &GrpcConn,
    deadline: Instant,
) -> Result<Streaming<ConfigurationResponse>, End> {
    let stats = &env.stats;
    let request = env.authed(
        slot,
        ConfigurationRequest {
            commit_id: String::new(),
            agent_meta: None,
            skip_register: true,
        },
    );
    let opening = async {
        let mut stream = grpc_client(grpc)
            .await?
            .server_streaming(request, path(GET_CONFIGURATION), LeanCodec::default())
            .await?
            .into_inner();
        let first = stream.message().await?;
        Ok((stream, first))
    };
    let (stream, first) = opened(stats, "configuration", deadline, opening, || {
        format!("no configuration within {:?}", env.connect_timeout)
    })
    .await?;
    let Some(first) = first else {
        stats.errors.add("configuration: empty stream", || {
            "GetConfiguration ended before the first configuration".into()
        });
        return Err(End::ConnectFailed);
    };
    slot.configured(&first, stats.micros());
    stats.inc(&stats.config_messages);
    Ok(stream)
}

/// What `rx` receives, as the request stream of a client-streaming call: it ends when
/// every sender is gone.
pub fn receiver_stream<T>(rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

/// The `Diagnostics/Echo` stream: requests go through the returned sender (one at a time,
/// so the channel holds one), answers come on the returned stream.
async fn open_echo(
    env: &AgentEnv,
    slot: &Slot,
    grpc: &GrpcConn,
    deadline: Instant,
) -> Result<(mpsc::Sender<PingRequest>, Streaming<PingResponse>), End> {
    let (echo_tx, echo_rx) = mpsc::channel::<PingRequest>(1);
    let outbound = receiver_stream(echo_rx);
    let opening = async {
        Ok(grpc_client(grpc)
            .await?
            .streaming(
                env.authed(slot, outbound),
                path(DIAGNOSTICS_ECHO),
                LeanCodec::default(),
            )
            .await?
            .into_inner())
    };
    let echo_in = opened(&env.stats, "echo", deadline, opening, || {
        "Echo stream did not open".into()
    })
    .await?;
    Ok((echo_tx, echo_in))
}

/// The next message of a held stream; its end or an error is the connection's cut, named
/// after `what`.
fn still_open<T>(what: &str, message: Result<Option<T>, tonic::Status>) -> Result<T, End> {
    match message {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(End::Cut(format!("{what} ended"))),
        Err(s) => Err(End::Cut(format!("{what}: {s}"))),
    }
}

/// Keeps the held streams busy — configuration updates in, one echo per interval out and
/// back — until one of them breaks; returns why.
async fn keep_busy(env: &AgentEnv, slot: &Slot, streams: HeldStreams) -> End {
    let stats = &env.stats;
    let HeldStreams {
        mut config,
        echo,
        _tunnels,
    } = streams;
    let Some((echo_out, mut echo_in)) = echo else {
        // The configuration stream alone (and the tunnels, on their own tasks).
        loop {
            let m = config.message().await;
            match still_open("configuration stream", m) {
                Ok(message) => slot.configured(&message, stats.micros()),
                Err(end) => return end,
            }
            stats.inc(&stats.config_messages);
        }
    };
    let mut echo = Echoes::new(env.echo_interval, echo_out);
    loop {
        let echo_deadline = echo.answer_deadline();
        let step = tokio::select! {
            m = config.message() => {
                still_open("configuration stream", m).map(|message| {
                    slot.configured(&message, stats.micros());
                    stats.inc(&stats.config_messages);
                })
            },
            _ = sleep_until(echo.next_due) => echo.tick(env).await,
            m = echo_in.message() => still_open("echo stream", m).map(|pong| echo.answered(stats, &pong)),
            _ = sleep_until(echo_deadline) => {
                stats.errors.add("echo: timeout", || format!("no echo within {ECHO_TIMEOUT:?}"));
                Err(End::Cut("echo timeout".into()))
            }
        };
        if let Err(end) = step {
            return end;
        }
    }
}

/// The agent's side of the Echo stream: one numbered request per interval, at most one
/// unanswered, each answer checked against the number it should carry.
struct Echoes {
    out: mpsc::Sender<PingRequest>,
    interval: Duration,
    /// When the next request is due.
    next_due: Instant,
    /// The unanswered request: its number and when it went out.
    waiting: Option<(u64, Instant)>,
    seq: u64,
}

impl Echoes {
    fn new(interval: Duration, out: mpsc::Sender<PingRequest>) -> Self {
        // A random phase, so thousands of agents do not send their echoes in the same instant.
        let interval = interval.max(Duration::from_millis(10));
        let next_due = Instant::now() + interval.mul_f64(rand::rng().random_range(0.0..1.0));
        Self {
            out,
            interval,
            next_due,
            waiting: None,
            seq: 0,
        }
    }

    /// When the unanswered request has waited too long (far away when none is waiting).
    fn answer_deadline(&self) -> Instant {
        let far = Duration::from_secs(86_400);
        self.waiting
            .map_or(Instant::now() + far, |(_, at)| at + ECHO_TIMEOUT)
    }

    /// The interval is up: sends the next request unless the last is still unanswered.
    async fn tick(&mut self, env: &AgentEnv) -> Result<(), End> {
        let stats = &env.stats;
        self.next_due += self.interval;
        if self.waiting.is_some() {
            return Ok(());
        }
        self.seq += 1;
        let mut payload = Vec::with_capacity(env.payload.len() + 8);
        payload.extend_from_slice(&self.seq.to_be_bytes());
        payload.extend_from_slice(&env.payload);
        stats.inc(&stats.echo_sent);
        let sent = timeout(ECHO_TIMEOUT, self.out.send(PingRequest { payload })).await;
        if !matches!(sent, Ok(Ok(()))) {
            stats
                .errors
                .add("echo: send failed", || "Echo request stream closed".into());
            return Err(End::Cut("echo request stream closed".into()));
        }
        self.waiting = Some((self.seq, Instant::now()));
        Ok(())
    }

    /// An answer: counted with its round trip when it carries the waiting number, an error
    /// otherwise.
    fn answered(&mut self, stats: &Stats, pong: &PingResponse) {
        let expected = self.waiting.take();
        let matches =
            expected.is_some_and(|(s, _)| pong.payload.get(..8) == Some(&s.to_be_bytes()[..]));
        match expected {
            Some((_, sent_at)) if matches => {
                stats.inc(&stats.echo_ok);
                stats.echo_rtt.record(sent_at.elapsed());
            }
            _ => stats.errors.add("echo: mismatch", || {
                "Echo answered with a different payload".into()
            }),
        }
    }
}

/// The whole fleet: its agents' slots and tasks.
pub struct Fleet {
    pub env: Arc<AgentEnv>,
    pub slots: Vec<Arc<Slot>>,
    tasks: JoinSet<()>,
    started: usize,
}

pub struct FleetShape {
    pub agents: usize,
    pub ws_fraction: f64,
    pub source_base: Ipv4Addr,
    pub agents_per_ip: usize,
    pub spread_sources: bool,
}

impl Fleet {
    pub fn new(env: Arc<AgentEnv>, shape: &FleetShape) -> anyhow::Result<Self> {
        let per_ip = shape.agents_per_ip.max(1);
        let targets = env.targets.len().max(1);
        let mut slots = Vec::with_capacity(shape.agents);
        for i in 0..shape.agents {
            let ip_index = i / per_ip;
            let source = if shape.spread_sources {
                Some(IpAddr::V4(source_address(shape.source_base, ip_index)?))
            } else {
                None
            };
            let transport = transport_for(i, shape.ws_fraction);
            slots.push(Arc::new(Slot {
                index: i,
                source,
                ip_index,
                target: i % targets,
                transport,
                connected: AtomicBool::new(false),
                ready_epoch: AtomicU64::new(0),
                ready_at_us: AtomicU64::new(0),
                cut_at_us: AtomicU64::new(0),
                cuts: AtomicU64::new(0),
                expect_cut: AtomicBool::new(false),
                epoch: watch::channel(0).0,
                config_commit: Mutex::new(String::new()),
                commit_at_us: AtomicU64::new(0),
            }));
        }
        Ok(Self {
            env,
            slots,
            tasks: JoinSet::new(),
            started: 0,
        })
    }

    pub fn started(&self) -> usize {
        self.started
    }

    /// Starts the agents not yet started, `rate` per second, unless the run stops.
    pub async fn ramp(&mut self, rate: f64) {
        let schedule = Schedule::new(Instant::now(), rate);
        let first = self.started;
        for (k, slot) in self.slots[first..].iter().enumerate() {
            if schedule.wait(k as u64, &self.env.stop).await.is_none() {
                return;
            }
            self.tasks.spawn(run(self.env.clone(), slot.clone()));
            self.started += 1;
        }
    }

    pub fn connected(&self) -> usize {
        self.slots.iter().filter(|s| s.is_connected()).count()
    }

    /// Waits (bounded) until `pred` holds, polling every 20 ms; returns whether it did.
    pub async fn wait_for(&self, within: Duration, pred: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if pred(self) {
                return true;
            }
            if Instant::now() >= deadline || self.env.stop.is_cancelled() {
                return false;
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks agent `i` to drop its connection and reconnect.
    pub fn cycle(&self, i: usize) {
        if let Some(slot) = self.slots.get(i) {
            slot.epoch.send_modify(|e| *e += 1);
        }
    }

    /// Stops every agent and waits (bounded) for their tasks.
    pub async fn shutdown(mut self, within: Duration) {
        self.env.stop.cancel();
        let drained = timeout(within, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_skip_network_and_broadcast_hosts() {
        let base = Ipv4Addr::new(127, 0, 2, 1);
        assert_eq!(
            source_address(base, 0).unwrap(),
            Ipv4Addr::new(127, 0, 2, 1)
        );
        assert_eq!(
            source_address(base, 253).unwrap(),
            Ipv4Addr::new(127, 0, 2, 254)
        );
        assert_eq!(
            source_address(base, 254).unwrap(),
            Ipv4Addr::new(127, 0, 3, 1)
        );
        let all: std::collections::HashSet<_> = (0..20_000)
            .map(|i| source_address(base, i).unwrap())
            .collect();
        assert_eq!(all.len(), 20_000);
        assert!(all
            .iter()
            .all(|a| a.octets()[3] != 0 && a.octets()[3] != 255));
        assert!(source_address(Ipv4Addr::new(10, 0, 0, 1), 0).is_err());
        assert!(source_address(Ipv4Addr::new(127, 255, 255, 250), 10).is_err());
    }

    #[test]
    fn websocket_share_is_spread() {
        let n = 1000;
        for f in [0.0, 0.25, 0.5, 1.0] {
            let ws = (0..n).filter(|&i| uses_websocket(i, f)).count();
            assert!((ws as f64 - f * n as f64).abs() <= 2.0, "{f}: {ws}");
        }
        // Both transports on both of two round-robin targets.
        let even_ws = (0..100)
            .step_by(2)
            .filter(|&i| uses_websocket(i, 0.5))
            .count();
        assert!(even_ws > 10 && even_ws < 40, "{even_ws}");
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(10));
        for failures in 1..30 {
            let d = backoff(min, max, failures);
            assert!(d <= max && d >= min / 2, "{failures}: {d:?}");
        }
        let d = backoff(min, max, 1);
        assert!(d >= Duration::from_millis(500) && d <= min);
    }
}
