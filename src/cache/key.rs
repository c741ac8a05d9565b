//! The cache key, and the name it has in the fleet's shared tier.
//!
//! Cache-safety invariant (enforced by [`CacheKey`]'s fields, which are all compared): a key
//! always carries the upstream, the AccessID, every top-level request field other than the list
//! (canonicalized, so `account_type` absent ≠ `0`), and the identifier with every element-level
//! field (the element's own `account_type`, any unknown element fields). `operator_type` is
//! carried by the identifier's variant. Nothing cached for one app can be found under another's.
//! [`CacheKey::shared_name`] must keep the same invariant in Redis, so it sits here.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::api::request::Ident;

/// Everything that can change an identifier's answer. A cheap handle: the cache, the reverse
/// index and in-flight fetches share one allocation per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(Arc<KeyData>);

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct KeyData {
    /// The upstream base URL (access points are isolated from each other).
    pub upstream: Arc<str>,
    /// The app (Basic user / AccessId).
    pub access_id: Arc<str>,
    /// Canonical top-level fields other than `operator_type` and the list (see
    /// [`crate::api::query::QueryRequest::top_scope`]); shared by a whole request.
    pub top_scope: Option<Arc<str>>,
    pub ident: Ident,
}

impl CacheKey {
    pub fn new(
        upstream: Arc<str>,
        access_id: Arc<str>,
        top_scope: Option<Arc<str>>,
        ident: Ident,
    ) -> CacheKey {
        CacheKey(Arc::new(KeyData {
            upstream,
            access_id,
            top_scope,
            ident,
        }))
    }
}

impl std::ops::Deref for CacheKey {
    type Target = KeyData;
    fn deref(&self) -> &KeyData {
        &self.0
    }
}

/// A key's name in the shared tier: the same on every sidecar (plain SHA-256, no process key),
/// so every sidecar finds what another wrote.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SharedName {
    /// The AccessID, hashed (8 bytes, hex).
    pub app: String,
    /// Every other field of the key, hashed (16 bytes, hex).
    pub fields: String,
}

impl CacheKey {
    /// Every field but the upstream (named by the shared tier's key prefix) and the app.
    pub fn shared_name(&self) -> SharedName {
        let mut canon = Vec::with_capacity(64);
        canon.extend_from_slice(self.top_scope.as_deref().unwrap_or("").as_bytes());
        canon.push(0);
        match &self.ident {
            Ident::Account {
                account,
                account_type,
                extra,
            } => {
                canon.extend_from_slice(b"a\0");
                canon.extend_from_slice(account.as_bytes());
                canon.push(0);
                canon.extend_from_slice(format!("{account_type:?}").as_bytes());
                canon.push(0);
                canon.extend_from_slice(extra.as_deref().unwrap_or("").as_bytes());
            }
            Ident::Token(t) => {
                canon.extend_from_slice(b"t\0");
                canon.extend_from_slice(t.as_bytes());
            }
        }
        SharedName {
            app: app_name(&self.access_id),
            fields: tpns_wire::hex(&Sha256::digest(&canon)[..16]),
        }
    }
}

impl SharedName {
    /// `<app>:<fields>`: the key's name in Redis keys (under a prefix naming what it is for).
    pub(crate) fn joined(&self) -> String {
        format!("{}:{}", self.app, self.fields)
    }
}

/// An AccessID's name in the shared tier.
pub fn app_name(access_id: &str) -> String {
    tpns_wire::hex(&Sha256::digest(access_id.as_bytes())[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(app: &str, ident: Ident, scope: Option<&str>) -> CacheKey {
        CacheKey::new(
            Arc::from("http://u"),
            Arc::from(app),
            scope.map(Arc::from),
            ident,
        )
    }

    /// Two keys that differ in any compared field have different shared names.
    #[test]
    fn shared_names_keep_the_key_invariant() {
        let acct = |t: Option<i64>, extra: Option<&str>| Ident::Account {
            account: "a".into(),
            account_type: t,
            extra: extra.map(Into::into),
        };
        let keys = [
            key("app", Ident::Token("a".into()), None),
            key("app2", Ident::Token("a".into()), None),
            key(
                "app",
                Ident::Token("a".into()),
                Some("{\"account_type\":0}"),
            ),
            key("app", acct(None, None), None),
            key("app", acct(Some(0), None), None),
            key("app", acct(Some(1), None), None),
            key("app", acct(None, Some("{\"k\":1}")), None),
        ];
        let names: std::collections::HashSet<SharedName> =
            keys.iter().map(CacheKey::shared_name).collect();
        assert_eq!(names.len(), keys.len());
        assert_eq!(keys[0].shared_name(), keys[0].clone().shared_name());
    }
}
