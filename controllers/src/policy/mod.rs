//! Concern `policy`: `networking.k8s.io/v1` NetworkPolicy, Tendril `NetworkPolicy` and
//! `ClusterNetworkPolicy`, and `Identity` → one `ResolvedPolicy` per cluster identity.
//!
//! Shaped like linkerd2's policy controller: the watches only feed reflector stores and
//! poke one singleton trigger; each reconcile waits for a quiet moment (debounce), then reads the stores whole, runs the
//! pure [`resolve::resolve`], and [`plan::plan`] decides which `ResolvedPolicy` objects to
//! write. Nothing is written before every store has completed its first list, so a
//! restarting operator never publishes a policy from a partial view.
//!
//! Writes: server-side apply (field manager `tendril-policy`) of the `ResolvedPolicy`
//! objects whose spec changed, with `revision` = previous + 1 (1 for a new one) and the
//! annotation `tendril.dev/policy-changed-at` (when the change was observed); deletion of
//! those whose `Identity` is gone; `status` (`Valid`, `observedGeneration`,
//! `selectedIdentities`) of Tendril policies when it changed; a Warning Event for an
//! invalid Kubernetes NetworkPolicy (which has no status).
//!
//! Metrics: `tendril_policy_resolve_seconds`, `tendril_policy_resolved_policies`,
//! `tendril_policy_invalid_sources{kind}`, `tendril_policy_revisions_total`.

pub mod plan;
pub mod resolve;
pub mod selector;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::networking::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use resolve::{Invalid, KIND_CLUSTER, KIND_KUBERNETES, KIND_NAMESPACED, Resolution, Sources};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tendril_crds::v1alpha1::{
    ClusterNetworkPolicy, Identity, NetworkPolicy, PolicySource, PolicyStatus, ResolvedPolicy,
    ResolvedPolicySpec,
};
use tendril_runtime::{self as runtime, Reconciler, conditions};
use tracing::{debug, info, warn};

/// The concern's name; its field manager is `tendril-policy`.
pub const NAME: &str = "policy";

/// Annotation on a `ResolvedPolicy`: when the operator observed the change that produced
/// its revision (RFC 3339, microseconds, UTC). The agent's implementation delay starts here.
pub use tendril_crds::facts::annotations::POLICY_CHANGED_AT as CHANGED_AT_ANNOTATION;

/// `ResolvedPolicy` writes in flight at once.
const WRITE_CONCURRENCY: usize = 16;

/// `policy` in config/operator.yaml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Quiet time after a change before resolving, so a burst of changes is one resolve.
    pub debounce_millis: u64,
    /// A steady stream of changes is resolved at least this long after its first change.
    pub max_delay_millis: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            debounce_millis: 100,
            max_delay_millis: 1000,
        }
    }
}

/// The key of the one global resolve: every watch triggers this object, so changes queue
/// (and debounce) as one reconcile. It lives only in a local store, never in the API.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyResolution {
    pub metadata: ObjectMeta,
}

impl Resource for PolicyResolution {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "PolicyResolution".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "tendril.dev".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "policyresolutions".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

fn singleton() -> PolicyResolution {
    PolicyResolution {
        metadata: ObjectMeta {
            name: Some("all".into()),
            ..Default::default()
        },
    }
}

pub type Error = runtime::ApiError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

struct Metrics {
    resolve_seconds: Histogram,
    resolved_policies: Gauge,
    invalid_sources: Family<KindLabel, Gauge>,
    revisions: Counter,
}

impl Metrics {
    fn new(m: &runtime::Metrics) -> Self {
        Self {
            resolve_seconds: m.domain(
                "tendril_policy_resolve_seconds",
                "Time to resolve every policy against every identity",
                || Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            ),
            resolved_policies: m.domain(
                "tendril_policy_resolved_policies",
                "ResolvedPolicy objects the last resolve produced (one per cluster identity)",
                Gauge::default,
            ),
            invalid_sources: m.domain(
                "tendril_policy_invalid_sources",
                "Policies left out because they are invalid or unsupported, per kind",
                Family::<KindLabel, Gauge>::default,
            ),
            revisions: m.domain(
                "tendril_policy_revisions",
                "ResolvedPolicy revisions written",
                Counter::default,
            ),
        }
    }
}

/// The stores the resolve reads.
#[derive(Clone)]
struct Stores {
    kubernetes: Store<k8s::NetworkPolicy>,
    namespaced: Store<NetworkPolicy>,
    cluster: Store<ClusterNetworkPolicy>,
    identities: Store<Identity>,
    resolved: Store<ResolvedPolicy>,
}

impl Stores {
    async fn ready(&self) -> Result<(), runtime::CacheNotReady> {
        runtime::cache_ready(&self.kubernetes, "networking.k8s.io networkpolicies").await?;
        runtime::cache_ready(&self.namespaced, "networkpolicies").await?;
        runtime::cache_ready(&self.cluster, "clusternetworkpolicies").await?;
        runtime::cache_ready(&self.identities, "identities").await?;
        runtime::cache_ready(&self.resolved, "resolvedpolicies").await?;
        Ok(())
    }

    fn sources(&self) -> Sources {
        fn owned<K: Clone>(v: Vec<Arc<K>>) -> Vec<K> {
            v.into_iter().map(Arc::unwrap_or_clone).collect()
        }
        Sources {
            kubernetes: owned(self.kubernetes.state()),
            namespaced: owned(self.namespaced.state()),
            cluster: owned(self.cluster.state()),
        }
    }

    fn identities(&self) -> BTreeMap<i64, resolve::Labels> {
        self.identities
            .state()
            .iter()
            .map(|i| (i.spec.id, i.spec.security_labels.clone()))
            .collect()
    }
}

/// The changes not yet resolved: when the oldest was observed (wall clock, for the
/// `policy-changed-at` annotation, and monotonic) and when the latest was.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Pending {
    first_at: DateTime<Utc>,
    first: Instant,
    last: Instant,
}

/// Tracks [`Pending`] changes between the watches (which observe) and the reconcile
/// (which waits for a quiet moment, then takes them).
#[derive(Clone, Default)]
struct ChangeClock(Arc<Mutex<Option<Pending>>>);

impl ChangeClock {
    fn observe(&self) {
        let now = Instant::now();
        let mut p = self.0.lock().expect("clock lock");
        match &mut *p {
            Some(p) => p.last = now,
            None => {
                *p = Some(Pending {
                    first_at: Utc::now(),
                    first: now,
                    last: now,
                })
            }
        }
    }

    /// How long to wait before resolving: until `quiet` passed since the latest change,
    /// but never more than `max` after the oldest (a steady stream of changes must not
    /// postpone the resolve forever). `None`: resolve now.
    fn wait(&self, now: Instant, quiet: Duration, max: Duration) -> Option<Duration> {
        let p = (*self.0.lock().expect("clock lock"))?;
        let due = (p.last + quiet).min(p.first + max);
        (due > now).then(|| due - now)
    }

    /// The wall-clock time of the oldest pending change (now if none), clearing them.
    fn take(&self) -> DateTime<Utc> {
        self.0
            .lock()
            .expect("clock lock")
            .take()
            .map_or_else(Utc::now, |p| p.first_at)
    }

    /// Puts back changes whose resolve failed, so the retry keeps their original time.
    fn restore(&self, first_at: DateTime<Utc>) {
        let now = Instant::now();
        let mut p = self.0.lock().expect("clock lock");
        match &mut *p {
            Some(p) => p.first_at = p.first_at.min(first_at),
            None => {
                *p = Some(Pending {
                    first_at,
                    first: now,
                    last: now,
                })
            }
        }
    }
}

/// A spec this term wrote or saw deleted.
struct Known {
    spec: ResolvedPolicySpec,
    /// The watch reported the object deleted (its identity may still live).
    deleted: bool,
}

type Written = Arc<Mutex<HashMap<i64, Known>>>;

/// Records `spec` for `id` unless a newer revision is known.
fn remember(written: &Written, id: i64, spec: &ResolvedPolicySpec, deleted: bool) {
    let mut w = written.lock().expect("written lock");
    if w.get(&id).is_none_or(|k| k.spec.revision <= spec.revision) {
        w.insert(
            id,
            Known {
                spec: spec.clone(),
                deleted,
            },
        );
    }
}

struct Policy {
    client: kube::Client,
    stores: Stores,
    changes: ChangeClock,
    quiet: Duration,
    max_delay: Duration,
    /// The last spec written per identity (the store may lag behind our own writes), or
    /// deleted by someone else (put back with a higher revision).
    written: Written,
    /// Invalid Kubernetes NetworkPolicies already reported with an Event, by
    /// (namespace, name, generation), so a resolve does not repeat them.
    reported: Mutex<HashSet<(String, String, Option<i64>)>>,
    recorder: Recorder,
    metrics: Metrics,
    manager: String,
}

impl Reconciler for Policy {
    type Object = PolicyResolution;
    type Error = Error;
    const NAME: &'static str = NAME;

    async fn reconcile(&self, _: Arc<PolicyResolution>) -> Result<Action, Error> {
        self.stores.ready().await?;
        // A burst of changes (kubectl apply -f dir/) becomes one resolve.
        while let Some(wait) = self
            .changes
            .wait(Instant::now(), self.quiet, self.max_delay)
        {
            tokio::time::sleep(wait).await;
        }
        let changed_at = self.changes.take();
        let result = self.resolve_and_write(changed_at).await;
        if result.is_err() {
            self.changes.restore(changed_at);
        }
        result
    }
}

impl Policy {
    async fn resolve_and_write(&self, changed_at: DateTime<Utc>) -> Result<Action, Error> {
        let identities = self.stores.identities();
        let sources = self.stores.sources();
        let started = Instant::now();
        let resolution = resolve::resolve(&identities, &sources);
        let took = started.elapsed();
        self.metrics.resolve_seconds.observe(took.as_secs_f64());
        self.metrics
            .resolved_policies
            .set(resolution.policies.len() as i64);
        for kind in [KIND_KUBERNETES, KIND_NAMESPACED, KIND_CLUSTER] {
            let invalid = resolution
                .sources
                .iter()
                .filter(|(s, r)| s.kind == kind && r.is_err())
                .count();
            self.metrics
                .invalid_sources
                .get_or_create(&KindLabel {
                    kind: kind.as_str().into(),
                })
                .set(invalid as i64);
        }

        let (current, deleted) = self.current();
        let plan = plan::plan(&resolution, &current, &deleted);
        debug!(
            identities = resolution.policies.len(),
            sources = resolution.sources.len(),
            writes = plan.apply.len(),
            deletes = plan.delete.len(),
            resolve_ms = took.as_secs_f64() * 1e3,
            "resolved"
        );
        let mut first_error = None;
        let changed_at = changed_at.to_rfc3339_opts(SecondsFormat::Micros, true);
        let api = Api::<ResolvedPolicy>::all(self.client.clone());
        let writes = futures::stream::iter(plan.apply)
            .map(|spec| {
                let api = api.clone();
                let changed_at = changed_at.clone();
                async move {
                    let body = runtime::apply_body::<ResolvedPolicy>(
                        &spec.identity.to_string(),
                        None,
                        json!({
                            "metadata": {"annotations": {CHANGED_AT_ANNOTATION: changed_at}},
                            "spec": spec,
                        }),
                    );
                    let res = runtime::apply(&api, &self.manager, &body).await;
                    (spec, res)
                }
            })
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for (spec, res) in writes {
            match res {
                Ok(_) => {
                    debug!(
                        identity = spec.identity,
                        revision = spec.revision,
                        "ResolvedPolicy written"
                    );
                    self.metrics.revisions.inc();
                    remember(&self.written, spec.identity, &spec, false);
                }
                Err(e) => {
                    warn!(identity = spec.identity, error = %e, "writing the ResolvedPolicy failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        for id in plan.delete {
            if let Err(e) = self.delete(&api, id).await {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = self.write_statuses(&resolution).await {
            first_error.get_or_insert(e);
        }
        self.report_invalid_kubernetes(&resolution, &sources).await;
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(Action::await_change()),
        }
    }

    /// The latest spec known per identity (the store's, or ours if we wrote a newer one),
    /// and the last revision of those deleted by someone else.
    fn current(&self) -> (BTreeMap<i64, ResolvedPolicySpec>, BTreeMap<i64, i64>) {
        let written = self.written.lock().expect("written lock");
        let mut current: BTreeMap<i64, ResolvedPolicySpec> = self
            .stores
            .resolved
            .state()
            .iter()
            .filter_map(|rp| {
                let id = rp.name_any().parse::<i64>().ok()?;
                Some((id, rp.spec.clone()))
            })
            .collect();
        let mut deleted = BTreeMap::new();
        for (id, known) in written.iter() {
            if known.deleted {
                if !current.contains_key(id) {
                    deleted.insert(*id, known.spec.revision);
                }
                continue;
            }
            match current.get(id) {
                Some(seen) if seen.revision >= known.spec.revision => {}
                _ => {
                    current.insert(*id, known.spec.clone());
                }
            }
        }
        (current, deleted)
    }

    async fn delete(&self, api: &Api<ResolvedPolicy>, id: i64) -> Result<(), kube::Error> {
        let name = id.to_string();
        self.written.lock().expect("written lock").remove(&id);
        let uid = self
            .stores
            .resolved
            .get(&ObjectRef::new(&name))
            .and_then(|rp| rp.uid());
        let Some(uid) = uid else {
            // Only known from our own write; the store will show it (or not) soon.
            return Ok(());
        };
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&name, &dp).await {
            Ok(_) => {
                info!(identity = id, "identity gone; ResolvedPolicy deleted");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `status` of every Tendril policy whose `Valid`, `observedGeneration` or
    /// `selectedIdentities` changed.
    async fn write_statuses(&self, resolution: &Resolution) -> Result<(), kube::Error> {
        let namespaced: HashMap<(String, String), Arc<NetworkPolicy>> = self
            .stores
            .namespaced
            .state()
            .into_iter()
            .map(|p| ((p.namespace().unwrap_or_default(), p.name_any()), p))
            .collect();
        let cluster: HashMap<String, Arc<ClusterNetworkPolicy>> = self
            .stores
            .cluster
            .state()
            .into_iter()
            .map(|p| (p.name_any(), p))
            .collect();
        let mut first_error = None;
        for (source, outcome) in &resolution.sources {
            let res = match source.kind {
                KIND_NAMESPACED => {
                    let key = (
                        source.namespace.clone().unwrap_or_default(),
                        source.name.clone(),
                    );
                    match namespaced.get(&key) {
                        Some(p) => {
                            let api = Api::<NetworkPolicy>::namespaced(self.client.clone(), &key.0);
                            self.write_status(&api, p.as_ref(), p.status.as_ref(), source, outcome)
                                .await
                        }
                        None => Ok(()),
                    }
                }
                KIND_CLUSTER => match cluster.get(&source.name) {
                    Some(p) => {
                        let api = Api::<ClusterNetworkPolicy>::all(self.client.clone());
                        self.write_status(&api, p.as_ref(), p.status.as_ref(), source, outcome)
                            .await
                    }
                    None => Ok(()),
                },
                _ => Ok(()),
            };
            match res {
                Ok(()) => {}
                // Deleted meanwhile: nothing left to describe.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    warn!(policy = %source.name, error = %e, "writing the policy status failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn write_status<K>(
        &self,
        api: &Api<K>,
        obj: &K,
        status: Option<&PolicyStatus>,
        source: &PolicySource,
        outcome: &Result<usize, Invalid>,
    ) -> Result<(), kube::Error>
    where
        K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let (desired, selected) = plan::desired_status(outcome);
        let generation = source.generation;
        let empty = PolicyStatus::default();
        let status = status.unwrap_or(&empty);
        if conditions::is_current(&status.conditions, &desired, generation)
            && status.observed_generation == generation
            && status.selected_identities == Some(selected)
        {
            return Ok(());
        }
        let condition = conditions::merge(
            conditions::find(&status.conditions, conditions::VALID),
            &desired,
            generation,
            Timestamp::now(),
        );
        if let Err(e) = outcome {
            info!(policy = %source.name, namespace = ?source.namespace, reason = e.reason, message = %e.message, "policy left out");
        }
        let body = runtime::apply_body::<K>(
            &obj.name_any(),
            obj.meta().namespace.as_deref(),
            json!({"status": {
                "conditions": [condition],
                "observedGeneration": generation,
                "selectedIdentities": selected,
            }}),
        );
        runtime::apply_status(api, &self.manager, &body).await?;
        Ok(())
    }

    /// A Warning Event on each invalid Kubernetes NetworkPolicy (they have no status), once
    /// per generation.
    async fn report_invalid_kubernetes(&self, resolution: &Resolution, sources: &Sources) {
        let invalid: HashMap<(String, String, Option<i64>), &Invalid> = resolution
            .sources
            .iter()
            .filter(|(s, _)| s.kind == KIND_KUBERNETES)
            .filter_map(|(s, r)| {
                let e = r.as_ref().err()?;
                Some((
                    (
                        s.namespace.clone().unwrap_or_default(),
                        s.name.clone(),
                        s.generation,
                    ),
                    e,
                ))
            })
            .collect();
        let new: Vec<_> = {
            let mut reported = self.reported.lock().expect("reported lock");
            reported.retain(|k| invalid.contains_key(k));
            invalid
                .iter()
                .filter(|(k, _)| reported.insert((*k).clone()))
                .map(|(k, e)| (k.clone(), (*e).clone()))
                .collect()
        };
        for ((ns, name, _), e) in new {
            let Some(np) = sources
                .kubernetes
                .iter()
                .find(|p| p.namespace().as_deref() == Some(ns.as_str()) && p.name_any() == name)
            else {
                continue;
            };
            warn!(namespace = %ns, policy = %name, reason = e.reason, message = %e.message, "NetworkPolicy left out");
            let event = Event {
                type_: EventType::Warning,
                reason: e.reason.to_string(),
                note: Some(format!("{}; the policy is not applied", e.message)),
                action: "ResolvePolicy".into(),
                secondary: None,
            };
            if let Err(err) = self.recorder.publish(&event, &np.object_ref(&())).await {
                warn!(error = %err, "publishing the invalid-policy Event failed");
            }
        }
    }
}

/// A reflector on `api` feeding `writer`, its changes as a trigger stream.
fn reflect<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .touched_objects()
}

/// The trigger mapper of a watch: every change means "resolve everything"; `observed`
/// changes (intent, identities) also start the change clock.
fn on_change<K>(
    changes: &ChangeClock,
    observed: bool,
) -> impl Fn(K) -> Option<ObjectRef<PolicyResolution>> + Send + Sync + 'static {
    let changes = changes.clone();
    let all = ObjectRef::from_obj(&singleton());
    move |_| {
        if observed {
            changes.observe();
        }
        Some(all.clone())
    }
}

/// Runs the policy controller until `ctx.shutdown`.
pub async fn run(ctx: runtime::Context, config: PolicyConfig) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let (kubernetes, k8s_writer) = reflector::store();
    let (namespaced, ns_writer) = reflector::store();
    let (cluster, cl_writer) = reflector::store();
    let (identities, id_writer) = reflector::store();
    let (resolved, rp_writer) = reflector::store();
    let stores = Stores {
        kubernetes,
        namespaced,
        cluster,
        identities,
        resolved,
    };
    let changes = ChangeClock::default();
    let written = Written::default();

    // The singleton is handed to the controller once every store has its first list, so
    // the first resolve (and /readyz) waits for a complete view.
    let (trigger_store, mut trigger_writer) = reflector::store::<PolicyResolution>();
    let first = {
        let stores = stores.clone();
        async move {
            // Each only fails when its writer is dropped, i.e. the controller is stopping.
            let _ = futures::future::join5(
                stores.kubernetes.wait_until_ready(),
                stores.namespaced.wait_until_ready(),
                stores.cluster.wait_until_ready(),
                stores.identities.wait_until_ready(),
                stores.resolved.wait_until_ready(),
            )
            .await;
            let one = singleton();
            // A complete "list" of one object (InitDone swaps the listed objects in).
            trigger_writer.apply_watcher_event(&watcher::Event::Init);
            trigger_writer.apply_watcher_event(&watcher::Event::InitApply(one.clone()));
            trigger_writer.apply_watcher_event(&watcher::Event::InitDone);
            Ok(one)
        }
    };
    let trigger = futures::stream::once(first).chain(futures::stream::pending());
    // No debounce in the scheduler (it would postpone the resolve for as long as changes
    // keep coming); the reconcile waits for a quiet moment itself (ChangeClock::wait).
    let controller = Controller::for_stream(trigger, trigger_store)
        .watches_stream(
            reflect(Api::<k8s::NetworkPolicy>::all(client.clone()), k8s_writer),
            on_change(&changes, true),
        )
        .watches_stream(
            reflect(Api::<NetworkPolicy>::all(client.clone()), ns_writer),
            on_change(&changes, true),
        )
        .watches_stream(
            reflect(Api::<ClusterNetworkPolicy>::all(client.clone()), cl_writer),
            on_change(&changes, true),
        )
        .watches_stream(
            reflect(Api::<Identity>::all(client.clone()), id_writer),
            on_change(&changes, true),
        )
        // Our own writes come back here; a ResolvedPolicy edited or deleted by someone else
        // is put back. Neither is a policy change, so the clock is not started.
        .watches_stream(
            {
                let written = written.clone();
                watcher(
                    Api::<ResolvedPolicy>::all(client.clone()),
                    watcher::Config::default(),
                )
                .default_backoff()
                .reflect(rp_writer)
                .map_ok(move |event| {
                    if let watcher::Event::Delete(rp) = &event
                        && let Ok(id) = rp.name_any().parse::<i64>()
                    {
                        remember(&written, id, &rp.spec, true);
                    }
                    event
                })
                .touched_objects()
            },
            on_change(&changes, false),
        );
    let reconciler = Policy {
        client: client.clone(),
        stores,
        changes,
        quiet: Duration::from_millis(config.debounce_millis),
        max_delay: Duration::from_millis(config.max_delay_millis),
        written,
        reported: Mutex::default(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "tendril-operator".into(),
                instance: None,
            },
        ),
        metrics: Metrics::new(&ctx.metrics),
        manager: runtime::field_manager(NAME),
    };
    runtime::run(controller, reconciler, &ctx).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_millis(1000);

    #[test]
    fn the_clock_waits_for_quiet_but_not_forever() {
        let clock = ChangeClock::default();
        let t0 = Instant::now();
        assert_eq!(
            clock.wait(t0, QUIET, MAX),
            None,
            "nothing pending: resolve now"
        );
        clock.observe();
        let p = clock.0.lock().unwrap().unwrap();
        // Just after the change: wait out the quiet period.
        assert_eq!(clock.wait(p.last, QUIET, MAX), Some(QUIET));
        assert_eq!(clock.wait(p.last + QUIET, QUIET, MAX), None);
        // Changes keep coming: the wait is capped at `MAX` after the first.
        clock.0.lock().unwrap().as_mut().unwrap().last = p.first + Duration::from_millis(950);
        assert_eq!(
            clock.wait(p.first + Duration::from_millis(960), QUIET, MAX),
            Some(Duration::from_millis(40))
        );
        assert_eq!(clock.wait(p.first + MAX, QUIET, MAX), None);
    }

    #[test]
    fn the_clock_keeps_the_oldest_change_time() {
        let clock = ChangeClock::default();
        clock.observe();
        let first = clock.0.lock().unwrap().unwrap().first_at;
        clock.observe();
        assert_eq!(clock.take(), first);
        assert!(clock.0.lock().unwrap().is_none());
        // A failed resolve puts its time back; a newer change does not move it.
        clock.restore(first);
        clock.observe();
        assert_eq!(clock.take(), first);
    }
}
