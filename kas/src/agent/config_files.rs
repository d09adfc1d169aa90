//! Agent configuration files by (repository, commit, path): read from the source once, kept
//! for every stream that needs the same file.
//!
//! A file at a commit never changes, so a cached copy never goes stale; the head pollers
//! say when a newer commit exists. Without this, every stream of one agent (agentk runs
//! several replicas, and all of them reconnect after a pod restart) reads the file itself,
//! and with Gitaly's rate limit (15/s per server in real kas) a reconnect storm of a few
//! thousand streams waits minutes for files that are all the same.
//!
//! Reads are single-flight: streams asking for a file that is being read wait for that read
//! instead of starting their own. Failures are shared with those waiters but not kept: the
//! next ask reads again. The cache is bounded by the bytes it holds; the least recently
//! used files leave first.

use std::future::Future;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::sources::ConfigSourceError;
use crate::sync::single_flight::SingleFlight;

/// A file's content, `None` when the agent has no file at that commit (an empty config).
pub type FileContent = Arc<Option<Vec<u8>>>;
type Read = Result<FileContent, ConfigSourceError>;

/// Bytes a small entry is counted as, so a million empty files are still bounded.
const ENTRY_OVERHEAD: usize = 256;

/// What a call to [`ConfigFiles::get`] did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Served from the cache.
    Cached,
    /// Waited for a read another stream started.
    Coalesced,
    /// Read from the source.
    Read,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Coalesced => "coalesced",
            Outcome::Read => "read",
        }
    }
}

pub struct ConfigFiles {
    max_bytes: usize,
    state: Mutex<State>,
    in_flight: SingleFlight<String, Read>,
}

struct State {
    files: LruCache<String, FileContent>,
    bytes: usize,
}

fn cost(key: &str, content: &FileContent) -> usize {
    key.len() + ENTRY_OVERHEAD + content.as_ref().as_ref().map_or(0, Vec::len)
}

impl ConfigFiles {
    /// A cache holding at most `max_bytes` of files (and keys).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            state: Mutex::new(State {
                files: LruCache::unbounded(),
                bytes: 0,
            }),
            in_flight: SingleFlight::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file named by `key` (repository, commit and path: whatever makes the content
    /// unique), from the cache, from a read in progress, or read now with `read`.
    pub async fn get<F, Fut>(&self, key: &str, read: F) -> (Read, Outcome)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, ConfigSourceError>>,
    {
        if let Some(content) = self.lock().files.get(key) {
            return (Ok(content.clone()), Outcome::Cached);
        }
        let (result, ran) = self
            .in_flight
            .run(&key.to_owned(), || async move {
                let result = read().await.map(Arc::new);
                if let Ok(content) = &result {
                    self.store(key, content.clone());
                }
                result
            })
            .await;
        let outcome = if ran {
            Outcome::Read
        } else {
            Outcome::Coalesced
        };
        (result, outcome)
    }

    fn store(&self, key: &str, content: FileContent) {
        let size = cost(key, &content);
        if size > self.max_bytes {
            return;
        }
        let mut state = self.lock();
        if let Some(old) = state.files.put(key.to_owned(), content) {
            state.bytes -= cost(key, &old);
        }
        state.bytes += size;
        while state.bytes > self.max_bytes {
            match state.files.pop_lru() {
                Some((k, v)) => state.bytes -= cost(&k, &v),
                None => break,
            }
        }
    }

    /// Files held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().files.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held now, as counted against the bound.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::gitaly::GitalyError;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn unavailable() -> ConfigSourceError {
        ConfigSourceError::Gitaly(GitalyError::Unavailable("down".into()))
    }

    #[tokio::test]
    async fn a_storm_of_streams_reads_each_file_once() {
        let files = Arc::new(ConfigFiles::new(1 << 20));
        let reads = Arc::new(AtomicUsize::new(0));
        let asks = (0..500).map(|_| {
            let (files, reads) = (files.clone(), reads.clone());
            tokio::spawn(async move {
                files
                    .get("repo@c1:.gitlab/agents/a/config.yaml", || async move {
                        reads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(Some(b"ci_access: {}\n".to_vec()))
                    })
                    .await
            })
        });
        let results = futures_util::future::join_all(asks).await;
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        let mut outcomes = HashMap::new();
        for r in results {
            let (content, outcome) = r.unwrap();
            assert_eq!(
                content.unwrap().as_deref(),
                Some(b"ci_access: {}\n".as_slice())
            );
            *outcomes.entry(outcome).or_insert(0) += 1;
        }
        assert_eq!(outcomes.get(&Outcome::Read), Some(&1));
        // Later asks are served from the cache.
        let (_, outcome) = files
            .get("repo@c1:.gitlab/agents/a/config.yaml", || async {
                unreachable!("cached")
            })
            .await;
        assert_eq!(outcome, Outcome::Cached);
        assert_eq!(files.len(), 1);
    }

    #[tokio::test]
    async fn failures_reach_the_waiters_but_are_not_kept() {
        let files = ConfigFiles::new(1 << 20);
        let (result, outcome) = files.get("k", || async { Err(unavailable()) }).await;
        assert_eq!(outcome, Outcome::Read);
        assert_eq!(result.unwrap_err(), unavailable());
        assert!(files.is_empty());
        let (result, outcome) = files.get("k", || async { Ok(None) }).await;
        assert_eq!(outcome, Outcome::Read, "read again after a failure");
        assert_eq!(result.unwrap().as_ref(), &None);
        assert_eq!(
            files.len(),
            1,
            "an absent file is kept too (it is an answer)"
        );
    }

    #[tokio::test]
    async fn the_byte_bound_holds_and_evicts_least_recently_used() {
        let file = vec![b'x'; 10_000];
        let per_entry = cost("file-0", &Arc::new(Some(file.clone())));
        let files = ConfigFiles::new(per_entry * 3);
        for i in 0..3 {
            let f = file.clone();
            let (read, _) = files
                .get(&format!("file-{i}"), || async { Ok(Some(f)) })
                .await;
            read.unwrap();
        }
        // file-0 used again: file-1 is now the least recently used.
        let (_, outcome) = files
            .get("file-0", || async { unreachable!("cached") })
            .await;
        assert_eq!(outcome, Outcome::Cached);
        let f = file.clone();
        let (read, _) = files.get("file-3", || async { Ok(Some(f)) }).await;
        read.unwrap();
        assert_eq!(files.len(), 3);
        assert!(files.bytes() <= per_entry * 3);
        let f = file.clone();
        let (_, outcome) = files.get("file-1", || async { Ok(Some(f)) }).await;
        assert_eq!(outcome, Outcome::Read, "file-1 was evicted");
        // A file larger than the whole bound is served but not kept.
        let huge = vec![b'x'; per_entry * 4];
        let (result, _) = files.get("huge", || async { Ok(Some(huge)) }).await;
        assert!(result.unwrap().is_some());
        assert!(files.bytes() <= per_entry * 3);
    }
}
