//! The real binary: help texts, configuration errors (exit code 2), and a serve/SIGTERM cycle.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tpns-cache");

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("TPNS_CACHE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_for_every_subcommand() {
    for (args, needle) in [
        (vec!["--help"], "serve"),
        (vec!["serve", "--help"], "Run the proxy"),
        (vec!["demo", "--help"], "simulator"),
        (vec!["simulate", "--help"], "--fail-ratio"),
    ] {
        let (code, out, _) = run(&args, &[]);
        assert_eq!(code, 0, "{args:?}");
        assert!(out.contains(needle), "{args:?}: {out}");
    }
}

#[test]
fn invalid_env_value_exits_2_naming_the_key() {
    let (code, _, err) = run(&["serve"], &[("TPNS_CACHE_CACHE__TTL", "soon")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cache.ttl"), "{err}");
}

#[test]
fn unknown_key_in_file_exits_2_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("tpns-cache-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[upstream]\nmax_batchh = 3\n").unwrap();
    let (code, _, err) = run(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("max_batchh"), "{err}");
    let (code, _, err) = run(&["serve"], &[("TPNS_CACHE_CONFIG", file.to_str().unwrap())]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(&["--config", "/nonexistent.toml"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent.toml"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_values_are_all_reported() {
    let (code, _, err) = run(
        &["serve"],
        &[
            ("TPNS_CACHE_UPSTREAM__MAX_BATCH", "0"),
            ("TPNS_CACHE_UPSTREAM__URL", "ftp://nowhere"),
        ],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("upstream.max_batch") && err.contains("upstream.url"),
        "{err}"
    );
}

/// `check-config` loads exactly as `serve` does (file, environment, secrets): 0 for the shipped
/// configuration, 2 naming every problem otherwise; `--json` prints the effective settings.
#[test]
fn check_config_validates_like_serve() {
    let (code, out, err) = run(&["check-config", "config/tpns-cache.toml"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid"), "{out}");

    let dir = std::env::temp_dir().join(format!("tpns-cache-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:18080\"\nshutdown_grace = \"2500ms\"\n\
         [admin]\ntoken_file = \"/nonexistent/admin-token\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["check-config", file.to_str().unwrap()], &[]);
    assert_eq!(
        code, 2,
        "a missing secret file is refused as serve would: {err}"
    );
    assert!(err.contains("admin.token_file"), "{err}");

    let token = dir.join("admin-token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let env = [
        ("TPNS_CACHE_ADMIN__TOKEN_FILE", token.to_str().unwrap()),
        ("TPNS_CACHE_REDIS__URL", "redis://127.0.0.1:1/0"),
    ];
    let (code, out, err) = run(&["check-config", "--json", file.to_str().unwrap()], &env);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(v["listen"], "127.0.0.1:18080");
    assert_eq!(
        v["admin_listen"], "127.0.0.1:9090",
        "the default, from the binary"
    );
    assert_eq!(v["shutdown_grace_seconds"], 2.5);
    assert_eq!(v["admin_token"], true);
    assert_eq!(v["fleet"], true, "the environment layer applies");
    assert!(!out.contains("t0ken"), "never the secret itself: {out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What only the components can judge (the egress TLS roots and proxy route, the Redis target)
/// is reported by `check-config` and `serve` together with the values' own problems, in one
/// message, with exit code 2.
#[test]
fn component_checks_are_reported_with_the_rest() {
    let env = [
        ("TPNS_CACHE_UPSTREAM__TIMEOUT", "0s"),
        ("TPNS_CACHE_UPSTREAM__CA_FILE", "/no/such/ca.pem"),
        (
            "TPNS_CACHE_UPSTREAM__PROXY",
            "http://user:pw@proxy.invalid:3128",
        ),
        ("TPNS_CACHE_REDIS__URL", "redis://a:1,redis://b:2"),
    ];
    for cmd in ["check-config", "serve"] {
        let (code, _, err) = run(&[cmd], &env);
        assert_eq!(code, 2, "{cmd}: {err}");
        for key in [
            "upstream.timeout",
            "upstream.ca_file",
            "upstream.proxy",
            "redis.url",
        ] {
            assert!(err.contains(key), "{cmd}: {key} not named in: {err}");
        }
    }
}

/// Starts `serve` on ephemeral ports, reads the bound address from its log, checks it answers,
/// then sends SIGTERM and expects a clean exit.
#[test]
fn serve_answers_and_exits_0_on_sigterm() {
    let mut child = Command::new(BIN)
        .arg("serve")
        .env_remove("TPNS_CACHE_CONFIG")
        .env("TPNS_CACHE_LISTEN", "127.0.0.1:0")
        .env("TPNS_CACHE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("TPNS_CACHE_UPSTREAM__URL", "http://127.0.0.1:9")
        .env("TPNS_CACHE_LOG__FORMAT", "json")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut addr = None;
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if line.contains("tpns-cache ready") {
            let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
            addr = v["fields"]["listen"].as_str().map(str::to_owned);
            break;
        }
    }
    let addr = addr.expect("ready line with the listen address");
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = r#"{"operator_type":2}"#;
    write!(
        s,
        "POST /v3/device/account/query HTTP/1.1\r\nHost: x\r\nAuthorization: Basic YTpi\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("1008002"), "{resp}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert_eq!(st.code(), Some(0));
            break;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Listener addresses: `localhost` is loopback, other host names are explained; a port in use
/// names the key and the variable that move it.
#[test]
fn listen_addresses_and_ports_in_use_are_explained() {
    let (code, out, err) = run(
        &["check-config", "--json"],
        &[("TPNS_CACHE_LISTEN", "localhost:18081")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"listen\":\"127.0.0.1:18081\""), "{out}");
    let (code, _, err) = run(&["check-config"], &[("TPNS_CACHE_LISTEN", "myhost:8080")]);
    assert_eq!(code, 2);
    assert!(
        err.contains("listen") && err.contains("not an IP address and port"),
        "{err}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = run(
        &["serve"],
        &[
            ("TPNS_CACHE_LISTEN", "127.0.0.1:0"),
            ("TPNS_CACHE_ADMIN_LISTEN", addr.as_str()),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("in use")
            && err.contains("admin_listen")
            && err.contains("TPNS_CACHE_ADMIN_LISTEN"),
        "{err}"
    );
}

/// `simulate` shows its listen default, refuses a --config it would ignore, and logs the port
/// it really bound when given port 0; log lines carry no colour codes when stderr is not a
/// terminal.
#[test]
fn simulate_is_honest_about_its_options_and_its_port() {
    let (code, out, _) = run(&["simulate", "--help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("[default: 127.0.0.1:"), "{out}");
    let (code, _, err) = run(&["--config", "x.toml", "simulate"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("takes no --config"), "{err}");

    let mut child = Command::new(BIN)
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    let mut port = None;
    for line in BufReader::new(stderr).lines().take(20) {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if let Some(at) = line.find("127.0.0.1:") {
            let digits: String = line[at + 10..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(p) = digits.parse::<u16>() {
                if p != 0 {
                    port = Some(p);
                    break;
                }
            }
        }
    }
    let port = port.unwrap_or_else(|| panic!("no real port logged: {seen}"));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "it listens on {port}"
    );
    assert!(
        !seen.contains('\u{1b}'),
        "no ANSI escapes without a terminal: {seen:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
