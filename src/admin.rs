//! The admin listener: `/` (the status page) and `/status.json` ([`crate::status`]),
//! `/metrics` (Prometheus text format), `/healthz` (the process is alive),
//! `/readyz` (configured, listening, not shutting down; deliberately not tied to upstream
//! health, so an upstream outage does not make every app pod restart), and `POST /purge` (drop
//! cached entries of an app, by identifier or all of them).
//!
//! `/purge` needs `Authorization: Bearer <admin token>` when a token is configured; without one
//! it answers only on a loopback listener (anyone who can reach a non-loopback admin port could
//! otherwise empty the cache and spend the quota). The read-only endpoints (`/`,
//! `/status.json`, `/metrics`, the probes) need no token: they show counts and settings, never
//! a secret or an identifier.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use prometheus::Registry;
use serde::Deserialize;
use serde_json::json;

use crate::cache::key::Kind;
use crate::cache::Names;
use crate::config::Secret;
use crate::http::{json_response, text_response, with_type, ProxyBody};
use crate::metrics::labels::InvalidationSource;
use crate::proxy::Proxy;
use crate::status::Status;

#[derive(Debug)]
pub(crate) struct Admin {
    pub(crate) status: Status,
    pub(crate) registry: Registry,
    pub(crate) proxy: Arc<Proxy>,
    /// Bearer token for admin write endpoints.
    pub(crate) token: Option<Secret>,
    pub(crate) ready: AtomicBool,
    /// Whether the admin listener is bound to a loopback address.
    pub(crate) loopback: bool,
}

/// Most identifier names listed in a purge answer.
const PURGE_LIST_MAX: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    access_id: String,
    #[serde(default)]
    tokens: Option<Vec<String>>,
    #[serde(default)]
    accounts: Option<Vec<String>>,
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<ProxyBody> {
    json_response(status, v.to_string())
}

async fn purge(admin: &Admin, req: Request<Incoming>) -> Response<ProxyBody> {
    match &admin.token {
        Some(token) => {
            let given = req
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !token.matches(given.trim().as_bytes()) {
                return json(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "a valid `Authorization: Bearer <admin token>` is required"}),
                );
            }
        }
        None if !admin.loopback => {
            return json(
                StatusCode::FORBIDDEN,
                json!({"error": "purge is disabled on a non-loopback admin listener without admin.token_file or admin.token_env"}),
            )
        }
        None => {}
    }
    let body = match Limited::new(req.into_body(), 1024 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return json(
                StatusCode::BAD_REQUEST,
                json!({"error": "body unreadable or over 1 MiB"}),
            )
        }
    };
    let p: PurgeRequest = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("expected {{\"access_id\": …, \"tokens\": […], \"accounts\": […]}}: {e}")}),
            )
        }
    };
    if p.access_id.is_empty() {
        return json(
            StatusCode::BAD_REQUEST,
            json!({"error": "access_id is empty"}),
        );
    }
    let app: Arc<str> = Arc::from(p.access_id.as_str());
    let names = match (&p.tokens, &p.accounts) {
        (None, None) => Names::All,
        (tokens, accounts) => Names::Exactly {
            tokens: tokens.as_deref().unwrap_or_default(),
            accounts: accounts.as_deref().unwrap_or_default(),
        },
    };
    let (dropped, _) = admin
        .proxy
        .cache
        .invalidate(&app, names, InvalidationSource::Admin)
        .await;
    let mut tokens: Vec<&str> = Vec::new();
    let mut accounts: Vec<&str> = Vec::new();
    for k in &dropped {
        match k.kind() {
            Kind::Token => tokens.push(k.name()),
            Kind::Account => accounts.push(k.name()),
        }
    }
    for list in [&mut tokens, &mut accounts] {
        list.sort_unstable();
        list.dedup();
    }
    let truncated = tokens.len() > PURGE_LIST_MAX || accounts.len() > PURGE_LIST_MAX;
    tokens.truncate(PURGE_LIST_MAX);
    accounts.truncate(PURGE_LIST_MAX);
    tracing::info!(entries = dropped.len(), "admin purge");
    json(
        StatusCode::OK,
        json!({"access_id": p.access_id, "dropped": dropped.len(), "tokens": tokens,
               "accounts": accounts, "truncated": truncated}),
    )
}

pub(crate) async fn handle(admin: Arc<Admin>, req: Request<Incoming>) -> Response<ProxyBody> {
    let text = |status: StatusCode, body: &'static str| text_response(status, body);
    if req.uri().path() == "/purge" {
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        }
        return purge(&admin, req).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/metrics" => with_type(
            StatusCode::OK,
            metrics_text(&admin).await,
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/status.json" => {
            let snapshot = admin.status.snapshot(&metrics_text(&admin).await);
            let mut resp = json_response(
                StatusCode::OK,
                serde_json::to_string(&snapshot).unwrap_or_default(),
            );
            resp.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            resp
        }
        "/" => {
            let page = admin.status.page();
            let mut resp = with_type(
                StatusCode::OK,
                page.html.clone(),
                "text/html; charset=utf-8",
            );
            let headers = resp.headers_mut();
            if let Ok(csp) = http::HeaderValue::from_str(&page.csp) {
                headers.insert(http::header::CONTENT_SECURITY_POLICY, csp);
            }
            headers.insert(
                http::header::X_CONTENT_TYPE_OPTIONS,
                http::HeaderValue::from_static("nosniff"),
            );
            headers.insert(
                http::header::REFERRER_POLICY,
                http::HeaderValue::from_static("no-referrer"),
            );
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if admin.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /, /status.json, /metrics, /healthz or /readyz\n",
        ),
    }
}

/// The Prometheus text of every metric, gauges brought up to date first: what `/metrics`
/// serves, and what the status page reads.
async fn metrics_text(admin: &Admin) -> String {
    let proxy = &admin.proxy;
    proxy.cache.refresh_gauges().await;
    let fetcher = &proxy.fetcher;
    let caller = fetcher.caller();
    caller
        .metrics
        .inflight
        .set(i64::try_from(fetcher.inflight()).unwrap_or(i64::MAX));
    caller
        .shield
        .metrics()
        .breaker_state
        .set(caller.shield.breaker_state().as_gauge());
    String::from_utf8(crate::metrics::encode(&admin.registry)).unwrap_or_default()
}

/// Samples the status page's history every [`crate::status::SAMPLE_EVERY`] while `admin`
/// lives.
pub(crate) fn start_sampling(admin: &Arc<Admin>) {
    let weak = Arc::downgrade(admin);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::status::SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(admin) = weak.upgrade() else { return };
            let text = metrics_text(&admin).await;
            admin.status.sample(&text);
        }
    });
}
