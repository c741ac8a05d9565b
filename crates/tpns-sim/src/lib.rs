//! A TPNS simulator for the demo, the tests and the benchmarks: an in-memory binding store
//! answering `/v3/device/account/query` (both operator types), `/v3/device/account/batchoperate`
//! (ops 1–5, optionally applied after a delay, as TPNS applies them asynchronously) and
//! `/v3/push/app` (accepted and counted), with Basic credential checks and injectable faults.
//!
//! Control endpoints: `GET /_sim/stats` (what it received), `POST /_sim/faults` (JSON
//! [`Faults`]), `POST /_sim/reset` (zero the counters).
//!
//! Its answers follow the documented shapes: per-element `result` codes (`"0"`, `"10110008"`
//! for a registered token or an account with no binding, `"1008006"` for a token never
//! registered), elements only for identifiers with bindings, and the same top-level code policy
//! as the proxy's defaults (0, or 1008026/1008027 when some/all elements failed).
//!
//! It is a crate of its own, apart from the proxy's library: it parses requests its own way
//! (sharing only the wire format, `tpns-wire`), so a bug in the proxy's parser is not mirrored
//! here. [`redis`] starts throwaway `redis-server` processes for the fleet tests and benchmarks.

mod batchoperate;
mod query;
pub mod redis;
pub mod store;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;

use store::AppBindings;
use tpns_wire::{code, error_body, ErrorShape, BATCHOPERATE_PATH, PUSH_APP_PATH, QUERY_PATH};

/// The simulator's answers: whole bodies.
pub type Body = Full<Bytes>;

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The demo app's credentials (the AccessID and key of the TPNS docs' worked example).
pub const DEMO_ACCESS_ID: &str = "1500001048";
pub const DEMO_SECRET_KEY: &str = "1452fcebae9f3115ba794fb0fff2fd73";
/// Timestamp used for preloaded bindings (the seed's).
const SEED_TIMESTAMP: i64 = 1_691_656_271;

/// Faults to inject; shares are exact over consecutive calls (every 1/ratio-th call), not random.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Added before answering any TPNS path.
    pub latency_ms: u64,
    /// Share of calls answered HTTP 500 (`retCode` 1008004).
    pub fail_ratio: f64,
    /// Share of calls answered `retCode` 1008028 (frequency limit exceeded).
    pub rate_limit_ratio: f64,
    /// Share of calls answered HTTP 400 (as an upstream refusing one request, e.g. too large).
    pub client_error_ratio: f64,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    /// (AccessID, SecretKey) of every app it accepts.
    pub apps: Vec<(String, String)>,
    pub faults: Faults,
    /// Delay before a `batchoperate` takes effect (0: at once).
    pub apply_delay: Duration,
    /// Generated bindings: token `tok-i` is bound to account `acct-(i mod accounts)`.
    pub accounts: usize,
    pub tokens: usize,
    /// Load the seed document's example bindings.
    pub seed_examples: bool,
    pub partial_failure_ret_code: i64,
    pub all_failed_ret_code: i64,
    /// Longest list a query may carry.
    pub max_items: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            apps: vec![(DEMO_ACCESS_ID.to_owned(), DEMO_SECRET_KEY.to_owned())],
            faults: Faults::default(),
            apply_delay: Duration::ZERO,
            accounts: 0,
            tokens: 0,
            seed_examples: true,
            partial_failure_ret_code: code::BATCH_PARTLY_FAILED,
            all_failed_ret_code: code::BATCH_ALL_FAILED,
            max_items: 1000,
        }
    }
}

/// Generated account and token names.
pub fn account_name(i: usize) -> String {
    format!("acct-{i:08}")
}
pub fn token_name(i: usize) -> String {
    format!("tok-{i:08}")
}

/// What the simulator received.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Requests per path (unknown paths counted as `other`).
    pub requests: BTreeMap<String, u64>,
    /// Identifiers per path (query: list elements; batchoperate: tokens or accounts).
    pub identifiers: BTreeMap<String, u64>,
    /// The identifiers of the most recent queries, oldest first (at most 1000 queries).
    pub recent_queries: VecDeque<Vec<String>>,
    /// When each recent query arrived, in milliseconds since the simulator started (at most
    /// 10 000, oldest first): for counting calls per second.
    pub query_arrivals_ms: VecDeque<u64>,
}

impl Stats {
    pub fn requests(&self, path: &str) -> u64 {
        self.requests.get(path).copied().unwrap_or(0)
    }
    pub fn identifiers(&self, path: &str) -> u64 {
        self.identifiers.get(path).copied().unwrap_or(0)
    }
}

const RECENT_QUERIES: usize = 1000;
const RECENT_ARRIVALS: usize = 10_000;

#[derive(Debug)]
struct Inner {
    config: SimConfig,
    apps: HashMap<String, String>,
    data: RwLock<HashMap<String, AppBindings>>,
    faults: Mutex<Faults>,
    stats: Mutex<Stats>,
    calls: AtomicU64,
    started: std::time::Instant,
}

/// A running simulator's handle (cheap to clone).
#[derive(Debug, Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

impl Simulator {
    pub fn new(config: SimConfig) -> Simulator {
        let apps: HashMap<String, String> = config.apps.iter().cloned().collect();
        let mut data: HashMap<String, AppBindings> = HashMap::new();
        for app in apps.keys() {
            let mut b = AppBindings::default();
            if config.seed_examples {
                load_seed(&mut b);
            }
            for i in 0..config.tokens {
                let t = token_name(i);
                b.register(&t);
                if config.accounts > 0 {
                    b.bind(&t, &account_name(i % config.accounts), 0, SEED_TIMESTAMP);
                }
            }
            data.insert(app.clone(), b);
        }
        Simulator {
            inner: Arc::new(Inner {
                faults: Mutex::new(config.faults.clone()),
                config,
                apps,
                data: RwLock::new(data),
                stats: Mutex::new(Stats::default()),
                calls: AtomicU64::new(0),
                started: std::time::Instant::now(),
            }),
        }
    }

    /// Serves until `shutdown` resolves, then lets requests in flight finish (at most 1 s).
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        use hyper_util::rt::{TokioIo, TokioTimer};
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).keep_alive(true);
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let inner = self.inner.clone();
            let service = hyper::service::service_fn(move |req| {
                let inner = inner.clone();
                async move { Ok::<_, Infallible>(handle(inner, req).await) }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let watched = graceful.watch(connection);
            tokio::spawn(async move {
                let _ = watched.await;
            });
        }
        drop(listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }

    pub fn stats(&self) -> Stats {
        self.inner.stats.lock().clone()
    }

    pub fn reset_stats(&self) {
        *self.inner.stats.lock() = Stats::default();
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.inner.faults.lock() = faults;
    }

    /// Adds a binding directly (as a device SDK would, unseen by any proxy).
    pub fn bind(&self, app: &str, token: &str, account: &str, account_type: i64) {
        self.inner
            .data
            .write()
            .entry(app.to_owned())
            .or_default()
            .bind(token, account, account_type, SEED_TIMESTAMP);
    }

    /// Removes a binding directly.
    pub fn unbind(&self, app: &str, token: &str, account: &str, account_type: i64) {
        if let Some(b) = self.inner.data.write().get_mut(app) {
            b.unbind(token, account, account_type);
        }
    }
}

/// The seed document's examples, as one consistent set of bindings.
fn load_seed(b: &mut AppBindings) {
    for (token, account, t) in [
        ("token1", "account1", 0),
        ("token2", "account1", 0),
        ("token2", "account2", 1),
        ("token3", "account2", 1),
        ("token1", "926@126.com", 0),
        ("token1", "1527000000", 0),
        ("token2", "926@163.com", 0),
        ("token2", "1527000001", 0),
    ] {
        b.bind(token, account, t, SEED_TIMESTAMP);
    }
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/_sim/stats") => {
            let stats = inner.stats.lock().clone();
            json_response(
                StatusCode::OK,
                serde_json::to_vec(&stats).unwrap_or_default(),
            )
        }
        (Method::POST, "/_sim/reset") => {
            *inner.stats.lock() = Stats::default();
            json_response(StatusCode::OK, "{}")
        }
        (Method::POST, "/_sim/faults") => match read(req).await {
            Some(body) => match serde_json::from_slice::<Faults>(&body) {
                Ok(f) => {
                    *inner.faults.lock() = f;
                    json_response(StatusCode::OK, "{}")
                }
                Err(e) => json_response(
                    StatusCode::BAD_REQUEST,
                    json!({ "error": e.to_string() }).to_string(),
                ),
            },
            None => json_response(StatusCode::BAD_REQUEST, "{}"),
        },
        (Method::POST, QUERY_PATH | BATCHOPERATE_PATH | PUSH_APP_PATH) => {
            tpns(inner, req, path).await
        }
        (Method::GET, "/_sim/blob") => {
            // `?bytes=N` (at most 256 MiB) of `x`: a large answer, for slow-reader tests.
            let n = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0)
                .min(256 << 20);
            let mut r = Response::new(Full::new(Bytes::from(vec![b'x'; n])));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        _ => {
            count(&inner, "other", 0);
            json_response(
                StatusCode::NOT_FOUND,
                error_body(ErrorShape::Snake, code::MISSING_PARAMETER, "no such API"),
            )
        }
    }
}

async fn read(req: Request<Incoming>) -> Option<Bytes> {
    Limited::new(req.into_body(), 16 * 1024 * 1024)
        .collect()
        .await
        .ok()
        .map(|c| c.to_bytes())
}

fn count(inner: &Inner, path: &str, identifiers: u64) {
    let mut s = inner.stats.lock();
    *s.requests.entry(path.to_owned()).or_default() += 1;
    *s.identifiers.entry(path.to_owned()).or_default() += identifiers;
}

/// Every `ratio`-th call, exactly: call n fires when ⌊(n+1)·r⌋ > ⌊n·r⌋.
fn fires(n: u64, ratio: f64) -> bool {
    if ratio <= 0.0 {
        return false;
    }
    let r = ratio.min(1.0);
    ((n + 1) as f64 * r).floor() > (n as f64 * r).floor()
}

async fn tpns(inner: Arc<Inner>, req: Request<Incoming>, path: String) -> Response<Body> {
    let faults = inner.faults.lock().clone();
    let resp = answer(&inner, req, &path, &faults).await;
    // The answer is computed on arrival and delivered late, as over a slow network: a fetch in
    // flight can carry an answer from before a write that lands meanwhile.
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    resp
}

async fn answer(
    inner: &Arc<Inner>,
    req: Request<Incoming>,
    path: &str,
    faults: &Faults,
) -> Response<Body> {
    let shape = ErrorShape::for_path(path);
    let reply =
        |ret: i64| json_response(StatusCode::OK, error_body(shape, ret, code::message(ret)));
    let auth = req.headers().get(AUTHORIZATION).cloned();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let signed = match (header("accessid"), header("timestamp"), header("sign")) {
        (Some(a), Some(t), Some(s)) => Some((a, t, s)),
        _ => None,
    };
    if path == QUERY_PATH {
        let at = u64::try_from(inner.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut s = inner.stats.lock();
        if s.query_arrivals_ms.len() == RECENT_ARRIVALS {
            s.query_arrivals_ms.pop_front();
        }
        s.query_arrivals_ms.push_back(at);
    }
    let body = read(req).await;
    let n = inner.calls.fetch_add(1, Ordering::Relaxed);
    let Some(body) = body else {
        count(inner, path, 0);
        return reply(code::UNPARSEABLE);
    };
    if let Some((id, ts, sign)) = signed {
        // Signature auth: the same HMAC as TPNS (any TimeStamp is accepted here).
        let ok = inner
            .apps
            .get(&id)
            .is_some_and(|secret| tpns_wire::sign(secret.as_bytes(), &ts, &id, &body) == sign);
        if !ok {
            count(inner, path, 0);
            return reply(code::AUTH_FAILED);
        }
        return authorized(inner, id, path, &body, faults, n);
    }
    let app = match auth
        .as_ref()
        .and_then(|v| tpns_wire::basic::decode(v.as_bytes()))
    {
        Some((id, secret)) => match inner.apps.get(&id) {
            Some(s) if *s == secret => id,
            Some(_) => {
                count(inner, path, 0);
                return reply(code::KEY_MISMATCH);
            }
            None => {
                count(inner, path, 0);
                return reply(code::AUTH_FAILED);
            }
        },
        None => {
            count(inner, path, 0);
            return reply(code::AUTH_FAILED);
        }
    };
    authorized(inner, app, path, &body, faults, n)
}

fn authorized(
    inner: &Arc<Inner>,
    app: String,
    path: &str,
    body: &[u8],
    faults: &Faults,
    n: u64,
) -> Response<Body> {
    let shape = ErrorShape::for_path(path);
    let reply =
        |ret: i64| json_response(StatusCode::OK, error_body(shape, ret, code::message(ret)));
    if fires(n, faults.fail_ratio) {
        count(inner, path, 0);
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            error_body(shape, code::INTERNAL_CALL_FAILED, "simulated failure"),
        );
    }
    if fires(n, faults.rate_limit_ratio) {
        count(inner, path, 0);
        return reply(code::RATE_LIMITED);
    }
    if fires(n, faults.client_error_ratio) {
        count(inner, path, 0);
        return json_response(
            StatusCode::BAD_REQUEST,
            error_body(shape, code::INVALID_PARAMETER, "simulated client error"),
        );
    }
    match path {
        QUERY_PATH => query::answer(inner, &app, body),
        BATCHOPERATE_PATH => batchoperate::answer(inner, &app, body),
        _ => {
            count(inner, path, 0);
            json_response(
                StatusCode::OK,
                json!({"ret_code": 0, "err_msg": "NO_ERROR", "seq": 0, "push_id": n.to_string()})
                    .to_string(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_shares_are_exact() {
        let fired = (0..1000).filter(|&n| fires(n, 0.25)).count();
        assert_eq!(fired, 250);
        assert_eq!((0..10).filter(|&n| fires(n, 1.0)).count(), 10);
        assert_eq!((0..10).filter(|&n| fires(n, 0.0)).count(), 0);
    }
}
