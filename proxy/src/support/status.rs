//! Whether a source the edge follows (kas pod discovery, the blocklist ConfigMap) has
//! produced a first result, and whether its last attempt worked: `/readyz` waits for the
//! first, a pair of metrics shows the second.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::sync::lock;

pub struct SourceStatus {
    /// What the source is, for logs and `/readyz` ("discovery", "blocklist ConfigMap
    /// kas/kas-edge-blocklist"): "waiting for the first {what} result".
    what: String,
    synced: AtomicBool,
    /// Why the source is not producing results, while it is not.
    last_error: Mutex<Option<String>>,
    up: prometheus::IntGauge,
    errors: prometheus::IntCounter,
}

impl SourceStatus {
    /// Not synced yet; reports into `up` (1 while the last attempt worked) and `errors`.
    pub fn new(
        what: impl Into<String>,
        up: prometheus::IntGauge,
        errors: prometheus::IntCounter,
    ) -> Self {
        up.set(0);
        Self {
            what: what.into(),
            synced: AtomicBool::new(false),
            last_error: Mutex::new(None),
            up,
            errors,
        }
    }

    /// The source produced a result (possibly empty).
    pub fn succeeded(&self) {
        if !self.synced.swap(true, Ordering::SeqCst) {
            tracing::info!("{} produced its first result", self.what);
        }
        self.up.set(1);
        *lock(&self.last_error) = None;
    }

    /// The source failed to produce a result; `reason` is kept for `/readyz`.
    pub fn failed(&self, reason: impl std::fmt::Display) {
        self.up.set(0);
        self.errors.inc();
        *lock(&self.last_error) = Some(reason.to_string());
    }

    /// True once the source has produced a first result; it stays true (a later failure
    /// keeps the last result, and the metrics show it).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// `Err` with what `/readyz` says until the first result.
    pub fn readiness(&self) -> Result<(), String> {
        if self.is_synced() {
            return Ok(());
        }
        Err(match self.last_error() {
            Some(why) => format!("waiting for the first {} result: {why}", self.what),
            None => format!("waiting for the first {} result", self.what),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_after_the_first_result_and_stays_so() {
        let up = prometheus::IntGauge::new("up", "up").unwrap();
        let errors = prometheus::IntCounter::new("errors", "errors").unwrap();
        let status = SourceStatus::new("discovery", up.clone(), errors.clone());
        assert_eq!(
            status.readiness(),
            Err("waiting for the first discovery result".into())
        );
        status.failed("403 Forbidden");
        assert_eq!(
            status.readiness(),
            Err("waiting for the first discovery result: 403 Forbidden".into())
        );
        assert_eq!((up.get(), errors.get()), (0, 1));
        status.succeeded();
        assert_eq!((status.readiness(), up.get()), (Ok(()), 1));
        status.failed("gone");
        assert!(
            status.readiness().is_ok(),
            "a later failure keeps the last result"
        );
        assert_eq!(status.last_error().as_deref(), Some("gone"));
        assert_eq!((up.get(), errors.get()), (0, 2));
    }
}
