//! The fetcher's metrics.

use prometheus::{IntCounter, IntGauge, Registry};

use crate::metrics::register;

#[derive(Debug, Clone)]
pub(crate) struct FetchMetrics {
    /// Set at each scrape from the flights in the air.
    pub(crate) inflight: IntGauge,
    pub(crate) discarded: IntCounter,
}

impl FetchMetrics {
    pub(crate) fn register(r: &Registry) -> prometheus::Result<FetchMetrics> {
        Ok(FetchMetrics {
            inflight: register(
                r,
                IntGauge::new(
                    "tpns_cache_inflight_fetches",
                    "Identifiers being fetched from the upstream right now.",
                )?,
            )?,
            discarded: register(
                r,
                IntCounter::new(
                    "tpns_cache_fetch_discarded_total",
                    "Fetched answers not cached because a write to their app happened while in flight.",
                )?,
            )?,
        })
    }
}
