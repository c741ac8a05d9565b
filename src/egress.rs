//! How the proxy reaches the upstream: which TLS roots it trusts (the built-in web PKI roots
//! plus `upstream.ca_file`), and whether it goes through an HTTP CONNECT proxy
//! (`upstream.proxy`). Both are decided once, from the configuration, when the client is built;
//! `check-config` runs the same code, so a bad CA file or proxy URL stops start-up with the key
//! named.

use std::error::Error as StdError;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;

use crate::config::{read_secret, UpstreamConfig};

/// What is wrong with the egress settings (TLS roots, the proxy route): building them is the
/// check, so `check-config` and start-up refuse exactly what would fail later.
pub(crate) fn problems(cfg: &UpstreamConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(why) = tls_config(cfg) {
        problems.push(why);
    }
    if let Ok(uri) = cfg.url.parse::<http::Uri>() {
        if let Err(why) = proxy_route(cfg, &uri, |v| std::env::var(v).ok()) {
            problems.push(why);
        }
    }
    problems
}

/// The TLS client configuration for the upstream: web PKI roots, plus every certificate of
/// `upstream.ca_file` (private PKI, or a TLS-inspecting egress proxy's CA).
pub(crate) fn tls_config(cfg: &UpstreamConfig) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = &cfg.ca_file {
        let added = add_pem_roots(&mut roots, path)?;
        tracing::debug!(file = %path.display(), added, "extra upstream CA certificates");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("upstream TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Adds every certificate of the PEM file at `path`; an unreadable file, a file without a
/// certificate, or one rustls refuses is an error naming `upstream.ca_file`.
fn add_pem_roots(roots: &mut rustls::RootCertStore, path: &Path) -> Result<usize, String> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("upstream.ca_file: cannot read {shown}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("upstream.ca_file: {shown}: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "upstream.ca_file: {shown} holds no PEM certificate"
        ));
    }
    let count = certs.len();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("upstream.ca_file: {shown}: {e}"))?;
    }
    Ok(count)
}

/// Where connections to the upstream go: straight to it, or through a CONNECT proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProxyRoute {
    /// The proxy (`http://host:port`).
    pub(crate) uri: Uri,
    /// `Proxy-Authorization` for the CONNECT request, if the proxy wants credentials.
    pub(crate) auth: Option<HeaderValue>,
}

/// The proxy for `upstream`, if any. `upstream.proxy`: `""` none; `"env"` the conventional
/// variables (`HTTPS_PROXY`/`https_proxy` for an `https://` upstream, `HTTP_PROXY`/
/// `http_proxy` for `http://`, `ALL_PROXY`/`all_proxy` for both, and `NO_PROXY`/`no_proxy`,
/// with curl's rules), read through `var`; otherwise the URL of an HTTP proxy. Credentials come
/// from `upstream.proxy_auth_file` or `upstream.proxy_auth_env` (`user:password`), or, in `env`
/// mode, from the variable's URL; never from the TOML.
pub(crate) fn proxy_route(
    cfg: &UpstreamConfig,
    upstream: &Uri,
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<ProxyRoute>, String> {
    let first = |names: &[&str]| names.iter().find_map(|n| var(n)).unwrap_or_default();
    let matcher = match cfg.proxy.as_str() {
        "" => return Ok(None),
        "env" => Matcher::builder()
            .all(first(&["ALL_PROXY", "all_proxy"]))
            .http(first(&["HTTP_PROXY", "http_proxy"]))
            .https(first(&["HTTPS_PROXY", "https_proxy"]))
            .no(first(&["NO_PROXY", "no_proxy"]))
            .build(),
        url => {
            let uri: Uri = url
                .parse()
                .map_err(|e| format!("upstream.proxy: not a URL ({e}): {url}"))?;
            if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
                return Err(
                    "upstream.proxy: credentials do not belong in the URL; put \
                            `user:password` in upstream.proxy_auth_file or upstream.proxy_auth_env"
                        .to_owned(),
                );
            }
            Matcher::builder().all(url.to_owned()).build()
        }
    };
    let Some(intercept) = matcher.intercept(upstream) else {
        return Ok(None); // NO_PROXY names the upstream, or no variable is set
    };
    let uri = intercept.uri().clone();
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!(
            "upstream.proxy: {} is not an http:// proxy (HTTPS and SOCKS proxies are not \
             supported; CONNECT over plain HTTP carries the upstream's TLS end to end)",
            without_credentials(&uri)
        ));
    }
    let from_secret = read_secret(
        "upstream.proxy_auth",
        cfg.proxy_auth_file.as_deref(),
        cfg.proxy_auth_env.as_deref(),
    )?;
    let auth = match from_secret {
        Some(secret) => {
            let Some((user, password)) = secret.expose().split_once(':') else {
                return Err("upstream.proxy_auth: must be `user:password`".to_owned());
            };
            let value = tpns_wire::basic::encode(user, password);
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| "upstream.proxy_auth: not a valid header value".to_owned())?;
            value.set_sensitive(true);
            Some(value)
        }
        None => intercept.basic_auth().cloned(),
    };
    Ok(Some(ProxyRoute { uri, auth }))
}

/// `scheme://host:port` of a proxy URI, for messages (never its credentials).
fn without_credentials(uri: &Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("?"),
        uri.host().unwrap_or("?"),
        uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default()
    )
}

/// The TCP connector under TLS: direct, or a CONNECT tunnel through the proxy.
#[derive(Clone, Debug)]
pub(crate) enum Connector {
    Direct(HttpConnector),
    Tunnel(Tunnel<HttpConnector>),
}

impl Connector {
    pub(crate) fn new(http: HttpConnector, route: Option<ProxyRoute>) -> Connector {
        match route {
            None => Connector::Direct(http),
            Some(route) => {
                let tunnel = Tunnel::new(route.uri, http);
                Connector::Tunnel(match route.auth {
                    Some(auth) => tunnel.with_auth(auth),
                    None => tunnel,
                })
            }
        }
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;
type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Connector::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Connector::Tunnel(c) => c.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: Uri) -> Connecting {
        match self {
            Connector::Direct(c) => {
                let connecting = c.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
            Connector::Tunnel(c) => {
                let connecting = c.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(proxy: &str) -> UpstreamConfig {
        let mut c = crate::config::Config::default().upstream;
        c.proxy = proxy.to_owned();
        c
    }

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    const TPNS: &str = "https://api.tpns.tencent.com";

    #[test]
    fn no_proxy_unless_configured() {
        let none = env(&[("HTTPS_PROXY", "http://proxy:3128")]);
        assert_eq!(
            proxy_route(&cfg(""), &Uri::from_static(TPNS), none),
            Ok(None)
        );
    }

    #[test]
    fn explicit_proxy_url() {
        let route = proxy_route(
            &cfg("http://egress:3128"),
            &Uri::from_static(TPNS),
            env(&[]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(route.uri, Uri::from_static("http://egress:3128/"));
        assert_eq!(route.auth, None);
    }

    #[test]
    fn explicit_proxy_refuses_credentials_in_the_url_and_other_schemes() {
        let err = proxy_route(
            &cfg("http://u:p@egress:3128"),
            &Uri::from_static(TPNS),
            env(&[]),
        )
        .unwrap_err();
        assert!(err.contains("proxy_auth_file"), "{err}");
        assert!(!err.contains("u:p"), "never echo the credentials: {err}");
        let err = proxy_route(
            &cfg("socks5://egress:1080"),
            &Uri::from_static(TPNS),
            env(&[]),
        )
        .unwrap_err();
        assert!(err.contains("not an http:// proxy"), "{err}");
    }

    #[test]
    fn env_mode_follows_the_conventional_variables() {
        let https = Uri::from_static(TPNS);
        let http = Uri::from_static("http://127.0.0.1:9000");
        let vars = [
            ("https_proxy", "http://user:pw@secure-egress:3128"),
            ("HTTP_PROXY", "http://plain-egress:3128"),
            ("NO_PROXY", "localhost, .internal, 10.0.0.0/8"),
        ];
        let route = proxy_route(&cfg("env"), &https, env(&vars))
            .unwrap()
            .unwrap();
        assert_eq!(route.uri.host(), Some("secure-egress"));
        assert_eq!(
            route.auth.as_ref().map(|v| v.to_str().unwrap().to_owned()),
            Some(tpns_wire::basic::encode("user", "pw"))
        );
        let route = proxy_route(&cfg("env"), &http, env(&vars))
            .unwrap()
            .unwrap();
        assert_eq!(route.uri.host(), Some("plain-egress"));
        for excluded in [
            "https://tpns.internal",
            "https://10.1.2.3:443",
            "http://localhost:1",
        ] {
            let uri: Uri = excluded.parse().unwrap();
            assert_eq!(
                proxy_route(&cfg("env"), &uri, env(&vars)),
                Ok(None),
                "{excluded}"
            );
        }
        assert_eq!(proxy_route(&cfg("env"), &https, env(&[])), Ok(None));
    }

    #[test]
    fn credentials_from_a_file_win_and_are_checked() {
        let dir = std::env::temp_dir().join(format!("tpns-egress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("auth");
        std::fs::write(&file, "svc:s3cret\n").unwrap();
        let mut c = cfg("http://egress:3128");
        c.proxy_auth_file = Some(file.clone());
        let route = proxy_route(&c, &Uri::from_static(TPNS), env(&[]))
            .unwrap()
            .unwrap();
        let auth = route.auth.unwrap();
        assert!(auth.is_sensitive());
        assert_eq!(
            auth.to_str().unwrap(),
            tpns_wire::basic::encode("svc", "s3cret")
        );
        std::fs::write(&file, "no-colon\n").unwrap();
        let err = proxy_route(&c, &Uri::from_static(TPNS), env(&[])).unwrap_err();
        assert!(
            err.contains("user:password") && !err.contains("no-colon"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ca_file_problems_name_the_key() {
        let mut c = cfg("");
        c.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(tls_config(&c)
            .unwrap_err()
            .starts_with("upstream.ca_file: cannot read"));
        let dir = std::env::temp_dir().join(format!("tpns-egress-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        c.ca_file = Some(empty);
        assert!(tls_config(&c)
            .unwrap_err()
            .contains("holds no PEM certificate"));
        std::fs::remove_dir_all(&dir).unwrap();
        c.ca_file = None;
        assert!(tls_config(&c).is_ok());
    }
}
