//! The response memo: apps ask the same batch again and again, so the stitched answer of a
//! request that was served entirely from fresh cache entries is kept, keyed by the credential
//! and the exact request body. A later identical request from a still-accepted credential gets
//! those bytes without parsing, splitting or looking anything up.
//!
//! It is never staler than the entries it was built from: it is valid only until the earliest
//! of their fresh periods ends, and only while its app has had no write or purge since (the
//! app's write epoch, see [`crate::cache::index::Index::epoch`]). Bounded by
//! `cache.memo_max_bytes`; the keys are chosen by accepted credentials only.
//!
//! Only a body seen before is memoized (a doorkeeper: a fixed table of the digests of recent
//! bodies, one per slot, a newer body taking an older one's slot), and a body never seen is not
//! looked for: when batches vary, as they mostly do, the memo costs one digest and one atomic
//! swap per request instead of a lookup and an insert (a copy of the answer, and moka's write
//! work) that would never be used. A body asked twice is memoized the second time and answered
//! from the memo from the third on. The table is fixed in size (64 Ki slots, 512 KiB), so the
//! keys clients choose cannot grow it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::super::status::CacheStatus;
use crate::api::request::Op;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MemoKey {
    fingerprint: [u8; 32],
    body: Bytes,
}

/// A memoized answer.
#[derive(Debug)]
pub(crate) struct Memoized {
    pub(crate) body: Bytes,
    pub(crate) cache_status: CacheStatus,
    pub(crate) ret_code: i64,
    /// The earliest end of the fresh periods of the entries it was stitched from.
    pub(crate) fresh_until: Instant,
    /// The app's write epoch when those entries were read.
    pub(crate) epoch: u64,
    pub(crate) access_id: Arc<str>,
    pub(crate) op: Op,
    /// Distinct identifiers it answers, positive and not-found (for the lookup metrics).
    pub(crate) hits: u64,
    pub(crate) negative_hits: u64,
}

/// What the memo knows of a body.
#[derive(Debug)]
pub(crate) enum Recall {
    /// A valid memoized answer.
    Hit(Arc<Memoized>),
    /// Seen lately but not (or no longer validly) memoized: worth memoizing now.
    Seen,
    /// Not seen lately.
    New,
}

/// What a memoized answer costs besides its request's and its answer's bytes (which are
/// charged an eighth more for the allocator's rounding): moka's own bookkeeping for the entry,
/// the key's and the [`Memoized`]'s blocks. Fitted to release builds' RSS growth over ~6 200
/// memoized bodies of 2, 5, 20 and 50 identifiers, three runs each (BENCHMARKS.md, "The
/// response memo's memory"): it charges more than every run measured but one (4 % less), so
/// `cache.memo_max_bytes` bounds what the memo holds.
const MEMO_ENTRY_BYTES: usize = 1000;

/// Slots of the doorkeeper (a power of two): 512 KiB.
const DOOR_SLOTS: usize = 1 << 16;

pub(crate) struct Memo {
    cache: moka::sync::Cache<MemoKey, Arc<Memoized>, foldhash::fast::RandomState>,
    /// Digests of bodies seen lately, one per slot (a newer body takes an older one's slot).
    door: Box<[std::sync::atomic::AtomicU64]>,
    hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memo")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl Memo {
    /// `None` when `max_bytes` is 0 (memo off).
    pub(crate) fn new(max_bytes: u64, longest_lifetime: Duration) -> Option<Memo> {
        if max_bytes == 0 {
            return None;
        }
        let cache = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &MemoKey, v: &Arc<Memoized>| {
                let bytes = k.body.len() + v.body.len();
                u32::try_from(bytes + bytes / 8 + MEMO_ENTRY_BYTES).unwrap_or(u32::MAX)
            })
            .time_to_live(longest_lifetime.max(Duration::from_secs(1)))
            .build_with_hasher(foldhash::fast::RandomState::default());
        Some(Memo {
            cache,
            door: (0..DOOR_SLOTS)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
        })
    }

    /// The body's digest and its doorkeeper slot.
    fn door(&self, fingerprint: &[u8; 32], body: &[u8]) -> (u64, &std::sync::atomic::AtomicU64) {
        use std::hash::BuildHasher as _;
        let digest = self.hasher.hash_one((fingerprint, body)) | 1; // never the empty slot's 0
        (digest, &self.door[(digest as usize) & (DOOR_SLOTS - 1)])
    }

    /// Notes the body as seen; returns whether it was seen lately already.
    pub(crate) fn note(&self, fingerprint: &[u8; 32], body: &[u8]) -> bool {
        let (digest, slot) = self.door(fingerprint, body);
        slot.swap(digest, std::sync::atomic::Ordering::Relaxed) == digest
    }

    /// The memoized answer for this credential and body, if one is still valid at `now` for
    /// an app whose current write epoch is given by `epoch_of`. Notes the body as seen.
    pub(crate) fn get(
        &self,
        fingerprint: &[u8; 32],
        body: &Bytes,
        now: Instant,
        epoch_of: impl FnOnce(&Arc<str>) -> u64,
    ) -> Recall {
        if !self.note(fingerprint, body) {
            return Recall::New; // not seen lately, so not memoized
        }
        let key = MemoKey {
            fingerprint: *fingerprint,
            body: body.clone(),
        };
        let Some(m) = self.cache.get(&key) else {
            return Recall::Seen;
        };
        if now < m.fresh_until && epoch_of(&m.access_id) == m.epoch {
            Recall::Hit(m)
        } else {
            self.cache.invalidate(&key);
            Recall::Seen
        }
    }

    /// Memoizes `m` for a body [`Memo::get`] found [`Recall::Seen`] (a body seen once is not).
    ///
    /// The body is copied. A request's body is a slice of its connection's read buffer (8 KiB
    /// or more), and a kept slice keeps that whole buffer alive while the weigher charges only
    /// the body's length: measured (`benches/memo-memory.sh`), 9.7 KB of RSS per memoized
    /// 5-identifier body against the 1 027 B it was charged, so `cache.memo_max_bytes` did not
    /// bound the memo's memory.
    pub(crate) fn put(&self, fingerprint: [u8; 32], body: &[u8], m: Memoized) {
        let body = Bytes::copy_from_slice(body);
        self.cache
            .insert(MemoKey { fingerprint, body }, Arc::new(m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memoized(fresh_for: Duration, epoch: u64) -> Memoized {
        Memoized {
            body: Bytes::from_static(b"{}"),
            cache_status: CacheStatus::Refused,
            ret_code: 0,
            fresh_until: Instant::now() + fresh_for,
            epoch,
            access_id: Arc::from("app"),
            op: Op::TokenAccounts,
            hits: 1,
            negative_hits: 0,
        }
    }

    fn hit(r: Recall) -> bool {
        matches!(r, Recall::Hit(_))
    }

    #[tokio::test(start_paused = true)]
    async fn valid_only_while_fresh_and_unwritten() {
        let memo = Memo::new(1 << 20, Duration::from_secs(60)).expect("on");
        let fp = [7u8; 32];
        let body = Bytes::from_static(b"{\"operator_type\":2}");
        let now = Instant::now;
        assert!(matches!(memo.get(&fp, &body, now(), |_| 3), Recall::New));
        assert!(matches!(memo.get(&fp, &body, now(), |_| 3), Recall::Seen));
        memo.put(fp, &body, memoized(Duration::from_secs(10), 3));
        assert!(hit(memo.get(&fp, &body, now(), |_| 3)));
        assert!(hit(memo.get(&fp, &body, now(), |_| 3)), "again");
        assert!(
            matches!(memo.get(&[8u8; 32], &body, now(), |_| 3), Recall::New),
            "other credential"
        );
        assert!(!hit(memo.get(
            &fp,
            &Bytes::from_static(b"{}"),
            now(),
            |_| 3
        )));
        assert!(
            matches!(memo.get(&fp, &body, now(), |_| 4), Recall::Seen),
            "a write happened"
        );
        memo.put(fp, &body, memoized(Duration::from_secs(10), 3));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            matches!(memo.get(&fp, &body, now(), |_| 3), Recall::Seen),
            "no longer fresh"
        );
        assert!(Memo::new(0, Duration::from_secs(1)).is_none());
    }

    /// A memoized body is kept as its own bytes, not as a slice of the buffer it was read
    /// into (a connection's read buffer, which the weigher does not see).
    #[test]
    fn a_memoized_body_does_not_keep_the_buffer_it_was_read_into() {
        let memo = Memo::new(1 << 20, Duration::from_secs(60)).expect("on");
        let fp = [7u8; 32];
        let read_buffer = Bytes::from(vec![b' '; 8192]);
        let body = read_buffer.slice(..100);
        assert!(matches!(
            memo.get(&fp, &body, Instant::now(), |_| 3),
            Recall::New
        ));
        memo.put(fp, &body, memoized(Duration::from_secs(10), 3));
        assert!(hit(memo.get(&fp, &body, Instant::now(), |_| 3)));
        drop(body);
        assert!(
            read_buffer.is_unique(),
            "the memo holds a slice of the read buffer"
        );
    }

    /// The doorkeeper is a fixed table: a flood of distinct bodies neither grows it nor
    /// memoizes any of them (each was seen once).
    #[test]
    fn distinct_bodies_are_not_memoized_and_do_not_grow_the_table() {
        let memo = Memo::new(1 << 20, Duration::from_secs(60)).expect("on");
        let fp = [7u8; 32];
        for i in 0..(DOOR_SLOTS * 2) {
            let body = Bytes::from(format!("{{\"n\":{i}}}"));
            assert!(matches!(
                memo.get(&fp, &body, Instant::now(), |_| 0),
                Recall::New
            ));
        }
        assert_eq!(memo.door.len(), DOOR_SLOTS);
        memo.cache.run_pending_tasks();
        assert_eq!(memo.cache.entry_count(), 0);
    }
}
