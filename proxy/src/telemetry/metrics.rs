//! The edge's Prometheus metrics, in its own registry served on the admin port.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::upstream::pool::Pool;

#[derive(Clone)]
pub struct EdgeMetrics {
    registry: Registry,
    /// Requests and streams by protocol (`grpc`, `websocket`, `http`) and final status.
    pub requests: IntCounterVec,
    /// Streams and websocket tunnels open now, by protocol.
    pub active: IntGaugeVec,
    /// Body bytes by direction (`from_client`, `to_client`).
    pub bytes: IntCounterVec,
    /// Time to first response header from the pod, by protocol.
    pub upstream_latency: HistogramVec,
    pub upstream_healthy: IntGaugeVec,
    pub upstream_in_flight: IntGaugeVec,
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
    /// Established connections closed because a reload newly blocked their client.
    pub established_closed: prometheus::IntCounter,
    /// Keys the rate limiters and bans track now (at most `max_tracked_keys`).
    pub ratelimit_keys: IntGauge,
}

use kas_common::metrics::register;

/// Holds one count in a gauge for as long as it lives: an open connection, an active
/// stream, whichever way it ends.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn hold(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

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
        let r = Registry::new();
        Self {
            requests: counter(
                &r,
                "edge_requests_total",
                "Requests/streams by protocol and status.",
                &["protocol", "status"],
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
                    "Connections accepted whose TLS handshake has not completed yet.",
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
            registry: r,
        }
    }

    /// Renders all metrics, refreshing the per-pod gauges from the pool first so pods
    /// that left discovery also leave the output.
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

    pub fn render(&self, pool: &Pool) -> String {
        self.refresh_certificate_expiry();
        self.upstream_healthy.reset();
        self.upstream_in_flight.reset();
        for pod in pool.pods().iter() {
            self.upstream_healthy
                .with_label_values(&[&pod.label])
                .set(i64::from(pod.is_healthy()));
            self.upstream_in_flight
                .with_label_values(&[&pod.label])
                .set(pod.in_flight() as i64);
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# metrics encoding failed: {e}\n"))
    }
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self::new()
    }
}
