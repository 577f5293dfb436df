//! Kubernetes objects in, allocator inputs and desired statuses out: pure values. The
//! reconciler reads the caches, calls these and [`Allocator::plan`](super::allocator),
//! and writes; nothing here talks to the API.

use super::allocator::{
    Labels, NAME_LABEL, NAMESPACE_LABEL, Outcome, Pool, PoolOutcome, PoolSelector, Range,
    ServiceKey, ServiceOutcome, ServiceRequest, Sharing,
};
use crate::ipam::pool::Family;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::core::Selector;
use std::collections::BTreeSet;
use std::net::IpAddr;
use tendril_crds::common::conditions::{READY, VALID};
use tendril_crds::facts::lbipam::{
    IPS_ANNOTATION, LOAD_BALANCER_CLASS, REQUEST_SATISFIED, SHARING_CROSS_NAMESPACE_ANNOTATION,
    SHARING_KEY_ANNOTATION,
};
use tendril_crds::v1alpha1::LoadBalancerIPPool;
use tendril_runtime::DesiredCondition;

/// Pool condition types besides `Valid` and `Ready`.
pub const CONFLICTING: &str = "Conflicting";
pub const EXHAUSTED: &str = "Exhausted";

/// Reason of the Service condition when the request itself is malformed.
pub const REASON_INVALID_REQUEST: &str = "InvalidRequest";
pub const REASON_SATISFIED: &str = "Satisfied";

fn created(meta: &kube::api::ObjectMeta) -> Option<i64> {
    meta.creation_timestamp.as_ref().map(|t| t.0.as_second())
}

/// The allocator's view of a pool: its usable blocks, and what is wrong with the others.
pub fn pool_of(p: &LoadBalancerIPPool) -> Pool {
    let mut ranges: Vec<Range> = Vec::new();
    let mut problems = Vec::new();
    for (i, block) in p.spec.blocks.iter().enumerate() {
        let range = match (&block.cidr, &block.start, &block.stop) {
            (Some(cidr), None, None) => match cidr.parse::<IpNet>() {
                Ok(net) if net.trunc() == net => {
                    Ok(Range::of_cidr(net, p.spec.allow_first_last_ips))
                }
                Ok(net) => Err(format!(
                    "block {i}: cidr {cidr} has host bits set; write {}",
                    net.trunc()
                )),
                Err(_) => Err(format!("block {i}: {cidr:?} is not a CIDR")),
            },
            (None, Some(start), Some(stop)) => {
                match (start.parse::<IpAddr>(), stop.parse::<IpAddr>()) {
                    (Ok(a), Ok(b)) => Range::new(a, b).ok_or_else(|| {
                        if a.is_ipv4() != b.is_ipv4() {
                            format!("block {i}: start {a} and stop {b} are of different IP families")
                        } else {
                            format!("block {i}: start {a} is after stop {b}; write the lower address as start")
                        }
                    }),
                    _ => Err(format!(
                        "block {i}: start {start:?} and stop {stop:?} must be IP addresses"
                    )),
                }
            }
            _ => Err(format!(
                "block {i}: a block is either a cidr or a start/stop range"
            )),
        };
        match range {
            Ok(r) => match ranges.iter().find(|o| o.overlaps(&r)) {
                Some(o) => {
                    problems.push(format!("block {i} ({r}) overlaps block {o} of this pool"))
                }
                None => ranges.push(r),
            },
            Err(e) => problems.push(e),
        }
    }
    let selector = match &p.spec.service_selector {
        None => PoolSelector::All,
        Some(s) => match Selector::try_from(s.clone()) {
            Ok(s) => PoolSelector::Matching(s),
            Err(e) => {
                problems.push(format!("serviceSelector: {e}"));
                PoolSelector::Nothing
            }
        },
    };
    Pool {
        name: p.name_any(),
        created: created(&p.metadata),
        ranges,
        problems,
        selector,
        disabled: p.spec.disabled,
    }
}

/// Whether LB IPAM gives `svc` addresses: a LoadBalancer Service without a class or with
/// Tendril's, not being deleted.
pub fn wants_addresses(svc: &Service) -> bool {
    let Some(spec) = &svc.spec else { return false };
    spec.type_.as_deref() == Some("LoadBalancer")
        && spec
            .load_balancer_class
            .as_deref()
            .is_none_or(|c| c == LOAD_BALANCER_CLASS)
        && svc.metadata.deletion_timestamp.is_none()
}

/// Whether a change of `svc` can matter to LB IPAM: it is (or was, in a deletion's last
/// state) of type LoadBalancer, or its status still carries what the concern wrote.
pub fn is_relevant(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
        || has_our_condition(svc)
}

pub fn key_of(svc: &Service) -> ServiceKey {
    (svc.namespace().unwrap_or_default(), svc.name_any())
}

/// The allocator's view of a Service that [`wants_addresses`], and the entries of its
/// request that are not addresses (reported; if nothing valid was requested, it gets none
/// rather than an address it did not ask for).
pub fn request_of(svc: &Service) -> (ServiceRequest, Vec<String>) {
    let spec = svc.spec.clone().unwrap_or_default();
    let key = key_of(svc);
    let mut labels: Labels = svc.labels().clone();
    labels.insert(NAMESPACE_LABEL.into(), key.0.clone());
    labels.insert(NAME_LABEL.into(), key.1.clone());
    let mut families: Vec<Family> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        })
        .collect();
    if families.is_empty() {
        families.push(Family::V4);
    }
    let mut asked: Vec<&str> = Vec::new();
    if let Some(ip) = spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()) {
        asked.push(ip);
    }
    if let Some(list) = svc.annotations().get(IPS_ANNOTATION) {
        asked.extend(list.split(',').map(str::trim).filter(|s| !s.is_empty()));
    }
    let mut requested = Vec::new();
    let mut invalid = Vec::new();
    for a in asked {
        match a.parse::<IpAddr>() {
            Ok(ip) if !requested.contains(&ip) => requested.push(ip),
            Ok(_) => {}
            Err(_) => invalid.push(format!(
                "{a:?} (in spec.loadBalancerIP or {IPS_ANNOTATION}) is not an IP address"
            )),
        }
    }
    if !invalid.is_empty() && requested.is_empty() {
        families.clear();
    }
    let sharing = svc
        .annotations()
        .get(SHARING_KEY_ANNOTATION)
        .map(|k| k.trim())
        .filter(|k| !k.is_empty())
        .map(|k| Sharing {
            key: k.to_string(),
            local_selector: (spec.external_traffic_policy.as_deref() == Some("Local"))
                .then(|| spec.selector.clone().unwrap_or_default()),
            cross_namespace: svc
                .annotations()
                .get(SHARING_CROSS_NAMESPACE_ANNOTATION)
                .into_iter()
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(String::from)
                .collect(),
        });
    let ports: BTreeSet<(String, i32)> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| (p.protocol.clone().unwrap_or_else(|| "TCP".into()), p.port))
        .collect();
    let request = ServiceRequest {
        key,
        created: created(&svc.metadata),
        labels,
        families,
        require_all_families: spec.ip_family_policy.as_deref() != Some("PreferDualStack"),
        requested,
        sharing,
        ports,
    };
    (request, invalid)
}

/// The addresses a Service's status shows (`status.loadBalancer.ingress[].ip`), in order.
pub fn ingress_ips(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

/// Whether `svc`'s status carries the concern's condition (so the concern wrote it).
pub fn has_our_condition(svc: &Service) -> bool {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == REQUEST_SATISFIED))
}

/// `tendril.dev/IPAMRequestSatisfied` for a Service's outcome (and malformed requests).
pub fn service_condition(out: &ServiceOutcome, invalid: &[String]) -> DesiredCondition {
    if !invalid.is_empty() {
        return DesiredCondition::new(
            REQUEST_SATISFIED,
            false,
            REASON_INVALID_REQUEST,
            invalid.join("; "),
        );
    }
    match out.problems.first() {
        None if out.ips.is_empty() => DesiredCondition::new(
            REQUEST_SATISFIED,
            false,
            "NothingRequested",
            "the service asks for no address family this concern serves",
        ),
        None => DesiredCondition::new(
            REQUEST_SATISFIED,
            true,
            REASON_SATISFIED,
            format!(
                "assigned {}",
                out.ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Some(first) => DesiredCondition::new(
            REQUEST_SATISFIED,
            false,
            first.reason(),
            out.problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

/// A Service's status as the concern wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub ips: Vec<IpAddr>,
    pub condition: DesiredCondition,
}

impl DesiredService {
    /// Whether `svc`'s status already says this (the write can be skipped).
    pub fn is_current(&self, svc: &Service) -> bool {
        let status = if self.condition.status {
            "True"
        } else {
            "False"
        };
        ingress_ips(svc) == self.ips
            && svc
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == REQUEST_SATISFIED))
                .is_some_and(|c| {
                    c.status == status
                        && c.reason == self.condition.reason
                        && c.message == self.condition.message
                        && c.observed_generation == svc.metadata.generation
                })
    }
}

fn saturate(v: u128) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A pool's status as the concern wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredPool {
    pub conditions: [DesiredCondition; 4],
    pub used: i64,
    pub available: i64,
}

pub fn pool_status(o: &PoolOutcome) -> DesiredPool {
    let valid = if o.problems.is_empty() {
        DesiredCondition::new(VALID, true, "Accepted", "every block is usable")
    } else {
        DesiredCondition::new(
            VALID,
            false,
            "InvalidBlocks",
            format!(
                "{}; the pool hands out no new addresses until fixed",
                o.problems.join("; ")
            ),
        )
    };
    let conflicting = match &o.conflict {
        Some(c) => DesiredCondition::new(
            CONFLICTING,
            true,
            "Overlap",
            format!("{c}; this pool hands out no new addresses"),
        ),
        None => DesiredCondition::new(
            CONFLICTING,
            false,
            "NoOverlap",
            "no block overlaps an older pool",
        ),
    };
    let exhausted = if o.waiting > 0 {
        DesiredCondition::new(
            EXHAUSTED,
            true,
            "ServicesWaiting",
            format!(
                "{} service(s) wait for an address; add blocks or free addresses",
                o.waiting
            ),
        )
    } else {
        DesiredCondition::new(
            EXHAUSTED,
            false,
            "SpaceLeft",
            "no service waits for an address",
        )
    };
    let ready = if !o.problems.is_empty() {
        DesiredCondition::new(READY, false, "Invalid", valid.message.clone())
    } else if o.conflict.is_some() {
        DesiredCondition::new(READY, false, "Conflicting", conflicting.message.clone())
    } else if o.disabled {
        DesiredCondition::new(
            READY,
            false,
            "Disabled",
            "the pool is disabled: it hands out no new addresses; those given stay",
        )
    } else if o.waiting > 0 {
        DesiredCondition::new(READY, false, "Exhausted", exhausted.message.clone())
    } else {
        DesiredCondition::new(READY, true, "Allocating", "the pool hands out addresses")
    };
    DesiredPool {
        conditions: [valid, ready, conflicting, exhausted],
        used: saturate(o.used),
        available: saturate(o.available()),
    }
}

/// Every Service of the outcome with its desired status, and the conditions of its
/// malformed requests.
pub fn desired_services<'a>(
    out: &'a Outcome,
    invalid: &'a std::collections::BTreeMap<ServiceKey, Vec<String>>,
) -> impl Iterator<Item = (&'a ServiceKey, DesiredService)> + 'a {
    out.services.iter().map(move |(k, o)| {
        let bad = invalid.get(k).map(Vec::as_slice).unwrap_or_default();
        (
            k,
            DesiredService {
                ips: o.ips.clone(),
                condition: service_condition(o, bad),
            },
        )
    })
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
