//! Test harness: a simulator and a proxy in-process on 127.0.0.1:0, stopped when dropped.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use tpns_cache::cache::Clock;
use tpns_cache::config::Config;
use tpns_cache::Listeners;
use tpns_sim::{SimConfig, Simulator, DEMO_ACCESS_ID, DEMO_SECRET_KEY};

pub mod pki;

pub const APP: (&str, &str) = (DEMO_ACCESS_ID, DEMO_SECRET_KEY);
pub const OTHER_APP: (&str, &str) = ("1500009999", "other-app-secret");
pub const QUERY: &str = "/v3/device/account/query";

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn cache_status(&self) -> String {
        self.headers
            .get("cache-status")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn ret_code(&self) -> i64 {
        self.json()["retCode"].as_i64().expect("retCode")
    }
}

pub struct Harness {
    pub sim: Simulator,
    pub sim_addr: SocketAddr,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub clock: Clock,
    pub config: Config,
    client: Client<HttpConnector, Full<Bytes>>,
    stop_proxy: Option<oneshot::Sender<()>>,
    stop_sim: Option<oneshot::Sender<()>>,
    proxy_task: Option<tokio::task::JoinHandle<()>>,
}

/// Both test apps, the seed examples and a few generated bindings.
pub fn sim_config() -> SimConfig {
    SimConfig {
        apps: vec![
            (APP.0.to_owned(), APP.1.to_owned()),
            (OTHER_APP.0.to_owned(), OTHER_APP.1.to_owned()),
        ],
        accounts: 50,
        tokens: 100,
        ..SimConfig::default()
    }
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::with(sim_config(), |_| {}).await
    }

    pub async fn with(sim: SimConfig, tweak: impl FnOnce(&mut Config)) -> Harness {
        let sim_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim_addr = sim_listener.local_addr().unwrap();
        let sim = Simulator::new(sim);
        let (stop_sim, sim_rx) = oneshot::channel::<()>();
        {
            let sim = sim.clone();
            tokio::spawn(async move {
                sim.serve(sim_listener, async {
                    let _ = sim_rx.await;
                })
                .await
            });
        }
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        config.upstream.url = format!("http://{sim_addr}");
        tweak(&mut config);
        tpns_cache::check_config(&config).expect("test config is valid");
        Harness::proxy_for(sim, sim_addr, config, stop_sim).await
    }

    /// A proxy in front of an upstream address that may not be the simulator.
    pub async fn proxy_for(
        sim: Simulator,
        sim_addr: SocketAddr,
        config: Config,
        stop_sim: oneshot::Sender<()>,
    ) -> Harness {
        let listeners = Listeners::bind(&config).await.unwrap();
        let proxy = listeners.proxy.local_addr().unwrap();
        let admin = listeners.admin.local_addr().unwrap();
        let clock = Clock::default();
        let (stop_proxy, proxy_rx) = oneshot::channel::<()>();
        let proxy_task = tokio::spawn({
            let config = config.clone();
            let clock = clock.clone();
            async move {
                tpns_cache::run_with_clock(
                    config,
                    listeners,
                    async {
                        let _ = proxy_rx.await;
                    },
                    clock,
                )
                .await
                .unwrap();
            }
        });
        Harness {
            sim,
            sim_addr,
            proxy,
            admin,
            clock,
            config,
            client: Client::builder(TokioExecutor::new()).build_http(),
            stop_proxy: Some(stop_proxy),
            stop_sim: Some(stop_sim),
            proxy_task: Some(proxy_task),
        }
    }

    /// Stops the proxy and waits for it to drain.
    pub async fn stop_proxy(&mut self) {
        if let Some(tx) = self.stop_proxy.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.proxy_task.take() {
            t.await.unwrap();
        }
    }

    pub async fn send(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), self.client.request(req))
            .await
            .expect("answer within 20 s")
            .expect("request sent");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A query through the proxy as `app` (None: no credentials).
    pub async fn query_as(&self, app: Option<(&str, &str)>, body: &str) -> Reply {
        self.send(
            self.proxy,
            Method::POST,
            QUERY,
            &auth_headers(app),
            body.to_owned(),
        )
        .await
    }

    pub async fn query(&self, body: &str) -> Reply {
        self.query_as(Some(APP), body).await
    }

    /// The same query straight to the simulator (what the upstream itself answers).
    pub async fn direct(&self, body: &str) -> Reply {
        self.send(
            self.sim_addr,
            Method::POST,
            QUERY,
            &auth_headers(Some(APP)),
            body.to_owned(),
        )
        .await
    }

    pub fn upstream_queries(&self) -> u64 {
        self.sim.stats().requests(QUERY)
    }

    pub fn upstream_identifiers(&self) -> u64 {
        self.sim.stats().identifiers(QUERY)
    }

    pub fn last_upstream_query(&self) -> Vec<String> {
        self.sim
            .stats()
            .recent_queries
            .back()
            .cloned()
            .unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        let r = self
            .send(self.admin, Method::GET, "/metrics", &[], Bytes::new())
            .await;
        assert_eq!(r.status, StatusCode::OK);
        String::from_utf8(r.body.to_vec()).unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.stop_proxy.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.stop_sim.take() {
            let _ = tx.send(());
        }
    }
}

pub fn auth_headers(app: Option<(&str, &str)>) -> Vec<(&'static str, String)> {
    let mut h = vec![("content-type", "application/json".to_owned())];
    if let Some((id, secret)) = app {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        h.push(("authorization", format!("Basic {token}")));
    }
    h
}

pub fn tokens_body(tokens: &[&str]) -> String {
    serde_json::json!({"operator_type": 2, "token_list": tokens}).to_string()
}

pub fn accounts_body(accounts: &[&str]) -> String {
    let list: Vec<Value> = accounts
        .iter()
        .map(|a| serde_json::json!({ "account": a }))
        .collect();
    serde_json::json!({"operator_type": 1, "account_list": list}).to_string()
}

/// An address nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// The value of one sample (`name{labels}` exactly as exposed) in a scrape; 0 when absent.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Polls `check` every 20 ms until it holds, for at most `within`.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Harness {
    /// `POST /v3/push/app` through the proxy as `app`.
    pub async fn push(&self, app: Option<(&str, &str)>, body: &str) -> Reply {
        self.send(
            self.proxy,
            Method::POST,
            "/v3/push/app",
            &auth_headers(app),
            body.to_owned(),
        )
        .await
    }
}

/// The names of every metric family the proxy registers (fleet mode's included).
pub fn metric_families() -> std::collections::HashSet<String> {
    tpns_cache::metric_names().unwrap().into_iter().collect()
}

/// Sends raw bytes on a new connection and reads until the server closes it (at most 5 s).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The `Authorization` header value of the test app.
pub fn basic() -> String {
    basic_for(APP)
}

/// The `Authorization: Basic` value for `(id, secret)`.
pub fn basic_for(app: (&str, &str)) -> String {
    auth_headers(Some(app))
        .into_iter()
        .find(|(k, _)| *k == "authorization")
        .unwrap()
        .1
}
