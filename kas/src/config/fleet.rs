//! The settings of a kas fleet: Redis (which pod holds which agent's tunnels, connected
//! agents, push events, per-token limits), the private API pods reach each other on, and
//! the API port GitLab calls. All off by default: a single kas needs none of them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError};

/// How kas reaches Redis: `tcp` (host:port) or `unix` (a socket path), as real kas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisNetwork {
    #[default]
    Tcp,
    Unix,
}

/// Redis behind Sentinel (real kas's `redis.sentinel`): the master of `master_name` as the
/// sentinels at `addresses` name it, asked again after every failure (a failover).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelConfig {
    pub master_name: String,
    /// `host:port` of each sentinel.
    pub addresses: Vec<String>,
    /// The sentinels' own password, if they have one.
    pub password_file: Option<PathBuf>,
}

/// Real kas's `redis` section. Without `address` (or `sentinel`) there is no Redis: tunnels are found on
/// this pod only, connected agents are not tracked, per-token limits are the edge's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `host:port` (real kas's `redis.server.address`), or a socket path with `network = "unix"`.
    pub address: Option<String>,
    /// Instead of `address`: the master the sentinels name.
    pub sentinel: Option<SentinelConfig>,
    pub network: RedisNetwork,
    pub username: Option<String>,
    /// File holding the password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    pub database: i64,
    /// TLS to Redis (real kas's `redis.tls.enabled`), verified against the system's roots or
    /// `ca_certificate_file`; a client certificate with `certificate_file` + `key_file`.
    pub tls: bool,
    pub ca_certificate_file: Option<PathBuf>,
    pub certificate_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Prefix of every key (real kas: `gitlab-kas`). Pub/sub channels are not prefixed.
    pub key_prefix: String,
    /// Connecting may take this long.
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// One command (or one MULTI/EXEC) may take this long; then it counts as failed.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// How long a pod's entries (tunnels, connected agents) live in Redis unless refreshed
    /// (real kas's `agent.redis_conn_info_ttl`, 300 s).
    #[serde(with = "humantime_serde")]
    pub conn_info_ttl: Duration,
    /// How often they are refreshed (`agent.redis_conn_info_refresh`, 240 s).
    #[serde(with = "humantime_serde")]
    pub conn_info_refresh: Duration,
    /// How often expired connected-agent entries are removed (`agent.redis_conn_info_gc`, 600 s).
    #[serde(with = "humantime_serde")]
    pub conn_info_gc: Duration,
}

impl RedisConfig {
    /// Whether kas uses Redis (a server address or sentinels).
    pub fn enabled(&self) -> bool {
        self.address.is_some() || self.sentinel.is_some()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            address: None,
            sentinel: None,
            network: RedisNetwork::Tcp,
            username: None,
            password_file: None,
            database: 0,
            tls: false,
            ca_certificate_file: None,
            certificate_file: None,
            key_file: None,
            key_prefix: "gitlab-kas".into(),
            dial_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(2),
            conn_info_ttl: Duration::from_secs(300),
            conn_info_refresh: Duration::from_secs(240),
            conn_info_gc: Duration::from_secs(600),
        }
    }
}

/// Real kas's `private_api`: other kas pods reach this pod's tunnels here (`:8155`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivateApiConfig {
    /// Where it listens (real kas: 8155); unset: no private API.
    pub listen: Option<SocketAddr>,
    /// Base64 secret (32 bytes) every kas pod shares; JWTs with issuer and audience
    /// `gitlab-kas` are signed with it.
    pub authentication_secret_file: PathBuf,
    /// The URL other pods use for this one (`grpc://10.0.0.7:8155`). Unset: from
    /// `OWN_PRIVATE_API_URL`, or `OWN_PRIVATE_API_CIDR` (+ `OWN_PRIVATE_API_SCHEME`,
    /// `OWN_PRIVATE_API_PORT`), or `listen` when it names one address.
    pub own_url: Option<String>,
    /// How long another pod's connection may live before it is asked to reconnect.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// TLS for the private API (both or neither): this pod's certificate and key. Pods
    /// then advertise `grpcs://` URLs.
    pub certificate_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The CA other pods' certificates are checked against (default: the system's roots).
    pub ca_certificate_file: Option<PathBuf>,
    /// The name other pods' certificates are checked for (real kas's
    /// `OWN_PRIVATE_API_HOST`, which overrides it): pods are dialled by IP, so their
    /// certificates carry one shared name.
    pub tls_server_name: Option<String>,
}

impl Default for PrivateApiConfig {
    fn default() -> Self {
        Self {
            listen: None,
            authentication_secret_file: PathBuf::new(),
            own_url: None,
            max_connection_age: Duration::from_secs(2 * 3600),
            certificate_file: None,
            key_file: None,
            ca_certificate_file: None,
            tls_server_name: None,
        }
    }
}

/// Real kas's `api`: GitLab calls it (`:8153`): connected agents, push notifications.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Where it listens (real kas: 8153); unset: no API port.
    pub listen: Option<SocketAddr>,
    /// Base64 secret (32 bytes) GitLab signs its JWTs (audience `gitlab-kas`) with.
    pub authentication_secret_file: PathBuf,
    /// TLS for the API port (both or neither), for GitLab's `grpcs://` internal URL.
    pub certificate_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: None,
            authentication_secret_file: PathBuf::new(),
            certificate_file: None,
            key_file: None,
        }
    }
}

pub(super) fn validate(
    redis: &RedisConfig,
    private_api: &PrivateApiConfig,
    api: &ApiConfig,
    taken: &[SocketAddr],
) -> Result<(), ConfigError> {
    if let Some(address) = &redis.address {
        if address.trim().is_empty() {
            return Err(invalid("redis.address", "must not be empty when set"));
        }
        if redis.network == RedisNetwork::Tcp && !address.contains(':') {
            return Err(invalid(
                "redis.address",
                format!("must be host:port with network = \"tcp\", got {address:?}"),
            ));
        }
    }
    if let Some(sentinel) = &redis.sentinel {
        if redis.address.is_some() {
            return Err(invalid(
                "redis.sentinel",
                "set either redis.address or redis.sentinel, not both",
            ));
        }
        if sentinel.master_name.is_empty() {
            return Err(invalid("redis.sentinel.master_name", "is required"));
        }
        if sentinel.addresses.is_empty() || sentinel.addresses.iter().any(|a| !a.contains(':')) {
            return Err(invalid(
                "redis.sentinel.addresses",
                "needs at least one sentinel, each host:port",
            ));
        }
        if redis.ca_certificate_file.is_some() || redis.certificate_file.is_some() {
            return Err(invalid(
                "redis.ca_certificate_file",
                "is not supported with redis.sentinel (TLS with the system's roots is)",
            ));
        }
    }
    if redis.certificate_file.is_some() != redis.key_file.is_some() {
        return Err(invalid(
            "redis.certificate_file",
            "certificate_file and key_file go together (a client certificate), or neither",
        ));
    }
    if !redis.tls && (redis.ca_certificate_file.is_some() || redis.certificate_file.is_some()) {
        return Err(invalid(
            "redis.tls",
            "must be true when redis.ca_certificate_file or redis.certificate_file is set",
        ));
    }
    if redis.tls && redis.network == RedisNetwork::Unix {
        return Err(invalid("redis.tls", "TLS needs network = \"tcp\""));
    }
    if redis.key_prefix.is_empty() {
        return Err(invalid("redis.key_prefix", "must not be empty"));
    }
    for (field, value) in [
        ("redis.dial_timeout", redis.dial_timeout),
        ("redis.operation_timeout", redis.operation_timeout),
        ("redis.conn_info_ttl", redis.conn_info_ttl),
        ("redis.conn_info_refresh", redis.conn_info_refresh),
        ("redis.conn_info_gc", redis.conn_info_gc),
        (
            "private_api.max_connection_age",
            private_api.max_connection_age,
        ),
    ] {
        if value.is_zero() {
            return Err(invalid(field, "must be greater than zero"));
        }
    }
    if redis.conn_info_refresh >= redis.conn_info_ttl {
        return Err(invalid(
            "redis.conn_info_refresh",
            "must be shorter than redis.conn_info_ttl, or entries expire between refreshes",
        ));
    }
    if let Some(listen) = private_api.listen {
        if private_api
            .authentication_secret_file
            .as_os_str()
            .is_empty()
        {
            return Err(invalid(
                "private_api.authentication_secret_file",
                "is required with private_api.listen (base64 secret shared by the kas pods)",
            ));
        }
        if !redis.enabled() {
            return Err(invalid(
                "redis.address",
                "is required with private_api.listen: pods find each other's tunnels in Redis",
            ));
        }
        if listen.port() != 0 && taken.contains(&listen) {
            return Err(invalid(
                "private_api.listen",
                "must differ from the other listeners",
            ));
        }
    }
    for (field, cert, key) in [
        (
            "private_api.certificate_file",
            &private_api.certificate_file,
            &private_api.key_file,
        ),
        ("api.certificate_file", &api.certificate_file, &api.key_file),
    ] {
        if cert.is_some() != key.is_some() {
            return Err(invalid(
                field,
                "certificate_file and key_file go together: set both for TLS, or neither",
            ));
        }
    }
    if let Some(url) = &private_api.own_url {
        if !(url.starts_with("grpc://") || url.starts_with("grpcs://")) {
            return Err(invalid(
                "private_api.own_url",
                format!("must start with grpc:// or grpcs://, got {url:?}"),
            ));
        }
    }
    if let Some(listen) = api.listen {
        if api.authentication_secret_file.as_os_str().is_empty() {
            return Err(invalid(
                "api.authentication_secret_file",
                "is required with api.listen (base64 secret GitLab signs its calls with)",
            ));
        }
        if listen.port() != 0 && (taken.contains(&listen) || Some(listen) == private_api.listen) {
            return Err(invalid(
                "api.listen",
                "must differ from the other listeners",
            ));
        }
    }
    Ok(())
}
