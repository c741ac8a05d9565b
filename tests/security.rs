//! Credential modes (signature verify + re-sign, injection), TLS listeners, and hostile input.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::json;
use tpns_cache::config::{AppKeyConfig, AuthScheme, InjectConfig};
use tpns_wire::sign;

/// A private directory for secret files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "tpns-sec-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn now() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string()
}

fn signed_headers(app: (&str, &str), ts: &str, body: &str) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/json".to_owned()),
        ("accessid", app.0.to_owned()),
        ("timestamp", ts.to_owned()),
        ("sign", sign(app.1.as_bytes(), ts, app.0, body.as_bytes())),
    ]
}

async fn signed_query(h: &Harness, app: (&str, &str), ts: &str, body: &str) -> Reply {
    h.send(
        h.proxy,
        Method::POST,
        QUERY,
        &signed_headers(app, ts, body),
        body.to_owned(),
    )
    .await
}

async fn with_app_key(dir: &TempDir) -> Harness {
    let key = dir.file("key", &format!("{}\n", APP.1));
    Harness::with(sim_config(), |c| {
        c.auth.apps = vec![AppKeyConfig {
            access_id: APP.0.to_owned(),
            secret_key_file: Some(key),
            secret_key_env: None,
        }];
    })
    .await
}

#[tokio::test]
async fn signed_requests_of_a_held_key_are_verified_cached_and_re_signed() {
    let dir = TempDir::new("signed");
    let h = with_app_key(&dir).await;
    let body = tokens_body(&["token1", "tok-00000003"]);
    let r = signed_query(&h, APP, &now(), &body).await;
    assert_eq!(r.ret_code(), 0, "{}", r.body_text());
    assert_eq!(r.json(), h.direct(&body).await.json());
    // A different body (a sub-set, the misses only) was signed anew: the simulator checks.
    let partial = tokens_body(&["token1", "tok-00000003", "tok-00000004"]);
    let r = signed_query(&h, APP, &now(), &partial).await;
    assert_eq!(r.ret_code(), 0, "{}", r.body_text());
    assert!(r.cache_status().contains("hit 2/3"), "{}", r.cache_status());
    assert_eq!(h.last_upstream_query(), ["tok-00000004"]);
    let r = signed_query(&h, APP, &now(), &body).await;
    assert!(r.cache_status().contains("; hit;"));
}

#[tokio::test]
async fn bad_or_stale_signatures_are_refused_without_calling_the_upstream() {
    let dir = TempDir::new("badsig");
    let h = with_app_key(&dir).await;
    let body = tokens_body(&["token1"]);
    assert_eq!(signed_query(&h, APP, &now(), &body).await.ret_code(), 0);
    let calls = h.sim.stats().requests.values().sum::<u64>();
    let stale = (now().parse::<i64>().unwrap() - 600).to_string();
    let cases = [
        signed_headers((APP.0, "not-the-key"), &now(), &body),
        signed_headers(APP, &stale, &body),
        signed_headers(APP, "yesterday", &body),
        {
            let mut h = signed_headers(APP, &now(), &body);
            h[3].1 = "c2lnbg==".to_owned();
            h
        },
    ];
    for headers in cases {
        let r = h
            .send(h.proxy, Method::POST, QUERY, &headers, body.clone())
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.ret_code(), 1_008_003, "{}", r.body_text());
        assert!(r.json().get("token_accounts").is_none(), "no cached data");
    }
    // A valid signature over a different body than the one sent.
    let other = tokens_body(&["token2"]);
    let r = h
        .send(
            h.proxy,
            Method::POST,
            QUERY,
            &signed_headers(APP, &now(), &other),
            body.clone(),
        )
        .await;
    assert_eq!(r.ret_code(), 1_008_003);
    assert_eq!(
        h.sim.stats().requests.values().sum::<u64>(),
        calls,
        "nothing forwarded"
    );
}

#[tokio::test]
async fn signed_requests_of_other_apps_pass_through_unchanged_and_uncached() {
    let dir = TempDir::new("othersig");
    let h = with_app_key(&dir).await;
    let body = tokens_body(&["token1"]);
    for _ in 0..2 {
        let r = signed_query(&h, OTHER_APP, &now(), &body).await;
        assert_eq!(
            r.ret_code(),
            0,
            "the upstream verified the client's own signature"
        );
        assert!(r.cache_status().contains("fwd=bypass"));
    }
    assert_eq!(h.upstream_queries(), 2);
}

async fn injecting(dir: &TempDir, scheme: AuthScheme) -> Harness {
    let key = dir.file("inject", APP.1);
    Harness::with(sim_config(), |c| {
        c.auth.inject = Some(InjectConfig {
            access_id: APP.0.to_owned(),
            secret_key_file: Some(key),
            secret_key_env: None,
            scheme,
        });
    })
    .await
}

#[tokio::test]
async fn injection_adds_credentials_to_every_upstream_call() {
    for scheme in [AuthScheme::Basic, AuthScheme::Signature] {
        let dir = TempDir::new("inject");
        let h = injecting(&dir, scheme).await;
        let body = tokens_body(&["token1", "token2"]);
        let r = h.query_as(None, &body).await;
        assert_eq!(r.ret_code(), 0, "{scheme:?}: {}", r.body_text());
        assert_eq!(r.json(), h.direct(&body).await.json());
        let r = h.query_as(None, &body).await;
        assert!(r.cache_status().contains("; hit;"), "{scheme:?}");
        // Other paths get them too.
        let push = h.push(None, r#"{"audience_type":"all"}"#).await;
        assert_eq!(
            push.json()["ret_code"],
            0,
            "{scheme:?}: {}",
            push.body_text()
        );
        // Requests with credentials of their own follow the pass-through rules.
        let r = h.query_as(Some((APP.0, "wrong")), &body).await;
        assert_eq!(r.ret_code(), 10_030_002, "{scheme:?}");
    }
}

#[tokio::test]
async fn secrets_come_only_from_files_or_env_and_missing_ones_stop_start_up() {
    let mut c = tpns_cache::config::Config::default();
    c.auth.inject = Some(InjectConfig {
        access_id: APP.0.to_owned(),
        secret_key_file: None,
        secret_key_env: Some("TPNS_TEST_NO_SUCH_VARIABLE".to_owned()),
        scheme: AuthScheme::Basic,
    });
    let msg = c.validate().unwrap_err().to_string();
    assert!(msg.contains("auth.inject.secret_key_env"), "{msg}");
    assert!(msg.contains("TPNS_TEST_NO_SUCH_VARIABLE"), "{msg}");
}

fn self_signed(dir: &TempDir) -> (PathBuf, PathBuf, Vec<u8>) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert_pem = cert.cert.pem();
    let key_pem = cert.key_pair.serialize_pem();
    (
        dir.file("tls.crt", &cert_pem),
        dir.file("tls.key", &key_pem),
        cert.cert.der().to_vec(),
    )
}

#[tokio::test]
async fn proxy_and_admin_listeners_serve_tls() {
    use http_body_util::{BodyExt, Full};
    let dir = TempDir::new("tls");
    let (cert, key, der) = self_signed(&dir);
    let h = Harness::with(sim_config(), |c| {
        c.tls.cert_file = Some(cert.clone());
        c.tls.key_file = Some(key.clone());
        c.admin.tls.cert_file = Some(cert.clone());
        c.admin.tls.key_file = Some(key.clone());
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.into()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let mut req = http::Request::builder()
        .method(Method::POST)
        .uri(format!("https://localhost:{}{QUERY}", h.proxy.port()));
    for (k, v) in auth_headers(Some(APP)) {
        req = req.header(k, v);
    }
    let resp = client
        .request(
            req.body(Full::new(tokens_body(&["token1"]).into()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("926@126.com"));
    let resp = client
        .request(
            http::Request::get(format!("https://localhost:{}/healthz", h.admin.port()))
                .body(Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = tokio::time::timeout(
        Duration::from_secs(5),
        raw(h.proxy, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
    )
    .await
    .unwrap();
    assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");
}

/// Sends raw bytes and reads what comes back until the peer closes or 5 s pass.
fn post(body: &[u8], extra: &str) -> Vec<u8> {
    let mut v = format!(
        "POST {QUERY} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        basic(),
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

/// Every malformed input gets its TPNS code and HTTP status; nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_tpns_errors_and_nothing_is_forwarded() {
    let h = Harness::with(sim_config(), |c| {
        c.limits.max_body_bytes = bytesize::ByteSize::mib(16);
        c.limits.body_read_timeout = Duration::from_millis(300);
    })
    .await;
    let million = format!(
        "{{\"operator_type\":2,\"token_list\":[{}\"t\"]}}",
        "\"t\",".repeat(1_000_000)
    );
    let deep = format!(
        "{{\"operator_type\":2,\"token_list\":[\"a\"],\"x\":{}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let cases: Vec<(&str, Vec<u8>, &str, i64)> = vec![
        (
            "invalid UTF-8",
            b"{\"operator_type\":2,\"token_list\":[\"\xff\xfe\"]}".to_vec(),
            "200",
            1_008_001,
        ),
        (
            "truncated",
            br#"{"operator_type":2,"token_list":["a""#.to_vec(),
            "200",
            1_008_001,
        ),
        (
            "number for string",
            br#"{"operator_type":2,"token_list":[12]}"#.to_vec(),
            "200",
            1_008_007,
        ),
        (
            "float op",
            br#"{"operator_type":1.0,"token_list":["a"]}"#.to_vec(),
            "200",
            1_008_007,
        ),
        (
            "negative op",
            br#"{"operator_type":-2,"token_list":["a"]}"#.to_vec(),
            "200",
            1_008_007,
        ),
        (
            "null op",
            br#"{"operator_type":null,"token_list":["a"]}"#.to_vec(),
            "200",
            1_008_002,
        ),
        (
            "null element",
            br#"{"operator_type":2,"token_list":[null]}"#.to_vec(),
            "200",
            1_008_007,
        ),
        (
            "huge number",
            br#"{"operator_type":123456789012345678901234567890,"token_list":["a"]}"#.to_vec(),
            "200",
            1_008_007,
        ),
        (
            "huge exponent",
            br#"{"operator_type":1e999999,"token_list":["a"]}"#.to_vec(),
            "200",
            1_008_001,
        ),
        ("deep nesting", deep.into_bytes(), "200", 1_008_007),
        ("10^6 elements", million.into_bytes(), "200", 1_008_007),
        (
            "empty string",
            br#"{"operator_type":2,"token_list":[""]}"#.to_vec(),
            "200",
            1_008_007,
        ),
        (
            "NUL",
            b"{\"operator_type\":2,\"token_list\":[\"a\\u0000\"]}".to_vec(),
            "200",
            1_008_007,
        ),
        (
            "control char",
            b"{\"operator_type\":2,\"token_list\":[\"a\\nb\"]}".to_vec(),
            "200",
            1_008_007,
        ),
        (
            "duplicated key",
            br#"{"operator_type":2,"token_list":["a"],"token_list":["b"]}"#.to_vec(),
            "200",
            1_008_007,
        ),
        (
            "account null type",
            br#"{"operator_type":1,"account_list":[{"account":"a","account_type":null}]}"#.to_vec(),
            "200",
            1_008_007,
        ),
    ];
    for (what, body, status, code) in cases {
        let resp = raw(h.proxy, &post(&body, "")).await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {resp:.200}"
        );
        assert!(
            resp.contains(&format!("\"retCode\":{code}")),
            "{what}: {resp:.300}"
        );
    }
    // (A content type other than JSON is the upstream's to judge since issue 11: it is
    // forwarded unchanged and not cached, see tests/hardening.rs.)
    let body = tokens_body(&["token1"]);
    // A head larger than limits.max_header_bytes.
    let resp = raw(
        h.proxy,
        &post(
            body.as_bytes(),
            &format!("X-Big: {}\r\n", "a".repeat(40_000)),
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:.200}");
    // Content-Length larger than the body: the body never completes → 408.
    let mut lie = post(body.as_bytes(), "");
    let s = String::from_utf8(lie.clone()).unwrap().replace(
        &format!("Content-Length: {}", body.len()),
        &format!("Content-Length: {}", body.len() + 50),
    );
    lie = s.into_bytes();
    let resp = raw(h.proxy, &lie).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp:.200}");
    // Content-Length shorter than the body: the proxy reads a truncated JSON → 1008001, and the
    // rest is not a request.
    let short = String::from_utf8(post(body.as_bytes(), ""))
        .unwrap()
        .replace(
            &format!("Content-Length: {}", body.len()),
            "Content-Length: 10",
        )
        .into_bytes();
    let resp = raw(h.proxy, &short).await;
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.contains("1008001"),
        "{resp:.300}"
    );
    assert_eq!(
        h.sim.stats().requests.values().sum::<u64>(),
        0,
        "nothing forwarded"
    );
    // Extra unknown fields are fine, and still served.
    let r = h
        .query(r#"{"operator_type":2,"token_list":["token1"],"future_field":{"x":[1,2]}}"#)
        .await;
    assert_eq!(r.ret_code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_to_be_accepted() {
    use tokio::io::AsyncWriteExt;
    let h =
        std::sync::Arc::new(Harness::with(sim_config(), |c| c.limits.max_connections = 1).await);
    // One idle connection takes the only slot.
    let mut idle = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    idle.write_all(b"").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiting = {
        let h = h.clone();
        tokio::spawn(async move { h.query(&tokens_body(&["token1"])).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "served although the limit was reached"
    );
    drop(idle);
    let r = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.ret_code(), 0);
    let _ = json!(null);
}
