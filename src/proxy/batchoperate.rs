//! `POST /v3/device/account/batchoperate`: forwarded unchanged, and every cached entry the write
//! can make wrong is dropped, in both directions (the token's accounts and the accounts' tokens,
//! including accounts that were bound before an overwrite or a remove-all, found through the
//! cache's reverse index). Only for the same AccessID.
//!
//! When: at once for a credential the upstream has accepted recently (before forwarding), or
//! else once the upstream has accepted the write; and again `cache.invalidate_again_after`
//! later, because TPNS applies writes asynchronously and a query in between can re-cache the old
//! binding. Each invalidation also bumps the app's write epoch, so a fetch already in flight does
//! not store its possibly old answer.

use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use serde_json::Value;

use super::auth::{ClientAuth, UpstreamAuth};
use super::passthrough::forward_buffered;
use super::{error_response, State};
use crate::api::ErrorShape;
use crate::cache::CacheKey;
use crate::metrics::{RequestOutcome, Route};
use crate::upstream::{full, ProxyBody};

/// The tokens and accounts a batchoperate body names (any operator type), or `None` when the
/// body is not one (the upstream will refuse it; nothing to invalidate).
pub fn named_identifiers(body: &[u8]) -> Option<(Vec<String>, Vec<String>)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let op = v.get("operator_type")?.as_i64()?;
    let mut tokens = Vec::new();
    let mut accounts = Vec::new();
    let accounts_of = |list: Option<&Value>, out: &mut Vec<String>| {
        for a in list.and_then(Value::as_array).into_iter().flatten() {
            if let Some(name) = a.get("account").and_then(Value::as_str) {
                out.push(name.to_owned());
            }
        }
    };
    match op {
        1..=3 => {
            for ta in v.get("token_accounts")?.as_array()? {
                if let Some(t) = ta.get("token").and_then(Value::as_str) {
                    tokens.push(t.to_owned());
                }
                accounts_of(ta.get("account_list"), &mut accounts);
            }
        }
        4 => {
            for t in v.get("token_list")?.as_array()? {
                if let Some(t) = t.as_str() {
                    tokens.push(t.to_owned());
                }
            }
        }
        5 => accounts_of(v.get("account_list"), &mut accounts),
        _ => return None,
    }
    tokens.sort_unstable();
    tokens.dedup();
    accounts.sort_unstable();
    accounts.dedup();
    Some((tokens, accounts))
}

/// Drops what a write to these names can make wrong for `app`; returns the keys dropped.
pub async fn invalidate(
    state: &State,
    app: &Arc<str>,
    tokens: &[String],
    accounts: &[String],
    source: &'static str,
) -> Vec<CacheKey> {
    let write = state.store.begin_write(app);
    if let Some(fleet) = &state.fleet {
        fleet.invalidate(app, tokens, accounts, false).await;
    }
    let keys = state.store.affected(app, tokens, accounts).await;
    let dropped = state.store.invalidate(&keys).await;
    drop(write);
    state
        .metrics
        .invalidated
        .with_label_values(&[source])
        .inc_by(dropped as u64);
    keys
}

/// The app a write is for, whether its credential is trusted, and the credentials to inject.
///
/// The app is taken from the credential the upstream authenticates, never from a header it
/// ignores: Basic's user, or `AccessId` when the request carries the complete signature headers
/// and no `Authorization`. A request carrying both schemes is ambiguous (the docs allow one per
/// request, and we cannot know which one the upstream used), so it invalidates nothing: an
/// `Authorization: Basic A:…` with `AccessId: B` must not drop B's entries.
fn app_of(
    state: &State,
    req: &Request<Incoming>,
) -> (Option<Arc<str>>, bool, Option<UpstreamAuth>) {
    let headers = req.headers();
    let has_basic = headers.contains_key(http::header::AUTHORIZATION);
    let signature_headers = ["accessid", "timestamp", "sign"]
        .iter()
        .filter(|h| headers.contains_key(**h))
        .count();
    if has_basic && signature_headers > 0 {
        return (None, false, None);
    }
    let auth = state.credentials.classify(headers);
    match &auth {
        ClientAuth::Basic {
            access_id,
            fingerprint,
        }
        | ClientAuth::Injected {
            access_id,
            fingerprint,
        } => {
            let trusted = state.credentials.is_accepted(fingerprint);
            let inject = match &auth {
                ClientAuth::Injected { .. } => state.credentials.injection(),
                _ => None,
            };
            (Some(access_id.clone()), trusted, inject)
        }
        // The upstream checks the signature of the unchanged body.
        ClientAuth::Signed { access_id, .. } => (Some(access_id.clone()), false, None),
        ClientAuth::Unscoped(super::auth::Unscoped::Signature) if signature_headers == 3 => {
            // A signed request of an app whose key we do not hold: the upstream verifies the
            // signature of the unchanged body for the app named in `AccessId`.
            let app = headers
                .get("accessid")
                .and_then(|v| v.to_str().ok())
                .filter(|s| !s.is_empty())
                .map(Arc::from);
            (app, false, None)
        }
        ClientAuth::Unscoped(_) => (None, false, None),
    }
}

pub async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let (app, trusted, inject) = app_of(state, &req);
    let (parts, body) = req.into_parts();
    let (bytes, _held) = match super::read_body(
        body,
        &parts.headers,
        &state.config.limits,
        &state.body_budget,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => return error_response(ErrorShape::Snake, &e),
    };
    let named = app
        .as_ref()
        .and_then(|app| named_identifiers(&bytes).map(|(t, a)| (app.clone(), t, a)));
    if let (Some((app, tokens, accounts)), true) = (&named, trusted) {
        invalidate(state, app, tokens, accounts, "batchoperate").await;
    }
    let (resp, outcome) =
        match forward_buffered(state, parts, bytes, inject.as_ref(), "fwd=bypass").await {
            Ok((head, body)) => {
                let ret_code = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("ret_code").and_then(Value::as_i64));
                let accepted = head.status == http::StatusCode::OK && ret_code == Some(0);
                if let (Some((app, tokens, accounts)), true) = (named, accepted) {
                    if !trusted {
                        invalidate(state, &app, &tokens, &accounts, "batchoperate").await;
                    }
                    schedule_again(state, app, tokens, accounts);
                }
                (
                    Response::from_parts(head, full(body)),
                    RequestOutcome::Bypass,
                )
            }
            Err(e) => {
                // The write may still apply (a timeout after it was sent): a trusted credential's
                // write was invalidated at once, so invalidate again later as for an accepted one.
                // An unverified credential's write invalidates nothing here: it was never shown good.
                if let (Some((app, tokens, accounts)), true) = (named, trusted) {
                    schedule_again(state, app, tokens, accounts);
                }
                (
                    error_response(ErrorShape::Snake, &e),
                    RequestOutcome::UpstreamError,
                )
            }
        };
    state
        .metrics
        .request(Route::Other, outcome, started.elapsed().as_secs_f64());
    resp
}

fn schedule_again(state: &Arc<State>, app: Arc<str>, tokens: Vec<String>, accounts: Vec<String>) {
    let delay = state.config.cache.invalidate_again_after;
    if delay.is_zero() {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        invalidate(&state, &app, &tokens, &accounts, "batchoperate_delayed").await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_for_every_operator_type() {
        let ta = r#"{"operator_type":OP,"token_accounts":[{"token":"t1","account_list":[{"account":"a1"},{"account":"a2","account_type":1}]},{"token":"t2","account_list":[]}]}"#;
        for op in 1..=3 {
            let (t, a) = named_identifiers(ta.replace("OP", &op.to_string()).as_bytes()).unwrap();
            assert_eq!(t, ["t1", "t2"]);
            assert_eq!(a, ["a1", "a2"]);
        }
        let (t, a) =
            named_identifiers(br#"{"operator_type":4,"token_list":["t2","t1","t2"]}"#).unwrap();
        assert_eq!(t, ["t1", "t2"]);
        assert!(a.is_empty());
        let (t, a) =
            named_identifiers(br#"{"operator_type":5,"account_list":[{"account":"a1"}]}"#).unwrap();
        assert!(t.is_empty());
        assert_eq!(a, ["a1"]);
        assert!(named_identifiers(b"nope").is_none());
        assert!(named_identifiers(br#"{"operator_type":9}"#).is_none());
        assert!(named_identifiers(br#"{"operator_type":4}"#).is_none());
    }
}
