//! GitLab's answers kept for a while, one call per key at a time: a cache whose entries
//! expire after their own time to live, bounded in entries, with the lookups of a key
//! coalesced ([`SingleFlight`]). Keys come from clients (token digests), so the table has a
//! hard bound; when it is full of live entries the tenth expiring first is dropped at once
//! — forgetting is safe (GitLab is asked again), growing without bound is not, and clearing
//! everything would send every caller back to GitLab together.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::single_flight::SingleFlight;

/// When the cache is full of live entries, this share of them is dropped at once, so
/// eviction costs a scan per tenth of the capacity, not per insert.
const EVICT_FRACTION: usize = 10;

/// How a lookup was answered (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// From the cache.
    Cached,
    /// By a lookup this caller ran.
    Looked,
    /// By a lookup another caller was running.
    Coalesced,
}

pub struct TtlCache<K, V> {
    max_entries: usize,
    entries: Mutex<HashMap<K, (Instant, V)>>,
    in_flight: SingleFlight<K, V>,
}

impl<K: Hash + Eq + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(max_entries: usize) -> Self {
        Self {
            max_entries: max_entries.max(1),
            entries: Mutex::new(HashMap::new()),
            in_flight: SingleFlight::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, (Instant, V)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live cached value of `key`.
    pub fn get(&self, key: &K) -> Option<V> {
        let now = Instant::now();
        self.lock()
            .get(key)
            .filter(|(expires, _)| *expires > now)
            .map(|(_, v)| v.clone())
    }

    /// Keeps `value` for `ttl` (nothing for a zero TTL).
    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.lock();
        if entries.len() >= self.max_entries && !entries.contains_key(&key) {
            entries.retain(|_, (expires, _)| *expires > now);
            if entries.len() >= self.max_entries {
                let mut expiries: Vec<Instant> = entries.values().map(|(e, _)| *e).collect();
                let cut = (expiries.len() / EVICT_FRACTION).max(1) - 1;
                let (_, threshold, _) = expiries.select_nth_unstable(cut);
                let threshold = *threshold;
                entries.retain(|_, (expires, _)| *expires > threshold);
            }
        }
        entries.insert(key, (now + ttl, value));
    }

    /// The cached value, else `lookup`'s (run once for every caller asking meanwhile),
    /// kept for `ttl_of(&value)`.
    pub async fn get_or_lookup<F, Fut>(
        &self,
        key: &K,
        lookup: F,
        ttl_of: impl Fn(&V) -> Duration,
    ) -> (V, Answered)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        if let Some(v) = self.get(key) {
            return (v, Answered::Cached);
        }
        let (value, ran) = self
            .in_flight
            .run(key, || async {
                let value = lookup().await;
                self.insert(key.clone(), value.clone(), ttl_of(&value));
                value
            })
            .await;
        let answered = if ran {
            Answered::Looked
        } else {
            Answered::Coalesced
        };
        (value, answered)
    }

    /// Entries held, live or expired (for tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_are_kept_for_their_ttl_and_looked_up_once() {
        let cache: TtlCache<u32, Result<u32, ()>> = TtlCache::new(10);
        let ttl = |v: &Result<u32, ()>| {
            if v.is_ok() {
                Duration::from_secs(60)
            } else {
                Duration::ZERO
            }
        };
        let (v, how) = cache.get_or_lookup(&1, || async { Ok(7) }, ttl).await;
        assert_eq!((v, how), (Ok(7), Answered::Looked));
        let (v, how) = cache.get_or_lookup(&1, || async { Ok(8) }, ttl).await;
        assert_eq!((v, how), (Ok(7), Answered::Cached));
        let (v, _) = cache.get_or_lookup(&2, || async { Err(()) }, ttl).await;
        assert_eq!(v, Err(()));
        assert!(cache.get(&2).is_none(), "a zero TTL keeps nothing");
    }

    #[test]
    fn a_full_cache_drops_the_entries_expiring_first() {
        let cache: TtlCache<u32, u32> = TtlCache::new(20);
        for k in 0..20 {
            cache.insert(k, k, Duration::from_secs(100 + u64::from(k)));
        }
        cache.insert(99, 99, Duration::from_secs(500));
        assert!(cache.len() <= 20);
        assert!(cache.get(&0).is_none(), "the first to expire left");
        assert_eq!(cache.get(&19), Some(19));
        assert_eq!(cache.get(&99), Some(99));
    }
}
