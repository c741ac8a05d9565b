//! The TPNS REST API's wire format, as far as tpns-cache and its simulator both need it: the
//! return codes and their messages, TPNS-shaped error bodies (camelCase on the account query,
//! snake_case elsewhere), the paths, the request signature and Basic credentials.
//!
//! What the documents say, and what they leave open, is written down in the repository's
//! `docs/tpns-api.md`.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

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

    /// The `errMsg` that goes with a top-level code.
    pub fn message(code: i64) -> &'static str {
        match code {
            OK => "NO_ERROR",
            UNPARSEABLE => "request body cannot be parsed",
            MISSING_PARAMETER => "required parameter missing",
            AUTH_FAILED => "authentication failed",
            INTERNAL_CALL_FAILED => "internal service call failed",
            INVALID_TOKEN => "invalid token",
            INVALID_PARAMETER => "parameter failed validation",
            BATCH_PARTLY_FAILED => "batch operation partly failed",
            BATCH_ALL_FAILED => "batch operation wholly failed",
            RATE_LIMITED => "frequency limit exceeded",
            KEY_MISMATCH => "AccessID and SecretKey do not match",
            NOT_FOUND => "queried token or account does not exist",
            _ => "ERROR",
        }
    }

    /// Whether a `retCode` says the credential itself was refused.
    pub fn is_auth_failure(code: i64) -> bool {
        code == AUTH_FAILED || code == KEY_MISMATCH
    }
}

pub const QUERY_PATH: &str = "/v3/device/account/query";
pub const BATCHOPERATE_PATH: &str = "/v3/device/account/batchoperate";
pub const PUSH_APP_PATH: &str = "/v3/push/app";

/// TPNS uses camelCase (`retCode`/`errMsg`) on the account query API and snake_case
/// (`ret_code`/`err_msg`) on the others; error bodies follow the route's style.
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

/// A TPNS-shaped error body: `{"retCode":N,"errMsg":"..."}` (or snake_case).
pub fn error_body(shape: ErrorShape, ret_code: i64, msg: &str) -> bytes::Bytes {
    let v = match shape {
        ErrorShape::Camel => serde_json::json!({ "retCode": ret_code, "errMsg": msg }),
        ErrorShape::Snake => serde_json::json!({ "ret_code": ret_code, "err_msg": msg }),
    };
    bytes::Bytes::from(v.to_string())
}

/// TPNS's signature: `base64(lowercase_hex(HMAC-SHA256(SecretKey, TimeStamp + AccessId + body)))`.
pub fn sign(secret: &[u8], timestamp: &str, access_id: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(timestamp.as_bytes());
    mac.update(access_id.as_bytes());
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    base64::engine::general_purpose::STANDARD.encode(hex(&digest))
}

/// Lowercase hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// HTTP Basic credentials, as TPNS takes them: `Authorization: Basic base64(AccessID:SecretKey)`.
pub mod basic {
    use base64::Engine as _;

    /// The `Authorization` value for an AccessID and SecretKey.
    pub fn encode(access_id: &str, secret: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{access_id}:{secret}"))
        )
    }

    /// The AccessID and SecretKey of a well-formed Basic value: the scheme in any case
    /// (RFC 9110), both parts non-empty, no control characters in the AccessID.
    pub fn decode(value: &[u8]) -> Option<(String, String)> {
        decode_with(value, |user, secret| (user.to_owned(), secret.to_owned()))
    }

    /// Decoded credentials up to this size are decoded on the stack (an AccessID and a
    /// 32-character SecretKey take ~45 bytes); larger ones in a heap buffer.
    const STACK_BYTES: usize = 192;

    /// [`decode`] without copies: `f` gets the AccessID and SecretKey borrowed from a buffer
    /// that is overwritten with zeros once `f` returns, so a caller that needs only the
    /// AccessID leaves no copy of the secret behind, and allocates nothing for a usual one.
    pub fn decode_with<R>(value: &[u8], f: impl FnOnce(&str, &str) -> R) -> Option<R> {
        let value = std::str::from_utf8(value).ok()?.trim();
        let (scheme, rest) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let rest = rest.trim().as_bytes();
        let need = base64::decoded_len_estimate(rest.len());
        let mut stack = [0u8; STACK_BYTES];
        let mut heap = Vec::new();
        let buf: &mut [u8] = if need <= STACK_BYTES {
            &mut stack
        } else {
            heap.resize(need, 0);
            &mut heap
        };
        let answer = base64::engine::general_purpose::STANDARD
            .decode_slice(rest, buf)
            .ok()
            .and_then(|n| {
                let text = std::str::from_utf8(&buf[..n]).ok()?;
                let (user, secret) = text.split_once(':')?;
                if user.is_empty() || secret.is_empty() || user.chars().any(char::is_control) {
                    return None;
                }
                Some(f(user, secret))
            });
        zeroize::Zeroize::zeroize(buf);
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example from the TPNS docs (see `docs/tpns-api.md`).
    #[test]
    fn signature_worked_example() {
        let body = r#"{"audience_type": "account","platform": "android","message": {"title": "test title","content": "test content","android": { "action": {"action_type": 3,"intent": "xgscheme://com.xg.push/notify_detail?param1=xg"}}},"message_type": "notify","account_list": ["5822f0eee44c3625ef0000bb"] }"#;
        let s = sign(
            b"1452fcebae9f3115ba794fb0fff2fd73",
            "1565314789",
            "1500001048",
            body.as_bytes(),
        );
        assert_eq!(
            s,
            "Y2QyMDc3NDY4MmJmNzhiZmRiNDNlMTdkMWQ1ZDU2YjNlNWI3ODlhMTY3MGZjMTUyN2VmNTRjNjVkMmQ3Yjc2ZA=="
        );
        let hex = base64::engine::general_purpose::STANDARD
            .decode(&s)
            .unwrap();
        assert_eq!(
            String::from_utf8(hex).unwrap(),
            "cd20774682bf78bfdb43e17d1d5d56b3e5b789a1670fc1527ef54c65d2d7b76d"
        );
    }

    #[test]
    fn basic_round_trip_and_refusals() {
        let v = basic::encode("1500001048", "s3cret:with:colons");
        assert_eq!(
            basic::decode(v.as_bytes()),
            Some(("1500001048".into(), "s3cret:with:colons".into()))
        );
        assert!(basic::decode(v.replace("Basic", "bAsIc").as_bytes()).is_some());
        let raw = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        for bad in [":x", "x:", "nocolon", "a\u{1}b:x"] {
            assert!(basic::decode(raw(bad).as_bytes()).is_none(), "{bad}");
        }
        assert!(basic::decode(b"Bearer x").is_none());
        assert!(basic::decode(b"Basic !!!").is_none());
        // Credentials too long for the stack buffer decode the same way from the heap.
        let long_secret = "k".repeat(1000);
        let v = basic::encode("app", &long_secret);
        assert_eq!(
            basic::decode(v.as_bytes()),
            Some(("app".into(), long_secret.clone()))
        );
        assert_eq!(
            basic::decode_with(v.as_bytes(), |user, secret| (user.len(), secret.len())),
            Some((3, 1000))
        );
        assert!(basic::decode(raw(&format!("{long_secret}nocolon")).as_bytes()).is_none());
    }

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

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
