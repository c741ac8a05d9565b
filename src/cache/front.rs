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

use parking_lot::RwLock;

use super::entry::Entry;

/// Shards: enough that concurrent readers and a writer rarely meet.
const SHARDS: usize = 64;

/// The digest is already uniformly random (a keyed SipHash): use its bits as they are.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u128` is used; fold anything else in for safety.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64; // the low half: the shard index uses the high bits
    }
}

/// Keyed by the key's digest (see [`super::CacheKey`]): a probe compares 16 bytes in the slot
/// itself and follows no pointer until it has found the entry.
type Shard = RwLock<std::collections::HashMap<u128, Arc<Entry>, BuildHasherDefault<DigestHasher>>>;

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
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
        }
    }
}

impl Front {
    fn shard(&self, digest: u128) -> &Shard {
        // High bits pick the shard, low bits the slot within it.
        &self.shards[(digest >> 122) as usize % SHARDS]
    }

    /// The entry stored under the key with this digest, if any.
    pub(crate) fn get(&self, digest: u128) -> Option<Arc<Entry>> {
        self.shard(digest).read().get(&digest).cloned()
    }

    pub(crate) fn insert(&self, digest: u128, entry: Arc<Entry>) {
        self.shard(digest).write().insert(digest, entry);
    }

    /// Removes the key's entry if it is still `entry` (moka's removal notices).
    pub(crate) fn remove_if_same(&self, digest: u128, entry: &Arc<Entry>) {
        let mut shard = self.shard(digest).write();
        if shard.get(&digest).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            shard.remove(&digest);
        }
    }

    /// Removes whatever the key holds (invalidation).
    pub(crate) fn remove(&self, digest: u128) {
        self.shard(digest).write().remove(&digest);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}
