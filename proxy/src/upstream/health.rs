//! Active health checks: an HTTP GET of each pod's readiness path on its observability
//! port — not the traffic port, where a kas pod keeps serving its open streams while it
//! drains. All pods are checked in parallel each round, and a discovery change starts a
//! round at once so a new pod is admitted without waiting a full interval.

use std::sync::Arc;
use std::time::Duration;

use crate::config::HealthConfig;
use crate::support::http_client as plain_http;
use crate::telemetry::metrics::EdgeMetrics;
use crate::upstream::pool::{Pod, Pool};

/// A readiness body is a word or two; anything much larger is not a kas pod.
const MAX_BODY: usize = 4096;

/// One check: true on a 2xx within the timeout.
pub async fn check(pod: &Pod, path: &str, timeout: Duration) -> bool {
    let host = pod.health_addr.to_string();
    plain_http::get(
        pod.health_addr,
        &host,
        path,
        "kas-edge-health-check",
        timeout,
        MAX_BODY,
    )
    .await
    .is_some_and(|answer| answer.status.is_success())
}

/// Applies one result to the pod's counters; returns the new health if it flipped.
fn record(pod: &Pod, passed: bool, cfg: &HealthConfig) -> Option<bool> {
    use std::sync::atomic::Ordering::SeqCst;
    if passed {
        pod.consecutive_fail.store(0, SeqCst);
        let ok = pod.consecutive_ok.fetch_add(1, SeqCst) + 1;
        (ok >= cfg.healthy_threshold && pod.set_healthy(true)).then_some(true)
    } else {
        pod.consecutive_ok.store(0, SeqCst);
        let fail = pod.consecutive_fail.fetch_add(1, SeqCst) + 1;
        (fail >= cfg.unhealthy_threshold && pod.set_healthy(false)).then_some(false)
    }
}

/// Checks every pod forever, in parallel rounds.
pub async fn run(pool: Arc<Pool>, cfg: HealthConfig, metrics: EdgeMetrics) {
    loop {
        let pods = pool.pods();
        let results = futures_util::future::join_all(
            pods.iter().map(|pod| check(pod, &cfg.path, cfg.timeout)),
        )
        .await;
        for (pod, passed) in pods.iter().zip(results) {
            if !passed {
                metrics
                    .health_check_failures
                    .with_label_values(&[&pod.label])
                    .inc();
            }
            match record(pod, passed, &cfg) {
                Some(true) => {
                    tracing::info!(pod = %pod.label, "pod is healthy: receiving new traffic")
                }
                Some(false) => tracing::warn!(
                    pod = %pod.label,
                    in_flight = pod.in_flight(),
                    "pod is unhealthy: no new traffic, open streams left alone"
                ),
                None => {}
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.interval) => {}
            _ = pool.changed.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::discovery::Endpoint;

    fn pod() -> Arc<Pod> {
        let pool = Pool::new(1, Duration::from_secs(1));
        pool.update(&[Endpoint::plain("127.0.0.1:1".parse().unwrap())]);
        pool.pods()[0].clone()
    }

    #[test]
    fn thresholds_gate_transitions() {
        let cfg = HealthConfig {
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            ..HealthConfig::default()
        };
        let pod = pod();
        assert_eq!(record(&pod, true, &cfg), None);
        assert_eq!(record(&pod, true, &cfg), Some(true));
        assert_eq!(record(&pod, false, &cfg), None);
        assert_eq!(record(&pod, false, &cfg), None);
        assert_eq!(
            record(&pod, true, &cfg),
            None,
            "a pass resets the failure count"
        );
        for _ in 0..2 {
            assert_eq!(record(&pod, false, &cfg), None);
        }
        assert_eq!(record(&pod, false, &cfg), Some(false));
        assert!(!pod.is_healthy());
    }

    #[tokio::test]
    async fn refused_port_fails_the_check() {
        assert!(!check(&pod(), "/readiness", Duration::from_secs(1)).await);
    }
}
