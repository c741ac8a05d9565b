//! The cache key, and the name it has in the fleet's shared tier.
//!
//! Cache-safety invariant (enforced by [`CacheKey`]'s digest, which is all that is compared): a
//! key always covers the upstream, the AccessID, every top-level request field other than the list
//! (canonicalized, so `account_type` absent ≠ `0`), and the identifier with every element-level
//! field (the element's own `account_type`, any unknown element fields). `operator_type` is
//! carried by the identifier's variant. Nothing cached for one app can be found under another's.
//! [`CacheKey::shared_name`] must keep the same invariant in Redis, so it sits here.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::api::request::Ident;

/// Everything that can change an identifier's answer, for as long as a request or a fetch needs
/// it. A cheap handle: a fetch's batches and waiters share one allocation per key. What the
/// store keeps once the answer is cached is a [`StoredKey`].
///
/// Keys are compared and hashed by [`KeyData::digest`] alone: a keyed 128-bit SipHash-1-3 over
/// an unambiguous (length-prefixed) encoding of every field, under a key drawn at random by each
/// process and never shown. SipHash is a pseudo-random function: without the key, a client
/// cannot choose two inputs that collide, and by chance two distinct keys among `n` collide
/// with probability about `n² / 2¹²⁹` (below 10⁻²¹ for a billion keys over a process's whole
/// life). That is the same bound every content-addressed store relies on, and it lets every
/// map of stored keys (the read map, moka, the reverse index) compare 16 bytes held in its own
/// slot instead of following pointers to compare strings. The fields are kept beside the
/// digest for what needs them: the upstream call and the shared tier's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(Arc<KeyData>);

#[derive(Debug)]
pub struct KeyData {
    /// Keyed digest of every field below and of the upstream base URL (access points are
    /// isolated from each other; see [`CacheKey`]). The upstream itself is not kept: it is the
    /// process's one configured upstream, which nothing reads back from a key (the shared tier
    /// names it by its key prefix), and leaving it out makes a key's block 112 bytes, not 128.
    pub digest: u128,
    /// The app (Basic user / AccessId).
    pub access_id: Arc<str>,
    /// Canonical top-level fields other than `operator_type` and the list (see
    /// [`crate::api::request::QueryRequest::top_scope`]); shared by a whole request.
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
        let prefix = KeyPrefix::new(&upstream, access_id, top_scope);
        prefix.key_with_digest(prefix.digest(&ident), ident)
    }

    /// The keyed digest (what every map of keys hashes).
    pub fn digest(&self) -> u128 {
        self.0.digest
    }
}

impl PartialEq for KeyData {
    fn eq(&self, other: &KeyData) -> bool {
        self.digest == other.digest
    }
}

impl Eq for KeyData {}

impl std::hash::Hash for KeyData {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(self.digest);
    }
}

/// Which way an identifier asks: an account (for its tokens) or a token (for its accounts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Account,
    Token,
}

impl Kind {
    pub fn other(self) -> Kind {
        match self {
            Kind::Account => Kind::Token,
            Kind::Token => Kind::Account,
        }
    }
}

/// An identifier's kind and name.
pub fn kind_and_name(ident: &Ident) -> (Kind, &str) {
    match ident {
        Ident::Account { account, .. } => (Kind::Account, account),
        Ident::Token(t) => (Kind::Token, t),
    }
}

/// What the store keeps of a key once its answer is cached (moka's key, the reverse index's
/// entries): the digest, which is all that maps of stored keys compare, plus what invalidation,
/// moka's eviction listener and the admin's purge report read back: the app's tag (see
/// [`crate::cache::index::Index::app_tag`]), and the identifier's kind and name.
///
/// The other fields of a [`CacheKey`] (the top-level scope, the element's `account_type` and
/// unknown fields) only tell variants of one name apart, which the digest already does, so they
/// are not kept: one allocation of 48 bytes plus the name (64 for names up to 16 bytes) instead
/// of a [`KeyData`] block (112) and the name's own allocation. A stored key pins nothing
/// else, so a client cannot make an entry hold a large top-level field either.
#[derive(Clone)]
pub struct StoredKey(triomphe::ThinArc<StoredHead, u8>);

/// The fixed part of a [`StoredKey`]: 32 bytes, 48 with the block's count and the name's
/// length (the digest as two words, so the block is 8-aligned and has no padding).
struct StoredHead {
    digest: KeyDigest,
    app: u64,
    kind: Kind,
}

/// A key's digest as two words: what moka is probed with for a [`StoredKey`] (a `u128` would
/// make the block 16-aligned, and 16 bytes larger). Hashes as the `u128` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest([u64; 2]);

impl KeyDigest {
    pub fn of(digest: u128) -> KeyDigest {
        KeyDigest([digest as u64, (digest >> 64) as u64])
    }

    pub fn get(self) -> u128 {
        let [lo, hi] = self.0;
        u128::from(lo) | u128::from(hi) << 64
    }
}

impl std::hash::Hash for KeyDigest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(self.get());
    }
}

impl std::borrow::Borrow<KeyDigest> for StoredKey {
    fn borrow(&self) -> &KeyDigest {
        &self.head().digest
    }
}

/// Bytes of a stored key's block before its name: the count, the head, the name's length (as
/// [`crate::cache::entry::ENTRY_FIXED_BYTES`] counts an entry's).
pub const STORED_KEY_FIXED_BYTES: usize = 8 + std::mem::size_of::<StoredHead>() + 8;

impl StoredKey {
    /// What the store keeps of `key`, whose app's tag is `app`.
    pub fn new(key: &CacheKey, app: u64) -> StoredKey {
        let (kind, name) = kind_and_name(&key.ident);
        let head = StoredHead {
            digest: KeyDigest::of(key.digest()),
            app,
            kind,
        };
        StoredKey(triomphe::ThinArc::from_header_and_slice(
            head,
            name.as_bytes(),
        ))
    }

    fn head(&self) -> &StoredHead {
        &self.0.header.header
    }

    pub fn digest(&self) -> u128 {
        self.head().digest.get()
    }

    /// The tag of the key's app.
    pub fn app(&self) -> u64 {
        self.head().app
    }

    pub fn kind(&self) -> Kind {
        self.head().kind
    }

    /// The identifier's name (the account or the token).
    pub fn name(&self) -> &str {
        // Copied from a `str` in `new`, so always UTF-8.
        std::str::from_utf8(&self.0.slice).unwrap_or_default()
    }

    /// Heap bytes the name adds to the block (for the weigher).
    pub fn name_bytes(&self) -> usize {
        self.0.slice.len()
    }
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("kind", &self.kind())
            .field("name", &self.name())
            .finish_non_exhaustive()
    }
}

/// Compared and hashed by digest alone, as [`CacheKey`] is, so moka and the index can be probed
/// with a digest.
impl PartialEq for StoredKey {
    fn eq(&self, other: &StoredKey) -> bool {
        self.head().digest == other.head().digest
    }
}

impl Eq for StoredKey {}

impl std::hash::Hash for StoredKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(self.digest());
    }
}

/// A stored key is the key its digest names.
impl PartialEq<CacheKey> for StoredKey {
    fn eq(&self, other: &CacheKey) -> bool {
        self.digest() == other.digest()
    }
}

/// The process's digest key: random, so digests differ between processes (never stored or
/// sent anywhere; the shared tier names keys with [`CacheKey::shared_name`]).
fn digest_key() -> &'static (u64, u64) {
    static KEY: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let mut k = [0u8; 16];
        if getrandom::fill(&mut k).is_err() {
            // No OS randomness: still unpredictable enough to a client for a cache key.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            k = (t ^ (std::process::id() as u128) << 64).to_le_bytes();
        }
        let (a, b) = k.split_at(8);
        (
            u64::from_le_bytes(a.try_into().unwrap_or_default()),
            u64::from_le_bytes(b.try_into().unwrap_or_default()),
        )
    })
}

/// What the keys of one request share (app, top-level scope; the upstream is hashed, not
/// kept), with the digest's state after those fields, so each identifier's digest only hashes
/// the identifier.
#[derive(Clone)]
pub struct KeyPrefix {
    access_id: Arc<str>,
    top_scope: Option<Arc<str>>,
    hasher: siphasher::sip128::SipHasher13,
}

impl std::fmt::Debug for KeyPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPrefix")
            .field("access_id", &self.access_id)
            .finish_non_exhaustive()
    }
}

fn field(h: &mut siphasher::sip128::SipHasher13, bytes: &[u8]) {
    use std::hash::Hasher as _;
    h.write_usize(bytes.len());
    h.write(bytes);
}

impl KeyPrefix {
    pub fn new(upstream: &str, access_id: Arc<str>, top_scope: Option<Arc<str>>) -> KeyPrefix {
        use std::hash::Hasher as _;
        let (k0, k1) = *digest_key();
        // Length-prefixed fields, so no two different keys feed the same bytes.
        let mut hasher = siphasher::sip128::SipHasher13::new_with_keys(k0, k1);
        field(&mut hasher, upstream.as_bytes());
        field(&mut hasher, access_id.as_bytes());
        match &top_scope {
            Some(s) => field(&mut hasher, s.as_bytes()),
            None => hasher.write_u8(0xff),
        }
        KeyPrefix {
            access_id,
            top_scope,
            hasher,
        }
    }

    /// The digest of the key `ident` has under this prefix, without building the key (a
    /// lookup needs no more: see [`CacheKey`]).
    pub fn digest<S: std::ops::Deref<Target = str>>(&self, ident: &Ident<S>) -> u128 {
        digest(self.hasher, ident)
    }

    /// The key of `ident`, whose digest under this prefix is `digest` (from
    /// [`KeyPrefix::digest`]: not computed again).
    pub fn key_with_digest(&self, digest: u128, ident: Ident) -> CacheKey {
        debug_assert_eq!(digest, self.digest(&ident));
        CacheKey(Arc::new(KeyData {
            digest,
            access_id: self.access_id.clone(),
            top_scope: self.top_scope.clone(),
            ident,
        }))
    }
}

/// A token's fields: the bytes of `write_u8(b't')` then `field(name)`, given to SipHash in
/// one write when they fit a small buffer (the usual token). SipHash reads one byte stream
/// however the writes cut it, so the digest is the same either way (unit test); one call
/// costs less than three, on every identifier of every request.
fn token_fields(h: &mut siphasher::sip128::SipHasher13, name: &[u8]) {
    use std::hash::Hasher as _;
    const LEN: usize = std::mem::size_of::<usize>();
    let mut buf = [0u8; 64];
    match buf.get_mut(..1 + LEN + name.len()) {
        Some(out) => {
            out[0] = b't';
            out[1..1 + LEN].copy_from_slice(&name.len().to_le_bytes());
            out[1 + LEN..].copy_from_slice(name);
            h.write(out);
        }
        None => {
            h.write_u8(b't');
            field(h, name);
        }
    }
}

/// The digest of a key: the prefix's state, then the identifier's fields.
fn digest<S: std::ops::Deref<Target = str>>(
    mut h: siphasher::sip128::SipHasher13,
    ident: &Ident<S>,
) -> u128 {
    use std::hash::Hasher as _;
    match ident {
        Ident::Token(t) => token_fields(&mut h, t.as_bytes()),
        Ident::Account {
            account,
            account_type,
            extra,
        } => {
            h.write_u8(b'a');
            field(&mut h, account.as_bytes());
            match account_type {
                Some(t) => {
                    h.write_u8(1);
                    h.write_i64(*t);
                }
                None => h.write_u8(0),
            }
            match extra {
                Some(e) => {
                    h.write_u8(1);
                    field(&mut h, e.as_bytes());
                }
                None => h.write_u8(0),
            }
        }
    }
    use siphasher::sip128::Hasher128 as _;
    h.finish128().as_u128()
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

    /// A token's fields written at once give the digest they give written one by one, for
    /// names that fit the buffer, that just fit, and that do not.
    #[test]
    fn token_fields_at_once_are_the_fields_one_by_one() {
        use siphasher::sip128::Hasher128 as _;
        use std::hash::Hasher as _;
        for len in 0..=80 {
            let name: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            let start = siphasher::sip128::SipHasher13::new_with_keys(7, 11);
            let mut one_by_one = start;
            one_by_one.write_u8(b't');
            field(&mut one_by_one, name.as_bytes());
            let mut at_once = start;
            token_fields(&mut at_once, name.as_bytes());
            assert_eq!(
                at_once.finish128().as_u128(),
                one_by_one.finish128().as_u128(),
                "length {len}"
            );
        }
    }

    fn key(app: &str, ident: Ident, scope: Option<&str>) -> CacheKey {
        CacheKey::new(
            Arc::from("http://u"),
            Arc::from(app),
            scope.map(Arc::from),
            ident,
        )
    }

    fn acct(t: Option<i64>, extra: Option<&str>) -> Ident {
        Ident::Account {
            account: "a".into(),
            account_type: t,
            extra: extra.map(Into::into),
        }
    }

    /// Keys that differ in one field each: app, top-level scope, kind, `account_type` (absent,
    /// 0, 1), unknown element fields.
    fn variants() -> Vec<CacheKey> {
        vec![
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
        ]
    }

    /// A lookup by digest finds exactly what a lookup by key finds: a key hashes as its
    /// digest does, and the digest a prefix computes for a borrowed identifier is the key's.
    #[test]
    fn a_digest_stands_for_its_key() {
        use std::hash::BuildHasher;
        let h = foldhash::fast::RandomState::default();
        for k in variants() {
            assert_eq!(h.hash_one(&k), h.hash_one(k.digest()));
            let prefix = KeyPrefix::new("http://u", k.access_id.clone(), k.top_scope.clone());
            let borrowed: Ident<std::borrow::Cow<'_, str>> = match &k.ident {
                Ident::Token(t) => Ident::Token(std::borrow::Cow::Borrowed(&**t)),
                Ident::Account {
                    account,
                    account_type,
                    extra,
                } => Ident::Account {
                    account: std::borrow::Cow::Borrowed(&**account),
                    account_type: *account_type,
                    extra: extra.clone(),
                },
            };
            assert_eq!(prefix.digest(&borrowed), k.digest());
            assert_eq!(prefix.key_with_digest(k.digest(), k.ident.clone()), k);
        }
        // moka, which holds stored keys, is probed by digest: `a_stored_key_stands_for_its_key`.
    }

    /// What the store keeps of a key stands for it: the same digest, hash and equality (so moka
    /// and the index find it by digest), the kind and name the admin's report lists, the app
    /// tag it was given, in a 48-byte block plus the name.
    #[test]
    fn a_stored_key_stands_for_its_key() {
        use std::hash::BuildHasher;
        const _: () = assert!(std::mem::size_of::<StoredHead>() == 32);
        const _: () = assert!(std::mem::size_of::<StoredKey>() == 8);
        let h = foldhash::fast::RandomState::default();
        let keys = variants();
        let stored: Vec<StoredKey> = keys.iter().map(|k| StoredKey::new(k, 7)).collect();
        let cache: moka::sync::Cache<StoredKey, u8, foldhash::fast::RandomState> =
            moka::sync::Cache::builder().build_with_hasher(Default::default());
        for (i, (k, s)) in keys.iter().zip(&stored).enumerate() {
            assert_eq!(s.digest(), k.digest());
            assert!(*s == *k);
            assert_eq!(h.hash_one(s), h.hash_one(k.digest()));
            assert_eq!(h.hash_one(s), h.hash_one(KeyDigest::of(k.digest())));
            assert_eq!(KeyDigest::of(k.digest()).get(), k.digest());
            let (kind, name) = kind_and_name(&k.ident);
            assert_eq!((s.kind(), s.name(), s.app()), (kind, name, 7));
            assert_eq!(s.name_bytes(), name.len());
            cache.insert(s.clone(), i as u8);
        }
        // Variants of one name are different stored keys.
        let distinct: std::collections::HashSet<&StoredKey> = stored.iter().collect();
        assert_eq!(distinct.len(), stored.len());
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(cache.get(&KeyDigest::of(k.digest())), Some(i as u8));
        }
        assert_eq!(cache.get(&KeyDigest::of(0)), None);
    }

    /// Two keys that differ in any compared field have different shared names.
    #[test]
    fn shared_names_keep_the_key_invariant() {
        let keys = variants();
        let names: std::collections::HashSet<SharedName> =
            keys.iter().map(CacheKey::shared_name).collect();
        assert_eq!(names.len(), keys.len());
        assert_eq!(keys[0].shared_name(), keys[0].clone().shared_name());
    }

    /// Keys that differ in any field differ (by digest, which is all that is compared), keys
    /// built through a shared prefix equal keys built alone, and the upstream is a field.
    #[test]
    fn digests_keep_the_key_invariant() {
        let mut keys = variants();
        keys.extend([
            key("app", Ident::Token("b".into()), None),
            // Field boundaries: "ap" + "pa" is not "app" + "a".
            key("ap", Ident::Token("pa".into()), None),
            CacheKey::new(
                Arc::from("http://v"),
                Arc::from("app"),
                None,
                Ident::Token("a".into()),
            ),
        ]);
        let digests: std::collections::HashSet<u128> = keys.iter().map(CacheKey::digest).collect();
        assert_eq!(digests.len(), keys.len());
        let prefix = KeyPrefix::new("http://u", Arc::from("app"), None);
        let key = |ident: Ident| prefix.key_with_digest(prefix.digest(&ident), ident);
        assert_eq!(key(Ident::Token("a".into())), keys[0]);
        assert_eq!(key(acct(Some(1), None)), keys[5]);
        assert_ne!(key(Ident::Token("b".into())), keys[0]);
    }
}
