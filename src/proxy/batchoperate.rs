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

use super::auth::{self, ClientAuth};
use super::passthrough::forward_read;
use super::status::CacheStatus;
use super::{error_response, Proxy};
use crate::api::ErrorShape;
use crate::cache::Names;
use crate::http::ProxyBody;
use crate::metrics::labels::{InvalidationSource, Route};
use crate::upstream::Auth as UpstreamAuth;

/// The tokens and accounts a batchoperate body names (any operator type), or `None` when the
/// body is not one (the upstream will refuse it; nothing to invalidate).
pub(crate) fn named_identifiers(body: &[u8]) -> Option<(Vec<String>, Vec<String>)> {
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

/// The app a write is for, whether its credential is trusted, and the credentials to inject.
///
/// The app is taken from the credential the upstream authenticates, never from a header it
/// ignores: Basic's user, or `AccessId` when the request carries the complete signature headers
/// and no `Authorization`. A request carrying both schemes is ambiguous (the docs allow one per
/// request, and we cannot know which one the upstream used), so it invalidates nothing: an
/// `Authorization: Basic A:…` with `AccessId: B` must not drop B's entries.
fn app_of(
    proxy: &Proxy,
    req: &Request<Incoming>,
) -> (Option<Arc<str>>, bool, Option<UpstreamAuth>) {
    let headers = req.headers();
    let has_basic = headers.contains_key(http::header::AUTHORIZATION);
    let signature_headers = [&auth::ACCESS_ID, &auth::TIMESTAMP, &auth::SIGN]
        .iter()
        .filter(|h| headers.contains_key(**h))
        .count();
    if has_basic && signature_headers > 0 {
        return (None, false, None);
    }
    let auth = proxy.credentials.classify(headers);
    match &auth {
        ClientAuth::Basic {
            access_id,
            fingerprint,
        }
        | ClientAuth::Injected {
            access_id,
            fingerprint,
        } => {
            let trusted = proxy.trust.is_accepted(fingerprint);
            let inject = match &auth {
                ClientAuth::Injected { .. } => proxy.credentials.injection(),
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
                .get(&auth::ACCESS_ID)
                .and_then(|v| v.to_str().ok())
                .filter(|s| !s.is_empty())
                .map(Arc::from);
            (app, false, None)
        }
        ClientAuth::Unscoped(_) => (None, false, None),
    }
}

pub(crate) async fn handle(proxy: &Arc<Proxy>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let (app, trusted, inject) = app_of(proxy, &req);
    let (parts, body) = req.into_parts();
    let held = match proxy.read_body(body, &parts.headers).await {
        Ok(h) => h,
        Err(e) => return error_response(ErrorShape::Snake, &e),
    };
    let named = app
        .as_ref()
        .and_then(|app| named_identifiers(&held.bytes).map(|(t, a)| (app.clone(), t, a)));
    if let (Some((app, tokens, accounts)), true) = (&named, trusted) {
        invalidate(
            proxy,
            app,
            tokens,
            accounts,
            InvalidationSource::Batchoperate,
        )
        .await;
    }
    let read = forward_read(
        proxy,
        parts,
        held.bytes.clone(),
        inject.as_ref(),
        CacheStatus::Forwarded,
    )
    .await;
    match (named, read.status) {
        (Some((app, tokens, accounts)), Some(status)) => {
            let accepted = status == http::StatusCode::OK && read.ret_code == Some(0);
            if accepted {
                if !trusted {
                    invalidate(
                        proxy,
                        &app,
                        &tokens,
                        &accounts,
                        InvalidationSource::Batchoperate,
                    )
                    .await;
                }
                schedule_again(proxy, app, tokens, accounts);
            }
        }
        // The forward failed: the write may still apply (a timeout after it was sent). A
        // trusted credential's write was invalidated at once, so it is invalidated again later
        // as for an accepted one; an unverified credential's invalidates nothing here (it was
        // never shown good).
        (Some((app, tokens, accounts)), None) if trusted => {
            schedule_again(proxy, app, tokens, accounts)
        }
        _ => {}
    }
    proxy
        .metrics
        .request(Route::Other, read.outcome, started.elapsed().as_secs_f64());
    read.response
}

async fn invalidate(
    proxy: &Proxy,
    app: &Arc<str>,
    tokens: &[String],
    accounts: &[String],
    source: InvalidationSource,
) {
    proxy
        .cache
        .invalidate(app, Names::Written { tokens, accounts }, source)
        .await;
}

fn schedule_again(proxy: &Arc<Proxy>, app: Arc<str>, tokens: Vec<String>, accounts: Vec<String>) {
    let delay = proxy.config.cache.invalidate_again_after;
    if delay.is_zero() {
        return;
    }
    let proxy = proxy.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        invalidate(
            &proxy,
            &app,
            &tokens,
            &accounts,
            InvalidationSource::BatchoperateDelayed,
        )
        .await;
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
