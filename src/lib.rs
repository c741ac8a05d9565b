//! tpns-cache: a caching reverse-proxy sidecar for TPNS's account/token binding query.
//!
//! ```text
//! client POST /v3/device/account/query {operator_type, account_list | token_list}
//!   -> proxy::query   scope (Basic AccessID, accepted credential?), read + validate (api::query)
//!   -> cache          one key per distinct identifier; moka lookup (hit | negative hit | miss)
//!   -> upstream       misses only, in sub-requests of <= upstream.max_batch
//!   -> api::query     check the upstream answer, match elements by value, cache per policy
//!   -> api::query     stitch the documented response in request order; Cache-Status header
//! every other path -> proxy::passthrough (streamed unchanged)
//! admin listener   -> admin (/metrics, /healthz, /readyz)
//! ```
//!
//! Modules: [`config`] (figment layers), [`api`] (wire types, codes, the one error mapping),
//! [`cache`] (keys, entries, policy, moka), [`upstream`] (hyper + rustls client),
//! [`proxy`] (routing, credentials, the query phases, pass-through), [`metrics`], [`admin`],
//! [`server`] (accept loop), [`sim`] (the TPNS simulator) and [`demo`].

pub mod admin;
pub mod api;
pub mod cache;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod fleet;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod server;
#[cfg(feature = "demo")]
pub mod simulate;
pub mod upstream;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::Registry;
use tokio::net::TcpListener;

use crate::cache::{Clock, Policy, Store};
use crate::config::Config;
use crate::server::{serve, ServeOptions};

/// The two listeners, bound by the caller (tests bind `127.0.0.1:0`).
#[derive(Debug)]
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `listen` and `admin_listen` from the configuration.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let proxy = TcpListener::bind(config.listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {} (listen): {e}", config.listen),
            )
        })?;
        let admin = TcpListener::bind(config.admin_listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot listen on {} (admin_listen): {e}",
                    config.admin_listen
                ),
            )
        })?;
        Ok(Listeners { proxy, admin })
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

/// Builds the shared state for `config`.
pub fn build_state(config: Config, clock: Clock) -> Result<Arc<proxy::State>, RunError> {
    install_crypto_provider();
    let upstream = upstream::Upstream::new(&config.upstream).map_err(RunError::Upstream)?;
    let registry = Registry::new();
    let metrics = metrics::Metrics::register(&registry)?;
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
        Some(metrics.evictions.clone()),
    );
    let admin_token = config.admin_token().map_err(RunError::Secret)?;
    let fleet = if config.redis.url.is_empty() {
        None
    } else {
        fleet::Fleet::start(
            &config.redis.url,
            config.redis.timeout,
            &config.redis.key_prefix,
            &config.upstream.url,
            config.shield.calls_per_second,
            config.shield.burst,
            metrics.clone(),
        )
        .map_err(RunError::Fleet)?
        .map(Arc::new)
    };
    if let Some(f) = &fleet {
        f.subscribe(store.clone());
        f.retry_pending();
    }
    let fetcher = proxy::fetch::Fetcher::new(&config, fleet.clone());
    let credentials = proxy::auth::Credentials::with_refusals(
        config.auth.accepted_ttl,
        config.auth.accepted_max,
        config.auth.refused_ttl,
        config.auth.refused_max,
        config.keys().map_err(|e| RunError::Secret(e.join("; ")))?,
        config.auth.signature_max_skew,
    )
    .map_err(|e| RunError::Random(e.to_string()))?;
    Ok(Arc::new(proxy::State {
        upstream_id: Arc::from(config.upstream.url.as_str()),
        upstream,
        store,
        credentials,
        metrics,
        registry,
        fetcher,
        fleet,
        memo: cache::memo::Memo::new(
            config.cache.memo_max_bytes.as_u64(),
            config.cache.ttl.max(config.cache.negative_ttl),
        ),
        admin_token,
        body_budget: Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(config.limits.max_buffered_bytes.as_u64())
                .unwrap_or(usize::MAX)
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        )),
        config,
    }))
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
    let state = build_state(config, clock)?;
    let admin = Arc::new(admin::Admin {
        registry: state.registry.clone(),
        state: state.clone(),
        ready: AtomicBool::new(false),
        loopback: listeners
            .admin
            .local_addr()
            .is_ok_and(|a| a.ip().is_loopback()),
    });
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
    tracing::info!(
        listen = %proxy_addr,
        upstream = %state.config.upstream.url,
        "tpns-cache ready"
    );
    admin.ready.store(true, Ordering::Release);
    let proxy_state = state.clone();
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
        move |req| proxy::handle(proxy_state.clone(), req),
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
