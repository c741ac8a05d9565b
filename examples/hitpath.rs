//! The cached-hit path in isolation: parse a request, digest each identifier (as the server
//! plans it), look them up, stitch the answer; one thread, a store of N entries with ~150-byte
//! elements, every request a batch of identifiers drawn at random (so nothing is repeated in a
//! way a memo or a CPU cache could exploit). Prints nanoseconds per identifier. Also a loop for
//! `perf record`.
//!
//! `cargo run --release --example hitpath -- [--entries 100000,1000000] [--fill 0.4,0.95] [--batch 100] [--seconds 5] [--cold] [--general] [--per-key]`
//!
//! `--fill`: how full the store's byte budget is (its `max_bytes` set so the entries weigh that
//! share of it). Below half, hits do not reach moka at all; from half on, one in
//! `RECORD_EVERY` does (see `tpns_cache::cache::local`), so both are shown.
//!
//! Before timing, every entry is read as often as a long-running cache's entries have been
//! (from half the budget on their first hits are all passed on to moka, see
//! `tpns_cache::cache::RECORDED_IN_FULL`);
//! By default a request is answered as the server answers one whose every key is fresh: read
//! in place under the read map's locks (`Store::with_all_fresh`). `--general` takes the path
//! of any other request instead (`Store::read_many`: each entry cloned out, then stitched);
//! `--per-key` that path one key at a time (`Store::read`); `--cold` times a store whose
//! entries have not been read yet.

/// The server's allocator (see `src/main.rs`), so the figures are the server's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tpns_cache::api::answer::{stitch, top_level_code, Answer, ElementCode};
use tpns_cache::api::request::{parse_request, Limits};
use tpns_cache::cache::{CacheKey, Clock, KeyPrefix, Lookup, Policy, Store};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let sizes: Vec<usize> = arg("--entries")
        .unwrap_or_else(|| "100000,1000000".to_owned())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let batch: usize = arg("--batch").and_then(|b| b.parse().ok()).unwrap_or(100);
    let seconds: u64 = arg("--seconds").and_then(|b| b.parse().ok()).unwrap_or(5);
    let fills: Vec<f64> = arg("--fill")
        .unwrap_or_else(|| "0.4,0.95".into())
        .split(',')
        .filter_map(|f| f.parse().ok())
        .filter(|f| *f > 0.0 && *f <= 1.0)
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("batch {batch}, random identifiers per request, one thread");
    println!("   entries   budget full   hits to moka   ns/identifier   requests/s");
    for &n in &sizes {
        for &fill in &fills {
            let (per_id, rps, sampled) =
                rt.block_on(run(n, fill, batch, Duration::from_secs(seconds)));
            let to_moka = if sampled { "sampled" } else { "none" };
            println!(
                "{n:>10}   {:>10.0} %   {to_moka:>12}   {per_id:>13.0}   {rps:>10.0}",
                fill * 100.0
            );
        }
    }
}

/// An entry as the store below holds it, to size the budget (all of them weigh the same).
fn element(i: usize) -> Box<RawValue> {
    RawValue::from_string(format!(
        r#"{{"token":"tok-{i:08}","account_list":[{{"account":"acct-{i:08}","account_type":0,"timestamp":1691656271}},{{"account":"acct-{:08}","account_type":1,"timestamp":1691656272}}]}}"#,
        i / 2
    ))
    .expect("json")
}

async fn run(entries: usize, fill: f64, batch: usize, duration: Duration) -> (f64, f64, bool) {
    let limits = Limits {
        max_items: 1000,
        max_identifier_bytes: 400,
        max_depth: 32,
        max_fields: 64,
        max_scope_bytes: 4096,
    };
    let policy = Policy::fresh_only(Duration::from_secs(3600), Duration::from_secs(3600));
    let upstream: Arc<str> = Arc::from("https://api.tpns.tencent.com");
    let app: Arc<str> = Arc::from("1500001048");
    let one = {
        let ident = tpns_cache::api::request::Ident::Token(format!("tok-{:08}", 0).into());
        let key = CacheKey::new(upstream.clone(), app.clone(), None, ident);
        let answer = Answer {
            code: ElementCode::Ok,
            element: Some(element(0)),
        };
        tpns_cache::cache::weigh(&key, &policy.entry(answer, Clock::default().now(), None).0)
    };
    let store = Store::new(
        (f64::from(one) * entries as f64 / fill) as u64,
        policy,
        Clock::default(),
    );
    for i in 0..entries {
        let ident = tpns_cache::api::request::Ident::Token(format!("tok-{i:08}").into());
        let key = CacheKey::new(upstream.clone(), app.clone(), None, ident);
        let el = element(i);
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
    store.sync().await;
    assert_eq!(store.entry_count(), entries as u64, "nothing evicted");
    if std::env::args().all(|a| a != "--cold") {
        // A long-running cache's entries have had their first hits, which moka sees in full
        // from half the budget on (see `RECORDED_IN_FULL`); a fresh store's have not. Not
        // timed; `--cold` skips it.
        let now = store.clock().now();
        let prefix = KeyPrefix::new(&upstream, app.clone(), None);
        for i in 0..entries {
            let ident = tpns_cache::api::request::Ident::Token(format!("tok-{i:08}"));
            let digest = prefix.digest(&ident);
            for _ in 0..tpns_cache::cache::RECORDED_IN_FULL {
                let _ = store.read(digest, now);
            }
        }
        store.sync().await;
    }
    // Bodies built ahead (random distinct identifiers each), cycled through.
    let bodies: Vec<String> = (0..4096)
        .map(|_| {
            let mut ids = std::collections::HashSet::with_capacity(batch);
            while ids.len() < batch.min(entries) {
                ids.insert(fastrand::usize(..entries));
            }
            let list: Vec<String> = ids.iter().map(|i| format!("\"tok-{i:08}\"")).collect();
            format!(
                "{{\"operator_type\":2,\"token_list\":[{}]}}",
                list.join(",")
            )
        })
        .collect();
    let per_key = std::env::args().any(|a| a == "--per-key");
    let general = std::env::args().any(|a| a == "--general");
    let started = Instant::now();
    let mut requests = 0usize;
    let mut bytes = 0usize;
    while started.elapsed() < duration {
        for _ in 0..256 {
            let body = &bodies[requests % bodies.len()];
            let req = parse_request(body.as_bytes(), &limits).expect("valid");
            let now = store.clock().now();
            let op = req.op;
            // As the server does: a digest per identifier (no key built for a hit).
            let prefix = KeyPrefix::new(&upstream, app.clone(), None);
            let digests: Vec<u128> = req
                .items
                .iter()
                .map(|item| prefix.digest(&item.ident))
                .collect();
            bytes += if per_key || general {
                // The general path: every lookup cloned out, then stitched.
                let lookups = if per_key {
                    digests.iter().map(|&d| store.read(d, now)).collect()
                } else {
                    store.read_many(&digests, now)
                };
                let found: Vec<tpns_cache::cache::Entry> = lookups
                    .into_iter()
                    .map(|l| match l {
                        Lookup::Fresh(e) => e,
                        other => panic!("not a hit: {other:?}"),
                    })
                    .collect();
                let code = top_level_code(found.iter().map(|e| e.code()), 1_008_026, 1_008_027);
                stitch(op, code, found.iter()).len()
            } else {
                // As the server answers a request whose every key is fresh: in place.
                store
                    .with_all_fresh(&digests, now, |found| {
                        let code =
                            top_level_code(found.iter().map(|e| e.code()), 1_008_026, 1_008_027);
                        stitch(op, code, found.iter().copied()).len()
                    })
                    .expect("every key a fresh hit")
            };
            requests += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(bytes > 0);
    let per_id = elapsed * 1e9 / (requests * batch) as f64;
    (per_id, requests as f64 / elapsed, store.samples_hits())
}
