//! `[downstream]`: the agents' connections to the edge.

use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

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
    /// From accept (after a PROXY header) to the end of the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// HTTP/1: from the end of the TLS handshake to the complete first request head
    /// (a websocket upgrade request included). HTTP/2: to the first stream (at most
    /// `h2_idle_timeout`).
    #[serde(with = "humantime_serde")]
    pub request_head_timeout: Duration,
    /// HTTP/1: from the end of one response to the complete head of the next request.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// HTTP/2: how long a connection may have no open stream (agents always hold one, and
    /// ping every 55 s; a few minutes is safe).
    #[serde(with = "humantime_serde")]
    pub h2_idle_timeout: Duration,
    /// Connections in their TLS handshake from all clients together.
    pub max_handshakes: usize,
    /// Connections waiting for one of those slots (a reconnect storm queues instead of
    /// being refused; `listener/handshake_slots.rs`). A waiting connection holds a socket
    /// and a small task, no TLS state yet.
    pub max_handshake_queue: usize,
    /// Request line (or pseudo-headers) plus header names and values, in bytes; larger
    /// requests are refused with 431 (gRPC: RESOURCE_EXHAUSTED) and never reach a pod.
    /// Agents send well under 1 KiB; the default leaves room for proxies and tracing.
    pub max_request_header_bytes: usize,
    /// Connections in their TLS handshake from one client (its `[keys]` prefix: an IPv4
    /// address, an IPv6 /64 by default).
    pub max_handshakes_per_client: usize,
}

impl Default for DownstreamConfig {
    fn default() -> Self {
        Self {
            tcp_keepalive: Duration::from_secs(60),
            max_connection_age: None,
            max_connection_age_jitter: 0.1,
            read_buffer: 0,
            write_buffer: 0,
            handshake_timeout: Duration::from_secs(10),
            request_head_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            h2_idle_timeout: Duration::from_secs(180),
            max_handshakes: 4096,
            max_handshake_queue: 16384,
            max_handshakes_per_client: 64,
            max_request_header_bytes: 32 * 1024,
        }
    }
}

impl DownstreamConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.max_connection_age.is_some_and(|a| a.is_zero()) {
            return Err(FieldError::new(
                "downstream.max_connection_age",
                "must be greater than zero (omit it to disable)",
            ));
        }
        super::positive("downstream.handshake_timeout", self.handshake_timeout)?;
        super::positive("downstream.request_head_timeout", self.request_head_timeout)?;
        super::positive("downstream.keepalive_timeout", self.keepalive_timeout)?;
        super::positive("downstream.h2_idle_timeout", self.h2_idle_timeout)?;
        if self.max_handshakes == 0 {
            return Err(FieldError::new(
                "downstream.max_handshakes",
                "must be at least 1",
            ));
        }
        if self.max_handshakes_per_client == 0 {
            return Err(FieldError::new(
                "downstream.max_handshakes_per_client",
                "must be at least 1",
            ));
        }
        if self.max_request_header_bytes < 1024 {
            return Err(FieldError::new(
                "downstream.max_request_header_bytes",
                "must be at least 1024 (an agent's request head is several hundred bytes)",
            ));
        }
        if !(0.0..=1.0).contains(&self.max_connection_age_jitter) {
            return Err(FieldError::new(
                "downstream.max_connection_age_jitter",
                "must be between 0 and 1",
            ));
        }
        Ok(())
    }
}
