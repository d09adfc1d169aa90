//! kas configuration: one typed structure read from TOML, overridable by flags, validated
//! once at start so a bad value stops the process with the field's name instead of
//! surfacing later as a confusing runtime failure.

pub mod fleet;
pub mod kascfg;

pub use fleet::{ApiConfig, PrivateApiConfig, RedisConfig, RedisNetwork, SentinelConfig};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub agent: AgentListenerConfig,
    pub observability: ObservabilityConfig,
    pub gitlab: GitlabConfig,
    pub agent_configuration: AgentConfigurationConfig,
    pub gitaly: GitalyConfig,
    pub gitops: GitopsConfig,
    pub reverse_tunnel: ReverseTunnelConfig,
    pub kubernetes_api: KubernetesApiConfig,
    pub redis: RedisConfig,
    pub private_api: PrivateApiConfig,
    pub api: ApiConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentListenerConfig {
    /// Where agentk connects: gRPC (h2c) and gRPC over websocket share this port.
    pub listen: SocketAddr,
    /// Interval of HTTP/2 PINGs that find dead agents without any idle timeout.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Largest websocket message accepted from an agent.
    pub max_websocket_message_bytes: usize,
    /// Largest websocket message accepted on a tunnel before its first call GitLab
    /// accepts, so an unauthenticated client cannot make kas buffer the full limit.
    pub max_websocket_message_bytes_before_auth: usize,
    /// How long one agent connection (an HTTP/2 connection or a websocket tunnel) may
    /// live. Each ends at a random point in the last fifth of it: GOAWAY, then its parked
    /// streams end with OK and the agent reconnects, through the load balancer, so a
    /// scaled-out fleet rebalances (real kas: 2 h).
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// New calls (tunnels included) one agent token may start per minute, counted in Redis
    /// across the fleet (real kas: 40,000); without Redis the edge's per-token limit is the
    /// only one.
    pub connections_per_token_per_minute: u64,
}

impl Default for AgentListenerConfig {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 8150).into(),
            keepalive_interval: Duration::from_secs(50),
            max_websocket_message_bytes: 10 * 1024 * 1024,
            max_websocket_message_bytes_before_auth: 64 * 1024,
            max_connection_age: Duration::from_secs(2 * 3600),
            connections_per_token_per_minute: 40_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilityConfig {
    /// The probes and `/metrics` live here, apart from agent traffic, so a health checker
    /// measures the pod without competing with agents.
    pub listen: SocketAddr,
    /// Where the kubelet's liveness probe asks (real kas: `/liveness`).
    pub liveness_probe: UrlPathConfig,
    /// Where the kubelet and the edge's health checks ask (real kas: `/readiness`); the
    /// edge's `health.path` must name the same path.
    pub readiness_probe: UrlPathConfig,
    /// Where Prometheus scrapes (real kas: `/metrics`).
    pub prometheus: UrlPathConfig,
}

/// One path served on the observability port (real kas's `url_path`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrlPathConfig {
    pub url_path: String,
}

impl UrlPathConfig {
    fn new(path: &str) -> Self {
        Self {
            url_path: path.to_owned(),
        }
    }
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 8151).into(),
            liveness_probe: UrlPathConfig::new("/liveness"),
            readiness_probe: UrlPathConfig::new("/readiness"),
            prometheus: UrlPathConfig::new("/metrics"),
        }
    }
}

impl ObservabilityConfig {
    /// The three paths with their fields' names, for validation and error messages.
    fn paths(&self) -> [(&'static str, &str); 3] {
        [
            (
                "observability.liveness_probe.url_path",
                &self.liveness_probe.url_path,
            ),
            (
                "observability.readiness_probe.url_path",
                &self.readiness_probe.url_path,
            ),
            (
                "observability.prometheus.url_path",
                &self.prometheus.url_path,
            ),
        ]
    }

    /// Each path is a plain absolute path (requests are matched on the path alone, so a
    /// query or fragment could never match) and the three differ.
    fn validate(&self) -> Result<(), ConfigError> {
        let paths = self.paths();
        for (i, &(field, path)) in paths.iter().enumerate() {
            if !path.starts_with('/') {
                return Err(invalid(field, format!("must start with /, got {path:?}")));
            }
            if path.contains(['?', '#']) {
                return Err(invalid(
                    field,
                    format!("must be a path without a query or fragment, got {path:?}"),
                ));
            }
            if http::uri::PathAndQuery::try_from(path).is_err() {
                return Err(invalid(field, format!("is not a valid URL path: {path:?}")));
            }
            if let Some((other, _)) = paths[..i].iter().find(|(_, p)| *p == path) {
                return Err(invalid(
                    field,
                    format!("{path:?} is already {other}: each path must differ"),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitlabConfig {
    /// Base URL of GitLab's API, e.g. `https://gitlab.com`.
    pub address: String,
    /// URL agents should use for GitLab; defaults to `address`.
    pub external_url: Option<String>,
    /// File holding the base64 shared secret (GitLab's `.gitlab_kas_secret`).
    pub authentication_secret_file: PathBuf,
    #[serde(with = "humantime_serde")]
    pub api_timeout: Duration,
    /// How long a successful token check is trusted before GitLab is asked again.
    #[serde(with = "humantime_serde")]
    pub auth_cache_ttl: Duration,
    /// How long a definite rejection (401/403/404) is remembered; GitLab being
    /// unreachable is never cached.
    #[serde(with = "humantime_serde")]
    pub auth_cache_error_ttl: Duration,
    /// Upper bound on remembered tokens, so a flood of random tokens cannot grow memory.
    pub auth_cache_max_entries: usize,
    /// GitLab API calls one pod has in flight at most; more wait for a slot (within
    /// `api_timeout`), so a slow GitLab sees a bounded number of calls from kas however
    /// many new agents wait, instead of one more connection per agent.
    pub max_concurrent_requests: usize,
    /// A token bucket in front of every GitLab API call of this pod (real kas: 50/s, burst
    /// 250): a call waits for a token (within `api_timeout`) rather than failing, so a
    /// storm of new agents reaches GitLab at a rate it was sized for.
    pub api_rate_limit: RateLimitConfig,
}

impl Default for GitlabConfig {
    fn default() -> Self {
        Self {
            address: String::new(),
            external_url: None,
            authentication_secret_file: PathBuf::new(),
            api_timeout: Duration::from_secs(10),
            auth_cache_ttl: Duration::from_secs(300),
            auth_cache_error_ttl: Duration::from_secs(10),
            auth_cache_max_entries: 100_000,
            max_concurrent_requests: 256,
            api_rate_limit: RateLimitConfig {
                refill_rate_per_second: 50.0,
                bucket_size: 250,
            },
        }
    }
}

/// Where agent configuration files are read from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigurationSourceKind {
    /// The Gitaly server GitLab names in `agent_info`, as real kas does.
    #[default]
    Gitaly,
    /// GitLab's REST repository API with `api_token_file` (GitLab refuses agent tokens there).
    GitlabApi,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfigurationConfig {
    /// How often the configuration branch is checked for a new commit.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// `gitaly` (default) or `gitlab_api`.
    pub source: ConfigurationSourceKind,
    /// A GitLab API token (read_repository); required by, and only used by, `source = "gitlab_api"`.
    pub api_token_file: Option<PathBuf>,
    /// Larger `config.yaml` files are refused with FAILED_PRECONDITION (real kas: 128 KiB).
    pub max_configuration_file_size: usize,
}

impl Default for AgentConfigurationConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(300),
            source: ConfigurationSourceKind::Gitaly,
            api_token_file: None,
            max_configuration_file_size: crate::sources::MAX_CONFIG_FILE_BYTES,
        }
    }
}

/// A token bucket: `bucket_size` calls at once, refilled at `refill_rate_per_second`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub refill_rate_per_second: f64,
    pub bucket_size: u32,
}

impl RateLimitConfig {
    /// Fastest refill accepted: one token per nanosecond, the bucket's clock resolution.
    const MAX_RATE: f64 = 1e9;

    /// The bucket as `governor` counts it. Out-of-range values (refused by validation)
    /// are clamped rather than panicking.
    pub fn quota(&self) -> governor::Quota {
        let rate = self.refill_rate_per_second;
        let per_second = if rate.is_nan() {
            0.001
        } else {
            rate.clamp(0.001, Self::MAX_RATE)
        };
        let period = Duration::from_secs_f64(1.0 / per_second).max(Duration::from_nanos(1));
        let burst =
            std::num::NonZeroU32::new(self.bucket_size).unwrap_or(std::num::NonZeroU32::MIN);
        governor::Quota::with_period(period)
            .unwrap_or_else(|| governor::Quota::per_second(std::num::NonZeroU32::MIN))
            .allow_burst(burst)
    }

    /// `refill_rate_per_second` in (0, 1e9] and `bucket_size` at least 1; an error names
    /// the offending key.
    fn validate(
        &self,
        refill_field: &'static str,
        bucket_field: &'static str,
    ) -> Result<(), ConfigError> {
        let rate = self.refill_rate_per_second;
        if !(rate > 0.0 && rate <= Self::MAX_RATE) {
            return Err(invalid(
                refill_field,
                format!("must be greater than zero and at most 1e9, got {rate}"),
            ));
        }
        if self.bucket_size == 0 {
            return Err(invalid(bucket_field, "must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitalyConfig {
    /// All Gitaly calls of this kas together (real kas: 30/s, burst 70).
    pub global_api_rate_limit: RateLimitConfig,
    /// Calls to one Gitaly server (real kas: 15/s, burst 40).
    pub per_server_api_rate_limit: RateLimitConfig,
    /// Deadline of one Gitaly call, waiting for the rate limits included.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
}

impl Default for GitalyConfig {
    fn default() -> Self {
        let limits = crate::sources::gitaly::GitalyLimits::default();
        Self {
            global_api_rate_limit: RateLimitConfig {
                refill_rate_per_second: limits.global_per_second,
                bucket_size: limits.global_burst,
            },
            per_server_api_rate_limit: RateLimitConfig {
                refill_rate_per_second: limits.per_server_per_second,
                bucket_size: limits.per_server_burst,
            },
            call_timeout: limits.call_timeout,
        }
    }
}

impl GitalyConfig {
    pub fn limits(&self) -> crate::sources::gitaly::GitalyLimits {
        crate::sources::gitaly::GitalyLimits {
            global_per_second: self.global_api_rate_limit.refill_rate_per_second,
            global_burst: self.global_api_rate_limit.bucket_size,
            per_server_per_second: self.per_server_api_rate_limit.refill_rate_per_second,
            per_server_burst: self.per_server_api_rate_limit.bucket_size,
            call_timeout: self.call_timeout,
            ..crate::sources::gitaly::GitalyLimits::default()
        }
    }
}

/// GitOps manifest projects (`Gitops/GetObjectsToSynchronize`); defaults as real kas.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitopsConfig {
    /// How often a manifest project's branch is checked for a new commit (20 s).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Paths (globs or files) in one request (100).
    pub max_number_of_paths: usize,
    /// Files in one batch (1000).
    pub max_number_of_files: usize,
    /// Bytes of one manifest file (5 MiB).
    pub max_manifest_file_size: usize,
    /// Bytes of all manifest files of one batch together (20 MiB).
    pub max_total_manifest_file_size: usize,
    /// How long GitLab's answer on where a manifest project lives (and whether the agent
    /// may read it) is reused (5 min; 0: ask every time).
    #[serde(with = "humantime_serde")]
    pub project_info_cache_ttl: Duration,
    /// How long a refusal (401/403/404) of `project_info` is reused (1 min).
    #[serde(with = "humantime_serde")]
    pub project_info_cache_error_ttl: Duration,
}

impl Default for GitopsConfig {
    fn default() -> Self {
        let limits = crate::agent::gitops::GitopsLimits::default();
        Self {
            poll_interval: Duration::from_secs(20),
            max_number_of_paths: limits.max_number_of_paths,
            max_number_of_files: limits.max_number_of_files,
            max_manifest_file_size: limits.max_manifest_file_size,
            max_total_manifest_file_size: limits.max_total_manifest_file_size,
            project_info_cache_ttl: Duration::from_secs(300),
            project_info_cache_error_ttl: Duration::from_secs(60),
        }
    }
}

impl GitopsConfig {
    pub fn limits(&self) -> crate::agent::gitops::GitopsLimits {
        crate::agent::gitops::GitopsLimits {
            max_number_of_paths: self.max_number_of_paths,
            max_number_of_files: self.max_number_of_files,
            max_manifest_file_size: self.max_manifest_file_size,
            max_total_manifest_file_size: self.max_total_manifest_file_size,
        }
    }
}

/// The reverse tunnels agents hold open, and routing requests through them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReverseTunnelConfig {
    /// How long a request waits for one of its agent's tunnels before it fails with
    /// "Agent connection not found" (real kas: 20 s).
    #[serde(with = "humantime_serde")]
    pub routing_timeout: Duration,
    /// Idle tunnels one agent may hold on this pod (agentk opens at most 500).
    pub max_tunnels_per_agent: usize,
    /// Idle tunnels of all agents on this pod.
    pub max_tunnels_total: usize,
    /// Requests waiting for one agent's tunnels on this pod.
    pub max_waiting_requests_per_agent: usize,
}

impl Default for ReverseTunnelConfig {
    fn default() -> Self {
        let limits = crate::tunnel::RegistryLimits::default();
        Self {
            routing_timeout: limits.find_timeout,
            max_tunnels_per_agent: limits.max_tunnels_per_agent,
            max_tunnels_total: limits.max_tunnels_total,
            max_waiting_requests_per_agent: limits.max_waiting_per_agent,
        }
    }
}

impl ReverseTunnelConfig {
    pub fn limits(&self) -> crate::tunnel::RegistryLimits {
        crate::tunnel::RegistryLimits {
            max_tunnels_per_agent: self.max_tunnels_per_agent,
            max_tunnels_total: self.max_tunnels_total,
            max_waiting_per_agent: self.max_waiting_requests_per_agent,
            find_timeout: self.routing_timeout,
        }
    }
}

/// The Kubernetes API proxy (`kubectl` → `/k8s-proxy/` → an agent's tunnel), real kas's
/// `agent.kubernetes_api`. Off unless `listen` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesApiConfig {
    /// Where the proxy listens (real kas: `0.0.0.0:8154`); unset: no proxy.
    pub listen: Option<SocketAddr>,
    /// TLS for the listener (both or neither): kubectl sends its bearer token only over
    /// TLS. Behind the edge, which terminates TLS, it is not needed.
    pub certificate_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The path prefix callers use, stripped before the request reaches the cluster
    /// (real kas's `url_path_prefix`, always ending with `/`).
    pub url_path_prefix: String,
    /// How long GitLab's yes to a caller (CI job, user) is reused.
    #[serde(with = "humantime_serde")]
    pub allowed_agent_cache_ttl: Duration,
    /// How long GitLab's no (401/403/404) is reused.
    #[serde(with = "humantime_serde")]
    pub allowed_agent_cache_error_ttl: Duration,
}

impl Default for KubernetesApiConfig {
    fn default() -> Self {
        Self {
            listen: None,
            certificate_file: None,
            key_file: None,
            url_path_prefix: "/".into(),
            allowed_agent_cache_ttl: Duration::from_secs(60),
            allowed_agent_cache_error_ttl: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time between `/readiness` turning 503 and the listener closing: long enough for
    /// health checkers in front of us to stop sending new agents.
    #[serde(with = "humantime_serde")]
    pub readiness_delay: Duration,
    /// How long open streams may continue after the listener closed.
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            readiness_delay: Duration::from_secs(5),
            drain_deadline: Duration::from_secs(30),
        }
    }
}

pub use kas_common::logging::LogConfig;

impl Config {
    /// Reads a TOML file. Unknown keys are errors: a misspelt setting must not be ignored.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text; the error text carries line, column and the offending key.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks what the types cannot express. Called after flags are applied.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let address = self.gitlab.address.trim();
        if address.is_empty() {
            return Err(invalid("gitlab.address", "is required (GitLab's base URL)"));
        }
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            return Err(invalid(
                "gitlab.address",
                format!("must start with http:// or https://, got {address:?}"),
            ));
        }
        if self
            .gitlab
            .authentication_secret_file
            .as_os_str()
            .is_empty()
        {
            return Err(invalid(
                "gitlab.authentication_secret_file",
                "is required (file with the base64 secret shared with GitLab)",
            ));
        }
        if self.agent.listen == self.observability.listen && self.agent.listen.port() != 0 {
            return Err(invalid(
                "observability.listen",
                "must differ from agent.listen: health checks use their own port",
            ));
        }
        for (field, value) in [
            (
                "gitops.max_number_of_paths",
                self.gitops.max_number_of_paths,
            ),
            (
                "gitops.max_number_of_files",
                self.gitops.max_number_of_files,
            ),
            (
                "gitops.max_manifest_file_size",
                self.gitops.max_manifest_file_size,
            ),
            (
                "gitops.max_total_manifest_file_size",
                self.gitops.max_total_manifest_file_size,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be greater than zero"));
            }
        }
        let nonzero: [(&'static str, Duration); 9] = [
            (
                "reverse_tunnel.routing_timeout",
                self.reverse_tunnel.routing_timeout,
            ),
            (
                "kubernetes_api.allowed_agent_cache_ttl",
                self.kubernetes_api.allowed_agent_cache_ttl,
            ),
            ("gitops.poll_interval", self.gitops.poll_interval),
            ("agent.max_connection_age", self.agent.max_connection_age),
            ("gitlab.api_timeout", self.gitlab.api_timeout),
            ("gitlab.auth_cache_ttl", self.gitlab.auth_cache_ttl),
            (
                "agent_configuration.poll_interval",
                self.agent_configuration.poll_interval,
            ),
            ("agent.keepalive_interval", self.agent.keepalive_interval),
            ("shutdown.drain_deadline", self.shutdown.drain_deadline),
        ];
        for (field, value) in nonzero {
            if value.is_zero() {
                return Err(invalid(field, "must be greater than zero"));
            }
        }
        if self.agent_configuration.source == ConfigurationSourceKind::GitlabApi
            && self.agent_configuration.api_token_file.is_none()
        {
            return Err(invalid(
                "agent_configuration.api_token_file",
                "is required with source = \"gitlab_api\": GitLab does not accept agent tokens \
                 on its repository API, so kas needs a token with read_repository \
                 (or use the default source, gitaly)",
            ));
        }
        if self.agent_configuration.max_configuration_file_size == 0 {
            return Err(invalid(
                "agent_configuration.max_configuration_file_size",
                "must be greater than zero",
            ));
        }
        self.gitaly.global_api_rate_limit.validate(
            "gitaly.global_api_rate_limit.refill_rate_per_second",
            "gitaly.global_api_rate_limit.bucket_size",
        )?;
        self.gitaly.per_server_api_rate_limit.validate(
            "gitaly.per_server_api_rate_limit.refill_rate_per_second",
            "gitaly.per_server_api_rate_limit.bucket_size",
        )?;
        self.gitlab.api_rate_limit.validate(
            "gitlab.api_rate_limit.refill_rate_per_second",
            "gitlab.api_rate_limit.bucket_size",
        )?;
        self.observability.validate()?;
        if self.gitaly.call_timeout.is_zero() {
            return Err(invalid("gitaly.call_timeout", "must be greater than zero"));
        }
        if self.gitlab.auth_cache_max_entries == 0 {
            return Err(invalid(
                "gitlab.auth_cache_max_entries",
                "must be at least 1",
            ));
        }
        if self.gitlab.max_concurrent_requests == 0 {
            return Err(invalid(
                "gitlab.max_concurrent_requests",
                "must be at least 1",
            ));
        }
        if self.agent.max_websocket_message_bytes < 16 * 1024 {
            return Err(invalid(
                "agent.max_websocket_message_bytes",
                "must be at least 16384 (one HTTP/2 frame)",
            ));
        }
        let before_auth = self.agent.max_websocket_message_bytes_before_auth;
        if before_auth < 16 * 1024 || before_auth > self.agent.max_websocket_message_bytes {
            return Err(invalid(
                "agent.max_websocket_message_bytes_before_auth",
                "must be at least 16384 (one HTTP/2 frame) and at most \
                 agent.max_websocket_message_bytes",
            ));
        }
        for (field, value) in [
            (
                "reverse_tunnel.max_tunnels_per_agent",
                self.reverse_tunnel.max_tunnels_per_agent,
            ),
            (
                "reverse_tunnel.max_tunnels_total",
                self.reverse_tunnel.max_tunnels_total,
            ),
            (
                "reverse_tunnel.max_waiting_requests_per_agent",
                self.reverse_tunnel.max_waiting_requests_per_agent,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be greater than zero"));
            }
        }
        if self.kubernetes_api.certificate_file.is_some() != self.kubernetes_api.key_file.is_some()
        {
            return Err(invalid(
                "kubernetes_api.certificate_file",
                "certificate_file and key_file go together: set both for TLS, or neither",
            ));
        }
        if !self.kubernetes_api.url_path_prefix.starts_with('/') {
            return Err(invalid(
                "kubernetes_api.url_path_prefix",
                format!(
                    "must start with /, got {:?}",
                    self.kubernetes_api.url_path_prefix
                ),
            ));
        }
        if let Some(listen) = self.kubernetes_api.listen {
            if listen.port() != 0
                && (listen == self.agent.listen || listen == self.observability.listen)
            {
                return Err(invalid(
                    "kubernetes_api.listen",
                    "must differ from agent.listen and observability.listen",
                ));
            }
        }
        if self.agent.connections_per_token_per_minute == 0 {
            return Err(invalid(
                "agent.connections_per_token_per_minute",
                "must be greater than zero",
            ));
        }
        let mut taken = vec![self.agent.listen, self.observability.listen];
        taken.extend(self.kubernetes_api.listen);
        fleet::validate(&self.redis, &self.private_api, &self.api, &taken)?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
    }

    /// The proxy's path prefix as real kas uses it: always ending with `/`.
    pub fn k8s_proxy_prefix(&self) -> String {
        let prefix = &self.kubernetes_api.url_path_prefix;
        if prefix.ends_with('/') {
            prefix.clone()
        } else {
            format!("{prefix}/")
        }
    }

    pub fn external_url(&self) -> &str {
        self.gitlab
            .external_url
            .as_deref()
            .unwrap_or(&self.gitlab.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_names_the_key_and_line() {
        let err = Config::from_toml("[gitlab]\naddress = \"http://x\"\nadress = 1\n").unwrap_err();
        assert!(err.contains("adress"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_duration_names_the_key() {
        let err = Config::from_toml("[shutdown]\ndrain_deadline = \"soon\"\n").unwrap_err();
        assert!(err.contains("drain_deadline"), "{err}");
    }

    #[test]
    fn missing_address_is_reported_by_field() {
        let err = Config::default().validate().unwrap_err().to_string();
        assert!(err.contains("gitlab.address"), "{err}");
    }

    #[test]
    fn full_file_parses() {
        let cfg = Config::from_toml(
            r#"
            [agent]
            listen = "127.0.0.1:9150"
            keepalive_interval = "20s"
            [observability]
            listen = "127.0.0.1:9151"
            [gitlab]
            address = "https://gitlab.example.com"
            authentication_secret_file = "/etc/kas/secret"
            auth_cache_ttl = "1m"
            [agent_configuration]
            poll_interval = "2s"
            [shutdown]
            readiness_delay = "0s"
            drain_deadline = "10s"
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.agent_configuration.poll_interval,
            Duration::from_secs(2)
        );
        assert_eq!(cfg.external_url(), "https://gitlab.example.com");
        assert_eq!(
            cfg.agent_configuration.source,
            ConfigurationSourceKind::Gitaly
        );
    }

    #[test]
    fn the_rest_source_needs_an_api_token() {
        let mut cfg = Config::from_toml(
            "[gitlab]\naddress = \"https://gitlab.example.com\"\nauthentication_secret_file = \"/s\"\n\
             [agent_configuration]\nsource = \"gitlab_api\"\n",
        )
        .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("agent_configuration.api_token_file"), "{err}");
        assert!(err.contains("read_repository"), "{err}");
        cfg.agent_configuration.api_token_file = Some("/token".into());
        cfg.validate().unwrap();
    }

    #[test]
    fn gitaly_limits_are_read_and_checked() {
        let cfg = Config::from_toml(
            "[gitlab]\naddress = \"https://gitlab.example.com\"\nauthentication_secret_file = \"/s\"\n\
             [gitaly]\nglobal_api_rate_limit = { refill_rate_per_second = 5.0, bucket_size = 7 }\n\
             per_server_api_rate_limit = { refill_rate_per_second = 0.0, bucket_size = 1 }\n",
        )
        .unwrap();
        assert_eq!(cfg.gitaly.limits().global_burst, 7);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("gitaly.per_server_api_rate_limit"), "{err}");
    }

    fn valid() -> Config {
        Config::from_toml(
            "[gitlab]\naddress = \"https://gitlab.example.com\"\nauthentication_secret_file = \"/s\"\n",
        )
        .expect("valid")
    }

    #[test]
    fn the_gitlab_api_rate_limit_defaults_to_real_kas_and_bad_values_name_the_key() {
        let cfg = valid();
        assert_eq!(cfg.gitlab.api_rate_limit.refill_rate_per_second, 50.0);
        assert_eq!(cfg.gitlab.api_rate_limit.bucket_size, 250);
        cfg.validate().unwrap();
        for (rate, bucket, key) in [
            (0.0, 10, "gitlab.api_rate_limit.refill_rate_per_second"),
            (-1.0, 10, "gitlab.api_rate_limit.refill_rate_per_second"),
            (f64::NAN, 10, "gitlab.api_rate_limit.refill_rate_per_second"),
            (
                f64::INFINITY,
                10,
                "gitlab.api_rate_limit.refill_rate_per_second",
            ),
            (5.0, 0, "gitlab.api_rate_limit.bucket_size"),
        ] {
            let mut cfg = valid();
            cfg.gitlab.api_rate_limit = RateLimitConfig {
                refill_rate_per_second: rate,
                bucket_size: bucket,
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{rate}/{bucket}: {err}");
        }
        let toml = Config::from_toml(
            "[gitlab]\napi_rate_limit = { refill_rate_per_second = 5.0, bucket_size = 2 }\n",
        )
        .expect("valid");
        assert_eq!(toml.gitlab.api_rate_limit.bucket_size, 2);
    }

    #[test]
    fn a_rate_limit_quota_never_panics_on_extreme_values() {
        for rate in [1e-300, 0.0, -5.0, 1e9, 1e12, f64::INFINITY, f64::NAN] {
            let quota = RateLimitConfig {
                refill_rate_per_second: rate,
                bucket_size: 0,
            }
            .quota();
            assert_eq!(quota.burst_size().get(), 1, "{rate}");
        }
    }

    #[test]
    fn observability_paths_are_checked_and_name_their_key() {
        let cfg = Config::from_toml(
            "[observability.liveness_probe]\nurl_path = \"/-/live\"\n\
             [observability.readiness_probe]\nurl_path = \"/-/ready\"\n",
        )
        .expect("valid");
        assert_eq!(cfg.observability.liveness_probe.url_path, "/-/live");
        assert_eq!(cfg.observability.prometheus.url_path, "/metrics");
        for (liveness, readiness, metrics, key) in [
            ("live", "/readiness", "/metrics", "liveness_probe.url_path"),
            (
                "/liveness",
                "/ready?x=1",
                "/metrics",
                "readiness_probe.url_path",
            ),
            ("/liveness", "/readiness", "/m#top", "prometheus.url_path"),
            (
                "/liveness",
                "/liveness",
                "/metrics",
                "readiness_probe.url_path",
            ),
            (
                "/liveness",
                "/readiness",
                "/readiness",
                "prometheus.url_path",
            ),
            (
                "/liveness",
                "/ready ness",
                "/metrics",
                "readiness_probe.url_path",
            ),
            ("", "/readiness", "/metrics", "liveness_probe.url_path"),
        ] {
            let mut cfg = valid();
            cfg.observability.liveness_probe.url_path = liveness.into();
            cfg.observability.readiness_probe.url_path = readiness.into();
            cfg.observability.prometheus.url_path = metrics.into();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(
                err.contains(&format!("observability.{key}")),
                "{liveness} {readiness} {metrics}: {err}"
            );
        }
    }
}
