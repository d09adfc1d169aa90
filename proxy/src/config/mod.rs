//! The edge's configuration: one TOML file, one typed structure, validated at load so
//! that a bad value stops the edge (or `kas-edge check`) with the file, line and field.

mod acme;
mod discovery;
mod downstream;
mod health;
mod listen;
pub(crate) mod names;
mod policies;
mod public_http;
mod shutdown;
mod tls;
mod upstream;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use acme::{AcmeConfig, AcmeConfigError, LETS_ENCRYPT_PRODUCTION, LETS_ENCRYPT_STAGING};
pub use discovery::DiscoveryConfig;
pub use downstream::DownstreamConfig;
pub use health::HealthConfig;
pub use listen::ListenConfig;
pub use policies::{
    BlocklistConfigMap, PoliciesConfig, ProxyProtocolConfig, DEFAULT_BLOCKLIST_KEY,
};
pub use public_http::PublicHttpConfig;
pub use shutdown::ShutdownConfig;
pub use tls::{CertificateConfig, TlsConfig};
pub use upstream::{PathRoute, UpstreamConfig};

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
    pub public_http: PublicHttpConfig,
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

/// `[log]`: the same section as kas's, so both binaries log alike.
pub use kas_common::logging::LogConfig;

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
        let kubeconfig = self
            .policies
            .blocklist_configmap
            .as_mut()
            .and_then(|c| c.kubeconfig.as_mut());
        for file in [
            &mut self.policies.blocklist,
            &mut self.policies.limits,
            &mut self.policies.rules,
        ]
        .into_iter()
        .flatten()
        .chain(kubeconfig)
        {
            resolve(file);
        }
    }

    /// Checks what types cannot, section by section; `path` only labels the errors.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        self.validate_sections().map_err(|e| e.in_file(path))
    }

    fn validate_sections(&self) -> Result<(), FieldError> {
        self.listen.validate()?;
        self.public_http.validate()?;
        self.tls.validate(self.listen.http.is_some())?;
        self.discovery.validate()?;
        self.health.validate()?;
        self.upstream.validate()?;
        self.downstream.validate()?;
        self.shutdown.validate()?;
        self.policies.validate()?;
        self.proxy_protocol.validate()?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| FieldError::new("log.level", e.to_string()))?;
        Ok(())
    }
}

/// A value that fails validation, before it is placed in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }

    fn in_file(self, path: &Path) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_owned(),
            field: self.field,
            message: self.message,
        }
    }
}

fn positive(field: &str, value: Duration) -> Result<(), FieldError> {
    if value.is_zero() {
        return Err(FieldError::new(field, "must be greater than zero"));
    }
    Ok(())
}

fn at_least_one(field: &str, value: u32) -> Result<(), FieldError> {
    if value == 0 {
        return Err(FieldError::new(field, "must be at least 1"));
    }
    Ok(())
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

    const TLS: &str = "[tls]\nself_signed = true\n";
    const STATIC: &str = "[discovery]\nkind = \"static\"\nendpoints = [\"127.0.1.1:8150\"]\n";

    fn minimal() -> String {
        format!("{TLS}{STATIC}")
    }

    /// The field named by the error of `text` (after the TLS section), or panics.
    fn field_of(text: &str) -> String {
        let err = parse(&format!("{TLS}{text}")).unwrap_err();
        let field = err
            .split("field `")
            .nth(1)
            .and_then(|rest| rest.split('`').next())
            .unwrap_or_else(|| panic!("no field in {err:?}"));
        field.to_owned()
    }

    #[test]
    fn minimal_static_config() {
        let c = parse(&minimal()).unwrap();
        assert_eq!(c.health.port, 8151);
        assert_eq!(c.upstream.max_h2_streams, 256);
        assert_eq!(c.public_http.max_connections, 1024);
        assert_eq!(c.public_http.max_connections_per_ip, 16);
    }

    #[test]
    fn errors_name_line_and_field() {
        let minimal = minimal();
        let err = parse(&format!("{minimal}[health]\nintervall = \"1s\"\n")).unwrap_err();
        assert!(err.contains("intervall") && err.contains("line 7"), "{err}");
        let err = parse(&format!("{minimal}[health]\ntimeout = \"9s\"\n")).unwrap_err();
        assert!(err.contains("health.timeout"), "{err}");
        let err = parse(&format!(
            "{TLS}[discovery]\nkind = \"static\"\nendpoints = []\n"
        ))
        .unwrap_err();
        assert!(err.contains("discovery.endpoints"), "{err}");
        let err = parse("[discovery]\nkind = \"consul\"\n").unwrap_err();
        assert!(err.contains("consul"), "{err}");
    }

    #[test]
    fn a_certificate_source_is_required_and_unique() {
        // No certificates, no ACME, no explicit self-signed: an error, not a silent
        // self-signed certificate in production.
        let err = parse(STATIC).unwrap_err();
        assert!(err.contains("field `tls.certificates`"), "{err}");
        let both = format!(
            "[tls]\nself_signed = true\n[[tls.certificates]]\ncert = \"a\"\nkey = \"b\"\n{STATIC}"
        );
        assert!(parse(&both).unwrap_err().contains("tls.self_signed"));
        let no_hosts = format!("[tls]\nself_signed = true\nhosts = []\n{STATIC}");
        assert!(parse(&no_hosts).unwrap_err().contains("tls.hosts"));
        let stray_dir = format!(
            "[tls]\nself_signed_dir = \"d\"\n[[tls.certificates]]\ncert = \"a\"\nkey = \"b\"\n{STATIC}"
        );
        assert!(parse(&stray_dir)
            .unwrap_err()
            .contains("tls.self_signed_dir"));
        let files = format!("[[tls.certificates]]\ncert = \"a\"\nkey = \"b\"\n{STATIC}");
        assert!(parse(&files).is_ok());
    }

    #[test]
    fn the_upgrade_socket_is_an_absolute_unix_socket_path() {
        let with = |value: &str| format!("{}[shutdown]\nupgrade_socket = {value:?}\n", minimal());
        let default = parse(&minimal()).unwrap();
        assert_eq!(
            default.shutdown.upgrade_socket,
            std::path::Path::new(shutdown::DEFAULT_UPGRADE_SOCKET)
        );
        let set = parse(&with("/run/kas-edge/upgrade.sock")).unwrap();
        assert_eq!(
            set.shutdown.own_listeners_socket(),
            std::path::Path::new("/run/kas-edge/upgrade.sock.listeners")
        );
        let too_long = format!("/{}", "a".repeat(100));
        for bad in ["upgrade.sock", "/run/kas-edge/", too_long.as_str()] {
            let err = parse(&with(bad)).unwrap_err();
            assert!(err.contains("shutdown.upgrade_socket"), "{bad}: {err}");
        }
    }

    #[test]
    fn acme_challenge_relay_must_be_host_and_port() {
        let with = |relay: &str| {
            format!("[listen]\nhttp = \"127.0.0.1:8080\"\n[tls]\nself_signed = true\nacme_challenge_relay = \"{relay}\"\n{STATIC}")
        };
        assert!(parse(&with("kas-edge-acme:80")).is_ok());
        assert!(parse(&with("10.0.0.7:8080")).is_ok());
        for bad in ["kas-edge-acme", ":80", "kas-edge-acme:http", "x:0"] {
            let err = parse(&with(bad)).unwrap_err();
            assert!(err.contains("tls.acme_challenge_relay"), "{bad}: {err}");
        }
    }

    #[test]
    fn downstream_request_head_bound() {
        let with = |body: &str| field_of(&format!("{STATIC}[downstream]\n{body}\n"));
        assert_eq!(
            with("max_request_header_bytes = 100"),
            "downstream.max_request_header_bytes"
        );
        let ok = parse(&format!(
            "{}[downstream]\nmax_request_header_bytes = 65536\n",
            minimal()
        ))
        .unwrap();
        assert_eq!(ok.downstream.max_request_header_bytes, 65536);
        assert_eq!(
            parse(&minimal())
                .unwrap()
                .downstream
                .max_request_header_bytes,
            32 * 1024
        );
    }

    #[test]
    fn public_http_limits() {
        let with = |body: &str| field_of(&format!("{STATIC}[public_http]\n{body}\n"));
        assert_eq!(with("max_connections = 0"), "public_http.max_connections");
        assert_eq!(
            with("max_connections_per_ip = 0"),
            "public_http.max_connections_per_ip"
        );
        assert_eq!(
            with("header_timeout = \"0s\""),
            "public_http.header_timeout"
        );
        assert_eq!(
            with("max_connection_lifetime = \"2s\"\nheader_timeout = \"3s\""),
            "public_http.header_timeout"
        );
        assert_eq!(with("threads = 0"), "public_http.threads");
        let ok = parse(&format!(
            "{}[public_http]\nmax_connections = 10\nmax_connections_per_ip = 2\n",
            minimal()
        ))
        .unwrap();
        assert_eq!(ok.public_http.max_connections, 10);
    }

    #[test]
    fn dns_and_kubernetes_sources() {
        let c = parse(&format!(
            "{TLS}[discovery]\nkind = \"dns\"\nname = \"kas.gitlab.svc\"\nport = 8150\n"
        ))
        .unwrap();
        assert!(
            matches!(c.discovery, DiscoveryConfig::Dns { interval, .. } if interval == Duration::from_secs(5))
        );
        let c = parse(&format!(
            "{TLS}[discovery]\nkind = \"kubernetes\"\nservice = \"kas\"\nport_name = \"agent\"\n"
        ))
        .unwrap();
        assert!(matches!(c.discovery, DiscoveryConfig::Kubernetes { .. }));
    }

    #[test]
    fn blocklist_configmap() {
        let c = parse(&format!(
            "{}[policies.blocklist_configmap]\nname = \"kas-edge-blocklist\"\n",
            minimal()
        ))
        .unwrap();
        let cm = c.policies.blocklist_configmap.unwrap();
        assert_eq!(cm.key, "blocklist.txt");
        assert_eq!(cm.namespace, None);
        let with =
            |body: &str| field_of(&format!("{STATIC}[policies.blocklist_configmap]\n{body}\n"));
        assert_eq!(with("name = \"Kas\""), "policies.blocklist_configmap.name");
        assert_eq!(
            with("name = \"b\"\nnamespace = \"KAS\""),
            "policies.blocklist_configmap.namespace"
        );
        assert_eq!(
            with("name = \"b\"\nkey = \"a/b\""),
            "policies.blocklist_configmap.key"
        );
        let err = parse(&format!(
            "{}[policies.blocklist_configmap]\nnamespace = \"kas\"\n",
            minimal()
        ))
        .unwrap_err();
        assert!(err.contains("name"), "{err}");
    }

    #[test]
    fn discovery_names_must_be_valid() {
        let k8s = |extra: &str| {
            field_of(&format!(
                "[discovery]\nkind = \"kubernetes\"\nnamespace = \"kas\"\nservice = \"kas\"\n{extra}"
            ))
        };
        let k8s_bad = |line: &str| {
            // Later keys in a TOML table may not repeat earlier ones: rebuild the table.
            field_of(&format!("[discovery]\nkind = \"kubernetes\"\n{line}"))
        };
        assert_eq!(k8s_bad("service = \"Kas\""), "discovery.service");
        assert_eq!(k8s_bad("service = \"kas_svc\""), "discovery.service");
        assert_eq!(k8s_bad("service = \"1kas\""), "discovery.service");
        assert_eq!(
            k8s_bad(&format!("service = \"{}\"", "k".repeat(64))),
            "discovery.service"
        );
        assert_eq!(
            k8s_bad("service = \"kas\"\nnamespace = \"Kas-NS\""),
            "discovery.namespace"
        );
        assert_eq!(k8s("port_name = \"\""), "discovery.port_name");
        assert_eq!(k8s("port_name = \"Agent Port\""), "discovery.port_name");
        assert_eq!(k8s("port = 0"), "discovery.port");

        let dns = |name: &str| {
            field_of(&format!(
                "[discovery]\nkind = \"dns\"\nname = \"{name}\"\nport = 8150\n"
            ))
        };
        for bad in [
            "",
            "kas..svc",
            "kas.svc:8150",
            "-kas.svc",
            "kas svc",
            "http://kas",
        ] {
            assert_eq!(dns(bad), "discovery.name", "{bad:?}");
        }
        let long_label = format!("{}.svc", "a".repeat(64));
        assert_eq!(dns(&long_label), "discovery.name");
        for good in [
            "kas",
            "kas.gitlab.svc.cluster.local.",
            "_grpc.kas",
            "10.0.0.1",
        ] {
            let text =
                format!("{TLS}[discovery]\nkind = \"dns\"\nname = \"{good}\"\nport = 8150\n");
            assert!(parse(&text).is_ok(), "{good:?}");
        }
        assert_eq!(
            field_of("[discovery]\nkind = \"dns\"\nname = \"kas\"\nport = 0\n"),
            "discovery.port"
        );
        assert_eq!(
            field_of("[discovery]\nkind = \"static\"\nendpoints = [\"0.0.0.0:8150\"]\n"),
            "discovery.endpoints"
        );
        assert_eq!(
            field_of("[discovery]\nkind = \"static\"\nendpoints = [\"10.0.0.1:0\"]\n"),
            "discovery.endpoints"
        );
    }
}
