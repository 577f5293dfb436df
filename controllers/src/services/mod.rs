//! Concern `services`: Service + EndpointSlices (+ Node zones) → one `LBService` per
//! Service (same namespace and name, controller owner reference to the Service), field
//! manager `tendril-services`.
//!
//! Shaped like linkerd2's policy controller: [`translate`] turns a Service and its slices
//! into an `LBServiceSpec` (pure values, unit-tested without Kubernetes), [`sequence`]
//! numbers the writes with the cluster-wide revision sequence, [`status`] computes the
//! status from the nodes' reports; this module is the thin plumbing around them:
//!
//! - a per-Service controller on the process's shared caches: a change of the Service, of
//!   one of its EndpointSlices (found through an index by `kubernetes.io/service-name`,
//!   kept in step with the trigger stream), of the zone label of a Node its endpoints run
//!   on, or of its `LBService` (edited or deleted by someone else: put back) reconciles it;
//! - the reconcile translates, and writes only when the spec changed: it takes the
//!   sequence (one lock: numbers are assigned and applied in order), numbers the spec and
//!   applies it with the annotation `tendril.dev/service-changed-at`; a skipped Service
//!   (headless, ExternalName, another class or proxy) has its `LBService` deleted;
//! - a status writer: on changes of the `NodeNetwork`s (the agents' reports), of what the
//!   reconciles recorded, or at the deadline of a pending revision, it recomputes every
//!   status in memory (O(services · log nodes)) and writes only those whose `Valid` or
//!   `Realized` changed ([`status`]: a revision every node realizes within the deadline
//!   writes no status);
//! - an orphan sweeper, once Services and LBServices have both been listed (only LBServices
//!   owned by a Service; one written by hand is the user's and is programmed as written): an `LBService`
//!   whose Service is gone is deleted (the garbage collector would too, through the owner
//!   reference, where one runs).
//!
//! Invalid input (SCTP ports, a bad algorithm annotation, too many entries) is served as
//! far as it can be, with `Valid=False` on the `LBService` and a Warning Event on the
//! Service.
//!
//! Metrics: `tendril_services_lbservices`, `tendril_services_backends`,
//! `tendril_services_invalid`, `tendril_services_revision`,
//! `tendril_services_writes_total`, `tendril_services_deletes_total`,
//! `tendril_services_status_writes_total`, `tendril_services_translate_seconds`.

mod config;
pub mod index;
mod metrics;
mod sequence;
pub mod slice;
pub mod status;
mod status_writer;
pub mod translate;
mod writes;

pub use config::ServicesConfig;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use index::{Board, Entry, SliceIndex};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use metrics::Metrics;
use sequence::Sequence;
use serde_json::json;
pub use slice::SliceInfo;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tendril_crds::facts::annotations::SERVICE_CHANGED_AT;
use tendril_crds::v1alpha1::{LBService, LBServiceSpec, NodeNetwork};
use tendril_runtime::caches::{Cache, Change};
use tendril_runtime::events::{self, ProblemLog};
use tendril_runtime::revisions::Revisions;
use tendril_runtime::{self as runtime, DesiredCondition, MetricLabel, Reconciler};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use translate::{SERVICE_NAME_LABEL, ZONE_LABEL};

/// The concern's name; its field manager is `tendril-services`.
pub const NAME: &str = "services";
/// The EndpointSlice controller's annotation: when the change it reflects happened.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Status writes in flight at once.
const STATUS_CONCURRENCY: usize = 16;
/// Page size of the lists that start a term's revision sequence.
const LIST_PAGE: u32 = 500;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    CacheNotReady(#[from] runtime::CacheNotReady),
    #[error("Service has no name, namespace or uid")]
    MissingMetadata,
}

impl MetricLabel for Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(e) => runtime::kube_error_label(e),
            Error::CacheNotReady(e) => e.metric_label(),
            Error::MissingMetadata => "missing_metadata",
        }
    }
}

/// (namespace, name) of a Service and its `LBService`.
type Key = (String, String);

fn key_of<K: Resource>(obj: &K) -> Option<Key> {
    Some((obj.meta().namespace.clone()?, obj.meta().name.clone()?))
}

/// Whether `lb` is owned by a Service (written by this concern).
fn owned_by_service(lb: &LBService) -> bool {
    lb.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Service" && o.api_version == "v1")
}

fn service_ref(key: &Key) -> ObjectRef<Service> {
    ObjectRef::new(&key.1).within(&key.0)
}

/// The Service an EndpointSlice belongs to.
fn service_of(slice: &SliceInfo) -> Option<Key> {
    Some((
        slice.metadata.namespace.clone()?,
        slice.labels().get(SERVICE_NAME_LABEL)?.clone(),
    ))
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[derive(Clone)]
struct Stores {
    services: Store<Service>,
    slices: Store<SliceInfo>,
    lbservices: Store<LBService>,
    nodes: Store<Node>,
    networks: Store<NodeNetwork>,
}

impl Stores {
    async fn ready(&self) -> Result<(), runtime::CacheNotReady> {
        runtime::cache_ready(&self.services, "services").await?;
        runtime::cache_ready(&self.slices, "endpointslices").await?;
        runtime::cache_ready(&self.lbservices, "lbservices").await?;
        runtime::cache_ready(&self.nodes, "nodes").await?;
        runtime::cache_ready(&self.networks, "nodenetworks").await?;
        Ok(())
    }

    fn lbservice(&self, key: &Key) -> Option<Arc<LBService>> {
        self.lbservices.get(&ObjectRef::new(&key.1).within(&key.0))
    }
}

/// Everything the reconciles, the status writer and the sweeper share for one term.
struct Shared {
    client: kube::Client,
    config: ServicesConfig,
    stores: Stores,
    slice_index: SliceIndex,
    /// Started on first use in a term, from a fresh list of LBServices and NodeNetworks.
    sequence: tokio::sync::OnceCell<tokio::sync::Mutex<Sequence>>,
    /// LBService writes in flight (`services.writesInFlight`).
    write_slots: tokio::sync::Semaphore,
    /// The specs written this term (the store lags behind them) and those seen deleted.
    written: Revisions<Key, LBServiceSpec>,
    board: Board,
    /// When a change of each Service was first observed and not yet handled.
    observed: Mutex<HashMap<Key, DateTime<Utc>>>,
    /// The invalid-input problem last reported with an Event, per Service.
    problems: ProblemLog<Key>,
    /// The slices' trigger times at the last write (or no-op) of each Service this term.
    triggers: Mutex<HashMap<Key, sequence::Triggers>>,
    recorder: Recorder,
    metrics: Metrics,
    manager: String,
}

impl Shared {
    fn observe(&self, key: Key) {
        self.observed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert_with(Utc::now);
    }

    fn take_observed(&self, key: &Key) -> Option<DateTime<Utc>> {
        self.observed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
    }

    fn restore_observed(&self, key: Key, at: DateTime<Utc>) {
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let e = observed.entry(key).or_insert(at);
        *e = (*e).min(at);
    }

    fn triggers_seen(&self, key: &Key) -> Option<sequence::Triggers> {
        self.triggers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    fn seen_triggers(&self, key: &Key, triggers: sequence::Triggers) {
        self.triggers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), triggers);
    }

    fn zone_of(&self, node: &str) -> Option<String> {
        self.stores
            .nodes
            .get(&ObjectRef::new(node))
            .and_then(|n| n.labels().get(ZONE_LABEL).cloned())
    }

    /// Keeps the term's sequence above a revision seen on an LBService (one written by
    /// hand may carry any number; agents report the highest they realize).
    async fn observe_revision(&self, revision: i64) {
        if let Some(seq) = self.sequence.get() {
            let mut seq = seq.lock().await;
            if revision > seq.last() {
                seq.observe(revision);
                self.metrics.revision.set(seq.last());
            }
        }
    }

    async fn reconcile_service(
        &self,
        svc: &Service,
        key: &Key,
        observed: Option<DateTime<Utc>>,
    ) -> Result<Action, Error> {
        let slices = self.slice_index.slices(key, &self.stores.slices);
        let started = Instant::now();
        let translated = translate::translate(svc, slices.iter().map(|s| s.as_ref()), |node| {
            self.zone_of(node)
        });
        self.metrics
            .translate_seconds
            .observe(started.elapsed().as_secs_f64());
        let stored = self.stores.lbservice(key);
        let t = match translated {
            Ok(t) => t,
            Err(skip) => {
                self.remove(key, stored.as_deref(), &skip.to_string())
                    .await?;
                debug!(reason = %skip, "not served");
                return Ok(Action::await_change());
            }
        };
        let valid = status::valid(&t.problems);
        self.report_invalid(svc, key, &valid).await;
        let current = self
            .written
            .latest(key, stored.as_ref().map(|lb| lb.spec.clone()));
        if current.is_none()
            && slices.is_empty()
            && let Some(wait) = sequence::wait_left(
                svc.metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.as_millisecond()),
                Timestamp::now().as_millisecond(),
                Duration::from_millis(self.config.slice_wait_millis),
            )
        {
            debug!(?wait, "new Service: waiting for its EndpointSlices");
            return Ok(Action::requeue(wait));
        }
        let backends = t.spec.backends.len();
        let triggers: sequence::Triggers = slices
            .iter()
            .filter_map(|s| {
                let t = s.annotations().get(TRIGGER_TIME_ANNOTATION)?;
                Some((s.name_any(), t.clone()))
            })
            .collect();
        if let Some(current) = current.as_ref()
            && !sequence::changed(&t.spec, Some(current))
        {
            // A slice change that changed nothing is not the trigger of a later write.
            self.seen_triggers(key, triggers);
            let generation = match self.board.get(key) {
                Some(e) if e.revision == current.revision && e.generation.is_some() => e.generation,
                _ => stored
                    .as_ref()
                    .filter(|lb| lb.spec.revision == current.revision)
                    .and_then(|lb| lb.metadata.generation),
            };
            self.board.set(
                key.clone(),
                Entry {
                    valid,
                    revision: current.revision,
                    generation,
                    since: Instant::now(),
                    backends,
                },
            );
            return Ok(Action::await_change());
        }

        if current.is_some()
            && let Some(first) = observed
            && let Some(wait) = sequence::wait_left(
                Some(first.timestamp_millis()),
                Utc::now().timestamp_millis(),
                Duration::from_millis(self.config.update_batch_millis),
            )
        {
            // The changes arriving meanwhile are written with this one (the first
            // change's time stays the trigger time).
            self.restore_observed(key.clone(), first);
            return Ok(Action::requeue(wait));
        }

        let owner = runtime::controller_owner_ref(svc).ok_or(Error::MissingMetadata)?;
        let previous_at = stored
            .as_ref()
            .and_then(|lb| lb.annotations().get(SERVICE_CHANGED_AT).cloned())
            .and_then(|a| parse_time(&a));
        let api = Api::<LBService>::namespaced(self.client.clone(), &key.0);
        // A slot first: a number taken while waiting for one would hold the settled
        // revision back for every write behind it.
        let _slot = self.write_slots.acquire().await.ok();
        let mut seq = self.sequence().await?;
        let Some(spec) = seq.number(&t.spec, current.as_ref()) else {
            return Ok(Action::await_change());
        };
        self.metrics.revision.set(seq.last());
        drop(seq);
        let seen = self.triggers_seen(key);
        let at = sequence::changed_at(previous_at, &triggers, seen.as_ref(), observed, Utc::now());
        let body = runtime::apply_body::<LBService>(
            &key.1,
            Some(&key.0),
            json!({
                "metadata": {
                    "ownerReferences": [owner],
                    "annotations": {
                        SERVICE_CHANGED_AT: at.to_rfc3339_opts(SecondsFormat::Micros, true),
                    },
                },
                "spec": spec,
            }),
        );
        let result = runtime::apply(&api, &self.manager, &body).await;
        let publish = self.sequence().await?.finish(spec.revision);
        let written = match (result, publish) {
            (Ok(written), Some(committed)) => self.publish(&api, body, committed, written).await,
            (Ok(written), None) => written,
            (Err(e), publish) => {
                if let Some(committed) = publish {
                    self.unpublish(committed).await;
                }
                return Err(e.into());
            }
        };
        self.seen_triggers(key, triggers);
        self.written.wrote(key.clone(), &spec);
        self.metrics.writes.inc();
        debug!(
            revision = spec.revision,
            backends,
            changed = %sequence::what_changed(current.as_ref(), &spec),
            "LBService written"
        );
        self.board.set(
            key.clone(),
            Entry {
                valid,
                revision: spec.revision,
                generation: written.metadata.generation,
                since: Instant::now(),
                backends,
            },
        );
        Ok(Action::await_change())
    }

    /// The Service is not (or no longer) served: its `LBService` goes.
    async fn remove(&self, key: &Key, stored: Option<&LBService>, why: &str) -> Result<(), Error> {
        self.board.remove(key);
        self.problems.clear(key);
        self.triggers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        self.written.forget(key);
        let Some(lb) = stored else {
            return Ok(());
        };
        let api = Api::<LBService>::namespaced(self.client.clone(), &key.0);
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: lb.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&key.1, &dp).await {
            Ok(_) => {
                self.metrics.deletes.inc();
                info!(namespace = %key.0, service = %key.1, reason = why, "LBService deleted");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A Warning Event on the Service when its translation found problems it did not
    /// report yet.
    async fn report_invalid(&self, svc: &Service, key: &Key, valid: &DesiredCondition) {
        if valid.status {
            self.problems.clear(key);
            return;
        }
        if !self.problems.is_new(key, &valid.message) {
            return;
        }
        warn!(namespace = %key.0, service = %key.1, reason = %valid.reason, message = %valid.message, "Service served in part");
        events::publish_warning(
            &self.recorder,
            &svc.object_ref(&()),
            &valid.reason,
            &valid.message,
            "TranslateService",
        )
        .await;
    }

    /// Deletes the `LBService` of `key` when its Service is gone.
    async fn sweep(&self, key: &Key) {
        if self.stores.services.get(&service_ref(key)).is_some() {
            return;
        }
        let Some(lb) = self.stores.lbservice(key) else {
            return;
        };
        // Only what this concern wrote (owned by a Service): an LBService written by hand,
        // without a Service, is the user's and is programmed as it is.
        if !owned_by_service(&lb) {
            return;
        }
        if let Err(e) = self.remove(key, Some(&lb), "Service gone").await {
            warn!(namespace = %key.0, service = %key.1, error = %e, "deleting an orphaned LBService failed");
        }
    }
}

/// Every object of `api`, in pages, from a consistent read, folded into `acc` as the pages
/// come (never the whole list of full objects in memory: at 10k LBServices that list was
/// the operator's peak heap).
async fn fold_all<K, T>(
    api: &Api<K>,
    mut acc: T,
    mut f: impl FnMut(&mut T, K),
) -> Result<T, kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = ListParams::default().limit(LIST_PAGE);
    loop {
        let page = api.list(&params).await?;
        for item in page.items {
            f(&mut acc, item);
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(acc),
        }
    }
}

struct Services(Arc<Shared>);

impl Reconciler for Services {
    type Object = Service;
    type Error = Error;
    const NAME: &'static str = NAME;

    async fn reconcile(&self, svc: Arc<Service>) -> Result<Action, Error> {
        let s = &self.0;
        s.stores.ready().await?;
        let key = key_of(svc.as_ref()).ok_or(Error::MissingMetadata)?;
        let observed = s.take_observed(&key);
        let result = s.reconcile_service(&svc, &key, observed).await;
        if result.is_err()
            && let Some(at) = observed
        {
            s.restore_observed(key, at);
        }
        result
    }
}

/// Deletes the LBServices whose Service is gone, once both kinds have been listed, then
/// on every deletion of a Service or appearance of an LBService.
async fn sweep_orphans(
    shared: Arc<Shared>,
    services: Cache<Service>,
    lbservices: Cache<LBService>,
    stop: CancellationToken,
) {
    let listed = async {
        let _ = futures::future::join(
            runtime::store_ready(&shared.stores.services),
            runtime::store_ready(&shared.stores.lbservices),
        )
        .await;
    };
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = listed => {}
    }
    let mut services = Box::pin(services.changes());
    let mut lbservices = Box::pin(lbservices.changes());
    loop {
        let key = tokio::select! {
            _ = stop.cancelled() => return,
            change = services.next() => match change {
                Some(Change::Deleted(svc)) => key_of(svc.as_ref()),
                // A relist may hide deletions: every LBService is looked at again.
                Some(Change::Listed) => {
                    for lb in shared.stores.lbservices.state() {
                        if let Some(key) = key_of(lb.as_ref()) {
                            shared.sweep(&key).await;
                        }
                    }
                    None
                }
                Some(_) => None,
                None => return,
            },
            change = lbservices.next() => match change {
                Some(Change::Applied(lb)) => {
                    shared.observe_revision(lb.spec.revision).await;
                    let key = key_of(lb.as_ref());
                    if let Some(key) = &key {
                        shared.written.caught_up(key, lb.spec.revision);
                    }
                    key
                }
                Some(_) => None,
                None => return,
            },
        };
        if let Some(key) = key {
            shared.sweep(&key).await;
        }
    }
}

/// The operator's one cache of every EndpointSlice (the services and bgp concerns share
/// it), as [`SliceInfo`]: what neither reads of an endpoint (its `targetRef`, hostname,
/// hints) is never decoded, and of the metadata the owner references go too.
pub fn slice_cache(caches: &runtime::caches::Caches) -> Cache<SliceInfo> {
    caches.all_trimmed(trim_slice)
}

fn trim_slice(slice: &mut SliceInfo) {
    slice.metadata.owner_references = None;
    slice.metadata.generate_name = None;
}

/// Runs the services concern until `ctx.shutdown`.
pub async fn run(ctx: runtime::Context, config: ServicesConfig) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let services = ctx.caches.all::<Service>();
    let slices = slice_cache(&ctx.caches);
    let lbservices = ctx.caches.all::<LBService>();
    let nodes = ctx.caches.all::<Node>();
    let networks = ctx.caches.all::<NodeNetwork>();
    let stores = Stores {
        services: services.store(),
        slices: slices.store(),
        lbservices: lbservices.store(),
        nodes: nodes.store(),
        networks: networks.store(),
    };
    let write_slots = config.writes_in_flight.max(1) as usize;
    let shared = Arc::new(Shared {
        client: client.clone(),
        config,
        stores,
        slice_index: SliceIndex::default(),
        sequence: tokio::sync::OnceCell::new(),
        write_slots: tokio::sync::Semaphore::new(write_slots),
        written: Revisions::default(),
        board: Board::default(),
        observed: Mutex::default(),
        problems: ProblemLog::default(),
        triggers: Mutex::default(),
        recorder: events::recorder(client, "tendril-operator"),
        metrics: Metrics::new(&ctx.metrics),
        manager: runtime::field_manager(NAME),
    });

    // A change of the Service itself.
    let service_changes = {
        let shared = shared.clone();
        services.changes().filter_map(move |change| {
            if let Change::Applied(svc) = &change
                && let Some(key) = key_of(svc.as_ref())
            {
                shared.observe(key);
            }
            futures::future::ready(change.into_trigger(true))
        })
    };
    // A change of one of its EndpointSlices: the index first, then the trigger.
    let slice_changes = {
        let shared = shared.clone();
        let store = slices.store();
        slices.changes().filter_map(move |change| {
            shared.slice_index.apply(&change, &store);
            // Only for a Service that exists: its reconcile takes the time (a slice of a
            // deleted Service would leave it behind).
            if let Some(key) = change.object().and_then(|s| service_of(s))
                && shared.stores.services.get(&service_ref(&key)).is_some()
            {
                shared.observe(key);
            }
            futures::future::ready(change.into_trigger(true))
        })
    };
    // An LBService edited by someone else is put back; one deleted by someone else is
    // remembered as deleted, so the reconcile puts it back with a new revision. Our own
    // writes come back too: the spec at the revision and generation the reconcile recorded,
    // and every status write, change nothing and trigger nothing (at 10k services a status
    // pass would otherwise be 10k no-op reconciles).
    let lb_changes = {
        let shared = shared.clone();
        lbservices.changes().filter_map(move |change| {
            match &change {
                Change::Deleted(lb) => {
                    if let Some(key) = key_of(lb.as_ref()) {
                        shared.written.deleted(key, &lb.spec);
                    }
                }
                Change::Applied(lb) => {
                    let ours = key_of(lb.as_ref())
                        .and_then(|key| shared.board.get(&key))
                        .is_some_and(|e| {
                            e.revision == lb.spec.revision
                                && e.generation.is_some()
                                && e.generation == lb.metadata.generation
                        });
                    if ours {
                        return futures::future::ready(None);
                    }
                }
                Change::Listed | Change::Failed(_) => {}
            }
            futures::future::ready(change.into_trigger(true))
        })
    };
    // A Node whose zone label changed: the services with endpoints on it (rare; node
    // status heartbeats change no zone and cost one map lookup).
    let zones: Arc<Mutex<HashMap<String, Option<String>>>> = Arc::default();
    let services_on_node = {
        let slices = slices.store();
        move |node: Node| {
            let name = node.name_any();
            let zone = node.labels().get(ZONE_LABEL).cloned();
            let previous = zones
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone(), zone.clone());
            if previous.is_none() || previous == Some(zone) {
                return Vec::new();
            }
            let keys: BTreeSet<Key> = slices
                .state()
                .iter()
                .filter(|s| {
                    s.endpoints
                        .iter()
                        .any(|e| e.node_name.as_deref() == Some(name.as_str()))
                })
                .filter_map(|s| service_of(s))
                .collect();
            keys.iter().map(service_ref).collect::<Vec<_>>()
        }
    };

    let controller = Controller::for_stream(service_changes, services.store())
        .watches_stream(slice_changes, |slice: SliceInfo| {
            service_of(&slice).map(|k| service_ref(&k))
        })
        .watches_stream(lb_changes, |lb: LBService| {
            key_of(&lb).map(|k| service_ref(&k))
        })
        .watches_stream(nodes.applied(), services_on_node);

    // The sequence starts now rather than at the first write: a term after one that ended
    // with writes in flight publishes their settled revision even if nothing changes.
    let starter = {
        let shared = shared.clone();
        async move {
            if let Err(e) = shared.sequence().await {
                warn!(error = %e, "starting the revision sequence failed (retried at the first write)");
            }
        }
    };
    let stop = ctx.shutdown.clone();
    let sweeper = sweep_orphans(
        shared.clone(),
        services.clone(),
        lbservices.clone(),
        stop.clone(),
    );
    let statuses = status_writer::write_statuses(
        shared.clone(),
        networks,
        lbservices,
        ctx.backoff.clone(),
        stop,
    );
    tokio::join!(
        runtime::run(controller, Services(shared), &ctx),
        starter,
        sweeper,
        statuses
    );
    Ok(())
}
