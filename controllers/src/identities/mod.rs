//! Concern `identities`: each distinct security label set → one cluster-scoped `Identity`
//! named by its number; references counted, unreferenced identities collected after a grace
//! period.
//!
//! [`labels`] decides which labels count, [`index`] numbers identities and decides garbage
//! collection (pure values), [`allocator`] is the shared index and `Identity` creation the
//! endpoints concern allocates through. The reconciler here maintains
//! `status.references`/`status.lastReferenced` of every `Identity` from the `Endpoint`s that
//! use it, and deletes one unreferenced for `identities.gcGracePeriodSeconds`.
//!
//! The operator hands out cluster ids from 256 to `identities.clusterIdMax`. How much of
//! that space is in use is the condition `IdentitySpaceAvailable` on `Identity/1` (the
//! reserved `host` identity, the first `kubectl get identities` lists): `True`/`Available`,
//! then `False`/`NearlyExhausted` from `identities.spaceWarningPercent`, `False`/`Exhausted`
//! when every id is taken (new label sets then wait until garbage collection frees ids:
//! their pods' reconciles fail with `identities_exhausted` and retry with backoff). It is
//! written only when the reason changes, never per allocation.
//!
//! Metrics: `tendril_identities{type}` (reserved, cluster), `tendril_identity_allocations_total`,
//! `tendril_identity_gc_total`, `tendril_identity_space_used`, `tendril_identity_space_size`.

pub mod allocator;
pub mod index;
pub mod labels;
pub mod references;

use allocator::IdentityAllocator;
use futures::StreamExt as _;
use index::{GcDecision, Space, gc_decision, references_write_due};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use prometheus_client::metrics::counter::Counter;
use references::References;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tendril_crds::facts::{CLUSTER_IDENTITY_MAX, CLUSTER_IDENTITY_MIN, Reserved};
use tendril_crds::v1alpha1::{Endpoint, Identity};
use tendril_runtime::caches::Change;
use tendril_runtime::conditions::{self, DesiredCondition};
use tendril_runtime::{self as runtime, Reconciler};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The concern's name; its field manager is `tendril-identities`.
pub const NAME: &str = "identities";

/// `identities` in config/operator.yaml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IdentitiesConfig {
    /// How long an identity stays after its last endpoint went away before it is deleted
    /// (and its id may later be reused).
    pub gc_grace_period_seconds: u64,
    /// Which pod and namespace labels count for identities.
    pub label_filter: labels::LabelFilterConfig,
    /// The highest cluster identity id handed out (256..=65535).
    pub cluster_id_max: i64,
    /// `IdentitySpaceAvailable` turns False (`NearlyExhausted`) when this percentage of the
    /// ids is in use.
    pub space_warning_percent: u8,
    /// `status.references` of an identity in use is rewritten at most this often (whether
    /// it is used at all is written at once): a busy identity otherwise costs a status
    /// write per pod that comes or goes. 0: every change.
    pub references_refresh_seconds: u64,
}

impl Default for IdentitiesConfig {
    fn default() -> Self {
        Self {
            gc_grace_period_seconds: 15 * 60,
            label_filter: labels::LabelFilterConfig::default(),
            cluster_id_max: CLUSTER_IDENTITY_MAX,
            space_warning_percent: 90,
            references_refresh_seconds: 30,
        }
    }
}

impl IdentitiesConfig {
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.gc_grace_period_seconds)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(CLUSTER_IDENTITY_MIN..=CLUSTER_IDENTITY_MAX).contains(&self.cluster_id_max) {
            return Err(format!(
                "identities.clusterIdMax must be a cluster identity id ({CLUSTER_IDENTITY_MIN}-{CLUSTER_IDENTITY_MAX}), not {}",
                self.cluster_id_max
            ));
        }
        if !(1..=100).contains(&self.space_warning_percent) {
            return Err(format!(
                "identities.spaceWarningPercent must be 1-100, not {}",
                self.space_warning_percent
            ));
        }
        Ok(())
    }
}

/// Condition on `Identity/1` saying how much of the identity space is in use.
pub const SPACE_CONDITION: &str = "IdentitySpaceAvailable";
/// Field manager of that condition (the status fields of the reconciler below are
/// `tendril-identities`'; two managers so neither apply drops the other's fields).
const SPACE_MANAGER: &str = "tendril-identity-space";
/// A failed condition write is tried again after this long.
const SPACE_RETRY: Duration = Duration::from_secs(5);
/// The count in the condition's message is brought up to date at most this often.
const SPACE_REFRESH: Duration = Duration::from_secs(10);

/// The `IdentitySpaceAvailable` condition for `space` in use.
pub fn space_condition(space: Space, warning_percent: u8) -> DesiredCondition {
    let Space { used, capacity } = space;
    let of = format!(
        "{used} of {capacity} cluster identity ids in use (identities.clusterIdMax {})",
        CLUSTER_IDENTITY_MIN + capacity as i64 - 1
    );
    if used >= capacity {
        DesiredCondition::new(
            SPACE_CONDITION,
            false,
            "Exhausted",
            format!(
                "{of}: pods with a new label set get no identity until unused identities are collected (identities.gcGracePeriodSeconds); raise clusterIdMax or drop labels from identities (identities.labelFilter)"
            ),
        )
    } else if used * 100 >= capacity * u64::from(warning_percent) {
        DesiredCondition::new(
            SPACE_CONDITION,
            false,
            "NearlyExhausted",
            format!(
                "{of}, at least identities.spaceWarningPercent ({warning_percent}%); raise clusterIdMax or drop labels from identities (identities.labelFilter)"
            ),
        )
    } else {
        DesiredCondition::new(SPACE_CONDITION, true, "Available", of)
    }
}

/// Writes `IdentitySpaceAvailable` on `Identity/1`: at once when its reason changes, and
/// when only the count in its message moved, at most every [`SPACE_REFRESH`] (one write per
/// allocation would be thousands of writes of one object while a cluster starts).
async fn report_space(
    api: Api<Identity>,
    allocator: IdentityAllocator,
    warning_percent: u8,
    stop: CancellationToken,
) {
    let mut space = allocator.subscribe_space();
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = allocator.wait_synced() => {}
    }
    let host = Reserved::Host.id().to_string();
    // What was last written, and when.
    let mut written: Option<(Space, tokio::time::Instant)> = None;
    loop {
        let current = *space.borrow_and_update();
        let desired = space_condition(current, warning_percent);
        let due = match written {
            None => Some(tokio::time::Instant::now()),
            Some((space, _)) if space == current => None,
            Some((space, at)) => {
                if space_condition(space, warning_percent).reason != desired.reason {
                    Some(tokio::time::Instant::now())
                } else {
                    Some(at + SPACE_REFRESH)
                }
            }
        };
        if let Some(due) = due {
            if due > tokio::time::Instant::now() {
                // Only the count moved: written when due, with the count then.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(due) => continue,
                    changed = space.changed() => if changed.is_err() { return } else { continue },
                }
            }
            match write_space_condition(&api, &host, &desired).await {
                Ok(()) => written = Some((current, tokio::time::Instant::now())),
                Err(e) => {
                    warn!(error = %e, "writing the {SPACE_CONDITION} condition failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(SPACE_RETRY) => continue,
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = space.changed() => if changed.is_err() { return },
        }
    }
}

async fn write_space_condition(
    api: &Api<Identity>,
    name: &str,
    desired: &DesiredCondition,
) -> Result<(), kube::Error> {
    let current = api.get(name).await?;
    let previous = current
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, SPACE_CONDITION));
    let condition = conditions::merge(
        previous,
        desired,
        current.metadata.generation,
        Timestamp::now(),
    );
    let body = runtime::apply_body::<Identity>(
        name,
        None,
        json!({ "status": { "conditions": [condition] } }),
    );
    runtime::apply_status(api, SPACE_MANAGER, &body).await?;
    info!(reason = %desired.reason, message = %desired.message, "{SPACE_CONDITION}");
    Ok(())
}

/// Even a referenced identity is looked at this often, so a reference dropped without an
/// event for it (an endpoint moving to another identity) is noticed.
const RESYNC: Duration = Duration::from_secs(60);

pub type Error = runtime::ApiError;

struct Identities {
    api: Api<Identity>,
    all_endpoints: Api<Endpoint>,
    endpoints: Store<Endpoint>,
    references: Arc<Mutex<References>>,
    allocator: IdentityAllocator,
    grace: Duration,
    gc: Counter,
    references_refresh: Duration,
    /// When this process last wrote each identity's status.
    status_written: Mutex<HashMap<i64, Instant>>,
}

impl Identities {
    fn references(&self, id: i64) -> i64 {
        lock(&self.references).count(id)
    }
}

impl Reconciler for Identities {
    type Object = Identity;
    type Error = Error;
    const NAME: &'static str = NAME;

    async fn reconcile(&self, identity: Arc<Identity>) -> Result<Action, Error> {
        // Counting references needs every Endpoint, and GC needs the index.
        runtime::cache_ready(&self.endpoints, "endpoints").await?;
        if tokio::time::timeout(runtime::CACHE_WAIT, self.allocator.wait_synced())
            .await
            .is_err()
        {
            return Err(runtime::CacheNotReady("identities").into());
        }
        let id = identity.spec.id;
        let references = self.references(id);
        let status = identity.status.clone().unwrap_or_default();
        let last_used = self.allocator.index().last_used(id);
        let now = Timestamp::now();
        match gc_decision(
            id,
            references,
            status.last_referenced.as_ref().map(|t| t.0),
            last_used,
            now,
            self.grace,
        ) {
            GcDecision::Collect => {
                // The store may lag behind a just-written Endpoint: ask the apiserver (a
                // quorum read) whether any Endpoint still carries this identity.
                let lp = ListParams::default()
                    .labels(&format!("{}={id}", crate::endpoints::IDENTITY_LABEL))
                    .limit(1);
                if !self
                    .all_endpoints
                    .list_metadata(&lp)
                    .await?
                    .items
                    .is_empty()
                {
                    return Ok(Action::requeue(Duration::from_secs(5)));
                }
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: identity.uid(),
                        resource_version: identity.resource_version(),
                    }),
                    ..Default::default()
                };
                match self.api.delete(&identity.name_any(), &dp).await {
                    Ok(_) => {
                        self.allocator.index().delete(id);
                        self.gc.inc();
                        info!(id, "unreferenced identity collected");
                    }
                    // Gone already, or changed since we looked (look again).
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
                Ok(Action::await_change())
            }
            GcDecision::Keep {
                references,
                last_referenced,
                recheck_after,
            } => {
                let last_referenced = last_referenced.map(Time);
                // Also when there is no status yet: a reserved identity nothing references
                // would otherwise never get `references: 0`, and its REFERENCES column
                // would stay empty.
                let since_write = lock(&self.status_written).get(&id).map(Instant::elapsed);
                let due = references_write_due(
                    identity
                        .status
                        .as_ref()
                        .map(|s| (s.references, s.last_referenced.as_ref().map(|t| t.0))),
                    (references, last_referenced.as_ref().map(|t| t.0)),
                    since_write,
                    self.references_refresh,
                );
                let recheck_after = match due {
                    Err(wait) => Some(recheck_after.map_or(wait, |r| r.min(wait))),
                    Ok(_) => recheck_after,
                };
                if due == Ok(true) {
                    // An absent lastReferenced is left out: SSA then drops the field we owned.
                    let mut fields = json!({ "references": references });
                    if let Some(t) = &last_referenced {
                        fields["lastReferenced"] = json!(t);
                    }
                    let body = runtime::apply_body::<Identity>(
                        &identity.name_any(),
                        None,
                        json!({ "status": fields }),
                    );
                    match runtime::apply_status(&self.api, allocator::MANAGER, &body).await {
                        Ok(_) => {
                            lock(&self.status_written).insert(id, Instant::now());
                        }
                        // Deleted meanwhile: nothing left to describe.
                        Err(kube::Error::Api(s)) if s.code == 404 => {
                            lock(&self.status_written).remove(&id);
                            return Ok(Action::await_change());
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(Action::requeue(recheck_after.unwrap_or(RESYNC).min(RESYNC)))
            }
        }
    }
}

/// Runs the identities controller (status and garbage collection) until `ctx.shutdown`.
/// The allocator is shared with the endpoints concern for the leadership term.
pub async fn run(
    ctx: runtime::Context,
    config: IdentitiesConfig,
    allocator: IdentityAllocator,
) -> anyhow::Result<()> {
    if let Err(e) = allocator.ensure_reserved().await {
        tracing::warn!(error = %e, "creating the reserved identities failed; continuing");
    }
    let api = Api::<Identity>::all(ctx.client.clone());
    tokio::spawn(report_space(
        api.clone(),
        allocator.clone(),
        config.space_warning_percent,
        ctx.shutdown.clone(),
    ));
    let identities = ctx.caches.all::<Identity>();
    let endpoints = crate::endpoints::cache(&ctx.caches);
    // The reference counts, kept from the change stream before it triggers: a change that
    // moves no reference wakes nothing; one that moves an endpoint between identities
    // wakes both. Counts only need to settle: a burst of changes for one identity becomes
    // one reconcile (and at most one status write).
    let references = Arc::new(Mutex::new(References::default()));
    let moved = Arc::new(Mutex::new(std::collections::HashMap::<String, i64>::new()));
    // Identities a relist of the Endpoints recounted (deletions it hid): reconciled too,
    // or one left without endpoints would never be collected.
    let (recount_tx, recount_rx) = futures::channel::mpsc::unbounded::<i64>();
    let endpoint_changes = {
        let (references, moved, store) = (references.clone(), moved.clone(), endpoints.store());
        endpoints.trigger_when(move |change| {
            let mut references = lock(&references);
            match change {
                Change::Applied(e) => {
                    let key = runtime::object_key(e.as_ref());
                    let counted = references.identity_of(&key) != e.spec.identity;
                    if let Some(previous) = references.set(&key, e.spec.identity) {
                        lock(&moved).insert(key, previous);
                    }
                    counted
                }
                Change::Deleted(e) => references
                    .remove(&runtime::object_key(e.as_ref()))
                    .is_some(),
                Change::Listed => {
                    let recounted = references.reset(
                        store
                            .state()
                            .iter()
                            .map(|e| (runtime::object_key(e.as_ref()), e.spec.identity)),
                    );
                    for id in recounted {
                        let _ = recount_tx.unbounded_send(id);
                    }
                    false
                }
                Change::Failed(_) => false,
            }
        })
    };
    let recounted = {
        let store = identities.store();
        recount_rx.filter_map(move |id| {
            let identity = store.get(&ObjectRef::new(&id.to_string()));
            futures::future::ready(identity.map(|i| Ok(Identity::clone(&i))))
        })
    };
    let triggers = futures::stream::select(identities.trigger(), recounted);
    let controller = Controller::for_stream(triggers, identities.store())
        .with_config(controller::Config::default().debounce(Duration::from_secs(1)))
        .watches_stream(endpoint_changes, move |endpoint: Endpoint| {
            let moved_from = lock(&moved).remove(&runtime::object_key(&endpoint));
            endpoint
                .spec
                .identity
                .into_iter()
                .chain(moved_from)
                .map(|id| ObjectRef::<Identity>::new(&id.to_string()))
        });
    let reconciler = Identities {
        api,
        all_endpoints: Api::<Endpoint>::all(ctx.client.clone()),
        endpoints: endpoints.store(),
        references,
        allocator,
        grace: config.grace_period(),
        gc: ctx.metrics.domain(
            "tendril_identity_gc",
            "Identities deleted after being unreferenced for the grace period",
            Counter::default,
        ),
        references_refresh: Duration::from_secs(config.references_refresh_seconds),
        status_written: Mutex::default(),
    };
    runtime::run(controller, reconciler, &ctx).await;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_condition_warns_before_exhaustion() {
        let c = |used| space_condition(Space { used, capacity: 10 }, 80);
        assert!(c(7).status);
        assert_eq!(c(7).reason, "Available");
        assert!(!c(8).status);
        assert_eq!(c(8).reason, "NearlyExhausted");
        assert!(c(8).message.contains("8 of 10"), "{}", c(8).message);
        assert!(
            c(8).message.contains("clusterIdMax 265"),
            "{}",
            c(8).message
        );
        assert_eq!(c(10).reason, "Exhausted");
        assert_eq!(c(11).reason, "Exhausted");
    }

    #[test]
    fn config_bounds() {
        let ok = IdentitiesConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let low = IdentitiesConfig {
            cluster_id_max: 255,
            ..Default::default()
        };
        assert!(low.validate().unwrap_err().contains("clusterIdMax"));
        let pct = IdentitiesConfig {
            space_warning_percent: 0,
            ..Default::default()
        };
        assert!(pct.validate().unwrap_err().contains("spaceWarningPercent"));
    }
}
