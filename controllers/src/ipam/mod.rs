//! Concern `ipam`: `PodIPPool` → `NodeNetwork.spec.podCIDRs` and `spec.podIPPool`
//! (field manager `tendril-ipam`).
//!
//! [`pool`] is the allocator (pure values); the reconciler is the thin shell around it. Each
//! reconcile is about one pool and sees all of it: it frees the blocks of nodes whose
//! `NodeNetwork` is gone, then gives a block per family to every selected node that has
//! none, then writes the pool's status. Before its first reconcile of a pool the operator
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
//! nodes either; a pool created later over the same space never hands those CIDRs out. The `NodeNetwork` itself is created by the nodes
//! concern (with the Node as owner); IPAM only patches its own fields into an existing
//! one, with the object's uid as a precondition, so it never creates an orphan.
//!
//! Status: `Valid` (the spec is usable; False with the reason when a change was refused
//! because it would re-address running pods, or the pool overlaps an older pool), `Ready`
//! (valid and every selected node has its CIDRs), `Exhausted` (nodes are waiting for a
//! block; they get one as soon as space frees), `allocatedCIDRs`, `availableCIDRs`.
//! Exhaustion also emits a Warning Event on the pool and counts
//! `tendril_ipam_exhaustions_total{pool,family}`; `tendril_ipam_cidrs_allocated{pool,family}`
//! and `tendril_ipam_cidrs_available{pool,family}` are gauges.

pub mod pool;

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Resource, ResourceExt};
use pool::{AllocError, Family, Pool, PoolConfig};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tendril_crds::common::conditions::{READY, VALID};
use tendril_crds::v1alpha1::{NodeNetwork, PodIPPool};
use tendril_runtime::{self as runtime, DesiredCondition, Reconciler, conditions};
use tracing::{info, warn};

/// The concern's name; its field manager is `tendril-ipam`.
pub const NAME: &str = "ipam";
pub const EXHAUSTED: &str = "Exhausted";

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

/// Whether `selector` selects `labels`; an unparsable selector selects nothing.
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// The pool a node without CIDRs takes them from (see the module docs), by name.
pub fn select_pool<'a>(
    node_labels: &BTreeMap<String, String>,
    pools: impl IntoIterator<Item = (&'a str, Option<&'a LabelSelector>)>,
    default_pool: &str,
) -> Option<String> {
    let mut pools: Vec<(&str, Option<&LabelSelector>)> = pools.into_iter().collect();
    pools.sort_by_key(|(name, _)| *name);
    if let Some((name, _)) = pools
        .iter()
        .find(|(_, sel)| sel.is_some_and(|s| selects(s, node_labels)))
    {
        return Some(name.to_string());
    }
    let catch_all: Vec<&str> = pools
        .iter()
        .filter(|(_, sel)| sel.is_none())
        .map(|(n, _)| *n)
        .collect();
    catch_all
        .iter()
        .find(|n| **n == default_pool)
        .or(catch_all.first())
        .map(|n| n.to_string())
}

fn parse_cidrs(network: &NodeNetwork) -> Vec<IpNet> {
    network
        .spec
        .pod_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect()
}

struct PoolState {
    pool: Pool,
    /// Nodes that could not get a block, with the exhausted family.
    waiting: BTreeMap<String, Family>,
}

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

struct Ipam {
    pools_api: Api<PodIPPool>,
    networks_api: Api<NodeNetwork>,
    pools: Store<PodIPPool>,
    networks: Store<NodeNetwork>,
    nodes: Store<Node>,
    state: Mutex<BTreeMap<String, PoolState>>,
    recorder: Recorder,
    default_pool: String,
    metrics: Metrics,
}

/// A write the reconcile decided on while holding the state lock.
struct Write {
    node: String,
    uid: Option<String>,
    cidrs: Vec<IpNet>,
}

/// What a reconcile of one pool computed.
#[derive(Default)]
struct Outcome {
    writes: Vec<Write>,
    newly_waiting: Vec<(String, String)>,
    valid: Option<DesiredCondition>,
    waiting: usize,
    allocated: i64,
    available: i64,
    usable: bool,
}

fn saturate(v: u128) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn older(a: &PodIPPool, b: &PodIPPool) -> bool {
    let key = |p: &PodIPPool| {
        (
            p.meta().creation_timestamp.as_ref().map(|t| t.0),
            p.name_any(),
        )
    };
    key(a) < key(b)
}

impl Ipam {
    /// Allocation decisions for one pool, under the state lock.
    fn plan(&self, pool_obj: &PodIPPool) -> Outcome {
        let name = pool_obj.name_any();
        let mut out = Outcome::default();
        let all_pools = self.pools.state();
        let mut state = self.state.lock().expect("ipam state lock");
        state.retain(|n, _| all_pools.iter().any(|p| p.name_any() == *n));

        let config = match PoolConfig::from_spec(&pool_obj.spec) {
            Ok(c) => Ok(c),
            Err(e) => Err(format!("invalid pool: {e}")),
        };
        // A pool overlapping an older pool is refused (the older one keeps its space).
        let config = config.and_then(|cfg| {
            for other in all_pools.iter().filter(|p| p.name_any() != name) {
                if !older(other, pool_obj) {
                    continue;
                }
                let other_cfg = state
                    .get(&other.name_any())
                    .map(|s| s.pool.config().clone())
                    .or_else(|| PoolConfig::from_spec(&other.spec).ok());
                for a in cfg.all_cidrs() {
                    for b in other_cfg.iter().flat_map(|c| c.all_cidrs()) {
                        if pool::overlaps(a, b) {
                            return Err(format!(
                                "CIDR {a} overlaps {b} of the older pool {}",
                                other.name_any()
                            ));
                        }
                    }
                }
            }
            Ok(cfg)
        });

        let networks = self.networks.state();
        let mut refusal = None;
        match (config, state.contains_key(&name)) {
            (Err(reason), _) => refusal = Some(("InvalidSpec", reason)),
            (Ok(cfg), false) => {
                let mut p = Pool::new(cfg.clone());
                for nn in networks.iter().filter(|n| {
                    n.spec.pod_ip_pool.as_deref() == Some(name.as_str())
                        && !n.spec.pod_cidrs.is_empty()
                }) {
                    for c in p.restore(&nn.name_any(), &parse_cidrs(nn)) {
                        warn!(pool = %name, conflict = %c, "conflicting pod CIDRs in NodeNetworks");
                    }
                }
                let violations = p.violations(&cfg);
                if !violations.is_empty() {
                    refusal = Some(("WouldReaddressPods", violations.join("; ")));
                }
                // Nodes whose pool was deleted keep their CIDRs: never hand those out.
                let existing: BTreeSet<String> = all_pools.iter().map(|p| p.name_any()).collect();
                for nn in networks.iter().filter(|n| {
                    n.spec
                        .pod_ip_pool
                        .as_ref()
                        .is_none_or(|p| !existing.contains(p))
                }) {
                    for c in parse_cidrs(nn) {
                        if cfg.all_cidrs().any(|pc| pool::overlaps(pc, &c)) {
                            p.reserve_foreign(&nn.name_any(), c);
                        }
                    }
                }
                info!(pool = %name, nodes = p.allocations().count(), "pool allocations restored");
                state.insert(
                    name.clone(),
                    PoolState {
                        pool: p,
                        waiting: BTreeMap::new(),
                    },
                );
            }
            (Ok(cfg), true) => {
                let s = state.get_mut(&name).expect("checked");
                if let Err(r) = s.pool.apply_config(cfg) {
                    refusal = Some(("WouldReaddressPods", r.to_string()));
                }
            }
        }
        out.valid = Some(match &refusal {
            None => DesiredCondition::new(VALID, true, "Accepted", "pool accepted"),
            Some((reason, msg)) => DesiredCondition::new(
                VALID,
                false,
                reason,
                match state.contains_key(&name) {
                    true => format!("{msg}; the previous configuration stays in effect"),
                    false => msg.clone(),
                },
            ),
        });
        let Some(s) = state.get_mut(&name) else {
            return out;
        };
        out.usable = true;

        // Free the blocks of nodes that are gone, so waiting nodes can have them now.
        let present: BTreeSet<String> = networks.iter().map(|n| n.name_any()).collect();
        let gone: Vec<String> = s
            .pool
            .allocations()
            .map(|(n, _)| n.to_string())
            .filter(|n| !present.contains(n))
            .collect();
        for node in gone {
            let freed = s.pool.release(&node);
            info!(pool = %name, %node, ?freed, "node gone; CIDRs freed");
        }
        s.waiting.retain(|n, _| present.contains(n));

        let selectors: Vec<(String, Option<LabelSelector>)> = all_pools
            .iter()
            .map(|p| (p.name_any(), p.spec.node_selector.clone()))
            .collect();
        let mut candidates: Vec<_> = networks.iter().collect();
        candidates.sort_by_key(|n| n.name_any());
        for nn in candidates {
            let node = nn.name_any();
            let held = parse_cidrs(nn);
            let belongs = match nn.spec.pod_ip_pool.as_deref() {
                Some(p) if !held.is_empty() => p == name,
                _ => {
                    if nn.meta().deletion_timestamp.is_some() {
                        continue;
                    }
                    let Some(n) = self.nodes.get(&ObjectRef::new(&node)) else {
                        continue;
                    };
                    let empty = BTreeMap::new();
                    let labels = n.metadata.labels.as_ref().unwrap_or(&empty);
                    select_pool(
                        labels,
                        selectors.iter().map(|(n, s)| (n.as_str(), s.as_ref())),
                        &self.default_pool,
                    )
                    .as_deref()
                        == Some(name.as_str())
                }
            };
            if !belongs {
                continue;
            }
            if !held.is_empty() {
                for c in s.pool.restore(&node, &held) {
                    warn!(pool = %name, conflict = %c, "conflicting pod CIDRs in NodeNetworks");
                }
            }
            match s.pool.allocate(&node) {
                Ok(cidrs) => {
                    s.waiting.remove(&node);
                    if cidrs != held || nn.spec.pod_ip_pool.as_deref() != Some(name.as_str()) {
                        out.writes.push(Write {
                            node,
                            uid: nn.uid(),
                            cidrs,
                        });
                    }
                }
                Err(AllocError::Exhausted { family, .. }) => {
                    if s.waiting.insert(node.clone(), family).is_none() {
                        out.newly_waiting.push((node, family.as_str().to_string()));
                    }
                }
            }
        }
        out.waiting = s.waiting.len();
        out.allocated = saturate(s.pool.allocated_blocks());
        out.available = saturate(s.pool.available_nodes());
        for usage in s.pool.usage() {
            let labels = PoolFamily {
                pool: name.clone(),
                family: usage.family.as_str().to_string(),
            };
            self.metrics
                .allocated
                .get_or_create(&labels)
                .set(saturate(usage.allocated));
            self.metrics
                .available
                .get_or_create(&labels)
                .set(saturate(usage.available));
        }
        out
    }
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
        let name = pool_obj.name_any();
        let manager = runtime::field_manager(NAME);
        let out = self.plan(&pool_obj);

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
        for (node, family) in &out.newly_waiting {
            self.metrics
                .exhaustions
                .get_or_create(&PoolFamily {
                    pool: name.clone(),
                    family: family.clone(),
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
        self.write_status(&pool_obj, &out).await?;
        Ok(if out.waiting > 0 {
            Action::requeue(WAIT_RETRY)
        } else {
            Action::await_change()
        })
    }
}

impl Ipam {
    async fn write_status(&self, pool_obj: &PodIPPool, out: &Outcome) -> Result<(), Error> {
        let generation = pool_obj.meta().generation;
        let valid = out.valid.clone().expect("plan sets Valid");
        let exhausted = if out.waiting > 0 {
            DesiredCondition::new(
                EXHAUSTED,
                true,
                "NodesWaiting",
                format!(
                    "{} node(s) wait for a CIDR; add CIDRs or remove nodes",
                    out.waiting
                ),
            )
        } else {
            DesiredCondition::new(
                EXHAUSTED,
                false,
                "SpaceLeft",
                "every selected node has its CIDRs",
            )
        };
        let ready = match (out.usable, valid.status, out.waiting) {
            (false, _, _) => DesiredCondition::new(READY, false, "Invalid", valid.message.clone()),
            (true, _, w) if w > 0 => DesiredCondition::new(
                READY,
                false,
                "Exhausted",
                format!("{w} node(s) wait for a CIDR"),
            ),
            (true, true, _) => DesiredCondition::new(
                READY,
                true,
                "Allocated",
                "every selected node has its CIDRs",
            ),
            (true, false, _) => DesiredCondition::new(
                READY,
                true,
                "PreviousConfiguration",
                "every selected node has its CIDRs (from the previous configuration)",
            ),
        };
        let status = pool_obj.status.clone().unwrap_or_default();
        let desired = [valid, ready, exhausted];
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
    let pools_api = Api::<PodIPPool>::all(client.clone());
    let networks_api = Api::<NodeNetwork>::all(client.clone());
    let controller = Controller::new(pools_api.clone(), watcher::Config::default());
    let pools = controller.store();

    let (networks, nn_writer) = reflector::store();
    let nn_events = watcher(networks_api.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(nn_writer)
        .touched_objects()
        .boxed();
    let (nodes, node_writer) = reflector::store();
    // Only label changes can move an unallocated node to another pool.
    let node_events = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(node_writer)
        .applied_objects()
        .predicate_filter(predicates::labels, Default::default())
        .boxed();
    let pools_for_nn = pools.clone();
    let pools_for_node = pools.clone();
    let all_pools = |store: &Store<PodIPPool>| {
        store
            .state()
            .iter()
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect::<Vec<_>>()
    };
    let controller = controller
        .watches_stream(nn_events, move |nn: NodeNetwork| {
            match nn.spec.pod_ip_pool.as_deref() {
                Some(p) if !nn.spec.pod_cidrs.is_empty() => vec![ObjectRef::new(p)],
                _ => all_pools(&pools_for_nn),
            }
        })
        .watches_stream(node_events, move |_: Node| all_pools(&pools_for_node));
    let reconciler = Ipam {
        pools_api,
        networks_api,
        pools,
        networks,
        nodes,
        state: Mutex::new(BTreeMap::new()),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "tendril-operator".into(),
                instance: None,
            },
        ),
        default_pool: config.default_pool,
        metrics: Metrics {
            allocated: ctx.metrics.domain(
                "tendril_ipam_cidrs_allocated",
                "Node CIDRs allocated per pool and family",
                MetricFamily::<PoolFamily, Gauge>::default,
            ),
            available: ctx.metrics.domain(
                "tendril_ipam_cidrs_available",
                "Node CIDRs still free per pool and family",
                MetricFamily::<PoolFamily, Gauge>::default,
            ),
            exhaustions: ctx.metrics.domain(
                "tendril_ipam_exhaustions",
                "Times a node found its pool exhausted and had to wait",
                MetricFamily::<PoolFamily, Counter>::default,
            ),
        },
    };
    runtime::run(controller, reconciler, &ctx).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(k: &str, v: &str) -> LabelSelector {
        LabelSelector {
            match_labels: Some(labels(&[(k, v)])),
            ..Default::default()
        }
    }

    #[test]
    fn explicit_selector_beats_default_beats_other_catch_alls() {
        let gpu = sel("gpu", "true");
        let pools = [("aaa", None), ("default", None), ("gpu", Some(&gpu))];
        assert_eq!(
            select_pool(&labels(&[("gpu", "true")]), pools, "default").as_deref(),
            Some("gpu")
        );
        assert_eq!(
            select_pool(&labels(&[]), pools, "default").as_deref(),
            Some("default")
        );
        assert_eq!(
            select_pool(&labels(&[]), [("aaa", None), ("bbb", None)], "default").as_deref(),
            Some("aaa")
        );
        assert_eq!(
            select_pool(&labels(&[]), [("gpu", Some(&gpu))], "default"),
            None
        );
    }
}
