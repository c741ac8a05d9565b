//! Prometheus metrics on a registry the program owns (no global default registry).
//!
//! Every label value comes from a fixed set (`as_str()` of an enum or a `&'static str` the code
//! chooses), never from input, so cardinality is bounded.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Outcome of one distinct identifier's lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupOutcome {
    Hit,
    NegativeHit,
    /// Past its lifetime, served while one background fetch refreshes it.
    Stale,
    /// Not in this sidecar's cache, found fresh in the fleet's shared tier (Redis).
    SharedHit,
    /// Not cached, but already being fetched: waited for that fetch.
    Coalesced,
    Miss,
    /// Not looked up: the credential has not been accepted by the upstream recently.
    Unverified,
}

impl LookupOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            LookupOutcome::Hit => "hit",
            LookupOutcome::NegativeHit => "negative_hit",
            LookupOutcome::Stale => "stale",
            LookupOutcome::SharedHit => "shared_hit",
            LookupOutcome::Coalesced => "coalesced",
            LookupOutcome::Miss => "miss",
            LookupOutcome::Unverified => "unverified",
        }
    }
}

/// How a client request was served (the `cache` label of `tpns_cache_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Every identifier came from the cache: no upstream call.
    Hit,
    Partial,
    Miss,
    /// The credential was not yet verified: sent upstream whole.
    Unverified,
    /// Not cacheable (other path, or a query the proxy cannot scope): forwarded unchanged.
    Bypass,
    /// Refused by validation; nothing forwarded.
    Invalid,
    /// The upstream failed or refused the call as a whole.
    UpstreamError,
    /// The credential was refused by the upstream recently: answered 1008003 locally.
    Refused,
}

impl RequestOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Hit => "hit",
            RequestOutcome::Partial => "partial",
            RequestOutcome::Miss => "miss",
            RequestOutcome::Unverified => "unverified",
            RequestOutcome::Bypass => "bypass",
            RequestOutcome::Invalid => "invalid",
            RequestOutcome::UpstreamError => "upstream_error",
            RequestOutcome::Refused => "refused",
        }
    }
}

/// Result of one upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// Answered with per-element results.
    Ok,
    /// Answered HTTP 200 with a whole-call failure code (auth, quota, …).
    Refused,
    /// Forwarded request answered (pass-through; any status).
    Forwarded,
    Unreachable,
    Timeout,
    HttpError,
    Malformed,
    /// Not sent: the limiter or a cool-down refused it.
    RateLimited,
    /// Not sent: the breaker is open.
    CircuitOpen,
}

impl UpstreamOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamOutcome::Ok => "ok",
            UpstreamOutcome::Refused => "refused",
            UpstreamOutcome::Forwarded => "forwarded",
            UpstreamOutcome::Unreachable => "unreachable",
            UpstreamOutcome::Timeout => "timeout",
            UpstreamOutcome::HttpError => "http_error",
            UpstreamOutcome::Malformed => "malformed",
            UpstreamOutcome::RateLimited => "rate_limited",
            UpstreamOutcome::CircuitOpen => "circuit_open",
        }
    }

    pub fn of_error(e: &crate::api::error::ProxyError) -> UpstreamOutcome {
        use crate::api::error::ProxyError as E;
        match e {
            E::UpstreamTimeout(_) => UpstreamOutcome::Timeout,
            E::UpstreamStatus(_) => UpstreamOutcome::HttpError,
            E::UpstreamMalformed(_) => UpstreamOutcome::Malformed,
            E::RateLimited { .. } => UpstreamOutcome::RateLimited,
            E::CircuitOpen(_) => UpstreamOutcome::CircuitOpen,
            E::UpstreamUnreachable(_)
            | E::WaitTimeout(_)
            | E::Unparseable(_)
            | E::MissingParameter(_)
            | E::InvalidParameter(_)
            | E::BodyTooLarge { .. }
            | E::ClientBody(_)
            | E::AuthFailed(_)
            | E::ClientTimeout(_)
            | E::Overloaded(_) => UpstreamOutcome::Unreachable,
        }
    }
}

/// Route label: the cached query, or anything forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Query,
    Other,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Query => "query",
            Route::Other => "other",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub lookups: IntCounterVec,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_calls: IntCounterVec,
    pub upstream_identifiers: IntCounterVec,
    pub upstream_duration: Histogram,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub build_info: IntGaugeVec,
    pub stale_served: IntCounterVec,
    pub refreshes: IntCounter,
    pub upstream_batch_size: Histogram,
    pub limiter_wait_seconds: Histogram,
    pub limiter_rejections: IntCounterVec,
    pub breaker_state: IntGauge,
    pub breaker_opens: IntCounter,
    pub retries: IntCounter,
    pub inflight_fetches: IntGauge,
    pub invalidated: IntCounterVec,
    pub fetch_discarded: IntCounter,
    pub responses: IntCounterVec,
    pub evictions: IntCounterVec,
    pub memo_hits: IntCounter,
    pub redis_up: IntGauge,
    pub redis_errors: IntCounter,
    pub fleet_fallbacks: IntCounter,
    pub redis_writes: IntCounter,
    pub lease_waits: IntCounter,
    pub query_bypass: IntCounterVec,
}

/// The `class` label of `tpns_cache_responses_total`: what a TPNS client makes of the answer.
pub fn ret_class(ret_code: i64) -> &'static str {
    use crate::api::code;
    match ret_code {
        code::OK => "ok",
        code::BATCH_PARTLY_FAILED => "batch_partial",
        code::BATCH_ALL_FAILED => "batch_failed",
        code::UNPARSEABLE | code::MISSING_PARAMETER | code::INVALID_PARAMETER => "invalid",
        code::AUTH_FAILED | code::KEY_MISMATCH => "auth",
        code::RATE_LIMITED => "rate_limited",
        code::INTERNAL_CALL_FAILED => "upstream_error",
        _ => "other",
    }
}

/// The `class` label for a response whose body the proxy did not read: its HTTP status class.
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "http_2xx",
        300..=399 => "http_3xx",
        400..=499 => "http_4xx",
        _ => "http_5xx",
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "tpns_cache_lookups_total",
                "Distinct identifiers looked up per query request, by operator type and outcome.",
            ),
            &["op", "outcome"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "tpns_cache_requests_total",
                "Client requests by route and how the cache served them.",
            ),
            &["route", "cache"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tpns_cache_request_duration_seconds",
                "Time from the request head to the response head, by route.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        let upstream_calls = IntCounterVec::new(
            Opts::new(
                "tpns_cache_upstream_requests_total",
                "Requests sent to the upstream, by route and outcome.",
            ),
            &["route", "outcome"],
        )?;
        let upstream_identifiers = IntCounterVec::new(
            Opts::new(
                "tpns_cache_upstream_identifiers_total",
                "Identifiers sent to the upstream in query sub-requests, by operator type.",
            ),
            &["op"],
        )?;
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tpns_cache_upstream_request_duration_seconds",
                "Duration of upstream query sub-requests (whole answer read).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let cache_entries =
            IntGauge::new("tpns_cache_entries", "Entries in the in-process cache.")?;
        let cache_bytes = IntGauge::new(
            "tpns_cache_weighted_bytes",
            "Weighted size of the in-process cache in bytes (bounded by cache.max_bytes).",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("tpns_cache_build_info", "Always 1; labels name the build."),
            &["version"],
        )?;
        let stale_served = IntCounterVec::new(
            Opts::new(
                "tpns_cache_stale_served_total",
                "Identifiers answered from an entry past its lifetime, by reason \
                 (revalidate: stale-while-revalidate; error: stale-if-error).",
            ),
            &["reason"],
        )?;
        let refreshes = IntCounter::new(
            "tpns_cache_background_refreshes_total",
            "Background fetches started for stale-while-revalidate entries.",
        )?;
        let upstream_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "tpns_cache_upstream_batch_size",
                "Identifiers per upstream query call (micro-batching gathers concurrent misses).",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
            ]),
        )?;
        let limiter_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tpns_cache_limiter_wait_seconds",
                "Time upstream calls waited for the quota limiter (granted calls).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let limiter_rejections = IntCounterVec::new(
            Opts::new(
                "tpns_cache_limiter_rejections_total",
                "Upstream calls not made for quota reasons (queue_full, max_wait, cooldown, \
                 fleet_quota, unverified_share).",
            ),
            &["reason"],
        )?;
        let breaker_state = IntGauge::new(
            "tpns_cache_breaker_state",
            "Upstream circuit breaker: 0 closed, 1 half-open, 2 open.",
        )?;
        let breaker_opens = IntCounter::new(
            "tpns_cache_breaker_opens_total",
            "Times the upstream circuit breaker opened.",
        )?;
        let retries = IntCounter::new(
            "tpns_cache_upstream_retries_total",
            "Upstream query sub-requests retried after a connection error (within the budget).",
        )?;
        let inflight_fetches = IntGauge::new(
            "tpns_cache_inflight_fetches",
            "Identifiers being fetched from the upstream right now.",
        )?;
        let invalidated = IntCounterVec::new(
            Opts::new(
                "tpns_cache_invalidated_entries_total",
                "Cache entries dropped by writes and purges (source: batchoperate, \
                 batchoperate_delayed, admin).",
            ),
            &["source"],
        )?;
        let fetch_discarded = IntCounter::new(
            "tpns_cache_fetch_discarded_total",
            "Fetched answers not cached because a write to their app happened while in flight.",
        )?;
        let responses = IntCounterVec::new(
            Opts::new(
                "tpns_cache_responses_total",
                "Responses by route and class: the retCode class where the proxy knows it \
                 (ok, batch_partial, batch_failed, invalid, auth, rate_limited, upstream_error, \
                 other), else the HTTP status class (http_2xx … http_5xx).",
            ),
            &["route", "class"],
        )?;
        let evictions = IntCounterVec::new(
            Opts::new(
                "tpns_cache_evictions_total",
                "Entries leaving the cache, by cause (expired, size, explicit, replaced).",
            ),
            &["cause"],
        )?;
        let memo_hits = IntCounter::new(
            "tpns_cache_memo_hits_total",
            "Requests answered from the response memo (repeated, fully cached batches).",
        )?;
        let redis_up = IntGauge::new(
            "tpns_cache_redis_up",
            "Fleet mode: 1 while Redis answers, 0 while it does not (or is not reached yet).",
        )?;
        let redis_errors = IntCounter::new(
            "tpns_cache_redis_errors_total",
            "Fleet mode: Redis calls that failed or timed out.",
        )?;
        let fleet_fallbacks = IntCounter::new(
            "tpns_cache_fleet_fallbacks_total",
            "Fleet mode: upstream calls admitted by the local fallback limiter because Redis was unavailable.",
        )?;
        let redis_writes = IntCounter::new(
            "tpns_cache_redis_writes_total",
            "Fleet mode: answers written to the shared tier.",
        )?;
        let lease_waits = IntCounter::new(
            "tpns_cache_fleet_lease_waits_total",
            "Fleet mode: identifiers another sidecar was fetching, answered from the shared tier instead of fetched again.",
        )?;
        let query_bypass = IntCounterVec::new(
            Opts::new(
                "tpns_cache_query_bypass_total",
                "Queries forwarded unchanged and not cached, by reason (no-credentials, signature, \
                 unrecognized-credentials, content_type, scope_too_large).",
            ),
            &["reason"],
        )?;
        for c in [
            Box::new(query_bypass.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(lease_waits.clone()),
            Box::new(redis_writes.clone()),
            Box::new(redis_up.clone()),
            Box::new(redis_errors.clone()),
            Box::new(fleet_fallbacks.clone()),
            Box::new(memo_hits.clone()),
            Box::new(responses.clone()),
            Box::new(evictions.clone()),
            Box::new(invalidated.clone()),
            Box::new(fetch_discarded.clone()),
            Box::new(stale_served.clone()),
            Box::new(refreshes.clone()),
            Box::new(upstream_batch_size.clone()),
            Box::new(limiter_wait_seconds.clone()),
            Box::new(limiter_rejections.clone()),
            Box::new(breaker_state.clone()),
            Box::new(breaker_opens.clone()),
            Box::new(retries.clone()),
            Box::new(inflight_fetches.clone()),
        ] {
            registry.register(c)?;
        }
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_calls.clone()))?;
        registry.register(Box::new(upstream_identifiers.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(cache_bytes.clone()))?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(Metrics {
            lookups,
            requests,
            request_duration,
            upstream_calls,
            upstream_identifiers,
            upstream_duration,
            cache_entries,
            cache_bytes,
            build_info,
            stale_served,
            refreshes,
            upstream_batch_size,
            limiter_wait_seconds,
            limiter_rejections,
            breaker_state,
            breaker_opens,
            retries,
            inflight_fetches,
            invalidated,
            fetch_discarded,
            responses,
            evictions,
            memo_hits,
            redis_up,
            redis_errors,
            fleet_fallbacks,
            redis_writes,
            lease_waits,
            query_bypass,
        })
    }

    pub fn lookup(&self, op: crate::api::query::Op, outcome: LookupOutcome, n: u64) {
        if n > 0 {
            self.lookups
                .with_label_values(&[op.as_str(), outcome.as_str()])
                .inc_by(n);
        }
    }

    pub fn request(&self, route: Route, outcome: RequestOutcome, seconds: f64) {
        self.requests
            .with_label_values(&[route.as_str(), outcome.as_str()])
            .inc();
        self.request_duration
            .with_label_values(&[route.as_str()])
            .observe(seconds);
    }

    pub fn upstream(&self, route: Route, outcome: UpstreamOutcome) {
        self.upstream_calls
            .with_label_values(&[route.as_str(), outcome.as_str()])
            .inc();
    }
}

/// The text exposition of everything in `registry`.
pub fn encode(registry: &Registry) -> Vec<u8> {
    let mut buf = Vec::new();
    // Encoding into a Vec only fails on invalid metric families, which `register` rejects.
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_encodes() {
        let r = Registry::new();
        let m = Metrics::register(&r).unwrap();
        m.lookup(crate::api::query::Op::TokenAccounts, LookupOutcome::Hit, 3);
        m.request(Route::Query, RequestOutcome::Hit, 0.001);
        let text = String::from_utf8(encode(&r)).unwrap();
        assert!(text.contains(r#"tpns_cache_lookups_total{op="token_accounts",outcome="hit"} 3"#));
        assert!(text.contains("tpns_cache_build_info"));
    }
}
