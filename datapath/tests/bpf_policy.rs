//! Policy enforcement, conntrack, audit mode and events, by `BPF_PROG_TEST_RUN` of the
//! real programs on crafted packets against maps written through the `Dataplane` API.
//! Needs root. Each test loads its own node (pin directory removed on drop).
//!
//! Ingress is exercised at both enforcement points: delivery (`from_netdev` →
//! `deliver_local4`, and `from_container` for same-node traffic) and `to_container`
//! (stack-routed, the sender's identity in the mark). Egress at `from_container`, whose
//! anti-spoofing check admits only the pod behind the test run's device (loopback).

mod bpf_support;

use std::{collections::BTreeMap, net::Ipv4Addr};

use bpf_support::*;
use ipnet::IpNet;
use tendril_datapath::bpf::{
    EventKind, EventVerdict, Hook, MapSizes, PolicyEntry, PolicyEvent, PolicyMatch, PolicyState,
    Verdict,
    maps::{
        CT_F_AUDIT, CT_F_CLOSING, CT_F_FIN_FORWARD, CT_F_FIN_REPLY, CT_F_SEEN_REPLY, Direction,
        EndpointInfo, IpcacheValue, MetricReason, NODE_F_POLICY_AUDIT, NODE_F_TUNNEL, NodeConfig,
    },
    monotonic_now_ns,
    policy::{
        LOCAL_IDENTITY_FLAG, POLICY_F_DEFAULT_DENY_EGRESS, POLICY_F_DEFAULT_DENY_INGRESS,
        POLICY_F_HAS_DENY_EGRESS, POLICY_F_HAS_DENY_INGRESS, PROTO_ANY, PROTO_SCTP, PROTO_TCP,
        PROTO_UDP,
    },
    port_range_prefixes, propagate_denies,
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 5);
const NATIVE_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 5);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const WORLD: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const ID_A: u32 = 256;
const ID_B: u32 = 257;
const ID_REMOTE: u32 = 300;
const ID_NATIVE: u32 = 301;
const ID_WORLD: u32 = 2;
const EP_A: u16 = 1;
const EP_B: u16 = 2;
const LO: u32 = 1;
const IN: Direction = Direction::Ingress;
const EG: Direction = Direction::Egress;

fn node() -> Node {
    let mut node = Node::load("pol", &MapSizes::default());
    let ep = |ifindex, identity, endpoint_id, last: u8| EndpointInfo {
        ifindex,
        identity,
        endpoint_id,
        flags: 0,
        mac: [2, 0, 0, 0, 0, last],
        node_mac: [2, 0, 0, 0, 1, last],
    };
    let endpoints = BTreeMap::from([
        (POD_A.into(), ep(LO, ID_A, EP_A, 10)),
        (POD_B.into(), ep(4242, ID_B, EP_B, 20)),
    ]);
    let ipcache = BTreeMap::from([
        (
            "10.0.2.0/24".parse().unwrap(),
            IpcacheValue::new(ID_REMOTE, Some(REMOTE_NODE)),
        ),
        (
            "10.0.3.0/24".parse().unwrap(),
            IpcacheValue::new(ID_NATIVE, None),
        ),
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
    set_flags(&mut node, NODE_F_TUNNEL);
    node
}

fn set_flags(node: &mut Node, flags: u32) {
    node.dataplane
        .node_config
        .set(&NodeConfig {
            tunnel_ifindex: 77,
            node_ipv4: NODE_IP.octets(),
            flags,
            pad: 0,
        })
        .unwrap();
}

fn rule(
    endpoint_id: u16,
    direction: Direction,
    peer: u32,
    protocol: u8,
    port: u16,
    port_prefix: u8,
) -> PolicyEntry {
    PolicyEntry {
        endpoint_id,
        direction,
        peer,
        protocol,
        port,
        port_prefix,
    }
}

/// Any protocol, any port.
fn l3(endpoint_id: u16, direction: Direction, peer: u32) -> PolicyEntry {
    rule(endpoint_id, direction, peer, PROTO_ANY, 0, 0)
}

fn state(revision: u32, flags: u32) -> PolicyState {
    PolicyState { revision, flags }
}

/// Writes the policy (denies propagated, as the agent does) and prunes the rest.
fn apply(node: &mut Node, entries: &[(PolicyEntry, Verdict)], states: &[(u16, PolicyState)]) {
    let mut entries: BTreeMap<_, _> = entries.iter().copied().collect();
    propagate_denies(&mut entries);
    let states: BTreeMap<_, _> = states.iter().copied().collect();
    let report = node
        .dataplane
        .policy
        .converge(&entries, &states, true)
        .unwrap();
    assert!(report.is_converged(), "{report:?}");
    assert_eq!(node.dataplane.policy.entries().unwrap(), entries);
    assert_eq!(node.dataplane.policy.states().unwrap(), states);
}

fn mark(identity: u32) -> u32 {
    0x0F00 | ((identity & 0xFFFF) << 16) | ((identity >> 16) & 0xFF)
}

/// `to_container` of the destination pod, the source identity in the mark.
fn stack_in(node: &Node, frame: &[u8], src_identity: u32) -> u32 {
    run(
        node.programs.classifier(Hook::ToContainer),
        frame,
        LO,
        mark(src_identity),
        1,
    )
    .ret
}

/// `from_container` of pod A.
fn out_of_a(node: &Node, frame: &[u8]) -> u32 {
    node.verdict(Hook::FromContainer, frame, 0)
}

/// `from_netdev`: native-routed delivery into a local pod.
fn netdev_in(node: &Node, frame: &[u8]) -> u32 {
    run(node.programs.classifier(Hook::FromNetdev), frame, LO, 0, 1).ret
}

fn count(node: &Node, reason: MetricReason, dir: Direction) -> u64 {
    node.count(reason, dir)
}

fn events(node: &Node) -> Vec<PolicyEvent> {
    node.events()
}

fn ct_flags(node: &Node, src: Ipv4Addr, dst: Ipv4Addr, dir: Direction) -> Option<(u8, u32)> {
    node.dataplane
        .conntrack
        .entries()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.saddr == src.octets() && k.daddr == dst.octets() && k.dir == dir as u8)
        .map(|(_, v)| (v.flags, v.policy_revision))
}

#[test]
fn ingress_allows_by_peer_identity_and_default_denies_the_rest() {
    let mut node = node();
    apply(
        &mut node,
        &[(l3(EP_B, IN, ID_REMOTE), Verdict::Allow)],
        &[(EP_B, state(1, POLICY_F_DEFAULT_DENY_INGRESS))],
    );
    let frame = tcp(REMOTE_POD, 40000, POD_B, 80, TCP_SYN);
    assert_eq!(stack_in(&node, &frame, ID_REMOTE), TC_ACT_OK);
    assert_eq!(count(&node, MetricReason::DeliverViaStack, IN), 1);
    let other = tcp(NATIVE_POD, 40000, POD_B, 80, TCP_SYN);
    assert_eq!(stack_in(&node, &other, ID_NATIVE), TC_ACT_SHOT);
    assert_eq!(count(&node, MetricReason::DropPolicy, IN), 1);
    // The same at delivery (native routing: identity from the ipcache).
    assert_eq!(netdev_in(&node, &other), TC_ACT_SHOT);
    assert_eq!(count(&node, MetricReason::DropPolicy, IN), 2);
    // Egress of B is not isolated; pod A has no policy at all.
    assert_eq!(
        out_of_a(&node, &udp(POD_A, 5000, WORLD, 53)),
        TC_ACT_OK,
        "no policy: allowed"
    );
}

#[test]
fn ports_protocols_and_port_ranges_are_matched_by_prefix() {
    let mut node = node();
    let mut entries = vec![
        (rule(EP_B, IN, ID_NATIVE, PROTO_TCP, 80, 16), Verdict::Allow),
        (rule(EP_B, IN, ID_NATIVE, PROTO_SCTP, 0, 0), Verdict::Allow),
    ];
    for (port, bits) in port_range_prefixes(8000, 8099) {
        entries.push((
            rule(EP_B, IN, ID_NATIVE, PROTO_UDP, port, bits),
            Verdict::Allow,
        ));
    }
    apply(
        &mut node,
        &entries,
        &[(EP_B, state(1, POLICY_F_DEFAULT_DENY_INGRESS))],
    );
    let cases = [
        (tcp(NATIVE_POD, 1000, POD_B, 80, TCP_SYN), TC_ACT_REDIRECT),
        (tcp(NATIVE_POD, 1001, POD_B, 81, TCP_SYN), TC_ACT_SHOT),
        (udp(NATIVE_POD, 1002, POD_B, 80), TC_ACT_SHOT),
        (udp(NATIVE_POD, 1003, POD_B, 8000), TC_ACT_REDIRECT),
        (udp(NATIVE_POD, 1004, POD_B, 8050), TC_ACT_REDIRECT),
        (udp(NATIVE_POD, 1005, POD_B, 8099), TC_ACT_REDIRECT),
        (udp(NATIVE_POD, 1006, POD_B, 7999), TC_ACT_SHOT),
        (udp(NATIVE_POD, 1007, POD_B, 8100), TC_ACT_SHOT),
        (sctp(NATIVE_POD, 1008, POD_B, 9999), TC_ACT_REDIRECT),
        (icmp_echo(NATIVE_POD, POD_B, 9, false), TC_ACT_SHOT),
    ];
    for (i, (frame, expected)) in cases.iter().enumerate() {
        assert_eq!(netdev_in(&node, frame), *expected, "case {i}");
    }
    assert_eq!(count(&node, MetricReason::ForwardLocal, IN), 5);
    assert_eq!(count(&node, MetricReason::DropPolicy, IN), 5);
    assert_eq!(count(&node, MetricReason::DropPolicyDeny, IN), 0);
}

#[test]
fn deny_wins_over_allow_within_and_across_the_three_lookups() {
    let mut node = node();
    let cidr_remote = LOCAL_IDENTITY_FLAG | 1;
    node.dataplane
        .policy
        .converge_cidrs(
            &BTreeMap::from([("10.0.2.0/24".parse().unwrap(), cidr_remote)]),
            true,
        )
        .unwrap();
    apply(
        &mut node,
        &[
            // Everyone may reach B ...
            (l3(EP_B, IN, 0), Verdict::Allow),
            // ... except identity 301 on TCP 80 (same lookup as a wider allow below) ...
            (rule(EP_B, IN, ID_NATIVE, PROTO_TCP, 80, 16), Verdict::Deny),
            (rule(EP_B, IN, ID_NATIVE, PROTO_TCP, 0, 0), Verdict::Allow),
            // ... and the remote CIDR (identity 300 itself is allowed explicitly).
            (l3(EP_B, IN, ID_REMOTE), Verdict::Allow),
            (l3(EP_B, IN, cidr_remote), Verdict::Deny),
            // A may reach 301 on TCP 80, but nobody on TCP 443 (the any-peer entry).
            (rule(EP_A, EG, ID_NATIVE, PROTO_TCP, 0, 0), Verdict::Allow),
            (rule(EP_A, EG, 0, PROTO_TCP, 443, 16), Verdict::Deny),
        ],
        &[
            (
                EP_B,
                state(1, POLICY_F_DEFAULT_DENY_INGRESS | POLICY_F_HAS_DENY_INGRESS),
            ),
            (
                EP_A,
                state(1, POLICY_F_DEFAULT_DENY_EGRESS | POLICY_F_HAS_DENY_EGRESS),
            ),
        ],
    );
    assert_eq!(
        netdev_in(&node, &tcp(NATIVE_POD, 1000, POD_B, 80, TCP_SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(
        netdev_in(&node, &tcp(NATIVE_POD, 1001, POD_B, 81, TCP_SYN)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        stack_in(&node, &tcp(REMOTE_POD, 1002, POD_B, 81, TCP_SYN), ID_REMOTE),
        TC_ACT_SHOT,
        "the CIDR deny beats the identity allow"
    );
    assert_eq!(
        stack_in(&node, &tcp(NODE_IP, 1003, POD_B, 81, TCP_SYN), 1),
        TC_ACT_OK,
        "the any-peer allow"
    );
    assert_eq!(count(&node, MetricReason::DropPolicyDeny, IN), 2);

    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 1004, NATIVE_POD, 80, TCP_SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 1005, NATIVE_POD, 443, TCP_SYN)),
        TC_ACT_SHOT,
        "the any-peer deny beats the identity allow"
    );
    assert_eq!(
        out_of_a(&node, &udp(POD_A, 1006, NATIVE_POD, 53)),
        TC_ACT_SHOT,
        "default deny"
    );
    assert_eq!(count(&node, MetricReason::DropPolicyDeny, EG), 1);
    assert_eq!(count(&node, MetricReason::DropPolicy, EG), 1);
}

#[test]
fn default_deny_only_where_flagged_and_no_state_means_no_policy() {
    let mut node = node();
    let frame = udp(POD_A, 5000, WORLD, 53);
    assert_eq!(out_of_a(&node, &frame), TC_ACT_OK, "no policy_state");
    // A policy without default deny and without rules: allows.
    apply(&mut node, &[], &[(EP_A, state(1, 0))]);
    assert_eq!(out_of_a(&node, &udp(POD_A, 5001, WORLD, 53)), TC_ACT_OK);
    // Ingress isolation does not touch egress.
    apply(
        &mut node,
        &[],
        &[(EP_A, state(2, POLICY_F_DEFAULT_DENY_INGRESS))],
    );
    assert_eq!(out_of_a(&node, &udp(POD_A, 5002, WORLD, 53)), TC_ACT_OK);
    apply(
        &mut node,
        &[],
        &[(EP_A, state(3, POLICY_F_DEFAULT_DENY_EGRESS))],
    );
    assert_eq!(out_of_a(&node, &udp(POD_A, 5003, WORLD, 53)), TC_ACT_SHOT);
    assert_eq!(count(&node, MetricReason::DropPolicy, EG), 1);
    // Vanished endpoint state → no policy again.
    apply(&mut node, &[], &[]);
    assert_eq!(out_of_a(&node, &udp(POD_A, 5004, WORLD, 53)), TC_ACT_OK);
}

#[test]
fn cidr_identities_with_an_except_carved_out_by_a_longer_prefix() {
    let mut node = node();
    let (block, except) = (LOCAL_IDENTITY_FLAG | 1, LOCAL_IDENTITY_FLAG | 2);
    let cidrs: BTreeMap<IpNet, u32> = BTreeMap::from([
        ("10.0.0.0/8".parse().unwrap(), block),
        ("10.0.2.0/24".parse().unwrap(), except),
    ]);
    let report = node.dataplane.policy.converge_cidrs(&cidrs, true).unwrap();
    assert_eq!((report.added, report.failed.len()), (2, 0));
    assert_eq!(node.dataplane.policy.cidrs().unwrap(), cidrs);
    apply(
        &mut node,
        &[(l3(EP_A, EG, block), Verdict::Allow)],
        &[(EP_A, state(1, POLICY_F_DEFAULT_DENY_EGRESS))],
    );
    // 10.0.3.5 (identity 301) and 10.9.9.9 (world) are in the block.
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 1000, NATIVE_POD, 80, TCP_SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        out_of_a(
            &node,
            &tcp(POD_A, 1001, Ipv4Addr::new(10, 9, 9, 9), 80, TCP_SYN)
        ),
        TC_ACT_OK
    );
    // 10.0.2.5 is in the except: its longer prefix maps to an identity nothing allows.
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 1002, REMOTE_POD, 80, TCP_SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 1003, WORLD, 80, TCP_SYN)),
        TC_ACT_SHOT
    );
    // Pruning the except makes 10.0.2.5 part of the block again.
    let block_only = BTreeMap::from([("10.0.0.0/8".parse().unwrap(), block)]);
    let report = node
        .dataplane
        .policy
        .converge_cidrs(&block_only, true)
        .unwrap();
    assert_eq!(report.deleted, 1);
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 1004, REMOTE_POD, 80, TCP_SYN)),
        TC_ACT_REDIRECT,
        "allowed, then encapsulated"
    );
}

#[test]
fn replies_related_errors_and_echo_replies_pass_a_default_deny_ingress() {
    let mut node = node();
    apply(
        &mut node,
        &[],
        &[(EP_A, state(1, POLICY_F_DEFAULT_DENY_INGRESS))],
    );
    // TCP: A connects out; the reply comes back through the stack.
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40000, WORLD, 443, TCP_SYN)),
        TC_ACT_OK
    );
    let reply = tcp(WORLD, 443, POD_A, 40000, TCP_SYN | TCP_ACK);
    assert_eq!(stack_in(&node, &reply, ID_WORLD), TC_ACT_OK);
    assert_eq!(
        ct_flags(&node, POD_A, WORLD, EG).map(|(f, _)| f & CT_F_SEEN_REPLY),
        Some(CT_F_SEEN_REPLY)
    );
    // Anything else from there is new, and denied.
    let unsolicited = tcp(WORLD, 443, POD_A, 40001, TCP_SYN);
    assert_eq!(stack_in(&node, &unsolicited, ID_WORLD), TC_ACT_SHOT);

    // UDP, and an ICMP error about it from a router on the way.
    let query = udp(POD_A, 5353, WORLD, 53);
    assert_eq!(out_of_a(&node, &query), TC_ACT_OK);
    assert_eq!(
        stack_in(&node, &udp(WORLD, 53, POD_A, 5353), ID_WORLD),
        TC_ACT_OK
    );
    let related = icmp_unreachable(ROUTER, POD_A, &query);
    assert_eq!(stack_in(&node, &related, ID_WORLD), TC_ACT_OK);
    let unrelated = icmp_unreachable(ROUTER, POD_A, &udp(POD_A, 5354, WORLD, 53));
    assert_eq!(stack_in(&node, &unrelated, ID_WORLD), TC_ACT_SHOT);

    // ICMP echo, tracked by id.
    assert_eq!(
        out_of_a(&node, &icmp_echo(POD_A, WORLD, 77, false)),
        TC_ACT_OK
    );
    assert_eq!(
        stack_in(&node, &icmp_echo(WORLD, POD_A, 77, true), ID_WORLD),
        TC_ACT_OK
    );
    assert_eq!(
        stack_in(&node, &icmp_echo(WORLD, POD_A, 78, true), ID_WORLD),
        TC_ACT_SHOT
    );
    assert_eq!(count(&node, MetricReason::DropPolicy, IN), 3);
}

#[test]
fn same_node_traffic_is_judged_at_egress_and_at_ingress_and_replies_pass_both() {
    let mut node = node();
    apply(
        &mut node,
        &[
            (rule(EP_B, IN, ID_A, PROTO_TCP, 80, 16), Verdict::Allow),
            (l3(EP_A, EG, ID_B), Verdict::Allow),
        ],
        &[
            (
                EP_B,
                state(
                    1,
                    POLICY_F_DEFAULT_DENY_INGRESS | POLICY_F_DEFAULT_DENY_EGRESS,
                ),
            ),
            (
                EP_A,
                state(
                    1,
                    POLICY_F_DEFAULT_DENY_INGRESS | POLICY_F_DEFAULT_DENY_EGRESS,
                ),
            ),
        ],
    );
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40000, POD_B, 80, TCP_SYN)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40001, POD_B, 81, TCP_SYN)),
        TC_ACT_SHOT,
        "B's ingress"
    );
    assert_eq!(count(&node, MetricReason::DropPolicy, IN), 1);
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40002, NATIVE_POD, 80, TCP_SYN)),
        TC_ACT_SHOT,
        "A's egress"
    );
    assert_eq!(count(&node, MetricReason::DropPolicy, EG), 1);

    // B answers from its own veth: swap which pod sits behind the test device.
    let swapped = BTreeMap::from([
        (
            POD_A.into(),
            EndpointInfo {
                ifindex: 4242,
                identity: ID_A,
                endpoint_id: EP_A,
                ..Default::default()
            },
        ),
        (
            POD_B.into(),
            EndpointInfo {
                ifindex: LO,
                identity: ID_B,
                endpoint_id: EP_B,
                ..Default::default()
            },
        ),
    ]);
    node.dataplane.endpoints.converge(&swapped, true).unwrap();
    let from_b = |frame: &[u8]| out_of_a(&node, frame);
    assert_eq!(
        from_b(&tcp(POD_B, 80, POD_A, 40000, TCP_SYN | TCP_ACK)),
        TC_ACT_REDIRECT,
        "a reply passes B's egress and A's ingress, both default deny"
    );
    assert_eq!(
        from_b(&tcp(POD_B, 80, POD_A, 40009, TCP_SYN | TCP_ACK)),
        TC_ACT_SHOT,
        "not a reply"
    );
}

#[test]
fn a_revision_change_re_judges_established_connections() {
    let mut node = node();
    let https = (rule(EP_A, EG, ID_WORLD, PROTO_TCP, 443, 16), Verdict::Allow);
    let dns = (rule(EP_A, EG, ID_WORLD, PROTO_UDP, 53, 16), Verdict::Allow);
    let deny_eg = POLICY_F_DEFAULT_DENY_EGRESS;
    apply(&mut node, &[https, dns], &[(EP_A, state(1, deny_eg))]);
    let syn = tcp(POD_A, 40000, WORLD, 443, TCP_SYN);
    let data = tcp(POD_A, 40000, WORLD, 443, TCP_ACK);
    let udp_flow = udp(POD_A, 5000, WORLD, 53);
    assert_eq!(out_of_a(&node, &syn), TC_ACT_OK);
    assert_eq!(out_of_a(&node, &udp_flow), TC_ACT_OK);
    assert_eq!(ct_flags(&node, POD_A, WORLD, EG).map(|(_, r)| r), Some(1));

    // Revision 2 still allows HTTPS but no longer DNS.
    apply(&mut node, &[https], &[(EP_A, state(2, deny_eg))]);
    assert_eq!(
        out_of_a(&node, &data),
        TC_ACT_OK,
        "still allowed: continues"
    );
    let tcp_entry = node
        .dataplane
        .conntrack
        .entries()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.proto == 6 && k.dir == EG as u8)
        .unwrap();
    assert_eq!(tcp_entry.1.policy_revision, 2, "re-judged under revision 2");
    assert_eq!(out_of_a(&node, &udp_flow), TC_ACT_SHOT, "now denied");
    assert!(
        !node
            .dataplane
            .conntrack
            .entries()
            .unwrap()
            .iter()
            .any(|(k, _)| k.proto == 17),
        "the denied connection's entry is gone"
    );
    assert_eq!(count(&node, MetricReason::DropPolicy, EG), 1);
    let drop = events(&node)
        .into_iter()
        .find(|e| e.kind == EventKind::Drop)
        .expect("a drop event");
    assert_eq!(drop.matched, PolicyMatch::Conntrack);
    assert_eq!(drop.verdict, Some(EventVerdict::Deny));
    assert_eq!(drop.dport, 53);

    // Entries change without a revision bump: established connections are untouched.
    apply(&mut node, &[], &[(EP_A, state(2, deny_eg))]);
    assert_eq!(out_of_a(&node, &data), TC_ACT_OK, "judged at its start");
    assert_eq!(out_of_a(&node, &syn), TC_ACT_OK);
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40001, WORLD, 443, TCP_SYN)),
        TC_ACT_SHOT,
        "a new connection is judged now"
    );
}

#[test]
fn audit_mode_passes_counts_and_reports_would_be_drops() {
    let mut node = node();
    set_flags(&mut node, NODE_F_TUNNEL | NODE_F_POLICY_AUDIT);
    apply(
        &mut node,
        &[(rule(EP_B, IN, ID_NATIVE, PROTO_TCP, 80, 16), Verdict::Deny)],
        &[(EP_B, state(1, POLICY_F_DEFAULT_DENY_INGRESS))],
    );
    events(&node);
    assert_eq!(
        netdev_in(&node, &tcp(NATIVE_POD, 1000, POD_B, 80, TCP_SYN)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        netdev_in(&node, &udp(NATIVE_POD, 1001, POD_B, 53)),
        TC_ACT_REDIRECT
    );
    assert_eq!(count(&node, MetricReason::PolicyAudit, IN), 2);
    assert_eq!(count(&node, MetricReason::DropPolicy, IN), 0);
    assert_eq!(count(&node, MetricReason::DropPolicyDeny, IN), 0);
    let audits: Vec<_> = events(&node)
        .into_iter()
        .filter(|e| e.verdict == Some(EventVerdict::Audit))
        .collect();
    assert_eq!(audits.len(), 2);
    assert_eq!(audits[0].matched, PolicyMatch::L4);
    assert_eq!(audits[0].reason, Some(MetricReason::DropPolicyDeny));
    assert_eq!(audits[0].kind, EventKind::PolicyVerdict);
    assert_eq!(audits[1].matched, PolicyMatch::Default);
    assert_eq!(audits[1].reason, Some(MetricReason::DropPolicy));
    assert_eq!(
        ct_flags(&node, NATIVE_POD, POD_B, IN).map(|(f, _)| f & CT_F_AUDIT),
        Some(CT_F_AUDIT)
    );
    // Audit mode off: the audited connection is judged again, and dropped.
    set_flags(&mut node, NODE_F_TUNNEL);
    assert_eq!(
        netdev_in(&node, &tcp(NATIVE_POD, 1000, POD_B, 80, TCP_ACK)),
        TC_ACT_SHOT
    );
    assert_eq!(count(&node, MetricReason::DropPolicyDeny, IN), 1);
}

#[test]
fn events_carry_the_verdict_identities_and_tuple() {
    let mut node = node();
    apply(
        &mut node,
        &[(rule(EP_B, IN, ID_NATIVE, PROTO_TCP, 80, 16), Verdict::Allow)],
        &[(EP_B, state(1, POLICY_F_DEFAULT_DENY_INGRESS))],
    );
    let before = monotonic_now_ns();
    assert_eq!(
        netdev_in(&node, &tcp(NATIVE_POD, 1000, POD_B, 80, TCP_SYN)),
        TC_ACT_REDIRECT
    );
    // Established: no second verdict event.
    assert_eq!(
        netdev_in(&node, &tcp(NATIVE_POD, 1000, POD_B, 80, TCP_ACK)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        netdev_in(&node, &udp(NATIVE_POD, 1001, POD_B, 81)),
        TC_ACT_SHOT
    );
    // A drop outside policy: a spoofed source.
    assert_eq!(
        out_of_a(&node, &udp(Ipv4Addr::new(10, 0, 1, 99), 1, WORLD, 2)),
        TC_ACT_SHOT
    );
    let evs = events(&node);
    assert_eq!(evs.len(), 3, "{evs:#?}");
    let (verdict, deny, spoof) = (evs[0], evs[1], evs[2]);
    assert!(verdict.ts_ns >= before && verdict.ts_ns <= monotonic_now_ns());
    assert_eq!(verdict.kind, EventKind::PolicyVerdict);
    assert_eq!(verdict.verdict, Some(EventVerdict::Allow));
    assert_eq!(verdict.reason, None);
    assert_eq!(verdict.matched, PolicyMatch::L4);
    assert_eq!(verdict.direction, Some(IN));
    assert_eq!(verdict.endpoint_id, EP_B);
    assert_eq!(
        (verdict.src_identity, verdict.dst_identity),
        (ID_NATIVE, ID_B)
    );
    assert_eq!(
        (verdict.saddr, verdict.daddr),
        (NATIVE_POD.into(), POD_B.into())
    );
    assert_eq!(
        (verdict.protocol, verdict.sport, verdict.dport),
        (6, 1000, 80)
    );
    assert_eq!(verdict.ifindex, LO);

    assert_eq!(deny.kind, EventKind::Drop);
    assert_eq!(deny.reason, Some(MetricReason::DropPolicy));
    assert_eq!(deny.verdict, Some(EventVerdict::Deny));
    assert_eq!(deny.matched, PolicyMatch::Default);
    assert_eq!((deny.protocol, deny.sport, deny.dport), (17, 1001, 81));
    assert_eq!(deny.src_identity, ID_NATIVE);

    assert_eq!(spoof.kind, EventKind::Drop);
    assert_eq!(spoof.reason, Some(MetricReason::DropInvalidSource));
    assert_eq!(spoof.direction, Some(EG));
    assert_eq!(spoof.verdict, None);
    assert_eq!(spoof.saddr, Ipv4Addr::new(10, 0, 1, 99));
    assert_eq!(count(&node, MetricReason::EventLost, IN), 0);
}

#[test]
fn allow_verdicts_are_aggregated_per_flow_and_drops_always_reported() {
    use tendril_datapath::bpf::maps::{
        POLICY_EVENTS_AGGREGATE, POLICY_EVENTS_ALL, POLICY_EVENTS_DROPS,
    };
    let mut node = node();
    apply(
        &mut node,
        &[(rule(EP_B, IN, ID_NATIVE, PROTO_TCP, 80, 16), Verdict::Allow)],
        &[(EP_B, state(1, POLICY_F_DEFAULT_DENY_INGRESS))],
    );
    let syn = |sport| tcp(NATIVE_POD, sport, POD_B, 80, TCP_SYN);
    let denied = |sport| udp(NATIVE_POD, sport, POD_B, 81);
    let kinds = |node: &Node| {
        events(node)
            .into_iter()
            .map(|e| (e.kind, e.sport))
            .collect::<Vec<_>>()
    };
    let (verdict, drop) = (EventKind::PolicyVerdict, EventKind::Drop);

    // Aggregate (a minute): the flow's first connection only; every drop.
    node.dataplane
        .policy
        .set_event_settings(POLICY_EVENTS_AGGREGATE, 60_000_000_000)
        .unwrap();
    for sport in 1000..1003 {
        assert_eq!(netdev_in(&node, &syn(sport)), TC_ACT_REDIRECT);
        assert_eq!(netdev_in(&node, &denied(sport)), TC_ACT_SHOT);
    }
    assert_eq!(
        kinds(&node),
        [(verdict, 1000), (drop, 1000), (drop, 1001), (drop, 1002)]
    );
    // Another port is another flow.
    apply(
        &mut node,
        &[
            (rule(EP_B, IN, ID_NATIVE, PROTO_TCP, 80, 16), Verdict::Allow),
            (
                rule(EP_B, IN, ID_NATIVE, PROTO_TCP, 8080, 16),
                Verdict::Allow,
            ),
        ],
        &[(EP_B, state(2, POLICY_F_DEFAULT_DENY_INGRESS))],
    );
    assert_eq!(
        netdev_in(&node, &tcp(NATIVE_POD, 1003, POD_B, 8080, TCP_SYN)),
        TC_ACT_REDIRECT
    );
    assert_eq!(netdev_in(&node, &syn(1004)), TC_ACT_REDIRECT);
    assert_eq!(kinds(&node), [(verdict, 1003)]);

    // All: every new connection.
    node.dataplane
        .policy
        .set_event_settings(POLICY_EVENTS_ALL, 0)
        .unwrap();
    assert_eq!(netdev_in(&node, &syn(1005)), TC_ACT_REDIRECT);
    assert_eq!(netdev_in(&node, &syn(1006)), TC_ACT_REDIRECT);
    assert_eq!(kinds(&node), [(verdict, 1005), (verdict, 1006)]);

    // Drops only: no allow verdict, still the drops.
    node.dataplane
        .policy
        .set_event_settings(POLICY_EVENTS_DROPS, 0)
        .unwrap();
    assert_eq!(
        netdev_in(&node, &tcp(NATIVE_POD, 1007, POD_B, 8080, TCP_SYN)),
        TC_ACT_REDIRECT
    );
    assert_eq!(netdev_in(&node, &denied(1007)), TC_ACT_SHOT);
    assert_eq!(kinds(&node), [(drop, 1007)]);
    // The epoch is the policy step's, never touched by the event settings.
    let config = node.dataplane.policy.config().unwrap();
    assert_eq!(config.event_mode, POLICY_EVENTS_DROPS);
    assert!(config.epoch >= 2, "{config:?}");
}

#[test]
fn established_connections_skip_policy_state_until_the_epoch_moves() {
    let mut node = node();
    let https = (rule(EP_A, EG, ID_WORLD, PROTO_TCP, 443, 16), Verdict::Allow);
    let deny_eg = POLICY_F_DEFAULT_DENY_EGRESS;
    apply(&mut node, &[https], &[(EP_A, state(1, deny_eg))]);
    let epoch = node.dataplane.policy.config().unwrap().epoch;
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40000, WORLD, 443, TCP_SYN)),
        TC_ACT_OK
    );
    let stamp = |node: &Node| {
        let (_, v) = node
            .dataplane
            .conntrack
            .entries()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.dir == EG as u8)
            .unwrap();
        (v.policy_revision, v.policy_epoch)
    };
    assert_eq!(stamp(&node), (1, epoch));
    // Entries change, the revision does not: no new epoch, nothing re-judged.
    apply(&mut node, &[], &[(EP_A, state(1, deny_eg))]);
    assert_eq!(node.dataplane.policy.config().unwrap().epoch, epoch);
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40000, WORLD, 443, TCP_ACK)),
        TC_ACT_OK
    );
    // Another endpoint's revision moves the epoch: the connection's revision is compared
    // once (unchanged: it passes and is stamped with the new epoch).
    apply(
        &mut node,
        &[],
        &[(EP_A, state(1, deny_eg)), (EP_B, state(7, 0))],
    );
    let moved = node.dataplane.policy.config().unwrap().epoch;
    assert_ne!(moved, epoch);
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40000, WORLD, 443, TCP_ACK)),
        TC_ACT_OK
    );
    assert_eq!(stamp(&node), (1, moved));
    // Its own revision moves: re-judged against the (now empty) policy and dropped.
    apply(
        &mut node,
        &[],
        &[(EP_A, state(2, deny_eg)), (EP_B, state(7, 0))],
    );
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40000, WORLD, 443, TCP_ACK)),
        TC_ACT_SHOT
    );
}

#[test]
fn a_full_ring_buffer_counts_lost_events() {
    let sizes = MapSizes {
        events: 4096,
        ..MapSizes::default()
    };
    let mut node = Node::load("ring", &sizes);
    let endpoints = BTreeMap::from([(
        POD_A.into(),
        EndpointInfo {
            ifindex: LO,
            identity: ID_A,
            endpoint_id: EP_A,
            ..Default::default()
        },
    )]);
    node.dataplane.endpoints.converge(&endpoints, true).unwrap();
    apply(
        &mut node,
        &[],
        &[(EP_A, state(1, POLICY_F_DEFAULT_DENY_EGRESS))],
    );
    // 48 bytes per record (header + 40): a 4 KiB ring holds fewer than 100.
    for port in 0..200 {
        assert_eq!(out_of_a(&node, &udp(POD_A, port, WORLD, 53)), TC_ACT_SHOT);
    }
    let lost = count(&node, MetricReason::EventLost, EG);
    let kept = events(&node).len() as u64;
    assert!(lost > 0, "the ring overflowed");
    assert_eq!(lost + kept, 200);
    assert_eq!(count(&node, MetricReason::DropPolicy, EG), 200);
}

/// Flags of the conntrack entry whose source port is `sport`.
fn flags_of(node: &Node, sport: u16) -> Option<u8> {
    node.dataplane
        .conntrack
        .entries()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.sport == sport)
        .map(|(_, v)| v.flags)
}

#[test]
fn tcp_fin_marks_closing_and_gc_applies_the_timeouts() {
    let mut node = node();
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40000, WORLD, 443, TCP_SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        stack_in(&node, &tcp(WORLD, 443, POD_A, 40000, TCP_SYN | TCP_ACK), 2),
        TC_ACT_OK
    );
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40001, WORLD, 443, TCP_SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        stack_in(&node, &tcp(WORLD, 443, POD_A, 40001, TCP_SYN | TCP_ACK), 2),
        TC_ACT_OK
    );
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40001, WORLD, 443, TCP_FIN | TCP_ACK)),
        TC_ACT_OK
    );
    assert_eq!(
        flags_of(&node, 40001),
        Some(CT_F_SEEN_REPLY | CT_F_FIN_FORWARD),
        "half-closed: the other side may still send"
    );
    assert_eq!(
        stack_in(&node, &tcp(WORLD, 443, POD_A, 40001, TCP_FIN | TCP_ACK), 2),
        TC_ACT_OK
    );
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40002, WORLD, 443, TCP_SYN)),
        TC_ACT_OK,
        "never answered"
    );
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40003, WORLD, 443, TCP_SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        stack_in(&node, &tcp(WORLD, 443, POD_A, 40003, TCP_RST), 2),
        TC_ACT_OK
    );
    assert_eq!(out_of_a(&node, &udp(POD_A, 5000, WORLD, 53)), TC_ACT_OK);
    assert_eq!(flags_of(&node, 40000), Some(CT_F_SEEN_REPLY));
    assert_eq!(
        flags_of(&node, 40001),
        Some(CT_F_SEEN_REPLY | CT_F_FIN_FORWARD | CT_F_FIN_REPLY | CT_F_CLOSING)
    );
    assert_eq!(flags_of(&node, 40002), Some(0));
    assert_eq!(flags_of(&node, 40003), Some(CT_F_SEEN_REPLY | CT_F_CLOSING));

    const S: u64 = 1_000_000_000;
    let now = monotonic_now_ns();
    assert_eq!(node.dataplane.conntrack_gc(now).unwrap(), 0);
    assert_eq!(node.dataplane.conntrack_gc(now + 11 * S).unwrap(), 2);
    assert_eq!(
        (flags_of(&node, 40001), flags_of(&node, 40003)),
        (None, None),
        "closing: 10 s"
    );
    assert_eq!(node.dataplane.conntrack_gc(now + 61 * S).unwrap(), 2);
    assert_eq!(
        (flags_of(&node, 40002), flags_of(&node, 5000)),
        (None, None),
        "60 s"
    );
    assert_eq!(flags_of(&node, 40000), Some(CT_F_SEEN_REPLY));
    assert_eq!(
        node.dataplane.conntrack_gc(now + 6 * 3600 * S + S).unwrap(),
        1
    );
    assert!(node.dataplane.conntrack.entries().unwrap().is_empty());
    let pressure = node.dataplane.pressure().unwrap();
    let ct = pressure.iter().find(|p| p.map == "conntrack").unwrap();
    assert_eq!(ct.entries, 0);
}

#[test]
fn gc_removes_the_connections_of_vanished_endpoints() {
    let mut node = node();
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40000, POD_B, 80, TCP_SYN)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        netdev_in(&node, &udp(NATIVE_POD, 1000, POD_B, 53)),
        TC_ACT_REDIRECT
    );
    // A's egress entry, B's two ingress entries.
    assert_eq!(node.dataplane.conntrack.entries().unwrap().len(), 3);
    let now = monotonic_now_ns();
    assert_eq!(node.dataplane.conntrack_gc(now).unwrap(), 0);
    let only_a = BTreeMap::from([(
        POD_A.into(),
        EndpointInfo {
            ifindex: LO,
            identity: ID_A,
            endpoint_id: EP_A,
            ..Default::default()
        },
    )]);
    node.dataplane.endpoints.converge(&only_a, true).unwrap();
    assert_eq!(node.dataplane.conntrack_gc(now).unwrap(), 2);
    let left = node.dataplane.conntrack.entries().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0.endpoint_id, EP_A);
    let pressure = node.dataplane.pressure().unwrap();
    let ct = pressure.iter().find(|p| p.map == "conntrack").unwrap();
    assert_eq!((ct.entries, ct.max_entries), (1, 262_144));
}

#[test]
fn converge_policy_keeps_stale_entries_until_pruned() {
    let mut node = node();
    let keep = (l3(EP_A, EG, ID_B), Verdict::Allow);
    let stale = (rule(EP_A, EG, ID_NATIVE, PROTO_TCP, 80, 16), Verdict::Allow);
    apply(
        &mut node,
        &[keep, stale],
        &[(EP_A, state(1, 0)), (EP_B, state(1, 0))],
    );
    let entries = BTreeMap::from([keep]);
    let states = BTreeMap::from([(EP_A, state(2, POLICY_F_DEFAULT_DENY_EGRESS))]);
    let report = node
        .dataplane
        .policy
        .converge(&entries, &states, false)
        .unwrap();
    assert_eq!(
        (report.updated, report.deleted, report.stale_kept),
        (1, 0, 2)
    );
    assert_eq!(node.dataplane.policy.entries().unwrap().len(), 2);
    let held = node.dataplane.policy.states().unwrap();
    assert_eq!(held.len(), 2);
    assert_eq!(
        held[&EP_A],
        state(1, POLICY_F_DEFAULT_DENY_EGRESS),
        "new flags; the revision waits for the stale entry to go"
    );
    let report = node
        .dataplane
        .policy
        .converge(&entries, &states, true)
        .unwrap();
    assert_eq!(
        (report.deleted, report.updated, report.unchanged),
        (2, 1, 1)
    );
    assert_eq!(node.dataplane.policy.entries().unwrap(), entries);
    assert_eq!(node.dataplane.policy.states().unwrap(), states);
    let pressure = node.dataplane.pressure().unwrap();
    let policy = pressure.iter().find(|p| p.map == "policy").unwrap();
    assert_eq!((policy.entries, policy.max_entries), (1, 65_536));
}

/// The bug of writing the new revision before the stale entries are gone: a packet in
/// between is re-judged against a stale allow, and its connection stays open under the new
/// revision. A call without `prune` leaves exactly that in-between state in place, so it
/// shows the order: the revision changes only once the stale entries are gone.
#[test]
fn one_convergence_re_judges_established_flows_against_only_the_new_entries() {
    let mut node = node();
    let https = (rule(EP_A, EG, ID_WORLD, PROTO_TCP, 443, 16), Verdict::Allow);
    let dns = (rule(EP_A, EG, ID_WORLD, PROTO_UDP, 53, 16), Verdict::Allow);
    let deny_eg = POLICY_F_DEFAULT_DENY_EGRESS;
    apply(&mut node, &[https, dns], &[(EP_A, state(1, deny_eg))]);
    let data = tcp(POD_A, 40000, WORLD, 443, TCP_ACK);
    let dns_flow = udp(POD_A, 5000, WORLD, 53);
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 40000, WORLD, 443, TCP_SYN)),
        TC_ACT_OK
    );
    assert_eq!(out_of_a(&node, &dns_flow), TC_ACT_OK);

    // Revision 2 drops DNS. Without pruning the stale DNS entry stays, and so does
    // revision 1: the flows are not re-judged against it.
    let entries = BTreeMap::from([https]);
    let states = BTreeMap::from([(EP_A, state(2, deny_eg))]);
    let report = node
        .dataplane
        .policy
        .converge_with_cidrs(&BTreeMap::new(), &entries, &states, false)
        .unwrap()
        .1;
    assert_eq!(report.stale_kept, 1);
    assert_eq!(node.dataplane.policy.states().unwrap()[&EP_A].revision, 1);
    assert_eq!(out_of_a(&node, &dns_flow), TC_ACT_OK, "old policy, whole");
    assert_eq!(out_of_a(&node, &data), TC_ACT_OK);

    // One pruning call: the DNS flow is dropped at its next packet, HTTPS continues.
    let (_, report) = node
        .dataplane
        .policy
        .converge_with_cidrs(&BTreeMap::new(), &entries, &states, true)
        .unwrap();
    assert!(report.is_converged());
    assert_eq!((report.deleted, report.updated), (1, 1));
    assert_eq!(node.dataplane.policy.states().unwrap(), states);
    assert_eq!(
        out_of_a(&node, &dns_flow),
        TC_ACT_SHOT,
        "allowed only by revision 1"
    );
    assert_eq!(out_of_a(&node, &data), TC_ACT_OK, "allowed by both");
    let revisions: Vec<(u8, u32)> = node
        .dataplane
        .conntrack
        .entries()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.proto, v.policy_revision))
        .collect();
    assert_eq!(
        revisions,
        vec![(6, 2)],
        "DNS entry removed, HTTPS re-judged"
    );
    assert_eq!(count(&node, MetricReason::DropPolicy, EG), 1);

    // A new endpoint: its state is written once (interim revision 0, then its own).
    let entries = BTreeMap::from([
        https,
        (rule(EP_B, EG, ID_WORLD, PROTO_UDP, 53, 16), Verdict::Allow),
    ]);
    let states = BTreeMap::from([(EP_A, state(2, deny_eg)), (EP_B, state(1, deny_eg))]);
    let (_, report) = node
        .dataplane
        .policy
        .converge_with_cidrs(&BTreeMap::new(), &entries, &states, true)
        .unwrap();
    assert!(report.is_converged());
    assert_eq!(report.added, 2, "one entry, one state (counted once)");
    assert_eq!(node.dataplane.policy.states().unwrap(), states);
}

#[test]
fn policy_and_cidrs_converge_together() {
    let mut node = node();
    let (block, except) = (LOCAL_IDENTITY_FLAG | 1, LOCAL_IDENTITY_FLAG | 2);
    let cidrs: BTreeMap<IpNet, u32> = BTreeMap::from([
        ("10.0.0.0/8".parse().unwrap(), block),
        ("10.0.3.0/24".parse().unwrap(), except),
    ]);
    let entries = BTreeMap::from([
        (l3(EP_A, EG, 0), Verdict::Allow),
        (l3(EP_A, EG, except), Verdict::Deny),
    ]);
    let states = BTreeMap::from([(EP_A, state(1, POLICY_F_DEFAULT_DENY_EGRESS))]);
    let (c, p) = node
        .dataplane
        .policy
        .converge_with_cidrs(&cidrs, &entries, &states, true)
        .unwrap();
    assert_eq!((c.added, p.added), (2, 3));
    let to_native = tcp(POD_A, 1000, NATIVE_POD, 80, TCP_SYN);
    assert_eq!(out_of_a(&node, &to_native), TC_ACT_SHOT, "the CIDR deny");
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 1001, WORLD, 80, TCP_SYN)),
        TC_ACT_OK
    );

    // The deny and its prefix go; without pruning both stay.
    let cidrs2 = BTreeMap::from([("10.0.0.0/8".parse().unwrap(), block)]);
    let entries2 = BTreeMap::from([(l3(EP_A, EG, 0), Verdict::Allow)]);
    let (c, p) = node
        .dataplane
        .policy
        .converge_with_cidrs(&cidrs2, &entries2, &states, false)
        .unwrap();
    assert_eq!((c.stale_kept, p.stale_kept), (1, 1));
    assert_eq!(out_of_a(&node, &to_native), TC_ACT_SHOT);
    let (c, p) = node
        .dataplane
        .policy
        .converge_with_cidrs(&cidrs2, &entries2, &states, true)
        .unwrap();
    assert_eq!((c.deleted, p.deleted), (1, 1));
    assert_eq!(node.dataplane.policy.cidrs().unwrap(), cidrs2);
    assert_eq!(node.dataplane.policy.entries().unwrap(), entries2);
    assert_eq!(out_of_a(&node, &to_native), TC_ACT_OK);
}

#[test]
fn later_fragments_are_judged_with_the_ports_of_the_first() {
    let mut node = node();
    apply(
        &mut node,
        &[(rule(EP_B, IN, ID_NATIVE, PROTO_UDP, 53, 16), Verdict::Allow)],
        &[(EP_B, state(1, POLICY_F_DEFAULT_DENY_INGRESS))],
    );
    let rest = |id| fragment(ipv4_frame(NATIVE_POD, POD_B, 17, &[0xAB; 24]), id, false, 2);
    let first = fragment(udp(NATIVE_POD, 1000, POD_B, 53), 7, true, 0);
    assert_eq!(netdev_in(&node, &first), TC_ACT_REDIRECT);
    assert_eq!(
        netdev_in(&node, &rest(7)),
        TC_ACT_REDIRECT,
        "port 53, established"
    );
    assert_eq!(
        netdev_in(&node, &rest(8)),
        TC_ACT_SHOT,
        "first fragment never seen: no ports"
    );
    let denied = fragment(udp(NATIVE_POD, 1001, POD_B, 54), 9, true, 0);
    assert_eq!(netdev_in(&node, &denied), TC_ACT_SHOT);
    assert_eq!(netdev_in(&node, &rest(9)), TC_ACT_SHOT, "port 54");
    assert_eq!(count(&node, MetricReason::ForwardLocal, IN), 2);
    assert_eq!(count(&node, MetricReason::DropPolicy, IN), 3);
}

/// A TCP connection whose ingress rule goes away stops, and stays stopped: the server's
/// next segment (no SYN, no state left) passes its own egress but starts no tracking, so
/// the client's segments cannot come back in as "replies" of a new entry.
#[test]
fn a_denied_tcp_connection_is_not_revived_by_the_other_sides_segments() {
    let mut node = node();
    let http = (rule(EP_A, IN, ID_WORLD, PROTO_TCP, 80, 16), Verdict::Allow);
    let deny_in = POLICY_F_DEFAULT_DENY_INGRESS;
    apply(&mut node, &[http], &[(EP_A, state(1, deny_in))]);
    let client_ack = tcp(WORLD, 50000, POD_A, 80, TCP_ACK);
    let server_data = tcp(POD_A, 80, WORLD, 50000, TCP_ACK);
    assert_eq!(
        stack_in(&node, &tcp(WORLD, 50000, POD_A, 80, TCP_SYN), ID_WORLD),
        TC_ACT_OK
    );
    assert_eq!(
        out_of_a(&node, &tcp(POD_A, 80, WORLD, 50000, TCP_SYN | TCP_ACK)),
        TC_ACT_OK
    );
    assert_eq!(stack_in(&node, &client_ack, ID_WORLD), TC_ACT_OK);

    // Revision 2 drops the rule: the client's next segment is dropped, its entry removed.
    apply(&mut node, &[], &[(EP_A, state(2, deny_in))]);
    assert_eq!(stack_in(&node, &client_ack, ID_WORLD), TC_ACT_SHOT);
    // The server keeps sending (A has no egress policy): it passes, untracked.
    assert_eq!(out_of_a(&node, &server_data), TC_ACT_OK);
    assert!(
        !node
            .dataplane
            .conntrack
            .entries()
            .unwrap()
            .iter()
            .any(|(k, _)| k.proto == 6),
        "no TCP state from a mid-stream segment"
    );
    assert_eq!(
        stack_in(&node, &client_ack, ID_WORLD),
        TC_ACT_SHOT,
        "still denied"
    );
    assert_eq!(count(&node, MetricReason::DropPolicy, IN), 2);
}
