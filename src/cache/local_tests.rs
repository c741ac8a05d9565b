//! Unit tests of [`super`].

use super::*;
use crate::api::answer::ElementCode;
use crate::api::request::Ident;
use serde_json::value::RawValue;

fn key(app: &str, token: &str) -> CacheKey {
    CacheKey::new(
        Arc::from("http://u"),
        Arc::from(app),
        None,
        Ident::Token(token.into()),
    )
}

fn ok() -> Answer {
    Answer {
        code: ElementCode::Ok,
        element: Some(RawValue::from_string(r#"{"token":"t","account_list":[]}"#.into()).unwrap()),
    }
}

fn not_found() -> Answer {
    Answer {
        code: ElementCode::NotFound,
        element: None,
    }
}

fn store(negative: u64) -> Store {
    Store::new(
        1 << 20,
        Policy::fresh_only(Duration::from_secs(60), Duration::from_secs(negative)),
        Clock::default(),
    )
}

fn fresh(l: Lookup) -> Option<bool> {
    match l {
        Lookup::Fresh(e) => Some(e.is_negative()),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn positive_and_negative_lifetimes() {
    let s = store(10);
    s.put(key("a", "t1"), ok()).await;
    s.put(key("a", "t2"), not_found()).await;
    assert_eq!(fresh(s.get(&key("a", "t1")).await), Some(false));
    assert_eq!(fresh(s.get(&key("a", "t2")).await), Some(true));
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(fresh(s.get(&key("a", "t1")).await), Some(false));
    assert!(matches!(s.get(&key("a", "t2")).await, Lookup::Miss));
    tokio::time::advance(Duration::from_secs(50)).await;
    assert!(matches!(s.get(&key("a", "t1")).await, Lookup::Miss));
}

#[tokio::test(start_paused = true)]
async fn stale_periods_follow_the_fresh_one() {
    let s = Store::new(
        1 << 20,
        Policy {
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(30),
            ..Policy::fresh_only(Duration::from_secs(10), Duration::from_secs(10))
        },
        Clock::default(),
    );
    s.put(key("a", "t"), ok()).await;
    assert!(matches!(s.get(&key("a", "t")).await, Lookup::Fresh(_)));
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(matches!(s.get(&key("a", "t")).await, Lookup::Revalidate(_)));
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(matches!(
        s.get(&key("a", "t")).await,
        Lookup::StaleIfError(_)
    ));
    tokio::time::advance(Duration::from_secs(25)).await;
    assert!(matches!(s.get(&key("a", "t")).await, Lookup::Miss));
}

#[tokio::test(start_paused = true)]
async fn jitter_only_shortens_lifetimes_and_spreads_them() {
    let s = Store::new(
        1 << 20,
        Policy {
            ttl_jitter: 0.5,
            ..Policy::fresh_only(Duration::from_secs(100), Duration::from_secs(100))
        },
        Clock::default(),
    );
    let now = s.clock().now();
    let mut ends = Vec::new();
    for i in 0..50 {
        let e = s.put(key("a", &format!("t{i}")), ok()).await;
        assert!(e.fresh_until() <= now + Duration::from_secs(100));
        assert!(e.fresh_until() >= now + Duration::from_secs(50));
        ends.push(e.fresh_until());
    }
    ends.sort();
    ends.dedup();
    assert!(ends.len() > 40, "lifetimes spread out");
}

#[tokio::test]
async fn manual_clock_expires() {
    let s = store(10);
    s.put(key("a", "t2"), not_found()).await;
    s.clock().advance(Duration::from_secs(10));
    assert!(matches!(s.get(&key("a", "t2")).await, Lookup::Miss));
}

fn account_key(app: &str, account: &str, t: Option<i64>) -> CacheKey {
    CacheKey::new(
        Arc::from("http://u"),
        Arc::from(app),
        None,
        Ident::Account {
            account: account.into(),
            account_type: t,
            extra: None,
        },
    )
}

fn el(json: &str) -> Answer {
    Answer {
        code: ElementCode::Ok,
        element: Some(RawValue::from_string(json.to_owned()).unwrap()),
    }
}

#[tokio::test]
async fn index_finds_both_directions_and_follows_evictions() {
    let s = store(10);
    let app: Arc<str> = Arc::from("a");
    s.put(
        key("a", "t1"),
        el(r#"{"token":"t1","account_list":[{"account":"old"}]}"#),
    )
    .await;
    s.put(
        account_key("a", "old", None),
        el(r#"{"account":"old","token_list":["t1","t9"]}"#),
    )
    .await;
    s.put(
        account_key("a", "old", Some(3)),
        el(r#"{"account":"old","token_list":[]}"#),
    )
    .await;
    s.put(
        key("a", "t9"),
        el(r#"{"token":"t9","account_list":[{"account":"old"}]}"#),
    )
    .await;
    s.put(
        key("b", "t1"),
        el(r#"{"token":"t1","account_list":[{"account":"old"}]}"#),
    )
    .await;
    // A write to t1 affects t1 and the account bound to it (both account_type variants),
    // and nothing of app b.
    let affected = s.affected(&app, &["t1".to_owned()], &[]).await;
    assert_eq!(affected.len(), 3, "{affected:?}");
    assert!(affected.iter().all(|k| k.app() == s.index().app_tag("a")));
    // A write to account "old" reaches the tokens it is bound to.
    let affected = s.affected(&app, &[], &["old".to_owned()]).await;
    assert_eq!(affected.len(), 4, "{affected:?}");
    assert_eq!(s.invalidate(&affected).await, 4);
    s.sync().await;
    assert!(s.affected(&app, &["t1".to_owned()], &[]).await.is_empty());
    assert_eq!(s.index().len(), 1, "only app b's t1 is left");
    assert_eq!(s.purge_app("b").await.len(), 1);
    s.sync().await;
    assert!(s.index().is_empty());
}

#[tokio::test]
async fn replacing_an_entry_keeps_the_index_consistent() {
    let s = store(10);
    let app: Arc<str> = Arc::from("a");
    s.put(
        key("a", "t1"),
        el(r#"{"token":"t1","account_list":[{"account":"x"}]}"#),
    )
    .await;
    s.put(
        key("a", "t1"),
        el(r#"{"token":"t1","account_list":[{"account":"y"}]}"#),
    )
    .await;
    s.sync().await;
    assert_eq!(s.affected(&app, &[], &["y".to_owned()]).await.len(), 1);
    assert!(s.affected(&app, &[], &["x".to_owned()]).await.is_empty());
}

#[tokio::test]
async fn writes_since_a_fetch_started_keep_its_answer_out() {
    let s = store(10);
    let app: Arc<str> = Arc::from("a");
    let epoch = s.index().epoch(&app);
    s.index().bump_epoch(&app);
    let (_, discarded) = s.put_since(key("a", "t1"), ok(), epoch).await;
    assert!(discarded);
    assert!(matches!(s.get(&key("a", "t1")).await, Lookup::Miss));
    let epoch = s.index().epoch(&app);
    let (_, discarded) = s.put_since(key("a", "t1"), ok(), epoch).await;
    assert!(!discarded);
    assert!(matches!(s.get(&key("a", "t1")).await, Lookup::Fresh(_)));
    // Another app's write does not matter.
    s.index().bump_epoch(&Arc::from("b"));
    assert!(!s.put_since(key("a", "t2"), ok(), epoch).await.1);
}

/// Regression: a purge or write bumped the app's epoch before removing entries, so a query
/// in between memoized the old answer under the new epoch and it stayed valid.
#[tokio::test]
async fn an_answer_memoized_during_a_write_is_invalid_after_it() {
    let s = store(10);
    let app: Arc<str> = Arc::from("a");
    s.put(key("a", "t1"), ok()).await;
    let write = s.begin_write(&app);
    // A query runs now: it reads the epoch and finds the entry, and would memoize its
    // answer under that epoch (the memo is valid while the app's epoch is unchanged).
    let epoch = s.index().epoch(&app);
    assert!(matches!(s.get(&key("a", "t1")).await, Lookup::Fresh(_)));
    s.invalidate(&[key("a", "t1")]).await;
    drop(write);
    assert_ne!(
        s.index().epoch(&app),
        epoch,
        "a memo taken during the purge would outlive it"
    );
}

/// A stored entry pins nothing beyond what it is charged: its key keeps the digest, the app's
/// tag and the name, not the request's top-level fields (here 100 KB each), which go when the
/// request does. (Before stored keys, an entry kept its key's whole scope and was charged it.)
#[tokio::test]
async fn an_entry_pins_nothing_it_is_not_charged_for() {
    let s = Store::new(
        1 << 20,
        Policy::fresh_only(Duration::from_secs(60), Duration::from_secs(60)),
        Clock::default(),
    );
    for i in 0..50 {
        let scope: Arc<str> = Arc::from(format!("{{\"pad\":\"{i:03}{}\"}}", "x".repeat(100_000)));
        let key = CacheKey::new(
            Arc::from("http://u"),
            Arc::from("a"),
            Some(scope.clone()),
            Ident::Token(format!("nx-{i}").into()),
        );
        let e = s.put(key.clone(), not_found()).await;
        let charged = weigh(&key, &e);
        drop(key);
        s.sync().await;
        assert_eq!(Arc::strong_count(&scope), 1, "the store holds the scope");
        assert!(charged < 2_000, "{charged}");
    }
    assert_eq!(s.entry_count(), 50, "50 small entries fit in 1 MiB");
    assert!(s.weighted_bytes() <= 1 << 20, "{}", s.weighted_bytes());
}

/// Issue 11, item 7: a value promoted from the shared tier while a write to its app passed
/// is not stored (it may predate the write).
#[tokio::test]
async fn promotions_from_before_a_write_are_not_stored() {
    let s = store(10);
    let app: Arc<str> = Arc::from("a");
    let epoch = s.index().epoch(&app);
    drop(s.begin_write(&app));
    let (_, dropped) = s
        .put_fresh_for_since(key("a", "t1"), ok(), Duration::from_secs(5), epoch)
        .await;
    assert!(dropped);
    assert!(matches!(s.get(&key("a", "t1")).await, Lookup::Miss));
    let epoch = s.index().epoch(&app);
    let (e, dropped) = s
        .put_fresh_for_since(key("a", "t1"), ok(), Duration::from_secs(5), epoch)
        .await;
    assert!(!dropped);
    assert!(e.fresh_until() <= s.clock().now() + Duration::from_secs(5));
    assert!(matches!(s.get(&key("a", "t1")).await, Lookup::Fresh(_)));
}

#[tokio::test]
async fn apps_do_not_share_entries() {
    let s = store(10);
    s.put(key("a", "t1"), ok()).await;
    assert!(matches!(s.get(&key("b", "t1")).await, Lookup::Miss));
}

#[tokio::test]
async fn uncacheable_answers_are_not_stored() {
    let s = store(0);
    s.put(key("a", "nf"), not_found()).await;
    s.put(
        key("a", "bad"),
        Answer {
            code: ElementCode::Other("1008006".into()),
            element: None,
        },
    )
    .await;
    s.put(
        key("a", "ok-no-element"),
        Answer {
            code: ElementCode::Ok,
            element: None,
        },
    )
    .await;
    s.sync().await;
    assert_eq!(s.entry_count(), 0);
}

#[tokio::test]
async fn byte_budget_is_enforced() {
    let s = Store::new(
        64 * 1024,
        Policy::fresh_only(Duration::from_secs(60), Duration::from_secs(60)),
        Clock::default(),
    );
    for i in 0..5000 {
        s.put(key("a", &format!("token-{i}")), ok()).await;
    }
    s.sync().await;
    assert!(s.weighted_bytes() <= 64 * 1024, "{}", s.weighted_bytes());
    assert!(s.entry_count() > 50);
}

/// The read map holds exactly what moka holds once moka has caught up: entries it evicted for
/// size, rejected at admission, replaced or had invalidated are never served.
#[tokio::test]
async fn the_read_map_never_serves_what_moka_dropped() {
    // Room for a few dozen entries: most of the 2 000 inserted below are evicted or rejected.
    let s = Store::new(
        40 * u64::from(weigh(
            &key("app", "t0000"),
            &Policy::fresh_only(Duration::from_secs(60), Duration::from_secs(60))
                .entry(ok(), s_now(), None)
                .0,
        )),
        Policy::fresh_only(Duration::from_secs(60), Duration::from_secs(60)),
        Clock::default(),
    );
    let keys: Vec<CacheKey> = (0..2000).map(|i| key("app", &format!("t{i:04}"))).collect();
    for (i, k) in keys.iter().enumerate() {
        s.put(k.clone(), ok()).await;
        // Some keys are read often (moka should want to keep them), the rest once.
        for hot in keys.iter().take(10) {
            let _ = s.get(hot).await;
        }
        if i % 7 == 0 {
            s.invalidate(std::slice::from_ref(k)).await;
        }
        // Replacements.
        if i % 11 == 0 {
            s.put(k.clone(), ok()).await;
        }
    }
    s.sync().await;
    assert!(
        s.entry_count() < 100,
        "most were dropped: {}",
        s.entry_count()
    );
    assert_eq!(
        s.front.len() as u64,
        s.entry_count(),
        "the read map is moka's content"
    );
    for k in &keys {
        let in_moka = s
            .cache
            .contains_key(&super::super::key::KeyDigest::of(k.digest()));
        let served = !matches!(s.get(k).await, Lookup::Miss);
        assert_eq!(served, in_moka, "{:?}", k.ident);
    }
}

fn s_now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// A request's keys read at once give what reading them one by one gives, in order, with
/// repeats, misses and keys spread over many shards of the read map.
#[tokio::test(start_paused = true)]
async fn reading_a_request_at_once_is_reading_each_key() {
    let s = store(60);
    for i in 0..300 {
        if i % 3 == 0 {
            s.put(key("a", &format!("t{i}")), not_found()).await;
        } else if i % 3 == 1 {
            s.put(key("a", &format!("t{i}")), ok()).await;
        }
    }
    s.sync().await;
    let mut keys: Vec<CacheKey> = (0..300).map(|i| key("a", &format!("t{i}"))).collect();
    keys.push(keys[1].clone()); // a repeat
    keys.push(key("b", "t1")); // another app's name
    let now = s_now();
    let digests: Vec<u128> = keys.iter().map(CacheKey::digest).collect();
    let many = s.read_many(&digests, now);
    assert_eq!(many.len(), keys.len());
    let mut hits = 0;
    for (k, got) in keys.iter().zip(many) {
        let one = s.read(k.digest(), now);
        match (got, one) {
            (Lookup::Fresh(a), Lookup::Fresh(b)) => {
                assert!(Entry::ptr_eq(&a, &b), "{:?}", k.ident);
                hits += 1;
            }
            (Lookup::Miss, Lookup::Miss) => {}
            (a, b) => panic!("{:?}: {a:?} at once, {b:?} alone", k.ident),
        }
    }
    assert_eq!(hits, 201, "200 stored, one repeated");
}

/// A request read in place gives the entries reading it key by key gives, in order, when every
/// key is fresh (negative entries and repeats included), and nothing as soon as one key is
/// missing, past its lifetime or of another app.
#[tokio::test(start_paused = true)]
async fn a_request_read_in_place_only_when_every_key_is_fresh() {
    let s = store(30);
    for i in 0..200 {
        let answer = if i % 2 == 0 { ok() } else { not_found() };
        s.put(key("a", &format!("t{i}")), answer).await;
    }
    s.sync().await;
    let mut keys: Vec<CacheKey> = (0..200).map(|i| key("a", &format!("t{i}"))).collect();
    keys.push(keys[7].clone()); // a repeat
    let digests: Vec<u128> = keys.iter().map(CacheKey::digest).collect();
    let now = s_now();
    let same = s.with_all_fresh(&digests, now, |entries| {
        assert_eq!(entries.len(), keys.len());
        keys.iter()
            .zip(entries)
            .all(|(k, e)| match s.read(k.digest(), now) {
                Lookup::Fresh(one) => Entry::ptr_eq(&one, e),
                other => panic!("{:?}: {other:?} alone", k.ident),
            })
    });
    assert_eq!(same, Some(true));

    let refused = |digests: &[u128], now| s.with_all_fresh(digests, now, |_| ()).is_none();
    let missing = [digests[0], key("a", "never stored").digest()];
    assert!(refused(&missing, now), "a missing key");
    assert!(
        refused(&[key("b", "t0").digest()], now),
        "another app's name"
    );
    // The negative entries' 30 s end first; the positive ones stay fresh for 60 s.
    let later = now + Duration::from_secs(30);
    assert!(
        refused(&digests, later),
        "negative entries past their lifetime"
    );
    assert!(s
        .with_all_fresh(&[digests[0], digests[2]], later, |_| ())
        .is_some());
    assert!(refused(&[digests[0]], now + Duration::from_secs(60)));
}

/// Once hits are sent to moka, a request read in place counts each of its hits as
/// `read_many` does, and a refused one (a key missing) counts none: the general path that
/// follows counts what it finds.
#[tokio::test]
async fn a_request_read_in_place_counts_its_hits_only_when_answered() {
    let policy = Policy::fresh_only(Duration::from_secs(60), Duration::from_secs(60));
    let one = weigh(
        &key("a", "t-00"),
        &policy.entry(ok(), Instant::now(), None).0,
    ) as u64;
    let s = Store::new(12 * one, policy, Clock::default());
    let keys: Vec<CacheKey> = (0..10).map(|i| key("a", &format!("t-{i:02}"))).collect();
    for k in &keys {
        s.put(k.clone(), ok()).await;
    }
    s.sync().await;
    assert!(s.samples_hits(), "10 of 12 entries' worth of budget");
    let digests: Vec<u128> = keys.iter().map(CacheKey::digest).collect();
    let counted = || -> Vec<u32> {
        digests
            .iter()
            .map(|&d| s.front.get(d).unwrap().recorded().load(Ordering::Relaxed))
            .collect()
    };
    let before = counted();
    let now = Instant::now();
    let mut with_a_miss = digests.clone();
    with_a_miss.push(key("a", "never stored").digest());
    assert!(s.with_all_fresh(&with_a_miss, now, |_| ()).is_none());
    assert_eq!(counted(), before, "refused: no hit counted");
    assert!(s.with_all_fresh(&digests, now, |_| ()).is_some());
    let after: Vec<u32> = before.iter().map(|n| n + 1).collect();
    assert_eq!(counted(), after, "answered: each hit counted once");
}

/// The stale windows are the policy's, counted from the entry's own fresh end, exactly at
/// their boundaries; moka keeps the entry at least to the end of the last one.
#[tokio::test(start_paused = true)]
async fn stale_windows_end_exactly_where_the_policy_says() {
    let policy = Policy {
        stale_while_revalidate: Duration::from_millis(1500),
        stale_if_error: Duration::from_millis(4200),
        ..Policy::fresh_only(Duration::from_millis(2300), Duration::from_secs(1))
    };
    let now = tokio::time::Instant::now();
    let (entry, cacheable) = policy.entry(ok(), now, None);
    assert!(cacheable);
    assert_eq!(entry.fresh_until(), now + Duration::from_millis(2300));
    assert_eq!(entry.keep(), Duration::from_secs(7), "6.5 s rounded up");
    let at = |ms: u64| policy.classify(entry.clone(), now + Duration::from_millis(ms));
    let nanos = Duration::from_nanos(1);
    assert!(matches!(at(0), Lookup::Fresh(_)));
    assert!(matches!(
        policy.classify(entry.clone(), entry.fresh_until() - nanos),
        Lookup::Fresh(_)
    ));
    assert!(matches!(at(2300), Lookup::Revalidate(_)));
    assert!(matches!(
        policy.classify(entry.clone(), now + Duration::from_millis(3800) - nanos),
        Lookup::Revalidate(_)
    ));
    assert!(matches!(at(3800), Lookup::StaleIfError(_)));
    assert!(matches!(
        policy.classify(entry.clone(), now + Duration::from_millis(6500) - nanos),
        Lookup::StaleIfError(_)
    ));
    assert!(matches!(at(6500), Lookup::Miss));
    // A shared-tier value's remaining fresh time counts the same way.
    let (shared, _) = policy.entry(ok(), now, Some(Duration::from_millis(100)));
    assert!(matches!(
        policy.classify(shared.clone(), now + Duration::from_millis(1599)),
        Lookup::Revalidate(_)
    ));
    assert_eq!(shared.keep(), Duration::from_secs(5), "4.3 s rounded up");
}

/// While hits are not sent (below half the budget) none reaches moka, an entry's first ones
/// included, and none is counted; once they are, an entry's first hits all reach moka, then
/// one in `RECORD_EVERY`.
#[test]
fn no_hits_below_half_then_first_hits_in_full_then_sampled() {
    let policy = Policy::fresh_only(Duration::from_secs(60), Duration::from_secs(60));
    let now = Instant::now();
    let (quiet, _) = policy.entry(ok(), now, None);
    assert!((0..1000).all(|_| !record_hit(&quiet, false)));
    // Counted from the point hits are sent: its first ones then go in full.
    for _ in 0..RECORDED_IN_FULL {
        assert!(record_hit(&quiet, true));
    }

    let (sampled, _) = policy.entry(ok(), now, None);
    for _ in 0..RECORDED_IN_FULL {
        assert!(record_hit(&sampled, true));
    }
    let n = RECORD_EVERY as usize * 100;
    let sent = (0..n).filter(|_| record_hit(&sampled, true)).count();
    assert_eq!(sent, 100, "one in {RECORD_EVERY} of {n} hits");
}

/// Sampled hits are sent from half the budget on (where moka starts its frequency sketch).
#[tokio::test]
async fn sampled_hits_start_at_half_the_budget() {
    let one = weigh(
        &key("a", "t-000"),
        &Policy::fresh_only(Duration::from_secs(60), Duration::from_secs(60))
            .entry(ok(), Instant::now(), None)
            .0,
    ) as u64;
    let s = Store::new(
        100 * one,
        Policy::fresh_only(Duration::from_secs(60), Duration::from_secs(60)),
        Clock::default(),
    );
    assert!(!s.samples_hits());
    for i in 0..45 {
        s.put(key("a", &format!("t-{i:03}")), ok()).await;
    }
    s.sync().await;
    assert_eq!(s.entry_count(), 45);
    assert!(!s.samples_hits(), "45% of the budget");
    for i in 45..55 {
        s.put(key("a", &format!("t-{i:03}")), ok()).await;
    }
    s.sync().await;
    assert_eq!(s.entry_count(), 55);
    assert!(s.samples_hits(), "55% of the budget");
}
