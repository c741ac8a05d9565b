//! One batch's trip to the upstream: in fleet mode, leases first (identifiers another sidecar
//! is fetching are awaited in the shared tier instead); then the shield's admission, the
//! sub-request (signed anew when the credential is a signature), one retry on a connection
//! error within the budget, the check of the answer, and the shield told how it went. The
//! answers are stored (unless a write to the app passed meanwhile), shared with the fleet, and
//! handed to every waiter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use super::batch::Batch;
use super::flights::NewFlight;
use super::{FetchError, FetchMetrics, RequestContext};
use crate::api::answer::{build_upstream_body, parse_upstream_answer, Answer, UpstreamAnswer};
use crate::api::error::UpstreamError;
use crate::api::request::Ident;
use crate::api::{code, QUERY_PATH};
use crate::cache::{Cache, CacheKey, Entry};
use crate::fleet::leases::Leases;
use crate::metrics::labels::{Route, UpstreamOutcome};
use crate::shield::{Attempt, Call, Outcome, Shield};
use crate::trust::Trust;
use crate::upstream::{Upstream, UpstreamMetrics};

/// What a batch's call needs, each handle owned here.
#[derive(Debug)]
pub(crate) struct Caller {
    pub(crate) upstream: Upstream,
    pub(crate) upstream_metrics: UpstreamMetrics,
    pub(crate) shield: Shield,
    pub(crate) cache: Arc<Cache>,
    pub(crate) trust: Arc<Trust>,
    /// Fleet mode: fetch leases.
    pub(crate) leases: Option<Arc<Leases>>,
    pub(crate) metrics: FetchMetrics,
    /// Top-level codes that still carry per-element results.
    pub(crate) batch_codes: [i64; 5],
    /// Fleet mode: how long a sidecar waits for another one's fetch.
    pub(crate) lease_for: Duration,
}

/// What one call brought back.
struct Fetched {
    answers: Vec<Answer>,
    /// The app's write epoch when the call went out.
    epoch: u64,
    /// Fleet mode: the app's generation when the call went out.
    generation: Option<u64>,
}

impl Caller {
    /// Fetches one batch and resolves its flights.
    pub(crate) async fn run(&self, batch: Batch) {
        let token = self
            .leases
            .as_ref()
            .map(|l| l.token(batch.id))
            .unwrap_or_default();
        let (batch, leased) = self.settle_leased(batch, &token).await;
        let leased: Vec<String> = leased.iter().map(|k| k.shared_name().joined()).collect();
        if batch.items.is_empty() {
            return;
        }
        let ctx = &batch.ctx;
        match self.call(&batch).await {
            Ok(fetched) => {
                self.trust.accept(ctx.fingerprint);
                let mut discarded = 0u64;
                let mut shared: Vec<(CacheKey, Entry)> = Vec::new();
                for (item, answer) in batch.items.iter().zip(fetched.answers) {
                    let (entry, stored) = self
                        .cache
                        .store(item.key.clone(), answer, fetched.epoch)
                        .await;
                    discarded += u64::from(!stored);
                    if stored && fetched.generation.is_some() {
                        shared.push((item.key.clone(), entry.clone()));
                    }
                    item.resolve(Ok(entry));
                }
                self.metrics.discarded.inc_by(discarded);
                if let Some(leases) = &self.leases {
                    // Write what may be shared, then give the leases back either way: the
                    // waiting sidecars find the values.
                    let (cache, leases) = (self.cache.clone(), leases.clone());
                    let generation = fetched.generation;
                    tokio::spawn(async move {
                        if let Some(g) = generation {
                            cache.share(g, &shared).await;
                        }
                        leases.release(&leased, &token).await;
                    });
                }
            }
            Err(e) => {
                if let Some(leases) = &self.leases {
                    leases.release(&leased, &token).await;
                }
                if let FetchError::Refused { ret_code, .. } = &e {
                    if code::is_auth_failure(*ret_code) {
                        self.trust.refuse(ctx.fingerprint);
                    }
                }
                let e = Arc::new(e);
                for item in &batch.items {
                    item.resolve(Err(e.clone()));
                }
            }
        }
    }

    /// Fleet mode: takes a lease on each identifier; those another sidecar is fetching right
    /// now are awaited in the shared tier (at most the lease, itself at most `upstream.timeout`)
    /// instead of being fetched again. Returns the batch of what this sidecar must still fetch,
    /// and the keys it leased. Only for a credential the upstream has accepted: an answer from
    /// shared data is served only to those.
    async fn settle_leased(&self, mut batch: Batch, token: &str) -> (Batch, Vec<CacheKey>) {
        let Some(leases) = &self.leases else {
            return (batch, Vec::new());
        };
        let ctx = batch.ctx.clone();
        if !self.trust.is_accepted(&ctx.fingerprint) {
            return (batch, Vec::new());
        }
        let epoch = self.cache.epoch(&ctx.access_id);
        let names: Vec<String> = batch
            .items
            .iter()
            .map(|i| i.key.shared_name().joined())
            .collect();
        let Some(owned) = leases.take(&names, self.lease_for, token).await else {
            return (batch, Vec::new());
        };
        let (mut mine, mut waiting): (Vec<NewFlight>, Vec<NewFlight>) = (Vec::new(), Vec::new());
        for (item, own) in std::mem::take(&mut batch.items).into_iter().zip(owned) {
            if own {
                mine.push(item);
            } else {
                waiting.push(item);
            }
        }
        let leased: Vec<CacheKey> = mine.iter().map(|i| i.key.clone()).collect();
        let deadline = tokio::time::Instant::now() + self.lease_for;
        while !waiting.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let keys: Vec<CacheKey> = waiting.iter().map(|i| i.key.clone()).collect();
            let Some(found) = self.cache.shared_values(&ctx.access_id, &keys, epoch).await else {
                break;
            };
            let mut still = Vec::new();
            for (item, hit) in waiting.into_iter().zip(found) {
                match hit {
                    Some(entry) => {
                        leases.link().metrics().lease_waits.inc();
                        item.resolve(Ok(entry));
                    }
                    None => still.push(item),
                }
            }
            waiting = still;
        }
        // Not there in time (the other sidecar failed or is slow): fetched here after all.
        mine.extend(waiting);
        batch.items = mine;
        (batch, leased)
    }

    /// The upstream call for a batch, through the shield.
    async fn call(&self, batch: &Batch) -> Result<Fetched, FetchError> {
        let ctx = &batch.ctx;
        let n = batch.items.len();
        let call = Call {
            app: &ctx.access_id,
            credential: &ctx.fingerprint,
            identifiers: n,
            verified: self.trust.is_accepted(&ctx.fingerprint),
        };
        let admission = match self.shield.admit(&call, Attempt::First).await {
            Ok(a) => a,
            Err(e) => {
                self.count(e.classify().outcome);
                return Err(FetchError::Upstream(e));
            }
        };
        let body = Bytes::from(build_upstream_body(
            ctx.op,
            &ctx.top_fields,
            batch.items.iter().map(|i| i.raw.as_ref()),
        ));
        let epoch = self.cache.epoch(&ctx.access_id);
        // Read before the call: if a write moves it meanwhile, what this call brings back is
        // never used from the shared tier.
        let generation = self.cache.generation(&ctx.access_id).await;
        let mut result = self.send(ctx, n, body.clone()).await;
        if let Err(UpstreamError::Unreachable(cause)) = &result {
            // Queries are read-only: retried once, through the same admission.
            if self.shield.admit(&call, Attempt::Retry).await.is_ok() {
                tracing::info!(cause = %cause, "retrying an upstream query sub-request once");
                result = self.send(ctx, n, body).await;
            }
        }
        let sent: Vec<&Ident> = batch.items.iter().map(|i| &i.key.ident).collect();
        let parsed = result.and_then(|bytes| {
            parse_upstream_answer(ctx.op, &sent, &bytes, &self.batch_codes).map(|a| (a, bytes))
        });
        match parsed {
            Ok((UpstreamAnswer::Elements(answers), _)) => {
                self.shield.record(admission, &call, Outcome::Answered);
                self.count(UpstreamOutcome::Ok);
                Ok(Fetched {
                    answers,
                    epoch,
                    generation,
                })
            }
            Ok((UpstreamAnswer::Failed { ret_code }, body)) => {
                let outcome = if ret_code == code::RATE_LIMITED {
                    Outcome::RateLimited
                } else {
                    Outcome::Answered
                };
                self.shield.record(admission, &call, outcome);
                self.count(UpstreamOutcome::Refused);
                tracing::warn!(ret_code, "upstream refused a query sub-request");
                Err(FetchError::Refused { ret_code, body })
            }
            Err(e) => {
                let class = e.classify();
                self.shield.record(
                    admission,
                    &call,
                    Outcome::Failed {
                        breaker_failure: class.breaker_failure,
                    },
                );
                self.count(class.outcome);
                tracing::warn!(error = %e, identifiers = n, "upstream query sub-request failed");
                Err(FetchError::Upstream(e))
            }
        }
    }

    fn count(&self, outcome: UpstreamOutcome) {
        self.upstream_metrics.calls.inc(Route::Query, outcome);
    }

    /// One upstream query call; an HTTP status other than 200 is an error.
    async fn send(
        &self,
        ctx: &RequestContext,
        identifiers: usize,
        body: Bytes,
    ) -> Result<Bytes, UpstreamError> {
        let m = &self.upstream_metrics;
        let started = Instant::now();
        m.identifiers.inc_by(ctx.op.label(), identifiers as u64);
        m.batch_size.observe(identifiers as f64);
        let mut headers = ctx.headers.clone();
        ctx.auth.apply(&mut headers, &body);
        let result = self.upstream.post(QUERY_PATH, headers, body).await;
        m.duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok((StatusCode::OK, body)) => Ok(body),
            Ok((status, _)) => Err(UpstreamError::Status(status.as_u16())),
            Err(e) => Err(e),
        }
    }
}
