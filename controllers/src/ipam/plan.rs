//! One pool's allocation decisions as pure values: the pools, `NodeNetwork`s and node labels
//! in, the allocator memory ([`Pools`]) updated, and the writes, conditions and counts out.
//! The reconciler reads the caches, calls [`plan`] and writes; nothing here talks to the
//! API, logs or sets a metric.

use super::pool::{self, AllocError, Family, FamilyUsage, Pool, PoolConfig, RestoreConflict};
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tendril_crds::common::conditions::{READY, VALID};
use tendril_crds::v1alpha1::{NodeNetwork, PodIPPool};
use tendril_runtime::DesiredCondition;

pub const EXHAUSTED: &str = "Exhausted";

/// Labels of a Node.
pub type Labels = BTreeMap<String, String>;

/// Whether `selector` selects `labels`; an unparsable selector selects nothing.
fn selects(selector: &LabelSelector, labels: &Labels) -> bool {
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// The pool a node without CIDRs takes them from (see the module docs), by name.
pub fn select_pool<'a>(
    node_labels: &Labels,
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

/// The allocator memory of one pool.
#[derive(Clone, Debug)]
pub struct PoolState {
    pub pool: Pool,
    /// Nodes that could not get a block, with the exhausted family.
    pub waiting: BTreeMap<String, Family>,
}

/// The allocator memory of every pool, by name, kept from one reconcile to the next.
pub type Pools = BTreeMap<String, PoolState>;

/// What one pool's decisions read: the caches' contents.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub pools: &'a [Arc<PodIPPool>],
    pub networks: &'a [Arc<NodeNetwork>],
    /// Labels of every Node, by name (a Node not in the map does not exist yet).
    pub node_labels: &'a BTreeMap<String, Labels>,
    /// `ipam.defaultPool`.
    pub default_pool: &'a str,
}

/// A `NodeNetwork` to patch with its node's CIDRs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub node: String,
    /// The `NodeNetwork`'s uid: the write is a patch of that object, never a create.
    pub uid: Option<String>,
    pub cidrs: Vec<IpNet>,
}

/// What one reconcile of a pool decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub writes: Vec<Write>,
    /// Nodes that started waiting for a block in this reconcile, with the exhausted family.
    pub newly_waiting: Vec<(String, Family)>,
    pub valid: DesiredCondition,
    /// Nodes waiting for a block.
    pub waiting: usize,
    pub allocated: i64,
    pub available: i64,
    /// The pool allocates (a valid configuration, now or from before).
    pub usable: bool,
    /// Blocks per family, for the metrics.
    pub usage: Vec<FamilyUsage>,
    /// Allocations restored from the `NodeNetwork`s (the first reconcile of the pool).
    pub restored: Option<usize>,
    /// `NodeNetwork`s claiming overlapping blocks (found while restoring).
    pub conflicts: Vec<RestoreConflict>,
    /// Blocks freed because their node is gone.
    pub freed: Vec<(String, Vec<IpNet>)>,
}

impl Outcome {
    fn new(valid: DesiredCondition) -> Self {
        Self {
            writes: Vec::new(),
            newly_waiting: Vec::new(),
            valid,
            waiting: 0,
            allocated: 0,
            available: 0,
            usable: false,
            usage: Vec::new(),
            restored: None,
            conflicts: Vec::new(),
            freed: Vec::new(),
        }
    }
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

/// The pool's configuration, unless it is invalid or overlaps an older pool (the older one
/// keeps its space).
fn accepted_config(
    pool_obj: &PodIPPool,
    pools: &Pools,
    all: &[Arc<PodIPPool>],
) -> Result<PoolConfig, String> {
    let name = pool_obj.name_any();
    let cfg = PoolConfig::from_spec(&pool_obj.spec).map_err(|e| format!("invalid pool: {e}"))?;
    for other in all.iter().filter(|p| p.name_any() != name) {
        if !older(other, pool_obj) {
            continue;
        }
        let other_cfg = pools
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
}

/// A pool seen for the first time: its allocations restored from the `NodeNetwork`s naming
/// it, and the blocks of nodes whose pool was deleted reserved (never handed out); with the
/// conflicts found among the `NodeNetwork`s.
fn restore(name: &str, cfg: &PoolConfig, input: &Inputs) -> (Pool, Vec<RestoreConflict>) {
    let mut p = Pool::new(cfg.clone());
    let mut conflicts = Vec::new();
    for nn in input
        .networks
        .iter()
        .filter(|n| n.spec.pod_ip_pool.as_deref() == Some(name) && !n.spec.pod_cidrs.is_empty())
    {
        conflicts.extend(p.restore(&nn.name_any(), &parse_cidrs(nn)));
    }
    let existing: BTreeSet<String> = input.pools.iter().map(|p| p.name_any()).collect();
    for nn in input.networks.iter().filter(|n| {
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
    (p, conflicts)
}

/// Whether the node of `nn` takes its CIDRs from pool `name`: the pool it holds CIDRs
/// of, or, holding none, the pool [`select_pool`] picks for its Node's labels.
fn belongs(
    nn: &NodeNetwork,
    held: &[IpNet],
    name: &str,
    selectors: &[(String, Option<LabelSelector>)],
    input: &Inputs,
) -> bool {
    match nn.spec.pod_ip_pool.as_deref() {
        Some(p) if !held.is_empty() => p == name,
        _ => {
            if nn.meta().deletion_timestamp.is_some() {
                return false;
            }
            let Some(labels) = input.node_labels.get(&nn.name_any()) else {
                return false;
            };
            select_pool(
                labels,
                selectors.iter().map(|(n, s)| (n.as_str(), s.as_ref())),
                input.default_pool,
            )
            .as_deref()
                == Some(name)
        }
    }
}

/// Allocation decisions for the pool `pool_obj`: frees the blocks of nodes whose
/// `NodeNetwork` is gone, then gives a block per family to every selected node that has
/// none. `pools` is the allocator memory, updated in place.
pub fn plan(pools: &mut Pools, pool_obj: &PodIPPool, input: &Inputs) -> Outcome {
    let name = pool_obj.name_any();
    pools.retain(|n, _| input.pools.iter().any(|p| p.name_any() == *n));

    let mut refusal = None;
    let (mut restored, mut conflicts) = (None, Vec::new());
    match (
        accepted_config(pool_obj, pools, input.pools),
        pools.contains_key(&name),
    ) {
        (Err(reason), _) => refusal = Some(("InvalidSpec", reason)),
        (Ok(cfg), false) => {
            let (p, found) = restore(&name, &cfg, input);
            let violations = p.violations(&cfg);
            if !violations.is_empty() {
                refusal = Some(("WouldReaddressPods", violations.join("; ")));
            }
            restored = Some(p.allocations().count());
            conflicts = found;
            pools.insert(
                name.clone(),
                PoolState {
                    pool: p,
                    waiting: BTreeMap::new(),
                },
            );
        }
        (Ok(cfg), true) => {
            let s = pools.get_mut(&name).expect("checked");
            if let Err(r) = s.pool.apply_config(cfg) {
                refusal = Some(("WouldReaddressPods", r.to_string()));
            }
        }
    }
    let valid = match &refusal {
        None => DesiredCondition::new(VALID, true, "Accepted", "pool accepted"),
        Some((reason, msg)) => DesiredCondition::new(
            VALID,
            false,
            reason,
            match pools.contains_key(&name) {
                true => format!("{msg}; the previous configuration stays in effect"),
                false => msg.clone(),
            },
        ),
    };
    let mut out = Outcome::new(valid);
    out.restored = restored;
    out.conflicts = conflicts;
    let Some(s) = pools.get_mut(&name) else {
        return out;
    };
    out.usable = true;

    // Free the blocks of nodes that are gone, so waiting nodes can have them now.
    let present: BTreeSet<String> = input.networks.iter().map(|n| n.name_any()).collect();
    let gone: Vec<String> = s
        .pool
        .allocations()
        .map(|(n, _)| n.to_string())
        .filter(|n| !present.contains(n))
        .collect();
    for node in gone {
        let freed = s.pool.release(&node);
        out.freed.push((node, freed));
    }
    s.waiting.retain(|n, _| present.contains(n));

    let selectors: Vec<(String, Option<LabelSelector>)> = input
        .pools
        .iter()
        .map(|p| (p.name_any(), p.spec.node_selector.clone()))
        .collect();
    let mut candidates: Vec<_> = input.networks.iter().collect();
    candidates.sort_by_key(|n| n.name_any());
    for nn in candidates {
        let node = nn.name_any();
        let held = parse_cidrs(nn);
        if !belongs(nn, &held, &name, &selectors, input) {
            continue;
        }
        if !held.is_empty() {
            out.conflicts.extend(s.pool.restore(&node, &held));
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
                    out.newly_waiting.push((node, family));
                }
            }
        }
    }
    out.waiting = s.waiting.len();
    out.allocated = saturate(s.pool.allocated_blocks());
    out.available = saturate(s.pool.available_nodes());
    out.usage = s.pool.usage();
    out
}

/// The pool's `Valid`, `Ready` and `Exhausted` conditions for `out`.
pub fn conditions(out: &Outcome) -> [DesiredCondition; 3] {
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
    let ready = match (out.usable, out.valid.status, out.waiting) {
        (false, _, _) => DesiredCondition::new(READY, false, "Invalid", out.valid.message.clone()),
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
    [out.valid.clone(), ready, exhausted]
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
