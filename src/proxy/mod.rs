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
    /// Request-body bytes that may be held at once over all connections
    /// (`limits.max_buffered_bytes`), one permit per byte.
    pub body_budget: Arc<tokio::sync::Semaphore>,
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
    } else if is_post && canonical_path(req.uri().path()) == BATCHOPERATE_PATH {
        // Any spelling the upstream may route to batchoperate invalidates (conservative); only
        // the exact query path is cached, other spellings of it pass through unchanged.
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

/// A path as a lenient server may read it: percent-escapes decoded, ASCII lowercased, empty,
/// `.` and `..` segments resolved, `;parameters` dropped, no trailing slash.
pub fn canonical_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                decoded.push(u8::try_from(v).unwrap_or(b'%'));
                i += 3;
            }
            (b, _, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let text = String::from_utf8_lossy(&decoded).to_ascii_lowercase();
    let mut segments: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
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
        resp.headers_mut().insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(crate::api::error::whole_seconds(after)),
        );
    }
    resp
}

/// `Cache-Status: tpns-cache; <params>`.
pub fn cache_status(params: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("{CACHE_NAME}; {params}"))
        .unwrap_or_else(|_| HeaderValue::from_static(CACHE_NAME))
}

/// Reads a client's whole body (every path that must see it), refusing it early when `Content-Length` already breaks the limit and
/// as soon as the stream does (it is never buffered past the limit). The bytes it may hold are
/// reserved first from `budget` (the declared length, or the limit for a body without one), and
/// stay reserved while the caller holds the permit; when the budget is spent the request is
/// refused at once (503), so the memory held by bodies over all connections stays bounded.
pub async fn read_body(
    body: Incoming,
    headers: &HeaderMap,
    limits: &LimitsConfig,
    budget: &Arc<tokio::sync::Semaphore>,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), ProxyError> {
    let limit = limits.max_body_bytes.as_u64();
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let reserve = u32::try_from(declared.unwrap_or(limit)).unwrap_or(u32::MAX);
    let permit = budget
        .clone()
        .try_acquire_many_owned(reserve)
        .map_err(|_| {
            ProxyError::Overloaded(
                "request bodies held in memory reached limits.max_buffered_bytes",
            )
        })?;
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match tokio::time::timeout(limits.body_read_timeout, limited.collect()).await {
        Err(_) => Err(ProxyError::ClientTimeout(limits.body_read_timeout)),
        Ok(Ok(collected)) => Ok((collected.to_bytes(), permit)),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Ok(Err(e)) => Err(ProxyError::ClientBody(error_chain(e.as_ref()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a non-canonical spelling of the batchoperate path (trailing slash,
    /// percent-encoding) was forwarded as an ordinary path and skipped invalidation.
    #[test]
    fn spellings_of_batchoperate_are_recognised() {
        for p in [
            "/v3/device/account/batchoperate",
            "/v3/device/account/batchoperate/",
            "//v3/device/account//batchoperate",
            "/v3/device/account/%62atchoperate",
            "/v3/device/account/%62%61tchoperate;x=1",
            "/V3/Device/Account/BatchOperate",
            "/v3/device/account/./batchoperate",
            "/v3/device/x/../account/batchoperate",
        ] {
            assert_eq!(canonical_path(p), BATCHOPERATE_PATH, "{p}");
        }
        assert_ne!(
            canonical_path("/v3/device/account/query"),
            BATCHOPERATE_PATH
        );
        assert_eq!(canonical_path("/%zz/%"), "/%zz/%");
    }
}
