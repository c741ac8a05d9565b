//! Micro-benchmarks: request parsing and cache-key derivation; stitching a fully cached batch
//! of 1, 20 and 100 identifiers; the work done before a credential is accepted, for the worst
//! 1 MiB bodies we can construct against an ordinary 1 MiB query. `cargo bench --bench micro`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::value::RawValue;
use tpns_cache::api::answer::{stitch, top_level_code, Answer, ElementCode};
use tpns_cache::api::request::{parse_query, parse_request, Limits};
use tpns_cache::cache::{CacheKey, Clock, KeyPrefix, Lookup, Policy, Store};

const LIMITS: Limits = Limits {
    max_items: 1000,
    max_identifier_bytes: 400,
    max_depth: 32,
    max_fields: 16,
    max_scope_bytes: 4096,
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
                // As the server plans a request: one digest per identifier (see `Plan`).
                let req = parse_request(black_box(b.as_bytes()), &LIMITS).expect("valid");
                let scope: Option<Arc<str>> = req.top_scope.as_deref().map(Arc::from);
                let prefix = KeyPrefix::new(&upstream, app.clone(), scope);
                let digests: Vec<u128> =
                    req.items.iter().map(|i| prefix.digest(&i.ident)).collect();
                black_box(digests)
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
            .map(|i| {
                CacheKey::new(
                    upstream.clone(),
                    app.clone(),
                    None,
                    i.ident.to_owned_ident(),
                )
            })
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
                    let code =
                        top_level_code(entries.iter().map(|e| e.code()), 1_008_026, 1_008_027);
                    black_box(stitch(req.op, code, entries.iter()))
                })
            })
        });
    }
    g.finish();
}

/// Pads `prefix` + repeated `unit` + `suffix` to about 1 MiB.
fn mib(prefix: &str, unit: &str, sep: &str, suffix: &str) -> String {
    let n = (1 << 20) / (unit.len() + sep.len());
    format!("{prefix}{}{suffix}", vec![unit; n].join(sep))
}

/// Bodies of about 1 MiB: an ordinary query, and the worst we know of. All are parsed with the
/// default limits (the ordinary one with identifiers allowed up to 1 KiB so it can be that big).
fn preauth_bodies() -> Vec<(&'static str, String, Limits)> {
    let big_ids = Limits {
        max_identifier_bytes: 1024,
        ..LIMITS
    };
    let account = format!(
        "{{\"account\":\"{}\",\"account_type\":0}}",
        "a".repeat(1000)
    );
    let ordinary = format!(
        "{{\"operator_type\":1,\"account_list\":[{}]}}",
        vec![account.as_str(); 1000].join(",")
    );
    let keys: Vec<String> = (0..100_000).map(|i| format!("\"{i:05x}\":0")).collect();
    let escapes: Vec<String> = (0..14)
        .map(|i| format!("\"f{i}\":\"{}\"", "\\u00e9".repeat(12_400)))
        .collect();
    let deep_unit = format!("{}1{}", "[".repeat(30), "]".repeat(30));
    // Extra fields just under `max_scope_bytes`: they are canonicalized into every key.
    let deep_unit_28 = format!("{}1{}", "[".repeat(28), "]".repeat(28));
    let deep_extra = format!("[{}]", vec![deep_unit_28.as_str(); 70].join(","));
    let deep_element = format!("{{\"account\":\"a\",\"x\":{deep_extra}}}");
    let fields: Vec<String> = (0..14).map(|i| format!("\"f{i}\":{i}")).collect();
    let wide_element = format!(
        "{{\"account\":\"a\",\"account_type\":0,{}}}",
        fields.join(",")
    );
    let mut dup: Vec<String> = (0..15)
        .map(|i| format!("\"f{i}\":{}", "1".repeat(69_000)))
        .collect();
    dup.push("\"f0\":0".to_owned());
    let token = format!("\"{}\"", "\\u4e2d".repeat(66));
    let plain_token = format!("\"{}\"", "a".repeat(1000));
    vec![
        ("ordinary_1000_accounts", ordinary, big_ids),
        (
            "100k_distinct_keys",
            format!(
                "{{\"operator_type\":2,\"token_list\":[\"t\"],{}}}",
                keys.join(",")
            ),
            LIMITS,
        ),
        (
            "14_fields_of_escapes",
            format!(
                "{{\"operator_type\":2,\"token_list\":[\"t\"],{}}}",
                escapes.join(",")
            ),
            LIMITS,
        ),
        (
            "deep_arrays_at_the_depth_limit",
            mib(
                "{\"operator_type\":2,\"token_list\":[\"t\"],\"x\":[",
                &deep_unit,
                ",",
                "]}",
            ),
            LIMITS,
        ),
        (
            "250_elements_with_4kib_deep_extras",
            format!(
                "{{\"operator_type\":1,\"account_list\":[{}]}}",
                vec![deep_element.as_str(); 250].join(",")
            ),
            LIMITS,
        ),
        (
            "1000_elements_of_16_fields",
            format!(
                "{{\"operator_type\":1,\"account_list\":[{}]}}",
                vec![wide_element.as_str(); 1000].join(",")
            ),
            LIMITS,
        ),
        (
            "long_numbers_then_a_duplicate",
            format!(
                "{{\"operator_type\":2,\"token_list\":[\"t\"],{}}}",
                dup.join(",")
            ),
            LIMITS,
        ),
        (
            // Plain all the way, so the one-pass reader reads it whole before the identifier
            // check refuses it and the general reader reads it again.
            "1000_plain_tokens_too_long",
            format!(
                "{{\"operator_type\":2,\"token_list\":[{}]}}",
                vec![plain_token.as_str(); 1000].join(",")
            ),
            LIMITS,
        ),
        (
            "1000_escaped_tokens",
            format!(
                "{{\"operator_type\":2,\"token_list\":[{}]}}",
                vec![token.as_str(); 1000].join(",")
            ),
            LIMITS,
        ),
    ]
}

fn preauth(c: &mut Criterion) {
    let mut g = c.benchmark_group("preauth_1mib");
    for (name, body, limits) in preauth_bodies() {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &body, |bench, b| {
            bench.iter(|| black_box(parse_query(black_box(b.as_bytes()), &limits).is_ok()))
        });
    }
    g.finish();
}

criterion_group!(benches, parse_and_key, stitch_cached, preauth);
criterion_main!(benches);
