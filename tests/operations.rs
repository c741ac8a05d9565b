//! Operations: the Prometheus scrape (parsed with a text-format parser), graceful drain on
//! shutdown, and the deploy artifacts' PromQL referring only to metrics that exist.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::Method;
use prometheus_parse::{Scrape, Value};
use tpns_sim::Faults;

async fn scrape(h: &Harness) -> (String, Scrape) {
    let text = h.metrics().await;
    let parsed = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    (text, parsed)
}

fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(b) => b.last().map_or(0.0, |c| c.count),
            Value::Summary(_) => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn the_scrape_parses_and_counters_move() {
    let h = Harness::start().await;
    let (before_text, before) = scrape(&h).await;
    assert_eq!(value(&before, "tpns_cache_build_info", &[]), 1.0);
    // Fleet mode is off: no Redis series that would read as an outage on a dashboard.
    for fleet_only in [
        "tpns_cache_redis_up",
        "tpns_cache_redis_errors_total",
        "tpns_cache_fleet_fallbacks_total",
    ] {
        assert!(
            !before_text.contains(fleet_only),
            "{fleet_only} exported without fleet mode"
        );
    }
    let body = tokens_body(&["token1", "token2", "token3"]);
    h.query(&body).await;
    h.query(&body).await;
    h.query(r#"{"operator_type":5}"#).await;
    h.push(Some(APP), "{}").await;
    let (text, after) = scrape(&h).await;
    let lookups = |outcome| value(&after, "tpns_cache_lookups_total", &[("outcome", outcome)]);
    assert_eq!(lookups("unverified"), 3.0);
    assert_eq!(lookups("hit"), 3.0);
    assert_eq!(
        value(
            &after,
            "tpns_cache_requests_total",
            &[("route", "query"), ("cache", "hit")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "tpns_cache_responses_total",
            &[("route", "query"), ("class", "ok")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &after,
            "tpns_cache_responses_total",
            &[("route", "query"), ("class", "invalid")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "tpns_cache_responses_total",
            &[("route", "other"), ("class", "http_2xx")]
        ),
        1.0
    );
    assert_eq!(
        value(&after, "tpns_cache_upstream_identifiers_total", &[]),
        3.0
    );
    assert_eq!(value(&after, "tpns_cache_entries", &[]), 3.0);
    assert!(value(&after, "tpns_cache_weighted_bytes", &[]) > 0.0);
    assert_eq!(
        value(
            &after,
            "tpns_cache_request_duration_seconds",
            &[("route", "query")]
        ),
        3.0
    );
    assert_eq!(value(&after, "tpns_cache_upstream_batch_size", &[]), 1.0);
    // Label values come from fixed sets: no identifier or AccessID anywhere in the scrape.
    for secretish in ["token1", APP.0, APP.1] {
        assert!(!text.contains(secretish), "{secretish} in a label");
    }
    // Keep the scrape for `promtool check metrics` in CI.
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("metrics-scrape.txt");
    std::fs::write(out, text).unwrap();
}

#[tokio::test]
async fn evictions_are_counted_by_cause() {
    let h = Harness::start().await;
    h.query(&tokens_body(&["token1", "token2"])).await;
    let r = h
        .send(
            h.admin,
            Method::POST,
            "/purge",
            &[],
            format!(r#"{{"access_id":"{}"}}"#, APP.0),
        )
        .await;
    assert_eq!(r.json()["dropped"], 2);
    let (_, s) = scrape(&h).await;
    assert_eq!(
        value(&s, "tpns_cache_evictions_total", &[("cause", "explicit")]),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_and_reports_not_ready() {
    let mut h = Harness::start().await;
    h.sim.set_faults(Faults {
        latency_ms: 600,
        ..Faults::default()
    });
    let proxy = h.proxy;
    let admin = h.admin;
    let client = reqwest_like();
    let in_flight = tokio::spawn({
        let body = tokens_body(&["token1"]);
        let client = client.clone();
        async move { client.query(proxy, &body).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stopping = tokio::spawn(async move {
        h.stop_proxy().await;
        h
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Draining: not ready, no new connections.
    assert_eq!(client.get(admin, "/readyz").await, Some(503));
    assert!(
        tokio::net::TcpStream::connect(proxy).await.is_err(),
        "still accepting"
    );
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "the in-flight request completed");
    assert!(body.contains("926@126.com"));
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("drained within the grace period")
        .unwrap();
}

/// A tiny client with its own connections (independent of the harness being moved).
#[derive(Clone)]
struct Client(
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
);

fn reqwest_like() -> Client {
    Client(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http(),
    )
}

impl Client {
    async fn query(&self, addr: std::net::SocketAddr, body: &str) -> (u16, String) {
        use http_body_util::BodyExt;
        let mut req = http::Request::post(format!("http://{addr}{QUERY}"));
        for (k, v) in auth_headers(Some(APP)) {
            req = req.header(k, v);
        }
        let resp = self
            .0
            .request(
                req.body(http_body_util::Full::new(body.to_owned().into()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn get(&self, addr: std::net::SocketAddr, path: &str) -> Option<u16> {
        let req = http::Request::get(format!("http://{addr}{path}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        self.0.request(req).await.ok().map(|r| r.status().as_u16())
    }
}

/// Every `tpns_cache_*` name in the dashboard and the alert rules is a metric the proxy
/// exports (histogram series by their family name).
#[test]
fn deploy_promql_uses_only_existing_metrics() {
    let families = metric_families();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let files = [
        root.join("grafana/tpns-cache.json"),
        root.join("kubernetes/base/prometheusrule.yaml"),
    ];
    let mut checked = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let mut rest = text.as_str();
        while let Some(i) = rest.find("tpns_cache_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|n| families.contains(*n)))
                .unwrap_or(&name);
            assert!(
                families.contains(family),
                "{}: `{name}` is not an exported metric",
                f.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} metric references found");
}
