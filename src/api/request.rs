//! `POST /v3/device/account/query` as the client sends it: parsing and validating the request
//! (TPNS codes for bad input; nothing is forwarded for a request that fails here).
//!
//! Elements are kept as raw JSON: unknown fields the client sends are forwarded byte-for-byte.
//! Every step is linear in the body and cheap, because it runs before the credential is known
//! to be good (see [`parse_query`]).

use std::borrow::Cow;
use std::ops::Deref;

use serde_json::value::RawValue;

use super::error::ClientError;
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
    pub fn other_answer_field(self) -> &'static str {
        match self {
            Op::AccountTokens => "token_accounts",
            Op::TokenAccounts => "account_tokens",
        }
    }
    /// Its metric label.
    pub(crate) fn label(self) -> crate::metrics::labels::OpLabel {
        match self {
            Op::AccountTokens => crate::metrics::labels::OpLabel::AccountTokens,
            Op::TokenAccounts => crate::metrics::labels::OpLabel::TokenAccounts,
        }
    }
}

/// One requested identifier, with every element-level field that can change its answer.
///
/// `S` is how the name is held: owned (`Box<str>`, the default: what cache keys keep) or, as
/// parsed, borrowed from the request body where it has no escapes ([`IdentRef`]), so a cached
/// identifier costs no allocation to look up.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ident<S = Box<str>> {
    Account {
        account: S,
        /// The element's own `account_type`; `None` (absent) is not the same as `Some(0)`.
        account_type: Option<i64>,
        /// Canonical text of any other fields of the element (unknown to us, so part of the key).
        extra: Option<Box<str>>,
    },
    Token(S),
}

/// An identifier as parsed: its name borrowed from the body when it can be.
pub type IdentRef<'a> = Ident<Cow<'a, str>>;

impl<S: Deref<Target = str>> Ident<S> {
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

impl IdentRef<'_> {
    /// An owned copy (what a cache key keeps).
    pub fn to_owned_ident(&self) -> Ident {
        match self {
            Ident::Account {
                account,
                account_type,
                extra,
            } => Ident::Account {
                account: Box::from(&**account),
                account_type: *account_type,
                extra: extra.clone(),
            },
            Ident::Token(t) => Ident::Token(Box::from(&**t)),
        }
    }
}

/// One element of the client's list, as parsed (borrowed from the body) and as sent.
#[derive(Debug)]
pub struct Item<'a> {
    pub ident: IdentRef<'a>,
    /// The element's JSON text exactly as the client wrote it (valid JSON: it was parsed).
    pub raw: &'a str,
}

/// A validated query; its identifiers and elements borrow from the body.
#[derive(Debug)]
pub struct QueryRequest<'a> {
    pub op: Op,
    /// Every top-level member except `operator_type` and the op's list, raw and in order;
    /// forwarded on every upstream sub-request.
    pub top_fields: Vec<(String, Box<RawValue>)>,
    /// Canonical text of `top_fields` (the part of the cache key shared by the whole request);
    /// `None` when there are none. Includes the top-level `account_type` when present.
    pub top_scope: Option<Box<str>>,
    pub items: Vec<Item<'a>>,
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
/// included). Checked before parsing so deep input costs one linear scan, nothing more: a
/// string's content is skipped with `memchr` (to its closing quote or an escape), so a body
/// of identifiers costs a few vector compares per identifier, not a branch per byte.
pub fn nesting_exceeds(body: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // To the end of the string: the next quote not escaped.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &body[i..]) {
                        None => return false, // unterminated: the parser refuses it
                        Some(n) if body[i + n] == b'\\' => i += n + 2,
                        Some(n) => {
                            i += n + 1;
                            break;
                        }
                    }
                    if i >= body.len() {
                        return false;
                    }
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// Why reading a list stopped before its end.
enum Stop {
    TooMany,
    Invalid(ClientError),
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

fn invalid(msg: impl Into<String>) -> ClientError {
    ClientError::InvalidParameter(msg.into())
}

/// A JSON integer (no fraction, no exponent) that fits in an i64.
fn parse_int(raw: &RawValue, field: &str) -> Result<i64, ClientError> {
    let v: serde_json::Value =
        serde_json::from_str(raw.get()).map_err(|e| ClientError::Unparseable(e.to_string()))?;
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

/// A JSON string's value, borrowed when it has no escapes (the usual case: then its text
/// between the quotes is its value, the JSON being valid already); `None` when not a string.
fn json_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get().trim_matches(|c: char| c.is_ascii_whitespace());
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Some(Cow::Borrowed(inner)),
        _ => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
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

fn check_identifier(s: &str, what: &str, pos: usize, limits: &Limits) -> Result<(), ClientError> {
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

fn account_type_of(raw: &RawValue, field: &str) -> Result<i64, ClientError> {
    let t = parse_int(raw, field)?;
    if !(0..=i64::from(i32::MAX)).contains(&t) {
        return Err(invalid(format!("{field} must be a non-negative integer")));
    }
    Ok(t)
}

/// What a valid query body turned out to be.
#[derive(Debug)]
pub enum Parsed<'a> {
    Query(QueryRequest<'a>),
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
pub fn parse_query<'a>(body: &'a [u8], limits: &Limits) -> Result<Parsed<'a>, ClientError> {
    if let Some(q) = plain_token_query(body, limits) {
        return Ok(Parsed::Query(q));
    }
    parse_query_general(body, limits)
}

/// [`parse_query`] without the one-pass reader of the usual query ([`plain_token_query`]).
fn parse_query_general<'a>(body: &'a [u8], limits: &Limits) -> Result<Parsed<'a>, ClientError> {
    if nesting_exceeds(body, limits.max_depth) {
        return Err(invalid(format!(
            "JSON nested deeper than {} levels",
            limits.max_depth
        )));
    }
    let obj = RawObject::parse(body, limits.max_fields).map_err(|e| match e {
        ObjectError::Syntax(m) => ClientError::Unparseable(m),
        ObjectError::Duplicate(k) => invalid(format!("duplicate key `{k}`")),
        ObjectError::TooManyMembers(n) => {
            invalid(format!("the request object has more than {n} members"))
        }
    })?;
    let op_raw = obj
        .get("operator_type")
        .filter(|v| v.get() != "null")
        .ok_or(ClientError::MissingParameter("operator_type"))?;
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
        .ok_or(ClientError::MissingParameter(list_field))?;
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
    if op == Op::TokenAccounts {
        if let Some(list) = plain_token_list(list_raw.get(), limits.max_items) {
            let mut items = Vec::with_capacity(list.len());
            for (pos, (raw, name)) in list.into_iter().enumerate() {
                check_identifier(name, "token_list", pos, limits)?;
                items.push(Item {
                    ident: Ident::Token(Cow::Borrowed(name)),
                    raw,
                });
            }
            return Ok(Parsed::Query(finish(op, obj, items)?));
        }
    }
    use serde::de::DeserializeSeed;
    let mut items: Vec<Item<'a>> = Vec::new();
    let mut each = |pos: usize, raw: &'a RawValue| -> Result<(), Stop> {
        let ident = match op {
            Op::TokenAccounts => {
                let token = json_str(raw).ok_or_else(|| {
                    Stop::Invalid(invalid(format!("token_list[{pos}] must be a string")))
                })?;
                check_identifier(&token, "token_list", pos, limits).map_err(Stop::Invalid)?;
                Ident::Token(token)
            }
            Op::AccountTokens => parse_account_element(raw, pos, limits, &mut unknown_bytes)
                .map_err(Stop::Invalid)?
                .ok_or(Stop::TooLargeToKey)?,
        };
        items.push(Item {
            ident,
            raw: raw.get(),
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
    Ok(Parsed::Query(finish(op, obj, items)?))
}

/// The request around its list: the top-level fields other than `operator_type` and the list,
/// raw and canonical.
fn finish<'a>(
    op: Op,
    obj: RawObject<'a>,
    items: Vec<Item<'a>>,
) -> Result<QueryRequest<'a>, ClientError> {
    let list_field = op.list_field();
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
                .map_err(|e| ClientError::Unparseable(e.to_string()))?
                .into_boxed_str(),
        )
    };
    Ok(QueryRequest {
        op,
        top_fields,
        top_scope,
        items,
    })
}

/// JSON's whitespace.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// The usual token list, read in one pass without serde: `[`, strings without escapes
/// separated by commas, `]`, JSON whitespace between. Each element as `(its text with the
/// quotes, its value)`. `None` for anything else (an escape, a value that is not a string, a
/// control character, a syntax error, no element, more than `max`): the general reader then
/// reads the list, with its exact errors. What both accept they read the same (unit test).
fn plain_token_list(list: &str, max: usize) -> Option<Vec<(&str, &str)>> {
    let (out, end) = token_list_at(list, 0, max)?;
    (skip_ws(list.as_bytes(), end) == list.len()).then_some(out)
}

/// [`plain_token_list`] starting at byte `i` of `text` (whitespace first allowed); with the
/// index just past its `]`.
fn token_list_at(text: &str, i: usize, max: usize) -> Option<(Vec<(&str, &str)>, usize)> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, i);
    if b.get(i) != Some(&b'[') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut out = Vec::with_capacity(max.min((b.len() - i) / 3 + 1));
    loop {
        if out.len() == max {
            return None;
        }
        let (start, end) = plain_string_at(b, i)?;
        // Quotes are ASCII, so these are char boundaries.
        out.push((text.get(start..=end)?, text.get(start + 1..end)?));
        i = skip_ws(b, end + 1);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b']') => return Some((out, i + 1)),
            _ => return None,
        }
    }
}

/// A string starting at `i` with no escape and no control character: the indices of its
/// opening and closing quotes.
fn plain_string_at(b: &[u8], i: usize) -> Option<(usize, usize)> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let len = b
        .get(i + 1..)?
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    let end = i + 1 + len;
    (b[end] == b'"').then_some((i, end))
}

/// The usual query read in one pass, without serde: an object of exactly `"operator_type"`
/// with the number `2` and a plain `"token_list"` (see [`plain_token_list`]), in either order,
/// JSON whitespace between, nothing after it; every identifier passing its check. `None` for
/// anything else (another op, any other member, another spelling of the number, an escape
/// anywhere, a duplicate, an identifier the check refuses, limits too tight for it, a syntax
/// error): the general reader then reads the body, with its exact errors. What this accepts
/// the general reader accepts and reads the same (unit test, over generated bodies). Linear:
/// one pass over the body to check it is UTF-8 (as serde does), one to read it.
fn plain_token_query<'a>(body: &'a [u8], limits: &Limits) -> Option<QueryRequest<'a>> {
    // Its depth is 2 and it has 2 members; tighter limits are the general reader's to report.
    if limits.max_depth < 2 || limits.max_fields < 2 {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let (mut op_seen, mut list) = (false, None);
    for member in 0..2 {
        let (start, end) = plain_string_at(b, skip_ws(b, i))?;
        i = skip_ws(b, end + 1);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        match &b[start + 1..end] {
            b"operator_type" if !op_seen => {
                if b.get(i) != Some(&b'2') {
                    return None;
                }
                op_seen = true;
                i += 1;
            }
            b"token_list" if list.is_none() => {
                let (items, after) = token_list_at(text, i, limits.max_items)?;
                list = Some(items);
                i = after;
            }
            _ => return None,
        }
        i = skip_ws(b, i);
        let delimiter = if member == 0 { b',' } else { b'}' };
        if b.get(i) != Some(&delimiter) {
            return None;
        }
        i += 1;
    }
    if skip_ws(b, i) != b.len() {
        return None;
    }
    let list = list?;
    let mut items = Vec::with_capacity(list.len());
    for (pos, (raw, name)) in list.into_iter().enumerate() {
        check_identifier(name, "token_list", pos, limits).ok()?;
        items.push(Item {
            ident: Ident::Token(Cow::Borrowed(name)),
            raw,
        });
    }
    Some(QueryRequest {
        op: Op::TokenAccounts,
        top_fields: Vec::new(),
        top_scope: None,
        items,
    })
}

/// [`parse_query`] for callers that key every valid query, whatever the size of its unknown
/// fields (the simulator, tests, benchmarks): `limits.max_scope_bytes` does not apply.
pub fn parse_request<'a>(body: &'a [u8], limits: &Limits) -> Result<QueryRequest<'a>, ClientError> {
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
fn parse_account_element<'a>(
    raw: &'a RawValue,
    pos: usize,
    limits: &Limits,
    unknown_bytes: &mut usize,
) -> Result<Option<IdentRef<'a>>, ClientError> {
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
        .ok_or(ClientError::MissingParameter("account_list[].account"))?;
    let account = json_str(account_raw)
        .ok_or_else(|| invalid(format!("account_list[{pos}].account must be a string")))?;
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
                .map_err(|e| ClientError::Unparseable(e.to_string()))?
                .into_boxed_str(),
        )
    };
    Ok(Some(Ident::Account {
        account,
        account_type,
        extra,
    }))
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
