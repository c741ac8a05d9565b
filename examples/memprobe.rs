//! Memory per cached identifier: fills the cache with N token answers whose JSON element is
//! about 150 bytes and prints the process RSS growth per entry, next to the weigher's count.
//!
//! `cargo run --release --example memprobe -- [N]` (default 1 000 000).

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tpns_cache::api::query::{Answer, ElementCode, Ident};
use tpns_cache::cache::{CacheKey, Clock, Policy, Store};

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

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
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
