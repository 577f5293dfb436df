//! The concern's in-memory state beside the caches: which nodes have a ready backend of
//! each Service ([`ReadyNodes`], from the EndpointSlices), and which changes of Nodes,
//! NodeNetworks and BGPNodeConfigs matter ([`node_facts`], for the runtime's `Seen`): node
//! heartbeats and the agents' status writes change nothing the concern computes from, and
//! must not cost a recompute each.

use crate::services::SliceInfo;
use crate::services::translate::SERVICE_NAME_LABEL;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use tendril_crds::v1alpha1::BGP_ROUTER_ID_ANNOTATION;
use tendril_runtime::caches::Change;

/// `namespace/name` of a Service.
pub type ServiceKey = String;

/// The Service an EndpointSlice belongs to.
fn service_of(slice: &SliceInfo) -> Option<ServiceKey> {
    Some(format!(
        "{}/{}",
        slice.metadata.namespace.as_deref()?,
        slice.labels().get(SERVICE_NAME_LABEL)?
    ))
}

/// The nodes with a ready endpoint in `slice` (`ready` unset counts as ready, as the
/// EndpointSlice API says and kube-proxy does), sorted, each once.
fn ready_nodes_of(slice: &SliceInfo) -> NodeSet {
    let mut nodes: Vec<Arc<str>> = slice
        .endpoints
        .iter()
        .filter(|e| e.ready())
        .filter_map(|e| e.node_name.clone())
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes.into_boxed_slice()
}

/// The nodes with a ready backend, per Service and slice. Updated from the same change
/// stream that triggers the recompute, so a recompute never misses the slice that
/// triggered it.
#[derive(Clone, Default)]
pub struct ReadyNodes(Arc<Mutex<Index>>);

#[derive(Default)]
struct Index {
    services: HashMap<ServiceKey, SliceNodes>,
    /// A relist changed the index: the next change triggers a recompute whatever it is (a
    /// relist is no trigger itself, and may hide deletions).
    relisted: bool,
}

/// The ready nodes of one Service, per EndpointSlice name (a map of a few entries: a B-tree
/// node would hold room for eleven).
type SliceNodes = Vec<(Box<str>, NodeSet)>;

/// Node names, sorted, each once (the slice cache's shared copies).
type NodeSet = Box<[Arc<str>]>;

/// Sets the ready nodes of `slice` among `slices` (`None`: removes the slice).
fn set_slice(slices: &mut SliceNodes, slice: &str, nodes: Option<NodeSet>) {
    let at = slices.iter().position(|(name, _)| &**name == slice);
    match (at, nodes) {
        (Some(i), Some(nodes)) => slices[i].1 = nodes,
        (None, Some(nodes)) => slices.push((slice.into(), nodes)),
        (Some(i), None) => {
            slices.swap_remove(i);
        }
        (None, None) => {}
    }
}

/// What the concern reads of a Node: labels, the router-id annotation, the addresses.
pub type NodeFacts = (
    BTreeMap<String, String>,
    Option<String>,
    Vec<(String, String)>,
);

impl ReadyNodes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes in a change; whether the ready nodes of some Service changed (a slice change
    /// that moves no node's readiness is not worth a recompute).
    pub fn apply(&self, change: &Change<SliceInfo>, store: &Store<SliceInfo>) -> bool {
        let mut guard = self.lock();
        let Index { services, relisted } = &mut *guard;
        let changed = match change {
            Change::Applied(slice) => {
                let Some(key) = service_of(slice) else {
                    return std::mem::take(relisted);
                };
                let before = union(services.get(&key));
                let nodes = ready_nodes_of(slice);
                set_slice(
                    services.entry(key.clone()).or_default(),
                    &slice.name_any(),
                    Some(nodes),
                );
                before != union(services.get(&key))
            }
            Change::Deleted(slice) => {
                let Some(key) = service_of(slice) else {
                    return std::mem::take(relisted);
                };
                let before = union(services.get(&key));
                if let Some(slices) = services.get_mut(&key) {
                    set_slice(slices, &slice.name_any(), None);
                    if slices.is_empty() {
                        services.remove(&key);
                    }
                }
                before != union(services.get(&key))
            }
            // A relist: the store is complete; rebuild from it.
            Change::Listed => {
                let mut rebuilt: HashMap<ServiceKey, SliceNodes> = HashMap::new();
                for slice in store.state() {
                    if let Some(key) = service_of(&slice) {
                        let nodes = ready_nodes_of(&slice);
                        set_slice(
                            rebuilt.entry(key).or_default(),
                            &slice.name_any(),
                            Some(nodes),
                        );
                    }
                }
                let sorted =
                    |m: &HashMap<ServiceKey, SliceNodes>| -> BTreeMap<String, BTreeSet<String>> {
                        m.iter().map(|(k, v)| (k.clone(), union(Some(v)))).collect()
                    };
                // The slices are taken whatever they are; what the concern reads of them
                // (each Service's ready nodes) decides whether a recompute is due.
                if sorted(&rebuilt) != sorted(services) {
                    *relisted = true;
                }
                *services = rebuilt;
                return false;
            }
            Change::Failed(_) => return false,
        };
        changed | std::mem::take(relisted)
    }

    /// The nodes with a ready backend of the Service `key`.
    pub fn nodes(&self, key: &str) -> BTreeSet<String> {
        union(self.lock().services.get(key))
    }
}

fn union(slices: Option<&SliceNodes>) -> BTreeSet<String> {
    slices
        .into_iter()
        .flatten()
        .flat_map(|(_, nodes)| nodes.iter())
        .map(|name| name.to_string())
        .collect()
}

/// The [`NodeFacts`] of `node`.
pub fn node_facts(node: &Node) -> NodeFacts {
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .map(|a| (a.type_.clone(), a.address.clone()))
        .collect();
    (
        node.labels().clone(),
        node.annotations().get(BGP_ROUTER_ID_ANNOTATION).cloned(),
        addresses,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::slice::{SliceEndpoint, intern};
    use k8s_openapi::api::core::v1::NodeSpec;
    use k8s_openapi::api::discovery::v1::EndpointConditions;
    use kube::runtime::reflector;

    fn slice(name: &str, service: &str, endpoints: &[(&str, Option<bool>)]) -> Arc<SliceInfo> {
        let mut s = SliceInfo::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("default".into());
        s.metadata.labels = Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into());
        s.endpoints = endpoints
            .iter()
            .map(|(node, ready)| SliceEndpoint {
                node_name: Some(intern(node)),
                conditions: Some(EndpointConditions {
                    ready: *ready,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        Arc::new(s)
    }

    fn nodes(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ready_nodes_follow_slices_and_report_only_real_changes() {
        let (store, _writer) = reflector::store::<SliceInfo>();
        let index = ReadyNodes::default();
        let a = slice(
            "web-a",
            "web",
            &[("n1", Some(true)), ("n2", Some(false)), ("n3", None)],
        );
        assert!(index.apply(&Change::Applied(a), &store));
        // Not ready is no backend; unset readiness counts as ready.
        assert_eq!(index.nodes("default/web"), nodes(&["n1", "n3"]));
        // A second slice adds n2; the same nodes again change nothing.
        let b = slice("web-b", "web", &[("n2", Some(true))]);
        assert!(index.apply(&Change::Applied(b.clone()), &store));
        assert!(!index.apply(&Change::Applied(b.clone()), &store));
        assert_eq!(index.nodes("default/web"), nodes(&["n1", "n2", "n3"]));
        // A slice change that moves only a non-ready endpoint: nothing for BGP.
        let a2 = slice(
            "web-a",
            "web",
            &[("n1", Some(true)), ("n3", None), ("n4", Some(false))],
        );
        assert!(!index.apply(&Change::Applied(a2), &store));
        assert!(index.apply(&Change::Deleted(b), &store));
        assert_eq!(index.nodes("default/web"), nodes(&["n1", "n3"]));
        assert!(index.nodes("default/other").is_empty());
        // A slice of no Service is ignored.
        let mut orphan = SliceInfo::default();
        orphan.metadata.name = Some("x".into());
        orphan.metadata.namespace = Some("default".into());
        assert!(!index.apply(&Change::Applied(Arc::new(orphan)), &store));
    }

    #[test]
    fn a_relist_that_changed_the_index_triggers_the_next_change() {
        let (store, mut writer) = reflector::store::<SliceInfo>();
        let index = ReadyNodes::default();
        let a = slice("web-a", "web", &[("n1", Some(true))]);
        let b = slice("web-b", "web", &[("n2", Some(true))]);
        assert!(index.apply(&Change::Applied(a.clone()), &store));
        assert!(index.apply(&Change::Applied(b), &store));
        // The watch missed the deletion of web-b; the relist shows only web-a.
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Init);
        writer.apply_watcher_event(&kube::runtime::watcher::Event::InitApply(SliceInfo::clone(
            &a,
        )));
        writer.apply_watcher_event(&kube::runtime::watcher::Event::InitDone);
        assert!(
            !index.apply(&Change::Listed, &store),
            "a relist is no trigger"
        );
        assert_eq!(index.nodes("default/web"), nodes(&["n1"]));
        // The replayed web-a changes nothing itself, but carries the relist's change.
        assert!(index.apply(&Change::Applied(a.clone()), &store));
        assert!(!index.apply(&Change::Applied(a), &store));
    }

    #[test]
    fn seen_reports_changes_of_what_matters_only() {
        use tendril_runtime::caches::Seen;
        let seen: Seen<NodeFacts> = Seen::default();
        let mut node = Node {
            spec: Some(NodeSpec::default()),
            ..Default::default()
        };
        node.metadata.name = Some("n1".into());
        let arc = |n: &Node| Arc::new(n.clone());
        assert!(seen.changed(&Change::Applied(arc(&node)), node_facts));
        // A heartbeat (here: another spec field) changes nothing the concern reads.
        node.spec.as_mut().unwrap().unschedulable = Some(true);
        assert!(!seen.changed(&Change::Applied(arc(&node)), node_facts));
        node.metadata.labels = Some([("rack".to_string(), "r1".to_string())].into());
        assert!(seen.changed(&Change::Applied(arc(&node)), node_facts));
        node.metadata.annotations =
            Some([(BGP_ROUTER_ID_ANNOTATION.to_string(), "10.0.0.9".to_string())].into());
        assert!(seen.changed(&Change::Applied(arc(&node)), node_facts));
        assert!(seen.changed(&Change::Deleted(arc(&node)), node_facts));
        assert!(seen.changed(&Change::Applied(arc(&node)), node_facts));
        // After a relist every replayed object counts again (deletions may be hidden).
        assert!(!seen.changed(&Change::Applied(arc(&node)), node_facts));
        assert!(seen.changed(&Change::<Node>::Listed, node_facts));
        assert!(seen.changed(&Change::Applied(arc(&node)), node_facts));
    }
}
