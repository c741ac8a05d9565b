//! What happened to one query, gathered as it is served and counted once at the end.

use crate::api::request::Op;
use crate::cache::Entry;
use crate::metrics::labels::{LookupOutcome, RequestOutcome, Route, StaleReason};
use crate::metrics::Label;

/// The counts of one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueryOutcome {
    /// Known once the body is parsed (or read from the memo).
    pub(crate) op: Option<Op>,
    /// Distinct identifiers, by how they were found (indexed like [`LookupOutcome::ALL`]).
    lookups: [u64; 7],
    pub(crate) stale_revalidate: u64,
    pub(crate) stale_error: u64,
    pub(crate) refreshes_started: u64,
    pub(crate) memo_hit: bool,
    /// The memo saw this body lately (see [`super::memo::Recall::Seen`]): worth memoizing.
    pub(crate) memo_seen: bool,
    pub(crate) request: RequestOutcome,
    /// The answer's `retCode`, when this path made the answer (see [`super::handle`]).
    pub(crate) ret_code: Option<i64>,
}

impl Default for QueryOutcome {
    fn default() -> Self {
        QueryOutcome {
            op: None,
            lookups: [0; 7],
            stale_revalidate: 0,
            stale_error: 0,
            refreshes_started: 0,
            memo_hit: false,
            memo_seen: false,
            request: RequestOutcome::Invalid,
            ret_code: None,
        }
    }
}

impl QueryOutcome {
    pub(crate) fn add(&mut self, outcome: LookupOutcome, n: u64) {
        if let Some(i) = LookupOutcome::ALL.iter().position(|o| *o == outcome) {
            self.lookups[i] += n;
        }
    }

    /// A fresh entry of this sidecar's cache answered one distinct identifier.
    pub(crate) fn add_fresh_hit(&mut self, entry: &Entry) {
        let o = if entry.is_negative() {
            LookupOutcome::NegativeHit
        } else {
            LookupOutcome::Hit
        };
        self.add(o, 1);
    }

    pub(crate) fn get(&self, outcome: LookupOutcome) -> u64 {
        LookupOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.lookups[i])
    }

    /// Counts everything, once.
    pub(crate) fn emit(&self, proxy: &super::super::Proxy, seconds: f64) {
        let qm = &proxy.query_metrics;
        if let Some(op) = self.op {
            for (outcome, n) in LookupOutcome::ALL.iter().zip(self.lookups) {
                qm.lookups.inc_by(op.label(), *outcome, n);
            }
        }
        qm.stale_served
            .inc_by(StaleReason::Revalidate, self.stale_revalidate);
        qm.stale_served.inc_by(StaleReason::Error, self.stale_error);
        qm.refreshes.inc_by(self.refreshes_started);
        if self.memo_hit {
            qm.memo_hits.inc();
        }
        proxy.metrics.request(Route::Query, self.request, seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_outcome() {
        let mut o = QueryOutcome::default();
        o.add(LookupOutcome::Hit, 2);
        o.add(LookupOutcome::Miss, 1);
        o.add(LookupOutcome::Hit, 1);
        assert_eq!(o.get(LookupOutcome::Hit), 3);
        assert_eq!(o.get(LookupOutcome::Miss), 1);
        assert_eq!(o.get(LookupOutcome::Coalesced), 0);
    }
}
