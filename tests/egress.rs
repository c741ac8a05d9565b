//! The road to the real upstream: HTTPS to an access point whose certificate a private CA
//! signed (`upstream.ca_file`), and egress through a real HTTP CONNECT proxy (Debian's
//! `tinyproxy`, started on loopback by the test) with credentials from a file.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::pki::{tls_relay, Pki, TempDir};
use common::*;
use tpns_cache::config::Config;

/// The simulator's address, from the URL the harness gives the proxy by default.
fn sim_addr(c: &Config) -> SocketAddr {
    c.upstream
        .url
        .trim_start_matches("http://")
        .parse()
        .unwrap()
}

/// Points the proxy at the simulator behind TLS (a certificate signed by `pki`'s CA).
fn behind_tls(c: &mut Config, pki: &Pki) -> SocketAddr {
    let relay = tls_relay(pki, sim_addr(c));
    c.upstream.url = format!("https://{relay}");
    relay
}

const BODY: &str = r#"{"operator_type":1,"account_list":[{"account":"account1"}]}"#;

#[tokio::test]
async fn https_upstream_with_a_private_ca() {
    let pki = Pki::new("upstream-tls");
    // Without the CA the upstream's certificate is not trusted: nothing is answered from it.
    let untrusted = Harness::with(sim_config(), |c| {
        behind_tls(c, &pki);
    })
    .await;
    let r = untrusted.query(BODY).await;
    assert_eq!(r.status, 502, "{}", r.body_text());
    assert_eq!(r.ret_code(), 1_008_004);
    assert_eq!(
        untrusted.upstream_queries(),
        0,
        "no request reached the simulator"
    );

    // With upstream.ca_file the same upstream answers, and the answer is cached.
    let trusted = Harness::with(sim_config(), |c| {
        behind_tls(c, &pki);
        c.upstream.ca_file = Some(pki.ca_file.clone());
    })
    .await;
    let direct = trusted.direct(BODY).await;
    let first = trusted.query(BODY).await;
    assert_eq!(first.status, 200, "{}", first.body_text());
    assert_eq!(first.json(), direct.json());
    let again = trusted.query(BODY).await;
    assert_eq!(again.json(), direct.json());
    assert!(
        again.cache_status().contains("; hit;"),
        "{}",
        again.cache_status()
    );
}

/// tinyproxy on a free loopback port, requiring Basic credentials, logging to a file.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: TempDir,
}

impl Tinyproxy {
    fn start(user: &str, password: &str) -> Tinyproxy {
        let dir = TempDir::new("tinyproxy");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.0.join("tinyproxy.log");
        let conf = dir.file(
            "tinyproxy.conf",
            &format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 50\nAllow 127.0.0.1\n\
                 BasicAuth {user} {password}\nLogLevel Info\nLogFile \"{}\"\n",
                log.display()
            ),
        );
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy is installed (apt-get install tinyproxy; .ci/run does it)");
        let up = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "tinyproxy did not start listening on {port}");
        Tinyproxy {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn egress_through_a_connect_proxy_with_credentials_from_a_file() {
    let pki = Pki::new("egress");
    let tinyproxy = Tinyproxy::start("egress", "s3cret-proxy-pw");
    let auth = pki.dir.file("proxy-auth", "egress:s3cret-proxy-pw\n");
    let mut relay = None;
    let h = Harness::with(sim_config(), |c| {
        relay = Some(behind_tls(c, &pki));
        c.upstream.ca_file = Some(pki.ca_file.clone());
        c.upstream.proxy = format!("http://127.0.0.1:{}", tinyproxy.port);
        c.upstream.proxy_auth_file = Some(auth.clone());
    })
    .await;
    let direct = h.direct(BODY).await;
    let r = h.query(BODY).await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json(), direct.json());
    let relay = relay.unwrap();
    let log = tinyproxy.log();
    assert!(
        log.contains(&format!("CONNECT {relay}")),
        "the upstream connection went through the proxy's CONNECT: {log}"
    );
    // A pass-through path takes the same road.
    let push = h.push(Some(APP), r#"{"audience_type":"all","message_type":"notify","message":{"title":"t","content":"c"}}"#).await;
    assert_eq!(push.status, 200, "{}", push.body_text());

    // Wrong proxy credentials: the proxy refuses the tunnel, the client gets a TPNS-shaped 502.
    let wrong = pki.dir.file("wrong-auth", "egress:not-the-password\n");
    let refused = Harness::with(sim_config(), |c| {
        behind_tls(c, &pki);
        c.upstream.ca_file = Some(pki.ca_file.clone());
        c.upstream.proxy = format!("http://127.0.0.1:{}", tinyproxy.port);
        c.upstream.proxy_auth_file = Some(wrong.clone());
    })
    .await;
    let r = refused.query(BODY).await;
    assert_eq!(r.status, 502, "{}", r.body_text());
    assert_eq!(r.ret_code(), 1_008_004);
    assert!(!r.body_text().contains("not-the-password"));
    assert_eq!(refused.upstream_queries(), 0);
}
