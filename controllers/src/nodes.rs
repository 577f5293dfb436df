//! The nodes concern: for every `Node` exactly one `NodeNetwork` of the same name, owned by
//! the Node (controller owner reference with `blockOwnerDeletion`, so the garbage collector
//! deletes it with the Node), carrying the Node's addresses.
//!
//! Field manager `tendril-nodes` owns `metadata.ownerReferences`, `spec.addresses` and the
//! `AddressesResolved` entry of `status.conditions`. Other concerns own their own spec
//! fields (`tendril-ipam`: `spec.podCIDRs`, …); the node's agent owns the `Ready` condition
//! and the rest of `status`. `AddressesResolved=True` (the Node has an InternalIP) is what
//! other node-scoped concerns wait for.
//!
//! The `NodeNetwork` is watched as owned: deleting or editing it triggers a reconcile of
//! its Node, which restores it.

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tendril_crds::common::NodeAddress;
use tendril_crds::v1alpha1::NodeNetwork;
use tendril_runtime::{
    self as runtime, Context, DesiredCondition, MetricLabel, Reconciler, conditions,
};

/// The concern's name; its field manager is `tendril-nodes`.
pub const NAME: &str = "nodes";
/// Condition type owned by this concern.
pub const ADDRESSES_RESOLVED: &str = "AddressesResolved";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("Node has no name or uid")]
    MissingMetadata,
}

impl MetricLabel for Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(e) => runtime::kube_error_label(e),
            Error::MissingMetadata => "missing_metadata",
        }
    }
}

fn manager() -> String {
    runtime::field_manager(NAME)
}

/// The Node's addresses in the order the kubelet reports them, without duplicates.
pub fn node_addresses(node: &Node) -> Vec<NodeAddress> {
    let mut out: Vec<NodeAddress> = Vec::new();
    let reported = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for a in reported.into_iter().flatten() {
        let addr = NodeAddress {
            type_: a.type_.clone(),
            address: a.address.clone(),
        };
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// The apply body of the Node's `NodeNetwork`: owner reference and addresses, nothing
/// else (other managers' fields are left alone).
pub fn desired_network(node: &Node) -> Result<Value, Error> {
    let name = node.meta().name.as_deref().ok_or(Error::MissingMetadata)?;
    let owner = runtime::controller_owner_ref(node).ok_or(Error::MissingMetadata)?;
    let addresses = node_addresses(node);
    Ok(runtime::apply_body::<NodeNetwork>(
        name,
        None,
        json!({
            "metadata": { "ownerReferences": [owner] },
            "spec": { "addresses": addresses },
        }),
    ))
}

/// `AddressesResolved`: true when the Node reports an InternalIP, the address the overlay
/// and the other concerns use.
pub fn addresses_condition(addresses: &[NodeAddress]) -> DesiredCondition {
    match addresses.iter().find(|a| a.type_ == "InternalIP") {
        Some(a) => DesiredCondition::new(
            ADDRESSES_RESOLVED,
            true,
            "InternalIPFound",
            format!("node InternalIP is {}", a.address),
        ),
        None if addresses.is_empty() => DesiredCondition::new(
            ADDRESSES_RESOLVED,
            false,
            "NoAddresses",
            "the Node reports no addresses yet",
        ),
        None => DesiredCondition::new(
            ADDRESSES_RESOLVED,
            false,
            "NoInternalIP",
            "the Node reports no InternalIP address",
        ),
    }
}

/// The status apply body holding only this concern's condition.
pub fn status_body(name: &str, condition: &Condition) -> Value {
    runtime::apply_body::<NodeNetwork>(
        name,
        None,
        json!({ "status": { "conditions": [condition] } }),
    )
}

/// The condition to write to `current`, or None when it already says the same.
pub fn condition_update(
    current: &NodeNetwork,
    addresses: &[NodeAddress],
    now: Timestamp,
) -> Option<Condition> {
    let desired = addresses_condition(addresses);
    let generation = current.metadata.generation;
    let conds = current
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    if conditions::is_current(conds, &desired, generation) {
        return None;
    }
    Some(conditions::merge(
        conditions::find(conds, ADDRESSES_RESOLVED),
        &desired,
        generation,
        now,
    ))
}

/// Settings of the nodes concern (`nodes` in operator.yaml).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct NodesConfig {
    /// Every Node is reconciled at least this often, even without events.
    pub resync_seconds: u64,
}

impl Default for NodesConfig {
    fn default() -> Self {
        Self {
            resync_seconds: 3600,
        }
    }
}

struct Nodes {
    resync: Duration,
    networks: Api<NodeNetwork>,
    nodes: Store<Node>,
    nodes_gauge: Gauge,
    writes: Counter,
}

impl Reconciler for Nodes {
    type Object = Node;
    type Error = Error;
    const NAME: &'static str = NAME;

    fn resync(&self) -> Option<Duration> {
        Some(self.resync)
    }

    async fn reconcile(&self, node: Arc<Node>) -> Result<Action, Error> {
        let manager = manager();
        let network = runtime::apply(&self.networks, &manager, &desired_network(&node)?).await?;
        if let Some(condition) =
            condition_update(&network, &node_addresses(&node), Timestamp::now())
        {
            runtime::apply_status(
                &self.networks,
                &manager,
                &status_body(&node.name_any(), &condition),
            )
            .await?;
            self.writes.inc();
            tracing::info!(status = %condition.status, reason = %condition.reason, "NodeNetwork condition updated");
        }
        self.nodes_gauge
            .set(i64::try_from(self.nodes.state().len()).unwrap_or(i64::MAX));
        Ok(Action::await_change())
    }
}

/// Runs the nodes controller until `ctx.shutdown`.
pub async fn run(ctx: Context, config: NodesConfig) -> anyhow::Result<()> {
    let nodes = Api::<Node>::all(ctx.client.clone());
    let networks = Api::<NodeNetwork>::all(ctx.client.clone());
    let controller = Controller::new(nodes, watcher::Config::default())
        .owns(networks.clone(), watcher::Config::default());
    let nodes_gauge: Gauge = ctx.metrics.domain(
        "tendril_nodes",
        "Nodes seen by the nodes concern",
        Gauge::default,
    );
    // Deletions never reach reconcile, so the gauge is also refreshed from the store.
    let refresh = {
        let store = controller.store();
        let gauge = nodes_gauge.clone();
        let stop = ctx.shutdown.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        gauge.set(i64::try_from(store.state().len()).unwrap_or(i64::MAX));
                    }
                }
            }
        }
    };
    let reconciler = Nodes {
        resync: Duration::from_secs(config.resync_seconds.max(1)),
        networks,
        nodes: controller.store(),
        nodes_gauge,
        writes: ctx.metrics.domain(
            "tendril_node_network_condition_writes",
            "Status writes of the AddressesResolved condition",
            Counter::default,
        ),
    };
    tokio::join!(runtime::run(controller, reconciler, &ctx), refresh);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress as K8sAddress, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use tendril_crds::v1alpha1::{NodeNetworkSpec, NodeNetworkStatus};

    fn node(name: &str, addrs: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(
                    addrs
                        .iter()
                        .map(|(t, a)| K8sAddress {
                            type_: t.to_string(),
                            address: a.to_string(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn network_body_owns_only_owner_ref_and_addresses() {
        let n = node(
            "n1",
            &[
                ("InternalIP", "10.0.0.1"),
                ("Hostname", "n1"),
                ("InternalIP", "10.0.0.1"),
            ],
        );
        let body = desired_network(&n).unwrap();
        assert_eq!(
            body,
            json!({
                "apiVersion": "tendril.dev/v1alpha1",
                "kind": "NodeNetwork",
                "metadata": {
                    "name": "n1",
                    "ownerReferences": [{
                        "apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "uid-n1",
                        "controller": true, "blockOwnerDeletion": true,
                    }],
                },
                "spec": {"addresses": [
                    {"type": "InternalIP", "address": "10.0.0.1"},
                    {"type": "Hostname", "address": "n1"},
                ]},
            })
        );
        // The body deserializes as a NodeNetwork: it only uses fields of the API.
        let nn: NodeNetwork = serde_json::from_value(body).unwrap();
        assert_eq!(nn.spec.addresses.len(), 2);
        assert!(nn.spec.pod_cidrs.is_empty());
    }

    #[test]
    fn node_without_uid_is_an_error() {
        let mut n = node("n1", &[]);
        n.metadata.uid = None;
        assert!(matches!(desired_network(&n), Err(Error::MissingMetadata)));
    }

    #[test]
    fn condition_reflects_internal_ip() {
        let yes = addresses_condition(&node_addresses(&node(
            "a",
            &[("Hostname", "a"), ("InternalIP", "10.1.1.1")],
        )));
        assert!(yes.status);
        assert_eq!(yes.reason, "InternalIPFound");
        assert!(yes.message.contains("10.1.1.1"));
        let ext = addresses_condition(&node_addresses(&node("a", &[("ExternalIP", "1.2.3.4")])));
        assert!(!ext.status);
        assert_eq!(ext.reason, "NoInternalIP");
        let none = addresses_condition(&node_addresses(&node("a", &[])));
        assert_eq!(none.reason, "NoAddresses");
    }

    #[test]
    fn condition_update_writes_only_on_change_and_keeps_transition_time() {
        let addrs = node_addresses(&node("a", &[("InternalIP", "10.0.0.1")]));
        let mut nn = NodeNetwork::new("a", NodeNetworkSpec::default());
        nn.metadata.generation = Some(1);
        let first = condition_update(&nn, &addrs, t(10)).expect("no condition yet");
        assert_eq!(first.observed_generation, Some(1));
        assert_eq!(first.last_transition_time, Time(t(10)));

        // The agent's Ready condition sits next to ours and is not touched.
        let ready = Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "Realized".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(t(1)),
        };
        nn.status = Some(NodeNetworkStatus {
            conditions: vec![ready, first.clone()],
            ..Default::default()
        });
        assert_eq!(
            condition_update(&nn, &addrs, t(20)),
            None,
            "already current"
        );

        // New generation (another concern changed the spec): same status, time kept.
        nn.metadata.generation = Some(2);
        let bumped = condition_update(&nn, &addrs, t(30)).unwrap();
        assert_eq!(bumped.observed_generation, Some(2));
        assert_eq!(bumped.last_transition_time, Time(t(10)));

        // Address lost: status flips, time moves.
        let lost = condition_update(&nn, &[], t(40)).unwrap();
        assert_eq!(lost.status, "False");
        assert_eq!(lost.last_transition_time, Time(t(40)));

        let body = status_body("a", &lost);
        assert_eq!(body["kind"], "NodeNetwork");
        assert_eq!(body["metadata"]["name"], "a");
        assert_eq!(body["status"]["conditions"].as_array().unwrap().len(), 1);
        assert!(
            body.get("spec").is_none(),
            "status body must not touch spec"
        );
    }
}
