//! The admin listener: `/metrics` (Prometheus text format), `/healthz` (the process is alive)
//! and `/readyz` (configured, listening, not shutting down; deliberately not tied to upstream
//! health, so an upstream outage does not make every app pod restart).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus::Registry;

use crate::proxy::State;
use crate::upstream::{full, ProxyBody};

#[derive(Debug)]
pub struct Admin {
    pub registry: Registry,
    pub state: Arc<State>,
    pub ready: AtomicBool,
}

pub async fn handle(admin: Arc<Admin>, req: Request<Incoming>) -> Response<ProxyBody> {
    let text = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(full(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let store = &admin.state.store;
            store.sync().await;
            let m = &admin.state.metrics;
            m.cache_entries
                .set(i64::try_from(store.entry_count()).unwrap_or(i64::MAX));
            m.cache_bytes
                .set(i64::try_from(store.weighted_bytes()).unwrap_or(i64::MAX));
            let fetcher = &admin.state.fetcher;
            m.inflight_fetches
                .set(i64::try_from(fetcher.inflight_count()).unwrap_or(i64::MAX));
            m.breaker_state.set(fetcher.breaker.state().as_gauge());
            let mut r = Response::new(full(crate::metrics::encode(&admin.registry)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if admin.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}
