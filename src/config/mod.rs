//! Configuration: built-in defaults < TOML file < `TPNS_CACHE_*` environment variables.
//!
//! Every key has a documented default below (the consts), and `config/tpns-cache.toml` repeats
//! them all; a test proves the two agree. Unknown keys and invalid values stop start-up with a
//! message naming the key (the binary exits with code 2).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod defaults;
mod log;
mod secrets;
mod validate;

pub use defaults::*;
pub use log::parse_filter;
pub use secrets::{read_secret, Injected, Keys, Secret};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the proxy listener the app talks to.
    #[serde(deserialize_with = "listen_addr")]
    pub listen: SocketAddr,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    #[serde(deserialize_with = "listen_addr")]
    pub admin_listen: SocketAddr,
    /// On SIGTERM/SIGINT: stop accepting, report not-ready, and give in-flight requests this long
    /// to finish before exiting.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub query: QueryConfig,
    pub shield: ShieldConfig,
    /// TLS on the proxy listener.
    #[serde(default)]
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    pub redis: RedisConfig,
    pub log: LogConfig,
}

/// Fleet mode: a shared Redis for the fleet-wide upstream quota, a second cache tier and
/// fleet-wide invalidation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:6379/0`; empty: fleet mode off (the sidecar needs nothing but itself).
    pub url: String,
    /// Every Redis call gives up after this; the sidecar then uses its local fallback.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Prefix of every key this project writes.
    pub key_prefix: String,
    /// While Redis is unavailable, this sidecar may use this share of `shield.calls_per_second`
    /// on its own (e.g. 1/N for N sidecars).
    pub local_share: f64,
    /// Redis Cluster: `url` lists one or more seed nodes, comma-separated.
    #[serde(default)]
    pub cluster: bool,
    /// ACL user; empty: the default user (`AUTH <password>` alone, when a password is set).
    #[serde(default)]
    pub username: String,
    /// File holding the password (of `username`, or of the default user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// CA certificates (PEM) trusted for `rediss://` in place of the web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// Where a secret comes from: a file (a mounted Kubernetes Secret) or an environment variable.
/// Secrets never sit in the TOML itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// TLS on the admin listener.
    #[serde(default)]
    pub tls: TlsConfig,
    /// File holding the bearer token that admin write endpoints (`POST /purge`) require.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Environment variable holding that token (instead of a file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the TPNS access point (`https://`, or `http://` for local use).
    pub url: String,
    /// Shorthand for one of the four documented access points; exclusive with an explicit `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Region>,
    /// Whole upstream exchange (connect, send, read the full answer).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Largest number of identifiers in one upstream sub-request.
    pub max_batch: usize,
    /// Upstream answers larger than this are refused (never cached).
    pub max_response_bytes: ByteSize,
    /// Extra trusted CA certificates (PEM) for the upstream's TLS, on top of the built-in web
    /// PKI roots: private PKI, or a TLS-inspecting egress proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Egress through an HTTP CONNECT proxy: `""` none, `"env"` the conventional
    /// `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`/`NO_PROXY` variables, or `http://host:port`.
    #[serde(default)]
    pub proxy: String,
    /// File holding the proxy's `user:password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_auth_file: Option<PathBuf>,
    /// Environment variable holding the proxy's `user:password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_auth_env: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Region {
    #[serde(alias = "gz")]
    Guangzhou,
    #[serde(alias = "sh")]
    Shanghai,
    #[serde(alias = "hk", alias = "hong_kong")]
    Hongkong,
    #[serde(alias = "sgp", alias = "sg")]
    Singapore,
}

impl Region {
    pub fn base_url(self) -> &'static str {
        match self {
            Region::Guangzhou => "https://api.tpns.tencent.com",
            Region::Shanghai => "https://api.tpns.sh.tencent.com",
            Region::Hongkong => "https://api.tpns.hk.tencent.com",
            Region::Singapore => "https://api.tpns.sgp.tencent.com",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Lifetime of an answer whose element code is `"0"`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Lifetime of a not-found (`"10110008"`) answer; `0s` turns negative caching off.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Memory budget of the cache (keys + raw JSON elements + bookkeeping), enforced by moka's weigher.
    pub max_bytes: ByteSize,
    /// After an entry's lifetime, it is still served for this long while one background fetch
    /// refreshes it (stale-while-revalidate). `0s` turns it off.
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
    /// After an entry's lifetime, it is still served for this long when the upstream fails,
    /// times out, is rate-limited or the breaker is open (stale-if-error). `0s` turns it off.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// Each lifetime is shortened by a random share of up to this fraction (0.0–0.5), so entries
    /// written together do not expire together.
    pub ttl_jitter: f64,
    /// Budget of the response memo (the stitched answers of repeated, fully cached requests,
    /// keyed by credential and exact body); `0B` turns it off.
    pub memo_max_bytes: ByteSize,
    /// A write passing through (`batchoperate`) drops the entries it can make wrong at once, and
    /// again after this delay, because TPNS applies writes asynchronously. `0s`: only at once.
    #[serde(with = "humantime_serde")]
    pub invalidate_again_after: Duration,
}

/// The upstream shield: coalescing, micro-batching, quota limiter, retries and breaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShieldConfig {
    /// How long misses of concurrent requests (same app, credential, operator_type and top-level
    /// fields) are gathered into one upstream call; `0s` turns micro-batching off.
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    /// Upstream calls per second, all apps together (GCRA); 0 = unlimited.
    pub calls_per_second: u32,
    /// Calls that may go at once above the rate (the GCRA burst).
    pub burst: u32,
    /// Upstream calls per second per AccessID; 0 = unlimited.
    pub per_app_calls_per_second: u32,
    /// Identifiers sent upstream per second, all apps together; 0 = unlimited.
    pub identifiers_per_second: u32,
    /// Longest a call waits for the limiter before it is refused (stale or 1008028).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Most calls waiting for the limiter at once.
    pub max_queue: usize,
    /// After the upstream answers 1008028 for an app, no calls for it for this long.
    #[serde(with = "humantime_serde")]
    pub rate_limited_cooldown: Duration,
    /// Share of `calls_per_second` (and `burst`) that calls made for credentials the upstream
    /// has not accepted yet may use, so a flood of wrong secrets cannot spend the quota of the
    /// apps whose credentials are good (0.0–1.0).
    pub unverified_share: f64,
    /// Retries earned per upstream call (a failed sub-request is retried once on a connection
    /// error while the budget allows); 0 = no retries.
    pub retry_budget_ratio: f64,
    /// Consecutive upstream failures that open the circuit breaker; 0 = no breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before one probe call.
    #[serde(with = "humantime_serde")]
    pub breaker_open_for: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    /// Top-level `retCode` of a stitched answer where some, not all, elements have a non-`"0"` code.
    pub partial_failure_ret_code: i64,
    /// Top-level `retCode` of a stitched answer where every element has a non-`"0"` code.
    pub all_failed_ret_code: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Query bodies larger than this are refused before being read whole.
    pub max_body_bytes: ByteSize,
    /// Most identifiers in one client query.
    pub max_items: usize,
    /// Longest identifier (account or token), in bytes of UTF-8.
    pub max_identifier_bytes: usize,
    /// A client must send its request headers within this time (slowloris guard).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client must send a whole query body within this time.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Deepest JSON nesting accepted in a query body.
    pub max_json_depth: usize,
    /// Most members of a query's top-level object and of each `account_list` element.
    pub max_fields: usize,
    /// Largest size of a query's unknown fields (top-level, or of one element), which become
    /// part of its cache keys; a query above it is forwarded unchanged and not cached.
    pub max_scope_bytes: ByteSize,
    /// Most request-body bytes held in memory at once, over all connections; a request that
    /// would pass it is answered 503 at once.
    pub max_buffered_bytes: ByteSize,
    /// A response that the client does not take within this time ends the connection.
    #[serde(with = "humantime_serde")]
    pub response_write_timeout: Duration,
    /// Largest request head (request line + headers); larger ones get HTTP 431.
    pub max_header_bytes: ByteSize,
    /// Most client connections open at once on the proxy listener; more wait to be accepted.
    pub max_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// How long a credential the upstream accepted may be served from cache without asking again.
    #[serde(with = "humantime_serde")]
    pub accepted_ttl: Duration,
    /// Most accepted credentials remembered (as keyed hashes).
    pub accepted_max: u64,
    /// A credential the upstream refused (1008003, 10030002) is answered 1008003 locally for
    /// this long, without another upstream call.
    #[serde(with = "humantime_serde")]
    pub refused_ttl: Duration,
    /// Most refused credentials remembered (as keyed hashes).
    pub refused_max: u64,
    /// Largest difference allowed between a signed request's `TimeStamp` and the proxy's clock.
    #[serde(with = "humantime_serde")]
    pub signature_max_skew: Duration,
    /// Apps whose SecretKey the proxy holds: their signed requests are verified, cached and
    /// re-signed per upstream sub-request.
    #[serde(default)]
    pub apps: Vec<AppKeyConfig>,
    /// Credentials added to requests that arrive with none (the sidecar set-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject: Option<InjectConfig>,
}

/// An app's SecretKey, from a file or an environment variable (never inline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppKeyConfig {
    pub access_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_env: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectConfig {
    pub access_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_env: Option<String>,
    /// How the credentials are sent upstream: `basic` or `signature`.
    #[serde(default = "default_scheme")]
    pub scheme: AuthScheme,
}

fn default_scheme() -> AuthScheme {
    AuthScheme::Basic
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthScheme {
    Basic,
    Signature,
}

/// TLS on a listener: PEM certificate chain and private key files.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some()
    }
    fn check(&self, key: &str, problems: &mut Vec<String>) {
        match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                for (name, path) in [("cert_file", c), ("key_file", k)] {
                    if !path.exists() {
                        problems.push(format!("{key}.{name}: {} does not exist", path.display()));
                    }
                }
            }
            (None, None) => {}
            _ => problems.push(format!("{key}: set both cert_file and key_file")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter directive (`RUST_LOG` syntax); `RUST_LOG` overrides it when set.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Why the configuration could not be loaded. Each message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl ConfigError {
    /// `Ok` when there is no problem, else every problem at once.
    pub fn from_problems(problems: Vec<String>) -> Result<(), ConfigError> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

impl Config {
    /// Loads defaults < `file` (or the file named by `TPNS_CACHE_CONFIG`) < `TPNS_CACHE_*` env,
    /// and checks the values (see [`Config::validate`]).
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let config = Self::load_unchecked(file)?;
        config.validate()?;
        Ok(config)
    }

    /// [`Config::load`] without [`Config::validate`] (for a caller that checks more at once).
    pub fn load_unchecked(file: Option<&Path>) -> Result<Config, ConfigError> {
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(ENV_CONFIG_FILE).map(PathBuf::from));
        Self::from_figment_unchecked(Self::figment(file.as_deref())?)
    }

    /// The layered providers, without the built-in defaults (so we can see what the user set).
    fn user_layers(file: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut fig = Figment::new();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.to_path_buf()));
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        Ok(fig.merge(Env::prefixed(ENV_PREFIX).ignore(&["config"]).split("__")))
    }

    pub fn figment(file: Option<&Path>) -> Result<Figment, ConfigError> {
        let user = Self::user_layers(file)?;
        if user.contains("upstream.url") && user.contains("upstream.region") {
            return Err(ConfigError::Invalid(vec![
                "upstream.url and upstream.region are both set; set only one".to_owned(),
            ]));
        }
        Ok(Figment::from(Serialized::defaults(Config::default())).merge(user))
    }

    pub fn from_figment(fig: Figment) -> Result<Config, ConfigError> {
        let config = Self::from_figment_unchecked(fig)?;
        config.validate()?;
        Ok(config)
    }

    fn from_figment_unchecked(fig: Figment) -> Result<Config, ConfigError> {
        let mut config: Config = fig.extract().map_err(|e| {
            let all: Vec<String> = e.into_iter().map(describe_figment_error).collect();
            ConfigError::Parse(all.join("; "))
        })?;
        if let Some(region) = config.upstream.region {
            config.upstream.url = region.base_url().to_owned();
        }
        Ok(config)
    }
}

impl Config {
    /// The effective settings a deployment must agree with, as JSON (`check-config --json`):
    /// the listeners its ports and probes name, the shutdown grace its termination period must
    /// exceed, whether the admin token is set and fleet mode is on. Computed from the loaded
    /// configuration (defaults, file and environment), so a deployment check never re-reads the
    /// TOML or repeats a default. Holds no secret: only whether one is configured.
    pub fn deployment_summary(&self) -> serde_json::Value {
        serde_json::json!({
            "listen": self.listen.to_string(),
            "admin_listen": self.admin_listen.to_string(),
            "shutdown_grace_seconds": self.shutdown_grace.as_secs_f64(),
            "admin_token": self.admin.token_file.is_some() || self.admin.token_env.is_some(),
            "cache_max_bytes": self.cache.max_bytes.as_u64(),
            "fleet": !self.redis.url.is_empty(),
        })
    }
}

/// A listener address: an IP address and a port. `localhost:<port>` is taken as
/// `127.0.0.1:<port>`; any other host name is refused with a message saying why (a listener
/// binds an address, and a sidecar's is normally loopback).
fn listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen(&text).map_err(serde::de::Error::custom)
}

/// See [`listen_addr`].
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    Err(format!(
        "`{text}` is not an IP address and port, such as 127.0.0.1:8080 or 0.0.0.0:9090 \
         (a listener binds an address; host names other than localhost are not resolved)"
    ))
}

/// Figment's messages name the key in `path`; make sure every message leads with it.
fn describe_figment_error(e: figment::Error) -> String {
    let key = e.path.join(".");
    let source = e
        .metadata
        .as_ref()
        .map(|m| m.name.to_string())
        .unwrap_or_default();
    let kind = e.kind.to_string();
    match (key.is_empty(), source.is_empty()) {
        (true, true) => kind,
        (true, false) => format!("{kind} (in {source})"),
        (false, true) => format!("{key}: {kind}"),
        (false, false) => format!("{key}: {kind} (in {source})"),
    }
}

#[cfg(test)]
mod tests;
