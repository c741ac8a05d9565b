//! What is cached, by name: for each app, which cache keys carry a given account or token, and
//! which names of the other kind each one was last seen bound to (from the cached elements, in
//! both directions). A write through the proxy uses it to find every entry the write can make
//! wrong, including accounts that were bound to a token before an overwrite or a remove-all.
//!
//! Bounded by the cache itself: entries are added when moka stores an entry and removed by its
//! eviction listener (expiry, size, explicit removal, replacement), with counts so that a
//! replacement's add and remove cancel out in either order.
//!
//! It also keeps a per-app write epoch: a fetch that started before a write to its app must not
//! store its (possibly old) answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::{CacheKey, Entry};
use crate::api::query::Ident;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Account,
    Token,
}

impl Kind {
    fn other(self) -> Kind {
        match self {
            Kind::Account => Kind::Token,
            Kind::Token => Kind::Account,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct NameKey {
    access_id: Arc<str>,
    kind: Kind,
    name: Box<str>,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<NameKey, HashMap<CacheKey, u32>>,
    related: HashMap<NameKey, HashMap<Box<str>, u32>>,
    epochs: HashMap<Arc<str>, u64>,
}

/// Most apps whose write epoch is remembered; past it the map is reset, which only makes
/// in-flight fetches of every app discard their answers once (conservative).
const MAX_EPOCH_APPS: usize = 100_000;

#[derive(Debug, Default)]
pub struct Index {
    inner: Mutex<Inner>,
    next_epoch: AtomicU64,
}

#[derive(Deserialize)]
struct AccountElement {
    #[serde(default)]
    token_list: Vec<String>,
}

#[derive(Deserialize)]
struct TokenElement {
    #[serde(default)]
    account_list: Vec<BoundAccount>,
}

#[derive(Deserialize)]
struct BoundAccount {
    account: String,
}

fn kind_and_name(ident: &Ident) -> (Kind, &str) {
    match ident {
        Ident::Account { account, .. } => (Kind::Account, account),
        Ident::Token(t) => (Kind::Token, t),
    }
}

/// The names of the other kind an entry's element binds its identifier to.
fn bound_names(kind: Kind, entry: &Entry) -> Vec<String> {
    let Some(el) = &entry.answer.element else {
        return Vec::new();
    };
    match kind {
        Kind::Account => serde_json::from_str::<AccountElement>(el.get())
            .map(|e| e.token_list)
            .unwrap_or_default(),
        Kind::Token => serde_json::from_str::<TokenElement>(el.get())
            .map(|e| e.account_list.into_iter().map(|a| a.account).collect())
            .unwrap_or_default(),
    }
}

fn bump<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, k: K) {
    *map.entry(k).or_insert(0) += 1;
}

fn drop_one<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, k: &K) {
    if let Some(n) = map.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            map.remove(k);
        }
    }
}

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The relations an entry contributes: (name key of the entry, [(name key, related name)]).
    fn relations(key: &CacheKey, entry: &Entry) -> (NameKey, Vec<(NameKey, Box<str>)>) {
        let (kind, name) = kind_and_name(&key.ident);
        let own = NameKey {
            access_id: key.access_id.clone(),
            kind,
            name: name.into(),
        };
        let mut rel = Vec::new();
        for other in bound_names(kind, entry) {
            rel.push((own.clone(), other.as_str().into()));
            rel.push((
                NameKey {
                    access_id: key.access_id.clone(),
                    kind: kind.other(),
                    name: other.into_boxed_str(),
                },
                name.into(),
            ));
        }
        (own, rel)
    }

    pub fn add(&self, key: &CacheKey, entry: &Entry) {
        let (own, rel) = Self::relations(key, entry);
        let mut inner = self.lock();
        bump(inner.keys.entry(own).or_default(), key.clone());
        for (k, name) in rel {
            bump(inner.related.entry(k).or_default(), name);
        }
    }

    pub fn remove(&self, key: &CacheKey, entry: &Entry) {
        let (own, rel) = Self::relations(key, entry);
        let mut inner = self.lock();
        if let Some(m) = inner.keys.get_mut(&own) {
            drop_one(m, key);
            if m.is_empty() {
                inner.keys.remove(&own);
            }
        }
        for (k, name) in rel {
            if let Some(m) = inner.related.get_mut(&k) {
                drop_one(m, &name);
                if m.is_empty() {
                    inner.related.remove(&k);
                }
            }
        }
    }

    /// Every cache key of `access_id` that an identifier named in `tokens`/`accounts` can have,
    /// plus those of the names they are (as far as the cache knows) bound to.
    pub fn affected(
        &self,
        access_id: &Arc<str>,
        tokens: &[String],
        accounts: &[String],
    ) -> Vec<CacheKey> {
        let inner = self.lock();
        let mut out = Vec::new();
        let mut collect = |kind: Kind, name: &str| {
            let nk = NameKey {
                access_id: access_id.clone(),
                kind,
                name: name.into(),
            };
            if let Some(keys) = inner.keys.get(&nk) {
                out.extend(keys.keys().cloned());
            }
            nk
        };
        let mut related: Vec<(Kind, Box<str>)> = Vec::new();
        let named = tokens
            .iter()
            .map(|t| (Kind::Token, t))
            .chain(accounts.iter().map(|a| (Kind::Account, a)));
        for (kind, name) in named {
            let nk = collect(kind, name);
            if let Some(rel) = inner.related.get(&nk) {
                related.extend(rel.keys().map(|r| (kind.other(), r.clone())));
            }
        }
        for (kind, name) in related {
            collect(kind, &name);
        }
        out.sort_unstable_by(|a, b| a.ident.name().cmp(b.ident.name()));
        out.dedup();
        out
    }

    /// Only the keys carrying exactly these names (no relations): for operator purges.
    pub fn named(
        &self,
        access_id: &Arc<str>,
        tokens: &[String],
        accounts: &[String],
    ) -> Vec<CacheKey> {
        let inner = self.lock();
        let named = tokens
            .iter()
            .map(|t| (Kind::Token, t))
            .chain(accounts.iter().map(|a| (Kind::Account, a)));
        let mut out = Vec::new();
        for (kind, name) in named {
            let nk = NameKey {
                access_id: access_id.clone(),
                kind,
                name: name.as_str().into(),
            };
            if let Some(keys) = inner.keys.get(&nk) {
                out.extend(keys.keys().cloned());
            }
        }
        out
    }

    /// The current write epoch of `access_id`.
    pub fn epoch(&self, access_id: &Arc<str>) -> u64 {
        self.lock().epochs.get(access_id).copied().unwrap_or(0)
    }

    /// Marks a write to `access_id`: fetches that started before it will not store.
    pub fn bump_epoch(&self, access_id: &Arc<str>) {
        let e = self.next_epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let mut inner = self.lock();
        if inner.epochs.len() >= MAX_EPOCH_APPS && !inner.epochs.contains_key(access_id) {
            inner.epochs.clear();
        }
        inner.epochs.insert(access_id.clone(), e);
    }

    /// Number of names indexed (for tests and metrics).
    pub fn len(&self) -> usize {
        let inner = self.lock();
        inner.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
