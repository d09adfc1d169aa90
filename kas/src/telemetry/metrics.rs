//! Prometheus metrics of one kas instance. Each instance owns its registry so several kas
//! pods can run in one process (the local stack, tests) without mixing their numbers.

use prometheus::{
    Counter, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open agent connections by transport (`grpc` = h2c, `websocket`).
    pub connected_agents: IntGaugeVec,
    /// Open RPC streams by method.
    pub streams: IntGaugeVec,
    /// Token checks by outcome (`ok`, `cached`, `unauthenticated`, ...).
    pub auth_results: IntCounterVec,
    /// GitLab API latency by endpoint and outcome.
    pub gitlab_api_latency: HistogramVec,
    /// GitLab API calls that failed as "unavailable", by endpoint and kind (`timeout`,
    /// `connect`, `http_5xx`, `http_other`, `transport`): what an outage looks like.
    pub gitlab_api_errors: IntCounterVec,
    /// GitLab API calls that found `gitlab.api_rate_limit`'s bucket empty and waited, by
    /// endpoint: how often the limit shapes traffic.
    pub gitlab_api_rate_limited: IntCounterVec,
    /// Seconds GitLab API calls spent waiting for a token, all together.
    pub gitlab_api_rate_limit_wait: Counter,
    /// Re-checks of long streams' tokens by result: `ok`, `rejected` (the stream ends),
    /// `deferred` (GitLab unavailable: the stream stays, asked again one TTL later).
    pub token_revalidations: IntCounterVec,
    /// Configuration messages sent to agents, and failures to produce one.
    pub config_events: IntCounterVec,
    /// Gitaly calls by RPC and outcome (`ok`, `not_found`, `unavailable`, ...).
    pub gitaly_requests: IntCounterVec,
    /// Configuration file lookups by how they were answered (`read` from the source,
    /// `cached`, `coalesced` into a read in progress).
    pub config_file_reads: IntCounterVec,
    /// 1 while ready to take new agents.
    pub ready: IntGauge,
}

pub use kas_common::metrics::{register, GaugeGuard};

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let connected_agents = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "kas_connected_agents",
                    "Open agent connections by transport.",
                ),
                &["transport"],
            )
            .expect("valid metric"),
        );
        let streams = register(
            &registry,
            IntGaugeVec::new(
                Opts::new("kas_open_streams", "Open gRPC streams by method."),
                &["method"],
            )
            .expect("valid metric"),
        );
        let auth_results = register(
            &registry,
            IntCounterVec::new(
                Opts::new("kas_auth_results_total", "Agent token checks by outcome."),
                &["outcome"],
            )
            .expect("valid metric"),
        );
        let gitlab_api_latency = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "kas_gitlab_api_request_duration_seconds",
                    "GitLab API request latency by endpoint and outcome.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["endpoint", "outcome"],
            )
            .expect("valid metric"),
        );
        let gitlab_api_errors = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "kas_gitlab_api_errors_total",
                    "GitLab API calls that failed for GitLab's reasons, by endpoint and kind (timeout, connect, http_5xx, http_other, transport).",
                ),
                &["endpoint", "kind"],
            )
            .expect("valid metric"),
        );
        let gitlab_api_rate_limited = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "kas_gitlab_api_rate_limited_total",
                    "GitLab API calls that waited for a token of gitlab.api_rate_limit, by endpoint.",
                ),
                &["endpoint"],
            )
            .expect("valid metric"),
        );
        let gitlab_api_rate_limit_wait = register(
            &registry,
            Counter::new(
                "kas_gitlab_api_rate_limit_wait_seconds_total",
                "Seconds GitLab API calls waited for a token of gitlab.api_rate_limit.",
            )
            .expect("valid metric"),
        );
        let token_revalidations = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "kas_agent_token_revalidations_total",
                    "Re-checks of long streams' agent tokens by result (ok, rejected: the stream ends, deferred: GitLab unavailable, the stream stays).",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        // Every result exists from the start at 0, so the first deferred re-check is an
        // increase that rate() and the alert see, not a new series.
        for result in ["ok", "rejected", "deferred"] {
            token_revalidations.with_label_values(&[result]);
        }
        let config_events = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "kas_agent_configuration_events_total",
                    "Configurations sent to agents (`sent`) and failures to read one.",
                ),
                &["event"],
            )
            .expect("valid metric"),
        );
        let gitaly_requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "kas_gitaly_requests_total",
                    "Gitaly calls by RPC and outcome.",
                ),
                &["rpc", "outcome"],
            )
            .expect("valid metric"),
        );
        let config_file_reads = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "kas_agent_configuration_file_lookups_total",
                    "Agent configuration file lookups by how they were answered (read, cached, coalesced).",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
        );
        let ready = register(
            &registry,
            IntGauge::new("kas_ready", "1 while this kas accepts new agents.")
                .expect("valid metric"),
        );
        Self {
            registry,
            connected_agents,
            streams,
            auth_results,
            gitlab_api_latency,
            gitlab_api_errors,
            gitlab_api_rate_limited,
            gitlab_api_rate_limit_wait,
            token_revalidations,
            config_events,
            gitaly_requests,
            config_file_reads,
            ready,
        }
    }

    /// The pod's registry, for parts that own their metrics (e.g. the tunnel registry).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# metrics encoding failed: {e}\n"))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
