//! A cached answer, what a lookup finds, the cacheability policy, and the clock it runs on.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::api::answer::{Answer, ElementCode};

/// One cached answer.
#[derive(Debug)]
pub struct Entry {
    pub answer: Answer,
    /// End of the fresh period, on [`Clock`] time. The stale periods after it are the
    /// policy's, the same for every entry, so they are not stored (see [`Policy::classify`]).
    pub fresh_until: Instant,
    /// How long moka keeps it (on moka's own clock), so memory is reclaimed: whole seconds,
    /// rounded up (see [`Entry::keep`]).
    keep_secs: u32,
    /// How many of its hits moka was told of, counted up to a few (see
    /// [`crate::cache::Store::read`]).
    pub(crate) recorded: AtomicU32,
}

impl Entry {
    pub fn is_negative(&self) -> bool {
        matches!(self.answer.code, ElementCode::NotFound)
    }

    /// How long moka keeps it: to the end of its last stale period, rounded up to a second
    /// (the lookup itself goes by [`Entry::fresh_until`] and the policy, to the nanosecond).
    pub fn keep(&self) -> Duration {
        Duration::from_secs(u64::from(self.keep_secs))
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// Within its lifetime.
    Fresh(Arc<Entry>),
    /// Past its lifetime but within stale-while-revalidate: serve it and refresh in background.
    Revalidate(Arc<Entry>),
    /// Past stale-while-revalidate but within stale-if-error: fetch, and serve this only if the
    /// upstream cannot answer.
    StaleIfError(Arc<Entry>),
    Miss,
}

/// The time the cache logic runs on: tokio's clock (so `tokio::time::pause` applies) plus a
/// manual offset that tests can advance without pausing the runtime their servers run on.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_nanos: Arc<AtomicU64>,
}

impl Clock {
    pub fn now(&self) -> Instant {
        Instant::now() + Duration::from_nanos(self.offset_nanos.load(Ordering::Relaxed))
    }
    /// Moves this clock forward (tests).
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.offset_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Which answers may be cached, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// Lifetimes are shortened by a random share of up to this fraction.
    pub ttl_jitter: f64,
}

impl Policy {
    /// A policy with the given lifetimes and no stale periods or jitter (tests).
    pub fn fresh_only(ttl: Duration, negative_ttl: Duration) -> Policy {
        Policy {
            ttl,
            negative_ttl,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            ttl_jitter: 0.0,
        }
    }

    /// `lifetime` shortened by up to `ttl_jitter` of itself (never lengthened, so the configured
    /// TTL stays the upper bound on staleness).
    fn jittered(&self, lifetime: Duration) -> Duration {
        if self.ttl_jitter <= 0.0 {
            return lifetime;
        }
        lifetime.mul_f64(1.0 - self.ttl_jitter * fastrand::f64())
    }

    /// `"0"` with an element → `ttl`; `"10110008"` → `negative_ttl` (0 = not cached);
    /// anything else (including `"0"` without an element, which the docs do not describe) → never.
    pub fn lifetime(&self, answer: &Answer) -> Option<Duration> {
        match (&answer.code, &answer.element) {
            (ElementCode::Ok, Some(_)) => Some(self.ttl),
            (ElementCode::Ok, None) => None,
            (ElementCode::NotFound, _) if !self.negative_ttl.is_zero() => Some(self.negative_ttl),
            (ElementCode::NotFound, _) => None,
            (ElementCode::Other(_), _) => None,
        }
    }
}

impl Policy {
    /// An entry for `answer` written at `now`: fresh for the policy's lifetime (jittered), or
    /// for `fresh_for` when the answer comes from the shared tier with that much left.
    /// `None` when the policy does not cache it at all.
    pub fn entry(
        &self,
        answer: Answer,
        now: Instant,
        fresh_for: Option<Duration>,
    ) -> (Arc<Entry>, bool) {
        let lifetime = self.lifetime(&answer);
        let fresh = match (lifetime, fresh_for) {
            (Some(l), Some(left)) => left.min(l),
            (Some(l), None) => self.jittered(l),
            (None, _) => Duration::ZERO,
        };
        let keep = fresh + self.keep_after_fresh();
        let entry = Arc::new(Entry {
            answer,
            fresh_until: now + fresh,
            keep_secs: u32::try_from(keep.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u32::MAX),
            recorded: AtomicU32::new(0),
        });
        (entry, lifetime.is_some())
    }

    /// What `entry` is worth at `now`: fresh, within stale-while-revalidate, within
    /// stale-if-error, or past all of them.
    pub fn classify(&self, entry: Arc<Entry>, now: Instant) -> Lookup {
        if now < entry.fresh_until {
            return Lookup::Fresh(entry);
        }
        let past = now.saturating_duration_since(entry.fresh_until);
        if past < self.stale_while_revalidate {
            Lookup::Revalidate(entry)
        } else if past < self.keep_after_fresh() {
            Lookup::StaleIfError(entry)
        } else {
            Lookup::Miss
        }
    }

    /// How long entries are kept after their fresh period (the longer stale window).
    pub fn keep_after_fresh(&self) -> Duration {
        self.stale_while_revalidate.max(self.stale_if_error)
    }
}
