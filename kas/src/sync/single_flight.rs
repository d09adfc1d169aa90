//! One call at a time per key: callers asking for a key whose call is running wait for its
//! result instead of starting their own (a reconnect storm of one agent's streams makes one
//! GitLab lookup, one Gitaly read).
//!
//! The table is keyed by what clients send, so an entry must never outlive its callers: it
//! leaves with the last caller waiting on it, also when that caller is cancelled (a stream
//! that closes mid-lookup). A cancelled first caller does not fail the others: the next
//! one still waiting runs the call itself.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OnceCell;

type Flight<V> = Arc<OnceCell<V>>;

pub struct SingleFlight<K, V> {
    flights: Mutex<HashMap<K, Flight<V>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    pub fn new() -> Self {
        Self {
            flights: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Flight<V>>> {
        self.flights.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `work`'s result for `key`, run here unless a call for `key` is already running (then
    /// its result); `true` when this caller ran `work`.
    pub async fn run<F, Fut>(&self, key: &K, work: F) -> (V, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let flight = self.lock().entry(key.clone()).or_default().clone();
        let _leave = Leave {
            table: self,
            key,
            flight: &flight,
        };
        let mut ran = false;
        let value = flight
            .get_or_init(|| {
                ran = true;
                work()
            })
            .await
            .clone();
        (value, ran)
    }

    /// Calls running now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

/// Removes the key's entry when its last caller leaves, finished or cancelled.
struct Leave<'a, K: Hash + Eq, V> {
    table: &'a SingleFlight<K, V>,
    key: &'a K,
    flight: &'a Flight<V>,
}

impl<K: Hash + Eq, V> Drop for Leave<'_, K, V> {
    fn drop(&mut self) {
        let mut flights = self.table.flights.lock().unwrap_or_else(|p| p.into_inner());
        // The table's reference and this caller's: nobody else waits on it.
        let last = Arc::strong_count(self.flight) <= 2;
        if last
            && flights
                .get(self.key)
                .is_some_and(|f| Arc::ptr_eq(f, self.flight))
        {
            flights.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_the_entry_leaves_with_them() {
        let flights = Arc::new(SingleFlight::<String, u32>::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let callers = (0..50).map(|_| {
            let (flights, runs) = (flights.clone(), runs.clone());
            tokio::spawn(async move {
                flights
                    .run(&"k".to_owned(), || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        7
                    })
                    .await
            })
        });
        let results = futures_util::future::join_all(callers).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let ran: usize = results
            .into_iter()
            .map(|r| {
                let (value, ran) = r.unwrap();
                assert_eq!(value, 7);
                usize::from(ran)
            })
            .sum();
        assert_eq!(ran, 1);
        assert_eq!(flights.len(), 0, "no entry outlives its callers");
    }

    #[tokio::test]
    async fn a_cancelled_caller_leaves_no_entry_and_does_not_fail_the_others() {
        let flights = Arc::new(SingleFlight::<u32, u32>::new());
        // Alone and cancelled mid-call: the entry goes with it.
        let lone = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run(&1, || async {
                        std::future::pending::<()>().await;
                        0
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(flights.len(), 1);
        lone.abort();
        let _ = lone.await;
        assert_eq!(flights.len(), 0, "a cancelled caller's entry leaked");

        // First caller cancelled while a second waits: the second runs the call itself.
        let first = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run(&2, || async {
                        std::future::pending::<()>().await;
                        0
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run(&2, || async { 5 }).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        let (value, ran) = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the waiting caller finishes")
            .unwrap();
        assert_eq!((value, ran), (5, true));
        assert_eq!(flights.len(), 0);
    }
}
