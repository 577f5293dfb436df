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
//! again after each relist — for "something changed" wake-ups), [`Cache::changes`] (the
//! same as a stream of typed [`Change`]s, starting from the store: for a consumer that keeps
//! an index of its own), and [`Cache::trigger`] / [`Cache::applied`] (the store's objects,
//! then every change: the input of a kube-runtime `Controller`, via `Controller::for_stream`,
//! `owns_stream` or `watches_stream`). `tendril_cache_watches{group,kind,scope}` counts the
//! watches started, so a test can prove there is exactly one per kind. Cached objects carry
//! no `metadata.managedFields` (read an object from the API to see them).

use crate::metrics::Metrics;
use futures::{FutureExt, Stream, StreamExt};
use kube::core::Status;
use kube::runtime::reflector::{self, ObjectRef, Store};
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
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// Changes buffered per subscriber before it lags (and gets the whole store again).
const CHANGE_BUFFER: usize = 4096;

/// `group` tells kinds of the same name apart (`NetworkPolicy` of `networking.k8s.io` and of
/// `tendril.dev`); it is empty for the core group.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    group: String,
    kind: String,
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    group: String,
    kind: String,
}

impl KindLabels {
    fn of<K: Cached>() -> Self {
        Self {
            group: K::group(&()).to_string(),
            kind: K::kind(&()).to_string(),
        }
    }
}

/// What happened to a cache.
pub enum Change<K> {
    /// The object was created or changed (or is in the store when the change stream began,
    /// or after a relist).
    Applied(Arc<K>),
    /// The object was deleted; in its last known state.
    Deleted(Arc<K>),
    /// The store now holds a complete list: anything a consumer knows that it lacks is
    /// gone (a relist may hide deletions the watch missed). Every object follows as
    /// `Applied`.
    Listed,
    /// The watch failed (it retries with backoff); nothing changed. Trigger streams carry
    /// it to their controllers, which count it in `tendril_watch_errors_total{controller}`.
    Failed(Arc<watcher::Error>),
}

impl<K> Change<K> {
    /// The object applied or deleted; `None` for [`Change::Listed`] and [`Change::Failed`].
    pub fn object(&self) -> Option<&Arc<K>> {
        match self {
            Change::Applied(obj) | Change::Deleted(obj) => Some(obj),
            Change::Listed | Change::Failed(_) => None,
        }
    }

    /// The item of a controller's trigger stream: the object applied (or deleted, with
    /// `deletions`), or the watch's failure; `None` for anything else.
    pub fn into_trigger(self, deletions: bool) -> Option<Result<K, watcher::Error>>
    where
        K: Clone,
    {
        match self {
            Change::Applied(obj) => Some(Ok(K::clone(&obj))),
            Change::Deleted(obj) if deletions => Some(Ok(K::clone(&obj))),
            Change::Deleted(_) | Change::Listed => None,
            Change::Failed(e) => Some(Err(failure(&e))),
        }
    }
}

/// An owned copy of a watch error, for each controller it is handed to (the error types
/// are not `Clone`): the apiserver's status when there is one, else the message.
fn failure(e: &watcher::Error) -> watcher::Error {
    let status = match e {
        watcher::Error::WatchError(status) => Status::clone(status),
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Status::clone(status),
        other => Status::failure(&other.to_string(), "WatchFailed"),
    };
    watcher::Error::WatchError(Box::new(status))
}

impl<K> Clone for Change<K> {
    fn clone(&self) -> Self {
        match self {
            Change::Applied(obj) => Change::Applied(obj.clone()),
            Change::Deleted(obj) => Change::Deleted(obj.clone()),
            Change::Listed => Change::Listed,
            Change::Failed(e) => Change::Failed(e.clone()),
        }
    }
}

impl<K: Resource> Debug for Change<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |obj: &Arc<K>| obj.meta().name.clone().unwrap_or_default();
        match self {
            Change::Applied(obj) => write!(f, "Applied({})", name(obj)),
            Change::Deleted(obj) => write!(f, "Deleted({})", name(obj)),
            Change::Listed => f.write_str("Listed"),
            Change::Failed(e) => write!(f, "Failed({e})"),
        }
    }
}

/// A change as the broadcast buffer holds it. The buffer keeps its last `CHANGE_BUFFER`
/// entries whether or not every subscriber has read them, so an applied object is held
/// weakly: once the store replaces it (a newer version, a deletion, a relist) its content
/// is freed and subscribers skip it (the change that replaced it follows in the buffer).
/// Held strongly, the buffers kept up to 4,096 superseded versions of every kind: tens of
/// MB at 10k Services of 20 backends under churn.
enum Sent<K> {
    /// The store's own `Arc` of the object.
    Applied(Weak<K>),
    /// An object the store no longer held as it was published (kept whole).
    AppliedOwned(Arc<K>),
    Deleted(Arc<K>),
    Listed,
    Failed(Arc<watcher::Error>),
}

impl<K> Clone for Sent<K> {
    fn clone(&self) -> Self {
        match self {
            Sent::Applied(obj) => Sent::Applied(obj.clone()),
            Sent::AppliedOwned(obj) => Sent::AppliedOwned(obj.clone()),
            Sent::Deleted(obj) => Sent::Deleted(obj.clone()),
            Sent::Listed => Sent::Listed,
            Sent::Failed(e) => Sent::Failed(e.clone()),
        }
    }
}

impl<K> Sent<K> {
    /// The change, or `None` for an applied object the store has replaced since.
    fn change(self) -> Option<Change<K>> {
        Some(match self {
            Sent::Applied(obj) => Change::Applied(obj.upgrade()?),
            Sent::AppliedOwned(obj) => Change::Applied(obj),
            Sent::Deleted(obj) => Change::Deleted(obj),
            Sent::Listed => Change::Listed,
            Sent::Failed(e) => Change::Failed(e),
        })
    }
}

/// A subscription to a cache's changes (see [`Cache::subscribe`]).
pub struct Subscription<K> {
    rx: broadcast::Receiver<Sent<K>>,
}

impl<K: Cached> Subscription<K> {
    /// The next object applied or deleted.
    pub async fn recv(&mut self) -> Result<Arc<K>, broadcast::error::RecvError> {
        loop {
            if let Some(obj) = self.recv_change().await?.object() {
                return Ok(obj.clone());
            }
        }
    }

    /// The next change (an object applied and replaced in the store since is skipped: the
    /// change that replaced it comes next).
    pub async fn recv_change(&mut self) -> Result<Change<K>, broadcast::error::RecvError> {
        loop {
            if let Some(change) = self.rx.recv().await?.change() {
                return Ok(change);
            }
        }
    }
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
/// With each, the name of the trim of its objects, if any.
type Entries = HashMap<(String, String), (Box<dyn Any + Send + Sync>, Option<String>)>;

/// What cuts an object down as it arrives (see [`Caches::all_trimmed`]).
type Trim<K> = Arc<dyn Fn(&mut K) + Send + Sync>;

/// The process's registry of caches (cheap to clone; clones share it).
#[derive(Clone)]
pub struct Caches {
    client: Client,
    entries: Arc<Mutex<Entries>>,
    watches: Family<WatchLabels, Gauge>,
    errors: Family<KindLabels, Counter>,
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
                "Watches this process started, per group, kind and scope (one per kind is the design)",
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
        self.get_or_start(SCOPE_ALL, None, || {
            (Api::all(self.client.clone()), watcher::Config::default())
        })
    }

    /// [`Caches::all`], each object cut down by `trim` as it arrives, before the store and
    /// the change stream hold it: for a kind whose objects are large and of which the
    /// operator reads little (a Pod's volumes, env, probes and container statuses are most
    /// of it). The kind's one cache is then trimmed for everyone, so every user must ask
    /// through the same `trim`; asking for it untrimmed, or trimmed otherwise, panics (a
    /// bug every test that starts the operator finds).
    pub fn all_trimmed<K: Cached>(&self, trim: fn(&mut K)) -> Cache<K> {
        self.all_trimmed_by(&format!("fn@{:x}", trim as usize), trim)
    }

    /// [`Caches::all_trimmed`] by a closure (one that reads the process's configuration,
    /// e.g. its node); `name` says which trim it is, for the check that every user asks
    /// for the same.
    pub fn all_trimmed_by<K: Cached>(
        &self,
        name: &str,
        trim: impl Fn(&mut K) + Send + Sync + 'static,
    ) -> Cache<K> {
        self.get_or_start(SCOPE_ALL, Some((name, Arc::new(trim))), || {
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
        self.get_or_start(scope, None, || (api, config))
    }

    fn get_or_start<K: Cached>(
        &self,
        scope: &str,
        trim: Option<(&str, Trim<K>)>,
        watch: impl FnOnce() -> (Api<K>, watcher::Config),
    ) -> Cache<K> {
        let labels = KindLabels::of::<K>();
        let key = (
            format!("{}/{}", K::api_version(&()), labels.kind),
            scope.to_string(),
        );
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let trim_id = trim.as_ref().map(|(name, _)| name.to_string());
        let trim = trim.map(|(_, f)| f);
        if let Some((existing, existing_trim)) = entries.get(&key) {
            assert!(
                *existing_trim == trim_id,
                "the cache of {key:?} is shared: every user must trim it the same way"
            );
            return existing
                .downcast_ref::<Cache<K>>()
                .expect("a cache key names one type")
                .clone();
        }
        let (api, config) = watch();
        let cache = Cache::start(
            api,
            config,
            trim,
            self.errors.get_or_create(&labels).clone(),
        );
        self.watches
            .get_or_create(&WatchLabels {
                group: labels.group,
                kind: labels.kind,
                scope: scope.to_string(),
            })
            .inc();
        entries.insert(key, (Box::new(cache.clone()), trim_id));
        cache
    }
}

/// One shared watch: its store and its changes.
pub struct Cache<K: Cached> {
    store: Store<K>,
    changes: broadcast::Sender<Sent<K>>,
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
    fn start(api: Api<K>, config: watcher::Config, trim: Option<Trim<K>>, errors: Counter) -> Self {
        let (store, writer) = reflector::store();
        let cache = Self::from_store(store);
        let publisher = cache.clone();
        // managedFields are dropped: no consumer of a cache reads them, and they are often
        // the largest part of an object written by several managers (an LBService, a
        // NodeNetwork), so at 10k objects they dominate the process's memory.
        let watch = watcher(api, config).modify(move |obj| {
            kube::ResourceExt::managed_fields_mut(obj).clear();
            if let Some(trim) = &trim {
                trim(obj);
            }
        });
        let stream = reflector::reflector(writer, watch).backoff(watch_backoff());
        tokio::spawn(stream.for_each(move |event| {
            if event.is_err() {
                errors.inc();
            }
            publisher.publish(event);
            futures::future::ready(())
        }));
        cache
    }

    /// Tells the subscribers about `event`, already applied to the store.
    fn publish(&self, event: Result<watcher::Event<K>, watcher::Error>) {
        if event.is_ok() {
            self.forbidden.send_if_modified(|f| f.take().is_some());
        }
        // No subscriber is not an error.
        match event {
            Ok(watcher::Event::Apply(obj)) => {
                // The store's copy (the reflector cloned it in): the change buffer then holds
                // no second copy of current objects.
                let stored = self
                    .store
                    .get(&ObjectRef::from_obj(&obj))
                    .filter(|s| s.meta().resource_version == obj.meta().resource_version);
                let _ = self.changes.send(match stored {
                    Some(stored) => Sent::Applied(Arc::downgrade(&stored)),
                    None => Sent::AppliedOwned(Arc::new(obj)),
                });
            }
            Ok(watcher::Event::Delete(obj)) => {
                let _ = self.changes.send(Sent::Deleted(Arc::new(obj)));
            }
            // After every (re)list, every object again: a relist may hide deletions and
            // changes the watch missed.
            Ok(watcher::Event::InitDone) => {
                let _ = self.changes.send(Sent::Listed);
                for obj in self.store.state() {
                    let _ = self.changes.send(Sent::Applied(Arc::downgrade(&obj)));
                }
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(e) => {
                if let Some(message) = forbidden_message(&e) {
                    self.forbidden.send_if_modified(|f| {
                        let first = f.is_none();
                        *f = Some(message);
                        first
                    });
                } else {
                    tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying");
                }
                let _ = self.changes.send(Sent::Failed(Arc::new(e)));
            }
        }
    }

    /// Builds a cache over a hand-fed store (tests, and replaying a fixed world).
    pub fn from_store(store: Store<K>) -> Self {
        Self {
            store,
            changes: broadcast::channel(CHANGE_BUFFER).0,
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
    pub fn subscribe(&self) -> Subscription<K> {
        Subscription {
            rx: self.changes.subscribe(),
        }
    }

    /// Every change as a stream: when the store has completed a list, first
    /// [`Change::Listed`] and its objects; then each change as it happens. A consumer that
    /// falls behind gets `Listed` and the whole store again instead of the changes it
    /// missed, so an index kept from this stream never drifts from the store.
    pub fn changes(&self) -> impl Stream<Item = Change<K>> + Send + 'static + use<K> {
        struct State<K: Cached> {
            rx: broadcast::Receiver<Sent<K>>,
            store: Store<K>,
            pending: VecDeque<Change<K>>,
        }
        let rx = self.changes.subscribe();
        let state = State {
            rx,
            pending: snapshot(&self.store),
            store: self.store.clone(),
        };
        futures::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(change) = s.pending.pop_front() {
                    return Some((change, s));
                }
                match s.rx.recv().await {
                    Ok(sent) => {
                        if let Some(change) = sent.change() {
                            return Some((change, s));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(kind = %K::kind(&()), missed, "change stream lagged; replaying the store");
                        s.pending = snapshot(&s.store);
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    /// The objects in the store now, then every object applied or deleted, and every
    /// failure of the watch (so the controller counts it, as with a watch of its own);
    /// after a lag, the whole store again. Feed it to `Controller::for_stream` (with
    /// [`Cache::store`]), `owns_stream` or `watches_stream` (as `touched_objects` of a
    /// private watch would).
    pub fn trigger(
        &self,
    ) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static + use<K> {
        self.changes()
            .filter_map(|change| futures::future::ready(change.into_trigger(true)))
    }

    /// Like [`Cache::trigger`], but only the changes `matters` says yes to (watch failures
    /// always pass), so a concern wakes on what it reads of an object, not on every write.
    pub fn trigger_when(
        &self,
        mut matters: impl FnMut(&Change<K>) -> bool + Send + 'static,
    ) -> futures::stream::BoxStream<'static, Result<K, watcher::Error>> {
        self.changes()
            .filter_map(move |change| {
                let keep = matches!(change, Change::Failed(_)) || matters(&change);
                futures::future::ready(if keep {
                    change.into_trigger(true)
                } else {
                    None
                })
            })
            .boxed()
    }

    /// Like [`Cache::trigger_when`], waking only when `value` (the part of an object the
    /// concern reads) changed, an object was deleted, or the cache relisted.
    ///
    /// What is kept per object is a 64-bit digest of `value`, not the value: at 100k
    /// Endpoints a copy of each one's labels was megabytes per consumer.
    pub fn trigger_on<V: std::hash::Hash>(
        &self,
        value: impl Fn(&K) -> V + Send + 'static,
    ) -> futures::stream::BoxStream<'static, Result<K, watcher::Error>> {
        let seen = Seen::default();
        self.trigger_when(move |c| seen.changed(c, |obj| digest(&value(obj))))
    }

    /// Like [`Cache::trigger`] without deletions (as `applied_objects` of a private watch).
    pub fn applied(
        &self,
    ) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static + use<K> {
        self.changes()
            .filter_map(|change| futures::future::ready(change.into_trigger(false)))
    }
}

/// A 64-bit digest of `value` (SipHash with fixed keys: the same in every pass of one process).
fn digest<V: std::hash::Hash>(value: &V) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

/// The part of each object a consumer reads, as last seen, so a change stream can tell a
/// change that matters from a write that touched something else (a heartbeat, a status).
pub struct Seen<V>(Mutex<HashMap<String, V>>);

impl<V> Default for Seen<V> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<V: PartialEq> Seen<V> {
    /// Takes in `change` with `value` the part that matters; whether it changed.
    pub fn changed<K: Resource>(&self, change: &Change<K>, value: impl Fn(&K) -> V) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match change {
            Change::Applied(obj) => {
                let name = crate::object_key(obj.as_ref());
                let v = value(obj);
                let changed = seen.get(&name) != Some(&v);
                seen.insert(name, v);
                changed
            }
            Change::Deleted(obj) => {
                seen.remove(&crate::object_key(obj.as_ref()));
                true
            }
            // A relist may hide deletions: forget everything, so every object replayed
            // next counts as new and the recompute reads the complete store.
            Change::Listed => {
                seen.clear();
                true
            }
            Change::Failed(_) => false,
        }
    }
}

/// `Listed` and every object of `store`, when it has completed a list; nothing before.
fn snapshot<K: Cached>(store: &Store<K>) -> VecDeque<Change<K>> {
    if !matches!(store.wait_until_ready().now_or_never(), Some(Ok(()))) {
        return VecDeque::new();
    }
    std::iter::once(Change::Listed)
        .chain(store.state().into_iter().map(Change::Applied))
        .collect()
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

/// The retry curve of the shared watches: client-go's (0.8 s doubling, jittered) capped at
/// 10 s instead of 30 s, and reset by any event rather than after 120 s without errors. After
/// an apiserver or etcd restart the first answers are 410 Expired; with the default curve,
/// grown during the outage, the relist that follows could wait 30 s more.
fn watch_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(800))
        .with_max_delay(Duration::from_secs(10))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// The trigger backoff of every controller on these caches: none. The caches' watches
/// already retry with [`watch_backoff`] and forward each failure to every subscriber (so
/// each controller counts it); kube-runtime's default trigger backoff (0.8 s doubling to
/// 30 s) then slept after every forwarded failure *before the next trigger*, so after an
/// outage a controller worked through its backlog of failures for a minute or more before
/// it saw the change that followed them.
pub struct NoTriggerDelay;

impl Iterator for NoTriggerDelay {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for NoTriggerDelay {
    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::api::networking::v1 as k8s;
    use kube::api::ObjectMeta;
    use tendril_crds::v1alpha1::NetworkPolicy;

    fn cm(name: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A hand-fed cache: `feed` applies an event to the store, then publishes it, as the
    /// watch task does.
    fn fed() -> (Cache<ConfigMap>, impl FnMut(watcher::Event<ConfigMap>)) {
        let (store, mut writer) = reflector::store();
        let cache = Cache::from_store(store);
        let publisher = cache.clone();
        (cache, move |event| {
            writer.apply_watcher_event(&event);
            publisher.publish(Ok(event));
        })
    }

    fn listed(names: &[&str]) -> Vec<watcher::Event<ConfigMap>> {
        std::iter::once(watcher::Event::Init)
            .chain(names.iter().map(|n| watcher::Event::InitApply(cm(n))))
            .chain([watcher::Event::InitDone])
            .collect()
    }

    fn describe(change: &Change<ConfigMap>) -> String {
        format!("{change:?}")
    }

    async fn next_n<S: Stream<Item = Change<ConfigMap>> + Unpin>(
        s: &mut S,
        n: usize,
    ) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(describe(&s.next().await.expect("stream open")));
        }
        out
    }

    #[tokio::test]
    async fn changes_start_from_a_listed_store_then_follow_the_watch() {
        let (cache, mut feed) = fed();
        // Before the first list: nothing to replay; the list itself arrives as Listed + objects.
        let mut early = Box::pin(cache.changes());
        listed(&["a", "b"]).into_iter().for_each(&mut feed);
        let mut got = next_n(&mut early, 3).await;
        got[1..].sort();
        assert_eq!(got, ["Listed", "Applied(a)", "Applied(b)"]);

        // After it: the store first, then the changes, typed.
        let mut late = Box::pin(cache.changes());
        feed(watcher::Event::Apply(cm("c")));
        feed(watcher::Event::Delete(cm("a")));
        let mut got = next_n(&mut late, 3).await;
        got[1..].sort();
        assert_eq!(got, ["Listed", "Applied(a)", "Applied(b)"]);
        assert_eq!(next_n(&mut late, 2).await, ["Applied(c)", "Deleted(a)"]);
        assert_eq!(
            next_n(&mut early, 2).await,
            ["Applied(c)", "Deleted(a)"],
            "every consumer sees every change"
        );

        // A relist that hides a deletion says Listed: the consumer drops what the store lacks.
        listed(&["b"]).into_iter().for_each(&mut feed);
        assert_eq!(next_n(&mut late, 2).await, ["Listed", "Applied(b)"]);
    }

    #[tokio::test]
    async fn a_version_the_store_replaced_is_freed_and_skipped() {
        let (cache, mut feed) = fed();
        listed(&[]).into_iter().for_each(&mut feed);
        let mut changes = Box::pin(cache.changes());
        let mut sub = cache.subscribe();
        assert_eq!(next_n(&mut changes, 1).await, ["Listed"]);
        let version = |v: &str| {
            let mut c = cm("a");
            c.metadata.resource_version = Some(v.into());
            c
        };
        feed(watcher::Event::Apply(version("1")));
        let first = cache.store().state()[0].clone();
        let first_weak = Arc::downgrade(&first);
        drop(first);
        feed(watcher::Event::Apply(version("2")));
        // Nobody has read version 1 yet, and the buffer holds it, but not its content.
        assert_eq!(
            first_weak
                .upgrade()
                .map(|c| c.metadata.resource_version.clone()),
            None
        );
        let got = changes.next().await.expect("open");
        let Change::Applied(obj) = got else {
            panic!("{got:?}")
        };
        assert_eq!(obj.metadata.resource_version.as_deref(), Some("2"));
        let obj = sub.recv().await.expect("open");
        assert_eq!(obj.metadata.resource_version.as_deref(), Some("2"));
        // A deletion keeps the object's last state.
        feed(watcher::Event::Delete(version("2")));
        assert_eq!(next_n(&mut changes, 1).await, ["Deleted(a)"]);
    }

    #[tokio::test]
    async fn trigger_and_subscribe_carry_objects_and_applied_drops_deletions() {
        let (cache, mut feed) = fed();
        listed(&["a"]).into_iter().for_each(&mut feed);
        let mut trigger = Box::pin(cache.trigger());
        let mut applied = Box::pin(cache.applied());
        let mut sub = cache.subscribe();
        feed(watcher::Event::Delete(cm("a")));
        feed(watcher::Event::Apply(cm("b")));
        let name = |o: &ConfigMap| o.metadata.name.clone().unwrap();
        let mut names = Vec::new();
        for _ in 0..3 {
            names.push(name(&trigger.next().await.unwrap().unwrap()));
        }
        assert_eq!(
            names,
            ["a", "a", "b"],
            "the store's a, its deletion, then b"
        );
        let mut names = Vec::new();
        for _ in 0..2 {
            names.push(name(&applied.next().await.unwrap().unwrap()));
        }
        assert_eq!(names, ["a", "b"]);
        assert_eq!(name(&sub.recv().await.unwrap()), "a");
        assert_eq!(name(&sub.recv().await.unwrap()), "b");
    }

    #[tokio::test]
    async fn a_failed_watch_reaches_every_controller_but_no_subscriber() {
        let (cache, mut feed) = fed();
        listed(&[]).into_iter().for_each(&mut feed);
        type Trigger = std::pin::Pin<Box<dyn Stream<Item = Result<ConfigMap, watcher::Error>>>>;
        let mut trigger: Trigger = Box::pin(cache.trigger());
        let mut applied: Trigger = Box::pin(cache.applied());
        let mut sub = cache.subscribe();
        let status = Status::failure("etcdserver: leader changed", "InternalError").with_code(500);
        cache.publish(Err(watcher::Error::WatchError(Box::new(status.clone()))));
        cache.publish(Err(watcher::Error::NoResourceVersion));
        feed(watcher::Event::Apply(cm("a")));
        for stream in [&mut trigger, &mut applied] {
            match stream.next().await.unwrap() {
                Err(watcher::Error::WatchError(s)) => assert_eq!(*s, status),
                other => panic!("{other:?}"),
            }
            match stream.next().await.unwrap() {
                Err(watcher::Error::WatchError(s)) => {
                    assert_eq!(s.reason, "WatchFailed");
                    assert!(s.message.contains("resourceVersion"), "{}", s.message);
                }
                other => panic!("{other:?}"),
            }
            assert!(stream.next().await.unwrap().is_ok());
        }
        assert_eq!(
            sub.recv().await.unwrap().metadata.name.as_deref(),
            Some("a")
        );
    }

    #[tokio::test]
    async fn a_consumer_that_lags_gets_the_whole_store_again() {
        let (cache, mut feed) = fed();
        listed(&["a"]).into_iter().for_each(&mut feed);
        let mut changes = Box::pin(cache.changes());
        assert_eq!(next_n(&mut changes, 2).await, ["Listed", "Applied(a)"]);
        for i in 0..=CHANGE_BUFFER {
            feed(watcher::Event::Apply(cm(&format!("x{i}"))));
        }
        assert_eq!(next_n(&mut changes, 1).await, ["Listed"]);
        let rest = next_n(&mut changes, CHANGE_BUFFER + 2).await;
        assert!(
            rest.iter().all(|c| c.starts_with("Applied(")),
            "{:?}",
            &rest[..3]
        );
    }

    #[tokio::test]
    async fn one_watch_per_kind_and_scope_whoever_asks() {
        // Nothing listens there: the watches fail and retry, which is all this test needs.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let metrics = Metrics::new("test");
        let caches = Caches::new(client.clone(), &metrics);
        let a = caches.all::<ConfigMap>();
        let b = caches.clone().all::<ConfigMap>();
        caches.all::<k8s::NetworkPolicy>();
        caches.all::<NetworkPolicy>();
        caches.scoped::<ConfigMap>(
            "ns/x",
            Api::namespaced(client.clone(), "ns"),
            watcher::Config::default(),
        );
        caches.scoped::<ConfigMap>(
            "ns/x",
            Api::namespaced(client, "ns"),
            watcher::Config::default(),
        );
        // Both handles share one store.
        let (store, _) = (a.store(), b.store());
        assert_eq!(store.state().len(), 0);
        let text = metrics.encode();
        let mut watches: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tendril_cache_watches{"))
            .collect();
        watches.sort();
        assert_eq!(
            watches,
            [
                r#"tendril_cache_watches{group="",kind="ConfigMap",scope="all"} 1"#,
                r#"tendril_cache_watches{group="",kind="ConfigMap",scope="ns/x"} 1"#,
                r#"tendril_cache_watches{group="networking.k8s.io",kind="NetworkPolicy",scope="all"} 1"#,
                r#"tendril_cache_watches{group="tendril.dev",kind="NetworkPolicy",scope="all"} 1"#,
            ]
        );
    }
}
