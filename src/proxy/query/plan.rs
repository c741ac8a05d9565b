//! The middle phases of a query: the plan (one cache key per distinct identifier), the lookup
//! over both tiers, and the fetch of what is missing.

use std::sync::Arc;

use futures_util::future::join_all;
use http::header::{ACCEPT, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderValue};
use serde_json::value::RawValue;

use super::outcome::QueryOutcome;
use super::Scope;
use crate::api::error::UpstreamError;
use crate::api::request::{Item, Op, QueryRequest};
use crate::cache::{CacheKey, Entry, Found, KeyPrefix};
use crate::fetch::{FetchError, RequestContext};
use crate::metrics::labels::LookupOutcome;
use crate::proxy::status::Served;
use crate::proxy::Proxy;
use crate::upstream::Auth as UpstreamAuth;

/// The request split into distinct keys; `positions` maps request order onto them.
///
/// A lookup needs only a key's digest, so that is all the plan computes for each identifier;
/// the identifiers and elements stay borrowed from the body, and a key (and an owned copy of
/// the element) is built only for what is fetched or asked of the shared tier.
pub(super) struct Plan<'a> {
    pub(super) op: Op,
    /// What an upstream call for this request needs besides its items, kept as parts: most
    /// requests are answered from the cache, so the [`RequestContext`] (its own allocation,
    /// the upstream headers, the credentials) is built only when something is fetched.
    top_scope: Option<Arc<str>>,
    top_fields: Vec<(String, Box<RawValue>)>,
    client_headers: &'a HeaderMap,
    /// What the request's keys share (hashed once).
    prefix: KeyPrefix,
    /// The digest of each distinct identifier's key...
    pub(super) digests: Vec<u128>,
    /// ...and where it first appears in `requested`.
    first: Vec<usize>,
    /// The request's identifiers with their elements as the client wrote them (sent upstream
    /// verbatim), in request order: left where the parser put them, not copied per identifier.
    requested: Vec<Item<'a>>,
    /// For each position in the request, its distinct key's index in `digests`.
    pub(super) positions: Vec<usize>,
    /// Whether the upstream accepted the credential recently: only then is the cache read.
    pub(super) trusted: bool,
    /// The app's write epoch before any lookup: a write during them invalidates a memo.
    pub(super) epoch: u64,
}

impl Plan<'_> {
    /// What an upstream call for this request needs besides its items (taken once: a request
    /// builds at most one, shared by its refreshes and its fetch).
    fn context(&mut self, proxy: &Proxy, scope: &Scope) -> Arc<RequestContext> {
        let auth = proxy
            .credentials
            .upstream_auth(&scope.auth, self.client_headers)
            .unwrap_or_else(|| UpstreamAuth::Header(HeaderValue::from_static("")));
        Arc::new(RequestContext {
            fingerprint: scope.fingerprint,
            access_id: scope.app.clone(),
            op: self.op,
            top_scope: self.top_scope.clone(),
            top_fields: std::mem::take(&mut self.top_fields),
            headers: upstream_headers(self.client_headers),
            auth,
        })
    }

    /// The `i`th distinct identifier, as the client sent it.
    fn item(&self, i: usize) -> &Item<'_> {
        &self.requested[self.first[i]]
    }

    /// The key of the `i`th distinct identifier.
    fn key(&self, i: usize) -> CacheKey {
        self.prefix
            .key_with_digest(self.digests[i], self.item(i).ident.to_owned_ident())
    }

    /// The `i`th key with its element, for a fetch.
    fn fetch_item(&self, i: usize) -> (CacheKey, Box<str>) {
        (self.key(i), Box::from(self.item(i).raw))
    }
}

/// `trusted`: whether the upstream accepted the credential recently (read once per request,
/// by the caller).
pub(super) fn plan<'a>(
    proxy: &Proxy,
    scope: &Scope,
    request: QueryRequest<'a>,
    headers: &'a HeaderMap,
    trusted: bool,
) -> Plan<'a> {
    let QueryRequest {
        op,
        top_fields,
        top_scope,
        items: requested,
    } = request;
    let top_scope: Option<Arc<str>> = top_scope.map(Arc::from);
    let mut digests: Vec<u128> = Vec::with_capacity(requested.len());
    let mut first: Vec<usize> = Vec::with_capacity(requested.len());
    let mut positions: Vec<usize> = Vec::with_capacity(requested.len());
    // Keys are equal exactly when their digests are (see `CacheKey`).
    let mut seen = Distinct::with_capacity(requested.len());
    // What the keys share is hashed once.
    let prefix = KeyPrefix::new(&proxy.upstream_id, scope.app.clone(), top_scope.clone());
    for (at, item) in requested.iter().enumerate() {
        let digest = prefix.digest(&item.ident);
        let idx = seen.find_or_insert(digest, &digests).unwrap_or_else(|| {
            digests.push(digest);
            first.push(at);
            digests.len() - 1
        });
        positions.push(idx);
    }
    let epoch = proxy.cache.epoch(&scope.app);
    Plan {
        op,
        top_scope,
        top_fields,
        client_headers: headers,
        prefix,
        digests,
        first,
        requested,
        positions,
        trusted,
        epoch,
    }
}

/// The distinct digests of one request so far: an open-addressing table of positions into
/// the plan's `digests`, probed by the digest's own low bits (a keyed SipHash output, so
/// uniformly spread and not steerable by a client). At most half full, so a probe ends after
/// about one slot; its size is bounded by `limits.max_items`. Cheaper than a `HashMap`, which
/// hashes the digest again and stores it twice.
struct Distinct {
    /// Position + 1 in `digests`; 0 is an empty slot.
    slots: Vec<u32>,
}

impl Distinct {
    fn with_capacity(n: usize) -> Distinct {
        Distinct {
            slots: vec![0; (2 * n).next_power_of_two().max(2)],
        }
    }

    /// Where `digest` sits in `digests`, if it is there already; if not, it is recorded as
    /// going next (at `digests.len()`), where the caller then pushes it. One probe either way.
    fn find_or_insert(&mut self, digest: u128, digests: &[u128]) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut i = (digest as usize) & mask;
        loop {
            match self.slots[i] {
                0 => {
                    self.slots[i] = u32::try_from(digests.len() + 1).unwrap_or(u32::MAX);
                    return None;
                }
                p if digests[p as usize - 1] == digest => return Some(p as usize - 1),
                _ => i = (i + 1) & mask,
            }
        }
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
pub(super) struct Looked<'a> {
    pub(super) plan: Plan<'a>,
    pub(super) found: Vec<Found>,
}

/// Looks every key up, for a credential the upstream accepted recently; for any other, the
/// whole request goes upstream (and warms the cache if the upstream accepts it).
pub(super) async fn look_up<'a>(proxy: &Proxy, scope: &Scope, plan: Plan<'a>) -> Looked<'a> {
    let found = if plan.trusted {
        proxy
            .cache
            .lookup(&scope.app, &plan.digests, |i| plan.key(i))
            .await
    } else {
        plan.digests
            .iter()
            .map(|_| Found::Miss { stale: None })
            .collect()
    };
    Looked { plan, found }
}

/// An answer for each distinct identifier, and how it was served.
pub(super) struct Answers<'a> {
    pub(super) plan: Plan<'a>,
    pub(super) entries: Vec<Entry>,
    pub(super) served: Served,
    /// Every identifier came fresh from the cache: the answer may be memoized.
    pub(super) all_fresh: bool,
}

/// Fetches the misses (joining flights already in the air), refreshes the entries past their
/// lifetime in the background, and lets a stale entry stand in when the upstream cannot answer.
pub(super) async fn fetch<'a>(
    proxy: &Proxy,
    scope: &Scope,
    looked: Looked<'a>,
    outcome: &mut QueryOutcome,
) -> Result<Answers<'a>, Arc<FetchError>> {
    let Looked { mut plan, found } = looked;
    let total = plan.digests.len();
    outcome.op = Some(plan.op);
    let mut entries: Vec<Option<Entry>> = vec![None; total];
    // Only a miss with a stale entry to stand in fills it (most requests have none).
    let mut stale_fallback: Vec<Option<Entry>> = Vec::new();
    let (mut revalidate, mut misses) = (Vec::new(), Vec::new());
    for (i, f) in found.into_iter().enumerate() {
        match f {
            Found::Fresh(e) => {
                outcome.add_fresh_hit(&e);
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
                if let Some(stale) = stale {
                    stale_fallback.resize(total, None);
                    stale_fallback[i] = Some(stale);
                }
                misses.push(i);
            }
        }
    }
    let fetcher = &proxy.fetcher;
    // Built only when something goes upstream (an all-hit request needs none).
    let ctx = (!revalidate.is_empty() || !misses.is_empty()).then(|| plan.context(proxy, scope));
    let items = |idx: &[usize]| idx.iter().map(|&i| plan.fetch_item(i)).collect();
    if let Some(ctx) = ctx.as_ref().filter(|_| !revalidate.is_empty()) {
        outcome.refreshes_started += fetcher.refresh(ctx, items(&revalidate)) as u64;
        outcome.stale_revalidate += revalidate.len() as u64;
        outcome.add(LookupOutcome::Stale, revalidate.len() as u64);
    }
    let mut stale_on_error = 0usize;
    if let Some(ctx) = ctx.as_ref().filter(|_| !misses.is_empty()) {
        let waiters = fetcher.fetch(ctx, items(&misses));
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
                Err(e) => match stale_fallback.get_mut(i).and_then(Option::take) {
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
    // Sized once (a `flatten` would grow the vector step by step: its length is not known).
    let mut answered: Vec<Entry> = Vec::with_capacity(total);
    for e in entries {
        let Some(e) = e else {
            return Err(Arc::new(FetchError::Upstream(UpstreamError::Malformed(
                "an identifier was left unanswered".to_owned(),
            ))));
        };
        answered.push(e);
    }
    let entries = answered;
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

#[cfg(test)]
mod tests {
    use super::Distinct;

    /// Every digest is found where it was put, and only there, including digests that share
    /// their low bits (so probes run past each other) and a full-size batch.
    #[test]
    fn distinct_finds_exactly_what_was_put() {
        for n in [1usize, 2, 3, 20, 100, 1000] {
            let mut seen = Distinct::with_capacity(n);
            let mut digests: Vec<u128> = Vec::new();
            // Half the digests collide in their low 64 bits with another one.
            let all: Vec<u128> = (0..n as u128)
                .map(|i| {
                    if i % 2 == 0 {
                        i << 64 | 7
                    } else {
                        i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    }
                })
                .collect();
            for (k, &d) in all.iter().enumerate() {
                assert_eq!(seen.find_or_insert(d, &digests), None);
                digests.push(d);
                assert_eq!(seen.find_or_insert(d, &digests), Some(k));
            }
            for (k, &d) in all.iter().enumerate() {
                assert_eq!(seen.find_or_insert(d, &digests), Some(k), "n {n}");
            }
            assert!(seen.slots.iter().filter(|&&s| s != 0).count() == n);
            assert_eq!(seen.find_or_insert(u128::MAX, &digests), None);
        }
    }
}
