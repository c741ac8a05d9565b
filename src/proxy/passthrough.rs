//! Forwarding unchanged: method, path, query, end-to-end headers and status are kept; bodies
//! stream both ways; hop-by-hop headers (RFC 9110 §7.6.1) are dropped; `Host` becomes the
//! upstream's. Used for every path but the cached query, for queries the cache does not serve,
//! and (reading both bodies) for writes that invalidate.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::HOST;
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::status::CacheStatus;
use super::{error_response, upstream_error_response, Proxy};
use crate::api::answer::ret_code_of;
use crate::api::error::UpstreamError;
use crate::api::ErrorShape;
use crate::http::{full, strip_hop_by_hop, ProxyBody, CACHE_STATUS};
use crate::metrics::labels::{RequestOutcome, Route, UpstreamOutcome};
use crate::upstream::Auth as UpstreamAuth;

/// A path the proxy does not cache: forwarded unchanged (adding the injected credentials to a
/// request that arrives with none, when injection is configured).
pub(crate) async fn handle(proxy: &Arc<Proxy>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let inject = match proxy.credentials.classify(req.headers()) {
        super::auth::ClientAuth::Injected { .. } => proxy.credentials.injection(),
        _ => None,
    };
    let (resp, outcome) = forward_as_is(proxy, req, inject.as_ref(), CacheStatus::Forwarded).await;
    proxy
        .metrics
        .request(Route::Other, outcome, started.elapsed().as_secs_f64());
    resp
}

fn route_of(path: &str) -> Route {
    if ErrorShape::for_path(path) == ErrorShape::Camel {
        Route::Query
    } else {
        Route::Other
    }
}

/// Forwards `req` unchanged but for the injected credentials `inject` (for a request that
/// arrived with none), with `status` as its `Cache-Status`. A signature covers the body, so a
/// signed injection reads it first (bounded).
pub(crate) async fn forward_as_is(
    proxy: &Arc<Proxy>,
    req: Request<Incoming>,
    inject: Option<&UpstreamAuth>,
    status: CacheStatus,
) -> (Response<ProxyBody>, RequestOutcome) {
    match inject {
        Some(auth) if auth.needs_body() => {
            let shape = ErrorShape::for_path(req.uri().path());
            let (parts, body) = req.into_parts();
            let held = match proxy.read_body(body, &parts.headers).await {
                Ok(h) => h,
                Err(e) => return (error_response(shape, &e), RequestOutcome::Invalid),
            };
            let read = forward_read(proxy, parts, held.bytes, Some(auth), status).await;
            (read.response, read.outcome)
        }
        Some(auth) => {
            let mut req = req;
            auth.apply(req.headers_mut(), &[]);
            forward(proxy, req, status).await
        }
        None => forward(proxy, req, status).await,
    }
}

/// The request line and headers as the upstream gets them.
fn upstream_parts(
    proxy: &Proxy,
    mut parts: http::request::Parts,
) -> Result<http::request::Parts, UpstreamError> {
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    parts.uri =
        proxy.upstream.base().uri_for(&pq).ok_or_else(|| {
            UpstreamError::Unreachable("the request path is not a valid URI".into())
        })?;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(HOST);
    parts.version = Version::HTTP_11;
    Ok(parts)
}

/// The path without the query string (query strings are not logged).
fn path_of(parts: &http::request::Parts) -> String {
    parts.uri.path().to_owned()
}

/// Sends `req` unchanged and streams the answer back.
async fn forward(
    proxy: &Arc<Proxy>,
    req: Request<Incoming>,
    status: CacheStatus,
) -> (Response<ProxyBody>, RequestOutcome) {
    let route = route_of(req.uri().path());
    let shape = ErrorShape::for_path(req.uri().path());
    let (parts, body) = req.into_parts();
    let path = path_of(&parts);
    let parts = match upstream_parts(proxy, parts) {
        Ok(p) => p,
        Err(e) => return (upstream_error_response(shape, &e), RequestOutcome::Invalid),
    };
    let upstream_req = Request::from_parts(parts, body.map_err(Into::into).boxed());
    match proxy.upstream.send(upstream_req).await {
        Ok(resp) => {
            proxy
                .upstream_metrics
                .calls
                .inc(route, UpstreamOutcome::Forwarded);
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.insert(CACHE_STATUS, status.header());
            (
                Response::from_parts(parts, body.map_err(Into::into).boxed()),
                RequestOutcome::Bypass,
            )
        }
        Err(e) => (
            failed(proxy, route, shape, &path, &e),
            RequestOutcome::UpstreamError,
        ),
    }
}

fn failed(
    proxy: &Proxy,
    route: Route,
    shape: ErrorShape,
    path: &str,
    e: &UpstreamError,
) -> Response<ProxyBody> {
    proxy
        .upstream_metrics
        .calls
        .inc(route, e.classify().outcome);
    tracing::warn!(path = %path, error = %e, "forwarding to the upstream failed");
    let mut resp = upstream_error_response(shape, e);
    resp.headers_mut()
        .insert(CACHE_STATUS, CacheStatus::ForwardFailed.header());
    resp
}

/// A forwarded request whose answer was read whole.
#[derive(Debug)]
pub(crate) struct Read {
    pub(crate) response: Response<ProxyBody>,
    pub(crate) outcome: RequestOutcome,
    /// The answer's HTTP status, when the upstream answered.
    pub(crate) status: Option<http::StatusCode>,
    /// The answer's TPNS code (`retCode` or `ret_code`), when it has one.
    pub(crate) ret_code: Option<i64>,
}

/// Forwards a request whose body was already read, and reads the whole answer (bounded by
/// `upstream.max_response_bytes`): where the proxy must look at both (writes that invalidate,
/// queries too large to key).
pub(crate) async fn forward_read(
    proxy: &Arc<Proxy>,
    parts: http::request::Parts,
    body: Bytes,
    inject: Option<&UpstreamAuth>,
    status: CacheStatus,
) -> Read {
    let route = route_of(parts.uri.path());
    let shape = ErrorShape::for_path(parts.uri.path());
    let path = path_of(&parts);
    let failure = |e: &UpstreamError| Read {
        response: failed(proxy, route, shape, &path, e),
        outcome: RequestOutcome::UpstreamError,
        status: None,
        ret_code: None,
    };
    let mut parts = match upstream_parts(proxy, parts) {
        Ok(p) => p,
        Err(e) => return failure(&e),
    };
    if let Some(auth) = inject {
        auth.apply(&mut parts.headers, &body);
    }
    match proxy
        .upstream
        .send_buffered(Request::from_parts(parts, full(body)))
        .await
    {
        Ok((mut head, bytes)) => {
            proxy
                .upstream_metrics
                .calls
                .inc(route, UpstreamOutcome::Forwarded);
            // The body is re-framed with its real length.
            head.headers.remove(http::header::CONTENT_LENGTH);
            head.headers.remove(http::header::TRANSFER_ENCODING);
            head.headers.insert(CACHE_STATUS, status.header());
            let ret_code = ret_code_of(&bytes);
            let response = Response::from_parts(head, full(bytes));
            Read {
                status: Some(response.status()),
                response,
                outcome: RequestOutcome::Bypass,
                ret_code,
            }
        }
        Err(e) => failure(&e),
    }
}
