//! Secrets never appear in logs, `Debug` output or error bodies. One test per binary: it
//! installs the global tracing subscriber (at TRACE level) and captures everything.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use http::Method;
use tpns_cache::config::{AppKeyConfig, AuthScheme, InjectConfig};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_debug_output_or_errors() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(move || writer.clone())
        .init();

    const INJECTED: &str = "injected-secret-4f1a9c";
    const ADMIN: &str = "admin-token-77b2e0";
    const WRONG: &str = "wrong-secret-c0ffee";
    let dir = std::env::temp_dir().join(format!("tpns-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let app_key = dir.join("app");
    std::fs::write(&app_key, APP.1).unwrap();
    let admin_token = dir.join("admin");
    std::fs::write(&admin_token, ADMIN).unwrap();
    std::env::set_var("TPNS_LOGS_TEST_INJECT", INJECTED);

    let dead = closed_port().await;
    let configure = |c: &mut tpns_cache::config::Config| {
        c.auth.apps = vec![AppKeyConfig {
            access_id: APP.0.to_owned(),
            secret_key_file: Some(app_key.clone()),
            secret_key_env: None,
        }];
        c.auth.inject = Some(InjectConfig {
            access_id: OTHER_APP.0.to_owned(),
            secret_key_file: None,
            secret_key_env: Some("TPNS_LOGS_TEST_INJECT".to_owned()),
            scheme: AuthScheme::Basic,
        });
        c.admin.token_file = Some(admin_token.clone());
    };
    let h = Harness::with(sim_config(), configure).await;
    let mut bodies = Vec::new();
    let q = tokens_body(&["token1", "tok-00000002"]);
    bodies.push(h.query(&q).await.body);
    bodies.push(h.query(&q).await.body);
    bodies.push(h.query_as(Some((APP.0, WRONG)), &q).await.body);
    bodies.push(h.query_as(None, &q).await.body);
    bodies.push(h.query(r#"{"operator_type":9}"#).await.body);
    bodies.push(
        h.send(
            h.admin,
            Method::POST,
            "/purge",
            &[("authorization", format!("Bearer {WRONG}"))],
            "{}",
        )
        .await
        .body,
    );
    bodies.push(
        h.send(
            h.admin,
            Method::POST,
            "/purge",
            &[("authorization", format!("Bearer {ADMIN}"))],
            format!(r#"{{"access_id":"{}"}}"#, APP.0),
        )
        .await
        .body,
    );
    bodies.push(h.send(h.admin, Method::GET, "/metrics", &[], "").await.body);
    // The status page and its data show settings, never a secret or where it is kept.
    for path in ["/", "/status.json"] {
        let page = h.send(h.admin, Method::GET, path, &[], "").await;
        assert_eq!(page.status, 200, "{path}");
        let text = page.body_text();
        assert!(
            !text.contains(dir.to_str().unwrap()) && !text.contains("TPNS_LOGS_TEST_INJECT"),
            "{path} shows where a secret is kept"
        );
        bodies.push(page.body);
    }
    let status = h
        .send(h.admin, Method::GET, "/status.json", &[], "")
        .await
        .json();
    assert_eq!(status["config"]["auth.inject.secret_key_env"], "set");
    assert_eq!(status["config"]["admin.token_file"], "set");
    // Upstream failures log their cause.
    let down = Harness::with(sim_config(), |c| {
        configure(c);
        c.upstream.url = format!("http://{dead}");
    })
    .await;
    bodies.push(down.query(&q).await.body);
    bodies.push(down.query_as(None, &q).await.body);
    bodies.push(down.push(None, "{}").await.body);
    let mut config = h.config.clone();
    configure(&mut config);
    let debug = format!("{config:?} {:?}", config.keys().unwrap());
    drop(h);
    drop(down);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(logs.contains("upstream"), "the capture works: {logs:.500}");
    assert!(
        logs.len() > 1000,
        "trace level produced a log: {} bytes",
        logs.len()
    );
    let everything = format!(
        "{logs}\n{debug}\n{}",
        bodies
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let basic = |id: &str, s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{s}"))
    };
    for secret in [
        APP.1.to_owned(),
        INJECTED.to_owned(),
        ADMIN.to_owned(),
        WRONG.to_owned(),
        basic(APP.0, APP.1),
        basic(OTHER_APP.0, INJECTED),
        basic(APP.0, WRONG),
    ] {
        assert!(!everything.contains(&secret), "secret {secret} leaked");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
