//! The tunnels' metrics, registered in the pod's registry. Routing metrics keep real kas's
//! names so dashboards built for it work unchanged.

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

use kas_common::metrics::register;

#[derive(Clone)]
pub struct TunnelMetrics {
    /// Idle tunnels waiting for a request.
    pub ready: IntGauge,
    /// Tunnels carrying a request.
    pub busy: IntGauge,
    /// Time to find a tunnel, by `status` (`success`, `aborted`).
    pub routing_duration: HistogramVec,
    /// Requests that found no tunnel within the find timeout.
    pub routing_timeouts: IntCounter,
}

impl TunnelMetrics {
    pub fn new(registry: &Registry) -> Self {
        let tunnels = register(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "kas_reverse_tunnels",
                    "Reverse tunnels agents hold on this pod, by state (ready: idle, busy: carrying a request).",
                ),
                &["state"],
            )
            .expect("valid metric"),
        );
        Self {
            ready: tunnels.with_label_values(&["ready"]),
            busy: tunnels.with_label_values(&["busy"]),
            routing_duration: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "k8s_api_proxy_routing_duration_seconds",
                        "Time to find an agent's tunnel for a request, by status (success, aborted).",
                    )
                    // 1 ms × 4^n, as real kas.
                    .buckets(prometheus::exponential_buckets(0.001, 4.0, 8).expect("valid buckets")),
                    &["status"],
                )
                .expect("valid metric"),
            ),
            routing_timeouts: register(
                registry,
                IntCounter::new(
                    "k8s_api_proxy_routing_timeout_total",
                    "Requests that found no tunnel of their agent within the find timeout.",
                )
                .expect("valid metric"),
            ),
        }
    }
}
