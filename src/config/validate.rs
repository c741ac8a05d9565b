//! Every rule a configuration must keep, all checked at once so every problem is named.

use std::time::Duration;

use super::*;

impl Config {
    /// Checks every value and reports all problems at once. What only the components that use
    /// a setting can judge (the egress TLS roots and proxy route, the Redis target) is checked
    /// by them: [`crate::load_config`] gathers both, which is what the binary runs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::from_problems(self.problems())
    }

    /// Every problem the values themselves show (see [`Config::validate`]).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(why) = crate::http::BaseUrl::parse(&self.upstream.url) {
            problems.push(format!("upstream.url: {why}"));
        }
        if self.shutdown_grace > Duration::from_secs(600) {
            problems.push("shutdown_grace: must be at most 10m".to_owned());
        }
        if self.upstream.proxy_auth_file.is_some() && self.upstream.proxy_auth_env.is_some() {
            problems.push(
                "upstream.proxy_auth_file and upstream.proxy_auth_env are both set; set only one"
                    .to_owned(),
            );
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
        if self.redis.url.is_empty()
            && (self.redis.cluster
                || !self.redis.username.is_empty()
                || self.redis.password_file.is_some()
                || self.redis.password_env.is_some()
                || self.redis.ca_file.is_some())
        {
            problems
                .push("redis.url: empty (fleet mode off), but other redis keys are set".to_owned());
        }
        if self.redis.password_file.is_some() && self.redis.password_env.is_some() {
            problems.push(
                "redis.password_file and redis.password_env are both set; set only one".to_owned(),
            );
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
        if let Err(e) = super::parse_filter(&self.log.level) {
            problems.push(format!("log.level: {e}"));
        }
        problems
    }
}
