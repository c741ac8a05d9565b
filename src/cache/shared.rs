//! The fleet's shared cache tier in Redis: identifiers missing in a sidecar's moka are looked
//! up in one round trip per request (MGET), fresh hits are promoted into moka, and upstream
//! answers are written off the response path with their remaining fresh lifetime (plus the
//! stale windows, for Redis's own expiry).
//!
//! Values carry a format version and the app's generation when they were fetched; only values
//! of the app's current generation are used. Generations only grow: a write moves the app's to
//! `max(old + 1, Redis TIME in µs)`, and a missing key (never written, or evicted under
//! `maxmemory`) is created at Redis's current time, above every value handed out before, so an
//! old value can never become current again. When a move fails, shared values of that app may
//! predate the write: the app is *closed* here (no shared value of it is used) until a retried
//! move succeeds (see [`crate::cache::Cache`], which retries every second and before a lookup).

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;

use super::entry::Entry;
use super::key::{app_name, CacheKey};
use crate::api::answer::{Answer, ElementCode};
use crate::fleet::bus::Invalidation;
use crate::fleet::{unix_ms, Link};

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

/// Most apps closed at once; past it every app is closed until they are all reopened.
const MAX_CLOSED_APPS: usize = 10_000;
/// Most names one closed app's invalidations keep; past it the retry covers the whole app.
const MAX_CLOSED_NAMES: usize = 10_000;

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

/// A value found fresh in the shared tier, with the fresh time it has left.
pub(crate) type SharedHit = (Answer, Duration);

#[derive(Debug, Default)]
struct Closed {
    /// Apps whose generation move failed, with the invalidation to deliver again (keyed by
    /// AccessIDs of accepted writes, bounded by `MAX_CLOSED_APPS`).
    apps: HashMap<String, Invalidation>,
    /// The map overflowed: every app is closed until it is empty again.
    overflowed: bool,
}

#[derive(Debug)]
pub(crate) struct SharedTier {
    link: Link,
    gen_read: redis::Script,
    gen_bump: redis::Script,
    closed: Mutex<Closed>,
}

impl SharedTier {
    pub(crate) fn new(link: Link) -> SharedTier {
        SharedTier {
            link,
            gen_read: redis::Script::new(GEN_READ),
            gen_bump: redis::Script::new(GEN_BUMP),
            closed: Mutex::new(Closed::default()),
        }
    }

    fn gen_key(&self, app: &str) -> String {
        self.link.key("g", &app_name(app))
    }

    fn entry_key(&self, key: &CacheKey) -> String {
        self.link.key("e", &key.shared_name().joined())
    }

    /// Whether `app` is closed (a generation move failed and has not been retried with
    /// success yet).
    pub(crate) fn is_closed(&self, app: &str) -> bool {
        let c = self.closed.lock();
        c.overflowed || c.apps.contains_key(app)
    }

    /// Closes `msg.app` until [`SharedTier::reopen`]; merges with what is already waiting.
    pub(crate) fn close(&self, msg: Invalidation) {
        let mut c = self.closed.lock();
        if let Some(old) = c.apps.get_mut(&msg.app) {
            old.all |= msg.all;
            old.tokens.extend(msg.tokens);
            old.accounts.extend(msg.accounts);
            if old.tokens.len() + old.accounts.len() > MAX_CLOSED_NAMES {
                old.all = true;
                old.tokens = Vec::new();
                old.accounts = Vec::new();
            }
            return;
        }
        if c.apps.len() >= MAX_CLOSED_APPS {
            c.overflowed = true;
            return;
        }
        c.apps.insert(msg.app.clone(), msg);
    }

    /// The invalidation waiting for `app`, if it is closed.
    pub(crate) fn waiting(&self, app: &str) -> Option<Invalidation> {
        self.closed.lock().apps.get(app).cloned()
    }

    /// Every app closed now.
    pub(crate) fn closed_apps(&self) -> Vec<String> {
        self.closed.lock().apps.keys().cloned().collect()
    }

    pub(crate) fn reopen(&self, app: &str) {
        let mut c = self.closed.lock();
        c.apps.remove(app);
        if c.apps.is_empty() {
            c.overflowed = false;
        }
    }

    /// Moves the app's generation; whether Redis took it.
    pub(crate) async fn bump(&self, app: &str) -> bool {
        let invocation = self.gen_bump.key(self.gen_key(app));
        let moved: Option<String> = self.link.run_script(&invocation).await;
        moved.is_some()
    }

    /// The app's current generation, created when missing (`None` when Redis does not answer,
    /// holds something that is not a generation, or the app is closed: then nothing is shared
    /// for this call).
    pub(crate) async fn generation(&self, app: &str) -> Option<u64> {
        if self.is_closed(app) {
            return None;
        }
        let invocation = self.gen_read.key(self.gen_key(app));
        let g: String = self.link.run_script(&invocation).await?;
        g.parse().ok()
    }

    /// Looks `keys` (all of `app`) up in one round trip: per key, the answer and its remaining
    /// fresh time, for values of the app's current generation that are still fresh. `None`
    /// when Redis does not answer or the generation is unknown (missing, not a number): then
    /// no shared value is used (fail closed). The caller checks [`SharedTier::is_closed`].
    pub(crate) async fn lookup(
        &self,
        app: &str,
        keys: &[CacheKey],
    ) -> Option<Vec<Option<SharedHit>>> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(self.gen_key(app));
        for k in keys {
            cmd.arg(self.entry_key(k));
        }
        let values: Vec<Option<Vec<u8>>> = self.link.run(&cmd).await?;
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
                    let code = ElementCode::parse(&sv.c)?;
                    Some((
                        Answer {
                            code,
                            element: sv.e,
                        },
                        Duration::from_millis(sv.f - now),
                    ))
                })
                .collect(),
        )
    }

    /// Writes fetched entries (fetched under generation `gen`), pipelined; counts what was
    /// written.
    pub(crate) async fn write(
        &self,
        gen: u64,
        entries: &[(CacheKey, Entry)],
        keep_after_fresh: Duration,
    ) {
        let now = tokio::time::Instant::now();
        let now_ms = unix_ms();
        let mut pipe = redis::pipe();
        let mut n = 0;
        for (key, entry) in entries {
            let fresh = entry.fresh_until().saturating_duration_since(now);
            if fresh.is_zero() {
                continue;
            }
            let value = SharedValue {
                v: 1,
                g: gen,
                c: entry.code().as_str().to_owned(),
                e: entry
                    .element_str()
                    .and_then(|t| serde_json::value::RawValue::from_string(t.to_owned()).ok()),
                f: now_ms + u64::try_from(fresh.as_millis()).unwrap_or(u64::MAX / 2),
            };
            let Ok(bytes) = serde_json::to_vec(&value) else {
                continue;
            };
            let px = u64::try_from((fresh + keep_after_fresh).as_millis())
                .unwrap_or(u64::MAX / 2)
                .max(1);
            pipe.cmd("SET")
                .arg(self.entry_key(key))
                .arg(bytes)
                .arg("PX")
                .arg(px)
                .ignore();
            n += 1;
        }
        if n == 0 {
            return;
        }
        let written: Option<()> = self.link.run_pipe(&pipe, self.link.timeout() * 4).await;
        if written.is_some() {
            self.link.metrics().redis_writes.inc_by(n);
        }
    }
}
