//! The documented TPNS wire format: return codes, TPNS-shaped error bodies, and the
//! `/v3/device/account/query` request and response (see `../shared/spec/TPNS-API.md`).
//!
//! `error` holds the one mapping from proxy errors to HTTP status and `retCode`.

pub mod error;
pub mod query;
pub mod rawobj;

/// Return codes from the TPNS error table.
pub mod code {
    pub const OK: i64 = 0;
    pub const UNPARSEABLE: i64 = 1_008_001;
    pub const MISSING_PARAMETER: i64 = 1_008_002;
    pub const AUTH_FAILED: i64 = 1_008_003;
    pub const INTERNAL_CALL_FAILED: i64 = 1_008_004;
    pub const INVALID_TOKEN: i64 = 1_008_006;
    pub const INVALID_PARAMETER: i64 = 1_008_007;
    pub const BATCH_PARTLY_FAILED: i64 = 1_008_026;
    pub const BATCH_ALL_FAILED: i64 = 1_008_027;
    pub const RATE_LIMITED: i64 = 1_008_028;
    pub const KEY_MISMATCH: i64 = 10_030_002;
    pub const NOT_FOUND: i64 = 10_110_008;

    /// Per-element `result` code strings.
    pub const ELEMENT_OK: &str = "0";
    pub const ELEMENT_NOT_FOUND: &str = "10110008";
    pub const ELEMENT_INVALID_TOKEN: &str = "1008006";

    /// The `errMsg` that goes with a top-level code we produce ourselves.
    pub fn message(code: i64) -> &'static str {
        match code {
            OK => "NO_ERROR",
            UNPARSEABLE => "request body cannot be parsed",
            MISSING_PARAMETER => "required parameter missing",
            AUTH_FAILED => "authentication failed",
            INTERNAL_CALL_FAILED => "internal service call failed",
            INVALID_PARAMETER => "parameter failed validation",
            BATCH_PARTLY_FAILED => "batch operation partly failed",
            BATCH_ALL_FAILED => "batch operation wholly failed",
            RATE_LIMITED => "frequency limit exceeded",
            KEY_MISMATCH => "AccessID and SecretKey do not match",
            NOT_FOUND => "queried token or account does not exist",
            _ => "ERROR",
        }
    }
}

/// TPNS uses camelCase (`retCode`/`errMsg`) on the account query API and snake_case
/// (`ret_code`/`err_msg`) on the others; our own error bodies follow the route's style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    Camel,
    Snake,
}

impl ErrorShape {
    pub fn for_path(path: &str) -> ErrorShape {
        if path == QUERY_PATH {
            ErrorShape::Camel
        } else {
            ErrorShape::Snake
        }
    }
}

pub const QUERY_PATH: &str = "/v3/device/account/query";
pub const BATCHOPERATE_PATH: &str = "/v3/device/account/batchoperate";
pub const PUSH_APP_PATH: &str = "/v3/push/app";

/// A TPNS-shaped error body: `{"retCode":N,"errMsg":"..."}` (or snake_case).
pub fn error_body(shape: ErrorShape, ret_code: i64, msg: &str) -> bytes::Bytes {
    let v = match shape {
        ErrorShape::Camel => serde_json::json!({ "retCode": ret_code, "errMsg": msg }),
        ErrorShape::Snake => serde_json::json!({ "ret_code": ret_code, "err_msg": msg }),
    };
    bytes::Bytes::from(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_shapes() {
        let camel: serde_json::Value =
            serde_json::from_slice(&error_body(ErrorShape::Camel, 1_008_001, "x\"y")).unwrap();
        assert_eq!(camel["retCode"], 1_008_001);
        assert_eq!(camel["errMsg"], "x\"y");
        let snake: serde_json::Value =
            serde_json::from_slice(&error_body(ErrorShape::Snake, 1_008_004, "z")).unwrap();
        assert_eq!(snake["ret_code"], 1_008_004);
        assert_eq!(ErrorShape::for_path(QUERY_PATH), ErrorShape::Camel);
        assert_eq!(ErrorShape::for_path(PUSH_APP_PATH), ErrorShape::Snake);
    }
}
