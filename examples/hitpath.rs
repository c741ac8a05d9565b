//! Profiling aid: runs the cached-hit path (parse, key, lookup, stitch) of a 100-identifier
//! query in a loop, for `perf record` / `valgrind --tool=callgrind`.
//! `cargo run --release --example hitpath -- [iterations]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tpns_cache::api::answer::{stitch, top_level_code, Answer, ElementCode};
use tpns_cache::api::request::{parse_request, Limits};
use tpns_cache::cache::{CacheKey, Clock, Lookup, Policy, Store};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let limits = Limits {
        max_items: 1000,
        max_identifier_bytes: 400,
        max_depth: 32,
        max_fields: 64,
        max_scope_bytes: 4096,
    };
    let list: Vec<String> = (0..100).map(|i| format!("\"tok-{i:08}\"")).collect();
    let body = format!(
        "{{\"operator_type\":2,\"token_list\":[{}]}}",
        list.join(",")
    );
    let store = Store::new(
        1 << 30,
        Policy::fresh_only(Duration::from_secs(3600), Duration::from_secs(3600)),
        Clock::default(),
    );
    let upstream: Arc<str> = Arc::from("https://api.tpns.tencent.com");
    let app: Arc<str> = Arc::from("1500001048");
    let req = parse_request(body.as_bytes(), &limits).expect("valid");
    for (i, item) in req.items.iter().enumerate() {
        let key = CacheKey::new(upstream.clone(), app.clone(), None, item.ident.clone());
        let el = RawValue::from_string(format!(r#"{{"token":"tok-{i:08}","account_list":[{{"account":"acct-{i:08}","account_type":0,"timestamp":1691656271}}]}}"#)).expect("json");
        store
            .put(
                key,
                Answer {
                    code: ElementCode::Ok,
                    element: Some(el),
                },
            )
            .await;
    }
    let started = Instant::now();
    let mut bytes = 0usize;
    for _ in 0..iterations {
        let req = parse_request(body.as_bytes(), &limits).expect("valid");
        let mut entries = Vec::with_capacity(req.items.len());
        let now = store.clock().now();
        let op = req.op;
        for item in req.items {
            let key = CacheKey::new(upstream.clone(), app.clone(), None, item.ident);
            if let Lookup::Fresh(e) = store.get_at(&key, now).await {
                entries.push(e);
            }
        }
        let answers: Vec<&Answer> = entries.iter().map(|e| &e.answer).collect();
        let code = top_level_code(answers.iter().map(|a| &a.code), 1_008_026, 1_008_027);
        bytes += stitch(op, code, answers.iter().copied()).len();
    }
    let per = started.elapsed() / iterations as u32;
    println!("{iterations} iterations, {per:?} per 100-identifier request ({bytes} bytes out)");
}
