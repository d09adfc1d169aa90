//! `[discovery]`: how kas pods are found.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

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

impl DiscoveryConfig {
    /// Names and addresses that could never work: a typo fails `check` and start-up with
    /// the field named, instead of leaving the edge unready with an endless retry loop.
    pub fn validate(&self) -> Result<(), FieldError> {
        use super::names;
        match self {
            DiscoveryConfig::Static { endpoints } => {
                if endpoints.is_empty() {
                    return Err(FieldError::new(
                        "discovery.endpoints",
                        "list at least one kas pod address (ip:port)",
                    ));
                }
                if let Some(bad) = endpoints
                    .iter()
                    .find(|e| e.port() == 0 || e.ip().is_unspecified())
                {
                    return Err(FieldError::new(
                        "discovery.endpoints",
                        format!("{bad} is not a pod address (port 0 or unspecified IP)"),
                    ));
                }
                Ok(())
            }
            DiscoveryConfig::Dns {
                name,
                port,
                interval,
            } => {
                names::dns_name(name)
                    .map_err(|why| FieldError::new("discovery.name", format!("{name:?}: {why}")))?;
                if *port == 0 {
                    return Err(FieldError::new("discovery.port", "must not be 0"));
                }
                if interval.is_zero() {
                    return Err(FieldError::new(
                        "discovery.interval",
                        "must be greater than zero",
                    ));
                }
                Ok(())
            }
            DiscoveryConfig::Kubernetes {
                namespace,
                service,
                port_name,
                port,
            } => {
                names::service_name(service).map_err(|why| {
                    FieldError::new("discovery.service", format!("{service:?}: {why}"))
                })?;
                if let Some(ns) = namespace {
                    names::dns_label(ns).map_err(|why| {
                        FieldError::new("discovery.namespace", format!("{ns:?}: {why}"))
                    })?;
                }
                if let Some(name) = port_name {
                    names::dns_label(name).map_err(|why| {
                        FieldError::new(
                            "discovery.port_name",
                            format!("{name:?}: {why} (leave it unset to select by port)"),
                        )
                    })?;
                }
                if *port == Some(0) {
                    return Err(FieldError::new("discovery.port", "must not be 0"));
                }
                Ok(())
            }
        }
    }
}
