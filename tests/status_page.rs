//! The status page in a real browser: headless Chromium (Debian's `chromium`; `.ci/run`
//! installs it) loads `GET /` from a proxy that has served the demo's requests (a miss, a hit,
//! a partial hit) and an upstream failure, runs the page's script under its
//! Content-Security-Policy, waits for it to refresh, and the rendered DOM must show the same
//! figures as `/metrics`. It also saves the screenshot the README shows (`target/status-page.png`;
//! with `UPDATE_STATUS_SCREENSHOT=1` also `docs/status-page.png`).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

const BROWSERS: [&str; 3] = ["chromium", "chromium-browser", "google-chrome"];

fn browser() -> &'static str {
    BROWSERS
        .iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("a headless Chromium is needed (apt-get install chromium; .ci/run does it)")
}

/// Runs the browser headless on `url` with `args`; its stdout.
fn headless(url: &str, args: &[&str]) -> String {
    let out = Command::new(browser())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            // Timers run in virtual time: the page's 2 s refresh fires without waiting for it.
            "--virtual-time-budget=7000",
        ])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id` in a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let rest = &dom[start..];
    let open = rest.find('>').unwrap() + 1;
    let close = rest[open..].find('<').unwrap();
    rest[open..open + close].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_what_metrics_says_in_a_real_browser() {
    let h = Harness::start().await;
    // The demo's requests: a miss (the credential's first request), a hit, a partial hit.
    let seed = r#"{"operator_type":1,"account_list":[{"account":"account1"},{"account":"account2","account_type":1}]}"#;
    assert_eq!(h.query(seed).await.ret_code(), 0);
    assert!(h.query(seed).await.cache_status().contains("; hit;"));
    let partial = r#"{"operator_type":1,"account_list":[{"account":"account1"},{"account":"account2","account_type":1},{"account":"acct-00000042"}]}"#;
    assert!(h
        .query(partial)
        .await
        .cache_status()
        .contains("fwd=partial"));
    // An upstream failure.
    h.sim.set_faults(tpns_sim::Faults {
        fail_ratio: 1.0,
        ..Default::default()
    });
    assert_eq!(h.query(&tokens_body(&["token1"])).await.status, 502);
    h.sim.set_faults(tpns_sim::Faults::default());

    let url = format!("http://{}/", h.admin);
    let dom = headless(&url, &["--dump-dom"]);
    let metrics = h.metrics().await;

    let refreshes: u32 = dom
        .split("data-refreshes=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse().ok())
        .expect("the body counts refreshes");
    assert!(
        refreshes >= 2,
        "the page refreshed itself: {refreshes} times"
    );

    let m = |series: &str| sample(&metrics, series);
    // Lookups with any of these outcomes, both ops.
    let lookups = |outcomes: &[&str]| -> f64 {
        outcomes
            .iter()
            .map(|o| {
                ["account_tokens", "token_accounts"]
                    .iter()
                    .map(|op| {
                        m(&format!(
                            r#"tpns_cache_lookups_total{{op="{op}",outcome="{o}"}}"#
                        ))
                    })
                    .sum::<f64>()
            })
            .sum()
    };
    let hits = lookups(&["hit", "negative_hit", "stale", "shared_hit", "coalesced"]);
    let asked = hits + lookups(&["miss", "unverified"]);
    let sent = m(r#"tpns_cache_upstream_identifiers_total{op="account_tokens"}"#)
        + m(r#"tpns_cache_upstream_identifiers_total{op="token_accounts"}"#);
    assert!(
        asked >= 7.0 && hits >= 4.0,
        "traffic was served: {asked} {hits}"
    );
    assert_eq!(text_of(&dom, "ids-asked"), format!("{asked}"));
    assert_eq!(text_of(&dom, "ids-cache"), format!("{hits}"));
    assert_eq!(text_of(&dom, "ids-upstream"), format!("{sent}"));
    assert_eq!(
        text_of(&dom, "hit-ratio-total"),
        format!("{:.1}%", hits / asked * 100.0)
    );
    assert_eq!(
        text_of(&dom, "cache-entries"),
        format!("{}", m("tpns_cache_entries"))
    );
    let failed = m(r#"tpns_cache_upstream_requests_total{outcome="http_error",route="query"}"#);
    assert!(failed >= 1.0, "the failure was counted");
    assert!(
        text_of(&dom, "outcomes").contains(&format!("http_error {failed}")),
        "{}",
        text_of(&dom, "outcomes")
    );
    assert_eq!(text_of(&dom, "breaker"), "closed");
    assert!(
        dom.contains(r#"<section class="card" id="fleet" hidden="">"#),
        "no fleet section without fleet mode"
    );

    // The screenshot the README shows.
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).unwrap();
    let png = target.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    headless(
        &url,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,1000",
        ],
    );
    let bytes = std::fs::read(&png).expect("a screenshot was written");
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000);
    if std::env::var_os("UPDATE_STATUS_SCREENSHOT").is_some() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
        std::fs::copy(&png, docs).unwrap();
    }
}
