//! What the `lb_*` maps of one node should hold: a pure function of every `LBService`, the
//! node's name and addresses, the configured default algorithm and the ids the maps
//! hold now ([`lb_state`]).
//!
//! Per frontend (address, port, protocol):
//! - ClusterIP: one scope; `internalTrafficPolicy: Local` keeps only this node's backends.
//! - NodePort (no address: on every node address of the service's families — those of its
//!   ClusterIPs — plus the wildcard 0.0.0.0 / `::` entry the socket LB uses for loopback and
//!   other nodes' addresses), LoadBalancer IPs, externalIPs: the
//!   external scope (clients outside the node) and, when `externalTrafficPolicy: Local`
//!   makes it differ, an internal scope with every backend for in-cluster clients
//!   (`SVC_F_TWO_SCOPES`).
//! - Each scope takes its `active` backends; when it has none, its `terminating` ones
//!   (KEP-1669); weight 0 takes no new connections. An empty scope rejects.
//! - IPv4 frontends go to `lb_services`, IPv6 ones to `lb6_services`, each with only the
//!   backends of its own family (a dual-stack LBService lists both). Backend ids and rev-nat
//!   indexes are one numbering across the families (`lb_affinity` and `lb_maglev` are keyed
//!   by them alone). `loadBalancerSourceRanges` are written for IPv4 frontends only (the tc
//!   path that checks them is IPv4 only; the socket LB never checks them).
//! - SCTP frontends are skipped and counted (the datapath handles TCP and UDP); the operator
//!   marks SCTP services `Valid=False Unsupported`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use tendril_crds::v1alpha1::{Backend, Frontend, LBService};

use super::ids;
use crate::bpf::maps::{
    BE_F_LOCAL, LB_SCOPE_EXTERNAL, LB_SCOPE_INTERNAL, LB_SRC_RANGE_STATIC_PREFIX, Lb4Backend,
    Lb4Key, Lb4ReverseNat, Lb4SrcRangeKey, Lb6Backend, Lb6Key, Lb6ReverseNat, Lb6SrcRangeKey,
    LbMaglevKey, LbServiceValue, LbState, SVC_F_AFFINITY, SVC_F_DROP_EMPTY, SVC_F_EXTERNAL,
    SVC_F_LOCAL_ONLY, SVC_F_MAGLEV, SVC_F_NODEPORT, SVC_F_SOURCE_RANGES, SVC_F_TWO_SCOPES,
};
use crate::config::LbAlgorithm;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The Maglev table builder ([`super::maglev::lookup_table`]): backends as
/// (backend id, weight, hash key), table size M, seed → M backend ids.
pub type MaglevTable = fn(&[(u32, u32, &[u8])], u32, u32) -> Vec<u32>;

/// What the node's services depend on besides the LBServices.
#[derive(Clone, Debug)]
pub struct NodeServices<'a> {
    pub node_name: &'a str,
    /// The node's addresses, both families (NodePort frontends listen on each of the
    /// service's families).
    pub node_addresses: &'a [IpAddr],
    pub default_algorithm: LbAlgorithm,
    pub maglev_table_size: u32,
    pub hash_seed: u32,
    /// `None`: no table builder (unit tests); Maglev services then get no table
    /// and the programs select at random.
    pub maglev: Option<MaglevTable>,
    /// Backend ids and rev-nat indexes the maps hold now (kept for the same backends and
    /// frontends).
    pub held_backends: &'a BTreeMap<BackendAddr, u32>,
    pub held_frontends: &'a BTreeMap<FrontendAddr, u16>,
}

/// A backend as the datapath knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub address: IpAddr,
    pub port: u16,
    pub proto: u8,
}

/// A frontend as the datapath knows it (address 0.0.0.0 or `::`: a NodePort's wildcard).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddr {
    pub address: IpAddr,
    pub port: u16,
    pub proto: u8,
}

impl From<&Lb4Backend> for BackendAddr {
    fn from(b: &Lb4Backend) -> Self {
        Self {
            address: Ipv4Addr::from(b.address).into(),
            port: u16::from_be_bytes(b.port),
            proto: b.proto,
        }
    }
}

impl From<&Lb6Backend> for BackendAddr {
    fn from(b: &Lb6Backend) -> Self {
        Self {
            address: Ipv6Addr::from(b.address).into(),
            port: u16::from_be_bytes(b.port),
            proto: b.proto,
        }
    }
}

impl From<&Lb4ReverseNat> for FrontendAddr {
    fn from(r: &Lb4ReverseNat) -> Self {
        Self {
            address: Ipv4Addr::from(r.address).into(),
            port: u16::from_be_bytes(r.port),
            proto: r.proto,
        }
    }
}

impl From<&Lb6ReverseNat> for FrontendAddr {
    fn from(r: &Lb6ReverseNat) -> Self {
        Self {
            address: Ipv6Addr::from(r.address).into(),
            port: u16::from_be_bytes(r.port),
            proto: r.proto,
        }
    }
}

/// Something of an LBService the node cannot program, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// `namespace/name`.
    pub service: String,
    pub reason: SkipReason,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SkipReason {
    /// SCTP frontends (the operator reports them `Unsupported`).
    Sctp,
    /// A malformed address, port or protocol.
    Invalid,
    /// Another LBService already has this frontend.
    Conflict,
    /// No backend id or rev-nat index left.
    IdsExhausted,
}

impl SkipReason {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sctp => "sctp",
            Self::Invalid => "invalid",
            Self::Conflict => "conflict",
            Self::IdsExhausted => "ids_exhausted",
        }
    }
}

/// The node's services, ready for [`crate::bpf::maps::LbMaps::converge`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredServices {
    pub state: LbState,
    /// Frontends programmed (one per address, port, protocol; a NodePort counts once per
    /// node address and once for its wildcard).
    pub frontends: usize,
    /// LBServices with at least one frontend programmed.
    pub services: usize,
    /// The highest revision this state is known to realize with every revision below it:
    /// the highest `spec.committedRevision` of the LBServices (a spec without one counts as
    /// its `revision`). Writes in flight together commit out of order; a spec's own
    /// revision says nothing of the ones below it that are still on their way.
    pub revision: Option<i64>,
    pub skipped: Vec<Skipped>,
    /// Maglev services left to random selection (no table builder).
    pub maglev_without_table: usize,
}

fn proto_of(protocol: &str) -> Option<u8> {
    match protocol {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        _ => None,
    }
}

fn port_of(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p > 0)
}

/// One frontend address of a service, before ids are assigned.
struct PlannedFrontend<'a> {
    service: &'a LBService,
    frontend: FrontendAddr,
    flags: u8,
    /// Backends of the external (or only) scope and, for two scopes, of the internal one.
    external: Vec<(&'a Backend, BackendAddr)>,
    internal: Option<Vec<(&'a Backend, BackendAddr)>>,
    external_local_only: bool,
    /// The frontend has a serving backend on some node.
    serving_anywhere: bool,
}

fn service_name(svc: &LBService) -> String {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or_default(),
        svc.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The backends of a scope taking new connections: `active` ones with weight > 0 (only
/// this node's when `local_only`), else the `terminating` ones (KEP-1669).
fn scope_backends<'a>(
    candidates: &[(&'a Backend, BackendAddr)],
    node_name: &str,
    local_only: bool,
) -> Vec<(&'a Backend, BackendAddr)> {
    let in_scope: Vec<_> = candidates
        .iter()
        .filter(|(b, _)| b.weight > 0)
        .filter(|(b, _)| !local_only || b.node_name.as_deref() == Some(node_name))
        .copied()
        .collect();
    let active: Vec<_> = in_scope
        .iter()
        .filter(|(b, _)| b.state != "terminating")
        .copied()
        .collect();
    if active.is_empty() {
        in_scope
            .into_iter()
            .filter(|(b, _)| b.state == "terminating")
            .collect()
    } else {
        active
    }
}

/// Every programmable frontend address of `svc` with its scopes' backends.
fn plan_service<'a>(
    svc: &'a LBService,
    node: &NodeServices<'_>,
    skipped: &mut Vec<Skipped>,
) -> Vec<PlannedFrontend<'a>> {
    let name = service_name(svc);
    let mut skip = |reason, detail: String| {
        skipped.push(Skipped {
            service: name.clone(),
            reason,
            detail,
        })
    };
    let spec = &svc.spec;
    let affinity = spec
        .session_affinity
        .as_ref()
        .and_then(|a| a.client_ip.as_ref())
        .is_some();
    let etp_local = spec.external_traffic_policy == "Local";
    let itp_local = spec.internal_traffic_policy == "Local";
    // The service's families: those of its ClusterIPs (as a Service's ipFamilies are).
    let families: BTreeSet<bool> = spec
        .frontends
        .iter()
        .filter(|f| f.type_ == "ClusterIP")
        .filter_map(|f| f.address.as_deref()?.parse::<IpAddr>().ok())
        .map(|a| a.is_ipv6())
        .collect();
    // None (an LBService without ClusterIPs): its backends' families, else IPv4.
    let families = if !families.is_empty() {
        families
    } else {
        let of_backends: BTreeSet<bool> = spec
            .backends
            .iter()
            .filter_map(|b| b.address.parse::<IpAddr>().ok())
            .map(|a| a.is_ipv6())
            .collect();
        if of_backends.is_empty() {
            BTreeSet::from([false])
        } else {
            of_backends
        }
    };
    let mut out = Vec::new();
    for f in &spec.frontends {
        let Frontend {
            name: port_name,
            type_,
            address,
            port,
            protocol,
        } = f;
        if protocol == "SCTP" {
            skip(SkipReason::Sctp, format!("{type_} port {port}/SCTP"));
            continue;
        }
        let (Some(proto), Some(port)) = (proto_of(protocol), port_of(*port)) else {
            skip(
                SkipReason::Invalid,
                format!("{type_} port {port}/{protocol}"),
            );
            continue;
        };
        let addresses: Vec<IpAddr> = match (type_.as_str(), address) {
            (_, Some(a)) => match a.parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) => {
                    skip(SkipReason::Invalid, format!("{type_} address {a}"));
                    continue;
                }
            },
            ("NodePort", None) => node
                .node_addresses
                .iter()
                .copied()
                .chain([Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()])
                .filter(|a| families.contains(&a.is_ipv6()))
                .collect(),
            (_, None) => {
                skip(SkipReason::Invalid, format!("{type_} without an address"));
                continue;
            }
        };
        let mut candidates = Vec::new();
        for b in spec
            .backends
            .iter()
            .filter(|b| &b.port_name == port_name && &b.protocol == protocol)
        {
            let (Ok(address), Some(port)) = (b.address.parse::<IpAddr>(), port_of(b.port)) else {
                skip(
                    SkipReason::Invalid,
                    format!("backend {}:{}", b.address, b.port),
                );
                continue;
            };
            candidates.push((
                b,
                BackendAddr {
                    address,
                    port,
                    proto,
                },
            ));
        }
        let cluster_ip = type_ == "ClusterIP";
        let mut flags = 0;
        match type_.as_str() {
            "NodePort" => flags |= SVC_F_NODEPORT,
            "LoadBalancer" | "ExternalIP" => flags |= SVC_F_EXTERNAL,
            _ => {}
        }
        if affinity {
            flags |= SVC_F_AFFINITY;
        }
        if type_ == "LoadBalancer" && !spec.load_balancer_source_ranges.is_empty() {
            flags |= SVC_F_SOURCE_RANGES;
        }
        // Each family's frontends get that family's backends only.
        for v6 in [false, true] {
            let candidates: Vec<_> = candidates
                .iter()
                .filter(|(_, a)| a.address.is_ipv6() == v6)
                .copied()
                .collect();
            let (external_local_only, internal) = if cluster_ip {
                (itp_local, None)
            } else if etp_local {
                (
                    true,
                    Some(scope_backends(&candidates, node.node_name, false)),
                )
            } else {
                (false, None)
            };
            let external = scope_backends(&candidates, node.node_name, external_local_only);
            let serving_anywhere = !scope_backends(&candidates, node.node_name, false).is_empty();
            for address in addresses.iter().filter(|a| a.is_ipv6() == v6) {
                out.push(PlannedFrontend {
                    service: svc,
                    frontend: FrontendAddr {
                        address: *address,
                        port,
                        proto,
                    },
                    flags,
                    external: external.clone(),
                    internal: internal.clone(),
                    external_local_only,
                    serving_anywhere,
                });
            }
        }
    }
    out
}

/// The key of a frontend's `scope` and `slot` in its family's services map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServiceKey {
    V4(Lb4Key),
    V6(Lb6Key),
}

fn service_key(frontend: &FrontendAddr, scope: u8, slot: u16) -> ServiceKey {
    let (dport, proto) = (frontend.port.to_be_bytes(), frontend.proto);
    match frontend.address {
        IpAddr::V4(a) => ServiceKey::V4(Lb4Key {
            address: a.octets(),
            dport,
            backend_slot: slot,
            proto,
            scope,
            pad: [0; 2],
        }),
        IpAddr::V6(a) => ServiceKey::V6(Lb6Key {
            address: a.octets(),
            dport,
            backend_slot: slot,
            proto,
            scope,
            pad: [0; 2],
        }),
    }
}

fn insert_service(state: &mut LbState, key: ServiceKey, value: LbServiceValue) {
    match key {
        ServiceKey::V4(key) => {
            state.services.insert(key, value);
        }
        ServiceKey::V6(key) => {
            state.services6.insert(key, value);
        }
    }
}

fn insert_backend(state: &mut LbState, id: u32, backend: &BackendAddr, flags: u8) {
    let (port, proto) = (backend.port.to_be_bytes(), backend.proto);
    match backend.address {
        IpAddr::V4(a) => {
            state.backends.insert(
                id,
                Lb4Backend {
                    address: a.octets(),
                    port,
                    proto,
                    flags,
                },
            );
        }
        IpAddr::V6(a) => {
            state.backends6.insert(
                id,
                Lb6Backend {
                    address: a.octets(),
                    port,
                    proto,
                    flags,
                },
            );
        }
    }
}

fn insert_revnat(state: &mut LbState, index: u16, frontend: &FrontendAddr) {
    let (port, proto) = (frontend.port.to_be_bytes(), frontend.proto);
    match frontend.address {
        IpAddr::V4(a) => {
            state.revnat.insert(
                index,
                Lb4ReverseNat {
                    address: a.octets(),
                    port,
                    proto,
                    pad: 0,
                },
            );
        }
        IpAddr::V6(a) => {
            state.revnat6.insert(
                index,
                Lb6ReverseNat {
                    address: a.octets(),
                    port,
                    proto,
                    pad: 0,
                },
            );
        }
    }
}

/// What a backend's Maglev permutation is hashed from: its address and port bytes.
fn maglev_key(backend: &BackendAddr) -> Vec<u8> {
    let mut key = match backend.address {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    key.extend_from_slice(&backend.port.to_be_bytes());
    key
}

fn algorithm_of(svc: &LBService, default: LbAlgorithm) -> LbAlgorithm {
    match svc.spec.algorithm.as_deref() {
        Some("Maglev") => LbAlgorithm::Maglev,
        Some("Random") => LbAlgorithm::Random,
        _ => default,
    }
}

/// The desired content of the services maps (see the module doc).
pub fn lb_state<'a>(
    services: impl IntoIterator<Item = &'a LBService>,
    node: &NodeServices<'_>,
) -> DesiredServices {
    let mut services: Vec<&LBService> = services.into_iter().collect();
    // Deterministic: the oldest claim on a frontend is the one kept in a conflict.
    services.sort_by_key(|s| {
        (
            s.metadata.creation_timestamp.clone().map(|t| t.0),
            service_name(s),
        )
    });
    let mut out = DesiredServices::default();
    let mut planned: Vec<PlannedFrontend<'_>> = Vec::new();
    let mut claimed: BTreeSet<FrontendAddr> = BTreeSet::new();
    for svc in &services {
        let complete = svc.spec.committed_revision.unwrap_or(svc.spec.revision);
        out.revision = out.revision.max(Some(complete.min(svc.spec.revision)));
        for p in plan_service(svc, node, &mut out.skipped) {
            if claimed.insert(p.frontend) {
                planned.push(p);
            } else {
                out.skipped.push(Skipped {
                    service: service_name(svc),
                    reason: SkipReason::Conflict,
                    detail: format!(
                        "{}:{}/{} belongs to another LBService",
                        p.frontend.address, p.frontend.port, p.frontend.proto
                    ),
                });
            }
        }
    }

    // Ids: every backend any scope uses, every frontend.
    let wanted_backends: BTreeSet<BackendAddr> = planned
        .iter()
        .flat_map(|p| p.external.iter().chain(p.internal.iter().flatten()))
        .map(|(_, addr)| *addr)
        .collect();
    let held_backends: BTreeMap<BackendAddr, u32> = node.held_backends.clone();
    let (backend_ids, exhausted) = ids::assign(&wanted_backends, &held_backends, u32::MAX);
    for b in exhausted {
        out.skipped.push(Skipped {
            service: String::new(),
            reason: SkipReason::IdsExhausted,
            detail: format!("backend {}:{}", b.address, b.port),
        });
    }
    let wanted_frontends: BTreeSet<FrontendAddr> = planned.iter().map(|p| p.frontend).collect();
    let held_frontends: BTreeMap<FrontendAddr, u32> = node
        .held_frontends
        .iter()
        .map(|(k, v)| (*k, u32::from(*v)))
        .collect();
    let (revnat_ids, exhausted) =
        ids::assign(&wanted_frontends, &held_frontends, u32::from(u16::MAX));

    let mut programmed: BTreeSet<String> = BTreeSet::new();
    for p in &planned {
        let Some(rev_nat_index) = revnat_ids
            .get(&p.frontend)
            .and_then(|id| u16::try_from(*id).ok())
        else {
            continue;
        };
        let svc = p.service;
        let maglev = algorithm_of(svc, node.default_algorithm) == LbAlgorithm::Maglev;
        let affinity_timeout = svc
            .spec
            .session_affinity
            .as_ref()
            .and_then(|a| a.client_ip.as_ref())
            .map_or(0, |c| u32::try_from(c.timeout_seconds).unwrap_or(0));
        insert_revnat(&mut out.state, rev_nat_index, &p.frontend);
        let mut scopes = vec![(LB_SCOPE_EXTERNAL, &p.external, p.external_local_only)];
        if let Some(internal) = &p.internal {
            scopes.push((LB_SCOPE_INTERNAL, internal, false));
        }
        let two_scopes = scopes.len() == 2;
        for (scope, backends, local_only) in scopes {
            let mut ids: Vec<(u32, &Backend)> = backends
                .iter()
                .filter_map(|(b, addr)| Some((*backend_ids.get(addr)?, *b)))
                .collect();
            ids.sort_by_key(|(id, _)| *id);
            ids.dedup_by_key(|(id, _)| *id);
            let mut flags = p.flags;
            if two_scopes && scope == LB_SCOPE_EXTERNAL {
                flags |= SVC_F_TWO_SCOPES;
            }
            if local_only {
                flags |= SVC_F_LOCAL_ONLY;
                // kube-proxy drops what a Local policy leaves without a backend here, and
                // rejects only a service without any serving backend.
                if ids.is_empty() && p.serving_anywhere {
                    flags |= SVC_F_DROP_EMPTY;
                }
            }
            if maglev {
                match node.maglev {
                    Some(table) if !ids.is_empty() => {
                        let keys: Vec<(u32, Vec<u8>)> = backends
                            .iter()
                            .filter_map(|(_, a)| Some((*backend_ids.get(a)?, maglev_key(a))))
                            .collect();
                        let weights: BTreeMap<u32, u32> = ids
                            .iter()
                            .map(|(id, b)| (*id, u32::try_from(b.weight).unwrap_or(1)))
                            .collect();
                        let mut input: Vec<(u32, u32, &[u8])> = keys
                            .iter()
                            .map(|(id, key)| (*id, weights[id], key.as_slice()))
                            .collect();
                        input.sort_by_key(|(id, _, _)| *id);
                        input.dedup_by_key(|(id, _, _)| *id);
                        let lookup = table(&input, node.maglev_table_size, node.hash_seed);
                        if lookup.is_empty() {
                            // More backends than slots: random selection, counted.
                            out.maglev_without_table += 1;
                        } else {
                            flags |= SVC_F_MAGLEV;
                        }
                        for (slot, backend_id) in lookup.into_iter().enumerate() {
                            let Ok(slot) = u32::try_from(slot) else { break };
                            out.state.maglev.insert(
                                LbMaglevKey {
                                    rev_nat_index,
                                    scope,
                                    pad: 0,
                                    slot,
                                },
                                backend_id,
                            );
                        }
                    }
                    Some(_) => {}
                    None => out.maglev_without_table += 1,
                }
            }
            let count = u16::try_from(ids.len()).unwrap_or(u16::MAX);
            insert_service(
                &mut out.state,
                service_key(&p.frontend, scope, 0),
                LbServiceValue {
                    backend_id: 0,
                    count,
                    rev_nat_index,
                    affinity_timeout,
                    flags,
                    pad: [0; 3],
                },
            );
            for (slot, (id, b)) in ids.iter().take(usize::from(count)).enumerate() {
                let slot = u16::try_from(slot + 1).unwrap_or(u16::MAX);
                insert_service(
                    &mut out.state,
                    service_key(&p.frontend, scope, slot),
                    LbServiceValue {
                        backend_id: *id,
                        rev_nat_index,
                        ..LbServiceValue::default()
                    },
                );
                let addr = backends
                    .iter()
                    .find(|(bb, _)| std::ptr::eq(*bb, *b))
                    .map(|(_, a)| *a);
                if let Some(addr) = addr {
                    let local = b.node_name.as_deref() == Some(node.node_name);
                    insert_backend(
                        &mut out.state,
                        *id,
                        &addr,
                        if local { BE_F_LOCAL } else { 0 },
                    );
                }
            }
        }
        // Each family's frontends get that family's ranges (the tc path checks them): a range
        // of the other family admits none of the frontend's clients.
        if p.flags & SVC_F_SOURCE_RANGES != 0 {
            for range in &svc.spec.load_balancer_source_ranges {
                match (range.parse::<IpNet>(), p.frontend.address.is_ipv4()) {
                    (Ok(IpNet::V4(net)), true) => {
                        let net = net.trunc();
                        out.state.source_ranges.insert(
                            Lb4SrcRangeKey {
                                prefixlen: LB_SRC_RANGE_STATIC_PREFIX + u32::from(net.prefix_len()),
                                rev_nat_index,
                                pad: 0,
                                address: net.network().octets(),
                            },
                            1,
                        );
                    }
                    (Ok(IpNet::V6(net)), false) => {
                        let net = net.trunc();
                        out.state.source_ranges6.insert(
                            Lb6SrcRangeKey {
                                prefixlen: LB_SRC_RANGE_STATIC_PREFIX + u32::from(net.prefix_len()),
                                rev_nat_index,
                                pad: 0,
                                address: net.network().octets(),
                            },
                            1,
                        );
                    }
                    (Ok(_), _) => {}
                    (Err(_), _) => out.skipped.push(Skipped {
                        service: service_name(svc),
                        reason: SkipReason::Invalid,
                        detail: format!("loadBalancerSourceRange {range}"),
                    }),
                }
            }
        }
        out.frontends += 1;
        programmed.insert(service_name(svc));
    }
    for f in exhausted {
        out.skipped.push(Skipped {
            service: String::new(),
            reason: SkipReason::IdsExhausted,
            detail: format!("frontend {}:{}", f.address, f.port),
        });
    }
    out.services = programmed.len();
    out
}

#[cfg(test)]
#[path = "desired_tests.rs"]
mod tests;
