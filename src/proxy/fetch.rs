//! Fetching misses from the upstream, spending its quota as if it were money:
//!
//! - **Coalescing.** One flight per (credential, cache key): while it is in the air, every other
//!   request that needs the key waits for it instead of asking again. Flights are keyed by
//!   credential too, so an answer (or a refusal) for one credential never reaches another except
//!   through the cache, which only serves accepted credentials.
//! - **Micro-batching.** New flights of the same scope (credential, AccessID, operator_type,
//!   top-level fields) are gathered for `shield.batch_window` or until `upstream.max_batch`, and
//!   sent as one upstream call. Identifiers sharing a name never share a call (see
//!   [`crate::api::query::parse_upstream_answer`]).
//! - **Detached calls.** Each batch runs in its own task and resolves its flights when done, so a
//!   client that disconnects cancels nothing for the others; a failure is shared by all waiters.
//! - **Quota.** Before a call: the app's cool-down (after an upstream 1008028), the circuit
//!   breaker, then the GCRA limiter with a bounded queue and a maximum wait. A connection error
//!   is retried once while the retry budget allows.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::value::RawValue;
use tokio::sync::watch;

use super::auth::{is_auth_failure, Fingerprint, UpstreamAuth};
use super::State;
use crate::api::code;
use crate::api::error::ProxyError;
use crate::api::query::{
    build_upstream_body, parse_upstream_answer, Answer, Ident, Op, UpstreamAnswer,
};
use crate::api::QUERY_PATH;
use crate::cache::{CacheKey, Entry};
use crate::config::Config;
use crate::metrics::{Route, UpstreamOutcome};
use crate::upstream::breaker::{Breaker, BreakerState};
use crate::upstream::limiter::{LimiterConfig, UpstreamLimiter};
use crate::upstream::retry::RetryBudget;

/// Why a fetch gave no answer; shared by every waiter of the flight.
#[derive(Debug)]
pub enum FetchError {
    /// The upstream refused the call as a whole (HTTP 200, non-batch `retCode`): its own body.
    Refused {
        ret_code: i64,
        body: Bytes,
    },
    Proxy(ProxyError),
}

impl FetchError {
    /// Whether a stale entry may stand in (stale-if-error): the upstream could not answer, but
    /// nothing says the credential is bad.
    pub fn allows_stale(&self) -> bool {
        match self {
            FetchError::Refused { ret_code, .. } => *ret_code == code::RATE_LIMITED,
            FetchError::Proxy(e) => e.is_upstream_trouble(),
        }
    }
}

pub type FlightResult = Result<Arc<Entry>, Arc<FetchError>>;
type FlightKey = (Fingerprint, CacheKey);
/// A flight in the air: its id (so only its own batch removes it) and where its result appears.
type Flight = (u64, watch::Receiver<Option<FlightResult>>);

/// What a request waits on for one identifier.
#[derive(Debug)]
pub struct Waiter(watch::Receiver<Option<FlightResult>>);

impl Waiter {
    pub async fn result(mut self) -> FlightResult {
        match self.0.wait_for(Option::is_some).await {
            Ok(v) => match &*v {
                Some(r) => r.clone(),
                None => Err(lost()),
            },
            Err(_) => Err(lost()),
        }
    }
}

fn lost() -> Arc<FetchError> {
    Arc::new(FetchError::Proxy(ProxyError::UpstreamUnreachable(
        "the fetch was abandoned".to_owned(),
    )))
}

/// The parts of a client request a batch needs (shared by its items).
#[derive(Debug)]
pub struct RequestContext {
    pub fingerprint: Fingerprint,
    pub access_id: Arc<str>,
    pub op: Op,
    pub top_scope: Option<Arc<str>>,
    pub top_fields: Vec<(String, Box<RawValue>)>,
    /// Headers of the upstream sub-request, without credentials.
    pub headers: HeaderMap,
    /// Credentials added to each call (signatures depend on the body).
    pub auth: UpstreamAuth,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BatchScope {
    fingerprint: Fingerprint,
    access_id: Arc<str>,
    op: Op,
    top_scope: Option<Arc<str>>,
}

impl RequestContext {
    fn scope(&self) -> BatchScope {
        BatchScope {
            fingerprint: self.fingerprint,
            access_id: self.access_id.clone(),
            op: self.op,
            top_scope: self.top_scope.clone(),
        }
    }
}

struct BatchItem {
    key: CacheKey,
    flight_id: u64,
    raw: Box<RawValue>,
    tx: watch::Sender<Option<FlightResult>>,
}

struct Pending {
    id: u64,
    ctx: Arc<RequestContext>,
    items: Vec<BatchItem>,
    names: HashSet<Box<str>>,
}

/// Who a cool-down applies to: an app (after an upstream 1008028 for an accepted credential),
/// or only the credential that got it (an unverified one must not cool a whole app down).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Cooled {
    App(Arc<str>),
    Credential(Fingerprint),
}

pub struct Fetcher {
    inflight: Mutex<HashMap<FlightKey, Flight>>,
    pending: Mutex<HashMap<BatchScope, Pending>>,
    ids: AtomicU64,
    cooldowns: Mutex<HashMap<Cooled, tokio::time::Instant>>,
    pub limiter: UpstreamLimiter,
    /// The share of the quota that calls for not-yet-accepted credentials may use (taken
    /// before the whole-upstream quota).
    unverified: UpstreamLimiter,
    /// Fleet mode: how long a sidecar waits for another one's fetch (see [`settle_leased`]).
    lease_for: Duration,
    /// Fleet mode: the shared quota in Redis, and the local limiter used while Redis is away.
    pub fleet: Option<(Arc<crate::fleet::Fleet>, UpstreamLimiter)>,
    max_wait: Duration,
    pub breaker: Breaker,
    retry: RetryBudget,
    window: Duration,
    max_batch: usize,
    cooldown: Duration,
    batch_codes: [i64; 5],
    /// How long a request waits for its flights before giving up.
    pub wait_bound: Duration,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("inflight", &self.inflight_count())
            .field("limiter", &self.limiter)
            .field("breaker", &self.breaker.state())
            .finish_non_exhaustive()
    }
}

/// Most AccessIDs remembered in cool-down at once.
const MAX_COOLDOWNS: usize = 10_000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fetcher {
    /// Builds the fetcher; `fleet` carries the fleet-wide quota when one is configured.
    pub fn new(config: &Config, fleet: Option<Arc<crate::fleet::Fleet>>) -> Fetcher {
        let s = &config.shield;
        let q = &config.query;
        let fleet = fleet.filter(|f| f.has_quota());
        let local_share =
            |rate: u32| ((f64::from(rate) * config.redis.local_share).ceil() as u32).max(1);
        let fleet = fleet.map(|f| {
            let fallback = UpstreamLimiter::new(LimiterConfig {
                calls_per_second: local_share(s.calls_per_second),
                burst: local_share(s.burst),
                per_app_calls_per_second: 0,
                identifiers_per_second: 0,
                max_wait: s.max_wait,
                max_queue: s.max_queue,
            });
            (f, fallback)
        });
        let share = |rate: u32| {
            if rate == 0 {
                0
            } else {
                let local = if fleet.is_some() {
                    config.redis.local_share
                } else {
                    1.0
                };
                ((f64::from(rate) * s.unverified_share * local).ceil() as u32).max(1)
            }
        };
        let lease_for = config.upstream.timeout.min(Duration::from_secs(3));
        Fetcher {
            unverified: UpstreamLimiter::new(LimiterConfig {
                calls_per_second: share(s.calls_per_second),
                burst: share(s.burst),
                per_app_calls_per_second: 0,
                identifiers_per_second: 0,
                max_wait: s.max_wait,
                max_queue: s.max_queue,
            }),
            lease_for,
            max_wait: s.max_wait,
            inflight: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(1),
            cooldowns: Mutex::new(HashMap::new()),
            limiter: UpstreamLimiter::new(LimiterConfig {
                // In fleet mode the whole-upstream rate is the fleet's, kept in Redis.
                calls_per_second: if fleet.is_some() {
                    0
                } else {
                    s.calls_per_second
                },
                burst: s.burst,
                per_app_calls_per_second: s.per_app_calls_per_second,
                identifiers_per_second: s.identifiers_per_second,
                max_wait: s.max_wait,
                max_queue: s.max_queue,
            }),
            breaker: Breaker::new(s.breaker_failures, s.breaker_open_for),
            retry: RetryBudget::new(s.retry_budget_ratio),
            window: s.batch_window,
            max_batch: config.upstream.max_batch,
            cooldown: s.rate_limited_cooldown,
            batch_codes: [
                code::OK,
                code::BATCH_PARTLY_FAILED,
                code::BATCH_ALL_FAILED,
                q.partial_failure_ret_code,
                q.all_failed_ret_code,
            ],
            // Window, a lease wait in fleet mode, the admission wait of a call and of its one
            // retry (all quotas share one wait), the call and its retry, and a margin.
            wait_bound: s.batch_window
                + if fleet.is_some() {
                    lease_for
                } else {
                    Duration::ZERO
                }
                + s.max_wait * 2
                + config.upstream.timeout * 2
                + Duration::from_secs(1),
            fleet,
        }
    }

    pub fn inflight_count(&self) -> usize {
        lock(&self.inflight).len()
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Time left in the cool-down of `app` or of this credential, if either is in one.
    pub fn cooldown_left(&self, app: &Arc<str>, credential: &Fingerprint) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        let map = lock(&self.cooldowns);
        [Cooled::App(app.clone()), Cooled::Credential(*credential)]
            .iter()
            .filter_map(|k| map.get(k))
            .filter(|until| **until > now)
            .map(|until| *until - now)
            .max()
    }

    fn start_cooldown(&self, who: Cooled) {
        if self.cooldown.is_zero() {
            return;
        }
        let now = tokio::time::Instant::now();
        let mut map = lock(&self.cooldowns);
        if map.len() >= MAX_COOLDOWNS {
            map.retain(|_, until| *until > now);
        }
        if map.len() < MAX_COOLDOWNS {
            map.insert(who, now + self.cooldown);
        }
    }

    /// A permit for one call of `n` identifiers from every quota that applies: the unverified
    /// share (for a credential the upstream has not accepted yet), the fleet's quota in Redis
    /// (or, while Redis is away, the local share of it), then this sidecar's limiter. Used for
    /// a first call and for its retry alike. Refusals carry the wait and the metric reason, and
    /// are counted.
    async fn admit(
        &self,
        m: &crate::metrics::Metrics,
        app: &Arc<str>,
        n: usize,
        unverified: bool,
    ) -> Result<(), (Duration, &'static str)> {
        let admitted = self.admit_uncounted(m, app, n, unverified).await;
        if let Err((_, reason)) = &admitted {
            m.limiter_rejections.with_label_values(&[reason]).inc();
        }
        admitted
    }

    /// The quotas of one admission share one wait of at most `shield.max_wait`.
    async fn admit_uncounted(
        &self,
        m: &crate::metrics::Metrics,
        app: &Arc<str>,
        n: usize,
        unverified: bool,
    ) -> Result<(), (Duration, &'static str)> {
        let started = tokio::time::Instant::now();
        let left = || self.max_wait.saturating_sub(started.elapsed());
        if unverified {
            self.unverified
                .acquire_within(app, n, left())
                .await
                .map_err(|d| (d.retry_after(), "unverified_share"))?;
        }
        if let Some((fleet, fallback)) = &self.fleet {
            match fleet.acquire(left()).await {
                Ok(_) => {}
                Err(crate::fleet::FleetDenied::Quota(wait)) => return Err((wait, "fleet_quota")),
                Err(crate::fleet::FleetDenied::Unavailable) => {
                    m.fleet_fallbacks.inc();
                    fallback
                        .acquire_within(app, n, left())
                        .await
                        .map_err(|d| (d.retry_after(), d.as_str()))?;
                }
            }
        }
        self.limiter
            .acquire_within(app, n, left())
            .await
            .map_err(|d| (d.retry_after(), d.as_str()))?;
        m.limiter_wait_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Joins or starts a flight for each `(key, element)`. Returns one waiter per item, in order,
/// and whether it joined an existing flight.
pub fn fetch(
    state: &Arc<State>,
    ctx: &Arc<RequestContext>,
    items: Vec<(CacheKey, Box<RawValue>)>,
) -> Vec<(Waiter, bool)> {
    let (waiters, new_items) = register(&state.fetcher, ctx.fingerprint, items);
    enqueue(state, ctx, new_items);
    waiters
}

/// Starts a background refresh for each key that is not already being fetched.
/// Returns how many were started.
pub fn refresh(
    state: &Arc<State>,
    ctx: &Arc<RequestContext>,
    items: Vec<(CacheKey, Box<RawValue>)>,
) -> usize {
    let (_, new_items) = register(&state.fetcher, ctx.fingerprint, items);
    let n = new_items.len();
    enqueue(state, ctx, new_items);
    n
}

/// Under one lock: joins the flight of each key already in the air and registers a new flight
/// for the others. Returns a waiter per item (and whether it joined) and the new flights.
fn register(
    f: &Fetcher,
    fingerprint: Fingerprint,
    items: Vec<(CacheKey, Box<RawValue>)>,
) -> (Vec<(Waiter, bool)>, Vec<BatchItem>) {
    let mut waiters = Vec::with_capacity(items.len());
    let mut new_items = Vec::new();
    let mut inflight = lock(&f.inflight);
    for (key, raw) in items {
        let fk = (fingerprint, key);
        // A flight whose sender is gone (its task ended without landing it) is replaced.
        if let Some((_, rx)) = inflight.get(&fk).filter(|(_, rx)| rx.has_changed().is_ok()) {
            waiters.push((Waiter(rx.clone()), true));
            continue;
        }
        let (tx, rx) = watch::channel(None);
        let flight_id = f.next_id();
        inflight.insert(fk.clone(), (flight_id, rx.clone()));
        waiters.push((Waiter(rx), false));
        new_items.push(BatchItem {
            key: fk.1,
            flight_id,
            raw,
            tx,
        });
    }
    (waiters, new_items)
}

fn enqueue(state: &Arc<State>, ctx: &Arc<RequestContext>, items: Vec<BatchItem>) {
    if items.is_empty() {
        return;
    }
    let f = &state.fetcher;
    let scope = ctx.scope();
    let mut ready: Vec<Pending> = Vec::new();
    let mut timers: Vec<u64> = Vec::new();
    {
        let mut pending = lock(&f.pending);
        for item in items {
            let name = item.key.ident.name();
            let must_flush = pending
                .get(&scope)
                .is_some_and(|p| p.items.len() >= f.max_batch || p.names.contains(name));
            if must_flush {
                if let Some(p) = pending.remove(&scope) {
                    ready.push(p);
                }
            }
            let p = pending.entry(scope.clone()).or_insert_with(|| {
                let id = f.next_id();
                timers.push(id);
                Pending {
                    id,
                    ctx: ctx.clone(),
                    items: Vec::new(),
                    names: HashSet::new(),
                }
            });
            p.names.insert(name.into());
            p.items.push(item);
            if p.items.len() >= f.max_batch {
                if let Some(p) = pending.remove(&scope) {
                    ready.push(p);
                }
            }
        }
        if f.window.is_zero() {
            if let Some(p) = pending.remove(&scope) {
                ready.push(p);
            }
        }
    }
    for p in ready {
        tokio::spawn(run_batch(state.clone(), p));
    }
    if !f.window.is_zero() {
        for id in timers {
            let state = state.clone();
            let scope = scope.clone();
            tokio::spawn(async move {
                tokio::time::sleep(state.fetcher.window).await;
                let due = {
                    let mut pending = lock(&state.fetcher.pending);
                    if pending.get(&scope).is_some_and(|p| p.id == id) {
                        pending.remove(&scope)
                    } else {
                        None
                    }
                };
                if let Some(p) = due {
                    run_batch(state, p).await;
                }
            });
        }
    }
}

/// Removes a finished flight from the in-flight table (only if it is still this flight).
fn land(f: &Fetcher, fingerprint: Fingerprint, key: CacheKey, flight_id: u64) {
    let mut inflight = lock(&f.inflight);
    let fk = (fingerprint, key);
    if inflight.get(&fk).is_some_and(|(id, _)| *id == flight_id) {
        inflight.remove(&fk);
    }
}

/// Lands every flight of a batch when dropped, however the batch task ends (a panic
/// included): no key stays joined to a flight nobody will resolve. Waiters of a flight whose
/// sender is gone get an error at once ([`Waiter::result`]).
struct Landing {
    state: Arc<State>,
    fingerprint: Fingerprint,
    flights: Vec<(CacheKey, u64)>,
}

impl Landing {
    fn of(state: &Arc<State>, batch: &Pending) -> Landing {
        Landing {
            state: state.clone(),
            fingerprint: batch.ctx.fingerprint,
            flights: batch
                .items
                .iter()
                .map(|i| (i.key.clone(), i.flight_id))
                .collect(),
        }
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        for (key, id) in self.flights.drain(..) {
            land(&self.state.fetcher, self.fingerprint, key, id);
        }
    }
}

/// Fleet mode: takes a lease on each identifier; those another sidecar is fetching right now are
/// awaited in the shared tier (bounded by the lease, itself at most `upstream.timeout`) instead
/// of being fetched again. Returns the batch of what this sidecar must still fetch, and the
/// keys it leased (to release once their answers are written, or at once on failure).
async fn settle_leased(
    state: &State,
    fleet: &crate::fleet::Fleet,
    mut batch: Pending,
    token: &str,
) -> (Pending, Vec<CacheKey>) {
    let ctx = batch.ctx.clone();
    // Only a credential the upstream has accepted may be answered from shared data.
    if !state.credentials.is_accepted(&ctx.fingerprint) {
        return (batch, Vec::new());
    }
    let lease_for = state.fetcher.lease_for;
    let epoch = state.store.index().epoch(&ctx.access_id);
    let keys: Vec<CacheKey> = batch.items.iter().map(|i| i.key.clone()).collect();
    let Some(owned) = fleet.take_leases(&keys, lease_for, token).await else {
        return (batch, Vec::new());
    };
    let mut mine = Vec::new();
    let mut waiting = Vec::new();
    for (item, own) in std::mem::take(&mut batch.items).into_iter().zip(owned) {
        if own {
            mine.push(item);
        } else {
            waiting.push(item);
        }
    }
    let leased: Vec<CacheKey> = mine.iter().map(|i| i.key.clone()).collect();
    let deadline = tokio::time::Instant::now() + lease_for;
    while !waiting.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let keys: Vec<CacheKey> = waiting.iter().map(|i| i.key.clone()).collect();
        let Some(found) = fleet.lookup(&ctx.access_id, &keys).await else {
            break;
        };
        let mut still = Vec::new();
        for (item, hit) in waiting.into_iter().zip(found) {
            match hit {
                Some((answer, fresh_for)) => {
                    // Stored only if no write to the app happened since the batch started.
                    let (entry, _) = state
                        .store
                        .put_fresh_for_since(item.key.clone(), answer, fresh_for, epoch)
                        .await;
                    state.metrics.lease_waits.inc();
                    let _ = item.tx.send(Some(Ok(entry)));
                    land(&state.fetcher, ctx.fingerprint, item.key, item.flight_id);
                }
                None => still.push(item),
            }
        }
        waiting = still;
    }
    // Not there in time (the other sidecar failed or is slow): fetch them here after all.
    mine.extend(waiting);
    batch.items = mine;
    (batch, leased)
}

/// Makes the upstream call for one batch and resolves its flights.
async fn run_batch(state: Arc<State>, batch: Pending) {
    let _landing = Landing::of(&state, &batch);
    let token = state
        .fleet
        .as_ref()
        .map(|f| f.lease_token(batch.id))
        .unwrap_or_default();
    let (batch, leased) = match state.fleet.clone() {
        Some(fleet) => settle_leased(&state, &fleet, batch, &token).await,
        None => (batch, Vec::new()),
    };
    if batch.items.is_empty() {
        return;
    }
    let outcome = call(&state, &batch).await;
    let ctx = &batch.ctx;
    match outcome {
        Ok((answers, epoch, generation)) => {
            state.credentials.accept(ctx.fingerprint);
            let mut discarded = 0u64;
            let mut shared = Vec::new();
            for (item, answer) in batch.items.iter().zip(answers) {
                let (entry, dropped) = state.store.put_since(item.key.clone(), answer, epoch).await;
                discarded += u64::from(dropped);
                if !dropped && generation.is_some() {
                    shared.push((item.key.clone(), entry.clone()));
                }
                let _ = item.tx.send(Some(Ok(entry)));
            }
            if let Some(fleet) = &state.fleet {
                // Writes what may be shared, then gives the leases back either way.
                fleet.write_behind(
                    generation,
                    shared,
                    state.store.keep_after_fresh(),
                    leased,
                    token,
                );
            }
            if discarded > 0 {
                state.metrics.fetch_discarded.inc_by(discarded);
            }
        }
        Err(e) => {
            if let Some(fleet) = &state.fleet {
                fleet.release_leases(&leased, &token).await;
            }
            if let FetchError::Refused { ret_code, .. } = &e {
                if is_auth_failure(*ret_code) {
                    state.credentials.refuse(ctx.fingerprint);
                }
            }
            let e = Arc::new(e);
            for item in &batch.items {
                let _ = item.tx.send(Some(Err(e.clone())));
            }
        }
    }
}

/// The answers, the app's write epoch when the call went out, and its shared-tier generation.
async fn call(
    state: &State,
    batch: &Pending,
) -> Result<(Vec<Answer>, u64, Option<u64>), FetchError> {
    let f = &state.fetcher;
    let m = &state.metrics;
    let ctx = &batch.ctx;
    let n = batch.items.len();
    let refuse = |e: ProxyError, outcome: UpstreamOutcome| {
        m.upstream(Route::Query, outcome);
        Err(FetchError::Proxy(e))
    };
    if let Some(left) = f.cooldown_left(&ctx.access_id, &ctx.fingerprint) {
        m.limiter_rejections.with_label_values(&["cooldown"]).inc();
        return refuse(
            ProxyError::RateLimited {
                retry_after: left.max(Duration::from_secs(1)),
                reason: "cooldown after upstream 1008028",
            },
            UpstreamOutcome::RateLimited,
        );
    }
    let permit = match f.breaker.allow() {
        Ok(p) => p,
        Err(retry_after) => {
            return refuse(
                ProxyError::CircuitOpen(retry_after),
                UpstreamOutcome::CircuitOpen,
            )
        }
    };
    let unverified = !state.credentials.is_accepted(&ctx.fingerprint);
    if let Err((wait, reason)) = f.admit(m, &ctx.access_id, n, unverified).await {
        return refuse(
            ProxyError::RateLimited {
                retry_after: wait.max(Duration::from_secs(1)),
                reason,
            },
            UpstreamOutcome::RateLimited,
        );
    }
    let body = Bytes::from(build_upstream_body(
        ctx.op,
        &ctx.top_fields,
        batch.items.iter().map(|i| i.raw.as_ref()),
    ));
    f.retry.deposit();
    let epoch = state.store.index().epoch(&ctx.access_id);
    // The app's generation in the shared tier, read before the call: if a write bumps it
    // meanwhile, what this call brings back is never used from Redis.
    let generation = match &state.fleet {
        Some(fleet) => fleet.generation(&ctx.access_id).await,
        None => None,
    };
    let mut result = send(state, ctx, n, body.clone()).await;
    if let Err(ProxyError::UpstreamUnreachable(cause)) = &result {
        // The retry spends quota like any call: the same admission, fleet quota included.
        if f.retry.try_withdraw() && f.admit(m, &ctx.access_id, n, unverified).await.is_ok() {
            tracing::info!(cause = %cause, "retrying an upstream query sub-request once");
            m.retries.inc();
            result = send(state, ctx, n, body).await;
        }
    }
    let sent: Vec<&Ident> = batch.items.iter().map(|i| &i.key.ident).collect();
    let parsed = result.and_then(|bytes| {
        parse_upstream_answer(ctx.op, &sent, &bytes, &f.batch_codes).map(|a| (a, bytes))
    });
    // What the breaker counts as the upstream failing: transport errors, timeouts, 5xx, 429 and
    // malformed answers. Another 4xx is the upstream refusing this request (one client's
    // oversized batch, say), not being down: it must not open the breaker for every app.
    let alive = match &parsed {
        Ok(_) => true,
        Err(ProxyError::UpstreamStatus(status)) => (400..500).contains(status) && *status != 429,
        Err(e) => !e.is_upstream_trouble(),
    };
    if let Some(to) = permit.record(alive) {
        tracing::warn!(state = ?to, "upstream circuit breaker changed state");
        if to == BreakerState::Open {
            m.breaker_opens.inc();
        }
    }
    m.breaker_state.set(f.breaker.state().as_gauge());
    match parsed {
        Ok((UpstreamAnswer::Elements(answers), _)) => {
            m.upstream(Route::Query, UpstreamOutcome::Ok);
            Ok((answers, epoch, generation))
        }
        Ok((UpstreamAnswer::Failed { ret_code }, body)) => {
            m.upstream(Route::Query, UpstreamOutcome::Refused);
            tracing::warn!(ret_code, "upstream refused a query sub-request");
            if ret_code == code::RATE_LIMITED {
                f.start_cooldown(if unverified {
                    Cooled::Credential(ctx.fingerprint)
                } else {
                    Cooled::App(ctx.access_id.clone())
                });
            }
            Err(FetchError::Refused { ret_code, body })
        }
        Err(e) => {
            m.upstream(Route::Query, UpstreamOutcome::of_error(&e));
            tracing::warn!(error = %e, identifiers = n, "upstream query sub-request failed");
            Err(FetchError::Proxy(e))
        }
    }
}

/// One upstream query call; an HTTP status other than 200 is an error.
async fn send(
    state: &State,
    ctx: &RequestContext,
    identifiers: usize,
    body: Bytes,
) -> Result<Bytes, ProxyError> {
    let m = &state.metrics;
    let started = Instant::now();
    m.upstream_identifiers
        .with_label_values(&[ctx.op.as_str()])
        .inc_by(identifiers as u64);
    m.upstream_batch_size.observe(identifiers as f64);
    let mut headers = ctx.headers.clone();
    ctx.auth.apply(&mut headers, &body);
    let result = state.upstream.post(QUERY_PATH, headers, body).await;
    m.upstream_duration.observe(started.elapsed().as_secs_f64());
    match result {
        Ok((StatusCode::OK, body)) => Ok(body),
        Ok((status, _)) => Err(ProxyError::UpstreamStatus(status.as_u16())),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Clock;

    fn key(token: &str) -> CacheKey {
        CacheKey::new(
            Arc::from("http://u"),
            Arc::from("app"),
            None,
            Ident::Token(token.into()),
        )
    }

    fn raw(token: &str) -> Box<RawValue> {
        RawValue::from_string(format!("{token:?}")).expect("JSON")
    }

    /// Regression (issue 11, item 8): a panic in a batch task left its flights registered
    /// forever, so every later request for those keys joined a flight nobody would resolve.
    #[tokio::test]
    async fn a_batch_task_that_panics_leaves_no_flight_behind() {
        let state = crate::build_state(Config::default(), Clock::default()).expect("state");
        let fp = [3u8; 32];
        let (waiters, items) = register(&state.fetcher, fp, vec![(key("t"), raw("t"))]);
        assert_eq!(state.fetcher.inflight_count(), 1);
        let batch = Pending {
            id: 1,
            ctx: Arc::new(RequestContext {
                fingerprint: fp,
                access_id: Arc::from("app"),
                op: Op::TokenAccounts,
                top_scope: None,
                top_fields: Vec::new(),
                headers: HeaderMap::new(),
                auth: UpstreamAuth::Header(http::HeaderValue::from_static("Basic eDp5")),
            }),
            items,
            names: HashSet::new(),
        };
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                let _landing = Landing::of(&state, &batch);
                let _batch = batch;
                panic!("a bug in the batch task (injected)");
            }
        });
        assert!(task.await.expect_err("it panicked").is_panic());
        assert_eq!(state.fetcher.inflight_count(), 0, "its flight was landed");
        let (waiter, joined) = waiters.into_iter().next().expect("one waiter");
        assert!(!joined);
        let result = tokio::time::timeout(Duration::from_secs(1), waiter.result())
            .await
            .expect("the waiter is answered, not left hanging");
        assert!(result.is_err());
        let (again, new) = register(&state.fetcher, fp, vec![(key("t"), raw("t"))]);
        assert!(!again[0].1, "a new flight, not the dead one");
        assert_eq!(new.len(), 1);
    }

    /// A flight whose sender is gone without being landed is replaced, not joined.
    #[tokio::test]
    async fn a_dead_flight_is_replaced() {
        let state = crate::build_state(Config::default(), Clock::default()).expect("state");
        let fp = [4u8; 32];
        let (_, items) = register(&state.fetcher, fp, vec![(key("t"), raw("t"))]);
        drop(items);
        let (again, new) = register(&state.fetcher, fp, vec![(key("t"), raw("t"))]);
        assert!(!again[0].1);
        assert_eq!(new.len(), 1);
        let (joined, none) = register(&state.fetcher, fp, vec![(key("t"), raw("t"))]);
        assert!(joined[0].1, "a live flight is joined");
        assert!(none.is_empty());
    }

    /// Regression (issue 11, item 7): the waiters' bound left out the fleet lease wait, so a
    /// waiter could get 504 while the fetch it waited for was still running.
    #[tokio::test]
    async fn the_wait_bound_covers_a_lease_wait_and_both_calls() {
        let mut config = Config::default();
        config.redis.url = "redis://127.0.0.1:1/0".to_owned();
        let registry = prometheus::Registry::new();
        let metrics = crate::metrics::Metrics::register(&registry).expect("metrics");
        let fleet = crate::fleet::Fleet::start(
            &config.redis.url,
            config.redis.timeout,
            "t",
            "http://u",
            10,
            10,
            metrics,
        )
        .expect("fleet")
        .map(Arc::new);
        let f = Fetcher::new(&config, fleet);
        let s = &config.shield;
        let worst = s.batch_window
            + f.lease_for
            // One admission wait (all quotas together) for the call and one for its retry.
            + s.max_wait * 2
            + config.upstream.timeout * 2;
        assert!(f.wait_bound > worst, "{:?} <= {worst:?}", f.wait_bound);
    }
}
