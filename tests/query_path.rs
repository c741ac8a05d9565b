//! End to end: the simulator and the proxy in-process on ephemeral loopback ports.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const SEED_OP1: &str = r#"{"operator_type":1,"account_list":[{"account":"account1"},{"account":"account2","account_type":1}]}"#;
const SEED_OP2: &str = r#"{"operator_type":2,"token_list":["token1","token2"]}"#;

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[tokio::test]
async fn seed_examples_give_the_seed_response_shapes() {
    let h = Harness::start().await;
    for _ in 0..2 {
        // Once through the upstream, once from the cache: the same shape both times.
        let v = h.query(SEED_OP1).await.json();
        assert_eq!(
            keys(&v),
            [
                "account_tokens",
                "errMsg",
                "result",
                "retCode",
                "token_accounts"
            ]
        );
        assert_eq!(v["retCode"], 0);
        assert_eq!(v["errMsg"], "NO_ERROR");
        assert_eq!(v["result"], json!(["0", "0"]));
        assert_eq!(v["token_accounts"], Value::Null);
        let at = v["account_tokens"].as_array().unwrap();
        assert_eq!(at.len(), 2);
        for (el, name) in at.iter().zip(["account1", "account2"]) {
            assert_eq!(keys(el), ["account", "account_type", "token_list"]);
            assert_eq!(el["account"], name);
        }
        assert_eq!(at[0]["token_list"], json!(["token1", "token2"]));
        assert_eq!(at[1]["token_list"], json!(["token2", "token3"]));

        let v = h.query(SEED_OP2).await.json();
        assert_eq!(v["retCode"], 0);
        assert_eq!(v["result"], json!(["0", "0"]));
        assert_eq!(v["account_tokens"], Value::Null);
        let ta = v["token_accounts"].as_array().unwrap();
        assert_eq!(ta.len(), 2);
        for (el, name) in ta.iter().zip(["token1", "token2"]) {
            assert_eq!(keys(el), ["account_list", "token"]);
            assert_eq!(el["token"], name);
            for a in el["account_list"].as_array().unwrap() {
                assert_eq!(keys(a), ["account", "account_type", "timestamp"]);
            }
        }
        let accounts: Vec<&str> = ta[0]["account_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["account"].as_str().unwrap())
            .collect();
        assert!(accounts.contains(&"926@126.com") && accounts.contains(&"1527000000"));
    }
    assert_eq!(h.upstream_queries(), 2, "second round came from the cache");
}

#[tokio::test]
async fn a_repeated_batch_is_served_without_any_upstream_call() {
    let h = Harness::start().await;
    let body = tokens_body(&["tok-00000001", "tok-00000002", "token1"]);
    let first = h.query(&body).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(
        first.cache_status().contains("fwd=request"),
        "{}",
        first.cache_status()
    );
    assert_eq!(h.upstream_queries(), 1);
    for _ in 0..5 {
        let again = h.query(&body).await;
        assert_eq!(again.json(), first.json());
        assert_eq!(again.cache_status(), r#"tpns-cache; hit; detail="hit 3/3""#);
    }
    assert_eq!(h.upstream_queries(), 1);
    assert_eq!(h.upstream_identifiers(), 3);
}

#[tokio::test]
async fn k_new_plus_n_cached_sends_exactly_the_k_new_upstream() {
    let h = Harness::start().await;
    let cached = [
        "tok-00000010",
        "tok-00000011",
        "tok-00000012",
        "tok-00000013",
        "token3",
    ];
    h.query(&tokens_body(&cached)).await;
    let before = h.upstream_identifiers();
    let mixed = [
        "tok-00000010",
        "tok-00000050",
        "tok-00000011",
        "tok-00000012",
        "never-registered",
        "tok-00000013",
        "token3",
        "tok-00000051",
    ];
    let r = h.query(&tokens_body(&mixed)).await;
    assert_eq!(
        r.cache_status(),
        r#"tpns-cache; fwd=partial; detail="hit 5/8""#
    );
    assert_eq!(h.upstream_identifiers() - before, 3);
    assert_eq!(
        h.last_upstream_query(),
        ["tok-00000050", "never-registered", "tok-00000051"]
    );
    // Indistinguishable from what the upstream answers for the whole batch.
    assert_eq!(r.json(), h.direct(&tokens_body(&mixed)).await.json());
}

#[tokio::test]
async fn order_and_duplicates_are_kept_and_each_identifier_fetched_once() {
    let h = Harness::start().await;
    let asked = [
        "token3",
        "token1",
        "token3",
        "tok-00000004",
        "token1",
        "nope",
    ];
    let r = h.query(&tokens_body(&asked)).await;
    assert_eq!(
        h.last_upstream_query(),
        ["token3", "token1", "tok-00000004", "nope"]
    );
    let v = r.json();
    let upstream_before = h.upstream_queries();
    assert_eq!(v, h.direct(&tokens_body(&asked)).await.json());
    let names: Vec<&str> = v["token_accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["token3", "token1", "token3", "tok-00000004", "token1"]
    );
    assert_eq!(v["result"], json!(["0", "0", "0", "0", "0", "1008006"]));
    // Cached now: the same with duplicates from the cache.
    let direct_calls = 1;
    let again = h.query(&tokens_body(&asked)).await;
    assert_eq!(again.json(), v);
    // "nope" (invalid token) is never cached, so only it goes upstream again.
    assert_eq!(h.last_upstream_query(), ["nope"]);
    assert_eq!(h.upstream_queries(), upstream_before + direct_calls + 1);
}

#[tokio::test]
async fn mixed_cached_and_fresh_answers_equal_the_upstream_answer() {
    let h = Harness::start().await;
    let all = [
        "account1",
        "acct-00000001",
        "no-such-account",
        "acct-00000002",
        "also-missing",
    ];
    // Warm different subsets, then ask for everything: every mix must equal the direct answer.
    for warm in [&all[..1], &all[1..3], &all[3..]] {
        h.query(&accounts_body(warm)).await;
        let r = h.query(&accounts_body(&all)).await;
        assert_eq!(r.json(), h.direct(&accounts_body(&all)).await.json());
    }
    let v = h.query(&accounts_body(&all)).await;
    assert_eq!(v.cache_status(), r#"tpns-cache; hit; detail="hit 5/5""#);
    assert_eq!(v.ret_code(), 1_008_026);
    let missing = h
        .query(&accounts_body(&["no-such-account", "also-missing"]))
        .await;
    assert_eq!(missing.ret_code(), 1_008_027);
    assert_eq!(missing.json()["account_tokens"], json!([]));
}

#[tokio::test]
async fn same_account_with_two_account_types_goes_in_separate_sub_requests() {
    let h = Harness::start().await;
    h.sim.bind(APP.0, "tok-typed", "shared-name", 5);
    let body = r#"{"operator_type":1,"account_list":[{"account":"shared-name"},{"account":"shared-name","account_type":5},{"account":"account1"}]}"#;
    let r = h.query(body).await;
    assert_eq!(h.upstream_queries(), 2);
    let v = r.json();
    assert_eq!(v, h.direct(body).await.json());
    assert_eq!(v["result"], json!(["10110008", "0", "0"]));
    assert_eq!(v["account_tokens"][0]["token_list"], json!(["tok-typed"]));
}

#[tokio::test]
async fn absent_account_type_and_zero_are_different_keys() {
    let h = Harness::start().await;
    h.query(r#"{"operator_type":1,"account_list":[{"account":"account1"}]}"#)
        .await;
    let before = h.upstream_queries();
    let explicit = h
        .query(r#"{"operator_type":1,"account_list":[{"account":"account1","account_type":0}]}"#)
        .await;
    assert_eq!(
        h.upstream_queries(),
        before + 1,
        "explicit 0 is not the absent key"
    );
    assert!(explicit.cache_status().contains("fwd=miss"));
    let top = h
        .query(r#"{"operator_type":1,"account_type":1,"account_list":[{"account":"account2"}]}"#)
        .await;
    assert_eq!(
        top.json()["result"],
        json!(["0"]),
        "top-level account_type is forwarded"
    );
    assert_eq!(h.upstream_queries(), before + 2);
}

#[tokio::test]
async fn sub_requests_respect_max_batch() {
    let h = Harness::with(sim_config(), |c| c.upstream.max_batch = 2).await;
    let asked: Vec<String> = (0..5).map(tpns_sim::token_name).collect();
    let refs: Vec<&str> = asked.iter().map(String::as_str).collect();
    let r = h.query(&tokens_body(&refs)).await;
    assert_eq!(r.json()["result"], json!(["0", "0", "0", "0", "0"]));
    let stats = h.sim.stats();
    assert_eq!(stats.requests(QUERY), 3);
    assert!(stats.recent_queries.iter().all(|q| q.len() <= 2));
    assert_eq!(stats.identifiers(QUERY), 5);
    assert_eq!(r.json(), h.direct(&tokens_body(&refs)).await.json());
}

#[tokio::test]
async fn negative_answers_are_cached_for_negative_ttl_then_refetched() {
    let h = Harness::with(sim_config(), |c| {
        c.cache.ttl = Duration::from_secs(60);
        c.cache.negative_ttl = Duration::from_secs(5);
        // Exact lifetimes: no jitter, no stale periods (tested in tests/shield.rs).
        c.cache.ttl_jitter = 0.0;
        c.cache.stale_while_revalidate = Duration::ZERO;
        c.cache.stale_if_error = Duration::ZERO;
    })
    .await;
    let body = accounts_body(&["late-account", "account1"]);
    let r = h.query(&body).await;
    assert_eq!(r.json()["result"], json!(["10110008", "0"]));
    let r = h.query(&body).await;
    assert!(
        r.cache_status().contains("hit 2/2"),
        "negative answer cached"
    );
    assert_eq!(h.upstream_queries(), 1);

    // The account gets bound directly at the upstream (as a device SDK would).
    h.sim.bind(APP.0, "tok-late", "late-account", 0);
    h.clock.advance(Duration::from_secs(4));
    assert_eq!(
        h.query(&body).await.json()["result"],
        json!(["10110008", "0"])
    );
    assert_eq!(h.upstream_queries(), 1, "still within negative_ttl");

    h.clock.advance(Duration::from_secs(2));
    let r = h.query(&body).await;
    assert_eq!(r.json()["result"], json!(["0", "0"]));
    assert_eq!(
        h.last_upstream_query(),
        ["late-account"],
        "positive entry still fresh"
    );

    h.clock.advance(Duration::from_secs(60));
    h.query(&body).await;
    assert_eq!(
        h.last_upstream_query(),
        ["late-account", "account1"],
        "both expired"
    );
}

#[tokio::test]
async fn negative_ttl_zero_disables_negative_caching() {
    let h = Harness::with(sim_config(), |c| c.cache.negative_ttl = Duration::ZERO).await;
    let body = accounts_body(&["nobody"]);
    h.query(&body).await;
    h.query(&body).await;
    assert_eq!(h.upstream_queries(), 2);
}

#[tokio::test]
async fn two_access_ids_never_share_entries() {
    let h = Harness::start().await;
    h.sim.bind(OTHER_APP.0, "token1", "other-app-user", 0);
    let body = tokens_body(&["token1"]);
    let a = h.query_as(Some(APP), &body).await;
    h.query_as(Some(APP), &body).await;
    // Warm the other app's credential with a different identifier first.
    h.query_as(Some(OTHER_APP), &tokens_body(&["tok-00000001"]))
        .await;
    let before = h.upstream_queries();
    let b = h.query_as(Some(OTHER_APP), &body).await;
    assert_eq!(
        h.upstream_queries(),
        before + 1,
        "other app's lookup went upstream"
    );
    assert!(
        b.cache_status().contains("fwd=miss"),
        "{}",
        b.cache_status()
    );
    assert_ne!(a.json(), b.json());
    let accounts_b = b.json()["token_accounts"][0]["account_list"].to_string();
    let accounts_a = a.json()["token_accounts"][0]["account_list"].to_string();
    assert!(accounts_b.contains("other-app-user"), "{accounts_b}");
    assert!(!accounts_a.contains("other-app-user"), "{accounts_a}");
    // And app A's cached answer is still A's own.
    let a2 = h.query_as(Some(APP), &body).await;
    assert_eq!(a2.json(), a.json());
    assert!(a2.cache_status().contains("hit"));
}

#[tokio::test]
async fn a_rejected_credential_is_never_served_from_cache() {
    let h = Harness::start().await;
    let body = tokens_body(&["token1"]);
    h.query(&body).await;
    assert!(h.query(&body).await.cache_status().contains("hit"));
    for wrong in [(APP.0, "wrong-secret"), ("1234567", "whatever")] {
        let before = h.upstream_queries();
        let r = h.query_as(Some(wrong), &body).await;
        assert_eq!(h.upstream_queries(), before + 1, "went upstream");
        assert_eq!(r.status, StatusCode::OK);
        let code = r.ret_code();
        assert!(code == 10_030_002 || code == 1_008_003, "{code}");
        assert!(r.json().get("token_accounts").is_none(), "no cached data");
        // Asking again does not change that.
        let r = h.query_as(Some(wrong), &body).await;
        assert!(r.json().get("token_accounts").is_none());
    }
}

#[tokio::test]
async fn requests_without_credentials_are_forwarded_byte_for_byte_and_not_cached() {
    let h = Harness::start().await;
    let body = "{\"operator_type\":2,  \"token_list\":[\"token1\"]}";
    for _ in 0..2 {
        let r = h.query_as(None, body).await;
        assert_eq!(r.ret_code(), 1_008_003);
        assert!(
            r.cache_status().contains("fwd=bypass"),
            "{}",
            r.cache_status()
        );
    }
    assert_eq!(h.sim.stats().requests(QUERY), 2);
    // A malformed body without credentials is the upstream's to judge, not ours.
    let r = h.query_as(None, "not json").await;
    assert_eq!(r.ret_code(), 1_008_003);
}

#[tokio::test]
async fn signature_requests_are_forwarded_unchanged_and_not_cached() {
    // No app keys are configured: the proxy cannot verify or re-sign, so it forwards the signed
    // request as it is (the simulator checks the client's own signature).
    let h = Harness::start().await;
    let body = tokens_body(&["token1"]);
    let ts = "1565314789";
    let headers = vec![
        ("content-type", "application/json".to_owned()),
        ("accessid", APP.0.to_owned()),
        ("timestamp", ts.to_owned()),
        (
            "sign",
            tpns_wire::sign(APP.1.as_bytes(), ts, APP.0, body.as_bytes()),
        ),
    ];
    for _ in 0..2 {
        let r = h
            .send(h.proxy, Method::POST, QUERY, &headers, body.clone())
            .await;
        assert_eq!(
            r.cache_status(),
            r#"tpns-cache; fwd=bypass; detail="signature""#
        );
        assert_eq!(r.ret_code(), 0, "{}", r.body_text());
    }
    assert_eq!(h.upstream_queries(), 2);
}

#[tokio::test]
async fn invalid_requests_get_tpns_codes_and_nothing_is_forwarded() {
    let h = Harness::with(sim_config(), |c| {
        c.limits.max_items = 10;
        c.limits.max_identifier_bytes = 64;
    })
    .await;
    let long = "x".repeat(65);
    let eleven: Vec<String> = (0..11).map(|i| format!("t{i}")).collect();
    let cases: Vec<(String, i64)> = vec![
        ("{not json".into(), 1_008_001),
        ("".into(), 1_008_001),
        ("[]".into(), 1_008_001),
        (r#"{"token_list":["a"]}"#.into(), 1_008_002),
        (r#"{"operator_type":1}"#.into(), 1_008_002),
        (r#"{"operator_type":2}"#.into(), 1_008_002),
        (
            r#"{"operator_type":"2","token_list":["a"]}"#.into(),
            1_008_007,
        ),
        (
            r#"{"operator_type":7,"token_list":["a"]}"#.into(),
            1_008_007,
        ),
        (r#"{"operator_type":2,"token_list":[]}"#.into(), 1_008_007),
        (r#"{"operator_type":2,"token_list":[42]}"#.into(), 1_008_007),
        (
            r#"{"operator_type":1,"account_list":[{"account":1}]}"#.into(),
            1_008_007,
        ),
        (tokens_body(&[long.as_str()]), 1_008_007),
        (
            tokens_body(&eleven.iter().map(String::as_str).collect::<Vec<_>>()),
            1_008_007,
        ),
    ];
    for (body, code) in cases {
        let r = h.query(&body).await;
        assert_eq!(r.status, StatusCode::OK, "{body}");
        assert_eq!(r.ret_code(), code, "{body}");
        assert!(r.json()["errMsg"]
            .as_str()
            .unwrap()
            .starts_with("tpns-cache: "));
    }
    assert_eq!(
        h.sim.stats().requests.values().sum::<u64>(),
        0,
        "nothing forwarded"
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused_without_being_read() {
    let h = Harness::with(sim_config(), |c| {
        c.limits.max_body_bytes = bytesize::ByteSize::b(1024);
    })
    .await;
    let big = tokens_body(&vec!["tok-00000001"; 200]);
    assert!(big.len() > 1024);
    let r = h.query(&big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.ret_code(), 1_008_007);
    assert_eq!(h.upstream_queries(), 0);
}

#[tokio::test]
async fn other_paths_pass_through_unchanged() {
    let h = Harness::start().await;
    let mut headers = auth_headers(Some(APP));
    headers.push(("x-request-id", "abc".to_owned()));
    let push = r#"{"audience_type":"all","message":{"title":"t","content":"c"}}"#;
    for _ in 0..2 {
        let r = h
            .send(h.proxy, Method::POST, "/v3/push/app", &headers, push)
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["ret_code"], 0);
        assert_eq!(r.cache_status(), "tpns-cache; fwd=bypass");
    }
    assert_eq!(h.sim.stats().requests("/v3/push/app"), 2);
    // Status and body of an unknown path come back as the upstream sent them.
    let direct = h
        .send(h.sim_addr, Method::GET, "/v3/nope?x=1", &headers, "")
        .await;
    let via = h
        .send(h.proxy, Method::GET, "/v3/nope?x=1", &headers, "")
        .await;
    assert_eq!(via.status, StatusCode::NOT_FOUND);
    assert_eq!(via.body, direct.body);
    // The query path with GET is not the cached endpoint either.
    let r = h.send(h.proxy, Method::GET, QUERY, &headers, "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // batchoperate passes through (and changes the upstream's bindings).
    let op = r#"{"operator_type":2,"token_accounts":[{"token":"tok-00000099","account_list":[{"account":"moved"}]}]}"#;
    let r = h
        .send(
            h.proxy,
            Method::POST,
            "/v3/device/account/batchoperate",
            &headers,
            op,
        )
        .await;
    assert_eq!(r.json()["ret_code"], 0);
    let v = h.direct(&tokens_body(&["tok-00000099"])).await.json();
    assert_eq!(
        v["token_accounts"][0]["account_list"][0]["account"],
        "moved"
    );
}

#[tokio::test]
async fn upstream_down_answers_502_with_the_cause() {
    let dead = closed_port().await;
    let h = Harness::with(sim_config(), |c| c.upstream.url = format!("http://{dead}")).await;
    let r = h.query(&tokens_body(&["token1"])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.ret_code(), 1_008_004);
    let msg = r.json()["errMsg"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("upstream unreachable") && msg.contains("refused"),
        "{msg}"
    );
    let r = h.push(Some(APP), "{}").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["ret_code"], 1_008_004);
}

#[tokio::test]
async fn a_slow_upstream_answers_504_within_the_timeout() {
    let h = Harness::with(sim_config(), |c| {
        c.upstream.timeout = Duration::from_millis(300);
    })
    .await;
    h.sim.set_faults(tpns_sim::Faults {
        latency_ms: 30_000,
        ..Default::default()
    });
    // The harness itself gives up after 20 s; the proxy must answer long before.
    let r = h.query(&tokens_body(&["token1"])).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.ret_code(), 1_008_004);
    assert!(r.json()["errMsg"]
        .as_str()
        .unwrap()
        .contains("timed out after 300ms"));
    let r = h.push(Some(APP), "{}").await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn whole_call_failures_are_passed_on_and_never_cached() {
    // No cool-down after 1008028 here: every request must reach the upstream (the cool-down has
    // its own test in tests/shield.rs).
    let h = Harness::with(sim_config(), |c| {
        c.shield.rate_limited_cooldown = Duration::ZERO;
    })
    .await;
    let body = tokens_body(&["token1"]);
    h.sim.set_faults(tpns_sim::Faults {
        rate_limit_ratio: 1.0,
        ..Default::default()
    });
    for _ in 0..2 {
        let r = h.query(&body).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.ret_code(), 1_008_028);
    }
    h.sim.set_faults(tpns_sim::Faults {
        fail_ratio: 1.0,
        ..Default::default()
    });
    let r = h.query(&body).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.json()["errMsg"].as_str().unwrap().contains("HTTP 500"));
    h.sim.set_faults(Default::default());
    let r = h.query(&body).await;
    assert_eq!(r.ret_code(), 0);
    assert_eq!(h.upstream_queries(), 4, "failures were not cached");
}

#[tokio::test]
async fn admin_endpoints_and_counters() {
    let h = Harness::start().await;
    let ok = |r: &Reply| r.status == StatusCode::OK;
    assert!(ok(&h.send(h.admin, Method::GET, "/healthz", &[], "").await));
    assert!(ok(&h.send(h.admin, Method::GET, "/readyz", &[], "").await));
    let body = tokens_body(&["token1", "token2"]);
    h.query(&body).await;
    h.query(&body).await;
    h.query(&tokens_body(&["token1", "token3"])).await;
    let m = h.metrics().await;
    for line in [
        r#"tpns_cache_lookups_total{op="token_accounts",outcome="unverified"} 2"#,
        r#"tpns_cache_lookups_total{op="token_accounts",outcome="hit"} 3"#,
        r#"tpns_cache_lookups_total{op="token_accounts",outcome="miss"} 1"#,
        r#"tpns_cache_upstream_identifiers_total{op="token_accounts"} 3"#,
        r#"tpns_cache_requests_total{cache="hit",route="query"} 1"#,
        r#"tpns_cache_requests_total{cache="partial",route="query"} 1"#,
        r#"tpns_cache_upstream_requests_total{outcome="ok",route="query"} 2"#,
        "tpns_cache_entries 3",
    ] {
        assert!(m.contains(line), "missing {line} in\n{m}");
    }
}

#[tokio::test]
async fn unknown_request_fields_are_forwarded_and_keyed() {
    let h = Harness::start().await;
    let a = r#"{"operator_type":2,"token_list":["token1"],"x_extra":{"k":1}}"#;
    let b = r#"{"operator_type":2,"token_list":["token1"],"x_extra":{"k":2}}"#;
    assert_eq!(h.query(a).await.ret_code(), 0);
    assert_eq!(h.query(a).await.ret_code(), 0);
    assert_eq!(h.upstream_queries(), 1);
    let r = h.query(b).await;
    assert!(
        r.cache_status().contains("fwd=miss"),
        "different extra field, different key"
    );
    assert_eq!(h.upstream_queries(), 2);
}

/// The demo's printed commands show what they promise: a miss, a hit, then a partial hit.
#[tokio::test]
async fn the_demo_queries_show_miss_hit_partial() {
    use tpns_cache::demo::{DEMO_FIRST, DEMO_PARTIAL, DEMO_TOKENS_QUERY};
    let h = Harness::with(
        tpns_sim::SimConfig {
            accounts: tpns_cache::demo::DEMO_ACCOUNTS,
            tokens: tpns_cache::demo::DEMO_TOKENS,
            ..tpns_sim::SimConfig::default()
        },
        |_| {},
    )
    .await;
    let r = h.query(DEMO_FIRST).await;
    assert!(
        r.cache_status().contains("fwd=request"),
        "{}",
        r.cache_status()
    );
    assert_eq!(r.json()["result"], json!(["0", "0"]));
    let r = h.query(DEMO_FIRST).await;
    assert!(r.cache_status().contains("; hit;"), "{}", r.cache_status());
    let r = h.query(DEMO_PARTIAL).await;
    assert!(
        r.cache_status()
            .contains(r#"fwd=partial; detail="hit 2/3""#),
        "{}",
        r.cache_status()
    );
    assert_eq!(r.json()["result"], json!(["0", "0", "0"]));
    let r = h.query(DEMO_TOKENS_QUERY).await;
    assert_eq!(r.json()["result"], json!(["0", "0", "0", "1008006"]));
    let text = tpns_cache::demo::instructions(h.proxy, h.admin, h.sim_addr);
    for q in [DEMO_FIRST, DEMO_PARTIAL, DEMO_TOKENS_QUERY] {
        assert!(text.contains(q));
    }
}

async fn raw_exchange(addr: std::net::SocketAddr, head: &str, chunks: &[&[u8]]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    for c in chunks {
        // The proxy may stop reading (and answer) before everything is written.
        if s.write_all(c).await.is_err() {
            break;
        }
    }
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf))
        .await
        .expect("an answer, not a hang")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn basic_header() -> String {
    auth_headers(Some(APP))
        .into_iter()
        .find(|(k, _)| *k == "authorization")
        .unwrap()
        .1
}

#[tokio::test]
async fn a_chunked_body_is_cut_off_at_the_limit_without_reading_it_whole() {
    let h = Harness::with(sim_config(), |c| {
        c.limits.max_body_bytes = bytesize::ByteSize::b(1024);
    })
    .await;
    let head = format!(
        "POST {QUERY} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        basic_header()
    );
    let chunk = format!("200\r\n{}\r\n", "a".repeat(0x200));
    // Three 512-byte chunks and never the final one: only the limit can end this request.
    let resp = raw_exchange(
        h.proxy,
        &head,
        &[chunk.as_bytes(), chunk.as_bytes(), chunk.as_bytes()],
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("1008007"), "{resp}");
    assert_eq!(h.upstream_queries(), 0);
}

#[tokio::test]
async fn a_body_that_never_completes_times_out_with_408() {
    let h = Harness::with(sim_config(), |c| {
        c.limits.body_read_timeout = Duration::from_millis(200);
    })
    .await;
    let head = format!(
        "POST {QUERY} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: 100\r\n\r\n",
        basic_header()
    );
    let resp = raw_exchange(h.proxy, &head, &[b"{\"operator_type\":"]).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("1008001"), "{resp}");
    assert_eq!(h.upstream_queries(), 0);
}

/// The response memo answers repeated identical requests, per credential, only while fresh.
#[tokio::test]
async fn repeated_identical_requests_come_from_the_memo_while_fresh() {
    let h = Harness::with(sim_config(), |c| {
        c.cache.ttl = Duration::from_secs(60);
        c.cache.ttl_jitter = 0.0;
        c.cache.stale_while_revalidate = Duration::ZERO;
    })
    .await;
    let body = tokens_body(&["token1", "token2", "tok-00000003"]);
    let first = h.query(&body).await; // fetched (credential not yet verified)
    h.query(&body).await; // all cached: memoized
    for _ in 0..3 {
        let r = h.query(&body).await;
        assert_eq!(r.json(), first.json());
        assert!(r.cache_status().contains("; hit;"), "{}", r.cache_status());
    }
    let m = h.metrics().await;
    assert_eq!(sample(&m, "tpns_cache_memo_hits_total"), 3.0, "{m}");
    // Another credential with the same body does not get this memo.
    let other = h.query_as(Some(OTHER_APP), &body).await;
    assert!(
        other.cache_status().contains("fwd=request"),
        "{}",
        other.cache_status()
    );
    // A binding change at the upstream shows once the entries' lifetime is over.
    h.sim.bind(APP.0, "token1", "late-owner", 0);
    h.clock.advance(Duration::from_secs(61));
    let r = h.query(&body).await;
    assert!(r.body_text().contains("late-owner"), "{}", r.body_text());
    assert_eq!(
        sample(&h.metrics().await, "tpns_cache_memo_hits_total"),
        3.0
    );
}

#[tokio::test]
async fn an_oversized_upstream_answer_is_refused_and_not_cached() {
    let h = Harness::with(sim_config(), |c| {
        c.upstream.max_response_bytes = bytesize::ByteSize::kib(1);
    })
    .await;
    let asked: Vec<String> = (0..30).map(tpns_sim::token_name).collect();
    let body = tokens_body(&asked.iter().map(String::as_str).collect::<Vec<_>>());
    for _ in 0..2 {
        let r = h.query(&body).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert_eq!(r.ret_code(), 1_008_004);
        assert!(
            r.body_text().contains("larger than 1024 bytes"),
            "{}",
            r.body_text()
        );
    }
    assert_eq!(h.upstream_queries(), 2, "nothing was cached");
}
