//! Memory per cached identifier: fills the cache with N token answers whose JSON element is
//! about 150 bytes and prints the process RSS growth per entry, next to the weigher's count.
//!
//! `cargo run --release --example memprobe -- [N]` (default 1 000 000).
//!
//! `cargo run --release --example memprobe -- pad [N] [PAD_BYTES] [MAX_BYTES]` plays a client that
//! sends `{"operator_type":2,"token_list":["nx-<n>"],"pad":"<PAD_BYTES, unique>"}` N times (default
//! 100 000 × 4 000 bytes, the largest scope the proxy keys (`limits.max_scope_bytes`), into a
//! 64 MiB cache): every answer is a negative entry under a key with its own top-level scope. The
//! store keeps only the key's digest, app tag and name (`cache::key::StoredKey`), so each scope
//! goes with its request; RSS must stay within `MAX_BYTES` plus the fixed overhead.
//!
//! `cargo run --release --example memprobe -- moka [N] [VALUE_BYTES] [expire_after|ttl|plain]`
//! measures moka's own floor: a `moka::sync::Cache<u128, Arc<[u8]>>` (the compact key) built as
//! the store builds its cache (weigher, eviction listener, and per-entry expiry, one global
//! lifetime or neither) filled with N values of VALUE_BYTES (default 1 000 000 × 150).

/// The server's allocator (see `src/main.rs`), so the figures are the server's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tpns_cache::api::answer::{Answer, ElementCode};
use tpns_cache::api::request::Ident;
use tpns_cache::cache::{weigh, CacheKey, Clock, Policy, Store};

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn arg<T: std::str::FromStr>(i: usize, default: T) -> T {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// Negative entries under keys that each carry a large, unique top-level scope.
async fn pad() {
    let n: usize = arg(2, 100_000);
    let pad_bytes: usize = arg(3, 4_000);
    let max_bytes: u64 = arg(4, 64 << 20);
    let store = Store::new(
        max_bytes,
        Policy::fresh_only(Duration::from_secs(3600), Duration::from_secs(3600)),
        Clock::default(),
    );
    let upstream: Arc<str> = Arc::from("https://api.tpns.tencent.com");
    let app: Arc<str> = Arc::from("1500001048");
    store.sync().await;
    let before = rss_bytes();
    let mut peak = before;
    for i in 0..n {
        // The canonical scope of {"pad":"<unique>"}, as the query path derives it.
        let scope = format!("{{\"pad\":\"{i:08}{}\"}}", "x".repeat(pad_bytes));
        let key = CacheKey::new(
            upstream.clone(),
            app.clone(),
            Some(Arc::from(scope.as_str())),
            Ident::Token(format!("nx-{i}").into_boxed_str()),
        );
        drop(scope);
        let answer = Answer {
            code: ElementCode::NotFound,
            element: None,
        };
        let entry = store.put(key.clone(), answer).await;
        if i == 0 {
            println!("weighed (1st)      {} B", weigh(&key, &entry));
        }
        if i % 16 == 0 {
            store.sync().await;
            peak = peak.max(rss_bytes());
        }
    }
    store.sync().await;
    let after = rss_bytes();
    peak = peak.max(after);
    let mib = |b: u64| b as f64 / 1048576.0;
    println!("pattern            {n} negative entries, each key with a {pad_bytes}-byte scope");
    println!("offered            {:.1} MiB", mib((n * pad_bytes) as u64));
    println!("cache.max_bytes    {:.1} MiB", mib(max_bytes));
    println!("entries kept       {}", store.entry_count());
    println!("weighted           {:.1} MiB", mib(store.weighted_bytes()));
    println!(
        "RSS before/after   {:.1} MiB / {:.1} MiB (peak {:.1} MiB)",
        mib(before),
        mib(after),
        mib(peak)
    );
    println!(
        "RSS growth         {:.1} MiB = {:.2}× cache.max_bytes",
        mib(after.saturating_sub(before)),
        after.saturating_sub(before) as f64 / max_bytes as f64
    );
}

/// moka alone, per entry (see the module's notes).
fn moka_floor() {
    let n: u64 = arg(2, 1_000_000);
    let value: usize = arg(3, 150);
    let mode: String = arg(4, "expire_after".to_owned());
    let b = moka::sync::Cache::builder()
        .max_capacity(u64::MAX / 4)
        .weigher(|_k: &u128, v: &Arc<[u8]>| v.len() as u32)
        .eviction_listener(|_k, _v, _c| {});
    let b = match mode.as_str() {
        "expire_after" => b.expire_after(Keep),
        "ttl" => b.time_to_live(Duration::from_secs(3600)),
        _ => b,
    };
    let cache: moka::sync::Cache<u128, Arc<[u8]>> = b.build();
    let before = rss_bytes();
    for i in 0..n {
        let k = (u128::from(i) * 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) ^ 0x1234;
        let v: Arc<[u8]> = vec![(i % 251) as u8; value].into();
        cache.insert(k, v);
    }
    cache.run_pending_tasks();
    let after = rss_bytes();
    println!(
        "{mode}: {n} entries of {value} B: {:.0} B RSS per entry ({} entries)",
        (after - before) as f64 / n as f64,
        cache.entry_count()
    );
}

struct Keep;
impl moka::Expiry<u128, Arc<[u8]>> for Keep {
    fn expire_after_create(
        &self,
        _k: &u128,
        _v: &Arc<[u8]>,
        _at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(3600))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("pad") => return pad().await,
        Some("moka") => return moka_floor(),
        _ => {}
    }
    let n: usize = arg(1, 1_000_000);
    let store = Store::new(
        64 << 30,
        Policy::fresh_only(Duration::from_secs(3600), Duration::from_secs(3600)),
        Clock::default(),
    );
    let upstream: Arc<str> = Arc::from("https://api.tpns.tencent.com");
    let app: Arc<str> = Arc::from("1500001048");
    store.sync().await;
    let before = rss_bytes();
    let mut element_bytes = 0usize;
    for i in 0..n {
        let token = format!("{i:040x}");
        let element = format!(
            r#"{{"token":"{token}","account_list":[{{"account":"user-{i:08}@example.com","account_type":0,"timestamp":1691656271}}]}}"#
        );
        element_bytes += element.len();
        let key = CacheKey::new(
            upstream.clone(),
            app.clone(),
            None,
            Ident::Token(token.into_boxed_str()),
        );
        let answer = Answer {
            code: ElementCode::Ok,
            element: Some(RawValue::from_string(element).expect("valid JSON")),
        };
        store.put(key, answer).await;
        if i % 65_536 == 0 {
            store.sync().await;
        }
    }
    store.sync().await;
    let after = rss_bytes();
    let grown = after.saturating_sub(before);
    println!("entries            {}", store.entry_count());
    println!("element bytes/avg  {:.0}", element_bytes as f64 / n as f64);
    println!(
        "RSS before/after   {:.1} MiB / {:.1} MiB",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    println!("RSS per entry      {:.0} B", grown as f64 / n as f64);
    println!(
        "weighed per entry  {:.0} B",
        store.weighted_bytes() as f64 / n as f64
    );
}
