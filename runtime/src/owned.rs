//! The objects a singleton concern owns and writes whole, one per key (`BGPNodeConfig` per
//! node, `EgressRoute` per policy): which to write and delete ([`OwnedObjects::plan`], on
//! [`revisions::plan`]), the writes themselves, a bounded number in flight
//! ([`OwnedObjects::apply_all`]), deletions that never remove a newer object of the same
//! name ([`OwnedObjects::delete`]), and the watch trigger that remembers deletions by
//! someone else so the object comes back with a higher revision ([`OwnedObjects::trigger`]).

use crate::caches::{Cache, Cached, Change, Seen};
use crate::revisions::{self, Plan, Revisioned, Revisions};
use futures::{Stream, StreamExt};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use tracing::{debug, warn};

/// A concern's owned objects of kind `K` with spec `S`, keyed by name. Cheap to clone.
#[derive(Clone)]
pub struct OwnedObjects<K: Cached, S> {
    /// The kind, for logs.
    kind: &'static str,
    store: Store<K>,
    spec: fn(&K) -> &S,
    /// The last spec written per name (the store lags behind our own writes), or seen
    /// deleted by someone else (put back with a higher revision).
    written: Revisions<String, S>,
}

/// The outcome of [`OwnedObjects::apply_all`].
pub struct Applied<S> {
    /// The objects written, with the spec each now carries.
    pub written: Vec<(String, S)>,
    pub first_error: Option<kube::Error>,
}

impl<K, S> OwnedObjects<K, S>
where
    K: Cached + ResourceExt,
    S: Revisioned + PartialEq + Send + 'static,
{
    pub fn new(kind: &'static str, cache: &Cache<K>, spec: fn(&K) -> &S) -> Self {
        Self {
            kind,
            store: cache.store(),
            spec,
            written: Revisions::default(),
        }
    }

    /// The object's watch changes that need a look: a generation change (our own writes
    /// come back here; an edit by someone else is put back) or a deletion, which is
    /// remembered so the object returns with a higher revision. Neither is a change of
    /// intent.
    pub fn trigger(
        &self,
        cache: &Cache<K>,
    ) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static + use<K, S> {
        let seen = Seen::default();
        let written = self.written.clone();
        let spec = self.spec;
        cache.trigger_when(move |c| {
            if let Change::Deleted(obj) = c {
                written.deleted(obj.name_any(), spec(obj));
            }
            seen.changed(c, |o: &K| o.meta().generation)
        })
    }

    /// The spec last known for `name`: the store's, or ours when we wrote a newer one.
    pub fn latest(&self, name: &str) -> Option<S> {
        let stored = self
            .store
            .get(&ObjectRef::new(name))
            .map(|o| (self.spec)(&o).clone());
        self.written.latest(&name.to_string(), stored)
    }

    /// What brings the objects to `desired`: changed specs with their next revision, and
    /// the existing objects to delete — those not desired that `prunable` allows (it is
    /// given the stored object, `None` for one we wrote and the store has not seen yet).
    pub fn plan(
        &self,
        desired: &BTreeMap<String, S>,
        prunable: impl Fn(&str, Option<&K>) -> bool,
    ) -> Plan<String, S> {
        let stored = self.store.state();
        let (current, deleted) = self.written.current(
            stored
                .iter()
                .map(|o| (o.name_any(), (self.spec)(o).clone())),
        );
        let by_name: HashMap<String, &K> =
            stored.iter().map(|o| (o.name_any(), o.as_ref())).collect();
        revisions::plan(desired, &current, &deleted, |name| {
            prunable(name, by_name.get(name).copied())
        })
    }

    /// Runs `write` for each planned `(name, spec)`, `concurrency` at a time; a write that
    /// returns `Ok(true)` is remembered (`Ok(false)`: nothing was written, e.g. the owner
    /// went away since the inputs were read). Failures are logged; the first is returned.
    pub async fn apply_all<F, Fut>(
        &self,
        apply: Vec<(String, S)>,
        concurrency: usize,
        write: F,
    ) -> Applied<S>
    where
        F: Fn(String, S) -> Fut,
        Fut: Future<Output = (String, S, Result<bool, kube::Error>)>,
    {
        let results = futures::stream::iter(apply)
            .map(|(name, spec)| write(name, spec))
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await;
        let mut applied = Applied {
            written: Vec::new(),
            first_error: None,
        };
        for (name, spec, res) in results {
            match res {
                Ok(true) => {
                    debug!(kind = self.kind, %name, revision = spec.revision(), "written");
                    self.written.wrote(name.clone(), &spec);
                    applied.written.push((name, spec));
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(kind = self.kind, %name, error = %e, "write failed");
                    applied.first_error.get_or_insert(e);
                }
            }
        }
        applied
    }

    /// Forgets what we wrote for `name` and deletes the stored object of that name, only
    /// that very object (by uid). Whether something was deleted.
    pub async fn delete(&self, api: &Api<K>, name: &str) -> Result<bool, kube::Error> {
        self.written.forget(&name.to_string());
        let Some(uid) = self.store.get(&ObjectRef::new(name)).and_then(|o| o.uid()) else {
            return Ok(false);
        };
        crate::delete_exact(api, name, &uid).await
    }

    /// We replace the object of `name` ourselves (delete, then write anew).
    pub fn forget(&self, name: &str) {
        self.written.forget(&name.to_string());
    }
}
