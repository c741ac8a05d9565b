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
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unparseable(_) => StatusCode::OK,
            ProxyError::MissingParameter(_) => StatusCode::OK,
            ProxyError::InvalidParameter(_) => StatusCode::OK,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamStatus(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamMalformed(_) => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn ret_code(&self) -> i64 {
        match self {
            ProxyError::Unparseable(_) => code::UNPARSEABLE,
            ProxyError::MissingParameter(_) => code::MISSING_PARAMETER,
            ProxyError::InvalidParameter(_) => code::INVALID_PARAMETER,
            ProxyError::BodyTooLarge { .. } => code::INVALID_PARAMETER,
            ProxyError::ClientBody(_) => code::UNPARSEABLE,
            ProxyError::ClientTimeout(_) => code::UNPARSEABLE,
            ProxyError::UpstreamUnreachable(_) => code::INTERNAL_CALL_FAILED,
            ProxyError::UpstreamTimeout(_) => code::INTERNAL_CALL_FAILED,
            ProxyError::UpstreamStatus(_) => code::INTERNAL_CALL_FAILED,
            ProxyError::UpstreamMalformed(_) => code::INTERNAL_CALL_FAILED,
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
            ProxyError::ClientTimeout(_) => "client_timeout",
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::UpstreamStatus(_) => "upstream_status",
            ProxyError::UpstreamMalformed(_) => "upstream_malformed",
        }
    }

    pub fn is_upstream(&self) -> bool {
        self.status().is_server_error()
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
    fn upstream_malformed() {
        check(ProxyError::UpstreamMalformed("x".into()), 502, 1_008_004);
    }
}
