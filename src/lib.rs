//! tpns-cache: a caching reverse-proxy sidecar for TPNS's account/token binding query.
//!
//! ```text
//! client -> server (accept loop) -> proxy::handle
//!   POST /v3/device/account/query -> proxy::query, in phases:
//!     scope (proxy::auth, trust) -> read (http) -> validate (api::request) -> plan
//!     -> look up (cache: local moka tier, fleet's shared tier)
//!     -> fetch misses (fetch: flights, batches, one call through the shield)
//!     -> stitch (api::answer) + Cache-Status (proxy::status) + memo
//!   POST .../batchoperate -> proxy::batchoperate (forwarded; cache::Cache::invalidate)
//!   anything else        -> proxy::passthrough (streamed unchanged)
//! admin listener -> admin (/metrics, /healthz, /readyz, /purge)
//! ```
//!
//! The map, by layer (each module opens with what it owns; ARCHITECTURE.md draws it):
//!
//! - wiring: [`run`] builds the components below from [`config`] and serves them;
//! - the request: [`proxy`] (routing, credentials, the query phases, pass-through, writes),
//!   [`admin`], [`server`] (accept loop, TLS, limits), [`http`] (leaf helpers);
//! - the answer: [`cache`] (keys, entries, both tiers, invalidation), [`fetch`] (coalescing,
//!   micro-batching, the upstream call), [`shield`] (admission: cool-downs, breaker, quotas,
//!   retry budget), [`upstream`] (the HTTPS client), [`trust`] (what the upstream said of a
//!   credential), [`fleet`] (Redis: connection, fleet quota, leases, invalidation bus);
//! - the wire format: [`api`] (request parsing, answers and stitching, the proxy's errors),
//!   over the `tpns-wire` crate shared with the simulator (`tpns-sim`, used by [`demo`]);
//! - around: [`metrics`] (typed families; each component registers its own), [`logging`].
//!
//! The library's public surface is the proxy ([`run`], [`Listeners`], [`config`]), and, for
//! the benchmarks and fuzz targets, the wire format ([`api`]) and the cache tier ([`cache`]).
//! Everything else is `pub(crate)`, and `unreachable_pub` keeps it so.

#![warn(unreachable_pub)]

pub(crate) mod admin;
pub mod api;
pub mod cache;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub(crate) mod egress;
pub(crate) mod fetch;
pub(crate) mod fleet;
pub(crate) mod http;
pub mod logging;
pub(crate) mod metrics;
pub(crate) mod proxy;
pub(crate) mod server;
pub(crate) mod shield;
#[cfg(feature = "demo")]
pub mod simulate;
pub(crate) mod status;
pub(crate) mod trust;
pub(crate) mod upstream;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use tokio::net::TcpListener;

use crate::cache::{Cache, CacheMetrics, Clock, Policy, Store};
use crate::config::Config;
use crate::server::{serve, ServeOptions};

/// Loads the configuration (see [`Config::load`]) and reports every problem at once: the
/// values' own rules and what the components that use them find (the egress TLS roots and
/// proxy route, the fleet's Redis target). What the binary's `serve`, `demo` and
/// `check-config` run. The checks that need a component live with it, so the configuration
/// module depends on nothing above it.
pub fn load_config(file: Option<&std::path::Path>) -> Result<Config, config::ConfigError> {
    let config = Config::load_unchecked(file)?;
    check_config(&config)?;
    Ok(config)
}

/// [`load_config`]'s checks for a configuration built another way.
pub fn check_config(config: &Config) -> Result<(), config::ConfigError> {
    let mut problems = config.problems();
    problems.extend(egress::problems(&config.upstream));
    problems.extend(fleet::problems(&config.redis));
    config::ConfigError::from_problems(problems)
}

/// The two listeners, bound by the caller (tests bind `127.0.0.1:0`).
#[derive(Debug)]
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `listen` and `admin_listen` from the configuration.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let bind = |addr, key: &'static str, env: &'static str| async move {
            TcpListener::bind(addr).await.map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                    format!(" (set another address with `{key}` in the config file or {env})")
                } else {
                    String::new()
                };
                std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} ({key}): {e}{hint}"),
                )
            })
        };
        Ok(Listeners {
            proxy: bind(config.listen, "listen", "TPNS_CACHE_LISTEN").await?,
            admin: bind(
                config.admin_listen,
                "admin_listen",
                "TPNS_CACHE_ADMIN_LISTEN",
            )
            .await?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot set up the upstream client: {0}")]
    Upstream(String),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot draw a random key: {0}")]
    Random(String),
    #[error("cannot read a secret: {0}")]
    Secret(String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("cannot set up fleet mode: {0}")]
    Fleet(String),
}

/// Installs rustls's `ring` provider as the process default, once. Only one provider is built
/// in; doing it explicitly keeps start-up deterministic should another crate ever add one.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The running proxy's components, and the registry their metrics are on.
struct Built {
    proxy: Arc<proxy::Proxy>,
    registry: Registry,
}

/// Builds every component for `config`, each with the handles it uses.
fn build(config: Config, clock: Clock) -> Result<Built, RunError> {
    install_crypto_provider();
    let registry = Registry::new();
    metrics::register_build_info(&registry)?;
    let cache_metrics = CacheMetrics::register(&registry)?;
    let store = Store::with_eviction_counter(
        config.cache.max_bytes.as_u64(),
        Policy {
            ttl: config.cache.ttl,
            negative_ttl: config.cache.negative_ttl,
            stale_while_revalidate: config.cache.stale_while_revalidate,
            stale_if_error: config.cache.stale_if_error,
            ttl_jitter: config.cache.ttl_jitter,
        },
        clock,
        Some(cache_metrics.evictions.clone()),
    );
    let mut cache = Cache::new(store, cache_metrics);
    // Fleet mode: one Redis connection shared by the quota, the leases, the shared tier and
    // the invalidation bus.
    let link = if config.redis.url.is_empty() {
        None
    } else {
        let metrics = fleet::FleetMetrics::register(&registry)?;
        Some(
            fleet::Link::start(
                fleet::Target::from_config(&config.redis).map_err(RunError::Fleet)?,
                config.redis.timeout,
                &config.redis.key_prefix,
                &config.upstream.url,
                metrics,
            )
            .map_err(RunError::Fleet)?,
        )
    };
    if let Some(link) = &link {
        cache = cache.with_fleet(
            cache::shared::SharedTier::new(link.clone()),
            fleet::bus::Bus::new(link.clone()),
        );
    }
    let cache = Arc::new(cache);
    cache.start_fleet();
    let trust = Arc::new(trust::Trust::new(
        config.auth.accepted_ttl,
        config.auth.accepted_max,
        config.auth.refused_ttl,
        config.auth.refused_max,
    ));
    let upstream = upstream::Upstream::new(&config.upstream).map_err(RunError::Upstream)?;
    let upstream_metrics = upstream::UpstreamMetrics::register(&registry)?;
    let quota = link.as_ref().and_then(|l| {
        fleet::quota::FleetQuota::new(
            l.clone(),
            config.shield.calls_per_second,
            config.shield.burst,
        )
    });
    let shield = shield::Shield::new(&config, quota, shield::ShieldMetrics::register(&registry)?);
    let q = &config.query;
    let caller = fetch::call::Caller {
        upstream: upstream.clone(),
        upstream_metrics: upstream_metrics.clone(),
        shield,
        cache: cache.clone(),
        trust: trust.clone(),
        leases: link.map(|l| Arc::new(fleet::leases::Leases::new(l))),
        metrics: fetch::FetchMetrics::register(&registry)?,
        batch_codes: [
            api::code::OK,
            api::code::BATCH_PARTLY_FAILED,
            api::code::BATCH_ALL_FAILED,
            q.partial_failure_ret_code,
            q.all_failed_ret_code,
        ],
        lease_for: config.upstream.timeout.min(Duration::from_secs(3)),
    };
    let fetcher = fetch::Fetcher::new(
        caller,
        config.shield.batch_window,
        config.upstream.max_batch,
        config.upstream.timeout,
    );
    let credentials = proxy::auth::Credentials::new(
        config.keys().map_err(|e| RunError::Secret(e.join("; ")))?,
        config.auth.signature_max_skew,
    )
    .map_err(|e| RunError::Random(e.to_string()))?;
    let proxy = proxy::Proxy {
        upstream_id: Arc::from(config.upstream.url.as_str()),
        credentials,
        trust,
        cache,
        fetcher,
        memo: proxy::query::memo::Memo::new(
            config.cache.memo_max_bytes.as_u64(),
            config.cache.ttl.max(config.cache.negative_ttl),
        ),
        upstream,
        upstream_metrics,
        body_budget: http::BodyBudget::new(config.limits.max_buffered_bytes.as_u64()),
        metrics: proxy::ProxyMetrics::register(&registry)?,
        query_metrics: proxy::QueryMetrics::register(&registry)?,
        config,
    };
    Ok(Built {
        proxy: Arc::new(proxy),
        registry,
    })
}

/// The name of every metric family the proxy can export (fleet mode's included), for
/// documentation checks.
pub fn metric_names() -> Result<Vec<String>, prometheus::Error> {
    let r = Registry::new();
    metrics::register_build_info(&r)?;
    CacheMetrics::register(&r)?;
    fleet::FleetMetrics::register(&r)?;
    upstream::UpstreamMetrics::register(&r)?;
    shield::ShieldMetrics::register(&r)?;
    fetch::FetchMetrics::register(&r)?;
    proxy::ProxyMetrics::register(&r)?;
    proxy::QueryMetrics::register(&r)?;
    let mut names: Vec<String> = r.gather().iter().map(|f| f.name().to_owned()).collect();
    names.sort();
    Ok(names)
}

/// Runs the proxy and admin listeners until `shutdown` resolves, then drains.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    run_with_clock(config, listeners, shutdown, Clock::default()).await
}

/// [`run`] with the cache on the given clock (tests advance it to expire entries).
pub async fn run_with_clock(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
    clock: Clock,
) -> Result<(), RunError> {
    install_crypto_provider();
    let tls = |c: &config::TlsConfig| match (&c.cert_file, &c.key_file) {
        (Some(cert), Some(key)) => server::tls_acceptor(cert, key)
            .map(Some)
            .map_err(RunError::Tls),
        _ => Ok(None),
    };
    let opts = ServeOptions {
        header_read_timeout: config.limits.header_read_timeout,
        max_header_bytes: usize::try_from(config.limits.max_header_bytes.as_u64())
            .unwrap_or(usize::MAX),
        max_connections: config.limits.max_connections,
        tls: tls(&config.tls)?,
        drain_grace: config.shutdown_grace,
        write_timeout: config.limits.response_write_timeout,
    };
    let admin_opts = ServeOptions {
        max_connections: 256,
        tls: tls(&config.admin.tls)?,
        ..opts.clone()
    };
    let token = config.admin_token().map_err(RunError::Secret)?;
    let upstream_url = config.upstream.url.clone();
    let status = status::Status::new(&config);
    let Built { proxy, registry } = build(config, clock)?;
    let admin = Arc::new(admin::Admin {
        status,
        registry,
        proxy: proxy.clone(),
        token,
        ready: AtomicBool::new(false),
        loopback: listeners
            .admin
            .local_addr()
            .is_ok_and(|a| a.ip().is_loopback()),
    });
    admin::start_sampling(&admin);
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let admin_task = {
        let admin = admin.clone();
        tokio::spawn(serve(
            "admin",
            listeners.admin,
            move |req| admin::handle(admin.clone(), req),
            async {
                let _ = admin_stop_rx.await;
            },
            admin_opts,
        ))
    };
    let proxy_addr = listeners
        .proxy
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    tracing::info!(listen = %proxy_addr, upstream = %upstream_url, "tpns-cache ready");
    admin.ready.store(true, Ordering::Release);
    let shutdown = {
        let admin = admin.clone();
        async move {
            shutdown.await;
            admin.ready.store(false, Ordering::Release);
            tracing::info!("shutting down: draining in-flight requests");
        }
    };
    serve(
        "proxy",
        listeners.proxy,
        move |req| proxy::handle(proxy.clone(), req),
        shutdown,
        opts,
    )
    .await;
    let _ = admin_stop_tx.send(());
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
