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

pub(crate) mod memo;
pub(crate) mod metrics;
pub(crate) mod outcome;
mod plan;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::auth::ClientAuth;
use super::status::{CacheStatus, Served};
use super::{error_response, passthrough, Proxy, RetCode};
use crate::api::answer::{stitch, top_level_code};
use crate::api::error::{whole_seconds, ClientError};
use crate::api::request::{parse_query, Limits, Parsed};
use crate::api::{code, ErrorShape};
use crate::cache::Entry;
use crate::fetch::FetchError;
use crate::http::{json_response, HeldBody, ProxyBody, CACHE_STATUS};
use crate::metrics::labels::{BypassReason, LookupOutcome, RequestOutcome};
use crate::trust::Fingerprint;
use crate::upstream::Auth as UpstreamAuth;
use memo::{Memoized, Recall};
use outcome::QueryOutcome;

pub(crate) use metrics::QueryMetrics;

/// Serves one query, and counts it. With the response, its `retCode` when the answer was
/// made here on the cached path (the router counts it; other answers carry theirs as a
/// [`RetCode`] extension, which costs two allocations per response).
pub(crate) async fn handle(
    proxy: &Arc<Proxy>,
    req: Request<Incoming>,
) -> (Response<ProxyBody>, Option<RetCode>) {
    let started = Instant::now();
    let mut outcome = QueryOutcome::default();
    let resp = serve(proxy, req, &mut outcome).await;
    outcome.emit(proxy, started.elapsed().as_secs_f64());
    (resp, outcome.ret_code.map(RetCode))
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
    // Read once: the memo and the lookups act on the same answer.
    let trusted = proxy.trust.is_accepted(&scope.fingerprint);
    if let Some(resp) = from_memo(proxy, &scope, trusted, &body.bytes, outcome) {
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
    let plan = plan::plan(proxy, &scope, request, &parts.headers, trusted);
    if let Some(resp) = answer_fresh(proxy, &scope, &body.bytes, &plan, outcome) {
        return resp;
    }
    let looked = plan::look_up(proxy, &scope, plan).await;
    let plan::Answers {
        plan,
        entries,
        served,
        all_fresh,
    } = match plan::fetch(proxy, &scope, looked, outcome).await {
        Ok(a) => a,
        Err(failure) => return upstream_failure(proxy, &scope, &failure, outcome),
    };
    let stitched = stitch_entries(proxy, &plan, &entries, all_fresh && outcome.memo_seen);
    respond(proxy, &scope, &body.bytes, &plan, served, stitched, outcome)
}

// ---------------------------------------------------------------- scope

/// Who is asking, for a query the cache may serve.
pub(super) struct Scope {
    pub(super) auth: ClientAuth,
    pub(super) app: Arc<str>,
    pub(super) fingerprint: Fingerprint,
    /// Credentials to add when forwarding it unchanged (injection).
    pub(super) inject: Option<UpstreamAuth>,
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
    // Compared as bytes, in place: this runs for every query.
    let essence = ct
        .as_bytes()
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    essence.eq_ignore_ascii_case(b"application/json")
        || essence
            .len()
            .checked_sub(5)
            .is_some_and(|at| essence[at..].eq_ignore_ascii_case(b"+json"))
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
    trusted: bool,
    body: &Bytes,
    outcome: &mut QueryOutcome,
) -> Option<Response<ProxyBody>> {
    let memo = proxy.memo.as_ref()?;
    if !trusted {
        // Nothing is served to a credential not (yet) accepted, but the body counts as seen.
        memo.note(&scope.fingerprint, body);
        return None;
    }
    let cache = &proxy.cache;
    let m = match memo.get(&scope.fingerprint, body, cache.clock().now(), |app| {
        cache.epoch(app)
    }) {
        Recall::Hit(m) => m,
        Recall::Seen => {
            outcome.memo_seen = true;
            return None;
        }
        Recall::New => return None,
    };
    outcome.memo_hit = true;
    outcome.op = Some(m.op);
    outcome.add(LookupOutcome::Hit, m.hits);
    outcome.add(LookupOutcome::NegativeHit, m.negative_hits);
    outcome.request = RequestOutcome::Hit;
    Some(answer(m.body.clone(), m.ret_code, m.cache_status, outcome))
}

// ---------------------------------------------------------------- validate

fn validate<'a>(proxy: &Proxy, body: &'a [u8]) -> Result<Parsed<'a>, ClientError> {
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
            outcome.ret_code = Some(*ret_code);
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

/// A request whose every identifier is fresh in this sidecar's cache, the usual one once the
/// cache is warm: stitched from the entries where they are, with no clone of each entry, no
/// vectors of lookups and answers, no fetch step. `None` when one is not (or the credential is
/// not trusted yet): the general path then looks them up again (a few hundred nanoseconds,
/// next to a fetch).
fn answer_fresh(
    proxy: &Proxy,
    scope: &Scope,
    body: &Bytes,
    plan: &plan::Plan<'_>,
    outcome: &mut QueryOutcome,
) -> Option<Response<ProxyBody>> {
    if !plan.trusted {
        return None;
    }
    let memoize = outcome.memo_seen;
    let stitched = proxy.cache.with_all_fresh(&plan.digests, |entries| {
        for e in entries {
            outcome.add_fresh_hit(e);
        }
        stitch_entries(proxy, plan, entries, memoize)
    })?;
    let total = plan.digests.len();
    outcome.op = Some(plan.op);
    let served = Served {
        from_cache: total,
        total,
        stale: 0,
        upstream_unavailable: false,
    };
    Some(respond(proxy, scope, body, plan, served, stitched, outcome))
}

/// The documented body for the distinct keys' `entries` (however they are held), in request
/// order (a duplicate answered at each of its positions).
struct Stitched {
    body: Bytes,
    ret_code: i64,
    /// When the answer may be memoized: the earliest end of its entries' fresh periods.
    fresh_until: Option<tokio::time::Instant>,
}

/// `memoize`: every entry was fresh and the memo saw this body lately (worth keeping).
fn stitch_entries<E: std::borrow::Borrow<Entry>>(
    proxy: &Proxy,
    plan: &plan::Plan<'_>,
    entries: &[E],
    memoize: bool,
) -> Stitched {
    // Request order, read twice, not collected.
    let ordered = plan.positions.iter().map(|&i| entries[i].borrow());
    let q = &proxy.config.query;
    let ret_code = top_level_code(
        ordered.clone().map(|a| a.code()),
        q.partial_failure_ret_code,
        q.all_failed_ret_code,
    );
    let body = Bytes::from(stitch(plan.op, ret_code, ordered));
    let fresh_until = (memoize && proxy.memo.is_some())
        .then(|| entries.iter().map(|e| e.borrow().fresh_until()).min())
        .flatten();
    Stitched {
        body,
        ret_code,
        fresh_until,
    }
}

/// The response, its `Cache-Status`, and the memo.
fn respond(
    proxy: &Proxy,
    scope: &Scope,
    body: &Bytes,
    plan: &plan::Plan<'_>,
    served: Served,
    stitched: Stitched,
    outcome: &mut QueryOutcome,
) -> Response<ProxyBody> {
    let Stitched {
        body: stitched,
        ret_code,
        fresh_until,
    } = stitched;
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
    if let (Some(memo), Some(fresh_until)) = (&proxy.memo, fresh_until) {
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
                op: plan.op,
                hits: outcome.get(LookupOutcome::Hit),
                negative_hits: outcome.get(LookupOutcome::NegativeHit),
            },
        );
    }
    answer(stitched, ret_code, status, outcome)
}

fn answer(
    body: Bytes,
    ret_code: i64,
    status: CacheStatus,
    outcome: &mut QueryOutcome,
) -> Response<ProxyBody> {
    outcome.ret_code = Some(ret_code);
    with_status(json_response(StatusCode::OK, body), status)
}

/// A forwarded query's answer says the upstream refused the credential: remembered as on the
/// cached path.
fn learn_refusal(proxy: &Proxy, scope: &Scope, forwarded: &passthrough::Read) {
    if forwarded.ret_code.is_some_and(code::is_auth_failure) {
        proxy.trust.refuse(scope.fingerprint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What counts as a JSON body: the media type's essence, in any case, with parameters and
    /// optional whitespace; structured `+json` types too; nothing else.
    #[test]
    fn json_content_types() {
        let mut headers = HeaderMap::new();
        assert!(json_or_absent(&headers), "none declared");
        for (ct, json) in [
            (&b"application/json"[..], true),
            (b"Application/JSON; charset=utf-8", true),
            (b" application/json\t;x=y", true),
            (b"application/problem+json", true),
            (b"APPLICATION/VND.API+JSON;v=1", true),
            (b"+json", true),
            (b"text/plain", false),
            (b"application/jsonx", false),
            (b"application/json-seq", false),
            (b"json", false),
            (b"", false),
            (b";application/json", false),
            (b"application/x-www-form-urlencoded", false),
            (b"application/json\xff", false),
        ] {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_bytes(ct).expect("valid value"),
            );
            assert_eq!(
                json_or_absent(&headers),
                json,
                "{}",
                String::from_utf8_lossy(ct)
            );
        }
    }
}
