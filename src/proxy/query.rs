//! The cached query path, in phases:
//!
//! 1. scope: Basic credential → AccessID (anything else is forwarded unchanged, not cached);
//! 2. read the body (bounded in size and time) and validate it (TPNS codes; nothing forwarded);
//! 3. split: one [`CacheKey`] per distinct identifier (duplicates are looked up once);
//! 4. look up in moka, unless the credential has not been accepted by the upstream recently;
//! 5. forward only the misses, in sub-requests of at most `upstream.max_batch` identifiers;
//! 6. check each upstream answer, store what may be cached;
//! 7. stitch the documented response in request order, with a `Cache-Status` header.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::join_all;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::value::RawValue;

use super::auth::{is_auth_failure, ClientAuth, Fingerprint};
use super::{cache_status, error_response, json_response, passthrough, State, CACHE_STATUS};
use crate::api::error::ProxyError;
use crate::api::query::{
    build_upstream_body, parse_request, parse_upstream_answer, stitch, top_level_code, Answer,
    Ident, Limits, QueryRequest, UpstreamAnswer,
};
use crate::api::{code, ErrorShape, QUERY_PATH};
use crate::cache::{CacheKey, Entry, Lookup};
use crate::config::LimitsConfig;
use crate::metrics::{LookupOutcome, RequestOutcome, Route, UpstreamOutcome};
use crate::upstream::{error_chain, ProxyBody};

pub async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let (resp, outcome) = match state.credentials.classify(req.headers()) {
        ClientAuth::Unscoped(why) => {
            let params = format!("fwd=bypass; detail=\"{}\"", why.as_str());
            passthrough::forward(state, req, Some(&params)).await
        }
        ClientAuth::Basic {
            access_id,
            fingerprint,
        } => serve(state, req, access_id, fingerprint).await,
    };
    state
        .metrics
        .request(Route::Query, outcome, started.elapsed().as_secs_f64());
    resp
}

async fn serve(
    state: &Arc<State>,
    req: Request<Incoming>,
    access_id: Arc<str>,
    fingerprint: Fingerprint,
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
    let bytes = match read_body(body, &parts.headers, limits).await {
        Ok(b) => b,
        Err(e) => return refused(e),
    };
    let request = match parse_request(
        &bytes,
        &Limits {
            max_items: limits.max_items,
            max_identifier_bytes: limits.max_identifier_bytes,
        },
    ) {
        Ok(r) => r,
        Err(e) => return refused(e),
    };
    drop(bytes);
    let headers = upstream_headers(&parts.headers);
    match answer(state, &request, access_id, fingerprint, headers).await {
        Ok(served) => {
            let mut resp = json_response(StatusCode::OK, served.body);
            resp.headers_mut()
                .insert(CACHE_STATUS, cache_status(&served.cache_status));
            (resp, served.outcome)
        }
        Err(Failure::Refused { body }) => {
            // The upstream's own answer, unchanged: what the client would have got without us.
            let mut resp = json_response(StatusCode::OK, body);
            resp.headers_mut().insert(
                CACHE_STATUS,
                HeaderValue::from_static("tpns-cache; fwd=miss; detail=\"upstream refused\""),
            );
            (resp, RequestOutcome::UpstreamError)
        }
        Err(Failure::Proxy(e)) => {
            let mut resp = error_response(ErrorShape::Camel, &e);
            resp.headers_mut().insert(
                CACHE_STATUS,
                HeaderValue::from_static("tpns-cache; fwd=miss; detail=\"upstream error\""),
            );
            (resp, RequestOutcome::UpstreamError)
        }
    }
}

/// Reads the whole body, refusing it early when `Content-Length` already breaks the limit and
/// as soon as the stream does (it is never buffered past the limit).
async fn read_body(
    body: Incoming,
    headers: &HeaderMap,
    limits: &LimitsConfig,
) -> Result<Bytes, ProxyError> {
    let limit = limits.max_body_bytes.as_u64();
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match tokio::time::timeout(limits.body_read_timeout, limited.collect()).await {
        Err(_) => Err(ProxyError::ClientTimeout(limits.body_read_timeout)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Ok(Err(e)) => Err(ProxyError::ClientBody(error_chain(e.as_ref()))),
    }
}

/// Headers of an upstream sub-request: the client's credential and user agent, JSON both ways.
fn upstream_headers(client: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(4);
    if let Some(a) = client.get(AUTHORIZATION) {
        h.insert(AUTHORIZATION, a.clone());
    }
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
struct Unique<'r> {
    key: CacheKey,
    /// The element as the client wrote it (sent upstream verbatim).
    raw: &'r RawValue,
    answer: Option<Arc<Entry>>,
}

struct Served {
    body: Vec<u8>,
    cache_status: String,
    outcome: RequestOutcome,
}

enum Failure {
    /// The upstream refused the call as a whole (HTTP 200, non-batch `retCode`): its body.
    Refused {
        body: Bytes,
    },
    Proxy(ProxyError),
}

async fn answer(
    state: &Arc<State>,
    request: &QueryRequest,
    access_id: Arc<str>,
    fingerprint: Fingerprint,
    headers: HeaderMap,
) -> Result<Served, Failure> {
    let op = request.op;
    let top_scope: Option<Arc<str>> = request.top_scope.as_deref().map(Arc::from);

    // Split: one key per distinct identifier; `positions` maps request order onto them.
    let mut uniques: Vec<Unique> = Vec::with_capacity(request.items.len());
    let mut positions: Vec<usize> = Vec::with_capacity(request.items.len());
    let mut seen: HashMap<&Ident, usize> = HashMap::with_capacity(request.items.len());
    for item in &request.items {
        let idx = *seen.entry(&item.ident).or_insert_with(|| {
            uniques.push(Unique {
                key: CacheKey {
                    upstream: state.upstream_id.clone(),
                    access_id: access_id.clone(),
                    top_scope: top_scope.clone(),
                    ident: item.ident.clone(),
                },
                raw: &item.raw,
                answer: None,
            });
            uniques.len() - 1
        });
        positions.push(idx);
    }

    // Look up, only for a credential the upstream accepted recently.
    let trusted = state.credentials.is_accepted(&fingerprint);
    let (mut hits, mut negative_hits) = (0u64, 0u64);
    if trusted {
        for u in &mut uniques {
            match state.store.get(&u.key).await {
                Lookup::Hit(e) => {
                    hits += 1;
                    u.answer = Some(e);
                }
                Lookup::NegativeHit(e) => {
                    negative_hits += 1;
                    u.answer = Some(e);
                }
                Lookup::Miss => {}
            }
        }
    }
    let misses: Vec<usize> = (0..uniques.len())
        .filter(|&i| uniques[i].answer.is_none())
        .collect();
    let m = &state.metrics;
    m.lookup(op, LookupOutcome::Hit, hits);
    m.lookup(op, LookupOutcome::NegativeHit, negative_hits);
    let miss_outcome = if trusted {
        LookupOutcome::Miss
    } else {
        LookupOutcome::Unverified
    };
    m.lookup(op, miss_outcome, misses.len() as u64);

    // Forward the misses.
    if !misses.is_empty() {
        let batches = plan_batches(&uniques, &misses, state.config.upstream.max_batch);
        let calls = batches.iter().map(|batch| {
            let body = build_upstream_body(request, batch.iter().map(|&i| uniques[i].raw));
            fetch(state, op, batch.len(), headers.clone(), Bytes::from(body))
        });
        let results = join_all(calls).await;
        let batch_codes = batch_codes(state);
        let mut failure: Option<Failure> = None;
        let mut accepted = false;
        for (batch, result) in batches.iter().zip(results) {
            let sent: Vec<&Ident> = batch.iter().map(|&i| &uniques[i].key.ident).collect();
            let parsed = result.and_then(|body| {
                parse_upstream_answer(op, &sent, &body, &batch_codes).map(|a| (a, body))
            });
            match parsed {
                Ok((UpstreamAnswer::Elements(answers), _)) => {
                    m.upstream(Route::Query, UpstreamOutcome::Ok);
                    accepted = true;
                    for (&i, a) in batch.iter().zip(answers) {
                        let entry = state.store.put(uniques[i].key.clone(), a).await;
                        uniques[i].answer = Some(entry);
                    }
                }
                Ok((UpstreamAnswer::Failed { ret_code }, body)) => {
                    m.upstream(Route::Query, UpstreamOutcome::Refused);
                    tracing::warn!(ret_code, "upstream refused a query sub-request");
                    if is_auth_failure(ret_code) {
                        state.credentials.forget(&fingerprint);
                    }
                    failure.get_or_insert(Failure::Refused { body });
                }
                Err(e) => {
                    m.upstream(Route::Query, UpstreamOutcome::of_error(&e));
                    tracing::warn!(error = %e, "upstream query sub-request failed");
                    failure.get_or_insert(Failure::Proxy(e));
                }
            }
        }
        if let Some(f) = failure {
            return Err(f);
        }
        if accepted {
            state.credentials.accept(fingerprint);
        }
    }

    // Stitch.
    let mut answers: Vec<&Answer> = Vec::with_capacity(positions.len());
    for &i in &positions {
        match &uniques[i].answer {
            Some(e) => answers.push(&e.answer),
            None => {
                return Err(Failure::Proxy(ProxyError::UpstreamMalformed(
                    "an identifier was left unanswered".to_owned(),
                )))
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
    let cached = total - misses.len();
    let (cache_status, outcome) = if !trusted {
        (
            "fwd=request; detail=\"credential not yet verified\"".to_owned(),
            RequestOutcome::Unverified,
        )
    } else if misses.is_empty() {
        (
            format!("hit; detail=\"hit {cached}/{total}\""),
            RequestOutcome::Hit,
        )
    } else if cached > 0 {
        (
            format!("fwd=partial; detail=\"hit {cached}/{total}\""),
            RequestOutcome::Partial,
        )
    } else {
        (
            format!("fwd=miss; detail=\"hit 0/{total}\""),
            RequestOutcome::Miss,
        )
    };
    Ok(Served {
        body,
        cache_status,
        outcome,
    })
}

/// Top-level codes that still carry per-element results.
fn batch_codes(state: &State) -> [i64; 5] {
    let q = &state.config.query;
    [
        code::OK,
        code::BATCH_PARTLY_FAILED,
        code::BATCH_ALL_FAILED,
        q.partial_failure_ret_code,
        q.all_failed_ret_code,
    ]
}

/// Splits the misses into sub-requests of at most `max_batch`, never putting two identifiers
/// with the same name (an account asked with two `account_type`s) into one sub-request, so the
/// upstream's elements can be matched back by name alone.
fn plan_batches(uniques: &[Unique], misses: &[usize], max_batch: usize) -> Vec<Vec<usize>> {
    let mut layer_of: HashMap<&str, usize> = HashMap::with_capacity(misses.len());
    let mut layers: Vec<Vec<usize>> = Vec::new();
    for &i in misses {
        let seen = layer_of.entry(uniques[i].key.ident.name()).or_insert(0);
        let layer = *seen;
        *seen += 1;
        if layers.len() <= layer {
            layers.push(Vec::new());
        }
        layers[layer].push(i);
    }
    layers
        .iter()
        .flat_map(|l| l.chunks(max_batch.max(1)).map(<[usize]>::to_vec))
        .collect()
}

/// One upstream sub-request; an HTTP status other than 200 is an error.
async fn fetch(
    state: &State,
    op: crate::api::query::Op,
    identifiers: usize,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Bytes, ProxyError> {
    let started = Instant::now();
    state
        .metrics
        .upstream_identifiers
        .with_label_values(&[op.as_str()])
        .inc_by(identifiers as u64);
    let result = state.upstream.post(QUERY_PATH, headers, body).await;
    state
        .metrics
        .upstream_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok((StatusCode::OK, body)) => Ok(body),
        Ok((status, _)) => Err(ProxyError::UpstreamStatus(status.as_u16())),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique(name: &str, account_type: Option<i64>) -> Unique<'static> {
        Unique {
            key: CacheKey {
                upstream: Arc::from("u"),
                access_id: Arc::from("a"),
                top_scope: None,
                ident: Ident::Account {
                    account: name.into(),
                    account_type,
                    extra: None,
                },
            },
            raw: Box::leak(RawValue::from_string("{}".to_owned()).unwrap()),
            answer: None,
        }
    }

    #[test]
    fn batches_respect_size_and_keep_same_names_apart() {
        let u = vec![
            unique("a", None),
            unique("a", Some(1)),
            unique("b", None),
            unique("c", None),
            unique("a", Some(2)),
        ];
        let misses: Vec<usize> = (0..u.len()).collect();
        let b = plan_batches(&u, &misses, 2);
        assert_eq!(b, vec![vec![0, 2], vec![3], vec![1], vec![4]]);
        for batch in &b {
            let mut names: Vec<&str> = batch.iter().map(|&i| u[i].key.ident.name()).collect();
            names.dedup();
            assert_eq!(names.len(), batch.len());
        }
        let all: usize = b.iter().map(Vec::len).sum();
        assert_eq!(all, 5);
        assert_eq!(plan_batches(&u, &[2, 3], 100), vec![vec![2, 3]]);
    }
}
