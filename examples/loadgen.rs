//! Load benchmark: starts the TPNS simulator and tpns-cache in-process, each on its own tokio
//! runtime (one worker thread each, like the load generator), drives them closed-loop with a
//! fixed concurrency, prints a table and writes a JSON report.
//!
//! ```text
//! cargo run --release --example loadgen -- --scenario all
//! cargo run --release --example loadgen -- --scenario replay --target http://127.0.0.1:8081
//! ```
//!
//! Scenarios:
//! - `all-hit`: batches of 1, 20 and 100 identifiers, fully cached, against a plain hyper server
//!   returning the same response bytes (the ceiling for this machine), same concurrency.
//! - `zipf`: identifiers drawn from a Zipf distribution, batches of 1–50, cache capacity a share
//!   of the identifier space; hit ratio next to Bélády's optimal and plain LRU (computed offline
//!   on the same trace with the same capacity in entries).
//! - `cold-burst`: many clients asking overlapping cold batches at once; upstream identifiers
//!   against distinct identifiers (coalescing makes it 1.00).
//! - `direct`: the start of the zipf trace sent straight to the simulator, and to a cold proxy,
//!   for the latency the proxy adds on a miss.
//! - `fleet`: the zipf trace spread over 4 sidecars, without and with the shared Redis tier
//!   (needs `redis-server`).
//! - `replay`: the zipf trace sent to `--target` (used by `benches/compare-nginx.sh`).

/// The server's allocator (see `src/main.rs`), so the figures are the server's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

use tpns_cache::api::answer::{Answer, ElementCode};
use tpns_cache::api::request::Ident;
use tpns_cache::cache::{weigh, CacheKey, Clock, Entry, Policy, Store};
use tpns_cache::config::Config;
use tpns_sim::{token_name, Faults, SimConfig, Simulator, DEMO_ACCESS_ID, DEMO_SECRET_KEY};

#[derive(Parser, Debug, Clone)]
#[command(about = "tpns-cache load benchmark")]
struct Args {
    /// all, all-hit, zipf, cold-burst, direct, fleet, replay, or plain-server (see
    /// `benches/varied-hit.sh`).
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Identifier space of the zipf trace.
    #[arg(long, default_value_t = 1_000_000)]
    ids: usize,
    /// Zipf exponent.
    #[arg(long, default_value_t = 1.0)]
    exponent: f64,
    /// Requests in the zipf trace.
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    /// Requests per batch size in all-hit.
    #[arg(long, default_value_t = 20_000)]
    hit_requests: usize,
    /// Client concurrency (closed loop).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Cache capacity as a share of the identifier space.
    #[arg(long, default_value_t = 0.1)]
    capacity_share: f64,
    /// Seed of the trace.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Turn the response memo off (to see the hit path without it).
    #[arg(long)]
    no_memo: bool,
    /// Target base URL for `replay`.
    #[arg(long)]
    target: Option<String>,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/loadgen-report.json")]
    report: PathBuf,
    /// `plain-server`: the address to serve on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// `plain-server`: the size of the body it answers with.
    #[arg(long, default_value_t = 1000)]
    body_bytes: usize,
}

fn runtime(name: &str) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("runtime")
}

fn auth() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{DEMO_ACCESS_ID}:{DEMO_SECRET_KEY}"))
    )
}

fn tokens_body(ids: &[usize]) -> Bytes {
    let list: Vec<String> = ids.iter().map(|i| token_name(*i)).collect();
    Bytes::from(json!({"operator_type": 2, "token_list": list}).to_string())
}

/// A running simulator on its own runtime.
struct Sim {
    sim: Simulator,
    addr: SocketAddr,
    _rt: Runtime,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn start_sim(tokens: usize) -> Sim {
    let rt = runtime("sim");
    let sim = Simulator::new(SimConfig {
        tokens,
        accounts: tokens,
        seed_examples: false,
        ..SimConfig::default()
    });
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let s = sim.clone();
    rt.spawn(async move {
        s.serve(listener, async {
            let _ = rx.await;
        })
        .await
    });
    Sim {
        sim,
        addr,
        _rt: rt,
        _stop: tx,
    }
}

/// A running proxy on its own runtime.
struct Proxy {
    addr: SocketAddr,
    admin: SocketAddr,
    _rt: Runtime,
    _stop: tokio::sync::oneshot::Sender<()>,
}

static NO_MEMO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn start_proxy(upstream: SocketAddr, max_bytes: u64) -> Proxy {
    start_proxy_with(upstream, max_bytes, |_| {})
}

fn start_proxy_with(
    upstream: SocketAddr,
    max_bytes: u64,
    tweak: impl FnOnce(&mut Config),
) -> Proxy {
    let rt = runtime("proxy");
    let mut c = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        ..Config::default()
    };
    c.upstream.url = format!("http://{upstream}");
    c.cache.ttl = Duration::from_secs(3600);
    c.cache.negative_ttl = Duration::from_secs(3600);
    c.cache.ttl_jitter = 0.0;
    c.cache.max_bytes = bytesize::ByteSize::b(max_bytes);
    c.shield.calls_per_second = 0;
    c.log.level = "warn".to_owned();
    if NO_MEMO.load(Ordering::Relaxed) {
        c.cache.memo_max_bytes = bytesize::ByteSize::b(0);
    }
    tweak(&mut c);
    let listeners = rt.block_on(tpns_cache::Listeners::bind(&c)).expect("bind");
    let addr = listeners.proxy.local_addr().expect("addr");
    let admin = listeners.admin.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(async move {
        let _ = tpns_cache::run(c, listeners, async {
            let _ = rx.await;
        })
        .await;
    });
    Proxy {
        addr,
        admin,
        _rt: rt,
        _stop: tx,
    }
}

/// `plain-server`: the baseline of `benches/varied-hit.sh`, in its own process like the proxy:
/// a hyper server on a runtime with one worker per core (as `tpns-cache serve`), answering
/// every request with a JSON body of `--body-bytes`, until killed.
fn plain_server(args: &Args) {
    let mut body = br#"{"retCode":0,"errMsg":"NO_ERROR","result":[],"pad":""#.to_vec();
    while body.len() + 2 < args.body_bytes {
        body.push(b'x');
    }
    body.extend_from_slice(b"\"}");
    let body = Bytes::from(body);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(args.listen).await.expect("bind");
        println!(
            "plain server on {} ({} bytes per answer)",
            listener.local_addr().expect("addr"),
            body.len()
        );
        serve_plain(listener, body, std::future::pending::<()>()).await;
    });
}

/// The plain server's accept loop: every request is read whole and answered with `body`,
/// until `stop` completes.
async fn serve_plain(listener: TcpListener, body: Bytes, stop: impl std::future::Future) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(true);
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            _ = &mut stop => return,
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let body = body.clone();
            async move {
                let _ = req.into_body().collect().await;
                let mut r = Response::new(Full::new(body));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                Ok::<_, std::convert::Infallible>(r)
            }
        });
        let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// A plain hyper server answering every request with `body` (after reading the request).
struct Baseline {
    addr: SocketAddr,
    _rt: Runtime,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn start_baseline(body: Bytes) -> Baseline {
    let rt = runtime("baseline");
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(serve_plain(listener, body, rx));
    Baseline {
        addr,
        _rt: rt,
        _stop: tx,
    }
}

#[derive(Debug)]
struct RunStats {
    requests: usize,
    errors: usize,
    seconds: f64,
    hist: Histogram<u64>,
}

impl RunStats {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    fn json(&self) -> Value {
        json!({"requests": self.requests, "errors": self.errors, "seconds": self.seconds,
               "req_per_s": self.rps(), "p50_ms": self.ms(0.5), "p99_ms": self.ms(0.99),
               "p999_ms": self.ms(0.999)})
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A TPNS answer with per-element results (keys may come in any order).
fn answered(body: &[u8]) -> bool {
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    has(b"\"retCode\":0,") || has(b"\"retCode\":0}") || has(b"\"retCode\":1008026")
}

fn client(concurrency: usize) -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build(c)
}

/// Sends every body to `url`, `concurrency` at a time (closed loop).
fn drive(rt: &Runtime, url: &str, bodies: Arc<Vec<Bytes>>, concurrency: usize) -> RunStats {
    drive_many(rt, &[url.to_owned()], bodies, concurrency)
}

/// Like [`drive`], request i going to `urls[i % urls.len()]`.
fn drive_many(
    rt: &Runtime,
    urls: &[String],
    bodies: Arc<Vec<Bytes>>,
    concurrency: usize,
) -> RunStats {
    let urls: Arc<Vec<String>> = Arc::new(urls.to_vec());
    rt.block_on(async move {
        let client = client(concurrency);
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (client, next, bodies, urls) =
                (client.clone(), next.clone(), bodies.clone(), urls.clone());
            tasks.push(tokio::spawn(async move {
                let mut hist =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
                let (mut n, mut errors) = (0usize, 0usize);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let req = Request::post(&urls[i % urls.len()])
                        .header("authorization", auth())
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .expect("request");
                    let t0 = Instant::now();
                    let ok = match client.request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                            status == StatusCode::OK && body.is_ok_and(|b| answered(&b))
                        }
                        Err(_) => false,
                    };
                    let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                    n += 1;
                    errors += usize::from(!ok);
                }
                (n, errors, hist)
            }));
        }
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        let (mut requests, mut errors) = (0, 0);
        for t in tasks {
            let (n, e, h) = t.await.expect("task");
            requests += n;
            errors += e;
            hist.add(h).expect("merge");
        }
        RunStats {
            requests,
            errors,
            seconds: started.elapsed().as_secs_f64(),
            hist,
        }
    })
}

fn send_once(rt: &Runtime, url: &str, body: Bytes) -> (StatusCode, Bytes, String) {
    rt.block_on(async {
        let req = Request::post(url)
            .header("authorization", auth())
            .header("content-type", "application/json")
            .body(Full::new(body))
            .expect("request");
        let resp = client(1).request(req).await.expect("send");
        let status = resp.status();
        let cs = resp
            .headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        (
            status,
            resp.into_body().collect().await.expect("body").to_bytes(),
            cs,
        )
    })
}

/// The sum of a counter's samples matching `filter` in a scrape.
fn scrape_sum(rt: &Runtime, admin: SocketAddr, metric: &str, filter: &str) -> f64 {
    let text = rt.block_on(async {
        let req = Request::get(format!("http://{admin}/metrics"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = client(1).request(req).await.expect("scrape");
        String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
                .to_vec(),
        )
        .expect("utf-8")
    });
    text.lines()
        .filter(|l| l.starts_with(metric) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------- the zipf trace

/// Batches of identifiers (ranks; 0 = most popular), sizes uniform in 1..=50.
fn zipf_trace(ids: usize, exponent: f64, requests: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut cdf = Vec::with_capacity(ids);
    let mut total = 0.0;
    for k in 1..=ids {
        total += 1.0 / (k as f64).powf(exponent);
        cdf.push(total);
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..requests)
        .map(|_| {
            let n = rng.usize(1..=50);
            (0..n)
                .map(|_| {
                    let u = rng.f64() * total;
                    cdf.partition_point(|c| *c < u).min(ids - 1)
                })
                .collect()
        })
        .collect()
}

/// The lookup sequence the cache sees: each request's distinct identifiers, in order.
fn lookups(trace: &[Vec<usize>]) -> Vec<usize> {
    let mut out = Vec::new();
    for batch in trace {
        let mut seen = HashSet::new();
        for id in batch {
            if seen.insert(*id) {
                out.push(*id);
            }
        }
    }
    out
}

/// Bélády's optimal: on a miss with a full cache, evict the entry used furthest in the future.
fn belady_hit_ratio(seq: &[usize], capacity: usize) -> f64 {
    let mut next_use = vec![usize::MAX; seq.len()];
    let mut last: HashMap<usize, usize> = HashMap::new();
    for (i, id) in seq.iter().enumerate().rev() {
        if let Some(&j) = last.get(id) {
            next_use[i] = j;
        }
        last.insert(*id, i);
    }
    let mut cached: HashMap<usize, usize> = HashMap::new(); // id -> its next use
    let mut by_next: BTreeSet<(usize, usize)> = BTreeSet::new(); // (next use, id)
    let mut hits = 0usize;
    for (i, id) in seq.iter().enumerate() {
        if let Some(nu) = cached.remove(id) {
            hits += 1;
            by_next.remove(&(nu, *id));
        } else if cached.len() >= capacity {
            if let Some(&(nu, victim)) = by_next.iter().next_back() {
                // Not caching the new one is optimal when it is used even later.
                if next_use[i] >= nu {
                    continue;
                }
                by_next.remove(&(nu, victim));
                cached.remove(&victim);
            }
        }
        cached.insert(*id, next_use[i]);
        by_next.insert((next_use[i], *id));
    }
    hits as f64 / seq.len() as f64
}

fn lru_hit_ratio(seq: &[usize], capacity: usize) -> f64 {
    let mut stamp: HashMap<usize, usize> = HashMap::new();
    let mut order: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut hits = 0usize;
    for (t, id) in seq.iter().enumerate() {
        if let Some(old) = stamp.insert(*id, t) {
            hits += 1;
            order.remove(&(old, *id));
        } else if stamp.len() > capacity {
            if let Some((old_t, victim)) = order.pop_first() {
                stamp.remove(&victim);
                let _ = old_t;
            }
        }
        order.insert((t, *id));
    }
    hits as f64 / seq.len() as f64
}

/// Bytes the cache charges for one simulator token answer (to size it in entries).
fn entry_weight() -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    rt.block_on(async {
        let store = Store::new(1 << 20, Policy::fresh_only(Duration::from_secs(1), Duration::from_secs(1)), Clock::default());
        let key = CacheKey::new(
            Arc::from("http://127.0.0.1:65535"),
            Arc::from(DEMO_ACCESS_ID),
            None,
            Ident::Token(token_name(123_456).into()),
        );
        let element = serde_json::value::RawValue::from_string(
            json!({"token": token_name(123_456), "account_list": [{"account": "acct-00123456", "account_type": 0, "timestamp": 1_691_656_271}]}).to_string(),
        )
        .expect("json");
        let entry: Entry = store
            .put(key.clone(), Answer { code: ElementCode::Ok, element: Some(element) })
            .await;
        u64::from(weigh(&key, &entry))
    })
}

// ---------------------------------------------------------------- scenarios

fn all_hit(args: &Args, report: &mut serde_json::Map<String, Value>) {
    println!(
        "\n== all-hit: fully cached batches vs a plain hyper server returning the same bytes (concurrency {}, memo {})",
        args.concurrency,
        if args.no_memo { "off" } else { "on" }
    );
    println!(
        "{:>6} {:>12} {:>12} {:>8} {:>10} {:>10}",
        "batch", "proxy req/s", "plain req/s", "ratio", "proxy p99", "plain p99"
    );
    let sim = start_sim(1000);
    let proxy = start_proxy(sim.addr, 64 << 20);
    let load = runtime("load");
    let mut rows = Vec::new();
    for n in [1usize, 20, 100] {
        let ids: Vec<usize> = (0..n).collect();
        let body = tokens_body(&ids);
        let url = format!("http://{}/v3/device/account/query", proxy.addr);
        send_once(&load, &url, body.clone());
        let (status, cached, cs) = send_once(&load, &url, body.clone());
        assert!(
            status == StatusCode::OK && cs.contains("; hit;"),
            "not a hit: {cs}"
        );
        let bodies = Arc::new(vec![body; args.hit_requests]);
        let p = drive(&load, &url, bodies.clone(), args.concurrency);
        let base = start_baseline(cached);
        let b = drive(
            &load,
            &format!("http://{}/", base.addr),
            bodies,
            args.concurrency,
        );
        let ratio = p.rps() / b.rps();
        println!(
            "{n:>6} {:>12.0} {:>12.0} {:>8.2} {:>8.2}ms {:>8.2}ms",
            p.rps(),
            b.rps(),
            ratio,
            p.ms(0.99),
            b.ms(0.99)
        );
        assert_eq!(p.errors + b.errors, 0, "errors during all-hit");
        rows.push(json!({"batch": n, "proxy": p.json(), "plain_hyper": b.json(), "ratio": ratio}));
    }
    report.insert("all_hit".into(), Value::Array(rows));
}

fn zipf(args: &Args, report: &mut serde_json::Map<String, Value>) {
    let capacity = ((args.ids as f64) * args.capacity_share) as usize;
    println!(
        "\n== zipf: {} ids, exponent {}, {} requests of 1-50 ids, cache capacity {} entries ({}%), concurrency {}",
        args.ids, args.exponent, args.requests, capacity, args.capacity_share * 100.0, args.concurrency
    );
    let t0 = Instant::now();
    let trace = zipf_trace(args.ids, args.exponent, args.requests, args.seed);
    let seq = lookups(&trace);
    let belady = belady_hit_ratio(&seq, capacity);
    let lru = lru_hit_ratio(&seq, capacity);
    println!(
        "trace: {} lookups, {} distinct; offline Bélády {:.4}, LRU {:.4} ({:.1}s)",
        seq.len(),
        seq.iter().collect::<HashSet<_>>().len(),
        belady,
        lru,
        t0.elapsed().as_secs_f64()
    );
    let sim = start_sim(args.ids);
    let weight = entry_weight();
    let proxy = start_proxy(sim.addr, weight * capacity as u64);
    let load = runtime("load");
    let url = format!("http://{}/v3/device/account/query", proxy.addr);
    send_once(&load, &url, tokens_body(&[args.ids - 1])); // the credential is accepted
    sim.sim.reset_stats();
    let bodies: Arc<Vec<Bytes>> = Arc::new(trace.iter().map(|b| tokens_body(b)).collect());
    let r = drive(&load, &url, bodies, args.concurrency);
    let stats = sim.sim.stats();
    let spared = scrape_sum(
        &load,
        proxy.admin,
        "tpns_cache_lookups_total{",
        "outcome=\"hit\"",
    ) + scrape_sum(
        &load,
        proxy.admin,
        "tpns_cache_lookups_total{",
        "outcome=\"negative_hit\"",
    ) + scrape_sum(
        &load,
        proxy.admin,
        "tpns_cache_lookups_total{",
        "outcome=\"coalesced\"",
    ) + scrape_sum(
        &load,
        proxy.admin,
        "tpns_cache_lookups_total{",
        "outcome=\"stale\"",
    );
    let total = scrape_sum(&load, proxy.admin, "tpns_cache_lookups_total{", "");
    let hit = spared / total;
    let upstream_ids = stats.identifiers("/v3/device/account/query");
    let upstream_calls = stats.requests("/v3/device/account/query");
    println!(
        "{:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>11} {:>8} {:>8}",
        "req/s", "p50", "p99", "p99.9", "hit", "Bélády", "upstream", "calls", "errors"
    );
    println!(
        "{:>10.0} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>9.4} {:>10.4} {:>11} {:>8} {:>8}",
        r.rps(),
        r.ms(0.5),
        r.ms(0.99),
        r.ms(0.999),
        hit,
        belady,
        upstream_ids,
        upstream_calls,
        r.errors
    );
    println!(
        "hit ratio / Bélády = {:.3}; hit ratio vs LRU: {:.4} vs {:.4}",
        hit / belady,
        hit,
        lru
    );
    report.insert("zipf".into(), json!({
        "ids": args.ids, "exponent": args.exponent, "requests": args.requests,
        "capacity_entries": capacity, "max_bytes": weight * capacity as u64, "entry_weight": weight,
        "lookups": seq.len(), "run": r.json(), "hit_ratio": hit, "belady_hit_ratio": belady,
        "lru_hit_ratio": lru, "hit_over_belady": hit / belady,
        "upstream_identifiers": upstream_ids, "upstream_calls": upstream_calls,
        "proxy_lookups": total,
    }));
}

fn cold_burst(args: &Args, report: &mut serde_json::Map<String, Value>) {
    const CLIENTS: usize = 64;
    const BATCHES: usize = 8;
    const POOL: usize = 5000;
    println!("\n== cold-burst: {CLIENTS} clients × {BATCHES} batches of 50 ids from a pool of {POOL} cold ids (upstream latency 20 ms)");
    let sim = start_sim(POOL);
    let proxy = start_proxy(sim.addr, 256 << 20);
    let load = runtime("load");
    let url = format!("http://{}/v3/device/account/query", proxy.addr);
    send_once(&load, &url, tokens_body(&[POOL - 1]));
    sim.sim.reset_stats();
    sim.sim.set_faults(Faults {
        latency_ms: 20,
        ..Faults::default()
    });
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let batches: Vec<Vec<usize>> = (0..CLIENTS * BATCHES)
        .map(|_| (0..50).map(|_| rng.usize(0..POOL - 1)).collect())
        .collect();
    let distinct: HashSet<usize> = batches.iter().flatten().copied().collect();
    let bodies = Arc::new(batches.iter().map(|b| tokens_body(b)).collect::<Vec<_>>());
    let r = drive(&load, &url, bodies, CLIENTS);
    let upstream_ids = sim.sim.stats().identifiers("/v3/device/account/query");
    let coalesced = scrape_sum(
        &load,
        proxy.admin,
        "tpns_cache_lookups_total{",
        "outcome=\"coalesced\"",
    );
    let ratio = upstream_ids as f64 / distinct.len() as f64;
    println!("distinct ids {}, upstream ids {}, ratio {:.2}; coalesced lookups {}; {:.0} req/s, p99 {:.1}ms, errors {}",
        distinct.len(), upstream_ids, ratio, coalesced, r.rps(), r.ms(0.99), r.errors);
    report.insert(
        "cold_burst".into(),
        json!({
            "clients": CLIENTS, "requests": r.requests, "distinct_identifiers": distinct.len(),
            "upstream_identifiers": upstream_ids, "ratio": ratio, "coalesced_lookups": coalesced,
            "run": r.json(),
        }),
    );
}

fn direct(args: &Args, report: &mut serde_json::Map<String, Value>) {
    let n = args.requests.min(20_000);
    println!("\n== direct: the first {n} zipf requests straight to the simulator, and through a cold proxy (every identifier a miss at first)");
    let trace = zipf_trace(args.ids, args.exponent, n, args.seed.wrapping_add(1));
    let sim = start_sim(args.ids);
    let load = runtime("load");
    let bodies: Arc<Vec<Bytes>> = Arc::new(trace.iter().map(|b| tokens_body(b)).collect());
    let d = drive(
        &load,
        &format!("http://{}/v3/device/account/query", sim.addr),
        bodies.clone(),
        args.concurrency,
    );
    // A proxy whose cache holds nothing: every request is a miss.
    let proxy = start_proxy(sim.addr, 1 << 20);
    let url = format!("http://{}/v3/device/account/query", proxy.addr);
    send_once(&load, &url, tokens_body(&[0]));
    let p = drive(&load, &url, bodies, args.concurrency);
    println!("{:>12} {:>10} {:>9} {:>9}", "", "req/s", "p50", "p99");
    println!(
        "{:>12} {:>10.0} {:>7.2}ms {:>7.2}ms",
        "direct",
        d.rps(),
        d.ms(0.5),
        d.ms(0.99)
    );
    println!(
        "{:>12} {:>10.0} {:>7.2}ms {:>7.2}ms",
        "proxy, miss",
        p.rps(),
        p.ms(0.5),
        p.ms(0.99)
    );
    println!(
        "added on a miss: p50 {:+.2}ms, p99 {:+.2}ms",
        p.ms(0.5) - d.ms(0.5),
        p.ms(0.99) - d.ms(0.99)
    );
    report.insert(
        "direct".into(),
        json!({"direct": d.json(), "proxy_miss": p.json(),
        "added_p50_ms": p.ms(0.5) - d.ms(0.5), "added_p99_ms": p.ms(0.99) - d.ms(0.99)}),
    );
}

/// The zipf trace spread round-robin over 4 sidecars, each with its own cache of
/// `capacity_share` of the identifiers: upstream identifiers without and with the shared tier.
fn fleet(args: &Args, report: &mut serde_json::Map<String, Value>) {
    const SIDECARS: usize = 4;
    let capacity = ((args.ids as f64) * args.capacity_share) as usize;
    println!(
        "\n== fleet: the zipf trace ({} requests) over {SIDECARS} sidecars, each caching {capacity} entries, without and with the shared Redis tier",
        args.requests
    );
    if !tpns_sim::redis::RedisServer::available() {
        println!("skipped: redis-server is not installed (apt-get install redis-server)");
        return;
    }
    let redis = tpns_sim::redis::RedisServer::start();
    let port = redis.port();
    let trace = zipf_trace(args.ids, args.exponent, args.requests, args.seed);
    let bodies: Arc<Vec<Bytes>> = Arc::new(trace.iter().map(|b| tokens_body(b)).collect());
    let weight = entry_weight();
    let mut rows = Vec::new();
    println!(
        "{:>14} {:>14} {:>14} {:>10}",
        "", "upstream ids", "upstream calls", "req/s"
    );
    for shared in [false, true] {
        let sim = start_sim(args.ids);
        let proxies: Vec<Proxy> = (0..SIDECARS)
            .map(|_| {
                start_proxy_with(sim.addr, weight * capacity as u64, |c| {
                    if shared {
                        c.redis.url = format!("redis://127.0.0.1:{port}/0");
                    }
                })
            })
            .collect();
        let load = runtime("load");
        std::thread::sleep(Duration::from_millis(1500)); // connected to Redis
        let urls: Vec<String> = proxies
            .iter()
            .map(|p| format!("http://{}/v3/device/account/query", p.addr))
            .collect();
        for u in &urls {
            send_once(&load, u, tokens_body(&[args.ids - 1]));
        }
        sim.sim.reset_stats();
        let r = drive_many(&load, &urls, bodies.clone(), args.concurrency);
        let stats = sim.sim.stats();
        let ids = stats.identifiers("/v3/device/account/query");
        let calls = stats.requests("/v3/device/account/query");
        let label = if shared { "shared tier" } else { "own caches" };
        println!("{label:>14} {ids:>14} {calls:>14} {:>10.0}", r.rps());
        rows.push(
            json!({"shared_tier": shared, "upstream_identifiers": ids, "upstream_calls": calls,
                         "run": r.json()}),
        );
    }
    drop(redis);
    if let [a, b] = &rows[..] {
        let (x, y) = (
            a["upstream_identifiers"].as_f64().unwrap_or(0.0),
            b["upstream_identifiers"].as_f64().unwrap_or(1.0),
        );
        println!(
            "the shared tier sends {:.2}x fewer identifiers upstream",
            x / y.max(1.0)
        );
    }
    report.insert("fleet".into(), Value::Array(rows));
}

fn replay(args: &Args, report: &mut serde_json::Map<String, Value>) {
    let target = args
        .target
        .clone()
        .expect("--target URL is required for replay");
    let trace = zipf_trace(args.ids, args.exponent, args.requests, args.seed);
    let load = runtime("load");
    let bodies: Arc<Vec<Bytes>> = Arc::new(trace.iter().map(|b| tokens_body(b)).collect());
    let url = format!("{}/v3/device/account/query", target.trim_end_matches('/'));
    let r = drive(&load, &url, bodies, args.concurrency);
    println!(
        "replay {url}: {:.0} req/s, p50 {:.2}ms, p99 {:.2}ms, errors {}",
        r.rps(),
        r.ms(0.5),
        r.ms(0.99),
        r.errors
    );
    report.insert("replay".into(), json!({"target": target, "run": r.json()}));
}

fn main() {
    let args = Args::parse();
    NO_MEMO.store(args.no_memo, Ordering::Relaxed);
    tpns_cache::install_crypto_provider();
    let mut report = serde_json::Map::new();
    report.insert("args".into(), json!(format!("{args:?}")));
    report.insert("memo".into(), json!(!args.no_memo));
    report.insert(
        "cpus".into(),
        json!(std::thread::available_parallelism().map_or(0, |n| n.get())),
    );
    let all = args.scenario == "all";
    let mut ran = false;
    for (name, f) in [
        (
            "all-hit",
            all_hit as fn(&Args, &mut serde_json::Map<String, Value>),
        ),
        ("zipf", zipf),
        ("cold-burst", cold_burst),
        ("direct", direct),
        ("fleet", fleet),
    ] {
        if all || args.scenario == name {
            f(&args, &mut report);
            ran = true;
        }
    }
    if args.scenario == "replay" {
        replay(&args, &mut report);
        ran = true;
    }
    if args.scenario == "plain-server" {
        plain_server(&args);
        return;
    }
    if !ran {
        eprintln!("unknown scenario {:?}", args.scenario);
        std::process::exit(2);
    }
    if let Some(dir) = args.report.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(
        &args.report,
        serde_json::to_string_pretty(&Value::Object(report)).expect("json"),
    )
    .expect("write report");
    println!("\nreport: {}", args.report.display());
    let _ = VecDeque::<u8>::new();
}
