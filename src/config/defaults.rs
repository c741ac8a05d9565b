//! The built-in default of every key, with its unit; `config/tpns-cache.toml` repeats them all
//! (a test proves the two agree).

use std::net::SocketAddr;
use std::time::Duration;

use bytesize::ByteSize;

use super::*;

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
                ca_file: None,
                proxy: String::new(),
                proxy_auth_file: None,
                proxy_auth_env: None,
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
                cluster: false,
                username: String::new(),
                password_file: None,
                password_env: None,
                ca_file: None,
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
