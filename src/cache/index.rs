//! What is cached, by name, so a write can find every entry it can make wrong:
//!
//! - `keys`: the hash of (app tag, kind, name) → the stored keys carrying that name (every
//!   `account_type`, top-level field and extra-field variant; see [`StoredKey`]);
//! - `reverse`: (hash of a name, hash of a cached entry's own name) for every name an entry's
//!   element binds it to (an account entry's tokens, a token entry's accounts). The forward
//!   direction (what a cached entry itself lists) is read from the entry when needed.
//!
//! Names are kept as 64-bit keyed hashes, not strings: a collision can only make an
//! invalidation drop more than it must, never less, and the index stays small (tens of bytes
//! per entry). It is bounded by the cache: entries are added when the store inserts and removed
//! by moka's eviction listener (expiry, size, explicit removal, replacement), with counts so
//! a replacement's add and remove cancel out in either order.
//!
//! It also keeps a per-app write epoch: a fetch that started before a write to its app must not
//! store its (possibly old) answer, and a memoized answer read before it is no longer valid.
//! Epochs only grow: every value comes from one global counter, and an app that is not in the
//! (bounded) map reads the map's floor, which moves up past every value handed out whenever
//! the map is cleared. A value once read can never be seen again after a write (no ABA).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use serde::Deserialize;

use super::key::{Kind, StoredKey};
use super::Entry;

/// The keys under one name: almost always exactly one. The rare list is boxed so a slot is two
/// words, not four (with its `u64` name, 24 bytes per table slot instead of 32).
#[derive(Debug)]
enum Slot {
    One(StoredKey),
    #[allow(clippy::box_collection)] // boxed on purpose: see above
    Many(Box<Vec<StoredKey>>),
}

const _: () = assert!(std::mem::size_of::<Slot>() == 16);

impl Slot {
    fn push(&mut self, key: StoredKey) {
        match self {
            Slot::One(k) => *self = Slot::Many(Box::new(vec![k.clone(), key])),
            Slot::Many(v) => v.push(key),
        }
    }
    /// Removes one occurrence; returns whether the slot is now empty.
    fn remove(&mut self, key: &StoredKey) -> bool {
        match self {
            Slot::One(k) => k == key,
            Slot::Many(v) => {
                if let Some(i) = v.iter().position(|k| k == key) {
                    v.swap_remove(i);
                }
                match v.len() {
                    0 => true,
                    1 => {
                        if let Some(last) = v.pop() {
                            *self = Slot::One(last);
                        }
                        false
                    }
                    _ => false,
                }
            }
        }
    }
    fn keys(&self) -> &[StoredKey] {
        match self {
            Slot::One(k) => std::slice::from_ref(k),
            Slot::Many(v) => v,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<u64, Slot>,
    reverse: BTreeMap<(u64, u64), u32>,
    epochs: HashMap<Arc<str>, u64>,
    /// The epoch of every app not in `epochs`.
    epoch_floor: u64,
}

/// Most apps whose write epoch is remembered; past it the map is reset and the floor raised
/// above every epoch handed out, which only makes in-flight fetches and memoized answers of
/// every app invalid once (conservative). The keys are AccessIDs of writes the upstream
/// accepted or of accepted credentials.
const MAX_EPOCH_APPS: usize = 100_000;

/// Approximate bytes the index spends per cached entry (counted by the cache's weigher):
/// one `keys` slot and about one `reverse` pair, with their tables' overhead.
pub const INDEX_BYTES_PER_ENTRY: usize = 80;

#[derive(Debug)]
pub struct Index {
    inner: Mutex<Inner>,
    hasher: RandomState,
    next_epoch: AtomicU64,
    max_epoch_apps: usize,
}

impl Default for Index {
    fn default() -> Self {
        Index::with_max_epoch_apps(MAX_EPOCH_APPS)
    }
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

/// The names of the other kind an entry's element binds its identifier to.
pub fn bound_names(kind: Kind, entry: &Entry) -> Vec<String> {
    let Some(el) = entry.element_str() else {
        return Vec::new();
    };
    match kind {
        Kind::Account => serde_json::from_str::<AccountElement>(el)
            .map(|e| e.token_list)
            .unwrap_or_default(),
        Kind::Token => serde_json::from_str::<TokenElement>(el)
            .map(|e| e.account_list.into_iter().map(|a| a.account).collect())
            .unwrap_or_default(),
    }
}

impl Index {
    /// An index remembering the write epochs of at most `max` apps.
    pub fn with_max_epoch_apps(max: usize) -> Index {
        Index {
            inner: Mutex::new(Inner::default()),
            hasher: RandomState::new(),
            next_epoch: AtomicU64::new(0),
            max_epoch_apps: max.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// The keyed hash of an AccessID: how a [`StoredKey`] names its app. Two apps whose tags
    /// collided would share names here, which, as for names, can only make an invalidation
    /// or a purge drop more than it must (probability about 2⁻⁶⁴ per pair of apps).
    pub fn app_tag(&self, access_id: &str) -> u64 {
        self.hasher.hash_one(access_id)
    }

    /// The keyed hash of a name of `kind` in the app tagged `app` (see [`Index::app_tag`]).
    pub fn name_hash(&self, app: u64, kind: Kind, name: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        app.hash(&mut h);
        kind.hash(&mut h);
        name.hash(&mut h);
        h.finish()
    }

    fn relations(&self, key: &StoredKey, entry: &Entry) -> (u64, Vec<u64>) {
        let kind = key.kind();
        let own = self.name_hash(key.app(), kind, key.name());
        let bound = bound_names(kind, entry)
            .iter()
            .map(|b| self.name_hash(key.app(), kind.other(), b))
            .collect();
        (own, bound)
    }

    pub fn add(&self, key: &StoredKey, entry: &Entry) {
        let (own, bound) = self.relations(key, entry);
        let mut inner = self.lock();
        match inner.keys.get_mut(&own) {
            Some(slot) => slot.push(key.clone()),
            None => {
                inner.keys.insert(own, Slot::One(key.clone()));
            }
        }
        for b in bound {
            *inner.reverse.entry((b, own)).or_insert(0) += 1;
        }
    }

    pub fn remove(&self, key: &StoredKey, entry: &Entry) {
        let (own, bound) = self.relations(key, entry);
        let mut inner = self.lock();
        if inner
            .keys
            .get_mut(&own)
            .is_some_and(|slot| slot.remove(key))
        {
            inner.keys.remove(&own);
        }
        for b in bound {
            if let Some(n) = inner.reverse.get_mut(&(b, own)) {
                *n -= 1;
                if *n == 0 {
                    inner.reverse.remove(&(b, own));
                }
            }
        }
    }

    /// The keys carrying any of these name hashes.
    pub fn keys_for(&self, hashes: &[u64]) -> Vec<StoredKey> {
        let inner = self.lock();
        hashes
            .iter()
            .filter_map(|h| inner.keys.get(h))
            .flat_map(|slot| slot.keys().iter().cloned())
            .collect()
    }

    /// The name hashes of cached entries whose elements list any of these names.
    pub fn listed_by(&self, hashes: &[u64]) -> Vec<u64> {
        let inner = self.lock();
        let mut out = Vec::new();
        for &h in hashes {
            out.extend(
                inner
                    .reverse
                    .range((h, 0)..=(h, u64::MAX))
                    .map(|((_, own), _)| *own),
            );
        }
        out
    }

    /// The current write epoch of `access_id`.
    pub fn epoch(&self, access_id: &Arc<str>) -> u64 {
        let inner = self.lock();
        inner
            .epochs
            .get(access_id)
            .copied()
            .unwrap_or(inner.epoch_floor)
    }

    /// Marks a write to `access_id`: fetches that started before it will not store.
    pub fn bump_epoch(&self, access_id: &Arc<str>) {
        let mut inner = self.lock();
        // Under the lock, so a value handed out is always above the floor it is compared with.
        let e = self.next_epoch.fetch_add(1, Ordering::Relaxed) + 1;
        if inner.epochs.len() >= self.max_epoch_apps && !inner.epochs.contains_key(access_id) {
            inner.epochs.clear();
            // Every app now reads the floor: above every epoch handed out so far.
            inner.epoch_floor = e;
            let e = self.next_epoch.fetch_add(1, Ordering::Relaxed) + 1;
            inner.epochs.insert(access_id.clone(), e);
            return;
        }
        inner.epochs.insert(access_id.clone(), e);
    }

    /// Number of names indexed (for tests).
    pub fn len(&self) -> usize {
        self.lock().keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the epoch map was cleared at 100 000 apps, so epochs returned to 0 and an
    /// in-flight fetch (or a memoized answer) from before a write became valid again (ABA).
    #[test]
    fn epochs_never_go_back_when_the_map_is_cleared() {
        let index = Index::with_max_epoch_apps(3);
        let x: Arc<str> = Arc::from("x");
        let seen = index.epoch(&x);
        index.bump_epoch(&x);
        let after_write = index.epoch(&x);
        assert_ne!(after_write, seen);
        // Writes to other apps overflow the map and clear it.
        for i in 0..10 {
            index.bump_epoch(&Arc::from(format!("other-{i}").as_str()));
        }
        let now = index.epoch(&x);
        assert_ne!(now, seen, "the value read before the write came back");
        assert!(
            now > after_write,
            "epochs only grow: {now} after {after_write}"
        );
        let mut last = 0;
        for i in 0..20 {
            let app: Arc<str> = Arc::from(format!("app-{}", i % 7).as_str());
            index.bump_epoch(&app);
            let e = index.epoch(&app);
            assert!(e > last, "{e} after {last}");
            last = e;
        }
    }
}
