//! The client request parser: never panics, and what it accepts round-trips through the
//! upstream sub-request body unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tpns_cache::api::answer::{build_upstream_body};
use tpns_cache::api::request::{parse_request, Limits};

const LIMITS: Limits = Limits {
    max_items: 1000,
    max_identifier_bytes: 400,
    max_depth: 32,
    max_fields: 64,
        max_scope_bytes: 4096,
};

fuzz_target!(|data: &[u8]| {
    let Ok(req) = parse_request(data, &LIMITS) else {
        return;
    };
    assert!(!req.items.is_empty() && req.items.len() <= LIMITS.max_items);
    let body = build_upstream_body(req.op, &req.top_fields, req.items.iter().map(|i| i.raw));
    let again = parse_request(&body, &LIMITS).expect("a rebuilt body parses");
    assert_eq!(again.op, req.op);
    assert_eq!(again.top_scope, req.top_scope);
    let a: Vec<_> = again.items.iter().map(|i| &i.ident).collect();
    let b: Vec<_> = req.items.iter().map(|i| &i.ident).collect();
    assert_eq!(a, b);
});
