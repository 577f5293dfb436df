//! Step `egress`: every `EgressRoute` into the egress gateway maps of `bpf/lib/egress.h`,
//! and the egress IPs of the routes this node is the gateway of onto its interface.
//!
//! - `egress_policy`: for each route, each source pod that lives on this node (all of the
//!   route's sources when this node is its gateway, whose `from_overlay` SNATs what the
//!   others tunnel to it) × each destination prefix → gateway address and egress IP, and ×
//!   each excluded prefix → "excluded" (the longer prefix wins the LPM lookup). A route
//!   without gateway keeps its entries with gateway 0: the programs drop that traffic
//!   rather than let it out with a pod address. Two routes claiming the same (source,
//!   destination): the first by name wins.
//! - `egress_exempt`: what is never steered nor SNATed, whatever a route says: every node's
//!   pod CIDRs and addresses, and every service frontend address (ClusterIPs, LoadBalancer
//!   IPs, externalIPs); empty while there is no route. The programs also skip anything the
//!   ipcache knows with an identity other than world.
//! - On the gateway, the egress IP (`/32`, label `<interface>:eg`, so the agent knows
//!   its own) goes on the route's interface, or on the uplink (the interface with the node's
//!   address); the kernel then answers ARP for it, and a gratuitous ARP announces it
//!   whenever it is added, so the outside switches over at once after a failover. Labelled
//!   addresses no route needs any more are removed. A route naming an interface without an
//!   egress IP SNATs to that interface's first IPv4 address; one naming neither, to the
//!   node's address.
//!
//! Metrics: `tendril_egress_policy_entries`, `tendril_egress_gateway_routes` (routes this node
//! is the gateway of), `tendril_egress_programmed_gateway_changes_total` (routes whose
//! gateway changed, as this node programmed them), `tendril_egress_nat_entries` (the SNAT table's occupancy, sampled
//! with the other maps); packets steered, SNATed and dropped are in
//! `tendril_datapath_packets_total` / `tendril_datapath_drops_total` with the `egress_*`
//! reasons.

use super::{MapGroup, MapOutcome, NodeContext, Pass, Step, StepFailure};
use crate::bpf::maps::{self, EGRESS_F_EXCLUDED, EgressValue};
use crate::bpf::{AnyKey, MapPressure};
use crate::cni::link::{self, LinkError};
use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use tendril_crds::v1alpha1::{EgressRoute, LBService, NodeNetwork};

/// The suffix of the label of the addresses this step adds (`eth0:eg`).
const LABEL_SUFFIX: &str = ":eg";

/// The egress step's metrics.
#[derive(Clone, Debug)]
pub struct EgressMetrics {
    pub policy_entries: Gauge,
    pub gateway_routes: Gauge,
    pub gateway_changes: Counter,
    pub nat_entries: Gauge,
}

impl EgressMetrics {
    pub fn register(metrics: &tendril_runtime::Metrics) -> Self {
        Self {
            policy_entries: metrics.domain(
                "tendril_egress_policy_entries",
                "Entries of the egress_policy map (source pod x destination or excluded prefix)",
                Gauge::default,
            ),
            gateway_routes: metrics.domain(
                "tendril_egress_gateway_routes",
                "EgressRoutes this node is the gateway of (it SNATs their traffic)",
                Gauge::default,
            ),
            gateway_changes: metrics.domain(
                "tendril_egress_programmed_gateway_changes",
                "EgressRoutes whose gateway node changed, as this node programmed them",
                Counter::default,
            ),
            nat_entries: metrics.domain(
                "tendril_egress_nat_entries",
                "Entries of the egress SNAT table (two per connection this node SNATs as a gateway)",
                Gauge::default,
            ),
        }
    }

    /// Publishes the SNAT table's occupancy from the periodic map sample.
    pub fn observe_pressure(&self, pressure: &[MapPressure]) {
        if let Some(nat) = pressure.iter().find(|p| p.map == maps::EGRESS_NAT) {
            self.nat_entries.set(i64::from(nat.entries));
        }
    }
}

/// Seconds of CLOCK_MONOTONIC: the programs' clock (`bpf_ktime_get_ns`).
fn monotonic_seconds() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u32::try_from(ts.tv_sec).unwrap_or(u32::MAX)
}

/// The periodic side of the SNAT table (every few seconds, beside the map sampling):
/// removes idle connections, and reports SNAT failures (a full table, or no free port)
/// with a log and a Warning Event `EgressSNATFailed` on the node's NodeNetwork whenever
/// their count grew.
#[derive(Default)]
pub struct NatWatch {
    /// `egress_snat_failed` packets counted so far (`None` before the first sample: what an
    /// earlier process saw is not news).
    failures: Option<u64>,
    recorder: Option<kube::runtime::events::Recorder>,
}

impl NatWatch {
    pub async fn observe(&mut self, node: &NodeContext) {
        let now = monotonic_seconds();
        let sampled = node
            .with_dataplane(move |dp| {
                let removed = dp.egress.gc_nat(now)?;
                let failures: u64 = dp
                    .metrics
                    .samples()?
                    .iter()
                    .filter(|s| s.reason == Some(maps::MetricReason::DropEgressSnat))
                    .map(|s| s.packets)
                    .sum();
                let pressure = dp.egress.nat_pressure();
                Ok::<_, crate::bpf::DataplaneError>((removed, failures, pressure))
            })
            .await;
        let (removed, failures, pressure) = match sampled {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "egress SNAT table upkeep failed");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e.message, "egress SNAT table upkeep failed");
                return;
            }
        };
        if removed > 0 {
            tracing::debug!(removed, "idle egress SNAT connections removed");
        }
        node.metrics.egress.observe_pressure(&[pressure]);
        let before = self.failures.replace(failures);
        let Some(before) = before.filter(|b| failures > *b) else {
            return;
        };
        let note = format!(
            "{} packets of new egress gateway connections could not be SNATed: egress_nat holds {}/{} entries (two per connection) or no port was free; raise bpfMapSizes.egressNat",
            failures - before,
            pressure.entries,
            pressure.max_entries
        );
        tracing::error!(%note, "egress SNAT failures");
        let own = node
            .view
            .node_networks
            .store()
            .get(&kube::runtime::reflector::ObjectRef::new(
                &node.cfg.node_name,
            ));
        let Some(own) = own else { return };
        let recorder = self.recorder.get_or_insert_with(|| {
            kube::runtime::events::Recorder::new(
                node.client.clone(),
                kube::runtime::events::Reporter {
                    controller: "tendril-agent".into(),
                    instance: Some(node.cfg.node_name.clone()),
                },
            )
        });
        use kube::Resource;
        tendril_runtime::events::publish_warning(
            recorder,
            &own.object_ref(&()),
            "EgressSNATFailed",
            &note,
            "SNATEgress",
        )
        .await;
    }
}

/// One route as the step reads it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteInput {
    pub name: String,
    pub sources: Vec<Ipv4Addr>,
    pub destinations: Vec<Ipv4Net>,
    pub excluded: Vec<Ipv4Net>,
    pub gateway_node: Option<String>,
    pub gateway_ip: Option<Ipv4Addr>,
    pub egress_ip: Option<Ipv4Addr>,
    pub interface: Option<String>,
}

/// What the IPv4 parts of `route` say (IPv6 entries are left out: the datapath is IPv4).
pub fn route_input(route: &EgressRoute) -> RouteInput {
    let v4 = |s: &String| s.parse::<Ipv4Addr>().ok();
    let nets = |list: &[String]| -> Vec<Ipv4Net> {
        list.iter()
            .filter_map(|c| c.parse::<IpNet>().ok())
            .filter_map(|n| match n {
                IpNet::V4(n) => Some(n.trunc()),
                IpNet::V6(_) => None,
            })
            .collect()
    };
    RouteInput {
        name: route.metadata.name.clone().unwrap_or_default(),
        sources: route.spec.source_ips.iter().filter_map(v4).collect(),
        destinations: nets(&route.spec.destination_cidrs),
        excluded: nets(&route.spec.excluded_cidrs),
        gateway_node: route.spec.gateway_node.clone(),
        gateway_ip: route.spec.gateway_ip.as_ref().and_then(v4),
        egress_ip: route.spec.egress_ip.as_ref().and_then(v4),
        interface: route.spec.interface.clone(),
    }
}

/// Where this node's egress IP of one route goes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EgressAddress {
    /// `None`: the uplink.
    pub interface: Option<String>,
    pub ip: Ipv4Addr,
}

/// What the step converges.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub policy: BTreeMap<(Ipv4Addr, Ipv4Net), EgressValue>,
    pub exempt: BTreeMap<IpNet, u32>,
    /// Egress IPs to hold on this node's interfaces.
    pub addresses: BTreeSet<EgressAddress>,
    /// Routes this node is the gateway of.
    pub gateway_of: BTreeSet<String>,
    /// Route → gateway node, to count changes.
    pub gateways: BTreeMap<String, Option<String>>,
}

/// The desired egress state of `node` (address `node_ip`, pods `local`).
/// `interface_ips`: the first IPv4 address of each interface a route names.
pub fn desired(
    node: &str,
    node_ip: Option<Ipv4Addr>,
    local: &BTreeSet<Ipv4Addr>,
    routes: &[RouteInput],
    interface_ips: &BTreeMap<String, Ipv4Addr>,
    exempt: impl IntoIterator<Item = IpNet>,
) -> Desired {
    let mut out = Desired {
        exempt: exempt.into_iter().map(|n| (n.trunc(), 1)).collect(),
        ..Desired::default()
    };
    let mut routes: Vec<&RouteInput> = routes.iter().collect();
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    for route in routes {
        out.gateways
            .insert(route.name.clone(), route.gateway_node.clone());
        let is_gateway = route.gateway_node.as_deref() == Some(node) && node_ip.is_some();
        let egress_ip = if is_gateway {
            out.gateway_of.insert(route.name.clone());
            match (route.egress_ip, &route.interface) {
                (Some(ip), interface) => {
                    out.addresses.insert(EgressAddress {
                        interface: interface.clone(),
                        ip,
                    });
                    Some(ip)
                }
                (None, Some(interface)) => interface_ips.get(interface).copied(),
                (None, None) => node_ip,
            }
        } else {
            route.egress_ip
        };
        let value = EgressValue {
            gateway_ip: route.gateway_ip.map_or([0; 4], |ip| ip.octets()),
            egress_ip: egress_ip.map_or([0; 4], |ip| ip.octets()),
            flags: 0,
            pad: 0,
        };
        // A gateway that cannot tell its egress IP (the interface has none) steers nothing
        // through itself: better dropped than SNATed to 0.0.0.0.
        let value = match (is_gateway, egress_ip) {
            (true, None) => EgressValue {
                gateway_ip: [0; 4],
                ..value
            },
            _ => value,
        };
        let excluded = EgressValue {
            flags: EGRESS_F_EXCLUDED,
            ..EgressValue::default()
        };
        for source in route
            .sources
            .iter()
            .filter(|s| is_gateway || local.contains(s))
        {
            for destination in &route.destinations {
                out.policy.entry((*source, *destination)).or_insert(value);
            }
            for prefix in &route.excluded {
                out.policy.entry((*source, *prefix)).or_insert(excluded);
            }
        }
    }
    out
}

/// The cluster's own prefixes: every node's pod CIDRs and addresses, every service
/// frontend address.
pub fn cluster_prefixes<'a>(
    networks: impl IntoIterator<Item = &'a NodeNetwork>,
    services: impl IntoIterator<Item = &'a LBService>,
) -> BTreeSet<IpNet> {
    let mut out = BTreeSet::new();
    for nn in networks {
        out.extend(
            nn.spec
                .pod_cidrs
                .iter()
                .filter_map(|c| c.parse::<IpNet>().ok()),
        );
        out.extend(
            nn.spec
                .addresses
                .iter()
                .filter_map(|a| a.address.parse::<IpAddr>().ok())
                .map(IpNet::from),
        );
    }
    for svc in services {
        out.extend(
            svc.spec
                .frontends
                .iter()
                .filter_map(|f| f.address.as_deref())
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .map(IpNet::from),
        );
    }
    out.into_iter().filter(|n| n.addr().is_ipv4()).collect()
}

fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })
}

fn label_of(message: &AddressMessage) -> Option<&str> {
    message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Label(l) => Some(l.as_str()),
        _ => None,
    })
}

/// The label of our addresses on `ifname`, when it fits IFNAMSIZ.
fn label_for(ifname: &str) -> Option<String> {
    let label = format!("{ifname}{LABEL_SUFFIX}");
    (label.len() < 16).then_some(label)
}

/// What the netlink half found and did.
#[derive(Debug, Default)]
struct NetlinkOutcome {
    interface_ips: BTreeMap<String, Ipv4Addr>,
    added: Vec<Ipv4Addr>,
    removed: Vec<Ipv4Addr>,
}

/// In `netns`: reads the first IPv4 of each of `interfaces`, makes `addresses` present
/// (labelled, gratuitous ARP when added) and removes the labelled addresses no longer
/// wanted. Blocking.
fn converge_addresses(
    netns: Option<PathBuf>,
    node_ip: Option<Ipv4Addr>,
    interfaces: BTreeSet<String>,
    addresses: BTreeSet<EgressAddress>,
) -> Result<NetlinkOutcome, LinkError> {
    link::run_in(netns.as_deref(), move |handle| async move {
        let messages: Vec<AddressMessage> = handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| LinkError::Netlink {
                context: "listing addresses".into(),
                source,
            })?;
        let mut out = NetlinkOutcome::default();
        let uplink = node_ip.and_then(|ip| {
            messages
                .iter()
                .find(|m| address_of(m) == Some(IpAddr::V4(ip)))
                .map(|m| m.header.index)
        });
        let mut names: BTreeMap<String, u32> = BTreeMap::new();
        for name in interfaces
            .iter()
            .chain(addresses.iter().filter_map(|a| a.interface.as_ref()))
        {
            if let Some(l) = link::link_by_name(&handle, name).await? {
                names.insert(name.clone(), l.index);
            }
        }
        for (name, index) in &names {
            if let Some(ip) = messages
                .iter()
                .filter(|m| {
                    m.header.index == *index
                        && label_of(m).is_none_or(|l| !l.ends_with(LABEL_SUFFIX))
                })
                .find_map(|m| match address_of(m) {
                    Some(IpAddr::V4(v4)) => Some(v4),
                    _ => None,
                })
            {
                out.interface_ips.insert(name.clone(), ip);
            }
        }
        // (index, ip) wanted.
        let wanted: BTreeSet<(u32, Ipv4Addr)> = addresses
            .iter()
            .filter_map(|a| {
                let index = match &a.interface {
                    Some(name) => names.get(name).copied(),
                    None => uplink,
                }?;
                Some((index, a.ip))
            })
            .collect();
        for m in &messages {
            let (Some(label), Some(IpAddr::V4(ip))) = (label_of(m), address_of(m)) else {
                continue;
            };
            if label.ends_with(LABEL_SUFFIX) && !wanted.contains(&(m.header.index, ip)) {
                handle
                    .address()
                    .del(m.clone())
                    .execute()
                    .await
                    .map_err(|source| LinkError::Netlink {
                        context: format!("removing egress IP {ip}"),
                        source,
                    })?;
                out.removed.push(ip);
            }
        }
        for (index, ip) in wanted {
            if messages
                .iter()
                .any(|m| m.header.index == index && address_of(m) == Some(IpAddr::V4(ip)))
            {
                continue;
            }
            let Some(link) = link::link_by_index(&handle, index).await? else {
                continue;
            };
            let mut request = handle.address().add(index, IpAddr::V4(ip), 32);
            if let Some(label) = label_for(&link.name) {
                request
                    .message_mut()
                    .attributes
                    .push(AddressAttribute::Label(label));
            }
            request
                .replace()
                .execute()
                .await
                .map_err(|source| LinkError::Netlink {
                    context: format!("adding egress IP {ip} to {}", link.name),
                    source,
                })?;
            if let Err(e) = gratuitous_arp(index, Some(link.mac), ip) {
                tracing::warn!(%ip, interface = %link.name, error = %e, "gratuitous ARP for the egress IP failed");
            }
            out.added.push(ip);
        }
        Ok(out)
    })
}

/// Broadcasts an ARP request for `ip` from `ip` (a gratuitous ARP) out of `ifindex`, so
/// neighbours that knew the address at the previous gateway update their entry.
fn gratuitous_arp(ifindex: u32, mac: Option<[u8; 6]>, ip: Ipv4Addr) -> std::io::Result<()> {
    let Some(mac) = mac else {
        return Ok(());
    };
    let mut frame = [0u8; 42];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&ip.octets());
    frame[38..42].copy_from_slice(&ip.octets());
    let protocol = 0x0806u16.to_be();
    // SAFETY: a fresh socket, closed below; `addr` and `frame` outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol));
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let result = if sent < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        };
        libc::close(fd);
        result
    }
}

/// The step, with what it remembers between passes.
#[derive(Default)]
pub struct Egress {
    /// Route → gateway node, as last programmed.
    gateways: Option<BTreeMap<String, Option<String>>>,
}

impl Step for Egress {
    const NAME: &'static str = "egress";

    async fn run(&mut self, node: &NodeContext, pass: &mut Pass) -> Result<(), StepFailure> {
        let routes: Vec<RouteInput> = node
            .view
            .egress_routes
            .store()
            .state()
            .iter()
            .map(|r| route_input(r))
            .collect();
        // The programs consult the exemptions only for traffic a route matches: without
        // routes there is nothing to exempt (and a cluster's service /32s outgrow the map
        // from 4,096 Services on, which would fail every pass).
        let exempt = if routes.is_empty() {
            BTreeSet::new()
        } else {
            let networks = node.view.node_networks.store().state();
            let services = node.view.lb_services.store().state();
            cluster_prefixes(
                networks.iter().map(|n| n.as_ref()),
                services.iter().map(|s| s.as_ref()),
            )
        };
        let local: BTreeSet<Ipv4Addr> = pass
            .desired
            .local
            .iter()
            .flat_map(|ep| &ep.ips)
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        let name = node.cfg.node_name.clone();
        let node_ip = pass.desired.node_ip;
        // First without interface addresses: which interfaces and egress IPs matter.
        let first = desired(&name, node_ip, &local, &routes, &BTreeMap::new(), []);
        let interfaces: BTreeSet<String> = routes
            .iter()
            .filter(|r| first.gateway_of.contains(&r.name) && r.egress_ip.is_none())
            .filter_map(|r| r.interface.clone())
            .collect();
        let netns = node.cfg.node_netns.clone();
        let addresses = first.addresses.clone();
        let netlink = tokio::task::spawn_blocking(move || {
            converge_addresses(netns, node_ip, interfaces, addresses)
        })
        .await
        .map_err(|e| StepFailure::new("EgressAddressFailed", e))?
        .map_err(|e| StepFailure::new("EgressAddressFailed", e))?;
        for ip in &netlink.added {
            tracing::info!(%ip, "egress IP configured");
        }
        for ip in &netlink.removed {
            tracing::info!(%ip, "egress IP removed");
        }
        let want = desired(
            &name,
            node_ip,
            &local,
            &routes,
            &netlink.interface_ips,
            exempt,
        );
        let metrics = node.metrics.clone();
        let (policy, exempt) = {
            let (policy, exempt) = (want.policy.clone(), want.exempt.clone());
            node.with_dataplane(move |dp| {
                let exempt = dp.egress.converge_exempt(&exempt, true)?;
                metrics.observe_converge(maps::EGRESS_EXEMPT, &exempt);
                let policy = dp.egress.converge_policy(&policy, true)?;
                metrics.observe_converge(maps::EGRESS_POLICY, &policy);
                Ok::<_, crate::bpf::DataplaneError>((policy, exempt))
            })
            .await?
            .map_err(|e| StepFailure::new("MapReadFailed", e))?
        };
        let m = &node.metrics.egress;
        m.policy_entries.set(want.policy.len() as i64);
        m.gateway_routes.set(want.gateway_of.len() as i64);
        if let Some(before) = &self.gateways {
            for (route, gateway) in &want.gateways {
                if before.get(route).is_some_and(|g| g != gateway) {
                    tracing::info!(route, gateway = ?gateway, "egress gateway changed");
                    m.gateway_changes.inc();
                }
            }
        }
        self.gateways = Some(want.gateways);
        pass.maps.push(MapOutcome {
            map: maps::EGRESS_EXEMPT,
            group: MapGroup::Forwarding,
            report: exempt.map_keys(AnyKey::from),
        });
        pass.maps.push(MapOutcome {
            map: maps::EGRESS_POLICY,
            group: MapGroup::Forwarding,
            report: policy.map_keys(AnyKey::from),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, gateway: Option<&str>) -> RouteInput {
        RouteInput {
            name: name.into(),
            sources: vec!["10.200.0.5".parse().unwrap(), "10.200.1.5".parse().unwrap()],
            destinations: vec!["203.0.113.0/24".parse().unwrap()],
            excluded: vec!["203.0.113.128/25".parse().unwrap()],
            gateway_node: gateway.map(str::to_string),
            gateway_ip: gateway.map(|_| "10.250.0.11".parse().unwrap()),
            egress_ip: Some("10.250.0.240".parse().unwrap()),
            interface: None,
        }
    }

    fn local(ips: &[&str]) -> BTreeSet<Ipv4Addr> {
        ips.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    const NODE_IP: Option<Ipv4Addr> = Some(Ipv4Addr::new(10, 250, 0, 10));

    #[test]
    fn a_source_node_steers_only_its_own_pods() {
        let d = desired(
            "node-0",
            NODE_IP,
            &local(&["10.200.0.5"]),
            &[route("r", Some("node-1"))],
            &BTreeMap::new(),
            [],
        );
        let dst: Ipv4Net = "203.0.113.0/24".parse().unwrap();
        let excl: Ipv4Net = "203.0.113.128/25".parse().unwrap();
        let pod: Ipv4Addr = "10.200.0.5".parse().unwrap();
        assert_eq!(d.policy.len(), 2, "{:?}", d.policy);
        assert_eq!(d.policy[&(pod, dst)].gateway_ip, [10, 250, 0, 11]);
        assert_eq!(d.policy[&(pod, excl)].flags, EGRESS_F_EXCLUDED);
        assert!(d.addresses.is_empty());
        assert!(d.gateway_of.is_empty());
    }

    #[test]
    fn the_gateway_serves_every_source_and_holds_the_egress_ip() {
        let d = desired(
            "node-1",
            Some("10.250.0.11".parse().unwrap()),
            &local(&[]),
            &[route("r", Some("node-1"))],
            &BTreeMap::new(),
            [],
        );
        assert_eq!(d.policy.len(), 4);
        assert!(
            d.policy
                .values()
                .filter(|v| v.flags == 0)
                .all(|v| v.egress_ip == [10, 250, 0, 240])
        );
        assert_eq!(
            d.addresses.iter().collect::<Vec<_>>(),
            [&EgressAddress {
                interface: None,
                ip: "10.250.0.240".parse().unwrap()
            }]
        );
        assert!(d.gateway_of.contains("r"));
    }

    #[test]
    fn without_gateway_the_traffic_is_steered_to_nowhere() {
        let d = desired(
            "node-0",
            NODE_IP,
            &local(&["10.200.0.5"]),
            &[route("r", None)],
            &BTreeMap::new(),
            [],
        );
        let pod: Ipv4Addr = "10.200.0.5".parse().unwrap();
        let dst: Ipv4Net = "203.0.113.0/24".parse().unwrap();
        assert_eq!(d.policy[&(pod, dst)].gateway_ip, [0; 4]);
    }

    #[test]
    fn interface_address_or_node_address_when_no_egress_ip() {
        let mut by_interface = route("r", Some("node-1"));
        by_interface.egress_ip = None;
        by_interface.interface = Some("eth1".into());
        let mut by_node = route("s", Some("node-1"));
        by_node.egress_ip = None;
        by_node.destinations = vec!["198.51.100.0/24".parse().unwrap()];
        let ips = BTreeMap::from([("eth1".to_string(), "192.0.2.9".parse().unwrap())]);
        let d = desired(
            "node-1",
            Some("10.250.0.11".parse().unwrap()),
            &local(&[]),
            &[by_interface.clone(), by_node],
            &ips,
            [],
        );
        let pod: Ipv4Addr = "10.200.0.5".parse().unwrap();
        let via_eth1 = d.policy[&(pod, "203.0.113.0/24".parse().unwrap())];
        assert_eq!(via_eth1.egress_ip, [192, 0, 2, 9]);
        let via_node = d.policy[&(pod, "198.51.100.0/24".parse().unwrap())];
        assert_eq!(via_node.egress_ip, [10, 250, 0, 11]);
        assert!(
            d.addresses.is_empty(),
            "nothing to add: the addresses exist"
        );
        // The interface has no address (yet): dropped rather than SNATed to 0.0.0.0.
        let d = desired(
            "node-1",
            Some("10.250.0.11".parse().unwrap()),
            &local(&[]),
            &[by_interface],
            &BTreeMap::new(),
            [],
        );
        assert_eq!(
            d.policy[&(pod, "203.0.113.0/24".parse().unwrap())].gateway_ip,
            [0; 4]
        );
    }

    #[test]
    fn first_route_by_name_wins_a_shared_entry() {
        let mut b = route("b", Some("node-1"));
        b.gateway_ip = Some("10.250.0.12".parse().unwrap());
        let d = desired(
            "node-0",
            NODE_IP,
            &local(&["10.200.0.5"]),
            &[b, route("a", Some("node-1"))],
            &BTreeMap::new(),
            [],
        );
        let pod: Ipv4Addr = "10.200.0.5".parse().unwrap();
        assert_eq!(
            d.policy[&(pod, "203.0.113.0/24".parse().unwrap())].gateway_ip,
            [10, 250, 0, 11]
        );
    }

    #[test]
    fn labels_fit_ifnamsiz() {
        assert_eq!(label_for("eth0").as_deref(), Some("eth0:eg"));
        assert_eq!(label_for("a-very-long-if"), None);
    }
}
