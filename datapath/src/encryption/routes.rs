//! Steering into the WireGuard device, with policy routing only (no BPF):
//!
//! - native routing: rule `priority P lookup <podTable>` (IPv4 and IPv6): the pod CIDRs
//!   of every peer, of both families → the device, so pod traffic the host stack routes
//!   to another node is encrypted (and the answers, arriving on the device, pass the
//!   reverse-path check). The local pod CIDRs are not in the table: node-local traffic
//!   stays direct.
//! - overlay: rule `priority P+1 ipproto udp dport <tunnelPort> lookup <tunnelTable>`:
//!   each peer's node address → the device. The BPF programs redirect pod packets into
//!   the VXLAN device (and the host's own traffic to remote pods is routed there too),
//!   whose outer UDP packets the kernel routes by this rule: the whole VXLAN packet
//!   (identity in the VNI included) travels inside WireGuard. The device's own UDP
//!   packets (another port) never match, so they are not looped back. No pod CIDR is
//!   steered in this mode: the decapsulated packets arrive on the VXLAN device, and a
//!   pod route through WireGuard would fail their reverse-path check.
//! - strict mode: every selected peer also has a `blackhole` route of higher metric in
//!   both tables, so while its key is unknown, or the device is gone (agent restarting),
//!   its traffic is dropped rather than sent in clear.
//!
//! Only rules pointing at the two tables and routes in them are touched.

use crate::cni::link::{self, LinkError};
use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use rtnetlink::{Handle, IpVersion, LinkUnspec, RouteMessageBuilder};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

/// `rtm_protocol` of the agent's routes (as the routing step's).
const ROUTE_PROTOCOL: u8 = 201;
const IPPROTO_UDP: u8 = 17;
/// Metric of the fallback `blackhole` routes (the device routes have 0).
const FALLBACK_METRIC: u32 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Via {
    Device,
    Blackhole,
}

/// One route the plan wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EncRoute {
    pub table: u32,
    pub dst: IpNet,
    pub via: Via,
}

/// One rule the plan wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EncRule {
    pub priority: u32,
    pub table: u32,
    /// Only UDP to this port.
    pub udp_dport: Option<u16>,
    /// An IPv6 rule (else IPv4).
    pub v6: bool,
}

/// The netlink side of encryption on the node.
#[derive(Clone, Debug, Default)]
pub struct SteeringPlan {
    /// The device the routes point at (the key generation in use).
    pub interface: String,
    /// The other running device (a rotation's next or previous generation): up, same MTU,
    /// no reverse-path filtering, no routes.
    pub standby: Option<String>,
    /// The devices' MTU; 0: the uplink's (the interface holding `node_ip`) minus
    /// [`WIREGUARD_OVERHEAD`].
    pub mtu: u32,
    pub node_ip: Option<Ipv4Addr>,
    /// The two tables this module owns (pods, tunnel).
    pub tables: [u32; 2],
    pub rules: BTreeSet<EncRule>,
    pub routes: BTreeSet<EncRoute>,
}

/// Bytes WireGuard adds to a packet on an IPv6 underlay: outer IPv6 header 40, UDP 8,
/// WireGuard data header 16 and tag 16. Used on IPv4 underlays too (20 bytes more than
/// needed there, as `wg-quick` does): the MTU stays right if the underlay becomes IPv6.
pub const WIREGUARD_OVERHEAD: u32 = 80;

#[derive(Debug, Default)]
pub struct SteeringOutcome {
    pub changed: usize,
    /// The devices' MTU (0 when there is no device).
    pub mtu: u32,
    /// Set when the node's reverse-path filter would drop the decrypted packets.
    pub rp_filter_problem: Option<String>,
}

/// Rules and routes for `peers` (pod CIDRs and node address of each; whether its key is
/// known).
pub fn plan_routes(
    pod_table: u32,
    tunnel_table: u32,
    priority: u32,
    tunnel_port: Option<u16>,
    strict: bool,
    peers: &[(Vec<IpNet>, Option<Ipv4Addr>, bool)],
) -> (BTreeSet<EncRule>, BTreeSet<EncRoute>) {
    let mut rules = BTreeSet::new();
    let mut routes = BTreeSet::new();
    if peers.is_empty() {
        return (rules, routes);
    }
    match tunnel_port {
        None => {
            let v6 = peers
                .iter()
                .any(|(cidrs, ..)| cidrs.iter().any(|c| matches!(c, IpNet::V6(_))));
            for v6 in [false, true].into_iter().filter(|f| !f || v6) {
                rules.insert(EncRule {
                    priority,
                    table: pod_table,
                    udp_dport: None,
                    v6,
                });
            }
        }
        Some(port) => {
            rules.insert(EncRule {
                priority: priority + 1,
                table: tunnel_table,
                udp_dport: Some(port),
                v6: false,
            });
        }
    };
    for (cidrs, address, keyed) in peers {
        let mut add = |table, dst| {
            if *keyed {
                routes.insert(EncRoute {
                    table,
                    dst,
                    via: Via::Device,
                });
            }
            if strict {
                routes.insert(EncRoute {
                    table,
                    dst,
                    via: Via::Blackhole,
                });
            }
        };
        match (tunnel_port, address) {
            (None, _) => cidrs.iter().for_each(|c| add(pod_table, *c)),
            (Some(_), Some(a)) => add(tunnel_table, IpNet::V4(Ipv4Net::from(*a))),
            (Some(_), None) => {}
        }
    }
    (rules, routes)
}

fn rule_of(message: &RuleMessage, tables: &[u32; 2]) -> Option<EncRule> {
    let mut table = u32::from(message.header.table);
    let (mut priority, mut dport, mut proto) = (0, None, None);
    for a in &message.attributes {
        match a {
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::DestinationPortRange(r) => dport = Some(r.start),
            RuleAttribute::IpProtocol(p) => proto = Some(u8::from(*p)),
            _ => {}
        }
    }
    tables.contains(&table).then_some(EncRule {
        priority,
        table,
        udp_dport: dport.filter(|_| proto == Some(IPPROTO_UDP)),
        v6: message.header.family == rtnetlink::packet_route::AddressFamily::Inet6,
    })
}

/// The route a message describes, and whether it is current: a device route through
/// another interface (the other key generation's device) is not, and is replaced in place.
fn route_of(
    message: &RouteMessage,
    tables: &[u32; 2],
    ifindex: Option<u32>,
) -> Option<(EncRoute, bool)> {
    let mut table = u32::from(message.header.table);
    let (mut dst, mut oif) = (None, None);
    for a in &message.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    if !tables.contains(&table) {
        return None;
    }
    let dst = IpNet::new(dst?, message.header.destination_prefix_length).ok()?;
    let (via, current) = match message.header.kind {
        RouteType::BlackHole => (Via::Blackhole, true),
        _ => (Via::Device, oif.is_some() && oif == ifindex),
    };
    Some((EncRoute { table, dst, via }, current))
}

fn route_message(
    r: &EncRoute,
    ifindex: Option<u32>,
    src: Option<Ipv4Addr>,
) -> Option<RouteMessage> {
    match r.dst {
        IpNet::V4(dst) => {
            let builder = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.addr(), dst.prefix_len())
                .table_id(r.table)
                .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
            Some(match r.via {
                Via::Device => {
                    let mut b = builder.output_interface(ifindex?).scope(RouteScope::Link);
                    if let Some(src) = src {
                        b = b.pref_source(src);
                    }
                    b.build()
                }
                Via::Blackhole => builder
                    .kind(RouteType::BlackHole)
                    .priority(FALLBACK_METRIC)
                    .build(),
            })
        }
        // IPv6 picks its source by its own rules (the node's global address).
        IpNet::V6(dst) => {
            let builder = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(dst.addr(), dst.prefix_len())
                .table_id(r.table)
                .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
            Some(match r.via {
                Via::Device => builder
                    .output_interface(ifindex?)
                    .scope(RouteScope::Universe)
                    .build(),
                Via::Blackhole => builder
                    .kind(RouteType::BlackHole)
                    .priority(FALLBACK_METRIC)
                    .build(),
            })
        }
    }
}

fn nl(context: &str) -> impl FnOnce(rtnetlink::Error) -> LinkError + '_ {
    move |source| LinkError::Netlink {
        context: context.to_string(),
        source,
    }
}

/// Brings the device up (with `plan.mtu`, without reverse-path filtering), then converges
/// the rules and routes. Returns also why decrypted packets would be dropped, if they
/// would (`net.ipv4.conf.all.rp_filter` not 0).
pub fn converge(netns: Option<PathBuf>, plan: SteeringPlan) -> Result<SteeringOutcome, LinkError> {
    link::run_in(netns.as_deref(), move |handle| async move {
        let mtu = match plan.mtu {
            0 => uplink_mtu(&handle, plan.node_ip).await - WIREGUARD_OVERHEAD,
            m => m,
        };
        let ifindex = device_up(&handle, &plan.interface, mtu).await?;
        if let Some(standby) = &plan.standby {
            device_up(&handle, standby, mtu).await?;
        }
        let mut outcome = SteeringOutcome {
            mtu: if ifindex.is_some() { mtu } else { 0 },
            ..Default::default()
        };
        if ifindex.is_some() {
            let all = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter")
                .unwrap_or_default();
            if all.trim() != "0" && !all.is_empty() {
                outcome.rp_filter_problem = Some(format!(
                    "net.ipv4.conf.all.rp_filter is {} on the node: decrypted packets are dropped (set it to 0)",
                    all.trim()
                ));
            }
        }
        converge_rules(&handle, &plan, &mut outcome).await?;
        converge_routes(&handle, &plan, ifindex, &mut outcome).await?;
        Ok(outcome)
    })
}

/// The MTU of the interface holding `node_ip` (1500 when it is not found).
async fn uplink_mtu(handle: &Handle, node_ip: Option<Ipv4Addr>) -> u32 {
    use rtnetlink::packet_route::address::AddressAttribute;
    use rtnetlink::packet_route::link::LinkAttribute;
    const DEFAULT: u32 = 1500;
    let Some(ip) = node_ip else {
        return DEFAULT;
    };
    let Ok(addresses) = handle
        .address()
        .get()
        .execute()
        .try_collect::<Vec<_>>()
        .await
    else {
        return DEFAULT;
    };
    let Some(index) = addresses
        .iter()
        .find(|a| {
            a.attributes.iter().any(
                |x| matches!(x, AddressAttribute::Address(std::net::IpAddr::V4(v)) if *v == ip),
            )
        })
        .map(|a| a.header.index)
    else {
        return DEFAULT;
    };
    let Ok(links) = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_collect::<Vec<_>>()
        .await
    else {
        return DEFAULT;
    };
    links
        .first()
        .and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
        })
        .filter(|m| *m > WIREGUARD_OVERHEAD + 576)
        .unwrap_or(DEFAULT)
}

async fn device_up(handle: &Handle, interface: &str, mtu: u32) -> Result<Option<u32>, LinkError> {
    let links: Vec<_> = match handle
        .link()
        .get()
        .match_name(interface.to_string())
        .execute()
        .try_collect()
        .await
    {
        Ok(l) => l,
        Err(_) => return Ok(None),
    };
    let Some(link) = links.first() else {
        return Ok(None);
    };
    let index = link.header.index;
    let up = link
        .header
        .flags
        .contains(rtnetlink::packet_route::link::LinkFlags::Up);
    let link_mtu = link.attributes.iter().find_map(|a| match a {
        rtnetlink::packet_route::link::LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    if !up || link_mtu != Some(mtu) {
        handle
            .link()
            .change(
                rtnetlink::LinkMessageBuilder::<LinkUnspec>::default()
                    .index(index)
                    .mtu(mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("bringing the WireGuard device up"))?;
    }
    // No reverse-path filtering on the device: the decrypted overlay packets come from a
    // node address whose route is the uplink, and the device has no address of its own,
    // so even the loose check drops them. The effective value is the larger of the
    // device's and `all`'s: `all` must be 0 too (checked in `rp_filter_problem`).
    let rp = format!("/proc/sys/net/ipv4/conf/{interface}/rp_filter");
    if std::fs::read_to_string(&rp)
        .map(|v| v.trim() != "0")
        .unwrap_or(false)
    {
        std::fs::write(&rp, "0")?;
    }
    Ok(Some(index))
}

async fn converge_rules(
    handle: &Handle,
    plan: &SteeringPlan,
    outcome: &mut SteeringOutcome,
) -> Result<(), LinkError> {
    let mut existing: Vec<RuleMessage> = handle
        .rule()
        .get(IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing rules"))?;
    existing.extend(
        handle
            .rule()
            .get(IpVersion::V6)
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(nl("listing IPv6 rules"))?,
    );
    let mut have = BTreeSet::new();
    for m in existing {
        let Some(rule) = rule_of(&m, &plan.tables) else {
            continue;
        };
        if plan.rules.contains(&rule) && have.insert(rule) {
            continue;
        }
        handle
            .rule()
            .del(m)
            .execute()
            .await
            .map_err(nl("deleting a stale rule"))?;
        outcome.changed += 1;
    }
    for rule in plan.rules.difference(&have) {
        let mut request = handle
            .rule()
            .add()
            .v4()
            .table_id(rule.table)
            .priority(rule.priority)
            .action(RuleAction::ToTable);
        if rule.v6 {
            // The same rule, of the other family (no address in it).
            request.message_mut().header.family = rtnetlink::packet_route::AddressFamily::Inet6;
        }
        if let Some(port) = rule.udp_dport {
            let m = request.message_mut();
            m.attributes
                .push(RuleAttribute::IpProtocol(IPPROTO_UDP.into()));
            m.attributes
                .push(RuleAttribute::DestinationPortRange(RulePortRange {
                    start: port,
                    end: port,
                }));
        }
        request.execute().await.map_err(nl("adding a rule"))?;
        outcome.changed += 1;
    }
    Ok(())
}

async fn converge_routes(
    handle: &Handle,
    plan: &SteeringPlan,
    ifindex: Option<u32>,
    outcome: &mut SteeringOutcome,
) -> Result<(), LinkError> {
    let mut existing: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing routes"))?;
    existing.extend(
        handle
            .route()
            .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(nl("listing IPv6 routes"))?,
    );
    let mut have = BTreeSet::new();
    for m in existing {
        let Some((route, current)) = route_of(&m, &plan.tables, ifindex) else {
            continue;
        };
        if plan.routes.contains(&route) {
            // Through the other device (a key switch): replaced below in one step, so no
            // packet finds the table without it.
            if !current || have.insert(route) {
                continue;
            }
        }
        handle
            .route()
            .del(m)
            .execute()
            .await
            .map_err(nl("deleting a stale route"))?;
        outcome.changed += 1;
    }
    for route in plan.routes.difference(&have) {
        let Some(message) = route_message(route, ifindex, plan.node_ip) else {
            continue; // no device yet: the blackhole holds the traffic (strict mode)
        };
        handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(nl("adding a route"))?;
        outcome.changed += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn peers_get_device_routes_and_strict_mode_a_blackhole_behind_them() {
        let peers = vec![
            (
                vec![net("10.200.2.0/24")],
                Some(Ipv4Addr::new(10, 0, 0, 2)),
                true,
            ),
            (
                vec![net("10.200.3.0/24")],
                Some(Ipv4Addr::new(10, 0, 0, 3)),
                false,
            ),
        ];
        // Overlay: the peers' node addresses for the VXLAN packets, no pod CIDR.
        let (rules, routes) = plan_routes(100, 101, 90, Some(8472), true, &peers);
        assert_eq!(
            rules.into_iter().collect::<Vec<_>>(),
            [EncRule {
                priority: 91,
                table: 101,
                udp_dport: Some(8472),
                v6: false,
            }]
        );
        let device: Vec<_> = routes
            .iter()
            .filter(|r| r.via == Via::Device)
            .map(|r| (r.table, r.dst))
            .collect();
        assert_eq!(device, [(101, net("10.0.0.2/32"))]);
        // The unkeyed peer: a blackhole only.
        assert!(routes.contains(&EncRoute {
            table: 101,
            dst: net("10.0.0.3/32"),
            via: Via::Blackhole
        }));
        assert!(routes.iter().all(|r| r.table == 101));
        // Native routing: the pod CIDRs; strict adds the blackholes.
        let (rules, routes) = plan_routes(100, 101, 90, None, true, &peers);
        assert_eq!(
            rules.into_iter().collect::<Vec<_>>(),
            [EncRule {
                priority: 90,
                table: 100,
                udp_dport: None,
                v6: false,
            }]
        );
        assert!(routes.contains(&EncRoute {
            table: 100,
            dst: net("10.200.2.0/24"),
            via: Via::Device
        }));
        assert!(routes.contains(&EncRoute {
            table: 100,
            dst: net("10.200.3.0/24"),
            via: Via::Blackhole
        }));
        assert_eq!(routes.len(), 3);
        let (_, routes) = plan_routes(100, 101, 90, None, false, &peers);
        assert_eq!(routes.len(), 1, "not strict: no blackholes");
        // A dual-stack peer: its IPv6 pod CIDR too, under an IPv6 rule.
        let dual = vec![(
            vec![net("10.200.2.0/24"), net("fd00:200:2::/64")],
            Some(Ipv4Addr::new(10, 0, 0, 2)),
            true,
        )];
        let (rules, routes) = plan_routes(100, 101, 90, None, false, &dual);
        assert_eq!(
            rules.iter().map(|r| (r.table, r.v6)).collect::<Vec<_>>(),
            [(100, false), (100, true)]
        );
        assert!(routes.contains(&EncRoute {
            table: 100,
            dst: net("fd00:200:2::/64"),
            via: Via::Device
        }));
        // No peers: nothing at all (a deselected node keeps no rule).
        assert_eq!(
            plan_routes(100, 101, 90, Some(8472), true, &[]),
            (BTreeSet::new(), BTreeSet::new())
        );
    }

    #[test]
    fn route_messages_round_trip() {
        let tables = [100, 101];
        let r = EncRoute {
            table: 100,
            dst: net("10.200.2.0/24"),
            via: Via::Device,
        };
        let m = route_message(&r, Some(7), None).unwrap();
        assert_eq!(route_of(&m, &tables, Some(7)), Some((r, true)));
        assert_eq!(
            route_of(&m, &tables, Some(8)),
            Some((r, false)),
            "through the other device"
        );
        let b = EncRoute {
            via: Via::Blackhole,
            ..r
        };
        let m = route_message(&b, None, None).unwrap();
        assert_eq!(route_of(&m, &tables, Some(7)), Some((b, true)));
        assert!(route_message(&r, None, None).is_none());
        let v6 = EncRoute {
            dst: net("fd00:200:2::/64"),
            ..r
        };
        let m = route_message(&v6, Some(7), None).unwrap();
        assert_eq!(route_of(&m, &tables, Some(7)), Some((v6, true)));
    }
}
