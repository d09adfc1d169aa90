//! `[upstream]`: how the edge talks to kas pods.

use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Concurrent gRPC streams per HTTP/2 connection to a pod, at most: a pod may allow
    /// fewer (kas allows 200); a stream that finds every connection full opens another.
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

/// The most streams a pod connection may carry: its flow-control window is every stream's
/// window added up (256 KiB each, and one for a probe), which HTTP/2 caps at 2^31 - 1.
pub const MAX_H2_STREAMS: usize = 8190;

impl UpstreamConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        super::positive("upstream.connect_timeout", self.connect_timeout)?;
        super::positive("upstream.h2_ping_interval", self.h2_ping_interval)?;
        super::positive("upstream.upgrade_timeout", self.upgrade_timeout)?;
        super::at_least_one("upstream.max_connect_attempts", self.max_connect_attempts)?;
        if self.max_h2_streams == 0 || self.max_h2_streams > MAX_H2_STREAMS {
            return Err(FieldError::new(
                "upstream.max_h2_streams",
                format!("must be from 1 to {MAX_H2_STREAMS}"),
            ));
        }
        Ok(())
    }
}
