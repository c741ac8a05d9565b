//! Freshness: writes through the proxy invalidate what they can make wrong (both directions,
//! after the upstream's asynchronous apply), in-flight fetches do not re-store old answers, and
//! operators can purge.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tpns_sim::{Faults, SimConfig};

/// The simulator applies writes 300 ms after accepting them; the proxy invalidates at once and
/// again after 600 ms.
const APPLY: Duration = Duration::from_millis(300);
const AGAIN: Duration = Duration::from_millis(600);
const SETTLE: Duration = Duration::from_millis(800);

async fn harness() -> Harness {
    Harness::with(
        SimConfig {
            apply_delay: APPLY,
            ..sim_config()
        },
        |c| {
            c.cache.invalidate_again_after = AGAIN;
            c.cache.stale_while_revalidate = Duration::ZERO;
        },
    )
    .await
}

async fn write(h: &Harness, body: Value) -> Reply {
    let r = h
        .send(
            h.proxy,
            Method::POST,
            "/v3/device/account/batchoperate",
            &auth_headers(Some(APP)),
            body.to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
    assert_eq!(r.json()["ret_code"], 0, "{}", r.body_text());
    r
}

/// The accounts the proxy says `token` is bound to (empty when not found).
async fn accounts_of(h: &Harness, token: &str) -> Vec<String> {
    let v = h.query(&tokens_body(&[token])).await.json();
    v["token_accounts"]
        .as_array()
        .and_then(|a| a.first())
        .map(|el| {
            el["account_list"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["account"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The tokens the proxy says `account` (no account_type) is bound to.
async fn tokens_of(h: &Harness, account: &str) -> Vec<String> {
    let v = h.query(&accounts_body(&[account])).await.json();
    v["account_tokens"]
        .as_array()
        .and_then(|a| a.first())
        .map(|el| {
            el["token_list"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn cached(h: &Harness, body: &str) -> bool {
    h.query(body).await.cache_status().contains("; hit;")
}

#[tokio::test]
async fn overwrite_ops_1_and_2_refresh_both_directions() {
    for op in [1, 2] {
        let h = harness().await;
        h.sim.bind(APP.0, "tw", "old-acct", 0);
        assert_eq!(accounts_of(&h, "tw").await, ["old-acct"]);
        assert_eq!(tokens_of(&h, "old-acct").await, ["tw"]);
        assert!(tokens_of(&h, "new-acct").await.is_empty());
        assert!(cached(&h, &tokens_body(&["tw"])).await);
        write(
            &h,
            json!({"operator_type": op, "token_accounts": [{"token": "tw", "account_list": [{"account": "new-acct"}]}]}),
        )
        .await;
        // Before the upstream applies the write, a query re-reads (and re-caches) the old state…
        assert_eq!(accounts_of(&h, "tw").await, ["old-acct"]);
        tokio::time::sleep(SETTLE).await;
        // …which the second invalidation drops.
        assert_eq!(accounts_of(&h, "tw").await, ["new-acct"], "op {op}");
        assert!(
            tokens_of(&h, "old-acct").await.is_empty(),
            "op {op}: old binding gone"
        );
        assert_eq!(tokens_of(&h, "new-acct").await, ["tw"], "op {op}");
    }
}

#[tokio::test]
async fn op_3_removes_the_listed_accounts() {
    let h = harness().await;
    h.sim.bind(APP.0, "t3", "a1", 0);
    h.sim.bind(APP.0, "t3", "a2", 0);
    assert_eq!(accounts_of(&h, "t3").await, ["a1", "a2"]);
    assert_eq!(tokens_of(&h, "a1").await, ["t3"]);
    assert_eq!(tokens_of(&h, "a2").await, ["t3"]);
    write(
        &h,
        json!({"operator_type": 3, "token_accounts": [{"token": "t3", "account_list": [{"account": "a1"}]}]}),
    )
    .await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(accounts_of(&h, "t3").await, ["a2"]);
    assert!(tokens_of(&h, "a1").await.is_empty());
    assert_eq!(tokens_of(&h, "a2").await, ["t3"]);
}

#[tokio::test]
async fn op_4_remove_all_reaches_accounts_the_write_does_not_name() {
    let h = harness().await;
    h.sim.bind(APP.0, "t4", "b1", 0);
    h.sim.bind(APP.0, "t4", "b2", 0);
    assert_eq!(tokens_of(&h, "b1").await, ["t4"]);
    assert_eq!(tokens_of(&h, "b2").await, ["t4"]);
    assert_eq!(accounts_of(&h, "t4").await, ["b1", "b2"]);
    write(&h, json!({"operator_type": 4, "token_list": ["t4"]})).await;
    tokio::time::sleep(SETTLE).await;
    assert!(accounts_of(&h, "t4").await.is_empty());
    assert!(
        tokens_of(&h, "b1").await.is_empty(),
        "found through the reverse index"
    );
    assert!(tokens_of(&h, "b2").await.is_empty());
}

#[tokio::test]
async fn op_5_remove_an_account_everywhere_reaches_its_tokens() {
    let h = harness().await;
    h.sim.bind(APP.0, "t5a", "c1", 0);
    h.sim.bind(APP.0, "t5b", "c1", 0);
    h.sim.bind(APP.0, "t5b", "c2", 0);
    assert_eq!(accounts_of(&h, "t5a").await, ["c1"]);
    assert_eq!(accounts_of(&h, "t5b").await, ["c1", "c2"]);
    assert_eq!(tokens_of(&h, "c1").await, ["t5a", "t5b"]);
    write(
        &h,
        json!({"operator_type": 5, "account_list": [{"account": "c1"}]}),
    )
    .await;
    tokio::time::sleep(SETTLE).await;
    assert!(tokens_of(&h, "c1").await.is_empty());
    assert!(accounts_of(&h, "t5a").await.is_empty());
    assert_eq!(accounts_of(&h, "t5b").await, ["c2"]);
}

#[tokio::test]
async fn another_apps_entries_are_untouched() {
    let h = harness().await;
    h.sim.bind(APP.0, "shared", "x", 0);
    h.sim.bind(OTHER_APP.0, "shared", "y", 0);
    let body = tokens_body(&["shared"]);
    h.query_as(Some(OTHER_APP), &body).await;
    assert!(h
        .query_as(Some(OTHER_APP), &body)
        .await
        .cache_status()
        .contains("; hit;"));
    accounts_of(&h, "shared").await;
    write(&h, json!({"operator_type": 4, "token_list": ["shared"]})).await;
    tokio::time::sleep(SETTLE).await;
    let r = h.query_as(Some(OTHER_APP), &body).await;
    assert!(r.cache_status().contains("; hit;"), "{}", r.cache_status());
    assert!(r.body_text().contains("\"y\""));
    assert!(accounts_of(&h, "shared").await.is_empty());
}

/// A fetch that was in flight when a write passed must not store its (old) answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_fetch_does_not_store_an_answer_from_before_a_write() {
    let h = std::sync::Arc::new(
        Harness::with(sim_config(), |c| {
            // Only the epoch guard protects here: no second invalidation.
            c.cache.invalidate_again_after = Duration::ZERO;
        })
        .await,
    );
    h.sim.bind(APP.0, "tr", "before", 0);
    accounts_of(&h, "tok-00000001").await; // the credential is accepted
    h.sim.set_faults(Faults {
        latency_ms: 400,
        ..Faults::default()
    });
    let inflight = {
        let h = h.clone();
        tokio::spawn(async move { accounts_of(&h, "tr").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    write(
        &h,
        json!({"operator_type": 2, "token_accounts": [{"token": "tr", "account_list": [{"account": "after"}]}]}),
    )
    .await;
    assert_eq!(
        inflight.await.unwrap(),
        ["before"],
        "answered with what the upstream said"
    );
    h.sim.set_faults(Faults::default());
    let r = h.query(&tokens_body(&["tr"])).await;
    assert!(
        r.cache_status().contains("fwd=miss"),
        "{}",
        r.cache_status()
    );
    assert!(r.body_text().contains("after"));
    let m = h.metrics().await;
    assert_eq!(sample(&m, "tpns_cache_fetch_discarded_total"), 1.0);
}

async fn purge(h: &Harness, body: Value, bearer: Option<&str>) -> Reply {
    let mut headers = vec![];
    if let Some(t) = bearer {
        headers.push(("authorization", format!("Bearer {t}")));
    }
    h.send(h.admin, Method::POST, "/purge", &headers, body.to_string())
        .await
}

#[tokio::test]
async fn purge_by_identifier_and_by_app() {
    let h = Harness::start().await;
    let app_body = tokens_body(&["token1", "token2"]);
    h.query(&app_body).await;
    h.query(&accounts_body(&["account1"])).await;
    h.query_as(Some(OTHER_APP), &app_body).await;

    let r = purge(&h, json!({"access_id": APP.0, "tokens": ["token1"]}), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["dropped"], 1);
    assert_eq!(v["tokens"], json!(["token1"]));
    let r = h.query(&app_body).await;
    assert!(r.cache_status().contains("hit 1/2"), "{}", r.cache_status());

    let r = purge(&h, json!({"access_id": APP.0}), None).await;
    let v = r.json();
    assert_eq!(v["dropped"], 3, "{v}");
    assert_eq!(v["accounts"], json!(["account1"]));
    assert!(h.query(&app_body).await.cache_status().contains("fwd=miss"));
    // The other app kept its entries.
    assert!(h
        .query_as(Some(OTHER_APP), &app_body)
        .await
        .cache_status()
        .contains("; hit;"));
    let m = h.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"tpns_cache_invalidated_entries_total{source="admin"}"#
        ),
        4.0
    );
    // Bad requests are refused with a reason.
    let r = purge(&h, json!({"tokens": ["x"]}), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn purge_requires_the_bearer_token_when_one_is_configured() {
    let dir = std::env::temp_dir().join(format!("tpns-purge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "admin-secret\n").unwrap();
    let h = Harness::with(sim_config(), |c| c.admin.token_file = Some(file.clone())).await;
    let body = json!({"access_id": APP.0});
    assert_eq!(
        purge(&h, body.clone(), None).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        purge(&h, body.clone(), Some("wrong")).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        purge(&h, body, Some("admin-secret")).await.status,
        StatusCode::OK
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn purge_is_refused_on_a_non_loopback_admin_listener_without_a_token() {
    let h = Harness::with(sim_config(), |c| {
        c.admin_listen = "0.0.0.0:0".parse().unwrap();
    })
    .await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", h.admin.port()).parse().unwrap();
    let r = h
        .send(
            addr,
            Method::POST,
            "/purge",
            &[],
            json!({"access_id": APP.0}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body_text().contains("admin.token_file"));
    // Metrics and health stay readable.
    let r = h.send(addr, Method::GET, "/healthz", &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
}
