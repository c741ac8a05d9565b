//! Loading and validation, through the binary's own layers (defaults < file < environment).

// figment's Jail closures return its (large) error type by design.
#![allow(clippy::result_large_err)]

use super::*;
use figment::Jail;

#[test]
fn defaults_are_valid() {
    let c = Config::default();
    c.validate().expect("defaults validate");
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
}

/// `config/tpns-cache.toml` lists every key (it parses without defaults) and equals them.
#[test]
fn shipped_toml_equals_builtin_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tpns-cache.toml");
    let from_file: Config = Figment::from(Toml::file_exact(&path))
        .extract()
        .expect("shipped config parses on its own, with every key present");
    assert_eq!(from_file, Config::default());
}

#[test]
fn env_overrides_file_overrides_defaults() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            "listen = \"127.0.0.1:7000\"\n[cache]\nttl = \"45s\"\nnegative_ttl = \"3s\"\n",
        )?;
        jail.set_env("TPNS_CACHE_LISTEN", "127.0.0.1:7070");
        jail.set_env("TPNS_CACHE_UPSTREAM__URL", "http://127.0.0.1:9000");
        jail.set_env("TPNS_CACHE_CACHE__TTL", "30s");
        jail.set_env("TPNS_CACHE_UPSTREAM__MAX_BATCH", "20");
        let c = Config::load(Some(Path::new("c.toml"))).expect("loads");
        assert_eq!(c.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(c.upstream.url, "http://127.0.0.1:9000");
        assert_eq!(c.cache.ttl, Duration::from_secs(30));
        assert_eq!(c.cache.negative_ttl, Duration::from_secs(3));
        assert_eq!(c.upstream.max_batch, 20);
        assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        Ok(())
    });
}

#[test]
fn config_file_from_env_variable() {
    Jail::expect_with(|jail| {
        jail.create_file("x.toml", "[upstream]\nmax_batch = 7\n")?;
        jail.set_env(ENV_CONFIG_FILE, "x.toml");
        let c = Config::load(None).expect("loads");
        assert_eq!(c.upstream.max_batch, 7);
        Ok(())
    });
}

#[test]
fn unknown_key_is_named() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", "[cache]\nttl = \"1s\"\nttl_secs = 5\n")?;
        let err = Config::load(Some(Path::new("c.toml"))).expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("ttl_secs"), "{msg}");
        assert!(msg.contains("cache"), "{msg}");
        Ok(())
    });
}

#[test]
fn unknown_env_key_is_named() {
    Jail::expect_with(|jail| {
        jail.set_env("TPNS_CACHE_UPSTREAM__URLL", "http://x");
        let msg = Config::load(None).expect_err("must fail").to_string();
        assert!(msg.contains("urll"), "{msg}");
        Ok(())
    });
}

#[test]
fn invalid_values_are_all_reported_by_key() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            "[upstream]\nurl = \"ftp://x\"\nmax_batch = 0\n[cache]\nttl = \"0s\"\n",
        )?;
        let msg = Config::load(Some(Path::new("c.toml")))
            .expect_err("must fail")
            .to_string();
        for key in ["upstream.url", "upstream.max_batch", "cache.ttl"] {
            assert!(msg.contains(key), "{key} missing in {msg}");
        }
        Ok(())
    });
}

/// Regression: lifetimes had no upper bound, so adding one to a clock could overflow.
#[test]
fn huge_durations_are_refused_by_key() {
    Jail::expect_with(|jail| {
        jail.set_env("TPNS_CACHE_CACHE__TTL", "100000000y");
        jail.set_env("TPNS_CACHE_CACHE__STALE_IF_ERROR", "1000y");
        jail.set_env("TPNS_CACHE_SHIELD__MAX_WAIT", "2h");
        let msg = Config::load(None).expect_err("must fail").to_string();
        for key in ["cache.ttl", "cache.stale_if_error", "shield.max_wait"] {
            assert!(msg.contains(key), "{key} missing in {msg}");
        }
        Ok(())
    });
}

#[test]
fn wrong_type_names_the_key() {
    Jail::expect_with(|jail| {
        jail.set_env("TPNS_CACHE_CACHE__TTL", "soon");
        let msg = Config::load(None).expect_err("must fail").to_string();
        assert!(msg.contains("cache.ttl"), "{msg}");
        Ok(())
    });
}

#[test]
fn region_shorthand() {
    Jail::expect_with(|jail| {
        jail.set_env("TPNS_CACHE_UPSTREAM__REGION", "hk");
        let c = Config::load(None).expect("loads");
        assert_eq!(c.upstream.url, "https://api.tpns.hk.tencent.com");
        jail.set_env("TPNS_CACHE_UPSTREAM__URL", "http://127.0.0.1:1");
        let msg = Config::load(None).expect_err("both set").to_string();
        assert!(msg.contains("upstream.region"), "{msg}");
        Ok(())
    });
}

#[test]
fn admin_token_from_file_or_env_never_printed() {
    Jail::expect_with(|jail| {
        jail.create_file("token", "s3cr3t-token\n")?;
        jail.set_env("TPNS_CACHE_ADMIN__TOKEN_FILE", "token");
        let c = Config::load(None).expect("loads");
        let t = c.admin_token().expect("reads").expect("set");
        assert_eq!(t.expose(), "s3cr3t-token");
        assert!(t.matches(b"s3cr3t-token") && !t.matches(b"s3cr3t-tokex"));
        assert!(!format!("{t:?}").contains("s3cr3t"));
        jail.set_env("TPNS_CACHE_ADMIN__TOKEN_FILE", "missing");
        let msg = Config::load(None).expect_err("missing file").to_string();
        assert!(msg.contains("admin.token_file"), "{msg}");
        Ok(())
    });
}

#[test]
fn missing_file_is_an_error() {
    let err = Config::load(Some(Path::new("/nonexistent/tpns.toml"))).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/tpns.toml"));
}
