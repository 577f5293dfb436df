//! Concern `bgp`: `BGPPeeringPolicy` + `Node` + `NodeNetwork` + `Service` + `EndpointSlice`
//! → one `BGPNodeConfig` per selected node (same name as the Node, controller owner
//! reference to it), field manager `tendril-bgp`; the node's agent drives its BGP daemon
//! from it.
//!
//! Shaped like the policy concern: every relevant change pokes one
//! [`singleton`](runtime::singleton); the reconcile waits for a quiet moment
//! ([`ChangeClock`]), reads the stores whole, runs the pure [`desired::desired`] and
//! [`runtime::revisions::plan`] decides which configs to write (revision = previous + 1
//! when the content changed, never otherwise) and which to delete (those owned by a Node
//! that no policy selects any more). Nodes that are *held* (conflicting policies, an
//! invalid policy, no router id) are neither written nor deleted. Nothing is written before
//! every store has completed its first list.
//!
//! What triggers a recompute is filtered in [`index`]: a Node only when its labels,
//! router-id annotation or addresses change (not on heartbeats), a NodeNetwork only when
//! its pod CIDRs change (not on the agents' status writes), a Service only when what BGP
//! reads of it changes, an EndpointSlice only when the set of nodes with a ready backend of
//! its Service changes, a BGPNodeConfig when its generation changes or it is deleted (by
//! someone else: put back with a higher revision).
//!
//! Writes: the configs (annotation `tendril.dev/bgp-changed-at`: when the change was
//! observed), the policies' `status` (`Valid`, `observedGeneration`, `selectedNodes`) when
//! it changed, and a Warning Event on a policy for each new problem.
//!
//! Metrics: `tendril_bgp_node_configs`, `tendril_bgp_held_nodes`,
//! `tendril_bgp_invalid_policies`, `tendril_bgp_advertisements{source}`,
//! `tendril_bgp_node_config_writes_total`, `tendril_bgp_node_config_deletes_total`,
//! `tendril_bgp_reconcile_errors_total{error}`, `tendril_bgp_compute_seconds`.

pub mod desired;
#[cfg(test)]
mod desired_tests;
pub mod index;
mod metrics;

use crate::services::SliceInfo;
use chrono::{DateTime, SecondsFormat, Utc};
use desired::{Desired, NodeInput, PolicyInput, ServiceInput};
use index::ReadyNodes;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use metrics::{ErrorLabel, Metrics, SourceLabel};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tendril_crds::v1alpha1::{
    BGP_CHANGED_AT_ANNOTATION, BGPNodeConfig, BGPNodeConfigSpec, BGPPeeringPolicy, NodeNetwork,
};
use tendril_runtime::debounce::ChangeClock;
use tendril_runtime::events::{self, ProblemLog};
use tendril_runtime::owned::OwnedObjects;
use tendril_runtime::singleton::{self, Singleton};
use tendril_runtime::{self as runtime, MetricLabel, Reconciler, conditions};
use tracing::{debug, info, warn};

/// The concern's name; its field manager is `tendril-bgp`.
pub const NAME: &str = "bgp";

/// `BGPNodeConfig` writes in flight at once.
const WRITE_CONCURRENCY: usize = 16;

/// `bgp` in config/operator.yaml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BgpConfig {
    /// Quiet time after a change before every node's configuration is computed again.
    pub debounce_millis: u64,
    /// A steady stream of changes is computed at least this long after its first change.
    pub max_delay_millis: u64,
}

impl Default for BgpConfig {
    fn default() -> Self {
        Self {
            debounce_millis: 50,
            max_delay_millis: 500,
        }
    }
}

pub type Error = runtime::ApiError;

/// The stores the computation reads.
#[derive(Clone)]
struct Stores {
    policies: Store<BGPPeeringPolicy>,
    nodes: Store<Node>,
    networks: Store<NodeNetwork>,
    services: Store<Service>,
    slices: Store<SliceInfo>,
    configs: Store<BGPNodeConfig>,
}

impl Stores {
    /// Resolves once every store has completed its first list (or the process is stopping).
    async fn listed(self) {
        let _ = futures::future::join3(
            futures::future::join(
                runtime::store_ready(&self.policies),
                runtime::store_ready(&self.nodes),
            ),
            futures::future::join(
                runtime::store_ready(&self.networks),
                runtime::store_ready(&self.services),
            ),
            futures::future::join(
                runtime::store_ready(&self.slices),
                runtime::store_ready(&self.configs),
            ),
        )
        .await;
    }

    async fn ready(&self) -> Result<(), runtime::CacheNotReady> {
        runtime::cache_ready(&self.policies, "bgppeeringpolicies").await?;
        runtime::cache_ready(&self.nodes, "nodes").await?;
        runtime::cache_ready(&self.networks, "nodenetworks").await?;
        runtime::cache_ready(&self.services, "services").await?;
        runtime::cache_ready(&self.slices, "endpointslices").await?;
        runtime::cache_ready(&self.configs, "bgpnodeconfigs").await?;
        Ok(())
    }
}

/// Whether `config` was written by this concern (owned by its Node); one written by hand
/// is the user's and is never deleted.
fn owned_by_node(config: &BGPNodeConfig) -> bool {
    config
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Node" && o.api_version == "v1")
}

struct Bgp {
    client: kube::Client,
    stores: Stores,
    ready_nodes: ReadyNodes,
    changes: ChangeClock,
    /// The `BGPNodeConfig`s, one per node.
    configs: OwnedObjects<BGPNodeConfig, BGPNodeConfigSpec>,
    /// The problem last reported with an Event, per policy.
    problems: ProblemLog<String>,
    recorder: Recorder,
    metrics: Metrics,
    manager: String,
}

impl Reconciler for Bgp {
    type Object = Singleton;
    type Error = Error;
    const NAME: &'static str = NAME;

    async fn reconcile(&self, _: Arc<Singleton>) -> Result<Action, Error> {
        self.stores.ready().await?;
        self.changes.settled().await;
        let result = self
            .changes
            .handle(|changed_at| self.compute_and_write(changed_at))
            .await;
        if let Err(e) = &result {
            self.metrics
                .reconcile_errors
                .get_or_create(&ErrorLabel {
                    error: e.metric_label().to_string(),
                })
                .inc();
        }
        result
    }
}

impl Bgp {
    fn inputs(&self) -> (Vec<PolicyInput>, Vec<NodeInput>, Vec<ServiceInput>) {
        let policies = self
            .stores
            .policies
            .state()
            .iter()
            .map(|p| PolicyInput {
                name: p.name_any(),
                generation: p.metadata.generation,
                spec: p.spec.clone(),
            })
            .collect();
        let nodes = self
            .stores
            .nodes
            .state()
            .iter()
            .map(|n| {
                let network = self.stores.networks.get(&ObjectRef::new(&n.name_any()));
                desired::node_input(n, network.as_deref())
            })
            .collect();
        let services = self
            .stores
            .services
            .state()
            .iter()
            .filter_map(|s| desired::service_input(s))
            .map(|mut s| {
                if s.external_local || s.internal_local {
                    s.ready_nodes = self.ready_nodes.nodes(&s.key);
                }
                s
            })
            .collect();
        (policies, nodes, services)
    }

    async fn compute_and_write(&self, changed_at: DateTime<Utc>) -> Result<Action, Error> {
        let (policies, nodes, services) = self.inputs();
        let started = Instant::now();
        let want = desired::desired(&policies, &nodes, &services);
        let took = started.elapsed();
        self.metrics.compute_seconds.observe(took.as_secs_f64());
        self.set_metrics(&want);

        let plan = self.configs.plan(&want.configs, |node, stored| {
            !want.held.contains(node) && stored.is_some_and(owned_by_node)
        });
        debug!(
            policies = policies.len(),
            nodes = nodes.len(),
            services = services.len(),
            configs = want.configs.len(),
            held = want.held.len(),
            writes = plan.apply.len(),
            deletes = plan.delete.len(),
            compute_ms = took.as_secs_f64() * 1e3,
            "computed"
        );

        let changed_at = changed_at.to_rfc3339_opts(SecondsFormat::Micros, true);
        let api = Api::<BGPNodeConfig>::all(self.client.clone());
        let applied = self
            .configs
            .apply_all(plan.apply, WRITE_CONCURRENCY, |node, spec| {
                let api = api.clone();
                let changed_at = changed_at.clone();
                let owner = self
                    .stores
                    .nodes
                    .get(&ObjectRef::new(&node))
                    .and_then(|n| runtime::controller_owner_ref(n.as_ref()));
                async move {
                    let Some(owner) = owner else {
                        // The Node went away since the inputs were read: the next pass
                        // (its deletion triggers one) drops it.
                        return (node, spec, Ok(false));
                    };
                    let body = runtime::apply_body::<BGPNodeConfig>(
                        &node,
                        None,
                        json!({
                            "metadata": {
                                "ownerReferences": [owner],
                                "annotations": {BGP_CHANGED_AT_ANNOTATION: changed_at},
                            },
                            "spec": spec,
                        }),
                    );
                    let res = runtime::apply(&api, &self.manager, &body)
                        .await
                        .map(|_| true);
                    (node, spec, res)
                }
            })
            .await;
        self.metrics.writes.inc_by(applied.written.len() as u64);
        let mut first_error = applied.first_error;
        for node in plan.delete {
            match self.configs.delete(&api, &node).await {
                Ok(true) => {
                    self.metrics.deletes.inc();
                    info!(node, "no policy selects the node; BGPNodeConfig deleted");
                }
                Ok(false) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Err(e) = self.write_statuses(&want).await {
            first_error.get_or_insert(e);
        }
        self.report_problems(&want).await;
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(Action::await_change()),
        }
    }

    fn set_metrics(&self, want: &Desired) {
        self.metrics.node_configs.set(want.configs.len() as i64);
        self.metrics.held_nodes.set(want.held.len() as i64);
        self.metrics
            .invalid_policies
            .set(want.policies.values().filter(|p| !p.valid.status).count() as i64);
        for (source, n) in desired::count_by_source(&want.configs) {
            self.metrics
                .advertisements
                .get_or_create(&SourceLabel {
                    source: source.as_str().to_string(),
                })
                .set(n);
        }
    }

    /// `status` of every policy whose `Valid`, `observedGeneration` or `selectedNodes`
    /// changed.
    async fn write_statuses(&self, want: &Desired) -> Result<(), kube::Error> {
        let api = Api::<BGPPeeringPolicy>::all(self.client.clone());
        let mut first_error = None;
        for (name, outcome) in &want.policies {
            let Some(policy) = self.stores.policies.get(&ObjectRef::new(name)) else {
                continue;
            };
            let empty = Default::default();
            let status = policy.status.as_ref().unwrap_or(&empty);
            if conditions::is_current(&status.conditions, &outcome.valid, outcome.generation)
                && status.observed_generation == outcome.generation
                && status.selected_nodes == Some(outcome.selected_nodes)
            {
                continue;
            }
            let condition = conditions::merge(
                conditions::find(&status.conditions, conditions::VALID),
                &outcome.valid,
                outcome.generation,
                Timestamp::now(),
            );
            let body = runtime::apply_body::<BGPPeeringPolicy>(
                name,
                None,
                json!({"status": {
                    "conditions": [condition],
                    "observedGeneration": outcome.generation,
                    "selectedNodes": outcome.selected_nodes,
                }}),
            );
            match runtime::apply_status(&api, &self.manager, &body).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    warn!(policy = %name, error = %e, "writing the policy status failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A Warning Event on each policy with a new problem (conflict, invalid, no router id).
    async fn report_problems(&self, want: &Desired) {
        let problems = want
            .policies
            .iter()
            .filter(|(_, o)| !o.valid.status)
            .map(|(name, o)| (name.clone(), o.valid.clone()));
        events::warn_each(
            &self.recorder,
            &self.stores.policies,
            self.problems.fresh(problems),
            "ComputeBGPNodeConfigs",
            "BGP policy not applied in full",
        )
        .await;
    }
}

/// The trigger mapper of a change of intent: starts the clock.
fn observed<K>(
    clock: &ChangeClock,
) -> impl Fn(K) -> Option<ObjectRef<Singleton>> + Send + Sync + 'static + use<K> {
    singleton::on_change(NAME, Some(clock))
}

/// Runs the BGP concern until `ctx.shutdown`.
pub async fn run(ctx: runtime::Context, config: BgpConfig) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let policies = ctx.caches.all::<BGPPeeringPolicy>();
    let nodes = ctx.caches.all::<Node>();
    let networks = ctx.caches.all::<NodeNetwork>();
    let services = ctx.caches.all::<Service>();
    let slices = crate::services::slice_cache(&ctx.caches);
    let configs = ctx.caches.all::<BGPNodeConfig>();
    let stores = Stores {
        policies: policies.store(),
        nodes: nodes.store(),
        networks: networks.store(),
        services: services.store(),
        slices: slices.store(),
        configs: configs.store(),
    };
    let changes = ChangeClock::new(
        Duration::from_millis(config.debounce_millis),
        Duration::from_millis(config.max_delay_millis),
    );
    let owned = OwnedObjects::new("BGPNodeConfig", &configs, |c: &BGPNodeConfig| &c.spec);
    let ready_nodes = ReadyNodes::default();

    let policy_changes = policies.trigger_on(|p: &BGPPeeringPolicy| p.metadata.generation);
    let node_changes = nodes.trigger_on(index::node_facts);
    let network_changes = networks.trigger_on(|nn: &NodeNetwork| nn.spec.pod_cidrs.clone());
    let service_changes = services.trigger_on(desired::service_input);
    let slice_changes = {
        let index = ready_nodes.clone();
        let store = slices.store();
        slices.trigger_when(move |c| index.apply(c, &store))
    };
    // Our own writes come back here; a config edited or deleted by someone else is put
    // back. Neither is a change of intent, so the clock is not started.
    let config_changes = owned.trigger(&configs);

    // Without a policy, nodes, Services and slices change nothing this concern writes.
    let controller = singleton::controller(NAME, stores.clone().listed())
        .watches_stream(policy_changes, observed(&changes))
        .watches_stream(
            node_changes,
            singleton::on_change_while_any(NAME, Some(&changes), &stores.policies),
        )
        .watches_stream(
            network_changes,
            singleton::on_change_while_any(NAME, Some(&changes), &stores.policies),
        )
        .watches_stream(
            service_changes,
            singleton::on_change_while_any(NAME, Some(&changes), &stores.policies),
        )
        .watches_stream(
            slice_changes,
            singleton::on_change_while_any(NAME, Some(&changes), &stores.policies),
        )
        .watches_stream(config_changes, singleton::on_change(NAME, None));
    let reconciler = Bgp {
        client: client.clone(),
        stores,
        ready_nodes,
        changes,
        configs: owned,
        problems: ProblemLog::default(),
        recorder: events::recorder(client, "tendril-operator"),
        metrics: Metrics::new(&ctx.metrics),
        manager: runtime::field_manager(NAME),
    };
    runtime::run(controller, reconciler, &ctx).await;
    Ok(())
}
