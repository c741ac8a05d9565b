//! `Cache-Status` (RFC 9211): what the cache did with a request, as a typed value rendered in
//! one place. Every value the proxy can send is listed in `docs/behaviour.md` (a test checks it).

use http::HeaderValue;

use crate::metrics::labels::BypassReason;
use crate::metrics::Label;

/// Our cache's name in `Cache-Status`.
pub(crate) const CACHE_NAME: &str = "tpns-cache";

/// How many distinct identifiers came from where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Served {
    /// Answered from the cache (fresh, stale, or shared).
    pub(crate) from_cache: usize,
    pub(crate) total: usize,
    /// Of those, past their lifetime.
    pub(crate) stale: usize,
    /// Stale ones stood in because the upstream could not answer (stale-if-error).
    pub(crate) upstream_unavailable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheStatus {
    /// Every identifier from the cache: `hit; detail="hit 3/3"`.
    Hit(Served),
    /// Some from the cache, the rest fetched: `fwd=partial; detail="hit 2/3"`.
    Partial(Served),
    /// All fetched: `fwd=miss; detail="hit 0/3"`.
    Miss(Served),
    /// A credential the upstream has not accepted yet: the request went upstream whole.
    Unverified,
    /// A credential the upstream refused recently: answered `1008003` here.
    Refused,
    /// Not the cache's to serve: forwarded unchanged.
    Bypass(BypassReason),
    /// Forwarded unchanged on a path the proxy does not cache: `fwd=bypass`.
    Forwarded,
    /// Refused here before anything was forwarded: `fwd=bypass; detail="<error kind>"`.
    Invalid(&'static str),
    /// The upstream refused the call as a whole; its answer is passed on.
    UpstreamRefused,
    /// The upstream could not answer the cached query: `fwd=miss; detail="upstream error"`.
    UpstreamError,
    /// The upstream could not answer a forwarded request: `fwd=bypass; detail="upstream error"`.
    ForwardFailed,
}

impl CacheStatus {
    /// The parameters after `tpns-cache; ` (the docs' check lists them).
    #[cfg(test)]
    pub(crate) fn params(&self) -> String {
        let mut out = String::with_capacity(64);
        self.write_params(&mut out);
        out
    }

    /// Writes the parameters into `out` (one buffer for the whole header, no intermediate
    /// strings: this runs for every response).
    fn write_params(&self, out: &mut String) {
        use std::fmt::Write as _;
        let served = |out: &mut String, s: &Served| {
            let _ = write!(out, "hit {}/{}", s.from_cache, s.total);
            if s.stale > 0 {
                let _ = write!(out, ", stale {}", s.stale);
            }
            if s.upstream_unavailable {
                out.push_str(", upstream unavailable");
            }
            out.push('"');
        };
        match self {
            CacheStatus::Hit(s) => {
                out.push_str("hit; detail=\"");
                served(out, s);
            }
            CacheStatus::Partial(s) => {
                out.push_str("fwd=partial; detail=\"");
                served(out, s);
            }
            CacheStatus::Miss(s) => {
                out.push_str("fwd=miss; detail=\"");
                served(out, s);
            }
            CacheStatus::Unverified => {
                out.push_str("fwd=request; detail=\"credential not yet verified\"")
            }
            CacheStatus::Refused => out.push_str("hit; detail=\"credential refused\""),
            CacheStatus::Bypass(reason) => {
                let _ = write!(out, "fwd=bypass; detail=\"{}\"", reason.as_str());
            }
            CacheStatus::Forwarded => out.push_str("fwd=bypass"),
            CacheStatus::Invalid(kind) => {
                let _ = write!(out, "fwd=bypass; detail=\"{kind}\"");
            }
            CacheStatus::UpstreamRefused => out.push_str("fwd=miss; detail=\"upstream refused\""),
            CacheStatus::UpstreamError => out.push_str("fwd=miss; detail=\"upstream error\""),
            CacheStatus::ForwardFailed => out.push_str("fwd=bypass; detail=\"upstream error\""),
        }
    }

    /// The header value: `tpns-cache; <params>`, built in one buffer that becomes the value.
    pub(crate) fn header(&self) -> HeaderValue {
        let mut out = String::with_capacity(64);
        out.push_str(CACHE_NAME);
        out.push_str("; ");
        self.write_params(&mut out);
        HeaderValue::try_from(out).unwrap_or_else(|_| HeaderValue::from_static(CACHE_NAME))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_value() {
        let s = |from_cache, stale, upstream_unavailable| Served {
            from_cache,
            total: 3,
            stale,
            upstream_unavailable,
        };
        for (status, text) in [
            (
                CacheStatus::Hit(s(3, 0, false)),
                r#"tpns-cache; hit; detail="hit 3/3""#,
            ),
            (
                CacheStatus::Hit(s(3, 1, false)),
                r#"tpns-cache; hit; detail="hit 3/3, stale 1""#,
            ),
            (
                CacheStatus::Hit(s(3, 2, true)),
                r#"tpns-cache; hit; detail="hit 3/3, stale 2, upstream unavailable""#,
            ),
            (
                CacheStatus::Partial(s(2, 0, false)),
                r#"tpns-cache; fwd=partial; detail="hit 2/3""#,
            ),
            (
                CacheStatus::Miss(s(0, 0, false)),
                r#"tpns-cache; fwd=miss; detail="hit 0/3""#,
            ),
            (
                CacheStatus::Unverified,
                r#"tpns-cache; fwd=request; detail="credential not yet verified""#,
            ),
            (
                CacheStatus::Refused,
                r#"tpns-cache; hit; detail="credential refused""#,
            ),
            (
                CacheStatus::Bypass(BypassReason::ContentType),
                r#"tpns-cache; fwd=bypass; detail="content_type""#,
            ),
            (CacheStatus::Forwarded, "tpns-cache; fwd=bypass"),
            (
                CacheStatus::Invalid("invalid_parameter"),
                r#"tpns-cache; fwd=bypass; detail="invalid_parameter""#,
            ),
            (
                CacheStatus::UpstreamRefused,
                r#"tpns-cache; fwd=miss; detail="upstream refused""#,
            ),
            (
                CacheStatus::UpstreamError,
                r#"tpns-cache; fwd=miss; detail="upstream error""#,
            ),
            (
                CacheStatus::ForwardFailed,
                r#"tpns-cache; fwd=bypass; detail="upstream error""#,
            ),
        ] {
            assert_eq!(status.header().to_str().unwrap(), text);
        }
    }

    /// Every value the proxy can send is in the documentation's Cache-Status table.
    #[test]
    fn every_value_is_documented() {
        use crate::api::error::ClientError;
        use std::time::Duration;
        let docs = include_str!("../../docs/behaviour.md");
        let table = &docs[docs
            .find("## Cache-Status")
            .expect("a Cache-Status section")..];
        let served = Served {
            from_cache: 2,
            total: 3,
            stale: 0,
            upstream_unavailable: false,
        };
        let kinds = [
            ClientError::Unparseable(String::new()),
            ClientError::MissingParameter("x"),
            ClientError::InvalidParameter(String::new()),
            ClientError::BodyTooLarge { limit: 1 },
            ClientError::ClientBody(String::new()),
            ClientError::ClientTimeout(Duration::from_secs(1)),
            ClientError::AuthFailed("x"),
            ClientError::Overloaded("x"),
        ]
        .map(|e| CacheStatus::Invalid(e.class().kind));
        let mut all = vec![
            CacheStatus::Hit(Served {
                from_cache: 3,
                ..served
            }),
            CacheStatus::Partial(served),
            CacheStatus::Miss(Served {
                from_cache: 0,
                ..served
            }),
            CacheStatus::Unverified,
            CacheStatus::Refused,
            CacheStatus::Forwarded,
            CacheStatus::UpstreamRefused,
            CacheStatus::UpstreamError,
            CacheStatus::ForwardFailed,
        ];
        all.extend(BypassReason::ALL.iter().map(|r| CacheStatus::Bypass(*r)));
        all.extend(kinds);
        for status in all {
            let params = status.params();
            // A detail listed among several ("a", "b") is documented by its quoted value.
            let documented = table.contains(&format!("`{params}`"))
                || params.split_once("detail=").is_some_and(|(head, detail)| {
                    table.contains(&format!("`{head}detail={detail}`"))
                        || (head == "fwd=bypass; " && table.contains(&format!("`{detail}`")))
                });
            assert!(
                documented,
                "docs/behaviour.md lacks Cache-Status `{params}`"
            );
        }
        for suffix in [", stale 1`", ", stale 2, upstream unavailable`"] {
            assert!(
                table.contains(suffix),
                "docs lack the detail suffix {suffix}"
            );
        }
    }
}
