//! Fleet mode over a shared Redis (`redis.url`): one upstream quota for every sidecar.
//!
//! The upstream call limiter runs GCRA in a Lua script against Redis, on Redis's own clock, so
//! N sidecars together respect `shield.calls_per_second`/`shield.burst`. Redis is optional and
//! never in the way: every call has a short timeout (`redis.timeout`); while Redis is slow,
//! down, or not yet reached (the connection is made in the background, start-up never waits
//! for it), each sidecar falls back to a local limiter at `redis.local_share` of the rate, and
//! it recovers on its own when Redis answers again. State shows in metrics and logs.
//!
//! The shared cache tier: identifiers missing in moka are looked up in Redis in one round trip
//! per request (MGET), hits are promoted into moka, and upstream answers are written to Redis off
//! the response path, with their remaining fresh lifetime. Values carry a format version and the
//! app's generation: a write or purge for an app increments its generation in Redis, so every
//! older shared value of that app stops being used at once, on every sidecar; the same write is
//! published on a channel so each sidecar also drops the affected entries from its own moka.
//! Fetch leases across sidecars are not built yet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest, Sha256};

use crate::metrics::Metrics;

/// GCRA: KEYS[1] the bucket; ARGV emission interval (µs per call), burst (calls), cost (calls).
/// Returns 0 when the call may go (and records it), else the microseconds to wait.
const GCRA: &str = r#"
local emission = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission * cost
local allow_at = new_tat - emission * burst
if allow_at > now then
  return allow_at - now
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return 0
"#;

/// Why the fleet limiter gave no permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetDenied {
    /// The fleet's quota has no room within the maximum wait; retry after this.
    Quota(Duration),
    /// Redis did not answer (down, slow, not connected yet): use the local fallback.
    Unavailable,
}

pub struct Fleet {
    client: redis::Client,
    conn: Arc<RwLock<Option<ConnectionManager>>>,
    up: Arc<AtomicBool>,
    timeout: Duration,
    prefix: String,
    tag: String,
    quota_key: String,
    /// (emission interval in µs, burst); `None`: no fleet quota (unlimited rate).
    quota: Option<(u64, u32)>,
    script: redis::Script,
    metrics: Metrics,
    /// Identifies this sidecar's own invalidation messages.
    origin: u64,
}

/// A value of the shared tier (format version 1).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SharedValue {
    v: u8,
    /// The app's generation when the answer was fetched.
    g: u64,
    /// The `result` code.
    c: String,
    /// The element, raw.
    e: Option<Box<serde_json::value::RawValue>>,
    /// End of the fresh period, Unix milliseconds.
    f: u64,
}

/// An invalidation published to every sidecar.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct InvalidationMsg {
    o: u64,
    app: String,
    tokens: Vec<String>,
    accounts: Vec<String>,
    all: bool,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn short_hash(bytes: &[u8], len: usize) -> String {
    Sha256::digest(bytes)[..len]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("up", &self.up.load(Ordering::Relaxed))
            .field("quota_key", &self.quota_key)
            .finish_non_exhaustive()
    }
}

/// A stable (same on every sidecar), short name for an upstream in Redis keys.
pub fn upstream_tag(upstream: &str) -> String {
    let digest = Sha256::digest(upstream.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl Fleet {
    /// Starts connecting in the background; returns at once.
    pub fn start(
        url: &str,
        timeout: Duration,
        prefix: &str,
        upstream: &str,
        calls_per_second: u32,
        burst: u32,
        metrics: Metrics,
    ) -> Result<Option<Fleet>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis.url: {e}"))?;
        let conn: Arc<RwLock<Option<ConnectionManager>>> = Arc::new(RwLock::new(None));
        let up = Arc::new(AtomicBool::new(false));
        {
            let (conn, up, metrics, client) =
                (conn.clone(), up.clone(), metrics.clone(), client.clone());
            tokio::spawn(async move {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Duration::from_secs(1))
                    .set_response_timeout(timeout)
                    .set_number_of_retries(1)
                    .set_max_delay(1000);
                loop {
                    match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                        Ok(m) => {
                            *conn.write().unwrap_or_else(|e| e.into_inner()) = Some(m);
                            up.store(true, Ordering::Relaxed);
                            metrics.redis_up.set(1);
                            tracing::info!("fleet mode: connected to Redis");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "fleet mode: Redis not reachable yet; using the local quota share");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            });
        }
        let mut origin = [0u8; 8];
        getrandom::fill(&mut origin).map_err(|e| e.to_string())?;
        let tag = upstream_tag(upstream);
        Ok(Some(Fleet {
            client,
            conn,
            up,
            timeout,
            prefix: prefix.to_owned(),
            quota_key: format!("{prefix}:v1:quota:{tag}"),
            tag,
            quota: (calls_per_second > 0)
                .then(|| (1_000_000 / u64::from(calls_per_second), burst.max(1))),
            script: redis::Script::new(GCRA),
            metrics,
            origin: u64::from_le_bytes(origin),
        }))
    }

    /// Whether the fleet-wide quota applies (a rate is configured).
    pub fn has_quota(&self) -> bool {
        self.quota.is_some()
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs a command with the timeout; failures mark Redis down.
    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Option<T> {
        let mut conn = self.connection()?;
        match tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => {
                self.mark(true);
                Some(v)
            }
            Ok(Err(e)) => {
                self.metrics.redis_errors.inc();
                tracing::debug!(error = %e, "fleet: Redis error");
                self.mark(false);
                None
            }
            Err(_) => {
                self.metrics.redis_errors.inc();
                self.mark(false);
                None
            }
        }
    }

    fn app_part(app: &str) -> String {
        short_hash(app.as_bytes(), 8)
    }

    fn gen_key(&self, app: &str) -> String {
        format!("{}:v1:g:{}:{}", self.prefix, self.tag, Self::app_part(app))
    }

    fn channel(&self) -> String {
        format!("{}:v1:invalidate", self.prefix)
    }

    /// The Redis key of a cache key: upstream and app hashed, then every field of the key.
    pub fn entry_key(&self, key: &crate::cache::CacheKey) -> String {
        use crate::api::query::Ident;
        let mut canon = Vec::with_capacity(64);
        canon.extend_from_slice(key.top_scope.as_deref().unwrap_or("").as_bytes());
        canon.push(0);
        match &key.ident {
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
        format!(
            "{}:v1:e:{}:{}:{}",
            self.prefix,
            self.tag,
            Self::app_part(&key.access_id),
            short_hash(&canon, 16)
        )
    }

    /// Takes a short lease on each key (SET NX PX): `true` where this sidecar should fetch,
    /// `false` where another sidecar is fetching it right now. `None` when Redis does not answer
    /// (then every key is this sidecar's to fetch).
    pub async fn take_leases(
        &self,
        keys: &[crate::cache::CacheKey],
        lease_for: Duration,
    ) -> Option<Vec<bool>> {
        let mut pipe = redis::pipe();
        let px = u64::try_from(lease_for.as_millis()).unwrap_or(1000).max(1);
        for k in keys {
            pipe.cmd("SET")
                .arg(self.lease_key(k))
                .arg(self.origin)
                .arg("NX")
                .arg("PX")
                .arg(px);
        }
        let mut conn = self.connection()?;
        match tokio::time::timeout(
            self.timeout,
            pipe.query_async::<Vec<Option<String>>>(&mut conn),
        )
        .await
        {
            Ok(Ok(v)) if v.len() == keys.len() => {
                self.mark(true);
                Some(v.into_iter().map(|r| r.is_some()).collect())
            }
            _ => {
                self.metrics.redis_errors.inc();
                self.mark(false);
                None
            }
        }
    }

    /// Gives leases back early (after a failed fetch, so others do not wait for nothing).
    pub async fn release_leases(&self, keys: &[crate::cache::CacheKey]) {
        if keys.is_empty() {
            return;
        }
        let mut cmd = redis::cmd("DEL");
        for k in keys {
            cmd.arg(self.lease_key(k));
        }
        let _: Option<u64> = self.run(cmd).await;
    }

    fn lease_key(&self, key: &crate::cache::CacheKey) -> String {
        self.entry_key(key).replacen(":v1:e:", ":v1:l:", 1)
    }

    /// The app's current generation (`None` when Redis does not answer).
    pub async fn generation(&self, app: &str) -> Option<u64> {
        let v: Option<u64> = self
            .run(redis::cmd("GET").arg(self.gen_key(app)).clone())
            .await?;
        Some(v.unwrap_or(0))
    }

    /// Looks `keys` (all of `app`) up in one round trip. Returns, per key, the answer and its
    /// remaining fresh time, for values of the app's current generation that are still fresh.
    pub async fn lookup(
        &self,
        app: &str,
        keys: &[crate::cache::CacheKey],
    ) -> Option<Vec<Option<(crate::api::query::Answer, Duration)>>> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(self.gen_key(app));
        for k in keys {
            cmd.arg(self.entry_key(k));
        }
        let values: Vec<Option<Vec<u8>>> = self.run(cmd).await?;
        let mut values = values.into_iter();
        let gen: u64 = values
            .next()
            .flatten()
            .and_then(|g| std::str::from_utf8(&g).ok()?.parse().ok())
            .unwrap_or(0);
        let now = unix_ms();
        Some(
            values
                .map(|v| {
                    let sv: SharedValue = serde_json::from_slice(&v?).ok()?;
                    if sv.v != 1 || sv.g != gen || sv.f <= now {
                        return None;
                    }
                    let code = crate::api::query::ElementCode::parse(&sv.c)?;
                    Some((
                        crate::api::query::Answer {
                            code,
                            element: sv.e,
                        },
                        Duration::from_millis(sv.f - now),
                    ))
                })
                .collect(),
        )
    }

    /// Writes fetched entries (fetched under generation `gen`) off the response path.
    pub fn write_behind(
        self: &Arc<Self>,
        gen: u64,
        entries: Vec<(crate::cache::CacheKey, Arc<crate::cache::Entry>)>,
        keep_after_fresh: Duration,
    ) {
        if entries.is_empty() {
            return;
        }
        let fleet = self.clone();
        tokio::spawn(async move {
            let now = tokio::time::Instant::now();
            let now_ms = unix_ms();
            let mut pipe = redis::pipe();
            let mut n = 0;
            for (key, entry) in entries {
                let fresh = entry.fresh_until.saturating_duration_since(now);
                if fresh.is_zero() {
                    continue;
                }
                let value = SharedValue {
                    v: 1,
                    g: gen,
                    c: entry.answer.code.as_str().to_owned(),
                    e: entry.answer.element.clone(),
                    f: now_ms + u64::try_from(fresh.as_millis()).unwrap_or(u64::MAX / 2),
                };
                let Ok(bytes) = serde_json::to_vec(&value) else {
                    continue;
                };
                let px = u64::try_from((fresh + keep_after_fresh).as_millis())
                    .unwrap_or(u64::MAX / 2)
                    .max(1);
                pipe.cmd("SET")
                    .arg(fleet.entry_key(&key))
                    .arg(bytes)
                    .arg("PX")
                    .arg(px)
                    .ignore();
                n += 1;
            }
            if n == 0 {
                return;
            }
            let Some(mut conn) = fleet.connection() else {
                return;
            };
            match tokio::time::timeout(fleet.timeout * 4, pipe.query_async::<()>(&mut conn)).await {
                Ok(Ok(())) => fleet.metrics.redis_writes.inc_by(n),
                _ => {
                    fleet.metrics.redis_errors.inc();
                    fleet.mark(false);
                }
            }
        });
    }

    /// A write or purge for `app`: its shared values stop being used (generation + 1), and every
    /// sidecar drops the affected entries from its moka.
    pub async fn invalidate(&self, app: &str, tokens: &[String], accounts: &[String], all: bool) {
        let _: Option<u64> = self
            .run(redis::cmd("INCR").arg(self.gen_key(app)).clone())
            .await;
        let msg = InvalidationMsg {
            o: self.origin,
            app: app.to_owned(),
            tokens: tokens.to_vec(),
            accounts: accounts.to_vec(),
            all,
        };
        if let Ok(payload) = serde_json::to_string(&msg) {
            let _: Option<u64> = self
                .run(
                    redis::cmd("PUBLISH")
                        .arg(self.channel())
                        .arg(payload)
                        .clone(),
                )
                .await;
        }
    }

    /// Receives other sidecars' invalidations and applies them to `store` (reconnecting on its
    /// own). Runs until the process ends.
    pub fn subscribe(self: &Arc<Self>, store: crate::cache::Store) {
        let fleet = self.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            loop {
                let pubsub = match fleet.client.get_async_pubsub().await {
                    Ok(mut p) => match p.subscribe(fleet.channel()).await {
                        Ok(()) => Some(p),
                        Err(_) => None,
                    },
                    Err(_) => None,
                };
                let Some(mut pubsub) = pubsub else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                let mut stream = pubsub.on_message();
                while let Some(msg) = stream.next().await {
                    let Ok(m) = serde_json::from_slice::<InvalidationMsg>(msg.get_payload_bytes())
                    else {
                        continue;
                    };
                    if m.o == fleet.origin {
                        continue;
                    }
                    let app: Arc<str> = Arc::from(m.app.as_str());
                    store.index().bump_epoch(&app);
                    let dropped = if m.all {
                        store.purge_app(&m.app).await.len()
                    } else {
                        let keys = store.affected(&app, &m.tokens, &m.accounts).await;
                        store.invalidate(&keys).await
                    };
                    fleet
                        .metrics
                        .invalidated
                        .with_label_values(&["fleet"])
                        .inc_by(dropped as u64);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn mark(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            self.metrics.redis_up.set(i64::from(up));
            if up {
                tracing::info!("fleet mode: Redis answers again; fleet quota back in force");
            } else {
                tracing::warn!(
                    "fleet mode: Redis unavailable; falling back to the local quota share"
                );
            }
        }
    }

    /// One GCRA step: `Ok(None)` granted, `Ok(Some(wait))` not yet.
    async fn try_once(&self) -> Result<Option<Duration>, ()> {
        let Some((emission_us, burst)) = self.quota else {
            return Ok(None);
        };
        let Some(mut conn) = self.connection() else {
            return Err(());
        };
        let mut inv = self.script.key(&self.quota_key);
        inv.arg(emission_us).arg(burst).arg(1);
        match tokio::time::timeout(self.timeout, inv.invoke_async::<u64>(&mut conn)).await {
            Ok(Ok(0)) => Ok(None),
            Ok(Ok(us)) => Ok(Some(Duration::from_micros(us))),
            Ok(Err(e)) => {
                self.metrics.redis_errors.inc();
                tracing::debug!(error = %e, "fleet limiter: Redis error");
                Err(())
            }
            Err(_) => {
                self.metrics.redis_errors.inc();
                Err(())
            }
        }
    }

    /// A permit for one upstream call from the fleet-wide quota, waiting at most `max_wait`.
    pub async fn acquire(&self, max_wait: Duration) -> Result<Duration, FleetDenied> {
        let started = tokio::time::Instant::now();
        loop {
            match self.try_once().await {
                Err(()) => {
                    self.mark(false);
                    return Err(FleetDenied::Unavailable);
                }
                Ok(None) => {
                    self.mark(true);
                    return Ok(started.elapsed());
                }
                Ok(Some(wait)) => {
                    self.mark(true);
                    if started.elapsed() + wait > max_wait {
                        return Err(FleetDenied::Quota(wait));
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}
