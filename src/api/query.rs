//! `POST /v3/device/account/query`: parsing and validating the client's request, building the
//! upstream sub-requests, checking the upstream's answer, and stitching the documented response.
//!
//! Elements are kept as raw JSON end to end: unknown fields the client sends are forwarded
//! byte-for-byte, and unknown fields the upstream answers survive the cache.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::code;
use super::error::ProxyError;
use super::rawobj::{canonical, ObjectError, RawObject};

/// `operator_type`: which direction the query goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `1`: the tokens of each account (`account_list` → `account_tokens`).
    AccountTokens,
    /// `2`: the accounts of each token (`token_list` → `token_accounts`).
    TokenAccounts,
}

impl Op {
    pub fn operator_type(self) -> i64 {
        match self {
            Op::AccountTokens => 1,
            Op::TokenAccounts => 2,
        }
    }
    pub fn list_field(self) -> &'static str {
        match self {
            Op::AccountTokens => "account_list",
            Op::TokenAccounts => "token_list",
        }
    }
    pub fn answer_field(self) -> &'static str {
        match self {
            Op::AccountTokens => "account_tokens",
            Op::TokenAccounts => "token_accounts",
        }
    }
    fn other_answer_field(self) -> &'static str {
        match self {
            Op::AccountTokens => "token_accounts",
            Op::TokenAccounts => "account_tokens",
        }
    }
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::AccountTokens => "account_tokens",
            Op::TokenAccounts => "token_accounts",
        }
    }
}

/// One requested identifier, with every element-level field that can change its answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ident {
    Account {
        account: Box<str>,
        /// The element's own `account_type`; `None` (absent) is not the same as `Some(0)`.
        account_type: Option<i64>,
        /// Canonical text of any other fields of the element (unknown to us, so part of the key).
        extra: Option<Box<str>>,
    },
    Token(Box<str>),
}

impl Ident {
    /// The value the upstream echoes in its answer element (`account` or `token`).
    pub fn name(&self) -> &str {
        match self {
            Ident::Account { account, .. } => account,
            Ident::Token(t) => t,
        }
    }
    /// Approximate heap bytes, for the cache weigher.
    pub fn heap_bytes(&self) -> usize {
        match self {
            Ident::Account { account, extra, .. } => {
                account.len() + extra.as_ref().map_or(0, |e| e.len())
            }
            Ident::Token(t) => t.len(),
        }
    }
}

/// One element of the client's list, as parsed and as sent.
#[derive(Debug)]
pub struct Item {
    pub ident: Ident,
    pub raw: Box<RawValue>,
}

/// A validated query.
#[derive(Debug)]
pub struct QueryRequest {
    pub op: Op,
    /// Every top-level member except `operator_type` and the op's list, raw and in order;
    /// forwarded on every upstream sub-request.
    pub top_fields: Vec<(String, Box<RawValue>)>,
    /// Canonical text of `top_fields` (the part of the cache key shared by the whole request);
    /// `None` when there are none. Includes the top-level `account_type` when present.
    pub top_scope: Option<Box<str>>,
    pub items: Vec<Item>,
}

/// Validation limits (from `limits.*`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_items: usize,
    pub max_identifier_bytes: usize,
    pub max_depth: usize,
    /// Most members of the top-level object and of each list element object.
    pub max_fields: usize,
    /// Largest raw size of the unknown fields that become part of cache keys, top-level and of
    /// all elements together (see [`Parsed::TooLargeToKey`]).
    pub max_scope_bytes: usize,
}

/// Whether `body` nests arrays/objects deeper than `max` (strings are skipped, escapes
/// included). Checked before parsing so deep input costs one linear scan, nothing more.
pub fn nesting_exceeds(body: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Why reading a list stopped before its end.
enum Stop {
    TooMany,
    Invalid(ProxyError),
    TooLargeToKey,
}

/// Hands each element of a JSON array (borrowed, raw) to `f` as it is read, and stops at the
/// first that `f` refuses or past `max` elements: a huge or bad list costs no more than its
/// prefix, and is never held whole. Why it stopped is left in `stop`.
struct EachElement<'p, 'de> {
    max: usize,
    stop: &'p std::cell::Cell<Option<Stop>>,
    f: &'p mut dyn FnMut(usize, &'de RawValue) -> Result<(), Stop>,
}

impl<'de> serde::de::DeserializeSeed<'de> for EachElement<'_, 'de> {
    type Value = usize;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EachElement<'_, 'de> {
    type Value = usize;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut n = 0;
        while let Some(el) = seq.next_element::<&'de RawValue>()? {
            let step = if n == self.max {
                Err(Stop::TooMany)
            } else {
                (self.f)(n, el)
            };
            if let Err(stop) = step {
                self.stop.set(Some(stop));
                return Err(serde::de::Error::custom("stopped"));
            }
            n += 1;
        }
        Ok(n)
    }
}

fn invalid(msg: impl Into<String>) -> ProxyError {
    ProxyError::InvalidParameter(msg.into())
}

/// A JSON integer (no fraction, no exponent) that fits in an i64.
fn parse_int(raw: &RawValue, field: &str) -> Result<i64, ProxyError> {
    let v: serde_json::Value =
        serde_json::from_str(raw.get()).map_err(|e| ProxyError::Unparseable(e.to_string()))?;
    match v {
        serde_json::Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| invalid(format!("{field} must be an integer, got {n}"))),
        other => Err(invalid(format!(
            "{field} must be an integer, got {}",
            json_type(&other)
        ))),
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn check_identifier(s: &str, what: &str, pos: usize, limits: &Limits) -> Result<(), ProxyError> {
    if s.is_empty() {
        return Err(invalid(format!("{what}[{pos}] is empty")));
    }
    if s.len() > limits.max_identifier_bytes {
        return Err(invalid(format!(
            "{what}[{pos}] is {} bytes long, the limit is {}",
            s.len(),
            limits.max_identifier_bytes
        )));
    }
    let control = if s.is_ascii() {
        s.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        s.chars().any(char::is_control)
    };
    if control {
        return Err(invalid(format!(
            "{what}[{pos}] contains control characters"
        )));
    }
    Ok(())
}

fn account_type_of(raw: &RawValue, field: &str) -> Result<i64, ProxyError> {
    let t = parse_int(raw, field)?;
    if !(0..=i64::from(i32::MAX)).contains(&t) {
        return Err(invalid(format!("{field} must be a non-negative integer")));
    }
    Ok(t)
}

/// What a valid query body turned out to be.
#[derive(Debug)]
pub enum Parsed {
    Query(QueryRequest),
    /// Its unknown fields (top-level and of all elements together) are larger than
    /// `limits.max_scope_bytes`: too large to be part of cache keys. Parsing stopped there; such
    /// a query is forwarded unchanged (the upstream judges it) and nothing of it is cached. Real
    /// requests carry at most a short `account_type` there; the bound keeps the cost of
    /// canonical keys, and the memory a key pins, small.
    TooLargeToKey,
}

/// Parses and validates a client query for the cache. Nothing is forwarded for a request that
/// fails here. Every step is linear in the body: it runs before the credential is known to be
/// good.
pub fn parse_query(body: &[u8], limits: &Limits) -> Result<Parsed, ProxyError> {
    if nesting_exceeds(body, limits.max_depth) {
        return Err(invalid(format!(
            "JSON nested deeper than {} levels",
            limits.max_depth
        )));
    }
    let obj = RawObject::parse(body, limits.max_fields).map_err(|e| match e {
        ObjectError::Syntax(m) => ProxyError::Unparseable(m),
        ObjectError::Duplicate(k) => invalid(format!("duplicate key `{k}`")),
        ObjectError::TooManyMembers(n) => {
            invalid(format!("the request object has more than {n} members"))
        }
    })?;
    let op_raw = obj
        .get("operator_type")
        .filter(|v| v.get() != "null")
        .ok_or(ProxyError::MissingParameter("operator_type"))?;
    let op = match parse_int(op_raw, "operator_type")? {
        1 => Op::AccountTokens,
        2 => Op::TokenAccounts,
        other => {
            return Err(invalid(format!(
                "operator_type must be 1 or 2, got {other}"
            )))
        }
    };
    if let Some(t) = obj.get("account_type") {
        account_type_of(t, "account_type")?;
    }
    let list_field = op.list_field();
    let list_raw = obj
        .get(list_field)
        .filter(|v| v.get() != "null")
        .ok_or(ProxyError::MissingParameter(list_field))?;
    // Unknown fields, top-level and of every element, count against one budget.
    let mut unknown_bytes: usize = obj
        .0
        .iter()
        .filter(|(k, _)| k != "operator_type" && k != list_field)
        .map(|(k, v)| k.len() + v.get().len())
        .sum();
    if unknown_bytes > limits.max_scope_bytes {
        return Ok(Parsed::TooLargeToKey);
    }
    use serde::de::DeserializeSeed;
    let mut items: Vec<Item> = Vec::new();
    let mut each = |pos: usize, raw: &RawValue| -> Result<(), Stop> {
        let ident = match op {
            Op::TokenAccounts => {
                let token: String = serde_json::from_str(raw.get()).map_err(|_| {
                    Stop::Invalid(invalid(format!("token_list[{pos}] must be a string")))
                })?;
                check_identifier(&token, "token_list", pos, limits).map_err(Stop::Invalid)?;
                Ident::Token(token.into_boxed_str())
            }
            Op::AccountTokens => parse_account_element(raw, pos, limits, &mut unknown_bytes)
                .map_err(Stop::Invalid)?
                .ok_or(Stop::TooLargeToKey)?,
        };
        items.push(Item {
            ident,
            raw: raw.to_owned(),
        });
        Ok(())
    };
    let stop = std::cell::Cell::new(None);
    let mut de = serde_json::Deserializer::from_str(list_raw.get());
    let read = EachElement {
        max: limits.max_items,
        stop: &stop,
        f: &mut each,
    }
    .deserialize(&mut de);
    match (read, stop.take()) {
        (_, Some(Stop::TooLargeToKey)) => return Ok(Parsed::TooLargeToKey),
        (_, Some(Stop::Invalid(e))) => return Err(e),
        (_, Some(Stop::TooMany)) => {
            return Err(invalid(format!(
                "{list_field} has more than {} elements",
                limits.max_items
            )))
        }
        (Err(_), None) => return Err(invalid(format!("{list_field} must be an array"))),
        (Ok(0), None) => return Err(invalid(format!("{list_field} is empty"))),
        (Ok(_), None) => {}
    }
    let top_fields: Vec<(String, Box<RawValue>)> = obj
        .0
        .into_iter()
        .filter(|(k, _)| k != "operator_type" && k != list_field)
        .map(|(k, v)| (k.into_owned(), v.to_owned()))
        .collect();
    let top_scope = if top_fields.is_empty() {
        None
    } else {
        let members: Vec<(&str, &RawValue)> = top_fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        Some(
            canonical(&members)
                .map_err(|e| ProxyError::Unparseable(e.to_string()))?
                .into_boxed_str(),
        )
    };
    Ok(Parsed::Query(QueryRequest {
        op,
        top_fields,
        top_scope,
        items,
    }))
}

/// [`parse_query`] for callers that key every valid query, whatever the size of its unknown
/// fields (the simulator, tests, benchmarks): `limits.max_scope_bytes` does not apply.
pub fn parse_request(body: &[u8], limits: &Limits) -> Result<QueryRequest, ProxyError> {
    let unbounded = Limits {
        max_scope_bytes: usize::MAX,
        ..*limits
    };
    match parse_query(body, &unbounded)? {
        Parsed::Query(q) => Ok(q),
        // Cannot happen: no body is larger than usize::MAX.
        Parsed::TooLargeToKey => Err(invalid("unknown fields too large")),
    }
}

/// An `account_list` element; `None` when its unknown fields push `unknown_bytes` past
/// `limits.max_scope_bytes`.
fn parse_account_element(
    raw: &RawValue,
    pos: usize,
    limits: &Limits,
    unknown_bytes: &mut usize,
) -> Result<Option<Ident>, ProxyError> {
    let el = RawObject::parse(raw.get().as_bytes(), limits.max_fields).map_err(|e| match e {
        ObjectError::Syntax(_) => invalid(format!("account_list[{pos}] must be an object")),
        ObjectError::Duplicate(k) => invalid(format!("account_list[{pos}]: duplicate key `{k}`")),
        ObjectError::TooManyMembers(n) => {
            invalid(format!("account_list[{pos}] has more than {n} members"))
        }
    })?;
    let account_raw = el
        .get("account")
        .filter(|v| v.get() != "null")
        .ok_or(ProxyError::MissingParameter("account_list[].account"))?;
    let account: String = serde_json::from_str(account_raw.get())
        .map_err(|_| invalid(format!("account_list[{pos}].account must be a string")))?;
    check_identifier(&account, "account_list", pos, limits)?;
    let account_type = el
        .get("account_type")
        .map(|t| account_type_of(t, &format!("account_list[{pos}].account_type")))
        .transpose()?;
    let others: Vec<(&str, &RawValue)> =
        el.0.iter()
            .filter(|(k, _)| k != "account" && k != "account_type")
            .map(|(k, v)| (k.as_ref(), *v))
            .collect();
    *unknown_bytes += others
        .iter()
        .map(|(k, v)| k.len() + v.get().len())
        .sum::<usize>();
    if *unknown_bytes > limits.max_scope_bytes {
        return Ok(None);
    }
    let extra = if others.is_empty() {
        None
    } else {
        Some(
            canonical(&others)
                .map_err(|e| ProxyError::Unparseable(e.to_string()))?
                .into_boxed_str(),
        )
    };
    Ok(Some(Ident::Account {
        account: account.into_boxed_str(),
        account_type,
        extra,
    }))
}

/// The body of one upstream sub-request: the client's top-level fields, `operator_type`, and
/// the given elements exactly as the client wrote them.
pub fn build_upstream_body<'a>(
    op: Op,
    top_fields: &[(String, Box<RawValue>)],
    elements: impl Iterator<Item = &'a RawValue>,
) -> Vec<u8> {
    let mut out = String::with_capacity(64);
    let _ = write!(out, "{{\"operator_type\":{}", op.operator_type());
    for (k, v) in top_fields {
        out.push(',');
        push_json_str(&mut out, k);
        out.push(':');
        out.push_str(v.get());
    }
    out.push(',');
    push_json_str(&mut out, op.list_field());
    out.push_str(":[");
    for (i, el) in elements.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(el.get());
    }
    out.push_str("]}");
    out.into_bytes()
}

fn push_json_str(out: &mut String, s: &str) {
    // Serializing a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
}

/// A per-element status code from `result`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElementCode {
    Ok,
    NotFound,
    Other(Box<str>),
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

/// The top-level `retCode` of a query answer, if it has one.
pub fn ret_code_of(body: &[u8]) -> Option<i64> {
    #[derive(Deserialize)]
    struct Code {
        #[serde(rename = "retCode")]
        ret_code: i64,
    }
    serde_json::from_slice::<Code>(body)
        .ok()
        .map(|c| c.ret_code)
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
) -> Result<UpstreamAnswer, ProxyError> {
    let malformed = |m: String| ProxyError::UpstreamMalformed(m);
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

/// Writes the documented response for `answers` (one per requested element, in request order).
pub fn stitch<'a>(
    op: Op,
    ret_code: i64,
    answers: impl Iterator<Item = &'a Answer> + Clone,
) -> Vec<u8> {
    let mut out = String::with_capacity(256);
    let _ = write!(out, "{{\"retCode\":{ret_code},\"errMsg\":");
    push_json_str(&mut out, code::message(ret_code));
    out.push_str(",\"result\":[");
    for (i, a) in answers.clone().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, a.code.as_str());
    }
    out.push_str("],");
    let list = |out: &mut String| {
        out.push('[');
        let mut first = true;
        for el in answers.clone().filter_map(|a| a.element.as_deref()) {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(el.get());
        }
        out.push(']');
    };
    match op {
        Op::AccountTokens => {
            out.push_str("\"account_tokens\":");
            list(&mut out);
            out.push_str(",\"token_accounts\":null}");
        }
        Op::TokenAccounts => {
            out.push_str("\"account_tokens\":null,\"token_accounts\":");
            list(&mut out);
            out.push('}');
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let deep = format!(
            "{{\"operator_type\":2,\"token_list\":[\"a\"],\"x\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(
            parse_request(deep.as_bytes(), &LIMITS)
                .unwrap_err()
                .ret_code(),
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
        assert_eq!(e.ret_code(), 1_008_007);
        assert!(e.to_string().contains("more than 5"), "{e}");
    }

    fn parse(v: &str) -> Result<QueryRequest, ProxyError> {
        parse_request(v.as_bytes(), &LIMITS)
    }

    fn ret(v: &str) -> i64 {
        parse(v).expect_err("must be refused").ret_code()
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
        let b = parse(r#"{"operator_type":1,"account_list":[{"account":"x","account_type":0}]}"#)
            .unwrap();
        assert_ne!(a.items[0].ident, b.items[0].ident);
        let c = parse(r#"{"operator_type":1,"account_type":0,"account_list":[{"account":"x"}]}"#)
            .unwrap();
        assert_ne!(a.top_scope, c.top_scope);
    }

    #[test]
    fn unknown_fields_are_kept_and_keyed() {
        let r = parse(
            r#"{"operator_type":1,"zz":{"b":1,"a":2},"account_list":[{"account":"x","k":1}]}"#,
        )
        .unwrap();
        assert_eq!(r.top_scope.as_deref(), Some(r#"{"zz":{"a":2,"b":1}}"#));
        assert!(
            matches!(&r.items[0].ident, Ident::Account { extra: Some(e), .. } if &**e == r#"{"k":1}"#)
        );
        let body = build_upstream_body(r.op, &r.top_fields, r.items.iter().map(|i| i.raw.as_ref()));
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
            parse_request(b"\xff\xfe", &LIMITS).unwrap_err().ret_code(),
            1_008_001
        );
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
            assert_eq!(e.ret_code(), 1_008_004, "{b}");
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
        assert_eq!(e.ret_code(), 1_008_004);
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
