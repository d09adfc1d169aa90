//! Gives the memory a burst freed back to the system.
//!
//! glibc's malloc keeps freed memory in its arenas for reuse and returns it on its own only
//! from the top of the main heap. After the hostile scenario's attacks (thousands of
//! connections, their buffers and tasks, freed within seconds) the edge's RSS stayed about
//! 50 % above its level before the attacks for as long as it ran: not a leak (a second
//! attack reused it), but memory a pod is billed for and that hides a real leak in the
//! graphs. Two things bring it back:
//!
//! - `malloc_trim(0)` every [`TRIM_INTERVAL`] releases every whole free page of every
//!   arena (`madvise(MADV_DONTNEED)`), wherever it lies ([`return_freed_memory_periodically`]).
//! - `kas-edge run` runs with no per-thread caches of freed blocks (glibc's tcache:
//!   [`use_burst_friendly_malloc`]). What a trim cannot return is pages that blocks it sees
//!   as used keep resident among freed ones; up to 7 freed blocks of each of 64 sizes per
//!   thread sit in that thread's cache, look used to the trim, and pin the pages they lie
//!   on across the worker threads' arenas. Measured (README, "Memory comes back after
//!   attacks"): 60 s after the hostile scenario's attacks RSS is 1.09–1.10 × its level
//!   before them instead of 1.11; memory per idle tunnel, and requests/s and CPU per
//!   request at saturation, level; CPU per request at 1,000/s +3 %, inside that
//!   measurement's scatter. One arena for all threads as well (`arena_max=1`) left less
//!   (1.085) but cost 8–15 % of the requests/s at saturation: the worker threads then wait
//!   on each other's allocations.
//!
//! Chosen over another allocator: no new dependency, and the allocator the request path is
//! tuned on stays (mimalloc, tried before, cost 30 % more CPU per HTTP/1 request and more
//! memory per idle tunnel; jemalloc with background purging left as much after the attacks,
//! with a higher peak and more CPU per request — README, "Load testing and performance").
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

/// glibc's malloc settings `kas-edge run` runs with (glibc reads them only at start, from
/// `GLIBC_TUNABLES`): no per-thread caches of freed blocks. Why: the module's doc.
pub const EDGE_MALLOC_TUNABLES: [(&str, &str); 1] = [("glibc.malloc.tcache_count", "0")];

/// Marks the process as started again by [`use_burst_friendly_malloc`], so it never
/// starts itself a second time (if glibc ignored the variable, say).
const RESTARTED: &str = "KAS_EDGE_MALLOC_TUNED";

/// `GLIBC_TUNABLES` with [`EDGE_MALLOC_TUNABLES`] added to what the caller set, or `None`
/// when the caller's value already names every one of them: a setting the caller made
/// wins (how an operator, or an A/B run, chooses glibc's defaults again:
/// `glibc.malloc.tcache_count=7`).
pub fn tunables_with_edge_malloc(caller: Option<&str>) -> Option<String> {
    let caller = caller.unwrap_or("").trim_matches(':');
    let named: Vec<&str> = caller
        .split(':')
        .filter_map(|setting| setting.split_once('=').map(|(name, _)| name))
        .collect();
    let missing: Vec<String> = EDGE_MALLOC_TUNABLES
        .iter()
        .filter(|(name, _)| !named.contains(name))
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(
        std::iter::once(caller)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .chain(missing)
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// Starts this process again (same pid, arguments and environment) with
/// [`EDGE_MALLOC_TUNABLES`] in `GLIBC_TUNABLES`, unless they are in force already or the
/// caller named them. Call first thing in `main`, before any thread starts. Returns when
/// nothing is to be done, or when starting again failed (said on stderr: the edge then runs
/// with glibc's defaults, only fatter after a burst).
pub fn use_burst_friendly_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;

        if std::env::var_os(RESTARTED).is_some() {
            return;
        }
        let caller = match std::env::var_os("GLIBC_TUNABLES") {
            None => None,
            Some(set) => match set.into_string() {
                Ok(set) => Some(set),
                // Not text: not ours to rewrite; glibc makes of it what it can.
                Err(_) => return,
            },
        };
        let Some(tunables) = tunables_with_edge_malloc(caller.as_deref()) else {
            return;
        };
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| "kas-edge".into());
        // /proc/self/exe: the file this process runs, even if its path now names another.
        let error = std::process::Command::new("/proc/self/exe")
            .arg0(arg0)
            .args(args)
            .env("GLIBC_TUNABLES", tunables)
            .env(RESTARTED, "1")
            .exec();
        eprintln!("kas-edge: running with glibc's malloc defaults (could not start again with GLIBC_TUNABLES set: {error})");
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
mod tunables_tests {
    use super::*;

    #[test]
    fn the_edges_malloc_settings_join_the_callers_and_never_override_them() {
        let ours = "glibc.malloc.tcache_count=0";
        assert_eq!(tunables_with_edge_malloc(None).as_deref(), Some(ours));
        assert_eq!(tunables_with_edge_malloc(Some("")).as_deref(), Some(ours));
        assert_eq!(
            tunables_with_edge_malloc(Some("glibc.malloc.check=3:")).as_deref(),
            Some("glibc.malloc.check=3:glibc.malloc.tcache_count=0")
        );
        assert_eq!(
            tunables_with_edge_malloc(Some("glibc.malloc.arena_max=2:glibc.malloc.tcache_count=7")),
            None
        );
        // A name that merely starts like ours is another setting.
        assert_eq!(
            tunables_with_edge_malloc(Some("glibc.malloc.tcache_count_x=2")).as_deref(),
            Some("glibc.malloc.tcache_count_x=2:glibc.malloc.tcache_count=0")
        );
    }
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
