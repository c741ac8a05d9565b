//! The upstream shield: every upstream query call asks [`Shield::admit`] first, and reports how
//! it went with [`Shield::record`]. One place decides whether a call may go:
//!
//! - the cool-down after an upstream 1008028 (of the app, or of one credential the upstream had
//!   not accepted yet: a bad credential must not cool a whole app down);
//! - the circuit breaker ([`breaker`]) after consecutive upstream failures;
//! - the quotas, sharing one wait of at most `shield.max_wait`: the share for credentials not
//!   accepted yet (`shield.unverified_share`, so a flood of wrong secrets cannot spend the good
//!   ones' quota), the fleet's quota in Redis (or, while Redis is away, a local share of it),
//!   then this sidecar's limiter ([`limiter`]);
//! - for a retry after a connection error: the retry budget ([`retry`]), then the same quotas.

pub(crate) mod breaker;
pub(crate) mod limiter;
pub(crate) mod metrics;
pub(crate) mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::api::error::UpstreamError;
use crate::config::Config;
use crate::fleet::quota::{Denied as FleetDenied, FleetQuota};
use crate::metrics::labels::RejectReason;
use crate::metrics::Label;
use breaker::{Breaker, BreakerState, Permit};
use limiter::{Denied, LimiterConfig, UpstreamLimiter};
use retry::RetryBudget;

pub(crate) use metrics::ShieldMetrics;

/// A keyed hash of one credential (see [`crate::proxy::auth`]).
pub(crate) type Fingerprint = [u8; 32];

/// Most cool-downs remembered at once (apps of accepted credentials, and credentials).
const MAX_COOLDOWNS: usize = 10_000;

/// Who a cool-down applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Cooled {
    App(Arc<str>),
    Credential(Fingerprint),
}

/// One upstream call the shield is asked about.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call<'a> {
    pub(crate) app: &'a Arc<str>,
    pub(crate) credential: &'a Fingerprint,
    pub(crate) identifiers: usize,
    /// Whether the upstream has accepted the credential recently.
    pub(crate) verified: bool,
}

/// Which attempt of a call is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    First,
    /// After a connection error: only within the retry budget.
    Retry,
}

/// Permission for a call. For a first attempt it carries the breaker's permit, which
/// [`Shield::record`] settles.
#[derive(Debug)]
pub(crate) struct Admission<'a> {
    permit: Option<Permit<'a>>,
}

/// How a call went, as the shield counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The upstream answered (per-element results, or a refusal of the whole call other than
    /// 1008028): it is up.
    Answered,
    /// The upstream answered 1008028.
    RateLimited,
    /// No usable answer; `breaker_failure` says whether the breaker counts it.
    Failed { breaker_failure: bool },
}

pub(crate) struct Shield {
    cooldowns: Mutex<HashMap<Cooled, tokio::time::Instant>>,
    cooldown: Duration,
    breaker: Breaker,
    limiter: UpstreamLimiter,
    unverified: UpstreamLimiter,
    /// Fleet mode: the fleet's quota, and the local share used while Redis is away.
    fleet: Option<(FleetQuota, UpstreamLimiter)>,
    retry: RetryBudget,
    max_wait: Duration,
    metrics: ShieldMetrics,
}

impl std::fmt::Debug for Shield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shield")
            .field("limiter", &self.limiter)
            .field("breaker", &self.breaker.state())
            .field("fleet", &self.fleet.is_some())
            .finish_non_exhaustive()
    }
}

impl Shield {
    /// The shield for `config`; `fleet` carries the fleet's quota in fleet mode.
    pub(crate) fn new(
        config: &Config,
        fleet: Option<FleetQuota>,
        metrics: ShieldMetrics,
    ) -> Shield {
        let s = &config.shield;
        let local = if fleet.is_some() {
            config.redis.local_share
        } else {
            1.0
        };
        let share = |rate: u32, of: f64| {
            if rate == 0 {
                0
            } else {
                ((f64::from(rate) * of).ceil() as u32).max(1)
            }
        };
        let limiter = |calls_per_second, burst, per_app| {
            UpstreamLimiter::new(LimiterConfig {
                calls_per_second,
                burst,
                per_app_calls_per_second: per_app,
                identifiers_per_second: 0,
                max_wait: s.max_wait,
                max_queue: s.max_queue,
            })
        };
        let unverified = limiter(
            share(s.calls_per_second, s.unverified_share * local),
            share(s.burst, s.unverified_share * local),
            0,
        );
        let fleet = fleet.map(|q| {
            let fallback = limiter(share(s.calls_per_second, local), share(s.burst, local), 0);
            (q, fallback)
        });
        let limiter = UpstreamLimiter::new(LimiterConfig {
            // In fleet mode the whole-upstream rate is the fleet's, kept in Redis.
            calls_per_second: if fleet.is_some() {
                0
            } else {
                s.calls_per_second
            },
            burst: s.burst,
            per_app_calls_per_second: s.per_app_calls_per_second,
            identifiers_per_second: s.identifiers_per_second,
            max_wait: s.max_wait,
            max_queue: s.max_queue,
        });
        Shield {
            cooldowns: Mutex::new(HashMap::new()),
            cooldown: s.rate_limited_cooldown,
            breaker: Breaker::new(s.breaker_failures, s.breaker_open_for),
            limiter,
            unverified,
            fleet,
            retry: RetryBudget::new(s.retry_budget_ratio),
            max_wait: s.max_wait,
            metrics,
        }
    }

    /// Whether `call` may go now (after at most `shield.max_wait` for its quotas). Refusals
    /// are counted and carry what the client is told.
    pub(crate) async fn admit(
        &self,
        call: &Call<'_>,
        attempt: Attempt,
    ) -> Result<Admission<'_>, UpstreamError> {
        let permit = match attempt {
            Attempt::First => {
                if let Some(left) = self.cooldown_left(call.app, call.credential) {
                    self.metrics.limiter_rejections.inc(RejectReason::Cooldown);
                    return Err(UpstreamError::RateLimited {
                        retry_after: left,
                        reason: "cooldown after upstream 1008028",
                    });
                }
                let permit = self.breaker.allow().map_err(UpstreamError::CircuitOpen)?;
                self.retry.deposit();
                Some(permit)
            }
            Attempt::Retry => {
                if !self.retry.try_withdraw() {
                    return Err(UpstreamError::RateLimited {
                        retry_after: Duration::from_secs(1),
                        reason: "retry budget",
                    });
                }
                None
            }
        };
        match self.quotas(call).await {
            Ok(()) => {
                if attempt == Attempt::Retry {
                    self.metrics.retries.inc();
                }
                Ok(Admission { permit })
            }
            Err((wait, reason)) => {
                self.metrics.limiter_rejections.inc(reason);
                Err(UpstreamError::RateLimited {
                    retry_after: wait.max(Duration::from_secs(1)),
                    reason: reason.as_str(),
                })
            }
        }
    }

    /// The quotas of one admission, sharing one wait of at most `shield.max_wait`.
    async fn quotas(&self, call: &Call<'_>) -> Result<(), (Duration, RejectReason)> {
        let started = tokio::time::Instant::now();
        let left = || self.max_wait.saturating_sub(started.elapsed());
        let denied = |d: Denied| {
            (
                d.retry_after(),
                match d {
                    Denied::QueueFull => RejectReason::QueueFull,
                    Denied::MaxWait(_) => RejectReason::MaxWait,
                },
            )
        };
        let (app, n) = (call.app, call.identifiers);
        if !call.verified {
            self.unverified
                .acquire_within(app, n, left())
                .await
                .map_err(|d| (d.retry_after(), RejectReason::UnverifiedShare))?;
        }
        if let Some((fleet, fallback)) = &self.fleet {
            match fleet.acquire(left()).await {
                Ok(_) => {}
                Err(FleetDenied::Quota(wait)) => return Err((wait, RejectReason::FleetQuota)),
                Err(FleetDenied::Unavailable) => {
                    fleet.link().metrics().fallbacks.inc();
                    fallback
                        .acquire_within(app, n, left())
                        .await
                        .map_err(denied)?;
                }
            }
        }
        self.limiter
            .acquire_within(app, n, left())
            .await
            .map_err(denied)?;
        self.metrics
            .limiter_wait_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Settles a first attempt's admission: the breaker counts the outcome, and an upstream
    /// 1008028 starts a cool-down (of the app for a verified credential, else of the
    /// credential alone).
    pub(crate) fn record(&self, admission: Admission<'_>, call: &Call<'_>, outcome: Outcome) {
        if outcome == Outcome::RateLimited {
            self.start_cooldown(if call.verified {
                Cooled::App(call.app.clone())
            } else {
                Cooled::Credential(*call.credential)
            });
        }
        if let Some(permit) = admission.permit {
            let alive = !matches!(
                outcome,
                Outcome::Failed {
                    breaker_failure: true
                }
            );
            if let Some(to) = permit.record(alive) {
                tracing::warn!(state = ?to, "upstream circuit breaker changed state");
                if to == BreakerState::Open {
                    self.metrics.breaker_opens.inc();
                }
            }
        }
        self.metrics
            .breaker_state
            .set(self.breaker.state().as_gauge());
    }

    /// Time left in the cool-down of `app` or of `credential`, if either is in one.
    pub(crate) fn cooldown_left(
        &self,
        app: &Arc<str>,
        credential: &Fingerprint,
    ) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        let map = self.cooldowns.lock();
        [Cooled::App(app.clone()), Cooled::Credential(*credential)]
            .iter()
            .filter_map(|k| map.get(k))
            .filter(|until| **until > now)
            .map(|until| *until - now)
            .max()
    }

    fn start_cooldown(&self, who: Cooled) {
        if self.cooldown.is_zero() {
            return;
        }
        let now = tokio::time::Instant::now();
        let mut map = self.cooldowns.lock();
        if map.len() >= MAX_COOLDOWNS {
            map.retain(|_, until| *until > now);
        }
        if map.len() < MAX_COOLDOWNS {
            map.insert(who, now + self.cooldown);
        }
    }

    pub(crate) fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Longest a call may wait for its quotas.
    pub(crate) fn max_wait(&self) -> Duration {
        self.max_wait
    }

    pub(crate) fn metrics(&self) -> &ShieldMetrics {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shield(tweak: impl FnOnce(&mut Config)) -> Shield {
        let mut c = Config::default();
        tweak(&mut c);
        let metrics = ShieldMetrics::register(&prometheus::Registry::new()).expect("metrics");
        Shield::new(&c, None, metrics)
    }

    fn call<'a>(app: &'a Arc<str>, fp: &'a Fingerprint, verified: bool) -> Call<'a> {
        Call {
            app,
            credential: fp,
            identifiers: 1,
            verified,
        }
    }

    fn rejected(s: &Shield, reason: RejectReason) -> u64 {
        s.metrics.limiter_rejections.get(reason)
    }

    #[tokio::test]
    async fn calls_for_unverified_credentials_take_their_own_share_first() {
        let s = shield(|c| {
            c.shield.calls_per_second = 10;
            c.shield.burst = 10;
            c.shield.unverified_share = 0.2;
            c.shield.max_wait = Duration::ZERO;
        });
        let (app, good, bad): (Arc<str>, Fingerprint, Fingerprint) =
            (Arc::from("a"), [1; 32], [2; 32]);
        // The unverified share's burst is 2 (20 % of 10).
        for _ in 0..2 {
            let a = s
                .admit(&call(&app, &bad, false), Attempt::First)
                .await
                .expect("within share");
            s.record(a, &call(&app, &bad, false), Outcome::Answered);
        }
        assert!(s
            .admit(&call(&app, &bad, false), Attempt::First)
            .await
            .is_err());
        assert_eq!(rejected(&s, RejectReason::UnverifiedShare), 1);
        // The verified credential still has the rest of the burst.
        for _ in 0..8 {
            let a = s
                .admit(&call(&app, &good, true), Attempt::First)
                .await
                .expect("quota left");
            s.record(a, &call(&app, &good, true), Outcome::Answered);
        }
        assert!(s
            .admit(&call(&app, &good, true), Attempt::First)
            .await
            .is_err());
        assert_eq!(rejected(&s, RejectReason::MaxWait), 1);
    }

    #[tokio::test]
    async fn an_upstream_1008028_cools_the_app_or_only_the_credential() {
        let s = shield(|c| c.shield.rate_limited_cooldown = Duration::from_secs(30));
        let (app, good, bad): (Arc<str>, Fingerprint, Fingerprint) =
            (Arc::from("a"), [1; 32], [2; 32]);
        let unverified = call(&app, &bad, false);
        let a = s
            .admit(&unverified, Attempt::First)
            .await
            .expect("admitted");
        s.record(a, &unverified, Outcome::RateLimited);
        assert!(s.cooldown_left(&app, &bad).is_some());
        let verified = call(&app, &good, true);
        let a = s
            .admit(&verified, Attempt::First)
            .await
            .expect("the app is not cooled");
        s.record(a, &verified, Outcome::RateLimited);
        let refused = s
            .admit(&call(&app, &[3; 32], true), Attempt::First)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, UpstreamError::RateLimited { .. }),
            "{refused:?}"
        );
        assert_eq!(rejected(&s, RejectReason::Cooldown), 1);
    }

    #[tokio::test]
    async fn the_breaker_opens_on_failures_it_counts_and_fails_fast() {
        let s = shield(|c| {
            c.shield.breaker_failures = 2;
            c.shield.breaker_open_for = Duration::from_secs(60);
        });
        let (app, fp): (Arc<str>, Fingerprint) = (Arc::from("a"), [1; 32]);
        let c = call(&app, &fp, true);
        for _ in 0..3 {
            // A 4xx the breaker does not count.
            let a = s.admit(&c, Attempt::First).await.expect("closed");
            s.record(
                a,
                &c,
                Outcome::Failed {
                    breaker_failure: false,
                },
            );
        }
        for _ in 0..2 {
            let a = s.admit(&c, Attempt::First).await.expect("closed");
            s.record(
                a,
                &c,
                Outcome::Failed {
                    breaker_failure: true,
                },
            );
        }
        assert!(matches!(
            s.admit(&c, Attempt::First).await.unwrap_err(),
            UpstreamError::CircuitOpen(_)
        ));
        assert_eq!(s.breaker_state(), BreakerState::Open);
        assert_eq!(s.metrics.breaker_opens.get(), 1);
    }

    #[tokio::test]
    async fn a_retry_spends_the_budget_and_the_same_quotas() {
        let s = shield(|c| {
            c.shield.retry_budget_ratio = 0.5;
            c.shield.calls_per_second = 1;
            c.shield.burst = 2;
            c.shield.max_wait = Duration::ZERO;
        });
        let (app, fp): (Arc<str>, Fingerprint) = (Arc::from("a"), [1; 32]);
        let c = call(&app, &fp, true);
        let first = s.admit(&c, Attempt::First).await.expect("first");
        // The starting balance (1) plus half a retry earned by the first call.
        assert!(
            s.admit(&c, Attempt::Retry).await.is_ok(),
            "within budget and quota"
        );
        assert_eq!(s.metrics.retries.get(), 1);
        // The budget has half a retry left: refused without touching the quota.
        assert!(s.admit(&c, Attempt::Retry).await.is_err());
        s.record(first, &c, Outcome::Answered);
        // A retry with budget but no quota left is refused by the quota.
        let s2 = shield(|c| {
            c.shield.calls_per_second = 1;
            c.shield.burst = 1;
            c.shield.max_wait = Duration::ZERO;
        });
        let first = s2.admit(&c, Attempt::First).await.expect("first");
        assert!(s2.admit(&c, Attempt::Retry).await.is_err());
        assert_eq!(s2.metrics.limiter_rejections.get(RejectReason::MaxWait), 1);
        s2.record(first, &c, Outcome::Answered);
    }
}
