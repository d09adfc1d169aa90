//! A map with a hard bound on its entries that evicts the least recently used key to make
//! room: the state store of the rate limiters and the ban list.
//!
//! Every operation a check makes is O(1): one hash of the key, one shard lock, one lookup,
//! and relinking one node of an intrusive doubly linked list (most recently used at the
//! head, least at the tail). A new key in a full shard takes over the tail's node in place,
//! so a flood of unique keys costs the same per check as a quiet table and never grows it.
//! Nothing on the check path looks at more than one entry; the only whole-table operation,
//! [`Table::retain`], is for the periodic sweep, and locks one shard at a time.
//!
//! The table is split into shards (a power of two, up to [`MAX_SHARDS`]) by a salted hash,
//! so concurrent checks rarely meet on a lock and a client cannot choose which shard its
//! keys land in. Each shard holds at most `capacity / shards` keys and evicts its own
//! least recently used key: the order is per shard, an approximation of a global LRU that
//! is exact in distribution (a key is evicted after about `capacity` newer distinct keys
//! were used since its last use, wherever they landed). The sum of the shard bounds never
//! exceeds `capacity`.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use prometheus::IntCounter;

/// Most shards a table is split into.
pub const MAX_SHARDS: usize = 64;
/// Fewest keys a shard should be able to hold: below that, fewer shards.
const MIN_SHARD_CAPACITY: usize = 64;
/// No node: the end of the list.
const NIL: u32 = u32::MAX;

/// A key with its salted hash, computed once per operation: it picks the shard and is the
/// shard map's hash, so the key is hashed once, not twice.
#[derive(Clone, Copy)]
struct Hashed<K> {
    hash: u64,
    key: K,
}

impl<K: PartialEq> PartialEq for Hashed<K> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.key == other.key
    }
}

impl<K: Eq> Eq for Hashed<K> {}

impl<K> Hash for Hashed<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The shard maps' hasher: the hash is already computed (and salted) in [`Hashed`].
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `Hashed`; this keeps any other use well defined.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

struct Node<K, V> {
    key: Hashed<K>,
    value: V,
    prev: u32,
    next: u32,
}

/// One shard: an index from key to node, the nodes in a dense vector (no holes: a removal
/// moves the last node into the gap), and the recency list through them.
struct Shard<K, V> {
    index: HashMap<Hashed<K>, u32, BuildHasherDefault<PassThrough>>,
    nodes: Vec<Node<K, V>>,
    /// Most recently used.
    head: u32,
    /// Least recently used: evicted first.
    tail: u32,
    capacity: usize,
}

impl<K: Copy + Eq, V: Copy> Shard<K, V> {
    fn new(capacity: usize) -> Self {
        Self {
            index: HashMap::default(),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity,
        }
    }

    fn node(&mut self, i: u32) -> &mut Node<K, V> {
        &mut self.nodes[i as usize]
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = self.node(i);
            (n.prev, n.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.node(p).next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.node(n).prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let head = self.head;
        {
            let n = self.node(i);
            n.prev = NIL;
            n.next = head;
        }
        match head {
            NIL => self.tail = i,
            h => self.node(h).prev = i,
        }
        self.head = i;
    }

    fn promote(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    /// Inserts an absent key as the most recently used; true if the least recently used
    /// key was evicted to make room.
    fn insert(&mut self, key: Hashed<K>, value: V) -> bool {
        if self.nodes.len() >= self.capacity && self.tail != NIL {
            // Full: the least recently used node becomes the new key's, in place.
            let i = self.tail;
            let old = self.node(i).key;
            self.index.remove(&old);
            {
                let n = self.node(i);
                n.key = key;
                n.value = value;
            }
            self.promote(i);
            self.index.insert(key, i);
            return true;
        }
        if self.nodes.len() == self.nodes.capacity() {
            // Grow by doubling, but never past the shard's bound.
            let extra = self
                .nodes
                .len()
                .max(16)
                .min(self.capacity - self.nodes.len());
            self.nodes.reserve_exact(extra);
        }
        // `capacity` is at most the table's, far below u32::MAX (checked in `Table::new`).
        let i = self.nodes.len() as u32;
        self.nodes.push(Node {
            key,
            value,
            prev: NIL,
            next: NIL,
        });
        self.push_front(i);
        self.index.insert(key, i);
        false
    }

    /// Removes node `i`, moving the last node into its place.
    fn remove_at(&mut self, i: u32) {
        self.unlink(i);
        let key = self.node(i).key;
        self.index.remove(&key);
        let last = (self.nodes.len() - 1) as u32;
        self.nodes.swap_remove(i as usize);
        if i == last {
            return;
        }
        // The node that was last is now at `i`: repoint its neighbours and its index entry.
        let (prev, next, moved) = {
            let n = self.node(i);
            (n.prev, n.next, n.key)
        };
        match prev {
            NIL => self.head = i,
            p => self.node(p).next = i,
        }
        match next {
            NIL => self.tail = i,
            n => self.node(n).prev = i,
        }
        if let Some(slot) = self.index.get_mut(&moved) {
            *slot = i;
        }
    }

    fn len(&self) -> usize {
        self.nodes.len()
    }
}

/// A bounded map from `K` to `V` with least-recently-used eviction; see the module.
pub struct Table<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    /// Keys held, changed only when a shard's size changes (a new key in a shard with
    /// room, a removal): a full table under a flood replaces keys without touching it.
    len: AtomicUsize,
    /// Salted: keys are client data, so neither shard nor bucket can be aimed at.
    hasher: RandomState,
    /// `shards.len() - 1` (a power of two minus one).
    mask: u64,
    evictions: IntCounter,
}

impl<K: Copy + Eq + Hash, V: Copy> Table<K, V> {
    /// A table of at most `capacity` keys (at least one) that counts each eviction in
    /// `evictions`. Nothing is allocated until keys arrive.
    pub fn new(capacity: usize, evictions: IntCounter) -> Self {
        // Indices are u32 with one value reserved; no configuration comes near it.
        let capacity = capacity.clamp(1, (u32::MAX - 1) as usize);
        let mut shards = MAX_SHARDS;
        while shards > 1 && capacity / shards < MIN_SHARD_CAPACITY {
            shards /= 2;
        }
        let per_shard = capacity / shards;
        Self {
            shards: (0..shards)
                .map(|_| Mutex::new(Shard::new(per_shard)))
                .collect(),
            len: AtomicUsize::new(0),
            hasher: RandomState::new(),
            mask: (shards - 1) as u64,
            evictions,
        }
    }

    /// The most keys the table holds: `capacity` rounded down to a multiple of the shard
    /// count.
    pub fn capacity(&self) -> usize {
        self.shards.len() * crate::support::sync::lock(&self.shards[0]).capacity
    }

    fn hashed(&self, key: K) -> Hashed<K> {
        Hashed {
            hash: self.hasher.hash_one(key),
            key,
        }
    }

    fn lock(&self, key: &Hashed<K>) -> MutexGuard<'_, Shard<K, V>> {
        // Bits 32.. pick the shard: the shard map uses the low bits for its buckets and the
        // top seven for its tags, so neither is skewed within a shard.
        crate::support::sync::lock(&self.shards[((key.hash >> 32) & self.mask) as usize])
    }

    fn removed(&self) {
        self.len.fetch_sub(1, Ordering::Relaxed);
    }

    /// Runs `f` on `key`'s value (`None` when absent) and stores what it leaves: `Some`
    /// keeps or inserts the key as the most recently used (evicting the shard's least
    /// recently used key if it is full), `None` removes it. O(1).
    pub fn update<R>(&self, key: K, f: impl FnOnce(&mut Option<V>) -> R) -> R {
        let key = self.hashed(key);
        let mut shard = self.lock(&key);
        let found = shard.index.get(&key).copied();
        let mut value = found.map(|i| shard.nodes[i as usize].value);
        let result = f(&mut value);
        match (found, value) {
            (Some(i), Some(v)) => {
                shard.node(i).value = v;
                shard.promote(i);
            }
            (Some(i), None) => {
                shard.remove_at(i);
                self.removed();
            }
            (None, Some(v)) => {
                if shard.insert(key, v) {
                    self.evictions.inc();
                } else {
                    self.len.fetch_add(1, Ordering::Relaxed);
                }
            }
            (None, None) => {}
        }
        result
    }

    /// `key`'s value, without making it more recently used. O(1).
    pub fn peek(&self, key: K) -> Option<V> {
        let key = self.hashed(key);
        let shard = self.lock(&key);
        let i = *shard.index.get(&key)?;
        Some(shard.nodes[i as usize].value)
    }

    /// Removes `key` if its value satisfies `stale`. O(1).
    pub fn remove_if(&self, key: K, stale: impl FnOnce(&V) -> bool) {
        let key = self.hashed(key);
        let mut shard = self.lock(&key);
        if let Some(i) = shard.index.get(&key).copied() {
            if stale(&shard.nodes[i as usize].value) {
                shard.remove_at(i);
                self.removed();
            }
        }
    }

    /// Keeps only the entries `keep` approves. O(entries), one shard locked at a time: for
    /// the periodic sweep, never for a check.
    pub fn retain(&self, mut keep: impl FnMut(&K, &V) -> bool) {
        for shard in self.shards.iter() {
            let mut shard = crate::support::sync::lock(shard);
            let mut i = 0;
            while i < shard.len() {
                let node = &shard.nodes[i];
                if keep(&node.key.key, &node.value) {
                    i += 1;
                } else {
                    // The last node moves to `i`: look at `i` again.
                    shard.remove_at(i as u32);
                    self.removed();
                }
            }
            if shard.nodes.capacity() > 4 * shard.nodes.len().max(MIN_SHARD_CAPACITY) {
                shard.nodes.shrink_to_fit();
                shard.index.shrink_to_fit();
            }
        }
    }

    /// Keys held now. O(1), without a lock.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Keys from least to most recently used, and checks the list against the index.
    #[cfg(test)]
    fn keys_lru_first(&self) -> Vec<K> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let shard = crate::support::sync::lock(shard);
            let mut keys = Vec::new();
            let mut i = shard.tail;
            let mut prev = NIL;
            while i != NIL {
                let n = &shard.nodes[i as usize];
                assert_eq!(n.next, prev, "list links agree both ways");
                assert_eq!(
                    shard.index.get(&n.key),
                    Some(&i),
                    "index points at the node"
                );
                keys.push(n.key.key);
                prev = i;
                i = n.prev;
            }
            assert_eq!(prev, shard.head);
            assert_eq!(keys.len(), shard.nodes.len());
            assert_eq!(keys.len(), shard.index.len());
            assert!(keys.len() <= shard.capacity);
            all.extend(keys);
        }
        assert_eq!(all.len(), self.len(), "the count agrees with the shards");
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counter() -> IntCounter {
        IntCounter::new("evictions", "evictions").unwrap()
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_used_key() {
        let evictions = counter();
        let table: Table<u32, u32> = Table::new(3, evictions.clone());
        assert_eq!((table.shards(), table.capacity()), (1, 3));
        for k in [1, 2, 3] {
            table.update(k, |v| *v = Some(k * 10));
        }
        // Using 1 makes 2 the least recently used; peeking at 2 does not save it.
        table.update(1, |v| assert_eq!(*v, Some(10)));
        assert_eq!(table.peek(2), Some(20));
        table.update(4, |v| *v = Some(40));
        assert_eq!(table.keys_lru_first(), [3, 1, 4]);
        assert_eq!((table.peek(2), table.len(), evictions.get()), (None, 3, 1));
        // Removing and re-adding keeps the structure consistent.
        table.update(1, |v| *v = None);
        table.remove_if(3, |v| *v == 30);
        table.remove_if(4, |_| false);
        assert_eq!(table.keys_lru_first(), [4]);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn shards_never_hold_more_than_the_capacity_together() {
        for capacity in [1, 63, 64, 127, 128, 1000, 4096, 100_000, 100_001] {
            let table: Table<u64, ()> = Table::new(capacity, counter());
            assert!(table.capacity() <= capacity, "{capacity}");
            assert!(table.capacity() > capacity - table.shards(), "{capacity}");
        }
        let evictions = counter();
        let table: Table<u64, ()> = Table::new(1000, evictions.clone());
        for k in 0..20_000 {
            table.update(k, |v| *v = Some(()));
            assert!(table.len() <= 1000);
        }
        assert_eq!(table.keys_lru_first().len(), table.len());
        assert_eq!(evictions.get() as usize, 20_000 - table.len());
        table.retain(|k, _| k % 2 == 0);
        assert!(table.keys_lru_first().iter().all(|k| k % 2 == 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u8, u16),
        Remove(u8),
        Touch(u8),
        Peek(u8),
        RetainOdd,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), any::<u16>()).prop_map(|(k, v)| Op::Set(k % 24, v)),
            any::<u8>().prop_map(|k| Op::Remove(k % 24)),
            any::<u8>().prop_map(|k| Op::Touch(k % 24)),
            any::<u8>().prop_map(|k| Op::Peek(k % 24)),
            Just(Op::RetainOdd),
        ]
    }

    proptest! {
        /// A one-shard table behaves like a plain LRU list of at most `capacity` keys.
        #[test]
        fn behaves_like_a_simple_lru(capacity in 1usize..10, ops in prop::collection::vec(op(), 0..200)) {
            let table: Table<u8, u16> = Table::new(capacity, counter());
            // Least recently used first.
            let mut model: Vec<(u8, u16)> = Vec::new();
            for op in ops {
                match op {
                    Op::Set(k, v) => {
                        table.update(k, |slot| *slot = Some(v));
                        model.retain(|(mk, _)| *mk != k);
                        if model.len() == capacity {
                            model.remove(0);
                        }
                        model.push((k, v));
                    }
                    Op::Remove(k) => {
                        table.update(k, |slot| *slot = None);
                        model.retain(|(mk, _)| *mk != k);
                    }
                    Op::Touch(k) => {
                        let seen = table.update(k, |slot| *slot);
                        let pos = model.iter().position(|(mk, _)| *mk == k);
                        prop_assert_eq!(seen, pos.map(|p| model[p].1));
                        if let Some(p) = pos {
                            let entry = model.remove(p);
                            model.push(entry);
                        }
                    }
                    Op::Peek(k) => {
                        let expected = model.iter().find(|(mk, _)| *mk == k).map(|e| e.1);
                        prop_assert_eq!(table.peek(k), expected);
                    }
                    Op::RetainOdd => {
                        table.retain(|k, _| k % 2 == 1);
                        model.retain(|(k, _)| k % 2 == 1);
                    }
                }
                let keys: Vec<u8> = model.iter().map(|e| e.0).collect();
                prop_assert_eq!(table.keys_lru_first(), keys);
                prop_assert_eq!(table.len(), model.len());
            }
        }
    }
}
