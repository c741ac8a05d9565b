//! Fleet mode over a shared Redis (`redis.url`): one upstream quota for every sidecar.
//!
//! The upstream call limiter runs GCRA in a Lua script against Redis, on Redis's own clock, so
//! N sidecars together respect `shield.calls_per_second`/`shield.burst`. Redis is optional and
//! never in the way: every call has a short timeout (`redis.timeout`); while Redis is slow,
//! down, or not yet reached (the connection is made in the background, start-up never waits
//! for it), each sidecar falls back to a local limiter at `redis.local_share` of the rate, and
//! it recovers on its own when Redis answers again. State shows in metrics and logs.
//!
//! (The shared cache tier, fleet-wide invalidation and leases of issue 8 build on this client.)

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
    conn: Arc<RwLock<Option<ConnectionManager>>>,
    up: Arc<AtomicBool>,
    timeout: Duration,
    quota_key: String,
    emission_us: u64,
    burst: u32,
    script: redis::Script,
    metrics: Metrics,
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
    /// Starts connecting in the background; returns at once. `None` when `calls_per_second` is
    /// 0 (no quota to share).
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
        if calls_per_second == 0 {
            return Ok(None);
        }
        let conn: Arc<RwLock<Option<ConnectionManager>>> = Arc::new(RwLock::new(None));
        let up = Arc::new(AtomicBool::new(false));
        {
            let (conn, up, metrics) = (conn.clone(), up.clone(), metrics.clone());
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
        Ok(Some(Fleet {
            conn,
            up,
            timeout,
            quota_key: format!("{prefix}:v1:quota:{}", upstream_tag(upstream)),
            emission_us: 1_000_000 / u64::from(calls_per_second.max(1)),
            burst: burst.max(1),
            script: redis::Script::new(GCRA),
            metrics,
        }))
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
        let conn = self.conn.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(mut conn) = conn else {
            return Err(());
        };
        let mut inv = self.script.key(&self.quota_key);
        inv.arg(self.emission_us).arg(self.burst).arg(1);
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
