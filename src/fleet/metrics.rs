//! Fleet-mode metrics, registered only when `redis.url` is set (so a sidecar alone does not
//! export a `tpns_cache_redis_up` of 0 that reads like an outage).

use prometheus::{IntCounter, IntGauge, Registry};

use crate::metrics::register;

#[derive(Debug, Clone)]
pub(crate) struct FleetMetrics {
    pub(crate) redis_up: IntGauge,
    pub(crate) redis_errors: IntCounter,
    pub(crate) fallbacks: IntCounter,
    pub(crate) redis_writes: IntCounter,
    pub(crate) lease_waits: IntCounter,
}

impl FleetMetrics {
    pub(crate) fn register(r: &Registry) -> prometheus::Result<FleetMetrics> {
        Ok(FleetMetrics {
            redis_up: register(
                r,
                IntGauge::new(
                    "tpns_cache_redis_up",
                    "Fleet mode: 1 while Redis answers, 0 while it does not (or is not reached yet).",
                )?,
            )?,
            redis_errors: register(
                r,
                IntCounter::new(
                    "tpns_cache_redis_errors_total",
                    "Fleet mode: Redis calls that failed or timed out.",
                )?,
            )?,
            fallbacks: register(
                r,
                IntCounter::new(
                    "tpns_cache_fleet_fallbacks_total",
                    "Fleet mode: upstream calls admitted by the local fallback limiter because Redis was unavailable.",
                )?,
            )?,
            redis_writes: register(
                r,
                IntCounter::new(
                    "tpns_cache_redis_writes_total",
                    "Fleet mode: answers written to the shared tier.",
                )?,
            )?,
            lease_waits: register(
                r,
                IntCounter::new(
                    "tpns_cache_fleet_lease_waits_total",
                    "Fleet mode: identifiers another sidecar was fetching, answered from the shared tier instead of fetched again.",
                )?,
            )?,
        })
    }
}
