//! The edge's configuration: one TOML file, one typed structure, validated at load so
//! that a bad value stops the edge (or `kas-edge check`) with the file, line and field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// toml's message names the line, column and key.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    pub listen: ListenConfig,
    pub tls: TlsConfig,
    pub discovery: DiscoveryConfig,
    pub health: HealthConfig,
    pub upstream: UpstreamConfig,
    pub downstream: DownstreamConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub policies: PoliciesConfig,
    pub proxy_protocol: ProxyProtocolConfig,
}

/// The operator-edited files (see `policies/README.md`); each is optional and watched.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoliciesConfig {
    /// IP blocklist, applied at accept before TLS.
    pub blocklist: Option<PathBuf>,
    /// Rate and connection limits (TOML).
    pub limits: Option<PathBuf>,
    /// Header deny rules (TOML).
    pub rules: Option<PathBuf>,
    /// Count and log blocklist matches without blocking anyone.
    pub preview: bool,
    /// When an edit newly blocks a client, close its established connections too.
    pub close_established: bool,
}

impl Default for PoliciesConfig {
    fn default() -> Self {
        Self {
            blocklist: None,
            limits: None,
            rules: None,
            preview: false,
            close_established: true,
        }
    }
}

/// PROXY protocol (v1/v2) from an L4 load balancer, so the real client address survives.
/// Honoured only from `trusted` source ranges; empty disables it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyProtocolConfig {
    pub trusted: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl Default for ProxyProtocolConfig {
    fn default() -> Self {
        Self {
            trusted: Vec::new(),
            header_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// The public TLS listener agents connect to.
    pub https: SocketAddr,
    /// Plain HTTP: health and ACME paths, everything else redirected to https. Optional.
    pub http: Option<SocketAddr>,
    /// The edge's own `/healthz`, `/readyz`, `/metrics`.
    pub admin: SocketAddr,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Let the proxy's worker threads steal each other's tasks (pingora's default). Off,
    /// each thread runs its own connections start to finish: fewer cross-thread wake-ups
    /// per request, at the price of imbalance when a few connections carry most work.
    pub work_stealing: bool,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            https: ([0, 0, 0, 0], 443).into(),
            http: Some(([0, 0, 0, 0], 80).into()),
            admin: ([0, 0, 0, 0], 8081).into(),
            threads: 2,
            work_stealing: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificates, chosen by SNI from their names; the first is the default. Empty:
    /// a self-signed certificate for `hosts` is generated at start (development only).
    pub certificates: Vec<CertificateConfig>,
    /// Public host names of the edge (e.g. `kas.gitlab.com`), used for a generated certificate.
    pub hosts: Vec<String>,
    /// Where a generated certificate is written, so clients can be told to trust it.
    pub self_signed_dir: Option<PathBuf>,
    /// Obtain and renew the certificate from an ACME CA (HTTP-01 on `listen.http`).
    pub acme: Option<crate::acme::AcmeConfig>,
    /// `host:port` of the replica that runs ACME (its `listen.http`): HTTP-01 challenges
    /// this replica cannot answer are relayed there, since the CA's validation request may
    /// reach any replica through the load balancer.
    pub acme_challenge_relay: Option<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            certificates: Vec::new(),
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            self_signed_dir: None,
            acme: None,
            acme_challenge_relay: None,
        }
    }
}

/// How kas pods are found. Every source yields pod IP:port pairs; traffic goes there
/// directly, never through a Service's virtual IP.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DiscoveryConfig {
    /// A fixed list of pod addresses.
    Static { endpoints: Vec<SocketAddr> },
    /// A headless Service's DNS name, re-resolved (A and AAAA) at `interval`.
    Dns {
        name: String,
        port: u16,
        #[serde(default = "default_dns_interval", with = "humantime_serde")]
        interval: Duration,
    },
    /// EndpointSlices of a Service, watched through the Kubernetes API (in-cluster).
    Kubernetes {
        #[serde(default)]
        namespace: Option<String>,
        service: String,
        #[serde(default)]
        port_name: Option<String>,
        #[serde(default)]
        port: Option<u16>,
    },
}

fn default_dns_interval() -> Duration {
    Duration::from_secs(5)
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig::Static {
            endpoints: Vec::new(),
        }
    }
}

/// Active checks of each pod's observability port, like a GKE BackendConfig healthCheck.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// kas serves `/readiness` on its observability port, not the traffic port.
    pub port: u16,
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive passes before a pod gets traffic (also for new pods).
    pub healthy_threshold: u32,
    /// Consecutive failures before a pod stops getting new traffic.
    pub unhealthy_threshold: u32,
    /// After a failed connect or reset, the pod gets no new traffic for this long.
    #[serde(with = "humantime_serde")]
    pub passive_backoff: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            port: 8151,
            path: "/readiness".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
            passive_backoff: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Concurrent gRPC streams per upstream HTTP/2 connection (pingora's default is 1).
    pub max_h2_streams: usize,
    /// HTTP/2 PINGs find dead pods without an idle timeout on healthy streams.
    #[serde(with = "humantime_serde")]
    pub h2_ping_interval: Duration,
    /// TCP keepalive idle time towards pods.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// How many pods a request may try when connecting fails.
    pub max_connect_attempts: u32,
    /// How long a pod may take to answer a websocket upgrade before the agent gets a 502.
    #[serde(with = "humantime_serde")]
    pub upgrade_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            max_h2_streams: 256,
            h2_ping_interval: Duration::from_secs(30),
            tcp_keepalive: Duration::from_secs(60),
            max_connect_attempts: 3,
            upgrade_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownstreamConfig {
    /// TCP keepalive idle time towards agents: how dead peers are found, since no idle
    /// timeout may cut a healthy agent connection.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// Close connections after this age (plus jitter) so agents rebalance after a
    /// scale-out. Off by default: it cuts streams that are open at that moment.
    #[serde(default, with = "humantime_serde")]
    pub max_connection_age: Option<Duration>,
    /// Up to this fraction of `max_connection_age` is added at random per connection.
    pub max_connection_age_jitter: f64,
    /// Bytes of read buffer below TLS on each agent connection. pingora's default (64 KiB)
    /// would be most of an idle agent connection's memory; rustls pulls records through in
    /// small reads anyway, so 0 (unbuffered) costs a few more syscalls on busy connections.
    pub read_buffer: usize,
    /// Bytes of write buffer below TLS per agent connection. pingora's default (one MSS)
    /// coalesces small writes; measured here it made no difference to requests/s, and 0
    /// (each flush goes straight out) saves that much memory per idle agent.
    pub write_buffer: usize,
}

impl Default for DownstreamConfig {
    fn default() -> Self {
        Self {
            tcp_keepalive: Duration::from_secs(60),
            max_connection_age: None,
            max_connection_age_jitter: 0.1,
            read_buffer: 0,
            write_buffer: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Between `/readyz` turning 503 and the listeners closing: time for the load
    /// balancer in front to stop sending new connections.
    #[serde(with = "humantime_serde")]
    pub readiness_delay: Duration,
    /// How long open websockets and streams may continue after the listeners closed.
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            readiness_delay: Duration::from_secs(5),
            drain_deadline: Duration::from_secs(60),
        }
    }
}

/// `[log]`: the same section as kas's, so both binaries log alike.
pub use kas::config::LogConfig;

impl EdgeConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: EdgeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.validate(path)?;
        Ok(config)
    }

    /// Relative file names are taken relative to the configuration file, so a config and
    /// its `policies/` can move together.
    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for cert in &mut self.tls.certificates {
            resolve(&mut cert.cert);
            resolve(&mut cert.key);
        }
        if let Some(dir) = &mut self.tls.self_signed_dir {
            resolve(dir);
        }
        if let Some(acme) = &mut self.tls.acme {
            resolve(&mut acme.cache_dir);
            if let Some(ca) = &mut acme.directory_ca {
                resolve(ca);
            }
        }
        for file in [
            &mut self.policies.blocklist,
            &mut self.policies.limits,
            &mut self.policies.rules,
        ]
        .into_iter()
        .flatten()
        {
            resolve(file);
        }
    }

    /// Checks what types cannot; `path` only labels the errors.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            message,
        };
        if self.listen.threads == 0 {
            return Err(invalid("listen.threads", "must be at least 1".into()));
        }
        let mut addrs = vec![
            ("listen.https", self.listen.https),
            ("listen.admin", self.listen.admin),
        ];
        if let Some(http) = self.listen.http {
            addrs.push(("listen.http", http));
        }
        for (i, (name, a)) in addrs.iter().enumerate() {
            if let Some((other, _)) = addrs[..i].iter().find(|(_, b)| b == a && a.port() != 0) {
                return Err(invalid(name, format!("{a} is already used by {other}")));
            }
        }
        if self.tls.acme.is_some() {
            if !self.tls.certificates.is_empty() {
                return Err(invalid(
                    "tls.acme",
                    "use either tls.certificates or tls.acme, not both".into(),
                ));
            }
            if self.listen.http.is_none() {
                return Err(invalid(
                    "listen.http",
                    "required with tls.acme: HTTP-01 challenges are answered there".into(),
                ));
            }
        }
        if let Some(relay) = &self.tls.acme_challenge_relay {
            let port = relay
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p != 0) {
                return Err(invalid(
                    "tls.acme_challenge_relay",
                    format!("{relay:?} is not host:port (e.g. \"kas-edge-acme:80\")"),
                ));
            }
            if self.listen.http.is_none() {
                return Err(invalid(
                    "listen.http",
                    "required with tls.acme_challenge_relay: challenges arrive there".into(),
                ));
            }
        }
        if self.tls.certificates.is_empty() && self.tls.hosts.is_empty() {
            return Err(invalid(
                "tls.hosts",
                "needed to generate a certificate when tls.certificates is empty".into(),
            ));
        }
        match &self.discovery {
            DiscoveryConfig::Static { endpoints } if endpoints.is_empty() => {
                return Err(invalid(
                    "discovery.endpoints",
                    "list at least one kas pod address (ip:port)".into(),
                ))
            }
            DiscoveryConfig::Dns { name, interval, .. } => {
                if name.trim().is_empty() {
                    return Err(invalid("discovery.name", "must not be empty".into()));
                }
                if interval.is_zero() {
                    return Err(invalid(
                        "discovery.interval",
                        "must be greater than zero".into(),
                    ));
                }
            }
            DiscoveryConfig::Kubernetes { service, .. } if service.trim().is_empty() => {
                return Err(invalid("discovery.service", "must not be empty".into()))
            }
            _ => {}
        }
        if !self.health.path.starts_with('/') {
            return Err(invalid("health.path", "must start with /".into()));
        }
        for (field, value) in [
            ("health.interval", self.health.interval),
            ("health.timeout", self.health.timeout),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.h2_ping_interval", self.upstream.h2_ping_interval),
            ("upstream.upgrade_timeout", self.upstream.upgrade_timeout),
            ("shutdown.drain_deadline", self.shutdown.drain_deadline),
        ] {
            if value.is_zero() {
                return Err(invalid(field, "must be greater than zero".into()));
            }
        }
        if self.health.timeout > self.health.interval {
            return Err(invalid(
                "health.timeout",
                "must not exceed health.interval".into(),
            ));
        }
        for (field, value) in [
            ("health.healthy_threshold", self.health.healthy_threshold),
            (
                "health.unhealthy_threshold",
                self.health.unhealthy_threshold,
            ),
            (
                "upstream.max_connect_attempts",
                self.upstream.max_connect_attempts,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1".into()));
            }
        }
        if self
            .downstream
            .max_connection_age
            .is_some_and(|a| a.is_zero())
        {
            return Err(invalid(
                "downstream.max_connection_age",
                "must be greater than zero (omit it to disable)".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.downstream.max_connection_age_jitter) {
            return Err(invalid(
                "downstream.max_connection_age_jitter",
                "must be between 0 and 1".into(),
            ));
        }
        if self.upstream.max_h2_streams == 0 {
            return Err(invalid(
                "upstream.max_h2_streams",
                "must be at least 1".into(),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EdgeConfig, String> {
        let config: EdgeConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config
            .validate(Path::new("edge.toml"))
            .map_err(|e| e.to_string())?;
        Ok(config)
    }

    const MINIMAL: &str = "[discovery]\nkind = \"static\"\nendpoints = [\"127.0.1.1:8150\"]\n";

    #[test]
    fn minimal_static_config() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.health.port, 8151);
        assert_eq!(c.upstream.max_h2_streams, 256);
    }

    #[test]
    fn errors_name_line_and_field() {
        let err = parse(&format!("{MINIMAL}[health]\nintervall = \"1s\"\n")).unwrap_err();
        assert!(err.contains("intervall") && err.contains("line 5"), "{err}");
        let err = parse(&format!("{MINIMAL}[health]\ntimeout = \"9s\"\n")).unwrap_err();
        assert!(err.contains("health.timeout"), "{err}");
        let err = parse("[discovery]\nkind = \"static\"\nendpoints = []\n").unwrap_err();
        assert!(err.contains("discovery.endpoints"), "{err}");
        let err = parse("[discovery]\nkind = \"consul\"\n").unwrap_err();
        assert!(err.contains("consul"), "{err}");
    }

    #[test]
    fn acme_challenge_relay_must_be_host_and_port() {
        let with = |relay: &str| {
            format!("[listen]\nhttp = \"127.0.0.1:8080\"\n[tls]\nacme_challenge_relay = \"{relay}\"\n{MINIMAL}")
        };
        assert!(parse(&with("kas-edge-acme:80")).is_ok());
        assert!(parse(&with("10.0.0.7:8080")).is_ok());
        for bad in ["kas-edge-acme", ":80", "kas-edge-acme:http", "x:0"] {
            let err = parse(&with(bad)).unwrap_err();
            assert!(err.contains("tls.acme_challenge_relay"), "{bad}: {err}");
        }
    }

    #[test]
    fn dns_and_kubernetes_sources() {
        let c =
            parse("[discovery]\nkind = \"dns\"\nname = \"kas.gitlab.svc\"\nport = 8150\n").unwrap();
        assert!(
            matches!(c.discovery, DiscoveryConfig::Dns { interval, .. } if interval == Duration::from_secs(5))
        );
        let c =
            parse("[discovery]\nkind = \"kubernetes\"\nservice = \"kas\"\nport_name = \"agent\"\n")
                .unwrap();
        assert!(matches!(c.discovery, DiscoveryConfig::Kubernetes { .. }));
    }
}
