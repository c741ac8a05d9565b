//! The upstream quota limiter: GCRA (governor) on upstream calls per second for the whole
//! upstream, optionally per AccessID, and optionally on identifiers per second; with a bounded
//! number of waiting calls and a maximum wait. A call that cannot get a permit within the wait is
//! refused at once with the time after which it could have gone (for `Retry-After`).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Limits from `shield.*` (0 = that limit is off).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LimiterConfig {
    pub(crate) calls_per_second: u32,
    pub(crate) burst: u32,
    pub(crate) per_app_calls_per_second: u32,
    pub(crate) identifiers_per_second: u32,
    pub(crate) max_wait: Duration,
    pub(crate) max_queue: usize,
}

/// Why a permit was refused (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    /// `max_queue` calls are already waiting.
    QueueFull,
    /// The next permit comes later than `max_wait` from now.
    MaxWait(Duration),
}

impl Denied {
    pub(crate) fn retry_after(self) -> Duration {
        match self {
            Denied::QueueFull => Duration::from_secs(1),
            Denied::MaxWait(d) => d.max(Duration::from_secs(1)),
        }
    }
}

pub(crate) struct UpstreamLimiter {
    global: Option<DefaultDirectRateLimiter>,
    per_app: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    identifiers: Option<(DefaultDirectRateLimiter, u32)>,
    max_wait: Duration,
    max_queue: usize,
    waiting: AtomicUsize,
    calls: AtomicU64,
    clock: DefaultClock,
}

impl std::fmt::Debug for UpstreamLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamLimiter")
            .field("global", &self.global.is_some())
            .field("per_app", &self.per_app.is_some())
            .field("identifiers", &self.identifiers.is_some())
            .field("max_wait", &self.max_wait)
            .field("max_queue", &self.max_queue)
            .finish()
    }
}

fn quota(per_second: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Some(Quota::per_second(rate).allow_burst(burst))
}

impl UpstreamLimiter {
    pub(crate) fn new(c: LimiterConfig) -> UpstreamLimiter {
        UpstreamLimiter {
            global: quota(c.calls_per_second, c.burst).map(RateLimiter::direct),
            per_app: quota(c.per_app_calls_per_second, c.burst).map(RateLimiter::keyed),
            identifiers: quota(c.identifiers_per_second, c.identifiers_per_second)
                .map(|q| (RateLimiter::direct(q), c.identifiers_per_second)),
            max_wait: c.max_wait,
            max_queue: c.max_queue,
            waiting: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            clock: DefaultClock::default(),
        }
    }

    /// Waits for a permit for one call of `identifiers` identifiers for `app`.
    /// Returns how long it waited.
    #[cfg(test)]
    pub(crate) async fn acquire(
        &self,
        app: &Arc<str>,
        identifiers: usize,
    ) -> Result<Duration, Denied> {
        self.acquire_within(app, identifiers, self.max_wait).await
    }

    /// [`UpstreamLimiter::acquire`], waiting at most `max_wait` (what is left of a wait shared
    /// with other limiters).
    pub(crate) async fn acquire_within(
        &self,
        app: &Arc<str>,
        identifiers: usize,
        max_wait: Duration,
    ) -> Result<Duration, Denied> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        if n % 4096 == 4095 {
            if let Some(l) = &self.per_app {
                // Forget apps whose state is back to "fresh", so the key set stays bounded.
                l.retain_recent();
            }
        }
        let started = tokio::time::Instant::now();
        let deadline = started + max_wait.min(self.max_wait);
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Denied::QueueFull);
        }
        let result = self.acquire_all(app, identifiers, deadline).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        result.map(|()| started.elapsed())
    }

    async fn acquire_all(
        &self,
        app: &Arc<str>,
        identifiers: usize,
        deadline: tokio::time::Instant,
    ) -> Result<(), Denied> {
        if let Some(l) = &self.global {
            self.wait(
                || l.check().map_err(|nu| nu.wait_time_from(self.clock.now())),
                deadline,
            )
            .await?;
        }
        if let Some(l) = &self.per_app {
            self.wait(
                || {
                    l.check_key(app)
                        .map_err(|nu| nu.wait_time_from(self.clock.now()))
                },
                deadline,
            )
            .await?;
        }
        if let Some((l, cap)) = &self.identifiers {
            // A call larger than the whole per-second allowance takes it all.
            let n = u32::try_from(identifiers)
                .unwrap_or(u32::MAX)
                .clamp(1, *cap);
            let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
            self.wait(
                || match l.check_n(n) {
                    Ok(r) => r.map_err(|nu| nu.wait_time_from(self.clock.now())),
                    Err(_) => Err(Duration::from_secs(1)),
                },
                deadline,
            )
            .await?;
        }
        Ok(())
    }

    async fn wait(
        &self,
        mut check: impl FnMut() -> Result<(), Duration>,
        deadline: tokio::time::Instant,
    ) -> Result<(), Denied> {
        loop {
            match check() {
                Ok(()) => return Ok(()),
                Err(wait) => {
                    let now = tokio::time::Instant::now();
                    if now + wait > deadline {
                        return Err(Denied::MaxWait(wait));
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rate: u32, burst: u32, max_wait_ms: u64) -> LimiterConfig {
        LimiterConfig {
            calls_per_second: rate,
            burst,
            per_app_calls_per_second: 0,
            identifiers_per_second: 0,
            max_wait: Duration::from_millis(max_wait_ms),
            max_queue: 100,
        }
    }

    #[tokio::test]
    async fn burst_then_refuses_past_max_wait() {
        let l = UpstreamLimiter::new(cfg(1, 3, 0));
        let app: Arc<str> = Arc::from("a");
        for _ in 0..3 {
            l.acquire(&app, 1).await.expect("within burst");
        }
        match l.acquire(&app, 1).await {
            Err(Denied::MaxWait(d)) => assert!(d > Duration::from_millis(500), "{d:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn waits_when_the_wait_is_short_enough() {
        let l = UpstreamLimiter::new(cfg(50, 1, 1000));
        let app: Arc<str> = Arc::from("a");
        l.acquire(&app, 1).await.expect("first");
        let waited = l.acquire(&app, 1).await.expect("second waits ~20ms");
        assert!(waited >= Duration::from_millis(5), "{waited:?}");
    }

    #[tokio::test]
    async fn queue_is_bounded() {
        let mut c = cfg(1, 1, 60_000);
        c.max_queue = 0;
        let l = UpstreamLimiter::new(c);
        assert_eq!(l.acquire(&Arc::from("a"), 1).await, Err(Denied::QueueFull));
    }

    #[tokio::test]
    async fn per_app_limits_are_separate() {
        let l = UpstreamLimiter::new(LimiterConfig {
            calls_per_second: 0,
            burst: 1,
            per_app_calls_per_second: 1,
            identifiers_per_second: 0,
            max_wait: Duration::ZERO,
            max_queue: 10,
        });
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        l.acquire(&a, 1).await.expect("a");
        l.acquire(&b, 1).await.expect("b has its own bucket");
        assert!(l.acquire(&a, 1).await.is_err());
    }

    #[tokio::test]
    async fn identifiers_per_second() {
        let l = UpstreamLimiter::new(LimiterConfig {
            calls_per_second: 0,
            burst: 1,
            per_app_calls_per_second: 0,
            identifiers_per_second: 100,
            max_wait: Duration::ZERO,
            max_queue: 10,
        });
        let a: Arc<str> = Arc::from("a");
        l.acquire(&a, 60).await.expect("60 of 100");
        assert!(l.acquire(&a, 60).await.is_err(), "120 > 100 in one second");
        // Larger than the allowance: takes it all rather than never passing.
        let l2 = UpstreamLimiter::new(LimiterConfig {
            identifiers_per_second: 10,
            ..cfg(0, 1, 0)
        });
        l2.acquire(&a, 500).await.expect("clamped to the allowance");
    }

    #[test]
    fn no_limits_configured() {
        let l = UpstreamLimiter::new(cfg(0, 0, 0));
        assert!(l.global.is_none() && l.per_app.is_none() && l.identifiers.is_none());
    }
}
