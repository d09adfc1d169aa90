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
