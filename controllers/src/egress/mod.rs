//! Concern `egress`: `EgressGatewayPolicy` + `Endpoint` + `Node` → one `EgressRoute` per
//! policy (same name, controller owner reference to the policy), field manager
//! `tendril-egress`: the pod addresses the policy selects, its destinations (minus
//! `excludedCIDRs`), the gateway node with its address, and the egress IP or interface.
//! Every agent steers matching traffic of its local pods to the gateway; the gateway's
//! agent SNATs it to the egress IP.
//!
//! Shaped like the bgp concern: every relevant change pokes one
//! [`singleton`](runtime::singleton); the reconcile waits for a quiet moment
//! ([`ChangeClock`]), reads the stores whole, runs the pure [`plan::plan`], and
//! [`runtime::revisions::plan`] decides which routes to write (revision + 1 when the
//! content changed) and which to delete (those whose policy is gone). An invalid policy's
//! route is held: neither written nor deleted. Nothing is written before every store has
//! completed its first list.
//!
//! Gateway choice and failover are in [`plan`]: a policy stays on its gateway while that
//! node is Ready, selected and addressed; when it is not, the eligible node with the
//! highest rendezvous score for the policy takes over. A failover shows as the policy's
//! `Ready` condition (reason `FailedOver`, message `gateway a -> b (NodeNotReady)`), a
//! Warning Event `GatewayFailover` and `tendril_egress_gateway_changes_total{reason}`.
//!
//! Writes: the routes, and the policies' status (`Valid`, `Ready`, `observedGeneration`,
//! `gatewayNode`) when it changed.
//!
//! Metrics: `tendril_egress_routes`, `tendril_egress_policies_without_gateway`,
//! `tendril_egress_invalid_policies`, `tendril_egress_source_ips`,
//! `tendril_egress_gateway_changes_total{reason}`, `tendril_egress_route_writes_total`,
//! `tendril_egress_route_deletes_total`.

mod metrics;
pub mod plan;
#[cfg(test)]
mod plan_tests;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use metrics::{Metrics, ReasonLabel};
use plan::{EndpointInput, NodeInput, Plan, PolicyInput};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tendril_crds::common::conditions::{READY, VALID};
use tendril_crds::v1alpha1::{
    EgressGatewayPolicy, EgressRoute, EgressRouteSpec, Endpoint, Identity,
};
use tendril_runtime::debounce::ChangeClock;
use tendril_runtime::events::ProblemLog;
use tendril_runtime::owned::OwnedObjects;
use tendril_runtime::singleton::{self, Singleton};
use tendril_runtime::{self as runtime, DesiredCondition, Reconciler, conditions, events};
use tracing::{debug, info, warn};

/// The concern's name; its field manager is `tendril-egress`.
pub const NAME: &str = "egress";
/// Route writes in flight at once.
const WRITE_CONCURRENCY: usize = 16;
/// The `action` of the concern's Events.
const EVENT_ACTION: &str = "ChooseEgressGateway";

/// `egress` in config/operator.yaml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Quiet time after a change before the routes are computed again.
    pub debounce_millis: u64,
    /// A steady stream of changes is computed at least this long after its first change.
    pub max_delay_millis: u64,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            debounce_millis: 50,
            max_delay_millis: 500,
        }
    }
}

pub type Error = runtime::ApiError;

#[derive(Clone)]
struct Stores {
    policies: Store<EgressGatewayPolicy>,
    endpoints: Store<Endpoint>,
    /// The endpoints' labels are their identities' (the Endpoint cache holds none).
    identities: Store<Identity>,
    nodes: Store<Node>,
    routes: Store<EgressRoute>,
}

impl Stores {
    async fn listed(self) {
        let _ = futures::future::join5(
            runtime::store_ready(&self.policies),
            runtime::store_ready(&self.endpoints),
            runtime::store_ready(&self.identities),
            runtime::store_ready(&self.nodes),
            runtime::store_ready(&self.routes),
        )
        .await;
    }

    async fn ready(&self) -> Result<(), runtime::CacheNotReady> {
        runtime::cache_ready(&self.policies, "egressgatewaypolicies").await?;
        runtime::cache_ready(&self.endpoints, "endpoints").await?;
        runtime::cache_ready(&self.identities, "identities").await?;
        runtime::cache_ready(&self.nodes, "nodes").await?;
        runtime::cache_ready(&self.routes, "egressroutes").await?;
        Ok(())
    }
}

/// What the plan reads of a Node: labels, Ready, the address other nodes tunnel to.
pub fn node_input(node: &Node) -> NodeInput {
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let mut internal: Vec<IpAddr> = status
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    internal.sort_by_key(|a| !a.is_ipv4());
    NodeInput {
        name: node.name_any(),
        labels: node.labels().clone(),
        ready,
        address: internal.first().copied(),
    }
}

/// `ep` with its identity's labels (`labels_of`; none while its identity is unknown here:
/// the Identity's arrival wakes the concern again).
fn endpoint_input(
    ep: &Endpoint,
    labels_of: &mut impl FnMut(i64) -> Option<Arc<BTreeMap<String, String>>>,
) -> EndpointInput {
    EndpointInput {
        labels: ep
            .spec
            .identity
            .and_then(&mut *labels_of)
            .unwrap_or_default(),
        ips: ep
            .spec
            .ips
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect(),
    }
}

/// Whether someone but `manager` holds fields of the route's spec (it was written by hand,
/// or edited). Server-side apply cannot unset a field another manager owns, so such a
/// route would differ from what the concern writes forever: it is replaced instead.
fn spec_held_by_others(route: &EgressRoute, manager: &str) -> bool {
    route.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() != Some(manager)
            && m.subresource.as_deref().is_none_or(str::is_empty)
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.get("f:spec").is_some())
    })
}

/// Whether `route` was written by this concern (owned by its policy).
fn owned_by_policy(route: &EgressRoute) -> bool {
    route
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "EgressGatewayPolicy")
}

struct Egress {
    client: kube::Client,
    stores: Stores,
    changes: ChangeClock,
    /// The `EgressRoute`s, one per policy.
    routes: OwnedObjects<EgressRoute, EgressRouteSpec>,
    /// The problem last reported with an Event, per policy.
    problems: ProblemLog<String>,
    /// The `Ready` condition last written per policy: the store lags behind the status
    /// writes, and a `FailedOver` read back from it would overwrite a newer one.
    written_ready: Mutex<HashMap<String, DesiredCondition>>,
    recorder: Recorder,
    metrics: Metrics,
    manager: String,
}

impl Reconciler for Egress {
    type Object = Singleton;
    type Error = Error;
    const NAME: &'static str = NAME;

    async fn reconcile(&self, _: Arc<Singleton>) -> Result<Action, Error> {
        self.stores.ready().await?;
        self.changes.settled().await;
        self.changes.handle(|_| self.compute_and_write()).await
    }
}

impl Egress {
    fn inputs(&self) -> (Vec<PolicyInput>, Vec<NodeInput>, Vec<EndpointInput>) {
        let policies = self
            .stores
            .policies
            .state()
            .iter()
            .map(|p| {
                let name = p.name_any();
                let current = self.routes.latest(&name);
                let written_ready = self
                    .written_ready
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&name)
                    .cloned();
                let previous_ready = written_ready.or_else(|| {
                    p.status
                        .as_ref()
                        .and_then(|s| conditions::find(&s.conditions, READY))
                        .map(|c| {
                            DesiredCondition::new(
                                READY,
                                c.status == conditions::TRUE,
                                &c.reason,
                                c.message.clone(),
                            )
                        })
                });
                PolicyInput {
                    name,
                    generation: p.metadata.generation,
                    spec: p.spec.clone(),
                    current_gateway: current.and_then(|r| r.gateway_node),
                    previous_ready,
                }
            })
            .collect();
        let nodes = self
            .stores
            .nodes
            .state()
            .iter()
            .map(|n| node_input(n))
            .collect();
        // One copy of each identity's labels, shared by its endpoints.
        let mut labels: HashMap<i64, Option<Arc<BTreeMap<String, String>>>> = HashMap::new();
        let mut labels_of = |id: i64| {
            labels
                .entry(id)
                .or_insert_with(|| {
                    let identity = self
                        .stores
                        .identities
                        .get(&ObjectRef::new(&id.to_string()))?;
                    Some(Arc::new(identity.spec.security_labels.clone()))
                })
                .clone()
        };
        let endpoints = self
            .stores
            .endpoints
            .state()
            .iter()
            .map(|e| endpoint_input(e, &mut labels_of))
            .collect();
        (policies, nodes, endpoints)
    }

    async fn compute_and_write(&self) -> Result<Action, Error> {
        let (policies, nodes, endpoints) = self.inputs();
        let want = plan::plan(&policies, &nodes, &endpoints);
        self.set_metrics(&want);

        let held = want.held();
        let writes = self.routes.plan(&want.routes, |name, stored| {
            !held.contains(name) && stored.is_some_and(owned_by_policy)
        });
        debug!(
            policies = policies.len(),
            nodes = nodes.len(),
            endpoints = endpoints.len(),
            writes = writes.apply.len(),
            deletes = writes.delete.len(),
            "computed"
        );

        let api = Api::<EgressRoute>::all(self.client.clone());
        let applied = self
            .routes
            .apply_all(writes.apply, WRITE_CONCURRENCY, |name, spec| {
                let api = api.clone();
                let owner = self
                    .stores
                    .policies
                    .get(&ObjectRef::new(&name))
                    .and_then(|p| runtime::controller_owner_ref(p.as_ref()));
                let foreign = self
                    .stores
                    .routes
                    .get(&ObjectRef::new(&name))
                    .filter(|r| !owned_by_policy(r) || spec_held_by_others(r, &self.manager))
                    .and_then(|r| r.uid());
                async move {
                    let Some(owner) = owner else {
                        // The policy went away since the inputs were read.
                        return (name, spec, Ok(false));
                    };
                    if let Some(uid) = foreign {
                        // Written or edited by someone else: replaced, not merged into.
                        warn!(route = %name, "EgressRoute written by someone else: replacing it");
                        self.routes.forget(&name);
                        if let Err(e) = runtime::delete_exact(&api, &name, &uid).await {
                            return (name, spec, Err(e));
                        }
                    }
                    let body = runtime::apply_body::<EgressRoute>(
                        &name,
                        None,
                        json!({"metadata": {"ownerReferences": [owner]}, "spec": spec}),
                    );
                    let res = runtime::apply(&api, &self.manager, &body)
                        .await
                        .map(|_| true);
                    (name, spec, res)
                }
            })
            .await;
        self.metrics
            .route_writes
            .inc_by(applied.written.len() as u64);
        let carried: BTreeSet<String> = applied.written.into_iter().map(|(n, _)| n).collect();
        let mut first_error = applied.first_error;
        for name in writes.delete {
            match self.routes.delete(&api, &name).await {
                Ok(true) => {
                    self.metrics.route_deletes.inc();
                    info!(route = name, "policy gone; EgressRoute deleted");
                }
                Ok(false) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        // Reported once the route carries it, so a failed write is not counted twice.
        self.report_changes(&want, &carried).await;
        if let Err(e) = self.write_statuses(&want).await {
            first_error.get_or_insert(e);
        }
        self.report_problems(&want).await;
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(Action::await_change()),
        }
    }

    fn set_metrics(&self, want: &Plan) {
        self.metrics.routes.set(want.routes.len() as i64);
        self.metrics.without_gateway.set(
            want.routes
                .values()
                .filter(|r| r.gateway_node.is_none())
                .count() as i64,
        );
        self.metrics.invalid_policies.set(want.held().len() as i64);
        self.metrics.source_ips.set(
            want.routes
                .values()
                .map(|r| r.source_ips.len() as i64)
                .sum(),
        );
    }

    /// Logs, counts and publishes each gateway change the routes now carry.
    async fn report_changes(&self, want: &Plan, carried: &BTreeSet<String>) {
        for (name, outcome) in &want.policies {
            let Some(change) = &outcome.change else {
                continue;
            };
            if !carried.contains(name) {
                continue;
            }
            self.metrics
                .gateway_changes
                .get_or_create(&ReasonLabel {
                    reason: change.reason.as_str().to_string(),
                })
                .inc();
            let message = change.message();
            if !change.reason.is_failover() {
                info!(policy = %name, %message, "egress gateway assigned");
                continue;
            }
            warn!(policy = %name, %message, "egress gateway failover");
            if let Some(policy) = self.stores.policies.get(&ObjectRef::new(name)) {
                events::publish_warning(
                    &self.recorder,
                    &policy.object_ref(&()),
                    "GatewayFailover",
                    &message,
                    EVENT_ACTION,
                )
                .await;
            }
        }
    }

    /// `status` of every policy whose conditions, `observedGeneration` or `gatewayNode`
    /// changed.
    async fn write_statuses(&self, want: &Plan) -> Result<(), kube::Error> {
        let api = Api::<EgressGatewayPolicy>::all(self.client.clone());
        self.written_ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| want.policies.contains_key(name));
        let mut first_error = None;
        for (name, outcome) in &want.policies {
            let Some(policy) = self.stores.policies.get(&ObjectRef::new(name)) else {
                continue;
            };
            let empty = Default::default();
            let status = policy.status.as_ref().unwrap_or(&empty);
            let desired: Vec<&DesiredCondition> = std::iter::once(&outcome.valid)
                .chain(outcome.ready.as_ref())
                .collect();
            let current = desired
                .iter()
                .all(|d| conditions::is_current(&status.conditions, d, outcome.generation))
                && status.observed_generation == outcome.generation
                && status.gateway_node == outcome.gateway;
            if current {
                continue;
            }
            let now = Timestamp::now();
            let mut conds: BTreeMap<&str, _> = BTreeMap::new();
            // Keep Ready as it was while the policy is invalid (its route is held).
            if let Some(prev) = conditions::find(&status.conditions, READY) {
                conds.insert(READY, serde_json::to_value(prev).unwrap_or_default());
            }
            for d in desired {
                let merged = conditions::merge(
                    conditions::find(&status.conditions, &d.type_),
                    d,
                    outcome.generation,
                    now,
                );
                conds.insert(
                    if d.type_ == VALID { VALID } else { READY },
                    serde_json::to_value(merged).unwrap_or_default(),
                );
            }
            let body = runtime::apply_body::<EgressGatewayPolicy>(
                name,
                None,
                json!({"status": {
                    "conditions": conds.into_values().collect::<Vec<_>>(),
                    "observedGeneration": outcome.generation,
                    "gatewayNode": outcome.gateway,
                }}),
            );
            match runtime::apply_status(&api, &self.manager, &body).await {
                Ok(_) => {
                    if let Some(ready) = &outcome.ready {
                        self.written_ready
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(name.clone(), ready.clone());
                    }
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    warn!(policy = %name, error = %e, "writing the policy status failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A Warning Event on each policy with a new problem (invalid, or no gateway).
    async fn report_problems(&self, want: &Plan) {
        let problems = want.policies.iter().filter_map(|(name, o)| match &o.ready {
            _ if !o.valid.status => Some((name.clone(), o.valid.clone())),
            Some(r) if !r.status => Some((name.clone(), r.clone())),
            _ => None,
        });
        events::warn_each(
            &self.recorder,
            &self.stores.policies,
            self.problems.fresh(problems),
            EVENT_ACTION,
            "egress policy not served",
        )
        .await;
    }
}

/// Runs the egress concern until `ctx.shutdown`.
pub async fn run(ctx: runtime::Context, config: EgressConfig) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let policies = ctx.caches.all::<EgressGatewayPolicy>();
    let endpoints = crate::endpoints::cache(&ctx.caches);
    let identities = ctx.caches.all::<Identity>();
    let nodes = ctx.caches.all::<Node>();
    let routes = ctx.caches.all::<EgressRoute>();
    let stores = Stores {
        policies: policies.store(),
        endpoints: endpoints.store(),
        identities: identities.store(),
        nodes: nodes.store(),
        routes: routes.store(),
    };
    let changes = ChangeClock::new(
        Duration::from_millis(config.debounce_millis),
        Duration::from_millis(config.max_delay_millis),
    );
    let owned = OwnedObjects::new("EgressRoute", &routes, |r: &EgressRoute| &r.spec);

    let policy_changes = policies.trigger_on(|p: &EgressGatewayPolicy| p.metadata.generation);
    // Heartbeats change neither labels, readiness nor addresses: they wake nothing.
    let node_changes = nodes.trigger_on(|n: &Node| {
        let i = node_input(n);
        (i.labels, i.ready, i.address)
    });
    // The agents' status writes change neither identity nor addresses.
    let endpoint_changes =
        endpoints.trigger_on(|e: &Endpoint| (e.spec.identity, e.spec.ips.clone()));
    // An identity's labels never change; a new one may be what an endpoint waited for.
    let identity_changes = identities.trigger_on(|i: &Identity| i.spec.id);
    // Our own writes come back here; a route edited or deleted by someone else is put back.
    let route_changes = owned.trigger(&routes);

    // Without a policy, pods and nodes change nothing this concern writes.
    let controller = singleton::controller(NAME, stores.clone().listed())
        .watches_stream(policy_changes, singleton::on_change(NAME, Some(&changes)))
        .watches_stream(
            node_changes,
            singleton::on_change_while_any(NAME, Some(&changes), &stores.policies),
        )
        .watches_stream(
            endpoint_changes,
            singleton::on_change_while_any(NAME, Some(&changes), &stores.policies),
        )
        .watches_stream(
            identity_changes,
            singleton::on_change_while_any(NAME, Some(&changes), &stores.policies),
        )
        .watches_stream(route_changes, singleton::on_change(NAME, None));
    let reconciler = Egress {
        client: client.clone(),
        stores,
        changes,
        routes: owned,
        problems: ProblemLog::default(),
        written_ready: Mutex::default(),
        recorder: events::recorder(client, "tendril-operator"),
        metrics: Metrics::new(&ctx.metrics),
        manager: runtime::field_manager(NAME),
    };
    runtime::run(controller, reconciler, &ctx).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(conditions: serde_json::Value, addresses: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n", "labels": {"egress": "yes"}},
            "status": {"conditions": conditions, "addresses": addresses},
        }))
        .unwrap()
    }

    #[test]
    fn node_input_reads_ready_labels_and_the_ipv4_internal_ip_first() {
        let n = node(
            json!([{"type": "Ready", "status": "True"}]),
            json!([
                {"type": "ExternalIP", "address": "192.0.2.1"},
                {"type": "InternalIP", "address": "fd00::1"},
                {"type": "InternalIP", "address": "10.0.0.1"},
            ]),
        );
        let i = node_input(&n);
        assert!(i.ready);
        assert_eq!(i.address, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(i.labels.get("egress").map(String::as_str), Some("yes"));
        for conditions in [
            json!([{"type": "Ready", "status": "False"}]),
            json!([{"type": "Ready", "status": "Unknown"}]),
            json!([]),
        ] {
            assert!(!node_input(&node(conditions, json!([]))).ready);
        }
        let external_only = node(
            json!([{"type": "Ready", "status": "True"}]),
            json!([{"type": "ExternalIP", "address": "192.0.2.1"}]),
        );
        assert_eq!(node_input(&external_only).address, None);
    }
}
