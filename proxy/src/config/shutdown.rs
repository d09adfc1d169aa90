//! `[shutdown]`: how the edge drains.

use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

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
    /// Open tunnels and HTTP/2 connections are closed at random moments within this
    /// fraction of `drain_deadline` after the listeners close, so thousands of agents do
    /// not all reconnect in the same second. 0: they stay until the deadline.
    pub close_spread: f64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            readiness_delay: Duration::from_secs(5),
            drain_deadline: Duration::from_secs(60),
            close_spread: 0.8,
        }
    }
}

impl ShutdownConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        super::positive("shutdown.drain_deadline", self.drain_deadline)?;
        if !(0.0..=1.0).contains(&self.close_spread) {
            return Err(FieldError::new(
                "shutdown.close_spread",
                "must be between 0 and 1",
            ));
        }
        Ok(())
    }
}
