//! A cached answer, what a lookup finds, the cacheability policy, and the clock it runs on.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::api::answer::{Answer, ElementCode};

/// One cached answer.
///
/// Kept to 48 bytes, so with its `Arc`'s two counts it fills one 64-byte allocation, which the
/// allocator (mimalloc, the binary's) hands out 64-byte aligned: everything a hit reads (code,
/// element pointer, fresh end, the record count) is one cache line, one memory access.
/// Measured with `examples/hitpath`: at 72 bytes (an 80-byte block, most straddling two lines)
/// the second line was a second miss per identifier.
#[derive(Debug)]
pub struct Entry {
    pub answer: Answer,
    /// End of the fresh period, on [`Clock`] time, as signed nanoseconds from [`base`] (8
    /// bytes instead of an `Instant`'s 16; see [`Entry::fresh_until`]). The stale periods after
    /// it are the policy's, the same for every entry, so they are not stored (see
    /// [`Policy::classify`]).
    fresh_until_ns: i64,
    /// How long moka keeps it (on moka's own clock), so memory is reclaimed: whole seconds,
    /// rounded up (see [`Entry::keep`]).
    keep_secs: u32,
    /// How many of its hits moka was told of, counted up to a few (see
    /// [`crate::cache::Store::read`]).
    pub(crate) recorded: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Entry>() <= 48);

/// The instant entries' fresh ends are counted from: fixed for the process. Instants before it
/// (a paused test clock can lag it) count negative, so every instant within ±292 years is kept
/// exactly.
fn base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn to_ns(t: Instant) -> i64 {
    let base = base();
    let clamp = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    if t >= base {
        clamp(t - base)
    } else {
        -clamp(base - t)
    }
}

fn from_ns(ns: i64) -> Instant {
    let d = Duration::from_nanos(ns.unsigned_abs());
    // Only instants [`to_ns`] was given come back here, so neither can fail in practice.
    if ns >= 0 {
        base().checked_add(d)
    } else {
        base().checked_sub(d)
    }
    .unwrap_or_else(base)
}

impl Entry {
    /// End of the fresh period, on [`Clock`] time.
    pub fn fresh_until(&self) -> Instant {
        from_ns(self.fresh_until_ns)
    }

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
            fresh_until_ns: to_ns(now + fresh),
            keep_secs: u32::try_from(keep.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u32::MAX),
            recorded: AtomicU32::new(0),
        });
        (entry, lifetime.is_some())
    }

    /// What `entry` is worth at `now`: fresh, within stale-while-revalidate, within
    /// stale-if-error, or past all of them.
    pub fn classify(&self, entry: Arc<Entry>, now: Instant) -> Lookup {
        let fresh_until = entry.fresh_until();
        if now < fresh_until {
            return Lookup::Fresh(entry);
        }
        let past = now.saturating_duration_since(fresh_until);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The 8-byte fresh end gives back exactly the instant it was given, before the base too
    /// (a paused test clock can lag it).
    #[test]
    fn fresh_end_round_trips_exactly() {
        let b = base();
        let mut instants = vec![
            b,
            b + Duration::from_nanos(1),
            b + Duration::from_secs(86_400 * 365),
        ];
        instants.extend(b.checked_sub(Duration::from_nanos(1)));
        instants.extend(b.checked_sub(Duration::from_millis(1500)));
        for t in instants {
            assert_eq!(from_ns(to_ns(t)), t, "{t:?}");
        }
        assert!(to_ns(b + Duration::from_secs(1)) > to_ns(b));
    }
}
