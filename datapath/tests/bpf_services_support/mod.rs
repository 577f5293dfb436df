//! Shared by the `bpf_services*` tests: a node with two local pods and a remote pod CIDR,
//! `LBService`s programmed as the agent does, crafted TCP frames and their checksums.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod v6;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use crate::bpf_support::*;
use tendril_crds::v1alpha1::{Backend, Frontend, LBService, LBServiceSpec};
use tendril_datapath::bpf::{
    Hook, MapSizes,
    maps::{Direction, EndpointInfo, IpcacheValue, MetricReason, NODE_F_TUNNEL, NodeConfig},
};
use tendril_datapath::config::LbAlgorithm;
use tendril_datapath::services::desired::{NodeServices, lb_state};

pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 5);
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
pub const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);
pub const NODE_PORT: u16 = 30080;
pub const TUNNEL_IFINDEX: u32 = 77;
pub const LO: u32 = 1;
pub const NODE: &str = "n1";

pub fn backend(ip: impl Into<IpAddr>, node: &str) -> Backend {
    let ip: IpAddr = ip.into();
    Backend {
        port_name: "web".into(),
        address: ip.to_string(),
        port: 8080,
        protocol: "TCP".into(),
        weight: 1,
        node_name: Some(node.into()),
        zone: None,
        state: "active".into(),
    }
}

pub fn frontend(type_: &str, address: Option<Ipv4Addr>, port: u16, protocol: &str) -> Frontend {
    Frontend {
        name: "web".into(),
        type_: type_.into(),
        address: address.map(|a| a.to_string()),
        port: port.into(),
        protocol: protocol.into(),
    }
}

pub fn service(name: &str, frontends: Vec<Frontend>, backends: Vec<Backend>) -> LBService {
    let mut svc = LBService::new(
        name,
        LBServiceSpec {
            revision: 1,
            committed_revision: None,
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

/// Pods A and B behind loopback (test runs need a device that exists), a remote pod CIDR
/// behind a tunnel.
pub fn node() -> Node {
    node_with(&MapSizes::default())
}

pub fn node_with(sizes: &MapSizes) -> Node {
    node_with_v6(sizes, BTreeMap::new(), BTreeMap::new())
}

/// [`node_with`] plus the IPv6 endpoints and ipcache entries of [`v6`].
pub fn node_with_v6(
    sizes: &MapSizes,
    endpoints6: BTreeMap<IpAddr, EndpointInfo>,
    ipcache6: BTreeMap<ipnet::IpNet, IpcacheValue>,
) -> Node {
    let mut node = Node::load("svc", sizes);
    let mut endpoints = BTreeMap::from([
        (
            POD_A.into(),
            EndpointInfo {
                ifindex: LO,
                identity: 256,
                endpoint_id: 1,
                mac: [2, 0, 0, 0, 0, 0xa],
                node_mac: [2, 0, 0, 0, 1, 0xa],
                ..Default::default()
            },
        ),
        (
            POD_B.into(),
            EndpointInfo {
                ifindex: LO,
                identity: 257,
                endpoint_id: 2,
                mac: [2, 0, 0, 0, 0, 0xb],
                node_mac: [2, 0, 0, 0, 1, 0xb],
                ..Default::default()
            },
        ),
    ]);
    endpoints.extend(endpoints6);
    let mut ipcache = BTreeMap::from([
        (
            "10.0.2.0/24".parse().unwrap(),
            IpcacheValue::new(300, Some(REMOTE_NODE)),
        ),
        (
            format!("{NODE_IP}/32").parse().unwrap(),
            IpcacheValue::local_node(1),
        ),
        (
            format!("{POD_A}/32").parse().unwrap(),
            IpcacheValue::new(256, None),
        ),
        (
            format!("{POD_B}/32").parse().unwrap(),
            IpcacheValue::new(257, None),
        ),
    ]);
    ipcache.extend(ipcache6);
    assert!(
        node.dataplane
            .endpoints
            .converge(&endpoints, true)
            .unwrap()
            .is_converged()
    );
    assert!(
        node.dataplane
            .ipcache
            .converge(&ipcache, true)
            .unwrap()
            .is_converged()
    );
    node.dataplane
        .node_config
        .set(&NodeConfig {
            tunnel_ifindex: TUNNEL_IFINDEX,
            node_ipv4: NODE_IP.octets(),
            flags: NODE_F_TUNNEL,
            pad: 0,
        })
        .unwrap();
    node
}

/// Programs `services` as the agent's services step would on node `n1`.
pub fn program(node: &mut Node, services: &[LBService]) {
    let (held_backends, held_frontends) = (
        node.dataplane
            .lb
            .backends()
            .unwrap()
            .iter()
            .map(|(id, b)| (b.into(), *id))
            .collect(),
        node.dataplane
            .lb
            .revnat()
            .unwrap()
            .iter()
            .map(|(i, r)| (r.into(), *i))
            .collect(),
    );
    let desired = lb_state(
        services,
        &NodeServices {
            node_name: NODE,
            node_addresses: &[NODE_IP.into(), v6::NODE_IP6.into()],
            default_algorithm: LbAlgorithm::Random,
            maglev_table_size: 16381,
            hash_seed: 1,
            maglev: None,
            held_backends: &held_backends,
            held_frontends: &held_frontends,
        },
    );
    let report = node.dataplane.lb.converge(&desired.state, true).unwrap();
    assert!(report.is_converged(), "{report:?}");
}

pub fn checksum16(bytes: &[u8], mut sum: u32) -> u16 {
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// The TCP/UDP checksum over the pseudo header and segment of `frame` (0 when valid).
pub fn l4_checksum(frame: &[u8]) -> u16 {
    let ip = &frame[14..34];
    let l4 = &frame[34..14 + usize::from(u16::from_be_bytes([ip[2], ip[3]]))];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, ip[9]]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    let sum: u32 = pseudo
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    checksum16(l4, sum)
}

/// `frame` with a valid TCP/UDP checksum.
pub fn with_l4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let off = if frame[23] == 6 { 34 + 16 } else { 34 + 6 };
    frame[off..off + 2].copy_from_slice(&[0, 0]);
    let sum = l4_checksum(&frame);
    frame[off..off + 2].copy_from_slice(&sum.to_be_bytes());
    frame
}

pub fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    with_l4_checksum(tcp(src, sport, dst, dport, TCP_SYN))
}

pub fn ack(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    with_l4_checksum(tcp(src, sport, dst, dport, TCP_ACK))
}

/// (source, source port, destination, destination port) of a frame.
pub fn tuple(frame: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let ip4 = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    (ip4(26), port(34), ip4(30), port(36))
}

pub fn assert_checksums(frame: &[u8]) {
    assert!(ipv4_checksum_ok(frame), "IP checksum");
    assert_eq!(l4_checksum(frame), 0, "transport checksum");
}

pub fn count(node: &Node, reason: MetricReason, dir: Direction) -> u64 {
    node.dataplane.metrics.packets(reason, dir).unwrap()
}

/// An answer that leaves by the FIB: redirected, or (no route in the test's namespace)
/// dropped and counted as such.
pub fn assert_left_by_fib(node: &Node, ret: u32, dir: Direction) {
    match ret {
        TC_ACT_REDIRECT => assert_eq!(count(node, MetricReason::LbTranslated, dir), 1),
        TC_ACT_SHOT => assert_eq!(count(node, MetricReason::DropLbNoRoute, dir), 1),
        other => panic!("an answer must not go to the stack: verdict {other}"),
    }
}

pub fn run_from(node: &Node, hook: Hook, frame: &[u8], ifindex: u32) -> Run {
    run(node.programs.classifier(hook), frame, ifindex, 0, 1)
}

/// The backend a frame was translated to.
pub fn backend_of(run: &Run) -> Ipv4Addr {
    tuple(&run.data).2
}

pub fn monotonic_seconds() -> u32 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) },
        0
    );
    now.tv_sec as u32
}
