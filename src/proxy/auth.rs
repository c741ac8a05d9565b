//! Who is asking: the client's credential, the app (AccessID) it scopes the cache to, and the
//! set of credentials the upstream has recently accepted.
//!
//! Invariant: a cached answer is served only to a credential that the upstream accepted within
//! `auth.accepted_ttl`. Credentials are remembered only as HMAC-SHA256 fingerprints under a key
//! drawn at start-up, so the secret never stays in memory after the request and the
//! fingerprints are useless outside this process.

use std::sync::Arc;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::header::AUTHORIZATION;
use http::HeaderMap;
use sha2::Sha256;

/// A keyed hash of one `Authorization` header value.
pub type Fingerprint = [u8; 32];

/// What the client's headers say about who it is.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// HTTP Basic with a non-empty AccessID.
    Basic {
        access_id: Arc<str>,
        fingerprint: Fingerprint,
    },
    /// Nothing the proxy can safely scope a cache entry to; forwarded unchanged, not cached.
    Unscoped(Unscoped),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unscoped {
    /// No `Authorization` header and no signature headers.
    NoCredentials,
    /// `AccessId`/`TimeStamp`/`Sign` headers (signature support comes with its own issue).
    Signature,
    /// An `Authorization` header that is not well-formed Basic.
    Malformed,
}

impl Unscoped {
    pub fn as_str(self) -> &'static str {
        match self {
            Unscoped::NoCredentials => "no-credentials",
            Unscoped::Signature => "signature",
            Unscoped::Malformed => "unrecognized-credentials",
        }
    }
}

/// Credentials the upstream has accepted recently (bounded, with a TTL).
pub struct Credentials {
    key: [u8; 32],
    accepted: moka::sync::Cache<Fingerprint, ()>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Credentials")
            .field("accepted", &self.accepted.entry_count())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(ttl: std::time::Duration, max: u64) -> Result<Credentials, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(Credentials {
            key,
            accepted: moka::sync::Cache::builder()
                .max_capacity(max)
                .time_to_live(ttl)
                .build(),
        })
    }

    pub fn classify(&self, headers: &HeaderMap) -> ClientAuth {
        if ["sign", "accessid", "timestamp"]
            .iter()
            .any(|h| headers.contains_key(*h))
        {
            return ClientAuth::Unscoped(Unscoped::Signature);
        }
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return ClientAuth::Unscoped(Unscoped::NoCredentials);
        };
        if values.next().is_some() {
            return ClientAuth::Unscoped(Unscoped::Malformed);
        }
        match basic_user(value.as_bytes()) {
            Some(user) => ClientAuth::Basic {
                access_id: Arc::from(user),
                fingerprint: self.fingerprint(value.as_bytes()),
            },
            None => ClientAuth::Unscoped(Unscoped::Malformed),
        }
    }

    fn fingerprint(&self, header: &[u8]) -> Fingerprint {
        // HMAC accepts keys of any length; this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(header);
        mac.finalize().into_bytes().into()
    }

    pub fn is_accepted(&self, fp: &Fingerprint) -> bool {
        self.accepted.contains_key(fp)
    }

    pub fn accept(&self, fp: Fingerprint) {
        self.accepted.insert(fp, ());
    }

    /// The upstream refused this credential: stop serving it from cache at once.
    pub fn forget(&self, fp: &Fingerprint) {
        self.accepted.invalidate(fp);
    }
}

/// The user part of a well-formed `Basic` credential.
fn basic_user(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, secret) = text.split_once(':')?;
    if user.is_empty() || secret.is_empty() || user.chars().any(char::is_control) {
        return None;
    }
    Some(user.to_owned())
}

/// Whether an upstream `retCode` says the credential itself was refused.
pub fn is_auth_failure(ret_code: i64) -> bool {
    use crate::api::code;
    ret_code == code::AUTH_FAILED || ret_code == code::KEY_MISMATCH
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn creds() -> Credentials {
        Credentials::new(std::time::Duration::from_secs(60), 100).unwrap()
    }

    fn basic(user_secret: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_secret)
        );
        h.insert(AUTHORIZATION, HeaderValue::from_str(&v).unwrap());
        h
    }

    #[test]
    fn classifies() {
        let c = creds();
        match c.classify(&basic("1500001048:secret")) {
            ClientAuth::Basic { access_id, .. } => assert_eq!(&*access_id, "1500001048"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.classify(&HeaderMap::new()),
            ClientAuth::Unscoped(Unscoped::NoCredentials)
        ));
        assert!(matches!(
            c.classify(&basic(":secret")),
            ClientAuth::Unscoped(Unscoped::Malformed)
        ));
        assert!(matches!(
            c.classify(&basic("nocolon")),
            ClientAuth::Unscoped(Unscoped::Malformed)
        ));
        let mut h = basic("a:b");
        h.insert("Sign", HeaderValue::from_static("x"));
        assert!(matches!(
            c.classify(&h),
            ClientAuth::Unscoped(Unscoped::Signature)
        ));
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert!(matches!(
            c.classify(&h),
            ClientAuth::Unscoped(Unscoped::Malformed)
        ));
    }

    #[test]
    fn fingerprints_differ_by_secret_and_process() {
        let (a, b) = (creds(), creds());
        let fp = |c: &Credentials, s: &str| match c.classify(&basic(s)) {
            ClientAuth::Basic { fingerprint, .. } => fingerprint,
            other => panic!("{other:?}"),
        };
        assert_ne!(fp(&a, "app:one"), fp(&a, "app:two"));
        assert_eq!(fp(&a, "app:one"), fp(&a, "app:one"));
        assert_ne!(fp(&a, "app:one"), fp(&b, "app:one"));
        a.accept(fp(&a, "app:one"));
        assert!(a.is_accepted(&fp(&a, "app:one")));
        assert!(!a.is_accepted(&fp(&a, "app:two")));
        a.forget(&fp(&a, "app:one"));
        assert!(!a.is_accepted(&fp(&a, "app:one")));
        assert!(!format!("{a:?}").contains("key:"));
    }
}
