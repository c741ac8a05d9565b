//! What the upstream said of the credentials it saw: accepted recently (their requests may be
//! served from the cache), or refused recently (answered 1008003 locally, never sent again
//! until `auth.refused_ttl` passes). Credentials are remembered only as keyed fingerprints (see
//! [`crate::proxy::auth`]); clients choose them, so both sets are bounded (moka evicts).

use std::time::Duration;

/// A keyed hash (HMAC-SHA256 under a key drawn at start-up) of one credential.
pub(crate) type Fingerprint = [u8; 32];

pub(crate) struct Trust {
    accepted: moka::sync::Cache<Fingerprint, ()>,
    refused: moka::sync::Cache<Fingerprint, ()>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("accepted", &self.accepted.entry_count())
            .field("refused", &self.refused.entry_count())
            .finish()
    }
}

impl Trust {
    /// `accepted_max` credentials remembered as accepted for `accepted_ttl`; `refused_max` as
    /// refused for `refused_ttl`.
    pub(crate) fn new(
        accepted_ttl: Duration,
        accepted_max: u64,
        refused_ttl: Duration,
        refused_max: u64,
    ) -> Trust {
        let set = |ttl: Duration, max: u64| {
            moka::sync::Cache::builder()
                .max_capacity(max)
                .time_to_live(ttl.max(Duration::from_millis(1)))
                .build()
        };
        Trust {
            accepted: set(accepted_ttl, accepted_max),
            refused: set(refused_ttl, refused_max),
        }
    }

    pub(crate) fn is_accepted(&self, fp: &Fingerprint) -> bool {
        self.accepted.contains_key(fp)
    }

    pub(crate) fn accept(&self, fp: Fingerprint) {
        self.accepted.insert(fp, ());
    }

    /// The upstream refused this credential: stop serving it from cache at once, and answer it
    /// locally for a while.
    pub(crate) fn refuse(&self, fp: Fingerprint) {
        self.accepted.invalidate(&fp);
        self.refused.insert(fp, ());
    }

    pub(crate) fn is_refused(&self, fp: &Fingerprint) -> bool {
        self.refused.contains_key(fp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_then_refused() {
        let t = Trust::new(Duration::from_secs(60), 10, Duration::from_secs(60), 10);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert!(!t.is_accepted(&a) && !t.is_refused(&a));
        t.accept(a);
        assert!(t.is_accepted(&a) && !t.is_accepted(&b));
        t.refuse(a);
        assert!(!t.is_accepted(&a), "forgotten at once");
        assert!(t.is_refused(&a) && !t.is_refused(&b));
    }
}
