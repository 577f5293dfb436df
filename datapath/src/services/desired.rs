//! What the `lb_*` maps of one node should hold: a pure function of every `LBService`, the
//! node's name and IPv4 addresses, the configured default algorithm and the ids the maps
//! hold now ([`lb_state`]).
//!
//! Per frontend (address, port, protocol):
//! - ClusterIP: one scope; `internalTrafficPolicy: Local` keeps only this node's backends.
//! - NodePort (no address: on every node address, plus the wildcard 0.0.0.0 entry the socket
//!   LB uses for loopback and other nodes' addresses), LoadBalancer IPs, externalIPs: the
//!   external scope (clients outside the node) and, when `externalTrafficPolicy: Local`
//!   makes it differ, an internal scope with every backend for in-cluster clients
//!   (`SVC_F_TWO_SCOPES`).
//! - Each scope takes its `active` backends; when it has none, its `terminating` ones
//!   (KEP-1669); weight 0 takes no new connections. An empty scope rejects.
//! - SCTP and IPv6 frontends are skipped and counted (the datapath handles TCP and UDP over
//!   IPv4); the operator marks SCTP services `Valid=False Unsupported`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tendril_crds::v1alpha1::{Backend, Frontend, LBService};

use super::ids;
use crate::bpf::maps::{
    BE_F_LOCAL, LB_SCOPE_EXTERNAL, LB_SCOPE_INTERNAL, LB_SRC_RANGE_STATIC_PREFIX, Lb4Backend,
    Lb4Key, Lb4ReverseNat, Lb4Service, Lb4SrcRangeKey, LbMaglevKey, LbState, SVC_F_AFFINITY,
    SVC_F_DROP_EMPTY, SVC_F_EXTERNAL, SVC_F_LOCAL_ONLY, SVC_F_MAGLEV, SVC_F_NODEPORT,
    SVC_F_SOURCE_RANGES, SVC_F_TWO_SCOPES,
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
    /// The node's IPv4 addresses (NodePort frontends listen on each).
    pub node_addresses: &'a [Ipv4Addr],
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
    pub address: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

/// A frontend as the datapath knows it (address 0.0.0.0: a NodePort's wildcard).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddr {
    pub address: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

impl From<&Lb4Backend> for BackendAddr {
    fn from(b: &Lb4Backend) -> Self {
        Self {
            address: Ipv4Addr::from(b.address),
            port: u16::from_be_bytes(b.port),
            proto: b.proto,
        }
    }
}

impl From<&Lb4ReverseNat> for FrontendAddr {
    fn from(r: &Lb4ReverseNat) -> Self {
        Self {
            address: Ipv4Addr::from(r.address),
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
    /// IPv6 frontends, backends or source ranges (the datapath is IPv4 only).
    Ipv6,
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
            Self::Ipv6 => "ipv6",
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
    /// The highest `spec.revision` among the LBServices this state realizes.
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
        let addresses: Vec<Ipv4Addr> = match (type_.as_str(), address) {
            (_, Some(a)) => match a.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(v4)) => vec![v4],
                Ok(std::net::IpAddr::V6(_)) => {
                    skip(SkipReason::Ipv6, format!("{type_} {a}"));
                    continue;
                }
                Err(_) => {
                    skip(SkipReason::Invalid, format!("{type_} address {a}"));
                    continue;
                }
            },
            ("NodePort", None) => node
                .node_addresses
                .iter()
                .copied()
                .chain([Ipv4Addr::UNSPECIFIED])
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
            let (Ok(address), Some(port)) = (b.address.parse::<Ipv4Addr>(), port_of(b.port)) else {
                let reason = if b.address.contains(':') {
                    SkipReason::Ipv6
                } else {
                    SkipReason::Invalid
                };
                skip(reason, format!("backend {}:{}", b.address, b.port));
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
        for address in addresses {
            out.push(PlannedFrontend {
                service: svc,
                frontend: FrontendAddr {
                    address,
                    port,
                    proto,
                },
                flags,
                external: external.clone(),
                internal: internal.clone(),
                external_local_only,
                serving_anywhere: !scope_backends(&candidates, node.node_name, false).is_empty(),
            });
        }
    }
    out
}

fn lb4_key(frontend: &FrontendAddr, scope: u8, slot: u16) -> Lb4Key {
    Lb4Key {
        address: frontend.address.octets(),
        dport: frontend.port.to_be_bytes(),
        backend_slot: slot,
        proto: frontend.proto,
        scope,
        pad: [0; 2],
    }
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
        out.revision = out.revision.max(Some(svc.spec.revision));
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
        out.state.revnat.insert(
            rev_nat_index,
            Lb4ReverseNat {
                address: p.frontend.address.octets(),
                port: p.frontend.port.to_be_bytes(),
                proto: p.frontend.proto,
                pad: 0,
            },
        );
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
                        let keys: Vec<(u32, [u8; 6])> = backends
                            .iter()
                            .filter_map(|(_, a)| {
                                let mut key = [0u8; 6];
                                key[..4].copy_from_slice(&a.address.octets());
                                key[4..].copy_from_slice(&a.port.to_be_bytes());
                                Some((*backend_ids.get(a)?, key))
                            })
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
            out.state.services.insert(
                lb4_key(&p.frontend, scope, 0),
                Lb4Service {
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
                out.state.services.insert(
                    lb4_key(&p.frontend, scope, slot),
                    Lb4Service {
                        backend_id: *id,
                        rev_nat_index,
                        ..Lb4Service::default()
                    },
                );
                let addr = backends
                    .iter()
                    .find(|(bb, _)| std::ptr::eq(*bb, *b))
                    .map(|(_, a)| *a);
                if let Some(addr) = addr {
                    out.state.backends.insert(
                        *id,
                        Lb4Backend {
                            address: addr.address.octets(),
                            port: addr.port.to_be_bytes(),
                            proto: addr.proto,
                            flags: if b.node_name.as_deref() == Some(node.node_name) {
                                BE_F_LOCAL
                            } else {
                                0
                            },
                        },
                    );
                }
            }
        }
        if p.flags & SVC_F_SOURCE_RANGES != 0 {
            for range in &svc.spec.load_balancer_source_ranges {
                match range.parse::<Ipv4Net>() {
                    Ok(net) => {
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
                    Err(_) => out.skipped.push(Skipped {
                        service: service_name(svc),
                        reason: if range.contains(':') {
                            SkipReason::Ipv6
                        } else {
                            SkipReason::Invalid
                        },
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
mod tests {
    use super::*;
    use tendril_crds::v1alpha1::{ClientIpAffinity, LBServiceSpec, SessionAffinity};

    const NODE: &str = "n1";

    fn backend(address: &str, node: &str, state: &str) -> Backend {
        Backend {
            port_name: "http".into(),
            address: address.into(),
            port: 8080,
            protocol: "TCP".into(),
            weight: 1,
            node_name: Some(node.into()),
            zone: None,
            state: state.into(),
        }
    }

    fn frontend(type_: &str, address: Option<&str>, port: i32) -> Frontend {
        Frontend {
            name: "http".into(),
            type_: type_.into(),
            address: address.map(Into::into),
            port,
            protocol: "TCP".into(),
        }
    }

    fn service(
        name: &str,
        revision: i64,
        frontends: Vec<Frontend>,
        backends: Vec<Backend>,
    ) -> LBService {
        let mut svc = LBService::new(
            name,
            LBServiceSpec {
                revision,
                frontends,
                backends,
                external_traffic_policy: "Cluster".into(),
                internal_traffic_policy: "Cluster".into(),
                ..LBServiceSpec::default()
            },
        );
        svc.metadata.namespace = Some("default".into());
        svc
    }

    fn node<'a>(
        addresses: &'a [Ipv4Addr],
        held_backends: &'a BTreeMap<BackendAddr, u32>,
        held_frontends: &'a BTreeMap<FrontendAddr, u16>,
    ) -> NodeServices<'a> {
        NodeServices {
            node_name: NODE,
            node_addresses: addresses,
            default_algorithm: LbAlgorithm::Random,
            maglev_table_size: 7,
            hash_seed: 1,
            maglev: None,
            held_backends,
            held_frontends,
        }
    }

    fn state_of(services: &[LBService]) -> DesiredServices {
        let (hb, hf) = (BTreeMap::new(), BTreeMap::new());
        lb_state(services, &node(&[Ipv4Addr::new(10, 250, 0, 10)], &hb, &hf))
    }

    /// (count, flags, backend addresses in slot order) of a frontend's scope.
    fn scope(
        state: &LbState,
        address: Ipv4Addr,
        port: u16,
        scope: u8,
    ) -> Option<(u16, u8, Vec<Ipv4Addr>)> {
        let f = FrontendAddr {
            address,
            port,
            proto: PROTO_TCP,
        };
        let master = state.services.get(&lb4_key(&f, scope, 0))?;
        let backends = (1..=master.count)
            .map(|slot| {
                let id = state.services[&lb4_key(&f, scope, slot)].backend_id;
                Ipv4Addr::from(state.backends[&id].address)
            })
            .collect();
        Some((master.count, master.flags, backends))
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn a_cluster_ip_gets_one_scope_with_every_active_backend() {
        let svc = service(
            "web",
            4,
            vec![frontend("ClusterIP", Some("10.96.0.10"), 80)],
            vec![
                backend("10.200.0.5", NODE, "active"),
                backend("10.200.1.5", "n2", "active"),
                backend("10.200.1.6", "n2", "terminating"),
            ],
        );
        let out = state_of(&[svc]);
        let (count, flags, backends) =
            scope(&out.state, ip("10.96.0.10"), 80, LB_SCOPE_EXTERNAL).unwrap();
        assert_eq!((count, flags), (2, 0));
        assert_eq!(backends, [ip("10.200.0.5"), ip("10.200.1.5")]);
        assert_eq!(
            scope(&out.state, ip("10.96.0.10"), 80, LB_SCOPE_INTERNAL),
            None
        );
        assert_eq!(out.state.revnat.len(), 1);
        assert_eq!(out.state.backends.len(), 2);
        let local = out
            .state
            .backends
            .values()
            .filter(|b| b.flags == BE_F_LOCAL)
            .count();
        assert_eq!(local, 1);
        assert_eq!((out.services, out.frontends, out.revision), (1, 1, Some(4)));
    }

    #[test]
    fn a_node_port_listens_on_every_node_address_and_the_wildcard() {
        let svc = service(
            "np",
            1,
            vec![frontend("NodePort", None, 30080)],
            vec![backend("10.200.1.5", "n2", "active")],
        );
        let (hb, hf) = (BTreeMap::new(), BTreeMap::new());
        let addresses = [ip("10.250.0.10"), ip("192.168.1.10")];
        let out = lb_state([&svc], &node(&addresses, &hb, &hf));
        for address in [ip("10.250.0.10"), ip("192.168.1.10"), Ipv4Addr::UNSPECIFIED] {
            let (count, flags, _) = scope(&out.state, address, 30080, LB_SCOPE_EXTERNAL).unwrap();
            assert_eq!((count, flags), (1, SVC_F_NODEPORT), "{address}");
        }
        assert_eq!((out.frontends, out.state.revnat.len()), (3, 3));
    }

    #[test]
    fn external_traffic_policy_local_splits_the_scopes() {
        let mut svc = service(
            "lb",
            1,
            vec![frontend("LoadBalancer", Some("203.0.113.7"), 80)],
            vec![
                backend("10.200.0.5", NODE, "active"),
                backend("10.200.1.5", "n2", "active"),
            ],
        );
        svc.spec.external_traffic_policy = "Local".into();
        let out = state_of(&[svc.clone()]);
        let vip = ip("203.0.113.7");
        let (count, flags, backends) = scope(&out.state, vip, 80, LB_SCOPE_EXTERNAL).unwrap();
        assert_eq!(count, 1);
        assert_eq!(flags, SVC_F_EXTERNAL | SVC_F_TWO_SCOPES | SVC_F_LOCAL_ONLY);
        assert_eq!(backends, [ip("10.200.0.5")]);
        let (count, flags, _) = scope(&out.state, vip, 80, LB_SCOPE_INTERNAL).unwrap();
        assert_eq!((count, flags), (2, SVC_F_EXTERNAL));

        // No local backend: the external scope drops (kube-proxy's "has no local
        // endpoints"), in-cluster clients still reach n2.
        svc.spec.backends.remove(0);
        let out = state_of(&[svc.clone()]);
        let (count, flags, _) = scope(&out.state, vip, 80, LB_SCOPE_EXTERNAL).unwrap();
        assert_eq!(count, 0);
        assert_eq!(flags & SVC_F_DROP_EMPTY, SVC_F_DROP_EMPTY);
        assert_eq!(scope(&out.state, vip, 80, LB_SCOPE_INTERNAL).unwrap().0, 1);
        // No backend anywhere: rejected, not dropped.
        svc.spec.backends.clear();
        let out = state_of(&[svc]);
        let (count, flags, _) = scope(&out.state, vip, 80, LB_SCOPE_EXTERNAL).unwrap();
        assert_eq!((count, flags & SVC_F_DROP_EMPTY), (0, 0));
    }

    #[test]
    fn internal_traffic_policy_local_keeps_local_cluster_ip_backends() {
        let mut svc = service(
            "web",
            1,
            vec![frontend("ClusterIP", Some("10.96.0.10"), 80)],
            vec![
                backend("10.200.0.5", NODE, "active"),
                backend("10.200.1.5", "n2", "active"),
            ],
        );
        svc.spec.internal_traffic_policy = "Local".into();
        let out = state_of(&[svc]);
        let (count, flags, backends) =
            scope(&out.state, ip("10.96.0.10"), 80, LB_SCOPE_EXTERNAL).unwrap();
        assert_eq!(
            (count, flags, backends),
            (1, SVC_F_LOCAL_ONLY, vec![ip("10.200.0.5")])
        );
    }

    #[test]
    fn terminating_backends_serve_only_a_scope_without_active_ones() {
        let mut svc = service(
            "lb",
            1,
            vec![frontend("NodePort", None, 30080)],
            vec![
                backend("10.200.0.5", NODE, "terminating"),
                backend("10.200.1.5", "n2", "active"),
                backend("10.200.1.6", "n2", "terminating"),
            ],
        );
        svc.spec.external_traffic_policy = "Local".into();
        let out = state_of(&[svc.clone()]);
        let any = Ipv4Addr::UNSPECIFIED;
        // External (local) scope: no active local backend → the local terminating one.
        assert_eq!(
            scope(&out.state, any, 30080, LB_SCOPE_EXTERNAL).unwrap().2,
            [ip("10.200.0.5")]
        );
        // Internal scope: an active backend exists → terminating ones take nothing new.
        assert_eq!(
            scope(&out.state, any, 30080, LB_SCOPE_INTERNAL).unwrap().2,
            [ip("10.200.1.5")]
        );
        // Weight 0 takes no new connections.
        svc.spec.backends[1].weight = 0;
        let out = state_of(&[svc]);
        assert_eq!(
            scope(&out.state, any, 30080, LB_SCOPE_INTERNAL).unwrap().2,
            [ip("10.200.0.5"), ip("10.200.1.6")]
        );
    }

    #[test]
    fn a_service_without_backends_is_programmed_to_reject() {
        let out = state_of(&[service(
            "empty",
            2,
            vec![frontend("ClusterIP", Some("10.96.0.11"), 80)],
            vec![],
        )]);
        let (count, _, _) = scope(&out.state, ip("10.96.0.11"), 80, LB_SCOPE_EXTERNAL).unwrap();
        assert_eq!(count, 0);
        assert!(out.state.backends.is_empty());
    }

    #[test]
    fn sctp_ipv6_and_conflicting_frontends_are_skipped_with_a_reason() {
        let mut sctp = frontend("ClusterIP", Some("10.96.0.12"), 80);
        sctp.protocol = "SCTP".into();
        let v6 = frontend("ClusterIP", Some("fd00::10"), 80);
        let a = service(
            "a",
            1,
            vec![sctp, v6, frontend("ClusterIP", Some("10.96.0.13"), 80)],
            vec![],
        );
        let mut b = service(
            "b",
            2,
            vec![frontend("ClusterIP", Some("10.96.0.13"), 80)],
            vec![],
        );
        b.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2030-01-01T00:00:00Z".parse().unwrap(),
        ));
        let out = state_of(&[b, a]);
        let reasons: Vec<(String, SkipReason)> = out
            .skipped
            .iter()
            .map(|s| (s.service.clone(), s.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("default/a".to_string(), SkipReason::Sctp),
                ("default/a".to_string(), SkipReason::Ipv6),
                ("default/b".to_string(), SkipReason::Conflict),
            ]
        );
        assert_eq!((out.frontends, out.services, out.revision), (1, 1, Some(2)));
    }

    #[test]
    fn held_ids_survive_and_new_ones_do_not_reuse_them() {
        let svc = service(
            "web",
            1,
            vec![frontend("ClusterIP", Some("10.96.0.10"), 80)],
            vec![
                backend("10.200.0.5", NODE, "active"),
                backend("10.200.0.6", NODE, "active"),
            ],
        );
        let held_backends = BTreeMap::from([(
            BackendAddr {
                address: ip("10.200.0.6"),
                port: 8080,
                proto: PROTO_TCP,
            },
            42,
        )]);
        let held_frontends = BTreeMap::from([(
            FrontendAddr {
                address: ip("10.96.0.10"),
                port: 80,
                proto: PROTO_TCP,
            },
            9,
        )]);
        let out = lb_state([&svc], &node(&[], &held_backends, &held_frontends));
        assert_eq!(
            Ipv4Addr::from(out.state.backends[&42].address),
            ip("10.200.0.6")
        );
        assert_eq!(
            Ipv4Addr::from(out.state.backends[&43].address),
            ip("10.200.0.5")
        );
        assert_eq!(out.state.revnat.keys().copied().collect::<Vec<_>>(), [9]);
        assert!(out.state.services.values().all(|s| s.rev_nat_index == 9));
    }

    #[test]
    fn affinity_and_source_ranges_set_their_flags() {
        let mut svc = service(
            "lb",
            1,
            vec![
                frontend("LoadBalancer", Some("203.0.113.7"), 80),
                frontend("ClusterIP", Some("10.96.0.10"), 80),
            ],
            vec![backend("10.200.0.5", NODE, "active")],
        );
        svc.spec.session_affinity = Some(SessionAffinity {
            client_ip: Some(ClientIpAffinity {
                timeout_seconds: 60,
            }),
        });
        svc.spec.load_balancer_source_ranges = vec!["198.51.100.0/24".into(), "fd00::/64".into()];
        let out = state_of(&[svc]);
        let lb = FrontendAddr {
            address: ip("203.0.113.7"),
            port: 80,
            proto: PROTO_TCP,
        };
        let master = out.state.services[&lb4_key(&lb, LB_SCOPE_EXTERNAL, 0)];
        assert_eq!(master.affinity_timeout, 60);
        assert_eq!(
            master.flags,
            SVC_F_EXTERNAL | SVC_F_AFFINITY | SVC_F_SOURCE_RANGES
        );
        let key = out.state.source_ranges.keys().next().unwrap();
        assert_eq!(
            (key.rev_nat_index, key.prefixlen, key.address),
            (master.rev_nat_index, 56, [198, 51, 100, 0])
        );
        assert_eq!(out.state.source_ranges.len(), 1);
        assert_eq!(out.skipped[0].reason, SkipReason::Ipv6);
        // The ClusterIP of the same service: affinity, no source ranges.
        let (_, flags, _) = scope(&out.state, ip("10.96.0.10"), 80, LB_SCOPE_EXTERNAL).unwrap();
        assert_eq!(flags, SVC_F_AFFINITY);
    }

    #[test]
    fn maglev_services_get_a_table_when_the_builder_is_there() {
        fn round_robin(backends: &[(u32, u32, &[u8])], m: u32, _seed: u32) -> Vec<u32> {
            (0..m as usize)
                .map(|i| backends[i % backends.len()].0)
                .collect()
        }
        let mut svc = service(
            "web",
            1,
            vec![frontend("ClusterIP", Some("10.96.0.10"), 80)],
            vec![
                backend("10.200.0.5", NODE, "active"),
                backend("10.200.0.6", NODE, "active"),
            ],
        );
        svc.spec.algorithm = Some("Maglev".into());
        let out = state_of(&[svc.clone()]);
        assert_eq!(out.maglev_without_table, 1);
        assert!(out.state.maglev.is_empty());
        let (hb, hf) = (BTreeMap::new(), BTreeMap::new());
        let mut n = node(&[], &hb, &hf);
        n.maglev = Some(round_robin);
        let out = lb_state([&svc], &n);
        assert_eq!(out.state.maglev.len(), 7);
        let ids: BTreeSet<u32> = out.state.maglev.values().copied().collect();
        assert_eq!(ids, out.state.backends.keys().copied().collect());
        let (_, flags, _) = scope(&out.state, ip("10.96.0.10"), 80, LB_SCOPE_EXTERNAL).unwrap();
        assert_eq!(flags, SVC_F_MAGLEV);
    }
}
