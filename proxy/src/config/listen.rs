//! `[listen]`: where the edge accepts connections.

use serde::Deserialize;
use std::net::SocketAddr;

use super::FieldError;

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

impl ListenConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.threads == 0 {
            return Err(FieldError::new("listen.threads", "must be at least 1"));
        }
        let mut addrs = vec![("listen.https", self.https), ("listen.admin", self.admin)];
        if let Some(http) = self.http {
            addrs.push(("listen.http", http));
        }
        for (i, (name, a)) in addrs.iter().enumerate() {
            if let Some((other, _)) = addrs[..i].iter().find(|(_, b)| b == a && a.port() != 0) {
                return Err(FieldError::new(
                    name,
                    format!("{a} is already used by {other}"),
                ));
            }
        }
        Ok(())
    }
}
