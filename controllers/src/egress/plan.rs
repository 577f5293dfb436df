//! The egress concern's pure part: policies, nodes and endpoints in, one `EgressRoute` spec
//! and one outcome (conditions, gateway, what changed) per policy out.
//!
//! Gateway choice: a policy keeps its current gateway while that node stays eligible
//! (Ready, selected by the policy's node selector, with an InternalIP), so established
//! connections are never moved for nothing. Otherwise (first assignment, failover) the
//! eligible node with the highest rendezvous score for the policy's name wins: the choice
//! depends only on the policy's name and the eligible nodes, it spreads policies evenly
//! over the nodes, and a failed node's policies scatter over the survivors instead of all
//! landing on one.

use crate::policy::selector::Selector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use tendril_crds::common::conditions::{READY, VALID};
use tendril_crds::facts::labels::NAMESPACE_LABELS_PREFIX;
use tendril_crds::v1alpha1::{EgressGatewayPolicySpec, EgressRouteSpec};
use tendril_runtime::DesiredCondition;

/// `Ready=True`: a gateway was chosen and has not changed since.
pub const REASON_GATEWAY_SELECTED: &str = "GatewaySelected";
/// `Ready=True`: the previous gateway failed and another took over (kept until the next
/// change, so the failover stays visible).
pub const REASON_FAILED_OVER: &str = "FailedOver";
/// `Ready=False`: no node is eligible; matching traffic is dropped rather than leaving
/// with a pod address.
pub const REASON_NO_GATEWAY: &str = "NoGatewayNode";
/// `Valid=False`: a selector or CIDR the concern cannot use.
pub const REASON_INVALID: &str = "InvalidPolicy";

/// A policy as the plan sees it.
#[derive(Clone, Debug)]
pub struct PolicyInput {
    pub name: String,
    pub generation: Option<i64>,
    pub spec: EgressGatewayPolicySpec,
    /// The gateway of the policy's current route, if any.
    pub current_gateway: Option<String>,
    /// The policy's current `Ready` condition (to keep a failover visible).
    pub previous_ready: Option<DesiredCondition>,
}

/// A node as the plan sees it.
#[derive(Clone, Debug, Default)]
pub struct NodeInput {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The `Ready` condition is True.
    pub ready: bool,
    /// The address other nodes tunnel to (InternalIP, IPv4 first).
    pub address: Option<IpAddr>,
}

/// An endpoint (pod) as the plan sees it.
#[derive(Clone, Debug, Default)]
pub struct EndpointInput {
    /// Security labels (`k8s:app`, `k8s:io.tendril.k8s.namespace.labels.team`, …): its
    /// identity's, shared by every endpoint of that identity.
    pub labels: std::sync::Arc<BTreeMap<String, String>>,
    pub ips: Vec<IpAddr>,
}

/// Why a policy's gateway changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeReason {
    /// The policy had no gateway (new policy, or none was eligible before).
    Assigned,
    NodeNotReady,
    /// The node's labels no longer match the policy's node selector (or the selector changed).
    NodeNotSelected,
    NodeDeleted,
    NodeWithoutAddress,
    /// No node is eligible any more.
    NoneEligible,
}

impl ChangeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeReason::Assigned => "Assigned",
            ChangeReason::NodeNotReady => "NodeNotReady",
            ChangeReason::NodeNotSelected => "NodeNotSelected",
            ChangeReason::NodeDeleted => "NodeDeleted",
            ChangeReason::NodeWithoutAddress => "NodeWithoutAddress",
            ChangeReason::NoneEligible => "NoneEligible",
        }
    }

    /// A failover: a working gateway went away (as opposed to a first assignment).
    pub fn is_failover(self) -> bool {
        !matches!(self, ChangeReason::Assigned)
    }
}

/// A change of a policy's gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayChange {
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: ChangeReason,
}

impl GatewayChange {
    pub fn message(&self) -> String {
        let from = self.from.as_deref().unwrap_or("none");
        let to = self
            .to
            .as_deref()
            .unwrap_or("none (matching traffic is dropped)");
        format!("gateway {from} -> {to} ({})", self.reason.as_str())
    }
}

/// What the plan decided for one policy.
#[derive(Clone, Debug)]
pub struct PolicyOutcome {
    pub generation: Option<i64>,
    pub valid: DesiredCondition,
    /// `None` while the policy is invalid (its route is held as it is).
    pub ready: Option<DesiredCondition>,
    pub gateway: Option<String>,
    pub change: Option<GatewayChange>,
    pub source_ips: usize,
}

/// The routes to hold and each policy's outcome.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Route specs (revision 0: [`tendril_runtime::revisions::plan`] numbers them), by name.
    pub routes: BTreeMap<String, EgressRouteSpec>,
    pub policies: BTreeMap<String, PolicyOutcome>,
}

impl Plan {
    /// Policies whose route must be neither written nor deleted (invalid ones).
    pub fn held(&self) -> BTreeSet<String> {
        self.policies
            .iter()
            .filter(|(_, o)| !o.valid.status)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// A compiled `EgressSelector`: both parts must match when both are set.
struct SourceSelector {
    pods: Option<Selector>,
    namespaces: Option<Selector>,
}

impl SourceSelector {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.pods.as_ref().is_none_or(|s| s.matches(labels))
            && self.namespaces.as_ref().is_none_or(|s| s.matches(labels))
    }
}

struct Compiled {
    sources: Vec<SourceSelector>,
    nodes: Selector,
    destinations: Vec<String>,
    excluded: Vec<String>,
}

fn compile_selector(
    what: &str,
    selector: &LabelSelector,
    key: impl Fn(&str) -> String,
) -> Result<Selector, String> {
    Selector::compile(selector, key).map_err(|e| format!("{what}: {e}"))
}

/// Canonical CIDRs (host bits cleared, sorted, deduplicated).
fn cidrs(what: &str, values: &[String]) -> Result<Vec<String>, String> {
    let mut out = BTreeSet::new();
    for v in values {
        let net: ipnet::IpNet = v
            .parse()
            .map_err(|_| format!("{what}: {v:?} is not a CIDR such as 192.0.2.0/24"))?;
        out.insert(net.trunc());
    }
    Ok(out.into_iter().map(|n| n.to_string()).collect())
}

fn compile(spec: &EgressGatewayPolicySpec) -> Result<Compiled, String> {
    let mut sources = Vec::new();
    for (i, s) in spec.selectors.iter().enumerate() {
        if s.pod_selector.is_none() && s.namespace_selector.is_none() {
            return Err(format!(
                "selectors[{i}]: needs podSelector or namespaceSelector"
            ));
        }
        let pods = s
            .pod_selector
            .as_ref()
            .map(|p| {
                compile_selector(&format!("selectors[{i}].podSelector"), p, |k| {
                    format!("k8s:{k}")
                })
            })
            .transpose()?;
        let namespaces = s
            .namespace_selector
            .as_ref()
            .map(|n| {
                compile_selector(&format!("selectors[{i}].namespaceSelector"), n, |k| {
                    format!("{NAMESPACE_LABELS_PREFIX}{k}")
                })
            })
            .transpose()?;
        sources.push(SourceSelector { pods, namespaces });
    }
    let nodes = compile_selector(
        "egressGateway.nodeSelector",
        &spec.egress_gateway.node_selector,
        str::to_string,
    )?;
    if let Some(ip) = &spec.egress_gateway.egress_ip {
        ip.parse::<IpAddr>()
            .map_err(|_| format!("egressGateway.egressIP: {ip:?} is not an IP address"))?;
    }
    Ok(Compiled {
        sources,
        nodes,
        destinations: cidrs("destinationCIDRs", &spec.destination_cidrs)?,
        excluded: cidrs("excludedCIDRs", &spec.excluded_cidrs)?,
    })
}

/// 64-bit FNV-1a, then a SplitMix64 finalizer: stable across builds and processes (unlike
/// std's `DefaultHasher`), so every operator replica chooses alike.
fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The rendezvous (highest random weight) choice among `candidates` for `policy`.
pub fn rendezvous<'a>(
    policy: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .max_by_key(|node| (stable_hash(&[policy, node]), std::cmp::Reverse(*node)))
}

/// Why `node` cannot be `compiled`'s gateway, if it cannot.
fn ineligible(node: Option<&NodeInput>, compiled: &Compiled) -> Option<ChangeReason> {
    let Some(node) = node else {
        return Some(ChangeReason::NodeDeleted);
    };
    if !compiled.nodes.matches(&node.labels) {
        Some(ChangeReason::NodeNotSelected)
    } else if !node.ready {
        Some(ChangeReason::NodeNotReady)
    } else if node.address.is_none() {
        Some(ChangeReason::NodeWithoutAddress)
    } else {
        None
    }
}

/// The plan for every policy.
pub fn plan(policies: &[PolicyInput], nodes: &[NodeInput], endpoints: &[EndpointInput]) -> Plan {
    let by_name: BTreeMap<&str, &NodeInput> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut out = Plan::default();
    for policy in policies {
        let compiled = match compile(&policy.spec) {
            Ok(c) => c,
            Err(message) => {
                out.policies.insert(
                    policy.name.clone(),
                    PolicyOutcome {
                        generation: policy.generation,
                        valid: DesiredCondition::new(VALID, false, REASON_INVALID, message),
                        ready: None,
                        gateway: policy.current_gateway.clone(),
                        change: None,
                        source_ips: 0,
                    },
                );
                continue;
            }
        };
        let current = policy.current_gateway.as_deref();
        let why_not_current = current.map(|c| ineligible(by_name.get(c).copied(), &compiled));
        let gateway: Option<&NodeInput> = match why_not_current {
            Some(None) => current.and_then(|c| by_name.get(c).copied()),
            _ => {
                let eligible = nodes
                    .iter()
                    .filter(|n| ineligible(Some(n), &compiled).is_none())
                    .map(|n| n.name.as_str());
                rendezvous(&policy.name, eligible).and_then(|n| by_name.get(n).copied())
            }
        };
        let gateway_name = gateway.map(|g| g.name.clone());
        let change = (gateway_name.as_deref() != current).then(|| GatewayChange {
            from: current.map(str::to_string),
            to: gateway_name.clone(),
            reason: match why_not_current {
                Some(Some(reason)) if gateway.is_some() => reason,
                Some(Some(_)) => ChangeReason::NoneEligible,
                _ => ChangeReason::Assigned,
            },
        });
        let ready = match (&gateway_name, &change) {
            (None, _) => DesiredCondition::new(
                READY,
                false,
                REASON_NO_GATEWAY,
                "no Ready node with an InternalIP matches egressGateway.nodeSelector; matching traffic is dropped",
            ),
            (Some(_), Some(c)) if c.reason.is_failover() => {
                DesiredCondition::new(READY, true, REASON_FAILED_OVER, c.message())
            }
            (Some(g), _) => match &policy.previous_ready {
                // Unchanged since a failover: keep saying so.
                Some(prev)
                    if change.is_none() && prev.reason == REASON_FAILED_OVER && prev.status =>
                {
                    prev.clone()
                }
                _ => DesiredCondition::new(
                    READY,
                    true,
                    REASON_GATEWAY_SELECTED,
                    format!("gateway node {g}"),
                ),
            },
        };
        let mut source_ips = BTreeSet::new();
        for ep in endpoints {
            if compiled.sources.iter().any(|s| s.matches(&ep.labels)) {
                source_ips.extend(ep.ips.iter().copied());
            }
        }
        out.routes.insert(
            policy.name.clone(),
            EgressRouteSpec {
                revision: 0,
                source_ips: source_ips.iter().map(|ip| ip.to_string()).collect(),
                destination_cidrs: compiled.destinations,
                excluded_cidrs: compiled.excluded,
                gateway_node: gateway_name.clone(),
                gateway_ip: gateway.and_then(|g| g.address).map(|a| a.to_string()),
                egress_ip: policy.spec.egress_gateway.egress_ip.clone(),
                interface: policy.spec.egress_gateway.interface.clone(),
            },
        );
        out.policies.insert(
            policy.name.clone(),
            PolicyOutcome {
                generation: policy.generation,
                valid: DesiredCondition::new(VALID, true, "Valid", "the policy is valid"),
                ready: Some(ready),
                gateway: gateway_name,
                change,
                source_ips: source_ips.len(),
            },
        );
    }
    out
}
