//! The upstream answer parser: never panics on any body, and what it accepts stitches into
//! valid JSON with one `result` code per identifier.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tpns_cache::api::answer::{parse_upstream_answer, stitch, UpstreamAnswer};
use tpns_cache::api::request::{Ident, Op};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let op = if selector & 1 == 0 { Op::AccountTokens } else { Op::TokenAccounts };
    let n = usize::from(selector >> 1) % 6 + 1;
    let idents: Vec<Ident> = (0..n)
        .map(|i| match op {
            Op::AccountTokens => Ident::Account {
                account: format!("a{i}").into(),
                account_type: None,
                extra: None,
            },
            Op::TokenAccounts => Ident::Token(format!("t{i}").into()),
        })
        .collect();
    let sent: Vec<&Ident> = idents.iter().collect();
    if let Ok(UpstreamAnswer::Elements(answers)) =
        parse_upstream_answer(op, &sent, body, &[0, 1_008_026, 1_008_027])
    {
        assert_eq!(answers.len(), n);
        let out = stitch(op, 0, answers.iter());
        let v: serde_json::Value = serde_json::from_slice(&out).expect("stitched JSON parses");
        assert_eq!(v["result"].as_array().map(Vec::len), Some(n));
    }
});
