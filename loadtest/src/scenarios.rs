//! The named scenarios. Each is a sequence of bounded phases over one fleet (or, for
//! `rpc`, a few connections), recording facts and checks into the context.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;

use crate::agent::{self, AgentEnv, Fleet, FleetShape};
use crate::probe::EdgeSample;
use crate::report::EdgeSummary;
use crate::schedule::Schedule;
use crate::stats::{new_histogram, Stats};
use crate::transport::{Connection, Connector, GrpcConn, H2Service};
use crate::Ctx;

pub mod faults;
mod hostile;
pub use hostile::hostile;

/// Marks our lines in the blocklist file, so they can be told apart and removed.
pub const BLOCKLIST_MARK: &str = "# loadtest";

pub(crate) fn connector(ctx: &Ctx) -> anyhow::Result<Connector> {
    Connector::new(
        ctx.ca_file.as_deref(),
        &ctx.args.server_name,
        ctx.args.tls_resumption,
    )
}

fn payload(len: usize) -> Bytes {
    Bytes::from(vec![b'x'; len])
}

pub(crate) fn fleet(ctx: &Ctx, cycle_jitter: Duration) -> anyhow::Result<Fleet> {
    let env = Arc::new(AgentEnv {
        connector: connector(ctx)?,
        targets: ctx.targets.clone(),
        tokens: ctx.tokens.clone(),
        stats: ctx.stats.clone(),
        stop: ctx.interrupted.child_token(),
        echo_interval: ctx.args.echo_interval,
        connect_timeout: ctx.args.connect_timeout,
        backoff_min: ctx.args.backoff_min,
        backoff_max: ctx.args.backoff_max,
        tunnels: ctx.tunnels.as_ref().map(|fleet| agent::Tunnels {
            fleet: fleet.clone(),
            idle: ctx.args.tunnels,
        }),
        payload: payload(ctx.args.payload_bytes),
        cycle_jitter,
    });
    Fleet::new(
        env,
        &FleetShape {
            agents: ctx.args.agents,
            ws_fraction: ctx.args.ws_fraction(),
            source_base: ctx.args.source_base,
            agents_per_ip: ctx.args.agents_per_ip,
            spread_sources: !ctx.args.no_source_spread,
        },
    )
}

/// Ramps the fleet and waits (bounded by --settle) for all of it — and for every idle
/// tunnel, when agents hold them; records the ramp facts.
pub(crate) async fn ramp_and_settle(ctx: &mut Ctx, fleet: &mut Fleet) -> bool {
    ctx.set_phase("ramp");
    let begin = Instant::now();
    fleet.ramp(ctx.args.rate).await;
    let ramp_secs = begin.elapsed().as_secs_f64();
    ctx.set_phase("settle");
    let n = fleet.slots.len();
    let all = fleet
        .wait_for(ctx.args.settle, |f| f.connected() == n)
        .await;
    let connected = fleet.connected();
    ctx.fact("ramp_s", round3(ramp_secs));
    ctx.fact(
        "time_to_all_connected_s",
        round3(begin.elapsed().as_secs_f64()),
    );
    ctx.fact("connected_after_ramp", connected);
    ctx.check(
        "all agents connected",
        all,
        format!("{connected}/{n} within the ramp + {:?}", ctx.args.settle),
    );
    let Some(tunnels) = ctx.tunnels.clone() else {
        return all;
    };
    // Idle = accepted by kas (it answers a tunnel once it holds it).
    let want = n * ctx.args.tunnels;
    let left = (begin + ctx.args.settle).saturating_duration_since(Instant::now());
    let held = fleet
        .wait_for(left.max(Duration::from_secs(1)), |_| {
            tunnels.counters().idle() >= want
        })
        .await;
    let idle = tunnels.counters().idle();
    ctx.fact("tunnels_idle_after_ramp", idle as u64);
    ctx.check(
        "all tunnels held",
        held,
        format!(
            "{idle}/{want} idle tunnels within the ramp + {:?}",
            ctx.args.settle
        ),
    );
    all && held
}

/// The last phase of every fleet scenario: stop the agents, waiting (bounded) for them.
pub(crate) async fn stop(ctx: &Ctx, fleet: Fleet) {
    ctx.set_phase("stop");
    fleet.shutdown(Duration::from_secs(10)).await;
}

pub(crate) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn delta<T: Copy + std::ops::Sub<Output = T>>(a: Option<T>, b: Option<T>) -> Option<T> {
    Some(b? - a?)
}

/// Edge memory and CPU per connection from samples before the ramp, after it and at the
/// end of the hold.
fn edge_summary(
    ctx: &Ctx,
    base: &EdgeSample,
    ramped: &EdgeSample,
    end: &EdgeSample,
    connections: i64,
    handshakes: u64,
    hold: Duration,
) -> EdgeSummary {
    let rss_delta = delta(
        base.rss_bytes.map(|b| b as f64),
        end.rss_bytes.map(|b| b as f64),
    );
    let cpu_ramp = delta(base.cpu_seconds, ramped.cpu_seconds);
    let cpu_hold =
        delta(ramped.cpu_seconds, end.cpu_seconds).map(|c| c / hold.as_secs_f64().max(1e-3));
    let per_conn = |v: f64| (connections > 0).then(|| v / connections as f64);
    EdgeSummary {
        pids: ctx.args.edge_pids.clone(),
        connections_measured: Some(connections),
        baseline_rss_bytes: base.rss_bytes,
        loaded_rss_bytes: end.rss_bytes,
        rss_per_connection_bytes: rss_delta.and_then(per_conn),
        cpu_seconds_ramp: cpu_ramp,
        cpu_ms_per_handshake: cpu_ramp
            .and_then(|c| (handshakes > 0).then(|| c * 1000.0 / handshakes as f64)),
        cpu_cores_hold: cpu_hold,
        cpu_us_per_connection_per_s: cpu_hold.and_then(|c| per_conn(c * 1e6)),
        open_connections: end.open_connections,
        active_streams: end.active_streams,
        ..EdgeSummary::default()
    }
}

pub async fn idle(ctx: &mut Ctx) -> anyhow::Result<()> {
    let mut fleet = fleet(ctx, Duration::ZERO)?;
    ctx.set_phase("baseline");
    let base = ctx.probe.sample().await;
    ramp_and_settle(ctx, &mut fleet).await;
    let handshakes = Stats::get(&ctx.stats.handshakes);
    let ramped = ctx.probe.sample().await;
    ctx.set_phase("hold");
    let hold_begin = Instant::now();
    ctx.pause(ctx.args.duration).await;
    let hold = hold_begin.elapsed();
    let end = ctx.probe.sample().await;
    let connected = fleet.connected();
    let n = fleet.slots.len();
    ctx.fact("hold_s", round3(hold.as_secs_f64()));
    ctx.fact("connected_at_end_of_hold", connected);
    ctx.check(
        "fleet held",
        connected == n,
        format!("{connected}/{n} connected at the end of the hold"),
    );
    if ctx.probe.is_active() {
        ctx.edge = Some(edge_summary(
            ctx,
            &base,
            &ramped,
            &end,
            connected as i64,
            handshakes,
            hold,
        ));
    }
    stop(ctx, fleet).await;
    Ok(())
}

pub async fn storm(ctx: &mut Ctx) -> anyhow::Result<()> {
    let mut fleet = fleet(ctx, ctx.args.storm_jitter)?;
    ramp_and_settle(ctx, &mut fleet).await;
    ctx.pause(Duration::from_secs(1)).await;
    ctx.set_phase("storm");
    let before = Stats::get(&ctx.stats.handshakes);
    let begin = Instant::now();
    for i in 0..fleet.slots.len() {
        fleet.cycle(i);
    }
    // Back = connected again with the new epoch (each slot's epoch went 0 → 1).
    let back = |f: &Fleet| {
        f.slots
            .iter()
            .filter(|s| s.is_connected() && s.ready_epoch.load(Ordering::SeqCst) >= 2)
            .count()
    };
    let n = fleet.slots.len();
    let all = fleet.wait_for(ctx.args.duration, |f| back(f) == n).await;
    let took = begin.elapsed().as_secs_f64();
    let reconnected = back(&fleet);
    let handshakes = Stats::get(&ctx.stats.handshakes).saturating_sub(before);
    ctx.fact("storm_agents", n);
    ctx.fact("storm_reconnected", reconnected);
    ctx.fact("storm_time_until_all_back_s", round3(took));
    ctx.fact("storm_handshakes", handshakes);
    ctx.fact(
        "storm_handshakes_per_s",
        round3(handshakes as f64 / took.max(1e-3)),
    );
    ctx.check(
        "all agents back after the storm",
        all,
        format!("{reconnected}/{n} within {:?}", ctx.args.duration),
    );
    stop(ctx, fleet).await;
    Ok(())
}

pub async fn churn(ctx: &mut Ctx) -> anyhow::Result<()> {
    let mut fleet = fleet(ctx, Duration::ZERO)?;
    ramp_and_settle(ctx, &mut fleet).await;
    ctx.set_phase("churn");
    let n = fleet.slots.len();
    let total = (ctx.args.churn_rate * ctx.args.duration.as_secs_f64()).ceil() as u64;
    let begin = Instant::now();
    let schedule = Schedule::new(begin, ctx.args.churn_rate);
    let cycles_before = Stats::get(&ctx.stats.cycles);
    let mut min_connected = n;
    for k in 0..total {
        if schedule.wait(k, &ctx.interrupted).await.is_none() {
            break;
        }
        fleet.cycle((k % n as u64) as usize);
        if k % 16 == 0 {
            min_connected = min_connected.min(fleet.connected());
        }
    }
    let churn_secs = begin.elapsed().as_secs_f64();
    ctx.set_phase("settle");
    // The last requested reconnects have to start before "everyone connected" means anything.
    ctx.pause(Duration::from_millis(200)).await;
    let all = fleet
        .wait_for(ctx.args.settle, |f| f.connected() == n)
        .await;
    let done = Stats::get(&ctx.stats.cycles).saturating_sub(cycles_before);
    ctx.fact("churn_reconnects_requested", total);
    ctx.fact("churn_reconnects_done", done);
    ctx.fact(
        "churn_rate_achieved_per_s",
        round3(done as f64 / churn_secs.max(1e-3)),
    );
    ctx.fact("churn_min_connected", min_connected);
    ctx.check(
        "fleet whole after churn",
        all,
        format!("{}/{n} connected after the churn", fleet.connected()),
    );
    stop(ctx, fleet).await;
    Ok(())
}

/// The blocklist file without our lines, so a run always leaves it as it found it.
fn without_our_lines(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_end().ends_with(BLOCKLIST_MARK))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Replaces the file in one rename, so the edge never reads half of it.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".loadtest.tmp");
    std::fs::write(&tmp, text)
        .with_context(|| format!("cannot write {}", Path::new(&tmp).display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// The blocklist file as it was before the run (`None`: there was none), to put back.
fn read_blocklist(file: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(file) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
}

/// Puts the blocklist file back as it was: without our lines, or not there at all.
fn restore_blocklist(file: &Path, original: Option<&str>) -> anyhow::Result<()> {
    match original {
        Some(text) => write_atomically(file, &without_our_lines(text)),
        None => {
            std::fs::remove_file(file).with_context(|| format!("cannot remove {}", file.display()))
        }
    }
}

/// Who a blocklist run blocks: every `--block-every`th source address, and every agent
/// behind one of those (with `--agents-per-ip` several share one).
struct Blocked {
    ips: BTreeSet<IpAddr>,
    agents: Vec<usize>,
}

impl Blocked {
    fn choose(fleet: &Fleet, every: usize) -> Self {
        let ips: BTreeSet<IpAddr> = fleet
            .slots
            .iter()
            .filter(|s| s.ip_index % every == 0)
            .filter_map(|s| s.source)
            .collect();
        let agents = fleet
            .slots
            .iter()
            .filter(|s| s.source.is_some_and(|ip| ips.contains(&ip)))
            .map(|s| s.index)
            .collect();
        Self { ips, agents }
    }

    /// Tells the blocked agents their cut is the point: counted apart, and they stay down.
    fn expect_cuts(&self, fleet: &Fleet) {
        for &i in &self.agents {
            fleet.slots[i].expect_cut.store(true, Ordering::SeqCst);
        }
    }

    /// The blocklist file with our line for every blocked address.
    fn blocklist_text(&self, original: Option<&str>) -> String {
        let mut text = without_our_lines(original.unwrap_or(""));
        for ip in &self.ips {
            text.push_str(&format!("{ip}  {BLOCKLIST_MARK}\n"));
        }
        text
    }

    fn all_cut(&self, fleet: &Fleet) -> bool {
        self.agents
            .iter()
            .all(|&i| fleet.slots[i].cuts.load(Ordering::SeqCst) > 0)
    }
}

/// What happened after the blocklist was written: how soon each blocked agent was cut,
/// how many were not, and how many others were hit as well.
struct Cuts {
    /// Microseconds from the write to each blocked agent's cut.
    after_write: Histogram<u64>,
    not_cut: usize,
    /// Agents not blocked that were cut after the write, or are down.
    bystanders: usize,
}

impl Cuts {
    fn measure(fleet: &Fleet, blocked: &Blocked, written_us: u64) -> Self {
        let mut after_write = new_histogram();
        let mut not_cut = 0;
        for &i in &blocked.agents {
            let slot = &fleet.slots[i];
            let at = slot.cut_at_us.load(Ordering::SeqCst);
            if slot.cuts.load(Ordering::SeqCst) > 0 && at >= written_us {
                let _ = after_write.record((at - written_us).max(1));
            } else {
                not_cut += 1;
            }
        }
        let bystanders = fleet
            .slots
            .iter()
            .filter(|s| !s.expect_cut.load(Ordering::SeqCst))
            .filter(|s| s.cut_at_us.load(Ordering::SeqCst) >= written_us || !s.is_connected())
            .count();
        Self {
            after_write,
            not_cut,
            bystanders,
        }
    }

    fn slowest_ms(&self) -> f64 {
        self.after_write.max() as f64 / 1000.0
    }

    /// The checks: every blocked agent cut, in time, and nobody else.
    fn check(&self, ctx: &mut Ctx, blocked: &Blocked, cut_in_time: bool) {
        let (not_cut, bystanders, max_ms) = (self.not_cut, self.bystanders, self.slowest_ms());
        ctx.check(
            "blocked agents cut",
            cut_in_time && not_cut == 0,
            format!(
                "{} of {} cut within {:?}",
                blocked.agents.len() - not_cut,
                blocked.agents.len(),
                ctx.args.block_wait
            ),
        );
        ctx.check(
            "cut within the deadline",
            not_cut == 0 && max_ms <= ctx.args.block_deadline.as_secs_f64() * 1000.0,
            format!(
                "slowest {max_ms:.0} ms (deadline {:?})",
                ctx.args.block_deadline
            ),
        );
        ctx.check(
            "nobody else cut",
            bystanders == 0,
            format!("{bystanders} agents not blocked were cut or are down"),
        );
    }

    /// The facts, and the cut times as a latency of their own.
    fn record(self, ctx: &mut Ctx, fleet: &Fleet, blocked: &Blocked, file: &Path) {
        let max_ms = self.slowest_ms();
        ctx.fact("blocklist_file", file.display().to_string());
        ctx.fact("blocked_ips", blocked.ips.len());
        ctx.fact("blocked_agents", blocked.agents.len());
        ctx.fact("blocked_cut", self.after_write.len());
        ctx.fact("blocked_not_cut", self.not_cut);
        ctx.fact("others_cut_or_down", self.bystanders);
        ctx.fact("others", fleet.slots.len() - blocked.agents.len());
        if !self.after_write.is_empty() {
            ctx.fact(
                "cut_p50_ms",
                self.after_write.value_at_quantile(0.5) as f64 / 1000.0,
            );
            ctx.fact("cut_max_ms", max_ms);
            ctx.extra_latency
                .push(("cut after blocklist write".into(), self.after_write));
        }
    }
}

/// Blocks part of a connected fleet through the edge's blocklist file and measures how
/// soon exactly those agents are cut; the file is restored however the run goes, once
/// it was written.
pub async fn blocklist(ctx: &mut Ctx) -> anyhow::Result<()> {
    let Some(file) = ctx.args.blocklist_file.clone() else {
        bail!("the blocklist scenario needs --blocklist-file (the edge's blocklist)");
    };
    if ctx.args.no_source_spread {
        bail!("the blocklist scenario needs spread source addresses (drop --no-source-spread)");
    }
    let every = ctx.args.block_every.max(1);
    let original = read_blocklist(&file)?;
    let mut fleet = fleet(ctx, Duration::ZERO)?;
    ramp_and_settle(ctx, &mut fleet).await;
    ctx.pause(Duration::from_secs(1)).await;

    let blocked = Blocked::choose(&fleet, every);
    blocked.expect_cuts(&fleet);
    let text = blocked.blocklist_text(original.as_deref());
    ctx.set_phase("blocklist");
    let written_us = ctx.stats.start.elapsed().as_micros() as u64;
    let written = Instant::now();
    write_atomically(&file, &text)?;

    let cut_in_time = fleet
        .wait_for(ctx.args.block_wait, |f| blocked.all_cut(f))
        .await;
    // Watch the rest a little longer: a sloppy match would cut them a moment later.
    let left = ctx.args.block_wait.saturating_sub(written.elapsed());
    ctx.pause(left.min(Duration::from_secs(1))).await;
    let restored = restore_blocklist(&file, original.as_deref());

    let cuts = Cuts::measure(&fleet, &blocked, written_us);
    cuts.check(ctx, &blocked, cut_in_time);
    cuts.record(ctx, &fleet, &blocked, &file);
    ctx.check(
        "blocklist file restored",
        restored.is_ok(),
        restored.err().map_or(String::new(), |e| format!("{e:#}")),
    );
    stop(ctx, fleet).await;
    Ok(())
}

/// A connection's Diagnostics client: the rpc scenario's requests go through these.
type PingClient = DiagnosticsClient<H2Service>;

/// Open-loop unary requests: send times are fixed up front at the target rate and each
/// latency counts from its scheduled time, so a slow server shows as latency instead of
/// silently lowering the request rate.
pub async fn rpc(ctx: &mut Ctx) -> anyhow::Result<()> {
    let conns_stop = CancellationToken::new();
    let clients = connect_rpc_clients(ctx, &conns_stop).await?;
    ctx.fact("rpc_connections_open", clients.len());

    ctx.set_phase("rpc");
    let rate = ctx.args.rpc_rate;
    let total = ((rate * ctx.args.duration.as_secs_f64()).ceil() as u64).min(50_000_000);
    let limit = ctx.args.rpc_max_in_flight.clamp(1, 1 << 20);
    let in_flight = Arc::new(Semaphore::new(limit));
    let dispatched = send_open_loop(ctx, &clients, total, &in_flight).await;
    // Every permit back = every request finished (each is bounded by --rpc-timeout).
    let drained = timeout(
        ctx.args.rpc_timeout + Duration::from_secs(2),
        in_flight.acquire_many(limit as u32),
    )
    .await;
    let elapsed = dispatched.begin.elapsed().as_secs_f64();
    conns_stop.cancel();
    let (sent, ok) = (dispatched.sent, Stats::get(&ctx.stats.rpc_ok));
    ctx.fact("rpc_target_rate_per_s", rate);
    ctx.fact("rpc_scheduled", total);
    ctx.fact("rpc_sent", sent);
    ctx.fact(
        "rpc_sent_rate_per_s",
        round3(sent as f64 / dispatched.sending_secs.max(1e-3)),
    );
    ctx.fact("rpc_ok_rate_per_s", round3(ok as f64 / elapsed.max(1e-3)));
    ctx.fact(
        "rpc_dispatch_max_lag_ms",
        round3(dispatched.max_lag.as_secs_f64() * 1000.0),
    );
    ctx.check(
        "all requests finished",
        drained.is_ok(),
        format!("{ok} ok of {sent} sent"),
    );
    Ok(())
}

/// Opens `--rpc-connections` connections ([`open_counted`]), each driven until `stop`.
/// One that fails is counted as an error and the run goes on with the rest; none at all is
/// the end of it.
async fn connect_rpc_clients(
    ctx: &Ctx,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<PingClient>> {
    let connector = connector(ctx)?;
    let mut clients = Vec::new();
    ctx.set_phase("connect");
    for i in 0..ctx.args.rpc_connections.max(1) {
        if let Some((grpc, conn)) = open_counted(ctx, &connector, i).await? {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
            clients.push(DiagnosticsClient::with_origin(grpc.service, grpc.origin));
        }
    }
    if clients.is_empty() {
        bail!("no connection could be opened");
    }
    Ok(clients)
}

/// Connection `i` of a scenario of a few connections (`rpc`, `bulk`): target `i` round-robin,
/// the fleet's transport mix ([`agent::transport_for`]) and, on loopback, source address `i`
/// from `--source-base`; counted in the stats (attempt, handshake and its latency, or the
/// error). `None` when it failed.
pub(crate) async fn open_counted(
    ctx: &Ctx,
    connector: &Connector,
    i: usize,
) -> anyhow::Result<Option<(GrpcConn, Connection)>> {
    let stats = &ctx.stats;
    let target = &ctx.targets[i % ctx.targets.len()];
    let transport = agent::transport_for(i, ctx.args.ws_fraction());
    let source = match target.addr.ip() {
        IpAddr::V4(v4) if v4.is_loopback() && !ctx.args.no_source_spread => {
            Some(IpAddr::V4(agent::source_address(ctx.args.source_base, i)?))
        }
        _ => None,
    };
    stats.inc(&stats.connect_attempts);
    let t0 = Instant::now();
    match timeout(
        ctx.args.connect_timeout,
        connector.connect(target, transport, source),
    )
    .await
    {
        Ok(Ok(connected)) => {
            stats.inc(&stats.handshakes);
            stats.handshake_latency.record(t0.elapsed());
            Ok(Some(connected))
        }
        Ok(Err(e)) => {
            stats.errors.add(e.stage, || e.to_string());
            Ok(None)
        }
        Err(_) => {
            stats
                .errors
                .add("timeout: handshake", || "connect timed out".into());
            Ok(None)
        }
    }
}

/// What the open loop sent: when sending began, how long it took, how many went out and
/// how far the dispatcher fell behind its schedule.
struct Dispatched {
    begin: Instant,
    sending_secs: f64,
    sent: u64,
    max_lag: Duration,
}

/// Sends `total` Pings at `--rpc-rate` over the clients in turn, each on its own task and
/// holding one of `in_flight`'s permits until answered; stops early on Ctrl-C.
async fn send_open_loop(
    ctx: &Ctx,
    clients: &[PingClient],
    total: u64,
    in_flight: &Arc<Semaphore>,
) -> Dispatched {
    let payload = payload(ctx.args.payload_bytes);
    let begin = Instant::now() + Duration::from_millis(50);
    let schedule = Schedule::new(begin, ctx.args.rpc_rate);
    let mut max_lag = Duration::ZERO;
    let mut sent = 0u64;
    for i in 0..total {
        let Some(scheduled) = schedule.wait(i, &ctx.interrupted).await else {
            break;
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        max_lag = max_lag.max(Instant::now().saturating_duration_since(scheduled));
        let client = clients[(i as usize) % clients.len()].clone();
        let request = agent::authed(
            &ctx.token,
            PingRequest {
                payload: payload.to_vec(),
            },
        );
        ctx.stats.inc(&ctx.stats.rpc_sent);
        sent += 1;
        let stats = ctx.stats.clone();
        tokio::spawn(ping(
            client,
            request,
            stats,
            ctx.args.rpc_timeout,
            scheduled,
            permit,
        ));
    }
    Dispatched {
        begin,
        sending_secs: begin.elapsed().as_secs_f64(),
        sent,
        max_lag,
    }
}

/// One request: its latency counts from when it was scheduled, not sent; the permit goes
/// back when it is answered or given up.
async fn ping(
    mut client: PingClient,
    request: tonic::Request<PingRequest>,
    stats: Arc<Stats>,
    deadline: Duration,
    scheduled: Instant,
    permit: OwnedSemaphorePermit,
) {
    match timeout(deadline, client.ping(request)).await {
        Ok(Ok(_)) => {
            stats.rpc_latency.record(scheduled.elapsed());
            stats.inc(&stats.rpc_ok);
        }
        Ok(Err(status)) => stats
            .errors
            .add(&agent::status_kind("rpc", &status), || status.to_string()),
        Err(_) => stats
            .errors
            .add("rpc: timeout", || format!("no answer within {deadline:?}")),
    }
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_lines_are_removed_and_others_kept() {
        let text = "# operators' list\n10.1.2.3\n127.0.2.1  # loadtest\n192.0.2.0/24 # someone\n";
        assert_eq!(
            without_our_lines(text),
            "# operators' list\n10.1.2.3\n192.0.2.0/24 # someone\n"
        );
    }
}
