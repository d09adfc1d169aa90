//! Gives the memory a burst freed back to the system.
//!
//! glibc's malloc keeps freed memory in its arenas for reuse and returns it on its own only
//! from the top of the main heap. After the hostile scenario's attacks (thousands of
//! connections, their buffers and tasks, freed within seconds) the edge's RSS stayed about
//! 50 % above its level before the attacks for as long as it ran: not a leak (a second
//! attack reused it), but memory a pod is billed for and that hides a real leak in the
//! graphs. `malloc_trim(0)` releases every whole free page of every arena
//! (`madvise(MADV_DONTNEED)`), wherever it lies.
//!
//! Chosen over another allocator: no new dependency, and the allocator the request path is
//! tuned on stays (mimalloc, tried before, cost 30 % more CPU per HTTP/1 request and more
//! memory per idle tunnel — README, "Load testing and performance").
//!
//! Every [`TRIM_INTERVAL`]: memory freed by a burst is back within seconds of the burst's
//! end (the target is 60 s), and the cost stays out of sight. A trim with nothing to hand
//! back walks the arenas' free lists in about 0.2 ms (0.002 % of a core at this interval);
//! handing back 120 MiB took 36 ms once (the kernel unmapping 30,000 pages; allocations
//! from the arena being trimmed wait that long, once after a burst). Pages a trim hands
//! back and the next burst needs again are faulted in once per interval at most. (This
//! machine, glibc 2.36.)

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::time::Duration;

/// How often freed memory is handed back.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Starts a thread that hands freed memory back every [`TRIM_INTERVAL`] for the life of
/// the process (glibc only: other allocators and C libraries purge on their own).
pub fn return_freed_memory_periodically() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let spawned = std::thread::Builder::new()
            .name("malloc-trim".to_owned())
            .spawn(|| loop {
                std::thread::sleep(TRIM_INTERVAL);
                trim();
            });
        if let Err(e) = spawned {
            // Before logging is set up; the edge runs fine without it, only fatter.
            eprintln!("kas-edge: no thread to return freed memory: {e}");
        }
    }
}

/// Below this capacity a table keeps what it has: shrinking it would save less than a page
/// or two and cost a rehash on the next few inserts.
pub const MIN_SHRINK_CAPACITY: usize = 256;

/// Gives back the capacity a burst left in a table keyed by connections or clients, once
/// the burst's entries are gone: a `HashMap` never shrinks by itself, so after an attack's
/// thousands of handshakes it would keep their buckets for the life of the process (and
/// `malloc_trim` cannot return memory still allocated). Shrinks to twice the entries left
/// when fewer than a quarter of the buckets are in use: a table must halve again or double
/// before the next rehash, so the cost per insert or removal stays O(1) amortized. Call it
/// after a removal, with the table's lock held.
pub fn shrink_after_burst<K: Eq + Hash, V, S: BuildHasher>(table: &mut HashMap<K, V, S>) {
    let capacity = table.capacity();
    if capacity > MIN_SHRINK_CAPACITY && table.len() < capacity / 4 {
        table.shrink_to((2 * table.len()).max(MIN_SHRINK_CAPACITY / 2));
    }
}

/// Hands every whole free page of every malloc arena back; true if any was.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointers; it walks glibc's own arenas under their locks.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(test)]
mod shrink_tests {
    use super::*;

    /// A burst of 10,000 connections, then all but 10 gone: the table gives back almost
    /// all of its buckets, and a table that stays full keeps them.
    #[test]
    fn a_table_shrinks_after_a_bursts_entries_are_removed() {
        let mut table: HashMap<u64, u64> = HashMap::new();
        for i in 0..10_000 {
            table.insert(i, i);
        }
        let burst_capacity = table.capacity();
        assert!(burst_capacity >= 10_000);
        for i in 10..10_000 {
            table.remove(&i);
            shrink_after_burst(&mut table);
        }
        assert_eq!(table.len(), 10);
        assert!(
            table.capacity() <= 2 * MIN_SHRINK_CAPACITY,
            "capacity {} after the burst, {burst_capacity} during it",
            table.capacity()
        );
        assert!((0..10).all(|i| table.get(&i) == Some(&i)));

        let mut full: HashMap<u64, u64> = (0..10_000).map(|i| (i, i)).collect();
        let capacity = full.capacity();
        shrink_after_burst(&mut full);
        assert_eq!(full.capacity(), capacity);
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Resident memory of this process in bytes (/proc/self/statm, second field, pages).
    fn rss_bytes() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// What the attacks leave behind, in small: many small blocks freed out of order from
    /// another thread's arena, a few survivors pinning the arena's top. Trimmed, the
    /// freed pages leave the process.
    #[test]
    fn a_trim_returns_what_a_burst_freed() {
        let (before, after) = std::thread::spawn(|| {
            let mut blocks: Vec<Vec<u8>> = (0..200_000).map(|i| vec![i as u8; 512]).collect();
            // Keep every 1000th block: the arena cannot shrink from its top.
            let survivors: Vec<Vec<u8>> = blocks.iter().step_by(1000).cloned().collect();
            blocks.clear();
            blocks.shrink_to_fit();
            let before = rss_bytes();
            trim();
            let after = rss_bytes();
            drop(survivors);
            (before, after)
        })
        .join()
        .unwrap();
        // 200,000 × 512 B = ~100 MiB freed; at least half of it must leave.
        assert!(
            before.saturating_sub(after) > 50 << 20,
            "RSS {before} before the trim, {after} after"
        );
    }
}
