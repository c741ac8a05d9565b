//! The README's configuration and metrics tables stay in step with the code.

#![allow(clippy::unwrap_used)]

mod common;

use serde_json::Value;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

#[test]
fn every_config_key_is_in_the_readme_table_with_its_env_name() {
    let readme = readme();
    let mut keys = Vec::new();
    flatten(
        "",
        &serde_json::to_value(tpns_cache::config::Config::default()).unwrap(),
        &mut keys,
    );
    keys.push("upstream.region".to_owned());
    assert!(keys.len() > 20);
    for key in keys {
        let env = format!("TPNS_CACHE_{}", key.to_uppercase().replace('.', "__"));
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{key}` |")))
            .unwrap_or_else(|| panic!("README has no configuration row for `{key}`"));
        assert!(
            row.contains(&format!("`{env}`")),
            "row for {key} lacks {env}: {row}"
        );
    }
}

#[test]
fn every_metric_is_in_the_readme_table() {
    let readme = readme();
    let families = common::metric_families();
    assert!(families.len() >= 18, "{}", families.len());
    for name in families {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "README metrics table lacks `{name}`"
        );
    }
}
