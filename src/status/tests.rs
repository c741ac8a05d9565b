use super::*;

const METRICS: &str = "\
tpns_cache_lookups_total{op=\"token_accounts\",outcome=\"hit\"} 6
tpns_cache_lookups_total{op=\"token_accounts\",outcome=\"shared_hit\"} 1
tpns_cache_lookups_total{op=\"token_accounts\",outcome=\"miss\"} 2
tpns_cache_lookups_total{op=\"account_tokens\",outcome=\"unverified\"} 1
tpns_cache_requests_total{route=\"query\",cache=\"hit\"} 3
tpns_cache_requests_total{route=\"query\",cache=\"miss\"} 2
tpns_cache_requests_total{route=\"other\",cache=\"bypass\"} 9
tpns_cache_upstream_identifiers_total{op=\"token_accounts\"} 3
tpns_cache_upstream_requests_total{route=\"query\",outcome=\"ok\"} 2
tpns_cache_upstream_requests_total{route=\"query\",outcome=\"unreachable\"} 1
tpns_cache_upstream_requests_total{route=\"query\",outcome=\"rate_limited\"} 4
tpns_cache_upstream_requests_total{route=\"other\",outcome=\"forwarded\"} 9
tpns_cache_limiter_rejections_total{reason=\"cooldown\"} 4
tpns_cache_limiter_wait_seconds_count 5
tpns_cache_limiter_wait_seconds_sum 0.25
tpns_cache_breaker_state 2
tpns_cache_entries 3
tpns_cache_weighted_bytes 2048
tpns_cache_evictions_total{cause=\"size\"} 1
tpns_cache_memo_hits_total 1
tpns_cache_redis_up 1
";

fn paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Object(map) = v {
        for (k, v) in map {
            let p = format!("{prefix}/{k}");
            if prefix != "/config" {
                paths(v, &p, out);
            }
            out.push(p);
        }
    }
}

/// The documented schema of `/status.json` (docs/metrics.md, "Status page"): these keys, in
/// these places. A change here is a change for every script that reads it.
#[test]
fn status_json_has_the_documented_schema() {
    let status = Status::new(&Config::default());
    let v = serde_json::to_value(status.snapshot(METRICS)).unwrap();
    let mut got = Vec::new();
    paths(&v, "", &mut got);
    got.retain(|p| !p.starts_with("/config/") && !p.starts_with("/hit_ratio/history/"));
    got.sort();
    let mut want: Vec<&str> = vec![
        "/version",
        "/uptime_seconds",
        "/upstream_url",
        "/hit_ratio",
        "/hit_ratio/total",
        "/hit_ratio/now",
        "/hit_ratio/history",
        "/identifiers",
        "/identifiers/asked",
        "/identifiers/from_cache",
        "/identifiers/sent_upstream",
        "/identifiers/saved",
        "/requests",
        "/requests/queries",
        "/requests/upstream_calls",
        "/requests/upstream_calls_saved",
        "/requests/memo_hits",
        "/quota",
        "/quota/calls_per_second_limit",
        "/quota/calls_per_second_now",
        "/quota/limiter_waits",
        "/quota/limiter_wait_seconds",
        "/quota/refusals",
        "/quota/refusals/cooldown",
        "/quota/refusals/fleet_quota",
        "/quota/refusals/max_wait",
        "/quota/refusals/queue_full",
        "/quota/refusals/unverified_share",
        "/quota/breaker",
        "/quota/breaker_opens",
        "/upstream_outcomes",
        "/upstream_outcomes/ok",
        "/upstream_outcomes/refused",
        "/upstream_outcomes/unreachable",
        "/upstream_outcomes/timeout",
        "/upstream_outcomes/http_error",
        "/upstream_outcomes/malformed",
        "/upstream_outcomes/rate_limited",
        "/upstream_outcomes/circuit_open",
        "/cache",
        "/cache/entries",
        "/cache/bytes",
        "/cache/max_bytes",
        "/cache/evictions",
        "/cache/evictions/expired",
        "/cache/evictions/size",
        "/cache/evictions/explicit",
        "/cache/evictions/replaced",
        "/cache/stale_served",
        "/config",
    ];
    want.sort_unstable();
    assert_eq!(got, want);
    let docs = include_str!("../../docs/metrics.md");
    for p in &want {
        let leaf = p.rsplit('/').next().unwrap();
        assert!(
            docs.contains(&format!("`{leaf}`")),
            "docs/metrics.md lacks `{leaf}`"
        );
    }
}

#[test]
fn figures_come_from_the_metrics_text() {
    let status = Status::new(&Config::default());
    let s = status.snapshot(METRICS);
    assert_eq!(s.identifiers.asked, 10.0);
    assert_eq!(s.identifiers.from_cache, 7.0, "hit + shared_hit");
    assert_eq!(s.identifiers.sent_upstream, 3.0);
    assert_eq!(s.identifiers.saved, 7.0);
    assert_eq!(s.hit_ratio.total, Some(0.7));
    assert_eq!(s.requests.queries, 5.0, "query route only");
    assert_eq!(
        s.requests.upstream_calls, 3.0,
        "calls the shield refused are not calls"
    );
    assert_eq!(s.requests.upstream_calls_saved, 2.0);
    assert_eq!(s.quota.refusals["cooldown"], 4.0);
    assert_eq!(s.quota.breaker, "open");
    assert_eq!(s.cache.bytes, 2048.0);
    assert_eq!(
        s.cache.max_bytes,
        Config::default().cache.max_bytes.as_u64()
    );
    assert!(s.fleet.is_none(), "fleet mode off: no fleet section");
    let mut fleet = Config::default();
    fleet.redis.url = "redis://127.0.0.1:1/0".into();
    let s = Status::new(&fleet).snapshot(METRICS);
    let f = s.fleet.expect("fleet section");
    assert!(f.redis_up);
    assert_eq!(f.shared_hits, 1.0);
}

#[test]
fn history_is_bounded_and_now_is_since_the_last_interval() {
    let status = Status::new(&Config::default());
    for _ in 0..HISTORY + 30 {
        status.sample("tpns_cache_lookups_total{outcome=\"hit\"} 1\n");
    }
    assert_eq!(status.history.lock().len(), HISTORY);
    // Pretend the samples are older than one interval: "now" counts only what came since.
    for h in status.history.lock().iter_mut() {
        h.at -= 10.0;
    }
    let s = status.snapshot(
        "tpns_cache_lookups_total{outcome=\"hit\"} 4\ntpns_cache_lookups_total{outcome=\"miss\"} 1\n",
    );
    assert_eq!(s.hit_ratio.now, Some(0.75));
    assert_eq!(s.hit_ratio.total, Some(0.8));
    assert_eq!(s.hit_ratio.history.len(), HISTORY);
}

#[test]
fn secrets_are_shown_as_set_or_unset_only() {
    let mut c = Config::default();
    c.admin.token_file = Some("/var/run/secrets/very-secret-path".into());
    c.redis.password_env = Some("SOME_SECRET_VARIABLE".into());
    let s = Status::new(&c);
    assert_eq!(s.config["admin.token_file"], "set");
    assert_eq!(s.config["redis.password_env"], "set");
    assert_eq!(s.config["listen"], "127.0.0.1:8080");
    let text = serde_json::to_string(&s.snapshot("")).unwrap();
    assert!(!text.contains("very-secret-path") && !text.contains("SOME_SECRET_VARIABLE"));
}

#[test]
fn the_page_is_self_contained_and_its_csp_allows_exactly_its_inline_code() {
    let page = Page::build();
    assert!(page.html.contains(SCRIPT) && page.html.contains(STYLE));
    for external in ["src=", "href=\"http", "@import", "url("] {
        assert!(
            !page.html.contains(external),
            "external reference `{external}`"
        );
    }
    use base64::Engine as _;
    let h =
        |t: &str| base64::engine::general_purpose::STANDARD.encode(Sha256::digest(t.as_bytes()));
    assert!(page
        .csp
        .contains(&format!("script-src 'sha256-{}'", h(SCRIPT))));
    assert!(page
        .csp
        .contains(&format!("style-src 'sha256-{}'", h(STYLE))));
    assert!(page.csp.starts_with("default-src 'none'"));
}
