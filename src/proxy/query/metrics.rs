//! What the cached query path counts: how each distinct identifier was found, stale answers,
//! background refreshes, answers from the memo.

use prometheus::{IntCounter, Registry};

use crate::metrics::labels::{LookupOutcome, OpLabel, StaleReason};
use crate::metrics::{register, Counter1, Counter2};

#[derive(Debug, Clone)]
pub(crate) struct QueryMetrics {
    pub(crate) lookups: Counter2<OpLabel, LookupOutcome>,
    pub(crate) stale_served: Counter1<StaleReason>,
    pub(crate) refreshes: IntCounter,
    pub(crate) memo_hits: IntCounter,
}

impl QueryMetrics {
    pub(crate) fn register(r: &Registry) -> prometheus::Result<QueryMetrics> {
        Ok(QueryMetrics {
            lookups: Counter2::register(
                r,
                "tpns_cache_lookups_total",
                "Distinct identifiers looked up per query request, by operator type and outcome",
            )?,
            stale_served: Counter1::register(
                r,
                "tpns_cache_stale_served_total",
                "Identifiers answered from an entry past its lifetime, by reason (revalidate: stale-while-revalidate; error: stale-if-error)",
            )?,
            refreshes: register(
                r,
                IntCounter::new(
                    "tpns_cache_background_refreshes_total",
                    "Background fetches started for stale-while-revalidate entries.",
                )?,
            )?,
            memo_hits: register(
                r,
                IntCounter::new(
                    "tpns_cache_memo_hits_total",
                    "Requests answered from the response memo (repeated, fully cached batches).",
                )?,
            )?,
        })
    }
}
