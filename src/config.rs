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

/// Environment variable prefix; nesting levels are separated by `__`.
pub const ENV_PREFIX: &str = "TPNS_CACHE_";
/// Environment variable naming the config file (used when `--config` is not given).
pub const ENV_CONFIG_FILE: &str = "TPNS_CACHE_CONFIG";

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);
pub const DEFAULT_REDIS_KEY_PREFIX: &str = "tpns-cache";
pub const DEFAULT_REDIS_LOCAL_SHARE: f64 = 1.0;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The Guangzhou access point, TPNS's default.
pub const DEFAULT_UPSTREAM_URL: &str = "https://api.tpns.tencent.com";
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_UPSTREAM_MAX_BATCH: usize = 100;
/// Upper bound for `upstream.max_batch`: the largest list any documented TPNS API accepts.
pub const MAX_UPSTREAM_MAX_BATCH: usize = 1000;
pub const DEFAULT_UPSTREAM_MAX_RESPONSE_BYTES: u64 = 8 * 1024 * 1024;
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_CACHE_NEGATIVE_TTL: Duration = Duration::from_secs(10);
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 256 * 1024 * 1024;
pub const DEFAULT_STALE_WHILE_REVALIDATE: Duration = Duration::from_secs(30);
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(600);
pub const DEFAULT_TTL_JITTER: f64 = 0.1;
pub const DEFAULT_MEMO_MAX_BYTES: u64 = 16 * 1024 * 1024;
pub const DEFAULT_INVALIDATE_AGAIN_AFTER: Duration = Duration::from_secs(5);
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(2);
/// TPNS publishes no QPS for the account APIs; set this to your quota.
pub const DEFAULT_CALLS_PER_SECOND: u32 = 100;
pub const DEFAULT_BURST: u32 = 20;
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(500);
pub const DEFAULT_MAX_QUEUE: usize = 1024;
pub const DEFAULT_RATE_LIMITED_COOLDOWN: Duration = Duration::from_secs(5);
pub const DEFAULT_RETRY_BUDGET_RATIO: f64 = 0.1;
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
pub const DEFAULT_BREAKER_OPEN_FOR: Duration = Duration::from_secs(10);
pub const DEFAULT_PARTIAL_FAILURE_RET_CODE: i64 = 1_008_026;
pub const DEFAULT_ALL_FAILED_RET_CODE: i64 = 1_008_027;
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_MAX_ITEMS: usize = 1000;
/// Accounts are documented as at most 100 characters: 400 bytes of UTF-8. Tokens are 64 bytes.
pub const DEFAULT_MAX_IDENTIFIER_BYTES: usize = 400;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_SIGNATURE_MAX_SKEW: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_JSON_DEPTH: usize = 32;
/// A query has at most four documented top-level fields, an `account_list` element two;
/// unknown ones are passed through.
pub const DEFAULT_MAX_FIELDS: usize = 16;
pub const DEFAULT_MAX_SCOPE_BYTES: u64 = 4 * 1024;
pub const DEFAULT_MAX_BUFFERED_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_RESPONSE_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_REFUSED_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_REFUSED_MAX: u64 = 10_000;
pub const DEFAULT_UNVERIFIED_SHARE: f64 = 0.1;
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 16 * 1024;
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_ACCEPTED_TTL: Duration = Duration::from_secs(300);
pub const DEFAULT_ACCEPTED_MAX: u64 = 10_000;
pub const DEFAULT_LOG_LEVEL: &str = "info";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the proxy listener the app talks to.
    pub listen: SocketAddr,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
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

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: parse_addr(DEFAULT_LISTEN),
            admin_listen: parse_addr(DEFAULT_ADMIN_LISTEN),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            upstream: UpstreamConfig {
                url: DEFAULT_UPSTREAM_URL.to_owned(),
                region: None,
                timeout: DEFAULT_UPSTREAM_TIMEOUT,
                connect_timeout: DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
                max_batch: DEFAULT_UPSTREAM_MAX_BATCH,
                max_response_bytes: ByteSize::b(DEFAULT_UPSTREAM_MAX_RESPONSE_BYTES),
            },
            cache: CacheConfig {
                ttl: DEFAULT_CACHE_TTL,
                negative_ttl: DEFAULT_CACHE_NEGATIVE_TTL,
                max_bytes: ByteSize::b(DEFAULT_CACHE_MAX_BYTES),
                stale_while_revalidate: DEFAULT_STALE_WHILE_REVALIDATE,
                stale_if_error: DEFAULT_STALE_IF_ERROR,
                ttl_jitter: DEFAULT_TTL_JITTER,
                memo_max_bytes: ByteSize::b(DEFAULT_MEMO_MAX_BYTES),
                invalidate_again_after: DEFAULT_INVALIDATE_AGAIN_AFTER,
            },
            shield: ShieldConfig {
                batch_window: DEFAULT_BATCH_WINDOW,
                calls_per_second: DEFAULT_CALLS_PER_SECOND,
                burst: DEFAULT_BURST,
                per_app_calls_per_second: 0,
                identifiers_per_second: 0,
                max_wait: DEFAULT_MAX_WAIT,
                max_queue: DEFAULT_MAX_QUEUE,
                rate_limited_cooldown: DEFAULT_RATE_LIMITED_COOLDOWN,
                unverified_share: DEFAULT_UNVERIFIED_SHARE,
                retry_budget_ratio: DEFAULT_RETRY_BUDGET_RATIO,
                breaker_failures: DEFAULT_BREAKER_FAILURES,
                breaker_open_for: DEFAULT_BREAKER_OPEN_FOR,
            },
            query: QueryConfig {
                partial_failure_ret_code: DEFAULT_PARTIAL_FAILURE_RET_CODE,
                all_failed_ret_code: DEFAULT_ALL_FAILED_RET_CODE,
            },
            limits: LimitsConfig {
                max_body_bytes: ByteSize::b(DEFAULT_MAX_BODY_BYTES),
                max_items: DEFAULT_MAX_ITEMS,
                max_identifier_bytes: DEFAULT_MAX_IDENTIFIER_BYTES,
                header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
                body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
                max_json_depth: DEFAULT_MAX_JSON_DEPTH,
                max_fields: DEFAULT_MAX_FIELDS,
                max_scope_bytes: ByteSize::b(DEFAULT_MAX_SCOPE_BYTES),
                max_buffered_bytes: ByteSize::b(DEFAULT_MAX_BUFFERED_BYTES),
                response_write_timeout: DEFAULT_RESPONSE_WRITE_TIMEOUT,
                max_header_bytes: ByteSize::b(DEFAULT_MAX_HEADER_BYTES),
                max_connections: DEFAULT_MAX_CONNECTIONS,
            },
            auth: AuthConfig {
                accepted_ttl: DEFAULT_ACCEPTED_TTL,
                accepted_max: DEFAULT_ACCEPTED_MAX,
                refused_ttl: DEFAULT_REFUSED_TTL,
                refused_max: DEFAULT_REFUSED_MAX,
                signature_max_skew: DEFAULT_SIGNATURE_MAX_SKEW,
                apps: Vec::new(),
                inject: None,
            },
            tls: TlsConfig::default(),
            admin: AdminConfig::default(),
            redis: RedisConfig {
                url: String::new(),
                timeout: DEFAULT_REDIS_TIMEOUT,
                key_prefix: DEFAULT_REDIS_KEY_PREFIX.to_owned(),
                local_share: DEFAULT_REDIS_LOCAL_SHARE,
            },
            log: LogConfig {
                level: DEFAULT_LOG_LEVEL.to_owned(),
                format: LogFormat::Text,
            },
        }
    }
}

fn parse_addr(s: &str) -> SocketAddr {
    // The defaults are literals checked by `defaults_are_valid`; no input reaches this.
    s.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
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

impl Config {
    /// Loads defaults < `file` (or the file named by `TPNS_CACHE_CONFIG`) < `TPNS_CACHE_*` env.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(ENV_CONFIG_FILE).map(PathBuf::from));
        Self::from_figment(Self::figment(file.as_deref())?)
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
        let mut config: Config = fig.extract().map_err(|e| {
            let all: Vec<String> = e.into_iter().map(describe_figment_error).collect();
            ConfigError::Parse(all.join("; "))
        })?;
        if let Some(region) = config.upstream.region {
            config.upstream.url = region.base_url().to_owned();
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every value and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(why) = crate::upstream::UpstreamBase::parse(&self.upstream.url) {
            problems.push(format!("upstream.url: {why}"));
        }
        if self.shutdown_grace > Duration::from_secs(600) {
            problems.push("shutdown_grace: must be at most 10m".to_owned());
        }
        if self.upstream.timeout.is_zero() {
            problems.push("upstream.timeout: must be greater than 0".to_owned());
        }
        if self.upstream.connect_timeout.is_zero() {
            problems.push("upstream.connect_timeout: must be greater than 0".to_owned());
        }
        if self.upstream.max_batch == 0 || self.upstream.max_batch > MAX_UPSTREAM_MAX_BATCH {
            problems.push(format!(
                "upstream.max_batch: must be between 1 and {MAX_UPSTREAM_MAX_BATCH}, got {}",
                self.upstream.max_batch
            ));
        }
        if self.upstream.max_response_bytes.as_u64() < 1024 {
            problems.push("upstream.max_response_bytes: must be at least 1 KiB".to_owned());
        }
        if self.cache.ttl.is_zero() {
            problems.push("cache.ttl: must be greater than 0".to_owned());
        }
        if self.cache.max_bytes.as_u64() < 1024 * 1024 {
            problems.push("cache.max_bytes: must be at least 1 MiB".to_owned());
        }
        if self.cache.max_bytes.as_u64() > (1u64 << 46) {
            problems.push("cache.max_bytes: must be at most 64 TiB".to_owned());
        }
        if !(0.0..=0.5).contains(&self.cache.ttl_jitter) {
            problems.push(format!(
                "cache.ttl_jitter: must be between 0.0 and 0.5, got {}",
                self.cache.ttl_jitter
            ));
        }
        if self.shield.batch_window > Duration::from_secs(1) {
            problems.push("shield.batch_window: must be at most 1s".to_owned());
        }
        if self.shield.burst == 0 {
            problems.push("shield.burst: must be at least 1".to_owned());
        }
        if self.shield.max_queue == 0 {
            problems.push("shield.max_queue: must be at least 1".to_owned());
        }
        if !(0.0..=1.0).contains(&self.shield.retry_budget_ratio) {
            problems.push(format!(
                "shield.retry_budget_ratio: must be between 0.0 and 1.0, got {}",
                self.shield.retry_budget_ratio
            ));
        }
        if self.shield.breaker_open_for.is_zero() {
            problems.push("shield.breaker_open_for: must be greater than 0".to_owned());
        }
        if self.limits.max_body_bytes.as_u64() < 64 {
            problems.push("limits.max_body_bytes: must be at least 64 B".to_owned());
        }
        if self.limits.max_items == 0 {
            problems.push("limits.max_items: must be at least 1".to_owned());
        }
        if self.limits.max_identifier_bytes == 0 {
            problems.push("limits.max_identifier_bytes: must be at least 1".to_owned());
        }
        if self.limits.header_read_timeout.is_zero() {
            problems.push("limits.header_read_timeout: must be greater than 0".to_owned());
        }
        if self.limits.body_read_timeout.is_zero() {
            problems.push("limits.body_read_timeout: must be greater than 0".to_owned());
        }
        if !(2..=128).contains(&self.limits.max_json_depth) {
            problems.push("limits.max_json_depth: must be between 2 and 128".to_owned());
        }
        if !(4..=1000).contains(&self.limits.max_fields) {
            problems.push("limits.max_fields: must be between 4 and 1000".to_owned());
        }
        if self.limits.max_buffered_bytes < self.limits.max_body_bytes {
            problems.push(
                "limits.max_buffered_bytes: must be at least limits.max_body_bytes".to_owned(),
            );
        }
        if !(self.shield.unverified_share > 0.0 && self.shield.unverified_share <= 1.0) {
            problems.push(format!(
                "shield.unverified_share: must be in (0, 1], got {}",
                self.shield.unverified_share
            ));
        }
        if self.auth.refused_max == 0 {
            problems.push("auth.refused_max: must be at least 1".to_owned());
        }
        // Upper bounds: every duration is added to a clock somewhere, and a huge one would
        // overflow it. The bounds are far above any sensible setting.
        let day = Duration::from_secs(86_400);
        for (key, value, max, shown) in [
            ("cache.ttl", self.cache.ttl, 30 * day, "30d"),
            (
                "cache.negative_ttl",
                self.cache.negative_ttl,
                30 * day,
                "30d",
            ),
            (
                "cache.stale_while_revalidate",
                self.cache.stale_while_revalidate,
                30 * day,
                "30d",
            ),
            (
                "cache.stale_if_error",
                self.cache.stale_if_error,
                30 * day,
                "30d",
            ),
            (
                "upstream.timeout",
                self.upstream.timeout,
                Duration::from_secs(600),
                "10m",
            ),
            (
                "upstream.connect_timeout",
                self.upstream.connect_timeout,
                Duration::from_secs(600),
                "10m",
            ),
            (
                "shield.max_wait",
                self.shield.max_wait,
                Duration::from_secs(60),
                "1m",
            ),
            (
                "shield.rate_limited_cooldown",
                self.shield.rate_limited_cooldown,
                Duration::from_secs(3600),
                "1h",
            ),
            (
                "shield.breaker_open_for",
                self.shield.breaker_open_for,
                Duration::from_secs(3600),
                "1h",
            ),
            (
                "limits.header_read_timeout",
                self.limits.header_read_timeout,
                Duration::from_secs(3600),
                "1h",
            ),
            (
                "limits.body_read_timeout",
                self.limits.body_read_timeout,
                Duration::from_secs(3600),
                "1h",
            ),
            (
                "limits.response_write_timeout",
                self.limits.response_write_timeout,
                Duration::from_secs(3600),
                "1h",
            ),
            ("auth.accepted_ttl", self.auth.accepted_ttl, day, "1d"),
            ("auth.refused_ttl", self.auth.refused_ttl, day, "1d"),
            (
                "auth.signature_max_skew",
                self.auth.signature_max_skew,
                day,
                "1d",
            ),
        ] {
            if value > max {
                problems.push(format!("{key}: must be at most {shown}"));
            }
        }
        if self.limits.response_write_timeout.is_zero() {
            problems.push("limits.response_write_timeout: must be greater than 0".to_owned());
        }
        if self.limits.max_header_bytes.as_u64() < 8192 {
            problems.push("limits.max_header_bytes: must be at least 8 KiB".to_owned());
        }
        if self.limits.max_connections == 0 {
            problems.push("limits.max_connections: must be at least 1".to_owned());
        }
        if self.auth.signature_max_skew.is_zero() {
            problems.push("auth.signature_max_skew: must be greater than 0".to_owned());
        }
        if let Err(e) = self.keys() {
            problems.extend(e);
        }
        self.tls.check("tls", &mut problems);
        self.admin.tls.check("admin.tls", &mut problems);
        if self.auth.accepted_ttl.is_zero() {
            problems.push("auth.accepted_ttl: must be greater than 0".to_owned());
        }
        if self.auth.accepted_max == 0 {
            problems.push("auth.accepted_max: must be at least 1".to_owned());
        }
        if self.cache.invalidate_again_after > Duration::from_secs(3600) {
            problems.push("cache.invalidate_again_after: must be at most 1h".to_owned());
        }
        if self.admin.token_file.is_some() && self.admin.token_env.is_some() {
            problems
                .push("admin.token_file and admin.token_env are both set; set only one".to_owned());
        }
        if let Err(e) = self.admin_token() {
            problems.push(e);
        }
        if !self.redis.url.is_empty() {
            if let Err(e) = redis::Client::open(self.redis.url.as_str()) {
                problems.push(format!("redis.url: {e}"));
            }
        }
        if self.redis.timeout.is_zero() || self.redis.timeout > Duration::from_secs(5) {
            problems.push("redis.timeout: must be between 1ms and 5s".to_owned());
        }
        if !(self.redis.local_share > 0.0 && self.redis.local_share <= 1.0) {
            problems.push(format!(
                "redis.local_share: must be in (0, 1], got {}",
                self.redis.local_share
            ));
        }
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(char::is_whitespace) {
            problems.push("redis.key_prefix: must be non-empty, without spaces".to_owned());
        }
        if let Err(e) = crate::logging::parse_filter(&self.log.level) {
            problems.push(format!("log.level: {e}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// A secret value: never printed by `Debug`, compared in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Constant-time equality with `other`.
    pub fn matches(&self, other: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == other.len() && bool::from(self.0.as_bytes().ct_eq(other))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Reads a secret from a file or an environment variable; the message names `key` on failure
/// (never the value).
pub fn read_secret(
    key: &str,
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<Option<Secret>, String> {
    let value = match (file, env) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| format!("{key}_file: cannot read {}: {e}", path.display()))?,
        (None, Some(var)) => std::env::var(var)
            .map_err(|_| format!("{key}_env: environment variable {var} is not set"))?,
        (None, None) => return Ok(None),
    };
    let value = value.trim().to_owned();
    if value.is_empty() {
        return Err(format!("{key}: the secret is empty"));
    }
    Ok(Some(Secret(value)))
}

/// The secrets the proxy holds, read from their files or environment variables.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// AccessID → SecretKey, for verifying and re-signing signed requests.
    pub apps: std::collections::HashMap<String, Secret>,
    /// The injected credentials, if configured.
    pub inject: Option<Injected>,
}

#[derive(Debug, Clone)]
pub struct Injected {
    pub access_id: String,
    pub secret: Secret,
    pub scheme: AuthScheme,
}

impl Config {
    /// Reads every configured app key and the injected credentials.
    pub fn keys(&self) -> Result<Keys, Vec<String>> {
        let mut problems = Vec::new();
        let mut keys = Keys::default();
        for (i, app) in self.auth.apps.iter().enumerate() {
            let key = format!("auth.apps[{i}].secret_key");
            if app.access_id.is_empty() {
                problems.push(format!("auth.apps[{i}].access_id: must not be empty"));
            }
            match read_secret(
                &key,
                app.secret_key_file.as_deref(),
                app.secret_key_env.as_deref(),
            ) {
                Ok(Some(s)) => {
                    if keys.apps.insert(app.access_id.clone(), s).is_some() {
                        problems.push(format!(
                            "auth.apps[{i}].access_id: {} is listed twice",
                            app.access_id
                        ));
                    }
                }
                Ok(None) => problems.push(format!("{key}_file or {key}_env: one must be set")),
                Err(e) => problems.push(e),
            }
        }
        if let Some(inj) = &self.auth.inject {
            if inj.access_id.is_empty() || inj.access_id.contains(':') {
                problems
                    .push("auth.inject.access_id: must be non-empty and without ':'".to_owned());
            }
            let key = "auth.inject.secret_key";
            match read_secret(
                key,
                inj.secret_key_file.as_deref(),
                inj.secret_key_env.as_deref(),
            ) {
                Ok(Some(secret)) => {
                    keys.inject = Some(Injected {
                        access_id: inj.access_id.clone(),
                        secret,
                        scheme: inj.scheme,
                    })
                }
                Ok(None) => problems.push(format!("{key}_file or {key}_env: one must be set")),
                Err(e) => problems.push(e),
            }
        }
        if problems.is_empty() {
            Ok(keys)
        } else {
            Err(problems)
        }
    }

    /// The admin bearer token, if configured.
    pub fn admin_token(&self) -> Result<Option<Secret>, String> {
        read_secret(
            "admin.token",
            self.admin.token_file.as_deref(),
            self.admin.token_env.as_deref(),
        )
    }
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
// figment's Jail closures return its (large) error type by design.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid() {
        let c = Config::default();
        c.validate().expect("defaults validate");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
    }

    /// `config/tpns-cache.toml` lists every key (it parses without defaults) and equals them.
    #[test]
    fn shipped_toml_equals_builtin_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tpns-cache.toml");
        let from_file: Config = Figment::from(Toml::file_exact(&path))
            .extract()
            .expect("shipped config parses on its own, with every key present");
        assert_eq!(from_file, Config::default());
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "listen = \"127.0.0.1:7000\"\n[cache]\nttl = \"45s\"\nnegative_ttl = \"3s\"\n",
            )?;
            jail.set_env("TPNS_CACHE_LISTEN", "127.0.0.1:7070");
            jail.set_env("TPNS_CACHE_UPSTREAM__URL", "http://127.0.0.1:9000");
            jail.set_env("TPNS_CACHE_CACHE__TTL", "30s");
            jail.set_env("TPNS_CACHE_UPSTREAM__MAX_BATCH", "20");
            let c = Config::load(Some(Path::new("c.toml"))).expect("loads");
            assert_eq!(c.listen.to_string(), "127.0.0.1:7070");
            assert_eq!(c.upstream.url, "http://127.0.0.1:9000");
            assert_eq!(c.cache.ttl, Duration::from_secs(30));
            assert_eq!(c.cache.negative_ttl, Duration::from_secs(3));
            assert_eq!(c.upstream.max_batch, 20);
            assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
            Ok(())
        });
    }

    #[test]
    fn config_file_from_env_variable() {
        Jail::expect_with(|jail| {
            jail.create_file("x.toml", "[upstream]\nmax_batch = 7\n")?;
            jail.set_env(ENV_CONFIG_FILE, "x.toml");
            let c = Config::load(None).expect("loads");
            assert_eq!(c.upstream.max_batch, 7);
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_named() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[cache]\nttl = \"1s\"\nttl_secs = 5\n")?;
            let err = Config::load(Some(Path::new("c.toml"))).expect_err("must fail");
            let msg = err.to_string();
            assert!(msg.contains("ttl_secs"), "{msg}");
            assert!(msg.contains("cache"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn unknown_env_key_is_named() {
        Jail::expect_with(|jail| {
            jail.set_env("TPNS_CACHE_UPSTREAM__URLL", "http://x");
            let msg = Config::load(None).expect_err("must fail").to_string();
            assert!(msg.contains("urll"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn invalid_values_are_all_reported_by_key() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[upstream]\nurl = \"ftp://x\"\nmax_batch = 0\n[cache]\nttl = \"0s\"\n",
            )?;
            let msg = Config::load(Some(Path::new("c.toml")))
                .expect_err("must fail")
                .to_string();
            for key in ["upstream.url", "upstream.max_batch", "cache.ttl"] {
                assert!(msg.contains(key), "{key} missing in {msg}");
            }
            Ok(())
        });
    }

    /// Regression: lifetimes had no upper bound, so adding one to a clock could overflow.
    #[test]
    fn huge_durations_are_refused_by_key() {
        Jail::expect_with(|jail| {
            jail.set_env("TPNS_CACHE_CACHE__TTL", "100000000y");
            jail.set_env("TPNS_CACHE_CACHE__STALE_IF_ERROR", "1000y");
            jail.set_env("TPNS_CACHE_SHIELD__MAX_WAIT", "2h");
            let msg = Config::load(None).expect_err("must fail").to_string();
            for key in ["cache.ttl", "cache.stale_if_error", "shield.max_wait"] {
                assert!(msg.contains(key), "{key} missing in {msg}");
            }
            Ok(())
        });
    }

    #[test]
    fn wrong_type_names_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("TPNS_CACHE_CACHE__TTL", "soon");
            let msg = Config::load(None).expect_err("must fail").to_string();
            assert!(msg.contains("cache.ttl"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn region_shorthand() {
        Jail::expect_with(|jail| {
            jail.set_env("TPNS_CACHE_UPSTREAM__REGION", "hk");
            let c = Config::load(None).expect("loads");
            assert_eq!(c.upstream.url, "https://api.tpns.hk.tencent.com");
            jail.set_env("TPNS_CACHE_UPSTREAM__URL", "http://127.0.0.1:1");
            let msg = Config::load(None).expect_err("both set").to_string();
            assert!(msg.contains("upstream.region"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn admin_token_from_file_or_env_never_printed() {
        Jail::expect_with(|jail| {
            jail.create_file("token", "s3cr3t-token\n")?;
            jail.set_env("TPNS_CACHE_ADMIN__TOKEN_FILE", "token");
            let c = Config::load(None).expect("loads");
            let t = c.admin_token().expect("reads").expect("set");
            assert_eq!(t.expose(), "s3cr3t-token");
            assert!(t.matches(b"s3cr3t-token") && !t.matches(b"s3cr3t-tokex"));
            assert!(!format!("{t:?}").contains("s3cr3t"));
            jail.set_env("TPNS_CACHE_ADMIN__TOKEN_FILE", "missing");
            let msg = Config::load(None).expect_err("missing file").to_string();
            assert!(msg.contains("admin.token_file"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/tpns.toml"))).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/tpns.toml"));
    }
}
