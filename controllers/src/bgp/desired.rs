//! `BGPPeeringPolicy`s, nodes and Services in, one `BGPNodeConfigSpec` per node and one
//! outcome per policy out, as pure values: nothing here talks to the API, logs or sets a
//! metric. The rules, each tested in `desired_tests.rs`:
//!
//! - A policy selects nodes by `nodeSelector` (absent: every node). The policies selecting a
//!   node merge their virtual routers by `localASN`: neighbors and advertisements are
//!   unioned. A node selected by no policy has no config.
//! - A peer address is one session per node: the same address defined differently (other
//!   ASN, timers, password, …) in two routers or by two policies is a conflict. A node with
//!   a conflict — or selected by a policy with an error, or without a router id — is *held*:
//!   its `BGPNodeConfig` is neither written nor deleted (it keeps running what it had, never
//!   a half-merged config), and every policy involved gets `Valid=False`. So is a node whose
//!   merged config would exceed what the `BGPNodeConfig` schema admits (16 routers, 64
//!   neighbors or 4096 prefixes per router).
//! - Router id: the Node's `bgp.tendril.dev/router-id` annotation, else its first IPv4
//!   InternalIP.
//! - Prefixes: the node's pod CIDRs (`NodeNetwork.spec.podCIDRs`); LoadBalancer ingress IPs
//!   (Services of type LoadBalancer), external IPs and cluster IPs of the selected Services,
//!   each as /32 or /128. With `externalTrafficPolicy: Local`, LoadBalancer and external IPs
//!   are advertised only by nodes with a ready local backend; with
//!   `internalTrafficPolicy: Local`, cluster IPs likewise.
//! - A prefix several advertisements produce is advertised once, with the union of their
//!   communities (sorted numerically, written canonically) and of the Services that have it.

use crate::policy::selector::Selector;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use tendril_crds::v1alpha1::{
    AdvertisementSource, AdvertisementType, BGP_ROUTER_ID_ANNOTATION, BGPAdvertisement,
    BGPNeighbor, BGPNodeConfigSpec, BGPPeeringPolicySpec, Communities, NodeNetwork, NodeRouter,
    ServiceAddress,
};
use tendril_runtime::DesiredCondition;
use tendril_runtime::conditions::VALID;

/// Condition reasons of a policy's `Valid`.
pub const REASON_SELECTED: &str = "Selected";
pub const REASON_CONFLICT: &str = "Conflict";
pub const REASON_INVALID: &str = "InvalidSpec";
pub const REASON_NO_ROUTER_ID: &str = "NoRouterID";
pub const REASON_TOO_LARGE: &str = "TooLarge";

/// The limits of the `BGPNodeConfig` schema.
pub const MAX_ROUTERS: usize = 16;
pub const MAX_NEIGHBORS: usize = 64;
pub const MAX_ADVERTISEMENTS: usize = 4096;

/// At most this many problems are named in a condition message (the rest are counted).
const MESSAGE_PROBLEMS: usize = 3;

/// A node as the BGP concern sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeInput {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `Err`: why the node has none (no annotation, no IPv4 InternalIP, a bad annotation).
    pub router_id: Result<Ipv4Addr, String>,
    pub pod_cidrs: Vec<IpNet>,
}

/// A Service as the BGP concern sees it.
#[derive(Clone, Debug, Default, PartialEq, Hash)]
pub struct ServiceInput {
    /// `namespace/name`.
    pub key: String,
    pub labels: BTreeMap<String, String>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub cluster_ips: Vec<IpAddr>,
    pub external_local: bool,
    pub internal_local: bool,
    /// Nodes with a ready backend of this Service.
    pub ready_nodes: BTreeSet<String>,
}

/// A policy: its name, `metadata.generation` and spec.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyInput {
    pub name: String,
    pub generation: Option<i64>,
    pub spec: BGPPeeringPolicySpec,
}

/// What becomes of one policy: its status.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyOutcome {
    pub generation: Option<i64>,
    pub selected_nodes: i64,
    pub valid: DesiredCondition,
}

/// The desired state of every node and policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    /// The config of every node some policy selects and that is not held (revision 0:
    /// numbered when written).
    pub configs: BTreeMap<String, BGPNodeConfigSpec>,
    /// Nodes whose config is left as it is (a conflict or an error among their policies).
    pub held: BTreeSet<String>,
    pub policies: BTreeMap<String, PolicyOutcome>,
}

/// The node's router id: the annotation, else the first IPv4 InternalIP.
pub fn router_id(node: &Node) -> Result<Ipv4Addr, String> {
    if let Some(value) = node.annotations().get(BGP_ROUTER_ID_ANNOTATION) {
        return value.trim().parse::<Ipv4Addr>().map_err(|_| {
            format!("its annotation {BGP_ROUTER_ID_ANNOTATION}={value:?} is not an IPv4 address")
        });
    }
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
        .ok_or_else(|| {
            format!("it has no IPv4 InternalIP and no {BGP_ROUTER_ID_ANNOTATION} annotation")
        })
}

/// A Node and its `NodeNetwork` as the concern sees them.
pub fn node_input(node: &Node, network: Option<&NodeNetwork>) -> NodeInput {
    NodeInput {
        name: node.name_any(),
        labels: node.labels().clone(),
        router_id: router_id(node),
        pod_cidrs: network
            .map(|nn| {
                nn.spec
                    .pod_cidrs
                    .iter()
                    .filter_map(|c| c.parse::<IpNet>().ok())
                    .map(|c| c.trunc())
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn parse_ips<'a>(values: impl IntoIterator<Item = &'a String>) -> Vec<IpAddr> {
    let set: BTreeSet<IpAddr> = values
        .into_iter()
        .filter_map(|v| v.parse::<IpAddr>().ok())
        .collect();
    set.into_iter().collect()
}

/// A Service as the concern sees it (`ready_nodes` empty: the index fills it); `None` for
/// an ExternalName Service, which has no address of its own.
pub fn service_input(svc: &Service) -> Option<ServiceInput> {
    let spec = svc.spec.as_ref()?;
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        return None;
    }
    let cluster_ips: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    let load_balancer_ips = if type_ == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        parse_ips(ingress.into_iter().flatten().filter_map(|i| i.ip.as_ref()))
    } else {
        Vec::new()
    };
    Some(ServiceInput {
        key: format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()),
        labels: svc.labels().clone(),
        load_balancer_ips,
        external_ips: parse_ips(spec.external_ips.iter().flatten()),
        // "None" (headless) does not parse.
        cluster_ips: parse_ips(cluster_ips),
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        ready_nodes: BTreeSet::new(),
    })
}

/// A standard community, parsed: `ASN:value`, both 0–65535.
pub fn parse_standard(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A large community, parsed: `ASN:value:value`, each 0–4294967295.
pub fn parse_large(s: &str) -> Option<(u32, u32, u32)> {
    let mut parts = s.split(':');
    let out = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    parts.next().is_none().then_some(out)
}

/// Standard communities (ASN, value), in numeric order.
type Standard = BTreeSet<(u16, u16)>;
/// Large communities (ASN, value, value), in numeric order.
type Large = BTreeSet<(u32, u32, u32)>;

/// One advertisement of a policy, compiled.
#[derive(Clone, Debug)]
struct Compiled {
    kind: AdvertisementType,
    addresses: BTreeSet<ServiceAddress>,
    selector: Option<Selector>,
    /// The indexes of the Services the selector selects (matched once, not per node).
    selected: Arc<[usize]>,
    standard: BTreeSet<(u16, u16)>,
    large: BTreeSet<(u32, u32, u32)>,
}

/// One virtual router of a policy, compiled.
#[derive(Clone, Debug)]
struct CompiledRouter {
    local_asn: i64,
    neighbors: Vec<(IpAddr, BGPNeighbor)>,
    advertisements: Vec<Compiled>,
}

#[derive(Clone, Debug)]
struct CompiledPolicy {
    name: String,
    node_selector: Selector,
    routers: Vec<CompiledRouter>,
}

fn compile_selector(what: &str, selector: &LabelSelector) -> Result<Selector, String> {
    Selector::compile(selector, str::to_string).map_err(|e| format!("{what}: {e}"))
}

fn compile_communities(
    where_: &str,
    communities: Option<&Communities>,
) -> Result<(Standard, Large), String> {
    let Some(c) = communities else {
        return Ok(Default::default());
    };
    let standard = c
        .standard
        .iter()
        .map(|s| {
            parse_standard(s).ok_or_else(|| {
                format!("{where_}: standard community {s:?} is not ASN:value with both 0-65535")
            })
        })
        .collect::<Result<_, _>>()?;
    let large = c
        .large
        .iter()
        .map(|s| {
            parse_large(s).ok_or_else(|| {
                format!(
                    "{where_}: large community {s:?} is not ASN:value:value with each 0-4294967295"
                )
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((standard, large))
}

fn compile_advertisement(where_: &str, ad: &BGPAdvertisement) -> Result<Compiled, String> {
    let (standard, large) = compile_communities(where_, ad.communities.as_ref())?;
    let selector = match (ad.advertisement_type, &ad.selector) {
        (AdvertisementType::Service, Some(s)) => Some(compile_selector(where_, s)?),
        (AdvertisementType::Service, None) => {
            return Err(format!(
                "{where_}: a Service advertisement needs a selector"
            ));
        }
        (AdvertisementType::PodCIDR, _) => None,
    };
    Ok(Compiled {
        kind: ad.advertisement_type,
        addresses: ad.addresses.iter().copied().collect(),
        selector,
        selected: Arc::new([]),
        standard,
        large,
    })
}

/// The peer address as an IP (`192.0.2.1` or `192.0.2.1/32`).
fn peer_ip(address: &str) -> Option<IpAddr> {
    address.parse::<IpAddr>().ok().or_else(|| {
        let net = address.parse::<IpNet>().ok()?;
        (net.prefix_len() == net.max_prefix_len()).then_some(net.addr())
    })
}

fn compile_policy(p: &PolicyInput) -> Result<CompiledPolicy, String> {
    let node_selector = match &p.spec.node_selector {
        Some(s) => compile_selector("nodeSelector", s)?,
        None => Selector::default(),
    };
    let mut routers = Vec::new();
    for vr in &p.spec.virtual_routers {
        let asn = vr.local_asn;
        if !(1..=i64::from(u32::MAX)).contains(&asn) {
            return Err(format!("localASN {asn} is not in 1-4294967295"));
        }
        let mut neighbors = Vec::new();
        for n in &vr.neighbors {
            let ip = peer_ip(&n.peer_address).ok_or_else(|| {
                format!(
                    "router {asn}: peerAddress {:?} is not an IP address",
                    n.peer_address
                )
            })?;
            let mut n = n.clone();
            n.peer_address = ip.to_string();
            neighbors.push((ip, n));
        }
        let mut advertisements = Vec::new();
        if vr.export_pod_cidr {
            advertisements.push(Compiled {
                kind: AdvertisementType::PodCIDR,
                addresses: BTreeSet::new(),
                selector: None,
                selected: Arc::new([]),
                standard: BTreeSet::new(),
                large: BTreeSet::new(),
            });
        }
        if let Some(s) = &vr.service_selector {
            advertisements.push(Compiled {
                kind: AdvertisementType::Service,
                addresses: [ServiceAddress::LoadBalancerIP, ServiceAddress::ExternalIP].into(),
                selector: Some(compile_selector(
                    &format!("router {asn}: serviceSelector"),
                    s,
                )?),
                selected: Arc::new([]),
                standard: BTreeSet::new(),
                large: BTreeSet::new(),
            });
        }
        for (i, ad) in vr.advertisements.iter().enumerate() {
            advertisements.push(compile_advertisement(
                &format!("router {asn}: advertisements[{i}]"),
                ad,
            )?);
        }
        routers.push(CompiledRouter {
            local_asn: asn,
            neighbors,
            advertisements,
        });
    }
    Ok(CompiledPolicy {
        name: p.name.clone(),
        node_selector,
        routers,
    })
}

/// Matches every Service advertisement of `policy` against `services`, once.
fn select_services(policy: &mut CompiledPolicy, services: &[ServiceInput]) {
    for ad in policy
        .routers
        .iter_mut()
        .flat_map(|r| &mut r.advertisements)
    {
        if let Some(selector) = &ad.selector {
            ad.selected = services
                .iter()
                .enumerate()
                .filter(|(_, s)| selector.matches(&s.labels))
                .map(|(i, _)| i)
                .collect();
        }
    }
}

/// A prefix being assembled.
#[derive(Default)]
struct PrefixBuild {
    source: Option<AdvertisementSource>,
    services: BTreeSet<String>,
    standard: BTreeSet<(u16, u16)>,
    large: BTreeSet<(u32, u32, u32)>,
}

impl PrefixBuild {
    fn add(&mut self, source: AdvertisementSource, service: Option<&str>, ad: &Compiled) {
        self.source = Some(self.source.map_or(source, |s| s.min(source)));
        self.services.extend(service.map(str::to_string));
        self.standard.extend(ad.standard.iter().copied());
        self.large.extend(ad.large.iter().copied());
    }
}

/// A router of a node being assembled: each neighbor with the policy that defined it first.
#[derive(Default)]
struct RouterBuild {
    neighbors: BTreeMap<IpAddr, (BGPNeighbor, String)>,
    advertisements: Vec<Compiled>,
}

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// Whether `node` advertises the addresses `kind` of `svc`.
fn advertises_from(svc: &ServiceInput, kind: ServiceAddress, node: &str) -> bool {
    let local = match kind {
        ServiceAddress::LoadBalancerIP | ServiceAddress::ExternalIP => svc.external_local,
        ServiceAddress::ClusterIP => svc.internal_local,
    };
    !local || svc.ready_nodes.contains(node)
}

fn service_addresses(svc: &ServiceInput, kind: ServiceAddress) -> (&[IpAddr], AdvertisementSource) {
    match kind {
        ServiceAddress::LoadBalancerIP => {
            (&svc.load_balancer_ips, AdvertisementSource::LoadBalancerIP)
        }
        ServiceAddress::ExternalIP => (&svc.external_ips, AdvertisementSource::ExternalIP),
        ServiceAddress::ClusterIP => (&svc.cluster_ips, AdvertisementSource::ClusterIP),
    }
}

fn advertisements_of(
    node: &NodeInput,
    ads: &[Compiled],
    services: &[ServiceInput],
) -> Vec<tendril_crds::v1alpha1::Advertisement> {
    let mut prefixes: BTreeMap<IpNet, PrefixBuild> = BTreeMap::new();
    for ad in ads {
        match ad.kind {
            AdvertisementType::PodCIDR => {
                for cidr in &node.pod_cidrs {
                    prefixes
                        .entry(*cidr)
                        .or_default()
                        .add(AdvertisementSource::PodCIDR, None, ad);
                }
            }
            AdvertisementType::Service => {
                for svc in ad.selected.iter().map(|i| &services[*i]) {
                    for kind in &ad.addresses {
                        if !advertises_from(svc, *kind, &node.name) {
                            continue;
                        }
                        let (ips, source) = service_addresses(svc, *kind);
                        for ip in ips {
                            prefixes.entry(host_prefix(*ip)).or_default().add(
                                source,
                                Some(&svc.key),
                                ad,
                            );
                        }
                    }
                }
            }
        }
    }
    prefixes
        .into_iter()
        .map(|(prefix, b)| tendril_crds::v1alpha1::Advertisement {
            prefix: prefix.to_string(),
            source: b.source.unwrap_or_default(),
            services: b.services.into_iter().collect(),
            communities: b.standard.iter().map(|(a, v)| format!("{a}:{v}")).collect(),
            large_communities: b
                .large
                .iter()
                .map(|(a, x, y)| format!("{a}:{x}:{y}"))
                .collect(),
        })
        .collect()
}

/// What went wrong on one node, for the policies involved.
struct NodeProblem {
    policies: BTreeSet<String>,
    reason: &'static str,
    message: String,
}

/// Merges the routers of the policies selecting `node`; `Err` when they conflict.
fn merge_routers(
    node: &str,
    policies: &[&CompiledPolicy],
) -> Result<BTreeMap<i64, RouterBuild>, NodeProblem> {
    let mut routers: BTreeMap<i64, RouterBuild> = BTreeMap::new();
    // Every peer address of the node: the router (ASN) and policy that defined it.
    let mut peers: BTreeMap<IpAddr, (i64, String)> = BTreeMap::new();
    for p in policies {
        for r in &p.routers {
            for (ip, n) in &r.neighbors {
                if let Some((asn, other)) = peers.get(ip) {
                    let same = *asn == r.local_asn
                        && routers
                            .get(asn)
                            .and_then(|b| b.neighbors.get(ip))
                            .is_some_and(|(defined, _)| defined == n);
                    if !same {
                        let by = if *other == p.name {
                            format!("policy {} defines it twice", p.name)
                        } else {
                            format!("policies {other} and {} define it differently", p.name)
                        };
                        return Err(NodeProblem {
                            policies: [other.clone(), p.name.clone()].into(),
                            reason: REASON_CONFLICT,
                            message: format!("node {node}: peer {ip}: {by}"),
                        });
                    }
                    continue;
                }
                peers.insert(*ip, (r.local_asn, p.name.clone()));
                routers
                    .entry(r.local_asn)
                    .or_default()
                    .neighbors
                    .insert(*ip, (n.clone(), p.name.clone()));
            }
            routers
                .entry(r.local_asn)
                .or_default()
                .advertisements
                .extend(r.advertisements.iter().cloned());
        }
    }
    Ok(routers)
}

/// The desired state: every policy against every node and Service.
pub fn desired(
    policies: &[PolicyInput],
    nodes: &[NodeInput],
    services: &[ServiceInput],
) -> Desired {
    let mut out = Desired::default();
    let mut compiled: Vec<CompiledPolicy> = Vec::new();
    // Problems per policy: (reason, message), in the order found.
    let mut problems: BTreeMap<String, Vec<(&'static str, String)>> = BTreeMap::new();
    let mut selected: BTreeMap<String, i64> = BTreeMap::new();
    let mut sorted: Vec<&PolicyInput> = policies.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for p in &sorted {
        match compile_policy(p) {
            Ok(mut c) => {
                select_services(&mut c, services);
                compiled.push(c);
            }
            Err(e) => {
                problems
                    .entry(p.name.clone())
                    .or_default()
                    .push((REASON_INVALID, e));
                // Its nodes keep what they have, when it is known which they are.
                let node_selector = match &p.spec.node_selector {
                    Some(s) => compile_selector("nodeSelector", s).ok(),
                    None => Some(Selector::default()),
                };
                if let Some(s) = node_selector {
                    let mut n = 0;
                    for node in nodes.iter().filter(|node| s.matches(&node.labels)) {
                        out.held.insert(node.name.clone());
                        n += 1;
                    }
                    selected.insert(p.name.clone(), n);
                }
            }
        }
    }

    let mut sorted_nodes: Vec<&NodeInput> = nodes.iter().collect();
    sorted_nodes.sort_by(|a, b| a.name.cmp(&b.name));
    for node in sorted_nodes {
        let mine: Vec<&CompiledPolicy> = compiled
            .iter()
            .filter(|p| p.node_selector.matches(&node.labels))
            .collect();
        for p in &mine {
            *selected.entry(p.name.clone()).or_default() += 1;
        }
        if mine.is_empty() || out.held.contains(&node.name) {
            continue;
        }
        let router_id = match &node.router_id {
            Ok(id) => *id,
            Err(why) => {
                for p in &mine {
                    problems.entry(p.name.clone()).or_default().push((
                        REASON_NO_ROUTER_ID,
                        format!("node {} has no router id: {why}", node.name),
                    ));
                }
                out.held.insert(node.name.clone());
                continue;
            }
        };
        let routers = match merge_routers(&node.name, &mine) {
            Ok(r) => r,
            Err(problem) => {
                for p in &problem.policies {
                    problems
                        .entry(p.clone())
                        .or_default()
                        .push((problem.reason, problem.message.clone()));
                }
                out.held.insert(node.name.clone());
                continue;
            }
        };
        let routers: Vec<NodeRouter> = routers
            .into_iter()
            .map(|(asn, b)| NodeRouter {
                local_asn: asn,
                router_id: router_id.to_string(),
                neighbors: b.neighbors.into_values().map(|(n, _)| n).collect(),
                advertisements: advertisements_of(node, &b.advertisements, services),
            })
            .collect();
        // What the BGPNodeConfig schema admits: a config the apiserver refuses would be
        // retried forever; the node keeps its last one and the policies say why.
        let too_big = if routers.len() > MAX_ROUTERS {
            Some(format!(
                "node {}: {} routers (local ASNs), at most {MAX_ROUTERS}",
                node.name,
                routers.len()
            ))
        } else {
            routers.iter().find_map(|r| {
                if r.neighbors.len() > MAX_NEIGHBORS {
                    Some(format!(
                        "node {}: router {} has {} neighbors, at most {MAX_NEIGHBORS}",
                        node.name,
                        r.local_asn,
                        r.neighbors.len()
                    ))
                } else if r.advertisements.len() > MAX_ADVERTISEMENTS {
                    Some(format!(
                        "node {}: router {} would advertise {} prefixes, at most {MAX_ADVERTISEMENTS}",
                        node.name,
                        r.local_asn,
                        r.advertisements.len()
                    ))
                } else {
                    None
                }
            })
        };
        if let Some(message) = too_big {
            for p in &mine {
                problems
                    .entry(p.name.clone())
                    .or_default()
                    .push((REASON_TOO_LARGE, message.clone()));
            }
            out.held.insert(node.name.clone());
            continue;
        }
        out.configs.insert(
            node.name.clone(),
            BGPNodeConfigSpec {
                node_name: node.name.clone(),
                revision: 0,
                routers,
            },
        );
    }

    for p in sorted {
        let n = selected.get(&p.name).copied().unwrap_or(0);
        let valid = match problems.get(&p.name) {
            None => {
                DesiredCondition::new(VALID, true, REASON_SELECTED, format!("selects {n} node(s)"))
            }
            Some(list) => {
                let mut message: Vec<String> = list
                    .iter()
                    .take(MESSAGE_PROBLEMS)
                    .map(|(_, m)| m.clone())
                    .collect();
                if list.len() > MESSAGE_PROBLEMS {
                    message.push(format!("and {} more", list.len() - MESSAGE_PROBLEMS));
                }
                let held = if list[0].0 == REASON_INVALID {
                    "the nodes it selects keep their previous configuration"
                } else {
                    "those nodes keep their previous configuration"
                };
                DesiredCondition::new(
                    VALID,
                    false,
                    list[0].0,
                    format!("{}; {held}", message.join("; ")),
                )
            }
        };
        out.policies.insert(
            p.name.clone(),
            PolicyOutcome {
                generation: p.generation,
                selected_nodes: n,
                valid,
            },
        );
    }
    out
}

/// Advertisements per source over `configs` (for the metrics).
pub fn count_by_source(
    configs: &BTreeMap<String, BGPNodeConfigSpec>,
) -> BTreeMap<AdvertisementSource, i64> {
    let mut counts: BTreeMap<AdvertisementSource, i64> =
        AdvertisementSource::ALL.iter().map(|s| (*s, 0)).collect();
    for spec in configs.values() {
        for r in &spec.routers {
            for a in &r.advertisements {
                *counts.entry(a.source).or_default() += 1;
            }
        }
    }
    counts
}
