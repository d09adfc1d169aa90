//! `[policies]` and `[proxy_protocol]`: the operator-edited files and who may send a
//! PROXY header.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

/// The operator-edited files (see `policies/README.md`); each is optional and watched.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoliciesConfig {
    /// IP blocklist, applied at accept before TLS.
    pub blocklist: Option<PathBuf>,
    /// An IP blocklist (same format) in a ConfigMap key, watched through the Kubernetes
    /// API: an edit reaches every replica within about a second. With `blocklist` too, a
    /// client is refused when either list denies it.
    pub blocklist_configmap: Option<BlocklistConfigMap>,
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
            blocklist_configmap: None,
            limits: None,
            rules: None,
            preview: false,
            close_established: true,
        }
    }
}

impl PoliciesConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        match &self.blocklist_configmap {
            Some(configmap) => configmap.validate(),
            None => Ok(()),
        }
    }
}

/// `[policies.blocklist_configmap]`: which ConfigMap key holds the blocklist.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlocklistConfigMap {
    /// Defaults to the edge pod's own namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default = "default_blocklist_key")]
    pub key: String,
    /// A kubeconfig file to reach the API with (an edge outside the cluster, tests);
    /// default: the pod's service account.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

/// The key `kas-edge block` writes when none is named.
pub const DEFAULT_BLOCKLIST_KEY: &str = "blocklist.txt";

fn default_blocklist_key() -> String {
    DEFAULT_BLOCKLIST_KEY.to_owned()
}

impl BlocklistConfigMap {
    fn validate(&self) -> Result<(), FieldError> {
        use super::names;
        const FIELD: &str = "policies.blocklist_configmap";
        if let Some(ns) = &self.namespace {
            names::dns_label(ns).map_err(|why| {
                FieldError::new(&format!("{FIELD}.namespace"), format!("{ns:?}: {why}"))
            })?;
        }
        names::object_name(&self.name).map_err(|why| {
            FieldError::new(&format!("{FIELD}.name"), format!("{:?}: {why}", self.name))
        })?;
        names::configmap_key(&self.key).map_err(|why| {
            FieldError::new(&format!("{FIELD}.key"), format!("{:?}: {why}", self.key))
        })?;
        Ok(())
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

impl ProxyProtocolConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        crate::support::net::TrustedProxies::parse(&self.trusted)
            .map_err(|e| FieldError::new("proxy_protocol.trusted", e.to_string()))?;
        if self.header_timeout.is_zero() {
            return Err(FieldError::new(
                "proxy_protocol.header_timeout",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}
