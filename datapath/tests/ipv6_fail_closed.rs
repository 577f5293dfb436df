//! IPv6 fails closed at the pods' hooks (bpf/lib/ipv6.h), by `BPF_PROG_TEST_RUN` of the
//! real `from_container` / `to_container` on crafted IPv6 packets: while the node enforces
//! no IPv6 policy, IPv6 to and from an endpoint with policy is dropped (counted as
//! `ipv6_policy_not_enforced`, reported with its IPv6 addresses), neighbour discovery and
//! MLD still pass, an endpoint without policy keeps its IPv6, a spoofed IPv6 source is
//! dropped as for IPv4, and audit mode passes what it would drop. Needs root.

mod bpf_support;

use std::{collections::BTreeMap, net::Ipv6Addr};

use bpf_support::*;
use tendril_datapath::bpf::{
    EventKind, EventVerdict, Hook, MapSizes, PolicyState,
    maps::{Direction, IpcacheValue, MetricReason, NODE_F_POLICY_AUDIT},
    policy::{POLICY_F_DEFAULT_DENY_INGRESS, POLICY_F_SELECTED},
};

const POD_A: &str = "fd00:10::a";
const POD_B: &str = "fd00:10::b";
const REMOTE: &str = "fd00:20::5";
const ID_A: u32 = 256;
const ID_B: u32 = 257;
const EP_A: u16 = 1;
const EP_B: u16 = 2;
/// Pod A sits behind loopback, the device test runs use.
const LO: u32 = 1;
const IN: Direction = Direction::Ingress;
const EG: Direction = Direction::Egress;
const ND_NEIGHBOUR_SOLICIT: u8 = 135;
const ND_ROUTER_SOLICIT: u8 = 133;
const MLD2_REPORT: u8 = 143;
const ECHO_REQUEST: u8 = 128;

fn ip(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// Pods A (behind loopback) and B (behind 4242) with their IPv6 addresses, as the agent
/// writes them; A selected by a policy when `a_has_policy`.
fn node(a_has_policy: bool) -> Node {
    node_with_state(a_has_policy.then_some(POLICY_F_SELECTED | POLICY_F_DEFAULT_DENY_INGRESS))
}

/// As [`node`], A's `policy_state` flags given (`None`: no entry).
fn node_with_state(a_flags: Option<u32>) -> Node {
    let mut node = Node::load("v6", &MapSizes::default());
    let endpoints = BTreeMap::from([
        (ip(POD_A).into(), endpoint_info(LO, ID_A, EP_A, 10)),
        (ip(POD_B).into(), endpoint_info(4242, ID_B, EP_B, 20)),
    ]);
    let ipcache = BTreeMap::from([
        (
            format!("{POD_A}/128").parse().unwrap(),
            IpcacheValue::new(ID_A, None),
        ),
        (
            format!("{POD_B}/128").parse().unwrap(),
            IpcacheValue::new(ID_B, None),
        ),
    ]);
    node.set_endpoints(&endpoints);
    node.set_ipcache(&ipcache);
    node.set_node_flags(0);
    if let Some(flags) = a_flags {
        node.set_policy_states(&BTreeMap::from([(
            EP_A,
            PolicyState { revision: 1, flags },
        )]));
    }
    node
}

/// `from_container` of pod A.
fn out_of_a(node: &Node, frame: &[u8]) -> u32 {
    node.verdict(Hook::FromContainer, frame, 0)
}

/// `to_container` of the pod behind loopback, no identity in the mark.
fn into_pod(node: &Node, frame: &[u8]) -> u32 {
    node.verdict(Hook::ToContainer, frame, 0)
}

#[test]
fn ipv6_from_an_endpoint_with_policy_is_dropped_and_reported() {
    let node = node(true);
    let frame = udp6(ip(POD_A), 40000, ip(POD_B), 53);
    assert_eq!(out_of_a(&node, &frame), TC_ACT_SHOT);
    assert_eq!(node.count(MetricReason::DropIpv6PolicyNotEnforced, EG), 1);
    assert_eq!(node.count(MetricReason::ToStackNonIpv4, EG), 0);
    let evs = node.events();
    assert_eq!(evs.len(), 1, "{evs:?}");
    let ev = &evs[0];
    assert_eq!(ev.kind, EventKind::Drop);
    assert_eq!(ev.reason, Some(MetricReason::DropIpv6PolicyNotEnforced));
    assert_eq!(ev.verdict, Some(EventVerdict::Deny));
    assert_eq!(ev.direction, Some(EG));
    assert_eq!((ev.saddr, ev.daddr), (ip(POD_A).into(), ip(POD_B).into()));
    assert_eq!((ev.protocol, ev.sport, ev.dport), (17, 40000, 53));
    assert_eq!(
        (ev.endpoint_id, ev.src_identity, ev.dst_identity),
        (EP_A, ID_A, ID_B),
        "the peer's identity from the IPv6 ipcache entry"
    );
    // Any transport, also behind extension headers, and to anywhere.
    let mut hop_by_hop = vec![17, 0, 5, 2, 0, 0, 1, 0];
    hop_by_hop.extend_from_slice(&udp6(ip(POD_A), 40000, ip(REMOTE), 53)[54..]);
    let behind_options = ipv6_frame(ip(POD_A), ip(REMOTE), IPPROTO_HOPOPTS, 64, &hop_by_hop);
    assert_eq!(out_of_a(&node, &behind_options), TC_ACT_SHOT);
    let ev = node.events().pop().unwrap();
    assert_eq!((ev.protocol, ev.dport, ev.dst_identity), (17, 53, 2));
    assert_eq!(
        out_of_a(&node, &icmp6(ip(POD_A), ip(REMOTE), ECHO_REQUEST, 64)),
        TC_ACT_SHOT
    );
    assert_eq!(node.count(MetricReason::DropIpv6PolicyNotEnforced, EG), 3);
}

#[test]
fn ipv6_to_an_endpoint_with_policy_is_dropped_and_reported() {
    let node = node(true);
    let frame = udp6(ip(POD_B), 40000, ip(POD_A), 8080);
    assert_eq!(into_pod(&node, &frame), TC_ACT_SHOT);
    assert_eq!(node.count(MetricReason::DropIpv6PolicyNotEnforced, IN), 1);
    assert_eq!(node.count(MetricReason::DeliverViaStack, IN), 0);
    let ev = node.events().pop().unwrap();
    assert_eq!(ev.reason, Some(MetricReason::DropIpv6PolicyNotEnforced));
    assert_eq!(ev.direction, Some(IN));
    assert_eq!(
        (ev.src_identity, ev.dst_identity, ev.endpoint_id),
        (ID_B, ID_A, EP_A)
    );
    assert_eq!(ev.daddr, std::net::IpAddr::from(ip(POD_A)));
    // A destination that is no endpoint address (link-local) cannot be judged: dropped.
    let link_local = udp6(ip("fe80::1"), 40000, ip("fe80::2"), 8080);
    assert_eq!(into_pod(&node, &link_local), TC_ACT_SHOT);
    assert_eq!(node.count(MetricReason::DropIpv6PolicyNotEnforced, IN), 2);
}

#[test]
fn ipv6_neighbour_discovery_and_mld_pass_with_the_hop_limits_they_require() {
    let node = node(true);
    let ns_to_gateway = icmp6(ip(POD_A), ip("ff02::1:ff00:1"), ND_NEIGHBOUR_SOLICIT, 255);
    assert_eq!(out_of_a(&node, &ns_to_gateway), TC_ACT_OK);
    let rs = icmp6(ip("fe80::a"), ip("ff02::2"), ND_ROUTER_SOLICIT, 255);
    assert_eq!(
        out_of_a(&node, &rs),
        TC_ACT_OK,
        "from the link-local address"
    );
    let ns_from_host = icmp6(ip("fe80::1"), ip(POD_A), ND_NEIGHBOUR_SOLICIT, 255);
    assert_eq!(into_pod(&node, &ns_from_host), TC_ACT_OK);
    // MLD behind its hop-by-hop router alert, hop limit 1.
    let mut mld = vec![IPPROTO_ICMPV6, 0, 5, 2, 0, 0, 1, 0];
    mld.extend_from_slice(&[MLD2_REPORT, 0, 0, 0, 0, 0, 0, 0]);
    let mld = ipv6_frame(ip("fe80::a"), ip("ff02::16"), IPPROTO_HOPOPTS, 1, &mld);
    assert_eq!(out_of_a(&node, &mld), TC_ACT_OK);
    // Routed traffic cannot pose as neighbour discovery.
    let routed_ns = icmp6(ip(POD_A), ip(REMOTE), ND_NEIGHBOUR_SOLICIT, 64);
    assert_eq!(out_of_a(&node, &routed_ns), TC_ACT_SHOT);
    assert_eq!(node.count(MetricReason::DropIpv6PolicyNotEnforced, EG), 1);
    assert!(
        node.events().len() == 1,
        "link control is not reported as a drop"
    );
}

#[test]
fn ipv6_of_an_endpoint_without_policy_passes() {
    // No state at all, and the state of an empty ResolvedPolicy (no policy selects A).
    for node in [node(false), node_with_state(Some(0))] {
        ipv6_passes_both_ways(&node);
    }
}

fn ipv6_passes_both_ways(node: &Node) {
    assert_eq!(
        out_of_a(node, &udp6(ip(POD_A), 40000, ip(POD_B), 53)),
        TC_ACT_OK
    );
    assert_eq!(node.count(MetricReason::ToStackNonIpv4, EG), 1);
    assert_eq!(
        into_pod(node, &udp6(ip(POD_B), 40000, ip(POD_A), 53)),
        TC_ACT_OK
    );
    assert_eq!(node.count(MetricReason::DeliverViaStack, IN), 1);
    assert!(node.events().is_empty());
}

#[test]
fn ipv6_with_a_spoofed_source_is_dropped_as_for_ipv4() {
    let node = node(false);
    // B's address is not behind loopback; REMOTE is no local endpoint at all.
    for src in [POD_B, REMOTE, "fe80::a"] {
        assert_eq!(
            out_of_a(&node, &udp6(ip(src), 40000, ip(REMOTE), 53)),
            TC_ACT_SHOT,
            "{src}"
        );
    }
    assert_eq!(node.count(MetricReason::DropInvalidSource, EG), 3);
    let ev = node.events().pop().unwrap();
    assert_eq!(ev.reason, Some(MetricReason::DropInvalidSource));
    assert_eq!(
        (ev.saddr, ev.daddr, ev.protocol),
        (ip("fe80::a").into(), ip(REMOTE).into(), 17),
        "drops outside policy carry the IPv6 addresses too"
    );
}

#[test]
fn ipv6_audit_mode_passes_counts_and_reports_what_it_would_drop() {
    let mut node = node(true);
    node.set_node_flags(NODE_F_POLICY_AUDIT);
    assert_eq!(
        out_of_a(&node, &udp6(ip(POD_A), 40000, ip(POD_B), 53)),
        TC_ACT_OK
    );
    assert_eq!(
        into_pod(&node, &udp6(ip(POD_B), 40000, ip(POD_A), 53)),
        TC_ACT_OK
    );
    assert_eq!(node.count(MetricReason::PolicyAudit, EG), 1);
    assert_eq!(node.count(MetricReason::PolicyAudit, IN), 1);
    assert_eq!(node.count(MetricReason::DropIpv6PolicyNotEnforced, EG), 0);
    let evs = node.events();
    assert_eq!(evs.len(), 2);
    assert!(evs.iter().all(|e| e.kind == EventKind::PolicyVerdict
        && e.verdict == Some(EventVerdict::Audit)
        && e.reason == Some(MetricReason::DropIpv6PolicyNotEnforced)));
}
