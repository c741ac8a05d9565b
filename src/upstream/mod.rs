//! The HTTP(S) client to the TPNS access point: hyper's pooled client over rustls (webpki
//! roots, `ring`), with `http://` allowed for local use. Every call is bounded by
//! `upstream.timeout`, and answers we read whole are bounded by `upstream.max_response_bytes`.

pub mod breaker;
pub mod limiter;
pub mod retry;

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::api::error::ProxyError;
use crate::config::UpstreamConfig;

pub type BoxError = Box<dyn StdError + Send + Sync>;
/// The body type used on both sides of the proxy.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A whole body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// The parsed `upstream.url`: scheme, authority and an optional path prefix.
#[derive(Debug, Clone)]
pub struct UpstreamBase {
    scheme: Scheme,
    authority: Authority,
    prefix: String,
}

impl UpstreamBase {
    pub fn parse(url: &str) -> Result<UpstreamBase, String> {
        let uri: Uri = url.parse().map_err(|e| format!("not a URL ({e})"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or("missing scheme (http:// or https://)")?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!("scheme must be http or https, got {scheme}"));
        }
        let authority = uri.authority().cloned().ok_or("missing host")?;
        if authority.host().is_empty() {
            return Err("missing host".to_owned());
        }
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not allowed".to_owned());
        }
        if uri.query().is_some() {
            return Err("a query string is not allowed".to_owned());
        }
        Ok(UpstreamBase {
            scheme,
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The upstream URI for a client's path and query.
    pub fn uri_for(&self, path_and_query: &str) -> Result<Uri, ProxyError> {
        let pq: PathAndQuery = format!("{}{}", self.prefix, path_and_query)
            .parse()
            .map_err(|_| ProxyError::InvalidParameter("request path is not valid".to_owned()))?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::InvalidParameter("request path is not valid".to_owned()))
    }
}

/// The pooled client and the limits every call obeys.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, ProxyBody>,
    base: UpstreamBase,
    timeout: Duration,
    max_response_bytes: usize,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, String> {
        let base = UpstreamBase::parse(&cfg.url)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
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

    pub fn base(&self) -> &UpstreamBase {
        &self.base
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// POSTs `body` and reads the whole answer, all within `upstream.timeout`.
    pub async fn post(
        &self,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ProxyError> {
        let uri = self.base.uri_for(path)?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .body(full(body))
            .map_err(|e| ProxyError::UpstreamUnreachable(e.to_string()))?;
        *req.headers_mut() = headers;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(client_error)?;
            let status = resp.status();
            let limited = Limited::new(resp.into_body(), self.max_response_bytes);
            let bytes = limited.collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ProxyError::UpstreamMalformed(format!(
                        "answer larger than {} bytes",
                        self.max_response_bytes
                    ))
                } else {
                    ProxyError::UpstreamUnreachable(format!(
                        "answer broke off: {}",
                        error_chain(e.as_ref())
                    ))
                }
            })?;
            Ok((status, bytes.to_bytes()))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ProxyError::UpstreamTimeout(self.timeout))?
    }

    /// Sends a request whose body streams from the client; waits at most `upstream.timeout`
    /// for the answer's head. The answer's body is streamed back by the caller.
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, ProxyError> {
        tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| ProxyError::UpstreamTimeout(self.timeout))?
            .map_err(client_error)
    }
}

fn client_error(e: hyper_util::client::legacy::Error) -> ProxyError {
    ProxyError::UpstreamUnreachable(error_chain(&e))
}

/// "outer: inner: innermost", skipping repeats, so the log and the client see the real cause.
pub fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if parts.last() != Some(&msg) {
            parts.push(msg);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_parsing() {
        assert!(UpstreamBase::parse("https://api.tpns.tencent.com").is_ok());
        assert!(UpstreamBase::parse("http://127.0.0.1:9000/").is_ok());
        assert!(UpstreamBase::parse("ftp://x").is_err());
        assert!(UpstreamBase::parse("api.tpns.tencent.com").is_err());
        assert!(UpstreamBase::parse("http://u:p@host").is_err());
        assert!(UpstreamBase::parse("http://host/?a=1").is_err());
        let b = UpstreamBase::parse("http://127.0.0.1:9000/prefix/").unwrap();
        assert_eq!(
            b.uri_for("/v3/push/app?x=1").unwrap().to_string(),
            "http://127.0.0.1:9000/prefix/v3/push/app?x=1"
        );
    }
}
