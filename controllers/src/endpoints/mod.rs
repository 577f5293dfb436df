//! Concern `endpoints`: Pod + Namespace → `Endpoint` (field manager `tendril-endpoints`).
//!
//! [`desired`] computes the `Endpoint` a pod should have (pure values). The reconciler
//! attaches the identity of the pod's security labels through the shared
//! [`IdentityAllocator`] — so a new pod gets its `Endpoint` with an identity in one pass —
//! and applies the `Endpoint` naming the pod's uid (`spec.podUID`). An `Endpoint` has no
//! owner reference: this concern deletes it the moment its pod is gone, and with an owner
//! reference the garbage collector raced that delete with its own (one more apiserver
//! request per pod, and slow in bulk: 20 requests/s by default). A sweep deletes Endpoints
//! whose pod went while no operator led. When a pod stops qualifying (finished, lost its
//! IPs) the reconciler deletes the `Endpoint` itself. Every `Endpoint` carries the label
//! `tendril.dev/identity=<id>`.
//!
//! The allocator is shared with the identities concern for a leadership term (see
//! [`crate::Term`]), so garbage collection never deletes an id this process just handed out.

pub mod desired;
pub mod pod;
mod written;

/// The operator's one cache of every `Endpoint` (the endpoints, identities and egress
/// concerns share it), without what no concern reads of it: the security labels — an
/// Endpoint's identity stands for its label set (one id per set), the egress concern
/// takes them from the `Identity` — and annotations.
pub fn cache(caches: &runtime::caches::Caches) -> runtime::Cache<Endpoint> {
    caches.all_trimmed(trim_endpoint)
}

fn trim_endpoint(endpoint: &mut Endpoint) {
    endpoint.spec.security_labels.clear();
    endpoint.metadata.annotations = None;
    // The labels: only whether the identity label says what `spec.identity` does, which is
    // all the reconcile asks of them. `None` when it does, an empty map (no allocation)
    // when it does not; a map with the one label would be ~0.5 KiB per Endpoint (a
    // B-tree's first node holds room for eleven entries), 50 MB at 100k pods.
    let labelled = endpoint.spec.identity.is_some_and(|id| {
        endpoint
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(IDENTITY_LABEL))
            .is_some_and(|label| *label == id.to_string())
    });
    endpoint.metadata.labels = (!labelled).then(Default::default);
}

/// Whether the cached (trimmed) `endpoint` carries the identity label of `identity`.
fn labelled_with(endpoint: &Endpoint, identity: i64) -> bool {
    endpoint.metadata.labels.is_none() && endpoint.spec.identity == Some(identity)
}

use crate::identities::IdentitiesConfig;
use crate::identities::allocator::{AllocError, IdentityAllocator};
use crate::identities::labels::LabelFilter;
use desired::{Skip, desired_endpoint, endpoint_spec};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use pod::PodInfo;
use prometheus_client::metrics::counter::Counter;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tendril_crds::v1alpha1::Endpoint;
use tendril_runtime::caches::Change;
use tendril_runtime::{self as runtime, MetricLabel, Reconciler};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The concern's name; its field manager is `tendril-endpoints`.
pub const NAME: &str = "endpoints";
/// Label on every `Endpoint`: its identity id, so users and garbage collection can select
/// the endpoints of one identity (`kubectl get tep -A -l tendril.dev/identity=300`).
pub use tendril_crds::facts::labels::IDENTITY as IDENTITY_LABEL;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("allocating an identity: {0}")]
    Identity(#[from] AllocError),
    #[error("Pod has no name, namespace or uid")]
    MissingMetadata,
    #[error(transparent)]
    CacheNotReady(#[from] runtime::CacheNotReady),
}

impl MetricLabel for Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(e) => runtime::kube_error_label(e),
            Error::Identity(e) => e.metric_label(),
            Error::MissingMetadata => "missing_metadata",
            Error::CacheNotReady(e) => e.metric_label(),
        }
    }
}

struct Endpoints {
    client: kube::Client,
    namespaces: Store<Namespace>,
    endpoints: Store<Endpoint>,
    filter: LabelFilter,
    allocator: IdentityAllocator,
    written: Arc<written::Written>,
    writes: Counter,
    deletes: Counter,
}

impl Endpoints {
    async fn delete_endpoint(&self, current: &Endpoint) -> Result<(), Error> {
        delete_endpoint(&self.client, current, &self.deletes).await
    }
}

/// Deletes `current` (that very object: a uid precondition), counted in `deletes`; gone
/// already, or replaced meanwhile, is no error.
async fn delete_endpoint(
    client: &Client,
    current: &Endpoint,
    deletes: &Counter,
) -> Result<(), Error> {
    let ns = current.namespace().unwrap_or_default();
    let api = Api::<Endpoint>::namespaced(client.clone(), &ns);
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: current.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&current.name_any(), &dp).await {
        Ok(_) => {
            deletes.inc();
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes `endpoint` when its pod is gone: not in the pod cache, and, read (the caches
/// list independently), absent or another pod of the same name. Whether it was deleted.
async fn delete_if_orphan(
    client: &Client,
    pods: &Store<PodInfo>,
    endpoint: &Endpoint,
    deletes: &Counter,
) -> bool {
    let ns = endpoint.namespace().unwrap_or_default();
    let name = endpoint.name_any();
    if pods.get(&ObjectRef::new(&name).within(&ns)).is_some() {
        return false;
    }
    let gone = match Api::<PodInfo>::namespaced(client.clone(), &ns)
        .get_opt(&name)
        .await
    {
        Ok(None) => true,
        Ok(Some(pod)) => !owned_by(endpoint, &pod),
        Err(e) => {
            warn!(namespace = ns, pod = name, error = %e, "reading the pod of an Endpoint failed");
            false
        }
    };
    gone && delete_endpoint(client, endpoint, deletes).await.is_ok()
}

/// Deletes a pod's `Endpoint` as soon as the pod is gone (its addresses stay mapped to its
/// identity on every node until then), and an `Endpoint` written for a pod that went while
/// the write was under way. [`sweep_orphans`] is the backstop.
async fn delete_endpoints_of_gone_pods(
    pods: runtime::Cache<PodInfo>,
    endpoints: runtime::Cache<Endpoint>,
    client: Client,
    deletes: Counter,
    shutdown: CancellationToken,
) {
    let (pod_store, endpoint_store) = (pods.store(), endpoints.store());
    let mut pod_changes = Box::pin(pods.changes());
    let mut endpoint_changes = Box::pin(endpoints.changes());
    loop {
        tokio::select! {
            change = pod_changes.next() => {
                let Some(change) = change else { return };
                let Change::Deleted(pod) = change else {
                    continue;
                };
                let (Some(name), Some(ns)) = (
                    pod.metadata.name.as_deref(),
                    pod.metadata.namespace.as_deref(),
                ) else {
                    continue;
                };
                let Some(endpoint) = endpoint_store.get(&ObjectRef::new(name).within(ns)) else {
                    continue;
                };
                if !owned_by(&endpoint, &pod) {
                    continue;
                }
                match delete_endpoint(&client, &endpoint, &deletes).await {
                    Ok(()) => debug!(namespace = ns, pod = name, "Endpoint of a deleted pod removed"),
                    Err(e) => {
                        warn!(namespace = ns, pod = name, error = %e, "removing the Endpoint of a deleted pod failed; the sweep will")
                    }
                }
            }
            change = endpoint_changes.next() => {
                let Some(change) = change else { return };
                // An apply that raced the pod's deletion lands after it: its Endpoint
                // would stay until the sweep.
                let Change::Applied(endpoint) = change else {
                    continue;
                };
                if runtime::store_ready(&pod_store).await
                    && delete_if_orphan(&client, &pod_store, &endpoint, &deletes).await
                {
                    debug!(endpoint = %endpoint.name_any(), "Endpoint written for a pod already gone removed");
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// How often the sweep looks for Endpoints whose pod is gone: a running operator deletes
/// them off the change streams already; the sweep covers pods deleted while no operator
/// led and a change stream that lagged.
const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(300);

/// Deletes Endpoints whose pod no longer exists, once the caches are ready and then every
/// [`ORPHAN_SWEEP_INTERVAL`].
async fn sweep_orphans(
    pods: Store<PodInfo>,
    endpoints: Store<Endpoint>,
    client: Client,
    deletes: Counter,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(ORPHAN_SWEEP_INTERVAL);
    loop {
        let ready = async {
            tick.tick().await;
            runtime::store_ready(&pods).await && runtime::store_ready(&endpoints).await
        };
        tokio::select! {
            true = ready => {}
            _ = shutdown.cancelled() => return,
            else => return,
        }
        let mut swept = 0;
        for endpoint in endpoints.state() {
            if delete_if_orphan(&client, &pods, &endpoint, &deletes).await {
                swept += 1;
            }
        }
        if swept > 0 {
            info!(endpoints = swept, "Endpoints of pods that are gone removed");
        }
    }
}

impl Reconciler for Endpoints {
    type Object = PodInfo;
    type Error = Error;
    const NAME: &'static str = NAME;

    async fn reconcile(&self, pod: Arc<PodInfo>) -> Result<Action, Error> {
        let name = pod.meta().name.clone().ok_or(Error::MissingMetadata)?;
        let ns = pod.meta().namespace.clone().ok_or(Error::MissingMetadata)?;
        runtime::cache_ready(&self.namespaces, "namespaces").await?;
        runtime::cache_ready(&self.endpoints, "endpoints").await?;
        let namespace = self.namespaces.get(&ObjectRef::new(&ns));
        let key = (ns.clone(), name.clone());
        let mut current = self.endpoints.get(&ObjectRef::new(&name).within(&ns));
        let pod_uid = pod.meta().uid.as_deref().unwrap_or_default();
        // A write of ours the store has not delivered yet is what the API holds.
        let ours = self
            .written
            .ahead_of(&key, pod_uid, current.as_ref().map(|c| &c.spec));
        if ours.is_some() {
            current = None;
        }
        if let Some(stale) = current.take_if(|e| !owned_by(e, &pod)) {
            // Left by an earlier Pod of the same name (the garbage collector has not removed
            // it yet): applying over it would give it two controller owners.
            self.delete_endpoint(&stale).await?;
            info!("stale Endpoint of an earlier pod of the same name removed");
        }
        let desired = match desired_endpoint(&pod, namespace.as_deref(), &self.filter) {
            Ok(d) => d,
            Err(_) if ours.is_some() => {
                // Deleting needs the object's uid, which only the store has.
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            Err(skip) => {
                if let Some(current) = &current {
                    self.delete_endpoint(current).await?;
                    info!(reason = %skip, "Endpoint removed: pod no longer qualifies");
                }
                debug!(reason = %skip, "no Endpoint");
                return Ok(match skip {
                    s if s.is_transient() => Action::requeue(Duration::from_secs(2)),
                    Skip::TooManyLabels(_) => Action::requeue(Duration::from_secs(300)),
                    _ => Action::await_change(),
                });
            }
        };
        let identity = self.allocator.ensure(&desired.security_labels).await?;
        let previous = ours.as_ref().or(current.as_ref().map(|c| &c.spec));
        let spec = endpoint_spec(desired, Some(identity), previous);
        let id_label = identity.to_string();
        // (The revision moves only when the content does: see `endpoint_spec`.) Ours
        // carried the identity label of its identity.
        let labelled = match &ours {
            Some(ours) => ours.identity == Some(identity),
            None => current.as_ref().is_some_and(|c| labelled_with(c, identity)),
        };
        if labelled && previous.is_some_and(|p| p.revision == spec.revision) {
            return Ok(Action::await_change());
        }
        if spec.pod_uid.is_empty() {
            return Err(Error::MissingMetadata);
        }
        let body = runtime::apply_body::<Endpoint>(
            &name,
            Some(&ns),
            json!({
                "metadata": { "labels": { IDENTITY_LABEL: id_label } },
                "spec": spec,
            }),
        );
        let api = Api::<Endpoint>::namespaced(self.client.clone(), &ns);
        self.written.applying(key.clone(), &spec);
        if let Err(e) = runtime::apply(&api, &runtime::field_manager(NAME), &body).await {
            self.written.failed(&key, &spec);
            return Err(e.into());
        }
        // Until the identities concern sees this Endpoint, the fresh use keeps the identity
        // from being collected.
        self.allocator
            .index()
            .touch(identity, k8s_openapi::jiff::Timestamp::now());
        self.writes.inc();
        debug!(identity, revision = spec.revision, "Endpoint applied");
        Ok(Action::await_change())
    }
}

fn pod_of(ep: Endpoint) -> Option<ObjectRef<PodInfo>> {
    ep.namespace()
        .map(|ns| ObjectRef::<PodInfo>::new(&ep.name_any()).within(&ns))
}

/// Whether `endpoint` was written for `pod` (not an earlier pod of the same name). Endpoints
/// written before `spec.podUID` existed name their pod in an owner reference instead.
fn owned_by(endpoint: &Endpoint, pod: &PodInfo) -> bool {
    let uid = pod.meta().uid.as_deref();
    if !endpoint.spec.pod_uid.is_empty() {
        return Some(endpoint.spec.pod_uid.as_str()) == uid;
    }
    endpoint
        .owner_references()
        .iter()
        .any(|o| o.kind == "Pod" && Some(o.uid.as_str()) == uid)
}

/// Runs the endpoints controller until `ctx.shutdown`, allocating identities through
/// `allocator` (shared with the identities concern).
pub async fn run(
    ctx: runtime::Context,
    config: IdentitiesConfig,
    allocator: IdentityAllocator,
) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let pods = ctx.caches.all_trimmed::<PodInfo>(pod::trim_pod);
    let namespaces = ctx.caches.all::<Namespace>();
    let endpoints = crate::endpoints::cache(&ctx.caches);
    // An Identity that disappears while endpoints use it (deleted by hand): those pods
    // are reconciled again and get a new identity.
    let ep_of_deleted_identities = {
        let endpoints = endpoints.store();
        futures::stream::unfold(allocator.subscribe_deleted(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(id) => return Some((id, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .flat_map(move |id| {
            futures::stream::iter(
                endpoints
                    .state()
                    .into_iter()
                    .filter(move |e: &Arc<Endpoint>| e.spec.identity == Some(id))
                    .map(|e| Ok::<_, watcher::Error>(e.as_ref().clone()))
                    .collect::<Vec<_>>(),
            )
        })
        .boxed()
    };
    let pods_of_ns = pods.store();
    let written = Arc::new(written::Written::default());
    let written_seen = written.clone();
    let controller = Controller::for_stream(pods.trigger(), pods.store())
        // A namespace's labels are part of every identity in it.
        .watches_stream(namespaces.applied(), move |ns: Namespace| {
            let name = ns.name_any();
            pods_of_ns
                .state()
                .iter()
                .filter(|p| p.namespace().as_deref() == Some(name.as_str()))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        // An Endpoint edited or deleted by someone else is put back.
        .watches_stream(
            endpoints.changes().filter_map(move |change| {
                written_seen.observe(&change);
                futures::future::ready(change.into_trigger(true))
            }),
            pod_of,
        )
        .watches_stream(ep_of_deleted_identities, pod_of);
    let deletes = ctx.metrics.domain(
        "tendril_endpoint_deletes",
        "Endpoint objects deleted because their pod stopped qualifying or is gone",
        Counter::default,
    );
    tokio::spawn(delete_endpoints_of_gone_pods(
        pods.clone(),
        endpoints.clone(),
        client.clone(),
        deletes.clone(),
        ctx.shutdown.clone(),
    ));
    tokio::spawn(sweep_orphans(
        pods.store(),
        endpoints.store(),
        client.clone(),
        deletes.clone(),
        ctx.shutdown.clone(),
    ));
    let reconciler = Endpoints {
        client,
        namespaces: namespaces.store(),
        endpoints: endpoints.store(),
        filter: LabelFilter::new(&config.label_filter),
        allocator,
        written,
        writes: ctx.metrics.domain(
            "tendril_endpoint_writes",
            "Endpoint objects applied by the endpoints concern",
            Counter::default,
        ),
        deletes,
    };
    runtime::run(controller, reconciler, &ctx).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tendril_crds::v1alpha1::EndpointSpec;

    fn endpoint(identity: Option<i64>, label: Option<&str>) -> Endpoint {
        let mut ep = Endpoint::new("web-1", EndpointSpec::default());
        ep.spec.identity = identity;
        ep.metadata.labels = label.map(|l| {
            std::collections::BTreeMap::from([
                (IDENTITY_LABEL.to_string(), l.to_string()),
                ("team".to_string(), "shop".to_string()),
            ])
        });
        ep
    }

    fn trimmed(mut ep: Endpoint) -> Endpoint {
        trim_endpoint(&mut ep);
        ep
    }

    #[test]
    fn the_cache_keeps_of_the_labels_only_whether_the_identity_label_is_right() {
        let right = trimmed(endpoint(Some(300), Some("300")));
        assert_eq!(right.metadata.labels, None, "nothing allocated");
        assert!(labelled_with(&right, 300));
        assert!(!labelled_with(&right, 301), "a new identity is written");

        for (identity, label) in [
            (Some(300), None),
            (Some(300), Some("299")),
            (None, Some("300")),
        ] {
            let ep = trimmed(endpoint(identity, label));
            assert_eq!(ep.metadata.labels, Some(Default::default()));
            assert!(!labelled_with(&ep, 300), "{identity:?} {label:?}");
        }
    }
}
