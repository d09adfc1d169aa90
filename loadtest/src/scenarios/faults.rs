//! `--scenario faults`: a soak with a schedule of faults. The scenario starts its own
//! system ([`rig`]: kas pods as processes behind `kas-edge`, the stand-ins in this
//! process), ramps a fleet through the edge (websocket and gRPC agents holding
//! configuration and Echo streams and reverse tunnels) with Kubernetes API requests sent
//! through the edge's `/k8s-proxy/` route to those tunnels, then injects each fault in
//! turn with quiet recovery time before, between and after:
//!
//! `kill-pod` · `rollout` · `gitlab` (503, then slow) · `gitaly` (down) · `blocklist`
//! (edits matching nobody) · `cert-rotation` · `edge-restart` (graceful upgrade).
//!
//! Each fault commits a new agent configuration while it lasts. Per fault ([`record`]):
//! agents cut and how soon every one was back, requests failed, errors by kind, who
//! missed the commit; over the run ([`timeline`]): agents, errors and the edge's and kas's
//! memory and CPU from `/proc`. Fails on an agent not back within the back-off budget, a
//! missed commit, a blocklist edit that cut an agent, or errors outside the fault windows
//! over `--max-error-rate` (default 0).

mod edge;
mod html;
mod record;
mod rig;
mod timeline;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use record::{FaultRecord, FaultsReport};
pub use timeline::ProcSample;

use crate::agent::{AgentToken, Fleet};
use crate::cli::FaultKind;
use crate::k8s::SteadyGets;
use crate::target::Target;
use crate::Ctx;
use record::{error_counts, error_delta, round3, WindowStart};
use rig::Rig;

/// Most timeline samples kept (a day at one a second).
const MAX_SAMPLES: usize = 86_400;

pub async fn faults(ctx: &mut Ctx) -> anyhow::Result<()> {
    let kinds = if ctx.args.faults.is_empty() {
        FaultKind::ALL.to_vec()
    } else {
        ctx.args.faults.clone()
    };
    ctx.set_phase("stack");
    let watched = timeline::Watched::default();
    let mut rig = Rig::start(&ctx.args, watched.clone()).await?;
    let outcome = soak(ctx, &mut rig, &kinds).await;
    ctx.set_phase("stop");
    rig.stop().await;
    outcome
}

/// Points the context at the rig: the edge's two transports, the stack's agent token,
/// the CA of the edge's certificate, tunnels replaying against the stack's Kubernetes API
/// stand-in, callers through the edge's `/k8s-proxy/` route with the stack's CI token.
fn aim(ctx: &mut Ctx, rig: &Rig) -> anyhow::Result<()> {
    let https = rig.edge.https();
    ctx.targets = [format!("wss://{https}/"), format!("grpcs://{https}")]
        .iter()
        .map(|url| Target::parse(url, false))
        .collect::<anyhow::Result<_>>()?;
    let info = &rig.stack.info;
    let text = std::fs::read_to_string(&info.token_file)
        .with_context(|| format!("cannot read {}", info.token_file.display()))?;
    ctx.tokens = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|raw| {
            Ok(AgentToken {
                header: format!("Bearer {raw}").parse().context("agent token")?,
                raw: raw.to_owned(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    ctx.token = ctx
        .tokens
        .first()
        .context("the stack wrote no agent token")?
        .header
        .clone();
    ctx.ca_file = Some(rig.edge.ca_file());
    ctx.args.kube_api_url = info.kube_api_url.clone();
    ctx.tunnels = Some(Arc::new(crate::tunnel_fleet(
        &info.kube_api_url,
        &ctx.stats,
    )));
    ctx.args.k8s_proxy_urls = vec![format!("https://{https}/k8s-proxy/")];
    ctx.args.k8s_tokens.clear();
    ctx.args.k8s_token_file = Some(info.ci_token_file.clone());
    ctx.args.k8s_ca_file = None;
    Ok(())
}

/// How long after a fault's end every agent it cut must be back: a failed retry at the
/// longest back-off, another, then a connect.
fn backoff_budget(ctx: &Ctx) -> Duration {
    ctx.args
        .backoff_budget
        .unwrap_or(2 * ctx.args.backoff_max + ctx.args.connect_timeout)
}

/// An upper bound on the soak's length, for the background requests' own bound.
fn soak_bound(ctx: &Ctx, faults: usize) -> Duration {
    let a = &ctx.args;
    let per_fault =
        2 * a.fault_window + a.fault_recovery + backoff_budget(ctx) + Duration::from_secs(180);
    a.fault_recovery + per_fault * faults as u32 + Duration::from_secs(600)
}

async fn soak(ctx: &mut Ctx, rig: &mut Rig, kinds: &[FaultKind]) -> anyhow::Result<()> {
    aim(ctx, rig)?;
    let sampling = CancellationToken::new();
    let sampler = timeline::spawn(
        ctx.stats.clone(),
        rig.watched.clone(),
        ctx.args.sample_interval,
        MAX_SAMPLES,
        sampling.clone(),
    );
    let mut fleet = super::fleet(ctx, Duration::ZERO)?;
    let ramped = super::ramp_and_settle(ctx, &mut fleet).await;
    let mut commits = Commits::default();
    if ramped {
        // A first commit of our own, so "the latest" is one the run made.
        commits.make(ctx, rig, "start")?;
        let all = commits
            .wait_everywhere(&fleet, ctx.args.fault_recovery)
            .await;
        ctx.check(
            "first commit reached every agent",
            all.is_some(),
            format!(
                "{} of {} agents",
                commits.holding(&fleet),
                fleet.slots.len()
            ),
        );
    }
    let requests_stop = CancellationToken::new();
    let requests =
        crate::k8s::steady_gets(ctx, requests_stop.clone(), soak_bound(ctx, kinds.len()))?;

    let soak_errors = error_counts(&ctx.stats);
    let soak_ops = ctx.stats.operations();
    ctx.set_phase("quiet");
    ctx.pause(ctx.args.fault_recovery).await;
    let mut records = Vec::new();
    let mut window_ops = 0;
    let mut window_errors = std::collections::BTreeMap::<String, u64>::new();
    let mut outcome = Ok(());
    for (i, kind) in kinds.iter().enumerate() {
        if ctx.interrupted.is_cancelled() || !ramped {
            break;
        }
        match one_fault(ctx, rig, &fleet, &requests, &mut commits, *kind, i).await {
            Ok(record) => {
                window_ops += record.cost.operations;
                for (k, n) in &record.cost.errors {
                    *window_errors.entry(k.clone()).or_default() += n;
                }
                records.push(record);
            }
            Err(e) => {
                outcome = Err(e.context(format!("fault {} ({})", i + 1, kind.name())));
                break;
            }
        }
    }

    ctx.set_phase("end");
    requests_stop.cancel();
    let sent = requests.task.await.unwrap_or(0);
    let k8s_latency = requests.latency.snapshot();
    ctx.extra_latency
        .push(("k8s GET through the edge".into(), k8s_latency));
    ctx.fact("k8s_requests_sent", sent);
    let n = fleet.slots.len();
    let all_connected = fleet
        .wait_for(backoff_budget(ctx), |f| f.connected() == n)
        .await;
    ctx.check(
        "fleet whole at the end",
        all_connected,
        format!("{}/{n} connected", fleet.connected()),
    );
    let on_latest = commits.holding(&fleet);
    ctx.check(
        "every agent holds the latest commit",
        on_latest == n,
        format!("{on_latest}/{n} agents hold {}", commits.latest),
    );

    // Errors outside the windows: since the soak began, less every window's.
    let all_errors = error_delta(&soak_errors, &error_counts(&ctx.stats));
    let quiet_errors: std::collections::BTreeMap<String, u64> = all_errors
        .iter()
        .filter_map(|(k, n)| {
            let q = n.saturating_sub(window_errors.get(k).copied().unwrap_or(0));
            (q > 0).then(|| (k.clone(), q))
        })
        .collect();
    let quiet_ops = ctx
        .stats
        .operations()
        .saturating_sub(soak_ops)
        .saturating_sub(window_ops);
    let quiet_total: u64 = quiet_errors.values().sum();
    let budget = ctx.args.error_budget();
    ctx.check(
        "errors outside fault windows",
        quiet_total as f64 <= budget * quiet_ops as f64,
        format!("{quiet_total} in {quiet_ops} operations (budget {budget}): {quiet_errors:?}"),
    );
    check_faults(ctx, &records);

    stop_fleet(ctx, fleet).await;
    sampling.cancel();
    let timeline = sampler.await.unwrap_or_default();
    for r in &mut records {
        r.add_memory(&timeline);
    }
    let report = FaultsReport {
        faults: records,
        backoff_budget_s: backoff_budget(ctx).as_secs_f64(),
        quiet_errors,
        quiet_operations: quiet_ops,
        latest_commit: commits.latest.clone(),
        agents: n,
        agents_on_latest_commit: on_latest,
        timeline,
    };
    ctx.fact("faults_injected", report.faults.len());
    ctx.faults = Some(report);
    outcome
}

/// The per-fault verdicts.
fn check_faults(ctx: &mut Ctx, records: &[FaultRecord]) {
    for (i, r) in records.iter().enumerate() {
        let name = format!("fault {} {}", i + 1, r.kind);
        ctx.check(
            &format!("{name}: every agent back within the back-off budget"),
            r.cost.back_within_budget,
            format!(
                "{} cut, all back after {} s",
                r.cost.agents_disconnected,
                r.cost
                    .all_back_after_s
                    .map_or("never".into(), |s| format!("{s:.1}"))
            ),
        );
        ctx.check(
            &format!("{name}: no missed commit"),
            r.commits_missed == 0,
            format!(
                "{} agents without the commit after the recovery time",
                r.commits_missed
            ),
        );
        if r.kind == FaultKind::Blocklist.name() {
            ctx.check(
                &format!("{name}: no agent cut by the edits"),
                r.cost.agents_disconnected == 0,
                format!("{} agents cut", r.cost.agents_disconnected),
            );
        }
    }
}

async fn stop_fleet(ctx: &Ctx, fleet: Fleet) {
    super::stop(ctx, fleet).await;
}

/// The configuration commits the run made, the last one being what every agent must end
/// with.
#[derive(Default)]
struct Commits {
    latest: String,
    made: u32,
    /// Microseconds after the run's start when the latest was made.
    at_us: u64,
}

impl Commits {
    fn make(&mut self, ctx: &Ctx, rig: &Rig, label: &str) -> anyhow::Result<()> {
        self.made += 1;
        let revision = format!("{} {label}", self.made);
        self.at_us = ctx.stats.micros();
        self.latest = rig.stack.commit_agent_config(&revision)?;
        Ok(())
    }

    fn holding(&self, fleet: &Fleet) -> usize {
        fleet
            .slots
            .iter()
            .filter(|s| s.commit() == self.latest)
            .count()
    }

    /// Waits (bounded) until every agent holds the latest commit; how long after the
    /// commit the last agent got it, or `None`.
    async fn wait_everywhere(&self, fleet: &Fleet, within: Duration) -> Option<f64> {
        let n = fleet.slots.len();
        if !fleet.wait_for(within, |f| self.holding(f) == n).await {
            return None;
        }
        let last = fleet
            .slots
            .iter()
            .map(|s| s.commit_at_us.load(std::sync::atomic::Ordering::SeqCst))
            .max()
            .unwrap_or(0);
        Some(round3(last.saturating_sub(self.at_us) as f64 / 1e6))
    }
}

/// Fault `kind`: injected (a configuration commit in the middle of it), its window closed
/// when every agent it cut is back (bounded by the budget) and no request sent in it is
/// still waiting, then the recovery time, in
/// which the commit must reach everyone. Returns its record (the window's operations in it).
async fn one_fault(
    ctx: &mut Ctx,
    rig: &mut Rig,
    fleet: &Fleet,
    requests: &SteadyGets,
    commits: &mut Commits,
    kind: FaultKind,
    index: usize,
) -> anyhow::Result<FaultRecord> {
    ctx.set_phase(kind.name());
    let window = WindowStart::now(&ctx.stats, fleet);
    let label = format!("during {}", kind.name());
    let (how, pending) = inject(ctx, rig, commits, kind, &label).await?;
    let end_s = ctx.stats.elapsed_secs();
    let budget = backoff_budget(ctx);
    let n = fleet.slots.len();
    // Cuts from the fault's last moments land a little after it: let them happen.
    ctx.pause(Duration::from_millis(500)).await;
    fleet.wait_for(budget, |f| f.connected() == n).await;
    // A request sent in the window counts there, even if it fails a timeout later: the
    // window closes once none is in flight (at the request rate, a moment of none comes
    // often; a hung one holds it up to its timeout).
    fleet
        .wait_for(ctx.args.k8s_timeout + Duration::from_secs(1), |_| {
            requests.in_flight() == 0
        })
        .await;
    let cost = window.close(&ctx.stats, fleet, end_s, budget.as_secs_f64());
    let closed_s = ctx.stats.elapsed_secs();
    ctx.set_phase(&format!("recovery {}", index + 1));
    let recovery_begin = Instant::now();
    let everywhere = commits
        .wait_everywhere(fleet, ctx.args.fault_recovery)
        .await;
    let commits_missed = n - commits.holding(fleet);
    ctx.pause(
        ctx.args
            .fault_recovery
            .saturating_sub(recovery_begin.elapsed()),
    )
    .await;
    Ok(FaultRecord {
        kind: kind.name().to_owned(),
        how,
        start_s: round3(window.at_s),
        end_s: round3(end_s),
        closed_s: round3(closed_s),
        cost,
        commit: Some(commits.latest.clone()),
        commits_missed,
        commit_everywhere_after_s: everywhere,
        edge_rss_before_bytes: None,
        edge_rss_peak_bytes: None,
        kas_rss_peak_bytes: None,
        pending,
    })
}

/// Makes the fault, with a commit while it lasts; returns what was done and, when part of
/// it could not be done in this tree, why.
async fn inject(
    ctx: &Ctx,
    rig: &mut Rig,
    commits: &mut Commits,
    kind: FaultKind,
    label: &str,
) -> anyhow::Result<(String, Option<String>)> {
    let window = ctx.args.fault_window;
    Ok(match kind {
        FaultKind::KillPod => {
            // The commit first: the restarted pod must serve it, the others push it.
            commits.make(ctx, rig, label)?;
            (rig.kill_pod().await?, None)
        }
        FaultKind::Rollout => {
            commits.make(ctx, rig, label)?;
            (rig.rollout().await?, None)
        }
        FaultKind::Gitlab => {
            rig::gitlab_unavailable(&rig.stack, true);
            commits.make(ctx, rig, label)?;
            ctx.pause(window).await;
            rig::gitlab_slow(&rig.stack, Some(ctx.args.gitlab_slow));
            ctx.pause(window).await;
            rig::gitlab_slow(&rig.stack, None);
            let how = format!(
                "GitLab answered 503 for {window:?}, then every call took {:?} for {window:?}",
                ctx.args.gitlab_slow
            );
            (how, None)
        }
        FaultKind::Gitaly => {
            rig::gitaly_down(&rig.stack, true);
            commits.make(ctx, rig, label)?;
            ctx.pause(window).await;
            rig::gitaly_down(&rig.stack, false);
            (format!("Gitaly stopped for {window:?}"), None)
        }
        FaultKind::Blocklist => {
            let every = ctx
                .args
                .blocklist_edit_every
                .max(Duration::from_millis(100));
            let edits = (window.as_secs_f64() / every.as_secs_f64()).ceil().max(1.0) as u64;
            for k in 0..edits {
                rig.edit_blocklist(k)?;
                if k == edits / 2 {
                    commits.make(ctx, rig, label)?;
                }
                ctx.pause(every).await;
            }
            rig.restore_blocklist()?;
            (
                format!("{edits} blocklist edits every {every:?} (documentation networks only)"),
                None,
            )
        }
        FaultKind::CertRotation => {
            commits.make(ctx, rig, label)?;
            (rig.rotate_certificate().await?, None)
        }
        FaultKind::EdgeRestart => {
            commits.make(ctx, rig, label)?;
            let how = rig.restart_edge().await?;
            let pending = (!rig.edge.can_upgrade).then(|| {
                "this kas-edge has no graceful upgrade (run --upgrade): stopped and started"
                    .to_owned()
            });
            (how, pending)
        }
    })
}
