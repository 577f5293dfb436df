//! `tendril-runtime`: the plumbing `tendril-operator` and `tendril-agent` share — the
//! reconciler harness (one run loop, backoff, metrics), server-side apply, conditions,
//! leader election, health, configuration loading and logging. It depends on `tendril-crds`
//! only, so the agent links none of the operator's concerns.
//!
//! A concern is one module that builds a kube-runtime [`Controller`] on the process's
//! shared caches ([`Caches`]: one watch per kind per process, handed to every concern that
//! needs it), implements [`Reconciler`] and hands both to [`run`]; the harness adds a
//! tracing span per reconcile, the controller-runtime metrics, per-object jittered
//! exponential backoff on errors (reset on success), readiness once the main store has
//! synced, and stops the controller when `ctx.shutdown` fires (shutdown signal or lost
//! leadership). A concern that derives one whole state from everything it watches (policy)
//! reconciles a [`singleton`], waits for a quiet moment with a [`debounce::ChangeClock`]
//! and numbers what it writes with [`revisions`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use k8s_openapi::api::core::v1::ConfigMap;
//! use kube::runtime::{Controller, controller::Action};
//! use tendril_runtime::{self as runtime, Context, MetricLabel, Reconciler};
//!
//! #[derive(Debug, thiserror::Error)]
//! enum Error {
//!     #[error("kube api: {0}")]
//!     Kube(#[from] kube::Error),
//! }
//! impl MetricLabel for Error {
//!     fn metric_label(&self) -> &'static str {
//!         match self { Error::Kube(e) => runtime::kube_error_label(e) }
//!     }
//! }
//!
//! struct Example { ctx: Context }
//!
//! impl Reconciler for Example {
//!     type Object = ConfigMap;
//!     type Error = Error;
//!     const NAME: &'static str = "example"; // field manager `tendril-example`
//!     async fn reconcile(&self, cm: Arc<ConfigMap>) -> Result<Action, Error> {
//!         let _ = (&self.ctx, cm);
//!         Ok(Action::await_change())
//!     }
//! }
//!
//! async fn run(ctx: Context) -> anyhow::Result<()> {
//!     let config_maps = ctx.caches.all::<ConfigMap>();
//!     let controller = Controller::for_stream(config_maps.trigger(), config_maps.store());
//!     runtime::run(controller, Example { ctx: ctx.clone() }, &ctx).await;
//!     Ok(())
//! }
//! ```
//!
//! In `tendril-operator` a concern is then one line of the `CONCERNS` list in `main.rs`:
//! `Concern { name: "example", run: |ctx, _term| Box::pin(run(ctx)) }`.

pub mod apply;
pub mod backoff;
pub mod caches;
pub mod conditions;
pub mod config;
pub mod debounce;
pub mod events;
pub mod intern;
pub mod leader;
pub mod logging;
pub mod metrics;
pub mod owned;
pub mod process;
pub mod revisions;
pub mod server;
pub mod singleton;

pub use apply::{
    apply, apply_body, apply_status, controller_owner_ref, delete_exact, field_manager,
};
pub use backoff::{Backoff, BackoffTracker};
pub use caches::{Cache, Caches};
pub use conditions::DesiredCondition;
pub use metrics::{ControllerMetrics, Metrics, OPENMETRICS_CONTENT_TYPE};
pub use server::Health;

use futures::StreamExt;
use futures::future::BoxFuture;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// A short, stable label for the kind of an error, used as the `error` label of
/// `controller_runtime_reconcile_errors_total`.
pub trait MetricLabel {
    fn metric_label(&self) -> &'static str;
}

/// The metric label of a kube client error: `conflict`, `throttled`, `server_error`,
/// `not_found`, `invalid`, `forbidden`, `api_error` or `transport`.
pub fn kube_error_label(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) => match s.code {
            409 => "conflict",
            429 => "throttled",
            404 => "not_found",
            403 | 401 => "forbidden",
            400 | 422 => "invalid",
            c if c >= 500 => "server_error",
            _ => "api_error",
        },
        _ => "transport",
    }
}

impl MetricLabel for kube::Error {
    fn metric_label(&self) -> &'static str {
        kube_error_label(self)
    }
}

/// A cache a reconcile needs has not completed its first list within [`CACHE_WAIT`].
#[derive(Debug, thiserror::Error)]
#[error("the {0} cache has not completed its first list yet")]
pub struct CacheNotReady(pub &'static str);

impl MetricLabel for CacheNotReady {
    fn metric_label(&self) -> &'static str {
        "cache_not_ready"
    }
}

/// The error of a concern whose reconcile only talks to the API and reads caches (most of
/// them); a concern with failures of its own defines its own enum.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    CacheNotReady(#[from] CacheNotReady),
}

impl MetricLabel for ApiError {
    fn metric_label(&self) -> &'static str {
        match self {
            ApiError::Kube(e) => kube_error_label(e),
            ApiError::CacheNotReady(e) => e.metric_label(),
        }
    }
}

/// How long a reconcile waits for a cache before failing (and retrying with backoff).
pub const CACHE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits, bounded by [`CACHE_WAIT`], until `store` has completed its first list.
///
/// Never wait on a store unboundedly inside a reconcile: a store fed by one of the
/// controller's own trigger streams (`watches_stream`) is not polled during graceful
/// shutdown, so the reconcile — and with it the shutdown — would hang forever.
pub async fn cache_ready<K>(
    store: &kube::runtime::reflector::Store<K>,
    what: &'static str,
) -> Result<(), CacheNotReady>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    match tokio::time::timeout(CACHE_WAIT, store_ready(store)).await {
        Ok(true) => Ok(()),
        _ => Err(CacheNotReady(what)),
    }
}

/// How often [`store_ready`] looks at a store again.
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Resolves once `store` has completed its first list: `true`, or `false` when its writer
/// is gone first. Use it instead of `Store::wait_until_ready` wherever several tasks may
/// wait on one store (every store of the shared [`Caches`]): kube-runtime's ready signal is
/// a oneshot receiver that keeps the waker of the last task that polled it, so of several
/// concurrent waiters only the last is woken, and the others sleep until something else
/// polls them (a reconcile's [`CACHE_WAIT`] timeout: a five-second stall at every start).
/// This waiter looks again every few milliseconds instead of relying on that wakeup.
pub async fn store_ready<K>(store: &kube::runtime::reflector::Store<K>) -> bool
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(READY_POLL, store.wait_until_ready()).await {
            Ok(res) => return res.is_ok(),
            Err(_) => continue,
        }
    }
}

/// Whether retrying can fix `e` (409, 429, 5xx, timeouts, connection failures). The
/// harness retries every error with backoff anyway; this is for deciding what to log loud.
pub fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 409 | 410 | 429) || s.code >= 500,
        _ => true,
    }
}

/// What every reconciler shares with the binary: the client, the process's caches (one
/// watch per kind, outliving every leadership term), metrics, health, backoff curve and
/// the cancellation token of the current run (shutdown, or end of leadership).
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub caches: Caches,
    pub metrics: Arc<Metrics>,
    pub health: Health,
    pub backoff: Backoff,
    pub shutdown: CancellationToken,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    /// The same context with another shutdown token (e.g. a leadership term).
    pub fn with_shutdown(&self, shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            ..self.clone()
        }
    }
}

/// One concern's reconcile function, with the types the harness needs.
pub trait Reconciler: Send + Sync + 'static {
    /// The object each reconcile is about (the controller's main resource).
    type Object: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static;
    type Error: std::error::Error + MetricLabel + Send + Sync + 'static;
    /// The concern's name: the `controller` metric label; its field manager is
    /// `tendril-<NAME>` ([`field_manager`]).
    const NAME: &'static str;

    /// Brings the world in line with `obj`; idempotent; the span carries the object.
    fn reconcile(
        &self,
        obj: Arc<Self::Object>,
    ) -> impl Future<Output = Result<Action, Self::Error>> + Send;

    /// Reconcile every object at least this often even without events (a level-triggered
    /// safety net, like controller-runtime's SyncPeriod): a reconcile that returns
    /// `Action::await_change()` is requeued after this long, still counted as `success`.
    fn resync(&self) -> Option<std::time::Duration> {
        None
    }
}

/// A concern of the operator: a name and how to run it until `ctx.shutdown`, given what
/// the concerns of one leadership term share (`C`: configuration, shared allocators). It is
/// restarted each time this replica becomes leader.
pub struct Concern<C> {
    pub name: &'static str,
    pub run: fn(Context, Arc<C>) -> BoxFuture<'static, anyhow::Result<()>>,
}

/// Runs every concern until `ctx.shutdown`; a concern that ends early is logged and
/// restarted with backoff (a concern never takes the process down).
pub async fn run_concerns<C: Send + Sync + 'static>(
    concerns: &[Concern<C>],
    ctx: Context,
    config: Arc<C>,
) {
    let tasks = concerns.iter().map(|concern| {
        let ctx = ctx.clone();
        let config = config.clone();
        async move {
            let mut failures = 0;
            while !ctx.shutdown.is_cancelled() {
                let res = (concern.run)(ctx.clone(), config.clone()).await;
                if ctx.shutdown.is_cancelled() {
                    break;
                }
                failures += 1;
                let delay = ctx.backoff.delay(failures, &mut rand::rng());
                match res {
                    Ok(()) => warn!(concern = concern.name, retry_in = ?delay, "concern ended early; restarting"),
                    Err(e) => error!(concern = concern.name, error = %e, retry_in = ?delay, "concern failed; restarting"),
                }
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    });
    futures::future::join_all(tasks).await;
}

/// The key of an object in logs and backoff: `namespace/name` or `name`.
pub fn object_key<K: Resource>(obj: &K) -> String {
    let meta = obj.meta();
    let name = meta.name.as_deref().unwrap_or_default();
    match &meta.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

fn ref_key<K: Resource>(r: &ObjectRef<K>) -> String {
    match &r.namespace {
        Some(ns) => format!("{ns}/{}", r.name),
        None => r.name.clone(),
    }
}

struct Harness<R: Reconciler> {
    reconciler: R,
    metrics: ControllerMetrics,
    backoff: BackoffTracker,
    in_flight: AtomicI64,
}

impl<R: Reconciler> Harness<R> {
    fn update_depth(&self) {
        let waiting = i64::try_from(self.backoff.waiting()).unwrap_or(i64::MAX);
        self.metrics
            .depth
            .set(self.in_flight.load(Ordering::Relaxed) + waiting);
    }
}

async fn reconcile_one<R: Reconciler>(
    obj: Arc<R::Object>,
    h: Arc<Harness<R>>,
) -> Result<Action, R::Error> {
    let key = object_key(obj.as_ref());
    if let Some(due) = h.backoff.dequeued(&key) {
        let now = Instant::now();
        if now >= due {
            h.metrics.queue_duration.observe((now - due).as_secs_f64());
        }
    }
    h.in_flight.fetch_add(1, Ordering::Relaxed);
    h.update_depth();
    let span =
        info_span!("reconcile", controller = R::NAME, kind = %R::Object::kind(&()), object = %key);
    let mut timer = h.metrics.reconcile_started();
    let mut result = h.reconciler.reconcile(obj).instrument(span.clone()).await;
    match &mut result {
        Ok(action) => {
            h.backoff.reset(&key);
            if *action == Action::await_change() {
                timer.set_result("success");
                if let Some(resync) = h.reconciler.resync() {
                    *action = Action::requeue(resync);
                }
            } else {
                timer.set_result("requeue");
            }
            debug!(parent: &span, ?action, "reconciled");
        }
        Err(e) => {
            h.metrics.error(e.metric_label());
            warn!(parent: &span, error = %e, kind = e.metric_label(), "reconcile failed");
        }
    }
    drop(timer);
    h.in_flight.fetch_sub(1, Ordering::Relaxed);
    h.update_depth();
    result
}

fn error_policy<R: Reconciler>(obj: Arc<R::Object>, _err: &R::Error, h: Arc<Harness<R>>) -> Action {
    let delay = h.backoff.failed(&object_key(obj.as_ref()));
    h.metrics.retries.inc();
    h.update_depth();
    Action::requeue(delay)
}

/// Runs `controller` with `reconciler` until `ctx.shutdown` fires, then lets in-flight
/// reconciles finish. Watch errors (API server down, 410 Gone) are retried with
/// kube-runtime's backoff and counted in `tendril_watch_errors_total{controller}`; they
/// never end the loop. The binary is not ready (`/readyz`) until the main store synced.
pub async fn run<R: Reconciler>(controller: Controller<R::Object>, reconciler: R, ctx: &Context) {
    let name = R::NAME;
    let check = format!("controller/{name}");
    ctx.health.register(&check);
    let watch_errors = ctx.metrics.domain(
        "tendril_watch_errors",
        "Errors of the watches feeding a controller (retried with backoff)",
        Family::<metrics::ControllerLabel, Counter>::default,
    );
    let watch_errors = watch_errors
        .get_or_create(&metrics::ControllerLabel {
            controller: name.to_string(),
        })
        .clone();
    let store = controller.store();
    let harness = Arc::new(Harness {
        reconciler,
        metrics: ctx.metrics.controller(name),
        backoff: BackoffTracker::new(ctx.backoff.clone()),
        in_flight: AtomicI64::new(0),
    });
    harness.update_depth();
    let stop = ctx.shutdown.clone();
    let ready = {
        let health = ctx.health.clone();
        let check = check.clone();
        let stop = stop.clone();
        async move {
            tokio::select! {
                ready = store_ready(&store) => if ready {
                    info!(controller = name, "caches synced");
                    health.set_ready(&check, true);
                },
                _ = stop.cancelled() => {}
            }
        }
    };
    let h = harness.clone();
    let stream = controller
        .trigger_backoff(caches::NoTriggerDelay)
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile_one::<R>, error_policy::<R>, harness)
        .for_each(|res| {
            match res {
                Ok(_) | Err(controller::Error::ReconcilerFailed(..)) => {}
                Err(controller::Error::ObjectNotFound(r)) => {
                    // Deleted while queued: nothing to do, forget its failures.
                    h.backoff.reset(&ref_key(&r));
                    h.update_depth();
                    debug!(controller = name, object = %r, "object gone before reconcile");
                }
                Err(controller::Error::QueueError(e)) => {
                    watch_errors.inc();
                    warn!(controller = name, error = %e, "watch failed; retrying");
                }
                Err(e) => {
                    watch_errors.inc();
                    warn!(controller = name, error = %e, "controller error");
                }
            }
            futures::future::ready(())
        });
    tokio::join!(ready, stream);
    ctx.health.remove(&check);
    info!(controller = name, "controller stopped");
}

/// A token cancelled on SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received, shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT received, shutting down"),
        }
        t.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;
    use kube::runtime::watcher;

    /// Several tasks waiting on one store all see it become ready (kube-runtime's own
    /// `wait_until_ready` wakes only the last of them).
    #[tokio::test]
    async fn every_concurrent_waiter_sees_the_store_ready() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store_ready(&store).await })
            })
            .collect();
        // Let every waiter register before the list completes.
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let all = futures::future::join_all(waiters);
        // Bounded well below CACHE_WAIT: a waiter left asleep would stall until then.
        let done = tokio::time::timeout(std::time::Duration::from_secs(2), all)
            .await
            .expect("a waiter was never woken");
        assert!(done.into_iter().all(|r| r.expect("waiter task")));
        assert!(cache_ready(&store, "configmaps").await.is_ok());
    }
}
