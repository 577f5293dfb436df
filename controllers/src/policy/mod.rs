//! Concern `policy`: `networking.k8s.io/v1` NetworkPolicy, Tendril `NetworkPolicy` and
//! `ClusterNetworkPolicy`, and `Identity` → one `ResolvedPolicy` per cluster identity.
//!
//! Shaped like linkerd2's policy controller: the process's shared caches feed the stores and
//! every change pokes one [`singleton`](runtime::singleton). The reconcile starts at once
//! on the first change (leading edge, no quiet period); changes arriving while it runs are
//! coalesced by the controller into the one reconcile that follows (the [`ChangeClock`]
//! only keeps the time of the oldest for the annotation). It reads the stores whole and
//! runs the incremental [`resolve::Resolver`] (only the sources that changed are
//! translated again and only the identities they can affect are combined again), and
//! [`plan::plan`] decides which `ResolvedPolicy` objects to write (numbered by
//! [`runtime::revisions`]). Nothing is written before every store has
//! completed its first list, so a restarting operator never publishes a policy from a
//! partial view.
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
use futures::StreamExt;
use k8s_openapi::api::networking::v1 as k8s;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use resolve::{Invalid, KIND_CLUSTER, KIND_KUBERNETES, KIND_NAMESPACED, Resolution, Sources};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tendril_crds::v1alpha1::{
    ClusterNetworkPolicy, Identity, NetworkPolicy, PolicySource, PolicyStatus, ResolvedPolicy,
    ResolvedPolicySpec,
};
use tendril_runtime::caches::{Cache, Change};
use tendril_runtime::debounce::ChangeClock;
use tendril_runtime::revisions::Revisions;
use tendril_runtime::singleton::{self, Singleton};
use tendril_runtime::{self as runtime, Reconciler, conditions};
use tracing::{debug, info, warn};

/// The concern's name; its field manager is `tendril-policy`.
pub const NAME: &str = "policy";

/// Annotation on a `ResolvedPolicy`: when the operator observed the change that produced
/// its revision (RFC 3339, microseconds, UTC). The agent's implementation delay starts here.
pub use tendril_crds::facts::annotations::POLICY_CHANGED_AT as CHANGED_AT_ANNOTATION;

/// `policy` in config/operator.yaml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// `ResolvedPolicy` writes in flight at once (a change of a policy selecting many
    /// identities writes one object per identity).
    pub write_concurrency: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            write_concurrency: 16,
        }
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
    /// Resolves once every store has completed its first list (or its cache is gone, i.e.
    /// the process is stopping).
    async fn listed(self) {
        // runtime::store_ready: these stores are shared, and kube-runtime wakes only one of
        // several tasks waiting on a store.
        let _ = futures::future::join5(
            runtime::store_ready(&self.kubernetes),
            runtime::store_ready(&self.namespaced),
            runtime::store_ready(&self.cluster),
            runtime::store_ready(&self.identities),
            runtime::store_ready(&self.resolved),
        )
        .await;
    }

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

struct Policy {
    client: kube::Client,
    stores: Stores,
    changes: ChangeClock,
    resolver: Mutex<resolve::Resolver>,
    write_concurrency: usize,
    /// The last spec written per identity (the store may lag behind our own writes), or
    /// deleted by someone else (put back with a higher revision).
    written: Revisions<i64, ResolvedPolicySpec>,
    /// Invalid Kubernetes NetworkPolicies already reported with an Event, by
    /// (namespace, name, generation), so a resolve does not repeat them.
    reported: Mutex<HashSet<(String, String, Option<i64>)>>,
    recorder: Recorder,
    metrics: Metrics,
    manager: String,
}

impl Reconciler for Policy {
    type Object = Singleton;
    type Error = Error;
    const NAME: &'static str = NAME;

    async fn reconcile(&self, _: Arc<Singleton>) -> Result<Action, Error> {
        self.stores.ready().await?;
        // No waiting: changes arriving from here on are handled by the next reconcile,
        // which the controller runs once after this one however many there were.
        self.changes
            .handle(|changed_at| self.resolve_and_write(changed_at))
            .await
    }
}

impl Policy {
    async fn resolve_and_write(&self, changed_at: DateTime<Utc>) -> Result<Action, Error> {
        let read_started = Instant::now();
        let identities = self.stores.identities();
        let sources = self.stores.sources();
        let read = read_started.elapsed();
        let started = Instant::now();
        let (current, deleted) = self.current();
        // The resolution stays in the resolver (its memory for the next change); what is
        // written and reported is taken out of it.
        let (resolution, plan, work, resolved_policies) = {
            let mut resolver = self.resolver.lock().unwrap_or_else(|p| p.into_inner());
            let work = resolver.resolve(&identities, &sources);
            let full = resolver.resolution();
            let plan = plan::plan(full, &current, &deleted);
            let resolution = Resolution {
                policies: BTreeMap::new(),
                sources: full.sources.clone(),
            };
            (resolution, plan, work, full.policies.len())
        };
        let took = started.elapsed();
        self.metrics.resolve_seconds.observe(took.as_secs_f64());
        self.metrics.resolved_policies.set(resolved_policies as i64);
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

        debug!(
            identities = resolved_policies,
            sources = resolution.sources.len(),
            translated = work.translated,
            combined = work.combined,
            writes = plan.apply.len(),
            deletes = plan.delete.len(),
            read_ms = read.as_secs_f64() * 1e3,
            resolve_ms = took.as_secs_f64() * 1e3,
            "resolved"
        );
        let writes_started = Instant::now();
        let mut first_error = None;
        let changed_at = changed_at.to_rfc3339_opts(SecondsFormat::Micros, true);
        let api = Api::<ResolvedPolicy>::all(self.client.clone());
        let writes = futures::stream::iter(plan.apply)
            .map(|spec| {
                let api = api.clone();
                let changed_at = changed_at.clone();
                async move {
                    let body_started = Instant::now();
                    let body = runtime::apply_body::<ResolvedPolicy>(
                        &spec.identity.to_string(),
                        None,
                        json!({
                            "metadata": {"annotations": {CHANGED_AT_ANNOTATION: changed_at}},
                            "spec": spec,
                        }),
                    );
                    let body_took = body_started.elapsed();
                    let res = runtime::apply(&api, &self.manager, &body).await;
                    debug!(
                        identity = spec.identity,
                        body_ms = body_took.as_secs_f64() * 1e3,
                        apply_ms = (body_started.elapsed() - body_took).as_secs_f64() * 1e3,
                        "ResolvedPolicy applied"
                    );
                    (spec, res)
                }
            })
            .buffer_unordered(self.write_concurrency.max(1))
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
                    self.written.wrote(spec.identity, &spec);
                }
                Err(e) => {
                    warn!(identity = spec.identity, error = %e, "writing the ResolvedPolicy failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        let written_in = writes_started.elapsed();
        for id in plan.delete {
            if let Err(e) = self.delete(&api, id).await {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = self.write_statuses(&resolution).await {
            first_error.get_or_insert(e);
        }
        self.report_invalid_kubernetes(&resolution, &sources).await;
        debug!(
            write_ms = written_in.as_secs_f64() * 1e3,
            total_ms = read_started.elapsed().as_secs_f64() * 1e3,
            "ResolvedPolicies written"
        );
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(Action::await_change()),
        }
    }

    /// The latest spec known per identity (the store's, or ours if we wrote a newer one),
    /// and the last revision of those deleted by someone else.
    fn current(&self) -> (BTreeMap<i64, ResolvedPolicySpec>, BTreeMap<i64, i64>) {
        let stored = self.stores.resolved.state();
        self.written.current(stored.iter().filter_map(|rp| {
            let id = rp.name_any().parse::<i64>().ok()?;
            Some((id, rp.spec.clone()))
        }))
    }

    async fn delete(&self, api: &Api<ResolvedPolicy>, id: i64) -> Result<(), kube::Error> {
        let name = id.to_string();
        self.written.forget(&id);
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

/// The caches the policy concern reads.
struct Caches {
    kubernetes: Cache<k8s::NetworkPolicy>,
    namespaced: Cache<NetworkPolicy>,
    cluster: Cache<ClusterNetworkPolicy>,
    identities: Cache<Identity>,
    resolved: Cache<ResolvedPolicy>,
}

impl Caches {
    fn new(caches: &runtime::Caches) -> Self {
        Self {
            kubernetes: caches.all(),
            namespaced: caches.all(),
            cluster: caches.all(),
            identities: caches.all(),
            resolved: caches.all(),
        }
    }

    fn stores(&self) -> Stores {
        Stores {
            kubernetes: self.kubernetes.store(),
            namespaced: self.namespaced.store(),
            cluster: self.cluster.store(),
            identities: self.identities.store(),
            resolved: self.resolved.store(),
        }
    }
}

/// The `ResolvedPolicy` objects applied or deleted; a deletion (by someone else: ours are
/// forgotten first) is recorded in `written` before the resolve it triggers, and a write
/// of ours the watch delivered is forgotten (the store holds it now).
fn resolved_changes(
    cache: &Cache<ResolvedPolicy>,
    written: Revisions<i64, ResolvedPolicySpec>,
) -> impl futures::Stream<Item = Result<ResolvedPolicy, kube::runtime::watcher::Error>> + Send + use<>
{
    cache.changes().filter_map(move |change| {
        match &change {
            Change::Deleted(rp) => {
                if let Ok(id) = rp.name_any().parse::<i64>() {
                    written.deleted(id, &rp.spec);
                }
            }
            Change::Applied(rp) => {
                if let Ok(id) = rp.name_any().parse::<i64>() {
                    written.caught_up(&id, rp.spec.revision);
                }
            }
            _ => {}
        }
        futures::future::ready(change.into_trigger(true))
    })
}

/// Runs the policy controller until `ctx.shutdown`.
pub async fn run(ctx: runtime::Context, config: PolicyConfig) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let caches = Caches::new(&ctx.caches);
    let stores = caches.stores();
    // Never waits (no quiet period, no cap): it only remembers when the oldest change not
    // yet handled was observed.
    let changes = ChangeClock::new(Duration::ZERO, Duration::ZERO);
    let written = Revisions::default();
    // A change of intent (a policy) or of identities: starts the clock.
    fn observed<K>(
        clock: &ChangeClock,
    ) -> impl Fn(K) -> Option<ObjectRef<Singleton>> + Send + Sync + 'static + use<K> {
        singleton::on_change(NAME, Some(clock))
    }

    // The first resolve (and /readyz) waits for a complete view. No debounce anywhere:
    // the controller runs one reconcile per object at a time and folds the triggers that
    // arrive meanwhile into the next one (leading edge, then coalescing).
    let controller = singleton::controller(NAME, stores.clone().listed())
        .watches_stream(caches.kubernetes.trigger(), observed(&changes))
        .watches_stream(caches.namespaced.trigger(), observed(&changes))
        .watches_stream(caches.cluster.trigger(), observed(&changes))
        .watches_stream(caches.identities.trigger(), observed(&changes))
        // Our own writes come back here; a ResolvedPolicy edited or deleted by someone else
        // is put back. Neither is a policy change, so the clock is not started.
        .watches_stream(
            resolved_changes(&caches.resolved, written.clone()),
            singleton::on_change(NAME, None),
        );
    let reconciler = Policy {
        client: client.clone(),
        stores,
        changes,
        resolver: Mutex::default(),
        write_concurrency: config.write_concurrency,
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
