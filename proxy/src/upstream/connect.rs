//! Connecting a request to a pod: pick the least-loaded pod, connect, and when the pod
//! cannot be reached keep new traffic off it (passive back-off, counted in
//! `edge_upstream_connect_failures_total`) and try another, up to
//! `upstream.max_connect_attempts` pods. What "connect" means is the caller's: open an
//! h2c stream, dial a TCP connection, do a websocket handshake.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;

use prometheus::IntCounterVec;

use super::pool::{Pod, PodGuard, Pool};

/// How a failed connect is treated.
pub trait ConnectFailure: Display {
    /// The pod did not take the connection: it gets no new traffic for the passive back-off.
    fn pod_unreachable(&self) -> bool;
    /// Nothing reached the pod, so another pod may take the request.
    fn may_try_another(&self) -> bool;
}

/// What connecting to a pod means for one request path.
pub trait Connect {
    /// What a successful connect gives (a stream, a connection, a pod's answer).
    type Connected;
    type Error: ConnectFailure;
    /// Connects to `pod` (on the port the request's route goes to).
    fn connect(
        &mut self,
        pod: &Arc<Pod>,
    ) -> impl Future<Output = Result<Self::Connected, Self::Error>> + Send;
}

/// Why no pod took the request.
pub enum Unconnected<E> {
    /// No pod takes new traffic.
    NoPod,
    /// The last pod tried failed with `E`, which ends the attempts; its slot is held.
    Failed(PodGuard, E),
}

/// Picks pods and connects to them, moving on when one cannot be reached.
pub struct PodConnector {
    pool: Arc<Pool>,
    failures: IntCounterVec,
    max_attempts: u32,
}

impl PodConnector {
    /// `failures` is `edge_upstream_connect_failures_total` (by pod).
    pub fn new(pool: Arc<Pool>, failures: IntCounterVec, max_attempts: u32) -> Self {
        Self {
            pool,
            failures,
            max_attempts,
        }
    }

    /// How many pods a request may try.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Picks a pod and connects to it `how` the caller does until one connects, a failure ends the
    /// attempts, or `attempts` (pods tried for this request so far, counted up here)
    /// reaches the limit. Returns the pod's slot with what `connect` produced.
    pub async fn connect<C: Connect>(
        &self,
        attempts: &mut u32,
        how: &mut C,
    ) -> Result<(PodGuard, C::Connected), Unconnected<C::Error>> {
        loop {
            *attempts += 1;
            let guard = self.pool.pick().ok_or(Unconnected::NoPod)?;
            match how.connect(guard.pod()).await {
                Ok(connected) => return Ok((guard, connected)),
                Err(e) if self.failed(guard.pod(), *attempts, &e) => {}
                Err(e) => return Err(Unconnected::Failed(guard, e)),
            }
        }
    }

    /// Records a failed connect to `pod`, the `attempts`-th pod tried for the request, and
    /// says whether another pod may be tried.
    pub fn failed(&self, pod: &Pod, attempts: u32, error: &impl ConnectFailure) -> bool {
        if error.pod_unreachable() {
            self.pool.mark_failed(pod);
            self.failures.with_label_values(&[&pod.label]).inc();
        }
        let again = error.may_try_another() && attempts < self.max_attempts;
        if again {
            tracing::debug!(pod = %pod.label, error = %error, "trying another pod");
        }
        again
    }
}
