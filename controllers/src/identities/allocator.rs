//! The shared identity allocator: the in-memory [`IdentityIndex`] kept in sync with the
//! `Identity` objects by the process's `Identity` cache, plus creation of new `Identity`
//! objects.
//!
//! The endpoints concern calls [`IdentityAllocator::ensure`] so a new pod gets its identity
//! in the same reconcile that writes its `Endpoint`; the identities concern uses the same
//! index for garbage collection, so it never deletes an id this process just handed out.
//!
//! Creation under the numeric name is the lock: `create` of `Identity/<id>` succeeds for
//! exactly one writer. On 409 AlreadyExists the allocator reads the winner: the same labels
//! → adopt that id; other labels → record them and try the next id. Two replicas racing
//! (e.g. across a leadership hand-over) therefore never give one id two label sets.

use super::index::{Exhausted, IdentityIndex, IdentityKind, Reserved, Space, reserved_labels};
use super::labels::SecurityLabels;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tendril_crds::v1alpha1::{Identity, IdentitySpec};
use tendril_runtime::{
    self as runtime,
    caches::{Cache, Change},
};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How long an allocation waits for the index's first full list before failing.
const SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Field manager of `Identity` objects.
pub const MANAGER: &str = "tendril-identities";

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
    #[error("creating an Identity: {0}")]
    Kube(#[from] kube::Error),
    #[error("the identity index is not synced yet")]
    NotSynced,
}

impl runtime::MetricLabel for AllocError {
    fn metric_label(&self) -> &'static str {
        match self {
            AllocError::Exhausted(_) => "identities_exhausted",
            AllocError::Kube(e) => runtime::kube_error_label(e),
            AllocError::NotSynced => "not_synced",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

/// Handles to the allocator; cheap to clone.
#[derive(Clone)]
pub struct IdentityAllocator {
    api: Api<Identity>,
    index: Arc<Mutex<IdentityIndex>>,
    /// One lock per label set being created, so two reconciles needing the same new label
    /// set do not create two ids for it, while different label sets are created in parallel.
    creating: Arc<Mutex<HashMap<SecurityLabels, Arc<tokio::sync::Mutex<()>>>>>,
    synced: watch::Receiver<bool>,
    /// Ids whose `Identity` disappeared (after the index dropped them).
    deleted: broadcast::Sender<i64>,
    allocations: Counter,
    identities: Family<TypeLabel, Gauge>,
    space_used: Gauge,
    space_size: Gauge,
    /// The space in use, for the identities concern's `IdentitySpaceAvailable` condition.
    space: watch::Sender<Space>,
}

impl std::fmt::Debug for IdentityAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityAllocator").finish_non_exhaustive()
    }
}

/// The `Identity` object for an id and label set.
pub fn identity_object(id: i64, labels: &SecurityLabels) -> Identity {
    Identity::new(
        &id.to_string(),
        IdentitySpec {
            id,
            security_labels: labels.clone(),
        },
    )
}

impl IdentityAllocator {
    /// Starts keeping the index in sync with the `Identity` cache (until `ctx.shutdown`);
    /// new cluster ids go up to `cluster_id_max` (`identities.clusterIdMax`).
    pub fn start(ctx: &runtime::Context, cluster_id_max: i64) -> Self {
        let api = Api::<Identity>::all(ctx.client.clone());
        let (tx, synced) = watch::channel(false);
        let index = IdentityIndex::with_max(cluster_id_max);
        let space = watch::channel(index.space()).0;
        let allocator = IdentityAllocator {
            api: api.clone(),
            index: Arc::new(Mutex::new(index)),
            creating: Arc::default(),
            synced,
            deleted: broadcast::channel(1024).0,
            allocations: ctx.metrics.domain(
                "tendril_identity_allocations",
                "Cluster identities created by this operator",
                Counter::default,
            ),
            identities: ctx.metrics.domain(
                "tendril_identities",
                "Identities known, by type (reserved, cluster)",
                Family::<TypeLabel, Gauge>::default,
            ),
            space_used: ctx.metrics.domain(
                "tendril_identity_space_used",
                "Cluster identity ids in use (or being created) out of tendril_identity_space_size",
                Gauge::default,
            ),
            space_size: ctx.metrics.domain(
                "tendril_identity_space_size",
                "Cluster identity ids the operator may hand out (256 to identities.clusterIdMax)",
                Gauge::default,
            ),
            space,
        };
        let identities = ctx.caches.all::<Identity>();
        tokio::spawn(sync_index(
            identities,
            allocator.clone(),
            tx,
            ctx.shutdown.clone(),
        ));
        allocator
    }

    pub fn index(&self) -> MutexGuard<'_, IdentityIndex> {
        self.index.lock().expect("identity index lock")
    }

    /// Waits until the index holds the full list of identities.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Ids of `Identity` objects that disappeared, sent after the index dropped them: an
    /// endpoint still using one gets a new identity on its next reconcile.
    pub fn subscribe_deleted(&self) -> broadcast::Receiver<i64> {
        self.deleted.subscribe()
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// The identity space in use, updated on every change of the index.
    pub fn subscribe_space(&self) -> watch::Receiver<Space> {
        self.space.subscribe()
    }

    fn publish_counts(&self) {
        let index = self.index();
        let space = index.space();
        self.space_used
            .set(i64::try_from(space.used).unwrap_or(i64::MAX));
        self.space_size
            .set(i64::try_from(space.capacity).unwrap_or(i64::MAX));
        self.space
            .send_if_modified(|s| std::mem::replace(s, space) != space);
        for kind in [IdentityKind::Reserved, IdentityKind::Cluster] {
            self.identities
                .get_or_create(&TypeLabel {
                    r#type: kind.as_str().to_string(),
                })
                .set(i64::try_from(index.count(kind)).unwrap_or(i64::MAX));
        }
    }

    fn lookup_and_touch(&self, labels: &SecurityLabels) -> Option<i64> {
        let mut index = self.index();
        let id = index.lookup(labels)?;
        index.touch(id, Timestamp::now());
        Some(id)
    }

    /// The id of `labels`, creating its `Identity` when none exists.
    pub async fn ensure(&self, labels: &SecurityLabels) -> Result<i64, AllocError> {
        // At start, reconciles wait for the first full list rather than fail and back off.
        if !self.is_synced()
            && tokio::time::timeout(SYNC_WAIT, self.wait_synced())
                .await
                .is_err()
        {
            return Err(AllocError::NotSynced);
        }
        if let Some(id) = self.lookup_and_touch(labels) {
            return Ok(id);
        }
        let lock = self
            .creating
            .lock()
            .expect("creating lock")
            .entry(labels.clone())
            .or_default()
            .clone();
        let result = {
            let _creating = lock.lock().await;
            self.create(labels).await
        };
        let mut creating = self.creating.lock().expect("creating lock");
        // The last one out removes the entry (the map holds one reference, `lock` another).
        if Arc::strong_count(&lock) <= 2 {
            creating.remove(labels);
        }
        result
    }

    async fn create(&self, labels: &SecurityLabels) -> Result<i64, AllocError> {
        loop {
            if let Some(id) = self.lookup_and_touch(labels) {
                return Ok(id);
            }
            let id = self.index().reserve_next()?;
            let pp = PostParams {
                field_manager: Some(MANAGER.to_string()),
                ..Default::default()
            };
            match self.api.create(&pp, &identity_object(id, labels)).await {
                Ok(_) => {
                    {
                        let mut index = self.index();
                        index.apply(id, labels.clone());
                        index.touch(id, Timestamp::now());
                    }
                    self.allocations.inc();
                    self.publish_counts();
                    debug!(id, "identity created");
                    return Ok(id);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    // Someone else holds the name: learn what it stands for.
                    match self.api.get_opt(&id.to_string()).await {
                        Ok(Some(existing)) => {
                            let same = existing.spec.security_labels == *labels;
                            self.index().apply(id, existing.spec.security_labels);
                            if same {
                                self.index().touch(id, Timestamp::now());
                                return Ok(id);
                            }
                            debug!(
                                id,
                                "identity id taken by another label set; trying the next"
                            );
                        }
                        Ok(None) => self.index().abandon(id),
                        Err(e) => {
                            self.index().abandon(id);
                            return Err(e.into());
                        }
                    }
                }
                Err(e) => {
                    self.index().abandon(id);
                    return Err(e.into());
                }
            }
        }
    }

    /// Creates the reserved identities' objects (1–8) where missing.
    pub async fn ensure_reserved(&self) -> Result<(), kube::Error> {
        let pp = PostParams {
            field_manager: Some(MANAGER.to_string()),
            ..Default::default()
        };
        for reserved in Reserved::ALL {
            match self
                .api
                .create(
                    &pp,
                    &identity_object(reserved.id(), &reserved_labels(reserved)),
                )
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn id_and_labels(identity: &Identity) -> (i64, SecurityLabels) {
    (identity.spec.id, identity.spec.security_labels.clone())
}

/// Mirrors every `Identity` of the cache into the index; `synced` turns true after the
/// first complete list.
async fn sync_index(
    cache: Cache<Identity>,
    allocator: IdentityAllocator,
    synced: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let store = cache.store();
    let mut changes = Box::pin(cache.changes());
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => return,
            c = changes.next() => c,
        };
        match change {
            None => return,
            Some(Change::Listed) => {
                let vanished: Vec<i64> = {
                    let mut index = allocator.index();
                    let before: Vec<i64> = index.ids().collect();
                    index.reset(store.state().iter().map(|i| id_and_labels(i)));
                    if !*synced.borrow() {
                        index.start_after_highest();
                    }
                    before
                        .into_iter()
                        .filter(|id| index.labels(*id).is_none())
                        .collect()
                };
                for id in vanished {
                    let _ = allocator.deleted.send(id);
                }
                allocator.publish_counts();
                synced.send_replace(true);
            }
            Some(Change::Applied(i)) => {
                let (id, labels) = id_and_labels(&i);
                allocator.index().apply(id, labels);
                allocator.publish_counts();
            }
            Some(Change::Deleted(i)) => {
                allocator.index().delete(i.spec.id);
                let _ = allocator.deleted.send(i.spec.id);
                allocator.publish_counts();
            }
            // The cache logs and counts it, and retries.
            Some(Change::Failed(_)) => {}
        }
    }
}
