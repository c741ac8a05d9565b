//! Coalescing: one flight per (credential, cache key). While it is in the air, every other
//! request that needs the key waits for it instead of asking again. Flights are keyed by
//! credential too, so an answer (or a refusal) for one credential never reaches another except
//! through the cache, which only serves accepted credentials. The keys are bounded by the
//! requests in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::FetchError;
use crate::api::error::UpstreamError;
use crate::cache::{CacheKey, Entry};
use crate::trust::Fingerprint;

/// What a flight lands with; shared by every waiter.
pub(crate) type FlightResult = Result<Entry, Arc<FetchError>>;

type Slot = Option<FlightResult>;
/// Flights are keyed by credential and key.
type FlightKey = (Fingerprint, CacheKey);
/// A flight's number (so only its own batch lands it) and where its result appears.
type InAir = (u64, watch::Receiver<Slot>);

/// What a request waits on for one identifier.
#[derive(Debug)]
pub(crate) struct Waiter(watch::Receiver<Slot>);

impl Waiter {
    /// The flight's result; an error if its sender went away without one.
    pub(crate) async fn result(mut self) -> FlightResult {
        match self.0.wait_for(Option::is_some).await {
            Ok(v) => match &*v {
                Some(r) => r.clone(),
                None => Err(lost()),
            },
            Err(_) => Err(lost()),
        }
    }
}

fn lost() -> Arc<FetchError> {
    Arc::new(FetchError::Upstream(UpstreamError::Unreachable(
        "the fetch was abandoned".to_owned(),
    )))
}

/// A flight this request started: the identifier to fetch, as the client wrote it (its JSON
/// text, valid: it was parsed).
#[derive(Debug)]
pub(crate) struct NewFlight {
    pub(crate) key: CacheKey,
    pub(crate) id: u64,
    pub(crate) raw: Box<str>,
    tx: watch::Sender<Slot>,
}

impl NewFlight {
    /// Hands the result to every waiter.
    pub(crate) fn resolve(&self, result: FlightResult) {
        let _ = self.tx.send(Some(result));
    }
}

/// The flights in the air.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<FlightKey, InAir>>,
    ids: AtomicU64,
}

impl Flights {
    /// A number no flight or batch had before.
    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Under one lock: joins the flight of each key already in the air and starts one for the
    /// others. Returns a waiter per item, in order (and whether it joined), and the new
    /// flights. A flight whose sender is gone (its task ended without landing it) is replaced.
    pub(crate) fn register(
        &self,
        fingerprint: Fingerprint,
        items: Vec<(CacheKey, Box<str>)>,
    ) -> (Vec<(Waiter, bool)>, Vec<NewFlight>) {
        let mut waiters = Vec::with_capacity(items.len());
        let mut new = Vec::new();
        let mut map = self.map.lock();
        for (key, raw) in items {
            let fk = (fingerprint, key);
            if let Some((_, rx)) = map.get(&fk).filter(|(_, rx)| rx.has_changed().is_ok()) {
                waiters.push((Waiter(rx.clone()), true));
                continue;
            }
            let (tx, rx) = watch::channel(None);
            let id = self.next_id();
            map.insert(fk.clone(), (id, rx.clone()));
            waiters.push((Waiter(rx), false));
            new.push(NewFlight {
                key: fk.1,
                id,
                raw,
                tx,
            });
        }
        (waiters, new)
    }

    /// Removes a finished flight (only if it is still this flight).
    pub(crate) fn land(&self, fingerprint: Fingerprint, key: CacheKey, id: u64) {
        let mut map = self.map.lock();
        let fk = (fingerprint, key);
        if map.get(&fk).is_some_and(|(current, _)| *current == id) {
            map.remove(&fk);
        }
    }

    /// Identifiers being fetched right now.
    pub(crate) fn count(&self) -> usize {
        self.map.lock().len()
    }
}

/// Lands flights when dropped, however the task holding it ends (a panic included): no key
/// stays joined to a flight nobody will resolve.
#[derive(Debug)]
pub(crate) struct Landing {
    flights: Arc<Flights>,
    fingerprint: Fingerprint,
    list: Vec<(CacheKey, u64)>,
}

impl Landing {
    pub(crate) fn of(
        flights: &Arc<Flights>,
        fingerprint: Fingerprint,
        new: &[NewFlight],
    ) -> Landing {
        Landing {
            flights: flights.clone(),
            fingerprint,
            list: new.iter().map(|f| (f.key.clone(), f.id)).collect(),
        }
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        for (key, id) in self.list.drain(..) {
            self.flights.land(self.fingerprint, key, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::request::Ident;
    use std::time::Duration;

    fn key(token: &str) -> CacheKey {
        CacheKey::new(
            Arc::from("http://u"),
            Arc::from("app"),
            None,
            Ident::Token(token.into()),
        )
    }

    fn items(tokens: &[&str]) -> Vec<(CacheKey, Box<str>)> {
        tokens
            .iter()
            .map(|t| (key(t), format!("{t:?}").into_boxed_str()))
            .collect()
    }

    #[tokio::test]
    async fn concurrent_requests_for_one_key_share_one_flight() {
        let f = Arc::new(Flights::default());
        let (w1, new1) = f.register([1; 32], items(&["a", "b"]));
        assert_eq!(new1.len(), 2);
        let (w2, new2) = f.register([1; 32], items(&["b", "c"]));
        assert!(w2[0].1, "b joins the flight in the air");
        assert!(!w2[1].1);
        assert_eq!(new2.len(), 1);
        // Another credential never joins: it gets its own flight.
        let (w3, new3) = f.register([2; 32], items(&["a"]));
        assert!(!w3[0].1);
        assert_eq!(new3.len(), 1);
        assert_eq!(f.count(), 4);
        let e = lost();
        for n in &new1 {
            n.resolve(Err(e.clone()));
        }
        let (b_waiter, _) = w2.into_iter().next().expect("b");
        assert!(
            b_waiter.result().await.is_err(),
            "the joined waiter gets b's result"
        );
        for n in new1 {
            f.land([1; 32], n.key, n.id);
        }
        assert_eq!(f.count(), 2);
        drop(w1);
    }

    /// Regression (issue 11, item 8): a panic in a batch task left its flights registered
    /// forever, so every later request for those keys joined a flight nobody would resolve.
    #[tokio::test]
    async fn a_task_that_panics_leaves_no_flight_behind() {
        let f = Arc::new(Flights::default());
        let (waiters, new) = f.register([3; 32], items(&["t"]));
        let task = tokio::spawn({
            let f = f.clone();
            async move {
                let _landing = Landing::of(&f, [3; 32], &new);
                let _new = new;
                panic!("a bug in the batch task (injected)");
            }
        });
        assert!(task.await.expect_err("it panicked").is_panic());
        assert_eq!(f.count(), 0, "its flight was landed");
        let (waiter, joined) = waiters.into_iter().next().expect("one waiter");
        assert!(!joined);
        let result = tokio::time::timeout(Duration::from_secs(1), waiter.result())
            .await
            .expect("the waiter is answered, not left hanging");
        assert!(result.is_err());
        let (again, new) = f.register([3; 32], items(&["t"]));
        assert!(!again[0].1, "a new flight, not the dead one");
        assert_eq!(new.len(), 1);
    }

    /// A flight whose sender is gone without being landed is replaced, not joined.
    #[test]
    fn a_dead_flight_is_replaced() {
        let f = Flights::default();
        let (_, new) = f.register([4; 32], items(&["t"]));
        drop(new);
        let (again, new) = f.register([4; 32], items(&["t"]));
        assert!(!again[0].1);
        assert_eq!(new.len(), 1);
        let (joined, none) = f.register([4; 32], items(&["t"]));
        assert!(joined[0].1, "a live flight is joined");
        assert!(none.is_empty());
    }
}
