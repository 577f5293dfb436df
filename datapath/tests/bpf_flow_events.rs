//! The transport details of datapath events, which flows show (Hubble's `l4.TCP.flags`,
//! `l4.ICMPv4`/`ICMPv6` type and code): by `BPF_PROG_TEST_RUN` of the real programs on
//! crafted packets, every kind of event — a policy verdict, a policy drop, a drop outside
//! policy, over IPv4 and IPv6 — carries the packet's TCP flags or ICMP type and code.
//! Needs root.

mod bpf_support;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use bpf_support::*;
use tendril_datapath::bpf::{
    EventKind, Hook, MapSizes, PolicyEntry, PolicyEvent, PolicyState, Verdict,
    maps::{Direction, IpcacheValue, NODE_F_TUNNEL, NodeConfig},
    policy::{
        POLICY_F_DEFAULT_DENY_INGRESS, POLICY_F_SELECTED, PROTO_TCP, TCP_ACK as EV_ACK,
        TCP_RST as EV_RST, TCP_SYN as EV_SYN,
    },
    propagate_denies,
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const NATIVE_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 5);
const POD_A6: &str = "fd00:10::a";
const POD_B6: &str = "fd00:10::b";
const ID_A: u32 = 256;
const ID_B: u32 = 257;
const ID_NATIVE: u32 = 301;
const EP_A: u16 = 1;
const EP_B: u16 = 2;
/// Pod A sits behind loopback, the device test runs use.
const LO: u32 = 1;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// Pods A (behind loopback) and B with IPv4 and IPv6 addresses, a native-routed pod
/// subnet, and B accepting only TCP 80 from the native pods (default deny ingress); A is
/// selected by a policy (its IPv6 is judged, and dropped while the node enforces no IPv6
/// policy).
fn node() -> Node {
    let mut node = Node::load("fl", &MapSizes::default());
    node.set_endpoints(&BTreeMap::from([
        (POD_A.into(), endpoint_info(LO, ID_A, EP_A, 10)),
        (POD_B.into(), endpoint_info(4242, ID_B, EP_B, 20)),
        (ip6(POD_A6).into(), endpoint_info(LO, ID_A, EP_A, 10)),
        (ip6(POD_B6).into(), endpoint_info(4242, ID_B, EP_B, 20)),
    ]));
    node.set_ipcache(&BTreeMap::from([
        (
            "10.0.3.0/24".parse().unwrap(),
            IpcacheValue::new(ID_NATIVE, None),
        ),
        (
            format!("{POD_B6}/128").parse().unwrap(),
            IpcacheValue::new(ID_B, None),
        ),
    ]));
    node.dataplane
        .node_config
        .set(&NodeConfig {
            tunnel_ifindex: 77,
            node_ipv4: [192, 168, 0, 1],
            flags: NODE_F_TUNNEL,
            pad: 0,
        })
        .unwrap();
    let mut entries = BTreeMap::from([(
        PolicyEntry {
            endpoint_id: EP_B,
            direction: Direction::Ingress,
            peer: ID_NATIVE,
            protocol: PROTO_TCP,
            port: 80,
            port_prefix: 16,
        },
        Verdict::Allow,
    )]);
    propagate_denies(&mut entries);
    let states = BTreeMap::from([
        (
            EP_B,
            PolicyState {
                revision: 1,
                flags: POLICY_F_DEFAULT_DENY_INGRESS,
            },
        ),
        (
            EP_A,
            PolicyState {
                revision: 1,
                flags: POLICY_F_SELECTED | POLICY_F_DEFAULT_DENY_INGRESS,
            },
        ),
    ]);
    let report = node
        .dataplane
        .policy
        .converge(&entries, &states, true)
        .unwrap();
    assert!(report.is_converged(), "{report:?}");
    node
}

/// `from_netdev`: native-routed delivery into a local pod.
fn netdev_in(node: &Node, frame: &[u8]) -> u32 {
    run(node.programs.classifier(Hook::FromNetdev), frame, LO, 0, 1).ret
}

fn only_event(node: &Node) -> PolicyEvent {
    let evs = node.events();
    assert_eq!(evs.len(), 1, "{evs:#?}");
    evs[0]
}

/// A TCP segment over IPv6 (20-byte header, no payload).
fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    ipv6_frame(src, dst, 6, 64, &h)
}

#[test]
fn ipv4_events_carry_tcp_flags_and_icmp_type_and_code() {
    let node = node();
    // A SYN the policy allows: its verdict event.
    assert_eq!(
        netdev_in(&node, &tcp(NATIVE_POD, 1000, POD_B, 80, TCP_SYN)),
        TC_ACT_REDIRECT
    );
    let ev = only_event(&node);
    assert_eq!(ev.kind, EventKind::PolicyVerdict);
    assert_eq!((ev.protocol, ev.tcp_flags), (6, EV_SYN));
    assert_eq!((ev.icmp_type, ev.icmp_code), (0, 0));

    // A RST the policy denies: its drop.
    assert_eq!(
        netdev_in(&node, &tcp(NATIVE_POD, 1001, POD_B, 81, TCP_RST | TCP_ACK)),
        TC_ACT_SHOT
    );
    let ev = only_event(&node);
    assert_eq!(ev.kind, EventKind::Drop);
    assert_eq!((ev.sport, ev.dport), (1001, 81));
    assert_eq!(ev.tcp_flags, EV_RST | EV_ACK);

    // An echo request the policy denies: ICMP type 8, code 0.
    assert_eq!(
        netdev_in(&node, &icmp_echo(NATIVE_POD, POD_B, 7, false)),
        TC_ACT_SHOT
    );
    let ev = only_event(&node);
    assert_eq!(
        (ev.protocol, ev.icmp_type, ev.icmp_code),
        (1, ICMP_ECHO_REQUEST, 0)
    );
    assert_eq!(ev.tcp_flags, 0);
    // A destination unreachable (port unreachable: type 3, code 3) about nothing tracked.
    let quoted = udp(POD_B, 53, NATIVE_POD, 4000);
    assert_eq!(
        netdev_in(&node, &icmp_unreachable(NATIVE_POD, POD_B, &quoted)),
        TC_ACT_SHOT
    );
    let ev = only_event(&node);
    assert_eq!((ev.protocol, ev.icmp_type, ev.icmp_code), (1, 3, 3));

    // A drop outside policy (a spoofed source): the segment's ports and flags as well.
    assert_eq!(
        node.verdict(
            Hook::FromContainer,
            &tcp(Ipv4Addr::new(10, 0, 1, 99), 2000, POD_B, 443, TCP_SYN),
            0
        ),
        TC_ACT_SHOT
    );
    let ev = only_event(&node);
    assert_eq!(ev.verdict, None);
    assert_eq!((ev.sport, ev.dport, ev.tcp_flags), (2000, 443, EV_SYN));
    assert_eq!(
        node.verdict(
            Hook::FromContainer,
            &icmp_echo(Ipv4Addr::new(10, 0, 1, 99), POD_B, 9, false),
            0
        ),
        TC_ACT_SHOT
    );
    let ev = only_event(&node);
    assert_eq!((ev.icmp_type, ev.icmp_code), (ICMP_ECHO_REQUEST, 0));
}

#[test]
fn ipv6_events_carry_tcp_flags_and_icmpv6_type_and_code() {
    let node = node();
    // Into pod A (its ingress is denied by default): a SYN and an echo request.
    assert_eq!(
        node.verdict(
            Hook::ToContainer,
            &tcp6(ip6(POD_B6), 40000, ip6(POD_A6), 8080, TCP_SYN),
            0
        ),
        TC_ACT_SHOT
    );
    let ev = only_event(&node);
    assert!(ev.saddr.is_ipv6());
    assert_eq!((ev.protocol, ev.sport, ev.dport), (6, 40000, 8080));
    assert_eq!(ev.tcp_flags, EV_SYN);
    assert_eq!(
        node.verdict(
            Hook::ToContainer,
            &icmp6(ip6(POD_B6), ip6(POD_A6), ICMPV6_ECHO_REQUEST, 64),
            0
        ),
        TC_ACT_SHOT
    );
    let ev = only_event(&node);
    assert_eq!(
        (ev.protocol, ev.icmp_type, ev.icmp_code),
        (58, ICMPV6_ECHO_REQUEST, 0)
    );
    // A drop outside policy (a spoofed source, written straight into the ring).
    assert_eq!(
        node.verdict(
            Hook::FromContainer,
            &tcp6(ip6("fd00:10::99"), 40001, ip6(POD_B6), 443, TCP_RST),
            0
        ),
        TC_ACT_SHOT
    );
    let ev = only_event(&node);
    assert_eq!(ev.verdict, None);
    assert_eq!((ev.sport, ev.dport, ev.tcp_flags), (40001, 443, EV_RST));
}
