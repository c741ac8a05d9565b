//! The middle phases of a query: the plan (one cache key per distinct identifier), the lookup
//! over both tiers, and the fetch of what is missing.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::join_all;
use http::header::{ACCEPT, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderValue};
use serde_json::value::RawValue;

use super::outcome::QueryOutcome;
use super::Scope;
use crate::api::error::UpstreamError;
use crate::api::request::QueryRequest;
use crate::cache::{CacheKey, Entry, Found, KeyPrefix};
use crate::fetch::{FetchError, RequestContext};
use crate::metrics::labels::LookupOutcome;
use crate::proxy::status::Served;
use crate::proxy::Proxy;
use crate::upstream::Auth as UpstreamAuth;

/// The request split into distinct keys; `positions` maps request order onto them.
pub(super) struct Plan {
    pub(super) ctx: Arc<RequestContext>,
    /// One key per distinct identifier of the request...
    pub(super) keys: Vec<CacheKey>,
    /// ...and its element as the client wrote it (sent upstream verbatim).
    pub(super) raws: Vec<Box<RawValue>>,
    pub(super) positions: Vec<usize>,
    /// Whether the upstream accepted the credential recently: only then is the cache read.
    pub(super) trusted: bool,
    /// The app's write epoch before any lookup: a write during them invalidates a memo.
    pub(super) epoch: u64,
}

pub(super) fn plan(
    proxy: &Proxy,
    scope: &Scope,
    request: QueryRequest,
    headers: &HeaderMap,
) -> Plan {
    let QueryRequest {
        op,
        top_fields,
        top_scope,
        items,
    } = request;
    let top_scope: Option<Arc<str>> = top_scope.map(Arc::from);
    let mut keys: Vec<CacheKey> = Vec::with_capacity(items.len());
    let mut raws: Vec<Box<RawValue>> = Vec::with_capacity(items.len());
    let mut positions: Vec<usize> = Vec::with_capacity(items.len());
    // Keys are equal exactly when their digests are (see `CacheKey`).
    let mut seen: HashMap<u128, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(items.len(), foldhash::fast::RandomState::default());
    // The identifiers and elements move out of the request into the keys (no copies); what
    // the keys share is hashed once.
    let prefix = KeyPrefix::new(
        proxy.upstream_id.clone(),
        scope.app.clone(),
        top_scope.clone(),
    );
    for item in items {
        let key = prefix.key(item.ident);
        let idx = *seen.entry(key.digest()).or_insert_with(|| {
            keys.push(key);
            raws.push(item.raw);
            keys.len() - 1
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
        keys,
        raws,
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

/// The plan and what both tiers hold for each of its keys.
pub(super) struct Looked {
    pub(super) plan: Plan,
    pub(super) found: Vec<Found>,
}

/// Looks every key up, for a credential the upstream accepted recently; for any other, the
/// whole request goes upstream (and warms the cache if the upstream accepts it).
pub(super) async fn look_up(proxy: &Proxy, scope: &Scope, plan: Plan) -> Looked {
    let found = if plan.trusted {
        proxy.cache.lookup(&scope.app, &plan.keys).await
    } else {
        plan.keys
            .iter()
            .map(|_| Found::Miss { stale: None })
            .collect()
    };
    Looked { plan, found }
}

/// An answer for each distinct identifier, and how it was served.
pub(super) struct Answers {
    pub(super) plan: Plan,
    pub(super) entries: Vec<Arc<Entry>>,
    pub(super) served: Served,
    /// Every identifier came fresh from the cache: the answer may be memoized.
    pub(super) all_fresh: bool,
}

/// Fetches the misses (joining flights already in the air), refreshes the entries past their
/// lifetime in the background, and lets a stale entry stand in when the upstream cannot answer.
pub(super) async fn fetch(
    proxy: &Proxy,
    looked: Looked,
    outcome: &mut QueryOutcome,
) -> Result<Answers, Arc<FetchError>> {
    let Looked { plan, found } = looked;
    let total = plan.keys.len();
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
            .map(|&i| (plan.keys[i].clone(), plan.raws[i].clone()))
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
