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
    pub fn validate(&self) -> Result<(), FieldError> {
        match self {
            DiscoveryConfig::Static { endpoints } if endpoints.is_empty() => Err(FieldError::new(
                "discovery.endpoints",
                "list at least one kas pod address (ip:port)",
            )),
            DiscoveryConfig::Dns { name, interval, .. } => {
                if name.trim().is_empty() {
                    return Err(FieldError::new("discovery.name", "must not be empty"));
                }
                if interval.is_zero() {
                    return Err(FieldError::new(
                        "discovery.interval",
                        "must be greater than zero",
                    ));
                }
                Ok(())
            }
            DiscoveryConfig::Kubernetes { service, .. } if service.trim().is_empty() => {
                Err(FieldError::new("discovery.service", "must not be empty"))
            }
            _ => Ok(()),
        }
    }
}
