//! The read side of the local tier: a sharded hash map from a key's digest to its entry, kept
//! in step with moka (the cache of record) by the store's writes and moka's eviction listener.
//!
//! Why: a moka read does its bookkeeping on every call (timestamps, a read-op record, the
//! frequency sketch, the access-order deque), several random cache lines that grow with the
//! cache: ~1.4 µs per read at 100 000 entries, 2.6 µs at 1 000 000. Here a hit is one shard
//! read lock and one probe of an open-addressing table of 24-byte buckets (see [`Table`]). moka still sees a sample of the reads
//! (see [`crate::cache::local`]) to evict and admit well.
//!
//! Exactness: an entry goes in here *before* moka (so moka's removal notice, which can come at
//! once, always finds it), and leaves when moka evicts, expires, replaces or rejects it (the
//! listener removes it only if it is still that very entry, so a newer one stays), or when it is
//! invalidated (removed here directly as well). Nothing moka dropped is served from here.

use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};

use super::entry::Entry;

/// Shards: enough that concurrent readers and a writer rarely meet, and few, because a request
/// read-locks every shard its keys fall in (a batch of 100 keys locks all 16; with 64 it locked
/// ~50, each a locked instruction: measured 2 % more CPU per request). At most 64: one bit
/// each in a `u64`, see [`Front::with_many`].
const SHARDS: usize = 16;

/// How much of an entry [`Front::with_many`] reads ahead: its head and the first lines of its
/// element (all of a typical ~150-byte element), each a line whose load can start at once.
const TOUCH_BYTES: usize = 192;

/// A key's digest as two words: a `u128` is 16-byte aligned, which would pad a table slot
/// with its `Arc` to 32 bytes; two `u64`s make it 24.
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

/// One slot of a shard's table: a digest and its entry, or empty (`entry` is `None`).
#[derive(Default)]
struct Bucket {
    lo: u64,
    hi: u64,
    entry: Option<Entry>,
}

const _: () = assert!(std::mem::size_of::<Bucket>() == 24);

/// One shard's table: open addressing with linear probing over 24-byte buckets, keyed by the
/// key's digest (see [`super::CacheKey`]). The digest is a keyed SipHash output, uniformly
/// spread and not steerable by a client, so its low bits are the home bucket as they are.
///
/// Why not `std`'s `HashMap`: its control bytes live apart from its buckets, so a probe is two
/// dependent cache misses (the control group, then the bucket) in a table larger than the
/// CPU's caches; here the home bucket holds the digest itself, so a probe is one miss (its
/// line, and most often nothing further: at most 3/4 full, a hit is found after 2.5 buckets
/// on average), and that line's address is known from the digest alone, so
/// [`Front::with_many`] can load all of a request's home buckets before probing any.
///
/// At most 3/4 full (so a probe always meets an empty bucket and ends); doubled when an insert
/// would pass that. Removal shifts the following run back (no tombstones), so lookups stay as
/// short as the load allows however many removals there were. Memory: 24 bytes a bucket at a
/// load between 3/8 and 3/4, ~32–64 bytes an entry (`std`'s map: 25 bytes a bucket at up to
/// 7/8). It does not shrink, as `std`'s map does not on removal either.
#[derive(Default)]
struct Table {
    buckets: Box<[Bucket]>,
    len: usize,
}

impl Table {
    fn mask(&self) -> usize {
        self.buckets.len().wrapping_sub(1)
    }

    /// The bucket a digest probes first (only when the table has buckets).
    fn home(&self, s: Slot) -> usize {
        s.lo as usize & self.mask()
    }

    /// Where `s` is stored.
    fn find(&self, s: Slot) -> Option<usize> {
        if self.buckets.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(s);
        loop {
            let b = &self.buckets[i];
            match &b.entry {
                None => return None,
                Some(_) if b.lo == s.lo && b.hi == s.hi => return Some(i),
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    fn get(&self, s: Slot) -> Option<&Entry> {
        self.find(s).and_then(|i| self.buckets[i].entry.as_ref())
    }

    /// The first words of `s`'s home bucket and of the bucket two after it: read for their
    /// side effect only (the lines' loads start, see [`Front::with_many`]). A hit is found
    /// within the first three buckets of its run most of the time, and those 72 bytes span
    /// two cache lines whenever the home bucket sits in the back half of its line: touching
    /// only the home bucket left the probe a second miss of its own, paid in turn.
    fn touch(&self, s: Slot) -> u64 {
        let home = self.home(s);
        // Wrapping: an empty table's mask is all ones, so `home` can be any value.
        let next = home.wrapping_add(2) & self.mask();
        self.buckets.get(home).map_or(0, |b| b.lo) ^ self.buckets.get(next).map_or(0, |b| b.lo)
    }

    fn insert(&mut self, s: Slot, entry: Entry) {
        if let Some(i) = self.find(s) {
            self.buckets[i].entry = Some(entry);
            return;
        }
        if (self.len + 1) * 4 > self.buckets.len() * 3 {
            self.grow();
        }
        self.place(s, entry);
        self.len += 1;
    }

    /// Puts a digest known to be absent into the first empty bucket of its run.
    fn place(&mut self, s: Slot, entry: Entry) {
        let mask = self.mask();
        let mut i = self.home(s);
        while self.buckets[i].entry.is_some() {
            i = (i + 1) & mask;
        }
        self.buckets[i] = Bucket {
            lo: s.lo,
            hi: s.hi,
            entry: Some(entry),
        };
    }

    fn grow(&mut self) {
        let size = (self.buckets.len() * 2).max(16);
        let old = std::mem::replace(
            &mut self.buckets,
            std::iter::repeat_with(Bucket::default).take(size).collect(),
        );
        for b in old.into_vec() {
            if let Some(e) = b.entry {
                self.place(Slot { lo: b.lo, hi: b.hi }, e);
            }
        }
    }

    /// Empties bucket `i` and moves back every later bucket of its run that may sit nearer its
    /// home, so no lookup passing `i` meets an empty bucket too early.
    fn remove_at(&mut self, mut hole: usize) -> Option<Entry> {
        let removed = self.buckets[hole].entry.take();
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            if self.buckets[j].entry.is_none() {
                break;
            }
            let home = self.buckets[j].lo as usize & mask;
            // The bucket at `j` may move to the hole if the hole lies on its probe path, from
            // its home up to `j` (cyclically).
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                self.buckets.swap(hole, j);
                hole = j;
            }
        }
        self.len -= usize::from(removed.is_some());
        removed
    }

    fn remove(&mut self, s: Slot) -> Option<Entry> {
        self.find(s).and_then(|i| self.remove_at(i))
    }
}

/// One shard: a reader-sharded lock, so the runtime's worker threads reading at once each
/// take a lock word of their own instead of passing one cache line between cores on every
/// read (a writer takes them all: writes are the misses, far fewer). A writer that panicked
/// leaves the table as it was before or after its one insert or removal, so a poisoned lock is
/// used as it is. (A removal's shifting, the one multi-step change, cannot panic: its indices
/// are masked.)
struct Shard(ShardedLock<Table>);

impl Default for Shard {
    fn default() -> Shard {
        Shard(ShardedLock::new(Table::default()))
    }
}

impl Shard {
    fn read(&self) -> ShardedLockReadGuard<'_, Table> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn write(&self) -> ShardedLockWriteGuard<'_, Table> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

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

    /// The entries of a whole request's keys, in order (see [`Front::with_many`]).
    pub(crate) fn get_many(
        &self,
        digests: impl Iterator<Item = u128> + Clone,
    ) -> Vec<Option<Entry>> {
        self.with_many(digests, |found| found.iter().map(|e| e.cloned()).collect())
    }

    /// `f` over the entries of a whole request's keys, in order, read in place: no entry is
    /// cloned (a count taken and dropped per entry, each a locked instruction).
    ///
    /// A hit misses the cache at least twice (the key's bucket, then its entry's lines), and
    /// when each miss sits behind a locked instruction (a shard's read lock, the count's
    /// increment) they are paid one after the other: ~300 ns per key at 100 000 entries and
    /// more. Here each shard the request needs is read-locked once, in ascending order; then
    /// every key's home bucket is read, then every key probed, then every entry found read
    /// (its head and its element's first lines, see [`TOUCH_BYTES`]), each a loop of plain
    /// loads that the CPU overlaps; only then does `f` see them (from cache by now).
    ///
    /// `f` runs under the shards' read locks, so it must not touch this map or moka (whose
    /// eviction listener writes here): it should only read the entries. No deadlock otherwise:
    /// readers take shards in ascending order and writers hold one shard at a time and take
    /// nothing else meanwhile.
    pub(crate) fn with_many<R>(
        &self,
        digests: impl Iterator<Item = u128> + Clone,
        f: impl FnOnce(&[Option<&Entry>]) -> R,
    ) -> R {
        // The shards wanted, as one bit each; locked in ascending order (no table of a guard
        // per shard to fill and drop).
        let mut wanted = 0u64;
        for d in digests.clone() {
            wanted |= 1 << shard_of(d);
        }
        let mut guards = Vec::with_capacity(wanted.count_ones() as usize);
        // Where each wanted shard's guard is in `guards` (a table lookup per key, no counting).
        let mut at = [0u8; SHARDS];
        let mut bits = wanted;
        while bits != 0 {
            let shard = bits.trailing_zeros() as usize;
            at[shard] = guards.len() as u8;
            guards.push(self.shards[shard].read());
            bits &= bits - 1;
        }
        let tables: Vec<&Table> = guards.iter().map(|g| &**g).collect();
        let table = |d: u128| tables[usize::from(at[shard_of(d)])];
        // Touch each home bucket, then probe (from cache by now), then touch each entry, then
        // each element: each stage a loop of independent loads, so their misses overlap
        // instead of each key paying three in a row.
        let mut touched = 0usize;
        for d in digests.clone() {
            touched ^= table(d).touch(Slot::from(d)) as usize;
        }
        let found: Vec<Option<&Entry>> = digests.map(|d| table(d).get(Slot::from(d))).collect();
        for e in found.iter().flatten() {
            touched ^= e.touch(TOUCH_BYTES);
        }
        std::hint::black_box(touched);
        f(&found)
    }

    /// The entry stored under the key with this digest, if any.
    pub(crate) fn get(&self, digest: u128) -> Option<Entry> {
        self.shard(digest).read().get(Slot::from(digest)).cloned()
    }

    pub(crate) fn insert(&self, digest: u128, entry: Entry) {
        self.shard(digest).write().insert(Slot::from(digest), entry);
    }

    /// Removes the key's entry if it is still `entry` (moka's removal notices).
    pub(crate) fn remove_if_same(&self, digest: u128, entry: &Entry) {
        let mut shard = self.shard(digest).write();
        let slot = Slot::from(digest);
        if shard.get(slot).is_some_and(|e| Entry::ptr_eq(e, entry)) {
            shard.remove(slot);
        }
    }

    /// Removes whatever the key holds (invalidation).
    pub(crate) fn remove(&self, digest: u128) {
        self.shard(digest).write().remove(Slot::from(digest));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::answer::{Answer, ElementCode};
    use crate::cache::entry::Policy;
    use std::collections::HashMap;
    use std::time::Duration;
    use tokio::time::Instant;

    fn entry() -> Entry {
        Policy::fresh_only(Duration::from_secs(60), Duration::from_secs(60))
            .entry(
                Answer {
                    code: ElementCode::NotFound,
                    element: None,
                },
                Instant::now(),
                None,
            )
            .0
    }

    /// A small deterministic generator (xorshift), so a failure replays.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Checks the table against a `HashMap` after every step: each key finds exactly its
    /// entry, absent keys find nothing, and the count agrees.
    fn agrees(t: &Table, model: &HashMap<(u64, u64), Entry>, probes: &[Slot]) {
        assert_eq!(t.len, model.len());
        for s in probes {
            match (t.get(*s), model.get(&(s.lo, s.hi))) {
                (Some(a), Some(b)) => assert!(Entry::ptr_eq(a, b)),
                (None, None) => {}
                (a, b) => panic!(
                    "digest {:x}/{:x}: table {} model {}",
                    s.lo,
                    s.hi,
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
        let stored = t.buckets.iter().filter(|b| b.entry.is_some()).count();
        assert_eq!(stored, t.len);
        assert!(t.buckets.is_empty() || t.len * 4 <= t.buckets.len() * 3);
    }

    #[test]
    fn table_finds_what_was_put_through_inserts_replacements_and_removals() {
        // Keys drawn from a small pool of low halves (many share a home bucket and runs wrap
        // around the table's end) with different high halves, so runs are long and a removal
        // shifts entries whose homes lie before and after the hole.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut t = Table::default();
        let mut model = HashMap::new();
        let pool: Vec<Slot> = (0..400)
            .map(|i| Slot {
                lo: if i % 3 == 0 {
                    u64::MAX - (i % 7)
                } else {
                    rng.next() % 64
                },
                hi: i,
            })
            .collect();
        for step in 0..20_000 {
            let s = pool[(rng.next() % pool.len() as u64) as usize];
            match rng.next() % 3 {
                0 | 1 => {
                    let e = entry();
                    t.insert(s, e.clone());
                    model.insert((s.lo, s.hi), e);
                }
                _ => {
                    let removed = t.remove(s);
                    let expected = model.remove(&(s.lo, s.hi));
                    assert_eq!(removed.is_some(), expected.is_some(), "step {step}");
                    if let (Some(a), Some(b)) = (removed, expected) {
                        assert!(Entry::ptr_eq(&a, &b));
                    }
                }
            }
            if step % 97 == 0 {
                agrees(&t, &model, &pool);
            }
        }
        agrees(&t, &model, &pool);
        // Emptied, it finds nothing and stays usable.
        for s in &pool {
            t.remove(*s);
            model.remove(&(s.lo, s.hi));
        }
        agrees(&t, &model, &pool);
        let e = entry();
        t.insert(pool[0], e.clone());
        assert!(Entry::ptr_eq(t.get(pool[0]).expect("found"), &e));
    }

    /// Touching reads nothing from an empty table, and never overflows, whatever the digest.
    #[test]
    fn touching_an_empty_table_reads_nothing() {
        let t = Table::default();
        for lo in [0, 1, u64::MAX - 2, u64::MAX - 1, u64::MAX] {
            assert_eq!(t.touch(Slot { lo, hi: 7 }), 0);
            assert!(t.get(Slot { lo, hi: 7 }).is_none());
        }
    }

    /// Readers that hold several shards at once and writers that change them, on many
    /// threads: all of them finish, and a reader only ever finds, under a key, nothing or an
    /// entry stored under that key, while removals shift the runs it probes (the keys share
    /// few home buckets in every shard, so the runs are long). Checked by mutation: comparing
    /// only a digest's low half fails the second; a writer holding two shards at once
    /// deadlocks against these readers, and the watchdog fails the test. (Readers locking in
    /// request order instead of ascending order did not deadlock in three runs: with
    /// crossbeam's `ShardedLock` each reader takes its own thread's sub-lock and a writer all
    /// of them in order, so this test does not catch that one.)
    #[test]
    fn readers_of_many_shards_and_writers_neither_deadlock_nor_mix_keys() {
        use std::sync::{mpsc, Arc};
        const KEYS: usize = 256;
        /// What every thread reads: the map, the keys, and the two entries each key may hold
        /// (and nothing else).
        struct Shared {
            front: Front,
            digests: Vec<u128>,
            candidates: Vec<[Entry; 2]>,
        }
        let mut rng = Rng(0x5eed);
        let shared = Arc::new(Shared {
            front: Front::default(),
            digests: (0..KEYS)
                .map(|_| (u128::from(rng.next()) << 64) | u128::from(rng.next() % 32))
                .collect(),
            candidates: (0..KEYS).map(|_| [entry(), entry()]).collect(),
        });
        let (done, finished) = mpsc::channel::<()>();
        // Runs `work` on a thread of its own, which says when it is done.
        let spawn = |work: Box<dyn FnOnce(&Shared) + Send>| {
            let (shared, done) = (shared.clone(), done.clone());
            std::thread::spawn(move || {
                work(&shared);
                let _ = done.send(());
            })
        };
        let mut threads = Vec::new();
        for r in 0..4u64 {
            threads.push(spawn(Box::new(move |s: &Shared| {
                let mut rng = Rng(0x1000 + r);
                for _ in 0..3_000 {
                    let picked: Vec<usize> = (0..20)
                        .map(|_| (rng.next() % KEYS as u64) as usize)
                        .collect();
                    s.front
                        .with_many(picked.iter().map(|&k| s.digests[k]), |found| {
                            for (&k, e) in picked.iter().zip(found) {
                                if let Some(e) = e {
                                    assert!(
                                        s.candidates[k].iter().any(|c| Entry::ptr_eq(c, e)),
                                        "key {k} found another key's entry"
                                    );
                                }
                            }
                        });
                }
            })));
        }
        for w in 0..2u64 {
            threads.push(spawn(Box::new(move |s: &Shared| {
                let mut rng = Rng(0x2000 + w);
                for _ in 0..20_000 {
                    let k = (rng.next() % KEYS as u64) as usize;
                    match rng.next() % 3 {
                        0 => s.front.remove(s.digests[k]),
                        n => s
                            .front
                            .insert(s.digests[k], s.candidates[k][n as usize - 1].clone()),
                    }
                }
            })));
        }
        drop(done);
        for _ in 0..threads.len() {
            match finished.recv_timeout(Duration::from_secs(60)) {
                Ok(()) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("readers and writers still running after 60 s: a deadlock")
                }
                // A thread panicked: joined below, which reports it.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        for t in threads {
            t.join().expect("a reader or writer failed");
        }
        // What is left is exactly what the last writes left: every key found holds one of
        // its own entries.
        for (k, d) in shared.digests.iter().enumerate() {
            if let Some(e) = shared.front.get(*d) {
                assert!(shared.candidates[k].iter().any(|c| Entry::ptr_eq(c, &e)));
            }
        }
    }

    #[test]
    fn get_many_answers_in_order_across_shards() {
        let front = Front::default();
        let mut rng = Rng(7);
        let digests: Vec<u128> = (0..500)
            .map(|_| (u128::from(rng.next()) << 64) | u128::from(rng.next()))
            .collect();
        let entries: Vec<Entry> = digests.iter().map(|_| entry()).collect();
        for (d, e) in digests.iter().zip(&entries).step_by(2) {
            front.insert(*d, e.clone());
        }
        // Every other digest is absent; one present digest is asked twice.
        let mut asked = digests.clone();
        asked.push(digests[0]);
        let got = front.get_many(asked.iter().copied());
        assert_eq!(got.len(), asked.len());
        for (i, g) in got.iter().enumerate() {
            let k = i % digests.len();
            match g {
                Some(e) => {
                    assert_eq!(k % 2, 0, "position {i}");
                    assert!(Entry::ptr_eq(e, &entries[k]));
                }
                None => assert_eq!(k % 2, 1, "position {i}"),
            }
        }
        assert_eq!(front.len(), 250);
    }
}
