//! `BPF_PROG_TEST_RUN` of every program on crafted packets: verdict,
//! rewritten headers, identity mark and the per-reason counters. Needs root.
//!
//! What a test run cannot show: the target ifindex of a redirect (the kernel
//! keeps it in per-CPU state) and the tunnel key of a packet (a test-run skb
//! has no tunnel metadata, so `from_overlay` can only be run on its
//! missing-key path here). The MACs written by delivery come from the same
//! endpoint entry as the ifindex; tests/netns_connectivity.rs carries real
//! packets through the VXLAN device and checks the VNI on the wire.

mod bpf_support;

use std::{collections::BTreeMap, net::Ipv4Addr};

use bpf_support::*;
use tendril_datapath::bpf::{
    Hook, MapSizes,
    maps::{Direction, EndpointInfo, IpcacheValue, MetricReason, NODE_F_TUNNEL, NodeConfig},
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 5);
const NATIVE_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 5);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const NODE_MAC_A: [u8; 6] = [0x02, 0, 0, 0, 1, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const NODE_MAC_B: [u8; 6] = [0x02, 0, 0, 0, 1, 0x0b];
const IDENTITY_A: u32 = 256;
const IDENTITY_B: u32 = 257;
const IDENTITY_REMOTE: u32 = 300;
const TUNNEL_IFINDEX: u32 = 77;
const LO: u32 = 1;

/// A node whose pod A sits behind loopback (the device test runs use) and
/// pod B behind ifindex 4242, with a remote pod CIDR behind a tunnel and one
/// reachable by native routing.
fn node() -> Node {
    let mut node = Node::load("ptr", &MapSizes::default());
    let endpoints = BTreeMap::from([
        (
            POD_A.into(),
            EndpointInfo {
                ifindex: LO,
                identity: IDENTITY_A,
                endpoint_id: 1,
                mac: MAC_A,
                node_mac: NODE_MAC_A,
                ..Default::default()
            },
        ),
        (
            POD_B.into(),
            EndpointInfo {
                ifindex: 4242,
                identity: IDENTITY_B,
                endpoint_id: 2,
                mac: MAC_B,
                node_mac: NODE_MAC_B,
                ..Default::default()
            },
        ),
    ]);
    let ipcache = BTreeMap::from([
        (
            "10.0.2.0/24".parse().unwrap(),
            IpcacheValue::new(IDENTITY_REMOTE, Some(REMOTE_NODE)),
        ),
        // The remote node's IPv6 pods: behind the same IPv4 tunnel endpoint.
        (
            "fd00:2::/112".parse().unwrap(),
            IpcacheValue::new(IDENTITY_REMOTE, Some(REMOTE_NODE)),
        ),
        ("10.0.3.0/24".parse().unwrap(), IpcacheValue::new(301, None)),
        (
            format!("{NODE_IP}/32").parse().unwrap(),
            IpcacheValue::local_node(1),
        ),
        (
            format!("{REMOTE_NODE}/32").parse().unwrap(),
            IpcacheValue::new(6, None),
        ),
    ]);
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

fn count(node: &Node, reason: MetricReason, dir: Direction) -> u64 {
    node.dataplane.metrics.packets(reason, dir).unwrap()
}

fn from_a(dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
    udp_frame(MAC_A, NODE_MAC_A, POD_A, dst, ttl, 53)
}

#[test]
fn local_destination_is_redirected_into_the_pod_with_rewritten_headers() {
    let node = node();
    let run = run(
        node.programs.classifier(Hook::FromContainer),
        &from_a(POD_B, 64),
        LO,
        0,
        1,
    );
    assert_eq!(run.ret, TC_ACT_REDIRECT);
    assert_eq!(&run.data[0..6], &MAC_B, "destination MAC is pod B's");
    assert_eq!(
        &run.data[6..12],
        &NODE_MAC_B,
        "source MAC is pod B's host-side veth"
    );
    assert_eq!(run.data[22], 63, "TTL decremented");
    assert!(ipv4_checksum_ok(&run.data), "IP checksum updated");
    assert_eq!(
        count(&node, MetricReason::ForwardLocal, Direction::Egress),
        1
    );
}

#[test]
fn remote_destination_is_encapsulated_towards_its_node() {
    let node = node();
    let run = run(
        node.programs.classifier(Hook::FromContainer),
        &from_a(REMOTE_POD, 64),
        LO,
        0,
        1,
    );
    assert_eq!(run.ret, TC_ACT_REDIRECT, "redirected to the VXLAN device");
    assert_eq!(run.data[22], 63);
    assert!(ipv4_checksum_ok(&run.data));
    assert_eq!(
        count(&node, MetricReason::ForwardTunnel, Direction::Egress),
        1
    );
    assert_eq!(
        count(&node, MetricReason::DropTunnelKey, Direction::Egress),
        0,
        "tunnel key accepted"
    );
}

#[test]
fn remote_destination_without_tunnel_device_is_dropped_and_counted() {
    let mut node = node();
    node.dataplane
        .node_config
        .set(&NodeConfig::default())
        .unwrap();
    let run = run(
        node.programs.classifier(Hook::FromContainer),
        &from_a(REMOTE_POD, 64),
        LO,
        0,
        1,
    );
    assert_eq!(run.ret, TC_ACT_SHOT);
    assert_eq!(
        count(&node, MetricReason::DropNoTunnelDevice, Direction::Egress),
        1
    );
}

#[test]
fn native_routing_and_unknown_destinations_go_to_the_stack_marked_with_the_source_identity() {
    let node = node();
    let program = node.programs.classifier(Hook::FromContainer);
    let expected_mark = 0x0F00 | (IDENTITY_A << 16);

    let native = run(program, &from_a(NATIVE_POD, 64), LO, 0, 1);
    assert_eq!(native.ret, TC_ACT_OK);
    assert_eq!(ctx_mark(&native.ctx), expected_mark);
    assert_eq!(native.data[22], 64, "the stack decrements the TTL itself");
    assert_eq!(
        count(&node, MetricReason::ToStackNative, Direction::Egress),
        1
    );

    let unknown = run(program, &from_a(Ipv4Addr::new(8, 8, 8, 8), 64), LO, 0, 1);
    assert_eq!(unknown.ret, TC_ACT_OK);
    assert_eq!(ctx_mark(&unknown.ctx), expected_mark);
    assert_eq!(
        count(&node, MetricReason::ToStackUnknown, Direction::Egress),
        1
    );

    let host = run(program, &from_a(NODE_IP, 64), LO, 0, 1);
    assert_eq!(host.ret, TC_ACT_OK);
    assert_eq!(
        count(&node, MetricReason::ToStackHost, Direction::Egress),
        1
    );
}

#[test]
fn spoofed_sources_are_dropped() {
    let node = node();
    let program = node.programs.classifier(Hook::FromContainer);
    let unknown_source = udp_frame(
        MAC_A,
        NODE_MAC_A,
        Ipv4Addr::new(10, 0, 1, 99),
        POD_B,
        64,
        53,
    );
    assert_eq!(run(program, &unknown_source, LO, 0, 1).ret, TC_ACT_SHOT);
    // Pod B's address sent from pod A's veth.
    let other_pod = udp_frame(MAC_A, NODE_MAC_A, POD_B, REMOTE_POD, 64, 53);
    assert_eq!(run(program, &other_pod, LO, 0, 1).ret, TC_ACT_SHOT);
    assert_eq!(
        count(&node, MetricReason::DropInvalidSource, Direction::Egress),
        2
    );
    assert_eq!(
        count(&node, MetricReason::ForwardLocal, Direction::Egress),
        0
    );
}

#[test]
fn expiring_ttl_and_malformed_packets_are_dropped() {
    let node = node();
    let program = node.programs.classifier(Hook::FromContainer);
    assert_eq!(run(program, &from_a(POD_B, 1), LO, 0, 1).ret, TC_ACT_SHOT);
    assert_eq!(
        run(program, &from_a(REMOTE_POD, 1), LO, 0, 1).ret,
        TC_ACT_SHOT
    );
    assert_eq!(
        count(&node, MetricReason::DropTtlExceeded, Direction::Egress),
        2
    );
    // IHL 4: a header shorter than IPv4's minimum.
    let mut malformed = from_a(POD_B, 64);
    malformed[14] = 0x44;
    assert_eq!(run(program, &malformed, LO, 0, 1).ret, TC_ACT_SHOT);
    assert_eq!(
        count(&node, MetricReason::DropInvalidPacket, Direction::Egress),
        1
    );
}

#[test]
fn non_ipv4_is_left_to_the_stack() {
    let node = node();
    let run = run(
        node.programs.classifier(Hook::FromContainer),
        &arp_frame(MAC_A),
        LO,
        0,
        1,
    );
    assert_eq!(run.ret, TC_ACT_OK);
    assert_eq!(
        count(&node, MetricReason::ToStackNonIpv4, Direction::Egress),
        1
    );
}

#[test]
fn from_overlay_requires_tunnel_metadata() {
    let node = node();
    let frame = udp_frame([2, 0, 0, 0, 9, 9], MAC_B, REMOTE_POD, POD_B, 63, 53);
    let run = run(
        node.programs.classifier(Hook::FromOverlay),
        &frame,
        LO,
        0,
        1,
    );
    assert_eq!(
        run.ret, TC_ACT_SHOT,
        "a packet without tunnel key has no source identity"
    );
    assert_eq!(
        count(&node, MetricReason::DropTunnelKey, Direction::Ingress),
        1
    );
    assert_eq!(
        count(&node, MetricReason::ForwardLocal, Direction::Ingress),
        0
    );
}

#[test]
fn from_netdev_delivers_native_routed_packets_to_local_pods() {
    let node = node();
    let program = node.programs.classifier(Hook::FromNetdev);
    let frame = udp_frame(
        [2, 0, 0, 0, 9, 9],
        [2, 0, 0, 0, 9, 8],
        NATIVE_POD,
        POD_B,
        63,
        53,
    );
    let delivered = run(program, &frame, LO, 0, 1);
    assert_eq!(delivered.ret, TC_ACT_REDIRECT);
    assert_eq!(&delivered.data[0..6], &MAC_B);
    assert_eq!(&delivered.data[6..12], &NODE_MAC_B);
    assert_eq!(delivered.data[22], 62);
    assert!(ipv4_checksum_ok(&delivered.data));
    assert_eq!(
        count(&node, MetricReason::ForwardLocal, Direction::Ingress),
        1
    );

    // The node's own traffic passes untouched and uncounted.
    let for_node = udp_frame(
        [2, 0, 0, 0, 9, 9],
        [2, 0, 0, 0, 9, 8],
        REMOTE_NODE,
        NODE_IP,
        64,
        8472,
    );
    let passed = run(program, &for_node, LO, 0, 1);
    assert_eq!(passed.ret, TC_ACT_OK);
    assert_eq!(passed.data, for_node);
    assert_eq!(
        run(program, &arp_frame([2, 0, 0, 0, 9, 9]), LO, 0, 1).ret,
        TC_ACT_OK
    );
    let total: u64 = node
        .dataplane
        .metrics
        .samples()
        .unwrap()
        .iter()
        .map(|s| s.packets)
        .sum();
    assert_eq!(total, 1, "only the delivery was counted");
}

#[test]
fn to_container_passes_stack_routed_packets_and_counts_them() {
    let node = node();
    let program = node.programs.classifier(Hook::ToContainer);
    let marked = udp_frame(NODE_MAC_B, MAC_B, REMOTE_POD, POD_B, 63, 80);
    let run_marked = run(program, &marked, LO, 0x0F00 | (IDENTITY_REMOTE << 16), 1);
    assert_eq!(run_marked.ret, TC_ACT_OK);
    assert_eq!(run_marked.data, marked, "left untouched");
    let from_host = udp_frame(NODE_MAC_B, MAC_B, NODE_IP, POD_B, 64, 80);
    assert_eq!(run(program, &from_host, LO, 0, 1).ret, TC_ACT_OK);
    assert_eq!(
        count(&node, MetricReason::DeliverViaStack, Direction::Ingress),
        2
    );
    let not_a_pod = udp_frame(
        NODE_MAC_B,
        MAC_B,
        NODE_IP,
        Ipv4Addr::new(10, 0, 1, 77),
        64,
        80,
    );
    assert_eq!(run(program, &not_a_pod, LO, 0, 1).ret, TC_ACT_OK);
    assert_eq!(
        count(&node, MetricReason::DeliverViaStack, Direction::Ingress),
        2
    );
}

#[test]
fn to_overlay_sets_the_tunnel_key_of_the_nodes_own_traffic() {
    let node = node();
    let program = node.programs.classifier(Hook::ToOverlay);
    let from_host = udp_frame(
        [2, 0, 0, 0, 9, 9],
        [2, 0, 0, 0, 9, 8],
        NODE_IP,
        REMOTE_POD,
        64,
        53,
    );
    let run_host = run(program, &from_host, LO, 0, 1);
    assert_eq!(run_host.ret, TC_ACT_OK);
    assert_eq!(
        run_host.data, from_host,
        "only metadata changes, not the packet"
    );
    assert_eq!(
        count(&node, MetricReason::ForwardTunnel, Direction::Egress),
        1
    );

    // Routed into the overlay without a tunnel endpoint: nowhere to send it.
    let nowhere = udp_frame(
        [2, 0, 0, 0, 9, 9],
        [2, 0, 0, 0, 9, 8],
        NODE_IP,
        NATIVE_POD,
        64,
        53,
    );
    assert_eq!(run(program, &nowhere, LO, 0, 1).ret, TC_ACT_SHOT);
    assert_eq!(
        count(&node, MetricReason::DropNoTunnelEndpoint, Direction::Egress),
        1
    );
}

#[test]
fn to_overlay_carries_ipv6_to_the_inner_destinations_node() {
    let node = node();
    let program = node.programs.classifier(Hook::ToOverlay);
    let remote6: std::net::Ipv6Addr = "fd00:2::5".parse().unwrap();
    let pod6: std::net::Ipv6Addr = "fd00:1::a".parse().unwrap();
    // A pod's IPv6 routed into the device, its identity in the mark (from_container6).
    let frame = udp6(pod6, 40000, remote6, 53);
    let mark = 0x0F00 | (IDENTITY_A << 16); // identity_to_mark (bpf/lib/common.h)
    let sent = run(program, &frame, LO, mark, 1);
    assert_eq!(sent.ret, TC_ACT_OK);
    assert_eq!(sent.data, frame, "only metadata changes, not the packet");
    assert_eq!(
        count(&node, MetricReason::ForwardTunnel, Direction::Egress),
        1
    );

    // An IPv6 destination no node hosts: nowhere to send it.
    let nowhere = udp6(pod6, 40000, "fd00:9::5".parse().unwrap(), 53);
    assert_eq!(run(program, &nowhere, LO, mark, 1).ret, TC_ACT_SHOT);
    assert_eq!(
        count(&node, MetricReason::DropNoTunnelEndpoint, Direction::Egress),
        1
    );
}
