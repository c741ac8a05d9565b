//! Forwarding unchanged: method, path, query, end-to-end headers and status are kept; bodies
//! stream both ways; hop-by-hop headers (RFC 9110 §7.6.1) are dropped; `Host` becomes the
//! upstream's. Used for every path but the cached query, and for queries the proxy cannot scope.

use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderName, CONNECTION, HOST};
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{cache_status, error_response, State, CACHE_STATUS};
use crate::api::ErrorShape;
use crate::metrics::{RequestOutcome, Route, UpstreamOutcome};
use crate::upstream::ProxyBody;

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
/// `Transfer-Encoding` is left to hyper, which re-frames the streamed body itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Forwards a request on a path the proxy does not cache (adding the injected credentials to a
/// request that arrives with none, when injection is configured).
pub async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let inject = match state.credentials.classify(req.headers()) {
        super::auth::ClientAuth::Injected { .. } => state.credentials.injection(),
        _ => None,
    };
    let (resp, outcome) = forward_as_is(state, req, inject.as_ref(), "fwd=bypass").await;
    state
        .metrics
        .request(Route::Other, outcome, started.elapsed().as_secs_f64());
    resp
}

/// Forwards `req` unchanged but for the injected credentials `inject` (for a request that
/// arrived with none), with `status` as its `Cache-Status` parameters.
pub async fn forward_as_is(
    state: &Arc<State>,
    req: Request<Incoming>,
    inject: Option<&super::auth::UpstreamAuth>,
    status: &str,
) -> (Response<ProxyBody>, RequestOutcome) {
    match inject {
        None => forward(state, req, Some(status)).await,
        Some(auth) if !auth.needs_body() => {
            let mut req = req;
            auth.apply(req.headers_mut(), &[]);
            forward(state, req, Some(status)).await
        }
        // A signature covers the body: read it (bounded), sign, send.
        Some(auth) => forward_signed(state, req, auth, status).await,
    }
}

/// Sends `req` to the upstream unchanged and streams the answer back. `status` is the
/// `Cache-Status` parameter list to attach (`fwd=bypass` when not given).
pub async fn forward(
    state: &Arc<State>,
    req: Request<Incoming>,
    status: Option<&str>,
) -> (Response<ProxyBody>, RequestOutcome) {
    let shape = ErrorShape::for_path(req.uri().path());
    let route = if shape == ErrorShape::Camel {
        Route::Query
    } else {
        Route::Other
    };
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let uri = match state.upstream.base().uri_for(&pq) {
        Ok(u) => u,
        Err(e) => return (error_response(shape, &e), RequestOutcome::Invalid),
    };
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(HOST);
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let upstream_req = Request::from_parts(parts, body.map_err(Into::into).boxed());
    let status_value = cache_status(status.unwrap_or("fwd=bypass"));
    match state.upstream.send(upstream_req).await {
        Ok(resp) => {
            state.metrics.upstream(route, UpstreamOutcome::Forwarded);
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.insert(CACHE_STATUS, status_value);
            (
                Response::from_parts(parts, body.map_err(Into::into).boxed()),
                RequestOutcome::Bypass,
            )
        }
        Err(e) => {
            state.metrics.upstream(route, UpstreamOutcome::of_error(&e));
            tracing::warn!(path = %pq_path(&pq), error = %e, "forwarding to the upstream failed");
            let mut resp = error_response(shape, &e);
            resp.headers_mut().insert(
                CACHE_STATUS,
                HeaderValue::from_static("tpns-cache; fwd=bypass; detail=\"upstream error\""),
            );
            (resp, RequestOutcome::UpstreamError)
        }
    }
}

/// Forwards a request whose body was already read, and reads the whole answer (bounded by
/// `upstream.max_response_bytes`, within `upstream.timeout` for the head). Used where the proxy
/// must look at both (writes that invalidate).
pub async fn forward_buffered(
    state: &Arc<State>,
    mut parts: http::request::Parts,
    body: bytes::Bytes,
    inject: Option<&super::auth::UpstreamAuth>,
    status: &str,
) -> Result<(http::response::Parts, bytes::Bytes), crate::api::error::ProxyError> {
    use crate::api::error::ProxyError;
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    parts.uri = state.upstream.base().uri_for(&pq)?;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(HOST);
    parts.version = Version::HTTP_11;
    if let Some(auth) = inject {
        auth.apply(&mut parts.headers, &body);
    }
    let req = Request::from_parts(parts, crate::upstream::full(body));
    let resp = match state.upstream.send(req).await {
        Ok(r) => r,
        Err(e) => {
            state
                .metrics
                .upstream(Route::Other, UpstreamOutcome::of_error(&e));
            tracing::warn!(path = %pq_path(&pq), error = %e, "forwarding to the upstream failed");
            return Err(e);
        }
    };
    state
        .metrics
        .upstream(Route::Other, UpstreamOutcome::Forwarded);
    let (mut head, body) = resp.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let limit =
        usize::try_from(state.config.upstream.max_response_bytes.as_u64()).unwrap_or(usize::MAX);
    let bytes = tokio::time::timeout(
        state.upstream.timeout(),
        http_body_util::Limited::new(body, limit).collect(),
    )
    .await
    .map_err(|_| ProxyError::UpstreamTimeout(state.upstream.timeout()))?
    .map_err(|e| ProxyError::UpstreamUnreachable(crate::upstream::error_chain(e.as_ref())))?
    .to_bytes();
    // The body is re-framed with its real length.
    head.headers.remove(http::header::CONTENT_LENGTH);
    head.headers.remove(http::header::TRANSFER_ENCODING);
    head.headers.insert(CACHE_STATUS, cache_status(status));
    Ok((head, bytes))
}

async fn forward_signed(
    state: &Arc<State>,
    req: Request<Incoming>,
    auth: &super::auth::UpstreamAuth,
    status: &str,
) -> (Response<ProxyBody>, RequestOutcome) {
    let shape = ErrorShape::for_path(req.uri().path());
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
        Err(e) => return (error_response(shape, &e), RequestOutcome::Invalid),
    };
    match forward_buffered(state, parts, bytes, Some(auth), status).await {
        Ok((head, body)) => (
            Response::from_parts(head, crate::upstream::full(body)),
            RequestOutcome::Bypass,
        ),
        Err(e) => (error_response(shape, &e), RequestOutcome::UpstreamError),
    }
}

/// The path without the query string (query strings are not logged).
fn pq_path(pq: &str) -> &str {
    pq.split('?').next().unwrap_or(pq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-request-id", HeaderValue::from_static("r1"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["authorization", "x-request-id"]);
    }
}
