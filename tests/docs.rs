//! The documentation stays in step with the code: the configuration and metrics tables in
//! `docs/` list exactly what the binary has, and every relative link in the Markdown files
//! resolves to a file of this repository (nothing points outside it).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn doc(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap()
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

/// The first cell of each table row that starts with a code span: `| `name` |`.
fn table_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |").map(|(name, _)| name.to_owned()))
        .collect()
}

#[test]
fn every_config_key_is_in_the_configuration_table_with_its_env_name() {
    let table = doc("docs/configuration.md");
    let mut keys = Vec::new();
    flatten(
        "",
        &serde_json::to_value(tpns_cache::config::Config::default()).unwrap(),
        &mut keys,
    );
    keys.push("upstream.region".to_owned());
    assert!(keys.len() > 20);
    for key in &keys {
        let env = format!("TPNS_CACHE_{}", key.to_uppercase().replace('.', "__"));
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| `{key}` |")))
            .unwrap_or_else(|| panic!("docs/configuration.md has no row for `{key}`"));
        assert!(
            row.contains(&format!("`{env}`")),
            "row for {key} lacks {env}: {row}"
        );
    }
    // Optional keys (unset by default) are not in the serialized defaults: they must at least
    // be shown, commented out, in their section of the shipped config/tpns-cache.toml.
    let shipped = doc("config/tpns-cache.toml");
    for name in table_names(&table) {
        let shown_as_table = [format!("# [{name}]"), format!("# [[{name}]]")]
            .iter()
            .any(|t| shipped.contains(t.as_str()));
        if keys.contains(&name) || shown_as_table {
            continue;
        }
        let (section, leaf) = name.rsplit_once('.').unwrap_or(("", &name));
        let in_section = shipped
            .split("\n[")
            .find(|s| s.starts_with(&format!("{section}]")))
            .unwrap_or_else(|| panic!("`{name}`: no [{section}] in config/tpns-cache.toml"));
        assert!(
            in_section.contains(&format!("# {leaf} =")),
            "docs/configuration.md documents `{name}`, which is neither a configuration key nor \
             shown in config/tpns-cache.toml"
        );
    }
}

#[test]
fn every_metric_is_in_the_metrics_table() {
    let table = doc("docs/metrics.md");
    let families = common::metric_families();
    assert!(families.len() >= 18, "{}", families.len());
    for name in &families {
        assert!(
            table.contains(&format!("| `{name}` |")),
            "docs/metrics.md lacks `{name}`"
        );
    }
    // (The status.json table below it lists JSON keys, not metrics.)
    for name in table_names(&table)
        .into_iter()
        .filter(|n| n.starts_with("tpns_cache_"))
    {
        assert!(
            families.contains(&name),
            "docs/metrics.md documents `{name}`, which the binary does not register"
        );
    }
}

/// Markdown link targets: `](target)`.
fn links(text: &str) -> Vec<String> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(t, _)| t.to_owned()))
        .collect()
}

#[test]
fn relative_links_stay_inside_the_repository() {
    let root = PathBuf::from(ROOT).canonicalize().unwrap();
    let mut files = vec![
        "README.md",
        "ARCHITECTURE.md",
        "BENCHMARKS.md",
        "deploy/README.md",
    ]
    .into_iter()
    .map(|f| root.join(f))
    .collect::<Vec<_>>();
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("../shared"),
            "{} points at ../shared, which a clone does not have",
            file.display()
        );
        for target in links(&text) {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let path = target.split('#').next().unwrap();
            if path.is_empty() {
                continue;
            }
            let resolved = file.parent().unwrap().join(path);
            let resolved = resolved.canonicalize().unwrap_or_else(|_| {
                panic!("{}: link `{target}` resolves to nothing", file.display())
            });
            assert!(
                resolved.starts_with(&root),
                "{}: link `{target}` leaves the repository",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} links checked");
}
