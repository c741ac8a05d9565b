//! One upstream quota for the whole fleet: GCRA in a Lua script, on Redis's own clock, so N
//! sidecars together respect `shield.calls_per_second` and `shield.burst`. The shield asks it
//! first and falls back to a local limiter (at `redis.local_share` of the rate) while Redis does
//! not answer.

use std::time::Duration;

use super::Link;

/// GCRA: KEYS[1] the bucket; ARGV emission interval (µs per call), burst (calls), cost (calls).
/// Returns 0 when the call may go (and records it), else the microseconds to wait.
const GCRA: &str = r#"
local emission = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission * cost
local allow_at = new_tat - emission * burst
if allow_at > now then
  return allow_at - now
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return 0
"#;

/// Why the fleet quota gave no permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No room within the maximum wait; retry after this.
    Quota(Duration),
    /// Redis did not answer (down, slow, not connected yet): use the local fallback.
    Unavailable,
}

#[derive(Debug)]
pub(crate) struct FleetQuota {
    link: Link,
    key: String,
    /// Emission interval in µs.
    emission_us: u64,
    burst: u32,
    script: redis::Script,
}

impl FleetQuota {
    /// `None` when no rate is configured (unlimited: nothing to share).
    pub(crate) fn new(link: Link, calls_per_second: u32, burst: u32) -> Option<FleetQuota> {
        (calls_per_second > 0).then(|| FleetQuota {
            key: link.key("quota", ""),
            link,
            emission_us: 1_000_000 / u64::from(calls_per_second),
            burst: burst.max(1),
            script: redis::Script::new(GCRA),
        })
    }

    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    /// A permit for one upstream call, waiting at most `max_wait`.
    pub(crate) async fn acquire(&self, max_wait: Duration) -> Result<Duration, Denied> {
        let started = tokio::time::Instant::now();
        loop {
            let mut invocation = self.script.key(&self.key);
            invocation.arg(self.emission_us).arg(self.burst).arg(1);
            match self.link.run_script::<u64>(&invocation).await {
                None => return Err(Denied::Unavailable),
                Some(0) => return Ok(started.elapsed()),
                Some(us) => {
                    let wait = Duration::from_micros(us);
                    if started.elapsed() + wait > max_wait {
                        return Err(Denied::Quota(wait));
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpns_sim::redis::RedisServer;

    async fn link(url: &str) -> Link {
        let metrics =
            super::super::FleetMetrics::register(&prometheus::Registry::new()).expect("metrics");
        let l = Link::start(
            super::super::Target::node(url),
            Duration::from_millis(200),
            "t",
            "http://u",
            metrics,
        )
        .expect("link");
        for _ in 0..200 {
            if l.connection().is_some() {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("Redis not reached");
    }

    #[tokio::test]
    async fn sidecars_share_one_quota_and_fall_back_without_redis() {
        let redis = RedisServer::start();
        let a = FleetQuota::new(link(&redis.url()).await, 1, 2).expect("a rate");
        let b = FleetQuota::new(link(&redis.url()).await, 1, 2).expect("a rate");
        assert!(a.acquire(Duration::ZERO).await.is_ok());
        assert!(
            b.acquire(Duration::ZERO).await.is_ok(),
            "the burst of 2 is the fleet's"
        );
        assert!(matches!(
            a.acquire(Duration::ZERO).await,
            Err(Denied::Quota(wait)) if wait > Duration::from_millis(500)
        ));
        drop(redis);
        assert_eq!(
            b.acquire(Duration::ZERO).await,
            Err(Denied::Unavailable),
            "the shield falls back to the local share"
        );
        assert!(
            FleetQuota::new(a.link().clone(), 0, 1).is_none(),
            "no rate, nothing to share"
        );
    }
}
