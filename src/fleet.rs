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
//!
//! Generations only grow: a bump sets `max(old + 1, Redis TIME in µs)`, and a missing key (never
//! written, or evicted under `maxmemory`) is created at Redis's current time, above every value
//! handed out before. So a value stamped with an old generation can never become current again.
//! When a bump fails, this sidecar fails closed: it uses no shared value of that app until a
//! retried bump succeeds (a background task retries every second, and lookups retry first).
//!
//! Fetch leases: before fetching, a sidecar takes a short lease per identifier (`SET NX PX`
//! with a token of its own); others wait for the value in the shared tier instead of fetching
//! too. Leases are released with compare-and-delete (only your own), after the fetched answers
//! are written, or at once when a fetch fails or writes nothing.

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

/// Reads an app's generation, creating it at Redis's current time (µs) when it is missing.
/// Returns it as a string; a value that is not a number is an error (fail closed).
const GEN_READ: &str = r#"
local g = redis.call('GET', KEYS[1])
if not g then
  local t = redis.call('TIME')
  g = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[1], g)
end
if not tonumber(g) then
  return redis.error_reply('generation is not a number')
end
return g
"#;

/// Moves an app's generation to max(old + 1, Redis TIME in µs); returns the new value.
const GEN_BUMP: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1] .. string.format('%06d', tonumber(t[2])))
local old = redis.call('GET', KEYS[1])
local g = now
if old then
  local n = tonumber(old)
  if not n then
    return redis.error_reply('generation is not a number')
  end
  if n + 1 > g then g = n + 1 end
end
local s = string.format('%.0f', g)
redis.call('SET', KEYS[1], s)
return s
"#;

/// Deletes each lease in KEYS whose value is ARGV[1] (only our own); returns how many.
const RELEASE: &str = r#"
local n = 0
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then
    n = n + redis.call('DEL', k)
  end
end
return n
"#;

/// Most apps whose failed generation bump waits for a retry; past it every app fails closed.
const MAX_PENDING_BUMPS: usize = 10_000;
/// Most names one app's waiting invalidations keep; past it the retry purges the whole app.
const MAX_PENDING_NAMES: usize = 10_000;

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
    gen_read: redis::Script,
    gen_bump: redis::Script,
    release: redis::Script,
    metrics: Metrics,
    /// Identifies this sidecar's own invalidation messages and leases.
    origin: u64,
    /// Apps whose generation bump failed: no shared value of theirs is used until a retry
    /// succeeds. Keyed by the apps of accepted writes; bounded by `MAX_PENDING_BUMPS`.
    pending: std::sync::Mutex<PendingBumps>,
}

#[derive(Debug, Default)]
struct PendingBumps {
    apps: std::collections::HashMap<String, InvalidationMsg>,
    /// The map overflowed: every app fails closed until it is empty again.
    overflowed: bool,
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
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct InvalidationMsg {
    o: u64,
    app: String,
    tokens: Vec<String>,
    accounts: Vec<String>,
    all: bool,
    /// Whether the sender's generation bump went through. When it did not, every sidecar that
    /// hears of it fails closed for the app too, and retries the bump itself.
    #[serde(default)]
    b: bool,
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
            gen_read: redis::Script::new(GEN_READ),
            gen_bump: redis::Script::new(GEN_BUMP),
            release: redis::Script::new(RELEASE),
            metrics,
            origin: u64::from_le_bytes(origin),
            pending: std::sync::Mutex::new(PendingBumps::default()),
        }))
    }

    /// Whether the fleet-wide quota applies (a rate is configured).
    pub fn has_quota(&self) -> bool {
        self.quota.is_some()
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs a script with the timeout; failures mark Redis down (a script's own error reply
    /// does not: Redis answered).
    async fn run_script<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        let mut conn = self.connection()?;
        match tokio::time::timeout(self.timeout, invocation.invoke_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => {
                self.mark(true);
                Some(v)
            }
            Ok(Err(e)) => {
                self.metrics.redis_errors.inc();
                tracing::debug!(error = %e, "fleet: Redis script error");
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.mark(false);
                }
                None
            }
            Err(_) => {
                self.metrics.redis_errors.inc();
                self.mark(false);
                None
            }
        }
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

    /// The value of this sidecar's leases for one batch (unique per batch, so a release never
    /// drops a lease taken later, by another sidecar or by another batch of this one).
    pub fn lease_token(&self, batch: u64) -> String {
        format!("{:016x}-{batch:x}", self.origin)
    }

    /// Takes a short lease on each key (SET NX PX): `true` where this sidecar should fetch,
    /// `false` where another sidecar is fetching it right now. `None` when Redis does not answer
    /// (then every key is this sidecar's to fetch).
    pub async fn take_leases(
        &self,
        keys: &[crate::cache::CacheKey],
        lease_for: Duration,
        token: &str,
    ) -> Option<Vec<bool>> {
        let mut pipe = redis::pipe();
        let px = u64::try_from(lease_for.as_millis()).unwrap_or(1000).max(1);
        for k in keys {
            pipe.cmd("SET")
                .arg(self.lease_key(k))
                .arg(token)
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

    /// Gives this batch's leases back (compare-and-delete: only those still holding `token`),
    /// so others do not wait for a value that will not come, or wait longer than needed.
    pub async fn release_leases(&self, keys: &[crate::cache::CacheKey], token: &str) {
        if keys.is_empty() {
            return;
        }
        let mut invocation = self.release.prepare_invoke();
        for k in keys {
            invocation.key(self.lease_key(k));
        }
        invocation.arg(token);
        let _: Option<u64> = self.run_script(&invocation).await;
    }

    fn lease_key(&self, key: &crate::cache::CacheKey) -> String {
        self.entry_key(key).replacen(":v1:e:", ":v1:l:", 1)
    }

    /// Whether shared values of `app` may be used: not while a failed generation bump of it
    /// waits for a retry (which is tried here first).
    async fn usable(&self, app: &str) -> bool {
        let (msg, overflowed) = {
            let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            (p.apps.get(app).cloned(), p.overflowed)
        };
        if let Some(msg) = msg {
            if !self.deliver(&msg).await {
                return false;
            }
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.apps.remove(app);
            if p.apps.is_empty() {
                p.overflowed = false;
            }
        }
        !overflowed
    }

    /// The app's current generation, created when missing (`None` when Redis does not answer
    /// or holds something that is not a generation: then nothing is shared for this call).
    pub async fn generation(&self, app: &str) -> Option<u64> {
        if !self.usable(app).await {
            return None;
        }
        let invocation = self.gen_read.key(self.gen_key(app));
        let g: String = self.run_script(&invocation).await?;
        g.parse().ok()
    }

    /// Looks `keys` (all of `app`) up in one round trip. Returns, per key, the answer and its
    /// remaining fresh time, for values of the app's current generation that are still fresh.
    /// `None` when Redis does not answer, or the app's generation is unknown (missing, not a
    /// number, or a failed bump not yet retried): then no shared value is used (fail closed).
    pub async fn lookup(
        &self,
        app: &str,
        keys: &[crate::cache::CacheKey],
    ) -> Option<Vec<Option<(crate::api::query::Answer, Duration)>>> {
        if !self.usable(app).await {
            return None;
        }
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
            .and_then(|g| std::str::from_utf8(&g).ok()?.parse().ok())?;
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

    /// Writes fetched entries (fetched under generation `gen`; `None`: write nothing) off the
    /// response path, then releases the batch's `leased` keys: waiters find the values.
    pub fn write_behind(
        self: &Arc<Self>,
        gen: Option<u64>,
        entries: Vec<(crate::cache::CacheKey, Arc<crate::cache::Entry>)>,
        keep_after_fresh: Duration,
        leased: Vec<crate::cache::CacheKey>,
        token: String,
    ) {
        if entries.is_empty() && leased.is_empty() {
            return;
        }
        let fleet = self.clone();
        tokio::spawn(async move {
            if let Some(gen) = gen {
                fleet.write(gen, entries, keep_after_fresh).await;
            }
            fleet.release_leases(&leased, &token).await;
        });
    }

    async fn write(
        &self,
        gen: u64,
        entries: Vec<(crate::cache::CacheKey, Arc<crate::cache::Entry>)>,
        keep_after_fresh: Duration,
    ) {
        let fleet = self;
        {
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
        }
    }

    /// A write or purge for `app`: its shared values stop being used (a new generation), and
    /// every sidecar drops the affected entries from its moka. If Redis does not take it, the
    /// app fails closed here until a retry does (see the module doc).
    pub async fn invalidate(&self, app: &str, tokens: &[String], accounts: &[String], all: bool) {
        let msg = InvalidationMsg {
            o: self.origin,
            app: app.to_owned(),
            tokens: tokens.to_vec(),
            accounts: accounts.to_vec(),
            all,
            b: false,
        };
        if self.deliver(&msg).await {
            return;
        }
        tracing::warn!("fleet mode: an invalidation did not reach Redis; shared values of its app are not used until it does");
        self.fail_closed(msg);
    }

    /// Uses no shared value of `msg.app` until a bump of its own succeeds (see `usable`).
    fn fail_closed(&self, msg: InvalidationMsg) {
        let app = msg.app.clone();
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = p.apps.get_mut(&app) {
            // One retry covers both writes (as a purge of the whole app past a bound).
            old.all |= msg.all;
            old.tokens.extend(msg.tokens);
            old.accounts.extend(msg.accounts);
            if old.tokens.len() + old.accounts.len() > MAX_PENDING_NAMES {
                old.all = true;
                old.tokens = Vec::new();
                old.accounts = Vec::new();
            }
            return;
        }
        if p.apps.len() >= MAX_PENDING_BUMPS {
            p.overflowed = true;
            return;
        }
        p.apps.insert(app, msg);
    }

    /// Bumps the app's generation and publishes the invalidation; whether both worked.
    async fn deliver(&self, msg: &InvalidationMsg) -> bool {
        let invocation = self.gen_bump.key(self.gen_key(&msg.app));
        let bumped: Option<String> = self.run_script(&invocation).await;
        let sent = InvalidationMsg {
            o: self.origin,
            b: bumped.is_some(),
            ..msg.clone()
        };
        let Ok(payload) = serde_json::to_string(&sent) else {
            return false;
        };
        let published: Option<u64> = self
            .run(
                redis::cmd("PUBLISH")
                    .arg(self.channel())
                    .arg(payload)
                    .clone(),
            )
            .await;
        bumped.is_some() && published.is_some()
    }

    /// Retries failed invalidations every second until they reach Redis.
    pub fn retry_pending(self: &Arc<Self>) {
        let fleet = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(fleet) = fleet.upgrade() else {
                    return;
                };
                let apps: Vec<String> = {
                    let p = fleet.pending.lock().unwrap_or_else(|e| e.into_inner());
                    p.apps.keys().cloned().collect()
                };
                for app in apps {
                    fleet.usable(&app).await;
                }
            }
        });
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
                    if !m.b {
                        // Its sender could not move the generation: shared values of the app
                        // may predate the write. Fail closed here too, until a bump succeeds.
                        fleet.fail_closed(m.clone());
                    }
                    let app: Arc<str> = Arc::from(m.app.as_str());
                    let write = store.begin_write(&app);
                    let dropped = if m.all {
                        store.purge_app(&m.app).await.len()
                    } else {
                        let keys = store.affected(&app, &m.tokens, &m.accounts).await;
                        store.invalidate(&keys).await
                    };
                    drop(write);
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
