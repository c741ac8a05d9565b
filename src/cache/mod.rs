//! The cache: one front door ([`Cache`]) over both tiers.
//!
//! - [`local`]: moka in this process (the cache of record for this sidecar: byte budget,
//!   lifetimes, eviction), with the reverse index ([`index`]) that finds what a write can make
//!   wrong, and per-app write epochs;
//! - [`shared`]: in fleet mode, the fleet's tier in Redis, kept consistent with the local one
//!   through generations and the invalidation bus ([`crate::fleet::bus`]);
//!
//! The key ([`key`]) and what an entry holds ([`entry`]) are shared by both tiers. Callers see
//! three things: look up many keys, store what was fetched, invalidate (an app's names, or all
//! of it) from one source. The sequence of an invalidation is written once, here.

pub mod entry;
pub(crate) mod front;
pub mod index;
pub mod key;
pub mod local;
pub(crate) mod metrics;
pub(crate) mod shared;

use std::sync::Arc;
use std::time::Duration;

pub use entry::{Clock, Entry, Lookup, Policy};
pub use key::{CacheKey, KeyPrefix, StoredKey};
pub use local::{weigh, Store, RECORDED_IN_FULL, RECORD_EVERY};
pub(crate) use metrics::CacheMetrics;

use crate::api::answer::Answer;
use crate::fleet::bus::{Bus, Invalidation};
use crate::metrics::labels::InvalidationSource;
use shared::SharedTier;

/// What an invalidation names.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Names<'a> {
    /// A write to these tokens and accounts: their own entries, the entries their elements
    /// list, and the entries that list them (both directions).
    Written {
        tokens: &'a [String],
        accounts: &'a [String],
    },
    /// Exactly the entries of these names (an operator's purge).
    Exactly {
        tokens: &'a [String],
        accounts: &'a [String],
    },
    /// Every entry of the app.
    All,
}

/// What a lookup found for one key, over both tiers.
#[derive(Debug)]
pub(crate) enum Found {
    /// Fresh in this sidecar's cache.
    Fresh(Entry),
    /// Fresh in the fleet's shared tier (now in this sidecar's too, unless a write passed).
    Shared(Entry),
    /// Past its lifetime, within stale-while-revalidate: serve it and refresh in background.
    Revalidate(Entry),
    /// Not usable: fetch it. A stale entry within stale-if-error may stand in if the upstream
    /// cannot answer.
    Miss { stale: Option<Entry> },
}

#[derive(Debug)]
pub(crate) struct Cache {
    local: Store,
    fleet: Option<FleetTier>,
    metrics: CacheMetrics,
}

/// Fleet mode: the shared tier and the bus its invalidations travel on.
#[derive(Debug)]
struct FleetTier {
    shared: SharedTier,
    bus: Bus,
}

impl Cache {
    pub(crate) fn new(local: Store, metrics: CacheMetrics) -> Cache {
        Cache {
            local,
            fleet: None,
            metrics,
        }
    }

    /// Adds the fleet's shared tier (fleet mode). Call [`Cache::start_fleet`] once running.
    pub(crate) fn with_fleet(mut self, shared: SharedTier, bus: Bus) -> Cache {
        self.fleet = Some(FleetTier { shared, bus });
        self
    }

    pub(crate) fn clock(&self) -> &Clock {
        self.local.clock()
    }

    /// The app's write epoch (see [`index::Index::epoch`]).
    pub(crate) fn epoch(&self, app: &Arc<str>) -> u64 {
        self.local.index().epoch(app)
    }

    /// Fleet mode: applies the other sidecars' invalidations, and retries failed generation
    /// moves every second. Runs until the process ends.
    pub(crate) fn start_fleet(self: &Arc<Self>) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let cache = Arc::downgrade(self);
        fleet.bus.subscribe(move |msg| {
            let cache = cache.clone();
            async move {
                if let Some(cache) = cache.upgrade() {
                    cache.apply_remote(msg).await;
                }
            }
        });
        let cache = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(cache) = cache.upgrade() else {
                    return;
                };
                if let Some(fleet) = &cache.fleet {
                    for app in fleet.shared.closed_apps() {
                        cache.reopen(&app).await;
                    }
                }
            }
        });
    }

    /// `f` over this sidecar's entries for the keys with these digests, in order, when every
    /// one is fresh here (the usual request once the cache is warm), read in place under the
    /// read map's locks (see [`Store::with_all_fresh`]: `f` must only read them). `None` when
    /// one is missing or not fresh: then [`Cache::lookup`] looks them up again.
    pub(crate) fn with_all_fresh<R>(
        &self,
        digests: &[u128],
        f: impl FnOnce(&[&Entry]) -> R,
    ) -> Option<R> {
        self.local
            .with_all_fresh(digests, self.local.clock().now(), f)
    }

    /// Looks the keys with these digests (all of `app`, for a credential the upstream
    /// accepted) up in this sidecar, then what is missing in the shared tier (one round trip).
    /// A shared value is promoted into this sidecar's cache unless a write to the app passed
    /// meanwhile. `key_of(i)` builds the `i`th key, only for what the shared tier is asked.
    pub(crate) async fn lookup(
        &self,
        app: &Arc<str>,
        digests: &[u128],
        key_of: impl Fn(usize) -> CacheKey,
    ) -> Vec<Found> {
        let epoch = self.epoch(app);
        let now = self.local.clock().now();
        let mut found: Vec<Found> = self
            .local
            .read_many(digests, now)
            .into_iter()
            .map(|l| match l {
                Lookup::Fresh(e) => Found::Fresh(e),
                Lookup::Revalidate(e) => Found::Revalidate(e),
                Lookup::StaleIfError(e) => Found::Miss { stale: Some(e) },
                Lookup::Miss => Found::Miss { stale: None },
            })
            .collect();
        let Some(fleet) = &self.fleet else {
            return found;
        };
        let wanted: Vec<usize> = (0..digests.len())
            .filter(|&i| matches!(found[i], Found::Miss { .. }))
            .collect();
        if wanted.is_empty() || !self.shared_usable(app).await {
            return found;
        }
        let asked: Vec<CacheKey> = wanted.iter().map(|&i| key_of(i)).collect();
        if let Some(hits) = fleet.shared.lookup(app, &asked).await {
            for ((&i, key), hit) in wanted.iter().zip(asked).zip(hits) {
                if let Some((answer, fresh_for)) = hit {
                    let (entry, _) = self
                        .local
                        .put_fresh_for_since(key, answer, fresh_for, epoch)
                        .await;
                    found[i] = Found::Shared(entry);
                }
            }
        }
        found
    }

    /// Values of `keys` that another sidecar is fetching, once they appear in the shared tier:
    /// promoted as in [`Cache::lookup`] (if no write passed since `epoch`). `None` when the
    /// shared tier cannot be used.
    pub(crate) async fn shared_values(
        &self,
        app: &Arc<str>,
        keys: &[CacheKey],
        epoch: u64,
    ) -> Option<Vec<Option<Entry>>> {
        let fleet = self.fleet.as_ref()?;
        if !self.shared_usable(app).await {
            return None;
        }
        let hits = fleet.shared.lookup(app, keys).await?;
        let mut out = Vec::with_capacity(keys.len());
        for (key, hit) in keys.iter().zip(hits) {
            out.push(match hit {
                Some((answer, fresh_for)) => Some(
                    self.local
                        .put_fresh_for_since(key.clone(), answer, fresh_for, epoch)
                        .await
                        .0,
                ),
                None => None,
            });
        }
        Some(out)
    }

    /// Stores a fetched answer unless a write to its app happened since `epoch` (the answer
    /// may predate it). Returns the entry either way (the caller answers with it) and whether
    /// it was stored.
    pub(crate) async fn store(&self, key: CacheKey, answer: Answer, epoch: u64) -> (Entry, bool) {
        let (entry, discarded) = self.local.put_since(key, answer, epoch).await;
        (entry, !discarded)
    }

    /// Fleet mode: the app's generation, read before a fetch; what the fetch brings back is
    /// shared only under it. `None` without the shared tier or while it cannot be used.
    pub(crate) async fn generation(&self, app: &Arc<str>) -> Option<u64> {
        let fleet = self.fleet.as_ref()?;
        if !self.shared_usable(app).await {
            return None;
        }
        fleet.shared.generation(app).await
    }

    /// Fleet mode: writes fetched entries to the shared tier under `generation`.
    pub(crate) async fn share(&self, generation: u64, entries: &[(CacheKey, Entry)]) {
        if let Some(fleet) = &self.fleet {
            fleet
                .shared
                .write(generation, entries, self.local.keep_after_fresh())
                .await;
        }
    }

    /// Drops what `names` make wrong for `app`, here and (in fleet mode) in the whole fleet.
    /// Returns the keys it dropped and how many were present.
    ///
    /// The order matters: the app's write epoch moves first (fetches in flight will not store
    /// what they bring back), then the fleet's generation moves (older shared values stop being
    /// used everywhere) and the invalidation is published, then local entries go, and the epoch
    /// moves again (an answer memoized in between is not valid either). A generation that
    /// cannot be moved closes the app's shared values here until it can.
    pub(crate) async fn invalidate(
        &self,
        app: &Arc<str>,
        names: Names<'_>,
        source: InvalidationSource,
    ) -> (Vec<StoredKey>, usize) {
        let write = self.local.begin_write(app);
        if let Some(fleet) = &self.fleet {
            let (tokens, accounts, all) = match names {
                Names::Written { tokens, accounts } | Names::Exactly { tokens, accounts } => {
                    (tokens.to_vec(), accounts.to_vec(), false)
                }
                Names::All => (Vec::new(), Vec::new(), true),
            };
            let bumped = fleet.shared.bump(app).await;
            let msg = Invalidation {
                origin: fleet.bus.origin(),
                app: app.to_string(),
                tokens,
                accounts,
                all,
                bumped,
            };
            let published = fleet.bus.publish(&msg).await;
            if !bumped || !published {
                tracing::warn!("fleet mode: an invalidation did not reach Redis; shared values of its app are not used until it does");
                fleet.shared.close(msg);
            }
        }
        let (keys, dropped) = self.drop_local(app, names).await;
        drop(write);
        self.metrics.invalidated.inc_by(source, dropped as u64);
        (keys, dropped)
    }

    async fn drop_local(&self, app: &Arc<str>, names: Names<'_>) -> (Vec<StoredKey>, usize) {
        match names {
            Names::All => {
                let keys = self.local.purge_app(app).await;
                let n = keys.len();
                (keys, n)
            }
            Names::Written { tokens, accounts } => {
                let keys = self.local.affected(app, tokens, accounts).await;
                let n = self.local.invalidate(&keys).await;
                (keys, n)
            }
            Names::Exactly { tokens, accounts } => {
                let keys = self.local.named(app, tokens, accounts);
                let n = self.local.invalidate(&keys).await;
                (keys, n)
            }
        }
    }

    /// Another sidecar's invalidation.
    async fn apply_remote(&self, msg: Invalidation) {
        let app: Arc<str> = Arc::from(msg.app.as_str());
        if let (false, Some(fleet)) = (msg.bumped, &self.fleet) {
            // Its sender could not move the generation: shared values of the app may predate
            // the write. Closed here too, until a move succeeds.
            fleet.shared.close(msg.clone());
        }
        let names = if msg.all {
            Names::All
        } else {
            Names::Written {
                tokens: &msg.tokens,
                accounts: &msg.accounts,
            }
        };
        let write = self.local.begin_write(&app);
        let (_, dropped) = self.drop_local(&app, names).await;
        drop(write);
        self.metrics
            .invalidated
            .inc_by(InvalidationSource::Fleet, dropped as u64);
    }

    /// Whether shared values of `app` may be used; a closed app is retried first.
    async fn shared_usable(&self, app: &str) -> bool {
        match &self.fleet {
            Some(fleet) if fleet.shared.is_closed(app) => self.reopen(app).await,
            Some(_) => true,
            None => false,
        }
    }

    /// Retries a closed app's generation move (and its publication); reopens it on success.
    async fn reopen(&self, app: &str) -> bool {
        let Some(fleet) = &self.fleet else {
            return false;
        };
        let Some(waiting) = fleet.shared.waiting(app) else {
            return !fleet.shared.is_closed(app);
        };
        if !fleet.shared.bump(app).await {
            return false;
        }
        let msg = Invalidation {
            origin: fleet.bus.origin(),
            bumped: true,
            ..waiting
        };
        if !fleet.bus.publish(&msg).await {
            return false;
        }
        fleet.shared.reopen(app);
        !fleet.shared.is_closed(app)
    }

    /// Lets moka apply pending work and sets the size gauges (at each scrape).
    pub(crate) async fn refresh_gauges(&self) {
        self.local.sync().await;
        self.metrics
            .entries
            .set(i64::try_from(self.local.entry_count()).unwrap_or(i64::MAX));
        self.metrics
            .weighted_bytes
            .set(i64::try_from(self.local.weighted_bytes()).unwrap_or(i64::MAX));
    }
}
