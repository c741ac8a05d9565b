//! The response memo: apps ask the same batch again and again, so the stitched answer of a
//! request that was served entirely from fresh cache entries is kept, keyed by the credential
//! and the exact request body. A later identical request from a still-accepted credential gets
//! those bytes without parsing, splitting or looking anything up.
//!
//! It is never staler than the entries it was built from: it is valid only until the earliest
//! of their fresh periods ends, and only while its app has had no write or purge since (the
//! app's write epoch, see [`crate::cache::index::Index::epoch`]). Bounded by
//! `cache.memo_max_bytes`; the keys are chosen by accepted credentials only.

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

pub(crate) struct Memo {
    cache: moka::sync::Cache<MemoKey, Arc<Memoized>, foldhash::fast::RandomState>,
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
                u32::try_from(k.body.len() + v.body.len() + 256).unwrap_or(u32::MAX)
            })
            .time_to_live(longest_lifetime.max(Duration::from_secs(1)))
            .build_with_hasher(foldhash::fast::RandomState::default());
        Some(Memo { cache })
    }

    /// The memoized answer for this credential and body, if one is still valid at `now` for
    /// an app whose current write epoch is given by `epoch_of`.
    pub(crate) fn get(
        &self,
        fingerprint: &[u8; 32],
        body: &Bytes,
        now: Instant,
        epoch_of: impl FnOnce(&Arc<str>) -> u64,
    ) -> Option<Arc<Memoized>> {
        let key = MemoKey {
            fingerprint: *fingerprint,
            body: body.clone(),
        };
        let m = self.cache.get(&key)?;
        if now < m.fresh_until && epoch_of(&m.access_id) == m.epoch {
            Some(m)
        } else {
            self.cache.invalidate(&key);
            None
        }
    }

    pub(crate) fn put(&self, fingerprint: [u8; 32], body: Bytes, m: Memoized) {
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

    #[tokio::test(start_paused = true)]
    async fn valid_only_while_fresh_and_unwritten() {
        let memo = Memo::new(1 << 20, Duration::from_secs(60)).expect("on");
        let fp = [7u8; 32];
        let body = Bytes::from_static(b"{\"operator_type\":2}");
        memo.put(fp, body.clone(), memoized(Duration::from_secs(10), 3));
        assert!(memo.get(&fp, &body, Instant::now(), |_| 3).is_some());
        assert!(
            memo.get(&[8u8; 32], &body, Instant::now(), |_| 3).is_none(),
            "other credential"
        );
        assert!(memo
            .get(&fp, &Bytes::from_static(b"{}"), Instant::now(), |_| 3)
            .is_none());
        assert!(
            memo.get(&fp, &body, Instant::now(), |_| 4).is_none(),
            "a write happened"
        );
        memo.put(fp, body.clone(), memoized(Duration::from_secs(10), 3));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            memo.get(&fp, &body, Instant::now(), |_| 3).is_none(),
            "no longer fresh"
        );
        assert!(Memo::new(0, Duration::from_secs(1)).is_none());
    }
}
