//! The in-process tier: moka as the cache of record (byte budget through the weigher, per-entry
//! lifetimes, admission and eviction, and an eviction listener that keeps the reverse index and
//! the read map in step), read through [`Front`].
//!
//! Reads go to the front map; moka is told of a read (a moka `get`, which feeds its frequency
//! sketch and access order) for every miss and, once the cache holds half its budget, for the
//! first [`RECORDED_IN_FULL`] hits on each entry and one in [`RECORD_EVERY`] hits after that.
//! moka's admission and eviction compare how often the entry coming in (a miss, always
//! counted) and the coldest entries were asked for, so the reads that decide between them, an
//! entry's first few, all reach it; the repeated reads of warm and hot entries are sampled, and
//! those are the reads that cost most (one moka read is ~1.4 µs at 100 000 entries) and tell
//! moka least. Caffeine and moka themselves drop read records under load for the same reason.
//! Measured with `loadgen --scenario zipf` (BENCHMARKS.md): sampling every hit 1 in 16 alone
//! cost 3 points of hit ratio (0.893× Bélády); counting the first hits in full keeps it where
//! moka alone was. With the first three counted, one in 32 after them holds it there too
//! (0.911–0.912× over three traces, above LRU each time; with the first two, one in 32 fell
//! below LRU), and halves what the sampled reads cost a hit.
//!
//! Below half its budget no hit is sent at all, an entry's first ones included: moka itself
//! keeps no frequency sketch until a cache reaches half its capacity
//! (`should_enable_frequency_sketch` in moka 0.12), and no admission or eviction is decided
//! until it is full, so those reads would only reorder its access-order queue for a decision
//! that is not near. An entry's hits are counted from half the budget on, so its first
//! [`RECORDED_IN_FULL`] hits after that point, when the sketch exists, are the ones moka sees
//! in full. From half the budget on, it takes at least as many bytes of new entries as the
//! cache already holds before anything is evicted, and the hits of that stretch are what moka
//! decides with. A cache sized with room for its working set (the default 256 MiB holds
//! ~340 000 identifiers of ~150-byte answers) serves its hits without touching moka at all.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use moka::Expiry;
use tokio::time::Instant;

use super::entry::{Clock, Entry, Lookup, Policy, ENTRY_FIXED_BYTES};
use super::front::Front;
use super::index::{bound_names, Index, INDEX_BYTES_PER_ENTRY};
use super::key::{CacheKey, KeyDigest, Kind, StoredKey, STORED_KEY_FIXED_BYTES};
use crate::api::answer::Answer;
use crate::metrics::labels::EvictionCause;
use crate::metrics::Counter1;

/// A write to an app in progress (see [`Store::begin_write`]).
#[derive(Debug)]
pub struct WriteGuard<'a> {
    index: &'a Index,
    app: Arc<str>,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.index.bump_epoch(&self.app);
    }
}

/// Fixed bytes per entry beyond the name and the element: the stored key's fixed part (its
/// name is inline), the entry's fixed part (its element is inline), moka's own bookkeeping
/// (deque nodes, hash table slot, frequency sketch), the reverse index, and the allocator's
/// rounding. Calibrated with `examples/memprobe.rs` so
/// that `cache.max_bytes` tracks the process's real memory growth.
const ENTRY_OVERHEAD_BYTES: usize =
    STORED_KEY_FIXED_BYTES + ENTRY_FIXED_BYTES + MOKA_BYTES_PER_ENTRY + INDEX_BYTES_PER_ENTRY;
/// moka's own bookkeeping per entry (~330 B with per-entry expiry, `memprobe moka`),
/// the read map's slot with its table's slack, and the allocator's rounding (mimalloc, the
/// binary's allocator): calibrated with `examples/memprobe.rs` at 100 000 and 1 000 000 entries.
const MOKA_BYTES_PER_ENTRY: usize = 425;

/// What the cache charges against `cache.max_bytes` for one entry: everything it pins, which
/// is its stored key (with the identifier's name) and its entry (with the element). A stored
/// key keeps no AccessID or top-level field (see [`StoredKey`]), so nothing else is pinned.
pub fn weigh<K: Keyed>(key: &K, entry: &Entry) -> u32 {
    let bytes = ENTRY_OVERHEAD_BYTES + key.name_bytes() + entry.element().map_or(0, <[u8]>::len);
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

struct EntryExpiry;

impl Expiry<StoredKey, Entry> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &StoredKey,
        value: &Entry,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.keep())
    }
    fn expire_after_update(
        &self,
        _key: &StoredKey,
        value: &Entry,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.keep())
    }
}

/// A key as [`Store::invalidate`] and [`weigh`] see it: one the store was given, or what it
/// stored of it.
pub trait Keyed {
    fn digest(&self) -> u128;
    /// Bytes of the identifier's name (what a stored key keeps inline).
    fn name_bytes(&self) -> usize;
}

impl Keyed for CacheKey {
    fn digest(&self) -> u128 {
        CacheKey::digest(self)
    }
    fn name_bytes(&self) -> usize {
        self.ident.name().len()
    }
}

impl Keyed for StoredKey {
    fn digest(&self) -> u128 {
        StoredKey::digest(self)
    }
    fn name_bytes(&self) -> usize {
        StoredKey::name_bytes(self)
    }
}

/// The in-process tier: moka with a byte budget and per-entry lifetimes.
/// Seeded per process, so keys chosen by clients cannot be made to collide on purpose, and much
/// cheaper than SipHash on the hit path.
type KeyHasher = foldhash::fast::RandomState;

/// After its first [`RECORDED_IN_FULL`] hits, one hit of an entry in this many is passed on to
/// moka (a power of two).
pub const RECORD_EVERY: u32 = 32;
/// Hits of an entry that are all passed on to moka.
pub const RECORDED_IN_FULL: u32 = 3;

/// Whether moka should see this hit on `entry`; none does while hits are not being sent
/// (`sampling` false: below half the budget, see the module's notes), and an entry's hits
/// are counted only while they are.
fn record_hit(entry: &Entry, sampling: bool) -> bool {
    if !sampling {
        return false;
    }
    // A plain load and store, no read-modify-write: readers racing may lose a count, which
    // only makes the sample a little sparser.
    let n = entry.recorded().load(Ordering::Relaxed);
    if n < RECORDED_IN_FULL {
        entry.recorded().store(n + 1, Ordering::Relaxed);
        return true;
    }
    thread_local! {
        static READS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    READS.with(|r| {
        let n = r.get().wrapping_add(1);
        r.set(n);
        n % RECORD_EVERY == 0
    })
}

#[derive(Clone)]
pub struct Store {
    cache: Cache<StoredKey, Entry, KeyHasher>,
    front: Arc<Front>,
    policy: Policy,
    clock: Clock,
    index: Arc<Index>,
    /// From this weight on, sampled hits are sent to moka (half the budget: see the module's
    /// notes).
    sample_from: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("entries", &self.cache.entry_count())
            .field("policy", &self.policy)
            .finish()
    }
}

impl Store {
    pub fn new(max_bytes: u64, policy: Policy, clock: Clock) -> Store {
        Store::with_eviction_counter(max_bytes, policy, clock, None)
    }

    /// A store that counts removals by cause.
    pub(crate) fn with_eviction_counter(
        max_bytes: u64,
        policy: Policy,
        clock: Clock,
        evictions: Option<Counter1<EvictionCause>>,
    ) -> Store {
        let index = Arc::new(Index::default());
        let front = Arc::new(Front::default());
        let listener_index = index.clone();
        let listener_front = front.clone();
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(weigh::<StoredKey>)
            .expire_after(EntryExpiry)
            .eviction_listener(move |key: Arc<StoredKey>, entry: Entry, cause| {
                listener_front.remove_if_same(key.digest(), &entry);
                listener_index.remove(&key, &entry);
                if let Some(c) = &evictions {
                    use moka::notification::RemovalCause as R;
                    c.inc(match cause {
                        R::Expired => EvictionCause::Expired,
                        R::Size => EvictionCause::Size,
                        R::Explicit => EvictionCause::Explicit,
                        R::Replaced => EvictionCause::Replaced,
                    });
                }
            })
            .build_with_hasher(KeyHasher::default());
        Store {
            cache,
            front,
            policy,
            clock,
            index,
            sample_from: max_bytes / 2,
        }
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Starts a write to (or purge of) `app`: its write epoch moves now, so fetches in flight
    /// will not store what they bring back, and again when the guard drops, after the caller's
    /// removals, so an answer memoized in between from entries about to be removed is not
    /// valid either.
    pub fn begin_write(&self, app: &Arc<str>) -> WriteGuard<'_> {
        self.index.bump_epoch(app);
        WriteGuard {
            index: &self.index,
            app: app.clone(),
        }
    }

    pub async fn get(&self, key: &CacheKey) -> Lookup {
        self.read(key.digest(), self.clock.now())
    }

    /// A lookup of the key with this digest as of `now` (one clock read serves a whole
    /// request). A digest is all a lookup needs (see [`CacheKey`]): hits build no key.
    pub fn read(&self, digest: u128, now: Instant) -> Lookup {
        self.classify(digest, self.front.get(digest), now, self.samples_hits())
    }

    /// Whether sampled hits are sent to moka now: once the cache holds half its budget (see
    /// the module's notes). One atomic load of moka's weighted size, current as of its last
    /// housekeeping.
    pub fn samples_hits(&self) -> bool {
        self.cache.weighted_size() >= self.sample_from
    }

    /// [`Store::read`] for every key of a request, with the read map probed for all of them
    /// at once (see [`Front::get_many`]).
    pub fn read_many(&self, digests: &[u128], now: Instant) -> Vec<Lookup> {
        let entries = self.front.get_many(digests.iter().copied());
        let sampling = self.samples_hits();
        digests
            .iter()
            .zip(entries)
            .map(|(&digest, entry)| self.classify(digest, entry, now, sampling))
            .collect()
    }

    /// When every key with these digests holds an entry fresh at `now`: `f` over those
    /// entries, in order, read in place under the read map's locks (see [`Front::with_many`]:
    /// no entry cloned, so `f` must only read them), and afterwards moka told of the hits it
    /// should see, as [`Store::read_many`] tells it. `None`, with nothing recorded, as soon as
    /// one is missing or not fresh (the caller then takes the general path, whose
    /// [`Store::read_many`] records what it finds).
    pub fn with_all_fresh<R>(
        &self,
        digests: &[u128],
        now: Instant,
        f: impl FnOnce(&[&Entry]) -> R,
    ) -> Option<R> {
        let sampling = self.samples_hits();
        let mut tell_moka: Vec<u128> = Vec::new();
        let out = self.front.with_many(digests.iter().copied(), |found| {
            let mut fresh: Vec<&Entry> = Vec::with_capacity(found.len());
            for e in found {
                let e = (*e)?;
                if !e.has_kept_code() || !e.is_fresh_at(now) {
                    return None;
                }
                fresh.push(e);
            }
            for (&digest, e) in digests.iter().zip(&fresh) {
                if record_hit(e, sampling) {
                    tell_moka.push(digest);
                }
            }
            Some(f(&fresh))
        })?;
        // Outside the read map's locks: moka's housekeeping may run its eviction listener,
        // which writes to the read map.
        for digest in tell_moka {
            let _ = self.cache.get(&KeyDigest::of(digest));
        }
        Some(out)
    }

    /// What a read of the key with this digest that found `entry` in the read map means at
    /// `now`; tells moka of the read when it should see it (see the module's notes). moka is
    /// probed with the digest alone (a key hashes and compares as its digest).
    fn classify(&self, digest: u128, entry: Option<Entry>, now: Instant, sampling: bool) -> Lookup {
        let Some(entry) = entry else {
            // moka counts every miss (see the module's notes)
            let _ = self.cache.get(&KeyDigest::of(digest));
            return Lookup::Miss;
        };
        if record_hit(&entry, sampling) {
            let _ = self.cache.get(&KeyDigest::of(digest));
        }
        if !entry.has_kept_code() {
            return Lookup::Miss;
        }
        self.policy.classify(entry, now)
    }

    /// Wraps an upstream answer into an entry and stores it when the policy allows, unless a
    /// write to its app happened since `epoch` (see [`Index::epoch`]): the answer may predate
    /// the write. Returns the entry either way (the caller stitches with it) and whether it was
    /// discarded for that reason.
    pub async fn put_since(&self, key: CacheKey, answer: Answer, epoch: u64) -> (Entry, bool) {
        self.put_since_with(key, answer, epoch, None).await
    }

    /// [`Store::put_fresh_for`], unless a write to its app happened since `epoch` (as
    /// [`Store::put_since`]): a value promoted from the shared tier may predate a local write.
    pub async fn put_fresh_for_since(
        &self,
        key: CacheKey,
        answer: Answer,
        fresh: Duration,
        epoch: u64,
    ) -> (Entry, bool) {
        self.put_since_with(key, answer, epoch, Some(fresh)).await
    }

    async fn put_since_with(
        &self,
        key: CacheKey,
        answer: Answer,
        epoch: u64,
        fresh_for: Option<Duration>,
    ) -> (Entry, bool) {
        if self.index.epoch(&key.access_id) != epoch {
            return (self.put_with(None, answer, fresh_for).await, true);
        }
        let app = key.access_id.clone();
        let check = key.clone();
        let entry = self.put_with(Some(key), answer, fresh_for).await;
        // A write may have slipped in between the check and the insert; its invalidation may
        // have run before the insert. Looking again closes that gap.
        if self.index.epoch(&app) != epoch {
            self.front.remove(check.digest());
            self.cache.invalidate(&KeyDigest::of(check.digest()));
            return (entry, true);
        }
        (entry, false)
    }

    /// Stores unconditionally (see [`Store::put_since`]): for tools and tests that do not
    /// purge while they store (a purge relies on the epoch check `put_since` does).
    pub async fn put(&self, key: CacheKey, answer: Answer) -> Entry {
        self.put_with(Some(key), answer, None).await
    }

    /// Stores an answer from the fleet's shared tier with the fresh time it has left there.
    pub async fn put_fresh_for(&self, key: CacheKey, answer: Answer, fresh: Duration) -> Entry {
        self.put_with(Some(key), answer, Some(fresh)).await
    }

    async fn put_with(
        &self,
        key: Option<CacheKey>,
        answer: Answer,
        fresh_for: Option<Duration>,
    ) -> Entry {
        let (entry, cacheable) = self.policy.entry(answer, self.clock.now(), fresh_for);
        if let (Some(key), true) = (key, cacheable) {
            let key = StoredKey::new(&key, self.index.app_tag(&key.access_id));
            self.index.add(&key, &entry);
            // The read map first: moka's removal notice for this entry (a rejection, an
            // eviction) may come at once and must find it.
            self.front.insert(key.digest(), entry.clone());
            self.cache.insert(key, entry.clone());
        }
        entry
    }

    /// Every key of `app` that a write naming these tokens and accounts can make wrong: their
    /// own entries, the entries their own elements list, and the entries that list them.
    pub async fn affected(
        &self,
        app: &Arc<str>,
        tokens: &[String],
        accounts: &[String],
    ) -> Vec<StoredKey> {
        let named = self.name_hashes(app, tokens, accounts);
        let mut keys = self.index.keys_for(&named);
        let mut related = self.index.listed_by(&named);
        for k in &keys {
            if let Some(entry) = self.front.get(k.digest()) {
                let kind = k.kind();
                related.extend(
                    bound_names(kind, &entry)
                        .iter()
                        .map(|b| self.index.name_hash(k.app(), kind.other(), b)),
                );
            }
        }
        keys.extend(self.index.keys_for(&related));
        let mut seen = std::collections::HashSet::with_capacity(keys.len());
        keys.retain(|k| seen.insert(k.clone()));
        keys
    }

    /// Only the keys carrying exactly these names (operator purges).
    pub fn named(&self, app: &Arc<str>, tokens: &[String], accounts: &[String]) -> Vec<StoredKey> {
        self.index
            .keys_for(&self.name_hashes(app, tokens, accounts))
    }

    fn name_hashes(&self, app: &Arc<str>, tokens: &[String], accounts: &[String]) -> Vec<u64> {
        let app = self.index.app_tag(app);
        tokens
            .iter()
            .map(|t| self.index.name_hash(app, Kind::Token, t))
            .chain(
                accounts
                    .iter()
                    .map(|a| self.index.name_hash(app, Kind::Account, a)),
            )
            .collect()
    }

    /// Drops these keys (stored keys, or the keys they were stored under). Returns how many
    /// were present.
    pub async fn invalidate<K: Keyed>(&self, keys: &[K]) -> usize {
        let mut n = 0;
        for k in keys {
            let digest = k.digest();
            self.front.remove(digest);
            if self.cache.remove(&KeyDigest::of(digest)).is_some() {
                n += 1;
            }
        }
        n
    }

    /// Drops every entry of `access_id`; returns the identifiers dropped.
    pub async fn purge_app(&self, access_id: &str) -> Vec<StoredKey> {
        let app = self.index.app_tag(access_id);
        let keys: Vec<StoredKey> = self
            .cache
            .iter()
            .filter(|(k, _)| k.app() == app)
            .map(|(k, _)| (*k).clone())
            .collect();
        let mut dropped = Vec::with_capacity(keys.len());
        for k in keys {
            self.front.remove(k.digest());
            if self.cache.remove(&k).is_some() {
                dropped.push(k);
            }
        }
        // An entry stored while this ran is not missed: stores that go by an epoch
        // ([`Store::put_since`]) look at it again after inserting into moka, and the purge
        // moved it before listing moka's keys, so either the store sees the move and takes its
        // entry out, or its insert happened before the move and is in the list.
        dropped
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    pub fn weighted_bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Lets moka apply pending writes and evictions (so the counts above are current).
    pub async fn sync(&self) {
        self.cache.run_pending_tasks();
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// How long entries are kept after their fresh period (the longer stale window).
    pub fn keep_after_fresh(&self) -> Duration {
        self.policy.keep_after_fresh()
    }
}

#[cfg(test)]
#[path = "local_tests.rs"]
mod tests;
