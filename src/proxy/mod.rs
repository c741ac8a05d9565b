//! The proxy listener: routing, and the components a request reaches.
//!
//! `POST /v3/device/account/query` goes through the cache ([`query`]); batchoperate is
//! forwarded and invalidates ([`batchoperate`]); every other method and path is forwarded
//! unchanged ([`passthrough`]). Who is asking is [`auth`]'s to say; what the cache did is
//! [`status`]'s to render.

pub(crate) mod auth;
pub(crate) mod batchoperate;
pub(crate) mod metrics;
pub(crate) mod passthrough;
pub(crate) mod query;
pub(crate) mod status;

use std::sync::Arc;

use http::header::HeaderValue;
use http::{HeaderMap, Method, Request, Response};
use hyper::body::Incoming;

use crate::api::error::{ClientError, UpstreamError};
use crate::api::{ErrorShape, BATCHOPERATE_PATH, QUERY_PATH};
use crate::cache::Cache;
use crate::config::Config;
use crate::fetch::Fetcher;
use crate::http::{
    canonical_path, json_response, read_body, BodyBudget, HeldBody, ProxyBody, ReadError,
};
use crate::metrics::labels::{RetClass, Route};
use crate::trust::Trust;
use crate::upstream::{Upstream, UpstreamMetrics};

pub(crate) use metrics::ProxyMetrics;
pub(crate) use query::QueryMetrics;

/// What a request can reach: each component owns its own handles.
#[derive(Debug)]
pub(crate) struct Proxy {
    pub(crate) config: Config,
    /// `upstream.url`, shared by every cache key.
    pub(crate) upstream_id: Arc<str>,
    pub(crate) credentials: auth::Credentials,
    pub(crate) trust: Arc<Trust>,
    pub(crate) cache: Arc<Cache>,
    pub(crate) fetcher: Fetcher,
    pub(crate) memo: Option<query::memo::Memo>,
    /// For forwarding (the fetcher holds its own).
    pub(crate) upstream: Upstream,
    pub(crate) upstream_metrics: UpstreamMetrics,
    pub(crate) body_budget: BodyBudget,
    pub(crate) metrics: ProxyMetrics,
    pub(crate) query_metrics: QueryMetrics,
}

/// The TPNS `retCode` of a response, where the proxy knows it (read by the router for
/// `tpns_cache_responses_total`): a response extension, or returned beside the response by
/// the cached query path (see [`query::handle`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetCode(pub i64);

/// Routes one request.
pub(crate) async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<ProxyBody> {
    let is_post = req.method() == Method::POST;
    let (route, resp, known) = if is_post && req.uri().path() == QUERY_PATH {
        let (resp, known) = query::handle(&proxy, req).await;
        (Route::Query, resp, known)
    } else if is_post && canonical_path(req.uri().path()) == BATCHOPERATE_PATH {
        // Any spelling the upstream may route to batchoperate invalidates (conservative); only
        // the exact query path is cached, other spellings of it pass through unchanged.
        (Route::Other, batchoperate::handle(&proxy, req).await, None)
    } else {
        (Route::Other, passthrough::handle(&proxy, req).await, None)
    };
    let class = match known.or_else(|| resp.extensions().get::<RetCode>().copied()) {
        Some(c) => RetClass::of_code(c.0),
        None => RetClass::of_status(resp.status()),
    };
    proxy.metrics.responses.inc(route, class);
    resp
}

impl Proxy {
    /// Reads a client's body within `limits.*` (see [`crate::http::read_body`]).
    pub(crate) async fn read_body(
        &self,
        body: Incoming,
        headers: &HeaderMap,
    ) -> Result<HeldBody, ClientError> {
        let l = &self.config.limits;
        read_body(
            body,
            headers,
            l.max_body_bytes.as_u64(),
            l.body_read_timeout,
            &self.body_budget,
        )
        .await
        .map_err(|e| match e {
            ReadError::TooLarge(limit) => ClientError::BodyTooLarge { limit },
            ReadError::Timeout(t) => ClientError::ClientTimeout(t),
            ReadError::Broken(why) => ClientError::ClientBody(why),
            ReadError::Busy => ClientError::Overloaded(
                "request bodies held in memory reached limits.max_buffered_bytes",
            ),
        })
    }
}

/// The TPNS-shaped answer for a request the proxy refuses itself.
pub(crate) fn error_response(shape: ErrorShape, e: &ClientError) -> Response<ProxyBody> {
    answer(e.class(), e.body(shape))
}

/// The TPNS-shaped answer for an upstream that could not answer.
pub(crate) fn upstream_error_response(shape: ErrorShape, e: &UpstreamError) -> Response<ProxyBody> {
    answer(e.class(), e.body(shape))
}

fn answer(class: crate::api::error::Class, body: bytes::Bytes) -> Response<ProxyBody> {
    let mut resp = json_response(class.status, body);
    resp.extensions_mut().insert(RetCode(class.ret_code));
    if let Some(after) = class.retry_after {
        resp.headers_mut().insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(crate::api::error::whole_seconds(after)),
        );
    }
    resp
}
