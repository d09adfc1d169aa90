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
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            readiness_delay: Duration::from_secs(5),
            drain_deadline: Duration::from_secs(60),
        }
    }
}

impl ShutdownConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        super::positive("shutdown.drain_deadline", self.drain_deadline)
    }
}
