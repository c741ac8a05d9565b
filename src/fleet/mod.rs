//! Fleet mode (`redis.url`): the sidecars of a fleet share one Redis. This module is the
//! connection; what goes over it lives with what it serves:
//!
//! - [`quota`]: one upstream quota for every sidecar (GCRA in Redis), used by the shield;
//! - [`leases`]: who fetches a cold identifier, so the fleet asks the upstream once;
//! - [`bus`]: invalidations published to every sidecar;
//! - the shared cache tier is part of the cache ([`crate::cache::shared`]).
//!
//! Redis is optional and never in the way: the connection is made in the background (start-up
//! never waits), every call gives up after `redis.timeout`, and while Redis is slow, down or not
//! reached yet each sidecar falls back (local quota share, own cache) and recovers by itself.
//! State shows in metrics ([`metrics`]) and one log line per change.

pub(crate) mod bus;
pub(crate) mod leases;
pub(crate) mod metrics;
pub(crate) mod quota;
pub(crate) mod target;

/// What is wrong with the fleet settings that only parsing the Redis target shows (nothing
/// when fleet mode is off).
pub(crate) fn problems(cfg: &crate::config::RedisConfig) -> Vec<String> {
    if cfg.url.is_empty() {
        return Vec::new();
    }
    Target::from_config(cfg).err().into_iter().collect()
}

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

pub(crate) use metrics::FleetMetrics;
pub(crate) use target::{Conn, Target};

/// The connection to the fleet's Redis, shared by every fleet component.
#[derive(Clone)]
pub(crate) struct Link {
    inner: Arc<LinkInner>,
}

struct LinkInner {
    target: Target,
    conn: RwLock<Option<Conn>>,
    up: AtomicBool,
    timeout: Duration,
    /// `redis.key_prefix`.
    prefix: String,
    /// A stable short name of the upstream, so fleets in front of different access points
    /// never share keys.
    tag: String,
    /// Identifies this sidecar (its invalidation messages, its leases).
    origin: u64,
    metrics: FleetMetrics,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("up", &self.is_up())
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Starts connecting in the background; returns at once.
    pub(crate) fn start(
        target: Target,
        timeout: Duration,
        prefix: &str,
        upstream: &str,
        metrics: FleetMetrics,
    ) -> Result<Link, String> {
        let mut origin = [0u8; 8];
        getrandom::fill(&mut origin).map_err(|e| e.to_string())?;
        let digest = <sha2::Sha256 as sha2::Digest>::digest(upstream.as_bytes());
        let link = Link {
            inner: Arc::new(LinkInner {
                target,
                conn: RwLock::new(None),
                up: AtomicBool::new(false),
                timeout,
                prefix: prefix.to_owned(),
                tag: tpns_wire::hex(&digest[..8]),
                origin: u64::from_le_bytes(origin),
                metrics,
            }),
        };
        link.connect_in_background();
        Ok(link)
    }

    fn connect_in_background(&self) {
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let Some(link) = inner.upgrade() else {
                    return;
                };
                match link.target.connect(link.timeout).await {
                    Ok(m) => {
                        *link.conn.write() = Some(m);
                        Link { inner: link }.mark(true);
                        tracing::info!("fleet mode: connected to Redis");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "fleet mode: Redis not reachable yet; using the local fallbacks");
                    }
                }
                drop(link);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    pub(crate) fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    pub(crate) fn metrics(&self) -> &FleetMetrics {
        &self.inner.metrics
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    pub(crate) fn origin(&self) -> u64 {
        self.inner.origin
    }

    pub(crate) fn target(&self) -> &Target {
        &self.inner.target
    }

    /// A Redis key under this fleet's prefix: `<prefix>:v1:<kind>:<upstream tag>[:<rest>]`,
    /// where `rest`, when given, starts with the app's name (`<app>[:<more>]`).
    ///
    /// On a Redis Cluster the upstream tag and the app are a hash tag,
    /// `<prefix>:v1:<kind>:{<upstream tag>:<app>}[:<more>]`, so every key of one app (its
    /// generation, entries and leases) lives in one hash slot: the generation and the entries
    /// are read in one atomic MGET, and pipelines and scripts stay on one node. The price: one
    /// app's shared tier sits on one shard. (A single server keeps the layout without braces,
    /// so existing fleets keep their keys.)
    pub(crate) fn key(&self, kind: &str, rest: &str) -> String {
        let (prefix, tag) = (&self.inner.prefix, &self.inner.tag);
        if rest.is_empty() {
            format!("{prefix}:v1:{kind}:{tag}")
        } else if self.inner.target.is_cluster() {
            let (app, more) = rest.split_once(':').map_or((rest, ""), |(a, m)| (a, m));
            let sep = if more.is_empty() { "" } else { ":" };
            format!("{prefix}:v1:{kind}:{{{tag}:{app}}}{sep}{more}")
        } else {
            format!("{prefix}:v1:{kind}:{tag}:{rest}")
        }
    }

    /// A name under this fleet's prefix that no upstream qualifies (the invalidation channel).
    pub(crate) fn global(&self, name: &str) -> String {
        format!("{}:v1:{name}", self.inner.prefix)
    }

    pub(crate) fn connection(&self) -> Option<Conn> {
        self.inner.conn.read().clone()
    }

    /// Runs a command with the timeout; a transport failure marks Redis down.
    pub(crate) async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let mut conn = self.connection()?;
        let result =
            tokio::time::timeout(self.inner.timeout, cmd.query_async::<T>(&mut conn)).await;
        self.settle(result)
    }

    /// Runs a pipeline within `timeout`.
    pub(crate) async fn run_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        timeout: Duration,
    ) -> Option<T> {
        let mut conn = self.connection()?;
        let result = tokio::time::timeout(timeout, pipe.query_async::<T>(&mut conn)).await;
        self.settle(result)
    }

    /// Runs a script with the timeout. A script's own error reply does not mark Redis down:
    /// Redis answered.
    pub(crate) async fn run_script<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        let mut conn = self.connection()?;
        let result =
            tokio::time::timeout(self.inner.timeout, invocation.invoke_async::<T>(&mut conn)).await;
        self.settle(result)
    }

    fn settle<T>(
        &self,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        match result {
            Ok(Ok(v)) => {
                self.mark(true);
                Some(v)
            }
            Ok(Err(e)) => {
                self.inner.metrics.redis_errors.inc();
                tracing::debug!(error = %e, "fleet: Redis error");
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.mark(false);
                }
                None
            }
            Err(_) => {
                self.inner.metrics.redis_errors.inc();
                self.mark(false);
                None
            }
        }
    }

    /// Records whether Redis answers; a change shows in `tpns_cache_redis_up` and the log.
    pub(crate) fn mark(&self, up: bool) {
        if self.inner.up.swap(up, Ordering::Relaxed) != up {
            self.inner.metrics.redis_up.set(i64::from(up));
            if up {
                tracing::info!(
                    "fleet mode: Redis answers again; fleet quota and shared tier back in use"
                );
            } else {
                tracing::warn!("fleet mode: Redis unavailable; falling back to the local quota share and own cache");
            }
        }
    }
}

/// Unix time in milliseconds (the shared tier's timestamps: every sidecar's clock agrees closely
/// enough for freshness in seconds).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
