//! A JSON object kept as its raw members, in order, with duplicate keys detected.
//!
//! `serde_json::Value` silently keeps the last of two equal keys; a request whose meaning depends
//! on which duplicate wins must not be cached or forwarded on a guess, so we refuse it instead.
//! Member values stay raw so unknown fields are forwarded byte-for-byte.

use std::fmt;

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, Visitor};
use serde_json::value::RawValue;

#[derive(Debug)]
pub struct RawObject(pub Vec<(String, Box<RawValue>)>);

impl RawObject {
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }
}

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject, A::Error> {
                let mut members: Vec<(String, Box<RawValue>)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if members.iter().any(|(k, _)| *k == key) {
                        return Err(A::Error::custom(format!("duplicate key `{key}`")));
                    }
                    let value: Box<RawValue> = map.next_value()?;
                    members.push((key, value));
                }
                Ok(RawObject(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// The canonical text of some raw members: keys sorted, values re-serialized without
/// insignificant whitespace, so two spellings of the same fields give the same cache key.
pub fn canonical(members: &[(&str, &RawValue)]) -> Result<String, serde_json::Error> {
    let mut map = serde_json::Map::new();
    for (k, v) in members {
        map.insert((*k).to_owned(), serde_json::from_str(v.get())?);
    }
    // serde_json::Map is a BTreeMap (no `preserve_order`), so keys come out sorted;
    // nested objects too.
    serde_json::to_string(&map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_members_in_order_and_raw() {
        let o: RawObject = serde_json::from_str(r#"{"b": [1, 2], "a":"x"}"#).unwrap();
        assert_eq!(o.0[0].0, "b");
        assert_eq!(o.0[0].1.get(), "[1, 2]");
        assert_eq!(o.get("a").map(RawValue::get), Some("\"x\""));
    }

    #[test]
    fn refuses_duplicate_keys() {
        let e = serde_json::from_str::<RawObject>(r#"{"a":1,"a":2}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate key `a`"));
    }

    #[test]
    fn canonical_ignores_order_and_whitespace() {
        let a: RawObject = serde_json::from_str(r#"{"y": {"q":1, "p":2}, "x": 1}"#).unwrap();
        let b: RawObject = serde_json::from_str(r#"{"x":1,"y":{"p":2,"q":1}}"#).unwrap();
        let ca = canonical(
            &a.0.iter()
                .map(|(k, v)| (k.as_str(), v.as_ref()))
                .collect::<Vec<_>>(),
        );
        let cb = canonical(
            &b.0.iter()
                .map(|(k, v)| (k.as_str(), v.as_ref()))
                .collect::<Vec<_>>(),
        );
        assert_eq!(ca.unwrap(), cb.unwrap());
    }
}
