//! Who is asking: the client's credential, the app (AccessID) it scopes the cache to, and the
//! credentials sent upstream on its behalf. What the upstream said of a credential is kept in
//! [`crate::trust`].
//!
//! Modes (see docs/behaviour.md): Basic pass-through; signature pass-through, verified and re-signed
//! for apps whose SecretKey the proxy holds (`auth.apps`), forwarded byte-for-byte otherwise;
//! injection (`auth.inject`) for requests that arrive with no credentials at all.
//!
//! Invariant: a cached answer is served only to a credential that the upstream accepted within
//! `auth.accepted_ttl`. Credentials are remembered only as HMAC-SHA256 fingerprints under a key
//! drawn at start-up, so the secret never stays in memory after the request and the
//! fingerprints are useless outside this process.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use http::header::{HeaderName, AUTHORIZATION};
use http::{HeaderMap, HeaderValue};
use sha2::Sha256;

use crate::config::{AuthScheme, Keys};
pub(crate) use crate::trust::Fingerprint;
use crate::upstream::{unix_seconds, Auth as UpstreamAuth};

/// The signature scheme's headers, as names built once: looking a header up by a `&str`
/// parses and checks the name on every call.
pub(crate) const ACCESS_ID: HeaderName = HeaderName::from_static("accessid");
pub(crate) const TIMESTAMP: HeaderName = HeaderName::from_static("timestamp");
pub(crate) const SIGN: HeaderName = HeaderName::from_static("sign");

/// What the client's headers say about who it is.
#[derive(Debug, Clone)]
pub(crate) enum ClientAuth {
    /// HTTP Basic with a non-empty AccessID.
    Basic {
        access_id: Arc<str>,
        fingerprint: Fingerprint,
    },
    /// `AccessId`/`TimeStamp`/`Sign` for an app whose key the proxy holds; must be verified
    /// against the body ([`Credentials::verify`]) before anything else happens.
    Signed {
        access_id: Arc<str>,
        timestamp: String,
        sign: String,
        fingerprint: Fingerprint,
    },
    /// No credentials at all, and injection is configured.
    Injected {
        access_id: Arc<str>,
        fingerprint: Fingerprint,
    },
    /// Nothing the proxy can safely scope a cache entry to; forwarded unchanged, not cached.
    Unscoped(Unscoped),
}

impl ClientAuth {
    /// The app and credential fingerprint the cache is scoped to; `None` when unscoped.
    pub(crate) fn scope(&self) -> Option<(Arc<str>, Fingerprint)> {
        match self {
            ClientAuth::Basic {
                access_id,
                fingerprint,
            }
            | ClientAuth::Signed {
                access_id,
                fingerprint,
                ..
            }
            | ClientAuth::Injected {
                access_id,
                fingerprint,
            } => Some((access_id.clone(), *fingerprint)),
            ClientAuth::Unscoped(_) => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unscoped {
    /// No `Authorization` header and no signature headers.
    NoCredentials,
    /// `AccessId`/`TimeStamp`/`Sign` headers of an app whose key the proxy does not hold.
    Signature,
    /// An `Authorization` header that is not well-formed Basic.
    Malformed,
}

/// The keys the proxy holds (to verify and re-sign signatures, to inject), and the key of the
/// fingerprints.
pub(crate) struct Credentials {
    /// The fingerprints' HMAC, already keyed (with a random key): each fingerprint clones it
    /// instead of hashing the key's two pads again.
    keyed: Hmac<Sha256>,
    keys: Keys,
    max_skew: std::time::Duration,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key or the secrets.
        f.debug_struct("Credentials")
            .field("apps", &self.keys.apps.len())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub(crate) fn new(
        keys: Keys,
        max_skew: std::time::Duration,
    ) -> Result<Credentials, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        // HMAC accepts keys of any length; this cannot fail.
        let keyed = <Hmac<Sha256> as Mac>::new_from_slice(&key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        Ok(Credentials {
            keyed,
            keys,
            max_skew,
        })
    }

    pub(crate) fn classify(&self, headers: &HeaderMap) -> ClientAuth {
        if [&SIGN, &ACCESS_ID, &TIMESTAMP]
            .iter()
            .any(|h| headers.contains_key(*h))
        {
            return self.classify_signed(headers);
        }
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return match &self.keys.inject {
                Some(inj) => ClientAuth::Injected {
                    access_id: Arc::from(inj.access_id.as_str()),
                    fingerprint: self.fingerprint(format!("inject\0{}", inj.access_id).as_bytes()),
                },
                None => ClientAuth::Unscoped(Unscoped::NoCredentials),
            };
        };
        if values.next().is_some() {
            return ClientAuth::Unscoped(Unscoped::Malformed);
        }
        // Only the AccessID is kept: the secret is read in place and wiped (`decode_with`).
        match tpns_wire::basic::decode_with(value.as_bytes(), |user, _| Arc::<str>::from(user)) {
            Some(access_id) => ClientAuth::Basic {
                access_id,
                fingerprint: self.fingerprint(value.as_bytes()),
            },
            None => ClientAuth::Unscoped(Unscoped::Malformed),
        }
    }

    fn classify_signed(&self, headers: &HeaderMap) -> ClientAuth {
        let get = |name: &HeaderName| {
            let mut all = headers.get_all(name).iter();
            match (all.next(), all.next()) {
                (Some(v), None) => v.to_str().ok().map(str::to_owned),
                _ => None,
            }
        };
        let (Some(access_id), Some(timestamp), Some(sign)) =
            (get(&ACCESS_ID), get(&TIMESTAMP), get(&SIGN))
        else {
            return ClientAuth::Unscoped(Unscoped::Signature);
        };
        if !self.keys.apps.contains_key(&access_id) {
            return ClientAuth::Unscoped(Unscoped::Signature);
        }
        ClientAuth::Signed {
            fingerprint: self.fingerprint(format!("sign\0{access_id}").as_bytes()),
            access_id: Arc::from(access_id),
            timestamp,
            sign,
        }
    }

    /// Checks a signed request against the key the proxy holds: the timestamp within
    /// `auth.signature_max_skew`, the signature equal in constant time.
    pub(crate) fn verify(
        &self,
        access_id: &str,
        timestamp: &str,
        sign: &str,
        body: &[u8],
    ) -> Result<(), &'static str> {
        let key = self.keys.apps.get(access_id).ok_or("no key for this app")?;
        let ts: i64 = timestamp
            .trim()
            .parse()
            .map_err(|_| "TimeStamp is not a number")?;
        // abs_diff cannot overflow, whatever TimeStamp a client sends.
        if unix_seconds().abs_diff(ts) > self.max_skew.as_secs() {
            return Err("TimeStamp outside the allowed clock skew");
        }
        let expected = tpns_wire::sign(key.expose().as_bytes(), timestamp, access_id, body);
        use subtle::ConstantTimeEq;
        let given = sign.trim().as_bytes();
        if expected.len() == given.len() && bool::from(expected.as_bytes().ct_eq(given)) {
            Ok(())
        } else {
            Err("Sign does not match")
        }
    }

    /// The upstream credentials for a request classified as `auth` (`None` for unscoped ones,
    /// which are forwarded as they are).
    pub(crate) fn upstream_auth(
        &self,
        auth: &ClientAuth,
        client: &HeaderMap,
    ) -> Option<UpstreamAuth> {
        match auth {
            ClientAuth::Basic { .. } => {
                client.get(AUTHORIZATION).cloned().map(UpstreamAuth::Header)
            }
            ClientAuth::Signed { access_id, .. } => {
                let secret = self.keys.apps.get(&**access_id)?.clone();
                Some(UpstreamAuth::Sign {
                    access_id: access_id.clone(),
                    secret,
                })
            }
            ClientAuth::Injected { .. } => self.injection(),
            ClientAuth::Unscoped(_) => None,
        }
    }

    /// The injected credentials, if configured.
    pub(crate) fn injection(&self) -> Option<UpstreamAuth> {
        let inj = self.keys.inject.as_ref()?;
        Some(match inj.scheme {
            AuthScheme::Basic => {
                let mut v = HeaderValue::from_str(&tpns_wire::basic::encode(
                    &inj.access_id,
                    inj.secret.expose(),
                ))
                .ok()?;
                v.set_sensitive(true);
                UpstreamAuth::Header(v)
            }
            AuthScheme::Signature => UpstreamAuth::Sign {
                access_id: Arc::from(inj.access_id.as_str()),
                secret: inj.secret.clone(),
            },
        })
    }

    fn fingerprint(&self, header: &[u8]) -> Fingerprint {
        let mut mac = self.keyed.clone();
        mac.update(header);
        mac.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use http::HeaderValue;
    use tpns_wire::sign;

    fn creds() -> Credentials {
        Credentials::new(Keys::default(), std::time::Duration::from_secs(300)).unwrap()
    }

    fn signed_creds() -> Credentials {
        let mut keys = Keys::default();
        keys.apps.insert("app1".into(), Secret::new("k1".into()));
        Credentials::new(keys, std::time::Duration::from_secs(300)).unwrap()
    }

    #[test]
    fn verifies_signatures_and_their_age() {
        let c = signed_creds();
        let body = b"{}";
        let now = unix_seconds().to_string();
        let good = sign(b"k1", &now, "app1", body);
        assert_eq!(c.verify("app1", &now, &good, body), Ok(()));
        assert!(c.verify("app1", &now, &good, b"{ }").is_err(), "other body");
        assert!(c
            .verify("app1", &now, &sign(b"k2", &now, "app1", body), body)
            .is_err());
        let old = (unix_seconds() - 301).to_string();
        assert_eq!(
            c.verify("app1", &old, &sign(b"k1", &old, "app1", body), body),
            Err("TimeStamp outside the allowed clock skew")
        );
        assert!(c.verify("app1", "soon", &good, body).is_err());
        // Regression: extreme timestamps overflowed the skew arithmetic (a panic in debug).
        for extreme in [i64::MIN.to_string(), i64::MAX.to_string()] {
            assert_eq!(
                c.verify("app1", &extreme, &good, body),
                Err("TimeStamp outside the allowed clock skew")
            );
        }
        assert!(c.verify("app2", &now, &good, body).is_err());
        let mut h = HeaderMap::new();
        h.insert("accessid", HeaderValue::from_static("app1"));
        h.insert("timestamp", HeaderValue::from_str(&now).unwrap());
        h.insert("sign", HeaderValue::from_str(&good).unwrap());
        assert!(matches!(c.classify(&h), ClientAuth::Signed { .. }));
        h.insert("accessid", HeaderValue::from_static("other-app"));
        assert!(matches!(
            c.classify(&h),
            ClientAuth::Unscoped(Unscoped::Signature)
        ));
        h.remove("sign");
        assert!(matches!(
            c.classify(&h),
            ClientAuth::Unscoped(Unscoped::Signature)
        ));
    }

    #[test]
    fn applied_signature_verifies() {
        let c = signed_creds();
        let auth = UpstreamAuth::Sign {
            access_id: Arc::from("app1"),
            secret: Secret::new("k1".into()),
        };
        let mut h = HeaderMap::new();
        auth.apply(&mut h, b"{\"x\":1}");
        let get = |n: &str| h.get(n).unwrap().to_str().unwrap().to_owned();
        assert_eq!(
            c.verify("app1", &get("timestamp"), &get("sign"), b"{\"x\":1}"),
            Ok(())
        );
    }

    fn basic(user_secret: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        use base64::Engine as _;
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
        assert!(!format!("{a:?}").contains("key:"));
    }
}
