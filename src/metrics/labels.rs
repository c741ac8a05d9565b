//! Every label value a metric can carry: one enum per label, each with its fixed set.

/// A metric label: its name and every value it takes.
pub(crate) trait Label: Copy + std::fmt::Debug + Send + Sync + 'static {
    /// The label's name in the exposition.
    const NAME: &'static str;
    /// Every value, in the order help texts list them.
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
    /// The value's position in [`Label::ALL`].
    fn index(self) -> usize;
}

/// Declares a label enum with its values and their exposition strings.
macro_rules! label {
    ($(#[$doc:meta])* $ty:ident, $name:literal, { $($(#[$vdoc:meta])* $variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub(crate) enum $ty {
            $($(#[$vdoc])* $variant),+
        }
        impl Label for $ty {
            const NAME: &'static str = $name;
            const ALL: &'static [Self] = &[$($ty::$variant),+];
            fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $s),+
                }
            }
            fn index(self) -> usize {
                // Variants are declared in the order `ALL` lists them.
                self as usize
            }
        }
    };
}

label!(
    /// The route of a client request: the cached query, or anything forwarded.
    Route, "route", {
        Query => "query",
        Other => "other",
    }
);

label!(
    /// `operator_type` of a query.
    OpLabel, "op", {
        AccountTokens => "account_tokens",
        TokenAccounts => "token_accounts",
    }
);

label!(
    /// How one distinct identifier of a query was found.
    LookupOutcome, "outcome", {
        Hit => "hit",
        NegativeHit => "negative_hit",
        /// Past its lifetime, served while one background fetch refreshes it.
        Stale => "stale",
        /// Not in this sidecar's cache, found fresh in the fleet's shared tier (Redis).
        SharedHit => "shared_hit",
        /// Not cached, but already being fetched: waited for that fetch.
        Coalesced => "coalesced",
        Miss => "miss",
        /// Not looked up: the credential has not been accepted by the upstream recently.
        Unverified => "unverified",
    }
);

label!(
    /// How a client request was served (the `cache` label of `tpns_cache_requests_total`).
    RequestOutcome, "cache", {
        /// Every identifier came from the cache: no upstream call.
        Hit => "hit",
        Partial => "partial",
        Miss => "miss",
        /// The credential was not yet verified: sent upstream whole.
        Unverified => "unverified",
        /// Not cacheable (another path, or a query the proxy cannot scope): forwarded unchanged.
        Bypass => "bypass",
        /// Refused by validation; nothing forwarded.
        Invalid => "invalid",
        /// The upstream failed or refused the call as a whole.
        UpstreamError => "upstream_error",
        /// The credential was refused by the upstream recently: answered 1008003 locally.
        Refused => "refused",
    }
);

label!(
    /// What a TPNS client makes of an answer: its `retCode` class where the proxy knows it, else
    /// its HTTP status class.
    RetClass, "class", {
        Ok => "ok",
        BatchPartial => "batch_partial",
        BatchFailed => "batch_failed",
        Invalid => "invalid",
        Auth => "auth",
        RateLimited => "rate_limited",
        UpstreamError => "upstream_error",
        Other => "other",
        Http2xx => "http_2xx",
        Http3xx => "http_3xx",
        Http4xx => "http_4xx",
        Http5xx => "http_5xx",
    }
);

impl RetClass {
    pub(crate) fn of_code(ret_code: i64) -> RetClass {
        use tpns_wire::code;
        match ret_code {
            code::OK => RetClass::Ok,
            code::BATCH_PARTLY_FAILED => RetClass::BatchPartial,
            code::BATCH_ALL_FAILED => RetClass::BatchFailed,
            code::UNPARSEABLE | code::MISSING_PARAMETER | code::INVALID_PARAMETER => {
                RetClass::Invalid
            }
            code::AUTH_FAILED | code::KEY_MISMATCH => RetClass::Auth,
            code::RATE_LIMITED => RetClass::RateLimited,
            code::INTERNAL_CALL_FAILED => RetClass::UpstreamError,
            _ => RetClass::Other,
        }
    }

    /// For a response whose body the proxy did not read.
    pub(crate) fn of_status(status: http::StatusCode) -> RetClass {
        match status.as_u16() {
            200..=299 => RetClass::Http2xx,
            300..=399 => RetClass::Http3xx,
            400..=499 => RetClass::Http4xx,
            _ => RetClass::Http5xx,
        }
    }
}

label!(
    /// The result of one upstream call.
    UpstreamOutcome, "outcome", {
        /// Answered with per-element results.
        Ok => "ok",
        /// Answered HTTP 200 with a whole-call failure code (auth, quota, …).
        Refused => "refused",
        /// A forwarded request was answered (pass-through; any status).
        Forwarded => "forwarded",
        Unreachable => "unreachable",
        Timeout => "timeout",
        HttpError => "http_error",
        Malformed => "malformed",
        /// Not sent: a quota or a cool-down refused it.
        RateLimited => "rate_limited",
        /// Not sent: the breaker is open.
        CircuitOpen => "circuit_open",
    }
);

label!(
    /// Why a query was forwarded unchanged and not cached.
    BypassReason, "reason", {
        /// No credentials at all, and no injection configured.
        NoCredentials => "no-credentials",
        /// Signature headers of an app whose key the proxy does not hold.
        Signature => "signature",
        /// An `Authorization` header that is not well-formed Basic.
        Unrecognized => "unrecognized-credentials",
        /// A `Content-Type` that is not JSON: the upstream judges it.
        ContentType => "content_type",
        /// Unknown fields larger than `limits.max_scope_bytes`: too large to key.
        ScopeTooLarge => "scope_too_large",
    }
);

label!(
    /// Why an entry past its lifetime was served.
    StaleReason, "reason", {
        /// Stale-while-revalidate: a background fetch refreshes it.
        Revalidate => "revalidate",
        /// Stale-if-error: the upstream could not answer.
        Error => "error",
    }
);

label!(
    /// Why an upstream call was not made for quota reasons.
    RejectReason, "reason", {
        QueueFull => "queue_full",
        MaxWait => "max_wait",
        /// The app (or the credential) is cooling down after an upstream 1008028.
        Cooldown => "cooldown",
        FleetQuota => "fleet_quota",
        /// The share of the quota for credentials not accepted yet is spent.
        UnverifiedShare => "unverified_share",
    }
);

label!(
    /// Why an entry left the in-process cache.
    EvictionCause, "cause", {
        Expired => "expired",
        Size => "size",
        Explicit => "explicit",
        Replaced => "replaced",
    }
);

label!(
    /// What dropped cache entries.
    InvalidationSource, "source", {
        Batchoperate => "batchoperate",
        /// The second invalidation of a write, `cache.invalidate_again_after` later.
        BatchoperateDelayed => "batchoperate_delayed",
        Admin => "admin",
        /// Published by another sidecar.
        Fleet => "fleet",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_distinct_and_listed() {
        fn check<L: Label>() {
            let all: Vec<&str> = L::ALL.iter().map(|l| l.as_str()).collect();
            let mut sorted = all.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), all.len(), "{}", L::NAME);
            // The typed families keep their series at these positions.
            for (i, l) in L::ALL.iter().enumerate() {
                assert_eq!(l.index(), i, "{} {}", L::NAME, l.as_str());
            }
        }
        check::<Route>();
        check::<OpLabel>();
        check::<LookupOutcome>();
        check::<RequestOutcome>();
        check::<RetClass>();
        check::<UpstreamOutcome>();
        check::<BypassReason>();
        check::<StaleReason>();
        check::<RejectReason>();
        check::<EvictionCause>();
        check::<InvalidationSource>();
        assert_eq!(RetClass::of_code(1_008_026), RetClass::BatchPartial);
        assert_eq!(
            RetClass::of_status(http::StatusCode::BAD_GATEWAY),
            RetClass::Http5xx
        );
    }
}
