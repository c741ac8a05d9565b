//! Fleet mode against a real `redis-server` (started on an ephemeral loopback port, stopped at
//! the end; `.ci/run` installs it when absent): three proxies share one upstream quota, and
//! Redis going away loses no client request.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tpns_cache::config::Config;
use tpns_sim::redis::{RedisCluster, RedisServer as Redis};
use tpns_sim::{token_name, Simulator};

/// A proxy in front of an existing simulator.
async fn proxy(
    sim: &Simulator,
    sim_addr: SocketAddr,
    tweak: impl FnOnce(&mut tpns_cache::config::Config),
) -> Harness {
    let (tx, _rx) = tokio::sync::oneshot::channel();
    let mut c = tpns_cache::config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    c.upstream.url = format!("http://{sim_addr}");
    tweak(&mut c);
    Harness::proxy_for(sim.clone(), sim_addr, c, tx).await
}

fn max_in_window(arrivals: &[u64], width_ms: u64) -> usize {
    (0..arrivals.len())
        .map(|i| {
            arrivals[i..]
                .iter()
                .take_while(|t| **t < arrivals[i] + width_ms)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_under_a_burst_stay_under_one_fleet_quota() {
    let redis = Redis::start();
    burst_stays_under_one_quota(&|c| c.redis.url = redis.url()).await;
}

/// Three proxies reaching Redis `via` share one upstream quota under a burst.
async fn burst_stays_under_one_quota(via: &(dyn Fn(&mut Config) + Sync)) {
    const RATE: u32 = 4;
    const BURST: u32 = 4;
    let base = Harness::start().await; // owns the simulator
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(Arc::new(
            proxy(&base.sim, base.sim_addr, |c| {
                via(c);
                c.shield.calls_per_second = RATE;
                c.shield.burst = BURST;
                c.shield.max_wait = Duration::from_millis(1500);
                c.shield.batch_window = Duration::ZERO;
            })
            .await,
        ));
    }
    // Connected (the connection is made in the background).
    for p in &proxies {
        for _ in 0..100 {
            if sample(&p.metrics().await, "tpns_cache_redis_up") == 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(sample(&p.metrics().await, "tpns_cache_redis_up"), 1.0);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await; // let the shared bucket refill
    base.sim.reset_stats();
    let tasks: Vec<_> = (0..45)
        .map(|i| {
            let p = proxies[i % 3].clone();
            tokio::spawn(async move { p.query(&tokens_body(&[&token_name(i)])).await.ret_code() })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert!(
        codes.iter().all(|c| *c == 0 || *c == 1_008_028),
        "{codes:?}"
    );
    let arrivals: Vec<u64> = base.sim.stats().query_arrivals_ms.into_iter().collect();
    let peak = max_in_window(&arrivals, 1000);
    println!(
        "3 proxies, burst of 45: {} upstream calls, peak {peak} in any 1 s (fleet rate {RATE}/s, burst {BURST}); {} answered 1008028",
        arrivals.len(),
        codes.iter().filter(|c| **c == 1_008_028).count()
    );
    assert!(
        peak <= (RATE + BURST) as usize,
        "{peak} calls in one second: {arrivals:?}"
    );
    assert!(
        arrivals.len() < 30,
        "without a shared quota each proxy would spend its own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_loses_no_request_and_the_fleet_recovers() {
    let mut redis = Redis::start();
    let port = redis.port();
    let url = redis.url();
    let base = Harness::with(
        tpns_sim::SimConfig {
            tokens: 2000,
            ..sim_config()
        },
        |_| {},
    )
    .await;
    let p = proxy(&base.sim, base.sim_addr, |c| {
        c.redis.url = url;
        c.redis.local_share = 0.5;
        c.shield.calls_per_second = 1000;
        c.shield.burst = 100;
    })
    .await;
    for _ in 0..100 {
        if sample(&p.metrics().await, "tpns_cache_redis_up") == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut next = 100;
    let mut ask = || {
        next += 1;
        tokens_body(&[&token_name(next)])
    };
    for _ in 0..5 {
        assert_eq!(p.query(&ask()).await.ret_code(), 0);
    }
    redis.stop();
    for _ in 0..10 {
        assert_eq!(
            p.query(&ask()).await.ret_code(),
            0,
            "served through the local fallback"
        );
    }
    let m = p.metrics().await;
    assert_eq!(sample(&m, "tpns_cache_redis_up"), 0.0);
    assert!(sample(&m, "tpns_cache_fleet_fallbacks_total") >= 10.0);
    // Redis comes back on the same port: the proxy uses it again by itself.
    let _redis = Redis::start_on(port, &[]);
    let mut recovered = false;
    for _ in 0..100 {
        assert_eq!(p.query(&ask()).await.ret_code(), 0);
        if sample(&p.metrics().await, "tpns_cache_redis_up") == 1.0 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "fleet mode did not recover");
}

#[tokio::test]
async fn redis_down_at_start_does_not_stop_the_sidecar() {
    let dead = closed_port().await;
    let h = Harness::with(sim_config(), |c| {
        c.redis.url = format!("redis://{dead}/0");
    })
    .await;
    assert_eq!(h.query(&tokens_body(&["token1"])).await.ret_code(), 0);
    let m = h.metrics().await;
    assert_eq!(sample(&m, "tpns_cache_redis_up"), 0.0);
    assert_eq!(sample(&m, "tpns_cache_fleet_fallbacks_total"), 1.0);
}

async fn wait_for(p: &Harness, series: &str, at_least: f64) {
    for _ in 0..200 {
        if sample(&p.metrics().await, series) >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{series} never reached {at_least}");
}

async fn fleet_of_three(redis: &Redis, base: &Harness) -> Vec<Harness> {
    fleet_of_three_via(&|c| c.redis.url = redis.url(), base).await
}

/// Three proxies in front of `base`'s simulator, reaching Redis `via`, each with an accepted
/// credential.
async fn fleet_of_three_via(via: &(dyn Fn(&mut Config) + Sync), base: &Harness) -> Vec<Harness> {
    let mut proxies = Vec::new();
    for i in 0..3 {
        let p = proxy(&base.sim, base.sim_addr, |c| {
            via(c);
            c.cache.invalidate_again_after = Duration::ZERO;
        })
        .await;
        wait_for(&p, "tpns_cache_redis_up", 1.0).await;
        // Each proxy's credential is accepted (a first request goes upstream whole).
        assert_eq!(
            p.query(&tokens_body(&[&token_name(1900 + i)]))
                .await
                .ret_code(),
            0
        );
        proxies.push(p);
    }
    proxies
}

fn big_sim() -> tpns_sim::SimConfig {
    tpns_sim::SimConfig {
        tokens: 2000,
        ..sim_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_sharing_redis_fetch_each_cold_identifier_once() {
    let redis = Redis::start();
    cold_identifiers_fetched_once(&|c| c.redis.url = redis.url()).await;
}

/// Through the shared tier reached `via`, 20 cold identifiers asked of three proxies in turn
/// go upstream once in total.
async fn cold_identifiers_fetched_once(via: &(dyn Fn(&mut Config) + Sync)) {
    let base = Harness::with(big_sim(), |_| {}).await;
    let proxies = fleet_of_three_via(via, &base).await;
    base.sim.reset_stats();
    let names: Vec<String> = (0..20).map(token_name).collect();
    let body = tokens_body(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let first = proxies[0].query(&body).await;
    assert_eq!(first.ret_code(), 0);
    wait_for(&proxies[0], "tpns_cache_redis_writes_total", 20.0).await;
    for p in &proxies[1..] {
        let r = p.query(&body).await;
        assert_eq!(r.json(), first.json());
        assert!(r.cache_status().contains("; hit;"), "{}", r.cache_status());
        let m = p.metrics().await;
        assert_eq!(
            sample(
                &m,
                r#"tpns_cache_lookups_total{op="token_accounts",outcome="shared_hit"}"#
            ),
            20.0
        );
    }
    assert_eq!(
        base.upstream_identifiers(),
        20,
        "each cold identifier fetched once in total"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_proxy_invalidates_the_others() {
    let redis = Redis::start();
    write_invalidates_the_others(&|c| c.redis.url = redis.url()).await;
}

/// A write through one of three proxies reaching Redis `via` reaches the other two.
async fn write_invalidates_the_others(via: &(dyn Fn(&mut Config) + Sync)) {
    let base = Harness::with(big_sim(), |_| {}).await;
    base.sim.bind(APP.0, "tw", "before", 0);
    let proxies = fleet_of_three_via(via, &base).await;
    let body = tokens_body(&["tw"]);
    for p in &proxies {
        assert!(p.query(&body).await.body_text().contains("before"));
        assert!(p.query(&body).await.cache_status().contains("; hit;"));
    }
    let r = proxies[0]
        .send(
            proxies[0].proxy,
            http::Method::POST,
            "/v3/device/account/batchoperate",
            &auth_headers(Some(APP)),
            r#"{"operator_type":2,"token_accounts":[{"token":"tw","account_list":[{"account":"after"}]}]}"#,
        )
        .await;
    assert_eq!(r.json()["ret_code"], 0);
    for p in &proxies[1..] {
        wait_for(
            p,
            r#"tpns_cache_invalidated_entries_total{source="fleet"}"#,
            1.0,
        )
        .await;
    }
    for p in &proxies {
        let r = p.query(&body).await;
        assert!(r.body_text().contains("after"), "{}", r.body_text());
    }
}

/// Leases: three proxies missing the same cold identifiers at the same instant fetch them from
/// the upstream once in total (the others wait for the shared tier).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_on_three_proxies_fetch_each_identifier_once() {
    let redis = Redis::start();
    let base = Harness::with(big_sim(), |_| {}).await;
    let proxies: Vec<Arc<Harness>> = fleet_of_three(&redis, &base)
        .await
        .into_iter()
        .map(Arc::new)
        .collect();
    base.sim.reset_stats();
    base.sim.set_faults(tpns_sim::Faults {
        latency_ms: 300,
        ..Default::default()
    });
    let names: Vec<String> = (200..230).map(token_name).collect();
    let body = tokens_body(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let tasks: Vec<_> = proxies
        .iter()
        .map(|p| {
            let (p, body) = (p.clone(), body.clone());
            tokio::spawn(async move { p.query(&body).await.json() })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert!(answers.iter().all(|a| *a == answers[0]));
    assert_eq!(answers[0]["result"].as_array().unwrap().len(), 30);
    let waited: f64 = {
        let mut n = 0.0;
        for p in &proxies {
            n += sample(&p.metrics().await, "tpns_cache_fleet_lease_waits_total");
        }
        n
    };
    println!(
        "3 proxies, same 30 cold ids at once: {} identifiers upstream, {waited} answered by waiting on another sidecar's lease",
        base.upstream_identifiers()
    );
    assert_eq!(
        base.upstream_identifiers(),
        30,
        "each identifier fetched once in total"
    );
}

/// Two sidecars of `fleet_of_three`, with "tw" bound to "before" and cached in the shared tier.
async fn shared_before(redis: &Redis, base: &Harness) -> Vec<Harness> {
    base.sim.bind(APP.0, "tw", "before", 0);
    let proxies = fleet_of_three(redis, base).await;
    let writes = sample(&proxies[0].metrics().await, "tpns_cache_redis_writes_total");
    assert!(proxies[0]
        .query(&tokens_body(&["tw"]))
        .await
        .body_text()
        .contains("before"));
    wait_for(&proxies[0], "tpns_cache_redis_writes_total", writes + 1.0).await;
    proxies
}

async fn write_after(p: &Harness) {
    let r = p
        .send(
            p.proxy,
            http::Method::POST,
            "/v3/device/account/batchoperate",
            &auth_headers(Some(APP)),
            r#"{"operator_type":2,"token_accounts":[{"token":"tw","account_list":[{"account":"after"}]}]}"#,
        )
        .await;
    assert_eq!(r.json()["ret_code"], 0);
}

/// Regression (issue 11, item 5): a generation key evicted by Redis (`maxmemory`) read as 0
/// again, so shared values from before a write became current again (ABA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_generation_never_brings_old_shared_values_back() {
    let redis = Redis::start();
    let base = Harness::with(big_sim(), |_| {}).await;
    let proxies = shared_before(&redis, &base).await;
    write_after(&proxies[0]).await;
    let gens = redis.cli(&["--scan", "--pattern", "tpns-cache:v1:g:*"]);
    assert!(!gens.is_empty(), "the app has a generation");
    for g in gens.lines() {
        redis.cli(&["DEL", g]);
    }
    let r = proxies[1].query(&tokens_body(&["tw"])).await;
    assert!(r.body_text().contains("after"), "{}", r.body_text());
}

/// Regression (issue 11, item 7): a failed generation bump on a write was ignored, so the
/// shared values from before the write went on being promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_generation_bump_keeps_the_app_off_the_shared_tier() {
    let redis = Redis::start();
    let base = Harness::with(big_sim(), |_| {}).await;
    let proxies = shared_before(&redis, &base).await;
    // Redis refuses SET (an ACL change, say): the generation can be read but not moved.
    assert_eq!(redis.cli(&["ACL", "SETUSER", "default", "-set"]), "OK");
    write_after(&proxies[0]).await;
    // The writer, and a sidecar that heard of the failed bump, fail closed: no stale promotion.
    for p in &proxies[..2] {
        let r = p.query(&tokens_body(&["tw"])).await;
        assert!(r.body_text().contains("after"), "{}", r.body_text());
    }
    // Once Redis takes writes again, the retried bump goes through and sharing resumes.
    assert_eq!(redis.cli(&["ACL", "SETUSER", "default", "+set"]), "OK");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fresh = tokens_body(&[&token_name(5)]);
    let writes = sample(&proxies[1].metrics().await, "tpns_cache_redis_writes_total");
    proxies[1].query(&fresh).await;
    wait_for(&proxies[1], "tpns_cache_redis_writes_total", writes + 1.0).await;
    proxies[0].query(&fresh).await;
    wait_for(
        &proxies[0],
        r#"tpns_cache_lookups_total{op="token_accounts",outcome="shared_hit"}"#,
        1.0,
    )
    .await;
}

/// A generation key that holds something else (not a number) is not a generation: nothing of
/// the app is shared until it is one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_generation_shares_nothing() {
    let redis = Redis::start();
    let base = Harness::with(big_sim(), |_| {}).await;
    let proxies = shared_before(&redis, &base).await;
    let gens = redis.cli(&["--scan", "--pattern", "tpns-cache:v1:g:*"]);
    for g in gens.lines() {
        redis.cli(&["DEL", g]);
        redis.cli(&["LPUSH", g, "not-a-generation"]);
    }
    base.sim.bind(APP.0, "tw", "after", 0);
    base.sim.unbind(APP.0, "tw", "before", 0);
    let r = proxies[1].query(&tokens_body(&["tw"])).await;
    assert!(r.body_text().contains("after"), "{}", r.body_text());
}

/// Forwards TCP connections to `to` until `close_all`; from then on it closes every
/// connection at once (the upstream becomes unreachable, with a connection error).
struct Relay {
    addr: SocketAddr,
    closed: Arc<AtomicBool>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closed = Arc::new(AtomicBool::new(false));
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        {
            let (closed, tasks) = (closed.clone(), tasks.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if closed.load(Ordering::SeqCst) {
                        continue;
                    }
                    tasks.lock().unwrap().push(tokio::spawn(async move {
                        if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        }
                    }));
                }
            });
        }
        Relay {
            addr,
            closed,
            tasks,
        }
    }
    fn close_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// Regression (issue 11, item 7): the retry after a connection error took only the local
/// limiter (whose whole-upstream rate is 0 in fleet mode), so retries bypassed the fleet quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_takes_a_permit_from_the_fleet_quota() {
    let redis = Redis::start();
    let base = Harness::start().await;
    let relay = Relay::start(base.sim_addr).await;
    let url = redis.url();
    let p = proxy(&base.sim, relay.addr, |c| {
        c.redis.url = url;
        c.shield.calls_per_second = 1;
        c.shield.burst = 1;
        c.shield.max_wait = Duration::from_millis(200);
        c.shield.retry_budget_ratio = 1.0;
        c.shield.batch_window = Duration::ZERO;
        c.shield.breaker_failures = 0;
        c.shield.unverified_share = 1.0;
    })
    .await;
    wait_for(&p, "tpns_cache_redis_up", 1.0).await;
    assert_eq!(p.query(&tokens_body(&["token1"])).await.ret_code(), 0);
    relay.close_all();
    // A fleet permit is free again; the first call takes it, the retry would need the next.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = p.query(&tokens_body(&["token2"])).await;
    assert_eq!(r.status, http::StatusCode::BAD_GATEWAY, "{}", r.body_text());
    let m = p.metrics().await;
    assert_eq!(sample(&m, "tpns_cache_upstream_retries_total"), 0.0);
    assert_eq!(
        sample(
            &m,
            r#"tpns_cache_limiter_rejections_total{reason="fleet_quota"}"#
        ),
        1.0
    );
}

/// Regression (issue 11, item 7): a fetch that wrote nothing to the shared tier (an answer
/// that is never cached) kept its leases until they expired, so other sidecars waited for
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_released_when_a_fetch_writes_nothing() {
    let redis = Redis::start();
    let base = Harness::with(big_sim(), |_| {}).await;
    let proxies = fleet_of_three(&redis, &base).await;
    // A token never registered answers "1008006": never cached, never shared.
    let r = proxies[0].query(&tokens_body(&["never-registered"])).await;
    assert_eq!(r.json()["result"][0], "1008006");
    let released = {
        let mut released = false;
        for _ in 0..50 {
            if redis
                .cli(&["--scan", "--pattern", "tpns-cache:v1:l:*"])
                .is_empty()
            {
                released = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        released
    };
    assert!(released, "the lease was given back at once, not after 3 s");
}

// The lease ownership regression test sits beside the leases, in src/fleet/leases.rs.

/// A Redis Cluster of three masters: the fleet quota (a script on the quota key's node), the
/// shared tier (an app's generation and entries in one hash slot, read in one MGET) and the
/// invalidation bus (a subscription to one seed hears PUBLISH from any node) all work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_serves_quota_shared_tier_and_invalidations() {
    let cluster = RedisCluster::start(3);
    let via = |c: &mut Config| {
        c.redis.url = cluster.seeds();
        c.redis.cluster = true;
    };
    burst_stays_under_one_quota(&via).await;
    cold_identifiers_fetched_once(&via).await;
    write_invalidates_the_others(&via).await;
    let keys = cluster.keys_per_node();
    assert!(
        keys.iter().sum::<u64>() > 20,
        "the shared tier wrote to the cluster: {keys:?}"
    );
}

/// `rediss://` with a private CA (`redis.ca_file`) and an ACL user whose password comes from a
/// file, allowed only the commands, keys and channel docs/fleet.md lists; the default user is
/// off, so nothing works without those credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_an_acl_user() {
    let pki = common::pki::Pki::new("redis-tls");
    let redis = Redis::start_tls(
        &pki.cert_file,
        &pki.key_file,
        &pki.ca_file,
        // The user holds exactly what docs/fleet.md says the sidecar needs.
        &"--user default off --user tpns on >tls-acl-pw ~tpns-cache:* &tpns-cache:* -@all \
          +get +set +mget +del +evalsha +script|load +publish +subscribe +time \
          --user inspector on >inspect ~* &* +@all"
            .split_whitespace()
            .collect::<Vec<_>>(),
    );
    let password = pki.dir.file("redis-password", "tls-acl-pw\n");
    let via = |c: &mut Config| {
        c.redis.url = redis.url();
        c.redis.ca_file = Some(pki.ca_file.clone());
        c.redis.username = "tpns".into();
        c.redis.password_file = Some(password.clone());
    };
    assert!(redis.url().starts_with("rediss://"));
    cold_identifiers_fetched_once(&via).await;
    write_invalidates_the_others(&via).await;
    burst_stays_under_one_quota(&via).await;
    let denied = redis.cli(&["--user", "inspector", "--pass", "inspect", "ACL", "LOG"]);
    assert!(
        denied.is_empty(),
        "the sidecar needed more than the documented ACL: {denied}"
    );

    // Without the CA the server is not trusted; with a wrong password it refuses us: in both
    // cases the sidecar serves alone (Redis down), and says so.
    let wrong = pki.dir.file("wrong-password", "nope\n");
    for (what, tweak) in [
        (
            "no CA",
            Box::new(|c: &mut Config| c.redis.ca_file = None) as Box<dyn Fn(&mut Config)>,
        ),
        (
            "wrong password",
            Box::new(|c: &mut Config| c.redis.password_file = Some(wrong.clone())),
        ),
    ] {
        let base = Harness::with(sim_config(), |c| {
            via(c);
            tweak(c);
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let m = base.metrics().await;
        assert_eq!(sample(&m, "tpns_cache_redis_up"), 0.0, "{what}");
        let r = base.query(&tokens_body(&[&token_name(3)])).await;
        assert_eq!(
            r.ret_code(),
            0,
            "{what}: the sidecar serves alone: {}",
            r.body_text()
        );
    }
}
