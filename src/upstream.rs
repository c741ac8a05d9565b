//! The HTTP(S) client to the TPNS access point: hyper's pooled client over rustls (webpki
//! roots, `ring`), with `http://` allowed for local use. Every call is bounded by
//! `upstream.timeout`, and answers we read whole are bounded by `upstream.max_response_bytes`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::api::error::UpstreamError;
use crate::config::{Secret, UpstreamConfig};
use crate::http::{error_chain, full, BaseUrl, ProxyBody};
use crate::metrics::labels::{OpLabel, Route, UpstreamOutcome};
use crate::metrics::{register, Counter1, Counter2, LATENCY_BUCKETS};

/// How an upstream call is authenticated.
#[derive(Debug, Clone)]
pub(crate) enum Auth {
    /// This `Authorization` value as it is (the client's Basic, or injected Basic).
    Header(http::HeaderValue),
    /// `AccessId`/`TimeStamp`/`Sign` computed for each body with this app's key.
    Sign { access_id: Arc<str>, secret: Secret },
}

impl Auth {
    /// Adds the credentials for a call with this `body`.
    pub(crate) fn apply(&self, headers: &mut HeaderMap, body: &[u8]) {
        match self {
            Auth::Header(v) => {
                headers.insert(http::header::AUTHORIZATION, v.clone());
            }
            Auth::Sign { access_id, secret } => {
                let ts = unix_seconds().to_string();
                let sign = tpns_wire::sign(secret.expose().as_bytes(), &ts, access_id, body);
                for (name, value) in [
                    ("accessid", &**access_id),
                    ("timestamp", &ts),
                    ("sign", &sign),
                ] {
                    if let Ok(v) = http::HeaderValue::from_str(value) {
                        headers.insert(name, v);
                    }
                }
            }
        }
    }

    /// Whether applying needs the whole body (signatures do).
    pub(crate) fn needs_body(&self) -> bool {
        matches!(self, Auth::Sign { .. })
    }
}

/// Unix time in seconds.
pub(crate) fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The pooled client and the limits every call obeys.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    client: Client<HttpsConnector<crate::egress::Connector>, ProxyBody>,
    base: BaseUrl,
    timeout: Duration,
    max_response_bytes: usize,
}

impl Upstream {
    pub(crate) fn new(cfg: &UpstreamConfig) -> Result<Upstream, String> {
        let base = BaseUrl::parse(&cfg.url)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let uri: http::Uri = cfg.url.parse().map_err(|e| format!("upstream.url: {e}"))?;
        let route = crate::egress::proxy_route(cfg, &uri, |v| std::env::var(v).ok())?;
        if let Some(route) = &route {
            tracing::info!(proxy = %route.uri, "upstream connections go through a CONNECT proxy");
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::egress::tls_config(cfg)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(crate::egress::Connector::new(http, route));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(https);
        Ok(Upstream {
            client,
            base,
            timeout: cfg.timeout,
            max_response_bytes: usize::try_from(cfg.max_response_bytes.as_u64())
                .unwrap_or(usize::MAX),
        })
    }

    pub(crate) fn base(&self) -> &BaseUrl {
        &self.base
    }

    /// POSTs `body` and reads the whole answer, all within `upstream.timeout`.
    pub(crate) async fn post(
        &self,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), UpstreamError> {
        let uri = self
            .base
            .uri_for(path)
            .ok_or_else(|| UpstreamError::Unreachable(format!("not a valid path: {path}")))?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .body(full(body))
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        *req.headers_mut() = headers;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(client_error)?;
            let status = resp.status();
            let limited = Limited::new(resp.into_body(), self.max_response_bytes);
            let bytes = limited.collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    UpstreamError::Malformed(format!(
                        "answer larger than {} bytes",
                        self.max_response_bytes
                    ))
                } else {
                    UpstreamError::Unreachable(format!(
                        "answer broke off: {}",
                        error_chain(e.as_ref())
                    ))
                }
            })?;
            Ok((status, bytes.to_bytes()))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
    }

    /// Sends a request whose body streams from the client; waits at most `upstream.timeout`
    /// for the answer's head. The answer's body is streamed back by the caller.
    pub(crate) async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
            .map_err(client_error)
    }
}

impl Upstream {
    /// Sends a request and reads its whole answer (at most `upstream.max_response_bytes`), the
    /// head within `upstream.timeout` and the body within another.
    pub(crate) async fn send_buffered(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<(http::response::Parts, Bytes), UpstreamError> {
        let (head, body) = self.send(req).await?.into_parts();
        let bytes = tokio::time::timeout(
            self.timeout,
            Limited::new(body, self.max_response_bytes).collect(),
        )
        .await
        .map_err(|_| UpstreamError::Timeout(self.timeout))?
        .map_err(|e| UpstreamError::Unreachable(error_chain(e.as_ref())))?
        .to_bytes();
        Ok((head, bytes))
    }
}

/// What the upstream client's calls are counted by.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamMetrics {
    pub(crate) calls: Counter2<Route, UpstreamOutcome>,
    pub(crate) identifiers: Counter1<OpLabel>,
    pub(crate) duration: prometheus::Histogram,
    pub(crate) batch_size: prometheus::Histogram,
}

impl UpstreamMetrics {
    pub(crate) fn register(r: &prometheus::Registry) -> prometheus::Result<UpstreamMetrics> {
        use prometheus::{Histogram, HistogramOpts};
        Ok(UpstreamMetrics {
            calls: Counter2::register(
                r,
                "tpns_cache_upstream_requests_total",
                "Requests sent to the upstream (or, for rate_limited and circuit_open, not sent), by route and outcome",
            )?,
            identifiers: Counter1::register(
                r,
                "tpns_cache_upstream_identifiers_total",
                "Identifiers sent to the upstream in query sub-requests, by operator type",
            )?,
            duration: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tpns_cache_upstream_request_duration_seconds",
                        "Duration of upstream query sub-requests (whole answer read).",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )?,
            )?,
            batch_size: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tpns_cache_upstream_batch_size",
                        "Identifiers per upstream query call (micro-batching gathers concurrent misses).",
                    )
                    .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]),
                )?,
            )?,
        })
    }
}

fn client_error(e: hyper_util::client::legacy::Error) -> UpstreamError {
    UpstreamError::Unreachable(error_chain(&e))
}
