//! The proxy listener: routing, the shared state, and the response helpers.
//!
//! `POST /v3/device/account/query` goes through the cache ([`query`]); every other method and
//! path is forwarded unchanged ([`passthrough`]).

pub mod auth;
pub mod batchoperate;
pub mod fetch;
pub mod passthrough;
pub mod query;

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::HeaderMap;
use http_body_util::{BodyExt, Limited};

use crate::config::LimitsConfig;
use crate::upstream::error_chain;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::api::error::ProxyError;
use crate::api::{ErrorShape, BATCHOPERATE_PATH, QUERY_PATH};
use crate::cache::Store;
use crate::config::Config;
use crate::metrics::{Metrics, Route};
use crate::upstream::{full, ProxyBody, Upstream};

/// The `Cache-Status` header name (RFC 9211).
pub const CACHE_STATUS: &str = "cache-status";
/// Our cache's name in `Cache-Status`.
pub const CACHE_NAME: &str = "tpns-cache";

/// Everything a request handler needs; shared by all connections.
#[derive(Debug)]
pub struct State {
    pub config: Config,
    pub upstream: Upstream,
    /// `upstream.url`, shared by every cache key.
    pub upstream_id: Arc<str>,
    pub store: Store,
    pub credentials: auth::Credentials,
    pub metrics: Metrics,
    pub registry: prometheus::Registry,
    pub fetcher: fetch::Fetcher,
    /// Fleet mode (`redis.url`): the shared tier and invalidations.
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    /// The response memo (`None` when `cache.memo_max_bytes` is 0).
    pub memo: Option<crate::cache::memo::Memo>,
    /// Bearer token for admin write endpoints.
    pub admin_token: Option<crate::config::Secret>,
}

/// The TPNS `retCode` of a response, where the proxy knows it (a response extension read by
/// the router for `tpns_cache_responses_total`).
#[derive(Debug, Clone, Copy)]
pub struct RetCode(pub i64);

/// Routes one request.
pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<ProxyBody> {
    let is_post = req.method() == Method::POST;
    let (route, resp) = if is_post && req.uri().path() == QUERY_PATH {
        (Route::Query, query::handle(&state, req).await)
    } else if is_post && req.uri().path() == BATCHOPERATE_PATH {
        (Route::Other, batchoperate::handle(&state, req).await)
    } else {
        (Route::Other, passthrough::handle(&state, req).await)
    };
    let class = match resp.extensions().get::<RetCode>() {
        Some(c) => crate::metrics::ret_class(c.0),
        None => crate::metrics::status_class(resp.status()),
    };
    state
        .metrics
        .responses
        .with_label_values(&[route.as_str(), class])
        .inc();
    resp
}

/// A JSON response.
pub fn json_response(status: http::StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The TPNS-shaped answer for an error of ours (with `Retry-After` where it applies).
pub fn error_response(shape: ErrorShape, e: &ProxyError) -> Response<ProxyBody> {
    let mut resp = json_response(e.status(), e.body(shape));
    resp.extensions_mut().insert(RetCode(e.ret_code()));
    if let Some(after) = e.retry_after() {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp
}

/// `Cache-Status: tpns-cache; <params>`.
pub fn cache_status(params: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("{CACHE_NAME}; {params}"))
        .unwrap_or_else(|_| HeaderValue::from_static(CACHE_NAME))
}

/// Reads a client's whole body (every path that must see it), refusing it early when `Content-Length` already breaks the limit and
/// as soon as the stream does (it is never buffered past the limit).
pub async fn read_body(
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
