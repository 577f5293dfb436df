//! One watch per kind per process: every concern that needs the objects of a kind gets a
//! handle to the same reflector store and a subscription to its changes, instead of a watch
//! (and a full copy of every object) of its own.
//!
//! A [`Caches`] registry is made once per process. [`Caches::all`] returns the cache of every
//! object of a kind, cluster-wide, starting its watch on first use; [`Caches::scoped`] one
//! narrowed by namespace and selectors, keyed by a name the caller gives it. Watches live as
//! long as the process — they survive a concern's restart and a lost leadership term — and
//! retry with kube-runtime's backoff; their errors are counted in
//! `tendril_cache_watch_errors_total{kind}` and never end them.
//!
//! Consumers: [`Cache::store`] (the reflector store, ready once the first list completed),
//! [`Cache::subscribe`] (every object applied or deleted from now on, and every object
//! again after each relist — for "something changed" wake-ups), and [`Cache::trigger`]
//! (the store's objects, then every change: the input of a kube-runtime `Controller`, via
//! `Controller::for_stream` / `watches_stream`). `tendril_cache_watches{kind,scope}` counts
//! the watches started, so a test can prove there is exactly one per kind.

use crate::metrics::Metrics;
use futures::{Stream, StreamExt};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::de::DeserializeOwned;
use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, watch};

/// Changes buffered per subscriber before it lags (and gets the whole store again).
const CHANGE_BUFFER: usize = 4096;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    kind: String,
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// The kinds a cache can hold.
pub trait Cached:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
}

impl<K> Cached for K where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
}

/// (api version/kind, scope) → the `Cache<K>` of that kind, type-erased.
type Entries = HashMap<(String, String), Box<dyn Any + Send + Sync>>;

/// The process's registry of caches (cheap to clone; clones share it).
#[derive(Clone)]
pub struct Caches {
    client: Client,
    entries: Arc<Mutex<Entries>>,
    watches: Family<WatchLabels, Gauge>,
    errors: Family<KindLabel, Counter>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches").finish_non_exhaustive()
    }
}

/// The `scope` of a cluster-wide cache.
pub const SCOPE_ALL: &str = "all";

impl Caches {
    pub fn new(client: Client, metrics: &Metrics) -> Self {
        Self {
            client,
            entries: Arc::default(),
            watches: metrics.domain(
                "tendril_cache_watches",
                "Watches this process started, per kind and scope (one per kind is the design)",
                Family::default,
            ),
            errors: metrics.domain(
                "tendril_cache_watch_errors",
                "Errors of the shared watches (retried with backoff)",
                Family::default,
            ),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Every object of kind `K`, cluster-wide.
    pub fn all<K: Cached>(&self) -> Cache<K> {
        self.get_or_start(SCOPE_ALL, || {
            (Api::all(self.client.clone()), watcher::Config::default())
        })
    }

    /// The objects of `api` that `config` selects, shared under `scope` (a name unique among
    /// the scoped caches of `K`, e.g. `default/kubernetes`).
    pub fn scoped<K: Cached>(&self, scope: &str, api: Api<K>, config: watcher::Config) -> Cache<K> {
        assert_ne!(
            scope, SCOPE_ALL,
            "scope {SCOPE_ALL:?} is the cluster-wide cache"
        );
        self.get_or_start(scope, || (api, config))
    }

    fn get_or_start<K: Cached>(
        &self,
        scope: &str,
        watch: impl FnOnce() -> (Api<K>, watcher::Config),
    ) -> Cache<K> {
        let kind = K::kind(&()).to_string();
        let key = (format!("{}/{kind}", K::api_version(&())), scope.to_string());
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = entries.get(&key) {
            return existing
                .downcast_ref::<Cache<K>>()
                .expect("a cache key names one type")
                .clone();
        }
        let (api, config) = watch();
        let cache = Cache::start(
            api,
            config,
            self.errors
                .get_or_create(&KindLabel { kind: kind.clone() })
                .clone(),
        );
        self.watches
            .get_or_create(&WatchLabels {
                kind,
                scope: scope.to_string(),
            })
            .inc();
        entries.insert(key, Box::new(cache.clone()));
        cache
    }
}

/// One shared watch: its store and its changes.
pub struct Cache<K: Cached> {
    store: Store<K>,
    changes: broadcast::Sender<Arc<K>>,
    /// The last attempt to list or watch was refused (403); cleared by the next success.
    forbidden: watch::Sender<Option<String>>,
}

impl<K: Cached> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            changes: self.changes.clone(),
            forbidden: self.forbidden.clone(),
        }
    }
}

impl<K: Cached> Cache<K> {
    /// Starts the watch on the current tokio runtime; it runs until the process ends.
    fn start(api: Api<K>, config: watcher::Config, errors: Counter) -> Self {
        let (store, writer) = reflector::store();
        let (changes, _) = broadcast::channel(CHANGE_BUFFER);
        let cache = Self {
            store,
            changes,
            forbidden: watch::Sender::new(None),
        };
        let (reader, tx, forbidden) = (
            cache.store.clone(),
            cache.changes.clone(),
            cache.forbidden.clone(),
        );
        let kind = K::kind(&()).to_string();
        let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
        tokio::spawn(stream.for_each(move |event| {
            if event.is_ok() {
                forbidden.send_if_modified(|f| f.take().is_some());
            }
            match event {
                Ok(watcher::Event::Apply(obj) | watcher::Event::Delete(obj)) => {
                    // No subscriber is not an error.
                    let _ = tx.send(Arc::new(obj));
                }
                // After every (re)list, every object again: a relist may hide deletions
                // and changes the watch missed.
                Ok(watcher::Event::InitDone) => {
                    for obj in reader.state() {
                        let _ = tx.send(obj);
                    }
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Err(e) => {
                    errors.inc();
                    if let Some(message) = forbidden_message(&e) {
                        forbidden.send_if_modified(|f| {
                            let first = f.is_none();
                            *f = Some(message);
                            first
                        });
                    } else {
                        tracing::warn!(kind, error = %e, "watch failed; retrying");
                    }
                }
            }
            futures::future::ready(())
        }));
        cache
    }

    /// Builds a cache over a hand-fed store (tests, and replaying a fixed world).
    pub fn from_store(store: Store<K>) -> Self {
        Self {
            store,
            changes: broadcast::channel(1).0,
            forbidden: watch::Sender::new(None),
        }
    }

    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// `Some(message)` while listing or watching is refused (403: RBAC lacks a rule); the
    /// watch keeps retrying with backoff and fills the store once it is allowed.
    pub fn forbidden(&self) -> watch::Receiver<Option<String>> {
        self.forbidden.subscribe()
    }

    /// Every object applied or deleted from now on (a deleted one in its last state), and
    /// every object again after each relist. A subscriber that falls more than
    /// `CHANGE_BUFFER` changes behind gets `RecvError::Lagged`: treat it as "everything
    /// may have changed".
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<K>> {
        self.changes.subscribe()
    }

    /// The objects in the store now, then every change; after a lag, the whole store again.
    /// Feed it to `Controller::for_stream` or `watches_stream` with [`Cache::store`].
    pub fn trigger(&self) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
        struct State<K: Cached> {
            rx: broadcast::Receiver<Arc<K>>,
            store: Store<K>,
            pending: VecDeque<Arc<K>>,
        }
        let rx = self.subscribe();
        let state = State {
            rx,
            pending: self.store.state().into(),
            store: self.store.clone(),
        };
        futures::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(obj) = s.pending.pop_front() {
                    return Some((Ok(K::clone(&obj)), s));
                }
                match s.rx.recv().await {
                    Ok(obj) => return Some((Ok(K::clone(&obj)), s)),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(kind = %K::kind(&()), missed, "trigger lagged; replaying the store");
                        s.pending = s.store.state().into();
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }
}

/// The apiserver's message when `e` is a 403.
fn forbidden_message(e: &watcher::Error) -> Option<String> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status))
        | watcher::Error::WatchError(status)
            if status.is_forbidden() =>
        {
            Some(status.message.clone())
        }
        _ => None,
    }
}
