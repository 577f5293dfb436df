//! The agent's view of the cluster: one cache per kind for the whole process (shared by the
//! node sync and the node pass, from [`tendril_runtime::Caches`]), the gate that opens once
//! every initial list completed, and the wake-ups that turn cache changes into passes.

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::watcher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use tendril_crds::v1alpha1::{
    EgressRoute, Endpoint, Identity, LBService, NodeNetwork, ResolvedPolicy,
};
use tendril_runtime::caches::{Cache, Cached, Caches, Change};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

/// Every object the agent reads, each kind watched once.
#[derive(Clone)]
pub struct ClusterView {
    pub node_networks: Cache<NodeNetwork>,
    pub endpoints: Cache<Endpoint>,
    pub identities: Cache<Identity>,
    pub resolved_policies: Cache<ResolvedPolicy>,
    /// The EndpointSlices of the `kubernetes` Service: the kube-apiserver's own addresses
    /// (entity `kube-apiserver`).
    pub apiserver: Cache<EndpointSlice>,
    /// Every `LBService` (all namespaces): the node's services.
    pub lb_services: Cache<LBService>,
    /// Every `EgressRoute`: the egress gateway steering and SNAT of the node.
    pub egress_routes: Cache<EgressRoute>,
}

/// What the agent of `node` drops of every Endpoint it caches (it caches every Endpoint of
/// the cluster): the security labels, which are its identity's (the flows directory takes
/// them from the `Identity`, once per identity), annotations, and the metadata labels and
/// owner references nothing on the node reads (the operator's identity label alone cost
/// ~0.5 KiB per Endpoint: a map's first node holds room for eleven entries); and the status
/// of another node's Endpoint, which its own agent writes and reads (a `Realized`
/// condition is five strings, ~0.3 KiB), with its uids and service account, which nothing
/// on this node reads of a remote pod (~0.15 KiB).
fn trim_endpoint(endpoint: &mut Endpoint, node: &str) {
    endpoint.spec.security_labels.clear();
    endpoint.metadata.annotations = None;
    endpoint.metadata.labels = None;
    endpoint.metadata.owner_references = None;
    if endpoint.spec.node != node {
        endpoint.status = None;
        endpoint.metadata.uid = None;
        endpoint.spec.pod_uid = String::new();
        endpoint.spec.service_account = String::new();
    }
}

/// Scope of the apiserver cache: the slice the apiserver itself writes.
pub const APISERVER_SCOPE: &str = "default/kubernetes";

impl ClusterView {
    /// The view of the agent of `node`.
    pub fn new(caches: &Caches, node: &str) -> Self {
        // Selected by name too (`metadata.name=kubernetes`), so RBAC can grant exactly that
        // name: kustomize's `namespace` would move a Role for `default` into Tendril's
        // namespace.
        let apiserver = caches.scoped(
            APISERVER_SCOPE,
            Api::namespaced(caches.client().clone(), "default"),
            watcher::Config::default()
                .labels("kubernetes.io/service-name=kubernetes")
                .fields("metadata.name=kubernetes"),
        );
        let view = Self {
            node_networks: caches.all(),
            endpoints: {
                let node = node.to_string();
                caches.all_trimmed_by(&format!("agent-endpoints:{node}"), move |ep| {
                    trim_endpoint(ep, &node)
                })
            },
            identities: caches.all(),
            resolved_policies: caches.all(),
            apiserver,
            lb_services: caches.all(),
            egress_routes: caches.all(),
        };
        view.report_apiserver_forbidden();
        view
    }

    /// Resolves once every cache completed its first list. The apiserver's slices count as
    /// listed while reading them is forbidden (RBAC without that rule): the entity
    /// `kube-apiserver` then matches no address, and the node is not held back for it.
    pub async fn synced(&self) {
        let (nn, ep, id, rp, slices, lbs, egress) = (
            self.node_networks.store(),
            self.endpoints.store(),
            self.identities.store(),
            self.resolved_policies.store(),
            self.apiserver.store(),
            self.lb_services.store(),
            self.egress_routes.store(),
        );
        let apiserver = async {
            let mut forbidden = self.apiserver.forbidden();
            tokio::select! {
                _ = tendril_runtime::store_ready(&slices) => {}
                _ = forbidden.wait_for(Option::is_some) => {}
            }
        };
        let _ = tokio::join!(
            tendril_runtime::store_ready(&nn),
            tendril_runtime::store_ready(&ep),
            tendril_runtime::store_ready(&id),
            tendril_runtime::store_ready(&rp),
            tendril_runtime::store_ready(&lbs),
            tendril_runtime::store_ready(&egress),
            apiserver,
        );
    }

    /// Wakes `wake` on every change of any kind.
    pub fn wake_on_any_change(&self, wake: &Wake) {
        wake_on(&self.node_networks, wake, |_| true);
        // Only the spec of an Endpoint feeds the pass; the status is what the agents
        // (this one and every other node's) report, and each report would otherwise cost
        // every node a pass that delays the next real change.
        wake_on_generation(&self.endpoints, wake);
        wake_on(&self.identities, wake, |_| true);
        wake_on(&self.resolved_policies, wake, |_| true);
        wake_on(&self.apiserver, wake, |_| true);
        wake_on(&self.lb_services, wake, |_| true);
        wake_on(&self.egress_routes, wake, |_| true);
    }

    fn report_apiserver_forbidden(&self) {
        let mut forbidden = self.apiserver.forbidden();
        tokio::spawn(async move {
            while forbidden.changed().await.is_ok() {
                let message = forbidden.borrow_and_update().clone();
                match message {
                    Some(message) => tracing::error!(
                        error = %message,
                        "forbidden to list/watch EndpointSlice default/kubernetes: the entity \
                         kube-apiserver matches no address until the agent's ClusterRole \
                         allows it (deploy/kustomize/base/agent-rbac.yaml); retrying"
                    ),
                    None => tracing::info!("kube-apiserver EndpointSlices readable again"),
                }
            }
        });
    }
}

/// Wakes `wake` on each change of `cache` that `relevant` accepts (and after a lag).
pub fn wake_on<K: Cached>(
    cache: &Cache<K>,
    wake: &Wake,
    relevant: impl Fn(&K) -> bool + Send + 'static,
) {
    let mut changes = cache.subscribe();
    let wake = wake.clone();
    tokio::spawn(async move {
        loop {
            match changes.recv().await {
                Ok(obj) if relevant(&obj) => wake.touch(),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => wake.touch(),
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    });
}

/// Wakes `wake` on each change of `cache` that is more than a status write: an object
/// new, deleted or with a new `metadata.generation` (a kind with a status subresource bumps
/// it on every spec change, never on a status write), a relist, or after a lag.
pub fn wake_on_generation<K: Cached>(cache: &Cache<K>, wake: &Wake) {
    let mut changes = cache.subscribe();
    let wake = wake.clone();
    tokio::spawn(async move {
        // Keyed by a hash of namespace/name: one entry per Endpoint of the cluster, so 16
        // bytes instead of two strings (a collision of 64-bit hashes among 100k keys is
        // ~3e-10 likely, and would cost one skipped wake until the next change or resync).
        let mut seen: HashMap<u64, Option<i64>> = HashMap::new();
        let key_of = |obj: &K| {
            let mut hasher = std::hash::DefaultHasher::new();
            (obj.meta().namespace.as_deref(), obj.meta().name.as_deref()).hash(&mut hasher);
            hasher.finish()
        };
        loop {
            let change = match changes.recv_change().await {
                Ok(change) => change,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    seen.clear();
                    wake.touch();
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
            let relevant = match &change {
                Change::Applied(obj) => {
                    let key = key_of(obj);
                    let generation = obj.meta().generation;
                    // No generation (a store fed by hand): every change counts.
                    generation.is_none() || seen.insert(key, generation) != Some(generation)
                }
                Change::Deleted(obj) => {
                    seen.remove(&key_of(obj));
                    true
                }
                Change::Listed => {
                    seen.clear();
                    true
                }
                Change::Failed(_) => false,
            };
            if relevant {
                wake.touch();
            }
        }
    });
}

/// What wakes one loop: a notification plus when the oldest change not yet realized
/// arrived (for `tendril_datapath_realize_seconds`).
#[derive(Clone, Debug, Default)]
pub struct Wake {
    inner: Arc<WakeInner>,
}

#[derive(Debug, Default)]
struct WakeInner {
    notify: Notify,
    since: Mutex<Option<Instant>>,
}

impl Wake {
    /// Something changed: wake the loop (now or after its pass).
    pub fn touch(&self) {
        self.inner
            .since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Instant::now);
        self.inner.notify.notify_one();
    }

    pub(crate) async fn notified(&self) {
        self.inner.notify.notified().await;
    }

    /// When the oldest pending change arrived, clearing it (a pass starts).
    pub(crate) fn take_since(&self) -> Option<Instant> {
        self.inner
            .since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Whether a change is pending (arrived since the current pass took the previous ones).
    pub(crate) fn pending(&self) -> bool {
        self.inner
            .since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The pass did not realize the change that arrived at `at`: it is still pending.
    pub(crate) fn keep_since(&self, at: Option<Instant>) {
        if let Some(at) = at {
            let mut since = self.inner.since.lock().unwrap_or_else(|p| p.into_inner());
            *since = Some(since.map_or(at, |s| s.min(at)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use k8s_openapi::jiff::Timestamp;
    use tendril_crds::v1alpha1::{EndpointSpec, EndpointStatus};

    fn endpoint(node: &str) -> Endpoint {
        let mut ep = Endpoint::new(
            "web-1",
            EndpointSpec {
                node: node.into(),
                ips: vec!["10.0.1.5".into()],
                identity: Some(300),
                ..Default::default()
            },
        );
        ep.metadata.labels = Some([("tendril.dev/identity".into(), "300".into())].into());
        ep.metadata.uid = Some("9f1c".into());
        ep.spec.pod_uid = "77ab".into();
        ep.spec.service_account = "web".into();
        ep.status = Some(EndpointStatus {
            conditions: vec![Condition {
                type_: "Realized".into(),
                status: "True".into(),
                reason: "Realized".into(),
                message: format!("revision 1 is in the datapath of {node}"),
                observed_generation: None,
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }],
            realized_revision: Some(1),
            realized_policy_revision: None,
        });
        ep
    }

    #[test]
    fn another_nodes_endpoint_is_cached_without_its_status_and_a_local_one_with_it() {
        let mut remote = endpoint("node-b");
        trim_endpoint(&mut remote, "node-a");
        assert_eq!(remote.status, None);
        assert_eq!(remote.metadata.labels, None);
        assert_eq!(remote.spec.ips, ["10.0.1.5"]);
        assert_eq!(remote.metadata.uid, None);
        assert_eq!(
            (
                remote.spec.pod_uid.as_str(),
                remote.spec.service_account.as_str()
            ),
            ("", "")
        );

        let mut local = endpoint("node-a");
        trim_endpoint(&mut local, "node-a");
        assert_eq!(local.metadata.uid.as_deref(), Some("9f1c"));
        assert_eq!(local.spec.pod_uid, "77ab");
        assert_eq!(local.status.unwrap().realized_revision, Some(1));
        assert_eq!(local.metadata.labels, None);
    }
}
