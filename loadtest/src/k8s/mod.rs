//! `--scenario k8s-proxy`: a fleet of agents holding reverse tunnels (as agentk: two idle
//! ones each, replaced when used, requests replayed against `--kube-api-url`), and callers
//! of the Kubernetes API proxy: Kubernetes API requests at `--k8s-rate` (open loop, latency
//! from the scheduled time) or from `--k8s-concurrency` callers back to back (closed loop:
//! the most the path carries), `--k8s-watches` watch streams held for the whole run, and
//! pods created and deleted at `--k8s-write-rate` so the watches have events to carry
//! (their delay from the create is measured).
//!
//! With `--agents 0` there is no fleet: the same callers against any URL, e.g. the
//! Kubernetes API stand-in straight, which is what the proxy path is compared with.
//!
//! Which proxy URL and `ci:` token a request uses: with a fleet, request `k` goes to agent
//! `k mod agents` — its line of `--k8s-token-file` (matching its line of `--token-file`)
//! and the proxy URL of its pod (the `--k8s-proxy-url` at its `--target`'s position, or the
//! only one). Until kas routes requests between pods, a proxy only finds tunnels of agents
//! connected to its own pod, which this keeps true when agents go straight to pods.

pub mod client;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::schedule::Schedule;
use crate::stats::{Latency, Stats};
use crate::Ctx;
use client::{content_type, is_kubernetes_answer, join, status_message, ProxyClient, Trust};

/// The namespace the watches follow and the writes create pods in.
const NAMESPACE: &str = "default";
/// Created pods whose create time is kept, for the watches' event delay.
const MAX_PENDING_CREATES: usize = 4096;

/// How request `k` picks its proxy URL and token.
enum Route {
    /// Request `k`: URL `k mod urls`, token `k mod tokens`.
    RoundRobin,
    /// Request `k`: agent `k mod agents` — its token line and its pod's URL.
    ByAgent { agents: usize, targets: usize },
}

/// What every caller shares.
pub struct Callers {
    client: ProxyClient,
    urls: Vec<String>,
    tokens: Vec<String>,
    route: Route,
    stats: Arc<Stats>,
    timeout: Duration,
    paths: Vec<String>,
}

impl Callers {
    /// The proxy base URL and token of request (or watch, or write) `k`.
    fn pick(&self, k: u64) -> (&str, Option<&str>) {
        let (url, token) = match self.route {
            Route::RoundRobin => (k as usize, k as usize),
            Route::ByAgent { agents, targets } => {
                let agent = (k % agents.max(1) as u64) as usize;
                (agent % targets.max(1), agent)
            }
        };
        let url = &self.urls[url % self.urls.len()];
        let token =
            (!self.tokens.is_empty()).then(|| self.tokens[token % self.tokens.len()].as_str());
        (url, token)
    }
}

fn read_lines(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The callers from the options, refusing combinations that would send requests to pods
/// without the agent's tunnels.
fn callers(ctx: &Ctx) -> anyhow::Result<Callers> {
    let a = &ctx.args;
    if a.k8s_proxy_urls.is_empty() {
        bail!(
            "the k8s-proxy scenario needs --k8s-proxy-url (e.g. http://127.0.7.1:8154/k8s-proxy/ \
             from kas-loadtest-stack, or https://<edge>/k8s-proxy/)"
        );
    }
    client::check_urls(&a.k8s_proxy_urls, a.allow_non_loopback, a.k8s_insecure)?;
    let mut tokens = a.k8s_tokens.clone();
    if let Some(path) = &a.k8s_token_file {
        tokens.extend(read_lines(path)?);
    }
    let trust = if a.k8s_insecure {
        Trust::Insecure
    } else if let Some(ca) = a.k8s_ca_file.as_deref().or(ctx.ca_file.as_deref()) {
        Trust::CaFile(ca)
    } else {
        Trust::None
    };
    let route = if a.agents == 0 {
        Route::RoundRobin
    } else {
        let (urls, targets) = (a.k8s_proxy_urls.len(), ctx.targets.len());
        if urls != 1 && urls != targets {
            bail!(
                "give one --k8s-proxy-url, or one per --target in the same order \
                 ({urls} URLs for {targets} targets)"
            );
        }
        let agent_tokens = ctx.tokens.len();
        if tokens.len() > 1 && tokens.len() != agent_tokens {
            bail!(
                "{} k8s tokens for {agent_tokens} agent tokens: give one, or one per agent \
                 token in the same order",
                tokens.len()
            );
        }
        if tokens.len() == 1 && agent_tokens > 1 {
            bail!("one k8s token names one agent, but the fleet has {agent_tokens} agent tokens: give one per agent token");
        }
        Route::ByAgent {
            agents: a.agents,
            targets,
        }
    };
    let paths = if a.k8s_paths.is_empty() {
        vec![format!("/api/v1/namespaces/{NAMESPACE}/pods")]
    } else {
        a.k8s_paths.clone()
    };
    Ok(Callers {
        client: ProxyClient::new(trust, a.k8s_max_in_flight.min(4096))?,
        urls: a.k8s_proxy_urls.clone(),
        tokens,
        route,
        stats: ctx.stats.clone(),
        timeout: a.k8s_timeout,
        paths,
    })
}

/// What one request came to, counted under `what` (`GET`, `POST`, ...).
async fn exchange(
    callers: &Callers,
    what: &str,
    request: anyhow::Result<http::Request<http_body_util::Full<Bytes>>>,
) -> bool {
    let stats = &callers.stats;
    stats.inc(&stats.k8s_sent);
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            stats
                .errors
                .add(&format!("k8s {what}: request"), || format!("{e:#}"));
            return false;
        }
    };
    match timeout(callers.timeout, callers.client.fetch(request)).await {
        Ok(Ok(answer))
            if answer.status.is_success() && is_kubernetes_answer(&answer.content_type) =>
        {
            stats.inc(&stats.k8s_ok);
            true
        }
        Ok(Ok(answer)) if answer.status.is_success() => {
            stats
                .errors
                .add(&format!("k8s {what}: not a Kubernetes answer"), || {
                    format!(
                        "HTTP {} with content-type {:?}",
                        answer.status.as_u16(),
                        answer.content_type
                    )
                });
            false
        }
        Ok(Ok(answer)) => {
            stats.errors.add(
                &format!("k8s {what}: HTTP {}", answer.status.as_u16()),
                || status_message(&answer.body),
            );
            false
        }
        Ok(Err(e)) => {
            stats
                .errors
                .add(&format!("k8s {what}: transport"), || format!("{e:#}"));
            false
        }
        Err(_) => {
            stats.errors.add(&format!("k8s {what}: timeout"), || {
                format!("no answer within {:?}", callers.timeout)
            });
            false
        }
    }
}

/// Request `k`: a GET of the next `--k8s-path`; its latency from `since`.
async fn get(callers: &Callers, k: u64, since: Instant, latency: &Latency) {
    let (base, token) = callers.pick(k);
    let path = &callers.paths[(k as usize) % callers.paths.len()];
    let request = ProxyClient::request(Method::GET, &join(base, path), token, None);
    if exchange(callers, "GET", request).await {
        latency.record(since.elapsed());
    }
}

/// [`get`] on a task of its own, holding `permit` until answered.
fn spawn_get(
    callers: &Arc<Callers>,
    k: u64,
    due: Instant,
    latency: &Arc<Latency>,
    permit: OwnedSemaphorePermit,
) {
    let (callers, latency) = (callers.clone(), latency.clone());
    tokio::spawn(async move {
        get(&callers, k, due, &latency).await;
        drop(permit);
    });
}

/// What the request phase sent.
struct Sent {
    sent: u64,
    secs: f64,
    max_lag: Duration,
    drained: bool,
}

/// Open loop: `rate × duration` GETs at their scheduled times, each holding a permit of
/// `--k8s-max-in-flight` until answered.
async fn open_loop(ctx: &Ctx, callers: &Arc<Callers>, latency: &Arc<Latency>) -> Sent {
    let rate = ctx.args.k8s_rate;
    let total = ((rate * ctx.args.duration.as_secs_f64()).ceil() as u64).min(50_000_000);
    let limit = ctx.args.k8s_max_in_flight.clamp(1, 1 << 20);
    let in_flight = Arc::new(Semaphore::new(limit));
    let begin = Instant::now() + Duration::from_millis(20);
    let schedule = Schedule::new(begin, rate);
    let (mut sent, mut max_lag) = (0u64, Duration::ZERO);
    for k in 0..total {
        let Some(due) = schedule.wait(k, &ctx.interrupted).await else {
            break;
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
        sent += 1;
        spawn_get(callers, k, due, latency, permit);
    }
    let secs = begin.elapsed().as_secs_f64();
    let drained = timeout(
        ctx.args.k8s_timeout + Duration::from_secs(2),
        in_flight.acquire_many(limit as u32),
    )
    .await
    .is_ok();
    Sent {
        sent,
        secs,
        max_lag,
        drained,
    }
}

/// Closed loop: `--k8s-concurrency` callers, each sending its next GET when the last is
/// answered, for `--duration`; latency from each send.
async fn closed_loop(ctx: &Ctx, callers: &Arc<Callers>, latency: &Arc<Latency>) -> Sent {
    let begin = Instant::now();
    let end = begin + ctx.args.duration;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..ctx.args.k8s_concurrency {
        let (callers, latency, next) = (callers.clone(), latency.clone(), next.clone());
        let stop = ctx.interrupted.clone();
        tasks.spawn(async move {
            // Bounded by the deadline; each request by its timeout.
            while Instant::now() < end && !stop.is_cancelled() {
                let k = next.fetch_add(1, Ordering::Relaxed);
                get(&callers, k, Instant::now(), &latency).await;
            }
        });
    }
    let drained = timeout(
        ctx.args.duration + ctx.args.k8s_timeout + Duration::from_secs(2),
        async { while tasks.join_next().await.is_some() {} },
    )
    .await
    .is_ok();
    Sent {
        sent: next.load(Ordering::Relaxed),
        secs: begin.elapsed().as_secs_f64(),
        max_lag: Duration::ZERO,
        drained,
    }
}

/// Background GETs ([`steady_gets`]): their latency, how many are in flight, and the task.
pub(crate) struct SteadyGets {
    pub latency: Arc<Latency>,
    in_flight: Arc<Semaphore>,
    permits: usize,
    /// Ends with the number sent once every request is answered or given up.
    pub task: tokio::task::JoinHandle<u64>,
}

impl SteadyGets {
    /// Requests sent and not yet answered or given up.
    pub fn in_flight(&self) -> usize {
        self.permits
            .saturating_sub(self.in_flight.available_permits())
    }
}

/// GETs at `--k8s-rate` (open loop, each holding a permit of `--k8s-max-in-flight` until
/// answered) from now until `stop`, and at most for `limit`: the background traffic of a
/// scenario that does other things meanwhile (faults).
pub(crate) fn steady_gets(
    ctx: &Ctx,
    stop: CancellationToken,
    limit: Duration,
) -> anyhow::Result<SteadyGets> {
    let callers = Arc::new(callers(ctx)?);
    let latency = Arc::new(Latency::default());
    let rate = ctx.args.k8s_rate;
    let total = ((rate * limit.as_secs_f64()).ceil() as u64).min(50_000_000);
    let permits = ctx.args.k8s_max_in_flight.clamp(1, 1 << 20);
    let in_flight = Arc::new(Semaphore::new(permits));
    let drain = ctx.args.k8s_timeout + Duration::from_secs(2);
    let (recorded, semaphore) = (latency.clone(), in_flight.clone());
    let task = tokio::spawn(async move {
        let schedule = Schedule::new(Instant::now(), rate);
        let mut sent = 0;
        for k in 0..total {
            let Some(due) = schedule.wait(k, &stop).await else {
                break;
            };
            let permit = tokio::select! {
                p = semaphore.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = stop.cancelled() => break,
            };
            sent += 1;
            spawn_get(&callers, k, due, &recorded, permit);
        }
        let _ = timeout(drain, semaphore.acquire_many(permits as u32)).await;
        sent
    });
    Ok(SteadyGets {
        latency,
        in_flight,
        permits,
        task,
    })
}

/// Pods the writer created and when, so watches can tell how late their `ADDED` came.
#[derive(Default)]
struct Creates {
    at: HashMap<String, Instant>,
    order: VecDeque<String>,
}

impl Creates {
    fn add(&mut self, name: String) {
        if self.order.len() >= MAX_PENDING_CREATES {
            if let Some(old) = self.order.pop_front() {
                self.at.remove(&old);
            }
        }
        self.at.insert(name.clone(), Instant::now());
        self.order.push_back(name);
    }
}

/// What the watches saw.
#[derive(Default)]
struct WatchTally {
    events: AtomicU64,
    /// `ADDED` events of pods the writer created.
    ours: AtomicU64,
    /// Watches that saw at least one of those.
    saw_ours: AtomicU64,
}

/// Holds watch `j` until `stop`: its answer must be 200 and its body must stay open; each
/// `ADDED` of a created pod records its delay since the create was sent.
async fn watch(
    callers: Arc<Callers>,
    j: u64,
    stop: CancellationToken,
    creates: Arc<Mutex<Creates>>,
    delay: Arc<Latency>,
    tally: Arc<WatchTally>,
    open_secs: u64,
) -> bool {
    let stats = &callers.stats;
    let (base, token) = callers.pick(j);
    let path = format!("/api/v1/namespaces/{NAMESPACE}/pods?watch=1&timeoutSeconds={open_secs}");
    stats.inc(&stats.k8s_sent);
    let request = match ProxyClient::request(Method::GET, &join(base, &path), token, None) {
        Ok(r) => r,
        Err(e) => {
            stats.errors.add("watch: request", || format!("{e:#}"));
            return false;
        }
    };
    let response = match timeout(callers.timeout, callers.client.send(request)).await {
        Ok(Ok(r)) if r.status().is_success() && is_kubernetes_answer(&content_type(&r)) => r,
        Ok(Ok(r)) if r.status().is_success() => {
            stats.errors.add("watch: not a Kubernetes answer", || {
                format!(
                    "HTTP {} with content-type {:?}",
                    r.status().as_u16(),
                    content_type(&r)
                )
            });
            return false;
        }
        Ok(Ok(r)) => {
            let code = r.status().as_u16();
            let body = timeout(Duration::from_secs(2), r.into_body().collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            stats
                .errors
                .add(&format!("watch: HTTP {code}"), || status_message(&body));
            return false;
        }
        Ok(Err(e)) => {
            stats.errors.add("watch: transport", || format!("{e:#}"));
            return false;
        }
        Err(_) => {
            stats
                .errors
                .add("watch: timeout", || "no answer to the watch".into());
            return false;
        }
    };
    stats.inc(&stats.k8s_ok);
    stats.inc(&stats.watches_open);
    let mut body = response.into_body();
    let mut line = Vec::new();
    let mut saw_ours = false;
    let held = loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = stop.cancelled() => break true,
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Some(Err(e)) => {
                stats.errors.add("watch: broken", || e.to_string());
                break false;
            }
            None => {
                stats.errors.add("watch: ended early", || {
                    "the watch ended before the run".into()
                });
                break false;
            }
        };
        for &b in data.iter() {
            if b != b'\n' {
                // One event per line; a line longer than this is not one of ours.
                if line.len() < 1 << 20 {
                    line.push(b);
                }
                continue;
            }
            tally.events.fetch_add(1, Ordering::Relaxed);
            if let Some(name) = added_pod(&line) {
                let created = creates
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .at
                    .get(&name)
                    .copied();
                if let Some(at) = created {
                    delay.record(at.elapsed());
                    tally.ours.fetch_add(1, Ordering::Relaxed);
                    if !saw_ours {
                        saw_ours = true;
                        tally.saw_ours.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            line.clear();
        }
    };
    stats.watches_open.fetch_sub(1, Ordering::Relaxed);
    held
}

/// The pod name of an `ADDED` watch event line.
fn added_pod(line: &[u8]) -> Option<String> {
    let event: serde_json::Value = serde_json::from_slice(line).ok()?;
    if event.get("type")?.as_str()? != "ADDED" {
        return None;
    }
    Some(event.pointer("/object/metadata/name")?.as_str()?.to_owned())
}

/// Creates a pod every `1 / rate` s and deletes the one before, until `stop`; latency per
/// write.
async fn writer(
    callers: Arc<Callers>,
    rate: f64,
    stop: CancellationToken,
    creates: Arc<Mutex<Creates>>,
    latency: Arc<Latency>,
) -> u64 {
    let schedule = Schedule::new(Instant::now(), rate);
    let run = std::process::id();
    let mut previous: Option<(String, u64)> = None;
    let mut written = 0;
    for n in 0u64..u64::MAX {
        if schedule.wait(n, &stop).await.is_none() {
            break;
        }
        let name = format!("lt-{run}-{n}");
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]},
        });
        let (base, token) = callers.pick(n);
        let url = join(base, &format!("/api/v1/namespaces/{NAMESPACE}/pods"));
        creates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(name.clone());
        let t0 = Instant::now();
        let request = ProxyClient::request(
            Method::POST,
            &url,
            token,
            Some(Bytes::from(body.to_string())),
        );
        if exchange(&callers, "POST", request).await {
            latency.record(t0.elapsed());
            written += 1;
        }
        if let Some((old, k)) = previous.replace((name, n)) {
            delete(&callers, &old, k, &latency).await;
        }
    }
    if let Some((old, k)) = previous {
        delete(&callers, &old, k, &latency).await;
    }
    written
}

async fn delete(callers: &Callers, name: &str, k: u64, latency: &Latency) {
    let (base, token) = callers.pick(k);
    let url = join(base, &format!("/api/v1/namespaces/{NAMESPACE}/pods/{name}"));
    let t0 = Instant::now();
    if exchange(
        callers,
        "DELETE",
        ProxyClient::request(Method::DELETE, &url, token, None),
    )
    .await
    {
        latency.record(t0.elapsed());
    }
}

pub async fn k8s_proxy(ctx: &mut Ctx) -> anyhow::Result<()> {
    let callers = Arc::new(callers(ctx)?);
    let fleet = if ctx.args.agents > 0 {
        let mut fleet = crate::scenarios::fleet(ctx, Duration::ZERO)?;
        crate::scenarios::ramp_and_settle(ctx, &mut fleet).await;
        Some(fleet)
    } else {
        None
    };
    let base = ctx.probe.sample().await;
    let own_ticks = crate::probe::read_cpu_ticks(std::process::id());
    ctx.set_phase("load");
    let stop = CancellationToken::new();
    let creates = Arc::new(Mutex::new(Creates::default()));
    let (event_delay, writes, gets) = (
        Arc::new(Latency::default()),
        Arc::new(Latency::default()),
        Arc::new(Latency::default()),
    );
    let tally = Arc::new(WatchTally::default());
    let open_secs = (ctx.args.duration + ctx.args.k8s_timeout + Duration::from_secs(60)).as_secs();
    let mut watches = JoinSet::new();
    for j in 0..ctx.args.k8s_watches as u64 {
        watches.spawn(watch(
            callers.clone(),
            j,
            stop.clone(),
            creates.clone(),
            event_delay.clone(),
            tally.clone(),
            open_secs,
        ));
    }
    // The watches open first (bounded), so the first writes have someone to tell.
    let want = ctx.args.k8s_watches as u64;
    let open_deadline = Instant::now() + ctx.args.k8s_timeout;
    while Stats::get(&ctx.stats.watches_open) < want && Instant::now() < open_deadline {
        ctx.pause(Duration::from_millis(20)).await;
        if ctx.interrupted.is_cancelled() {
            break;
        }
    }
    let writer_task = (ctx.args.k8s_write_rate > 0.0).then(|| {
        tokio::spawn(writer(
            callers.clone(),
            ctx.args.k8s_write_rate,
            stop.clone(),
            creates.clone(),
            writes.clone(),
        ))
    });
    let sent = if ctx.args.k8s_concurrency > 0 {
        closed_loop(ctx, &callers, &gets).await
    } else {
        open_loop(ctx, &callers, &gets).await
    };
    let loaded = ctx.probe.sample().await;
    let own_cpu = own_ticks
        .zip(crate::probe::read_cpu_ticks(std::process::id()))
        .map(|(a, b)| b.saturating_sub(a) as f64 / crate::probe::clock_ticks());
    let watches_at_end = Stats::get(&ctx.stats.watches_open);
    stop.cancel();
    let written = match writer_task {
        Some(task) => timeout(ctx.args.k8s_timeout * 3, task)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0),
        None => 0,
    };
    let mut held = 0;
    while let Ok(Some(joined)) = timeout(Duration::from_secs(5), watches.join_next()).await {
        if joined.unwrap_or(false) {
            held += 1;
        }
    }
    let answered = gets.snapshot().len();
    ctx.fact(
        "k8s_gets_ok_per_s",
        crate::scenarios::round3(answered as f64 / sent.secs.max(1e-3)),
    );
    record(ctx, &sent, &tally, held, watches_at_end, written);
    if let Some(tunnels) = ctx.tunnels.clone() {
        let c = tunnels.counters();
        ctx.fact("tunnels_opened", c.opened());
        ctx.fact("tunnels_used", c.used());
        ctx.fact("tunnels_busy_peak", c.busy_peak() as u64);
        ctx.fact("tunnels_idle_at_end", c.idle() as u64);
        // Requests the agent saw cancelled: a watch its caller closed, or kas ending the
        // stream once the answer was through.
        ctx.fact(
            "tunnel_requests_cancelled",
            Stats::get(&ctx.stats.tunnel_requests_cancelled),
        );
    }
    let ok = Stats::get(&ctx.stats.k8s_ok).max(1) as f64;
    if let Some(cpu) = own_cpu {
        // This process: the callers, and the agents' side of every tunnelled request.
        ctx.fact(
            "loadtest_cpu_us_per_request",
            crate::scenarios::round3(cpu * 1e6 / ok),
        );
    }
    if ctx.probe.is_active() {
        ctx.fact("probed_rss_before_load_bytes", base.rss_bytes);
        ctx.fact("probed_rss_after_load_bytes", loaded.rss_bytes);
        if let (Some(a), Some(b)) = (base.cpu_seconds, loaded.cpu_seconds) {
            ctx.fact(
                "probed_cpu_us_per_request",
                crate::scenarios::round3((b - a) * 1e6 / ok),
            );
        }
    }
    for (name, l) in [
        ("k8s GET", gets),
        ("k8s write", writes),
        ("watch event delay", event_delay),
    ] {
        let h = l.snapshot();
        if !h.is_empty() {
            ctx.extra_latency.push((name.to_owned(), h));
        }
    }
    if let Some(fleet) = fleet {
        crate::scenarios::stop(ctx, fleet).await;
    }
    Ok(())
}

fn record(
    ctx: &mut Ctx,
    sent: &Sent,
    tally: &WatchTally,
    held: u64,
    watches_at_end: u64,
    written: u64,
) {
    let ok = Stats::get(&ctx.stats.k8s_ok);
    let a = &ctx.args;
    let (watches, closed) = (a.k8s_watches as u64, a.k8s_concurrency > 0);
    if closed {
        ctx.fact("k8s_concurrency", a.k8s_concurrency as u64);
    } else {
        ctx.fact("k8s_target_rate_per_s", a.k8s_rate);
        ctx.fact(
            "k8s_dispatch_max_lag_ms",
            crate::scenarios::round3(sent.max_lag.as_secs_f64() * 1000.0),
        );
    }
    ctx.fact("k8s_gets_sent", sent.sent);
    ctx.fact(
        "k8s_gets_per_s",
        crate::scenarios::round3(sent.sent as f64 / sent.secs.max(1e-3)),
    );
    ctx.fact("k8s_requests_ok", ok);
    ctx.fact("k8s_writes", written);
    ctx.fact("watches", watches);
    ctx.fact("watches_open_at_end", watches_at_end);
    ctx.fact("watch_events", tally.events.load(Ordering::Relaxed));
    ctx.fact("watch_events_of_writes", tally.ours.load(Ordering::Relaxed));
    ctx.check(
        "all requests finished",
        sent.drained,
        format!("{} GETs sent, every one answered or timed out", sent.sent),
    );
    ctx.check(
        "watches held",
        held == watches && watches_at_end == watches,
        format!("{held}/{watches} open until the end"),
    );
    if watches > 0 && written > 0 {
        let saw = tally.saw_ours.load(Ordering::Relaxed);
        ctx.check(
            "watches saw the writes",
            saw == watches,
            format!("{saw}/{watches} watches saw a pod created during the run"),
        );
    }
}
