//! The global cap on TLS handshakes (`downstream.max_handshakes`) as a short queue, not a
//! wall.
//!
//! After every rollout all agents reconnect at once. Thousands of handshakes then wait for
//! CPU at the same moment: the table of handshakes is full, but it is moving — every
//! millisecond one completes and its slot frees. Refusing the connections over the cap
//! there costs the fleet errors and retries for nothing (3 % of a 5,000-agent storm in
//! `loadtest/bench.sh`, where nginx and HAProxy, which stop accepting at their limit,
//! refused none). So a connection that finds every slot taken waits for one, in arrival
//! order, as long as the table keeps moving.
//!
//! The cap still protects the edge: what holds slots without moving — connections that
//! never finish a handshake, from many addresses — gets the refusal it got before. A full
//! table in which no slot was taken or freed for [`STALL`] while nobody waits is held, not
//! busy: arrivals are refused at once. Once a queue has formed (a storm), its waiters are
//! refused only when the table stops moving for [`QUEUE_STALL`]: on 2 loaded cores a
//! storm's handshakes (the clients' share of the CPU included) complete in bursts with gaps
//! of a few hundred ms, which the shorter bound refused (measured: 228–1,342 of 2,000
//! agents against a cap of 256, `loadtest/edge-ab.sh`). The queue is
//! bounded (`downstream.max_handshake_queue`) and every waiter by its own handshake
//! deadline.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// A full table in which no slot was taken or freed for this long, with nobody waiting,
/// is held by connections that do not progress (an attack), not busy with a storm: an
/// arrival is refused at once. Long against a handshake's CPU cost (about a millisecond),
/// short against an agent's connect timeout.
pub const STALL: Duration = Duration::from_millis(250);

/// With a queue waiting, how long the table may not move before its waiters are refused.
/// A storm's table moves in bursts on loaded cores; a flood's does not move at all.
pub const QUEUE_STALL: Duration = Duration::from_secs(2);

/// How often a waiter looks whether the table still moves.
const WAITER_CHECK: Duration = Duration::from_millis(250);

/// Why a connection got no handshake slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// Every slot is taken and the table has not moved for [`STALL`] (nobody waiting) or
    /// [`QUEUE_STALL`] (with a queue).
    Stalled,
    /// Every slot is taken and the queue is full too.
    QueueFull,
    /// The connection's handshake deadline passed while it waited.
    Deadline,
}

/// Handshake slots shared by every connection on the TLS port.
#[derive(Clone)]
pub struct HandshakeSlots {
    inner: Arc<Inner>,
}

struct Inner {
    slots: Arc<Semaphore>,
    max_waiting: usize,
    waiting: AtomicUsize,
    /// When a slot was last taken or freed, in ms since `epoch`.
    last_moved_ms: AtomicU64,
    epoch: Instant,
    /// Connections waiting for a slot now (`edge_connections_queued_for_handshake`).
    queued: IntGauge,
}

/// A slot held for one handshake; freed (and the table marked as moving) on drop.
pub struct HandshakeSlot {
    _permit: OwnedSemaphorePermit,
    inner: Arc<Inner>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.inner.moved();
    }
}

impl HandshakeSlots {
    /// `max_total` slots (`downstream.max_handshakes`) and at most `max_waiting`
    /// connections waiting for one (`downstream.max_handshake_queue`).
    pub fn new(max_total: usize, max_waiting: usize, queued: IntGauge) -> Self {
        let epoch = Instant::now();
        Self {
            inner: Arc::new(Inner {
                slots: Arc::new(Semaphore::new(max_total.min(Semaphore::MAX_PERMITS))),
                max_waiting,
                waiting: AtomicUsize::new(0),
                last_moved_ms: AtomicU64::new(0),
                epoch,
                queued,
            }),
        }
    }

    /// A slot now, or after waiting in arrival order while the table moves; at the latest
    /// by `deadline`.
    pub async fn take(&self, deadline: Instant) -> Result<HandshakeSlot, NoSlot> {
        let inner = &self.inner;
        if let Ok(permit) = inner.slots.clone().try_acquire_owned() {
            return Ok(inner.slot(permit));
        }
        if inner.waiting.load(Ordering::Acquire) == 0 && inner.still_for(STALL) {
            return Err(NoSlot::Stalled);
        }
        let _waiting = Waiting::enter(inner).ok_or(NoSlot::QueueFull)?;
        // One acquire for the whole wait keeps this connection's place in the queue.
        let acquire = inner.slots.clone().acquire_owned();
        tokio::pin!(acquire);
        loop {
            let check = deadline.min(Instant::now() + WAITER_CHECK);
            tokio::select! {
                permit = &mut acquire => {
                    // The semaphore is never closed.
                    let permit = permit.map_err(|_| NoSlot::Stalled)?;
                    return Ok(inner.slot(permit));
                }
                () = tokio::time::sleep_until(check) => {
                    if Instant::now() >= deadline {
                        return Err(NoSlot::Deadline);
                    }
                    if inner.still_for(QUEUE_STALL) {
                        return Err(NoSlot::Stalled);
                    }
                }
            }
        }
    }

    /// Connections waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn slot(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> HandshakeSlot {
        self.moved();
        HandshakeSlot {
            _permit: permit,
            inner: self.clone(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn moved(&self) {
        self.last_moved_ms
            .fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// No slot taken or freed for longer than `still` (the caller just failed to get one:
    /// every slot is taken).
    fn still_for(&self, still: Duration) -> bool {
        let last = self.last_moved_ms.load(Ordering::Relaxed);
        let still_ms = u64::try_from(still.as_millis()).unwrap_or(u64::MAX);
        self.now_ms().saturating_sub(last) > still_ms
    }
}

/// A place in the queue, given back however the wait ends (including the connection's
/// future being dropped).
struct Waiting<'a>(&'a Inner);

impl<'a> Waiting<'a> {
    fn enter(inner: &'a Inner) -> Option<Self> {
        inner
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < inner.max_waiting).then_some(n + 1)
            })
            .ok()?;
        inner.queued.inc();
        Some(Self(inner))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.queued.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize, queue: usize) -> HandshakeSlots {
        HandshakeSlots::new(n, queue, IntGauge::new("queued", "test").unwrap())
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_that_moves_queues_arrivals_in_order() {
        let slots = slots(1, 8);
        let first = slots.take(far()).await.unwrap();
        let (s2, s3) = (slots.clone(), slots.clone());
        let second = tokio::spawn(async move { s2.take(far()).await.map(|_| Instant::now()) });
        // A gap longer than STALL, shorter than QUEUE_STALL: with a queue formed, an
        // arrival joins it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let third = tokio::spawn(async move { s3.take(far()).await.map(|_| Instant::now()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(slots.waiting(), 2);
        drop(first);
        let second_at = second.await.unwrap().expect("second gets the freed slot");
        // The second's slot was dropped with its task: the third gets it next.
        let third_at = third.await.unwrap().expect("third follows");
        assert!(second_at <= third_at);
        assert_eq!(slots.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_that_does_not_move_refuses() {
        let slots = slots(1, 8);
        let _held = slots.take(far()).await.unwrap();
        // Freshly full: an arrival waits, and is refused once nothing moved for
        // QUEUE_STALL.
        let started = Instant::now();
        assert_eq!(slots.take(far()).await.err(), Some(NoSlot::Stalled));
        assert!(started.elapsed() >= QUEUE_STALL);
        // Held for longer than STALL with nobody waiting: refused at once.
        let started = Instant::now();
        assert_eq!(slots.take(far()).await.err(), Some(NoSlot::Stalled));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_and_each_wait_are_bounded() {
        let slots = slots(1, 1);
        let _held = slots.take(far()).await.unwrap();
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take(far()).await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            slots.take(far()).await.err(),
            Some(NoSlot::QueueFull),
            "one running, one waiting"
        );
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(slots.waiting(), 0, "an abandoned wait gives its place back");
        let soon = Instant::now() + Duration::from_millis(100);
        assert_eq!(slots.take(soon).await.err(), Some(NoSlot::Deadline));
    }
}
