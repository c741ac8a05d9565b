//! Micro-batching: new flights of the same scope (credential, AccessID, operator_type,
//! top-level fields) are gathered for `shield.batch_window`, or until `upstream.max_batch`,
//! and sent as one upstream call. Identifiers sharing a name never share a call (answers are
//! matched to identifiers by name, see [`crate::api::answer::parse_upstream_answer`]).
//! The scopes are bounded by the requests in flight.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;

use super::flights::NewFlight;
use super::RequestContext;
use crate::api::request::Op;
use crate::trust::Fingerprint;

/// What flights must share to travel in one upstream call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Scope {
    fingerprint: Fingerprint,
    access_id: Arc<str>,
    op: Op,
    top_scope: Option<Arc<str>>,
}

impl Scope {
    pub(crate) fn of(ctx: &RequestContext) -> Scope {
        Scope {
            fingerprint: ctx.fingerprint,
            access_id: ctx.access_id.clone(),
            op: ctx.op,
            top_scope: ctx.top_scope.clone(),
        }
    }
}

/// Flights to send in one upstream call.
#[derive(Debug)]
pub(crate) struct Batch {
    /// Numbered like flights (see [`super::flights::Flights::next_id`]).
    pub(crate) id: u64,
    pub(crate) ctx: Arc<RequestContext>,
    pub(crate) items: Vec<NewFlight>,
    names: HashSet<Box<str>>,
}

impl Batch {
    pub(crate) fn new(id: u64, ctx: Arc<RequestContext>, items: Vec<NewFlight>) -> Batch {
        Batch {
            id,
            ctx,
            items,
            names: HashSet::new(),
        }
    }
}

/// The batches being gathered.
#[derive(Debug)]
pub(crate) struct Batcher {
    pending: Mutex<HashMap<Scope, Batch>>,
    max_batch: usize,
    /// Whether batches wait for a window (`shield.batch_window` > 0) or go at once.
    windowed: bool,
}

/// What [`Batcher::add`] decided.
#[derive(Debug, Default)]
pub(crate) struct Added {
    /// Batches to send now (full, or closed by a repeated name, or no window).
    pub(crate) ready: Vec<Batch>,
    /// Batches opened now: each goes when its window ends ([`Batcher::due`]).
    pub(crate) opened: Vec<u64>,
}

impl Batcher {
    pub(crate) fn new(max_batch: usize, windowed: bool) -> Batcher {
        Batcher {
            pending: Mutex::new(HashMap::new()),
            max_batch: max_batch.max(1),
            windowed,
        }
    }

    /// Adds `items` (all of `ctx`'s scope) to the batches being gathered; `next_id` numbers new
    /// batches.
    pub(crate) fn add(
        &self,
        ctx: &Arc<RequestContext>,
        items: Vec<NewFlight>,
        mut next_id: impl FnMut() -> u64,
    ) -> Added {
        let mut added = Added::default();
        if items.is_empty() {
            return added;
        }
        let scope = Scope::of(ctx);
        let mut pending = self.pending.lock();
        for item in items {
            let name = item.key.ident.name();
            let must_flush = pending
                .get(&scope)
                .is_some_and(|b| b.items.len() >= self.max_batch || b.names.contains(name));
            if must_flush {
                added.ready.extend(pending.remove(&scope));
            }
            let batch = pending.entry(scope.clone()).or_insert_with(|| {
                let id = next_id();
                added.opened.push(id);
                Batch::new(id, ctx.clone(), Vec::new())
            });
            batch.names.insert(name.into());
            batch.items.push(item);
            if batch.items.len() >= self.max_batch {
                added.ready.extend(pending.remove(&scope));
            }
        }
        if !self.windowed {
            added.ready.extend(pending.remove(&scope));
            added.opened.clear();
        }
        added
    }

    /// The batch `id` of `ctx`'s scope, when its window ends (if it has not gone already).
    pub(crate) fn due(&self, ctx: &RequestContext, id: u64) -> Option<Batch> {
        let scope = Scope::of(ctx);
        let mut pending = self.pending.lock();
        if pending.get(&scope).is_some_and(|b| b.id == id) {
            pending.remove(&scope)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::request::Ident;
    use crate::cache::CacheKey;
    use crate::fetch::flights::Flights;

    fn ctx(fp: u8) -> Arc<RequestContext> {
        Arc::new(RequestContext {
            fingerprint: [fp; 32],
            access_id: Arc::from("app"),
            op: Op::AccountTokens,
            top_scope: None,
            top_fields: Vec::new(),
            headers: http::HeaderMap::new(),
            auth: crate::upstream::Auth::Header(http::HeaderValue::from_static("Basic eDp5")),
        })
    }

    fn flights(f: &Flights, fp: u8, accounts: &[(&str, Option<i64>)]) -> Vec<NewFlight> {
        let items = accounts
            .iter()
            .map(|(a, t)| {
                let key = CacheKey::new(
                    Arc::from("http://u"),
                    Arc::from("app"),
                    None,
                    Ident::Account {
                        account: (*a).into(),
                        account_type: *t,
                        extra: None,
                    },
                );
                (key, format!("{{\"account\":{a:?}}}").into_boxed_str())
            })
            .collect();
        f.register([fp; 32], items).1
    }

    fn names(b: &Batch) -> Vec<&str> {
        b.items.iter().map(|i| i.key.ident.name()).collect()
    }

    #[test]
    fn batches_close_at_max_batch() {
        let (f, b) = (Flights::default(), Batcher::new(2, true));
        let c = ctx(1);
        let added = b.add(
            &c,
            flights(&f, 1, &[("a", None), ("b", None), ("c", None)]),
            || f.next_id(),
        );
        assert_eq!(added.ready.len(), 1);
        assert_eq!(names(&added.ready[0]), ["a", "b"]);
        assert_eq!(added.opened.len(), 2, "a second batch was opened for c");
        let due = b.due(&c, added.opened[1]).expect("c waits for its window");
        assert_eq!(names(&due), ["c"]);
        assert!(b.due(&c, added.opened[1]).is_none(), "it went once");
    }

    #[test]
    fn one_name_never_travels_twice_in_a_batch() {
        let (f, b) = (Flights::default(), Batcher::new(10, true));
        let c = ctx(1);
        let added = b.add(&c, flights(&f, 1, &[("a", None), ("a", Some(1))]), || {
            f.next_id()
        });
        assert_eq!(
            added.ready.len(),
            1,
            "the batch holding a is sent before a's twin joins one"
        );
        assert_eq!(names(&added.ready[0]), ["a"]);
        let later = b.due(&c, added.opened[1]).expect("the twin's batch");
        assert_eq!(names(&later), ["a"]);
    }

    #[test]
    fn requests_of_one_scope_share_a_batch_and_other_scopes_do_not() {
        let (f, b) = (Flights::default(), Batcher::new(10, true));
        let (c1, c2) = (ctx(1), ctx(2));
        let first = b.add(&c1, flights(&f, 1, &[("a", None)]), || f.next_id());
        let second = b.add(&c1, flights(&f, 1, &[("b", None)]), || f.next_id());
        let other = b.add(&c2, flights(&f, 2, &[("c", None)]), || f.next_id());
        assert!(second.opened.is_empty(), "b joined a's batch");
        assert_eq!(
            other.opened.len(),
            1,
            "another credential has its own batch"
        );
        let batch = b.due(&c1, first.opened[0]).expect("due");
        assert_eq!(names(&batch), ["a", "b"]);
    }

    #[test]
    fn without_a_window_batches_go_at_once() {
        let (f, b) = (Flights::default(), Batcher::new(10, false));
        let added = b.add(&ctx(1), flights(&f, 1, &[("a", None), ("b", None)]), || {
            f.next_id()
        });
        assert_eq!(added.ready.len(), 1);
        assert!(added.opened.is_empty());
    }
}
