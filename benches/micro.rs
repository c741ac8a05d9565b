//! Micro-benchmarks: request parsing and cache-key derivation; stitching a fully cached batch
//! of 1, 20 and 100 identifiers. `cargo bench --bench micro`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::value::RawValue;
use tpns_cache::api::query::{parse_request, stitch, top_level_code, Answer, ElementCode, Limits};
use tpns_cache::cache::{CacheKey, Clock, Lookup, Policy, Store};

const LIMITS: Limits = Limits {
    max_items: 1000,
    max_identifier_bytes: 400,
    max_depth: 32,
    max_fields: 64,
};

fn body(n: usize) -> String {
    let list: Vec<String> = (0..n).map(|i| format!("\"tok-{i:08}\"")).collect();
    format!(
        "{{\"operator_type\":2,\"token_list\":[{}]}}",
        list.join(",")
    )
}

fn element(i: usize) -> Box<RawValue> {
    RawValue::from_string(format!(
        r#"{{"token":"tok-{i:08}","account_list":[{{"account":"acct-{i:08}","account_type":0,"timestamp":1691656271}}]}}"#
    ))
    .expect("valid JSON")
}

fn parse_and_key(c: &mut Criterion) {
    let upstream: Arc<str> = Arc::from("https://api.tpns.tencent.com");
    let app: Arc<str> = Arc::from("1500001048");
    let mut g = c.benchmark_group("parse_and_key");
    for n in [1usize, 20, 100] {
        let b = body(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &b, |bench, b| {
            bench.iter(|| {
                let req = parse_request(black_box(b.as_bytes()), &LIMITS).expect("valid");
                let scope: Option<Arc<str>> = req.top_scope.as_deref().map(Arc::from);
                let keys: Vec<CacheKey> = req
                    .items
                    .iter()
                    .map(|i| {
                        CacheKey::new(
                            upstream.clone(),
                            app.clone(),
                            scope.clone(),
                            i.ident.clone(),
                        )
                    })
                    .collect();
                black_box(keys)
            })
        });
    }
    g.finish();
}

fn stitch_cached(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let store = Store::new(
        1 << 30,
        Policy::fresh_only(Duration::from_secs(3600), Duration::from_secs(3600)),
        Clock::default(),
    );
    let upstream: Arc<str> = Arc::from("https://api.tpns.tencent.com");
    let app: Arc<str> = Arc::from("1500001048");
    let mut g = c.benchmark_group("lookup_and_stitch_cached");
    for n in [1usize, 20, 100] {
        let b = body(n);
        let req = parse_request(b.as_bytes(), &LIMITS).expect("valid");
        let keys: Vec<CacheKey> = req
            .items
            .iter()
            .map(|i| CacheKey::new(upstream.clone(), app.clone(), None, i.ident.clone()))
            .collect();
        rt.block_on(async {
            for (i, k) in keys.iter().enumerate() {
                store
                    .put(
                        k.clone(),
                        Answer {
                            code: ElementCode::Ok,
                            element: Some(element(i)),
                        },
                    )
                    .await;
            }
        });
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &keys, |bench, keys| {
            bench.iter(|| {
                rt.block_on(async {
                    let mut entries = Vec::with_capacity(keys.len());
                    for k in keys {
                        match store.get(k).await {
                            Lookup::Fresh(e) => entries.push(e),
                            _ => unreachable!("warmed"),
                        }
                    }
                    let answers: Vec<&Answer> = entries.iter().map(|e| &e.answer).collect();
                    let code =
                        top_level_code(answers.iter().map(|a| &a.code), 1_008_026, 1_008_027);
                    black_box(stitch(req.op, code, answers.iter().copied()))
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parse_and_key, stitch_cached);
criterion_main!(benches);
