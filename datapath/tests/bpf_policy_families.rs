//! The datapath's policy truth table, run for IPv4 and IPv6 from one table with the same
//! expectations (issue 18): every case is a policy (entries, states, CIDR prefixes) and
//! packets between symbolic peers; each family gives the peers its own addresses, so a
//! case cannot pass for one family and fail for the other unnoticed. By
//! `BPF_PROG_TEST_RUN` of the real `from_container` (egress of pod A) and `to_container`
//! (ingress into pod A, the sender resolved through the ipcache) on crafted packets.
//! Needs root. The node enforces IPv6 policy (`NODE_F_IPV6_POLICY`, as the agent sets it).

mod bpf_support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use bpf_support::*;
use ipnet::IpNet;
use tendril_datapath::bpf::{
    EventKind, EventVerdict, Hook, MapSizes, PolicyEntry, PolicyState, Verdict,
    maps::{Direction, IpcacheValue, MetricReason, NODE_F_IPV6_POLICY},
    policy::{
        LOCAL_IDENTITY_FLAG, POLICY_F_DEFAULT_DENY_EGRESS, POLICY_F_DEFAULT_DENY_INGRESS,
        POLICY_F_SELECTED, PROTO_ANY, PROTO_TCP, PROTO_UDP, deny_flags,
    },
    propagate_denies,
};

const ID_A: u32 = 256;
const ID_B: u32 = 257;
const ID_PEER: u32 = 301;
const EP_A: u16 = 1;
const EP_B: u16 = 2;
/// Pod A sits behind loopback, the device test runs use.
const LO: u32 = 1;
const IN: Direction = Direction::Ingress;
const EG: Direction = Direction::Egress;
const BLOCK: u32 = LOCAL_IDENTITY_FLAG | 1;
const EXCEPT: u32 = LOCAL_IDENTITY_FLAG | 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// The peers of the table; each family has its addresses for them.
#[derive(Clone, Copy, Debug)]
enum Peer {
    /// The enforcement point: local pod A.
    A,
    /// Local pod B (identity [`ID_B`]).
    B,
    /// A pod of another node (identity [`ID_PEER`]).
    Remote,
    /// The world, inside the policy CIDR block.
    InBlock,
    /// The world, inside the block's except (a longer prefix).
    InExcept,
    /// The world, outside every policy prefix.
    Outside,
}

impl Family {
    fn addr(self, peer: Peer) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(match peer {
                Peer::A => Ipv4Addr::new(10, 0, 1, 10),
                Peer::B => Ipv4Addr::new(10, 0, 1, 20),
                Peer::Remote => Ipv4Addr::new(10, 0, 3, 5),
                Peer::InBlock => Ipv4Addr::new(203, 0, 113, 7),
                Peer::InExcept => Ipv4Addr::new(203, 0, 113, 200),
                Peer::Outside => Ipv4Addr::new(8, 8, 8, 8),
            }),
            Family::V6 => IpAddr::V6(match peer {
                Peer::A => "fd00:10::a".parse().unwrap(),
                Peer::B => "fd00:10::b".parse().unwrap(),
                Peer::Remote => "fd00:30::5".parse().unwrap(),
                Peer::InBlock => "2001:db8:1::7".parse().unwrap(),
                Peer::InExcept => "2001:db8:1:ff::7".parse().unwrap(),
                Peer::Outside => "2001:4860::8888".parse().unwrap(),
            }),
        }
    }

    /// The policy CIDR block and its except.
    fn cidrs(self) -> BTreeMap<IpNet, u32> {
        let (block, except) = match self {
            Family::V4 => ("203.0.113.0/24", "203.0.113.128/25"),
            Family::V6 => ("2001:db8:1::/48", "2001:db8:1:ff::/64"),
        };
        BTreeMap::from([
            (block.parse().unwrap(), BLOCK),
            (except.parse().unwrap(), EXCEPT),
        ])
    }

    /// The remote pods' prefix in the ipcache.
    fn remote_prefix(self) -> IpNet {
        match self {
            Family::V4 => "10.0.3.0/24".parse().unwrap(),
            Family::V6 => "fd00:30::/64".parse().unwrap(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum L4 {
    /// TCP with flags, from sport to dport.
    Tcp(u16, u16, u8),
    Udp(u16, u16),
    /// ICMP(v6) echo request / reply with this id.
    EchoRequest(u16),
    EchoReply(u16),
}

/// A packet of the table: egress out of A to `peer`, or ingress from `peer` into A.
#[derive(Clone, Copy, Debug)]
struct Packet {
    dir: Direction,
    peer: Peer,
    l4: L4,
}

fn out_to(peer: Peer, l4: L4) -> Packet {
    Packet { dir: EG, peer, l4 }
}

fn in_from(peer: Peer, l4: L4) -> Packet {
    Packet { dir: IN, peer, l4 }
}

fn frame(family: Family, src: IpAddr, dst: IpAddr, l4: L4) -> Vec<u8> {
    let (proto, body): (u8, Vec<u8>) = match l4 {
        L4::Tcp(sport, dport, flags) => {
            let mut b = Vec::new();
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xFF, 0xFF, 0, 0, 0, 0]);
            (6, b)
        }
        L4::Udp(sport, dport) => {
            let mut b = Vec::new();
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&[0, 24, 0, 0]);
            b.extend_from_slice(&[0xAB; 16]);
            (17, b)
        }
        L4::EchoRequest(id) | L4::EchoReply(id) => {
            let reply = matches!(l4, L4::EchoReply(_));
            let (proto, ty) = match (family, reply) {
                (Family::V4, false) => (1, 8),
                (Family::V4, true) => (1, 0),
                (Family::V6, false) => (IPPROTO_ICMPV6, 128),
                (Family::V6, true) => (IPPROTO_ICMPV6, 129),
            };
            let mut b = vec![ty, 0, 0, 0];
            b.extend_from_slice(&id.to_be_bytes());
            b.extend_from_slice(&[0, 1]);
            b.extend_from_slice(&[0; 16]);
            (proto, b)
        }
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_frame(s, d, proto, &body),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_frame(s, d, proto, 64, &body),
        _ => unreachable!("one family per packet"),
    }
}

/// One case: a policy for pod A and what each packet gets, in order (conntrack carries
/// state from one packet to the next).
struct Case {
    name: &'static str,
    entries: Vec<(PolicyEntry, Verdict)>,
    /// A's policy_state flags; `None`: no state (no policy).
    a_flags: Option<u32>,
    packets: Vec<(Packet, bool)>,
}

fn rule(dir: Direction, peer: u32, protocol: u8, port: u16, bits: u8) -> PolicyEntry {
    PolicyEntry {
        endpoint_id: EP_A,
        direction: dir,
        peer,
        protocol,
        port,
        port_prefix: bits,
    }
}

fn l3(dir: Direction, peer: u32) -> PolicyEntry {
    rule(dir, peer, PROTO_ANY, 0, 0)
}

const SYN: u8 = TCP_SYN;
const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
const ACK: u8 = TCP_ACK;
const DENY_IN: u32 = POLICY_F_SELECTED | POLICY_F_DEFAULT_DENY_INGRESS;
const DENY_EG: u32 = POLICY_F_SELECTED | POLICY_F_DEFAULT_DENY_EGRESS;

/// The table: the same for both families.
fn table() -> Vec<Case> {
    use Peer::*;
    vec![
        Case {
            name: "ingress allowed by peer identity, the rest default-denied",
            entries: vec![(l3(IN, ID_B), Verdict::Allow)],
            a_flags: Some(DENY_IN),
            packets: vec![
                (in_from(B, L4::Tcp(1000, 80, SYN)), true),
                (in_from(Remote, L4::Tcp(1000, 80, SYN)), false),
                (in_from(Outside, L4::Udp(1000, 53)), false),
                (in_from(B, L4::EchoRequest(7)), true),
                (in_from(Remote, L4::EchoRequest(7)), false),
            ],
        },
        Case {
            name: "protocol and port ranges matched by prefix",
            // TCP 80-83 from B (one /14 block), UDP any port from the remote pod.
            entries: vec![
                (rule(IN, ID_B, PROTO_TCP, 80, 14), Verdict::Allow),
                (rule(IN, ID_PEER, PROTO_UDP, 0, 0), Verdict::Allow),
            ],
            a_flags: Some(DENY_IN),
            packets: vec![
                (in_from(B, L4::Tcp(1000, 80, SYN)), true),
                (in_from(B, L4::Tcp(1001, 83, SYN)), true),
                (in_from(B, L4::Tcp(1002, 84, SYN)), false),
                (in_from(B, L4::Udp(1003, 80)), false),
                (in_from(Remote, L4::Udp(1004, 5353)), true),
                (in_from(Remote, L4::Tcp(1005, 80, SYN)), false),
            ],
        },
        Case {
            name: "deny wins over allow within and across lookups",
            entries: vec![
                (l3(IN, 0), Verdict::Allow),
                (rule(IN, ID_B, PROTO_TCP, 22, 16), Verdict::Deny),
                (l3(IN, ID_PEER), Verdict::Allow),
                (rule(IN, 0, PROTO_TCP, 23, 16), Verdict::Deny),
            ],
            a_flags: Some(DENY_IN),
            packets: vec![
                (in_from(B, L4::Tcp(1000, 22, SYN)), false),
                (in_from(B, L4::Tcp(1001, 80, SYN)), true),
                (in_from(Remote, L4::Tcp(1002, 23, SYN)), false),
                (in_from(Remote, L4::Tcp(1003, 22, SYN)), true),
                (in_from(Outside, L4::Tcp(1004, 80, SYN)), true),
            ],
        },
        Case {
            name: "no state is no policy; default deny only in the flagged direction",
            entries: vec![],
            a_flags: None,
            packets: vec![
                (in_from(Remote, L4::Tcp(1000, 80, SYN)), true),
                (out_to(Outside, L4::Udp(1001, 53)), true),
            ],
        },
        Case {
            name: "default deny ingress leaves egress open",
            entries: vec![],
            a_flags: Some(DENY_IN),
            packets: vec![
                (out_to(Remote, L4::Tcp(1000, 80, SYN)), true),
                (in_from(Remote, L4::Tcp(1001, 80, SYN)), false),
            ],
        },
        Case {
            name: "egress CIDR block with an except carved out by a longer prefix",
            entries: vec![(l3(EG, BLOCK), Verdict::Allow)],
            a_flags: Some(DENY_EG),
            packets: vec![
                (out_to(InBlock, L4::Tcp(1000, 443, SYN)), true),
                (out_to(InExcept, L4::Tcp(1001, 443, SYN)), false),
                (out_to(Outside, L4::Tcp(1002, 443, SYN)), false),
                (out_to(Remote, L4::Tcp(1003, 443, SYN)), false),
            ],
        },
        Case {
            name: "an explicit CIDR deny beats an identity allow of any peer",
            entries: vec![(l3(EG, 0), Verdict::Allow), (l3(EG, EXCEPT), Verdict::Deny)],
            a_flags: Some(DENY_EG),
            packets: vec![
                (out_to(InBlock, L4::Udp(1000, 53)), true),
                (out_to(InExcept, L4::Udp(1001, 53)), false),
            ],
        },
        Case {
            name: "replies and echo replies pass a default deny ingress, nothing else does",
            entries: vec![],
            a_flags: Some(DENY_IN),
            packets: vec![
                (out_to(Remote, L4::Tcp(40000, 80, SYN)), true),
                (in_from(Remote, L4::Tcp(80, 40000, SYN_ACK)), true),
                (out_to(Remote, L4::Tcp(40000, 80, ACK)), true),
                (in_from(Remote, L4::Tcp(80, 40000, ACK)), true),
                // Another port of the same peer is no reply.
                (in_from(Remote, L4::Tcp(80, 40001, ACK)), false),
                (out_to(Outside, L4::Udp(5000, 53)), true),
                (in_from(Outside, L4::Udp(53, 5000)), true),
                (in_from(Outside, L4::Udp(53, 5001)), false),
                (out_to(B, L4::EchoRequest(9)), true),
                (in_from(B, L4::EchoReply(9)), true),
                (in_from(B, L4::EchoReply(10)), false),
            ],
        },
        Case {
            name: "a mid-stream TCP segment without state is judged, never tracked",
            entries: vec![(rule(EG, ID_PEER, PROTO_TCP, 80, 16), Verdict::Allow)],
            a_flags: Some(DENY_IN | DENY_EG),
            packets: vec![
                // Allowed by egress policy, but an ACK starts no connection ...
                (out_to(Remote, L4::Tcp(40000, 80, ACK)), true),
                // ... so the other side's segments are no replies.
                (in_from(Remote, L4::Tcp(80, 40000, ACK)), false),
            ],
        },
    ]
}

/// A node with pods A and B and the remote pods' prefix, in both families, and `case`'s
/// policy for A.
fn node_for(case: &Case, family: Family) -> Node {
    let mut node = Node::load("fam", &MapSizes::default());
    let mut endpoints = BTreeMap::new();
    let mut ipcache = BTreeMap::new();
    for f in [Family::V4, Family::V6] {
        endpoints.insert(f.addr(Peer::A), endpoint_info(LO, ID_A, EP_A, 10));
        endpoints.insert(f.addr(Peer::B), endpoint_info(4242, ID_B, EP_B, 20));
        for (peer, id) in [(Peer::A, ID_A), (Peer::B, ID_B)] {
            ipcache.insert(IpNet::from(f.addr(peer)), IpcacheValue::new(id, None));
        }
        ipcache.insert(f.remote_prefix(), IpcacheValue::new(ID_PEER, None));
    }
    node.set_endpoints(&endpoints);
    node.set_ipcache(&ipcache);
    node.set_node_flags(NODE_F_IPV6_POLICY);
    let mut entries: BTreeMap<_, _> = case.entries.iter().copied().collect();
    propagate_denies(&mut entries);
    let states: BTreeMap<u16, PolicyState> = case
        .a_flags
        .map(|flags| {
            // As the agent writes it: whether A's entries deny anything, per direction.
            let flags = flags | deny_flags(entries.iter().filter(|(k, _)| k.endpoint_id == EP_A));
            (EP_A, PolicyState { revision: 1, flags })
        })
        .into_iter()
        .collect();
    let (cidrs, policy) = node
        .dataplane
        .policy
        .converge_with_cidrs(&family.cidrs(), &entries, &states, true)
        .unwrap();
    assert!(cidrs.is_converged() && policy.is_converged());
    node
}

/// Whether `packet` passes A's hook for it.
fn passes(node: &Node, family: Family, packet: &Packet) -> bool {
    let (a, peer) = (family.addr(Peer::A), family.addr(packet.peer));
    let verdict = match packet.dir {
        Direction::Egress => {
            node.verdict(Hook::FromContainer, &frame(family, a, peer, packet.l4), 0)
        }
        Direction::Ingress => {
            node.verdict(Hook::ToContainer, &frame(family, peer, a, packet.l4), 0)
        }
    };
    // IPv4 to a local pod is redirected into it, IPv6 goes through the stack.
    assert!(
        [TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT].contains(&verdict),
        "{family:?} {packet:?}: unexpected verdict {verdict}"
    );
    verdict != TC_ACT_SHOT
}

/// Every case of the table for `family`; returns the mismatches.
fn run_table(family: Family) -> Vec<String> {
    let mut failures = Vec::new();
    let mut packets = 0;
    for case in table() {
        let node = node_for(&case, family);
        for (i, (packet, allowed)) in case.packets.iter().enumerate() {
            packets += 1;
            let got = passes(&node, family, packet);
            if got != *allowed {
                failures.push(format!(
                    "{family:?} \"{}\" packet {i} {packet:?}: {} (want {})",
                    case.name,
                    if got { "passed" } else { "dropped" },
                    if *allowed { "pass" } else { "drop" },
                ));
            }
        }
        // The drops are policy drops, reported as such.
        let denied = case.packets.iter().filter(|(_, a)| !a).count() as u64;
        let counted = [IN, EG]
            .iter()
            .map(|d| {
                node.count(MetricReason::DropPolicy, *d)
                    + node.count(MetricReason::DropPolicyDeny, *d)
            })
            .sum::<u64>();
        if counted != denied {
            failures.push(format!(
                "{family:?} \"{}\": {counted} policy drops counted, {denied} expected",
                case.name
            ));
        }
        let drops = node
            .events()
            .into_iter()
            .filter(|e| e.kind == EventKind::Drop && e.verdict == Some(EventVerdict::Deny))
            .count() as u64;
        if drops != denied {
            failures.push(format!(
                "{family:?} \"{}\": {drops} drop events, {denied} expected",
                case.name
            ));
        }
    }
    println!("{family:?}: {packets} packets in {} cases", table().len());
    failures
}

#[test]
fn the_policy_truth_table_holds_for_both_families_alike() {
    let mut failures = run_table(Family::V4);
    failures.extend(run_table(Family::V6));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ipv6_conntrack_entries_mirror_ipv4s() {
    let case = &table()[7];
    let mut counts = Vec::new();
    for family in [Family::V4, Family::V6] {
        let node = node_for(case, family);
        for (packet, _) in &case.packets[..4] {
            passes(&node, family, packet);
        }
        let v4 = node.dataplane.conntrack.entries().unwrap().len();
        let v6 = node.dataplane.conntrack.entries6().unwrap();
        counts.push((v4, v6.len()));
        if family == Family::V6 {
            let a: Ipv6Addr = "fd00:10::a".parse().unwrap();
            let (key, value) = &v6[0];
            assert_eq!(Ipv6Addr::from(key.saddr), a);
            assert_eq!((key.sport, key.dport, key.endpoint_id), (40000, 80, EP_A));
            assert_eq!(value.packets, 4, "one entry for both directions");
        }
    }
    // One connection, one entry (egress of A), in its family's map only.
    assert_eq!(counts, [(1, 0), (0, 1)]);
}

/// An ICMPv6 error (type, code) quoting a UDP datagram A sent to `quoted_dst`.
fn icmp6_error(from: Ipv6Addr, to: Ipv6Addr, ty: u8, code: u8, quoted_dst: Ipv6Addr) -> Vec<u8> {
    let quoted = ipv6_frame(to, quoted_dst, 17, 64, &[0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
    let mut l4 = vec![ty, code, 0, 0, 0, 0, 0x05, 0x00];
    l4.extend_from_slice(&quoted[14..]);
    ipv6_frame(from, to, IPPROTO_ICMPV6, 64, &l4)
}

#[test]
fn icmpv6_neighbour_discovery_and_the_errors_rfc_4890_keeps_pass_a_default_deny() {
    let case = Case {
        name: "default deny both ways",
        entries: vec![],
        a_flags: Some(DENY_IN | DENY_EG),
        packets: vec![],
    };
    let node = node_for(&case, Family::V6);
    let a = match Family::V6.addr(Peer::A) {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => unreachable!(),
    };
    let outside = match Family::V6.addr(Peer::Outside) {
        IpAddr::V6(o) => o,
        IpAddr::V4(_) => unreachable!(),
    };
    let router: Ipv6Addr = "fe80::1".parse().unwrap();
    let into_a = |frame: &[u8]| node.verdict(Hook::ToContainer, frame, 0);
    let out_of_a = |frame: &[u8]| node.verdict(Hook::FromContainer, frame, 0);
    // Destination unreachable, packet too big, time exceeded (hop limit), parameter
    // problem (unknown next header): never dropped, tracked or not.
    for (ty, code) in [(1, 4), (2, 0), (3, 0), (4, 1), (4, 2)] {
        assert_eq!(
            into_a(&icmp6_error(router, a, ty, code, outside)),
            TC_ACT_OK,
            "ICMPv6 error type {ty} code {code}"
        );
    }
    // Other errors and informational messages are judged: denied here.
    for (ty, code) in [(3, 1), (4, 0)] {
        assert_eq!(
            into_a(&icmp6_error(router, a, ty, code, outside)),
            TC_ACT_SHOT,
            "ICMPv6 error type {ty} code {code}"
        );
    }
    assert_eq!(into_a(&icmp6(outside, a, 128, 64)), TC_ACT_SHOT, "echo");
    // Neighbour discovery passes with hop limit 255 only, both ways.
    assert_eq!(into_a(&icmp6(router, a, 135, 255)), TC_ACT_OK, "NS in");
    assert_eq!(out_of_a(&icmp6(a, router, 136, 255)), TC_ACT_OK, "NA out");
    assert_eq!(out_of_a(&icmp6(a, router, 133, 255)), TC_ACT_OK, "RS out");
    assert_eq!(
        into_a(&icmp6(outside, a, 135, 64)),
        TC_ACT_SHOT,
        "routed NS"
    );
    // Packet too big out of A (A's own error about a packet it got) passes too.
    assert_eq!(
        out_of_a(&icmp6_error(a, outside, 2, 0, router)),
        TC_ACT_OK,
        "packet too big out"
    );
    let policy_drops = node.count(MetricReason::DropPolicy, IN);
    assert_eq!(policy_drops, 4, "each judged packet counted once");
}

/// As IPv4's `later_fragments_are_judged_with_the_ports_of_the_first` (bpf_policy.rs):
/// a non-first IPv6 fragment carries no UDP header, so it gets the ports its first
/// fragment recorded in `ipv6_frags`, or none if that was never seen.
#[test]
fn later_ipv6_fragments_are_judged_with_the_ports_of_the_first() {
    let case = Case {
        name: "UDP 53 from the remote pod",
        entries: vec![(rule(IN, ID_PEER, PROTO_UDP, 53, 16), Verdict::Allow)],
        a_flags: Some(DENY_IN),
        packets: vec![],
    };
    let node = node_for(&case, Family::V6);
    let (IpAddr::V6(a), IpAddr::V6(remote)) =
        (Family::V6.addr(Peer::A), Family::V6.addr(Peer::Remote))
    else {
        unreachable!("IPv6 peers")
    };
    let into_a = |frame: &[u8]| node.verdict(Hook::ToContainer, frame, 0);
    let first = |id, dport: u16| {
        let mut udp = 1000u16.to_be_bytes().to_vec();
        udp.extend_from_slice(&dport.to_be_bytes());
        udp.extend_from_slice(&[0, 40, 0, 0]);
        udp.extend_from_slice(&[0xAB; 8]);
        ipv6_fragment(remote, a, 17, id, true, 0, &udp)
    };
    let rest = |id| ipv6_fragment(remote, a, 17, id, false, 2, &[0xAB; 24]);

    assert_eq!(into_a(&first(7, 53)), TC_ACT_OK);
    assert_eq!(into_a(&rest(7)), TC_ACT_OK, "port 53, established");
    assert_eq!(
        into_a(&rest(8)),
        TC_ACT_SHOT,
        "first fragment never seen: no ports"
    );
    assert_eq!(into_a(&first(9, 54)), TC_ACT_SHOT);
    assert_eq!(into_a(&rest(9)), TC_ACT_SHOT, "port 54");
    assert_eq!(node.count(MetricReason::DropPolicy, IN), 3);
}
