//! `[public_http]`: limits of the plain listener at `listen.http` (usually `:80`).
//!
//! That listener faces the internet and only ever answers a few bytes (a redirect, a
//! health line, an ACME key authorization), so every connection is small, short and
//! counted: a flood of them is refused at accept and never reaches the control plane,
//! which runs on a runtime of its own.

use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

/// Far more than a `:80` listener needs, and low enough for any semaphore.
const MAX_CONNECTIONS: usize = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublicHttpConfig {
    /// Connections open at once on the listener; more are closed at accept.
    pub max_connections: usize,
    /// Connections open at once from one client (an IPv4 address or IPv6 /64, as
    /// `[keys]` in limits.toml sets for every per-client limit); more are closed at accept.
    pub max_connections_per_ip: usize,
    /// Time for a request's headers to arrive, also the longest idle wait between
    /// requests on a kept-alive connection.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Total life of a connection, whatever it is doing (sending slowly, not reading):
    /// then it is closed.
    #[serde(with = "humantime_serde")]
    pub max_connection_lifetime: Duration,
    /// Worker threads of the listener's own runtime (never the control plane's).
    pub threads: usize,
}

impl Default for PublicHttpConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_ip: 16,
            header_timeout: Duration::from_secs(5),
            max_connection_lifetime: Duration::from_secs(15),
            threads: 1,
        }
    }
}

impl PublicHttpConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            return Err(FieldError::new(
                "public_http.max_connections",
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        if self.max_connections_per_ip == 0 {
            return Err(FieldError::new(
                "public_http.max_connections_per_ip",
                "must be at least 1",
            ));
        }
        super::positive("public_http.header_timeout", self.header_timeout)?;
        super::positive(
            "public_http.max_connection_lifetime",
            self.max_connection_lifetime,
        )?;
        if self.header_timeout > self.max_connection_lifetime {
            return Err(FieldError::new(
                "public_http.header_timeout",
                "must not exceed public_http.max_connection_lifetime",
            ));
        }
        if !(1..=64).contains(&self.threads) {
            return Err(FieldError::new(
                "public_http.threads",
                "must be between 1 and 64",
            ));
        }
        Ok(())
    }
}
