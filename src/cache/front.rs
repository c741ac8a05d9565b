//! The read side of the local tier: a sharded hash map from a key's digest to its entry, kept
//! in step with moka (the cache of record) by the store's writes and moka's eviction listener.
//!
//! Why: a moka read does its bookkeeping on every call (timestamps, a read-op record, the
//! frequency sketch, the access-order deque), several random cache lines that grow with the
//! cache: ~1.4 µs per read at 100 000 entries, 2.6 µs at 1 000 000. Here a hit is one shard
//! read lock and one probe of a table of 16-byte slots. moka still sees a sample of the reads
//! (see [`crate::cache::local`]) to evict and admit well.
//!
//! Exactness: an entry goes in here *before* moka (so moka's removal notice, which can come at
//! once, always finds it), and leaves when moka evicts, expires, replaces or rejects it (the
//! listener removes it only if it is still that very entry, so a newer one stays), or when it is
//! invalidated (removed here directly as well). Nothing moka dropped is served from here.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};

use super::entry::Entry;

/// Shards: enough that concurrent readers and a writer rarely meet (64: one bit each in a
/// `u64`, see [`Front::get_many`]).
const SHARDS: usize = 64;

/// The digest is already uniformly random (a keyed SipHash): use its bits as they are.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; fold anything else in for safety.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A key's digest as two words: a `u128` is 16-byte aligned, which pads a table slot with its
/// `Arc` to 32 bytes; two `u64`s make it 24 (~17 bytes less per entry at this table's load).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Slot {
    lo: u64,
    hi: u64,
}

impl From<u128> for Slot {
    fn from(d: u128) -> Slot {
        Slot {
            lo: d as u64,
            hi: (d >> 64) as u64,
        }
    }
}

impl std::hash::Hash for Slot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.lo); // the low half: the shard index uses the high bits
    }
}

/// Keyed by the key's digest (see [`super::CacheKey`]): a probe compares 16 bytes in the slot
/// itself and follows no pointer until it has found the entry.
type Map = std::collections::HashMap<Slot, Arc<Entry>, BuildHasherDefault<DigestHasher>>;

/// One shard: a reader-sharded lock, so the runtime's worker threads reading at once each
/// take a lock word of their own instead of passing one cache line between cores on every
/// read (a writer takes them all: writes are the misses, far fewer). A writer that panicked
/// leaves the map as it was before or after its one insert or removal, so a poisoned lock is
/// used as it is.
struct Shard(ShardedLock<Map>);

impl Default for Shard {
    fn default() -> Shard {
        Shard(ShardedLock::new(Map::default()))
    }
}

impl Shard {
    fn read(&self) -> ShardedLockReadGuard<'_, Map> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn write(&self) -> ShardedLockWriteGuard<'_, Map> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

const _: () = assert!(std::mem::size_of::<(Slot, Arc<Entry>)>() == 24);

pub(crate) struct Front {
    shards: Box<[Shard]>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front").finish_non_exhaustive()
    }
}

impl Default for Front {
    fn default() -> Front {
        Front {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

/// High bits pick the shard, low bits the slot within it.
fn shard_of(digest: u128) -> usize {
    (digest >> 122) as usize % SHARDS
}

impl Front {
    fn shard(&self, digest: u128) -> &Shard {
        &self.shards[shard_of(digest)]
    }

    /// The entries of a whole request's keys, in order.
    ///
    /// One probe per key costs two cache misses (the table's slot, then the entry), and when
    /// each sits behind a locked instruction (a shard's read lock, the `Arc` clone) they are
    /// paid one after the other: ~300 ns per key at 100 000 entries and more. Here each shard
    /// the request needs is read-locked once, in ascending order, then every key is probed,
    /// then every entry found and its element are read, each a loop of plain loads that the
    /// CPU overlaps, and only then are the entries cloned (from cache by now).
    ///
    /// No deadlock: readers take shards in ascending order and writers hold one shard at a
    /// time and take nothing else meanwhile.
    pub(crate) fn get_many(
        &self,
        digests: impl Iterator<Item = u128> + Clone,
    ) -> Vec<Option<Arc<Entry>>> {
        // The shards wanted, as one bit each; locked in ascending order, and a shard's guard
        // found by counting the wanted shards below it (no table of all 64 to fill and drop).
        let mut wanted = 0u64;
        for d in digests.clone() {
            wanted |= 1 << shard_of(d);
        }
        let mut guards = Vec::with_capacity(wanted.count_ones() as usize);
        let mut bits = wanted;
        while bits != 0 {
            guards.push(self.shards[bits.trailing_zeros() as usize].read());
            bits &= bits - 1;
        }
        let found: Vec<Option<&Arc<Entry>>> = digests
            .map(|d| {
                let below = wanted & ((1u64 << shard_of(d)) - 1);
                guards[below.count_ones() as usize].get(&Slot::from(d))
            })
            .collect();
        // Touch each entry, then each element: independent loads, so their misses overlap.
        let mut touched = 0usize;
        for e in found.iter().flatten() {
            touched ^= e
                .answer
                .element
                .as_ref()
                .map_or(0, |el| el.get().as_ptr() as usize);
        }
        for e in found.iter().flatten() {
            if let Some(el) = &e.answer.element {
                touched ^= usize::from(el.get().as_bytes().first().copied().unwrap_or(0));
            }
        }
        std::hint::black_box(touched);
        found.into_iter().map(|e| e.cloned()).collect()
    }

    /// The entry stored under the key with this digest, if any.
    pub(crate) fn get(&self, digest: u128) -> Option<Arc<Entry>> {
        self.shard(digest).read().get(&Slot::from(digest)).cloned()
    }

    pub(crate) fn insert(&self, digest: u128, entry: Arc<Entry>) {
        self.shard(digest).write().insert(Slot::from(digest), entry);
    }

    /// Removes the key's entry if it is still `entry` (moka's removal notices).
    pub(crate) fn remove_if_same(&self, digest: u128, entry: &Arc<Entry>) {
        let mut shard = self.shard(digest).write();
        let slot = Slot::from(digest);
        if shard.get(&slot).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            shard.remove(&slot);
        }
    }

    /// Removes whatever the key holds (invalidation).
    pub(crate) fn remove(&self, digest: u128) {
        self.shard(digest).write().remove(&Slot::from(digest));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}
