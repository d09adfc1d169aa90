//! The edge's Prometheus metrics, in its own registry served on the admin port.

use std::collections::HashSet;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// One kas pod as the per-pod series show it at a scrape. The upstream layer hands these
/// over, so telemetry needs no knowledge of how pods are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSample {
    pub label: String,
    pub healthy: bool,
    pub in_flight: usize,
    /// HTTP/2 connections open to the pod (all its ports).
    pub h2_connections: usize,
}

#[derive(Clone)]
pub struct EdgeMetrics {
    registry: Registry,
    /// Requests and streams by protocol (`grpc`, `websocket`, `http`) and final status.
    pub requests: IntCounterVec,
    /// gRPC calls (over HTTP/2) by the `grpc-status` their client got, as its canonical
    /// name (`OK`, `UNAUTHENTICATED`, ...): an HTTP 200 may carry a gRPC error.
    pub grpc_responses: IntCounterVec,
    /// Streams and websocket tunnels open now, by protocol.
    pub active: IntGaugeVec,
    /// Body bytes by direction (`from_client`, `to_client`).
    pub bytes: IntCounterVec,
    /// Time to first response header from the pod, by protocol.
    pub upstream_latency: HistogramVec,
    pub upstream_healthy: IntGaugeVec,
    pub upstream_in_flight: IntGaugeVec,
    pub upstream_h2_connections: IntGaugeVec,
    pub upstream_connect_failures: IntCounterVec,
    pub health_check_failures: IntCounterVec,
    /// TLS handshakes by result (`started` at ClientHello, `completed`).
    pub tls_handshakes: IntCounterVec,
    pub tls_reloads: IntCounterVec,
    /// Seconds until the earliest certificate expires (negative once expired).
    pub tls_cert_expiry: IntGauge,
    /// When the earliest served certificate expires (Unix seconds); the expiry gauge
    /// above is computed from it at each scrape, so it counts down between reloads.
    pub tls_cert_not_after: IntGauge,
    pub ready: IntGauge,
    /// Downstream connections open now (after the TLS handshake).
    pub open_connections: IntGauge,
    /// Connections in their TLS handshake now, and the configured cap on them.
    pub handshakes_in_progress: IntGauge,
    pub handshakes_limit: IntGauge,
    /// Of those, the ones waiting for a slot under the cap (a reconnect storm queues).
    pub handshakes_queued: IntGauge,
    /// Connections the edge closed because a stage took too long, by stage.
    pub timeouts: IntCounterVec,
    /// The same connections by negotiated ALPN protocol (`h2`: grpcs agents, `http/1.1`:
    /// wss agents and plain HTTP, `none`).
    pub open_connections_by_alpn: IntGaugeVec,
    pub tls_handshake_seconds: prometheus::Histogram,
    /// Refused connections and requests by reason and the policy source that refused them.
    pub policy_blocked: IntCounterVec,
    /// Matches of preview entries and rules (counted, not blocked), by source.
    pub policy_preview: IntCounterVec,
    pub policy_reloads: IntCounterVec,
    /// Rate-limit keys evicted (least recently used first) to make room in a full table.
    pub ratelimit_evictions: prometheus::IntCounter,
    pub blocklist_entries: IntGauge,
    pub blocklist_reload_errors: prometheus::IntCounter,
    pub blocklist_last_reload: IntGauge,
    /// Per `source` (`file`, `configmap`): the first 52 bits of the SHA-256 of the text of
    /// the list in force (`policy::blocklist::content_digest`), equal on replicas that
    /// hold the same list; only for configured sources, 0 until the first load.
    pub blocklist_content_hash: IntGaugeVec,
    /// By `configmap` (NAMESPACE/NAME), only with `policies.blocklist_configmap`: 1 while
    /// the watch of the blocklist ConfigMap works, 0 after a failed list or watch.
    pub blocklist_watch_up: IntGaugeVec,
    /// Failed lists and watches of the blocklist ConfigMap, by `configmap`.
    pub blocklist_watch_errors: IntCounterVec,
    /// Established connections closed because a reload newly blocked their client.
    pub established_closed: prometheus::IntCounter,
    /// Keys the rate limiters and bans track now (at most `max_tracked_keys`).
    pub ratelimit_keys: IntGauge,
    /// Access lines dropped because stdout did not keep up (process-wide: the stdout queue
    /// is one per process, see [`super::log_writer`]).
    pub access_log_dropped: prometheus::IntCounter,
    /// 1 while the discovery source's last attempt produced a result, else 0.
    pub discovery_up: IntGauge,
    /// Failed discovery attempts (DNS lookups, EndpointSlice lists and watches).
    pub discovery_errors: prometheus::IntCounter,
    /// Connections open now on the edge's own plain-HTTP listeners, by `listener`
    /// (`http`: the public `listen.http`, `admin`: the private admin port).
    pub plain_http_connections: IntGaugeVec,
    /// Connections those listeners closed without serving them to the end, by `listener`
    /// and `reason` (`policy`, `max_connections`, `max_connections_per_ip`, `lifetime`).
    pub plain_http_dropped: IntCounterVec,
    /// ACME challenges relayed to the ACME replica, by `result` (`answered`,
    /// `not_answered`, `busy`: refused at once, too many relays in flight).
    pub acme_relays: IntCounterVec,
}

use kas_common::metrics::register;
pub use kas_common::metrics::GaugeGuard;

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

impl EdgeMetrics {
    pub fn new() -> Self {
        let metrics = Self::registered();
        metrics.prime_outcome_series();
        metrics
    }

    /// Creates the series of every reload and relay outcome at 0, so `increase(...[15m]) > 0`
    /// alerts see the first error after a start (a series born at 1 has no increase) and
    /// dashboards show 0 rather than nothing.
    fn prime_outcome_series(&self) {
        for result in ["ok", "error"] {
            self.tls_reloads.with_label_values(&[result]);
            for file in ["blocklist", "limits", "rules"] {
                self.policy_reloads.with_label_values(&[file, result]);
            }
        }
        for result in ["answered", "not_answered", "busy"] {
            self.acme_relays.with_label_values(&[result]);
        }
    }

    /// Every metric registered; labelled ones without series yet.
    fn registered() -> Self {
        let r = Registry::new();
        Self {
            requests: counter(
                &r,
                "edge_requests_total",
                "Requests/streams by protocol and status.",
                &["protocol", "status"],
            ),
            grpc_responses: counter(
                &r,
                "edge_grpc_responses_total",
                "gRPC calls by the grpc-status their client got.",
                &["grpc_status"],
            ),
            active: gauge(
                &r,
                "edge_active_streams",
                "Open streams and websocket tunnels by protocol.",
                &["protocol"],
            ),
            bytes: counter(
                &r,
                "edge_body_bytes_total",
                "Body bytes by direction.",
                &["direction"],
            ),
            upstream_latency: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "edge_upstream_response_seconds",
                        "Time from request to the pod's response header, by protocol.",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                    &["protocol"],
                )
                .expect("valid metric"),
            ),
            upstream_healthy: gauge(
                &r,
                "edge_upstream_healthy",
                "1 if the pod passes health checks.",
                &["pod"],
            ),
            upstream_in_flight: gauge(
                &r,
                "edge_upstream_in_flight",
                "Streams open to the pod.",
                &["pod"],
            ),
            upstream_h2_connections: gauge(
                &r,
                "edge_upstream_h2_connections",
                "HTTP/2 connections open to the pod, shared by its gRPC streams.",
                &["pod"],
            ),
            upstream_connect_failures: counter(
                &r,
                "edge_upstream_connect_failures_total",
                "Failed connects by pod.",
                &["pod"],
            ),
            health_check_failures: counter(
                &r,
                "edge_health_check_failures_total",
                "Failed health checks by pod.",
                &["pod"],
            ),
            tls_handshakes: counter(
                &r,
                "edge_tls_handshakes_total",
                "TLS handshakes started and completed.",
                &["result"],
            ),
            tls_reloads: counter(
                &r,
                "edge_tls_reloads_total",
                "Certificate reloads by result.",
                &["result"],
            ),
            ready: register(
                &r,
                IntGauge::new("edge_ready", "1 while the edge accepts new connections.")
                    .expect("valid metric"),
            ),
            tls_cert_not_after: register(
                &r,
                IntGauge::new(
                    "edge_tls_certificate_not_after_timestamp_seconds",
                    "When the earliest served certificate expires (Unix time).",
                )
                .expect("valid metric"),
            ),
            tls_cert_expiry: register(
                &r,
                IntGauge::new(
                    "edge_tls_certificate_expiry_seconds",
                    "Seconds until the earliest certificate expires.",
                )
                .expect("valid metric"),
            ),
            tls_handshake_seconds: register(
                &r,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new("edge_tls_handshake_seconds", "TLS handshake duration.")
                        .buckets(vec![
                            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                        ]),
                )
                .expect("valid metric"),
            ),
            open_connections: register(
                &r,
                IntGauge::new("edge_open_connections", "Downstream connections open now.")
                    .expect("valid metric"),
            ),
            handshakes_in_progress: register(
                &r,
                IntGauge::new(
                    "edge_connections_in_handshake",
                    "Connections accepted whose TLS handshake has not completed yet (those queued for a handshake slot included).",
                )
                .expect("valid metric"),
            ),
            handshakes_queued: register(
                &r,
                IntGauge::new(
                    "edge_connections_queued_for_handshake",
                    "Connections waiting for a handshake slot because edge_connections_in_handshake_limit handshakes are running.",
                )
                .expect("valid metric"),
            ),
            handshakes_limit: register(
                &r,
                IntGauge::new(
                    "edge_connections_in_handshake_limit",
                    "The configured cap on connections in TLS handshake (downstream.max_handshakes).",
                )
                .expect("valid metric"),
            ),
            timeouts: counter(
                &r,
                "edge_timeouts_total",
                "Connections closed because a stage took too long, by stage (proxy_header is counted as a refusal).",
                &["stage"],
            ),
            open_connections_by_alpn: gauge(
                &r,
                "edge_open_connections_by_alpn",
                "Downstream connections open now, by negotiated ALPN protocol.",
                &["alpn"],
            ),
            policy_blocked: counter(
                &r,
                "edge_policy_blocked_total",
                "Refused connections/requests by reason and source.",
                &["reason", "source"],
            ),
            policy_preview: counter(
                &r,
                "edge_policy_preview_matches_total",
                "Preview matches (not blocked) by source.",
                &["source"],
            ),
            policy_reloads: counter(
                &r,
                "edge_policy_reloads_total",
                "Policy file reloads by file and result.",
                &["file", "result"],
            ),
            ratelimit_evictions: register(
                &r,
                prometheus::IntCounter::new(
                    "edge_ratelimit_evictions_total",
                    "Rate-limit keys evicted, least recently used first, to make room in a full \
                     table (max_tracked_keys); an evicted client starts with a fresh budget.",
                )
                .expect("valid metric"),
            ),
            blocklist_entries: register(
                &r,
                IntGauge::new(
                    "edge_blocklist_entries",
                    "Entries in the blocklist in force.",
                )
                .expect("valid metric"),
            ),
            blocklist_reload_errors: register(
                &r,
                prometheus::IntCounter::new(
                    "edge_blocklist_reload_errors_total",
                    "Rejected blocklist edits.",
                )
                .expect("valid metric"),
            ),
            blocklist_last_reload: register(
                &r,
                IntGauge::new(
                    "edge_blocklist_last_reload_timestamp_seconds",
                    "Unix time of the last successful blocklist load.",
                )
                .expect("valid metric"),
            ),
            blocklist_content_hash: gauge(
                &r,
                "edge_blocklist_content_hash",
                "First 52 bits of the SHA-256 of the blocklist text in force, by source: equal \
                 on replicas that hold the same list.",
                &["source"],
            ),
            blocklist_watch_up: gauge(
                &r,
                "edge_blocklist_watch_up",
                "1 while the blocklist ConfigMap watch works, 0 after a failed list or watch.",
                &["configmap"],
            ),
            blocklist_watch_errors: counter(
                &r,
                "edge_blocklist_watch_errors_total",
                "Failed lists and watches of the blocklist ConfigMap.",
                &["configmap"],
            ),
            established_closed: register(
                &r,
                prometheus::IntCounter::new(
                    "edge_policy_closed_connections_total",
                    "Established connections closed by a blocklist edit.",
                )
                .expect("valid metric"),
            ),
            ratelimit_keys: register(
                &r,
                IntGauge::new(
                    "edge_ratelimit_tracked_keys",
                    "Keys (a limit of one client or token, violation counts, bans) tracked by \
                     the rate limiters; never more than max_tracked_keys.",
                )
                .expect("valid metric"),
            ),
            access_log_dropped: register(&r, super::log_writer::stdout_dropped().clone()),
            discovery_up: register(
                &r,
                IntGauge::new(
                    "edge_discovery_up",
                    "1 while the kas pod discovery source works, 0 after a failed attempt.",
                )
                .expect("valid metric"),
            ),
            discovery_errors: register(
                &r,
                prometheus::IntCounter::new(
                    "edge_discovery_errors_total",
                    "Failed discovery attempts (DNS lookups, EndpointSlice lists/watches).",
                )
                .expect("valid metric"),
            ),
            plain_http_connections: gauge(
                &r,
                "edge_plain_http_connections",
                "Connections open now on the plain-HTTP listeners.",
                &["listener"],
            ),
            plain_http_dropped: counter(
                &r,
                "edge_plain_http_dropped_total",
                "Plain-HTTP connections refused at accept or cut at their lifetime.",
                &["listener", "reason"],
            ),
            acme_relays: counter(
                &r,
                "edge_acme_relays_total",
                "ACME challenges relayed to the ACME replica, by result.",
                &["result"],
            ),
            registry: r,
        }
    }

    /// Records the expiry of the earliest certificate now served.
    pub fn certificate_expires_at(&self, not_after: std::time::SystemTime) {
        let unix = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.tls_cert_not_after.set(unix);
        self.refresh_certificate_expiry();
    }

    fn refresh_certificate_expiry(&self) {
        let not_after = self.tls_cert_not_after.get();
        if not_after == 0 {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.tls_cert_expiry.set(not_after - now);
    }

    /// Renders all metrics, refreshing the per-pod series from `pods` (the pods discovery
    /// knows now) first so pods that left discovery also leave the output: the gauges are
    /// rebuilt, the counters of departed pods removed.
    pub fn render(&self, pods: &[PodSample]) -> String {
        self.refresh_certificate_expiry();
        let current: HashSet<&str> = pods.iter().map(|p| p.label.as_str()).collect();
        for counter in [&self.upstream_connect_failures, &self.health_check_failures] {
            remove_departed_pods(counter, &current);
        }
        self.upstream_healthy.reset();
        self.upstream_in_flight.reset();
        self.upstream_h2_connections.reset();
        for pod in pods {
            self.upstream_h2_connections
                .with_label_values(&[&pod.label])
                .set(pod.h2_connections as i64);
            self.upstream_healthy
                .with_label_values(&[&pod.label])
                .set(i64::from(pod.healthy));
            self.upstream_in_flight
                .with_label_values(&[&pod.label])
                .set(pod.in_flight as i64);
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# metrics encoding failed: {e}\n"))
    }
}

/// Removes the series of `counter` whose `pod` label is not in `current`.
fn remove_departed_pods(counter: &IntCounterVec, current: &HashSet<&str>) {
    let departed: Vec<String> = prometheus::core::Collector::collect(counter)
        .iter()
        .flat_map(|family| family.get_metric())
        .flat_map(|metric| metric.get_label())
        .filter(|label| label.name() == "pod" && !current.contains(label.value()))
        .map(|label| label.value().to_owned())
        .collect();
    for pod in departed {
        // Gone already if a concurrent render removed it first.
        let _ = counter.remove_label_values(&[&pod]);
    }
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_and_relay_outcomes_exist_at_zero_from_the_start() {
        let text = EdgeMetrics::new().render(&[]);
        for series in [
            "edge_tls_reloads_total{result=\"error\"} 0",
            "edge_tls_reloads_total{result=\"ok\"} 0",
            "edge_policy_reloads_total{file=\"blocklist\",result=\"error\"} 0",
            "edge_policy_reloads_total{file=\"limits\",result=\"ok\"} 0",
            "edge_policy_reloads_total{file=\"rules\",result=\"error\"} 0",
            "edge_acme_relays_total{result=\"busy\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }

    fn series_of<'a>(text: &'a str, pod: &str) -> Vec<&'a str> {
        let label = format!("pod=\"{pod}\"");
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&label))
            .collect()
    }

    fn sample(label: &str) -> PodSample {
        PodSample {
            label: label.to_owned(),
            healthy: true,
            in_flight: 1,
            h2_connections: 1,
        }
    }

    #[test]
    fn a_pod_that_leaves_discovery_leaves_the_metrics() {
        let metrics = EdgeMetrics::new();
        let staying = "127.0.1.1:8150";
        let leaving = "127.0.1.2:8150";
        let pods = [sample(staying), sample(leaving)];
        for pod in &pods {
            metrics
                .upstream_connect_failures
                .with_label_values(&[&pod.label])
                .inc();
            metrics
                .health_check_failures
                .with_label_values(&[&pod.label])
                .inc();
        }
        let before = metrics.render(&pods);
        for pod in [staying, leaving] {
            assert_eq!(series_of(&before, pod).len(), 5, "{before}");
        }

        let after = metrics.render(&pods[..1]);
        assert_eq!(series_of(&after, leaving), Vec::<&str>::new(), "{after}");
        assert_eq!(series_of(&after, staying).len(), 5, "{after}");
        for name in [
            "edge_upstream_healthy",
            "edge_upstream_in_flight",
            "edge_upstream_h2_connections",
            "edge_upstream_connect_failures_total",
            "edge_health_check_failures_total",
        ] {
            assert!(
                after.contains(&format!("{name}{{pod=\"{staying}\"}}")),
                "{name}: {after}"
            );
        }
    }
}
