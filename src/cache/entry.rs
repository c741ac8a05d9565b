//! A cached answer, what a lookup finds, the cacheability policy, and the clock it runs on.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use triomphe::ThinArc;

use tokio::time::Instant;

use crate::api::answer::{Answer, ElementCode};

/// One cached answer: a handle (one pointer, cloned by one count increment) to a single
/// allocation holding everything a hit reads: the element code, the fresh end, the record
/// count, and the element's JSON text itself, inline after them.
///
/// Why inline: with the element in an allocation of its own, a hit loads the entry, and only
/// then knows where the element is: two dependent memory accesses per identifier in a cache
/// larger than the CPU's (and, at a million entries, two page walks). Here the element's
/// address is the entry's plus a fixed offset, so `Front::with_many` (`cache::front`) starts
/// loading all of an entry's lines at once, and one allocation (one count, one length, one
/// allocator rounding) replaces two. The element is kept as bytes: it is always the text of a
/// JSON value (see [`Entry::element_str`]), and the hit path copies it into the response as
/// bytes without checking it again.
#[derive(Clone)]
pub struct Entry(ThinArc<Head, u8>);

/// The fixed part of an [`Entry`] (32 bytes; with the allocation's count and the element's
/// length, 48 before the element's first byte).
struct Head {
    code: ElementCode,
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
    recorded: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Head>() == 32);

/// An entry's bytes before its element: the allocation's count, the `Head`, the element's
/// length (what the weigher charges besides the element itself).
pub const ENTRY_FIXED_BYTES: usize = 8 + std::mem::size_of::<Head>() + 8;
const _: () = assert!(std::mem::size_of::<Option<Entry>>() == 8);

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("code", self.code())
            .field("element", &self.element_str())
            .field("fresh_until_ns", &self.head().fresh_until_ns)
            .field("keep_secs", &self.head().keep_secs)
            .finish()
    }
}

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
    fn new(answer: Answer, fresh_until_ns: i64, keep_secs: u32) -> Entry {
        let Answer { code, element } = answer;
        let text = element.as_deref().map_or(&[][..], |e| e.get().as_bytes());
        let head = Head {
            code,
            fresh_until_ns,
            keep_secs,
            recorded: AtomicU32::new(0),
        };
        Entry(ThinArc::from_header_and_slice(head, text))
    }

    fn head(&self) -> &Head {
        &self.0.header.header
    }

    pub fn code(&self) -> &ElementCode {
        &self.head().code
    }

    /// The element's JSON text, as the upstream sent it (`None`: the answer had no element).
    /// A JSON value is never empty, so the empty slice stands for none.
    pub fn element(&self) -> Option<&[u8]> {
        let text = &self.0.slice;
        (!text.is_empty()).then_some(text)
    }

    /// [`Entry::element`] as text. It was copied from a `RawValue`'s `str`, so it is always
    /// UTF-8; checked here anyway (off the hit path: the reverse index and the shared tier).
    pub fn element_str(&self) -> Option<&str> {
        self.element().and_then(|b| std::str::from_utf8(b).ok())
    }

    /// Whether both are the very same entry (not merely equal).
    pub fn ptr_eq(a: &Entry, b: &Entry) -> bool {
        std::ptr::addr_eq(&*a.0, &*b.0)
    }

    /// Reads the entry's lines (its head, and its element up to `max` bytes): for the side
    /// effect of starting their loads, see [`super::front::Front::with_many`].
    pub(crate) fn touch(&self, max: usize) -> usize {
        let text = &self.0.slice;
        let mut sum = self.head().keep_secs as usize;
        let mut at = 32;
        while at < text.len().min(max) {
            sum ^= usize::from(text[at]);
            at += 64;
        }
        sum
    }

    /// How many of its hits moka was told of (see [`crate::cache::Store::read`]).
    pub(crate) fn recorded(&self) -> &AtomicU32 {
        &self.head().recorded
    }

    /// End of the fresh period, on [`Clock`] time.
    pub fn fresh_until(&self) -> Instant {
        from_ns(self.head().fresh_until_ns)
    }

    /// Within its fresh period at `now`.
    pub fn is_fresh_at(&self, now: Instant) -> bool {
        now < self.fresh_until()
    }

    /// Whether its code is one the cache keeps (`"0"`, not found). Another is never stored
    /// (see `Policy::lifetime`), but a lookup that met one must not guess: it is a miss.
    pub fn has_kept_code(&self) -> bool {
        !matches!(self.code(), ElementCode::Other(_))
    }

    pub fn is_negative(&self) -> bool {
        matches!(self.code(), ElementCode::NotFound)
    }

    /// How long moka keeps it: to the end of its last stale period, rounded up to a second
    /// (the lookup itself goes by [`Entry::fresh_until`] and the policy, to the nanosecond).
    pub fn keep(&self) -> Duration {
        Duration::from_secs(u64::from(self.head().keep_secs))
    }
}

impl crate::api::answer::Stitch for Entry {
    fn code(&self) -> &ElementCode {
        Entry::code(self)
    }
    fn element(&self) -> Option<&[u8]> {
        Entry::element(self)
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// Within its lifetime.
    Fresh(Entry),
    /// Past its lifetime but within stale-while-revalidate: serve it and refresh in background.
    Revalidate(Entry),
    /// Past stale-while-revalidate but within stale-if-error: fetch, and serve this only if the
    /// upstream cannot answer.
    StaleIfError(Entry),
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
    ) -> (Entry, bool) {
        let lifetime = self.lifetime(&answer);
        let fresh = match (lifetime, fresh_for) {
            (Some(l), Some(left)) => left.min(l),
            (Some(l), None) => self.jittered(l),
            (None, _) => Duration::ZERO,
        };
        let keep = fresh + self.keep_after_fresh();
        let entry = Entry::new(
            answer,
            to_ns(now + fresh),
            u32::try_from(keep.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u32::MAX),
        );
        (entry, lifetime.is_some())
    }

    /// What `entry` is worth at `now`: fresh, within stale-while-revalidate, within
    /// stale-if-error, or past all of them.
    pub fn classify(&self, entry: Entry, now: Instant) -> Lookup {
        if entry.is_fresh_at(now) {
            return Lookup::Fresh(entry);
        }
        let fresh_until = entry.fresh_until();
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

    /// An entry gives back the answer it was made from: code, element text byte for byte (or
    /// none), and it stitches exactly as that answer does.
    #[test]
    fn entry_keeps_its_answer_inline() {
        use crate::api::answer::{stitch, OtherCode};
        use crate::api::request::Op;
        let policy = Policy::fresh_only(Duration::from_secs(60), Duration::from_secs(30));
        let element = |t: &str| Some(serde_json::value::RawValue::from_string(t.into()).unwrap());
        let answers = [
            Answer {
                code: ElementCode::Ok,
                element: element(r#"{"token":"t-1","account_list":[{"account":"é✓\n"}]}"#),
            },
            Answer {
                code: ElementCode::NotFound,
                element: None,
            },
            Answer {
                code: ElementCode::Other(OtherCode::from("1008099")),
                element: element("[1, 2]"),
            },
        ];
        let now = Instant::now();
        let entries: Vec<Entry> = answers
            .iter()
            .map(|a| {
                let copy = Answer {
                    code: a.code.clone(),
                    element: a.element.clone(),
                };
                policy.entry(copy, now, None).0
            })
            .collect();
        for (a, e) in answers.iter().zip(&entries) {
            assert_eq!(e.code(), &a.code);
            assert_eq!(e.element_str(), a.element.as_deref().map(|r| r.get()));
            assert_eq!(e.is_negative(), a.code == ElementCode::NotFound);
            assert!(Entry::ptr_eq(e, &e.clone()));
        }
        assert!(!Entry::ptr_eq(
            &entries[0],
            &policy
                .entry(
                    Answer {
                        code: ElementCode::Ok,
                        element: element(r#"{"token":"t-1","account_list":[{"account":"é✓\n"}]}"#)
                    },
                    now,
                    None
                )
                .0
        ));
        assert_eq!(entries[0].fresh_until(), now + Duration::from_secs(60));
        assert_eq!(entries[1].fresh_until(), now + Duration::from_secs(30));
        for op in [Op::AccountTokens, Op::TokenAccounts] {
            assert_eq!(
                stitch(op, 1_008_026, entries.iter()),
                stitch(op, 1_008_026, answers.iter())
            );
        }
    }
}
