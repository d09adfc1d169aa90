//! `hostile`: a legitimate fleet holds while the [`crate::attacks`] hit the edge from
//! other source addresses. The verdict is the fleet's: its error rate (attacks are
//! counted apart), whether it stayed connected, whether the edge process survived; the
//! attacks' numbers and the edge's memory before, during and after are the findings.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::attacks::{self, AttackEnv, Sizing};
use crate::probe::{EdgeProbe, EdgeSample};
use crate::report::EdgeSummary;
use crate::stats::Stats;
use crate::transport::Transport;
use crate::Ctx;

use super::{delta, fleet, ramp_and_settle, round3, stop};

/// The attackers, checked before any agent connects: a TLS loopback target, a CA to
/// trust, and source addresses apart from the fleet's.
fn attack_env(ctx: &Ctx, sizing: Sizing, stop: CancellationToken) -> anyhow::Result<AttackEnv> {
    if ctx.args.no_source_spread {
        bail!("the hostile scenario needs spread source addresses (drop --no-source-spread)");
    }
    let fleet_ips = ctx.args.agents.div_ceil(ctx.args.agents_per_ip.max(1));
    attacks::check_disjoint(
        ctx.args.source_base,
        fleet_ips,
        ctx.args.attack_source_base,
        sizing.total_sources(),
    )?;
    let target = ctx
        .targets
        .iter()
        .find(|t| t.tls)
        .cloned()
        .context("the hostile scenario needs a TLS --target (the edge's port)")?;
    let ca = ctx
        .ca_file
        .clone()
        .context("the hostile scenario needs --ca-file (the edge's certificate)")?;
    AttackEnv::new(
        target,
        &ca,
        &ctx.args.server_name,
        ctx.token.clone(),
        sizing,
        ctx.args.attack_source_base,
        ctx.args.connect_timeout,
        stop,
    )
}

/// The edge's highest resident memory while the attacks run, sampled every 250 ms
/// until `stop` (the timeline's interval may be too coarse to catch a spike).
fn spawn_peak_sampler(
    probe: Arc<EdgeProbe>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Option<u64>> {
    tokio::spawn(async move {
        let mut peak: Option<u64> = None;
        loop {
            if let Some(rss) = probe.sample().await.rss_bytes {
                peak = Some(peak.map_or(rss, |p| p.max(rss)));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.cancelled() => return peak,
            }
        }
    })
}

/// The edge's cost under attack: memory before, peak during, after; CPU during.
fn attack_edge_summary(
    ctx: &Ctx,
    connected: &EdgeSample,
    before: &EdgeSample,
    attack_end: &EdgeSample,
    after: &EdgeSample,
    peak: Option<u64>,
    attack: Duration,
) -> EdgeSummary {
    let cpu = delta(before.cpu_seconds, attack_end.cpu_seconds)
        .map(|c| c / attack.as_secs_f64().max(1e-3));
    EdgeSummary {
        pids: ctx.args.edge_pids.clone(),
        connections_measured: Some(ctx.stats.now_connected()),
        baseline_rss_bytes: before.rss_bytes,
        loaded_rss_bytes: attack_end.rss_bytes,
        cpu_cores_hold: cpu,
        open_connections: attack_end.open_connections,
        active_streams: attack_end.active_streams,
        rss_fleet_connected_bytes: connected.rss_bytes,
        rss_before_attack_bytes: before.rss_bytes,
        rss_peak_attack_bytes: peak.into_iter().chain(attack_end.rss_bytes).max(),
        rss_after_attack_bytes: after.rss_bytes,
        cpu_cores_attack: cpu,
        ..EdgeSummary::default()
    }
}

pub async fn hostile(ctx: &mut Ctx) -> anyhow::Result<()> {
    let sizing = Sizing::scaled(ctx.args.attack_scale);
    let attack_stop = ctx.interrupted.child_token();
    let env = Arc::new(attack_env(ctx, sizing, attack_stop.clone())?);
    let mut fleet = fleet(ctx, Duration::ZERO)?;
    ramp_and_settle(ctx, &mut fleet).await;
    ctx.pause(Duration::from_secs(1)).await;
    let n = fleet.slots.len();
    let connected = ctx.probe.sample().await;

    ctx.set_phase("warm-up");
    ctx.pause(ctx.args.attack_warmup).await;
    ctx.set_phase("before");
    let before = ctx.probe.sample().await;
    let errors_before = ctx.stats.errors.total();
    let cuts_before = Stats::get(&ctx.stats.unexpected_cuts);

    ctx.set_phase("attack");
    let begin = Instant::now();
    let peak_stop = CancellationToken::new();
    let peak = spawn_peak_sampler(ctx.probe.clone(), peak_stop.clone());
    let kinds = ctx.args.attack_kinds.clone();
    let running = tokio::spawn(async move { attacks::run_all(env, &kinds).await });
    // Hold, watching the fleet: the lowest count connected is the attacks' damage.
    let mut min_connected = fleet.connected();
    while begin.elapsed() < ctx.args.duration && !ctx.interrupted.is_cancelled() {
        let left = ctx.args.duration.saturating_sub(begin.elapsed());
        ctx.pause(left.min(Duration::from_millis(250))).await;
        min_connected = min_connected.min(fleet.connected());
    }
    let attack_secs = begin.elapsed();
    let attack_end = ctx.probe.sample().await;
    let connected_end_of_attack = fleet.connected();
    let cuts_during = Stats::get(&ctx.stats.unexpected_cuts).saturating_sub(cuts_before);

    ctx.set_phase("stop attacks");
    attack_stop.cancel();
    // Each attack closes within seconds of its stop (they bound themselves); this is the
    // backstop.
    let results = match timeout(Duration::from_secs(30), running).await {
        Ok(Ok(results)) => results,
        Ok(Err(e)) => bail!("the attacks panicked: {e}"),
        Err(_) => bail!("the attacks did not stop within 30 s"),
    };
    peak_stop.cancel();
    let peak_rss = peak.await.ok().flatten();

    ctx.set_phase("settle");
    let whole = fleet
        .wait_for(ctx.args.settle, |f| f.connected() == n)
        .await;
    ctx.pause(ctx.args.attack_settle).await;
    let after = ctx.probe.sample().await;
    let connected_after = fleet.connected();

    let errors_during = ctx.stats.errors.total().saturating_sub(errors_before);
    let operations = ctx.stats.operations();
    let errors = ctx.stats.errors.total();
    ctx.fact("attack_s", round3(attack_secs.as_secs_f64()));
    ctx.fact("attack_scale", ctx.args.attack_scale);
    ctx.fact(
        "attack_kinds",
        results
            .iter()
            .map(|(s, _)| s.kind.clone())
            .collect::<Vec<_>>()
            .join(","),
    );
    ctx.fact(
        "attack_connections_total",
        results.iter().map(|(s, _)| s.attempts).sum::<u64>(),
    );
    ctx.fact("legit_operations", operations);
    ctx.fact("legit_errors", errors);
    ctx.fact("legit_errors_during_attack", errors_during);
    ctx.fact(
        "legit_success_rate",
        1.0 - errors as f64 / operations.max(1) as f64,
    );
    ctx.fact("legit_connects_ok", Stats::get(&ctx.stats.connects_ok));
    ctx.fact("legit_echo_ok", Stats::get(&ctx.stats.echo_ok));
    ctx.fact("legit_min_connected_during_attack", min_connected);
    ctx.fact("legit_connected_end_of_attack", connected_end_of_attack);
    ctx.fact("legit_connected_after", connected_after);

    let chosen = &ctx.args.attack_kinds;
    let missing: Vec<&str> = attacks::KINDS
        .iter()
        .copied()
        .filter(|k| chosen.is_empty() || chosen.iter().any(|c| c == k))
        .filter(|k| !results.iter().any(|(s, _)| s.kind == *k && s.attempts > 0))
        .collect();
    ctx.check(
        "every attack ran",
        missing.is_empty() || ctx.interrupted.is_cancelled(),
        if missing.is_empty() {
            format!("{} kinds", results.len())
        } else {
            format!("no attempts: {}", missing.join(", "))
        },
    );
    // The pods' connections the edge shares carry the `grpcs://` agents: the attacks on
    // them (reset bursts, zero-window readers) aim at those agents' streams.
    let sharing = fleet
        .slots
        .iter()
        .filter(|s| s.transport == Transport::Grpc)
        .count();
    ctx.fact("legit_grpc_agents", sharing);
    ctx.fact("legit_streams_ended_during_attack", cuts_during);
    ctx.check(
        "fleet shares the pods' connections with the attackers",
        sharing > 0,
        format!("{sharing} of {n} agents on grpcs:// (--ws-fraction below 1)"),
    );
    let cut_example = ctx
        .stats
        .errors
        .snapshot()
        .get("cut")
        .map(|(_, example)| example.clone())
        .unwrap_or_default();
    ctx.check(
        "no legitimate stream ended during the attacks",
        cuts_during == 0,
        match cuts_during {
            0 => "every held configuration and Echo stream lived on".to_owned(),
            n => format!("{n} agents lost a stream, e.g. {cut_example}"),
        },
    );
    ctx.check(
        "fleet held through the attacks",
        connected_end_of_attack == n && whole,
        format!(
            "{connected_end_of_attack}/{n} connected when the attacks ended (lowest \
             {min_connected}), {connected_after}/{n} after"
        ),
    );
    if !ctx.args.edge_pids.is_empty() {
        ctx.check(
            "edge process alive",
            after.rss_bytes.is_some(),
            format!("pids {:?}", ctx.args.edge_pids),
        );
    }
    if ctx.probe.is_active() {
        ctx.edge = Some(attack_edge_summary(
            ctx,
            &connected,
            &before,
            &attack_end,
            &after,
            peak_rss,
            attack_secs,
        ));
    }
    for (summary, closes) in results {
        if !closes.is_empty() {
            ctx.extra_latency
                .push((format!("{} closed by the edge after", summary.kind), closes));
        }
        ctx.attacks.push(summary);
    }
    stop(ctx, fleet).await;
    Ok(())
}
