//! `kas-loadtest`: a fleet of simulated GitLab agents against kas-edge or kas pods.
//!
//! [`cli`] (options) → [`run`] (set-up, sampler, report) → [`scenarios`] (what the fleet
//! does; [`k8s`] for the Kubernetes API proxy's callers) → [`agent`] (one agent's life) →
//! [`transport`] (TCP/TLS/websocket/HTTP/2). The [`report`] renders the result; [`probe`]
//! reads the edge's own numbers. [`stack`] is `kas-loadtest-stack`, the local stack of the
//! `k8s-proxy` scenario. [`binary`] is what both programs do alike around their work.

pub mod agent;
pub mod attacks;
pub mod binary;
pub mod bulk;
pub mod cli;
pub mod k8s;
pub mod probe;
pub mod report;
pub mod scenarios;
mod schedule;
pub mod stack;
pub mod stats;
pub mod target;
pub mod transport;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};

use agent::AgentToken;
pub use cli::{Args, Scenario};
use kas::dev::agent::Fleet as TunnelFleet;
use probe::EdgeProbe;
use report::{ErrorEntry, LatencySummary, Report, Sample, Totals};
use stats::Stats;
use target::Target;

/// The local stack's files, used when the corresponding option is not given.
const DEV_TOKEN: &str = ".dev/demo-agent-token";
const DEV_CA: &str = ".dev/tls/tls.crt";
const DEFAULT_TARGET: &str = "wss://127.0.0.1:8443/";

/// Raises the soft open-files limit to the hard one: each agent is a socket.
pub fn raise_nofile_limit() -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!(
                "getrlimit(RLIMIT_NOFILE): {}",
                std::io::Error::last_os_error()
            );
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    // rlim_t is not u64 on every platform.
    #[allow(clippy::unnecessary_cast)]
    Ok(limit.rlim_cur as u64)
}

/// The agent tokens: `--token`, or every non-empty line of `--token-file` (or of the local
/// stack's token file).
fn read_tokens(args: &Args) -> anyhow::Result<Vec<String>> {
    let text = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --token-file {}", path.display()))?,
        (None, None) if Path::new(DEV_TOKEN).exists() => std::fs::read_to_string(DEV_TOKEN)
            .with_context(|| format!("cannot read {DEV_TOKEN}"))?,
        // Callers alone (k8s-proxy with no fleet): no agent, no token.
        (None, None) if args.agents == 0 && args.scenario == Scenario::K8sProxy => {
            "no-agent".to_owned()
        }
        // The faults scenario starts its own stack, which writes the tokens.
        (None, None) if args.scenario == Scenario::Faults => "from-the-stack".to_owned(),
        (None, None) => {
            bail!("no token: give --token or --token-file (the local stack's is {DEV_TOKEN})")
        }
    };
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() {
        bail!("the agent token is empty");
    }
    Ok(tokens)
}

/// Everything a scenario works with.
pub struct Ctx {
    pub args: Args,
    pub targets: Vec<Target>,
    /// The first agent token, for the scenarios of a few connections.
    pub token: MetadataValue<Ascii>,
    /// Every agent token: agent `i` uses `i mod len`.
    pub tokens: Vec<AgentToken>,
    /// The agents' reverse tunnels (`--reverse-tunnel`, k8s-proxy): what they share.
    pub tunnels: Option<Arc<TunnelFleet>>,
    pub ca_file: Option<PathBuf>,
    pub stats: Arc<Stats>,
    pub probe: Arc<EdgeProbe>,
    pub phase: Arc<Mutex<String>>,
    /// Cancelled on Ctrl-C: phases end early and the report is still written.
    pub interrupted: CancellationToken,
    pub facts: serde_json::Map<String, serde_json::Value>,
    pub checks: Vec<report::Check>,
    pub edge: Option<report::EdgeSummary>,
    pub extra_latency: Vec<(String, hdrhistogram::Histogram<u64>)>,
    pub attacks: Vec<report::AttackSummary>,
    /// faults: every fault injected, what it cost and the timeline with the processes'
    /// memory and CPU.
    pub faults: Option<scenarios::faults::FaultsReport>,
}

impl Ctx {
    /// A context for a run starting now: empty counters, facts and checks.
    fn new(
        args: Args,
        targets: Vec<Target>,
        tokens: Vec<AgentToken>,
        ca_file: Option<PathBuf>,
        probe: Arc<EdgeProbe>,
    ) -> Self {
        let stats = Arc::new(Stats::new());
        let tunnels = (args.agents > 0
            && (args.reverse_tunnel || args.scenario == Scenario::K8sProxy))
            .then(|| Arc::new(tunnel_fleet(&args.kube_api_url, &stats)));
        Self {
            targets,
            token: tokens[0].header.clone(),
            tokens,
            tunnels,
            ca_file,
            stats,
            probe,
            phase: Arc::new(Mutex::new("start".into())),
            interrupted: CancellationToken::new(),
            facts: serde_json::Map::new(),
            checks: Vec::new(),
            edge: None,
            extra_latency: Vec::new(),
            attacks: Vec::new(),
            faults: None,
            args,
        }
    }

    pub fn set_phase(&self, phase: &str) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase.to_owned();
    }

    pub fn fact(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.facts.insert(key.to_owned(), value.into());
    }

    pub fn check(&mut self, name: &str, ok: bool, detail: impl Into<String>) {
        self.checks.push(report::Check {
            name: name.to_owned(),
            ok,
            detail: detail.into(),
        });
    }

    /// Sleeps, unless interrupted.
    pub async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.interrupted.cancelled() => {}
        }
    }
}

/// The `Via` product the loadtest's agents append, as agentk's `gitlab-agent/<version>`.
const VIA: &str = "gitlab-agent/v16.5.0-kas-loadtest/0000000";

/// The agents' tunnels replaying against `kube_api`, failures counted in `stats` by
/// kind (`tunnel: grpc <code>`: kas refused or broke an idle tunnel; `tunnel request: grpc
/// <code>`: a routed request failed in the agent). A request its caller left (a watch
/// closed) is not a failure.
pub(crate) fn tunnel_fleet(kube_api: &str, stats: &Arc<Stats>) -> TunnelFleet {
    let stats = stats.clone();
    TunnelFleet::new(kube_api, VIA).with_error_hook(Box::new(move |stage, status| {
        if stage == "request" && status.code() == tonic::Code::Cancelled {
            stats.inc(&stats.tunnel_requests_cancelled);
            return;
        }
        let kind = if stage == "request" {
            "tunnel request"
        } else {
            "tunnel"
        };
        stats.errors.add(&agent::status_kind(kind, status), || {
            status.message().to_owned()
        });
    }))
}

fn progress_bar(args: &Args) -> ProgressBar {
    let show = match args.progress.as_str() {
        "always" => true,
        "never" => false,
        _ => std::io::stderr().is_terminal(),
    };
    let bar = ProgressBar::with_draw_target(
        Some(args.agents as u64),
        if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Samples the counters (and the edge) every interval until `stop`; returns the timeline.
fn spawn_sampler(
    ctx: &Ctx,
    stop: CancellationToken,
    bar: ProgressBar,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    let stats = ctx.stats.clone();
    let probe = ctx.probe.clone();
    let phase = ctx.phase.clone();
    let every = ctx.args.sample_interval.max(Duration::from_millis(50));
    let rpc = ctx.args.scenario == Scenario::Rpc;
    let tunnels = ctx.tunnels.clone();
    tokio::spawn(async move {
        let mut timeline = Vec::new();
        let mut sample_tick = interval(every);
        sample_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut bar_tick = interval(Duration::from_millis(200));
        bar_tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = sample_tick.tick() => {
                    let edge = if probe.is_active() { Some(probe.sample().await) } else { None };
                    let current = phase.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    timeline.push(Sample {
                        t: stats.elapsed_secs(),
                        phase: current,
                        connected: stats.now_connected(),
                        handshakes: Stats::get(&stats.handshakes),
                        connects_ok: Stats::get(&stats.connects_ok),
                        errors: stats.errors.total(),
                        cuts: Stats::get(&stats.unexpected_cuts) + Stats::get(&stats.expected_cuts),
                        echo_ok: Stats::get(&stats.echo_ok),
                        rpc_ok: Stats::get(&stats.rpc_ok),
                        k8s_ok: Stats::get(&stats.k8s_ok),
                        tunnels_busy: tunnels.as_ref().map(|t| t.counters().busy() as u64),
                        edge,
                    });
                }
                _ = bar_tick.tick() => {
                    let current = phase.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if rpc {
                        bar.set_position(Stats::get(&stats.rpc_sent));
                        bar.set_message(format!("{current}: ok {} errors {}", Stats::get(&stats.rpc_ok), stats.errors.total()));
                    } else {
                        bar.set_position(stats.now_connected().max(0) as u64);
                        bar.set_message(format!("connected · {current} · errors {}", stats.errors.total()));
                    }
                }
                _ = stop.cancelled() => break,
            }
        }
        bar.finish_and_clear();
        timeline
    })
}

/// Parses options, raises limits and runs the scenario; the report says whether the run
/// stayed within its error budget.
pub async fn run(mut args: Args) -> anyhow::Result<Report> {
    let targets = parse_targets(&mut args)?;
    let ca_file = ca_file(&args, &targets);
    let tokens = agent_tokens(&args)?;
    check_capacity(&args)?;
    let probe = Arc::new(edge_probe(&args)?);
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut ctx = Ctx::new(args, targets, tokens, ca_file, probe);
    let (outcome, timeline) = run_sampled(&mut ctx).await;
    if let Err(e) = outcome {
        ctx.check("scenario ran to the end", false, format!("{e:#}"));
    }
    if ctx.interrupted.is_cancelled() {
        ctx.check("not interrupted", false, "stopped by Ctrl-C");
    }
    Ok(build_report(ctx, started_unix_ms, timeline))
}

/// The `--target`s (the local stack's edge when none is given), refused unless loopback
/// or `--allow-non-loopback`.
fn parse_targets(args: &mut Args) -> anyhow::Result<Vec<Target>> {
    if args.targets.is_empty() {
        args.targets.push(DEFAULT_TARGET.to_owned());
    }
    args.targets
        .iter()
        .map(|t| Target::parse(t, args.allow_non_loopback))
        .collect()
}

/// `--ca-file`, else the local stack's certificate when a target uses TLS and it exists.
fn ca_file(args: &Args, targets: &[Target]) -> Option<PathBuf> {
    match &args.ca_file {
        Some(p) => Some(p.clone()),
        None if targets.iter().any(|t| t.tls) && Path::new(DEV_CA).exists() => {
            Some(PathBuf::from(DEV_CA))
        }
        None => None,
    }
}

/// The tokens with the `authorization` value every agent sends, checked once here rather
/// than failing in every agent.
fn agent_tokens(args: &Args) -> anyhow::Result<Vec<AgentToken>> {
    read_tokens(args)?
        .into_iter()
        .map(|raw| {
            let header = format!("Bearer {raw}")
                .parse()
                .context("the token has characters not allowed in a header")?;
            Ok(AgentToken { header, raw })
        })
        .collect()
}

/// Refuses a run that cannot open its sockets before it starts, instead of as a flood of
/// errors half-way: raises the open-files limit and checks the connections fit.
fn check_capacity(args: &Args) -> anyhow::Result<()> {
    if args.agents == 0 && !matches!(args.scenario, Scenario::Rpc | Scenario::K8sProxy) {
        bail!("--agents must be at least 1");
    }
    let nofile = raise_nofile_limit()?;
    let sockets = match args.scenario {
        Scenario::Rpc => args.rpc_connections,
        Scenario::Bulk => 1,
        Scenario::Hostile => args.agents + attacks::Sizing::scaled(args.attack_scale).max_sockets(),
        // Callers over HTTP/1.1 hold a connection per request in flight.
        Scenario::K8sProxy => {
            let callers = if args.k8s_concurrency > 0 {
                args.k8s_concurrency
            } else {
                args.k8s_max_in_flight
            };
            args.agents + args.k8s_watches + callers.min(4096)
        }
        // Agents, their Kubernetes API callers, and the stack's own sockets (pods' and
        // stand-ins' ends of every connection run in this process or its children).
        Scenario::Faults => 2 * args.agents + args.k8s_max_in_flight.min(4096) + 256,
        _ => args.agents,
    };
    if (sockets as u64) + 64 > nofile {
        bail!(
            "{sockets} connections need more open files than this process may have ({nofile}); \
             raise the hard limit (ulimit -Hn) or use fewer agents"
        );
    }
    Ok(())
}

/// What reads the edge's own numbers: the `--edge-pid` processes and the `--edge-admin`
/// metrics endpoint, either optional.
fn edge_probe(args: &Args) -> anyhow::Result<EdgeProbe> {
    let admin = args
        .edge_admin
        .as_deref()
        .map(|a| probe::parse_admin(a, args.allow_non_loopback))
        .transpose()?;
    EdgeProbe::new(args.edge_pids.clone(), admin)
}

/// Runs the scenario with the sampler (and progress bar) alongside and Ctrl-C cancelling
/// it; returns the scenario's outcome and the sampled timeline.
async fn run_sampled(ctx: &mut Ctx) -> (anyhow::Result<()>, Vec<Sample>) {
    let interrupted = ctx.interrupted.clone();
    let ctrl_c = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            interrupted.cancel();
        }
    });
    let sampler_stop = CancellationToken::new();
    let sampler = spawn_sampler(ctx, sampler_stop.clone(), progress_bar(&ctx.args));

    let outcome = match ctx.args.scenario {
        Scenario::Idle => scenarios::idle(ctx).await,
        Scenario::Storm => scenarios::storm(ctx).await,
        Scenario::Rpc => scenarios::rpc(ctx).await,
        Scenario::Churn => scenarios::churn(ctx).await,
        Scenario::Blocklist => scenarios::blocklist(ctx).await,
        Scenario::Bulk => bulk::bulk(ctx).await,
        Scenario::Hostile => scenarios::hostile(ctx).await,
        Scenario::K8sProxy => k8s::k8s_proxy(ctx).await,
        Scenario::Faults => scenarios::faults::faults(ctx).await,
    };
    ctx.set_phase("done");
    // One last sample after everything settled.
    tokio::time::sleep(Duration::from_millis(10)).await;
    sampler_stop.cancel();
    let timeline = sampler.await.unwrap_or_default();
    ctrl_c.abort();
    (outcome, timeline)
}

/// Everything the run measured, and the verdict: the scenario's checks plus the error
/// budget.
fn build_report(mut ctx: Ctx, started_unix_ms: u64, timeline: Vec<Sample>) -> Report {
    let s = ctx.stats.clone();
    if let Some(tunnels) = &ctx.tunnels {
        s.tunnels_opened.store(
            tunnels.counters().opened(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    let errors_map = s.errors.snapshot();
    let totals = totals(ctx.args.agents, &s, &errors_map);
    let latency = latency_summaries(&s, &ctx.extra_latency);
    let peak_hs = report::rates(&timeline, |s| s.handshakes)
        .into_iter()
        .map(|(_, rate)| rate)
        .fold(0.0, f64::max);
    ctx.fact("peak_handshakes_per_s", (peak_hs * 10.0).round() / 10.0);
    let error_rate = totals.error_rate;
    let budget = ctx.args.error_budget();
    let budget_ok = error_rate <= budget;
    let detail = format!("error rate {error_rate:.6} (budget {budget})");
    // Under attack the counters are the legitimate fleet's alone: say so.
    let name = if ctx.args.scenario == Scenario::Hostile {
        "legitimate error budget"
    } else {
        "error budget"
    };
    // Faults cause errors by design: that scenario applies the budget outside its fault
    // windows itself.
    if ctx.args.scenario != Scenario::Faults {
        ctx.check(name, budget_ok, detail);
    }
    let passed = ctx.checks.iter().all(|c| c.ok);
    Report {
        tool: format!("kas-loadtest {}", env!("CARGO_PKG_VERSION")),
        scenario: ctx.args.scenario.name().to_owned(),
        started_unix_ms,
        elapsed_secs: s.elapsed_secs(),
        targets: ctx.targets.iter().map(|t| t.url.clone()).collect(),
        params: params(&ctx),
        errors: errors_map
            .into_iter()
            .map(|(kind, (count, example))| ErrorEntry {
                kind,
                count,
                example,
            })
            .collect(),
        totals,
        latency,
        facts: ctx.facts,
        edge: ctx.edge,
        attacks: ctx.attacks,
        faults: ctx.faults,
        checks: ctx.checks,
        passed,
        timeline,
    }
}

/// The counters at the end of the run. The error rate is over every operation (connect
/// attempts, echoes, requests): the measure the error budget applies to.
fn totals(agents: usize, s: &Stats, errors_map: &BTreeMap<String, (u64, String)>) -> Totals {
    let errors: u64 = errors_map.values().map(|(n, _)| n).sum();
    let operations = s.operations().max(1);
    let error_rate = errors as f64 / operations as f64;
    Totals {
        agents,
        connect_attempts: Stats::get(&s.connect_attempts),
        handshakes: Stats::get(&s.handshakes),
        connects_ok: Stats::get(&s.connects_ok),
        peak_connected: s.peak_connected.load(std::sync::atomic::Ordering::Relaxed),
        connected_at_end: s.now_connected(),
        unexpected_cuts: Stats::get(&s.unexpected_cuts),
        expected_cuts: Stats::get(&s.expected_cuts),
        cycles: Stats::get(&s.cycles),
        config_messages: Stats::get(&s.config_messages),
        echo_sent: Stats::get(&s.echo_sent),
        echo_ok: Stats::get(&s.echo_ok),
        rpc_sent: Stats::get(&s.rpc_sent),
        rpc_ok: Stats::get(&s.rpc_ok),
        k8s_sent: Stats::get(&s.k8s_sent),
        k8s_ok: Stats::get(&s.k8s_ok),
        tunnels_opened: Stats::get(&s.tunnels_opened),
        errors,
        operations: s.operations(),
        error_rate,
    }
}

/// Summaries of the latencies every run records and of those the scenario added; an
/// empty histogram (nothing of that kind happened) is left out.
fn latency_summaries(
    s: &Stats,
    extra: &[(String, Histogram<u64>)],
) -> BTreeMap<String, LatencySummary> {
    let mut latency = BTreeMap::new();
    for (name, h) in [
        ("connect", s.connect_latency.snapshot()),
        ("handshake", s.handshake_latency.snapshot()),
        ("echo", s.echo_rtt.snapshot()),
        ("rpc", s.rpc_latency.snapshot()),
    ]
    .into_iter()
    .chain(extra.iter().map(|(n, h)| (n.as_str(), h.clone())))
    {
        if let Some(summary) = report::summarize(&h) {
            latency.insert(name.to_owned(), summary);
        }
    }
    latency
}

/// The options the numbers depend on, so that two reports can be compared.
fn params(ctx: &Ctx) -> serde_json::Value {
    serde_json::json!({
        "agents": ctx.args.agents,
        "rate": ctx.args.rate,
        "duration_s": ctx.args.duration.as_secs_f64(),
        "ws_fraction": ctx.args.ws_fraction(),
        "echo_interval_s": ctx.args.echo_interval.as_secs_f64(),
        "reverse_tunnel": ctx.args.reverse_tunnel,
        "tunnels": ctx.tunnels.as_ref().map(|_| ctx.args.tunnels),
        "agent_tokens": ctx.tokens.len(),
        "tls_resumption": ctx.args.tls_resumption,
        "source_base": ctx.args.source_base.to_string(),
        "agents_per_ip": ctx.args.agents_per_ip,
        "max_error_rate": ctx.args.error_budget(),
        "attack_scale": ctx.args.attack_scale,
        "attack_source_base": ctx.args.attack_source_base.to_string(),
        "rpc_rate": ctx.args.rpc_rate,
        "rpc_connections": ctx.args.rpc_connections,
        "churn_rate": ctx.args.churn_rate,
        "storm_jitter_s": ctx.args.storm_jitter.as_secs_f64(),
        "block_every": ctx.args.block_every,
        "server_name": ctx.args.server_name,
        "ca_file": ctx.ca_file.as_ref().map(|p| p.display().to_string()),
        "k8s_proxy_urls": ctx.args.k8s_proxy_urls,
        "k8s_rate": ctx.args.k8s_rate,
        "k8s_concurrency": ctx.args.k8s_concurrency,
        "k8s_watches": ctx.args.k8s_watches,
        "k8s_write_rate": ctx.args.k8s_write_rate,
        "kube_api_url": ctx.tunnels.as_ref().map(|_| ctx.args.kube_api_url.clone()),
    })
}
