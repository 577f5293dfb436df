//! Service + EndpointSlices (+ Node zones) → `LBServiceSpec`: pure values, no Kubernetes.
//!
//! What is served, and why:
//! - `ExternalName` services are DNS only; headless ones (`clusterIP: None`) have no virtual
//!   IP; services labelled `service.kubernetes.io/service-proxy-name` belong to another proxy
//!   (kube-proxy skips them too). None of them get an `LBService`. A `loadBalancerClass`
//!   names who provisions the load balancer, not who proxies: like kube-proxy, every class
//!   is served (ClusterIP, NodePort, externalIPs and whatever ingress IPs its implementation
//!   writes into the status).
//! - Frontends, per Service port in order: each ClusterIP (`spec.clusterIPs`: one per IP
//!   family of the Service, IPv4 and IPv6 alike), the NodePort (no address: every node
//!   address of the Service's families), each `status.loadBalancer.ingress[].ip` of a
//!   LoadBalancer service (not those with `ipMode: Proxy`: the load balancer delivers that
//!   traffic to the node itself, as kube-proxy assumes since KEP-1860), each externalIP.
//!   Addresses are written canonical (`fd00::a`, not `fd00:0::000a`).
//! - Dual stack: both families are listed side by side; the agent pairs a frontend only
//!   with backends of its own family (an IPv6 ClusterIP never reaches an IPv4 backend), so
//!   an IPv6-only Service is served like an IPv4-only one. Source ranges of both families
//!   are carried over.
//! - SCTP ports are not served (the datapath handles TCP and UDP): `Valid=False`,
//!   `Unsupported`, naming each such port; the TCP and UDP ports of the service still are.
//! - Backends from every IPv4 and IPv6 EndpointSlice of the service (an address whose family
//!   is not the slice's `addressType` is left out; FQDN slices are not served), matched to frontends by port name and
//!   protocol; conditions as KEP-1669/1672 and kube-proxy read them (ready and serving
//!   default to true, terminating to false): ready → `active`; serving and terminating →
//!   `terminating`; anything else is not listed. An address:port in several slices (while
//!   the EndpointSlice controller moves endpoints between slices) is listed once, the
//!   `active` copy winning. The zone comes from the endpoint, else from its Node's
//!   `topology.kubernetes.io/zone` label.

use super::slice::SliceInfo;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use tendril_crds::facts::annotations::SERVICE_LB_ALGORITHM;
use tendril_crds::v1alpha1::{Backend, ClientIpAffinity, Frontend, LBServiceSpec, SessionAffinity};

/// The label kube-proxy honours: a service with it belongs to the proxy it names.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The Node label with its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Frontend types (`Frontend.type`).
pub const CLUSTER_IP: &str = "ClusterIP";
pub const NODE_PORT: &str = "NodePort";
pub const LOAD_BALANCER: &str = "LoadBalancer";
pub const EXTERNAL_IP: &str = "ExternalIP";
/// Backend states (`Backend.state`).
pub const ACTIVE: &str = "active";
pub const TERMINATING: &str = "terminating";
/// Backend selection algorithms the annotation may name.
pub const ALGORITHMS: [&str; 2] = ["Random", "Maglev"];

/// The limits of `LBServiceSpec` (its CRD schema).
pub const MAX_FRONTENDS: usize = 1024;
pub const MAX_BACKENDS: usize = 16384;

/// Condition reasons of `Valid=False`.
pub const REASON_UNSUPPORTED: &str = "Unsupported";
pub const REASON_INVALID_ANNOTATION: &str = "InvalidAnnotation";
pub const REASON_TOO_MANY: &str = "TooManyEntries";

/// Why a Service gets no `LBService`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    ExternalName,
    Headless,
    /// `service.kubernetes.io/service-proxy-name` names another proxy.
    OtherProxy(String),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::ExternalName => f.write_str("ExternalName service (left to DNS)"),
            Skip::Headless => f.write_str("headless service (clusterIP None)"),
            Skip::OtherProxy(p) => write!(f, "{SERVICE_PROXY_NAME_LABEL}={p:?}"),
        }
    }
}

/// Something in the input Tendril does not serve as asked: `Valid=False` with `reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// The translation of one served Service.
#[derive(Clone, Debug, PartialEq)]
pub struct Translation {
    /// Revision 0: the revision sequence numbers it when it is written.
    pub spec: LBServiceSpec,
    /// Empty: valid.
    pub problems: Vec<Problem>,
}

/// `ip` written canonical, or `None` for garbage.
fn canonical(ip: &str) -> Option<String> {
    ip.trim().parse::<IpAddr>().ok().map(|ip| ip.to_string())
}

fn protocol(p: Option<&String>) -> String {
    p.cloned().unwrap_or_else(|| "TCP".into())
}

/// The `LBServiceSpec` of `svc` (revision 0) from its EndpointSlices, or why it has none.
/// `zone_of(node)` is the zone label of a Node, for endpoints that carry none.
pub fn translate<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a SliceInfo>,
    zone_of: impl Fn(&str) -> Option<String>,
) -> Result<Translation, Skip> {
    let spec = svc.spec.clone().unwrap_or_default();
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        return Err(Skip::ExternalName);
    }
    if let Some(proxy) = svc
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
    {
        return Err(Skip::OtherProxy(proxy.clone()));
    }
    let cluster_ips: Vec<String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.clone(),
        _ => spec.cluster_ip.clone().into_iter().collect(),
    };
    if cluster_ips.is_empty() || cluster_ips.iter().any(|ip| ip == "None") {
        return Err(Skip::Headless);
    }
    let cluster_ips: Vec<String> = cluster_ips.iter().filter_map(|ip| canonical(ip)).collect();

    let mut problems = Vec::new();
    let ports = spec.ports.clone().unwrap_or_default();
    let mut frontends = Vec::new();
    // (port name, protocol) of every served Service port.
    let mut served: BTreeSet<(String, String)> = BTreeSet::new();
    let lb_ips: Vec<String> = if type_ == "LoadBalancer" {
        svc.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_deref().and_then(canonical))
            .collect()
    } else {
        Vec::new()
    };
    let external_ips: Vec<String> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| canonical(ip))
        .collect();
    for port in &ports {
        let name = port.name.clone().unwrap_or_default();
        let proto = protocol(port.protocol.as_ref());
        if proto != "TCP" && proto != "UDP" {
            let label = if name.is_empty() {
                format!("{}/{proto}", port.port)
            } else {
                format!("{name:?} ({}/{proto})", port.port)
            };
            problems.push(Problem {
                reason: REASON_UNSUPPORTED,
                message: format!(
                    "port {label}: {proto} is not supported by the datapath and is not served; the TCP and UDP ports are"
                ),
            });
            continue;
        }
        served.insert((name.clone(), proto.clone()));
        let frontend = |type_: &str, address: Option<String>, port: i32| Frontend {
            name: name.clone(),
            type_: type_.into(),
            address,
            port,
            protocol: proto.clone(),
        };
        for ip in &cluster_ips {
            frontends.push(frontend(CLUSTER_IP, Some(ip.clone()), port.port));
        }
        if let Some(node_port) = port.node_port.filter(|p| *p > 0)
            && matches!(type_, "NodePort" | "LoadBalancer")
        {
            frontends.push(frontend(NODE_PORT, None, node_port));
        }
        for ip in &lb_ips {
            frontends.push(frontend(LOAD_BALANCER, Some(ip.clone()), port.port));
        }
        for ip in &external_ips {
            frontends.push(frontend(EXTERNAL_IP, Some(ip.clone()), port.port));
        }
    }
    if frontends.len() > MAX_FRONTENDS {
        problems.push(Problem {
            reason: REASON_TOO_MANY,
            message: format!(
                "{} frontends, at most {MAX_FRONTENDS} are served",
                frontends.len()
            ),
        });
        frontends.truncate(MAX_FRONTENDS);
    }

    let mut backends = backends(slices, &served, &zone_of);
    if backends.len() > MAX_BACKENDS {
        problems.push(Problem {
            reason: REASON_TOO_MANY,
            message: format!(
                "{} backends, at most {MAX_BACKENDS} are served",
                backends.len()
            ),
        });
        backends.truncate(MAX_BACKENDS);
    }

    let session_affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(10800);
        SessionAffinity {
            client_ip: Some(ClientIpAffinity {
                timeout_seconds: timeout,
            }),
        }
    });
    let policy = |p: &Option<String>| match p.as_deref() {
        Some("Local") => "Local".to_string(),
        _ => "Cluster".to_string(),
    };
    let algorithm = match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVICE_LB_ALGORITHM))
    {
        None => None,
        Some(a) if ALGORITHMS.contains(&a.as_str()) => Some(a.clone()),
        Some(a) => {
            problems.push(Problem {
                reason: REASON_INVALID_ANNOTATION,
                message: format!(
                    "annotation {SERVICE_LB_ALGORITHM}={a:?} is not one of {}; the agent's default algorithm is used",
                    ALGORITHMS.join(", ")
                ),
            });
            None
        }
    };
    let load_balancer_source_ranges = if type_ == "LoadBalancer" {
        source_ranges(spec.load_balancer_source_ranges.as_deref().unwrap_or(&[]))
    } else {
        Vec::new()
    };
    Ok(Translation {
        spec: LBServiceSpec {
            revision: 0,
            committed_revision: None,
            frontends,
            backends,
            session_affinity,
            external_traffic_policy: policy(&spec.external_traffic_policy),
            internal_traffic_policy: policy(&spec.internal_traffic_policy),
            load_balancer_source_ranges,
            health_check_node_port: spec.health_check_node_port.filter(|p| *p > 0),
            algorithm,
        },
        problems,
    })
}

/// CIDRs of `ranges` (both families), canonical (`10.0.0.7/8` → `10.0.0.0/8`), sorted, once each.
fn source_ranges(ranges: &[String]) -> Vec<String> {
    let mut out: Vec<IpNet> = ranges
        .iter()
        .filter_map(|r| r.trim().parse::<IpNet>().ok())
        .map(|n| n.trunc())
        .collect();
    out.sort();
    out.dedup();
    out.into_iter().map(|n| n.to_string()).collect()
}

/// The backends of `slices` for the served (port name, protocol) pairs, sorted and
/// deduplicated.
fn backends<'a>(
    slices: impl IntoIterator<Item = &'a SliceInfo>,
    served: &BTreeSet<(String, String)>,
    zone_of: &impl Fn(&str) -> Option<String>,
) -> Vec<Backend> {
    // (port name, address, port, protocol) → backend.
    let mut out: BTreeMap<(String, String, i32, String), Backend> = BTreeMap::new();
    for slice in slices {
        // FQDN slices name no address the datapath could use.
        let v6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            _ => continue,
        };
        let ports: Vec<(String, i32, String)> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let name = p.name.clone().unwrap_or_default();
                let proto = protocol(p.protocol.as_ref());
                let port = p.port.filter(|p| (1..=65535).contains(p))?;
                served
                    .contains(&(name.clone(), proto.clone()))
                    .then_some((name, port, proto))
            })
            .collect();
        if ports.is_empty() {
            continue;
        }
        for ep in &slice.endpoints {
            let c = ep.conditions.as_ref();
            let ready = ep.ready();
            let serving = c.and_then(|c| c.serving).unwrap_or(true);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let state = if ready {
                ACTIVE
            } else if serving && terminating {
                TERMINATING
            } else {
                continue;
            };
            let zone = ep
                .zone
                .as_deref()
                .map(String::from)
                .or_else(|| ep.node_name.as_deref().and_then(zone_of));
            let node_name = ep.node_name.as_deref().map(String::from);
            let addresses = ep
                .addresses
                .iter()
                .filter_map(|a| a.trim().parse::<IpAddr>().ok())
                .filter(|a| a.is_ipv6() == v6)
                .map(|a| a.to_string());
            for address in addresses {
                for (name, port, proto) in &ports {
                    let key = (name.clone(), address.clone(), *port, proto.clone());
                    let backend = Backend {
                        port_name: name.clone(),
                        address: address.clone(),
                        port: *port,
                        protocol: proto.clone(),
                        weight: 1,
                        node_name: node_name.clone(),
                        zone: zone.clone(),
                        state: state.into(),
                    };
                    match out.get(&key) {
                        Some(existing) if existing.state == ACTIVE => {}
                        _ => {
                            out.insert(key, backend);
                        }
                    }
                }
            }
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
