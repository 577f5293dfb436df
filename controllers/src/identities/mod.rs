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
//! Metrics: `tendril_identities{type}` (reserved, cluster), `tendril_identity_allocations_total`,
//! `tendril_identity_gc_total`.

pub mod allocator;
pub mod index;
pub mod labels;

use allocator::IdentityAllocator;
use index::{GcDecision, gc_decision};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tendril_crds::v1alpha1::{Endpoint, Identity};
use tendril_runtime::{self as runtime, Reconciler};
use tracing::info;

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
}

impl Default for IdentitiesConfig {
    fn default() -> Self {
        Self {
            gc_grace_period_seconds: 15 * 60,
            label_filter: labels::LabelFilterConfig::default(),
        }
    }
}

impl IdentitiesConfig {
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.gc_grace_period_seconds)
    }
}

/// Even a referenced identity is looked at this often, so a reference dropped without an
/// event for it (an endpoint moving to another identity) is noticed.
const RESYNC: Duration = Duration::from_secs(60);

pub type Error = runtime::ApiError;

struct Identities {
    api: Api<Identity>,
    all_endpoints: Api<Endpoint>,
    endpoints: Store<Endpoint>,
    allocator: IdentityAllocator,
    grace: Duration,
    gc: Counter,
}

impl Identities {
    fn references(&self, id: i64) -> i64 {
        self.endpoints
            .state()
            .iter()
            .filter(|e| e.spec.identity == Some(id))
            .count() as i64
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
                if identity.status.is_none()
                    || status.references != references
                    || status.last_referenced != last_referenced
                {
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
                        Ok(_) => {}
                        // Deleted meanwhile: nothing left to describe.
                        Err(kube::Error::Api(s)) if s.code == 404 => {
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
    let identities = ctx.caches.all::<Identity>();
    let endpoints = ctx.caches.all::<Endpoint>();
    // Reference counts only need to settle: a burst of Endpoint changes for one identity
    // becomes one reconcile (and at most one status write).
    let controller = Controller::for_stream(identities.trigger(), identities.store())
        .with_config(controller::Config::default().debounce(Duration::from_secs(1)))
        .watches_stream(endpoints.trigger(), |endpoint: Endpoint| {
            endpoint
                .spec
                .identity
                .map(|id| ObjectRef::<Identity>::new(&id.to_string()))
        });
    let reconciler = Identities {
        api,
        all_endpoints: Api::<Endpoint>::all(ctx.client.clone()),
        endpoints: endpoints.store(),
        allocator,
        grace: config.grace_period(),
        gc: ctx.metrics.domain(
            "tendril_identity_gc",
            "Identities deleted after being unreferenced for the grace period",
            Counter::default,
        ),
    };
    runtime::run(controller, reconciler, &ctx).await;
    Ok(())
}
