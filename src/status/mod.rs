//! The status page on the admin listener: `GET /` (one self-contained HTML page, built into the
//! binary, no external scripts, fonts or images, served under a strict Content-Security-Policy)
//! and `GET /status.json` (what the page shows, for scripts too).
//!
//! One source of truth: every number is read from the Prometheus text that `/metrics` serves
//! (the same registry, encoded the same way), never from counters of its own. The only state
//! kept here is a short history of a few of those numbers (one sample every
//! [`SAMPLE_EVERY`], the last [`HISTORY`] samples: ten minutes) for the "now" figures and the
//! sparkline. Secrets never appear: configuration keys that name a secret's file or variable
//! are shown as `set`.

mod scrape;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::Config;
use scrape::Scrape;

/// How often the history takes a sample.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How many samples the history keeps.
pub(crate) const HISTORY: usize = 120;

/// Configuration keys whose values name where a secret is; shown as `set`.
const SECRET_POINTERS: [&str; 8] = [
    "secret_key_file",
    "secret_key_env",
    "token_file",
    "token_env",
    "password_file",
    "password_env",
    "proxy_auth_file",
    "proxy_auth_env",
];

/// The numbers one sample keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Sample {
    /// Seconds since the process started.
    at: f64,
    lookups: f64,
    hits: f64,
    upstream_calls: f64,
}

impl Sample {
    fn of(s: &Scrape, at: f64) -> Sample {
        Sample {
            at,
            lookups: s.sum("tpns_cache_lookups_total", &[]),
            hits: hits(s),
            upstream_calls: upstream_calls(s),
        }
    }
}

/// Identifiers answered without an upstream fetch of their own (as the alert rules count).
fn hits(s: &Scrape) -> f64 {
    ["hit", "negative_hit", "stale", "shared_hit", "coalesced"]
        .iter()
        .map(|o| s.sum("tpns_cache_lookups_total", &[("outcome", o)]))
        .sum()
}

/// Upstream query calls made (not those the shield refused).
fn upstream_calls(s: &Scrape) -> f64 {
    s.sum("tpns_cache_upstream_requests_total", &[("route", "query")])
        - s.sum(
            "tpns_cache_upstream_requests_total",
            &[("route", "query"), ("outcome", "rate_limited")],
        )
        - s.sum(
            "tpns_cache_upstream_requests_total",
            &[("route", "query"), ("outcome", "circuit_open")],
        )
}

fn ratio(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0).then(|| part / whole)
}

/// What the status page needs besides the metrics.
#[derive(Debug)]
pub(crate) struct Status {
    started: Instant,
    upstream_url: String,
    calls_per_second: u32,
    max_bytes: u64,
    fleet: bool,
    /// The effective configuration, flattened, secrets as `set`.
    config: BTreeMap<String, Value>,
    history: Mutex<VecDeque<Sample>>,
    page: Page,
}

impl Status {
    pub(crate) fn new(config: &Config) -> Status {
        Status {
            started: Instant::now(),
            upstream_url: config.upstream.url.clone(),
            calls_per_second: config.shield.calls_per_second,
            max_bytes: config.cache.max_bytes.as_u64(),
            fleet: !config.redis.url.is_empty(),
            config: flat_config(config),
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            page: Page::build(),
        }
    }

    fn uptime(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Records a sample of `metrics` (the `/metrics` text); the oldest goes past [`HISTORY`].
    pub(crate) fn sample(&self, metrics: &str) {
        let sample = Sample::of(&Scrape::parse(metrics), self.uptime());
        let mut h = self.history.lock();
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(sample);
    }

    /// `/status.json`, from `metrics` (the `/metrics` text at this moment).
    pub(crate) fn snapshot(&self, metrics: &str) -> StatusJson {
        let s = Scrape::parse(metrics);
        let now = Sample::of(&s, self.uptime());
        let history: Vec<Sample> = self.history.lock().iter().copied().collect();
        // "Now": since the sample closest to one interval ago (or since start).
        let base = history
            .iter()
            .rev()
            .find(|h| now.at - h.at >= SAMPLE_EVERY.as_secs_f64() - 0.5)
            .copied()
            .unwrap_or_default();
        let span = (now.at - base.at).max(1e-3);
        let mut points: Vec<Point> = history
            .windows(2)
            .map(|w| Point {
                at: w[1].at,
                ratio: ratio(w[1].hits - w[0].hits, w[1].lookups - w[0].lookups),
            })
            .collect();
        if let Some(last) = history.last() {
            points.push(Point {
                at: now.at,
                ratio: ratio(now.hits - last.hits, now.lookups - last.lookups),
            });
        }
        let labelled = |name: &str, label: &str, values: &[&str]| -> BTreeMap<String, f64> {
            values
                .iter()
                .map(|v| ((*v).to_owned(), s.sum(name, &[(label, v)])))
                .collect()
        };
        let queries = s.sum("tpns_cache_requests_total", &[("route", "query")]);
        let sent = s.sum("tpns_cache_upstream_identifiers_total", &[]);
        StatusJson {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: now.at.floor(),
            upstream_url: self.upstream_url.clone(),
            hit_ratio: HitRatio {
                total: ratio(now.hits, now.lookups),
                now: ratio(now.hits - base.hits, now.lookups - base.lookups),
                history: points,
            },
            identifiers: Identifiers {
                asked: now.lookups,
                from_cache: now.hits,
                sent_upstream: sent,
                saved: (now.lookups - sent).max(0.0),
            },
            requests: Requests {
                queries,
                upstream_calls: now.upstream_calls,
                upstream_calls_saved: (queries - now.upstream_calls).max(0.0),
                memo_hits: s.sum("tpns_cache_memo_hits_total", &[]),
            },
            quota: Quota {
                calls_per_second_limit: self.calls_per_second,
                calls_per_second_now: (now.upstream_calls - base.upstream_calls) / span,
                limiter_waits: s.sum("tpns_cache_limiter_wait_seconds_count", &[]),
                limiter_wait_seconds: s.sum("tpns_cache_limiter_wait_seconds_sum", &[]),
                refusals: labelled(
                    "tpns_cache_limiter_rejections_total",
                    "reason",
                    &[
                        "queue_full",
                        "max_wait",
                        "cooldown",
                        "fleet_quota",
                        "unverified_share",
                    ],
                ),
                breaker: match s.sum("tpns_cache_breaker_state", &[]) as i64 {
                    0 => "closed",
                    1 => "half-open",
                    _ => "open",
                },
                breaker_opens: s.sum("tpns_cache_breaker_opens_total", &[]),
            },
            upstream_outcomes: labelled(
                "tpns_cache_upstream_requests_total",
                "outcome",
                &[
                    "ok",
                    "refused",
                    "unreachable",
                    "timeout",
                    "http_error",
                    "malformed",
                    "rate_limited",
                    "circuit_open",
                ],
            ),
            cache: CacheStatus {
                entries: s.sum("tpns_cache_entries", &[]),
                bytes: s.sum("tpns_cache_weighted_bytes", &[]),
                max_bytes: self.max_bytes,
                evictions: labelled(
                    "tpns_cache_evictions_total",
                    "cause",
                    &["expired", "size", "explicit", "replaced"],
                ),
                stale_served: s.sum("tpns_cache_stale_served_total", &[]),
            },
            fleet: self.fleet.then(|| Fleet {
                redis_up: s.sum("tpns_cache_redis_up", &[]) >= 1.0,
                shared_hits: s.sum("tpns_cache_lookups_total", &[("outcome", "shared_hit")]),
                fallbacks: s.sum("tpns_cache_fleet_fallbacks_total", &[]),
                redis_errors: s.sum("tpns_cache_redis_errors_total", &[]),
            }),
            config: self.config.clone(),
        }
    }

    pub(crate) fn page(&self) -> &Page {
        &self.page
    }
}

/// The configuration as `key: value` pairs, with secrets' files and variables as `set`.
fn flat_config(config: &Config) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, v: Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    if SECRET_POINTERS.contains(&k.as_str()) {
                        out.insert(key, Value::from(if v.is_null() { "unset" } else { "set" }));
                    } else {
                        walk(&key, v, out);
                    }
                }
            }
            Value::Array(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    walk(&format!("{prefix}[{i}]"), item, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(
        "",
        serde_json::to_value(config).unwrap_or(Value::Null),
        &mut out,
    );
    out
}

/// `/status.json`. Counters are totals since start; `now` figures cover the last sample
/// interval; `history` has one point per interval (ratio `null` when nothing was looked up).
#[derive(Debug, Serialize)]
pub(crate) struct StatusJson {
    pub(crate) version: &'static str,
    pub(crate) uptime_seconds: f64,
    pub(crate) upstream_url: String,
    pub(crate) hit_ratio: HitRatio,
    pub(crate) identifiers: Identifiers,
    pub(crate) requests: Requests,
    pub(crate) quota: Quota,
    pub(crate) upstream_outcomes: BTreeMap<String, f64>,
    pub(crate) cache: CacheStatus,
    /// Present only in fleet mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fleet: Option<Fleet>,
    pub(crate) config: BTreeMap<String, Value>,
}

#[derive(Debug, Serialize)]
pub(crate) struct HitRatio {
    pub(crate) total: Option<f64>,
    pub(crate) now: Option<f64>,
    pub(crate) history: Vec<Point>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Point {
    /// Seconds since start.
    pub(crate) at: f64,
    pub(crate) ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Identifiers {
    pub(crate) asked: f64,
    pub(crate) from_cache: f64,
    pub(crate) sent_upstream: f64,
    pub(crate) saved: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Requests {
    pub(crate) queries: f64,
    pub(crate) upstream_calls: f64,
    /// Query requests minus upstream query calls: what a cache-less proxy would have spent
    /// at the least (one call per request).
    pub(crate) upstream_calls_saved: f64,
    pub(crate) memo_hits: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Quota {
    pub(crate) calls_per_second_limit: u32,
    pub(crate) calls_per_second_now: f64,
    pub(crate) limiter_waits: f64,
    pub(crate) limiter_wait_seconds: f64,
    pub(crate) refusals: BTreeMap<String, f64>,
    pub(crate) breaker: &'static str,
    pub(crate) breaker_opens: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct CacheStatus {
    pub(crate) entries: f64,
    pub(crate) bytes: f64,
    pub(crate) max_bytes: u64,
    pub(crate) evictions: BTreeMap<String, f64>,
    pub(crate) stale_served: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Fleet {
    pub(crate) redis_up: bool,
    pub(crate) shared_hits: f64,
    pub(crate) fallbacks: f64,
    pub(crate) redis_errors: f64,
}

/// The page: HTML with its style and script inline, and the CSP that allows exactly those.
#[derive(Debug)]
pub(crate) struct Page {
    pub(crate) html: String,
    pub(crate) csp: String,
}

const STYLE: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("page.js");
const BODY: &str = include_str!("page.html");

impl Page {
    fn build() -> Page {
        use base64::Engine as _;
        let hash = |text: &str| {
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()))
        };
        let html = BODY
            .replacen("<style></style>", &format!("<style>{STYLE}</style>"), 1)
            .replacen(
                "<script></script>",
                &format!("<script>{SCRIPT}</script>"),
                1,
            );
        let csp = format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
            hash(SCRIPT),
            hash(STYLE)
        );
        Page { html, csp }
    }
}

#[cfg(test)]
mod tests;
