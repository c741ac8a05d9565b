//! Property: for random bindings, random prior cache states and random batches (duplicates,
//! mixed account types, both operator types), the proxy's answer equals, as parsed JSON, the
//! simulator's own answer to the same request sent directly, and the upstream never sees an
//! identifier that was fresh in the cache.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use serde_json::{json, Value};
use tpns_sim::SimConfig;

#[derive(Debug, Clone)]
enum Batch {
    Accounts {
        top_type: Option<i64>,
        items: Vec<(usize, Option<i64>)>,
    },
    Tokens(Vec<usize>),
}

fn acct(i: usize) -> String {
    format!("acct-{i}")
}
fn tok(i: usize) -> String {
    format!("tok-{i}")
}

impl Batch {
    fn body(&self) -> String {
        match self {
            Batch::Accounts { top_type, items } => {
                let list: Vec<Value> = items
                    .iter()
                    .map(|(i, t)| match t {
                        Some(t) => json!({"account": acct(*i), "account_type": t}),
                        None => json!({"account": acct(*i)}),
                    })
                    .collect();
                let mut v = json!({"operator_type": 1, "account_list": list});
                if let Some(t) = top_type {
                    v["account_type"] = json!(t);
                }
                v.to_string()
            }
            Batch::Tokens(items) => {
                let list: Vec<String> = items.iter().map(|i| tok(*i)).collect();
                json!({"operator_type": 2, "token_list": list}).to_string()
            }
        }
    }

    /// Identity of each element as the cache keys it (op, scope, name, element type).
    fn keys(&self) -> Vec<(String, String)> {
        match self {
            Batch::Accounts { top_type, items } => items
                .iter()
                .map(|(i, t)| (format!("1/{top_type:?}/{t:?}"), acct(*i)))
                .collect(),
            Batch::Tokens(items) => items.iter().map(|i| ("2".to_owned(), tok(*i))).collect(),
        }
    }
}

fn batch() -> impl Strategy<Value = Batch> {
    prop_oneof![
        (
            proptest::option::of(0..3i64),
            prop::collection::vec((0..8usize, proptest::option::of(0..3i64)), 1..10)
        )
            .prop_map(|(top_type, items)| Batch::Accounts { top_type, items }),
        prop::collection::vec(0..12usize, 1..10).prop_map(Batch::Tokens),
    ]
}

/// Which keys of `b` were cacheable in its answer `v` (code "0" with an element, or not found).
fn cacheable(b: &Batch, v: &Value) -> Vec<(String, String)> {
    let field = match b {
        Batch::Accounts { .. } => ("account_tokens", "account"),
        Batch::Tokens(_) => ("token_accounts", "token"),
    };
    let with_element: HashSet<String> = v[field.0]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e[field.1].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    b.keys()
        .into_iter()
        .zip(v["result"].as_array().unwrap())
        .filter(|((_, name), code)| {
            (*code == "0" && with_element.contains(name)) || *code == "10110008"
        })
        .map(|(k, _)| k)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn proxy_answers_equal_upstream_answers(
        bindings in prop::collection::vec((0..10usize, 0..8usize, 0..3i64), 0..25),
        warm in prop::collection::vec(batch(), 0..4),
        asked in batch(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let h = Harness::with(
                SimConfig { seed_examples: false, accounts: 0, tokens: 0, ..sim_config() },
                |c| {
                    c.cache.ttl_jitter = 0.0;
                    c.cache.ttl = Duration::from_secs(3600);
                    c.cache.negative_ttl = Duration::from_secs(3600);
                    c.shield.batch_window = Duration::ZERO;
                },
            )
            .await;
            for (t, a, ty) in &bindings {
                h.sim.bind(APP.0, &tok(*t), &acct(*a), *ty);
            }
            // tok-10 and tok-11 stay unregistered ("1008006", never cached).
            let mut cached: HashSet<(String, String)> = HashSet::new();
            let first = Batch::Tokens(vec![0]);
            for b in std::iter::once(&first).chain(warm.iter()) {
                let v = h.query(&b.body()).await.json();
                prop_assert_eq!(&v, &h.direct(&b.body()).await.json());
                cached.extend(cacheable(b, &v));
            }
            let seen_before = h.sim.stats().recent_queries.len();
            let proxy = h.query(&asked.body()).await.json();
            let fetched: Vec<String> = h
                .sim
                .stats()
                .recent_queries
                .iter()
                .skip(seen_before)
                .flatten()
                .cloned()
                .collect();
            let direct = h.direct(&asked.body()).await.json();
            prop_assert_eq!(&proxy, &direct);
            let uncached_names: HashSet<String> = asked
                .keys()
                .into_iter()
                .filter(|k| !cached.contains(k))
                .map(|(_, n)| n)
                .collect();
            for name in &fetched {
                prop_assert!(
                    uncached_names.contains(name),
                    "{} was fresh in the cache but went upstream", name
                );
            }
            Ok(())
        })?;
    }
}
