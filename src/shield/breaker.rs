//! A circuit breaker on consecutive upstream failures (transport errors, timeouts, 5xx,
//! malformed answers): after `threshold` of them it opens and fails fast for `open_for`, then lets
//! one probe through (half-open); the probe's success closes it, its failure opens it again.
//! Answers that are business refusals (HTTP 200 with a non-zero code) count as successes: the
//! upstream is alive.

use parking_lot::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub(crate) fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
pub(crate) struct Breaker {
    inner: Mutex<Inner>,
    threshold: u32,
    open_for: Duration,
}

/// Permission to make one call; report its outcome with [`Permit::record`]. A probe permit
/// dropped without a record (the call never went out) lets the next call probe instead.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Permit<'_> {
    /// Returns whether this call changed the breaker's state (for logs and metrics).
    pub(crate) fn record(mut self, success: bool) -> Option<BreakerState> {
        self.recorded = true;
        self.breaker.record(success, self.probe)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut inner = self.breaker.inner.lock();
            if let Inner::HalfOpen { probing } = &mut *inner {
                *probing = false;
            }
        }
    }
}

impl Breaker {
    /// `threshold` 0 disables the breaker.
    pub(crate) fn new(threshold: u32, open_for: Duration) -> Breaker {
        Breaker {
            inner: Mutex::new(Inner::Closed { failures: 0 }),
            threshold,
            open_for,
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        match &*self.inner.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
            Inner::Open { until } if Instant::now() >= *until => BreakerState::HalfOpen,
            Inner::Open { .. } => BreakerState::Open,
        }
    }

    /// A permit, or how long until the breaker lets a probe through.
    pub(crate) fn allow(&self) -> Result<Permit<'_>, Duration> {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        let probe = match &mut *inner {
            Inner::Closed { .. } => false,
            Inner::Open { until } if now >= *until => {
                *inner = Inner::HalfOpen { probing: true };
                true
            }
            Inner::Open { until } => return Err(*until - now),
            Inner::HalfOpen { probing: true } => return Err(Duration::from_secs(1)),
            Inner::HalfOpen { probing } => {
                *probing = true;
                true
            }
        };
        Ok(Permit {
            breaker: self,
            probe,
            recorded: false,
        })
    }

    fn record(&self, success: bool, probe: bool) -> Option<BreakerState> {
        if self.threshold == 0 {
            return None;
        }
        let mut inner = self.inner.lock();
        let now = Instant::now();
        match (&mut *inner, success) {
            (Inner::Closed { failures }, true) => {
                *failures = 0;
                None
            }
            (Inner::Closed { failures }, false) => {
                *failures += 1;
                if *failures >= self.threshold {
                    *inner = Inner::Open {
                        until: now + self.open_for,
                    };
                    Some(BreakerState::Open)
                } else {
                    None
                }
            }
            (Inner::HalfOpen { .. }, true) if probe => {
                *inner = Inner::Closed { failures: 0 };
                Some(BreakerState::Closed)
            }
            (Inner::HalfOpen { .. }, false) if probe => {
                *inner = Inner::Open {
                    until: now + self.open_for,
                };
                Some(BreakerState::Open)
            }
            // Late answers of calls admitted before the breaker opened do not move it.
            (Inner::HalfOpen { .. } | Inner::Open { .. }, _) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_probes_to_close() {
        let b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            b.allow().expect("closed").record(false);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(
            b.allow().expect("closed").record(false),
            Some(BreakerState::Open)
        );
        let wait = b.allow().expect_err("open fails fast");
        assert!(wait <= Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = b.allow().expect("half-open probe");
        assert!(b.allow().is_err(), "only one probe at a time");
        assert_eq!(probe.record(true), Some(BreakerState::Closed));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_and_success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(5));
        b.allow().unwrap().record(false);
        b.allow().unwrap().record(true);
        b.allow().unwrap().record(false);
        assert_eq!(b.state(), BreakerState::Closed, "success reset the count");
        b.allow().unwrap().record(false);
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.allow().unwrap().record(false), Some(BreakerState::Open));
        assert!(b.allow().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_probe_permit_frees_the_probe() {
        let b = Breaker::new(1, Duration::from_secs(1));
        b.allow().unwrap().record(false);
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(b.allow().expect("probe"));
        assert!(b.allow().is_ok(), "probe slot released");
    }

    #[test]
    fn threshold_zero_never_opens() {
        let b = Breaker::new(0, Duration::from_secs(1));
        for _ in 0..100 {
            b.allow().unwrap().record(false);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
