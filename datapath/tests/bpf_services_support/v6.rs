//! The IPv6 twins of the fixtures: pods A and B with IPv6 addresses too, a remote IPv6 pod
//! CIDR behind the tunnel, the node's IPv6 address (ipcache: host; `node_config6`), and
//! TCP/UDP frames over IPv6 whose checksums are computed here, independently of the
//! programs, over the pseudo-header of RFC 8200 §8.1.

use std::{collections::BTreeMap, net::Ipv6Addr};

use crate::bpf_support::*;
use tendril_crds::v1alpha1::Frontend;
use tendril_datapath::bpf::{
    MapSizes,
    maps::{EndpointInfo, IpcacheValue, NodeConfig6},
};

use super::{LO, REMOTE_NODE};

pub const POD_A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 0, 0, 0, 0, 0x0a);
pub const POD_B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 0, 0, 0, 0, 0x14);
pub const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 2, 0, 0, 0, 0, 5);
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 5);
pub const OTHER_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 5);
pub const LB_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0xc8);
pub const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x0a);

/// The dual-stack node: [`super::node`] plus the IPv6 addresses above.
pub fn node6() -> Node {
    let info = |identity, endpoint_id, last| EndpointInfo {
        ifindex: LO,
        identity,
        endpoint_id,
        mac: [2, 0, 0, 0, 0, last],
        node_mac: [2, 0, 0, 0, 1, last],
        ..Default::default()
    };
    let endpoints = BTreeMap::from([
        (POD_A6.into(), info(256, 1, 0xa)),
        (POD_B6.into(), info(257, 2, 0xb)),
    ]);
    let ipcache = BTreeMap::from([
        (
            "fd00:10:2::/64".parse().unwrap(),
            IpcacheValue::new(300, Some(REMOTE_NODE)),
        ),
        (
            format!("{NODE_IP6}/128").parse().unwrap(),
            IpcacheValue::local_node(1),
        ),
        (
            format!("{POD_A6}/128").parse().unwrap(),
            IpcacheValue::new(256, None),
        ),
        (
            format!("{POD_B6}/128").parse().unwrap(),
            IpcacheValue::new(257, None),
        ),
    ]);
    let mut node = super::node_with_v6(&MapSizes::default(), endpoints, ipcache);
    node.dataplane
        .node_config
        .set6(&NodeConfig6 {
            node_ipv6: NODE_IP6.octets(),
        })
        .unwrap();
    node
}

pub fn frontend6(type_: &str, address: Option<Ipv6Addr>, port: u16, protocol: &str) -> Frontend {
    Frontend {
        address: address.map(|a| a.to_string()),
        ..super::frontend(type_, None, port, protocol)
    }
}

/// A bare TCP segment over IPv6 with a valid checksum.
pub fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    l4.extend_from_slice(&0u32.to_be_bytes());
    l4.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    with_checksum6(ipv6_frame(src, dst, 6, 64, &l4))
}

pub fn syn6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    tcp6(src, sport, dst, dport, TCP_SYN)
}

pub fn ack6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    tcp6(src, sport, dst, dport, TCP_ACK)
}

/// A UDP datagram over IPv6 with a valid checksum.
pub fn udp6_valid(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    with_checksum6(udp6(src, sport, dst, dport))
}

/// (offset of the transport header, its protocol): after the extension headers a frame
/// of these tests carries (hop-by-hop options only).
fn transport(frame: &[u8]) -> (usize, u8) {
    let (mut off, mut next) = (54, frame[20]);
    while next == IPPROTO_HOPOPTS {
        next = frame[off];
        off += (usize::from(frame[off + 1]) + 1) * 8;
    }
    (off, next)
}

/// The transport checksum over the IPv6 pseudo-header and the upper-layer packet (0 when
/// the packet's checksum is valid).
pub fn l4_checksum6(frame: &[u8]) -> u16 {
    let (off, proto) = transport(frame);
    let payload = 54 + usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    let l4 = &frame[off..payload];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&frame[22..54]);
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    let sum: u32 = pseudo
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    super::checksum16(l4, sum)
}

/// `frame` with a valid TCP/UDP/ICMPv6 checksum.
pub fn with_checksum6(mut frame: Vec<u8>) -> Vec<u8> {
    let (off, proto) = transport(&frame);
    let at = off
        + match proto {
            6 => 16,
            17 => 6,
            _ => 2,
        };
    frame[at..at + 2].copy_from_slice(&[0, 0]);
    let sum = l4_checksum6(&frame);
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// (source, source port, destination, destination port) of an IPv6 frame.
pub fn tuple6(frame: &[u8]) -> (Ipv6Addr, u16, Ipv6Addr, u16) {
    let ip6 = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&frame[o..o + 16]).unwrap());
    let (off, _) = transport(frame);
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    (ip6(22), port(off), ip6(38), port(off + 2))
}

pub fn assert_checksum6(frame: &[u8]) {
    assert_eq!(l4_checksum6(frame), 0, "transport checksum");
}
