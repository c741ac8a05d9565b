//! The cached query path, in phases:
//!
//! 1. scope: Basic credential → AccessID (anything else is forwarded unchanged, not cached);
//! 2. read the body (bounded in size and time) and validate it (TPNS codes; nothing forwarded);
//! 3. split: one [`CacheKey`] per distinct identifier (duplicates are looked up once);
//! 4. look up in moka, unless the credential has not been accepted by the upstream recently;
//! 5. fetch only the misses ([`super::fetch`]: coalesced, micro-batched, rate-limited), refresh
//!    stale-while-revalidate entries in the background, fall back to stale-if-error entries;
//! 6. each upstream answer is checked and stored by the fetcher;
//! 7. stitch the documented response in request order, with a `Cache-Status` header.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use http::header::{ACCEPT, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::value::RawValue;

use super::auth::{is_auth_failure, ClientAuth, Fingerprint, UpstreamAuth};
use super::fetch::{self, FetchError, RequestContext};
use super::{
    cache_status, error_response, json_response, passthrough, read_body, RetCode, State,
    CACHE_STATUS,
};
use crate::api::error::ProxyError;
use crate::api::query::{
    parse_query, stitch, top_level_code, Answer, Limits, Parsed, QueryRequest,
};
use crate::api::{code, ErrorShape};
use crate::cache::memo::Memoized;
use crate::cache::{CacheKey, Entry, Lookup};
use crate::metrics::{LookupOutcome, RequestOutcome, Route};
use crate::upstream::ProxyBody;

pub async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let auth = state.credentials.classify(req.headers());
    let (resp, outcome) = match &auth {
        ClientAuth::Unscoped(why) => bypass(state, req, None, why.as_str()).await,
        _ if !json_or_absent(req.headers()) => {
            // The upstream decides what it accepts: forwarded unchanged, not cached.
            let inject = match &auth {
                ClientAuth::Injected { .. } => state.credentials.injection(),
                _ => None,
            };
            bypass(state, req, inject.as_ref(), "content_type").await
        }
        _ => serve(state, req, auth).await,
    };
    state
        .metrics
        .request(Route::Query, outcome, started.elapsed().as_secs_f64());
    resp
}

/// A query the cache does not serve, forwarded unchanged (but for injected credentials), with
/// `Cache-Status: …; fwd=bypass; detail="<reason>"` and counted by reason.
async fn bypass(
    state: &Arc<State>,
    req: Request<Incoming>,
    inject: Option<&super::auth::UpstreamAuth>,
    reason: &'static str,
) -> (Response<ProxyBody>, RequestOutcome) {
    state
        .metrics
        .query_bypass
        .with_label_values(&[reason])
        .inc();
    let params = format!("fwd=bypass; detail=\"{reason}\"");
    passthrough::forward_as_is(state, req, inject, &params).await
}

/// A query whose body was read but that the cache does not serve ([`Parsed::TooLargeToKey`]),
/// forwarded unchanged (but for injected credentials).
async fn bypass_read(
    state: &Arc<State>,
    parts: http::request::Parts,
    body: Bytes,
    auth: &ClientAuth,
) -> (Response<ProxyBody>, RequestOutcome) {
    let reason = "scope_too_large";
    state
        .metrics
        .query_bypass
        .with_label_values(&[reason])
        .inc();
    let inject = match auth {
        ClientAuth::Injected { .. } => state.credentials.injection(),
        _ => None,
    };
    let params = format!("fwd=bypass; detail=\"{reason}\"");
    match passthrough::forward_buffered(state, parts, body, inject.as_ref(), &params).await {
        Ok((head, body)) => {
            // The upstream's refusal of the credential is remembered as on the cached path.
            if let Some((_, fingerprint)) = auth.scope() {
                if crate::api::query::ret_code_of(&body).is_some_and(is_auth_failure) {
                    state.credentials.refuse(fingerprint);
                }
            }
            (
                Response::from_parts(head, crate::upstream::full(body)),
                RequestOutcome::Bypass,
            )
        }
        Err(e) => (
            error_response(ErrorShape::Camel, &e),
            RequestOutcome::UpstreamError,
        ),
    }
}

/// Whether the body is declared JSON, or not declared at all (real SDKs send none).
fn json_or_absent(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE) else {
        return true;
    };
    let ct = String::from_utf8_lossy(ct.as_bytes()).to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence == "application/json" || essence.ends_with("+json")
}

async fn serve(
    state: &Arc<State>,
    req: Request<Incoming>,
    auth: ClientAuth,
) -> (Response<ProxyBody>, RequestOutcome) {
    let (parts, body) = req.into_parts();
    let refused = |e: ProxyError| {
        let mut resp = error_response(ErrorShape::Camel, &e);
        resp.headers_mut().insert(
            CACHE_STATUS,
            cache_status(&format!("fwd=bypass; detail=\"{}\"", e.kind())),
        );
        (resp, RequestOutcome::Invalid)
    };
    let limits = &state.config.limits;
    let (bytes, _held) = match read_body(body, &parts.headers, limits, &state.body_budget).await {
        Ok(b) => b,
        Err(e) => return refused(e),
    };
    // Cheapest checks first: a credential the upstream refused recently is answered here,
    // before anything is parsed, and costs the upstream (and its quota) nothing. (The body is
    // read all the same, bounded, so the client sees this answer rather than a broken pipe.)
    if let Some((_, fingerprint)) = auth.scope() {
        if state.credentials.is_refused(&fingerprint) {
            let e = ProxyError::AuthFailed("the upstream refused this credential recently");
            let mut resp = error_response(ErrorShape::Camel, &e);
            resp.headers_mut().insert(
                CACHE_STATUS,
                HeaderValue::from_static("tpns-cache; hit; detail=\"credential refused\""),
            );
            return (resp, RequestOutcome::Refused);
        }
    }
    if let ClientAuth::Signed {
        access_id,
        timestamp,
        sign,
        ..
    } = &auth
    {
        // Checked before anything else: a bad or stale signature never reaches the cache or
        // the upstream.
        if let Err(why) = state.credentials.verify(access_id, timestamp, sign, &bytes) {
            return refused(ProxyError::AuthFailed(why));
        }
    }
    let (Some((access_id, fingerprint)), Some(upstream_auth)) = (
        auth.scope(),
        state.credentials.upstream_auth(&auth, &parts.headers),
    ) else {
        return refused(ProxyError::AuthFailed("no usable credentials"));
    };
    if let Some(resp) = from_memo(state, &fingerprint, &bytes) {
        return resp;
    }
    let request = match parse_query(
        &bytes,
        &Limits {
            max_items: limits.max_items,
            max_identifier_bytes: limits.max_identifier_bytes,
            max_depth: limits.max_json_depth,
            max_fields: limits.max_fields,
            max_scope_bytes: limits
                .max_scope_bytes
                .as_u64()
                .try_into()
                .unwrap_or(usize::MAX),
        },
    ) {
        Ok(Parsed::Query(r)) => r,
        Ok(Parsed::TooLargeToKey) => return bypass_read(state, parts, bytes, &auth).await,
        Err(e) => return refused(e),
    };
    let headers = upstream_headers(&parts.headers);
    match answer(
        state,
        request,
        access_id.clone(),
        fingerprint,
        headers,
        upstream_auth,
    )
    .await
    {
        Ok(served) => {
            let body = Bytes::from(served.body);
            if let (Some(memo), Some(m)) = (&state.memo, served.memo) {
                memo.put(
                    fingerprint,
                    bytes,
                    Memoized {
                        body: body.clone(),
                        cache_status: served.cache_status.clone(),
                        ret_code: served.ret_code,
                        ..m
                    },
                );
            }
            let mut resp = json_response(StatusCode::OK, body);
            resp.extensions_mut().insert(RetCode(served.ret_code));
            resp.headers_mut()
                .insert(CACHE_STATUS, cache_status(&served.cache_status));
            (resp, served.outcome)
        }
        Err(failure) => match &*failure {
            FetchError::Refused { ret_code, body } => {
                // The upstream's own answer, unchanged: what the client would have got without us.
                let mut resp = json_response(StatusCode::OK, body.clone());
                resp.extensions_mut().insert(RetCode(*ret_code));
                resp.headers_mut().insert(
                    CACHE_STATUS,
                    HeaderValue::from_static("tpns-cache; fwd=miss; detail=\"upstream refused\""),
                );
                if *ret_code == code::RATE_LIMITED {
                    // What is left of the cool-down this answer started, rounded up.
                    let left = state
                        .fetcher
                        .cooldown_left(&access_id, &fingerprint)
                        .unwrap_or(Duration::from_secs(1));
                    resp.headers_mut().insert(
                        RETRY_AFTER,
                        HeaderValue::from(crate::api::error::whole_seconds(left)),
                    );
                }
                (resp, RequestOutcome::UpstreamError)
            }
            FetchError::Proxy(e) => {
                let mut resp = error_response(ErrorShape::Camel, e);
                resp.headers_mut().insert(
                    CACHE_STATUS,
                    HeaderValue::from_static("tpns-cache; fwd=miss; detail=\"upstream error\""),
                );
                (resp, RequestOutcome::UpstreamError)
            }
        },
    }
}

/// The memoized answer to an identical earlier request, if still valid (see
/// [`crate::cache::memo`]).
fn from_memo(
    state: &State,
    fingerprint: &Fingerprint,
    body: &Bytes,
) -> Option<(Response<ProxyBody>, RequestOutcome)> {
    let memo = state.memo.as_ref()?;
    if !state.credentials.is_accepted(fingerprint) {
        return None;
    }
    let index = state.store.index();
    let m = memo.get(fingerprint, body, state.store.clock().now(), |app| {
        index.epoch(app)
    })?;
    let metrics = &state.metrics;
    metrics.memo_hits.inc();
    metrics.lookup(m.op, LookupOutcome::Hit, m.hits);
    metrics.lookup(m.op, LookupOutcome::NegativeHit, m.negative_hits);
    let mut resp = json_response(StatusCode::OK, m.body.clone());
    resp.extensions_mut().insert(RetCode(m.ret_code));
    resp.headers_mut()
        .insert(CACHE_STATUS, cache_status(&m.cache_status));
    Some((resp, RequestOutcome::Hit))
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

/// One distinct identifier of the request.
struct Unique {
    key: CacheKey,
    /// The element as the client wrote it (sent upstream verbatim).
    raw: Box<RawValue>,
    answer: Option<Arc<Entry>>,
    /// A stale entry to serve only if the upstream cannot answer (stale-if-error).
    fallback: Option<Arc<Entry>>,
}

struct Served {
    /// Set when every identifier came fresh from the cache: what the memo needs besides the
    /// body.
    memo: Option<Memoized>,
    ret_code: i64,
    body: Vec<u8>,
    cache_status: String,
    outcome: RequestOutcome,
}

async fn answer(
    state: &Arc<State>,
    request: QueryRequest,
    access_id: Arc<str>,
    fingerprint: Fingerprint,
    headers: HeaderMap,
    upstream_auth: UpstreamAuth,
) -> Result<Served, Arc<FetchError>> {
    let QueryRequest {
        op,
        top_fields,
        top_scope,
        items,
    } = request;
    let top_scope: Option<Arc<str>> = top_scope.map(Arc::from);

    // Split: one key per distinct identifier; `positions` maps request order onto them. The
    // identifiers and elements move out of the request into the keys (no copies).
    let mut uniques: Vec<Unique> = Vec::with_capacity(items.len());
    let mut positions: Vec<usize> = Vec::with_capacity(items.len());
    let mut seen: HashMap<CacheKey, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(items.len(), foldhash::fast::RandomState::default());
    for item in items {
        let key = CacheKey::new(
            state.upstream_id.clone(),
            access_id.clone(),
            top_scope.clone(),
            item.ident,
        );
        let idx = *seen.entry(key.clone()).or_insert_with(|| {
            uniques.push(Unique {
                key,
                raw: item.raw,
                answer: None,
                fallback: None,
            });
            uniques.len() - 1
        });
        positions.push(idx);
    }
    drop(seen);

    // Look up, only for a credential the upstream accepted recently. The app's write epoch is
    // read first: a write during the lookups makes a memo of this answer invalid at once.
    let epoch = state.store.index().epoch(&access_id);
    let memo_app = access_id.clone();
    let trusted = state.credentials.is_accepted(&fingerprint);
    let (mut hits, mut negative_hits) = (0u64, 0u64);
    let mut revalidate: Vec<usize> = Vec::new();
    if trusted {
        let now = state.store.clock().now();
        for (i, u) in uniques.iter_mut().enumerate() {
            match state.store.get_at(&u.key, now).await {
                Lookup::Fresh(e) => {
                    if e.is_negative() {
                        negative_hits += 1;
                    } else {
                        hits += 1;
                    }
                    u.answer = Some(e);
                }
                Lookup::Revalidate(e) => {
                    revalidate.push(i);
                    u.answer = Some(e);
                }
                Lookup::StaleIfError(e) => u.fallback = Some(e),
                Lookup::Miss => {}
            }
        }
    }
    // Fleet mode: what this sidecar lacks may be fresh in the shared tier (one round trip).
    let mut shared_hits = 0u64;
    if let (true, Some(fleet)) = (trusted, &state.fleet) {
        let wanted: Vec<usize> = (0..uniques.len())
            .filter(|&i| uniques[i].answer.is_none())
            .collect();
        if !wanted.is_empty() {
            let keys: Vec<CacheKey> = wanted.iter().map(|&i| uniques[i].key.clone()).collect();
            if let Some(found) = fleet.lookup(&access_id, &keys).await {
                for (&i, hit) in wanted.iter().zip(found) {
                    if let Some((answer, fresh_for)) = hit {
                        // Not stored if a write to the app happened since the lookups began.
                        let (entry, _) = state
                            .store
                            .put_fresh_for_since(uniques[i].key.clone(), answer, fresh_for, epoch)
                            .await;
                        uniques[i].answer = Some(entry);
                        shared_hits += 1;
                    }
                }
            }
        }
    }
    let misses: Vec<usize> = (0..uniques.len())
        .filter(|&i| uniques[i].answer.is_none())
        .collect();
    let ctx = Arc::new(RequestContext {
        fingerprint,
        access_id,
        op,
        top_scope,
        top_fields,
        headers,
        auth: upstream_auth,
    });
    let m = &state.metrics;
    if !revalidate.is_empty() {
        let items = revalidate
            .iter()
            .map(|&i| (uniques[i].key.clone(), uniques[i].raw.to_owned()))
            .collect();
        let started = fetch::refresh(state, &ctx, items);
        m.refreshes.inc_by(started as u64);
        m.stale_served
            .with_label_values(&["revalidate"])
            .inc_by(revalidate.len() as u64);
    }

    // Fetch the misses (joining flights already in the air).
    let mut stale_on_error = 0u64;
    let mut coalesced = 0u64;
    if !misses.is_empty() {
        let items = misses
            .iter()
            .map(|&i| (uniques[i].key.clone(), uniques[i].raw.to_owned()))
            .collect();
        let waiters = fetch::fetch(state, &ctx, items);
        coalesced = waiters.iter().filter(|(_, joined)| *joined).count() as u64;
        let bound = state.fetcher.wait_bound;
        let results = match tokio::time::timeout(
            bound,
            join_all(waiters.into_iter().map(|(w, _)| w.result())),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                let e = Arc::new(FetchError::Proxy(ProxyError::WaitTimeout(bound)));
                vec![Err(e); misses.len()]
            }
        };
        let mut failure: Option<Arc<FetchError>> = None;
        for (&i, result) in misses.iter().zip(results) {
            match result {
                Ok(entry) => uniques[i].answer = Some(entry),
                Err(e) => match uniques[i].fallback.take() {
                    Some(stale) if e.allows_stale() => {
                        stale_on_error += 1;
                        uniques[i].answer = Some(stale);
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
        if stale_on_error > 0 {
            m.stale_served
                .with_label_values(&["error"])
                .inc_by(stale_on_error);
        }
    }
    m.lookup(op, LookupOutcome::Hit, hits);
    m.lookup(op, LookupOutcome::NegativeHit, negative_hits);
    m.lookup(op, LookupOutcome::Stale, revalidate.len() as u64);
    m.lookup(op, LookupOutcome::SharedHit, shared_hits);
    m.lookup(op, LookupOutcome::Coalesced, coalesced);
    let fresh_misses = misses.len() as u64 - coalesced;
    let miss_outcome = if trusted {
        LookupOutcome::Miss
    } else {
        LookupOutcome::Unverified
    };
    m.lookup(op, miss_outcome, fresh_misses);

    // Stitch.
    let mut answers: Vec<&Answer> = Vec::with_capacity(positions.len());
    for &i in &positions {
        match &uniques[i].answer {
            Some(e) => answers.push(&e.answer),
            None => {
                return Err(Arc::new(FetchError::Proxy(ProxyError::UpstreamMalformed(
                    "an identifier was left unanswered".to_owned(),
                ))))
            }
        }
    }
    let q = &state.config.query;
    let ret_code = top_level_code(
        answers.iter().map(|a| &a.code),
        q.partial_failure_ret_code,
        q.all_failed_ret_code,
    );
    let body = stitch(op, ret_code, answers.iter().copied());
    let total = uniques.len();
    let from_cache = total - misses.len() + stale_on_error as usize;
    let stale = revalidate.len() + stale_on_error as usize;
    let mut detail = format!("hit {from_cache}/{total}");
    if stale > 0 {
        detail.push_str(&format!(", stale {stale}"));
    }
    if stale_on_error > 0 {
        detail.push_str(", upstream unavailable");
    }
    let (params, outcome) = if !trusted {
        (
            "fwd=request; detail=\"credential not yet verified\"".to_owned(),
            RequestOutcome::Unverified,
        )
    } else if from_cache == total {
        (format!("hit; detail=\"{detail}\""), RequestOutcome::Hit)
    } else if from_cache > 0 {
        (
            format!("fwd=partial; detail=\"{detail}\""),
            RequestOutcome::Partial,
        )
    } else {
        (
            format!("fwd=miss; detail=\"{detail}\""),
            RequestOutcome::Miss,
        )
    };
    let memo = match outcome {
        RequestOutcome::Hit if stale == 0 => uniques
            .iter()
            .filter_map(|u| u.answer.as_ref().map(|e| e.fresh_until))
            .min()
            .map(|fresh_until| Memoized {
                body: Bytes::new(),
                cache_status: String::new(),
                ret_code,
                fresh_until,
                epoch,
                access_id: memo_app,
                op,
                hits,
                negative_hits,
            }),
        _ => None,
    };
    Ok(Served {
        memo,
        ret_code,
        body,
        cache_status: params,
        outcome,
    })
}
