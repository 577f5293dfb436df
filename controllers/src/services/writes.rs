//! The term's revision sequence and the publication of its settled revision (see
//! [`super::sequence`]): the API side of the pipelined LBService writes.

use super::sequence::Sequence;
use super::{Error, SERVICE_CHANGED_AT, Shared, fold_all, owned_by_service};
use kube::ResourceExt;
use kube::api::Api;
use serde_json::json;
use std::time::Instant;
use tendril_crds::v1alpha1::{LBService, NodeNetwork};
use tendril_runtime as runtime;
use tracing::{debug, info, warn};

impl Shared {
    /// A drained sequence's settled revision could not be written: the next drain tries.
    pub(super) async fn unpublish(&self, committed: i64) {
        if let Some(seq) = self.sequence.get() {
            seq.lock().await.unpublish(committed);
        }
    }

    /// Applies `body` (the write just made) again with `committedRevision` set to
    /// `committed`, the settled revision of a drained sequence, so agents learn that every
    /// revision up to it committed. Returns what the API now holds (`written` when this
    /// failed; the next drain tries again).
    pub(super) async fn publish(
        &self,
        api: &Api<LBService>,
        mut body: serde_json::Value,
        committed: i64,
        written: LBService,
    ) -> LBService {
        body["spec"]["committedRevision"] = json!(committed);
        match runtime::apply(api, &self.manager, &body).await {
            Ok(published) => {
                self.metrics.publishes.inc();
                debug!(committed, "settled revision published");
                published
            }
            Err(e) => {
                warn!(committed, error = %e, "publishing the settled revision failed");
                self.unpublish(committed).await;
                written
            }
        }
    }

    /// The term's sequence (numbers, what is in flight), locked until the guard drops.
    pub(super) async fn sequence(&self) -> Result<tokio::sync::MutexGuard<'_, Sequence>, Error> {
        let cell = self
            .sequence
            .get_or_try_init(|| async {
                let started = Instant::now();
                let lbs = fold_all(
                    &Api::<LBService>::all(self.client.clone()),
                    Listed::default(),
                    |listed, lb| listed.add(lb),
                )
                .await?;
                let (nodes, reports) = fold_all(
                    &Api::<NodeNetwork>::all(self.client.clone()),
                    (0, Vec::new()),
                    |(nodes, reports): &mut (usize, Vec<i64>), nn: NodeNetwork| {
                        *nodes += 1;
                        reports.extend(nn.status.and_then(|s| s.realized_services_revision))
                    },
                )
                .await?;
                let mut seq = Sequence::start(lbs.highest, reports, lbs.committed);
                // The last term ended with writes in flight: the latest LBService says
                // that everything up to it committed (it has, or it failed).
                if let Some(committed) = seq.tail()
                    && let Some(latest) = &lbs.latest_owned
                    && let Some(ns) = latest.namespace()
                {
                    let mut spec = latest.spec.clone();
                    spec.committed_revision = Some(committed);
                    // Everything this concern owns in it, or the apply would drop it.
                    let body = runtime::apply_body::<LBService>(
                        &latest.name_any(),
                        Some(&ns),
                        json!({
                            "metadata": {
                                "ownerReferences": latest.owner_references(),
                                "annotations": latest
                                    .annotations()
                                    .get(SERVICE_CHANGED_AT)
                                    .map(|at| json!({ SERVICE_CHANGED_AT: at }))
                                    .unwrap_or_else(|| json!({})),
                            },
                            "spec": spec,
                        }),
                    );
                    let api = Api::<LBService>::namespaced(self.client.clone(), &ns);
                    match runtime::apply(&api, &self.manager, &body).await {
                        Ok(_) => {
                            self.metrics.publishes.inc();
                        }
                        Err(e) => warn!(committed, error = %e, "publishing the last term's settled revision failed (the next write's drain will)"),
                    }
                }
                info!(
                    after = seq.last(),
                    lbservices = lbs.count,
                    nodes,
                    list_ms = started.elapsed().as_millis() as u64,
                    "revision sequence started"
                );
                self.metrics.revision.set(seq.last());
                Ok::<_, Error>(tokio::sync::Mutex::new(seq))
            })
            .await?;
        Ok(cell.lock().await)
    }
}

/// What the start of a term needs of the LBServices listed: the highest revision, the
/// highest committed revision, and the latest LBService this concern wrote.
#[derive(Default)]
struct Listed {
    count: usize,
    highest: Option<i64>,
    committed: i64,
    latest_owned: Option<LBService>,
}

impl Listed {
    fn add(&mut self, mut lb: LBService) {
        self.count += 1;
        self.highest = self.highest.max(Some(lb.spec.revision));
        self.committed = self
            .committed
            .max(lb.spec.committed_revision.unwrap_or(lb.spec.revision));
        if owned_by_service(&lb)
            && self
                .latest_owned
                .as_ref()
                .is_none_or(|l| l.spec.revision < lb.spec.revision)
        {
            lb.metadata.managed_fields = None;
            lb.status = None;
            self.latest_owned = Some(lb);
        }
    }
}
