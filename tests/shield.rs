//! The upstream shield against the simulator: coalescing, micro-batching, the quota limiter,
//! the 1008028 cool-down, stale answers, retries and the circuit breaker.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use serde_json::json;
use tpns_sim::{token_name, Faults};

fn latency(ms: u64) -> Faults {
    Faults {
        latency_ms: ms,
        ..Faults::default()
    }
}

/// Makes the demo app's credential accepted, so lookups and coalescing apply.
async fn warm_credential(h: &Harness) {
    assert_eq!(h.query(&tokens_body(&["token1"])).await.ret_code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_the_same_cold_identifiers_fetch_each_once() {
    let h = Arc::new(Harness::start().await);
    warm_credential(&h).await;
    let before = h.upstream_identifiers();
    h.sim.set_faults(latency(300));
    let names: Vec<String> = (0..10).map(token_name).collect();
    let body = tokens_body(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let h = h.clone();
            let body = body.clone();
            tokio::spawn(async move { h.query(&body).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        answers.push(r.json());
    }
    assert!(answers.iter().all(|a| *a == answers[0]));
    assert_eq!(answers[0]["result"].as_array().unwrap().len(), 10);
    assert_eq!(
        h.upstream_identifiers() - before,
        10,
        "each identifier fetched once"
    );
    let m = h.metrics().await;
    assert!(
        sample(
            &m,
            r#"tpns_cache_lookups_total{op="token_accounts",outcome="coalesced"}"#
        ) > 0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_does_not_fail_the_others() {
    let h = Arc::new(Harness::start().await);
    warm_credential(&h).await;
    h.sim.set_faults(latency(400));
    let body = tokens_body(&["tok-00000020", "tok-00000021"]);
    // A starts the fetch and gives up after 50 ms (its connection is dropped).
    let a = {
        let h = h.clone();
        let body = body.clone();
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(50), h.query(&body))
                .await
                .is_err()
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b = h.query(&body).await;
    assert!(a.await.unwrap(), "A was cut off");
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(b.json()["result"], json!(["0", "0"]));
    assert_eq!(
        h.upstream_identifiers(),
        1 + 2,
        "one fetch for both clients"
    );
    h.sim.set_faults(Faults::default());
    assert!(h.query(&body).await.cache_status().contains("; hit;"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_identifier_requests_arrive_upstream_as_batches() {
    let h = Arc::new(
        Harness::with(sim_config(), |c| {
            c.shield.batch_window = Duration::from_millis(100);
        })
        .await,
    );
    warm_credential(&h).await;
    let calls_before = h.upstream_queries();
    let tasks: Vec<_> = (30..40)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move {
                let name = token_name(i);
                let r = h.query(&tokens_body(&[&name])).await;
                (name, r.json())
            })
        })
        .collect();
    for t in tasks {
        let (name, v) = t.await.unwrap();
        // Each client gets exactly its own element back.
        assert_eq!(v["result"], json!(["0"]));
        let els = v["token_accounts"].as_array().unwrap();
        assert_eq!(els.len(), 1);
        assert_eq!(els[0]["token"], name.as_str());
    }
    let calls = h.upstream_queries() - calls_before;
    assert!(calls < 10, "10 requests went upstream in {calls} calls");
    let biggest = h
        .sim
        .stats()
        .recent_queries
        .iter()
        .map(Vec::len)
        .max()
        .unwrap();
    assert!(
        biggest > 1,
        "at least one call carried several clients' identifiers"
    );
    let m = h.metrics().await;
    assert!(sample(&m, "tpns_cache_upstream_batch_size_count") >= calls as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_window_off_each_request_calls_on_its_own() {
    let h = Arc::new(Harness::with(sim_config(), |c| c.shield.batch_window = Duration::ZERO).await);
    warm_credential(&h).await;
    let before = h.upstream_queries();
    for i in 40..45 {
        h.query(&tokens_body(&[&token_name(i)])).await;
    }
    assert_eq!(h.upstream_queries() - before, 5);
}

/// Most calls in any window of `width_ms` milliseconds.
fn max_in_window(arrivals: &[u64], width_ms: u64) -> usize {
    let mut best = 0;
    for (i, start) in arrivals.iter().enumerate() {
        let n = arrivals[i..]
            .iter()
            .take_while(|t| **t < start + width_ms)
            .count();
        best = best.max(n);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_rate_is_never_exceeded_under_a_larger_burst() {
    const RATE: u32 = 5;
    const BURST: u32 = 5;
    let h = Arc::new(
        Harness::with(sim_config(), |c| {
            c.shield.calls_per_second = RATE;
            c.shield.burst = BURST;
            c.shield.max_wait = Duration::from_millis(1500);
            c.shield.batch_window = Duration::ZERO;
        })
        .await,
    );
    h.query_as(Some(APP), &tokens_body(&["token1"])).await;
    h.sim.reset_stats();
    // 40 requests (8 × the per-second rate), each for a different cold identifier.
    let tasks: Vec<_> = (50..90)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move { h.query(&tokens_body(&[&token_name(i)])).await })
        })
        .collect();
    let (mut served, mut limited) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        match r.ret_code() {
            0 => served += 1,
            1_008_028 => {
                limited += 1;
                assert!(
                    r.headers.contains_key("retry-after"),
                    "Retry-After on 1008028"
                );
            }
            other => panic!("unexpected retCode {other}"),
        }
    }
    let arrivals: Vec<u64> = h.sim.stats().query_arrivals_ms.into_iter().collect();
    assert_eq!(arrivals.len(), served, "every served request made one call");
    assert!(limited > 0, "the burst was larger than the quota allows");
    let peak = max_in_window(&arrivals, 1000);
    println!(
        "burst of 40: {served} served, {limited} answered 1008028; peak {peak} upstream calls in any 1 s (rate {RATE}/s, burst {BURST})"
    );
    assert!(
        peak <= (BURST + RATE) as usize,
        "{peak} calls in one second (rate {RATE}/s, burst {BURST}): {arrivals:?}"
    );
    let m = h.metrics().await;
    assert!(
        sample(
            &m,
            r#"tpns_cache_limiter_rejections_total{reason="max_wait"}"#
        ) > 0.0
    );
}

#[tokio::test]
async fn an_upstream_1008028_starts_a_cool_down_for_that_app() {
    let h = Harness::with(sim_config(), |c| {
        c.shield.rate_limited_cooldown = Duration::from_secs(60);
    })
    .await;
    warm_credential(&h).await;
    h.sim.set_faults(Faults {
        rate_limit_ratio: 1.0,
        ..Faults::default()
    });
    let r = h.query(&tokens_body(&["token2"])).await;
    assert_eq!(r.ret_code(), 1_008_028, "the upstream's own answer");
    assert_eq!(r.headers["retry-after"], "60");
    h.sim.set_faults(Faults::default());
    let calls = h.upstream_queries();
    for _ in 0..3 {
        let r = h.query(&tokens_body(&["token3"])).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.ret_code(), 1_008_028);
        assert!(r.json()["errMsg"].as_str().unwrap().contains("cooldown"));
        assert!(r.headers.contains_key("retry-after"));
    }
    assert_eq!(h.upstream_queries(), calls, "no calls during the cool-down");
    // Another app is not cooled down.
    let r = h.query_as(Some(OTHER_APP), &tokens_body(&["token3"])).await;
    assert_eq!(r.ret_code(), 0);
    let m = h.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"tpns_cache_limiter_rejections_total{reason="cooldown"}"#
        ),
        3.0
    );
}

fn stale_config(c: &mut tpns_cache::config::Config) {
    c.cache.ttl = Duration::from_secs(10);
    c.cache.ttl_jitter = 0.0;
    c.cache.stale_while_revalidate = Duration::ZERO;
    c.cache.stale_if_error = Duration::from_secs(300);
    c.shield.rate_limited_cooldown = Duration::ZERO;
}

#[tokio::test]
async fn stale_entries_are_served_when_the_upstream_cannot_answer() {
    let dead = closed_port().await;
    let h = Harness::with(sim_config(), stale_config).await;
    let body = tokens_body(&["token1", "token2"]);
    let fresh = h.query(&body).await.json();
    h.clock.advance(Duration::from_secs(60));
    for faults in [
        Faults {
            fail_ratio: 1.0,
            ..Faults::default()
        },
        Faults {
            rate_limit_ratio: 1.0,
            ..Faults::default()
        },
    ] {
        h.sim.set_faults(faults);
        let r = h.query(&body).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json(), fresh);
        let cs = r.cache_status();
        assert!(
            cs.contains("stale 2") && cs.contains("upstream unavailable"),
            "{cs}"
        );
    }
    // A mix: one stale entry, one identifier never cached → the upstream error stands.
    let r = h.query(&tokens_body(&["token1", "tok-00000003"])).await;
    assert_eq!(r.ret_code(), 1_008_028);
    let m = h.metrics().await;
    assert_eq!(
        sample(&m, r#"tpns_cache_stale_served_total{reason="error"}"#),
        4.0
    );
    // Upstream down altogether and nothing cached: the error stands.
    let h2 = Harness::with(sim_config(), |c| {
        stale_config(c);
        c.upstream.url = format!("http://{dead}");
    })
    .await;
    let r = h2.query(&body).await;
    assert_eq!(
        r.status,
        StatusCode::BAD_GATEWAY,
        "nothing cached, nothing to fall back on"
    );
}

#[tokio::test]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
    let h = Arc::new(
        Harness::with(sim_config(), |c| {
            c.cache.ttl = Duration::from_secs(10);
            c.cache.ttl_jitter = 0.0;
            c.cache.stale_while_revalidate = Duration::from_secs(30);
        })
        .await,
    );
    let body = tokens_body(&["tok-00000005"]);
    let first = h.query(&body).await.json();
    let calls = h.upstream_queries();
    h.clock.advance(Duration::from_secs(15));
    h.sim.bind(APP.0, "tok-00000005", "new-owner", 0);
    h.sim.set_faults(latency(300));
    // Five stale hits at once: all answered from the stale entry, one refresh upstream.
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let h = h.clone();
            let body = body.clone();
            tokio::spawn(async move { h.query(&body).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.json(), first);
        assert!(r.cache_status().contains("stale 1"), "{}", r.cache_status());
    }
    assert!(eventually(Duration::from_secs(5), || h.upstream_queries() == calls + 1).await);
    h.sim.set_faults(Faults::default());
    // Until the refresh's answer is back, requests keep getting the stale entry (and start no
    // second refresh); then the entry is fresh again, with the new binding.
    let mut r = h.query(&body).await;
    for _ in 0..100 {
        if !r.cache_status().contains("stale") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        r = h.query(&body).await;
    }
    assert!(r.cache_status().contains("; hit;"), "{}", r.cache_status());
    assert!(!r.cache_status().contains("stale"), "{}", r.cache_status());
    assert!(r.body_text().contains("new-owner"));
    assert_eq!(h.upstream_queries(), calls + 1, "exactly one refresh");
}

#[tokio::test]
async fn the_breaker_opens_fails_fast_and_closes_after_a_probe() {
    let h = Harness::with(sim_config(), |c| {
        c.shield.breaker_failures = 3;
        c.shield.breaker_open_for = Duration::from_millis(300);
        c.shield.retry_budget_ratio = 0.0;
        c.cache.stale_if_error = Duration::ZERO;
    })
    .await;
    warm_credential(&h).await;
    h.sim.set_faults(Faults {
        fail_ratio: 1.0,
        ..Faults::default()
    });
    for i in 0..3 {
        let r = h.query(&tokens_body(&[&token_name(60 + i)])).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    }
    let calls = h.upstream_queries();
    let r = h.query(&tokens_body(&[&token_name(63)])).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.json()["errMsg"]
        .as_str()
        .unwrap()
        .contains("circuit open"));
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(h.upstream_queries(), calls, "failed fast");
    assert_eq!(sample(&h.metrics().await, "tpns_cache_breaker_state"), 2.0);
    h.sim.set_faults(Faults::default());
    tokio::time::sleep(Duration::from_millis(350)).await;
    let r = h.query(&tokens_body(&[&token_name(64)])).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the probe went through and succeeded"
    );
    let m = h.metrics().await;
    assert_eq!(sample(&m, "tpns_cache_breaker_state"), 0.0);
    assert_eq!(sample(&m, "tpns_cache_breaker_opens_total"), 1.0);
}

#[tokio::test]
async fn a_connection_error_is_retried_once_within_the_budget() {
    let dead = closed_port().await;
    let h = Harness::with(sim_config(), |c| {
        c.upstream.url = format!("http://{dead}");
        c.shield.retry_budget_ratio = 0.1;
    })
    .await;
    let r = h.query(&tokens_body(&["token1"])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let r = h.query(&tokens_body(&["token2"])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let m = h.metrics().await;
    // The first failure spends the start-up retry; the second finds the budget at 0.2.
    assert_eq!(sample(&m, "tpns_cache_upstream_retries_total"), 1.0);
    assert_eq!(
        sample(
            &m,
            r#"tpns_cache_upstream_requests_total{outcome="unreachable",route="query"}"#
        ),
        2.0
    );
}
