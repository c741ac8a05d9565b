//! Fetching misses from the upstream, spending its quota as if it were money:
//!
//! - [`flights`]: coalescing, one flight per (credential, key);
//! - [`batch`]: micro-batching of new flights of one scope;
//! - [`call`]: one batch's upstream call, through the shield ([`crate::shield`]);
//! - here, the [`Fetcher`] that ties them: each batch runs in its own task and resolves its
//!   flights when done, so a client that disconnects cancels nothing for the others, and a
//!   failure is shared by all waiters.

pub(crate) mod batch;
pub(crate) mod call;
pub(crate) mod flights;
pub(crate) mod metrics;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::value::RawValue;

use crate::api::code;
use crate::api::error::UpstreamError;
use crate::api::request::Op;
use crate::cache::CacheKey;
use crate::trust::Fingerprint;
use batch::{Batch, Batcher};
use call::Caller;
use flights::{Flights, Landing, Waiter};

pub(crate) use metrics::FetchMetrics;

/// Why a fetch gave no answer; shared by every waiter of the flight.
#[derive(Debug)]
pub(crate) enum FetchError {
    /// The upstream refused the call as a whole (HTTP 200, non-batch `retCode`): its own body.
    Refused {
        ret_code: i64,
        body: Bytes,
    },
    Upstream(UpstreamError),
}

impl FetchError {
    /// Whether a stale entry may stand in (stale-if-error): the upstream could not answer, but
    /// nothing says the credential is bad.
    pub(crate) fn allows_stale(&self) -> bool {
        match self {
            FetchError::Refused { ret_code, .. } => *ret_code == code::RATE_LIMITED,
            FetchError::Upstream(_) => true,
        }
    }
}

/// The parts of a client request a batch needs (shared by its items).
#[derive(Debug)]
pub(crate) struct RequestContext {
    pub(crate) fingerprint: Fingerprint,
    pub(crate) access_id: Arc<str>,
    pub(crate) op: Op,
    pub(crate) top_scope: Option<Arc<str>>,
    pub(crate) top_fields: Vec<(String, Box<RawValue>)>,
    /// Headers of the upstream sub-request, without credentials.
    pub(crate) headers: HeaderMap,
    /// Credentials added to each call (signatures depend on the body).
    pub(crate) auth: crate::upstream::Auth,
}

pub(crate) struct Fetcher {
    flights: Arc<Flights>,
    batcher: Arc<Batcher>,
    caller: Arc<Caller>,
    window: Duration,
    wait_bound: Duration,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("inflight", &self.flights.count())
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// `window`: `shield.batch_window`; `max_batch`: `upstream.max_batch`; `timeout`:
    /// `upstream.timeout` (for the waiters' bound).
    pub(crate) fn new(
        caller: Caller,
        window: Duration,
        max_batch: usize,
        timeout: Duration,
    ) -> Fetcher {
        let lease_wait = if caller.leases.is_some() {
            caller.lease_for
        } else {
            Duration::ZERO
        };
        Fetcher {
            flights: Arc::new(Flights::default()),
            batcher: Arc::new(Batcher::new(max_batch, !window.is_zero())),
            // Window, a lease wait in fleet mode, the admission wait of a call and of its one
            // retry (all quotas share one wait), the call and its retry, and a margin.
            wait_bound: window
                + lease_wait
                + caller.shield.max_wait() * 2
                + timeout * 2
                + Duration::from_secs(1),
            caller: Arc::new(caller),
            window,
        }
    }

    /// How long a request waits for its flights before giving up: longer than the fetch it
    /// waits for can take.
    pub(crate) fn wait_bound(&self) -> Duration {
        self.wait_bound
    }

    pub(crate) fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Identifiers being fetched right now.
    pub(crate) fn inflight(&self) -> usize {
        self.flights.count()
    }

    /// Joins or starts a flight for each `(key, element)`. Returns one waiter per item, in
    /// order, and whether it joined a flight already in the air.
    pub(crate) fn fetch(
        &self,
        ctx: &Arc<RequestContext>,
        items: Vec<(CacheKey, Box<str>)>,
    ) -> Vec<(Waiter, bool)> {
        let (waiters, new) = self.flights.register(ctx.fingerprint, items);
        self.enqueue(ctx, new);
        waiters
    }

    /// Starts a background refresh for each key not already being fetched; how many started.
    pub(crate) fn refresh(
        &self,
        ctx: &Arc<RequestContext>,
        items: Vec<(CacheKey, Box<str>)>,
    ) -> usize {
        let (_, new) = self.flights.register(ctx.fingerprint, items);
        let n = new.len();
        self.enqueue(ctx, new);
        n
    }

    fn enqueue(&self, ctx: &Arc<RequestContext>, new: Vec<flights::NewFlight>) {
        let added = self.batcher.add(ctx, new, || self.flights.next_id());
        for batch in added.ready {
            tokio::spawn(run(self.flights.clone(), self.caller.clone(), batch));
        }
        for id in added.opened {
            let (ctx, window) = (ctx.clone(), self.window);
            let (flights, caller, batcher) = (
                self.flights.clone(),
                self.caller.clone(),
                self.batcher.clone(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                // Unless it went already (full).
                if let Some(batch) = batcher.due(&ctx, id) {
                    run(flights, caller, batch).await;
                }
            });
        }
    }
}

/// Runs one batch in its own task; its flights land however the task ends (a panic included).
async fn run(flights: Arc<Flights>, caller: Arc<Caller>, batch: Batch) {
    let _landing = Landing::of(&flights, batch.ctx.fingerprint, &batch.items);
    caller.run(batch).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Cache, CacheMetrics, Clock, Policy, Store};
    use crate::config::Config;
    use crate::fleet::{leases::Leases, FleetMetrics, Link};
    use crate::shield::{Shield, ShieldMetrics};

    fn caller(config: &Config, leases: Option<Arc<Leases>>) -> Caller {
        let r = prometheus::Registry::new();
        let store = Store::new(
            1 << 20,
            Policy::fresh_only(Duration::from_secs(60), Duration::from_secs(10)),
            Clock::default(),
        );
        Caller {
            upstream: crate::upstream::Upstream::new(&config.upstream).expect("client"),
            upstream_metrics: crate::upstream::UpstreamMetrics::register(&r).expect("metrics"),
            shield: Shield::new(config, None, ShieldMetrics::register(&r).expect("metrics")),
            cache: Arc::new(Cache::new(
                store,
                CacheMetrics::register(&r).expect("metrics"),
            )),
            trust: Arc::new(crate::trust::Trust::new(
                Duration::from_secs(60),
                10,
                Duration::from_secs(60),
                10,
            )),
            leases,
            metrics: FetchMetrics::register(&r).expect("metrics"),
            batch_codes: [0; 5],
            lease_for: config.upstream.timeout.min(Duration::from_secs(3)),
        }
    }

    /// Regression (issue 11, item 7): the waiters' bound left out the fleet lease wait, so a
    /// waiter could get 504 while the fetch it waited for was still running.
    #[tokio::test]
    async fn the_wait_bound_covers_a_lease_wait_and_both_calls() {
        crate::install_crypto_provider();
        let config = Config::default();
        let metrics = FleetMetrics::register(&prometheus::Registry::new()).expect("metrics");
        let link = Link::start(
            crate::fleet::Target::node("redis://127.0.0.1:1/0"),
            config.redis.timeout,
            "t",
            "http://u",
            metrics,
        )
        .expect("link");
        let s = &config.shield;
        let worst =
            |lease: Duration| s.batch_window + lease + s.max_wait * 2 + config.upstream.timeout * 2;
        let with_leases = caller(&config, Some(Arc::new(Leases::new(link))));
        let lease_for = with_leases.lease_for;
        let f = Fetcher::new(with_leases, s.batch_window, 100, config.upstream.timeout);
        assert!(f.wait_bound() > worst(lease_for), "{:?}", f.wait_bound());
        let f = Fetcher::new(
            caller(&config, None),
            s.batch_window,
            100,
            config.upstream.timeout,
        );
        assert!(f.wait_bound() > worst(Duration::ZERO));
    }
}
