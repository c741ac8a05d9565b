//! Fetch leases: before fetching, a sidecar takes a short lease per identifier (`SET NX PX` with
//! a token of its own); the others wait for the value in the shared tier instead of fetching it
//! too. Leases are released with compare-and-delete (only your own, never one another sidecar
//! or batch took since yours expired).

use std::time::Duration;

use super::Link;

/// Deletes each lease in KEYS whose value is ARGV[1] (only our own); returns how many.
const RELEASE: &str = r#"
local n = 0
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then
    n = n + redis.call('DEL', k)
  end
end
return n
"#;

#[derive(Debug)]
pub(crate) struct Leases {
    link: Link,
    release: redis::Script,
}

impl Leases {
    pub(crate) fn new(link: Link) -> Leases {
        Leases {
            link,
            release: redis::Script::new(RELEASE),
        }
    }

    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    /// The value of this sidecar's leases for one batch: unique per batch, so a release never
    /// drops a lease taken later, by another sidecar or by another batch of this one.
    pub(crate) fn token(&self, batch: u64) -> String {
        format!("{:016x}-{batch:x}", self.link.origin())
    }

    /// `name`: an identifier's stable name in the fleet (its cache key's shared name).
    fn key(&self, name: &str) -> String {
        self.link.key("l", name)
    }

    /// Takes a lease on each key: `true` where this sidecar should fetch, `false` where another
    /// one is fetching it right now. `None` when Redis does not answer (then every key is this
    /// sidecar's to fetch).
    pub(crate) async fn take(
        &self,
        names: &[String],
        lease_for: Duration,
        token: &str,
    ) -> Option<Vec<bool>> {
        let mut pipe = redis::pipe();
        let px = u64::try_from(lease_for.as_millis()).unwrap_or(1000).max(1);
        for n in names {
            pipe.cmd("SET")
                .arg(self.key(n))
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(px);
        }
        let taken: Vec<Option<String>> = self.link.run_pipe(&pipe, self.link.timeout()).await?;
        (taken.len() == names.len()).then(|| taken.into_iter().map(|r| r.is_some()).collect())
    }

    /// Gives back the leases still holding `token`.
    pub(crate) async fn release(&self, names: &[String], token: &str) {
        if names.is_empty() {
            return;
        }
        let mut invocation = self.release.prepare_invoke();
        for n in names {
            invocation.key(self.key(n));
        }
        invocation.arg(token);
        let _: Option<u64> = self.link.run_script(&invocation).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpns_sim::redis::RedisServer;

    fn link(url: &str) -> Link {
        let metrics =
            super::super::FleetMetrics::register(&prometheus::Registry::new()).expect("metrics");
        Link::start(
            super::super::Target::node(url),
            Duration::from_millis(200),
            "t",
            "http://u",
            metrics,
        )
        .expect("link")
    }

    async fn up(l: &Link) {
        for _ in 0..200 {
            if l.connection().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("Redis not reached");
    }

    /// Regression (issue 11, item 7): a release deleted the lease whoever held it, so a sidecar
    /// whose lease had expired dropped the lease another sidecar had taken since.
    #[tokio::test]
    async fn a_lease_is_released_only_by_its_holder() {
        let redis = RedisServer::start();
        let (a, b, c) = (
            Leases::new(link(&redis.url())),
            Leases::new(link(&redis.url())),
            Leases::new(link(&redis.url())),
        );
        for l in [&a, &b, &c] {
            up(l.link()).await;
        }
        let keys = ["app:tok".to_owned()];
        let (ta, tb) = (a.token(1), b.token(1));
        assert_ne!(ta, tb);
        assert_eq!(
            a.take(&keys, Duration::from_millis(100), &ta).await,
            Some(vec![true])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            b.take(&keys, Duration::from_secs(10), &tb).await,
            Some(vec![true]),
            "A's lease expired"
        );
        a.release(&keys, &ta).await;
        assert_eq!(
            c.take(&keys, Duration::from_secs(10), &c.token(1)).await,
            Some(vec![false]),
            "B's lease survives A's late release"
        );
        b.release(&keys, &tb).await;
        assert_eq!(
            c.take(&keys, Duration::from_secs(10), &c.token(2)).await,
            Some(vec![true])
        );
    }
}
