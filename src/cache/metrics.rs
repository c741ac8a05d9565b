//! Cache metrics: size (set at each scrape), removals by cause, invalidations by source.

use prometheus::{IntGauge, Registry};

use crate::metrics::labels::{EvictionCause, InvalidationSource};
use crate::metrics::{register, Counter1};

#[derive(Debug, Clone)]
pub(crate) struct CacheMetrics {
    pub(crate) entries: IntGauge,
    pub(crate) weighted_bytes: IntGauge,
    pub(crate) evictions: Counter1<EvictionCause>,
    pub(crate) invalidated: Counter1<InvalidationSource>,
}

impl CacheMetrics {
    pub(crate) fn register(r: &Registry) -> prometheus::Result<CacheMetrics> {
        Ok(CacheMetrics {
            entries: register(
                r,
                IntGauge::new("tpns_cache_entries", "Entries in the in-process cache.")?,
            )?,
            weighted_bytes: register(
                r,
                IntGauge::new(
                    "tpns_cache_weighted_bytes",
                    "Weighted size of the in-process cache in bytes (bounded by cache.max_bytes).",
                )?,
            )?,
            evictions: Counter1::register(
                r,
                "tpns_cache_evictions_total",
                "Entries leaving the cache, by cause",
            )?,
            invalidated: Counter1::register(
                r,
                "tpns_cache_invalidated_entries_total",
                "Cache entries dropped by writes and purges, by source",
            )?,
        })
    }
}
