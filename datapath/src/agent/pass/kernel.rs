//! The netlink half of a convergence pass, run on a thread inside the node's network
//! namespace (see `cni::link::run_in`): the VXLAN device, IPv4 and IPv6 forwarding, routes to the
//! other nodes' pod CIDRs, the host veths of local pods, and the programs attached to all
//! of them.
//!
//! Ownership: routes the agent installs carry [`ROUTE_PROTOCOL`], and only routes with it
//! are ever replaced or deleted, so routes of the CNI plugin, the admin or a routing daemon
//! are never touched. The tunnel device is the one named in the configuration.
//!
//! Local pods are found through the kernel, not through CNI records: the host veth of a pod
//! is the output interface of the node's `/32` (`/128`) route to its address (which the
//! plugin installs with the veth), and the pod's MAC is the permanent neighbour entry the
//! plugin adds beside it. That is what packets follow, so it is what the `endpoints` map
//! must say — and it also holds after an agent restart with no state of its own.

use super::index::RouteVia;
use crate::bpf::{Hook, Programs, loader};
use crate::cni::link::{self, LinkError};
use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// `rtm_protocol` of every route the agent owns (unassigned in iproute2's rt_protos).
pub const ROUTE_PROTOCOL: u8 = 201;
/// VXLAN header + outer UDP/IPv4/Ethernet.
const VXLAN_OVERHEAD: u32 = 50;
const MAIN_TABLE: u8 = 254;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("{context}: {source}")]
    Netlink {
        context: String,
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("{path}: {source}")]
    Sysctl {
        path: String,
        source: std::io::Error,
    },
}

fn nl(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    let context = context.into();
    move |source| KernelError::Netlink { context, source }
}

/// What the netlink side should look like.
#[derive(Clone, Debug)]
pub struct NetlinkPlan {
    pub node_ip: Option<Ipv4Addr>,
    /// The VXLAN device (`None`: native routing, the device must not exist).
    pub tunnel: Option<TunnelPlan>,
    pub tunnel_device: String,
    pub routes: BTreeMap<IpNet, RouteVia>,
    /// Addresses of local pods whose host veth is wanted.
    pub local_ips: Vec<IpAddr>,
    /// Delete stale routes.
    pub prune: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct TunnelPlan {
    pub port: u16,
}

/// A local pod's wiring as the kernel has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wiring {
    pub ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
}

#[derive(Debug, Default)]
pub struct NetlinkOutcome {
    pub tunnel_ifindex: Option<u32>,
    pub wiring: BTreeMap<IpAddr, Wiring>,
    /// What the programs go on: (hook, interface name, ifindex).
    pub hooks: Vec<(Hook, String, u32)>,
    /// Interface names present after this pass (link pins of others are pruned).
    pub present: BTreeSet<String>,
    pub routes_added: usize,
    pub routes_deleted: usize,
    /// Per-item failures: the pass went on with the rest.
    pub errors: Vec<String>,
}

#[derive(Debug, Default)]
pub struct AttachOutcome {
    /// Interfaces (ifindex) with every hook they need attached.
    pub attached: BTreeSet<u32>,
    pub links_pruned: usize,
    pub errors: Vec<String>,
}

/// The programs and which (hook, interface) this process has attached them to: a pinned
/// link from before a restart is re-attached once (to the programs of this binary, without
/// gap), then left alone while the interface keeps its index.
pub struct Attacher {
    pub programs: Programs,
    attached: HashMap<(Hook, String), u32>,
}

impl Attacher {
    pub fn new(programs: Programs) -> Self {
        Self {
            programs,
            attached: HashMap::new(),
        }
    }

    fn ensure(&mut self, hook: Hook, ifname: &str, ifindex: u32) -> Result<(), String> {
        let key = (hook, ifname.to_string());
        if self.attached.get(&key) == Some(&ifindex) {
            return Ok(());
        }
        self.programs
            .attach(hook, ifname)
            .map_err(|e| format!("attaching {} to {ifname}: {e}", hook.as_str()))?;
        tracing::debug!(hook = hook.as_str(), ifname, "attached");
        self.attached.insert(key, ifindex);
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Link {
    index: u32,
    name: String,
    mac: [u8; 6],
    mtu: u32,
    up: bool,
    kind: Option<InfoKind>,
}

fn parse_link(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mac: [0; 6],
        mtu: 0,
        up: message
            .header
            .flags
            .contains(rtnetlink::packet_route::link::LinkFlags::Up),
        kind: None,
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Address(mac) if mac.len() == 6 => link.mac.copy_from_slice(mac),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind.clone());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

async fn links(handle: &Handle) -> Result<Vec<Link>, KernelError> {
    let messages: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing links"))?;
    Ok(messages.iter().map(parse_link).collect())
}

/// One IPv4/IPv6 route of the main table, as far as the agent cares.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    dst: IpNet,
    oif: Option<u32>,
    gateway: Option<IpAddr>,
    src: Option<Ipv4Addr>,
    ours: bool,
    message: RouteMessage,
}

fn parse_route(message: RouteMessage) -> Option<Route> {
    let mut table = u32::from(message.header.table);
    let (mut dst, mut oif, mut gateway, mut src) = (None, None, None, None);
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(v4)) => gateway = Some(IpAddr::V4(*v4)),
            RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => gateway = Some(IpAddr::V6(*v6)),
            RouteAttribute::PrefSource(RouteAddress::Inet(v4)) => src = Some(*v4),
            _ => {}
        }
    }
    if table != u32::from(MAIN_TABLE) {
        return None;
    }
    let dst = IpNet::new(dst?, message.header.destination_prefix_length).ok()?;
    Some(Route {
        dst,
        oif,
        gateway,
        src,
        ours: message.header.protocol == RouteProtocol::from(ROUTE_PROTOCOL),
        message,
    })
}

async fn routes(handle: &Handle) -> Result<Vec<Route>, KernelError> {
    let mut out = Vec::new();
    for request in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let messages: Vec<RouteMessage> = handle
            .route()
            .get(request)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes"))?;
        out.extend(messages.into_iter().filter_map(parse_route));
    }
    Ok(out)
}

/// `ip neigh`: (ifindex, ip) → MAC.
async fn neighbours(handle: &Handle) -> Result<HashMap<(u32, IpAddr), [u8; 6]>, KernelError> {
    let messages: Vec<_> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing neighbours"))?;
    let mut out = HashMap::new();
    for message in messages {
        let (mut ip, mut mac) = (None, None);
        for attribute in &message.attributes {
            match attribute {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    ip = Some(IpAddr::V4(*v4));
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    ip = Some(IpAddr::V6(*v6));
                }
                NeighbourAttribute::LinkLayerAddress(lla) if lla.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(lla);
                    mac = Some(m);
                }
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            out.insert((message.header.ifindex, ip), mac);
        }
    }
    Ok(out)
}

/// Writes `value` to a sysctl of the calling thread's network namespace if it differs.
fn sysctl(path: &str, value: &str) -> Result<(), KernelError> {
    let err = |source| KernelError::Sysctl {
        path: path.to_string(),
        source,
    };
    let current = std::fs::read_to_string(path).map_err(err)?;
    if current.trim() != value {
        std::fs::write(path, value).map_err(err)?;
    }
    Ok(())
}

/// Makes the collect-metadata VXLAN device exist, be up with ARP off, IPv6 on without any
/// address of its own, and the uplink's MTU minus the encapsulation. Returns its ifindex.
async fn ensure_tunnel(
    handle: &Handle,
    name: &str,
    port: u16,
    mtu: u32,
    current: Option<&Link>,
) -> Result<u32, KernelError> {
    let link = match current {
        Some(link) if link.kind.as_ref() != Some(&InfoKind::Vxlan) => {
            return Err(KernelError::Conflict(format!(
                "{name} exists and is not a VXLAN device ({:?})",
                link.kind
            )));
        }
        Some(link) => link.clone(),
        None => {
            handle
                .link()
                .add(
                    rtnetlink::LinkMessageBuilder::<LinkVxlan>::new(name)
                        .port(port)
                        .collect_metadata(true)
                        .learning(false)
                        .mtu(mtu)
                        .arp(false)
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("creating {name}")))?;
            tracing::info!(device = name, port, mtu, "created the VXLAN device");
            links(handle)
                .await?
                .into_iter()
                .find(|l| l.name == name)
                .ok_or_else(|| KernelError::Conflict(format!("{name} vanished after creation")))?
        }
    };
    // Pods' IPv6 crosses the device (bpf_overlay.c), so the stack must route IPv6 into and
    // out of it; without an address of its own (no link-local: addr_gen_mode none, set
    // before IPv6 is on) it sends no neighbour discovery or MLD of its own. A kernel
    // without IPv6 has no such files.
    let ipv6_conf = format!("/proc/sys/net/ipv6/conf/{name}");
    if std::path::Path::new(&ipv6_conf).exists() {
        sysctl(&format!("{ipv6_conf}/addr_gen_mode"), "1")?;
        sysctl(&format!("{ipv6_conf}/disable_ipv6"), "0")?;
    }
    if link.mtu != mtu || !link.up {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(link.index)
                    .mtu(mtu)
                    .arp(false)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("setting {name} up")))?;
    }
    Ok(link.index)
}

/// The route to `dst`; `None` when it cannot be made (no tunnel device yet, a next hop
/// of the other family).
fn route_message(dst: &IpNet, via: RouteVia, tunnel_ifindex: Option<u32>) -> Option<RouteMessage> {
    match dst {
        IpNet::V4(dst) => {
            let builder = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
            Some(match via {
                RouteVia::Tunnel { src } => builder
                    .output_interface(tunnel_ifindex?)
                    .pref_source(src)
                    .scope(RouteScope::Link)
                    .build(),
                RouteVia::Gateway(IpAddr::V4(gateway)) => builder.gateway(gateway).build(),
                RouteVia::Gateway(IpAddr::V6(_)) => return None,
            })
        }
        IpNet::V6(dst) => {
            let builder = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
            Some(match via {
                // IPv6 inside the IPv4 underlay: the device has no IPv6 address to prefer.
                RouteVia::Tunnel { .. } => builder.output_interface(tunnel_ifindex?).build(),
                RouteVia::Gateway(IpAddr::V6(gateway)) => builder.gateway(gateway).build(),
                RouteVia::Gateway(IpAddr::V4(_)) => return None,
            })
        }
    }
}

fn matches(route: &Route, via: RouteVia, tunnel_ifindex: Option<u32>) -> bool {
    match via {
        RouteVia::Tunnel { src } => {
            let src = match route.dst {
                IpNet::V4(_) => Some(src),
                IpNet::V6(_) => None,
            };
            route.oif == tunnel_ifindex && route.src == src && route.gateway.is_none()
        }
        RouteVia::Gateway(gateway) => route.gateway == Some(gateway),
    }
}

/// Converges the netlink state of `netns` (the agent's own namespace when `None`) to
/// `plan` and finds where the programs go. Blocking: call from a blocking task.
pub fn converge(netns: Option<PathBuf>, plan: NetlinkPlan) -> Result<NetlinkOutcome, KernelError> {
    let result = link::run_in(netns.as_deref(), move |handle| async move {
        converge_in(&handle, &plan)
            .await
            .map_err(|e| LinkError::Missing(e.to_string()))
    });
    result.map_err(KernelError::from)
}

/// Attaches the programs to `hooks` (in `netns`) and, with `prune`, removes the link pins
/// of interfaces not in `present` (their links are defunct; the pins only hold memory).
/// Called after the maps are converged, so a pod's programs never run before its
/// `endpoints` entry exists (its packets would be dropped as spoofed). Blocking.
pub fn attach(
    netns: Option<PathBuf>,
    pin_dir: PathBuf,
    hooks: Vec<(Hook, String, u32)>,
    present: BTreeSet<String>,
    prune: bool,
    attacher: Arc<Mutex<Attacher>>,
) -> Result<AttachOutcome, KernelError> {
    let result = link::run_in(netns.as_deref(), move |_handle| async move {
        let mut out = AttachOutcome::default();
        let mut attacher = attacher.lock().unwrap_or_else(|p| p.into_inner());
        let mut failed = BTreeSet::new();
        for (hook, ifname, index) in &hooks {
            match attacher.ensure(*hook, ifname, *index) {
                Ok(()) => {
                    out.attached.insert(*index);
                }
                Err(e) => {
                    failed.insert(*index);
                    out.errors.push(e);
                }
            }
        }
        out.attached.retain(|index| !failed.contains(index));
        if prune {
            match loader::prune_links(&pin_dir, |ifname, _| present.contains(ifname)) {
                Ok(removed) => {
                    for (ifname, hook) in &removed {
                        attacher.attached.remove(&(*hook, ifname.clone()));
                    }
                    out.links_pruned = removed.len();
                }
                Err(e) => out.errors.push(format!("pruning link pins: {e}")),
            }
        }
        Ok(out)
    });
    result.map_err(KernelError::from)
}

async fn converge_in(handle: &Handle, plan: &NetlinkPlan) -> Result<NetlinkOutcome, KernelError> {
    let mut out = NetlinkOutcome::default();
    sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    // IPv6 pods are routed through the stack too (their /128 routes point at the veths the
    // plugin made; bpf/lib/ipv6.h judges them at both veths). A kernel without IPv6 has no
    // such file and no IPv6 pods.
    const IPV6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
    if std::path::Path::new(IPV6_FORWARDING).exists() {
        sysctl(IPV6_FORWARDING, "1")?;
    }

    let all_links = links(handle).await?;
    let by_name: HashMap<&str, &Link> = all_links.iter().map(|l| (l.name.as_str(), l)).collect();
    let by_index: HashMap<u32, &Link> = all_links.iter().map(|l| (l.index, l)).collect();
    let current_routes = routes(handle).await?;

    // The uplink: the interface holding the node's address (its /32 local route's oif is
    // not in the main table, so look at the addresses).
    let uplink = match plan.node_ip {
        Some(ip) => uplink_of(handle, IpAddr::V4(ip), &by_index).await?,
        None => None,
    };

    match plan.tunnel {
        Some(tunnel) => {
            let mtu = uplink
                .map_or(1500, |l| l.mtu)
                .saturating_sub(VXLAN_OVERHEAD);
            let index = ensure_tunnel(
                handle,
                &plan.tunnel_device,
                tunnel.port,
                mtu,
                by_name.get(plan.tunnel_device.as_str()).copied(),
            )
            .await?;
            out.tunnel_ifindex = Some(index);
        }
        None => {
            if let Some(link) = by_name.get(plan.tunnel_device.as_str())
                && link.kind == Some(InfoKind::Vxlan)
            {
                link::delete_link(handle, &link.name).await?;
                tracing::info!(device = %link.name, "removed the VXLAN device (native routing)");
            }
        }
    }

    // Routes to other nodes' pod CIDRs.
    for (dst, via) in &plan.routes {
        let present = current_routes.iter().find(|r| r.dst == *dst);
        if let Some(route) = present
            && !route.ours
        {
            out.errors.push(format!(
                "a route to {dst} not installed by tendril exists; leaving it"
            ));
            continue;
        }
        if present.is_some_and(|r| matches(r, *via, out.tunnel_ifindex)) {
            continue;
        }
        let Some(message) = route_message(dst, *via, out.tunnel_ifindex) else {
            continue;
        };
        match handle.route().add(message).replace().execute().await {
            Ok(()) => out.routes_added += 1,
            Err(e) => out.errors.push(format!("route {dst}: {e}")),
        }
    }
    if plan.prune {
        for route in current_routes
            .iter()
            .filter(|r| r.ours && !plan.routes.contains_key(&r.dst))
        {
            match handle.route().del(route.message.clone()).execute().await {
                Ok(()) => out.routes_deleted += 1,
                Err(e) if link::is_gone(&e) => {}
                Err(e) => out
                    .errors
                    .push(format!("deleting route {}: {e}", route.dst)),
            }
        }
    }

    // Local pods: host veth from the host route, pod MAC from the neighbour entry.
    let neigh = neighbours(handle).await?;
    for ip in &plan.local_ips {
        let host = IpNet::from(*ip);
        let Some(link) = current_routes
            .iter()
            .find(|r| r.dst == host && !r.ours)
            .and_then(|r| r.oif)
            .and_then(|i| by_index.get(&i))
        else {
            continue;
        };
        let Some(pod_mac) = neigh.get(&(link.index, *ip)) else {
            continue;
        };
        out.wiring.insert(
            *ip,
            Wiring {
                ifindex: link.index,
                host_mac: link.mac,
                pod_mac: *pod_mac,
            },
        );
    }

    // Where the programs go.
    let veths: BTreeSet<u32> = out.wiring.values().map(|w| w.ifindex).collect();
    for index in veths {
        let name = &by_index[&index].name;
        for hook in [Hook::FromContainer, Hook::ToContainer] {
            out.hooks.push((hook, name.clone(), index));
        }
    }
    if let Some(index) = out.tunnel_ifindex {
        for hook in [Hook::FromOverlay, Hook::ToOverlay] {
            out.hooks.push((hook, plan.tunnel_device.clone(), index));
        }
    }
    if let Some(uplink) = uplink {
        out.hooks
            .push((Hook::FromNetdev, uplink.name.clone(), uplink.index));
    }
    out.present = all_links.iter().map(|l| l.name.clone()).collect();
    // Created (or removed) in this pass, after the listing.
    if out.tunnel_ifindex.is_some() {
        out.present.insert(plan.tunnel_device.clone());
    } else {
        out.present.remove(&plan.tunnel_device);
    }
    Ok(out)
}

async fn uplink_of<'a>(
    handle: &Handle,
    ip: IpAddr,
    by_index: &HashMap<u32, &'a Link>,
) -> Result<Option<&'a Link>, KernelError> {
    let messages: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing addresses"))?;
    Ok(messages
        .iter()
        .find(|m| {
            m.attributes.iter().any(|a| {
                matches!(a, rtnetlink::packet_route::address::AddressAttribute::Address(a) if *a == ip)
            })
        })
        .and_then(|m| by_index.get(&m.header.index).copied()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(message: RouteMessage) -> Route {
        parse_route(message).expect("a main-table route")
    }

    #[test]
    fn owned_routes_round_trip_and_match_their_intent() {
        let dst: IpNet = "10.200.1.0/24".parse().unwrap();
        let src = Ipv4Addr::new(10, 250, 0, 10);
        let tunnel = RouteVia::Tunnel { src };
        let mut message = route_message(&dst, tunnel, Some(7)).unwrap();
        message.header.table = MAIN_TABLE;
        let route = parsed(message);
        assert!(route.ours, "carries the tendril protocol");
        assert_eq!(route.dst, dst);
        assert!(matches(&route, tunnel, Some(7)));
        assert!(!matches(&route, tunnel, Some(8)), "tunnel device recreated");
        assert!(!matches(
            &route,
            RouteVia::Tunnel {
                src: Ipv4Addr::new(10, 250, 0, 11)
            },
            Some(7)
        ));
        assert!(!matches(
            &route,
            RouteVia::Gateway(IpAddr::V4(Ipv4Addr::new(10, 250, 0, 11))),
            Some(7)
        ));

        let via = RouteVia::Gateway(IpAddr::V4(Ipv4Addr::new(10, 250, 0, 11)));
        let mut message = route_message(&dst, via, None).unwrap();
        message.header.table = MAIN_TABLE;
        let route = parsed(message);
        assert!(matches(&route, via, None));
        assert!(!matches(&route, tunnel, Some(7)));
    }

    #[test]
    fn without_a_tunnel_device_there_is_no_overlay_route() {
        let dst: IpNet = "10.200.1.0/24".parse().unwrap();
        let tunnel = RouteVia::Tunnel {
            src: Ipv4Addr::new(10, 250, 0, 10),
        };
        assert!(route_message(&dst, tunnel, None).is_none());
        let v6: IpNet = "fd00::/64".parse().unwrap();
        assert!(route_message(&v6, tunnel, None).is_none());
    }

    #[test]
    fn ipv6_routes_go_into_the_tunnel_or_via_an_ipv6_next_hop_only() {
        let dst: IpNet = "fd00:210::1:0/112".parse().unwrap();
        let tunnel = RouteVia::Tunnel {
            src: Ipv4Addr::new(10, 250, 0, 10),
        };
        let mut message = route_message(&dst, tunnel, Some(7)).unwrap();
        message.header.table = MAIN_TABLE;
        let route = parsed(message);
        assert!(route.ours);
        assert_eq!(route.dst, dst);
        assert_eq!(route.src, None, "no IPv4 source on an IPv6 route");
        assert!(matches(&route, tunnel, Some(7)));
        assert!(!matches(&route, tunnel, Some(8)));

        let via = RouteVia::Gateway("fd00:250::11".parse().unwrap());
        let mut message = route_message(&dst, via, None).unwrap();
        message.header.table = MAIN_TABLE;
        let route = parsed(message);
        assert!(matches(&route, via, None));
        assert!(!matches(&route, tunnel, Some(7)));

        // Linux has no IPv6 route via an IPv4 next hop, nor the other way round.
        let v4_next_hop = RouteVia::Gateway(IpAddr::V4(Ipv4Addr::new(10, 250, 0, 11)));
        assert!(route_message(&dst, v4_next_hop, None).is_none());
        let v4: IpNet = "10.200.1.0/24".parse().unwrap();
        assert!(route_message(&v4, via, None).is_none());
    }

    #[test]
    fn routes_of_other_tables_and_protocols_are_not_ours() {
        let dst: IpNet = "10.200.1.0/24".parse().unwrap();
        let mut message = route_message(
            &dst,
            RouteVia::Gateway(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            None,
        )
        .unwrap();
        message.header.table = 255;
        assert!(parse_route(message.clone()).is_none(), "local table");
        message.header.table = MAIN_TABLE;
        message.header.protocol = RouteProtocol::Boot;
        assert!(!parsed(message).ours);
    }
}
