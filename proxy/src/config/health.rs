//! `[health]`: active checks of each pod's observability port.

use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

/// Active checks of each pod's observability port, like a GKE BackendConfig healthCheck.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// kas serves its readiness probe on its observability port, not the traffic port.
    pub port: u16,
    /// kas's `observability.readiness_probe.url_path` (both default to `/readiness`).
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive passes before a pod gets traffic (also for new pods).
    pub healthy_threshold: u32,
    /// Consecutive failures before a pod stops getting new traffic.
    pub unhealthy_threshold: u32,
    /// After a failed connect or reset, the pod gets no new traffic for this long.
    #[serde(with = "humantime_serde")]
    pub passive_backoff: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            port: 8151,
            path: "/readiness".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
            passive_backoff: Duration::from_secs(5),
        }
    }
}

impl HealthConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        if !self.path.starts_with('/') {
            return Err(FieldError::new("health.path", "must start with /"));
        }
        super::positive("health.interval", self.interval)?;
        super::positive("health.timeout", self.timeout)?;
        if self.timeout > self.interval {
            return Err(FieldError::new(
                "health.timeout",
                "must not exceed health.interval",
            ));
        }
        super::at_least_one("health.healthy_threshold", self.healthy_threshold)?;
        super::at_least_one("health.unhealthy_threshold", self.unhealthy_threshold)?;
        Ok(())
    }
}
