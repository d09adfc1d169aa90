//! Open-loop timing: the k-th event of a run is due at a fixed time, whatever happened to
//! the ones before, so a slow system under test shows up as lag and latency instead of
//! quietly lowering the rate. The ramp, the churn and the request stream all pace this way.

use tokio::time::{sleep_until, Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `rate` events per second from `begin`.
pub(crate) struct Schedule {
    begin: Instant,
    rate: f64,
}

impl Schedule {
    pub(crate) fn new(begin: Instant, rate: f64) -> Self {
        Self { begin, rate }
    }

    /// Sleeps until event `k` is due and returns when that was; `None` if `stop` came
    /// first.
    pub(crate) async fn wait(&self, k: u64, stop: &CancellationToken) -> Option<Instant> {
        let due = self.begin + Duration::from_secs_f64(k as f64 / self.rate);
        tokio::select! {
            _ = sleep_until(due) => Some(due),
            _ = stop.cancelled() => None,
        }
    }
}
