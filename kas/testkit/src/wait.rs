//! Bounded waits.

use std::future::Future;
use std::time::Duration;

/// The bound of one step of a test that waits on the system: a pod turning healthy, a
/// message arriving.
pub const STEP: Duration = Duration::from_secs(15);

/// How often [`eventually`] asks again.
pub const POLL: Duration = Duration::from_millis(25);

/// Waits until `f` answers true, asking every [`POLL`]; panics naming `what` when `timeout`
/// passes first.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("timed out waiting for: {what}");
}
