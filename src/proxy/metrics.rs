//! Request-level metrics of the proxy listener (every route).

use prometheus::Registry;

use crate::metrics::labels::{BypassReason, RequestOutcome, RetClass, Route};
use crate::metrics::{Counter1, Counter2, Histogram1};

#[derive(Debug, Clone)]
pub(crate) struct ProxyMetrics {
    pub(crate) requests: Counter2<Route, RequestOutcome>,
    pub(crate) duration: Histogram1<Route>,
    pub(crate) responses: Counter2<Route, RetClass>,
    pub(crate) bypass: Counter1<BypassReason>,
}

impl ProxyMetrics {
    pub(crate) fn register(r: &Registry) -> prometheus::Result<ProxyMetrics> {
        Ok(ProxyMetrics {
            requests: Counter2::register(
                r,
                "tpns_cache_requests_total",
                "Client requests by route and how the cache served them",
            )?,
            duration: Histogram1::register(
                r,
                "tpns_cache_request_duration_seconds",
                "Time from the request head to the response head, by route",
                crate::metrics::LATENCY_BUCKETS,
            )?,
            responses: Counter2::register(
                r,
                "tpns_cache_responses_total",
                "Responses by route and class: the retCode class where the proxy knows it, else the HTTP status class",
            )?,
            bypass: Counter1::register(
                r,
                "tpns_cache_query_bypass_total",
                "Queries forwarded unchanged and not cached, by reason",
            )?,
        })
    }

    /// One request done.
    pub(crate) fn request(&self, route: Route, outcome: RequestOutcome, seconds: f64) {
        self.requests.inc(route, outcome);
        self.duration.observe(route, seconds);
    }
}
