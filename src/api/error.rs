//! Every error the proxy answers by itself, and the one place that maps each to an HTTP status
//! and a TPNS `retCode`.
//!
//! Validation errors are answered with HTTP 200, as TPNS answers business errors (its SDKs treat
//! any non-200 as a transport failure); only what TPNS itself could not have said (the body limit,
//! an unreadable request stream, upstream trouble) uses a non-200 status.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

use super::{code, error_body, ErrorShape};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The body is not JSON, not UTF-8, or not a JSON object.
    #[error("request body cannot be parsed: {0}")]
    Unparseable(String),
    /// A required field is absent (or `null`).
    #[error("required parameter missing: {0}")]
    MissingParameter(&'static str),
    /// A field has the wrong type, an unknown value, or breaks a limit.
    #[error("parameter failed validation: {0}")]
    InvalidParameter(String),
    /// `Content-Length` or the streamed body exceeds `limits.max_body_bytes`.
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// The client's request stream broke off or was malformed mid-body.
    #[error("request body could not be read: {0}")]
    ClientBody(String),
    /// A signed request whose signature or timestamp the proxy could check and refused.
    #[error("authentication failed: {0}")]
    AuthFailed(&'static str),
    /// The client did not send its whole body within `limits.body_read_timeout`.
    #[error("request body not received within {}", humantime::format_duration(*.0))]
    ClientTimeout(Duration),
    /// No connection to the upstream could be made, or it broke.
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    /// No complete upstream answer within `upstream.timeout`.
    #[error("upstream timed out after {}", humantime::format_duration(*.0))]
    UpstreamTimeout(Duration),
    /// The upstream answered with a non-200 status.
    #[error("upstream answered HTTP {0}")]
    UpstreamStatus(u16),
    /// The upstream's answer is malformed, oversized or does not match what was asked.
    #[error("upstream answer rejected: {0}")]
    UpstreamMalformed(String),
    /// The upstream quota (our limiter, or a cool-down after the upstream's own 1008028) does
    /// not allow a call within `shield.max_wait`.
    #[error("frequency limit exceeded: upstream quota exhausted ({reason}), retry after {}s", whole_seconds(*.retry_after))]
    RateLimited {
        retry_after: Duration,
        reason: &'static str,
    },
    /// The circuit breaker is open after consecutive upstream failures.
    #[error("upstream circuit open after repeated failures, retry after {}s", whole_seconds(*.0))]
    CircuitOpen(Duration),
    /// An in-flight fetch this request waited for did not finish in time.
    #[error("no upstream answer within {}", humantime::format_duration(*.0))]
    WaitTimeout(Duration),
    /// A bound on the whole process's work was reached (e.g. `limits.max_buffered_bytes`).
    #[error("busy: {0}, retry after 1s")]
    Overloaded(&'static str),
}

/// A wait in whole seconds, rounded up (at least 1): what `Retry-After` says, and what our
/// messages say with it.
pub fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unparseable(_) => StatusCode::OK,
            ProxyError::MissingParameter(_) => StatusCode::OK,
            ProxyError::InvalidParameter(_) => StatusCode::OK,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::AuthFailed(_) => StatusCode::OK,
            ProxyError::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamStatus(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamMalformed(_) => StatusCode::BAD_GATEWAY,
            // As the upstream itself answers 1008028: HTTP 200 (plus Retry-After).
            ProxyError::RateLimited { .. } => StatusCode::OK,
            ProxyError::CircuitOpen(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::WaitTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn ret_code(&self) -> i64 {
        match self {
            ProxyError::Unparseable(_) => code::UNPARSEABLE,
            ProxyError::MissingParameter(_) => code::MISSING_PARAMETER,
            ProxyError::InvalidParameter(_) => code::INVALID_PARAMETER,
            ProxyError::BodyTooLarge { .. } => code::INVALID_PARAMETER,
            ProxyError::ClientBody(_) => code::UNPARSEABLE,
            ProxyError::AuthFailed(_) => code::AUTH_FAILED,
            ProxyError::ClientTimeout(_) => code::UNPARSEABLE,
            ProxyError::UpstreamUnreachable(_) => code::INTERNAL_CALL_FAILED,
            ProxyError::UpstreamTimeout(_) => code::INTERNAL_CALL_FAILED,
            ProxyError::UpstreamStatus(_) => code::INTERNAL_CALL_FAILED,
            ProxyError::UpstreamMalformed(_) => code::INTERNAL_CALL_FAILED,
            ProxyError::RateLimited { .. } => code::RATE_LIMITED,
            ProxyError::CircuitOpen(_) => code::INTERNAL_CALL_FAILED,
            ProxyError::WaitTimeout(_) => code::INTERNAL_CALL_FAILED,
            ProxyError::Overloaded(_) => code::INTERNAL_CALL_FAILED,
        }
    }

    /// A short fixed label for metrics and logs (never carries input).
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Unparseable(_) => "unparseable",
            ProxyError::MissingParameter(_) => "missing_parameter",
            ProxyError::InvalidParameter(_) => "invalid_parameter",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::ClientBody(_) => "client_body",
            ProxyError::AuthFailed(_) => "auth_failed",
            ProxyError::ClientTimeout(_) => "client_timeout",
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::UpstreamStatus(_) => "upstream_status",
            ProxyError::UpstreamMalformed(_) => "upstream_malformed",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::CircuitOpen(_) => "circuit_open",
            ProxyError::WaitTimeout(_) => "wait_timeout",
            ProxyError::Overloaded(_) => "overloaded",
        }
    }

    /// The upstream could not give an answer (as opposed to the client sending a bad request):
    /// the cases where a stale entry may be served instead (stale-if-error).
    pub fn is_upstream_trouble(&self) -> bool {
        match self {
            ProxyError::Unparseable(_)
            | ProxyError::MissingParameter(_)
            | ProxyError::InvalidParameter(_)
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::ClientBody(_)
            | ProxyError::AuthFailed(_)
            | ProxyError::ClientTimeout(_)
            | ProxyError::Overloaded(_) => false,
            ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::UpstreamStatus(_)
            | ProxyError::UpstreamMalformed(_)
            | ProxyError::RateLimited { .. }
            | ProxyError::CircuitOpen(_)
            | ProxyError::WaitTimeout(_) => true,
        }
    }

    /// The `Retry-After` to send with this error, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::RateLimited { retry_after, .. } => Some(*retry_after),
            ProxyError::CircuitOpen(d) => Some(*d),
            ProxyError::Overloaded(_) => Some(Duration::from_secs(1)),
            ProxyError::Unparseable(_)
            | ProxyError::MissingParameter(_)
            | ProxyError::InvalidParameter(_)
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::ClientBody(_)
            | ProxyError::AuthFailed(_)
            | ProxyError::ClientTimeout(_)
            | ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::UpstreamStatus(_)
            | ProxyError::UpstreamMalformed(_)
            | ProxyError::WaitTimeout(_) => None,
        }
    }

    /// The TPNS-shaped body: `{"retCode":…,"errMsg":"tpns-cache: …"}`.
    pub fn body(&self, shape: ErrorShape) -> Bytes {
        error_body(shape, self.ret_code(), &format!("tpns-cache: {self}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(e: ProxyError, status: u16, ret: i64) {
        assert_eq!(e.status().as_u16(), status, "{e:?}");
        assert_eq!(e.ret_code(), ret, "{e:?}");
        let v: serde_json::Value = serde_json::from_slice(&e.body(ErrorShape::Camel)).unwrap();
        assert_eq!(v["retCode"], ret);
        assert!(v["errMsg"].as_str().unwrap().starts_with("tpns-cache: "));
    }

    #[test]
    fn unparseable() {
        check(ProxyError::Unparseable("x".into()), 200, 1_008_001);
    }
    #[test]
    fn missing_parameter() {
        check(ProxyError::MissingParameter("token_list"), 200, 1_008_002);
    }
    #[test]
    fn invalid_parameter() {
        check(ProxyError::InvalidParameter("x".into()), 200, 1_008_007);
    }
    #[test]
    fn body_too_large() {
        check(ProxyError::BodyTooLarge { limit: 10 }, 413, 1_008_007);
    }
    #[test]
    fn client_body() {
        check(ProxyError::ClientBody("eof".into()), 400, 1_008_001);
    }
    #[test]
    fn auth_failed() {
        check(
            ProxyError::AuthFailed("Sign does not match"),
            200,
            1_008_003,
        );
    }
    #[test]
    fn client_timeout() {
        check(
            ProxyError::ClientTimeout(Duration::from_secs(30)),
            408,
            1_008_001,
        );
    }
    #[test]
    fn upstream_unreachable() {
        check(
            ProxyError::UpstreamUnreachable("refused".into()),
            502,
            1_008_004,
        );
    }
    #[test]
    fn upstream_timeout() {
        let e = ProxyError::UpstreamTimeout(Duration::from_millis(1500));
        assert!(e.to_string().contains("1s 500ms"), "{e}");
        check(e, 504, 1_008_004);
    }
    #[test]
    fn upstream_status() {
        check(ProxyError::UpstreamStatus(503), 502, 1_008_004);
    }
    #[test]
    fn rate_limited() {
        let e = ProxyError::RateLimited {
            retry_after: Duration::from_secs(2),
            reason: "max_wait",
        };
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        assert!(e.is_upstream_trouble());
        check(e, 200, 1_008_028);
    }
    #[test]
    fn retry_messages_say_whole_seconds() {
        let e = ProxyError::RateLimited {
            retry_after: Duration::from_nanos(9_975_076_096),
            reason: "cooldown",
        };
        assert!(e.to_string().ends_with("retry after 10s"), "{e}");
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
    }
    #[test]
    fn circuit_open() {
        let e = ProxyError::CircuitOpen(Duration::from_secs(3));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        check(e, 503, 1_008_004);
    }
    #[test]
    fn wait_timeout() {
        let e = ProxyError::WaitTimeout(Duration::from_secs(3));
        assert!(e.is_upstream_trouble());
        check(e, 504, 1_008_004);
    }
    #[test]
    fn client_errors_are_not_upstream_trouble() {
        assert!(!ProxyError::InvalidParameter("x".into()).is_upstream_trouble());
        assert!(ProxyError::UpstreamStatus(500).is_upstream_trouble());
        assert_eq!(ProxyError::UpstreamStatus(500).retry_after(), None);
    }
    #[test]
    fn overloaded() {
        let e = ProxyError::Overloaded("limits.max_buffered_bytes");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
        assert!(!e.is_upstream_trouble());
        check(e, 503, 1_008_004);
    }
    #[test]
    fn upstream_malformed() {
        check(ProxyError::UpstreamMalformed("x".into()), 502, 1_008_004);
    }
}
