//! The cached query path, as named phases, each taking the previous one's result:
//!
//! ```text
//! scope      who is asking; may the cache serve them?          -> Scope (or forwarded unchanged)
//! read       the body, bounded; signature, refusals, the memo   -> Body  (or answered here)
//! validate   parse and check (TPNS codes, nothing forwarded)     -> QueryRequest
//! plan       one cache key per distinct identifier              -> Plan
//! look up    both tiers, for a credential the upstream accepted -> Looked
//! fetch      the misses (coalesced, batched, through the shield) -> Answers
//! stitch     the documented response, Cache-Status, the memo
//! ```
//!
//! A [`QueryOutcome`] gathers what happened and is counted once, at the end.

pub mod memo;
pub mod metrics;
pub mod outcome;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use http::header::{ACCEPT, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::value::RawValue;

use super::auth::ClientAuth;
use super::status::{CacheStatus, Served};
use super::{error_response, passthrough, Proxy, RetCode};
use crate::api::answer::{stitch, top_level_code, Answer};
use crate::api::error::{whole_seconds, ClientError, UpstreamError};
use crate::api::request::{parse_query, Limits, Parsed, QueryRequest};
use crate::api::{code, ErrorShape};
use crate::cache::{CacheKey, Entry, Found};
use crate::fetch::{FetchError, RequestContext};
use crate::http::{json_response, HeldBody, ProxyBody, CACHE_STATUS};
use crate::metrics::labels::{BypassReason, LookupOutcome, RequestOutcome};
use crate::trust::Fingerprint;
use crate::upstream::Auth as UpstreamAuth;
use memo::Memoized;
use outcome::QueryOutcome;

pub use metrics::QueryMetrics;

/// Serves one query, and counts it.
pub async fn handle(proxy: &Arc<Proxy>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let mut outcome = QueryOutcome::default();
    let resp = serve(proxy, req, &mut outcome).await;
    outcome.emit(proxy, started.elapsed().as_secs_f64());
    resp
}

async fn serve(
    proxy: &Arc<Proxy>,
    req: Request<Incoming>,
    outcome: &mut QueryOutcome,
) -> Response<ProxyBody> {
    let scope = match scope(proxy, req.headers()) {
        Ok(s) => s,
        Err((reason, inject)) => return bypass(proxy, req, inject, reason, outcome).await,
    };
    let (parts, body) = req.into_parts();
    let body = match read(proxy, &scope, body, &parts.headers, outcome).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if let Some(resp) = from_memo(proxy, &scope, &body.bytes, outcome) {
        return resp;
    }
    let request = match validate(proxy, &body.bytes) {
        Ok(Parsed::Query(r)) => r,
        Ok(Parsed::TooLargeToKey) => {
            let reason = BypassReason::ScopeTooLarge;
            proxy.metrics.bypass.inc(reason);
            outcome.request = RequestOutcome::Bypass;
            let resp = passthrough::forward_read(
                proxy,
                parts,
                body.bytes,
                scope.inject.as_ref(),
                CacheStatus::Bypass(reason),
            )
            .await;
            learn_refusal(proxy, &scope, &resp);
            return resp.response;
        }
        Err(e) => return invalid(e, outcome),
    };
    let plan = plan(proxy, &scope, request, &parts.headers);
    let looked = look_up(proxy, &scope, plan).await;
    let answers = match fetch(proxy, looked, outcome).await {
        Ok(a) => a,
        Err(failure) => return upstream_failure(proxy, &scope, &failure, outcome),
    };
    respond(proxy, &scope, body.bytes, answers, outcome)
}

// ---------------------------------------------------------------- scope

/// Who is asking, for a query the cache may serve.
struct Scope {
    auth: ClientAuth,
    app: Arc<str>,
    fingerprint: Fingerprint,
    /// Credentials to add when forwarding it unchanged (injection).
    inject: Option<UpstreamAuth>,
}

/// The cache serves a query scoped to an app by a credential it can fingerprint, with a JSON
/// body (or none declared: real SDKs send none). Anything else is forwarded unchanged.
fn scope(
    proxy: &Proxy,
    headers: &HeaderMap,
) -> Result<Scope, (BypassReason, Option<UpstreamAuth>)> {
    let auth = proxy.credentials.classify(headers);
    let inject = match &auth {
        ClientAuth::Injected { .. } => proxy.credentials.injection(),
        _ => None,
    };
    let Some((app, fingerprint)) = auth.scope() else {
        let reason = match auth {
            ClientAuth::Unscoped(super::auth::Unscoped::NoCredentials) => {
                BypassReason::NoCredentials
            }
            ClientAuth::Unscoped(super::auth::Unscoped::Signature) => BypassReason::Signature,
            _ => BypassReason::Unrecognized,
        };
        return Err((reason, None));
    };
    if !json_or_absent(headers) {
        // The upstream decides what it accepts.
        return Err((BypassReason::ContentType, inject));
    }
    Ok(Scope {
        auth,
        app,
        fingerprint,
        inject,
    })
}

/// Whether the body is declared JSON, or not declared at all.
fn json_or_absent(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE) else {
        return true;
    };
    let ct = String::from_utf8_lossy(ct.as_bytes()).to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence == "application/json" || essence.ends_with("+json")
}

/// A query the cache does not serve, forwarded unchanged (but for injected credentials).
async fn bypass(
    proxy: &Arc<Proxy>,
    req: Request<Incoming>,
    inject: Option<UpstreamAuth>,
    reason: BypassReason,
    outcome: &mut QueryOutcome,
) -> Response<ProxyBody> {
    proxy.metrics.bypass.inc(reason);
    let (resp, request) =
        passthrough::forward_as_is(proxy, req, inject.as_ref(), CacheStatus::Bypass(reason)).await;
    outcome.request = request;
    resp
}

// ---------------------------------------------------------------- read

/// Reads the body (bounded in size, time and in total over all connections) and checks the
/// credential against it: a signature the proxy can verify is verified (a bad or stale one
/// never reaches the cache or the upstream), and a credential the upstream refused recently
/// is answered here. Cheap checks first: nothing is parsed yet.
async fn read(
    proxy: &Proxy,
    scope: &Scope,
    body: Incoming,
    headers: &HeaderMap,
    outcome: &mut QueryOutcome,
) -> Result<HeldBody, Response<ProxyBody>> {
    let held = proxy
        .read_body(body, headers)
        .await
        .map_err(|e| invalid(e, outcome))?;
    if proxy.trust.is_refused(&scope.fingerprint) {
        outcome.request = RequestOutcome::Refused;
        let e = ClientError::AuthFailed("the upstream refused this credential recently");
        return Err(with_status(
            error_response(ErrorShape::Camel, &e),
            CacheStatus::Refused,
        ));
    }
    if let ClientAuth::Signed {
        access_id,
        timestamp,
        sign,
        ..
    } = &scope.auth
    {
        if let Err(why) = proxy
            .credentials
            .verify(access_id, timestamp, sign, &held.bytes)
        {
            return Err(invalid(ClientError::AuthFailed(why), outcome));
        }
    }
    Ok(held)
}

/// A request refused here: nothing forwarded.
fn invalid(e: ClientError, outcome: &mut QueryOutcome) -> Response<ProxyBody> {
    outcome.request = RequestOutcome::Invalid;
    let kind = e.class().kind;
    with_status(
        error_response(ErrorShape::Camel, &e),
        CacheStatus::Invalid(kind),
    )
}

fn with_status(mut resp: Response<ProxyBody>, status: CacheStatus) -> Response<ProxyBody> {
    resp.headers_mut().insert(CACHE_STATUS, status.header());
    resp
}

/// The memoized answer to an identical earlier request of this credential, if still valid.
fn from_memo(
    proxy: &Proxy,
    scope: &Scope,
    body: &Bytes,
    outcome: &mut QueryOutcome,
) -> Option<Response<ProxyBody>> {
    let memo = proxy.memo.as_ref()?;
    if !proxy.trust.is_accepted(&scope.fingerprint) {
        return None;
    }
    let cache = &proxy.cache;
    let m = memo.get(&scope.fingerprint, body, cache.clock().now(), |app| {
        cache.epoch(app)
    })?;
    outcome.memo_hit = true;
    outcome.op = Some(m.op);
    outcome.add(LookupOutcome::Hit, m.hits);
    outcome.add(LookupOutcome::NegativeHit, m.negative_hits);
    outcome.request = RequestOutcome::Hit;
    Some(answer(m.body.clone(), m.ret_code, m.cache_status))
}

// ---------------------------------------------------------------- validate

fn validate(proxy: &Proxy, body: &[u8]) -> Result<Parsed, ClientError> {
    let l = &proxy.config.limits;
    parse_query(
        body,
        &Limits {
            max_items: l.max_items,
            max_identifier_bytes: l.max_identifier_bytes,
            max_depth: l.max_json_depth,
            max_fields: l.max_fields,
            max_scope_bytes: usize::try_from(l.max_scope_bytes.as_u64()).unwrap_or(usize::MAX),
        },
    )
}

// ---------------------------------------------------------------- plan

/// One distinct identifier of the request.
struct Unique {
    key: CacheKey,
    /// The element as the client wrote it (sent upstream verbatim).
    raw: Box<RawValue>,
}

/// The request split into distinct keys; `positions` maps request order onto them.
struct Plan {
    ctx: Arc<RequestContext>,
    uniques: Vec<Unique>,
    positions: Vec<usize>,
    /// Whether the upstream accepted the credential recently: only then is the cache read.
    trusted: bool,
    /// The app's write epoch before any lookup: a write during them invalidates a memo.
    epoch: u64,
}

fn plan(proxy: &Proxy, scope: &Scope, request: QueryRequest, headers: &HeaderMap) -> Plan {
    let QueryRequest {
        op,
        top_fields,
        top_scope,
        items,
    } = request;
    let top_scope: Option<Arc<str>> = top_scope.map(Arc::from);
    let mut uniques: Vec<Unique> = Vec::with_capacity(items.len());
    let mut positions: Vec<usize> = Vec::with_capacity(items.len());
    let mut seen: HashMap<CacheKey, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(items.len(), foldhash::fast::RandomState::default());
    // The identifiers and elements move out of the request into the keys (no copies).
    for item in items {
        let key = CacheKey::new(
            proxy.upstream_id.clone(),
            scope.app.clone(),
            top_scope.clone(),
            item.ident,
        );
        let idx = *seen.entry(key.clone()).or_insert_with(|| {
            uniques.push(Unique { key, raw: item.raw });
            uniques.len() - 1
        });
        positions.push(idx);
    }
    let epoch = proxy.cache.epoch(&scope.app);
    let auth = proxy
        .credentials
        .upstream_auth(&scope.auth, headers)
        .unwrap_or_else(|| UpstreamAuth::Header(HeaderValue::from_static("")));
    Plan {
        ctx: Arc::new(RequestContext {
            fingerprint: scope.fingerprint,
            access_id: scope.app.clone(),
            op,
            top_scope,
            top_fields,
            headers: upstream_headers(headers),
            auth,
        }),
        uniques,
        positions,
        trusted: proxy.trust.is_accepted(&scope.fingerprint),
        epoch,
    }
}

/// Headers of an upstream sub-request (credentials are added per call): the client's user
/// agent, JSON both ways.
fn upstream_headers(client: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(4);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(ACCEPT, HeaderValue::from_static("application/json"));
    let ua = client
        .get(USER_AGENT)
        .cloned()
        .unwrap_or(HeaderValue::from_static(concat!(
            "tpns-cache/",
            env!("CARGO_PKG_VERSION")
        )));
    h.insert(USER_AGENT, ua);
    h
}

// ---------------------------------------------------------------- look up

/// The plan and what both tiers hold for each of its keys.
struct Looked {
    plan: Plan,
    found: Vec<Found>,
}

/// Looks every key up, for a credential the upstream accepted recently; for any other, the
/// whole request goes upstream (and warms the cache if the upstream accepts it).
async fn look_up(proxy: &Proxy, scope: &Scope, plan: Plan) -> Looked {
    let found = if plan.trusted {
        let keys: Vec<CacheKey> = plan.uniques.iter().map(|u| u.key.clone()).collect();
        proxy.cache.lookup(&scope.app, &keys).await
    } else {
        plan.uniques
            .iter()
            .map(|_| Found::Miss { stale: None })
            .collect()
    };
    Looked { plan, found }
}

// ---------------------------------------------------------------- fetch

/// An answer for each distinct identifier, and how it was served.
struct Answers {
    plan: Plan,
    entries: Vec<Arc<Entry>>,
    served: Served,
    /// Every identifier came fresh from the cache: the answer may be memoized.
    all_fresh: bool,
}

/// Fetches the misses (joining flights already in the air), refreshes the entries past their
/// lifetime in the background, and lets a stale entry stand in when the upstream cannot answer.
async fn fetch(
    proxy: &Proxy,
    looked: Looked,
    outcome: &mut QueryOutcome,
) -> Result<Answers, Arc<FetchError>> {
    let Looked { plan, found } = looked;
    let total = plan.uniques.len();
    outcome.op = Some(plan.ctx.op);
    let mut entries: Vec<Option<Arc<Entry>>> = vec![None; total];
    let mut stale_fallback: Vec<Option<Arc<Entry>>> = vec![None; total];
    let (mut revalidate, mut misses) = (Vec::new(), Vec::new());
    for (i, f) in found.into_iter().enumerate() {
        match f {
            Found::Fresh(e) => {
                let o = if e.is_negative() {
                    LookupOutcome::NegativeHit
                } else {
                    LookupOutcome::Hit
                };
                outcome.add(o, 1);
                entries[i] = Some(e);
            }
            Found::Shared(e) => {
                outcome.add(LookupOutcome::SharedHit, 1);
                entries[i] = Some(e);
            }
            Found::Revalidate(e) => {
                revalidate.push(i);
                entries[i] = Some(e);
            }
            Found::Miss { stale } => {
                stale_fallback[i] = stale;
                misses.push(i);
            }
        }
    }
    let fetcher = &proxy.fetcher;
    let items = |idx: &[usize]| {
        idx.iter()
            .map(|&i| (plan.uniques[i].key.clone(), plan.uniques[i].raw.to_owned()))
            .collect()
    };
    if !revalidate.is_empty() {
        outcome.refreshes_started += fetcher.refresh(&plan.ctx, items(&revalidate)) as u64;
        outcome.stale_revalidate += revalidate.len() as u64;
        outcome.add(LookupOutcome::Stale, revalidate.len() as u64);
    }
    let mut stale_on_error = 0usize;
    if !misses.is_empty() {
        let waiters = fetcher.fetch(&plan.ctx, items(&misses));
        let coalesced = waiters.iter().filter(|(_, joined)| *joined).count() as u64;
        outcome.add(LookupOutcome::Coalesced, coalesced);
        let fresh_misses = misses.len() as u64 - coalesced;
        outcome.add(
            if plan.trusted {
                LookupOutcome::Miss
            } else {
                LookupOutcome::Unverified
            },
            fresh_misses,
        );
        let bound = fetcher.wait_bound();
        let results = match tokio::time::timeout(
            bound,
            join_all(waiters.into_iter().map(|(w, _)| w.result())),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                let e = Arc::new(FetchError::Upstream(UpstreamError::WaitTimeout(bound)));
                vec![Err(e); misses.len()]
            }
        };
        let mut failure: Option<Arc<FetchError>> = None;
        for (&i, result) in misses.iter().zip(results) {
            match result {
                Ok(entry) => entries[i] = Some(entry),
                Err(e) => match stale_fallback[i].take() {
                    Some(stale) if e.allows_stale() => {
                        stale_on_error += 1;
                        entries[i] = Some(stale);
                    }
                    _ => {
                        failure.get_or_insert(e);
                    }
                },
            }
        }
        if let Some(f) = failure {
            return Err(f);
        }
        outcome.stale_error += stale_on_error as u64;
    }
    let entries: Vec<Arc<Entry>> = entries.into_iter().flatten().collect();
    if entries.len() != total {
        return Err(Arc::new(FetchError::Upstream(UpstreamError::Malformed(
            "an identifier was left unanswered".to_owned(),
        ))));
    }
    Ok(Answers {
        served: Served {
            from_cache: total - misses.len() + stale_on_error,
            total,
            stale: revalidate.len() + stale_on_error,
            upstream_unavailable: stale_on_error > 0,
        },
        all_fresh: plan.trusted && misses.is_empty() && revalidate.is_empty(),
        plan,
        entries,
    })
}

/// The fetch failed: the upstream's own refusal passed on unchanged, or our error.
fn upstream_failure(
    proxy: &Proxy,
    scope: &Scope,
    failure: &FetchError,
    outcome: &mut QueryOutcome,
) -> Response<ProxyBody> {
    outcome.request = RequestOutcome::UpstreamError;
    match failure {
        FetchError::Refused { ret_code, body } => {
            // What the client would have got without us.
            let mut resp = with_status(
                json_response(StatusCode::OK, body.clone()),
                CacheStatus::UpstreamRefused,
            );
            resp.extensions_mut().insert(RetCode(*ret_code));
            if *ret_code == code::RATE_LIMITED {
                // What is left of the cool-down this answer started, rounded up.
                let left = proxy
                    .fetcher
                    .caller()
                    .shield
                    .cooldown_left(&scope.app, &scope.fingerprint)
                    .unwrap_or(Duration::from_secs(1));
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(whole_seconds(left)));
            }
            resp
        }
        FetchError::Upstream(e) => with_status(
            super::upstream_error_response(ErrorShape::Camel, e),
            CacheStatus::UpstreamError,
        ),
    }
}

// ---------------------------------------------------------------- stitch

/// The documented response in request order, its `Cache-Status`, and the memo.
fn respond(
    proxy: &Proxy,
    scope: &Scope,
    body: Bytes,
    answers: Answers,
    outcome: &mut QueryOutcome,
) -> Response<ProxyBody> {
    let Answers {
        plan,
        entries,
        served,
        all_fresh,
    } = answers;
    let ordered: Vec<&Answer> = plan.positions.iter().map(|&i| &entries[i].answer).collect();
    let q = &proxy.config.query;
    let ret_code = top_level_code(
        ordered.iter().map(|a| &a.code),
        q.partial_failure_ret_code,
        q.all_failed_ret_code,
    );
    let stitched = Bytes::from(stitch(plan.ctx.op, ret_code, ordered.iter().copied()));
    let (status, request) = if !plan.trusted {
        (CacheStatus::Unverified, RequestOutcome::Unverified)
    } else if served.from_cache == served.total {
        (CacheStatus::Hit(served), RequestOutcome::Hit)
    } else if served.from_cache > 0 {
        (CacheStatus::Partial(served), RequestOutcome::Partial)
    } else {
        (CacheStatus::Miss(served), RequestOutcome::Miss)
    };
    outcome.request = request;
    if let (Some(memo), true) = (&proxy.memo, all_fresh) {
        if let Some(fresh_until) = entries.iter().map(|e| e.fresh_until).min() {
            memo.put(
                scope.fingerprint,
                body,
                Memoized {
                    body: stitched.clone(),
                    cache_status: status,
                    ret_code,
                    fresh_until,
                    epoch: plan.epoch,
                    access_id: scope.app.clone(),
                    op: plan.ctx.op,
                    hits: outcome.get(LookupOutcome::Hit),
                    negative_hits: outcome.get(LookupOutcome::NegativeHit),
                },
            );
        }
    }
    answer(stitched, ret_code, status)
}

fn answer(body: Bytes, ret_code: i64, status: CacheStatus) -> Response<ProxyBody> {
    let mut resp = with_status(json_response(StatusCode::OK, body), status);
    resp.extensions_mut().insert(RetCode(ret_code));
    resp
}

/// A forwarded query's answer says the upstream refused the credential: remembered as on the
/// cached path.
fn learn_refusal(proxy: &Proxy, scope: &Scope, forwarded: &passthrough::Read) {
    if forwarded.ret_code.is_some_and(code::is_auth_failure) {
        proxy.trust.refuse(scope.fingerprint);
    }
}
