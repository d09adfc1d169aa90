//! One poller per (repository, branch) per pod, shared by every stream that needs that
//! branch's head: a thousand agents of one project cost one Gitaly call per interval, not a
//! thousand. Pollers start with their first subscriber and stop when the last one leaves;
//! their period carries ±10 % jitter so pollers started together drift apart.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// What a poll returns: the head commit (`None`: empty repository) or why there is none.
pub type PollResult<E> = Result<Option<String>, E>;
/// The latest poll result of one key; `None` until the first poll finishes.
pub type HeadState<E> = Option<Arc<PollResult<E>>>;
pub type PollFn<E> =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = PollResult<E>> + Send>> + Send + Sync>;

/// After an error the next poll comes sooner than the interval: 10 s, doubling to 1 min.
const ERROR_BACKOFF_START: Duration = Duration::from_secs(10);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(60);

pub struct HeadPollers<E> {
    interval: Duration,
    pollers: Mutex<HashMap<String, Poller<E>>>,
    stop: CancellationToken,
}

struct Poller<E> {
    tx: watch::Sender<HeadState<E>>,
    /// Polls at once when notified (a push to the project, from GitLab).
    wake: Arc<Notify>,
    /// The project path whose pushes wake it.
    tag: Option<String>,
}

/// `d` ± 10 %.
pub fn jittered(d: Duration) -> Duration {
    let factor = rand::rng().random_range(0.9..=1.1);
    d.mul_f64(factor)
}

impl<E> HeadPollers<E>
where
    E: PartialEq + std::fmt::Display + Send + Sync + 'static,
{
    pub fn new(interval: Duration, stop: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            interval,
            pollers: Mutex::new(HashMap::new()),
            stop,
        })
    }

    /// The poll interval (without jitter).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Number of running pollers.
    pub fn len(&self) -> usize {
        self.pollers.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Joins the poller of `key`, starting it with `poll` if there is none. The receiver
    /// sees the latest result at once and every change after.
    pub fn subscribe(
        self: &Arc<Self>,
        key: &str,
        poll: PollFn<E>,
    ) -> watch::Receiver<HeadState<E>> {
        self.subscribe_tagged(key, None, poll)
    }

    /// Like [`Self::subscribe`]; a push to project `tag` ([`Self::wake`]) makes the poller
    /// poll at once instead of at its next interval.
    pub fn subscribe_tagged(
        self: &Arc<Self>,
        key: &str,
        tag: Option<&str>,
        poll: PollFn<E>,
    ) -> watch::Receiver<HeadState<E>> {
        let mut pollers = self.pollers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pollers.get(key) {
            return p.tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        let wake = Arc::new(Notify::new());
        pollers.insert(
            key.to_owned(),
            Poller {
                tx: tx.clone(),
                wake: wake.clone(),
                tag: tag.map(str::to_owned),
            },
        );
        tokio::spawn(self.clone().run(key.to_owned(), tx, wake, poll));
        rx
    }

    /// Makes every poller tagged `tag` poll now; returns how many there are.
    pub fn wake(&self, tag: &str) -> usize {
        let pollers = self.pollers.lock().unwrap_or_else(|p| p.into_inner());
        let mut woken = 0;
        for p in pollers.values().filter(|p| p.tag.as_deref() == Some(tag)) {
            p.wake.notify_one();
            woken += 1;
        }
        woken
    }

    async fn run(
        self: Arc<Self>,
        key: String,
        tx: watch::Sender<HeadState<E>>,
        wake: Arc<Notify>,
        poll: PollFn<E>,
    ) {
        let mut backoff = ERROR_BACKOFF_START;
        loop {
            let result = tokio::select! {
                r = poll() => r,
                _ = tx.closed() => {
                    if self.remove(&key, &tx, false) {
                        return;
                    }
                    continue;
                }
                _ = self.stop.cancelled() => {
                    self.remove(&key, &tx, true);
                    return;
                }
            };
            let failed = result.is_err();
            tx.send_if_modified(|current| {
                if current.as_deref() == Some(&result) {
                    return false;
                }
                // Logged here, once per key and change, not by each subscribed stream: an
                // outage of the source would otherwise log a line per stream at once.
                let was_failing = matches!(current.as_deref(), Some(Err(_)));
                match &result {
                    Err(e) => tracing::warn!(key = %key, error = %e, "head poll failing; retrying with back-off"),
                    Ok(_) if was_failing => tracing::info!(key = %key, "head poll recovered"),
                    Ok(_) => {}
                }
                *current = Some(Arc::new(result));
                true
            });
            let delay = if failed {
                let d = backoff.min(self.interval);
                backoff = (backoff * 2).min(ERROR_BACKOFF_MAX);
                d
            } else {
                backoff = ERROR_BACKOFF_START;
                self.interval
            };
            tokio::select! {
                _ = tokio::time::sleep(jittered(delay)) => {}
                _ = wake.notified() => {}
                _ = tx.closed() => {}
                _ = self.stop.cancelled() => {
                    self.remove(&key, &tx, true);
                    return;
                }
            }
            if self.remove(&key, &tx, false) {
                return;
            }
        }
    }

    /// Removes the poller when nobody listens any more (or `force`); true if removed. Under
    /// the map's lock, so a subscriber arriving meanwhile keeps the poller alive.
    fn remove(&self, key: &str, tx: &watch::Sender<HeadState<E>>, force: bool) -> bool {
        let mut pollers = self.pollers.lock().unwrap_or_else(|p| p.into_inner());
        if !force && tx.receiver_count() > 0 {
            return false;
        }
        if pollers.get(key).is_some_and(|p| p.tx.same_channel(tx)) {
            pollers.remove(key);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn counting(calls: Arc<AtomicU32>) -> PollFn<String> {
        Arc::new(move || {
            let calls = calls.clone();
            Box::pin(async move {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                Ok(Some(format!("commit-{}", n / 3)))
            })
        })
    }

    #[tokio::test]
    async fn subscribers_share_one_poller_that_stops_when_they_leave() {
        let pollers =
            HeadPollers::<String>::new(Duration::from_millis(20), CancellationToken::new());
        let calls = Arc::new(AtomicU32::new(0));
        let mut receivers: Vec<_> = (0..50)
            .map(|_| pollers.subscribe("repo@main", counting(calls.clone())))
            .collect();
        assert_eq!(pollers.len(), 1);
        for rx in &mut receivers {
            tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.is_some()))
                .await
                .unwrap()
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // ~10 polls in 200 ms at 20 ms, whatever the number of subscribers.
        let n = calls.load(Ordering::SeqCst);
        assert!((2..=20).contains(&n), "{n} polls");
        drop(receivers);
        for _ in 0..100 {
            if pollers.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(pollers.is_empty());
        let after = calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls.load(Ordering::SeqCst), after, "stopped polling");
    }
}
