//! The desired datapath of one node, computed from the watched objects: a pure function of
//! the `NodeNetwork`s, `Endpoint`s and the kube-apiserver's `EndpointSlice`s (values in,
//! values out), so it is tested without a kernel or an API server. What cannot be realized yet (no identity allocated, no node
//! address known) is listed as pending with the reason, never silently left out.

use crate::bpf::maps::IpcacheValue;
use crate::config::RoutingMode;
use ipnet::IpNet;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use tendril_crds::v1alpha1::{Endpoint, NamedPort, NodeNetwork};

use tendril_crds::facts::Reserved;

pub const IDENTITY_HOST: u32 = Reserved::Host.id32();
pub const IDENTITY_REMOTE_NODE: u32 = Reserved::RemoteNode.id32();
/// The entity `kube-apiserver`: the addresses of the `kubernetes` Service's endpoints.
pub const IDENTITY_KUBE_APISERVER: u32 = Reserved::KubeApiserver.id32();

/// `namespace/name` of an Endpoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for EndpointRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod of this node the `endpoints` map must deliver to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub key: EndpointRef,
    pub revision: i64,
    pub ips: Vec<IpAddr>,
    pub identity: u32,
    /// The low 16 bits of the pod's first address: stable across restarts and unique
    /// within a node's pod CIDR of /16 or smaller, without any allocation state.
    pub endpoint_id: u16,
    /// The pod's named container ports (ingress named ports of its policy resolve here).
    pub named_ports: Vec<NamedPort>,
}

/// How the node reaches another node's pod CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteVia {
    /// Into the VXLAN device (overlay), an IPv4 CIDR's route with the node's address as
    /// source; an IPv6 CIDR's route has none (the IPv4 underlay carries both, the inner
    /// source is the host's choice among its IPv6 addresses).
    Tunnel { src: Ipv4Addr },
    /// Via the other node's underlay address of the CIDR's family (native routing: Linux
    /// has no IPv6 route via an IPv4 next hop).
    Gateway(IpAddr),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    /// This node's `NodeNetwork` generation, `None` while it does not exist.
    pub generation: Option<i64>,
    /// This node's underlay IPv4 address (its first `InternalIP`).
    pub node_ip: Option<Ipv4Addr>,
    /// Its IPv6 one (its first IPv6 `InternalIP`): the source of SNATed IPv6 services.
    pub node_ip6: Option<Ipv6Addr>,
    pub local: Vec<LocalEndpoint>,
    pub ipcache: BTreeMap<IpNet, IpcacheValue>,
    pub routes: BTreeMap<IpNet, RouteVia>,
    /// Endpoints of this node that cannot be realized yet, with the reason.
    pub pending: Vec<(EndpointRef, String)>,
}

fn internal_ipv4(network: &NodeNetwork) -> Option<Ipv4Addr> {
    network
        .spec
        .addresses
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
}

/// The node's first IPv6 `InternalIP`: the next hop of its IPv6 pod CIDRs in native
/// routing.
fn internal_ipv6(network: &NodeNetwork) -> Option<Ipv6Addr> {
    network
        .spec
        .addresses
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv6Addr>().ok())
}

fn endpoint_ref(ep: &Endpoint) -> EndpointRef {
    EndpointRef {
        namespace: ep.metadata.namespace.clone().unwrap_or_default(),
        name: ep.metadata.name.clone().unwrap_or_default(),
    }
}

/// The id a local endpoint's maps are keyed by: the low 16 bits of its first address.
pub fn endpoint_id(ip: IpAddr) -> u16 {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            u16::from_be_bytes([o[2], o[3]])
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            u16::from_be_bytes([o[14], o[15]])
        }
    }
}

/// The ready IPv4 addresses of `slices` (an endpoint without `ready` condition is ready,
/// as the API defines). IPv6 and FQDN addresses are left out: the datapath is IPv4-only.
fn ready_ipv4s<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Vec<Ipv4Addr> {
    slices
        .into_iter()
        .flat_map(|slice| &slice.endpoints)
        .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|ep| &ep.addresses)
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .collect()
}

/// The datapath `node` should have, given every `NodeNetwork` and `Endpoint`, and the
/// `kubernetes` Service's `EndpointSlice`s (namespace `default`).
///
/// Every ready address of the kube-apiserver gets [`IDENTITY_KUBE_APISERVER`] (a /32),
/// unless a node or a pod already gives it an identity: an address has one identity, and a
/// node address keeps `host` (1) on its own node and `remote-node` (6) elsewhere. So where
/// the apiserver listens on node addresses (host network, the usual kubeadm setup), the
/// entity `kube-apiserver` matches none of its traffic and policies must allow `host` and
/// `remote-node` (which match every node, not only the apiserver's). Cilium instead merges
/// the labels: a remote node running the apiserver gets identity 7 labelled both
/// `kube-apiserver` and `remote-node`, and the local host identity gains the
/// `kube-apiserver` label, so either entity matches there.
pub fn desired<'a>(
    node: &str,
    mode: RoutingMode,
    networks: impl IntoIterator<Item = &'a NodeNetwork>,
    endpoints: impl IntoIterator<Item = &'a Endpoint>,
    apiserver: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Desired {
    let mut out = Desired::default();
    let mut node_ips: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
    // (CIDR, the node's IPv4 address, its IPv6 address).
    let mut remote_cidrs: Vec<(IpNet, Ipv4Addr, Option<Ipv6Addr>)> = Vec::new();
    for network in networks {
        let name = network.metadata.name.clone().unwrap_or_default();
        let ip = internal_ipv4(network);
        let ip6 = internal_ipv6(network);
        // The node's IPv6 underlay address is the host there and remote-node elsewhere,
        // as its IPv4 one (below).
        if let Some(ip6) = ip6 {
            let value = if name == node {
                IpcacheValue::local_node(IDENTITY_HOST)
            } else {
                IpcacheValue::new(IDENTITY_REMOTE_NODE, None)
            };
            out.ipcache.insert(IpNet::from(IpAddr::V6(ip6)), value);
        }
        if name == node {
            out.generation = network.metadata.generation;
            out.node_ip = ip;
            out.node_ip6 = ip6;
        }
        // A node's IPv6 gateways (first address of each IPv6 pod CIDR, on tendril_host)
        // are what its own IPv6 to pods leaves from, as the node address is for IPv4: the
        // host on that node, remote-node elsewhere. The overlay routes carry no IPv6
        // source, so a remote pod answers a node's gateway: through the tunnel to it.
        for cidr in &network.spec.pod_cidrs {
            let Ok(IpNet::V6(v6)) = cidr.parse::<IpNet>() else {
                continue;
            };
            let gateway = IpNet::from(IpAddr::V6(Ipv6Addr::from(u128::from(v6.network()) + 1)));
            let value = match (name == node, mode, ip) {
                (true, _, _) => IpcacheValue::local_node(IDENTITY_HOST),
                (false, RoutingMode::Overlay, Some(ip)) => {
                    IpcacheValue::new(IDENTITY_REMOTE_NODE, Some(ip))
                }
                // Native routing: the gateway's pod CIDR route leads there.
                (false, RoutingMode::Native, _) => IpcacheValue::new(IDENTITY_REMOTE_NODE, None),
                (false, RoutingMode::Overlay, None) => continue,
            };
            out.ipcache.insert(gateway, value);
        }
        let Some(ip) = ip else { continue };
        node_ips.insert(name.clone(), ip);
        if name != node {
            remote_cidrs.extend(
                network
                    .spec
                    .pod_cidrs
                    .iter()
                    .filter_map(|c| c.parse::<IpNet>().ok())
                    .map(|c| (c.trunc(), ip, ip6)),
            );
        }
    }
    for (name, ip) in &node_ips {
        let value = if name == node {
            IpcacheValue::local_node(IDENTITY_HOST)
        } else {
            IpcacheValue::new(IDENTITY_REMOTE_NODE, None)
        };
        out.ipcache.insert(IpNet::from(IpAddr::V4(*ip)), value);
    }
    for (cidr, remote, remote6) in remote_cidrs {
        let via = match (mode, out.node_ip, cidr) {
            (RoutingMode::Overlay, Some(src), _) => RouteVia::Tunnel { src },
            // Without our own address the overlay has no source; the route waits.
            (RoutingMode::Overlay, None, _) => continue,
            (RoutingMode::Native, _, IpNet::V4(_)) => RouteVia::Gateway(IpAddr::V4(remote)),
            (RoutingMode::Native, _, IpNet::V6(_)) => match remote6 {
                Some(remote6) => RouteVia::Gateway(IpAddr::V6(remote6)),
                // A node without an IPv6 InternalIP: its IPv6 pods are out of reach.
                None => continue,
            },
        };
        out.routes.insert(cidr, via);
    }

    let mut local: Vec<LocalEndpoint> = Vec::new();
    // Every Endpoint of the cluster passes here on every pass: nothing is allocated for a
    // remote one but its addresses.
    for ep in endpoints {
        let is_local = ep.spec.node == node;
        let ips: Vec<IpAddr> = ep.spec.ips.iter().filter_map(|s| s.parse().ok()).collect();
        let identity = ep.spec.identity.and_then(|id| u32::try_from(id).ok());
        let Some(identity) = identity.filter(|id| *id > 0) else {
            if is_local {
                out.pending
                    .push((endpoint_ref(ep), "no identity allocated yet".into()));
            }
            continue;
        };
        if ips.is_empty() {
            if is_local {
                out.pending.push((endpoint_ref(ep), "no addresses".into()));
            }
            continue;
        }
        let tunnel = match (is_local, mode) {
            (true, _) | (false, RoutingMode::Native) => None,
            (false, RoutingMode::Overlay) => match node_ips.get(&ep.spec.node) {
                Some(ip) => Some(*ip),
                // The pod's node has no known address yet: it is unreachable by tunnel.
                None => continue,
            },
        };
        // Both families travel through the tunnel: the IPv4 underlay carries IPv6 too.
        for ip in &ips {
            out.ipcache
                .insert(IpNet::from(*ip), IpcacheValue::new(identity, tunnel));
        }
        if is_local {
            local.push(LocalEndpoint {
                endpoint_id: endpoint_id(ips[0]),
                key: endpoint_ref(ep),
                revision: ep.spec.revision,
                ips,
                identity,
                named_ports: ep.spec.named_ports.clone(),
            });
        }
    }
    local.sort_by(|a, b| a.key.cmp(&b.key));
    out.local = local;
    // Last: an address a node or a pod gave an identity above keeps it.
    for ip in ready_ipv4s(apiserver) {
        out.ipcache
            .entry(IpNet::from(IpAddr::V4(ip)))
            .or_insert(IpcacheValue::new(IDENTITY_KUBE_APISERVER, None));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointConditions};
    use tendril_crds::common::NodeAddress;
    use tendril_crds::v1alpha1::{EndpointSpec, NodeNetworkSpec};

    const NO_SLICES: &[EndpointSlice] = &[];

    /// A slice of the `kubernetes` Service: one endpoint per (address, ready condition).
    fn slice(address_type: &str, endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
        EndpointSlice {
            address_type: address_type.into(),
            endpoints: endpoints
                .iter()
                .map(|(address, ready)| SliceEndpoint {
                    addresses: vec![(*address).into()],
                    conditions: ready.map(|ready| EndpointConditions {
                        ready: Some(ready),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn with_identity(d: &Desired, identity: u32) -> Vec<IpNet> {
        d.ipcache
            .iter()
            .filter(|(_, v)| v.identity == identity)
            .map(|(net, _)| *net)
            .collect()
    }

    fn network(name: &str, ip: &str, cidr: &str, generation: i64) -> NodeNetwork {
        let mut nn = NodeNetwork::new(
            name,
            NodeNetworkSpec {
                addresses: vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.into(),
                }],
                pod_cidrs: vec![cidr.into()],
                ..Default::default()
            },
        );
        nn.metadata.generation = Some(generation);
        nn
    }

    fn endpoint(name: &str, node: &str, ip: &str, identity: Option<i64>) -> Endpoint {
        let mut ep = Endpoint::new(
            name,
            EndpointSpec {
                node: node.into(),
                ips: vec![ip.into()],
                identity,
                revision: 3,
                ..Default::default()
            },
        );
        ep.metadata.namespace = Some("default".into());
        ep
    }

    fn cluster() -> (Vec<NodeNetwork>, Vec<Endpoint>) {
        (
            vec![
                network("a", "10.250.0.10", "10.200.0.0/24", 4),
                network("b", "10.250.0.11", "10.200.1.0/24", 2),
            ],
            vec![
                endpoint("pa", "a", "10.200.0.5", Some(300)),
                endpoint("pb", "b", "10.200.1.7", Some(301)),
                endpoint("pending", "a", "10.200.0.6", None),
            ],
        )
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn the_nodes_own_ipv6_gateways_are_the_host() {
        let (mut nns, eps) = cluster();
        nns[0].spec.pod_cidrs.push("fd00:200::/112".into());
        nns[1].spec.pod_cidrs.push("fd00:200::1:0/112".into());
        let d = desired("a", RoutingMode::Native, &nns, &eps, NO_SLICES);
        assert_eq!(
            d.ipcache[&net("fd00:200::1/128")],
            IpcacheValue::local_node(IDENTITY_HOST)
        );
        assert_eq!(
            d.ipcache[&net("fd00:200::1:1/128")],
            IpcacheValue::new(IDENTITY_REMOTE_NODE, None),
            "another node's gateway is that node"
        );
        // In overlay, a pod's answer to another node's gateway goes through the tunnel.
        let d = desired("a", RoutingMode::Overlay, &nns, &eps, NO_SLICES);
        assert_eq!(
            d.ipcache[&net("fd00:200::1:1/128")],
            IpcacheValue::new(IDENTITY_REMOTE_NODE, Some(Ipv4Addr::new(10, 250, 0, 11)))
        );
        assert_eq!(
            d.ipcache[&net("fd00:200::1/128")],
            IpcacheValue::local_node(IDENTITY_HOST)
        );
    }

    #[test]
    fn overlay_tunnels_remote_pods_and_routes_their_cidrs_into_the_device() {
        let (nns, eps) = cluster();
        let d = desired("a", RoutingMode::Overlay, &nns, &eps, NO_SLICES);
        assert_eq!(d.generation, Some(4));
        assert_eq!(d.node_ip, Some(Ipv4Addr::new(10, 250, 0, 10)));
        assert_eq!(
            d.ipcache[&net("10.200.1.7/32")],
            IpcacheValue::new(301, Some(Ipv4Addr::new(10, 250, 0, 11)))
        );
        assert_eq!(
            d.ipcache[&net("10.200.0.5/32")],
            IpcacheValue::new(300, None)
        );
        assert_eq!(
            d.ipcache[&net("10.250.0.10/32")],
            IpcacheValue::local_node(IDENTITY_HOST)
        );
        assert_eq!(
            d.ipcache[&net("10.250.0.11/32")],
            IpcacheValue::new(IDENTITY_REMOTE_NODE, None)
        );
        assert_eq!(
            d.ipcache.len(),
            4,
            "the pod without identity is not in ipcache"
        );
        assert_eq!(
            d.routes,
            BTreeMap::from([(
                net("10.200.1.0/24"),
                RouteVia::Tunnel {
                    src: Ipv4Addr::new(10, 250, 0, 10)
                }
            )])
        );
        assert_eq!(d.local.len(), 1);
        assert_eq!(d.local[0].key.name, "pa");
        assert_eq!(d.local[0].revision, 3);
        assert_eq!(d.local[0].endpoint_id, 5);
        assert_eq!(d.pending.len(), 1);
        assert_eq!(d.pending[0].0.name, "pending");
    }

    #[test]
    fn native_routes_via_the_other_node_without_tunnel_endpoints() {
        let (nns, eps) = cluster();
        let d = desired("b", RoutingMode::Native, &nns, &eps, NO_SLICES);
        assert_eq!(
            d.routes,
            BTreeMap::from([(
                net("10.200.0.0/24"),
                RouteVia::Gateway(IpAddr::V4(Ipv4Addr::new(10, 250, 0, 10)))
            )])
        );
        assert_eq!(
            d.ipcache[&net("10.200.0.5/32")],
            IpcacheValue::new(300, None)
        );
        assert_eq!(d.local.len(), 1);
        assert_eq!(d.local[0].key.name, "pb");
        assert!(
            d.pending.is_empty(),
            "pending is only about local endpoints"
        );
    }

    /// Both nodes dual stack: an IPv6 underlay address beside the IPv4 one, an IPv6 pod CIDR
    /// and dual-stack pods.
    fn dual_stack_cluster() -> (Vec<NodeNetwork>, Vec<Endpoint>) {
        let (mut nns, mut eps) = cluster();
        for (i, nn) in nns.iter_mut().enumerate() {
            nn.spec.addresses.push(NodeAddress {
                type_: "InternalIP".into(),
                address: format!("fd00:250::{}", 10 + i),
            });
            nn.spec.pod_cidrs.push(format!("fd00:210::{i}:0/112"));
        }
        eps[0].spec.ips.push("fd00:210::5".into());
        eps[1].spec.ips.push("fd00:210::1:7".into());
        (nns, eps)
    }

    #[test]
    fn overlay_carries_remote_ipv6_pods_in_the_ipv4_underlay() {
        let (nns, eps) = dual_stack_cluster();
        let d = desired("a", RoutingMode::Overlay, &nns, &eps, NO_SLICES);
        let src = Ipv4Addr::new(10, 250, 0, 10);
        assert_eq!(
            d.routes,
            BTreeMap::from([
                (net("10.200.1.0/24"), RouteVia::Tunnel { src }),
                (net("fd00:210::1:0/112"), RouteVia::Tunnel { src }),
            ])
        );
        assert_eq!(
            d.ipcache[&net("fd00:210::1:7/128")],
            IpcacheValue::new(301, Some(Ipv4Addr::new(10, 250, 0, 11))),
            "the remote pod's identity and its node's IPv4 address as tunnel endpoint"
        );
        assert_eq!(
            d.ipcache[&net("fd00:210::5/128")],
            IpcacheValue::new(300, None)
        );
        assert_eq!(
            d.ipcache[&net("fd00:250::10/128")],
            IpcacheValue::local_node(IDENTITY_HOST)
        );
        assert_eq!(
            d.ipcache[&net("fd00:250::11/128")],
            IpcacheValue::new(IDENTITY_REMOTE_NODE, None)
        );
        // Its own IPv6 InternalIP: the source of SNATed IPv6 services (node_config6).
        assert_eq!(d.node_ip6, Some("fd00:250::10".parse().unwrap()));
    }

    #[test]
    fn native_routes_ipv6_via_the_other_nodes_ipv6_address() {
        let (mut nns, eps) = dual_stack_cluster();
        let d = desired("b", RoutingMode::Native, &nns, &eps, NO_SLICES);
        assert_eq!(
            d.routes,
            BTreeMap::from([
                (
                    net("10.200.0.0/24"),
                    RouteVia::Gateway(IpAddr::V4(Ipv4Addr::new(10, 250, 0, 10)))
                ),
                (
                    net("fd00:210::/112"),
                    RouteVia::Gateway("fd00:250::10".parse().unwrap())
                ),
            ])
        );
        assert_eq!(
            d.ipcache[&net("fd00:210::5/128")],
            IpcacheValue::new(300, None)
        );
        // Without an IPv6 address of the other node there is no IPv6 next hop.
        nns[0].spec.addresses.retain(|a| !a.address.contains(':'));
        let d = desired("b", RoutingMode::Native, &nns, &eps, NO_SLICES);
        assert_eq!(d.routes.keys().collect::<Vec<_>>(), [&net("10.200.0.0/24")]);
    }

    #[test]
    fn a_node_without_address_gets_no_tunnel_and_no_route() {
        let (mut nns, eps) = cluster();
        nns[1].spec.addresses.clear();
        let d = desired("a", RoutingMode::Overlay, &nns, &eps, NO_SLICES);
        assert!(d.routes.is_empty());
        assert!(!d.ipcache.contains_key(&net("10.200.1.7/32")));
        let d = desired("b", RoutingMode::Overlay, &nns, &eps, NO_SLICES);
        assert_eq!(d.node_ip, None);
        assert!(d.routes.is_empty());
    }

    #[test]
    fn ready_apiserver_addresses_get_the_kube_apiserver_identity() {
        let (nns, eps) = cluster();
        let slices = [
            slice(
                "IPv4",
                &[
                    ("192.0.2.10", Some(true)),
                    // No conditions: ready, as the API defines.
                    ("192.0.2.11", None),
                    ("192.0.2.12", Some(false)),
                ],
            ),
            slice("IPv6", &[("2001:db8::10", Some(true))]),
            slice("FQDN", &[("api.example.com", Some(true))]),
        ];
        for mode in [RoutingMode::Overlay, RoutingMode::Native] {
            let d = desired("a", mode, &nns, &eps, &slices);
            assert_eq!(
                with_identity(&d, IDENTITY_KUBE_APISERVER),
                vec![net("192.0.2.10/32"), net("192.0.2.11/32")],
                "{mode:?}: only ready IPv4 addresses"
            );
            assert_eq!(
                d.ipcache[&net("192.0.2.10/32")],
                IpcacheValue::new(IDENTITY_KUBE_APISERVER, None),
                "{mode:?}: the host stack routes to it, never the tunnel"
            );
            assert_eq!(
                d.ipcache.len(),
                6,
                "{mode:?}: 2 nodes, 2 pods, 2 apiservers"
            );
        }
        let without = desired("a", RoutingMode::Overlay, &nns, &eps, NO_SLICES);
        assert!(
            with_identity(&without, IDENTITY_KUBE_APISERVER).is_empty(),
            "no slices (none listed, or not allowed to list them): no apiserver entries"
        );
    }

    #[test]
    fn node_and_pod_addresses_keep_their_identity_when_the_apiserver_uses_them() {
        let (nns, eps) = cluster();
        // The apiserver on both nodes' addresses (host network) and on a pod's.
        let slices = [slice(
            "IPv4",
            &[
                ("10.250.0.10", Some(true)),
                ("10.250.0.11", Some(true)),
                ("10.200.1.7", Some(true)),
            ],
        )];
        let d = desired("a", RoutingMode::Overlay, &nns, &eps, &slices);
        assert_eq!(
            d.ipcache[&net("10.250.0.10/32")],
            IpcacheValue::local_node(IDENTITY_HOST)
        );
        assert_eq!(
            d.ipcache[&net("10.250.0.11/32")],
            IpcacheValue::new(IDENTITY_REMOTE_NODE, None)
        );
        assert_eq!(
            d.ipcache[&net("10.200.1.7/32")],
            IpcacheValue::new(301, Some(Ipv4Addr::new(10, 250, 0, 11)))
        );
        assert!(with_identity(&d, IDENTITY_KUBE_APISERVER).is_empty());
        assert_eq!(
            d,
            desired("a", RoutingMode::Overlay, &nns, &eps, NO_SLICES),
            "nothing else changes either"
        );
    }
}
