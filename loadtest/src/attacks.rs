//! Hostile clients for the `hostile` scenario: each attack kind is one function that runs
//! until its stop token (or its own count) ends it and returns what it saw. They share
//! nothing with the fleet's [`crate::stats::Stats`], so an attack's own failures never count
//! against the legitimate agents' error budget.
//!
//! Every attacker binds to loopback source addresses of its own, apart from the fleet's,
//! so the edge's per-client limits see them as other clients. The attacks on the pods'
//! connections the edge shares between agents are in [`shared_pods`].

mod shared_pods;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, Instant};
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};

use kas_proto::agent_configuration::agent_configuration_client::AgentConfigurationClient;
use kas_proto::agent_configuration::ConfigurationRequest;
use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;

use crate::agent::{authed, source_address};
use crate::report::AttackSummary;
use crate::schedule::Schedule;
use crate::stats::new_histogram;
use crate::target::Target;
use crate::transport::{load_roots, tls_connector, BoxIo, Connector, Transport};

/// The attack kinds, in the order they are laid out over the source addresses.
pub const KINDS: [&str; 9] = [
    "silent_tcp",
    "slow_tls",
    "idle_h2",
    "conn_flood",
    "request_flood",
    "stalled_reader",
    "unique_sources",
    "reset_burst",
    "zero_window",
];

/// Longest a response is read for, and the most bytes kept of it: attack connections are
/// not worth waiting on, and a misbehaving server must not flood the generator.
const READ_WINDOW: Duration = Duration::from_secs(3);
const READ_CAP: usize = 1 << 20;

/// How hard each kind attacks at `--attack-scale 1`: connections (or, for the floods,
/// connections at a time) and the source addresses they come from.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    pub silent: usize,
    pub silent_sources: usize,
    pub slow: usize,
    pub idle_h2: usize,
    pub flood_sources: usize,
    /// conn_flood: new connections per second and source address (the default limits
    /// allow 20/s with a burst of 100, so this runs past them within seconds).
    pub flood_rate: f64,
    pub request_flood: usize,
    pub stalled: usize,
    pub unique: usize,
    /// reset_burst: HTTP/2 clients (one source address each) bursting together.
    pub reset_clients: usize,
    /// zero_window: HTTP/2 clients (one source address each) that read nothing.
    pub zero_window: usize,
}

impl Sizing {
    pub fn scaled(scale: f64) -> Self {
        let n = |base: f64| ((base * scale).ceil() as usize).max(1);
        Self {
            silent: n(300.0),
            // 75 each at scale 1: past the edge's 64 handshakes per client, so the cap
            // is exercised as well as the deadline.
            silent_sources: n(4.0),
            slow: n(50.0),
            idle_h2: n(100.0),
            flood_sources: n(3.0),
            flood_rate: 100.0,
            request_flood: n(4.0),
            stalled: n(20.0),
            unique: n(2000.0),
            reset_clients: n(16.0),
            zero_window: n(4.0),
        }
    }

    /// Source addresses per kind, in [`KINDS`] order.
    fn sources(&self) -> [usize; 9] {
        [
            self.silent_sources,
            2,
            2,
            self.flood_sources,
            1,
            1,
            self.unique,
            self.reset_clients,
            self.zero_window,
        ]
    }

    /// Every source address the attacks use together.
    pub fn total_sources(&self) -> usize {
        self.sources().iter().sum()
    }

    /// Sockets the attacks may hold at once, for the open-files check.
    pub fn max_sockets(&self) -> usize {
        self.silent
            + self.slow
            + self.idle_h2
            + self.stalled
            + self.request_flood
            + self.reset_clients
            + self.zero_window
            + 64
    }
}

/// The index of a 127.x.y.z address in [`source_address`]'s sequence, for overlap checks.
pub fn address_index(ip: Ipv4Addr) -> u64 {
    let [_, b, c, d] = ip.octets();
    (u64::from(b) * 256 + u64::from(c)) * 254 + u64::from(d.clamp(1, 254)) - 1
}

/// Refuses attacker addresses that would fall among the fleet's: the edge would then
/// count attacks against the legitimate agents' per-client budgets.
pub fn check_disjoint(
    fleet_base: Ipv4Addr,
    fleet_ips: usize,
    attack_base: Ipv4Addr,
    attack_ips: usize,
) -> anyhow::Result<()> {
    if attack_base.octets()[0] != 127 {
        bail!("--attack-source-base {attack_base} is not in 127.0.0.0/8");
    }
    let (f0, a0) = (address_index(fleet_base), address_index(attack_base));
    let (f1, a1) = (f0 + fleet_ips as u64, a0 + attack_ips as u64);
    if f0 < a1 && a0 < f1 {
        bail!(
            "the attackers' {attack_ips} source addresses from {attack_base} overlap the \
             fleet's {fleet_ips} from {fleet_base}; move --attack-source-base or --source-base"
        );
    }
    source_address(attack_base, attack_ips.saturating_sub(1))?;
    Ok(())
}

/// What every attacker works with.
pub struct AttackEnv {
    pub target: Target,
    pub tls_h1: tokio_rustls::TlsConnector,
    pub tls_h2: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
    pub host: String,
    /// For the stalled readers, which go through the whole agent stack.
    pub connector: Connector,
    /// For the zero-window readers: HTTP/2 whose streams grant no window.
    pub zero_window: Connector,
    pub token: MetadataValue<Ascii>,
    pub sizing: Sizing,
    pub handshake_timeout: Duration,
    /// Cancelled when the attack phase ends: every attacker stops and closes.
    pub stop: CancellationToken,
    first_source: [usize; 9],
    base: Ipv4Addr,
}

impl AttackEnv {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        target: Target,
        ca_file: &Path,
        server_name: &str,
        token: MetadataValue<Ascii>,
        sizing: Sizing,
        base: Ipv4Addr,
        handshake_timeout: Duration,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        if !target.tls {
            bail!("the attacks need a TLS target (the edge's wss:// or grpcs:// port)");
        }
        match target.addr.ip() {
            IpAddr::V4(v4) if v4.is_loopback() => {}
            other => bail!(
                "the hostile scenario attacks loopback targets only (from 127.x source \
                 addresses); {other} is not one"
            ),
        }
        let roots = load_roots(ca_file)?;
        let name = ServerName::try_from(server_name.to_owned())
            .with_context(|| format!("--server-name `{server_name}` is not a valid name"))?;
        let mut first_source = [0usize; 9];
        let mut next = 0;
        for (slot, n) in first_source.iter_mut().zip(sizing.sources()) {
            *slot = next;
            next += n;
        }
        Ok(Self {
            target,
            tls_h1: tls_connector(&roots, b"http/1.1", false)?,
            tls_h2: tls_connector(&roots, b"h2", false)?,
            server_name: name,
            host: server_name.to_owned(),
            connector: Connector::new(Some(ca_file), server_name, false)?,
            zero_window: Connector::new(Some(ca_file), server_name, false)?.granting_no_window(),
            token,
            sizing,
            handshake_timeout,
            stop,
            first_source,
            base,
        })
    }

    /// The `i`th source address of attack `kind` (an index into [`KINDS`]), cycling over
    /// that kind's addresses.
    fn source(&self, kind: usize, i: usize) -> anyhow::Result<Ipv4Addr> {
        let n = self.sizing.sources()[kind].max(1);
        source_address(self.base, self.first_source[kind] + i % n)
    }

    async fn tcp(&self, source: Ipv4Addr) -> anyhow::Result<TcpStream> {
        let socket = TcpSocket::new_v4().context("socket")?;
        socket
            .bind(SocketAddr::new(IpAddr::V4(source), 0))
            .with_context(|| format!("cannot bind source address {source}"))?;
        let tcp = socket
            .connect(self.target.addr)
            .await
            .with_context(|| format!("connect to {}", self.target.addr))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// TCP from `source`, then TLS offering `h2` or http/1.1, within the handshake timeout.
    /// The error says which step failed (`tcp`, `tls`, `timeout`), for the attack's tally.
    async fn tls(
        &self,
        source: Ipv4Addr,
        h2: bool,
    ) -> Result<TlsStream<TcpStream>, (&'static str, anyhow::Error)> {
        let tcp = self.tcp(source).await.map_err(|e| ("tcp", e))?;
        let connector = if h2 { &self.tls_h2 } else { &self.tls_h1 };
        match timeout(
            self.handshake_timeout,
            connector.connect(self.server_name.clone(), tcp),
        )
        .await
        {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(e)) => Err(("tls", e.into())),
            Err(_) => Err((
                "timeout",
                anyhow::anyhow!("no TLS handshake within {:?}", self.handshake_timeout),
            )),
        }
    }
}

/// One attack's counters, shared by its connections' tasks.
#[derive(Debug)]
struct Tally {
    attempts: u64,
    established: u64,
    closed_by_edge: u64,
    open_at_end: u64,
    /// Microseconds from connected (or handshake done) to the edge's close.
    close_after: Histogram<u64>,
    responses: BTreeMap<String, u64>,
    errors: BTreeMap<String, (u64, String)>,
    bytes_held: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            attempts: 0,
            established: 0,
            closed_by_edge: 0,
            open_at_end: 0,
            close_after: new_histogram(),
            responses: BTreeMap::new(),
            errors: BTreeMap::new(),
            bytes_held: 0,
        }
    }
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Tally>>);

impl Shared {
    fn with<R>(&self, f: impl FnOnce(&mut Tally) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
    fn attempt(&self) {
        self.with(|t| t.attempts += 1);
    }
    fn established(&self) {
        self.with(|t| t.established += 1);
    }
    fn closed(&self, after: Duration) {
        self.with(|t| {
            t.closed_by_edge += 1;
            let _ = t
                .close_after
                .record((after.as_micros() as u64).clamp(1, 600_000_000));
        });
    }
    fn still_open(&self) {
        self.with(|t| t.open_at_end += 1);
    }
    /// How a connection established at `since` ended: closed by the edge, or still open.
    fn ended(&self, closed: bool, since: Instant) {
        if closed {
            self.closed(since.elapsed());
        } else {
            self.still_open();
        }
    }
    fn response(&self, what: impl Into<String>) {
        self.responses(what, 1);
    }
    fn responses(&self, what: impl Into<String>, n: u64) {
        self.with(|t| *t.responses.entry(what.into()).or_default() += n);
    }
    fn error(&self, kind: &str, e: &anyhow::Error) {
        self.with(|t| {
            t.errors
                .entry(kind.to_owned())
                .or_insert_with(|| (0, format!("{e:#}")))
                .0 += 1;
        });
    }

    fn finish(
        self,
        kind: &str,
        sources: usize,
        elapsed: Duration,
    ) -> (AttackSummary, Histogram<u64>) {
        let t = self.with(std::mem::take);
        let ms = |q: f64| {
            (!t.close_after.is_empty()).then(|| t.close_after.value_at_quantile(q) as f64 / 1000.0)
        };
        let mut errors = BTreeMap::new();
        let mut error_examples = BTreeMap::new();
        for (k, (n, example)) in t.errors {
            errors.insert(k.clone(), n);
            error_examples.insert(k, example);
        }
        let summary = AttackSummary {
            kind: kind.to_owned(),
            sources,
            attempts: t.attempts,
            established: t.established,
            closed_by_edge: t.closed_by_edge,
            open_at_end: t.open_at_end,
            close_p50_ms: ms(0.5),
            close_max_ms: (!t.close_after.is_empty()).then(|| t.close_after.max() as f64 / 1000.0),
            responses: t.responses,
            errors,
            error_examples,
            bytes_held: t.bytes_held,
            elapsed_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        };
        (summary, t.close_after)
    }
}

/// Runs every attack at once until `env.stop` (the flood attacks) or until each
/// connection is closed or stopped; returns each kind's summary and close-time histogram.
pub async fn run_all(
    env: Arc<AttackEnv>,
    kinds: &[String],
) -> Vec<(AttackSummary, Histogram<u64>)> {
    let mut set = JoinSet::new();
    let chosen = |kind: &str| kinds.is_empty() || kinds.iter().any(|k| k == kind);
    if chosen(KINDS[0]) {
        set.spawn(silent_tcp(env.clone()));
    }
    if chosen(KINDS[1]) {
        set.spawn(slow_tls(env.clone()));
    }
    if chosen(KINDS[2]) {
        set.spawn(idle_h2(env.clone()));
    }
    if chosen(KINDS[3]) {
        set.spawn(conn_flood(env.clone()));
    }
    if chosen(KINDS[4]) {
        set.spawn(request_flood(env.clone()));
    }
    if chosen(KINDS[5]) {
        set.spawn(stalled_reader(env.clone()));
    }
    if chosen(KINDS[6]) {
        set.spawn(unique_sources(env.clone()));
    }
    if chosen(KINDS[7]) {
        set.spawn(shared_pods::reset_burst(env.clone()));
    }
    if chosen(KINDS[8]) {
        set.spawn(shared_pods::zero_window(env.clone()));
    }
    let mut out = Vec::new();
    while let Some(done) = set.join_next().await {
        if let Ok(result) = done {
            out.push(result);
        }
    }
    out.sort_by_key(|(s, _)| KINDS.iter().position(|k| *k == s.kind));
    out
}

/// Waits for an attack's connection tasks, giving them a few seconds after the stop to
/// close; any still running then are aborted (and counted as open at the end by
/// themselves, or not at all when aborted mid-handshake).
async fn join_bounded(mut set: JoinSet<()>, stop: &CancellationToken) {
    stop.cancelled().await;
    let drained = timeout(Duration::from_secs(5), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        set.abort_all();
    }
}

/// Reads until the edge closes (EOF or an error) or `stop`; `true` when the edge closed.
/// What it sends (a TLS alert, an HTTP error) is kept as the first status line seen.
async fn wait_for_close<R: AsyncRead + Unpin>(
    io: &mut R,
    stop: &CancellationToken,
    tally: &Shared,
) -> bool {
    let mut buf = vec![0u8; 4096];
    let mut seen = 0usize;
    loop {
        tokio::select! {
            r = io.read(&mut buf) => match r {
                Ok(0) | Err(_) => return true,
                Ok(n) => {
                    if seen == 0 {
                        if let Some(status) = status_lines(&buf[..n]).into_iter().next() {
                            tally.response(status);
                        }
                    }
                    seen += n;
                    if seen > READ_CAP {
                        return false;
                    }
                }
            },
            _ = stop.cancelled() => return false,
        }
    }
}

/// `http NNN` for every HTTP/1.x status line in `bytes`.
pub fn status_lines(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    text.split('\n')
        .filter_map(|line| {
            let rest = line
                .strip_prefix("HTTP/1.1 ")
                .or_else(|| line.strip_prefix("HTTP/1.0 "))?;
            let code = rest.get(..3)?;
            code.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| format!("http {code}"))
        })
        .collect()
}

/// TCP connections that never send a ClientHello: the edge should close each at its TLS
/// handshake deadline, or at once past its per-client handshake cap.
async fn silent_tcp(env: Arc<AttackEnv>) -> (AttackSummary, Histogram<u64>) {
    let tally = Shared::default();
    let begin = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..env.sizing.silent {
        if env.stop.is_cancelled() {
            break;
        }
        let (env, tally) = (env.clone(), tally.clone());
        set.spawn(async move {
            tally.attempt();
            let source = match env.source(0, i) {
                Ok(s) => s,
                Err(e) => return tally.error("source", &e),
            };
            let mut tcp = match env.tcp(source).await {
                Ok(t) => t,
                Err(e) => return tally.error("tcp", &e),
            };
            tally.established();
            let t0 = Instant::now();
            if wait_for_close(&mut tcp, &env.stop, &tally).await {
                tally.closed(t0.elapsed());
            } else {
                tally.still_open();
            }
        });
        // A few milliseconds apart: a burst of SYNs would overflow the listen backlog
        // and measure the kernel instead of the edge.
        sleep(Duration::from_millis(2)).await;
    }
    join_bounded(set, &env.stop).await;
    tally.finish(
        KINDS[0],
        env.sizing.silent_sources.min(env.sizing.silent),
        begin.elapsed(),
    )
}

/// TLS, then a request head a few bytes a second that never ends (slowloris): the edge
/// should close each at its request-head deadline.
async fn slow_tls(env: Arc<AttackEnv>) -> (AttackSummary, Histogram<u64>) {
    let tally = Shared::default();
    let begin = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..env.sizing.slow {
        let (env, tally) = (env.clone(), tally.clone());
        set.spawn(async move {
            tally.attempt();
            let Some(mut tls) = tls_or_count(&env, &tally, 1, i, false).await else {
                return;
            };
            let t0 = Instant::now();
            let head = format!("GET / HTTP/1.1\r\nHost: {}\r\nX-Slow: ", env.host);
            let mut bytes = head.into_bytes().into_iter().chain(std::iter::repeat(b'a'));
            let (mut rd, mut wr) = tokio::io::split(&mut tls);
            let dribble = async {
                // Bounded: an hour of dribbling, far past any head deadline.
                for _ in 0..3600 {
                    let chunk: Vec<u8> = bytes.by_ref().take(3).collect();
                    if wr.write_all(&chunk).await.is_err() || wr.flush().await.is_err() {
                        return;
                    }
                    sleep(Duration::from_secs(1)).await;
                }
            };
            let closed = tokio::select! {
                c = wait_for_close(&mut rd, &env.stop, &tally) => c,
                _ = dribble => true,
            };
            if closed {
                tally.closed(t0.elapsed());
            } else {
                tally.still_open();
            }
        });
    }
    join_bounded(set, &env.stop).await;
    tally.finish(KINDS[1], env.sizing.slow.min(2), begin.elapsed())
}

/// TLS for attack `kind`'s `i`th connection, counted as established, or its failure
/// counted (a close during the handshake as the edge's refusal).
async fn tls_or_count(
    env: &AttackEnv,
    tally: &Shared,
    kind: usize,
    i: usize,
    h2: bool,
) -> Option<TlsStream<TcpStream>> {
    let source = match env.source(kind, i) {
        Ok(s) => s,
        Err(e) => {
            tally.error("source", &e);
            return None;
        }
    };
    let t0 = Instant::now();
    match env.tls(source, h2).await {
        Ok(tls) => {
            tally.established();
            Some(tls)
        }
        Err(("tls", e)) => {
            // The edge refusing (a limit, a cap) closes during the handshake.
            tally.closed(t0.elapsed());
            tally.error("tls", &e);
            None
        }
        Err((stage, e)) => {
            tally.error(stage, &e);
            None
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/2 frame header: payload length, type, flags, stream 0.
fn h2_frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        kind,
        flags,
        0,
        0,
        0,
        0,
    ];
    f.extend_from_slice(payload);
    f
}

const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const ACK: u8 = 1;

/// HTTP/2 connections that say hello (preface, SETTINGS, acknowledgements) and never
/// open a stream: the edge may close them at its request-head deadline (at most its h2
/// idle timeout); meanwhile they must not hurt anyone else.
async fn idle_h2(env: Arc<AttackEnv>) -> (AttackSummary, Histogram<u64>) {
    let tally = Shared::default();
    let begin = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..env.sizing.idle_h2 {
        let (env, tally) = (env.clone(), tally.clone());
        set.spawn(async move {
            tally.attempt();
            let Some(mut tls) = tls_or_count(&env, &tally, 2, i, true).await else {
                return;
            };
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                tally.error("alpn", &anyhow::anyhow!("the edge did not agree to h2"));
                return;
            }
            let t0 = Instant::now();
            let mut hello = H2_PREFACE.to_vec();
            hello.extend(h2_frame(SETTINGS, 0, &[]));
            if let Err(e) = tls.write_all(&hello).await {
                tally.closed(t0.elapsed());
                return tally.error("write", &e.into());
            }
            let closed = tokio::select! {
                c = h2_idle_loop(&mut tls, &tally) => c,
                _ = env.stop.cancelled() => false,
            };
            if closed {
                tally.closed(t0.elapsed());
            } else {
                tally.still_open();
            }
        });
        sleep(Duration::from_millis(2)).await;
    }
    join_bounded(set, &env.stop).await;
    tally.finish(KINDS[2], env.sizing.idle_h2.min(2), begin.elapsed())
}

/// Answers SETTINGS and PING as a live client would, until the edge closes (`true`).
async fn h2_idle_loop(tls: &mut TlsStream<TcpStream>, tally: &Shared) -> bool {
    // Bounded by frames: an idle connection gets a handful; thousands means a loop.
    for _ in 0..100_000 {
        let mut header = [0u8; 9];
        if tls.read_exact(&mut header).await.is_err() {
            return true;
        }
        let len =
            (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2]);
        if len > 1 << 24 {
            return true;
        }
        let mut payload = vec![0u8; len];
        if tls.read_exact(&mut payload).await.is_err() {
            return true;
        }
        let reply = match (header[3], header[4] & ACK) {
            (SETTINGS, 0) => Some(h2_frame(SETTINGS, ACK, &[])),
            (PING, 0) => Some(h2_frame(PING, ACK, &payload)),
            (GOAWAY, _) => {
                tally.response("h2 goaway");
                None
            }
            _ => None,
        };
        if let Some(reply) = reply {
            if tls.write_all(&reply).await.is_err() {
                return true;
            }
        }
    }
    false
}

/// New TLS connections as fast as the attacker may (up to `flood_rate` a second from each
/// of a few addresses, two at a time per address), each closed at once: the edge's
/// per-client new-connection limit should refuse most.
async fn conn_flood(env: Arc<AttackEnv>) -> (AttackSummary, Histogram<u64>) {
    let tally = Shared::default();
    let begin = Instant::now();
    let mut set = JoinSet::new();
    for a in 0..env.sizing.flood_sources {
        for _lane in 0..2 {
            let (env, tally) = (env.clone(), tally.clone());
            set.spawn(async move {
                let schedule = Schedule::new(Instant::now(), env.sizing.flood_rate / 2.0);
                // Bounded by count as well as by the stop: an hour at the rate.
                let max = (env.sizing.flood_rate * 1800.0) as u64;
                for k in 0..max {
                    if schedule.wait(k, &env.stop).await.is_none() {
                        return;
                    }
                    tally.attempt();
                    let attempt = tokio::select! {
                        r = tls_or_count(&env, &tally, 3, a, false) => r,
                        _ = env.stop.cancelled() => return,
                    };
                    if let Some(mut tls) = attempt {
                        let _ = tls.shutdown().await;
                    }
                }
            });
        }
    }
    join_bounded(set, &env.stop).await;
    tally.finish(KINDS[3], env.sizing.flood_sources, begin.elapsed())
}

/// The malformed and abusive HTTP/1.1 inputs `request_flood` cycles through.
fn flood_payloads(host: &str) -> Vec<(&'static str, Vec<u8>)> {
    let mut pipelined = String::new();
    for _ in 0..19 {
        pipelined.push_str(&format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    }
    pipelined.push_str(&format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    ));
    let mut huge = format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Huge: ").into_bytes();
    huge.extend(std::iter::repeat_n(b'h', 200_000));
    huge.extend_from_slice(b"\r\n\r\n");
    let mut garbage =
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n").into_bytes();
    garbage.extend_from_slice(b"\x16\x03\x01\x00\xff\xfe garbage \r\n\r\n\x00\x00");
    vec![
        ("pipelined", pipelined.into_bytes()),
        (
            "bad header line",
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nthis line has no colon\r\n\r\n")
                .into_bytes(),
        ),
        ("huge header", huge),
        ("garbage after head", garbage),
        (
            "bad request line",
            b"BL\x00AH /\x01 HTTP/9.9\r\n\r\n".to_vec(),
        ),
    ]
}

/// A few TLS connections at a time sending pipelined, malformed and oversized requests,
/// one input per connection, over and over: the edge should answer 4xx or close, and
/// never fall over.
async fn request_flood(env: Arc<AttackEnv>) -> (AttackSummary, Histogram<u64>) {
    let tally = Shared::default();
    let begin = Instant::now();
    let payloads = Arc::new(flood_payloads(&env.host));
    let mut set = JoinSet::new();
    for c in 0..env.sizing.request_flood {
        let (env, tally, payloads) = (env.clone(), tally.clone(), payloads.clone());
        set.spawn(async move {
            // Bounded by count as well as by the stop.
            for round in 0..100_000usize {
                if env.stop.is_cancelled() {
                    return;
                }
                let (name, bytes) = &payloads[(c + round) % payloads.len()];
                tally.attempt();
                let Some(tls) = tls_or_count(&env, &tally, 4, c, false).await else {
                    sleep(Duration::from_millis(100)).await;
                    continue;
                };
                flood_once(tls, name, bytes, &tally, &env.stop).await;
                sleep(Duration::from_millis(50)).await;
            }
        });
    }
    join_bounded(set, &env.stop).await;
    tally.finish(KINDS[4], 1, begin.elapsed())
}

/// Sends one abusive input and reads what comes back (bounded in time and bytes),
/// counting the status lines and whether the edge closed.
async fn flood_once(
    mut tls: TlsStream<TcpStream>,
    name: &str,
    bytes: &[u8],
    tally: &Shared,
    stop: &CancellationToken,
) {
    let t0 = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(&mut tls);
    let write = async {
        // A write refused half-way is the edge closing on us: what reading will show.
        let _ = wr.write_all(bytes).await;
        let _ = wr.flush().await;
        std::future::pending::<()>().await
    };
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let read = async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.len() > READ_CAP {
                        return false;
                    }
                }
            }
        }
    };
    let closed = tokio::select! {
        c = timeout(READ_WINDOW, read) => c.unwrap_or(false),
        _ = write => false,
        _ = stop.cancelled() => false,
    };
    let statuses = status_lines(&got);
    if statuses.is_empty() {
        tally.response(format!("{name}: no response"));
    }
    for s in statuses {
        tally.response(format!("{name}: {s}"));
    }
    if closed {
        tally.closed(t0.elapsed());
        tally.response(format!("{name}: closed by the edge"));
    } else {
        tally.still_open();
        tally.response(format!("{name}: left open"));
    }
}

/// Many source addresses, one connection each (TLS and one request): churns the edge's
/// per-client key table the way a botnet (or a big NAT pool) does.
async fn unique_sources(env: Arc<AttackEnv>) -> (AttackSummary, Histogram<u64>) {
    let tally = Shared::default();
    let begin = Instant::now();
    let in_flight = Arc::new(Semaphore::new(16));
    let mut set = JoinSet::new();
    for i in 0..env.sizing.unique {
        let permit = tokio::select! {
            p = in_flight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = env.stop.cancelled() => break,
        };
        let (env, tally) = (env.clone(), tally.clone());
        set.spawn(async move {
            tally.attempt();
            if let Some(mut tls) = tls_or_count(&env, &tally, 6, i, false).await {
                let request = format!(
                    "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                    env.host
                );
                if tls.write_all(request.as_bytes()).await.is_ok() {
                    let mut got = Vec::new();
                    let _ = timeout(
                        READ_WINDOW,
                        (&mut tls).take(64 * 1024).read_to_end(&mut got),
                    )
                    .await;
                    match status_lines(&got).into_iter().next() {
                        Some(s) => tally.response(s),
                        None => tally.response("no response"),
                    }
                }
            }
            drop(permit);
        });
        // Reap finished tasks as we go: thousands of them otherwise pile up.
        while set.try_join_next().is_some() {}
    }
    while timeout(Duration::from_secs(10), set.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    set.abort_all();
    tally.finish(KINDS[6], env.sizing.unique, begin.elapsed())
}

/// What a stalled reader's byte stream does: reads pass through until `stall`, then wait
/// (without waking anyone) until `resume`; the bytes read after resuming are what the
/// edge and kas held for this reader meanwhile.
#[derive(Default)]
struct StallCtl {
    stalled: AtomicBool,
    waker: Mutex<Option<Waker>>,
    bytes_read: AtomicU64,
}

impl StallCtl {
    fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }
    fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
    }
}

struct StallIo {
    inner: BoxIo,
    ctl: Arc<StallCtl>,
}

impl AsyncRead for StallIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.ctl.stalled.load(Ordering::SeqCst) {
            *self.ctl.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
            // Resumed between the check and storing the waker: do not sleep forever.
            if self.ctl.stalled.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.ctl.bytes_read.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for StallIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Agents that authenticate through the edge (websocket, valid token, first
/// configuration from kas), start an Echo stream, and then stop reading while they keep
/// sending: whatever kas answers piles up in the edge's and kernel's buffers. At the end
/// they read again, and what arrives is how much was held for them.
async fn stalled_reader(env: Arc<AttackEnv>) -> (AttackSummary, Histogram<u64>) {
    let tally = Shared::default();
    let begin = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..env.sizing.stalled {
        let (env, tally) = (env.clone(), tally.clone());
        set.spawn(async move {
            tally.attempt();
            if let Err((stage, e)) = stall_one(&env, &tally, i).await {
                tally.error(stage, &e);
            }
        });
        sleep(Duration::from_millis(20)).await;
    }
    join_bounded(set, &env.stop).await;
    tally.finish(KINDS[5], 1, begin.elapsed())
}

async fn stall_one(
    env: &AttackEnv,
    tally: &Shared,
    i: usize,
) -> Result<(), (&'static str, anyhow::Error)> {
    let source = env.source(5, i).map_err(|e| ("source", e))?;
    let ctl = Arc::new(StallCtl::default());
    let wrap_ctl = ctl.clone();
    let connecting = env.connector.connect_via(
        &env.target,
        Transport::Websocket,
        Some(IpAddr::V4(source)),
        move |inner| {
            Box::new(StallIo {
                inner,
                ctl: wrap_ctl,
            })
        },
    );
    let (grpc, conn) = match timeout(env.handshake_timeout, connecting).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err((e.stage, e.error)),
        Err(_) => {
            return Err((
                "timeout",
                anyhow::anyhow!("no websocket within the timeout"),
            ))
        }
    };
    let conn_done = CancellationToken::new();
    let conn_task = {
        let done = conn_done.clone();
        tokio::spawn(async move {
            let r = conn.await;
            done.cancel();
            r
        })
    };
    // Authenticated, as far as kas is concerned: the first configuration came back.
    let mut config =
        AgentConfigurationClient::with_origin(grpc.service.clone(), grpc.origin.clone());
    let request = authed(
        &env.token,
        ConfigurationRequest {
            commit_id: String::new(),
            agent_meta: None,
            skip_register: true,
        },
    );
    let first = timeout(env.handshake_timeout, async {
        let mut stream = config.get_configuration(request).await?.into_inner();
        stream.message().await.map(|m| (stream, m))
    })
    .await;
    let _config_stream = match first {
        Ok(Ok((stream, Some(_)))) => stream,
        Ok(Ok((_, None))) => {
            conn_task.abort();
            return Err((
                "configuration",
                anyhow::anyhow!("configuration stream ended"),
            ));
        }
        Ok(Err(status)) => {
            conn_task.abort();
            return Err(("configuration", anyhow::anyhow!("{status}")));
        }
        Err(_) => {
            conn_task.abort();
            return Err(("configuration", anyhow::anyhow!("no configuration in time")));
        }
    };
    tally.established();
    let mut echo = DiagnosticsClient::with_origin(grpc.service.clone(), grpc.origin.clone());
    let (tx, rx) = mpsc::channel::<PingRequest>(1);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let request = authed(&env.token, outbound);
    // Its answer is never read: the call is left to run on its own until the end.
    let call = tokio::spawn(async move { echo.echo(request).await.map(drop) });
    ctl.stall();
    let t0 = Instant::now();
    let payload = vec![b's'; 16 * 1024];
    // Bounded by count (64 MiB sent at most) as well as by the stop and the edge's close.
    for _ in 0..4096 {
        let send = tx.send(PingRequest {
            payload: payload.clone(),
        });
        tokio::select! {
            r = timeout(Duration::from_secs(1), send) => {
                if matches!(r, Ok(Err(_))) {
                    break;
                }
            }
            _ = conn_done.cancelled() => break,
            _ = env.stop.cancelled() => break,
        }
        sleep(Duration::from_millis(20)).await;
    }
    tokio::select! {
        _ = conn_done.cancelled() => {}
        _ = env.stop.cancelled() => {}
    }
    // Read again: what arrives is what was held for us.
    let before = ctl.bytes_read.load(Ordering::Relaxed);
    ctl.resume();
    let closed = timeout(Duration::from_secs(2), conn_done.cancelled())
        .await
        .is_ok();
    let held = ctl
        .bytes_read
        .load(Ordering::Relaxed)
        .saturating_sub(before);
    tally.with(|t| t.bytes_held += held);
    tally.ended(closed || conn_done.is_cancelled(), t0);
    call.abort();
    conn_task.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_counted() {
        let got = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\nxHTTP/1.1 999";
        assert_eq!(status_lines(got), vec!["http 400", "http 200"]);
        assert!(status_lines(b"\x15\x03\x03").is_empty());
    }

    #[test]
    fn attacker_addresses_stay_off_the_fleet() {
        let fleet = Ipv4Addr::new(127, 0, 2, 1);
        let attack = Ipv4Addr::new(127, 0, 6, 1);
        assert!(check_disjoint(fleet, 300, attack, 2013).is_ok());
        // 1,000 agents from 127.0.2.1 reach into 127.0.5.x; 2,000 reach 127.0.9.x.
        assert!(check_disjoint(fleet, 1000, attack, 2013).is_ok());
        assert!(check_disjoint(fleet, 2000, attack, 2013).is_err());
        assert!(check_disjoint(fleet, 10, Ipv4Addr::new(10, 0, 0, 1), 10).is_err());
        assert_eq!(
            address_index(source_address(attack, 777).unwrap()),
            address_index(attack) + 777
        );
    }

    #[test]
    fn sizing_scales_but_never_to_zero() {
        let s = Sizing::scaled(1.0);
        assert_eq!(
            (s.silent, s.slow, s.idle_h2, s.unique),
            (300, 50, 100, 2000)
        );
        let tiny = Sizing::scaled(0.001);
        assert!(tiny.silent >= 1 && tiny.unique >= 1 && tiny.flood_sources >= 1);
        assert_eq!(tiny.total_sources(), tiny.sources().iter().sum::<usize>());
    }

    #[test]
    fn h2_frames_have_nine_byte_headers() {
        let f = h2_frame(PING, ACK, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&f[..9], &[0, 0, 8, PING, ACK, 0, 0, 0, 0]);
        assert_eq!(f.len(), 17);
    }
}
