//! `POST /v3/device/account/query` towards the upstream and back: the body of a sub-request of
//! misses, the check of the upstream's answer (untrusted: matched to what was asked by value,
//! refused when malformed), and the documented response stitched for the client.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::code;
use super::error::UpstreamError;
use super::request::{Ident, Op};

/// The body of one upstream sub-request: the client's top-level fields, `operator_type`, and
/// the given elements exactly as the client wrote them.
pub fn build_upstream_body<'a>(
    op: Op,
    top_fields: &[(String, Box<RawValue>)],
    elements: impl Iterator<Item = &'a str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"operator_type\":");
    out.extend_from_slice(itoa::Buffer::new().format(op.operator_type()).as_bytes());
    for (k, v) in top_fields {
        out.push(b',');
        push_json_str(&mut out, k);
        out.push(b':');
        out.extend_from_slice(v.get().as_bytes());
    }
    out.push(b',');
    push_json_str(&mut out, op.list_field());
    out.extend_from_slice(b":[");
    for (i, el) in elements.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(el.as_bytes());
    }
    out.extend_from_slice(b"]}");
    out
}

/// `s` as a JSON string, exactly as serde_json writes it. Only `"`, `\` and control characters
/// need escaping; without them (every element code, almost every key) the text goes in as it
/// is, with no allocation (this runs once per identifier in [`stitch`]).
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A per-element status code from `result`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElementCode {
    Ok,
    NotFound,
    Other(OtherCode),
}

/// A code other than the two the cache understands, as the upstream spelled it. Boxed twice so
/// an [`ElementCode`] is 16 bytes, not 24 (a thin pointer leaves room for the tag), which keeps
/// a cache entry's head at 32 bytes (see [`crate::cache::Entry`]). Such codes are never cached
/// and rare, so the extra allocation costs nothing that matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherCode(Box<Box<str>>);

impl From<&str> for OtherCode {
    fn from(s: &str) -> OtherCode {
        OtherCode(Box::new(s.into()))
    }
}

impl std::ops::Deref for OtherCode {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl ElementCode {
    pub fn parse(s: &str) -> Option<ElementCode> {
        match s {
            code::ELEMENT_OK => Some(ElementCode::Ok),
            code::ELEMENT_NOT_FOUND => Some(ElementCode::NotFound),
            // Codes are short decimal numbers; anything else is not a TPNS answer.
            _ if !s.is_empty()
                && s.len() <= 16
                && s.trim_start_matches('-')
                    .bytes()
                    .all(|b| b.is_ascii_digit()) =>
            {
                Some(ElementCode::Other(s.into()))
            }
            _ => None,
        }
    }
    pub fn as_str(&self) -> &str {
        match self {
            ElementCode::Ok => code::ELEMENT_OK,
            ElementCode::NotFound => code::ELEMENT_NOT_FOUND,
            ElementCode::Other(s) => s,
        }
    }
    pub fn is_ok(&self) -> bool {
        matches!(self, ElementCode::Ok)
    }
}

/// The upstream's answer for one identifier: its `result` code and its element, if any.
#[derive(Debug, Clone)]
pub struct Answer {
    pub code: ElementCode,
    pub element: Option<Box<RawValue>>,
}

/// What one upstream sub-request came back with.
#[derive(Debug)]
pub enum UpstreamAnswer {
    /// Per-element answers, positionally matching the identifiers sent.
    Elements(Vec<Answer>),
    /// The call failed as a whole (auth, quota, …): the upstream's own `retCode`; its body is
    /// passed to the client unchanged and nothing is cached.
    Failed { ret_code: i64 },
}

#[derive(Deserialize)]
struct UpstreamQueryResponse<'a> {
    #[serde(rename = "retCode")]
    ret_code: i64,
    #[serde(default)]
    result: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow)]
    account_tokens: Option<Vec<&'a RawValue>>,
    #[serde(default, borrow)]
    token_accounts: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct AccountName<'a> {
    #[serde(borrow)]
    account: Cow<'a, str>,
}

#[derive(Deserialize)]
struct TokenName<'a> {
    #[serde(borrow)]
    token: Cow<'a, str>,
}

/// The top-level code of a TPNS answer (`retCode`, or `ret_code` on the snake_case APIs), if
/// it has one.
pub fn ret_code_of(body: &[u8]) -> Option<i64> {
    #[derive(Deserialize)]
    struct Code {
        #[serde(rename = "retCode")]
        camel: Option<i64>,
        #[serde(rename = "ret_code")]
        snake: Option<i64>,
    }
    let c = serde_json::from_slice::<Code>(body).ok()?;
    c.camel.or(c.snake)
}

/// Checks an upstream answer to a sub-request for `sent` (in the order sent) and pairs each
/// identifier with its answer. `batch_codes` are the top-level codes that still carry
/// per-element results (0 and the partial/all-failed codes).
///
/// Elements are matched to identifiers by their `account`/`token` value, never by position
/// (the docs do not say whether not-found identifiers have an element). The caller guarantees
/// that no two identifiers of one sub-request share a name, so the match is unambiguous.
pub fn parse_upstream_answer(
    op: Op,
    sent: &[&Ident],
    body: &[u8],
    batch_codes: &[i64],
) -> Result<UpstreamAnswer, UpstreamError> {
    let malformed = |m: String| UpstreamError::Malformed(m);
    let resp: UpstreamQueryResponse = serde_json::from_slice(body)
        .map_err(|e| malformed(format!("not a query response: {e}")))?;
    if !batch_codes.contains(&resp.ret_code) {
        return Ok(UpstreamAnswer::Failed {
            ret_code: resp.ret_code,
        });
    }
    let result = resp
        .result
        .ok_or_else(|| malformed("no `result` array".to_owned()))?;
    if result.len() != sent.len() {
        return Err(malformed(format!(
            "`result` has {} codes for {} identifiers",
            result.len(),
            sent.len()
        )));
    }
    let (elements, other) = match op {
        Op::AccountTokens => (resp.account_tokens, resp.token_accounts),
        Op::TokenAccounts => (resp.token_accounts, resp.account_tokens),
    };
    if other.as_ref().is_some_and(|o| !o.is_empty()) {
        return Err(malformed(format!(
            "`{}` answered to operator_type {}",
            op.other_answer_field(),
            op.operator_type()
        )));
    }
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(sent.len());
    for (i, id) in sent.iter().enumerate() {
        index.insert(id.name(), i);
    }
    let mut matched: Vec<Option<Box<RawValue>>> = vec![None; sent.len()];
    for el in elements.unwrap_or_default() {
        let name: Cow<str> = match op {
            Op::AccountTokens => serde_json::from_str::<AccountName>(el.get())
                .map(|a| a.account)
                .map_err(|_| malformed("an account_tokens element has no `account`".into()))?,
            Op::TokenAccounts => serde_json::from_str::<TokenName>(el.get())
                .map(|t| t.token)
                .map_err(|_| malformed("a token_accounts element has no `token`".into()))?,
        };
        let i = *index.get(name.as_ref()).ok_or_else(|| {
            malformed(format!(
                "an element answers an identifier never asked ({} bytes)",
                name.len()
            ))
        })?;
        if matched[i].is_some() {
            return Err(malformed("two elements answer one identifier".to_owned()));
        }
        // Syntax alone is not enough: a number no JSON parser can represent (found by fuzzing)
        // would be cached and served to clients that cannot read it.
        if serde_json::from_str::<serde_json::Value>(el.get()).is_err() {
            return Err(malformed(
                "an element holds a value out of range".to_owned(),
            ));
        }
        matched[i] = Some(el.to_owned());
    }
    let mut answers = Vec::with_capacity(sent.len());
    for (code_str, element) in result.iter().zip(matched) {
        let code = ElementCode::parse(code_str)
            .ok_or_else(|| malformed("a `result` entry is not a status code".to_owned()))?;
        answers.push(Answer { code, element });
    }
    Ok(UpstreamAnswer::Elements(answers))
}

/// The top-level code of a stitched answer (see `query.*` in the configuration).
pub fn top_level_code<'a>(
    codes: impl Iterator<Item = &'a ElementCode>,
    partial_failure: i64,
    all_failed: i64,
) -> i64 {
    let (mut ok, mut failed) = (0usize, 0usize);
    for c in codes {
        if c.is_ok() {
            ok += 1;
        } else {
            failed += 1;
        }
    }
    match (ok, failed) {
        (_, 0) => code::OK,
        (0, _) => all_failed,
        _ => partial_failure,
    }
}

/// What [`stitch`] needs of one element's answer: its code and, if it has one, its element's
/// JSON text. Implemented by an [`Answer`] and by a cache entry, which keeps the text inline
/// as bytes (see [`crate::cache::Entry`]).
pub trait Stitch {
    fn code(&self) -> &ElementCode;
    /// The element's JSON text: always a whole JSON value, copied into the response as it is.
    fn element(&self) -> Option<&[u8]>;
}

impl Stitch for Answer {
    fn code(&self) -> &ElementCode {
        &self.code
    }
    fn element(&self) -> Option<&[u8]> {
        self.element.as_deref().map(|e| e.get().as_bytes())
    }
}

/// Writes the documented response for `answers` (one per requested element, in request order).
pub fn stitch<'a, A: Stitch + 'a>(
    op: Op,
    ret_code: i64,
    answers: impl Iterator<Item = &'a A> + Clone,
) -> Vec<u8> {
    // Sized once: the codes and elements, plus the fixed text around them.
    let size = 160
        + answers
            .clone()
            .map(|a| a.code().as_str().len() + 4 + a.element().map_or(0, |e| e.len() + 1))
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(b"{\"retCode\":");
    out.extend_from_slice(itoa::Buffer::new().format(ret_code).as_bytes());
    out.extend_from_slice(b",\"errMsg\":");
    push_json_str(&mut out, code::message(ret_code));
    out.extend_from_slice(b",\"result\":[");
    for (i, a) in answers.clone().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json_str(&mut out, a.code().as_str());
    }
    out.extend_from_slice(b"],");
    let list = |out: &mut Vec<u8>| {
        out.push(b'[');
        let mut first = true;
        for el in answers.clone().filter_map(|a| a.element()) {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(el);
        }
        out.push(b']');
    };
    match op {
        Op::AccountTokens => {
            out.extend_from_slice(b"\"account_tokens\":");
            list(&mut out);
            out.extend_from_slice(b",\"token_accounts\":null}");
        }
        Op::TokenAccounts => {
            out.extend_from_slice(b"\"account_tokens\":null,\"token_accounts\":");
            list(&mut out);
            out.push(b'}');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// The fast path writes exactly what serde_json writes, escapes or not.
    #[test]
    fn json_strings_as_serde_writes_them() {
        for s in [
            "",
            "0",
            "1008006",
            "-1",
            "token_accounts",
            "a/b",
            "é✓",
            "\u{7f}",
            "q\"q",
            "b\\s",
            "nl\n",
            "\u{1}",
            "tab\t",
        ] {
            let mut out = Vec::new();
            push_json_str(&mut out, s);
            let out = String::from_utf8(out).expect("UTF-8");
            assert_eq!(out, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    fn ids(names: &[&str]) -> Vec<Ident> {
        names.iter().map(|n| Ident::Token((*n).into())).collect()
    }

    #[test]
    fn upstream_answer_matches_by_value() {
        let sent = ids(&["t1", "t2", "t3"]);
        let refs: Vec<&Ident> = sent.iter().collect();
        let body = json!({"retCode":1_008_026,"errMsg":"x","result":["0","10110008","0"],
            "account_tokens":null,
            "token_accounts":[{"token":"t3","account_list":[],"new":1},{"token":"t1","account_list":[{"account":"a"}]}]});
        let UpstreamAnswer::Elements(a) = parse_upstream_answer(
            Op::TokenAccounts,
            &refs,
            body.to_string().as_bytes(),
            &[0, 1_008_026, 1_008_027],
        )
        .unwrap() else {
            panic!("expected elements")
        };
        assert_eq!(a[0].code, ElementCode::Ok);
        assert!(a[0].element.as_ref().unwrap().get().contains("\"a\""));
        assert_eq!(a[1].code, ElementCode::NotFound);
        assert!(a[1].element.is_none());
        assert!(a[2].element.as_ref().unwrap().get().contains("\"new\":1"));
    }

    #[test]
    fn upstream_whole_failure_is_reported() {
        let sent = ids(&["t1"]);
        let refs: Vec<&Ident> = sent.iter().collect();
        let body = br#"{"retCode":1008003,"errMsg":"auth"}"#;
        assert!(matches!(
            parse_upstream_answer(Op::TokenAccounts, &refs, body, &[0]),
            Ok(UpstreamAnswer::Failed {
                ret_code: 1_008_003
            })
        ));
    }

    #[test]
    fn upstream_mismatches_are_refused() {
        let sent = ids(&["t1", "t2"]);
        let refs: Vec<&Ident> = sent.iter().collect();
        let bad = [
            r#"{"retCode":0,"result":["0"]}"#.to_owned(),
            r#"{"retCode":0}"#.to_owned(),
            r#"{"retCode":0,"result":["0","0"],"token_accounts":[{"token":"zz"}]}"#.to_owned(),
            r#"{"retCode":0,"result":["0","0"],"token_accounts":[{"token":"t1"},{"token":"t1"}]}"#
                .to_owned(),
            r#"{"retCode":0,"result":["0","0"],"token_accounts":[{"nope":"t1"}]}"#.to_owned(),
            r#"{"retCode":0,"result":[0,0]}"#.to_owned(),
            r#"{"retCode":0,"result":["0","<b>"]}"#.to_owned(),
            r#"{"retCode":0,"result":["0","0"],"account_tokens":[{"account":"t1"}]}"#.to_owned(),
            r#"{"retCode":"0","result":["0","0"]}"#.to_owned(),
            r#"{"retCode":0,"result":["0","0"],"token_accounts":[{"token":"t1""#.to_owned(),
            "<html>".to_owned(),
        ];
        for b in bad {
            let e =
                parse_upstream_answer(Op::TokenAccounts, &refs, b.as_bytes(), &[0]).expect_err(&b);
            assert_eq!(e.class().ret_code, 1_008_004, "{b}");
        }
    }

    /// Regression (fuzz: parse_upstream_answer, crash-f0d67e9b): an element with a number out
    /// of f64 range inside an unknown field was accepted, cached and stitched into output that
    /// strict JSON parsers reject.
    #[test]
    fn elements_with_unrepresentable_numbers_are_refused() {
        let sent = ids(&["t0", "t1"]);
        let refs: Vec<&Ident> = sent.iter().collect();
        let body = br#"{"retCode":1008026,"errMsg":"x","result":["0","1008006"],"account_tens":null,"token_accounts":[{"token":"t0","x":[{"n":1.111111111111111111111116916566e883338888271}]}]}"#;
        let e = parse_upstream_answer(Op::TokenAccounts, &refs, body, &[0, 1_008_026])
            .expect_err("refused");
        assert_eq!(e.class().ret_code, 1_008_004);
    }

    #[test]
    fn stitch_documented_shape() {
        let a = Answer {
            code: ElementCode::Ok,
            element: Some(
                RawValue::from_string(r#"{"account":"a","token_list":["t"]}"#.into()).unwrap(),
            ),
        };
        let nf = Answer {
            code: ElementCode::NotFound,
            element: None,
        };
        let all = [&a, &nf, &a];
        let code = top_level_code(all.iter().map(|x| &x.code), 1_008_026, 1_008_027);
        assert_eq!(code, 1_008_026);
        let out = stitch(Op::AccountTokens, code, all.iter().copied());
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"retCode":1_008_026,"errMsg":"batch operation partly failed",
                "result":["0","10110008","0"],
                "account_tokens":[{"account":"a","token_list":["t"]},{"account":"a","token_list":["t"]}],
                "token_accounts":null})
        );
        let ok = stitch(Op::TokenAccounts, 0, [&nf].into_iter());
        let v: Value = serde_json::from_slice(&ok).unwrap();
        assert_eq!(v["account_tokens"], Value::Null);
        assert_eq!(v["token_accounts"], json!([]));
        assert_eq!(v["errMsg"], "NO_ERROR");
        assert_eq!(top_level_code([&nf.code].into_iter(), 1, 2), 2);
        assert_eq!(top_level_code([&a.code].into_iter(), 1, 2), 0);
    }
}
