//! HTTP helpers every listener and the upstream client share: the body type, whole-body and
//! JSON responses, hop-by-hop headers, the bounded reader of a client's body, the upstream base
//! URL. A leaf: it knows nothing of TPNS or of the cache.

use std::error::Error as StdError;
use std::future::Future as _;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;
/// The body type used on both sides of the proxy.
pub(crate) type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// The `Cache-Status` header (RFC 9211).
pub(crate) const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// A whole body from bytes.
pub(crate) fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// A JSON response.
pub(crate) fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    with_type(status, body, "application/json")
}

/// A plain-text response.
pub(crate) fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    with_type(status, body, "text/plain; charset=utf-8")
}

/// A response with a body of `content_type`.
pub(crate) fn with_type(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// "outer: inner: innermost", skipping repeats, so the log and the client see the real cause.
pub(crate) fn error_chain(e: &(dyn StdError + 'static)) -> String {
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

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those the `Connection` header
/// names. `Transfer-Encoding` is left to hyper, which re-frames a streamed body itself.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

/// Why a client's body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// `Content-Length` or the stream passed the limit (in bytes).
    TooLarge(u64),
    /// Not complete within the read timeout.
    Timeout(Duration),
    /// The stream broke off or was malformed.
    Broken(String),
    /// The budget of bytes held over all connections is spent.
    Busy,
}

/// Request-body bytes that may be held at once over all connections, one permit per byte.
#[derive(Debug, Clone)]
pub(crate) struct BodyBudget(Arc<Semaphore>);

impl BodyBudget {
    pub(crate) fn new(bytes: u64) -> BodyBudget {
        let permits = usize::try_from(bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        BodyBudget(Arc::new(Semaphore::new(permits)))
    }
}

/// A read body and its share of the [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct HeldBody {
    pub(crate) bytes: Bytes,
    _permit: OwnedSemaphorePermit,
}

/// Reads a client's whole body: refused early when `Content-Length` already passes `limit`, and
/// as soon as the stream does (never buffered past it), within `timeout`. The bytes it may hold
/// are reserved from `budget` first (the declared length, or the limit for a body without
/// one); when the budget is spent the read is refused at once.
pub(crate) async fn read_body<B>(
    body: B,
    headers: &HeaderMap,
    limit: u64,
    timeout: Duration,
    budget: &BodyBudget,
) -> Result<HeldBody, ReadError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ReadError::TooLarge(limit));
    }
    let reserve = u32::try_from(declared.unwrap_or(limit)).unwrap_or(u32::MAX);
    let permit = budget
        .0
        .clone()
        .try_acquire_many_owned(reserve)
        .map_err(|_| ReadError::Busy)?;
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    // Polled once before a timer is armed: a small body usually came with its head and is
    // read whole here, and then no timer is registered (and removed) for it at all.
    let mut collect = std::pin::pin!(limited.collect());
    let first = std::future::poll_fn(|cx| Poll::Ready(collect.as_mut().poll(cx))).await;
    let read = match first {
        Poll::Ready(read) => Ok(read),
        Poll::Pending => tokio::time::timeout(timeout, collect).await,
    };
    match read {
        Err(_) => Err(ReadError::Timeout(timeout)),
        Ok(Ok(collected)) => Ok(HeldBody {
            bytes: collected.to_bytes(),
            _permit: permit,
        }),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge(limit)),
        Ok(Err(e)) => Err(ReadError::Broken(error_chain(e.as_ref()))),
    }
}

/// A path as a lenient server may read it: percent-escapes decoded, ASCII lowercased, empty,
/// `.` and `..` segments resolved, `;parameters` dropped, no trailing slash.
pub(crate) fn canonical_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let hex = |b: u8| (b as char).to_digit(16);
    while i < bytes.len() {
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
        match seg.split(';').next().unwrap_or("") {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

/// A base URL (`upstream.url`): scheme, authority and an optional path prefix.
#[derive(Debug, Clone)]
pub(crate) struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    prefix: String,
}

impl BaseUrl {
    pub(crate) fn parse(url: &str) -> Result<BaseUrl, String> {
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
        Ok(BaseUrl {
            scheme,
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The full URI for a client's path and query; `None` when the result is not a valid URI.
    pub(crate) fn uri_for(&self, path_and_query: &str) -> Option<Uri> {
        let pq: PathAndQuery = format!("{}{}", self.prefix, path_and_query).parse().ok()?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .ok()
    }
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

    /// Regression (issue 11): a non-canonical spelling of the batchoperate path (trailing
    /// slash, percent-encoding) was forwarded as an ordinary path and skipped invalidation.
    #[test]
    fn canonical_paths() {
        const BATCH: &str = "/v3/device/account/batchoperate";
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
            assert_eq!(canonical_path(p), BATCH, "{p}");
        }
        assert_ne!(canonical_path("/v3/device/account/query"), BATCH);
        assert_eq!(canonical_path("/%zz/%"), "/%zz/%");
    }

    #[test]
    fn base_urls() {
        assert!(BaseUrl::parse("https://api.tpns.tencent.com").is_ok());
        assert!(BaseUrl::parse("http://127.0.0.1:9000/").is_ok());
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert!(BaseUrl::parse("api.tpns.tencent.com").is_err());
        assert!(BaseUrl::parse("http://u:p@host").is_err());
        assert!(BaseUrl::parse("http://host/?a=1").is_err());
        let b = BaseUrl::parse("http://127.0.0.1:9000/prefix/").unwrap();
        assert_eq!(
            b.uri_for("/v3/push/app?x=1").unwrap().to_string(),
            "http://127.0.0.1:9000/prefix/v3/push/app?x=1"
        );
    }

    #[tokio::test]
    async fn bodies_are_bounded_in_size_and_in_total() {
        let budget = BodyBudget::new(100);
        let h = HeaderMap::new();
        let t = Duration::from_secs(1);
        let held = read_body(Full::new(Bytes::from_static(b"abc")), &h, 60, t, &budget)
            .await
            .unwrap();
        assert_eq!(&held.bytes[..], b"abc");
        // Without a Content-Length the whole limit is reserved: 60 of 100 are held, so a
        // second body cannot reserve another 60 until the first is dropped.
        let second = read_body(Full::new(Bytes::from_static(b"x")), &h, 60, t, &budget).await;
        assert_eq!(second.unwrap_err(), ReadError::Busy);
        drop(held);
        let big = Full::new(Bytes::from(vec![b'x'; 61]));
        assert_eq!(
            read_body(big, &h, 60, t, &budget).await.unwrap_err(),
            ReadError::TooLarge(60)
        );
    }
}
