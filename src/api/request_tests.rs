//! Unit tests of [`super`].

use super::*;
use crate::api::answer::build_upstream_body;
use serde_json::{json, Value};

const LIMITS: Limits = Limits {
    max_items: 5,
    max_identifier_bytes: 16,
    max_depth: 8,
    max_fields: 8,
    max_scope_bytes: 64,
};

#[test]
fn nesting_is_measured_outside_strings() {
    assert!(!nesting_exceeds(br#"{"a":[[1]]}"#, 3));
    assert!(nesting_exceeds(br#"{"a":[[[1]]]}"#, 3));
    assert!(!nesting_exceeds(br#"{"a":"[[[[[[\"[[["}"#, 1));
    // An escaped backslash ends its escape: the quote after it closes the string.
    assert!(nesting_exceeds(br#"{"a":"x\\","b":[[1]]}"#, 2));
    assert!(!nesting_exceeds(br#"{"a":"x\\\"[[[","b":[1]}"#, 2));
    assert!(
        !nesting_exceeds(br#"{"a":"[[[[\"#, 1),
        "unterminated: left to the parser"
    );
    assert!(!nesting_exceeds(br#"{"a":"\"#, 1));
    let deep = format!(
        "{{\"operator_type\":2,\"token_list\":[\"a\"],\"x\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_eq!(
        parse_request(deep.as_bytes(), &LIMITS)
            .unwrap_err()
            .class()
            .ret_code,
        1_008_007
    );
}

#[test]
fn huge_lists_stop_at_the_limit() {
    let body = format!(
        "{{\"operator_type\":2,\"token_list\":[{}\"x\"]}}",
        "\"t\",".repeat(1_000_000)
    );
    let e = parse_request(body.as_bytes(), &LIMITS).unwrap_err();
    assert_eq!(e.class().ret_code, 1_008_007);
    assert!(e.to_string().contains("more than 5"), "{e}");
}

fn parse(v: &str) -> Result<QueryRequest<'_>, ClientError> {
    parse_request(v.as_bytes(), &LIMITS)
}

fn ret(v: &str) -> i64 {
    parse(v).expect_err("must be refused").class().ret_code
}

/// Names without escapes are borrowed from the body; with escapes they are decoded, and the
/// two spellings of one name are one identifier (one key).
#[test]
fn names_are_borrowed_unless_escaped() {
    let r = parse(r#"{"operator_type":2,"token_list":["ab", "a\u0062", "a\"b"]}"#).unwrap();
    let names: Vec<&Cow<'_, str>> = r
        .items
        .iter()
        .map(|i| match &i.ident {
            Ident::Token(t) => t,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(matches!(names[0], Cow::Borrowed("ab")));
    assert!(matches!(names[1], Cow::Owned(n) if n == "ab"));
    assert!(matches!(names[2], Cow::Owned(n) if n == "a\"b"));
    assert_eq!(r.items[0].ident, r.items[1].ident);
    assert_eq!(r.items[1].raw, r#""a\u0062""#, "sent as written");
    let r = parse(r#"{"operator_type":1,"account_list":[{"account":"x\u0079"},{"account":"xy"}]}"#)
        .unwrap();
    assert_eq!(r.items[0].ident, r.items[1].ident);
    assert_eq!(r.items[0].ident.to_owned_ident().name(), "xy");
    assert_eq!(ret(r#"{"operator_type":2,"token_list":[1]}"#), 1_008_007);
}

#[test]
fn seed_examples_parse() {
    let r = parse(r#"{"operator_type":1,"account_list":[{"account":"account1"},{"account":"account2","account_type":1}]}"#).unwrap();
    assert_eq!(r.op, Op::AccountTokens);
    assert_eq!(r.items.len(), 2);
    assert_eq!(
        r.items[1].ident,
        Ident::Account {
            account: "account2".into(),
            account_type: Some(1),
            extra: None
        }
    );
    assert!(r.top_scope.is_none());
    let r = parse(r#"{"operator_type":2,"token_list":["token1","token2"]}"#).unwrap();
    assert_eq!(r.items[0].ident, Ident::Token("token1".into()));
}

#[test]
fn absent_account_type_differs_from_zero() {
    let a = parse(r#"{"operator_type":1,"account_list":[{"account":"x"}]}"#).unwrap();
    let b =
        parse(r#"{"operator_type":1,"account_list":[{"account":"x","account_type":0}]}"#).unwrap();
    assert_ne!(a.items[0].ident, b.items[0].ident);
    let c =
        parse(r#"{"operator_type":1,"account_type":0,"account_list":[{"account":"x"}]}"#).unwrap();
    assert_ne!(a.top_scope, c.top_scope);
}

#[test]
fn unknown_fields_are_kept_and_keyed() {
    let r =
        parse(r#"{"operator_type":1,"zz":{"b":1,"a":2},"account_list":[{"account":"x","k":1}]}"#)
            .unwrap();
    assert_eq!(r.top_scope.as_deref(), Some(r#"{"zz":{"a":2,"b":1}}"#));
    assert!(
        matches!(&r.items[0].ident, Ident::Account { extra: Some(e), .. } if &**e == r#"{"k":1}"#)
    );
    let body = build_upstream_body(r.op, &r.top_fields, r.items.iter().map(|i| i.raw));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        json!({"operator_type":1,"zz":{"b":1,"a":2},"account_list":[{"account":"x","k":1}]})
    );
}

#[test]
fn validation_codes() {
    assert_eq!(ret("not json"), 1_008_001);
    assert_eq!(ret("[1,2]"), 1_008_001);
    assert_eq!(ret(r#"{"operator_type":1"#), 1_008_001);
    assert_eq!(ret(r#"{"account_list":[{"account":"a"}]}"#), 1_008_002);
    assert_eq!(
        ret(r#"{"operator_type":null,"token_list":["a"]}"#),
        1_008_002
    );
    assert_eq!(ret(r#"{"operator_type":1}"#), 1_008_002);
    assert_eq!(ret(r#"{"operator_type":1,"token_list":["a"]}"#), 1_008_002);
    assert_eq!(ret(r#"{"operator_type":2,"token_list":null}"#), 1_008_002);
    assert_eq!(
        ret(r#"{"operator_type":"1","token_list":["a"]}"#),
        1_008_007
    );
    assert_eq!(
        ret(r#"{"operator_type":1.5,"token_list":["a"]}"#),
        1_008_007
    );
    assert_eq!(ret(r#"{"operator_type":-1,"token_list":["a"]}"#), 1_008_007);
    assert_eq!(ret(r#"{"operator_type":3,"token_list":["a"]}"#), 1_008_007);
    assert_eq!(
        ret(r#"{"operator_type":1e400,"token_list":["a"]}"#),
        1_008_001
    );
    assert_eq!(ret(r#"{"operator_type":2,"token_list":[]}"#), 1_008_007);
    assert_eq!(ret(r#"{"operator_type":2,"token_list":"a"}"#), 1_008_007);
    assert_eq!(ret(r#"{"operator_type":2,"token_list":[1]}"#), 1_008_007);
    assert_eq!(ret(r#"{"operator_type":2,"token_list":[""]}"#), 1_008_007);
    assert_eq!(
        ret(r#"{"operator_type":2,"token_list":["a\u0000b"]}"#),
        1_008_007
    );
    assert_eq!(
        ret(r#"{"operator_type":2,"token_list":["0123456789abcdefX"]}"#),
        1_008_007
    );
    assert_eq!(
        ret(r#"{"operator_type":2,"token_list":["a","b","c","d","e","f"]}"#),
        1_008_007
    );
    assert_eq!(
        ret(r#"{"operator_type":1,"account_list":["a"]}"#),
        1_008_007
    );
    assert_eq!(
        ret(r#"{"operator_type":1,"account_list":[{"account":7}]}"#),
        1_008_007
    );
    assert_eq!(ret(r#"{"operator_type":1,"account_list":[{}]}"#), 1_008_002);
    assert_eq!(
        ret(r#"{"operator_type":1,"account_list":[{"account":"a","account_type":"0"}]}"#),
        1_008_007
    );
    assert_eq!(
        ret(r#"{"operator_type":1,"account_list":[{"account":"a","account_type":null}]}"#),
        1_008_007
    );
    assert_eq!(
        ret(r#"{"operator_type":1,"account_list":[{"account":"a","account_type":-2}]}"#),
        1_008_007
    );
    assert_eq!(
        ret(r#"{"operator_type":1,"account_type":"x","account_list":[{"account":"a"}]}"#),
        1_008_007
    );
    assert_eq!(
        ret(r#"{"operator_type":1,"operator_type":2,"token_list":["a"]}"#),
        1_008_007
    );
    assert_eq!(
        ret(r#"{"operator_type":1,"account_list":[{"account":"a","account":"b"}]}"#),
        1_008_007
    );
    // Multibyte characters count in bytes: 6 × 3 bytes > 16.
    assert_eq!(
        ret(r#"{"operator_type":2,"token_list":["令牌令牌令牌"]}"#),
        1_008_007
    );
    assert_eq!(
        parse_request(b"\xff\xfe", &LIMITS)
            .unwrap_err()
            .class()
            .ret_code,
        1_008_001
    );
}

/// The one-pass token list reader takes only plain lists, and reads them exactly as the
/// general (serde) reader does: the same elements, texts and names.
#[test]
fn plain_token_lists_read_as_the_general_reader_reads_them() {
    for list in [
        r#"["a"]"#,
        r#"["a","b","c"]"#,
        " \t\n[ \"a\" ,\r\n\"b\"\t]\n ",
        r#"["é","日本","a b","x,y]"]"#,
        r#"["a","a"]"#,
        "[\"\u{7f}\"]", // DEL is allowed unescaped in JSON (the identifier check refuses it)
    ] {
        let fast = plain_token_list(list, 10).unwrap_or_else(|| panic!("{list:?} is plain"));
        let general: Vec<&RawValue> = serde_json::from_str(list).unwrap();
        assert_eq!(fast.len(), general.len(), "{list:?}");
        for ((raw, name), g) in fast.iter().zip(&general) {
            assert_eq!(*raw, g.get(), "{list:?}");
            assert_eq!(Some(Cow::Borrowed(*name)), json_str(g), "{list:?}");
        }
    }
    for list in [
        "[]",
        r#"["a\"b"]"#,
        r#"["a\\b"]"#,
        r#"["a",1]"#,
        r#"["a",]"#,
        r#"["a""b"]"#,
        r#"["a"] x"#,
        r#"["a"]]"#,
        r#"["a"#,
        r#"{"a":1}"#,
        "[\"a\u{1}\"]",
        r#"["a",null]"#,
        r#"["a","b","c","d"]"#, // more than the limit below
    ] {
        assert_eq!(plain_token_list(list, 3), None, "{list:?} is left to serde");
    }
    // Whatever reads it, a list gives the same answer to the same body.
    let r = parse(r#"{"operator_type":2,"token_list":[ "t1" , "t2" ]}"#).unwrap();
    assert_eq!(r.items[1].ident, Ident::Token("t2".into()));
    assert_eq!(r.items[1].raw, r#""t2""#);
    assert_eq!(
        ret(r#"{"operator_type":2,"token_list":["ok",""]}"#),
        1_008_007
    );
    assert_eq!(
        ret("{\"operator_type\":2,\"token_list\":[\"a\u{7f}\"]}"),
        1_008_007
    );
    assert_eq!(
        ret(r#"{"operator_type":2,"token_list":["a","b","c","d","e","f"]}"#),
        1_008_007
    );
}

/// The one-pass reader of the usual query accepts only what the general reader accepts, and
/// reads it the same: over bodies built from every combination of member order, whitespace,
/// spellings of the op, list shapes and what may follow, the one-pass reader's query equals
/// the general reader's wherever the one-pass reader answers (and it answers the plain ones).
#[test]
fn plain_token_queries_read_as_the_general_reader_reads_them() {
    let ws = ["", " ", "\n\t ", "\r\n"];
    let ops = [
        "2", "1", "02", "2.0", "2e0", "-2", "\"2\"", "20", "null", "2 2",
    ];
    let lists = [
        r#"["t1"]"#,
        r#"[ "t1" , "t2" ]"#,
        r#"["t1","t1"]"#,
        r#"["é","日本","a b","x,y]"]"#,
        r#"[]"#,
        r#"["a\"b"]"#,
        r#"["a\u0062"]"#,
        r#"["",  "x"]"#,
        "[\"a\u{7f}\"]",
        "[\"a\u{85}\"]",
        r#"["a",1]"#,
        r#"["a",]"#,
        r#"[["a"]]"#,
        r#"["a","b","c","d","e","f"]"#,       // more than the limit
        &format!("[\"{}\"]", "x".repeat(65)), // longer than the limit
        r#"["a""#,
    ];
    /// A body from whitespace, the op's spelling and the list.
    type Shape = dyn Fn(&str, &str, &str) -> String;
    let shapes: [&Shape; 9] = [
        &|w, op, l| {
            format!("{w}{{{w}\"operator_type\"{w}:{w}{op}{w},{w}\"token_list\"{w}:{w}{l}{w}}}{w}")
        },
        &|w, op, l| format!("{w}{{\"token_list\":{w}{l},\"operator_type\":{op}{w}}}"),
        &|w, op, l| format!("{{\"operator_type\":{op},\"token_list\":{l},\"x\":1}}{w}"),
        &|w, op, l| {
            format!("{{\"operator_type\":{op},{w}\"operator_type\":{op},\"token_list\":{l}}}")
        },
        &|_, op, l| format!("{{\"operator_type\":{op},\"token_list\":{l},\"token_list\":{l}}}"),
        &|w, op, l| format!("{{\"operator_type\":{op},\"token_list\":{l}}}{w}x"),
        &|_, op, l| format!("{{\"operator_typ\\u0065\":{op},\"token_list\":{l}}}"),
        &|w, op, l| format!("{{\"operator_type\":{op},\"token_list\":{l}{w}"),
        &|_, op, l| format!("{{\"operator_type\":{op},\"token_list\":{l},\"account_type\":0}}"),
    ];
    let (mut answered, mut compared) = (0, 0);
    for shape in &shapes {
        for w in ws {
            for op in ops {
                for l in &lists {
                    let body = shape(w, op, l);
                    compared += 1;
                    let Some(fast) = plain_token_query(body.as_bytes(), &LIMITS) else {
                        continue;
                    };
                    answered += 1;
                    let general = match parse_query_general(body.as_bytes(), &LIMITS) {
                        Ok(Parsed::Query(q)) => q,
                        other => {
                            panic!("{body:?}: one pass read it, the general reader gave {other:?}")
                        }
                    };
                    assert_eq!(fast.op, general.op, "{body:?}");
                    assert_eq!(fast.top_fields.len(), general.top_fields.len(), "{body:?}");
                    assert_eq!(fast.top_scope, general.top_scope, "{body:?}");
                    assert_eq!(fast.items.len(), general.items.len(), "{body:?}");
                    for (f, g) in fast.items.iter().zip(&general.items) {
                        assert_eq!(f.ident, g.ident, "{body:?}");
                        assert_eq!(f.raw, g.raw, "{body:?}");
                    }
                }
            }
        }
    }
    // The plain ones are answered: both shapes that spell the usual query, with the op `2`,
    // in every whitespace, with the four lists that are plain and pass the identifier check.
    assert_eq!(
        answered,
        2 * ws.len() * 4,
        "{answered} of {compared} bodies read in one pass"
    );
    // Limits too tight for it are the general reader's to report.
    let tight = Limits {
        max_depth: 1,
        ..LIMITS
    };
    assert!(plain_token_query(br#"{"operator_type":2,"token_list":["a"]}"#, &tight).is_none());
    // Not UTF-8: left to the general reader, which refuses it.
    let bad = b"{\"operator_type\":2,\"token_list\":[\"a\xff\"]}";
    assert!(plain_token_query(bad, &LIMITS).is_none());
    assert!(parse_query(bad, &LIMITS).is_err());
}
