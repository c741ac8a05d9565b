//! The errors the proxy answers by itself, in two kinds, each classified in exactly one place:
//!
//! - [`ClientError`]: the request cannot be served as it is (bad input, a refused credential,
//!   a bound on the process's work);
//! - [`UpstreamError`]: the upstream gave no usable answer, or was not asked (quota, breaker).
//!
//! Each kind has one exhaustive match ([`ClientError::class`], [`UpstreamError::class`]) that
//! says everything about an error at once: HTTP status, TPNS `retCode`, a fixed label for
//! metrics and `Cache-Status`, and `Retry-After`; for upstream errors also what it means for the
//! breaker, for stale-if-error and for the upstream-calls metric. Validation errors are HTTP
//! 200, as TPNS answers business errors (its SDKs treat any non-200 as a transport failure);
//! only what TPNS itself could not have said uses another status.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

use super::{code, error_body, ErrorShape};
use crate::metrics::labels::UpstreamOutcome;

/// How an error is answered and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub status: StatusCode,
    pub ret_code: i64,
    /// A short fixed label (metrics, `Cache-Status` details, logs); never carries input.
    pub kind: &'static str,
    pub retry_after: Option<Duration>,
}

/// A request the proxy answers itself, without asking the upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
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
    /// The client did not send its whole body within `limits.body_read_timeout`.
    #[error("request body not received within {}", humantime::format_duration(*.0))]
    ClientTimeout(Duration),
    /// A credential refused: a signature the proxy checked, or one the upstream refused lately.
    #[error("authentication failed: {0}")]
    AuthFailed(&'static str),
    /// A bound on the whole process's work was reached (e.g. `limits.max_buffered_bytes`).
    #[error("busy: {0}, retry after 1s")]
    Overloaded(&'static str),
}

impl ClientError {
    /// Everything about this error, in one match.
    pub fn class(&self) -> Class {
        use ClientError as E;
        let (status, ret_code, kind, retry_after) = match self {
            E::Unparseable(_) => (StatusCode::OK, code::UNPARSEABLE, "unparseable", None),
            E::MissingParameter(_) => (
                StatusCode::OK,
                code::MISSING_PARAMETER,
                "missing_parameter",
                None,
            ),
            E::InvalidParameter(_) => (
                StatusCode::OK,
                code::INVALID_PARAMETER,
                "invalid_parameter",
                None,
            ),
            E::BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                code::INVALID_PARAMETER,
                "body_too_large",
                None,
            ),
            E::ClientBody(_) => (
                StatusCode::BAD_REQUEST,
                code::UNPARSEABLE,
                "client_body",
                None,
            ),
            E::ClientTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                code::UNPARSEABLE,
                "client_timeout",
                None,
            ),
            E::AuthFailed(_) => (StatusCode::OK, code::AUTH_FAILED, "auth_failed", None),
            E::Overloaded(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                code::INTERNAL_CALL_FAILED,
                "overloaded",
                Some(Duration::from_secs(1)),
            ),
        };
        Class {
            status,
            ret_code,
            kind,
            retry_after,
        }
    }

    /// The TPNS-shaped body: `{"retCode":…,"errMsg":"tpns-cache: …"}`.
    pub fn body(&self, shape: ErrorShape) -> Bytes {
        error_body(shape, self.class().ret_code, &format!("tpns-cache: {self}"))
    }
}

/// The upstream gave no usable answer, or the shield did not let the call go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// No connection to the upstream could be made, or it broke.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// No complete upstream answer within `upstream.timeout`.
    #[error("upstream timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The upstream answered with a non-200 status.
    #[error("upstream answered HTTP {0}")]
    Status(u16),
    /// The upstream's answer is malformed, oversized or does not match what was asked.
    #[error("upstream answer rejected: {0}")]
    Malformed(String),
    /// The quota (a limiter, or a cool-down after the upstream's own 1008028) does not allow a
    /// call within `shield.max_wait`.
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
}

/// What an upstream error means beyond its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UpstreamClass {
    pub(crate) class: Class,
    /// The `outcome` label of `tpns_cache_upstream_requests_total`.
    pub(crate) outcome: UpstreamOutcome,
    /// Whether the circuit breaker counts it as the upstream failing: transport errors,
    /// timeouts, 5xx, 429 and malformed answers. Another 4xx is the upstream refusing one
    /// request (one client's oversized batch, say), not being down.
    pub(crate) breaker_failure: bool,
}

impl UpstreamError {
    /// Everything about this error, in one match.
    pub(crate) fn classify(&self) -> UpstreamClass {
        use UpstreamError as E;
        use UpstreamOutcome as O;
        let internal = code::INTERNAL_CALL_FAILED;
        let (status, ret_code, kind, retry_after, outcome, breaker_failure) = match self {
            E::Unreachable(_) => (
                StatusCode::BAD_GATEWAY,
                internal,
                "upstream_unreachable",
                None,
                O::Unreachable,
                true,
            ),
            E::Timeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                internal,
                "upstream_timeout",
                None,
                O::Timeout,
                true,
            ),
            E::Status(s) => (
                StatusCode::BAD_GATEWAY,
                internal,
                "upstream_status",
                None,
                O::HttpError,
                !(400..500).contains(s) || *s == 429,
            ),
            E::Malformed(_) => (
                StatusCode::BAD_GATEWAY,
                internal,
                "upstream_malformed",
                None,
                O::Malformed,
                true,
            ),
            // As the upstream itself answers 1008028: HTTP 200 (plus Retry-After).
            E::RateLimited { retry_after, .. } => (
                StatusCode::OK,
                code::RATE_LIMITED,
                "rate_limited",
                Some(*retry_after),
                O::RateLimited,
                false,
            ),
            E::CircuitOpen(d) => (
                StatusCode::SERVICE_UNAVAILABLE,
                internal,
                "circuit_open",
                Some(*d),
                O::CircuitOpen,
                false,
            ),
            E::WaitTimeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                internal,
                "wait_timeout",
                None,
                O::Timeout,
                false,
            ),
        };
        UpstreamClass {
            class: Class {
                status,
                ret_code,
                kind,
                retry_after,
            },
            outcome,
            breaker_failure,
        }
    }

    pub fn class(&self) -> Class {
        self.classify().class
    }

    /// The TPNS-shaped body: `{"retCode":…,"errMsg":"tpns-cache: …"}`.
    pub fn body(&self, shape: ErrorShape) -> Bytes {
        error_body(shape, self.class().ret_code, &format!("tpns-cache: {self}"))
    }
}

/// A wait in whole seconds, rounded up (at least 1): what `Retry-After` says, and what our
/// messages say with it.
pub fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(class: Class, body: Bytes, status: u16, ret: i64) {
        assert_eq!(class.status.as_u16(), status);
        assert_eq!(class.ret_code, ret);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["retCode"], ret);
        assert!(v["errMsg"].as_str().unwrap().starts_with("tpns-cache: "));
    }

    fn client(e: ClientError, status: u16, ret: i64) {
        check(e.class(), e.body(ErrorShape::Camel), status, ret);
    }

    fn upstream(e: UpstreamError, status: u16, ret: i64) -> UpstreamClass {
        check(e.class(), e.body(ErrorShape::Camel), status, ret);
        e.classify()
    }

    #[test]
    fn unparseable() {
        client(ClientError::Unparseable("x".into()), 200, 1_008_001);
    }
    #[test]
    fn missing_parameter() {
        client(ClientError::MissingParameter("token_list"), 200, 1_008_002);
    }
    #[test]
    fn invalid_parameter() {
        client(ClientError::InvalidParameter("x".into()), 200, 1_008_007);
    }
    #[test]
    fn body_too_large() {
        client(ClientError::BodyTooLarge { limit: 10 }, 413, 1_008_007);
    }
    #[test]
    fn client_body() {
        client(ClientError::ClientBody("eof".into()), 400, 1_008_001);
    }
    #[test]
    fn client_timeout() {
        client(
            ClientError::ClientTimeout(Duration::from_secs(30)),
            408,
            1_008_001,
        );
    }
    #[test]
    fn auth_failed() {
        client(
            ClientError::AuthFailed("Sign does not match"),
            200,
            1_008_003,
        );
    }
    #[test]
    fn overloaded() {
        let e = ClientError::Overloaded("limits.max_buffered_bytes");
        assert_eq!(e.class().retry_after, Some(Duration::from_secs(1)));
        client(e, 503, 1_008_004);
    }
    #[test]
    fn upstream_unreachable() {
        let c = upstream(UpstreamError::Unreachable("refused".into()), 502, 1_008_004);
        assert!(c.breaker_failure);
        assert_eq!(c.outcome, UpstreamOutcome::Unreachable);
    }
    #[test]
    fn upstream_timeout() {
        let e = UpstreamError::Timeout(Duration::from_millis(1500));
        assert!(e.to_string().contains("1s 500ms"), "{e}");
        assert!(upstream(e, 504, 1_008_004).breaker_failure);
    }
    #[test]
    fn upstream_status() {
        assert!(upstream(UpstreamError::Status(503), 502, 1_008_004).breaker_failure);
        assert!(upstream(UpstreamError::Status(429), 502, 1_008_004).breaker_failure);
        // Regression (issue 11): another 4xx is the upstream refusing one request.
        assert!(!upstream(UpstreamError::Status(413), 502, 1_008_004).breaker_failure);
        assert_eq!(UpstreamError::Status(500).class().retry_after, None);
    }
    #[test]
    fn upstream_malformed() {
        assert!(upstream(UpstreamError::Malformed("x".into()), 502, 1_008_004).breaker_failure);
    }
    #[test]
    fn rate_limited() {
        let e = UpstreamError::RateLimited {
            retry_after: Duration::from_secs(2),
            reason: "max_wait",
        };
        assert_eq!(e.class().retry_after, Some(Duration::from_secs(2)));
        let c = upstream(e, 200, 1_008_028);
        assert!(!c.breaker_failure);
        assert_eq!(c.outcome, UpstreamOutcome::RateLimited);
    }
    #[test]
    fn circuit_open() {
        let e = UpstreamError::CircuitOpen(Duration::from_secs(3));
        assert_eq!(e.class().retry_after, Some(Duration::from_secs(3)));
        upstream(e, 503, 1_008_004);
    }
    #[test]
    fn wait_timeout() {
        upstream(
            UpstreamError::WaitTimeout(Duration::from_secs(3)),
            504,
            1_008_004,
        );
    }
    #[test]
    fn retry_messages_say_whole_seconds() {
        let e = UpstreamError::RateLimited {
            retry_after: Duration::from_nanos(9_975_076_096),
            reason: "cooldown",
        };
        assert!(e.to_string().ends_with("retry after 10s"), "{e}");
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
    }
}
