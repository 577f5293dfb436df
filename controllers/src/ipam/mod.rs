//! Concern `ipam`: `PodIPPool` → `NodeNetwork.spec.podCIDRs` and `spec.podIPPool`
//! (field manager `tendril-ipam`).
//!
//! [`pool`] is the allocator and [`plan`] the decisions of one reconcile (pure values); the
//! reconciler is the thin shell around them: it reads the caches, calls [`plan::plan`] and
//! writes. Each reconcile is about one pool and sees all of it: it frees the blocks of nodes
//! whose `NodeNetwork` is gone, then gives a block per family to every selected node that
//! has none, then writes the pool's status. Before its first reconcile of a pool the operator
//! waits for the caches (pools, nodes, `NodeNetwork`s) to sync and restores the pool's
//! allocations from the `NodeNetwork`s naming it, so a restart hands out nothing twice.
//!
//! Which pool a node takes its CIDRs from:
//! 1. a pool whose `nodeSelector` is set and matches the Node's labels (the first by name
//!    if several do);
//! 2. otherwise a pool without `nodeSelector` (it selects every node): the one named
//!    `ipam.defaultPool` (`default`) if it exists, else the first by name.
//!
//! A node keeps its pool and CIDRs for its whole life, even if its labels change later
//! (moving it would re-address its pods). Deleting a pool does not take CIDRs away from its
//! nodes either; a pool created later over the same space never hands those CIDRs out. The
//! `NodeNetwork` itself is created by the nodes concern (with the Node as owner); IPAM only patches its own fields into an existing
//! one, with the object's uid as a precondition, so it never creates an orphan.
//!
//! Status: `Valid` (the spec is usable; False with the reason when a change was refused
//! because it would re-address running pods, or the pool overlaps an older pool), `Ready`
//! (valid and every selected node has its CIDRs), `Exhausted` (nodes are waiting for a
//! block; they get one as soon as space frees), `allocatedCIDRs`, `availableCIDRs`.
//! Exhaustion also emits a Warning Event on the pool and counts
//! `tendril_ipam_exhaustions_total{pool,family}`; `tendril_ipam_cidrs_allocated{pool,family}`
//! and `tendril_ipam_cidrs_available{pool,family}` are gauges.

pub mod plan;
pub mod pool;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates};
use kube::{Resource, ResourceExt};
use plan::{Inputs, Outcome, Pools};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tendril_crds::v1alpha1::{NodeNetwork, PodIPPool};
use tendril_runtime::{self as runtime, Reconciler, conditions};
use tracing::{info, warn};

pub use plan::{EXHAUSTED, select_pool};

/// The concern's name; its field manager is `tendril-ipam`.
pub const NAME: &str = "ipam";

/// `ipam` in config/operator.yaml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IpamConfig {
    /// The selector-less pool preferred for nodes no pool selects explicitly.
    pub default_pool: String,
}

impl Default for IpamConfig {
    fn default() -> Self {
        Self {
            default_pool: "default".to_string(),
        }
    }
}

/// How long a node waiting for space is left before looking again (frees also trigger).
const WAIT_RETRY: Duration = Duration::from_secs(30);

pub type Error = runtime::ApiError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolFamily {
    pool: String,
    family: String,
}

struct Metrics {
    allocated: MetricFamily<PoolFamily, Gauge>,
    available: MetricFamily<PoolFamily, Gauge>,
    exhaustions: MetricFamily<PoolFamily, Counter>,
}

impl Metrics {
    fn new(m: &runtime::Metrics) -> Self {
        Self {
            allocated: m.domain(
                "tendril_ipam_cidrs_allocated",
                "Node CIDRs allocated per pool and family",
                MetricFamily::<PoolFamily, Gauge>::default,
            ),
            available: m.domain(
                "tendril_ipam_cidrs_available",
                "Node CIDRs still free per pool and family",
                MetricFamily::<PoolFamily, Gauge>::default,
            ),
            exhaustions: m.domain(
                "tendril_ipam_exhaustions",
                "Times a node found its pool exhausted and had to wait",
                MetricFamily::<PoolFamily, Counter>::default,
            ),
        }
    }
}

struct Ipam {
    pools_api: Api<PodIPPool>,
    networks_api: Api<NodeNetwork>,
    pools: Store<PodIPPool>,
    networks: Store<NodeNetwork>,
    nodes: Store<Node>,
    /// The allocator memory of every pool, from one reconcile to the next.
    state: Mutex<Pools>,
    recorder: Recorder,
    default_pool: String,
    metrics: Metrics,
}

impl Reconciler for Ipam {
    type Object = PodIPPool;
    type Error = Error;
    const NAME: &'static str = NAME;

    async fn reconcile(&self, pool_obj: Arc<PodIPPool>) -> Result<Action, Error> {
        // Allocation needs the full view: restoring from a partial list could hand out a
        // block a node already holds.
        runtime::cache_ready(&self.pools, "podippools").await?;
        runtime::cache_ready(&self.networks, "nodenetworks").await?;
        runtime::cache_ready(&self.nodes, "nodes").await?;
        let out = self.plan(&pool_obj);
        self.report(&pool_obj, &out);
        self.write_cidrs(&pool_obj, &out).await?;
        self.report_exhaustion(&pool_obj, &out).await;
        self.write_status(&pool_obj, &out).await?;
        Ok(if out.waiting > 0 {
            Action::requeue(WAIT_RETRY)
        } else {
            Action::await_change()
        })
    }
}

impl Ipam {
    /// [`plan::plan`] over the caches' contents and the allocator memory.
    fn plan(&self, pool_obj: &PodIPPool) -> Outcome {
        let pools = self.pools.state();
        let networks = self.networks.state();
        let node_labels: BTreeMap<String, plan::Labels> = self
            .nodes
            .state()
            .iter()
            .map(|n| (n.name_any(), n.labels().clone()))
            .collect();
        let input = Inputs {
            pools: &pools,
            networks: &networks,
            node_labels: &node_labels,
            default_pool: &self.default_pool,
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        plan::plan(&mut state, pool_obj, &input)
    }

    /// Logs what the plan found and publishes the pool's usage.
    fn report(&self, pool_obj: &PodIPPool, out: &Outcome) {
        let name = pool_obj.name_any();
        if let Some(nodes) = out.restored {
            info!(pool = %name, nodes, "pool allocations restored");
        }
        for c in &out.conflicts {
            warn!(pool = %name, conflict = %c, "conflicting pod CIDRs in NodeNetworks");
        }
        for (node, freed) in &out.freed {
            info!(pool = %name, %node, ?freed, "node gone; CIDRs freed");
        }
        for usage in &out.usage {
            let labels = PoolFamily {
                pool: name.clone(),
                family: usage.family.as_str().to_string(),
            };
            let saturate = |v: u128| i64::try_from(v).unwrap_or(i64::MAX);
            self.metrics
                .allocated
                .get_or_create(&labels)
                .set(saturate(usage.allocated));
            self.metrics
                .available
                .get_or_create(&labels)
                .set(saturate(usage.available));
        }
    }

    async fn write_cidrs(&self, pool_obj: &PodIPPool, out: &Outcome) -> Result<(), Error> {
        let name = pool_obj.name_any();
        let manager = runtime::field_manager(NAME);
        for w in &out.writes {
            // The uid makes this a patch of the existing NodeNetwork, never a create.
            let body = runtime::apply_body::<NodeNetwork>(
                &w.node,
                None,
                json!({
                    "metadata": { "uid": w.uid },
                    "spec": {
                        "podCIDRs": w.cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "podIPPool": name,
                    },
                }),
            );
            match runtime::apply(&self.networks_api, &manager, &body).await {
                Ok(_) => info!(node = %w.node, cidrs = ?w.cidrs, "pod CIDRs assigned"),
                // The NodeNetwork went away (or was replaced) meanwhile: the next
                // reconcile frees the block.
                Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409 | 422) => {
                    warn!(node = %w.node, error = %s.message, "NodeNetwork changed under us; will retry");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// A Warning Event and `tendril_ipam_exhaustions_total` for each node that started
    /// waiting.
    async fn report_exhaustion(&self, pool_obj: &PodIPPool, out: &Outcome) {
        let name = pool_obj.name_any();
        for (node, family) in &out.newly_waiting {
            self.metrics
                .exhaustions
                .get_or_create(&PoolFamily {
                    pool: name.clone(),
                    family: family.as_str().to_string(),
                })
                .inc();
            let note = format!(
                "pool {name} has no free {family} block for node {node}; it waits until space frees"
            );
            warn!(%node, %family, "pool exhausted");
            let event = Event {
                type_: EventType::Warning,
                reason: "PoolExhausted".into(),
                note: Some(note),
                action: "AllocateNodeCIDR".into(),
                secondary: None,
            };
            if let Err(e) = self
                .recorder
                .publish(&event, &pool_obj.object_ref(&()))
                .await
            {
                warn!(error = %e, "publishing the exhaustion Event failed");
            }
        }
    }

    async fn write_status(&self, pool_obj: &PodIPPool, out: &Outcome) -> Result<(), Error> {
        let generation = pool_obj.meta().generation;
        let status = pool_obj.status.clone().unwrap_or_default();
        let desired = plan::conditions(out);
        let current = desired
            .iter()
            .all(|d| conditions::is_current(&status.conditions, d, generation))
            && status.allocated_cidrs == out.allocated
            && status.available_cidrs == out.available
            && status.observed_generation == generation;
        if current {
            return Ok(());
        }
        let now = Timestamp::now();
        let conds: Vec<_> = desired
            .iter()
            .map(|d| {
                conditions::merge(
                    conditions::find(&status.conditions, &d.type_),
                    d,
                    generation,
                    now,
                )
            })
            .collect();
        let body = runtime::apply_body::<PodIPPool>(
            &pool_obj.name_any(),
            None,
            json!({ "status": {
                "conditions": conds,
                "observedGeneration": generation,
                "allocatedCIDRs": out.allocated,
                "availableCIDRs": out.available,
            }}),
        );
        runtime::apply_status(&self.pools_api, &runtime::field_manager(NAME), &body).await?;
        Ok(())
    }
}

/// Runs the IPAM controller until `ctx.shutdown`.
pub async fn run(ctx: runtime::Context, config: IpamConfig) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let pools = ctx.caches.all::<PodIPPool>();
    let networks = ctx.caches.all::<NodeNetwork>();
    let nodes = ctx.caches.all::<Node>();
    let all_pools = |store: &Store<PodIPPool>| {
        store
            .state()
            .iter()
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect::<Vec<_>>()
    };
    let (pools_for_nn, pools_for_node) = (pools.store(), pools.store());
    let controller = Controller::for_stream(pools.trigger(), pools.store())
        .watches_stream(networks.trigger(), move |nn: NodeNetwork| {
            match nn.spec.pod_ip_pool.as_deref() {
                Some(p) if !nn.spec.pod_cidrs.is_empty() => vec![ObjectRef::new(p)],
                _ => all_pools(&pools_for_nn),
            }
        })
        // Only label changes can move an unallocated node to another pool.
        .watches_stream(
            nodes
                .applied()
                .predicate_filter(predicates::labels, Default::default()),
            move |_: Node| all_pools(&pools_for_node),
        );
    let reconciler = Ipam {
        pools_api: Api::all(client.clone()),
        networks_api: Api::all(client.clone()),
        pools: pools.store(),
        networks: networks.store(),
        nodes: nodes.store(),
        state: Mutex::new(Pools::new()),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "tendril-operator".into(),
                instance: None,
            },
        ),
        default_pool: config.default_pool,
        metrics: Metrics::new(&ctx.metrics),
    };
    runtime::run(controller, reconciler, &ctx).await;
    Ok(())
}
