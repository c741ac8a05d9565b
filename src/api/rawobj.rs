//! A JSON object kept as its raw members, in order, with duplicate keys detected, and the
//! canonical text of raw JSON used in cache keys.
//!
//! `serde_json::Value` silently keeps the last of two equal keys; a request whose meaning depends
//! on which duplicate wins must not be cached or forwarded on a guess, so we refuse it instead.
//! Member values stay raw so unknown fields are forwarded byte-for-byte.
//!
//! Both run before a credential is known to be good, so both are linear in their input and
//! cheap: members are borrowed from the input (no allocation per member), their count is capped
//! while parsing (`limits.max_fields`), duplicates are found with a set of keyed key hashes, and
//! canonicalization copies the input once, reordering only object members (the nesting depth is
//! bounded by `limits.max_json_depth` before any of this runs).

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;
use std::hash::BuildHasher;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, Visitor};
use serde_json::value::RawValue;

/// An object's members, borrowed from the text it was parsed from.
#[derive(Debug)]
pub struct RawObject<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

/// Why a text is not an acceptable object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectError {
    /// Not JSON, or not a JSON object.
    Syntax(String),
    /// The same key twice (the key, shortened for messages).
    Duplicate(String),
    /// More members than allowed.
    TooManyMembers(usize),
}

/// Members above which duplicates are found through a hash set instead of a scan.
const SCAN_MAX: usize = 8;

impl<'a> RawObject<'a> {
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// Parses `text` as an object of at most `max_members` members.
    pub fn parse(text: &'a [u8], max_members: usize) -> Result<RawObject<'a>, ObjectError> {
        let problem = Cell::new(None);
        let mut de = serde_json::Deserializer::from_slice(text);
        let parsed = Members {
            max: max_members,
            problem: &problem,
        }
        .deserialize(&mut de)
        .and_then(|o| de.end().map(|()| o));
        match (parsed, problem.take()) {
            (_, Some(p)) => Err(p),
            (Ok(o), None) => Ok(o),
            (Err(e), None) => Err(ObjectError::Syntax(e.to_string())),
        }
    }
}

struct Members<'p> {
    max: usize,
    problem: &'p Cell<Option<ObjectError>>,
}

impl<'de> DeserializeSeed<'de> for Members<'_> {
    type Value = RawObject<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawObject<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

/// A key, borrowed when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Visitor<'de> for Members<'_> {
    type Value = RawObject<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject<'de>, A::Error> {
        let mut members: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
        // Keyed hashes of the keys seen, once there are more than a scan handles cheaply.
        let hasher = foldhash::fast::RandomState::default();
        let mut seen: Option<HashSet<u64, std::hash::BuildHasherDefault<IdentityHasher>>> = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if members.len() == self.max {
                self.problem
                    .set(Some(ObjectError::TooManyMembers(self.max)));
                return Err(A::Error::custom("too many members"));
            }
            let duplicate = match &mut seen {
                None => members.iter().any(|(k, _)| *k == key),
                // A hash already seen is a duplicate or (rarely) a collision: confirm by scanning.
                Some(set) => {
                    !set.insert(hasher.hash_one(key.as_ref()))
                        && members.iter().any(|(k, _)| *k == key)
                }
            };
            if duplicate {
                let shown: String = key.chars().take(64).collect();
                self.problem.set(Some(ObjectError::Duplicate(shown)));
                return Err(A::Error::custom("duplicate key"));
            }
            if seen.is_none() && members.len() >= SCAN_MAX {
                let mut set = HashSet::with_capacity_and_hasher(2 * SCAN_MAX, Default::default());
                set.extend(members.iter().map(|(k, _)| hasher.hash_one(k.as_ref())));
                set.insert(hasher.hash_one(key.as_ref()));
                seen = Some(set);
            }
            let value: &'de RawValue = map.next_value()?;
            members.push((key, value));
        }
        Ok(RawObject(members))
    }
}

/// The set above already holds keyed hashes; hashing them again would be wasted work.
#[derive(Default)]
struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The canonical text of some raw members: keys sorted (stably, so repeated keys in nested
/// objects keep their order), insignificant whitespace dropped, everything else exactly as
/// written. Numbers keep their digits (`12345678901234567890123` and `…124` stay different) and
/// strings their escapes: two spellings of one value (`1` and `1.0`, `"A"` and `"\u0041"`) are
/// two keys, which shares less but never wrongly, and costs one copy of the input.
pub fn canonical(members: &[(&str, &RawValue)]) -> Result<String, serde_json::Error> {
    let mut sorted: Vec<(&str, &RawValue)> = members.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = String::with_capacity(
        2 + members
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>(),
    );
    out.push('{');
    for (i, (k, v)) in sorted.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if k.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
            out.push_str(&serde_json::to_string(k)?);
        } else {
            out.push('"');
            out.push_str(k);
            out.push('"');
        }
        out.push(':');
        let text = v.get();
        let mut pos = 0;
        canon_value(text, &mut pos, &mut out, 0)?;
    }
    out.push('}');
    Ok(out)
}

/// Deepest nesting canonicalization follows (the body's depth is checked before, lower).
const MAX_CANON_DEPTH: usize = 256;

fn syntax(what: &str) -> serde_json::Error {
    serde_json::Error::custom(format!("cannot canonicalize: {what}"))
}

fn skip_ws(s: &[u8], pos: &mut usize) {
    while *pos < s.len() && matches!(s[*pos], b' ' | b'\t' | b'\n' | b'\r') {
        *pos += 1;
    }
}

/// Appends the canonical form of the JSON value starting at `text[*pos]` and moves past it.
/// Scalars, strings and arrays are copied in one loop (arrays open and close without
/// recursion); only an object recurses, collecting its members as spans of one scratch buffer
/// (not a string each), which are sorted and then copied.
fn canon_value(
    text: &str,
    pos: &mut usize,
    out: &mut String,
    depth: usize,
) -> Result<(), serde_json::Error> {
    let s = text.as_bytes();
    // Arrays open inside this value.
    let mut open = 0usize;
    loop {
        skip_ws(s, pos);
        match s.get(*pos) {
            Some(b'[') => {
                open += 1;
                if depth + open > MAX_CANON_DEPTH {
                    return Err(syntax("nested too deeply"));
                }
                out.push('[');
                *pos += 1;
                continue;
            }
            Some(b',') if open > 0 => {
                out.push(',');
                *pos += 1;
                continue;
            }
            Some(b']') if open > 0 => {
                open -= 1;
                out.push(']');
                *pos += 1;
            }
            Some(b'"') => out.push_str(scan_string(text, pos)?),
            Some(b'{') => canon_object(text, pos, out, depth + open + 1)?,
            Some(_) => {
                // A number or a literal: kept exactly as written.
                let start = *pos;
                while *pos < s.len()
                    && matches!(s[*pos], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E' | b'a'..=b'z')
                {
                    *pos += 1;
                }
                if start == *pos {
                    return Err(syntax("unexpected character"));
                }
                out.push_str(text.get(start..*pos).ok_or_else(|| syntax("not UTF-8"))?);
            }
            None => return Err(syntax("unexpected end")),
        }
        // A value (or the outermost array) just ended.
        if open == 0 {
            return Ok(());
        }
    }
}

/// The object starting at `text[*pos]`, members sorted by their raw keys.
fn canon_object(
    text: &str,
    pos: &mut usize,
    out: &mut String,
    depth: usize,
) -> Result<(), serde_json::Error> {
    if depth > MAX_CANON_DEPTH {
        return Err(syntax("nested too deeply"));
    }
    let s = text.as_bytes();
    *pos += 1;
    skip_ws(s, pos);
    if s.get(*pos) == Some(&b'}') {
        *pos += 1;
        out.push_str("{}");
        return Ok(());
    }
    // (raw key, start and end of `"key":value` in `scratch`)
    let mut members: Vec<(&str, usize, usize)> = Vec::new();
    let mut scratch = String::new();
    loop {
        skip_ws(s, pos);
        let key = scan_string(text, pos)?;
        skip_ws(s, pos);
        if s.get(*pos) != Some(&b':') {
            return Err(syntax("expected ':'"));
        }
        *pos += 1;
        let start = scratch.len();
        scratch.push_str(key);
        scratch.push(':');
        canon_value(text, pos, &mut scratch, depth)?;
        members.push((key, start, scratch.len()));
        skip_ws(s, pos);
        match s.get(*pos) {
            Some(b',') => *pos += 1,
            Some(b'}') => {
                *pos += 1;
                break;
            }
            _ => return Err(syntax("expected ',' or '}'")),
        }
    }
    members.sort_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (_, start, end)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&scratch[*start..*end]);
    }
    out.push('}');
    Ok(())
}

/// The raw text of the JSON string starting at `text[*pos]` (quotes included); moves past it.
fn scan_string<'t>(text: &'t str, pos: &mut usize) -> Result<&'t str, serde_json::Error> {
    let s = text.as_bytes();
    if s.get(*pos) != Some(&b'"') {
        return Err(syntax("expected a string"));
    }
    let start = *pos;
    *pos += 1;
    while *pos < s.len() {
        match s[*pos] {
            b'\\' => *pos += 2,
            b'"' => {
                *pos += 1;
                return text.get(start..*pos).ok_or_else(|| syntax("not UTF-8"));
            }
            _ => *pos += 1,
        }
    }
    Err(syntax("unterminated string"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RawObject<'_>, ObjectError> {
        RawObject::parse(text.as_bytes(), 16)
    }

    #[test]
    fn keeps_members_in_order_and_raw() {
        let o = parse(r#"{"b": [1, 2], "a":"x"}"#).unwrap();
        assert_eq!(o.0[0].0, "b");
        assert_eq!(o.0[0].1.get(), "[1, 2]");
        assert_eq!(o.get("a").map(RawValue::get), Some("\"x\""));
    }

    #[test]
    fn refuses_duplicate_keys() {
        assert_eq!(
            parse(r#"{"a":1,"a":2}"#).unwrap_err(),
            ObjectError::Duplicate("a".into())
        );
        // Past the scan threshold the set finds them too.
        let many: Vec<String> = (0..12).map(|i| format!("\"k{i}\":{i}")).collect();
        let dup = format!("{{{},\"k3\":0}}", many.join(","));
        assert_eq!(
            parse(&dup).unwrap_err(),
            ObjectError::Duplicate("k3".into())
        );
        assert!(parse(&format!("{{{}}}", many.join(","))).is_ok());
    }

    #[test]
    fn caps_the_member_count() {
        let many: Vec<String> = (0..17).map(|i| format!("\"k{i}\":{i}")).collect();
        assert_eq!(
            parse(&format!("{{{}}}", many.join(","))).unwrap_err(),
            ObjectError::TooManyMembers(16)
        );
        assert!(matches!(parse("[1]"), Err(ObjectError::Syntax(_))));
        assert!(matches!(parse("{} x"), Err(ObjectError::Syntax(_))));
    }

    /// Regression: 80 000 distinct top-level keys took 18.6 s (a quadratic duplicate check)
    /// before the credential was known to be good. Now the cap stops it at once, and even
    /// without a cap the check is linear.
    #[test]
    fn many_distinct_keys_cost_linear_time() {
        let keys: Vec<String> = (0..80_000).map(|i| format!("\"k{i:05}\":0")).collect();
        let body = format!("{{{}}}", keys.join(","));
        assert_eq!(
            RawObject::parse(body.as_bytes(), 64).unwrap_err(),
            ObjectError::TooManyMembers(64)
        );
        let o = RawObject::parse(body.as_bytes(), usize::MAX).expect("all distinct");
        assert_eq!(o.0.len(), 80_000);
    }

    fn canon(text: &str) -> String {
        let o = parse(text).unwrap();
        canonical(
            &o.0.iter()
                .map(|(k, v)| (k.as_ref(), *v))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn canonical_ignores_order_and_whitespace() {
        assert_eq!(
            canon(r#"{"y": {"q":1, "p":2}, "x": 1}"#),
            canon(r#"{"x":1,"y":{"p":2,"q":1}}"#)
        );
        assert_eq!(
            canon(r#"{"y": {"q":1, "p":[ 2 , "\u0041 b" ,{ }, [ ]]}, "x": true}"#),
            r#"{"x":true,"y":{"p":[2,"\u0041 b",{},[]],"q":1}}"#
        );
    }

    #[test]
    fn canonical_text_is_json() {
        for text in [
            r#"{"a":[{"z":"x\"y","b":[[],[{}],{"k":"\\"}]},-1.5e-3,null,true],"\u0062":{"y":1,"x":[1,2]}}"#,
            r#"{"s":"]},{[\"","t":[ [ [ 1 ] , [ ] ] ]}"#,
        ] {
            let c = canon(text);
            let v: serde_json::Value =
                serde_json::from_str(&c).unwrap_or_else(|e| panic!("{c}: {e}"));
            let w: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(v, w, "same value: {c}");
        }
    }

    /// Regression: canonical keys went through f64, so two unknown fields holding
    /// `12345678901234567890123` and `…124` shared a cache key.
    #[test]
    fn canonical_keeps_every_digit() {
        assert_ne!(
            canon(r#"{"n":12345678901234567890123}"#),
            canon(r#"{"n":12345678901234567890124}"#)
        );
        assert_ne!(
            canon(r#"{"n":{"m":0.1000000000000000000001}}"#),
            canon(r#"{"n":{"m":0.1}}"#)
        );
        // Repeated keys in nested objects are kept, in order: which one wins is the upstream's
        // business, so they must not collapse into one key.
        assert_ne!(canon(r#"{"n":{"a":1,"a":2}}"#), canon(r#"{"n":{"a":2}}"#));
        assert_ne!(
            canon(r#"{"n":{"a":1,"a":2}}"#),
            canon(r#"{"n":{"a":2,"a":1}}"#)
        );
    }
}
