//! moka's own bytes per entry, for the floor under `cache.max_bytes` accounting: fills a
//! `moka::sync::Cache<u128, Arc<[u8]>>` (the compact key the store uses) with N values of
//! `--value` bytes, built the way the store builds its cache (weigher, eviction listener, and
//! per-entry expiry or one global lifetime), and prints RSS growth per entry.
//!
//! `cargo run --release --example mokafloor -- [N] [VALUE_BYTES] [expire_after|ttl|plain]`

use std::sync::Arc;
use std::time::Duration;

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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let value: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(150);
    let mode = args
        .get(3)
        .cloned()
        .unwrap_or_else(|| "expire_after".into());
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
