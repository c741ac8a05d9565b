//! The shield's metrics: waits and refusals of the quotas, the breaker, retries.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

use crate::metrics::labels::RejectReason;
use crate::metrics::{register, Counter1, LATENCY_BUCKETS};

#[derive(Debug, Clone)]
pub(crate) struct ShieldMetrics {
    pub(crate) limiter_wait_seconds: Histogram,
    pub(crate) limiter_rejections: Counter1<RejectReason>,
    pub(crate) breaker_state: IntGauge,
    pub(crate) breaker_opens: IntCounter,
    pub(crate) retries: IntCounter,
}

impl ShieldMetrics {
    pub(crate) fn register(r: &Registry) -> prometheus::Result<ShieldMetrics> {
        Ok(ShieldMetrics {
            limiter_wait_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tpns_cache_limiter_wait_seconds",
                        "Time upstream calls waited for their quotas (granted calls).",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )?,
            )?,
            limiter_rejections: Counter1::register(
                r,
                "tpns_cache_limiter_rejections_total",
                "Upstream calls not made for quota reasons",
            )?,
            breaker_state: register(
                r,
                IntGauge::new(
                    "tpns_cache_breaker_state",
                    "Upstream circuit breaker: 0 closed, 1 half-open, 2 open.",
                )?,
            )?,
            breaker_opens: register(
                r,
                IntCounter::new(
                    "tpns_cache_breaker_opens_total",
                    "Times the upstream circuit breaker opened.",
                )?,
            )?,
            retries: register(
                r,
                IntCounter::new(
                    "tpns_cache_upstream_retries_total",
                    "Upstream query sub-requests retried after a connection error (within the budget).",
                )?,
            )?,
        })
    }
}
