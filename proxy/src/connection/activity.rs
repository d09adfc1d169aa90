//! Deadlines for connections that wait on their client between requests.
//!
//! Established websocket tunnels and gRPC streams run for hours and are never cut by a
//! timer; a connection with nothing in flight is. HTTP/1: the first request head must be
//! complete within `request_head_timeout` of the handshake, each next one within
//! `keepalive_timeout` of the previous response. HTTP/2: a connection without an open
//! stream (before the first one, or after the last one) lives `h2_idle_timeout`. The
//! clock lives here, around whatever serves requests, so it holds whichever request path
//! runs inside (the edge's own HTTP/2 and HTTP/1.1 servers, or pingora's).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::support::sync::lock;

/// One connection's requests in flight and, when there are none, its deadline.
pub struct Activity {
    base: Instant,
    /// Requests or streams in flight now.
    active: AtomicU32,
    /// Requests or streams started so far (names the stage a timeout cut).
    started: AtomicU32,
    /// Milliseconds after `base` at which an idle connection expires; 0 while busy.
    deadline_ms: AtomicU64,
    /// How long the connection may idle after its last request ended.
    idle: Duration,
    changed: Notify,
}

impl Activity {
    /// A connection that must start its first request within `first`, and may idle `idle`
    /// after each request.
    pub fn new(first: Duration, idle: Duration) -> Arc<Self> {
        let activity = Arc::new(Self {
            base: Instant::now(),
            active: AtomicU32::new(0),
            started: AtomicU32::new(0),
            deadline_ms: AtomicU64::new(0),
            idle,
            changed: Notify::new(),
        });
        activity.set_deadline(first);
        activity
    }

    fn set_deadline(&self, after: Duration) {
        let at = self.base.elapsed() + after;
        // At least 1 ms: 0 means "no deadline".
        let ms = u64::try_from(at.as_millis()).unwrap_or(u64::MAX).max(1);
        self.deadline_ms.store(ms, Ordering::SeqCst);
    }

    /// A request (or HTTP/2 stream) started; the connection is busy until it ends.
    pub fn start(self: &Arc<Self>) -> RequestActivity {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::Relaxed);
        self.deadline_ms.store(0, Ordering::SeqCst);
        RequestActivity(self.clone())
    }

    /// How many requests started on this connection.
    pub fn requests_started(&self) -> u32 {
        self.started.load(Ordering::Relaxed)
    }

    /// Resolves once the connection has been idle past its deadline.
    pub async fn expired(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Register interest before reading the state, so no change is missed.
            notified.as_mut().enable();
            let deadline = self.deadline_ms.load(Ordering::SeqCst);
            if deadline == 0 || self.active.load(Ordering::SeqCst) > 0 {
                notified.await;
                continue;
            }
            let at = self.base + Duration::from_millis(deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {
                    if self.active.load(Ordering::SeqCst) == 0
                        && self.deadline_ms.load(Ordering::SeqCst) == deadline
                    {
                        return;
                    }
                }
                _ = notified => {}
            }
        }
    }
}

/// Held by a request while it runs; its end starts the connection's idle clock.
pub struct RequestActivity(Arc<Activity>);

impl Drop for RequestActivity {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.set_deadline(self.0.idle);
            self.0.changed.notify_one();
        }
    }
}

/// The activity of every connection being served, by socket cookie, so a request can
/// find its connection's clock.
#[derive(Default)]
pub struct ActivityTable {
    by_socket: Mutex<HashMap<u64, Arc<Activity>>>,
}

impl ActivityTable {
    /// Tracks `activity` for the socket until the returned entry is dropped.
    pub fn track(self: &Arc<Self>, socket: u64, activity: Arc<Activity>) -> TrackedActivity {
        lock(&self.by_socket).insert(socket, activity);
        TrackedActivity {
            table: self.clone(),
            socket,
        }
    }

    /// Marks a request started on the connection with socket cookie `socket`.
    pub fn request_started(&self, socket: Option<u64>) -> Option<RequestActivity> {
        let activity = lock(&self.by_socket).get(&socket?)?.clone();
        Some(activity.start())
    }
}

/// Removes its connection from the [`ActivityTable`] when dropped.
pub struct TrackedActivity {
    table: Arc<ActivityTable>,
    socket: u64,
}

impl Drop for TrackedActivity {
    fn drop(&mut self) {
        lock(&self.table.by_socket).remove(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire_busy_ones_never() {
        let activity = Activity::new(Duration::from_secs(10), Duration::from_secs(60));
        // Before the first request: the first deadline.
        let first = tokio::time::timeout(Duration::from_secs(11), activity.expired()).await;
        assert!(first.is_ok(), "expired 10 s after the start");

        let activity = Activity::new(Duration::from_secs(10), Duration::from_secs(60));
        let request = activity.start();
        // A request in flight for hours: never expires.
        let busy = tokio::time::timeout(Duration::from_secs(7200), activity.expired()).await;
        assert!(busy.is_err(), "a busy connection does not expire");
        drop(request);
        let idle = tokio::time::timeout(Duration::from_secs(59), activity.expired()).await;
        assert!(idle.is_err(), "the idle clock starts when the request ends");
        let idle = tokio::time::timeout(Duration::from_secs(2), activity.expired()).await;
        assert!(idle.is_ok(), "expired 60 s after the last request");
        assert_eq!(activity.requests_started(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_request_stops_the_idle_clock() {
        let activity = Activity::new(Duration::from_secs(10), Duration::from_secs(5));
        drop(activity.start());
        tokio::time::sleep(Duration::from_secs(4)).await;
        let _second = activity.start();
        let busy = tokio::time::timeout(Duration::from_secs(30), activity.expired()).await;
        assert!(busy.is_err());
    }
}
